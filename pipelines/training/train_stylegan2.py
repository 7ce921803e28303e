"""Train the studio's StyleGAN2-ADA on the portrait world.

StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN") trained
with adaptive discriminator augmentation (Karras et al. 2020, "Training Generative Adversarial
Networks with Limited Data", ADA): non-saturating logistic loss, lazy R1 regularisation, optional
path-length regularisation, style mixing, an exponential moving average of the generator, and the
ADA heuristic r_t = E[sign(D(real))] that drives the augmentation probability p towards a target.

Reads top to bottom: config -> CLI -> run folder -> data -> networks -> resume -> loop ->
checkpoint -> export. Run it by hand::

    python -m pipelines.training.train_stylegan2 --out_dir runs/sg2 --total_kimg 500 --batch 64
    python -m pipelines.training.train_stylegan2 --out_dir runs/sg2 --total_kimg 500 --batch 64 --resume true

or in-process with :func:`train`. A killed run resumes from its last checkpoint (``--resume
true``); metric rows past that checkpoint are dropped. SIGTERM writes a checkpoint and exits.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from PIL import Image

from models.stylegan2.augment import AugmentPipe
from models.stylegan2.networks import Discriminator, Generator
from pipelines.device import select_device
from pipelines.images import make_grid, tensor_to_pil
from pipelines.training import runs

__all__ = ["StyleGAN2TrainConfig", "validate_config", "ada_adjust", "train", "main"]

ProgressCallback = Callable[[int, int, Optional[Image.Image]], None]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class StyleGAN2TrainConfig:
    """StyleGAN2-ADA on the portrait world (Karras et al. 2020). Steps count generator updates;
    one step consumes ``batch`` real images (kimg = step * batch / 1000)."""

    out_dir: str = "runs/stylegan2"
    resume: bool = False  # continue from the latest checkpoint in out_dir
    device: str = "auto"  # 'auto', 'cuda', 'cuda:1', 'cpu'
    seed: int = 0

    # data: a bank of portrait-world renders held in memory (on the training device)
    resolution: int = 64  # image size in pixels, a power of two >= 8
    bank_size: int = 20000  # images rendered into the bank
    outlier_rate: float = 0.0  # fraction of outlier (non-portrait) images mixed into the bank
    exclude_file: Optional[str] = None  # JSON list of bank indices to drop (self-filtering retrain)
    init_from: Optional[str] = None  # a run folder or checkpoint whose G / D / G_ema / p start this run (fine-tune)
    bank_cache: Optional[str] = None  # .npz cache of the bank; None = <out_dir>/bank.npz, 'none' off
    workers: Optional[int] = None  # render processes; None = all CPU cores

    # length
    batch: int = 32  # images per step (official 'auto' at 64 px: 32)
    total_steps: int = 2000  # generator steps
    total_kimg: Optional[float] = None  # if set, overrides total_steps (ceil(kimg * 1000 / batch))
    max_train_minutes: Optional[float] = None  # stop early (checkpoint + export) after this much loop time

    # networks (official 'auto' 64 px: channel_base 16384, map 2; 'stylegan2': 32768, map 8)
    z_dim: int = 512
    w_dim: int = 512
    map_layers: int = 2  # mapping-network depth
    channel_base: int = 16384  # channels at resolution r: min(channel_base // r, channel_max)
    channel_max: int = 512
    mbstd_group: int = 4  # minibatch-std group size; batch must be divisible by it
    conv_clamp: Optional[float] = 256.0  # clamp conv outputs (official value, needed for fp16)

    # optimisation: Adam, lr / betas of the official configs
    lr_g: float = 0.0025
    lr_d: float = 0.0025
    beta1: float = 0.0
    beta2: float = 0.99

    # regularisation
    r1_gamma: Optional[float] = None  # R1 weight; None = official 'auto': 0.0002 * res^2 / batch
    r1_interval: int = 16  # lazy R1: every N steps, loss scaled by N (StyleGAN2 Sec. 3.1)
    pl_weight: float = 0.0  # path-length regularisation weight, 0 = off (official: 2)
    pl_interval: int = 4  # lazy path-length regularisation interval
    pl_batch_shrink: int = 2  # path-length batch = batch // shrink
    pl_decay: float = 0.01  # decay of the running mean path length
    style_mixing: float = 0.9  # probability of mixing two latents per batch, 0 = off

    # generator EMA
    ema_kimg: Optional[float] = None  # half-life in kimg; None = batch * 10 / 32 (official 'auto')
    ema_rampup: Optional[float] = 0.05  # half-life <= rampup * images seen so far; None = off

    # ADA (Karras et al. 2020, Sec. 3)
    augment: bool = True  # adaptive augmentation on; off = p stays 0
    ada_target: float = 0.6  # target of r_t = E[sign(D(real))]
    ada_interval: int = 4  # adjust p every N steps
    ada_kimg: float = 100.0  # images (in kimg) for p to move by 1; official 500, faster for short runs

    # speed
    precision: str = "fp32"  # 'fp32' (TF32 on CUDA) | 'fp16' (official: 4 highest resolutions fp16, CUDA only)
    tf32: bool = True  # allow TF32 matmuls / convolutions on CUDA
    channels_last: bool = False  # channels-last memory format in the fp16 blocks
    cudnn_benchmark: bool = True

    # logging, samples, checkpoints
    log_every: int = 50  # steps between metric rows and throughput lines
    sample_every: int = 500  # steps between sample grids (fixed z, G_ema)
    checkpoint_every: int = 1000  # steps between checkpoints
    keep_checkpoints: int = 2
    num_samples: int = 32  # images in a sample grid

    # export of G_ema at the end: always <out_dir>/generator/ (float32, with a card)
    export_dir: Optional[str] = None  # an extra copy, e.g. assets/stylegan2_portraits
    export_fp16: bool = False  # store the extra copy's weights in float16
    examples_grid: Optional[str] = None  # also write the final sample grid here (assets/examples/...)


def validate_config(config: StyleGAN2TrainConfig) -> StyleGAN2TrainConfig:
    """Check ``config`` and resolve its automatic values (total_kimg, r1_gamma, ema_kimg).

    Raises ``ValueError`` naming the first bad field, before anything is rendered or written.
    """
    c = config
    res = c.resolution
    if res < 8 or res & (res - 1):
        raise ValueError(f"resolution must be a power of two >= 8, got {res}")
    if c.batch <= 0:
        raise ValueError(f"batch must be positive, got {c.batch}")
    if c.mbstd_group <= 0 or c.batch % c.mbstd_group:
        raise ValueError(f"batch ({c.batch}) must be divisible by mbstd_group ({c.mbstd_group})")
    if c.total_kimg is not None:
        if not c.total_kimg > 0:
            raise ValueError(f"total_kimg must be positive, got {c.total_kimg}")
        c = dataclasses.replace(c, total_steps=math.ceil(c.total_kimg * 1000 / c.batch), total_kimg=None)
    if c.total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {c.total_steps}")
    for name in ("lr_g", "lr_d"):
        if not getattr(c, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(c, name)}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(c, name)}")
    for name in ("r1_interval", "pl_interval", "pl_batch_shrink", "ada_interval", "log_every",
                 "sample_every", "checkpoint_every", "keep_checkpoints", "num_samples", "bank_size",
                 "z_dim", "w_dim", "map_layers", "channel_base", "channel_max"):
        if getattr(c, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(c, name)}")
    if c.r1_gamma is not None and c.r1_gamma < 0:
        raise ValueError(f"r1_gamma must be >= 0, got {c.r1_gamma}")
    if c.pl_weight < 0:
        raise ValueError(f"pl_weight must be >= 0, got {c.pl_weight}")
    if c.pl_weight > 0 and c.batch // c.pl_batch_shrink < 1:
        raise ValueError(f"batch // pl_batch_shrink must be >= 1, got {c.batch} // {c.pl_batch_shrink}")
    if not 0 <= c.style_mixing <= 1:
        raise ValueError(f"style_mixing must be in [0, 1], got {c.style_mixing}")
    if not 0 <= c.outlier_rate < 1:
        raise ValueError(f"outlier_rate must be in [0, 1), got {c.outlier_rate}")
    if not 0 < c.ada_target < 1:
        raise ValueError(f"ada_target must be in (0, 1), got {c.ada_target}")
    if not c.ada_kimg > 0:
        raise ValueError(f"ada_kimg must be positive, got {c.ada_kimg}")
    if c.ema_kimg is not None and c.ema_kimg < 0:
        raise ValueError(f"ema_kimg must be >= 0, got {c.ema_kimg}")
    if c.max_train_minutes is not None and not c.max_train_minutes > 0:
        raise ValueError(f"max_train_minutes must be positive, got {c.max_train_minutes}")
    if c.precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {c.precision!r}")
    if c.init_from is not None and not Path(c.init_from).exists():
        raise ValueError(f"init_from {c.init_from!r} does not exist")
    if c.exclude_file is not None and not Path(c.exclude_file).is_file():
        raise ValueError(f"exclude_file {c.exclude_file!r} does not exist")
    if c.r1_gamma is None:
        c = dataclasses.replace(c, r1_gamma=round(0.0002 * res**2 / c.batch, 6))
    if c.ema_kimg is None:
        c = dataclasses.replace(c, ema_kimg=c.batch * 10 / 32)
    return c


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _load_bank_images(config: StyleGAN2TrainConfig, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """Render (or load) the bank, drop ``exclude_file`` indices; uint8 ``[N, 3, R, R]`` on ``device``."""
    from pipelines.data.bank import render_bank

    cache: str | None
    if config.bank_cache is None:
        cache = str(Path(config.out_dir) / "bank.npz")
    elif config.bank_cache.lower() in ("", "none"):
        cache = None
    else:
        cache = config.bank_cache
    t0 = time.time()
    bank = render_bank(config.bank_size, size=config.resolution, seed=config.seed, split="train",
                       outlier_rate=config.outlier_rate, workers=config.workers, cache=cache)
    keep = torch.ones(len(bank), dtype=torch.bool)
    if config.exclude_file is not None:
        excluded = json.loads(Path(config.exclude_file).read_text())
        if not isinstance(excluded, list) or not all(isinstance(i, int) for i in excluded):
            raise ValueError(f"exclude_file {config.exclude_file} must hold a JSON list of integer indices")
        bad = [i for i in excluded if not 0 <= i < len(bank)]
        if bad:
            raise ValueError(f"exclude_file holds indices outside the bank (size {len(bank)}): {bad[:5]}")
        keep[torch.tensor(excluded, dtype=torch.long)] = False
    images = bank.images[keep]
    if len(images) == 0:
        raise ValueError("exclude_file drops every image of the bank")
    info = {
        "num_train_images": int(len(images)),
        "num_outliers": int(bank.is_outlier[keep].sum()),
        "num_excluded": int((~keep).sum()),
        "bank_seconds": round(time.time() - t0, 2),
    }
    return images.to(device), info


def _build_networks(config: StyleGAN2TrainConfig, device: torch.device) -> tuple[Generator, Discriminator]:
    num_fp16_res = 4 if config.precision == "fp16" else 0
    G = Generator(
        z_dim=config.z_dim, c_dim=0, w_dim=config.w_dim, img_resolution=config.resolution, img_channels=3,
        mapping_kwargs=dict(num_layers=config.map_layers),
        synthesis_kwargs=dict(channel_base=config.channel_base, channel_max=config.channel_max,
                              num_fp16_res=num_fp16_res, conv_clamp=config.conv_clamp,
                              fp16_channels_last=config.channels_last),
    )
    D = Discriminator(
        c_dim=0, img_resolution=config.resolution, img_channels=3, architecture="resnet",
        channel_base=config.channel_base, channel_max=config.channel_max, num_fp16_res=num_fp16_res,
        conv_clamp=config.conv_clamp, block_kwargs=dict(fp16_channels_last=config.channels_last),
        epilogue_kwargs=dict(mbstd_group_size=config.mbstd_group),
    )
    return G.to(device).train(), D.to(device).train()


def _make_adam(params: Any, lr: float, betas: tuple[float, float], interval: int | None,
               device: torch.device) -> torch.optim.Adam:
    """Adam for a network regularised lazily every ``interval`` steps: lr and betas are rescaled
    by ``interval / (interval + 1)`` so the main + regulariser steps match eager training
    (StyleGAN2, Appendix C)."""
    if interval:
        ratio = interval / (interval + 1)
        lr, betas = lr * ratio, (betas[0] ** ratio, betas[1] ** ratio)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=1e-8, foreach=device.type == "cuda")


def _sanitize_grads(module: torch.nn.Module) -> None:
    """fp16 blocks can overflow: replace NaN/inf gradients as the official loop does."""
    for p in module.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)


def _mapping_with_mixing(G: Generator, z: torch.Tensor, prob: float) -> torch.Tensor:
    """ws for ``z`` (``[B, z_dim]`` -> ``[B, num_ws, w_dim]``); with probability ``prob`` the layers
    from a random cutoff on take the w of a second latent (style mixing, Karras et al. 2019)."""
    ws = G.mapping(z, None)
    if prob <= 0:
        return ws
    num_ws = ws.shape[1]
    cutoff = torch.randint(1, num_ws, (), device=ws.device)  # no host sync
    cutoff = torch.where(torch.rand((), device=ws.device) < prob, cutoff, torch.full_like(cutoff, num_ws))
    ws2 = G.mapping(torch.randn_like(z), None, skip_w_avg_update=True)
    mix = (torch.arange(num_ws, device=ws.device) >= cutoff)[None, :, None]
    return torch.where(mix, ws2, ws)


def ada_adjust(p: torch.Tensor, r_t: torch.Tensor, *, target: float, nimg: int, ada_kimg: float) -> torch.Tensor:
    """The ADA heuristic (Karras et al. 2020, Sec. 3): ``r_t = E[sign(D(real))]`` above ``target``
    means D overfits, so p rises; below, p falls; p moves by ``nimg / (ada_kimg * 1000)`` and stays
    in [0, 1]. Tensors in, tensor out (no host sync)."""
    return (p + torch.sign(r_t - target) * (nimg / (ada_kimg * 1000))).clamp(0.0, 1.0)


@torch.no_grad()
def _sample_grid(G_ema: Generator, z: torch.Tensor) -> Image.Image:
    imgs = torch.cat([G_ema(zb, None, noise_mode="const") for zb in z.split(16)])
    return make_grid(tensor_to_pil(imgs), columns=min(8, len(imgs)))




# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(config: StyleGAN2TrainConfig, progress: ProgressCallback | None = None,
          command: str | None = None) -> Path:
    """Train (or resume) a StyleGAN2-ADA run; returns the exported generator folder.

    ``progress(step, total, preview)`` is called after every step; ``preview`` is the sample
    grid (PIL) on sample steps, else None.
    """
    config = validate_config(config)

    # 1. Run folder, device, seeds.
    device = select_device(config.device)
    run = runs.RunFolder(config.out_dir)
    resuming = run.create(config, resume=config.resume)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    runs.seed_everything(config.seed)
    print(f"StyleGAN2-ADA: {config.resolution} px, batch {config.batch}, {config.total_steps} steps "
          f"({config.total_steps * config.batch / 1000:.1f} kimg) on {device}, precision {config.precision}",
          flush=True)

    stopper = runs.StopFlag()
    stopper.install()
    step = 0
    try:
        # 2. Data: the bank lives on the training device; batches are indexed there.
        bank_images, data_info = _load_bank_images(config, device)  # [N, 3, R, R] uint8
        num_images = bank_images.shape[0]
        print(f"bank: {num_images} images ({data_info['num_outliers']} outliers, "
              f"{data_info['num_excluded']} excluded) in {data_info['bank_seconds']} s", flush=True)

        # 3. Networks, EMA copy, augmentation, optimisers.
        G, D = _build_networks(config, device)
        G_ema = copy.deepcopy(G).eval().requires_grad_(False)
        augment_pipe = AugmentPipe().to(device)  # p = 0 until the ADA heuristic raises it
        augment = augment_pipe if config.augment else torch.nn.Identity()
        pl_on = config.pl_weight > 0
        r1_on = config.r1_gamma > 0
        betas = (config.beta1, config.beta2)
        opt_G = _make_adam(G.parameters(), config.lr_g, betas, config.pl_interval if pl_on else None, device)
        opt_D = _make_adam(D.parameters(), config.lr_d, betas, config.r1_interval if r1_on else None, device)
        pl_mean = torch.zeros([], device=device)
        n_params = sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())
        print(f"G {n_params[0] / 1e6:.2f} M params, D {n_params[1] / 1e6:.2f} M params, num_ws {G.num_ws}, "
              f"r1_gamma {config.r1_gamma}, ema_kimg {config.ema_kimg}", flush=True)

        # 4. Resume: networks, optimisers, p, path-length mean, step, RNG.
        train_seconds = 0.0
        if resuming:
            ckpt = run.load_checkpoint()
            G.load_state_dict(ckpt["G"])
            D.load_state_dict(ckpt["D"])
            G_ema.load_state_dict(ckpt["G_ema"])
            opt_G.load_state_dict(ckpt["opt_G"])
            opt_D.load_state_dict(ckpt["opt_D"])
            augment_pipe.load_state_dict(ckpt["augment"])
            pl_mean.copy_(ckpt["pl_mean"])
            step = int(ckpt["step"])
            train_seconds = float(ckpt.get("train_seconds", 0.0))
            runs.restore_rng_state(ckpt["rng"])
            run.truncate_metrics(step)
            print(f"resumed from {run.latest_checkpoint().name} (step {step}, p {float(augment_pipe.p):.3f})",
                  flush=True)
        elif config.init_from is not None:
            # Fine-tune: weights and the augmentation strength come from another run; optimisers,
            # step count and RNG start fresh (the self-filtering retrain, Mokady et al. 2022).
            source = Path(config.init_from)
            ckpt = (runs.RunFolder(source).load_checkpoint() if source.is_dir()
                    else torch.load(source, map_location="cpu", weights_only=True))
            for module, key in ((G, "G"), (D, "D"), (G_ema, "G_ema"), (augment_pipe, "augment")):
                try:
                    module.load_state_dict(ckpt[key])
                except (KeyError, RuntimeError) as exc:
                    raise ValueError(f"init_from {source} does not fit this config ({key}): {exc}") from exc
            print(f"initialised from {source} (its step {int(ckpt['step'])})", flush=True)
        sample_z = torch.randn([config.num_samples, config.z_dim],
                               generator=torch.Generator().manual_seed(config.seed)).to(device)

        last_checkpoint_step = step if resuming else -1

        def save_checkpoint() -> None:
            nonlocal last_checkpoint_step
            last_checkpoint_step = step
            run.save_checkpoint(step, {
                "step": step,
                "G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict(),
                "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                "augment": augment_pipe.state_dict(), "pl_mean": pl_mean.detach().cpu(),
                "train_seconds": train_seconds, "config": runs.config_to_dict(config),
                "rng": runs.capture_rng_state(),
            }, keep=config.keep_checkpoints)

        # Running sums between log rows, kept on the device so the loop never waits for the GPU.
        zero = lambda: torch.zeros([], device=device)  # noqa: E731
        sums = {k: zero() for k in ("loss_G", "loss_D", "r1", "pl", "real_logit", "fake_logit")}
        counts = {"r1": 0, "pl": 0}
        last_reg = {"r1": 0.0, "pl": 0.0}  # lazy regularisers: the latest value when none ran since the last row
        ada_signs, ada_count = zero(), 0
        ema_nimg_cfg = config.ema_kimg * 1000
        batch = config.batch
        run.set_status("running", step=step, total=config.total_steps)
        t_log, step_log = time.time(), step
        ema_params, G_params = list(G_ema.parameters()), list(G.parameters())

        # 5. The loop.
        t_start = time.time()
        time_up = False
        while step < config.total_steps and not stopper.stop and not time_up:
            idx = torch.randint(num_images, (batch,), device=device)
            reals = bank_images[idx].float().div_(127.5).sub_(1.0)  # [B, 3, R, R] in [-1, 1]

            # 5a. G main: minimise softplus(-D(aug(G(z)))) (non-saturating logistic loss).
            G.requires_grad_(True)
            D.requires_grad_(False)
            z = torch.randn([batch, config.z_dim], device=device)
            fake = G.synthesis(_mapping_with_mixing(G, z, config.style_mixing))
            fake_logits = D(augment(fake), None)
            loss_G = F.softplus(-fake_logits).mean()
            opt_G.zero_grad(set_to_none=True)
            loss_G.backward()
            if config.precision == "fp16":
                _sanitize_grads(G)
            opt_G.step()
            sums["loss_G"] += loss_G.detach()

            # 5b. G path-length regularisation, lazily every pl_interval steps (StyleGAN2 Sec. 3.2).
            if pl_on and step % config.pl_interval == 0:
                pl_batch = batch // config.pl_batch_shrink
                ws = _mapping_with_mixing(G, torch.randn([pl_batch, config.z_dim], device=device),
                                          config.style_mixing)
                img = G.synthesis(ws)
                noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
                (grads,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
                lengths = grads.square().sum(2).mean(1).sqrt()  # [B]
                pl_target = pl_mean.lerp(lengths.mean(), config.pl_decay)
                pl_mean.copy_(pl_target.detach())
                pl_penalty = (lengths - pl_target).square().mean()
                opt_G.zero_grad(set_to_none=True)
                (pl_penalty * config.pl_weight * config.pl_interval).backward()
                if config.precision == "fp16":
                    _sanitize_grads(G)
                opt_G.step()
                sums["pl"] += pl_penalty.detach()
                counts["pl"] += 1

            # 5c. D main: minimise softplus(D(aug(G(z)))) + softplus(-D(aug(x))).
            G.requires_grad_(False)
            D.requires_grad_(True)
            with torch.no_grad():
                z = torch.randn([batch, config.z_dim], device=device)
                fake = G.synthesis(_mapping_with_mixing(G, z, config.style_mixing))
            fake_logits = D(augment(fake), None)
            real_logits = D(augment(reals), None)
            loss_D = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
            opt_D.zero_grad(set_to_none=True)
            loss_D.backward()
            if config.precision == "fp16":
                _sanitize_grads(D)
            opt_D.step()
            sums["loss_D"] += loss_D.detach()
            sums["real_logit"] += real_logits.detach().mean()
            sums["fake_logit"] += fake_logits.detach().mean()
            ada_signs += real_logits.detach().sign().mean()
            ada_count += 1

            # 5d. D R1 on reals, lazily every r1_interval steps, scaled by the interval (Sec. 3.1).
            if r1_on and step % config.r1_interval == 0:
                reals_r1 = reals.detach().requires_grad_(True)
                logits = D(augment(reals_r1), None)
                (grads,) = torch.autograd.grad(logits.sum(), reals_r1, create_graph=True)
                r1_penalty = grads.square().sum([1, 2, 3]).mean()
                opt_D.zero_grad(set_to_none=True)
                (r1_penalty * (config.r1_gamma / 2) * config.r1_interval).backward()
                if config.precision == "fp16":
                    _sanitize_grads(D)
                opt_D.step()
                sums["r1"] += r1_penalty.detach()
                counts["r1"] += 1

            # 5e. Generator EMA with the official half-life and ramp-up.
            step += 1
            cur_nimg = step * batch
            ema_nimg = ema_nimg_cfg
            if config.ema_rampup is not None:
                ema_nimg = min(ema_nimg, cur_nimg * config.ema_rampup)
            ema_beta = 0.5 ** (batch / max(ema_nimg, 1e-8))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, G_params, 1.0 - ema_beta)
                for b_ema, b in zip(G_ema.buffers(), G.buffers()):
                    b_ema.copy_(b)

            # 5f. ADA: move p by sign(r_t - target) * batch * interval / (ada_kimg * 1000).
            if config.augment and ada_count >= config.ada_interval:
                augment_pipe.p.copy_(ada_adjust(augment_pipe.p, ada_signs / ada_count, target=config.ada_target,
                                                nimg=batch * ada_count, ada_kimg=config.ada_kimg))
                ada_signs.zero_()
                ada_count = 0

            # 6. Metrics and a throughput line.
            if config.max_train_minutes is not None:
                time_up = time.time() - t_start >= config.max_train_minutes * 60
            last = step == config.total_steps or stopper.stop or time_up
            if step % config.log_every == 0 or last:
                n = step - step_log
                vals = {k: float(v) / max(n, 1) for k, v in sums.items() if k not in counts}
                last_reg.update({k: float(sums[k]) / counts[k] for k in counts if counts[k]})
                vals.update({k: v for k, v in last_reg.items() if k != "pl" or pl_on})
                elapsed = time.time() - t_log
                train_seconds += elapsed
                imgs_per_s = n * batch / max(elapsed, 1e-9)
                row = dict(vals, p=float(augment_pipe.p), kimg=cur_nimg / 1000, imgs_per_s=imgs_per_s,
                           sec_per_kimg=elapsed / max(n * batch / 1000, 1e-9), train_seconds=train_seconds)
                run.log_metrics(step, **row)
                run.set_status("running", step=step, total=config.total_steps, kimg=cur_nimg / 1000)
                print(f"step {step:>6d}/{config.total_steps} kimg {cur_nimg / 1000:8.2f} | "
                      f"{imgs_per_s:8.1f} img/s {elapsed:6.1f} s | loss_G {vals['loss_G']:.3f} "
                      f"loss_D {vals['loss_D']:.3f} r1 {vals['r1']:.4f} p {row['p']:.3f} "
                      f"D(real) {vals['real_logit']:+.2f} D(fake) {vals['fake_logit']:+.2f}", flush=True)
                for v in sums.values():
                    v.zero_()
                counts = dict.fromkeys(counts, 0)
                t_log, step_log = time.time(), step

            # 7. Samples and checkpoints.
            preview = None
            if step % config.sample_every == 0 or last:
                preview = _sample_grid(G_ema, sample_z)
                preview.save(run.sample_path(step))
            if step % config.checkpoint_every == 0 or last:
                save_checkpoint()
            if progress is not None:
                progress(step, config.total_steps, preview)

        if stopper.stop:
            if last_checkpoint_step != step:
                save_checkpoint()
            run.set_status("stopped", step=step, total=config.total_steps)
            print(f"stopped at step {step}; resume with --resume true", flush=True)
            return Path(config.out_dir) / "generator"

        # 8. Export G_ema (with a card) for the studio.
        if time_up:
            print(f"max_train_minutes ({config.max_train_minutes}) reached at step {step}", flush=True)
        if last_checkpoint_step != step:
            save_checkpoint()
        grid = _sample_grid(G_ema, sample_z)
        figures = {"steps": step, "kimg": step * batch / 1000, "train_seconds": round(train_seconds, 1),
                   "final_augment_p": round(float(augment_pipe.p), 4),
                   "G_params_M": round(n_params[0] / 1e6, 2), **data_info}
        last_rows = run.metrics()[-1:]
        if last_rows:
            figures["imgs_per_s_last"] = round(last_rows[0].get("imgs_per_s", 0.0), 1)
        out = _export(G_ema, Path(config.out_dir) / "generator", config, figures, command, fp16=False)
        grid.save(out / "samples.png")
        if config.export_dir is not None:
            extra = _export(G_ema, Path(config.export_dir), config, figures, command, fp16=config.export_fp16)
            grid.save(extra / "samples.png")
        if config.examples_grid is not None:
            Path(config.examples_grid).parent.mkdir(parents=True, exist_ok=True)
            grid.save(config.examples_grid)
        run.set_status("finished", step=step, total=config.total_steps, generator=str(out), time_limit_hit=time_up)
        print(f"done: {step} steps, {step * batch / 1000:.1f} kimg in {train_seconds:.0f} s; generator in {out}",
              flush=True)
        return out
    except BaseException as exc:
        run.set_status("failed", step=step, total=config.total_steps, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stopper.uninstall()


def _export(G_ema: Generator, folder: Path, config: StyleGAN2TrainConfig, figures: dict[str, Any],
            command: str | None, *, fp16: bool) -> Path:
    """Save ``G_ema`` with ``save_generator`` and write its card."""
    from pipelines.cards import write_card
    from pipelines.stylegan_io import save_generator

    save_generator(G_ema, folder, fp16=fp16)
    write_card(
        folder, title=f"StyleGAN2-ADA portrait generator ({config.resolution} px)",
        task="unconditional image generation (portrait world)",
        architecture=(f"StyleGAN2 (Karras et al. 2020), trained with ADA; channel_base {config.channel_base}, "
                      f"channel_max {config.channel_max}, mapping {config.map_layers} layers, "
                      f"z/w {config.z_dim}/{config.w_dim}, weights {'float16' if fp16 else 'float32'}"),
        source=f"training run {config.out_dir} (pipelines/training/train_stylegan2.py)",
        command=command, config=runs.config_to_dict(config), figures=figures,
    )
    return folder


def main(argv: list[str] | None = None) -> Path:
    """CLI: every config field is a ``--field value`` option."""
    config = runs.parse_config(StyleGAN2TrainConfig, argv)
    command = "python -m pipelines.training.train_stylegan2 " + " ".join(sys.argv[1:] if argv is None else argv)
    return train(config, command=command)


if __name__ == "__main__":
    main()
