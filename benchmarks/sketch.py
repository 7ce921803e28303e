"""Sketch-to-anime figures for the embedded generator's sketch encoder, on this machine, one run.

    python -m benchmarks.sketch --json benchmarks/results/sketch.json

- stroke_latency_p95_ms: one update of the pipeline (canvas -> sketch -> W+ -> portrait, one
  candidate) over a drawing session: the strokes of held-out portraits added one at a time on a
  512 px RGBA canvas;
- complete_sketch_attr_match: on complete held-out sketches (exact line art of portraits with
  held-out attribute combinations), the share of structural attributes (hair style, bangs,
  glasses, expression, accessory) the evaluator finds in the output as in the source portrait;
- partial_fd_ratio: FD-world(outputs from 50 %-complete sketches, real) / FD-world(random
  samples, real);
- colour_basis_dims: the colours carried into the structure ws (0: ``--no_colour_transfer`` or a
  generator folder without directions);
- partial_sketch_attr_match (and partial_match_<attribute>): the same share on the 50 % sketches,
  where the details (mouth, glasses, accessory) are mostly not drawn yet;
- alignment_gain: the same figures for a student trained without teacher alignment
  (``--baseline``), on the 50 % sketches: partial attribute match (aligned minus baseline, with
  ``alignment_gain_se``, its standard error paired over the same portraits) and FD ratio
  (``alignment_fd_gain``, baseline minus aligned), both reported.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import parser, write
from pipelines.data.portrait_world import PortraitWorld
from pipelines.evaluation import EMBEDDED_EVALUATOR, Evaluator, frechet_distance
from pipelines.sketch_data import partial_strokes, render_strokes
from pipelines.sketch_to_image import STRUCTURE_ATTRIBUTES as STRUCTURE
from pipelines.sketch_to_image import SketchToImagePipeline, load_colour_basis, load_sketch_encoder
from pipelines.stylegan_editing import sample_w
from pipelines.stylegan_io import load_generator

ROOT = Path(__file__).resolve().parent.parent


def held_out_portraits(n: int, seed: int = 9_000_000):
    world = PortraitWorld()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        attrs = world.sample_attributes(rng, split="heldout")
        out.append(world.render(attrs, seed=seed + i, size=256))
    return out


def outputs_for(pipe: SketchToImagePipeline, sketches: list[Image.Image], seed: int = 0) -> list[Image.Image]:
    return [pipe(sketch=s, num_candidates=1, colour_seed=seed + i).images[0] for i, s in enumerate(sketches)]


def attr_match(evaluator: Evaluator, outputs: list[Image.Image], portraits) -> float:
    return float(np.mean(list(shares(attr_hits(evaluator, outputs, portraits)).values())))


def attr_hits(evaluator: Evaluator, outputs: list[Image.Image], portraits) -> dict[str, np.ndarray]:
    """Per attribute, whether the evaluator reads the source portrait's value back from each output."""
    read = evaluator.predict_attributes(outputs)
    return {a: np.array([r[a] == getattr(p.attributes, a) for r, p in zip(read, portraits)]) for a in STRUCTURE}


def shares(hits: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of portraits whose structural attribute the evaluator reads back, per attribute."""
    return {a: float(h.mean()) for a, h in hits.items()}


def paired_gain(hits: dict[str, np.ndarray], base_hits: dict[str, np.ndarray]) -> tuple[float, float]:
    """Mean match difference over the same portraits, and its standard error: each portrait's share of
    attributes read back by one student minus the other's, so the spread between portraits cancels."""
    diff = np.mean([hits[a].astype(float) - base_hits[a].astype(float) for a in STRUCTURE], axis=0)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")


def latency(pipe: SketchToImagePipeline, portraits, canvas: int = 512) -> list[float]:
    times = []
    for p in portraits:
        for k in range(1, len(p.strokes) + 1):
            sketch = render_strokes(p.strokes[:k], size=canvas).convert("RGBA")
            t0 = time.perf_counter()
            pipe(sketch=np.asarray(sketch), num_candidates=1, colour_seed=0)
            times.append(1000 * (time.perf_counter() - t0))
    return times


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--generator", default=str(ROOT / "assets" / "stylegan2_portraits64"))
    p.add_argument("--sketch_encoder", default=None, help="default: <generator>/sketch_encoder")
    p.add_argument("--baseline", default=None, help="a sketch encoder trained without alignment")
    p.add_argument("--images", type=int, default=1000,
                   help="held-out portraits; 1000 puts the standard error of alignment_gain near 0.007")
    p.add_argument("--latency_portraits", type=int, default=5)
    p.add_argument("--no_colour_transfer", action="store_true",
                   help="leave the structure ws as the encoder made them (no colour basis)")
    args = p.parse_args()
    torch.set_num_threads(2)
    device = args.device

    G = load_generator(args.generator, device=device)
    evaluator = Evaluator.from_pretrained(EMBEDDED_EVALUATOR, device=device)
    enc_path = args.sketch_encoder or str(Path(args.generator) / "sketch_encoder")
    basis = None if args.no_colour_transfer else load_colour_basis(args.generator)
    pipe = SketchToImagePipeline(G, load_sketch_encoder(enc_path, device=device), evaluator=evaluator,
                                 colour_basis=basis)
    portraits = held_out_portraits(args.images)
    complete = [p.line_art for p in portraits]
    half = [render_strokes(partial_strokes(p.strokes, 0.5), size=256) for p in portraits]
    real = [p.image for p in held_out_portraits(args.images, seed=9_500_000)]
    with torch.no_grad():
        w = sample_w(G, args.images, generator=torch.Generator().manual_seed(0))
        random = G.synthesis(w[:, None].expand(-1, G.num_ws, -1), noise_mode="const")
    fd_random = frechet_distance(evaluator.features(random), evaluator.features(real))

    figures: dict = {}
    lat = latency(pipe, portraits[:args.latency_portraits])
    figures["stroke_latency_p50_ms"] = float(np.percentile(lat, 50))
    figures["stroke_latency_p95_ms"] = float(np.percentile(lat, 95))
    figures["stroke_updates_timed"] = len(lat)
    out_complete = outputs_for(pipe, complete)
    out_half = outputs_for(pipe, half)
    figures["complete_sketch_attr_match"] = attr_match(evaluator, out_complete, portraits)
    half_hits = attr_hits(evaluator, out_half, portraits)
    by_attribute = shares(half_hits)
    figures["partial_sketch_attr_match"] = float(np.mean(list(by_attribute.values())))
    figures.update({f"partial_match_{a}": v for a, v in by_attribute.items()})
    figures["fd_world_random_samples"] = fd_random
    figures["fd_world_partial_outputs"] = frechet_distance(evaluator.features(out_half), evaluator.features(real))
    figures["partial_fd_ratio"] = figures["fd_world_partial_outputs"] / fd_random
    figures["held_out_portraits"] = args.images
    figures["colour_basis_dims"] = 0 if basis is None else int(basis.shape[1])
    if args.baseline:
        base = SketchToImagePipeline(G, load_sketch_encoder(args.baseline, device=device), evaluator=evaluator,
                                     colour_basis=basis)
        base_half = outputs_for(base, half)
        base_hits = attr_hits(evaluator, base_half, portraits)
        base_by_attribute = shares(base_hits)
        figures["baseline_partial_sketch_attr_match"] = float(np.mean(list(base_by_attribute.values())))
        figures.update({f"baseline_partial_match_{a}": v for a, v in base_by_attribute.items()})
        figures["baseline_complete_sketch_attr_match"] = attr_match(evaluator, outputs_for(base, complete), portraits)
        figures["baseline_partial_fd_ratio"] = frechet_distance(evaluator.features(base_half),
                                                                evaluator.features(real)) / fd_random
        figures["alignment_gain"], figures["alignment_gain_se"] = paired_gain(half_hits, base_hits)
        figures["alignment_fd_gain"] = figures["baseline_partial_fd_ratio"] - figures["partial_fd_ratio"]
    write(figures, args.json, "benchmarks.sketch", card=Path(enc_path) if args.card else None)


if __name__ == "__main__":
    main()
