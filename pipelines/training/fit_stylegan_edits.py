"""Fit what the StyleGAN edit tab needs beside a generator: InterFaceGAN directions for every
attribute value the evaluator reads, and the perceptual modes of multi-modal truncation.

Both are fitted from the generator's own samples labelled by the portrait-world evaluator
(Shen et al. 2020; Mokady et al. 2022), and written into the generator folder::

    python -m pipelines.training.fit_stylegan_edits --generator assets/stylegan2_portraits64 \\
        --num_samples 6000 --k 16

-> ``<generator>/directions/`` (directions.safetensors + directions.json) and
``<generator>/modes/`` (modes.safetensors + modes.json), and ``<generator>/edits.json`` with the
command, the per-direction held-out accuracies and the sample counts.
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

    # 1. Directions: one-vs-rest boundaries for every value with enough samples.
    w, labels = sample_labelled_latents(G, evaluator, num_samples=config.num_samples,
                                        truncation_psi=config.truncation_psi, generator=gen)
    keep = labels["outlier_score"] <= config.max_outlier_score
    directions = fit_directions_from_labels(w, labels, classifier=config.classifier, min_samples=config.min_samples,
                                            keep=keep, seed=config.seed)
    if config.condition:
        structure = [k for k in STRUCTURE if k in directions]
        wanted = {key: [s for s in structure if s.split("=")[0] != key.split("=")[0]]
                  for key in directions if key.split("=")[0] in ("hair_color", "eye_color", "skin_tone", "background")}
        conditioned = fit_directions_from_labels(
            w, labels, classifier=config.classifier, min_samples=config.min_samples, keep=keep, seed=config.seed,
            attributes=list(wanted), conditioned_on={k: v for k, v in wanted.items() if v})
        directions.update(conditioned)
    save_directions(directions, out / "directions")
    t_dirs = time.time() - t0

    # 2. Modes for multi-modal truncation.
    modes = cluster_modes(G, evaluator, num_samples=config.mode_samples, k=config.k,
                          generator=torch.Generator(device=device).manual_seed(config.seed + 1))
    modes.save(out / "modes")

    summary = {
        "command": command, "config": config_to_dict(config),
        "samples_used": int(keep.sum()), "seconds_directions": round(t_dirs, 1),
        "seconds_total": round(time.time() - t0, 1),
        "directions": {k: {"accuracy": d.accuracy, "positives": d.num_positive, "conditioned_on": d.conditioned_on}
                       for k, d in sorted(directions.items())},
        "modes": {"k": modes.k, "sizes": [int(s) for s in modes.sizes]},
    }
    (out / "edits.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(directions)} directions and {modes.k} modes written to {out} in {summary['seconds_total']} s")
    return out


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m pipelines.training.fit_stylegan_edits " + shlex.join(argv)
    return fit(parse_config(FitEditsConfig, argv), command=command)


if __name__ == "__main__":
    main()
