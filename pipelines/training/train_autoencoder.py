"""Train the portrait world's latent autoencoder (a diffusers ``AutoencoderKL``).

The autoencoder maps 64 px renders to 16x16x4 latents (f = 4, two downsamplings) for the
text-to-image teacher. Loss: L1 on pixels + L1 on Sobel edges (a cheap stand-in for a perceptual
loss: no LPIPS weights exist offline) + a small KL term (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3). At the end the latent statistics are measured on
training images and stored in the VAE config as ``shift_factor`` (mean) and ``scaling_factor``
(1 / std), so scaled latents have unit variance.

    python -m pipelines.training.train_autoencoder --out_dir runs/portrait_vae --total_steps 4000

Output: ``<out_dir>/vae/`` (``AutoencoderKL.from_pretrained`` folder with a card), plus the run
folder's config.json, metrics.jsonl, samples/ (top: originals, bottom: reconstructions) and
checkpoints/. ``--resume true`` continues a killed run from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.cards import write_card
from pipelines.data.bank import ImageBank, bank_region_weights, render_bank
from pipelines.device import select_device, training_autocast
from pipelines.images import make_grid, tensor_to_pil
from pipelines.training.runs import (RunFolder, capture_rng_state, config_to_dict, parse_config,
                                     resume_from_checkpoint, seed_everything)

__all__ = ["AutoencoderConfig", "build_autoencoder", "load_bank", "sobel_edges", "train", "main"]

VAL_SEED_OFFSET = 1_000_000   # validation renders use seeds far from the training ones
FINISH_RESERVE_S = 10.0       # seconds of a max_minutes budget kept for statistics and saving


@dataclass
class AutoencoderConfig:
    """Training config of the portrait-world AutoencoderKL."""

    out_dir: str = "runs/portrait_vae"
    resume: bool = False
    device: str = "auto"                  # "auto", "cuda", "cpu", ...
    mixed_precision: str = "auto"         # "auto" (bf16 autocast on CUDA only), "bf16" (any device), "no"
    seed: int = 0
    decoder_from: str = ""                # fine-tune only the decoder of this VAE folder (same network
                                          # config): its encoder, latents, scale and shift stay, so a
                                          # teacher trained on its latents keeps working
    # data
    image_size: int = 64                  # pixels; latents are image_size / 2**(levels - 1)
    num_images: int = 20000               # training renders held in memory
    val_images: int = 256                 # renders of held-out attribute combinations, for PSNR
    bank_seed: int = 0
    bank_cache: str = "runs/cache"        # folder of rendered banks shared by runs; "" = no cache
    workers: int = 0                      # render processes; 0 = one per usable CPU core, at most 16
    hflip: bool = True                    # random horizontal flips (reconstruction is flip-equivariant)
    # network
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    # loss
    edge_weight: float = 0.5              # L1 on Sobel edges
    kl_weight: float = 1e-6               # KL to N(0, I), summed over latent elements, mean over batch
    eye_weight: float = 0.0               # extra L1 weight on the pixels of the eyes' strokes box (eye
                                          # colour lives in a few pixels of a 64 px render); 0 = uniform
    # optimisation
    batch_size: int = 64
    lr: float = 4e-4
    warmup_steps: int = 100
    total_steps: int = 3000
    grad_clip: float = 1.0
    max_minutes: float = 0.0              # wall-time budget of the whole run (0 = none): the loop
                                          # ends early enough to save, the LR decay is fitted to it
    # logging
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 1000
    stats_images: int = 2048              # training images used to measure latent scale and shift


def build_autoencoder(cfg: AutoencoderConfig):
    """The ``AutoencoderKL`` of ``cfg`` (randomly initialised)."""
    from diffusers import AutoencoderKL

    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.image_size,
    )


def load_frozen_encoder(vae, folder: str | Path) -> tuple[float, float]:
    """Load the VAE in ``folder`` into ``vae`` (same config), freeze its encoder side (``encoder``,
    ``quant_conv``) so only the decoder trains; returns the source's (scaling_factor, shift_factor)."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"decoder_from {folder} is not an AutoencoderKL folder (no config.json)")
    source = AutoencoderKL.from_pretrained(folder)
    state = {k: v.float() for k, v in source.state_dict().items()}
    own = vae.state_dict()
    if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
        raise ValueError(f"decoder_from {folder} does not match this config (block_out_channels "
                         f"{list(source.config.block_out_channels)}, latent_channels "
                         f"{source.config.latent_channels}); pass the same network options")
    vae.load_state_dict(state)
    for module in (vae.encoder, vae.quant_conv):
        if module is not None:
            module.requires_grad_(False)
    return float(source.config.scaling_factor), float(source.config.shift_factor or 0.0)


def sobel_edges(x: torch.Tensor) -> torch.Tensor:
    """Per-channel Sobel gradients [B, C, H, W] -> [B, 2C, H, W] (d/dx and d/dy)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype) / 4
    k = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(x.shape[1], 1, 1, 1)   # [2C, 1, 3, 3]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4.0 / mse)).mean()


def lr_at(step: int, time_fraction: float, cfg: AutoencoderConfig) -> float:
    """Linear warmup, then cosine decay to 10 % of ``lr``.

    The decay follows whichever runs out first: the step budget or, with ``max_minutes``, the
    fraction ``time_fraction`` of the training loop's wall-time budget already spent.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, max(progress, time_fraction))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_scheduled_lr(opt, step: int, t_loop: float, loop_budget: float, cfg) -> bool:
    """Set ``opt``'s learning rate for ``step`` (:func:`lr_at`, fitted to the wall-time budget of a
    training loop started at ``t_loop``); False, with a message, once ``cfg.max_minutes`` is spent."""
    time_fraction = (time.perf_counter() - t_loop) / max(loop_budget, 1.0) if cfg.max_minutes > 0 else 0.0
    if time_fraction >= 1.0:
        print(f"time budget of {cfg.max_minutes} min reached at step {step}", flush=True)
        return False
    for group in opt.param_groups:
        group["lr"] = lr_at(step, time_fraction, cfg)
    return True


def render_workers(requested: int = 0) -> int:
    """``requested`` render processes, or (0) one per CPU this process may use, at most 16."""
    if requested > 0:
        return requested
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(16, available))


def load_bank(n: int, *, size: int, seed: int, split: str, cache_dir: str, workers: int) -> ImageBank:
    """Render (or load from ``cache_dir``) ``n`` portrait-world images of ``split``.

    The render processes start with one OpenMP/BLAS thread each (``workers`` processes with a full
    thread pool each would oversubscribe the CPUs).
    """
    cache = Path(cache_dir) / f"bank_{split}_n{n}_s{size}_seed{seed}.npz" if cache_dir else None
    workers = render_workers(workers)
    t0 = time.perf_counter()
    with _single_threaded_children():
        bank = render_bank(n, size=size, seed=seed, split=split, workers=workers, cache=cache)
    dt = time.perf_counter() - t0
    print(f"bank {split}: {n} images at {size} px in {dt:.1f}s ({n / dt:.0f} img/s, {workers} workers)", flush=True)
    return bank


@contextlib.contextmanager
def _single_threaded_children():
    """Child processes started inside read one-thread limits from the environment."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@torch.no_grad()
def latent_statistics(vae, images: ImageBank, device: torch.device, n: int, batch: int = 256) -> tuple[float, float]:
    """(mean, std) of sampled latents of the first ``n`` bank images."""
    zs = []
    for start in range(0, min(n, len(images)), batch):
        idx = torch.arange(start, min(start + batch, n, len(images)))
        zs.append(vae.encode(images.batch(idx, device)).latent_dist.sample().float())
    z = torch.cat(zs)
    return z.mean().item(), z.std().item()


@torch.no_grad()
def evaluate(vae, bank: ImageBank, device: torch.device, autocast, batch: int = 256) -> float:
    """PSNR (dB) of mean-latent reconstructions of the whole ``bank``."""
    total, count = 0.0, 0
    for start in range(0, len(bank), batch):
        idx = torch.arange(start, min(start + batch, len(bank)))
        x = bank.batch(idx, device)
        with autocast():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        total += psnr(rec.clamp(-1, 1), x).item() * len(idx)
        count += len(idx)
    return total / count


def train(cfg: AutoencoderConfig) -> Path:
    """Run (or resume) training; returns the folder of the saved VAE."""
    t_start = time.perf_counter()
    if not cfg.eye_weight >= 0:
        raise ValueError(f"eye_weight must be >= 0, got {cfg.eye_weight}")
    run = RunFolder(cfg.out_dir)
    resumed = run.create(cfg, resume=cfg.resume)
    seed_everything(cfg.seed)

    # 1. Data: render (or load) the banks, then hold the training images on the device as uint8.
    train_bank = load_bank(cfg.num_images, size=cfg.image_size, seed=cfg.bank_seed, split="train",
                           cache_dir=cfg.bank_cache, workers=cfg.workers)
    val_bank = load_bank(cfg.val_images, size=cfg.image_size, seed=cfg.bank_seed + VAL_SEED_OFFSET,
                         split="heldout", cache_dir=cfg.bank_cache, workers=cfg.workers)
    device = select_device(cfg.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")   # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True         # TF32 convolutions
        torch.backends.cudnn.benchmark = True
    images = train_bank.images.to(device)                          # [N, 3, H, W] uint8
    pixel_weights = None                                           # [N, 1, H, W] or uniform
    if cfg.eye_weight > 0:
        pixel_weights = bank_region_weights(train_bank, cfg.image_size, cfg.eye_weight,
                                            cache_dir=cfg.bank_cache).to(device)
    use_bf16, autocast = training_autocast(device, cfg.mixed_precision)

    # 2. Network and optimiser.
    vae = build_autoencoder(cfg)
    source_factors = None
    if cfg.decoder_from:
        source_factors = load_frozen_encoder(vae, cfg.decoder_from)
    vae = vae.to(device)
    trained = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"AutoencoderKL {n_params / 1e6:.2f}M parameters on {device} (bf16 autocast: {use_bf16})", flush=True)

    # 3. Resume.
    step = 0
    if resumed:
        step, _ = resume_from_checkpoint(run, vae=vae, opt=opt)

    def checkpoint() -> None:
        run.save_checkpoint(step, {"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                   "rng": capture_rng_state(), "config": config_to_dict(cfg)})

    def save_samples() -> None:
        vae.eval()
        x = val_bank.batch(torch.arange(min(8, len(val_bank))), device)
        with torch.no_grad(), autocast():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
        make_grid(tensor_to_pil(torch.cat([x, rec.clamp(-1, 1)])), columns=len(x)).save(run.sample_path(step))
        vae.train()

    # 4. Training loop.
    run.set_status("running", step=step, total=cfg.total_steps)
    vae.train()
    t_loop = time.perf_counter()
    loop_budget = 60 * cfg.max_minutes - (t_loop - t_start) - FINISH_RESERVE_S
    t_log, seen = time.perf_counter(), 0
    while step < cfg.total_steps:
        if not set_scheduled_lr(opt, step, t_loop, loop_budget, cfg):
            break
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), device=device)
        x = images[idx].float().div_(127.5).sub_(1.0)                   # [B, 3, H, W] in [-1, 1]
        w = pixel_weights[idx] if pixel_weights is not None else None   # [B, 1, H, W]
        if cfg.hflip:
            flip = torch.rand(cfg.batch_size, device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            w = torch.where(flip[:, None, None, None], w.flip(-1), w) if w is not None else None
        with autocast():
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample
        rec = rec.float()
        # a weighted mean keeps the loss's scale (and the LR's meaning) with eye_weight
        l1 = (rec - x).abs().mean() if w is None else ((rec - x).abs() * w).mean() / w.mean()
        edge = (sobel_edges(rec) - sobel_edges(x)).abs().mean()
        kl = posterior.kl().float().mean()
        loss = l1 + cfg.edge_weight * edge + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        opt.step()
        step += 1
        seen += cfg.batch_size

        if step % cfg.log_every == 0 or step == cfg.total_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_log
            values = {"loss": loss.item(), "l1": l1.item(), "edge": edge.item(), "kl": kl.item(),
                      "psnr": psnr(rec.detach().clamp(-1, 1), x).item(), "grad_norm": grad_norm.item(),
                      "lr": opt.param_groups[0]["lr"], "images_per_s": seen / dt}
            run.log_metrics(step, **values)
            print(f"step {step}/{cfg.total_steps} loss {values['loss']:.4f} psnr {values['psnr']:.2f} dB "
                  f"kl {values['kl']:.1f} | {seen / dt:.0f} img/s, {dt * 1000 / (seen / cfg.batch_size):.1f} ms/step",
                  flush=True)
            run.set_status("running", step=step, total=cfg.total_steps)
            t_log, seen = time.perf_counter(), 0
        if step % cfg.sample_every == 0:
            save_samples()
        if step % cfg.checkpoint_every == 0:
            checkpoint()

    # 5. Latent statistics, validation PSNR, final save.
    vae.eval()
    if not run.latest_checkpoint() or not run.latest_checkpoint().name.endswith(f"{step:07d}.pt"):
        checkpoint()
    save_samples()
    if source_factors is None:
        shift, std = latent_statistics(vae, train_bank, device, cfg.stats_images)
    else:   # the encoder is the source's: keep its factors exactly (its teachers were trained with them)
        shift, std = source_factors[1], 1.0 / source_factors[0]
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=shift)
    val_psnr = evaluate(vae, val_bank, device, autocast)
    run.log_metrics(step, val_psnr=val_psnr, latent_mean=shift, latent_std=std)
    out = run.path / "vae"
    vae.save_pretrained(out)
    levels = len(cfg.block_out_channels)
    latent = cfg.image_size // 2 ** (levels - 1)
    write_card(out, title="Portrait-world autoencoder (AutoencoderKL)",
               task="image <-> latent autoencoding for the text-to-image teacher",
               architecture=f"diffusers AutoencoderKL, channels {tuple(cfg.block_out_channels)}, "
                            f"{cfg.image_size} px -> {latent}x{latent}x{cfg.latent_channels} latents",
               source=f"training run {run.path}" + (f"; only the decoder trained, the encoder (and so the "
                                                    f"latents) is {cfg.decoder_from}'s" if cfg.decoder_from else ""),
               command="python -m pipelines.training.train_autoencoder " + " ".join(sys.argv[1:]),
               config=config_to_dict(cfg),
               figures={"val_psnr_db": round(val_psnr, 3), "steps": step, "scaling_factor": 1.0 / std,
                        "shift_factor": shift})
    run.set_status("finished", step=step, total=cfg.total_steps, val_psnr=val_psnr)
    print(f"val PSNR {val_psnr:.2f} dB; latent mean {shift:.4f}, std {std:.4f} -> scaling_factor "
          f"{1 / std:.4f}; saved {out} ({time.perf_counter() - t_start:.0f}s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_config(AutoencoderConfig, argv)
    return train(cfg)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
