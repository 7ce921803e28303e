"""StyleGAN2 figures for the embedded generator, on this machine, in one run.

    python -m benchmarks.stylegan --json benchmarks/results/stylegan.json

- parity_max_abs_diff: the studio's networks against the official reference tensors (mapping,
  truncation, synthesis with noise 'const' and 'none', end to end, discriminator logits), and
  the official-format snapshot read through the restricted loader;
- fd_world_generator (untruncated samples vs held-out renders) with fd_world_real_vs_real (two
  real sets of the same size) as its floor;
- inversion of held-out renders (images never trained on): the W projector (StyleGAN2's
  optimisation inversion), W+ optimisation, the e4e encoder and PTI; reconstruction error in
  pixels (MSE in [-1, 1]) and in evaluator features; encoder_speedup and encoder_recon_ratio
  against the W projector (and, as *_vs_wplus, against W+ optimisation), pti_gain against W+;
- edit_success / edit_preservation on held-out inverted portraits: of guided edits (the
  generator's latent classifier, :mod:`pipelines.stylegan_guided_edit`) when it has one, and
  always of InterFaceGAN edits as *_interfacegan;
- selffilter_precision / selffilter_recall of generative self-filtering at 10 % outliers, with
  the raw generator (trained on the bank with its outliers);
- multimodal_coverage_gain: attribute modes covered at psi 0.6 by multi-modal over global
  truncation, with both FD-worlds. A mode is a pair of attribute values (blue hair with glasses)
  read together in at least --min_share of the samples; single values are reported too
  (values_covered_*: present above --min_share; values_kept_*: keeping at least half of their
  untruncated share).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from benchmarks.common import parser, write
from models.stylegan2 import Discriminator, Generator
from pipelines.data.bank import render_bank
from pipelines.data.portrait_world import ATTRIBUTES
from pipelines.evaluation import EMBEDDED_EVALUATOR, Evaluator
from pipelines.stylegan_editing import (MultiModalTruncation, _robust_z, edit_across_boundary, global_truncate,
                                        load_directions, sample_w, self_filter_scores)
from pipelines.stylegan_guided_edit import LatentAttributeClassifier, guided_edit
from pipelines.stylegan_inversion import (EvaluatorPerceptualLoss, invert, load_encoder, pivotal_tuning,
                                          reconstruction_error, synthesize)
from pipelines.stylegan_io import load_generator
from pipelines.training.self_filter import filter_report

ROOT = Path(__file__).resolve().parent.parent
EDIT_TARGETS = ("expression=smile", "glasses=yes", "glasses=no", "bangs=yes", "bangs=no",
                "hair_color=blue", "hair_color=pink", "hair_color=blonde", "accessory=hat")


# -- parity ------------------------------------------------------------------------------------
@torch.no_grad()
def parity_max_abs_diff() -> dict[str, float]:
    from tests._fixtures import shared_fixture_dir

    folder = shared_fixture_dir()
    diffs: dict[str, float] = {}
    for case in ("uncond", "cond"):
        kwargs = json.loads((folder / f"{case}_kwargs.json").read_text())
        G = Generator(**kwargs["G_init_kwargs"]).eval()
        D = Discriminator(**kwargs["D_init_kwargs"]).eval()
        G.load_state_dict(load_file(folder / f"{case}_G.safetensors"))
        D.load_state_dict(load_file(folder / f"{case}_D.safetensors"))
        io = load_file(folder / f"{case}_io.safetensors")
        outs = {
            "ws": G.mapping(io["z"], io["c"], truncation_psi=1),
            "ws_psi07": G.mapping(io["z"], io["c"], truncation_psi=0.7),
            "img_noise_const": G.synthesis(io["ws"], noise_mode="const"),
            "img_noise_none": G.synthesis(io["ws"], noise_mode="none"),
            "img_psi07_const": G(io["z"], io["c"], truncation_psi=0.7, noise_mode="const"),
            "d_logits": D(io["img_noise_const"], io["c"]),
        }
        for key, value in outs.items():
            diffs[f"{case}/{key}"] = float((value - io[key]).abs().max())
        if case == "uncond":
            snap = load_generator(folder / "uncond_snapshot_placeholder_src.pkl")  # embedded source raises if run
            diffs["snapshot/img_psi07_const"] = float(
                (snap(io["z"], io["c"], truncation_psi=0.7, noise_mode="const") - io["img_psi07_const"]).abs().max())
    return diffs


# -- helpers -----------------------------------------------------------------------------------
@torch.no_grad()
def render_samples(G: Generator, w: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([synthesize(G, chunk[:, None].expand(-1, G.num_ws, -1) if chunk.ndim == 2 else chunk).cpu()
                      for chunk in w.split(batch)])


def real_images(n: int, size: int, seed: int, split: str = "any") -> torch.Tensor:
    bank = render_bank(n, size=size, seed=seed, split=split, workers=2,
                       cache=ROOT / "runs" / "cache" / f"bank_{split}_n{n}_s{size}_seed{seed}.npz")
    return bank.images.float().div(127.5).sub(1.0)


def readings(evaluator: Evaluator, images: torch.Tensor) -> list[dict[str, str]]:
    return evaluator.predict_attributes(images)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# -- figures -----------------------------------------------------------------------------------
def inversion_figures(G, encoder, evaluator, targets, steps: int, pti_steps: int) -> tuple[dict, dict]:
    """W projection (the StyleGAN2 projector: the reference optimisation), W+ optimisation, the
    encoder, and PTI pivoting on the W projection (as Roich et al.)."""
    perceptual = EvaluatorPerceptualLoss(evaluator)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    def errors(images):
        with torch.no_grad():
            return float(reconstruction_error(images, targets).mean()), float(perceptual(images, targets).mean())

    opt_w, t_w = timed(lambda: invert(G, targets, method="w", steps=steps, evaluator=evaluator, generator=gen()))
    opt_wp, t_wp = timed(lambda: invert(G, targets, method="w+", steps=steps, evaluator=evaluator, generator=gen()))
    with torch.no_grad():
        encoder(targets[:2])  # warm-up
        (w_enc, rec_enc), t_enc = timed(lambda: (lambda w: (w, synthesize(G, w)))(encoder(targets)))
    pti, t_pti = timed(lambda: pivotal_tuning(G, targets, opt_w.w_plus, steps=pti_steps, evaluator=evaluator,
                                              noise=opt_w.noise, generator=gen()))
    e_w, f_w = errors(opt_w.images)
    e_wp, f_wp = errors(opt_wp.images)
    e_enc, f_enc = errors(rec_enc)
    e_pti, f_pti = errors(pti.images)
    n = targets.shape[0]
    figures = {
        "inversion_images": n, "optimise_steps": steps, "pti_steps": pti_steps,
        "optimise_w_seconds_per_image": t_w / n, "optimise_wplus_seconds_per_image": t_wp / n,
        "encoder_seconds_per_image": t_enc / n, "pti_seconds_per_image": (t_pti + t_w) / n,
        "recon_mse_optimise_w": e_w, "recon_mse_optimise_wplus": e_wp, "recon_mse_encoder": e_enc,
        "recon_mse_pti": e_pti,
        "recon_feature_optimise_w": f_w, "recon_feature_optimise_wplus": f_wp, "recon_feature_encoder": f_enc,
        "recon_feature_pti": f_pti,
        # the encoder against the W projector (StyleGAN2's optimisation inversion) ...
        "encoder_speedup": t_w / t_enc,
        "encoder_recon_ratio": e_enc / e_w,
        "encoder_feature_ratio": f_enc / f_w,
        # ... and against W+ optimisation
        "encoder_speedup_vs_wplus": t_wp / t_enc,
        "encoder_recon_ratio_vs_wplus": e_enc / e_wp,
        "pti_gain": 1 - e_pti / e_wp,
        "pti_feature_gain": 1 - f_pti / f_wp,
    }
    return figures, {"optimise-w+": opt_wp.w_plus.detach(), "encoder": w_enc.detach()}


def edit_figures(G, evaluator, edit, w_plus: torch.Tensor, targets=EDIT_TARGETS) -> dict:
    """Success and preservation of ``edit(w_plus, 'attribute=value') -> edited w_plus`` on every
    latent whose image does not show the value yet (as the evaluator reads the images)."""
    with torch.no_grad():
        before = readings(evaluator, synthesize(G, w_plus))
    success, preserved, per_target, seconds = [], [], {}, 0.0
    for key in targets:
        attr, value = key.split("=")
        todo = [i for i, r in enumerate(before) if r[attr] != value]
        if not todo:
            continue
        t = time.perf_counter()
        w = edit(w_plus[todo], key)
        seconds += time.perf_counter() - t
        with torch.no_grad():
            after = readings(evaluator, synthesize(G, w))
        s = [a[attr] == value for a in after]
        p = [np.mean([a[o] == before[i][o] for o in ATTRIBUTES if o != attr]) for i, a in zip(todo, after)]
        success += s
        preserved += p
        per_target[key] = {"n": len(todo), "success": float(np.mean(s)), "preservation": float(np.mean(p))}
    return {"edit_success": float(np.mean(success)), "edit_preservation": float(np.mean(preserved)),
            "edits": int(len(success)), "edit_ms_per_image": 1000 * seconds / max(len(success), 1),
            "edit_per_target": per_target}


def value_shares(readings_list: list[dict[str, str]]) -> dict[tuple[str, str], float]:
    """Share of the images in which each (attribute, value) is read."""
    counts: dict[tuple[str, str], int] = {}
    for r in readings_list:
        for k, v in r.items():
            counts[(k, v)] = counts.get((k, v), 0) + 1
    return {k: c / len(readings_list) for k, c in counts.items()}


def coverage(readings_list: list[dict[str, str]], min_share: float) -> int:
    """Attribute values read in at least ``min_share`` of the images."""
    return sum(1 for s in value_shares(readings_list).values() if s >= min_share)


def pair_coverage(readings_list: list[dict[str, str]], min_share: float) -> int:
    """Attribute-pair modes (a value of one attribute with a value of another, e.g. blue hair with
    glasses) read together in at least ``min_share`` of the images."""
    counts: dict[tuple, int] = {}
    for r in readings_list:
        for a, b in itertools.combinations(sorted(r), 2):
            counts[(a, r[a], b, r[b])] = counts.get((a, r[a], b, r[b]), 0) + 1
    return sum(1 for c in counts.values() if c >= min_share * len(readings_list))


def kept_share(readings_list: list[dict[str, str]], reference: list[dict[str, str]], min_share: float,
               keep: float = 0.5) -> int:
    """Attribute values (of those with ``min_share`` in ``reference``) whose share is at least
    ``keep`` of their share in ``reference``: what truncation keeps of the untruncated mix."""
    ref, got = value_shares(reference), value_shares(readings_list)
    return sum(1 for k, s in ref.items() if s >= min_share and got.get(k, 0.0) >= keep * s)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--generator", default=str(ROOT / "assets" / "stylegan2_portraits64"))
    p.add_argument("--raw_generator", default=str(ROOT / "assets" / "stylegan2_portraits64_raw"))
    p.add_argument("--fd_samples", type=int, default=2000)
    p.add_argument("--inversion_images", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pti_steps", type=int, default=350, help="PTI steps (Roich et al.: 350 at lr 3e-4)")
    p.add_argument("--edit_images", type=int, default=64)
    p.add_argument("--edit_inversion", default="encoder", choices=["encoder", "optimise-w+"])
    p.add_argument("--edit_distance", type=float, default=2.0, help="InterFaceGAN: boundary distance after the edit")
    p.add_argument("--edit_method", default="guided", choices=["guided", "interfacegan"],
                   help="edit_success/edit_preservation of guided edits (with the generator's latent classifier) "
                        "or of InterFaceGAN; the InterFaceGAN figures are always reported as *_interfacegan")
    p.add_argument("--filter_images", type=int, default=1000)
    p.add_argument("--filter_steps", type=int, default=10)
    p.add_argument("--psi", type=float, default=0.6)
    p.add_argument("--min_share", type=float, default=0.005, help="share of samples an attribute value needs to count as covered")
    args = p.parse_args()
    torch.set_num_threads(2)
    figures: dict = {}

    diffs = parity_max_abs_diff()
    figures["parity_max_abs_diff"] = max(diffs.values())
    figures["parity_outputs"] = len(diffs)

    device = args.device
    G = load_generator(args.generator, device=device)
    evaluator = Evaluator.from_pretrained(EMBEDDED_EVALUATOR, device=device)
    folder = Path(args.generator)
    encoder = load_encoder(folder / "encoder", device=device)
    directions = load_directions(folder / "directions")
    modes = MultiModalTruncation.load(folder / "modes")
    res = G.img_resolution

    # FD-world: generator vs real, real vs real (two disjoint real sets, unseen in training).
    n = args.fd_samples
    real_a = real_images(n, res, seed=5_000_000)
    real_b = real_images(n, res, seed=6_000_000)
    feats_a = evaluator.features(real_a)
    w = sample_w(G, n, generator=torch.Generator().manual_seed(1))
    fake = render_samples(G, w)
    from pipelines.evaluation import frechet_distance
    figures["fd_world_generator"] = frechet_distance(evaluator.features(fake), feats_a)
    figures["fd_world_real_vs_real"] = frechet_distance(evaluator.features(real_b), feats_a)
    figures["fd_samples"] = n

    # Multi-modal vs global truncation at the same psi.
    glob = render_samples(G, global_truncate(w, G.mapping.w_avg, args.psi))
    multi = render_samples(G, modes.truncate(w, args.psi))
    figures["truncation_psi"] = args.psi
    figures["fd_world_global_truncation"] = frechet_distance(evaluator.features(glob), feats_a)
    figures["fd_world_multimodal_truncation"] = frechet_distance(evaluator.features(multi), feats_a)
    read_g, read_m, read_f = readings(evaluator, glob), readings(evaluator, multi), readings(evaluator, fake)
    real_readings = readings(evaluator, real_a)
    # Modes: attribute-pair modes read in >= min_share of the samples (single values alone saturate:
    # at psi 0.6 both truncations keep every value above 0.5 %, so they are reported beside it).
    cov_g, cov_m = pair_coverage(read_g, args.min_share), pair_coverage(read_m, args.min_share)
    figures["modes_covered_global"], figures["modes_covered_multimodal"] = cov_g, cov_m
    figures["modes_covered_untruncated"] = pair_coverage(read_f, args.min_share)
    figures["modes_covered_real"] = pair_coverage(real_readings, args.min_share)
    figures["modes_kind"] = f"attribute-value pairs read in >= {args.min_share:.1%} of {n} samples"
    figures["multimodal_coverage_gain"] = cov_m / max(cov_g, 1)
    figures["values_covered_global"] = coverage(read_g, args.min_share)
    figures["values_covered_multimodal"] = coverage(read_m, args.min_share)
    figures["values_total"] = sum(len(v) for v in ATTRIBUTES.values())
    figures["values_kept_global"] = kept_share(read_g, read_f, args.min_share)
    figures["values_kept_multimodal"] = kept_share(read_m, read_f, args.min_share)
    figures["values_kept_gain"] = figures["values_kept_multimodal"] / max(figures["values_kept_global"], 1)
    figures["multimodal_k"] = modes.k

    # Inversion of held-out renders.
    targets = real_images(args.inversion_images, res, seed=7_000_000)
    inv, latents = inversion_figures(G, encoder, evaluator, targets.to(device), args.steps, args.pti_steps)
    figures.update(inv)

    # Edits on held-out inverted portraits.
    edit_targets = real_images(args.edit_images, res, seed=8_000_000)
    if args.edit_inversion == "encoder":
        with torch.no_grad():
            w_edit = encoder(edit_targets)
    else:
        w_edit = invert(G, edit_targets, method="w+", steps=args.steps, evaluator=evaluator,
                        generator=torch.Generator().manual_seed(0)).w_plus
    figures["edit_inversion"] = args.edit_inversion
    linear = edit_figures(G, evaluator, lambda w, key: edit_across_boundary(
        w, directions[key], distance=args.edit_distance, only_forward=False).detach(), w_edit,
        [k for k in EDIT_TARGETS if k in directions])
    figures.update({f"{k}_interfacegan": v for k, v in linear.items()})
    figures["edit_distance_interfacegan"] = args.edit_distance
    if (folder / "latent_classifier").is_dir() and args.edit_method == "guided":
        classifier = LatentAttributeClassifier.from_pretrained(folder / "latent_classifier", device=device)
        guided = edit_figures(G, evaluator, lambda w, key: guided_edit(classifier, w, key).w_plus, w_edit)
        figures["edit_method"] = "guided (latent classifier)"
        figures.update(guided)
    else:
        figures["edit_method"] = f"InterFaceGAN, boundary distance {args.edit_distance}"
        figures.update(linear)

    # Self-filtering with the raw generator on (a part of) the bank it trained on.
    raw_folder = Path(args.raw_generator)
    if raw_folder.exists():
        G_raw = load_generator(raw_folder, device=device)
        cfg = json.loads((raw_folder / "card.json").read_text())["config"] if (raw_folder / "card.json").exists() else {}
        bank = render_bank(args.filter_images, size=res, seed=int(cfg.get("seed", 0)), split="train",
                           outlier_rate=float(cfg.get("outlier_rate", 0.1)), workers=2,
                           cache=ROOT / "runs" / "cache" / f"bank_train_n{args.filter_images}_s{res}_seed{int(cfg.get('seed', 0))}_out.npz")
        images = bank.images.float().div(127.5).sub(1.0)
        raw_encoder = load_encoder(raw_folder / "encoder", device=device) if (raw_folder / "encoder").is_dir() else None
        scores, t_filter = timed(lambda: self_filter_scores(G_raw, images, steps=args.filter_steps, encoder=raw_encoder,
                                                            evaluator=evaluator, batch_size=128,
                                                            generator=torch.Generator().manual_seed(0)))
        rate = float(bank.is_outlier.float().mean())
        combined = filter_report(scores.scores, bank.is_outlier, rate)
        generator_only = filter_report(scores.generator_scores, bank.is_outlier, rate)
        recon = filter_report(_robust_z(scores.reconstruction_error), bank.is_outlier, rate)
        from sklearn.metrics import roc_auc_score
        truth = bank.is_outlier.numpy()
        figures.update({
            "selffilter_images": len(images), "selffilter_outlier_share": rate,
            "selffilter_inversion": "encoder" if raw_encoder is not None else f"W optimisation, {args.filter_steps} steps",
            "selffilter_precision": combined["precision"], "selffilter_recall": combined["recall"],
            "selffilter_precision_generator_only": generator_only["precision"],
            "selffilter_recall_generator_only": generator_only["recall"],
            "selffilter_precision_reconstruction_only": recon["precision"],
            "selffilter_recall_reconstruction_only": recon["recall"],
            "selffilter_auc_combined": float(roc_auc_score(truth, scores.scores.numpy())),
            "selffilter_auc_generator_only": float(roc_auc_score(truth, scores.generator_scores.numpy())),
            "selffilter_auc_reconstruction": float(roc_auc_score(truth, scores.reconstruction_error.numpy())),
            "selffilter_auc_latent_distance": float(roc_auc_score(truth, scores.latent_distance.numpy())),
            "selffilter_seconds": t_filter,
        })
    write(figures, args.json, "benchmarks.stylegan", card=Path(args.generator) if args.card else None)


if __name__ == "__main__":
    main()
