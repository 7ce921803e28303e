"""Train an e4e-style encoder into W+ on a StyleGAN2 generator's own images.

Tov et al. 2021 ("Designing an Encoder for StyleGAN Image Manipulation", e4e). Every step samples
z, maps it to w, varies it (per-sample truncation towards w_avg, style mixing, so the targets
cover W+ near W), renders the images and trains the encoder to recover the latents:

    loss = latent_weight  * ||E(x) - w+||^2 / var(w)                    (latent regression)
         + pixel_weight   * ||G(E(x)) - x||^2                            (image reconstruction)
         + feature_weight * d_evaluator(G(E(x)), x)                      (perceptual, LPIPS stand-in)
         + delta_weight   * sum_i ||delta_i|| / std(w)                   (e4e's delta regulariser)

with the offsets delta_i switched on one by one every ``progressive_every`` steps (e4e's
progressive training). The image terms need a generator forward and backward; on a CPU raise
``image_loss_every`` (every N steps) to train mostly on the cheap latent term.

Reads top to bottom: config -> run folder -> generator, evaluator -> encoder -> resume -> loop ->
checkpoint -> held-out figures -> export (safetensors + config.json + card)::

    python -m pipelines.training.train_stylegan_encoder --generator assets/stylegan2_portraits \\
        --out_dir runs/encoder --steps 3000 --export_to assets/stylegan2_encoder
    # CPU: render a pool of generator images once, train mostly on the latent term, stop at 10 min
    python -m pipelines.training.train_stylegan_encoder --device cpu --batch 16 --steps 3000 \\
        --pool_size 2000 --image_loss_every 8 --max_train_minutes 10
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from models.stylegan2 import Generator
from models.stylegan2.encoder import StyleGANEncoder
from pipelines.device import select_device
from pipelines.images import make_grid, tensor_to_pil
from pipelines.stylegan_inversion import (EvaluatorPerceptualLoss, load_encoder, reconstruction_error, save_encoder, synthesize,
                                          w_statistics)
from pipelines.training.runs import (RunFolder, capture_rng_state, config_to_dict, parse_config, restore_rng_state,
                                     seed_everything)

__all__ = ["EncoderTrainConfig", "sample_training_latents", "train", "main"]

Progress = Callable[[int, int, Optional[Image.Image]], None]


@dataclass
class EncoderTrainConfig:
    """e4e encoder training on a generator's own images (Tov et al. 2021)."""

    out_dir: str = "runs/stylegan_encoder"
    resume: bool = False  # continue from the latest checkpoint in out_dir
    device: str = "auto"  # 'auto', 'cuda', 'cpu'
    seed: int = 0

    # the networks
    generator: str = "assets/stylegan2_portraits"  # studio generator folder, .safetensors or official .pkl
    evaluator: Optional[str] = "assets/evaluator"  # evaluator folder for the feature loss; 'none' = off
    input_resolution: Optional[int] = None  # side the encoder reads; None = min(G resolution, 256)
    channel_base: int = 4096  # encoder channels at resolution r: min(channel_base // r, channel_max)
    channel_max: int = 256

    # the training latents
    truncation_min: float = 0.5  # per-sample psi drawn uniformly from [truncation_min, 1]
    style_mixing: float = 0.5  # probability that a target mixes two latents at a random layer
    w_avg_samples: int = 10000  # z samples for w_avg and the spread of W
    pool_size: int = 0  # 0 = fresh generator images every step; N = render N (w+, image) pairs once and
    #                     sample batches from them (a CPU saver: the generator runs N times in all)
    real_images: int = 0  # N > 0: also train on N portrait-world renders (image losses only, as e4e
    #                       trains on real photos), so the encoder fits the world and not only G's images
    real_every: int = 2  # every N-th step takes a real batch (when real_images > 0)
    real_seed: int = 3_000_000  # bank seed of the real images (distinct from the benchmark's held-out seeds)

    # length and optimiser
    steps: int = 3000
    batch: int = 16
    lr: float = 5e-4  # Adam
    max_train_minutes: Optional[float] = None  # stop early (checkpoint + export) after this much loop time

    # losses
    latent_weight: float = 1.0
    pixel_weight: float = 1.0
    feature_weight: float = 1.0
    delta_weight: float = 2e-4  # e4e's lambda for the delta regulariser
    image_loss_every: int = 1  # image losses every N steps; 0 = latent loss only
    progressive_every: int = 200  # one more offset every N steps (e4e); 0 = all offsets from the start

    # logging, samples, checkpoints
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_samples: int = 8  # images in a sample grid (targets above reconstructions)
    eval_images: int = 64  # held-out generator images for the final figures

    export_to: Optional[str] = None  # also write the encoder (with a card) here, e.g. assets/stylegan2_encoder
    init_from: Optional[str] = None  # start from an exported encoder folder (e.g. after fine-tuning the generator)

    def validate(self) -> None:
        if self.pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {self.pool_size}")
        if self.real_images < 0 or self.real_every < 1:
            raise ValueError(f"real_images must be >= 0 and real_every >= 1, got {self.real_images}, {self.real_every}")
        for name in ("steps", "batch", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                     "num_samples", "eval_images", "w_avg_samples", "channel_base", "channel_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.truncation_min <= 1:
            raise ValueError(f"truncation_min must be in [0, 1], got {self.truncation_min}")
        if not 0 <= self.style_mixing <= 1:
            raise ValueError(f"style_mixing must be in [0, 1], got {self.style_mixing}")
        for name in ("latent_weight", "pixel_weight", "feature_weight", "delta_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_loss_every < 0 or self.progressive_every < 0:
            raise ValueError("image_loss_every and progressive_every must be >= 0")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be positive, got {self.max_train_minutes}")
        if not Path(self.generator).exists():
            raise ValueError(f"generator {self.generator!r} does not exist; train one with "
                             "`python -m pipelines.training.train_stylegan2` or convert an official .pkl")
        if self.evaluator not in (None, "", "none") and not Path(self.evaluator).exists():
            raise ValueError(f"evaluator {self.evaluator!r} does not exist; pass --evaluator none to train "
                             "without the feature loss")


@torch.no_grad()
def sample_training_latents(G: Generator, batch: int, w_avg: torch.Tensor, *, truncation_min: float,
                            style_mixing: float, generator: torch.Generator) -> torch.Tensor:
    """Target latents ``[B, num_ws, w_dim]``: mapped z, truncated towards ``w_avg`` with a psi
    drawn per sample from [truncation_min, 1], and style-mixed with probability ``style_mixing``."""
    device = w_avg.device
    z = torch.randn([2 * batch, G.z_dim], generator=generator, device=device)
    w = G.mapping(z, torch.zeros([2 * batch, G.c_dim], device=device), skip_w_avg_update=True)  # [2B, num_ws, w_dim]
    psi = truncation_min + (1 - truncation_min) * torch.rand([2 * batch, 1, 1], generator=generator, device=device)
    w = w_avg + psi * (w - w_avg)
    w1, w2 = w[:batch], w[batch:]
    if style_mixing > 0 and G.num_ws > 1:
        cutoff = torch.randint(1, G.num_ws, [batch, 1, 1], generator=generator, device=device)
        mix = torch.rand([batch, 1, 1], generator=generator, device=device) < style_mixing
        layer = torch.arange(G.num_ws, device=device)[None, :, None]
        w1 = torch.where(mix & (layer >= cutoff), w2, w1)
    return w1


def _losses(encoder: StyleGANEncoder, G: Generator, targets: torch.Tensor, w_true: torch.Tensor | None,
            perceptual: EvaluatorPerceptualLoss | None, config: EncoderTrainConfig, w_var: float, w_std: float,
            num_offsets: int | None, image_terms: bool) -> dict[str, torch.Tensor]:
    """The loss terms of one batch (means over the batch)."""
    w_hat, deltas = encoder(targets, num_offsets=num_offsets, return_deltas=True)
    terms = {"latent": (w_hat - w_true).square().mean() / w_var if w_true is not None else w_hat.new_zeros([]),
             "delta": deltas.norm(dim=-1).sum(1).mean() / w_std if deltas.shape[1] else w_hat.new_zeros([])}
    if image_terms:
        recon = synthesize(G, w_hat)
        terms["pixel"] = reconstruction_error(recon, targets).mean()
        if perceptual is not None:
            terms["feature"] = perceptual(recon, targets).mean()
    weights = {"latent": config.latent_weight, "delta": config.delta_weight, "pixel": config.pixel_weight,
               "feature": config.feature_weight}
    terms["loss"] = sum(weights[k] * v for k, v in terms.items())
    return terms


@torch.no_grad()
def _sample_grid(encoder: StyleGANEncoder, G: Generator, targets: torch.Tensor) -> Image.Image:
    recon = synthesize(G, encoder(targets))
    return make_grid(tensor_to_pil(torch.cat([targets, recon])), columns=targets.shape[0])


def train(config: EncoderTrainConfig, progress: Progress | None = None) -> Path:
    """Run (or resume) an encoder training run; returns the folder of the exported encoder."""
    from pipelines.evaluation import Evaluator
    from pipelines.stylegan_io import load_generator

    # 1. Config, run folder, device, seeds.
    config.validate()
    run = RunFolder(config.out_dir)
    resuming = run.create(config, resume=config.resume)
    seed_everything(config.seed)
    device = select_device(config.device)
    step = 0
    try:
        # 2. The frozen generator, its W statistics, and the evaluator.
        G = load_generator(config.generator, device=device).requires_grad_(False)
        w_avg, w_std = w_statistics(G, config.w_avg_samples, torch.Generator(device).manual_seed(config.seed))
        w_var = w_std**2 / G.w_dim  # per-dimension variance of W
        perceptual = None
        if config.evaluator not in (None, "", "none") and config.feature_weight > 0:
            perceptual = EvaluatorPerceptualLoss(Evaluator.from_pretrained(config.evaluator, device=device))
        print(f"encoder for {config.generator}: {G.img_resolution} px, num_ws {G.num_ws}, w_dim {G.w_dim}, "
              f"on {device}", flush=True)

        # 3. Encoder and optimiser.
        encoder = StyleGANEncoder(G.num_ws, G.w_dim, G.img_resolution, G.img_channels,
                                  input_resolution=config.input_resolution, channel_base=config.channel_base,
                                  channel_max=config.channel_max).to(device)
        if config.init_from and not resuming:
            # weights only: optimiser, step and RNG start fresh; w_avg is the new generator's
            source = load_encoder(config.init_from)
            try:
                encoder.load_state_dict(source.state_dict())
            except RuntimeError as exc:
                raise ValueError(f"init_from {config.init_from} does not fit this encoder config: {exc}") from exc
            print(f"initialised from {config.init_from}", flush=True)
        encoder.w_avg.copy_(w_avg)
        opt = torch.optim.Adam(encoder.parameters(), lr=config.lr)
        gen = torch.Generator(device).manual_seed(config.seed + 1)
        eval_gen = torch.Generator(device).manual_seed(config.seed + 2)
        eval_w = sample_training_latents(G, config.eval_images, w_avg, truncation_min=config.truncation_min,
                                         style_mixing=config.style_mixing, generator=eval_gen)
        with torch.no_grad():
            eval_targets = synthesize(G, eval_w)
        pool_w = pool_images = None
        if config.pool_size > 0:  # rendered from its own seed, so a resumed run gets the same pool
            pool_gen = torch.Generator(device).manual_seed(config.seed + 3)
            parts = []
            for start in range(0, config.pool_size, 64):
                n = min(64, config.pool_size - start)
                w = sample_training_latents(G, n, w_avg, truncation_min=config.truncation_min,
                                            style_mixing=config.style_mixing, generator=pool_gen)
                with torch.no_grad():
                    parts.append((w, G.synthesis(w, noise_mode="random", generator=pool_gen)))
            pool_w = torch.cat([p[0] for p in parts])
            pool_images = torch.cat([p[1] for p in parts])
            print(f"rendered a pool of {config.pool_size} training images", flush=True)
        real = None
        if config.real_images > 0:  # world renders the generator never produced: image losses only
            from pipelines.data.bank import render_bank
            bank = render_bank(config.real_images, size=G.img_resolution, seed=config.real_seed, split="train",
                               cache=Path(config.out_dir) / "real_bank.npz")
            real = bank.images.to(device)
            print(f"{len(real)} portrait-world renders join the training (every {config.real_every} steps)", flush=True)
        n_params = sum(p.numel() for p in encoder.parameters())
        print(f"encoder: {n_params / 1e6:.2f} M parameters, input {encoder.input_resolution} px", flush=True)

        # 4. Resume.
        train_seconds = 0.0
        if resuming:
            ckpt = run.load_checkpoint()
            encoder.load_state_dict(ckpt["encoder"])
            opt.load_state_dict(ckpt["optimizer"])
            gen.set_state(ckpt["batch_rng"])
            restore_rng_state(ckpt["rng"])
            step = int(ckpt["step"])
            train_seconds = float(ckpt.get("train_seconds", 0.0))
            run.truncate_metrics(step)
            print(f"resumed from step {step}", flush=True)

        def checkpoint() -> None:
            run.save_checkpoint(step, {"step": step, "encoder": encoder.state_dict(), "optimizer": opt.state_dict(),
                                       "batch_rng": gen.get_state(), "rng": capture_rng_state(),
                                       "train_seconds": train_seconds, "config": config_to_dict(config)},
                                keep=config.keep_checkpoints)

        # 5. The loop.
        run.set_status("running", step=step, total=config.steps)
        encoder.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        t_log, step_log, t_start = time.time(), step, time.time()
        last_checkpoint = step if resuming else -1
        time_up = False
        while step < config.steps and not time_up:
            # 5a. Targets: the generator's own images of varied latents (random noise, for robustness).
            use_real = real is not None and step % config.real_every == config.real_every - 1
            if use_real:
                idx = torch.randint(0, real.shape[0], [config.batch], generator=gen, device=device)
                w_true, targets = None, real[idx].float().div(127.5).sub(1.0)
            elif pool_w is not None:
                idx = torch.randint(0, pool_w.shape[0], [config.batch], generator=gen, device=device)
                w_true, targets = pool_w[idx], pool_images[idx]
            else:
                with torch.no_grad():
                    w_true = sample_training_latents(G, config.batch, w_avg, truncation_min=config.truncation_min,
                                                     style_mixing=config.style_mixing, generator=gen)
                    targets = G.synthesis(w_true, noise_mode="random", generator=gen)
            num_offsets = step // config.progressive_every if config.progressive_every > 0 else None
            image_terms = use_real or (config.image_loss_every > 0 and step % config.image_loss_every == 0)

            # 5b. Loss and update.
            terms = _losses(encoder, G, targets, w_true, perceptual, config, w_var, w_std, num_offsets, image_terms)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            step += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
                counts[k] = counts.get(k, 0) + 1

            # 6. Metrics, samples, checkpoints.
            if config.max_train_minutes is not None:
                time_up = time.time() - t_start >= config.max_train_minutes * 60
            last = step == config.steps or time_up
            if step % config.log_every == 0 or last:
                elapsed = time.time() - t_log
                train_seconds += elapsed
                row = {k: sums[k] / counts[k] for k in sums}
                row.update(images_per_s=(step - step_log) * config.batch / max(elapsed, 1e-9),
                           train_seconds=train_seconds, num_offsets=float(num_offsets if num_offsets is not None
                                                                          else G.num_ws - 1))
                run.log_metrics(step, **row)
                run.set_status("running", step=step, total=config.steps)
                print(f"step {step}/{config.steps} loss {row['loss']:.4f} latent {row['latent']:.4f} "
                      f"({row['images_per_s']:.1f} img/s)", flush=True)
                sums, counts = {}, {}
                t_log, step_log = time.time(), step
            preview = None
            if step % config.sample_every == 0 or last:
                encoder.eval()
                preview = _sample_grid(encoder, G, eval_targets[:config.num_samples])
                encoder.train()
                preview.save(run.sample_path(step))
            if step % config.checkpoint_every == 0 or last:
                checkpoint()
                last_checkpoint = step
            if progress is not None:
                progress(step, config.steps, preview)
        if last_checkpoint != step:
            checkpoint()

        # 7. Held-out figures: reconstruction and latent error on fresh generator images, speed.
        encoder.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            w_hat = torch.cat([encoder(x) for x in eval_targets.split(64)])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            encode_seconds = (time.perf_counter() - t0) / len(eval_targets)
            recon = torch.cat([synthesize(G, w) for w in w_hat.split(64)])
            figures = {
                "heldout_reconstruction_mse": float(reconstruction_error(recon, eval_targets).mean()),
                "heldout_latent_error": float((w_hat - eval_w).square().mean() / w_var),
                "encoder_ms_per_image": 1000 * encode_seconds,
                "steps": step, "train_seconds": round(train_seconds, 1),
            }
        run.log_metrics(step, **{k: float(v) for k, v in figures.items()})
        print("held-out:", {k: round(float(v), 5) for k, v in figures.items()}, flush=True)

        # 8. Export with a card.
        targets_out = [run.path / "encoder"] + ([Path(config.export_to)] if config.export_to else [])
        command = "python -m pipelines.training.train_stylegan_encoder " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        from pipelines.cards import write_card

        for folder in targets_out:
            # the run keeps float32; the exported copy (assets) is stored in float16
            save_encoder(encoder, folder, generator_source=config.generator, fp16=folder != run.path / "encoder")
            write_card(folder, title="e4e encoder into W+", task="StyleGAN2 inversion (image -> w+)",
                       architecture=f"e4e-style residual CNN + feature pyramid, {n_params / 1e6:.2f}M parameters, "
                                    f"{encoder.input_resolution} px input, {G.num_ws} x {G.w_dim} output",
                       source=f"training run {config.out_dir} on generator {config.generator}",
                       command=command, config=config_to_dict(config), figures=figures,
                       notes="Trained on the generator's own images (Tov et al. 2021); figures are measured on "
                             "held-out generator images. Use it only with the generator it was trained for.")
        run.set_status("finished", step=step, total=config.steps, figures=figures)
        return targets_out[-1]
    except BaseException as exc:
        run.set_status("failed", step=step, total=config.steps, error=f"{type(exc).__name__}: {exc}")
        raise


def main(argv: list[str] | None = None) -> Path:
    return train(parse_config(EncoderTrainConfig, argv))


if __name__ == "__main__":
    main()
