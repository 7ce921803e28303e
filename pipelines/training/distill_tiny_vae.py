"""Distil a tiny autoencoder (a diffusers ``AutoencoderTiny``, as TAESD) from the portrait
teacher's ``AutoencoderKL``, in the teacher's latent space.

The one-step student spends a third of its time decoding: the KL decoder runs ResNet blocks of 32-64
channels at 64 px. A tiny decoder (plain conv blocks, a few channels at full resolution) decodes the
same latents several times faster. As in TAESD (Bohan 2023, github.com/madebyollin/taesd), the
tiny encoder learns to give the source encoder's latents (MSE to its scaled posterior mean) and the
tiny decoder learns to decode them (L1 + Sobel-edge L1 to the render, optionally weighted on the
eyes; its inputs are posterior samples, so that it also copes with a generator's slightly
off-distribution latents). Its latents are the UNet's own scaled ones, so the config has
``scaling_factor`` 1: ``PortraitDiffusionPipeline`` takes it as its ``vae`` (``copy_pipeline --vae``).

    python -m pipelines.training.distill_tiny_vae --source assets/portrait_teacher --out_dir runs/tiny_vae

Output: ``<out_dir>/tiny_vae/`` (``AutoencoderTiny.from_pretrained`` folder with a card naming its
validation PSNR beside the source decoder's on the same latents), plus the run folder's config.json,
metrics.jsonl, samples/ (rows: renders, source decodes, tiny decodes) and checkpoints/.
``--resume true`` continues a killed run from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.cards import write_card
from pipelines.data.bank import bank_region_weights
from pipelines.device import select_device, training_autocast
from pipelines.images import make_grid, tensor_to_pil
from pipelines.text_to_image import load_vae
from pipelines.training.runs import (RunFolder, capture_rng_state, config_to_dict, parse_config,
                                     resume_from_checkpoint, seed_everything)
from pipelines.training.train_autoencoder import (VAL_SEED_OFFSET, FINISH_RESERVE_S, load_bank, psnr,
                                                  set_scheduled_lr, sobel_edges)

__all__ = ["TinyVAEConfig", "build_tiny_vae", "load_source_vae", "train", "main"]


@dataclass
class TinyVAEConfig:
    """Distillation config of the tiny autoencoder."""

    out_dir: str = "runs/tiny_vae"
    resume: bool = False
    device: str = "auto"                  # "auto", "cuda", "cpu", ...
    mixed_precision: str = "auto"         # "auto" (bf16 autocast on CUDA only), "bf16" (any device), "no"
    seed: int = 0
    source: str = "assets/portrait_teacher"   # a PortraitDiffusionPipeline folder (its vae/) or an
                                              # AutoencoderKL folder: the latent space to keep
    # data
    num_images: int = 20000               # training renders held in memory (with their source latents)
    val_images: int = 256                 # renders of held-out attribute combinations
    bank_seed: int = 0
    bank_cache: str = "runs/cache"        # folder of rendered banks shared by runs; "" = no cache
    workers: int = 0                      # render processes; 0 = one per usable CPU core, at most 16
    # network (AutoencoderTiny: the same width at every level)
    channels: int = 24
    encoder_blocks: tuple[int, ...] = (1, 2, 2)
    decoder_blocks: tuple[int, ...] = (3, 3, 1)  # the last level runs at full resolution: keep it short
    # loss
    edge_weight: float = 0.5              # L1 on Sobel edges of the decode
    eye_weight: float = 0.0               # extra L1 weight on the eyes' strokes box (as train_autoencoder)
    encoder_weight: float = 1.0           # MSE of the tiny encoder's latents to the source's posterior mean
    # optimisation
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 4000
    grad_clip: float = 1.0
    max_minutes: float = 0.0              # wall-time budget of the whole run (0 = none)
    # logging
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 500


def build_tiny_vae(cfg: TinyVAEConfig, latent_channels: int, levels: int):
    """The ``AutoencoderTiny`` of ``cfg`` (randomly initialised) for ``levels`` resolution levels (the
    source's: ``levels - 1`` halvings) and ``latent_channels``."""
    from diffusers import AutoencoderTiny

    for name in ("encoder_blocks", "decoder_blocks"):
        blocks = tuple(getattr(cfg, name))
        if len(blocks) != levels or min(blocks) < 1:
            raise ValueError(f"{name} must give {levels} block counts >= 1 (one per level of the source "
                             f"autoencoder), got {list(blocks)}")
    if cfg.channels < 1:
        raise ValueError(f"channels must be >= 1, got {cfg.channels}")
    widths = (int(cfg.channels),) * levels
    tiny = AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=widths,
                           decoder_block_out_channels=widths, num_encoder_blocks=tuple(cfg.encoder_blocks),
                           num_decoder_blocks=tuple(cfg.decoder_blocks), latent_channels=latent_channels,
                           upsampling_scaling_factor=2, scaling_factor=1.0)
    return tiny


def load_source_vae(source: str | os.PathLike[str]):
    """The ``AutoencoderKL`` of ``source``: a pipeline folder (its ``vae/``) or a VAE folder."""
    source = Path(source)
    folder = source / "vae" if (source / "vae" / "config.json").is_file() else source
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"source {source} is neither a text-to-image pipeline folder (with vae/) nor an "
                                "autoencoder folder (with config.json)")
    vae = load_vae(folder, torch_dtype=torch.float32)
    if type(vae).__name__ != "AutoencoderKL":
        raise ValueError(f"source {folder} holds a {type(vae).__name__}, not an AutoencoderKL: a tiny autoencoder "
                         "is distilled from the full one")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def source_latents(vae, bank, device: torch.device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled (UNet-space) posterior (mean, std) of every bank image, [N, C, h, w] float32."""
    scale, shift = float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)
    means, stds = [], []
    for start in range(0, len(bank), batch):
        dist = vae.encode(bank.batch(torch.arange(start, min(start + batch, len(bank))), device)).latent_dist
        means.append((dist.mean.float() - shift) * scale)
        stds.append(dist.std.float() * scale)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode_source(vae, latents: torch.Tensor) -> torch.Tensor:
    """Source decode of scaled latents -> images in [-1, 1]."""
    scale, shift = float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)
    return vae.decode(latents / scale + shift).sample.float().clamp(-1, 1)


@torch.no_grad()
def evaluate(tiny, vae, images: torch.Tensor, latents: torch.Tensor, batch: int = 256) -> dict[str, float]:
    """Validation figures on renders ``images`` [N, 3, H, W] in [-1, 1] with source mean latents."""
    sums = {"val_psnr_db": 0.0, "source_psnr_db": 0.0, "roundtrip_psnr_db": 0.0, "agreement_psnr_db": 0.0,
            "encoder_rmse": 0.0}
    for start in range(0, len(images), batch):
        x, z = images[start:start + batch], latents[start:start + batch]
        tiny_rec = tiny.decode(z).sample.float().clamp(-1, 1)
        source_rec = decode_source(vae, z)
        tiny_z = tiny.encode(x).latents
        round_rec = tiny.decode(tiny_z).sample.float().clamp(-1, 1)
        n = len(x)
        sums["val_psnr_db"] += psnr(tiny_rec, x).item() * n
        sums["source_psnr_db"] += psnr(source_rec, x).item() * n
        sums["roundtrip_psnr_db"] += psnr(round_rec, x).item() * n
        sums["agreement_psnr_db"] += psnr(tiny_rec, source_rec).item() * n
        sums["encoder_rmse"] += (tiny_z.float() - z).pow(2).mean().item() * n
    out = {k: v / len(images) for k, v in sums.items()}
    out["encoder_rmse"] = out["encoder_rmse"] ** 0.5
    return out


@torch.no_grad()
def decode_ms(module_decode, latents: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time (ms) of ``module_decode(latents)``, after a warm-up call."""
    module_decode(latents)
    times = []
    for _ in range(repeats):
        if latents.device.type == "cuda":
            torch.cuda.synchronize(latents.device)
        t0 = time.perf_counter()
        module_decode(latents)
        if latents.device.type == "cuda":
            torch.cuda.synchronize(latents.device)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def train(cfg: TinyVAEConfig) -> Path:
    """Run (or resume) the distillation; returns the folder of the saved tiny autoencoder."""
    t_start = time.perf_counter()
    if not cfg.eye_weight >= 0 or not cfg.encoder_weight >= 0 or not cfg.edge_weight >= 0:
        raise ValueError("eye_weight, encoder_weight and edge_weight must be >= 0")
    if cfg.batch_size < 1 or cfg.total_steps < 1:
        raise ValueError(f"batch_size and total_steps must be >= 1, got {cfg.batch_size} and {cfg.total_steps}")
    vae = load_source_vae(cfg.source)          # fails before the run folder is made
    levels = len(vae.config.block_out_channels)
    image_size = int(vae.config.sample_size)
    tiny = build_tiny_vae(cfg, int(vae.config.latent_channels), levels)
    run = RunFolder(cfg.out_dir)
    resumed = run.create(cfg, resume=cfg.resume)
    seed_everything(cfg.seed)

    # 1. Data: renders, and the source's latents of them.
    device = select_device(cfg.device)
    train_bank = load_bank(cfg.num_images, size=image_size, seed=cfg.bank_seed, split="train",
                           cache_dir=cfg.bank_cache, workers=cfg.workers)
    val_bank = load_bank(cfg.val_images, size=image_size, seed=cfg.bank_seed + VAL_SEED_OFFSET,
                         split="heldout", cache_dir=cfg.bank_cache, workers=cfg.workers)
    vae = vae.to(device)
    t0 = time.perf_counter()
    lat_mean, lat_std = source_latents(vae, train_bank, device)
    val_x = val_bank.batch(torch.arange(len(val_bank)), device)
    val_z, _ = source_latents(vae, val_bank, device)
    print(f"source latents of {len(train_bank)} + {len(val_bank)} renders in {time.perf_counter() - t0:.0f}s",
          flush=True)
    images = train_bank.images.to(device)                          # [N, 3, H, W] uint8
    pixel_weights = None
    if cfg.eye_weight > 0:
        pixel_weights = bank_region_weights(train_bank, image_size, cfg.eye_weight,
                                            cache_dir=cfg.bank_cache).to(device)
    use_bf16, autocast = training_autocast(device, cfg.mixed_precision)

    # 2. Network and optimiser.
    tiny = tiny.to(device).train()
    opt = torch.optim.AdamW(tiny.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    n_dec = sum(p.numel() for p in tiny.decoder.parameters())
    n_enc = sum(p.numel() for p in tiny.encoder.parameters())
    print(f"AutoencoderTiny: decoder {n_dec / 1e3:.0f}k, encoder {n_enc / 1e3:.0f}k parameters on {device} "
          f"(bf16 autocast: {use_bf16})", flush=True)

    step = 0
    if resumed:
        step, _ = resume_from_checkpoint(run, tiny=tiny, opt=opt)

    def checkpoint() -> None:
        run.save_checkpoint(step, {"tiny": tiny.state_dict(), "opt": opt.state_dict(), "step": step,
                                   "rng": capture_rng_state(), "config": config_to_dict(cfg)})

    def save_samples() -> None:
        tiny.eval()
        x, z = val_x[:8], val_z[:8]
        with torch.no_grad():
            rows = [x, decode_source(vae, z), tiny.decode(z).sample.float().clamp(-1, 1)]
        make_grid(tensor_to_pil(torch.cat(rows)), columns=len(x)).save(run.sample_path(step))
        tiny.train()

    # 3. Training loop.
    run.set_status("running", step=step, total=cfg.total_steps)
    t_loop = time.perf_counter()
    loop_budget = 60 * cfg.max_minutes - (t_loop - t_start) - FINISH_RESERVE_S
    t_log, seen = time.perf_counter(), 0
    while step < cfg.total_steps:
        if not set_scheduled_lr(opt, step, t_loop, loop_budget, cfg):
            break
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), device=device)
        x = images[idx].float().div_(127.5).sub_(1.0)                   # [B, 3, H, W] in [-1, 1]
        mean = lat_mean[idx]
        z = mean + lat_std[idx] * torch.randn_like(mean)                # a posterior sample, UNet scale
        with autocast():
            rec = tiny.decode(z).sample
            enc = tiny.encode(x).latents if cfg.encoder_weight > 0 else None
        rec = rec.float()
        err = (rec - x).abs()
        if pixel_weights is None:
            l1 = err.mean()
        else:   # a weighted mean keeps the loss's scale
            w = pixel_weights[idx]
            l1 = (err * w).mean() / w.mean()
        edge = (sobel_edges(rec) - sobel_edges(x)).abs().mean()
        enc_mse = F.mse_loss(enc.float(), mean) if enc is not None else torch.zeros((), device=device)
        loss = l1 + cfg.edge_weight * edge + cfg.encoder_weight * enc_mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(tiny.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        seen += cfg.batch_size

        if step % cfg.log_every == 0 or step == cfg.total_steps:
            dt = time.perf_counter() - t_log
            values = {"loss": loss.item(), "l1": l1.item(), "edge": edge.item(), "encoder_mse": enc_mse.item(),
                      "psnr": psnr(rec.detach().clamp(-1, 1), x).item(), "grad_norm": grad_norm.item(),
                      "lr": opt.param_groups[0]["lr"], "images_per_s": seen / dt}
            run.log_metrics(step, **values)
            print(f"step {step}/{cfg.total_steps} loss {values['loss']:.4f} psnr {values['psnr']:.2f} dB "
                  f"enc mse {values['encoder_mse']:.4f} | {seen / dt:.0f} img/s", flush=True)
            run.set_status("running", step=step, total=cfg.total_steps)
            t_log, seen = time.perf_counter(), 0
        if step % cfg.sample_every == 0:
            save_samples()
        if step % cfg.checkpoint_every == 0:
            checkpoint()

    # 4. Validation, speed, final save.
    tiny.eval()
    latest = run.latest_checkpoint()
    if latest is None or not latest.name.endswith(f"{step:07d}.pt"):
        checkpoint()
    save_samples()
    figures = evaluate(tiny, vae, val_x, val_z)
    z8 = val_z[:8]
    figures["decode_ms_batch8"] = decode_ms(lambda z: tiny.decode(z), z8)
    figures["source_decode_ms_batch8"] = decode_ms(lambda z: decode_source(vae, z), z8)
    figures["steps"] = step
    run.log_metrics(step, **figures)
    out = run.path / "tiny_vae"
    tiny.save_pretrained(out)
    latent = image_size // 2 ** (levels - 1)
    write_card(out, title="Portrait-world tiny autoencoder (AutoencoderTiny, distilled)",
               task="fast decoding (and encoding) of the text-to-image teacher's latents",
               architecture=f"diffusers AutoencoderTiny, {cfg.channels} channels, encoder blocks "
                            f"{tuple(cfg.encoder_blocks)}, decoder blocks {tuple(cfg.decoder_blocks)}; "
                            f"{image_size} px <-> {latent}x{latent}x{vae.config.latent_channels} latents in the "
                            "UNet's scaled space (scaling_factor 1)",
               source=f"training run {run.path}, distilled from the AutoencoderKL of {cfg.source}",
               command="python -m pipelines.training.distill_tiny_vae " + " ".join(sys.argv[1:]),
               config=config_to_dict(cfg),
               figures={k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()},
               notes="val_psnr_db: tiny decode of the source's mean latents of held-out renders; "
                     "source_psnr_db: the source decoder on the same latents; agreement_psnr_db: tiny against "
                     "source decodes; roundtrip_psnr_db: tiny encoder then tiny decoder; decode times on "
                     f"{device.type}, batch 8, fp32.")
    run.set_status("finished", step=step, total=cfg.total_steps, val_psnr=figures["val_psnr_db"])
    print(f"val PSNR {figures['val_psnr_db']:.2f} dB (source decoder {figures['source_psnr_db']:.2f} dB), "
          f"decode {figures['decode_ms_batch8']:.1f} ms vs {figures['source_decode_ms_batch8']:.1f} ms at batch 8; "
          f"saved {out} ({time.perf_counter() - t_start:.0f}s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_config(TinyVAEConfig, argv)
    return train(cfg)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
