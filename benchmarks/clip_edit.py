"""CLIP-edit figures for the embedded models on this machine, every method side by side, in one run.

    python -m benchmarks.clip_edit --json benchmarks/results/clip_edit.json

- clip_zero_shot_accuracy: the CLIP's zero-shot reading of every attribute (``zs_<attribute>``)
  on renders of the attribute combinations held out of its training;
- for each method (StyleCLIP optimisation, global directions, the text mapper), on held-out
  renders inverted with the generator's encoder: edit_success_single / edit_success_double (the
  evaluator reads every asked value after the edit), edit_preservation (the share of the other
  attributes that keep the evaluator's reading), clip_gain (mean CLIP-score change) and
  seconds_per_edit (batch 1, text encoding and rendering included);
- mapper_speedup = optimisation seconds / mapper seconds per edit, with mapper_success and the
  optimisation's success (pooled over single and double edits) and their gap;
- warning rates: the share of edits that carry a warning, for texts the portrait world knows
  ("blue hair") and for texts it cannot ground ("make it a car"); ``failure_warning_rate_*``
  counts only the warnings that the text was not carried out (not the side-effect warning).

The headline edit_* figures are those of ``--headline`` (default: the optimisation); ``methods``
holds every method's figures. On this project's 2-core CPU the defaults take about 20 minutes,
most of it the optimisation (``--steps`` steps per edit, ~45 ms per image and step);
``--edit_images 8`` gives a quick look.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import parser, write
from pipelines.clip_edit import (DOUBLE_EDITS, SINGLE_EDITS, GlobalDirections, clip_probe, edit_phrase, global_edit,
                                 load_mapper, mapper_edit, measure_edits, optimise_edit, probe_similarity,
                                 world_vocabulary)
from pipelines.clip_edit_session import SIDE_EFFECT_WARNING, CLIPEditor
from pipelines.clip_models import load_clip, zero_shot_accuracy
from pipelines.data.bank import render_bank
from pipelines.evaluation import EMBEDDED_EVALUATOR, Evaluator
from pipelines.stylegan_inversion import load_encoder, synthesize
from pipelines.stylegan_io import load_generator
from pipelines.stylegan_session import EditSession, StyleGANEditor

ROOT = Path(__file__).resolve().parent.parent
UNGROUNDED = ("make it a car", "a spaceship", "a golden retriever", "a volcano at night")
ZERO_SHOT_SEED, EDIT_SEED = 9_500_000, 9_000_000   # distinct from every training and benchmark seed


def bank_images(n: int, size: int, seed: int, split: str, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    bank = render_bank(n, size=size, seed=seed, split=split, workers=2,
                       cache=cache_dir / f"bank_{split}_n{n}_s{size}_seed{seed}.npz")
    return bank.images, bank.labels


def method_figures(name: str, apply, evaluator: Evaluator, source_images: torch.Tensor, w_plus: torch.Tensor,
                   batch: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    single = measure_edits(evaluator, source_images, w_plus, SINGLE_EDITS, apply, batch_size=batch)
    double = measure_edits(evaluator, source_images, w_plus, DOUBLE_EDITS, apply, batch_size=batch)
    n_s, n_d = single["edits"], double["edits"]
    print(f"{name}: single {single['success']:.3f}, double {double['success']:.3f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {
        "edit_success_single": single["success"], "edit_success_double": double["success"],
        "edit_success": (single["success"] * n_s + double["success"] * n_d) / (n_s + n_d),
        "edit_preservation": (single["preservation"] * n_s + double["preservation"] * n_d) / (n_s + n_d),
        "edit_preservation_single": single["preservation"], "edit_preservation_double": double["preservation"],
        "clip_gain_single": single["clip_gain"], "clip_gain_double": double["clip_gain"],
        "edits_single": n_s, "edits_double": n_d,
        "per_edit": {**single["per_edit"], **double["per_edit"]},
    }


def seconds_per_edit(apply_timed, w_plus: torch.Tensor, count: int) -> float:
    """Mean wall time of ``count`` batch-1 edits (after one warm-up)."""
    texts = [edit_phrase(e) for e in SINGLE_EDITS]
    apply_timed(w_plus[:1], texts[0])
    times = [apply_timed(w_plus[i % len(w_plus)][None], texts[i % len(texts)]) for i in range(count)]
    return float(np.mean(times))


def warning_rates(editor: CLIPEditor, w_plus: torch.Tensor, method: str, images: int, steps: int,
                  alpha: float, beta: float, strength: float) -> dict[str, float]:
    """Share of edits carrying a warning, for grounded and for ungrounded texts: any warning, and
    those that say the text was not carried out (a low score, unknown words, no change), which
    leaves out the side-effect warning ("the edit also changed ...")."""
    rates = {}
    for kind, texts in (("grounded", [edit_phrase(e) for e in SINGLE_EDITS[:4]]), ("ungrounded", UNGROUNDED)):
        flags, failed = [], []
        for i in range(images):
            session = editor.start(EditSession(w_plus=w_plus[i:i + 1].cpu(), generator="benchmark",
                                               source=f"held-out render {i}"))
            for text in texts:
                out = editor.edit(session, text=text, method=method, steps=steps, alpha=alpha, beta=beta,
                                  strength=strength)
                flags.append(bool(out.warnings))
                failed.append(any(not w.startswith(SIDE_EFFECT_WARNING) for w in out.warnings))
        rates[f"warning_rate_{kind}"] = float(np.mean(flags))
        rates[f"failure_warning_rate_{kind}"] = float(np.mean(failed))
    return rates


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--generator", default=str(ROOT / "assets" / "stylegan2_portraits64"))
    p.add_argument("--clip", default=str(ROOT / "assets" / "clip"))
    p.add_argument("--evaluator", default=str(EMBEDDED_EVALUATOR))
    p.add_argument("--mapper", default=None, help="default: <generator>/clip_mapper")
    p.add_argument("--directions", default=None, help="default: <generator>/clip_global_directions")
    p.add_argument("--methods", default="optimise,global,mapper")
    p.add_argument("--headline", default="optimise", choices=["optimise", "global", "mapper"])
    p.add_argument("--zero_shot_images", type=int, default=2000)
    p.add_argument("--edit_images", type=int, default=24)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=60, help="optimisation steps per edit")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--l2_weight", type=float, default=0.008)
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--timing_edits", type=int, default=4)
    p.add_argument("--warning_images", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 on a busy machine)")
    p.add_argument("--cache_dir", type=Path, default=ROOT / "runs" / "cache", help="rendered banks are kept here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    figures: dict[str, Any] = {}

    # 1. The models.
    G = load_generator(args.generator, device=device).requires_grad_(False)
    clip = load_clip(args.clip, device=device)
    evaluator = Evaluator.from_pretrained(args.evaluator, device=device)
    folder = Path(args.generator)
    encoder = load_encoder(folder / "encoder", device=device)
    methods = [m for m in args.methods.split(",") if m]
    mapper = directions = None
    if "mapper" in methods:
        mapper, probe = load_mapper(args.mapper or folder / "clip_mapper", device=device)
        figures["mapper_clip_match"] = probe_similarity(probe, clip_probe(clip)) if probe is not None else None
    if "global" in methods:
        directions = GlobalDirections.load(args.directions or folder / "clip_global_directions")
        directions.check(G, clip)

    # 2. Zero-shot accuracy on held-out attribute combinations.
    # At the generator's resolution: the portraits the tab edits (the CLIP resizes them to its input).
    images, labels = bank_images(args.zero_shot_images, G.img_resolution, ZERO_SHOT_SEED, "heldout", args.cache_dir)
    t0 = time.perf_counter()
    figures.update(zero_shot_accuracy(clip.model, clip.tokenizer, images, labels))
    figures["zero_shot_images"] = len(images)
    print(f"zero-shot {figures['clip_zero_shot_accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    # 3. Held-out portraits, inverted with the encoder; the edits read on their reconstructions.
    images, _ = bank_images(args.edit_images, G.img_resolution, EDIT_SEED, "any", args.cache_dir)
    with torch.no_grad():
        w_plus = torch.cat([encoder(x.float().div(127.5).sub(1).to(device)) for x in images.split(64)])
        source_images = torch.cat([synthesize(G, w).cpu() for w in w_plus.split(64)])
    figures["edit_images"] = len(w_plus)

    appliers = {
        "optimise": lambda wb, text: optimise_edit(G, clip, wb, text, steps=args.steps, lr=args.lr,
                                                   l2_weight=args.l2_weight, evaluator=evaluator),
        "global": lambda wb, text: global_edit(G, clip, directions, wb, text, alpha=args.alpha, beta=args.beta),
        "mapper": lambda wb, text: mapper_edit(G, clip, mapper, wb, text, strength=args.strength),
    }
    timed = {
        "optimise": lambda wb, text: appliers["optimise"](wb, text).seconds,
        "global": lambda wb, text: appliers["global"](wb, text).seconds,
        "mapper": lambda wb, text: mapper_edit(G, clip, mapper, wb, text, strength=args.strength, score=False).seconds,
    }
    settings = {"optimise": {"steps": args.steps, "lr": args.lr, "l2_weight": args.l2_weight,
                             "preservation": "attributes"},
                "global": {"alpha": args.alpha, "beta": args.beta}, "mapper": {"strength": args.strength}}

    # 4. Each method: success, preservation, time, warnings.
    stylegan = StyleGANEditor(G, name="benchmark", evaluator=evaluator)
    editor = CLIPEditor(stylegan, clip, mapper=mapper, directions=directions, evaluator=evaluator,
                        vocabulary=world_vocabulary())
    per_method: dict[str, dict[str, Any]] = {}
    for name in methods:
        m = method_figures(name, appliers[name], evaluator, source_images, w_plus, args.batch)
        m["seconds_per_edit"] = seconds_per_edit(timed[name], w_plus, args.timing_edits)
        m.update(warning_rates(editor, w_plus, name, args.warning_images, args.steps, args.alpha, args.beta,
                               args.strength))
        m["settings"] = settings[name]
        per_method[name] = m
    figures["methods"] = per_method

    # 5. Headline figures and the mapper against the optimisation.
    head = per_method.get(args.headline) or next(iter(per_method.values()))
    figures["headline_method"] = args.headline if args.headline in per_method else methods[0]
    for key in ("edit_success_single", "edit_success_double", "edit_preservation"):
        figures[key] = head[key]
    for name, m in per_method.items():
        for key in ("edit_success_single", "edit_success_double", "edit_preservation", "seconds_per_edit"):
            figures[f"{name}_{key}"] = m[key]
    if "mapper" in per_method and "optimise" in per_method:
        opt_m, map_m = per_method["optimise"], per_method["mapper"]
        figures["mapper_speedup"] = opt_m["seconds_per_edit"] / map_m["seconds_per_edit"]
        figures["mapper_success"] = map_m["edit_success"]
        figures["optimise_success"] = opt_m["edit_success"]
        figures["mapper_success_gap"] = opt_m["edit_success"] - map_m["edit_success"]
    write(figures, args.json, "benchmarks.clip_edit", card=Path(args.clip) if args.card else None)


if __name__ == "__main__":
    main()
