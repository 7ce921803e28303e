"""Generative self-filtering (Mokady et al. 2022, "Self-Distilled StyleGAN"): score every image
of a training bank with a generator trained on it (raw, outliers included), drop the worst, and
write the exclude list the retrain reads (``train_stylegan2 --exclude_file``)::

    python -m pipelines.training.self_filter --generator runs/sg2_raw64/generator \\
        --encoder runs/sg2_raw64_encoder/encoder --bank_size 10000 --outlier_rate 0.1 \\
        --bank_cache runs/cache/bank_train_n20000_s64_seed0_out10.npz --rate 0.1 --out runs/sg2_raw64/self_filter

Each image is inverted by the generator's encoder (one pass) or, without one, by ``steps`` of W
optimisation (slow on a CPU: about 20 image-steps per second at 64 px).

The bank must be the one the generator trained on (same size, seed and outlier rate). As the
portrait world knows which images are outliers, the report gives the filter's precision and
recall: for the combined score (reconstruction + latent distance + the evaluator's outlier head)
and for the generator's own verdict alone (reconstruction + latent distance).
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
from pipelines.stylegan_editing import select_outliers, self_filter_scores, write_exclude_list
from pipelines.stylegan_io import load_generator
from pipelines.training.runs import config_to_dict, parse_config

__all__ = ["SelfFilterConfig", "filter_report", "run", "main"]


@dataclass
class SelfFilterConfig:
    """Score a training bank with its raw generator; write the exclude list and a report."""

    generator: str = "runs/sg2_raw64/generator"
    encoder: Optional[str] = None  # an e4e encoder of that generator: one pass per image instead of
    #                                 `steps` of W optimisation (the only affordable way on a CPU)
    evaluator: Optional[str] = "assets/evaluator"  # features + outlier head; 'none' = reconstruction only
    out: str = "runs/self_filter"  # folder for exclude.json and report.json
    device: str = "auto"
    seed: int = 0  # bank seed (as in training)
    bank_size: int = 10000
    outlier_rate: float = 0.1  # of the bank (as in training)
    bank_cache: Optional[str] = None
    workers: Optional[int] = None
    steps: int = 10  # W-optimisation steps per image
    rate: float = 0.1  # share of the bank to drop
    batch_size: int = 128
    latent_weight: float = 1.0  # weight of the inverted latent's Mahalanobis distance in W
    outlier_weight: float = 1.0  # weight of the evaluator's outlier probability (with an evaluator)

    def validate(self) -> None:
        if not Path(self.generator).exists():
            raise ValueError(f"generator {self.generator!r} does not exist")
        if self.encoder not in (None, "", "none") and not Path(self.encoder).is_dir():
            raise ValueError(f"encoder {self.encoder!r} is not an encoder folder")
        if self.evaluator not in (None, "", "none") and not Path(self.evaluator).exists():
            raise ValueError(f"evaluator {self.evaluator!r} does not exist")
        for name in ("bank_size", "steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.rate < 1:
            raise ValueError(f"rate must be in (0, 1), got {self.rate}")


def filter_report(scores: torch.Tensor, is_outlier: torch.Tensor, rate: float) -> dict[str, float]:
    """Precision and recall of dropping the top ``rate`` of ``scores`` against the true outliers."""
    dropped = torch.zeros_like(is_outlier, dtype=torch.bool)
    dropped[select_outliers(scores, rate)] = True
    true_pos = int((dropped & is_outlier).sum())
    return {"precision": true_pos / max(int(dropped.sum()), 1), "recall": true_pos / max(int(is_outlier.sum()), 1),
            "dropped": int(dropped.sum()), "outliers": int(is_outlier.sum())}


def run(config: SelfFilterConfig, command: str | None = None) -> dict:
    from pipelines.data.bank import render_bank

    config.validate()
    device = select_device(config.device)
    G = load_generator(config.generator, device=device)
    encoder = None
    if config.encoder not in (None, "", "none"):
        from pipelines.stylegan_inversion import load_encoder
        encoder = load_encoder(config.encoder, device=device)
    evaluator = (Evaluator.from_pretrained(config.evaluator, device=device)
                 if config.evaluator not in (None, "", "none") else None)
    bank = render_bank(config.bank_size, size=G.img_resolution, seed=config.seed, split="train",
                       outlier_rate=config.outlier_rate, workers=config.workers, cache=config.bank_cache)
    t0 = time.time()
    images = bank.images.float().div(127.5).sub(1.0)
    scores = self_filter_scores(G, images, steps=config.steps, encoder=encoder, evaluator=evaluator,
                                batch_size=config.batch_size, latent_weight=config.latent_weight,
                                outlier_weight=config.outlier_weight,
                                generator=torch.Generator(device=device).manual_seed(config.seed),
                                callback=lambda i, n, _p: print(f"scored {i}/{n}", flush=True) if i % 2048 < config.batch_size else None)
    seconds = time.time() - t0
    out = Path(config.out)
    dropped = select_outliers(scores, config.rate)
    write_exclude_list(dropped, out / "exclude.json")
    report = {
        "command": command, "config": config_to_dict(config), "seconds": round(seconds, 1),
        "combined": filter_report(scores.scores, bank.is_outlier, config.rate),
        "generator_only": filter_report(scores.generator_scores, bank.is_outlier, config.rate),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("seconds", "combined", "generator_only")}, indent=1))
    return report


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m pipelines.training.self_filter " + shlex.join(argv)
    return run(parse_config(SelfFilterConfig, argv), command=command)


if __name__ == "__main__":
    main()
