"""Train the portrait-world evaluator (attribute heads + outlier head + feature vector).

    python -m pipelines.training.train_evaluator --out_dir runs/evaluator --steps 3000

Reads top to bottom: config -> run folder -> data -> network -> resume -> loop -> checkpoint ->
held-out evaluation -> export with a card. Held-out attribute combinations never appear in
training; the figures are measured on them (and on unseen outliers).
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from models.evaluator import AttributeEvaluator
from pipelines.cards import write_card
from pipelines.data.bank import ImageBank, render_bank
from pipelines.data.portrait_world import ATTRIBUTES
from pipelines.device import select_device
from pipelines.evaluation import Evaluator
from pipelines.training.runs import (RunFolder, capture_rng_state, config_to_dict, parse_config,
                                     restore_rng_state, seed_everything)

Progress = Callable[[int, int, object], None]


@dataclass
class EvaluatorTrainConfig:
    """Training configuration of the portrait-world evaluator."""
    out_dir: str = "runs/evaluator"
    resolution: int = 64            # pixels per side the evaluator sees
    width: int = 16                 # channels of the stride-2 stem (stages: 2x, 4x, 8x)
    feature_dim: int = 256          # size of the feature vector (FD-world)
    train_images: int = 40000       # rendered training images (train split)
    val_images: int = 4000          # rendered held-out images (held-out combinations)
    outlier_rate: float = 0.1       # share of outlier images mixed into both sets
    steps: int = 3000
    batch: int = 128
    lr: float = 2e-3                # AdamW peak learning rate (cosine decay, 200-step warm-up)
    weight_decay: float = 0.05
    augment: bool = True            # blur / noise / small shifts, for robustness to generated images
    colour_swap: float = 0.5        # share of images whose colours are permuted (colour labels ignored)
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    workers: int = 2                # render processes
    resume: bool = False
    export_to: str = ""             # also write the final model (with card) here, e.g. assets/evaluator

    def validate(self) -> None:
        if self.steps <= 0 or self.batch <= 0:
            raise ValueError("steps and batch must be positive")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.outlier_rate < 1:
            raise ValueError(f"outlier_rate must be in [0, 1), got {self.outlier_rate}")


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Label-preserving corruptions so the evaluator also reads generated images: a small shift,
    a box blur on part of the batch, brightness/contrast jitter and pixel noise (no hue shift:
    colours are labels). x: [B, 3, H, W] in [-1, 1]."""
    b, dev = x.shape[0], x.device
    pad = max(1, x.shape[-1] // 32)
    dx, dy = (torch.randint(-pad, pad + 1, (2,), generator=generator)).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=generator).to(dev)
    mix = torch.where(mix < 0.5, torch.zeros_like(mix), mix)           # half the batch stays sharp
    x = torch.lerp(x, blurred, mix)
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=generator).to(dev) - 0.5) * 0.2
    bias = (torch.rand(b, 1, 1, 1, generator=generator).to(dev) - 0.5) * 0.1
    sigma = torch.rand(b, 1, 1, 1, generator=generator).to(dev) * 0.06
    noise = torch.randn(x.shape, generator=generator).to(dev) * sigma
    return (x * gain + bias + noise).clamp(-1, 1)


COLOUR_ATTRIBUTES = ("hair_color", "eye_color", "skin_tone", "background")
_PERMUTATIONS = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def colour_swap(x: torch.Tensor, labels: torch.Tensor, rate: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute the RGB channels (or drop to grey) of a share ``rate`` of the images and ignore
    their colour labels (-1). The structural heads (hair style, expression, glasses, ...) then see
    every structure in every colour, so they cannot lean on colour: without this, an unseen pair
    such as gold eyes + surprised is misread, because gold eyes never came with that mouth."""
    b = x.shape[0]
    chosen = torch.rand(b, generator=generator) < rate
    if not chosen.any():
        return x, labels
    x, labels = x.clone(), labels.clone()
    idx = chosen.nonzero().squeeze(1)
    perms = _PERMUTATIONS[torch.randint(0, len(_PERMUTATIONS), (len(idx),), generator=generator)]
    swapped = torch.stack([x[i, p] for i, p in zip(idx.tolist(), perms)])
    grey = torch.rand(len(idx), generator=generator) < 0.25
    swapped[grey] = swapped[grey].mean(1, keepdim=True).expand(-1, 3, -1, -1)
    x[idx] = swapped
    colour_cols = [list(ATTRIBUTES).index(n) for n in COLOUR_ATTRIBUTES]
    sub = labels[idx]
    sub[:, colour_cols] = torch.where(sub[:, colour_cols] >= 0, -1, sub[:, colour_cols])
    labels[idx] = sub
    return x, labels


@torch.no_grad()
def evaluate(evaluator: Evaluator, bank: ImageBank) -> dict[str, float]:
    """Per-attribute accuracy on the non-outlier images and outlier AUC on all of them."""
    res = evaluator.run(bank.batch(torch.arange(len(bank))))
    keep = ~bank.is_outlier
    figures: dict[str, float] = {}
    for j, name in enumerate(ATTRIBUTES):
        figures[f"acc_{name}"] = float((res[name][keep] == bank.labels[keep, j]).float().mean())
    accs = [figures[f"acc_{n}"] for n in ATTRIBUTES]
    figures["mean_accuracy"] = float(np.mean(accs))
    figures["min_accuracy"] = float(np.min(accs))
    if bank.is_outlier.any():
        figures["outlier_auc"] = float(roc_auc_score(bank.is_outlier.numpy(), res["outlier_score"].numpy()))
    return figures


def train(config: EvaluatorTrainConfig, progress: Progress | None = None) -> Path:
    """Run (or resume) a training run; returns the folder of the exported evaluator."""
    # 1. config and run folder
    config.validate()
    run = RunFolder(config.out_dir)
    resuming = run.create(config, resume=config.resume)
    seed_everything(config.seed)
    device = select_device(config.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # 2. data: a training bank (train split) and a held-out bank (held-out combinations)
    t0 = time.time()
    train_bank = render_bank(config.train_images, size=config.resolution, seed=config.seed,
                             split="train", outlier_rate=config.outlier_rate, workers=config.workers,
                             cache=run.path / "train_bank.npz")
    val_bank = render_bank(config.val_images, size=config.resolution, seed=config.seed + 10_000_000,
                           split="heldout", outlier_rate=config.outlier_rate, workers=config.workers,
                           cache=run.path / "val_bank.npz")
    print(f"rendered {len(train_bank)} + {len(val_bank)} images in {time.time() - t0:.1f}s", flush=True)

    # 3. network and optimiser
    net = AttributeEvaluator([(n, len(v)) for n, v in ATTRIBUTES.items()], resolution=config.resolution,
                             width=config.width, feature_dim=config.feature_dim).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    step = 0

    # 4. resume
    if resuming:
        ckpt = run.load_checkpoint()
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["batch_rng"])
        restore_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        run.truncate_metrics(step)
        print(f"resumed from step {step}", flush=True)

    def lr_at(s: int) -> float:
        warm = min(1.0, (s + 1) / 200)
        return config.lr * warm * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))

    def checkpoint(s: int) -> None:
        run.save_checkpoint(s, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                                "batch_rng": gen.get_state(), "rng": capture_rng_state(),
                                "step": s, "config": config_to_dict(config)})

    # 5. loop
    run.set_status("running", step=step, total=config.steps)
    net.train()
    t_last, seen = time.time(), 0
    labels_all = train_bank.labels
    while step < config.steps:
        idx = torch.randint(0, len(train_bank), (config.batch,), generator=gen)
        x = train_bank.batch(idx, device)
        labels = labels_all[idx]
        if config.colour_swap > 0:
            x, labels = colour_swap(x, labels, config.colour_swap, gen)
        if config.augment:
            x = augment(x, gen)
        labels = labels.to(device)
        is_out = train_bank.is_outlier[idx].to(device).float()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = net(x)
        loss_attr = sum(F.cross_entropy(out.logits[n], labels[:, j], ignore_index=-1)
                        for j, n in enumerate(ATTRIBUTES)) / len(ATTRIBUTES)
        loss_out = F.binary_cross_entropy_with_logits(out.outlier_logit, is_out)
        loss = loss_attr + loss_out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seen += config.batch
        if step % config.log_every == 0 or step == config.steps:
            dt = time.time() - t_last
            run.log_metrics(step, loss=loss.item(), loss_attributes=loss_attr.item(),
                            loss_outlier=loss_out.item(), lr=lr_at(step), images_per_s=seen / dt)
            print(f"step {step}/{config.steps} loss {loss.item():.4f} ({seen / dt:.0f} img/s)", flush=True)
            t_last, seen = time.time(), 0
            run.set_status("running", step=step, total=config.steps)
        if progress is not None:
            progress(step, config.steps, None)
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint(step)

    # 6. held-out evaluation and export
    evaluator = Evaluator(net.eval(), device=device)
    figures = evaluate(evaluator, val_bank)
    run.log_metrics(step, **{f"heldout_{k}": v for k, v in figures.items()})
    print("held-out:", {k: round(v, 4) for k, v in figures.items()}, flush=True)
    targets = [run.path / "evaluator"] + ([Path(config.export_to)] if config.export_to else [])
    command = "python -m pipelines.training.train_evaluator " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for folder in targets:
        evaluator.save_pretrained(folder, fp16=True)
        write_card(folder, title="Portrait-world evaluator", task="attribute classification, outlier "
                   "detection and features for FD-world", architecture=f"CNN (stride-2 stem, three conv stages, GroupNorm), "
                   f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
                   f"{config.resolution} px input", source=f"training run {config.out_dir}",
                   command=command, config=config_to_dict(config),
                   figures={f"heldout_{k}": round(v, 4) for k, v in figures.items()},
                   notes="Figures are measured on renders of attribute combinations held out of "
                         "training, mixed with unseen outlier images (emoji) at the same rate.")
    run.set_status("finished", step=step, total=config.steps, figures=figures)
    return targets[-1]


def main(argv: list[str] | None = None) -> None:
    train(parse_config(EvaluatorTrainConfig, argv))


if __name__ == "__main__":
    main()
