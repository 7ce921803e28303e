"""Measure StyleCLIP global directions for a generator and a CLIP: the CLIP relevance of every
style channel (Patashnik et al. 2021, Sec. 6), written into the generator folder::

    python -m pipelines.training.fit_clip_global_directions --generator assets/stylegan2_portraits64 \\
        --clip assets/clip --num_samples 32

-> ``<generator>/clip_global_directions/`` (relevance.safetensors + config.json + card). The cost is
``2 * num_samples * C`` generator and CLIP forwards for C style channels (544 convolution channels
in the embedded 64-px generator: 34,816 renders at ``num_samples=32``). Measured once per
(generator, CLIP); the CLIP edit tab then turns any text into a style edit at once.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipelines.cards import write_card
from pipelines.clip_edit import GlobalDirections
from pipelines.clip_models import load_clip
from pipelines.device import select_device
from pipelines.stylegan_io import load_generator
from pipelines.training.runs import config_to_dict, parse_config

__all__ = ["GlobalDirectionsConfig", "fit", "main"]


@dataclass
class GlobalDirectionsConfig:
    """StyleCLIP global directions (channel relevance) for one generator and one CLIP."""

    generator: str = "assets/stylegan2_portraits64"  # studio generator folder
    clip: str = "assets/clip"  # CLIP folder, or "embedded"
    out_dir: Optional[str] = None  # None = <generator>/clip_global_directions
    device: str = "auto"
    seed: int = 0
    num_samples: int = 32  # latents per channel (StyleCLIP: 100)
    perturbation: float = 5.0  # each style channel is moved by +-perturbation standard deviations
    truncation_psi: float = 0.7  # of the sampled latents
    include_torgb: bool = False  # StyleCLIP edits the convolutions' styles only
    channel_batch: int = 4  # channels per pass (2 * channel_batch * num_samples renders)
    batch_size: int = 256  # images per generator / CLIP forward
    std_samples: int = 4000  # latents for the style standard deviations

    def validate(self) -> None:
        for name in ("num_samples", "channel_batch", "batch_size", "std_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.perturbation > 0:
            raise ValueError(f"perturbation must be positive, got {self.perturbation}")
        if not 0 < self.truncation_psi <= 1:
            raise ValueError(f"truncation_psi must be in (0, 1], got {self.truncation_psi}")
        if not Path(self.generator).is_dir():
            raise ValueError(f"generator {self.generator!r} is not a studio generator folder")
        if self.clip != "embedded" and not Path(self.clip).exists():
            raise ValueError(f"CLIP {self.clip!r} does not exist; train the embedded one with "
                             "`python -m pipelines.training.train_clip --export_to assets/clip`")


def fit(config: GlobalDirectionsConfig, command: str | None = None) -> Path:
    # 1. Config, networks.
    config.validate()
    device = select_device(config.device)
    out = Path(config.out_dir or Path(config.generator) / "clip_global_directions")
    G = load_generator(config.generator, device=device)
    clip = load_clip(config.clip, device=device)
    t0 = time.time()
    last = [t0]

    def progress(done: int, total: int, _preview: object) -> None:
        if time.time() - last[0] > 30 or done == total:
            rate = done / max(time.time() - t0, 1e-9)
            print(f"{done}/{total} channels ({rate:.2f}/s, {(total - done) / max(rate, 1e-9):.0f}s left)", flush=True)
            last[0] = time.time()

    # 2. Measure, save, card.
    directions = GlobalDirections.compute(
        G, clip, num_samples=config.num_samples, perturbation=config.perturbation,
        truncation_psi=config.truncation_psi, include_torgb=config.include_torgb,
        channel_batch=config.channel_batch, batch_size=config.batch_size, std_samples=config.std_samples,
        generator=torch.Generator(device=device).manual_seed(config.seed), callback=progress)
    seconds = time.time() - t0
    directions.meta.update(generator=config.generator, clip=config.clip, seconds=round(seconds, 1))
    directions.save(out)
    write_card(out, title="StyleCLIP global directions",
               task="text -> style-space edit direction (CLIP edit tab, 'global' method)",
               architecture=f"channel relevance Δi_c of {directions.num_channels} style channels "
                            f"({'with' if config.include_torgb else 'without'} toRGB), "
                            f"{directions.relevance.shape[1]}-d CLIP embeddings",
               source=f"measured on generator {config.generator} with CLIP {config.clip}",
               command=command, config=config_to_dict(config),
               figures={"channels": directions.num_channels, "seconds": round(seconds, 1)},
               notes="Patashnik et al. 2021, Sec. 6: each channel moved by ±perturbation σ_c on num_samples "
                     "latents; Δi_c is the normalised mean of the normalised CLIP image-embedding differences. "
                     "Valid only for this generator and this CLIP (the folder stores a probe of the CLIP).")
    print(f"global directions of {directions.num_channels} channels written to {out} in {seconds:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m pipelines.training.fit_clip_global_directions " + shlex.join(argv)
    return fit(parse_config(GlobalDirectionsConfig, argv), command=command)


if __name__ == "__main__":
    main()
