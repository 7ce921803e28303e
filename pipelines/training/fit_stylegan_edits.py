"""Fit what the StyleGAN edit tab needs beside a generator: InterFaceGAN directions for every
attribute value the evaluator reads, the perceptual modes of multi-modal truncation, and the
latent classifier of guided edits.

All are fitted from the generator's own latents labelled by the portrait-world evaluator
(Shen et al. 2020; Mokady et al. 2022; :mod:`pipelines.stylegan_guided_edit`), and written into
the generator folder::

    python -m pipelines.training.fit_stylegan_edits --generator assets/stylegan2_portraits64 \\
        --num_samples 6000 --k 16

-> ``<generator>/directions/`` (directions.safetensors + directions.json),
``<generator>/modes/`` (modes.safetensors + modes.json), ``<generator>/latent_classifier/``
(model.safetensors + config.json), and ``<generator>/edits.json`` with the command, the
per-direction and per-attribute held-out accuracies and the sample counts. ``--parts`` picks
which of the three to (re)fit; the others are kept.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipelines.device import select_device
from pipelines.evaluation import Evaluator
from pipelines.stylegan_editing import (cluster_modes, fit_directions_from_labels, sample_labelled_latents,
                                        save_directions)
from pipelines.stylegan_io import load_generator
from pipelines.training.runs import config_to_dict, parse_config

__all__ = ["FitEditsConfig", "fit", "main"]


@dataclass
class FitEditsConfig:
    """InterFaceGAN directions + multi-modal truncation modes for one generator."""

    generator: str = "assets/stylegan2_portraits64"  # studio generator folder (the outputs go inside it)
    evaluator: str = "assets/evaluator"
    out_dir: Optional[str] = None  # None = the generator folder
    device: str = "auto"
    seed: int = 0
    num_samples: int = 6000  # labelled samples for the directions
    truncation_psi: float = 0.8  # of the labelled samples (clean labels, still diverse)
    classifier: str = "svm"  # 'svm' | 'logistic'
    min_samples: int = 30  # skip values with fewer positives
    max_outlier_score: float = 0.5  # samples the evaluator calls outliers are not used
    condition: bool = True  # colour directions with the structural ones projected out
    k: int = 16  # modes (k-means clusters of evaluator features)
    mode_samples: int = 4000
    parts: str = "directions,modes,latent_classifier"  # what to fit (comma-separated); the rest is kept
    lc_bank: int = 20000  # training-split renders inverted with the generator's encoder (0 or no encoder: none)
    lc_samples: int = 8000  # sampled latents, half of them style-mixed
    lc_mining_rounds: int = 3  # rounds of relabelled guided edits added to the training set
    lc_mining_samples: int = 6000  # edited latents per round
    lc_hard_mining: bool = False  # rounds after the first favour target values whose edits missed more often
    lc_mining_chunk: int = 200  # edited latents per drawn target value
    lc_epochs: int = 30
    lc_hidden: int = 512
    lc_members: int = 3  # MLPs in the final classifier (an ensemble); the mining rounds use one
    prototype_samples: int = 8000  # sampled latents whose classifier readings give each value's prototype
    bank_cache: str = "runs/cache"  # folder of rendered training banks (reused across runs)

    def validate(self) -> None:
        for name in ("num_samples", "min_samples", "k", "mode_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.k > self.mode_samples:
            raise ValueError(f"k ({self.k}) must not exceed mode_samples ({self.mode_samples})")
        if not 0 < self.truncation_psi <= 1:
            raise ValueError(f"truncation_psi must be in (0, 1], got {self.truncation_psi}")
        if self.classifier not in ("svm", "logistic"):
            raise ValueError(f"classifier must be 'svm' or 'logistic', got {self.classifier!r}")
        if not Path(self.generator).is_dir():
            raise ValueError(f"generator {self.generator!r} is not a studio generator folder")
        if not Path(self.evaluator).is_dir():
            raise ValueError(f"evaluator {self.evaluator!r} is not an evaluator folder")
        unknown = set(self.part_list) - set(PARTS)
        if unknown or not self.part_list:
            raise ValueError(f"parts must name some of {list(PARTS)}, got {self.parts!r}")
        if self.lc_mining_chunk < 1:
            raise ValueError(f"lc_mining_chunk must be positive, got {self.lc_mining_chunk}")
        for name in ("lc_bank", "lc_samples", "lc_mining_rounds", "lc_mining_samples", "prototype_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.lc_epochs < 1 or self.lc_hidden < 1 or self.lc_members < 1:
            raise ValueError(f"lc_epochs, lc_hidden and lc_members must be positive, got {self.lc_epochs}, "
                             f"{self.lc_hidden}, {self.lc_members}")

    @property
    def part_list(self) -> list[str]:
        return [p.strip() for p in self.parts.split(",") if p.strip()]


PARTS = ("directions", "modes", "latent_classifier", "prototypes")  # latent_classifier includes prototypes


# Structural attributes: a colour edit should not move them.
STRUCTURE = ("expression=smile", "glasses=yes", "bangs=yes", "accessory=hat", "hair_style=long")


def fit(config: FitEditsConfig, command: str | None = None) -> Path:
    config.validate()
    device = select_device(config.device)
    out = Path(config.out_dir or config.generator)
    G = load_generator(config.generator, device=device)
    evaluator = Evaluator.from_pretrained(config.evaluator, device=device)
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(config.seed)

    parts = config.part_list
    summary_file = out / "edits.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    summary.update({"command": command, "config": config_to_dict(config)})
    summary.setdefault("commands", {}).update({part: command for part in parts})  # what made each part

    # 1. Directions: one-vs-rest boundaries for every value with enough samples.
    if "directions" in parts:
        w, labels = sample_labelled_latents(G, evaluator, num_samples=config.num_samples,
                                            truncation_psi=config.truncation_psi, generator=gen)
        keep = labels["outlier_score"] <= config.max_outlier_score
        directions = fit_directions_from_labels(w, labels, classifier=config.classifier,
                                                min_samples=config.min_samples, keep=keep, seed=config.seed)
        if config.condition:
            structure = [k for k in STRUCTURE if k in directions]
            wanted = {key: [s for s in structure if s.split("=")[0] != key.split("=")[0]]
                      for key in directions if key.split("=")[0] in ("hair_color", "eye_color", "skin_tone", "background")}
            conditioned = fit_directions_from_labels(
                w, labels, classifier=config.classifier, min_samples=config.min_samples, keep=keep, seed=config.seed,
                attributes=list(wanted), conditioned_on={k: v for k, v in wanted.items() if v})
            directions.update(conditioned)
        save_directions(directions, out / "directions")
        summary["samples_used"] = int(keep.sum())
        summary["seconds_directions"] = round(time.time() - t0, 1)
        summary["directions"] = {k: {"accuracy": d.accuracy, "positives": d.num_positive,
                                     "conditioned_on": d.conditioned_on} for k, d in sorted(directions.items())}
        print(f"{len(directions)} directions written to {out / 'directions'}", flush=True)

    # 2. Modes for multi-modal truncation.
    if "modes" in parts:
        t = time.time()
        modes = cluster_modes(G, evaluator, num_samples=config.mode_samples, k=config.k,
                              generator=torch.Generator(device=device).manual_seed(config.seed + 1))
        modes.save(out / "modes")
        summary["modes"] = {"k": modes.k, "sizes": [int(s) for s in modes.sizes], "seconds": round(time.time() - t, 1)}
        print(f"{modes.k} modes written to {out / 'modes'}", flush=True)

    # 3. The latent classifier of guided edits.
    if "latent_classifier" in parts:
        summary["latent_classifier"] = fit_guided_classifier(config, G, evaluator, out / "latent_classifier")
    elif "prototypes" in parts:  # only the prototypes of the classifier already there
        from pipelines.stylegan_guided_edit import LatentAttributeClassifier
        folder = out / "latent_classifier"
        model = LatentAttributeClassifier.from_pretrained(folder, device=device)
        extra = {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                 if k not in ("architecture", "init_kwargs")}
        extra["prototypes"] = fit_prototypes(config, G, model)
        model.save_pretrained(folder, extra=extra)
        summary.setdefault("latent_classifier", {})["prototypes"] = extra["prototypes"]
        print(f"prototypes written to {folder}", flush=True)

    summary["seconds_total"] = round(time.time() - t0, 1)
    summary_file.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{', '.join(parts)} written to {out} in {summary['seconds_total']} s")
    return out


def fit_prototypes(config: FitEditsConfig, G, model) -> dict:
    """Each value's prototype (mean sampled latent, as the classifier reads it, minus the mean of all)."""
    from pipelines.stylegan_guided_edit import sample_training_latents

    w = sample_training_latents(G, config.prototype_samples, mixing=0.0,
                                generator=torch.Generator().manual_seed(config.seed + 5))
    counts = model.fit_prototypes(w)
    return {"samples": config.prototype_samples, "counts": counts}


def fit_guided_classifier(config: FitEditsConfig, G, evaluator: Evaluator, folder: Path) -> dict:
    """Label latents (encoder inversions of training renders + sampled, partly mixed latents),
    train the classifier, then ``lc_mining_rounds`` times add its own edits, relabelled, and
    retrain. Returns the summary written into edits.json."""
    from pipelines.data.bank import render_bank
    from pipelines.data.portrait_world import ATTRIBUTES
    from pipelines.stylegan_guided_edit import (accuracy_table, fit_latent_classifier, label_latents,
                                                mine_edit_latents, mining_weights, sample_training_latents,
                                                target_keys)
    from pipelines.stylegan_inversion import load_encoder

    t0 = time.time()
    names = list(ATTRIBUTES)
    gen = torch.Generator().manual_seed(config.seed + 2)
    pools = []
    encoder_dir = Path(config.generator) / "encoder"
    inverted = config.lc_bank if encoder_dir.is_dir() else 0
    if inverted:
        res, device = G.img_resolution, next(G.parameters()).device
        bank = render_bank(inverted, size=res, seed=config.seed, split="train", workers=2,
                           cache=Path(config.bank_cache) / f"bank_train_n{inverted}_s{res}_seed{config.seed}.npz")
        encoder = load_encoder(encoder_dir, device=device)
        with torch.no_grad():
            pools.append(torch.cat([encoder(chunk.float().div(127.5).sub(1.0).to(device)).float().cpu()
                                    for chunk in bank.images.split(200)]))
        print(f"{inverted} training renders inverted with {encoder_dir}", flush=True)
    if config.lc_samples:
        pools.append(sample_training_latents(G, config.lc_samples, generator=gen))
    if not pools:
        raise ValueError("the latent classifier needs lc_bank (with an encoder) or lc_samples")
    w = torch.cat(pools)
    labels, outlier = label_latents(G, evaluator, w, names)
    print(f"{len(w)} latents labelled in {time.time() - t0:.0f} s", flush=True)
    fit_kwargs = {"epochs": config.lc_epochs, "hidden": config.lc_hidden, "seed": config.seed}
    keep = outlier <= config.max_outlier_score
    model, accuracy = fit_latent_classifier(w, labels, ATTRIBUTES, keep=keep, **fit_kwargs)
    history = [{"round": 0, "latents": int(keep.sum()), "accuracy": accuracy}]
    print(f"round 0: {accuracy_table(accuracy)}", flush=True)
    reached: dict[str, tuple[int, int]] = {}  # per target value: (last round's edits whose image shows it, edits)
    for rnd in range(1, config.lc_mining_rounds + 1):
        fit_prototypes(config, G, model)  # so that the mined edits take second starts as the final ones do
        weights = mining_weights(reached, target_keys(model)) if config.lc_hard_mining and reached else None
        mined = mine_edit_latents(model, G, evaluator, w[: len(pools[0])], config.lc_mining_samples,
                                  chunk=config.lc_mining_chunk, generator=gen, target_weights=weights)
        reached = mined.reached  # the next round weighs targets by how this classifier's edits fared
        w, labels = torch.cat([w, mined.w_plus]), torch.cat([labels, mined.labels])
        outlier = torch.cat([outlier, mined.outlier])
        keep = outlier <= config.max_outlier_score
        last = rnd == config.lc_mining_rounds
        model, accuracy = fit_latent_classifier(w, labels, ATTRIBUTES, keep=keep, **fit_kwargs,
                                                members=config.lc_members if last else 1)
        history.append({"round": rnd, "latents": int(keep.sum()), "accuracy": accuracy,
                        "members": model.members,
                        "edits_reached": round(sum(h for h, _ in mined.reached.values())
                                               / max(1, sum(n for _, n in mined.reached.values())), 4),
                        "hardest": sorted(mined.reached, key=lambda k: mined.reached[k][0] / mined.reached[k][1])[:5]})
        print(f"round {rnd}: {accuracy_table(accuracy)} ({model.members} MLPs)", flush=True)
    if config.lc_mining_rounds == 0 and config.lc_members > 1:
        model, accuracy = fit_latent_classifier(w, labels, ATTRIBUTES, keep=keep, **fit_kwargs, members=config.lc_members)
        history.append({"round": 0, "latents": int(keep.sum()), "accuracy": accuracy, "members": model.members})
    prototypes = fit_prototypes(config, G, model)
    summary = {"latents": int(keep.sum()), "rounds": history, "seconds": round(time.time() - t0, 1),
               "prototypes": prototypes,
               "from": {"encoder_inversions": inverted,
                        "samples": config.lc_samples,
                        "mined": config.lc_mining_rounds * config.lc_mining_samples}}
    model.save_pretrained(folder, extra={"training": summary})
    print(f"latent classifier written to {folder}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m pipelines.training.fit_stylegan_edits " + shlex.join(argv)
    return fit(parse_config(FitEditsConfig, argv), command=command)


if __name__ == "__main__":
    main()
