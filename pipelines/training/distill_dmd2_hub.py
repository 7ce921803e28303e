"""Distil a hub Stable Diffusion 1.5 / SDXL teacher into a one- (or few-) step LoRA student with DMD2.

Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2), as
:mod:`pipelines.training.distill_dmd2` does it for the embedded teacher, and with its maths
(``distribution_matching_loss``, ``GANHead``, ``bottleneck_features``, ``backward_simulation``,
``add_noise``, ``predict_x0``, ``denoising_target``, ``lcm_timesteps``). What differs:

- the **teacher** is a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` folder
  (or a hub id from the local cache, :func:`pipelines.hub_models.resolve_source`); prompts come from
  a text file, one per line, encoded once with the pipeline's own ``encode_prompt``. SDXL's UNet
  also takes pooled text embeddings and size/crop ids (``added_cond_kwargs``): :class:`ConditionedUNet`
  adapts both UNets to the ``unet(x_t, t, encoder_hidden_states=cond)`` call the DMD2 functions make;
- the **student** is the frozen teacher UNet plus a LoRA adapter (peft) on the attention projections
  (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), zero-initialised, so it starts as the teacher;
- the **fake score** is another copy of the teacher UNet with its own LoRA (``fake_lora_rank``), or a
  fully trained copy with ``--fake_lora_rank 0``. LoRA by default: DMD2's SDXL recipe trains the whole
  fake UNet, but that costs fp32 weights + two Adam moments of 2.6 B parameters (~42 GB per GPU)
  on top of the three UNets; a LoRA fake score fits one 80 GB GPU and is the common choice there.
  A full copy follows the student more closely (the fake score must track a moving distribution);
- the **GAN** (DMD2 Sec. 4.3) needs real images: a folder given as ``real_images`` (each image may
  have a same-named ``.txt`` caption; without one it is paired with the empty prompt). Without real
  images ``gan_weight`` must be 0;
- the loop runs under ``accelerate.Accelerator``: the same script runs with ``python -m`` on one
  device (CPU included) and with ``accelerate launch --num_processes N -m ...`` on N GPUs (data
  parallel; each process draws its own prompts and noise; ``batch`` is per process).

Export: the student's LoRA as ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format, with a
card; ``pipelines.hub_models.load_text_to_image(teacher, lora_weights=file)`` loads it (the
"lcm-lora" family: the teacher's noise schedule in an ``LCMScheduler``), which samples the 1-step
student at t = 999 (``num_inference_steps=1, guidance_scale=1``)::

    python -m pipelines.training.distill_dmd2_hub --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts_file prompts.txt --out_dir runs/dmd2_sd15
    accelerate launch --num_processes 8 -m pipelines.training.distill_dmd2_hub \\
        --teacher stabilityai/stable-diffusion-xl-base-1.0 --prompts_file prompts.txt \\
        --real_images photos/ --gan_weight 5e-3 --guidance_scale 8 --student_timesteps 999,749,499,249

Reads top to bottom: config -> accelerator, run folder -> teacher, prompts, real images -> networks
-> resume -> loop -> checkpoint -> export (LoRA + card + a check that it samples). ``--resume true``
continues a run; SIGTERM writes a checkpoint and stops.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.hub_models import LORA_FILE, resolve_source
from pipelines.training.distill_dmd2 import (GANHead, add_noise, backward_simulation, bottleneck_features,
                                             denoising_target, distribution_matching_loss, lcm_timesteps,
                                             score_x0)
from pipelines.training.runs import (RunFolder, RunningMeans, StopFlag, capture_rng_state, check_fields,
                                     config_to_dict, parse_config, restore_rng_state, seed_everything)

__all__ = ["HubDMD2Config", "TeacherInfo", "teacher_info", "read_prompts", "TextConditioning", "ConditionedUNet",
           "encode_prompts", "load_real_images", "lora_config", "save_lora", "train", "main"]

SD_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]        # attention projections of every transformer block
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class HubDMD2Config:
    """DMD2 distillation of a Stable Diffusion 1.5 / SDXL teacher into a LoRA student (Yin et al. 2024)."""

    teacher: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD / SDXL pipeline folder or cached hub id
    prompts_file: str = "prompts.txt"         # text file, one prompt per line (blank lines skipped)
    real_images: str = ""                     # folder of images (+ optional same-name .txt captions) for the
                                              # GAN loss; "" = none (then gan_weight must be 0)
    out_dir: str = "runs/dmd2_hub"
    resume: bool = False                      # continue from the latest checkpoint in out_dir
    mixed_precision: str = "auto"             # "auto" (bf16 on CUDA, none on CPU), "bf16", "fp16", "no"
    seed: int = 0                             # each process draws with seed + its index

    # the student
    resolution: int = 0                       # image side in px; 0 = the teacher's (UNet sample_size x VAE factor)
    student_timesteps: tuple[int, ...] = (999,)  # one step; DMD2 SDXL 4-step: 999,749,499,249 (backward simulation)
    lora_rank: int = 64                       # student LoRA rank (alpha = rank: scale 1)
    fake_lora_rank: int = 64                  # fake-score LoRA rank; 0 = a fully trained UNet copy (DMD2 SDXL)

    # optimisation: AdamW, constant learning rates (DMD2's released code: betas (0.9, 0.999), weight decay
    # 0.01, max grad norm 10); LoRA adapters take a larger rate than DMD2's full-UNet 5e-7..1e-5
    steps: int = 2000                         # generator updates
    batch: int = 4                            # prompts per process per update
    lr: float = 1e-4                          # student LoRA
    lr_fake: float = 1e-4                     # fake score (LoRA or full) and GAN head
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 10.0                   # max global grad norm of each update
    fake_updates: int = 5                     # fake-score updates per generator update (TTUR, Sec. 4.2)

    # distribution matching
    guidance_scale: float = 1.75              # CFG of the real score (DMD2: 1.75 SD 1.5, 8 SDXL)
    min_t: float = 0.02                       # DM timesteps t ~ U[min_t, max_t] * num_train_timesteps
    max_t: float = 0.98

    # GAN on the fake score's bottleneck (Sec. 4.3); needs real_images
    gan_weight: float = 0.0                   # generator GAN loss weight (DMD2: 1e-3 SD 1.5, 5e-3 SDXL); 0 = none
    gan_d_weight: float = 1e-2                # discriminator loss weight, added to the fake-score loss (DMD2: 1e-2)
    gan_head_channels: int = 256              # width of the classification head
    gan_max_t: float = 1.0                    # GAN inputs noised at t ~ U[0, gan_max_t * T) (diffusion GAN)

    # length, logging, checkpoints, export
    max_train_minutes: Optional[float] = None  # stop early (checkpoint + export) after this much loop time
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_samples: int = 4                      # prompts sampled from the exported LoRA as a check (0 = no check)
    export_to: Optional[str] = None           # also write the LoRA weights (with a card) into this folder

    def validate(self) -> None:
        """Refuse bad values before any work (no folder is created, no weights are loaded)."""
        check_fields(self, positive_ints=("steps", "batch", "fake_updates", "log_every", "checkpoint_every",
                                          "keep_checkpoints", "lora_rank", "gan_head_channels"),
                     nonneg_ints=("fake_lora_rank", "num_samples", "resolution"),
                     positive=("lr", "lr_fake", "grad_clip"),
                     nonneg=("gan_weight", "gan_d_weight", "weight_decay", "guidance_scale"))
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError(f"adam betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if not 0 <= self.min_t < self.max_t <= 1:
            raise ValueError(f"need 0 <= min_t < max_t <= 1, got min_t {self.min_t}, max_t {self.max_t}")
        if not 0 < self.gan_max_t <= 1:
            raise ValueError(f"gan_max_t must be in (0, 1], got {self.gan_max_t}")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise ValueError(f"mixed_precision must be auto, bf16, fp16 or no, got {self.mixed_precision!r}")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be positive, got {self.max_train_minutes}")

        # data
        read_prompts(self.prompts_file)
        if self.real_images:
            if not real_image_files(self.real_images):
                raise ValueError(f"real_images {self.real_images!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                                 "give a folder of photos for the GAN loss, or --real_images '' --gan_weight 0")
        elif self.gan_weight > 0:
            raise ValueError(f"gan_weight {self.gan_weight} needs real images for the GAN's discriminator: pass "
                             "--real_images FOLDER (images, optionally with same-name .txt captions), or "
                             "--gan_weight 0 for distribution matching alone")

        # the teacher and the student's timesteps
        info = teacher_info(self.teacher)
        ts = list(self.student_timesteps)
        if not ts:
            raise ValueError("student_timesteps is empty; give at least one timestep, e.g. 999")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ts):
            raise ValueError(f"student_timesteps must be integers, got {ts}")
        if any(not 0 <= t < info.num_train_timesteps for t in ts):
            raise ValueError(f"student_timesteps must lie in [0, {info.num_train_timesteps}) (the teacher's "
                             f"num_train_timesteps), got {ts}")
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"student_timesteps must be strictly decreasing, got {ts}")
        if info.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"teacher prediction_type {info.prediction_type!r} is not supported "
                             "(epsilon or v_prediction)")
        if self.resolution and self.resolution % info.size_multiple:
            raise ValueError(f"resolution must be a multiple of {info.size_multiple} for this teacher (VAE factor x "
                             f"UNet downsampling), got {self.resolution}")


# ---------------------------------------------------------------------------------------------
# The teacher and the data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherInfo:
    """What the teacher folder's config files say, read without loading any weights."""

    folder: Path
    sdxl: bool                      # StableDiffusionXLPipeline (pooled text + size ids) or StableDiffusionPipeline
    num_train_timesteps: int
    prediction_type: str            # "epsilon" (SD 1.5, SDXL) or "v_prediction" (SD 2.x 768)
    image_size: int                 # UNet sample_size x VAE factor (512 SD 1.5, 1024 SDXL)
    size_multiple: int              # image sides must be multiples of this
    original_inference_steps: int   # the LCMScheduler grid the exported LoRA is sampled on (diffusers' default 50)


def _json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is missing or not JSON ({exc}); the teacher must be a complete diffusers "
                         "StableDiffusionPipeline / StableDiffusionXLPipeline folder") from exc


def teacher_info(teacher: str | os.PathLike[str]) -> TeacherInfo:
    """Check that ``teacher`` is an SD / SDXL pipeline folder (or cached hub id) and read its configs.

    Offline, an uncached hub id fails at once (:func:`pipelines.hub_models.resolve_source`).
    """
    folder = resolve_source(teacher)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"teacher {str(teacher)!r} is not a diffusers pipeline folder (no model_index.json); give "
                         "a Stable Diffusion 1.5 or SDXL folder or hub id (e.g. stable-diffusion-v1-5/"
                         "stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0)")
    name = _json(index_file).get("_class_name")
    if name not in SD_CLASSES:
        hint = (" (the embedded teacher: use python -m pipelines.training.distill_dmd2)"
                if name == "PortraitDiffusionPipeline" else "")
        raise ValueError(f"teacher {str(teacher)!r} holds a {name!r}, not a StableDiffusionPipeline or "
                         f"StableDiffusionXLPipeline{hint}; give a base SD 1.5 / SDXL folder or hub id")
    unet = _json(folder / "unet" / "config.json")
    vae = _json(folder / "vae" / "config.json")
    sched = _json(folder / "scheduler" / "scheduler_config.json")
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    sample_size = unet.get("sample_size", 64)
    sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
    return TeacherInfo(folder=folder, sdxl=name == "StableDiffusionXLPipeline",
                       num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
                       prediction_type=sched.get("prediction_type", "epsilon"),
                       image_size=sample_size * vae_factor,
                       size_multiple=vae_factor * 2 ** (len(unet["block_out_channels"]) - 1),
                       original_inference_steps=int(sched.get("original_inference_steps", 50)))


def read_prompts(file: str | os.PathLike[str]) -> list[str]:
    """The prompts of a text file, one per line, blank lines skipped; refuses a missing or empty file."""
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"prompts_file {str(file)!r} does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts_file {str(file)!r} holds no prompts; write one prompt per line")
    return prompts


def real_image_files(folder: str | os.PathLike[str]) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"real_images {str(folder)!r} is not a folder; give a folder of images or --real_images ''")
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class TextConditioning:
    """What a SD / SDXL UNet is conditioned on, batched; SD 1.5 uses ``states`` only."""

    states: torch.Tensor                       # [B, L, D] encoder_hidden_states
    pooled: Optional[torch.Tensor] = None      # [B, P] SDXL pooled text embeddings ("text_embeds")
    time_ids: Optional[torch.Tensor] = None    # [B, 6] SDXL (original h, w, crop top, left, target h, w)

    def _map(self, fn) -> "TextConditioning":
        return TextConditioning(fn(self.states), None if self.pooled is None else fn(self.pooled),
                                None if self.time_ids is None else fn(self.time_ids))

    def __len__(self) -> int:
        return self.states.shape[0]

    def __getitem__(self, index: torch.Tensor) -> "TextConditioning":
        return self._map(lambda x: x[index])

    def to(self, device: torch.device) -> "TextConditioning":
        return self._map(lambda x: x.to(device, non_blocking=True))

    def repeat(self, b: int) -> "TextConditioning":
        """A one-row conditioning repeated to ``b`` rows."""
        return self._map(lambda x: x.expand(b, *x.shape[1:]))

    @staticmethod
    def cat(parts: list["TextConditioning"]) -> "TextConditioning":
        first = parts[0]
        return TextConditioning(torch.cat([p.states for p in parts]),
                                None if first.pooled is None else torch.cat([p.pooled for p in parts]),
                                None if first.time_ids is None else torch.cat([p.time_ids for p in parts]))


class ConditionedUNet(nn.Module):
    """A diffusers ``UNet2DConditionModel`` called as ``unet(x_t, t, encoder_hidden_states=cond)`` with
    a :class:`TextConditioning`, the call :mod:`pipelines.training.distill_dmd2`'s functions make; SDXL's
    pooled text and size ids go into ``added_cond_kwargs``. ``mid_block`` is the UNet's (for
    :func:`bottleneck_features`)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @property
    def mid_block(self) -> nn.Module:
        return self.unet.mid_block

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: TextConditioning):
        cond = encoder_hidden_states
        added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=cond.states, added_cond_kwargs=added)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], *, resolution: int, device: torch.device,
                   chunk: int = 32) -> tuple[TextConditioning, TextConditioning]:
    """Every prompt's conditioning and the unconditional one (the real score's CFG branch), on the CPU,
    through the pipeline's own ``encode_prompt`` (SDXL: both text encoders, zeros for the empty
    prompt if the pipeline says so). SDXL size ids: an uncropped ``resolution``-px image."""
    sdxl = hasattr(pipe, "text_encoder_2")
    parts = []
    for i in range(0, len(prompts), chunk):
        out = pipe.encode_prompt(prompt=prompts[i:i + chunk], device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        parts.append(TextConditioning(out[0].float().cpu(), out[2].float().cpu() if sdxl else None))
    out = pipe.encode_prompt(prompt=[prompts[0]], device=device, num_images_per_prompt=1,
                             do_classifier_free_guidance=True, negative_prompt=None)
    uncond = TextConditioning(out[1].float().cpu(), out[3].float().cpu() if sdxl else None)
    cond = TextConditioning.cat(parts)
    if sdxl:
        ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        cond.time_ids, uncond.time_ids = ids.expand(len(cond), 6).clone(), ids
    return cond, uncond


@torch.no_grad()
def load_real_images(pipe, folder: str | os.PathLike[str], *, resolution: int, device: torch.device,
                     chunk: int = 8) -> tuple[torch.Tensor, list[str]]:
    """The GAN's real latents [N, C, h, w] (on the CPU, scaled as the UNet sees them: resized to
    ``resolution`` on the short side, centre-cropped, encoded by the teacher's VAE, its mode) and their
    captions (a same-named ``.txt`` file, else the empty prompt)."""
    from PIL import Image
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    files = real_image_files(folder)
    vae = pipe.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents, captions = [], []
    for i in range(0, len(files), chunk):
        pixels = []
        for file in files[i:i + chunk]:
            image = pil_to_tensor(Image.open(file).convert("RGB"))                  # [3, H, W] uint8
            image = center_crop(resize(image, resolution, antialias=True), [resolution, resolution])
            pixels.append(image.float() / 127.5 - 1)
            caption = file.with_suffix(".txt")
            captions.append(caption.read_text(encoding="utf-8").strip() if caption.is_file() else "")
        x = torch.stack(pixels).to(device, vae.dtype)                                # [b, 3, res, res]
        z = vae.encode(x).latent_dist.mode().float()
        latents.append(((z - shift) * scale).cpu())
    return torch.cat(latents), captions


# ---------------------------------------------------------------------------------------------
# Networks and export
# ---------------------------------------------------------------------------------------------


def lora_config(rank: int):
    """A LoRA on the attention projections; B = 0 at start (the adapted UNet is the teacher), alpha = rank."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


def trainable_state(module: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The trained parameters of ``module`` (``names``), on the CPU, for a checkpoint."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if n in names}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"the checkpoint's {what} does not fit this run ({len(unexpected)} unexpected keys, e.g. "
                         f"{unexpected[:2]}); start a new run folder instead")


def save_lora(unet: nn.Module, folder: Path, *, sdxl: bool) -> Path:
    """The UNet's LoRA in diffusers' format (``folder / LORA_FILE``), loadable with ``load_lora_weights``."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    cls.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                          unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return folder / LORA_FILE


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(cfg: HubDMD2Config) -> Path:
    """Run (or resume) a DMD2 distillation of an SD / SDXL teacher; returns the exported LoRA file."""
    import diffusers
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    # 1. Config, accelerator, run folder (the main process writes it), seeds.
    cfg.validate()
    info = teacher_info(cfg.teacher)
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=precision)
    device, main = accelerator.device, accelerator.is_main_process
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)  # frozen weights
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run = RunFolder(cfg.out_dir)
    if main:
        run.create(cfg, resume=cfg.resume)
    accelerator.wait_for_everyone()
    resumed = cfg.resume and run.latest_checkpoint() is not None
    seed_everything(cfg.seed + accelerator.process_index)
    resolution = cfg.resolution or info.image_size
    n_student = len(cfg.student_timesteps)

    stopper = StopFlag()
    stopper.install()
    step = 0
    try:
        # 2. The teacher: frozen real score, noise schedule; prompts and real images encoded once.
        t_start = time.perf_counter()
        cls = diffusers.StableDiffusionXLPipeline if info.sdxl else diffusers.StableDiffusionPipeline
        extra = {} if info.sdxl else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        # frozen weights in the dtype they run in; the VAE (used once) in fp32: SDXL's overflows in fp16
        vae = diffusers.AutoencoderKL.from_pretrained(info.folder, subfolder="vae", dtype=torch.float32)
        pipe = cls.from_pretrained(info.folder, vae=vae, dtype=weight_dtype, **extra)
        for name in ("text_encoder", "text_encoder_2", "vae"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device).requires_grad_(False)
        prompts = read_prompts(cfg.prompts_file)
        cond_bank, uncond = encode_prompts(pipe, prompts, resolution=resolution, device=device)
        use_gan = bool(cfg.real_images) and cfg.gan_weight > 0
        if use_gan:
            real_latents, real_captions = load_real_images(pipe, cfg.real_images, resolution=resolution,
                                                           device=device)                    # [N, C, h, w]
            real_cond, _ = encode_prompts(pipe, real_captions, resolution=resolution, device=device)
        uncond = uncond.to(device)
        scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
        alphas_cumprod = scheduler.alphas_cumprod.to(device, torch.float32)                 # [T]
        num_train = alphas_cumprod.shape[0]
        prediction_type = info.prediction_type
        student_t = torch.tensor(cfg.student_timesteps, device=device, dtype=torch.long)    # [n]
        real_unet = pipe.unet.requires_grad_(False).eval()
        latent_channels = real_unet.config.in_channels
        latent_size = resolution // pipe.vae_scale_factor
        for name in ("text_encoder", "text_encoder_2", "vae"):                              # not needed any more
            setattr(pipe, name, None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if main:
            print(f"teacher {cfg.teacher}: {'SDXL' if info.sdxl else 'SD'}, {prediction_type}, {num_train} "
                  f"timesteps, {resolution} px ({latent_channels}x{latent_size}x{latent_size} latents); "
                  f"{len(prompts)} prompts" + (f", {len(real_latents)} real images" if use_gan else "")
                  + f" in {time.perf_counter() - t_start:.1f}s", flush=True)

        # 3. Networks: student = teacher + LoRA; fake score = teacher + LoRA (or a full copy); GAN head.
        real_unet.to(device)
        student_unet = copy.deepcopy(real_unet)
        student_unet.add_adapter(lora_config(cfg.lora_rank))
        fake_unet = copy.deepcopy(real_unet)
        if cfg.fake_lora_rank:
            fake_unet.add_adapter(lora_config(cfg.fake_lora_rank))
        else:
            fake_unet.requires_grad_(True)              # cast to fp32 below, as the LoRA weights are
        for unet in (student_unet, fake_unet):
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()                          # trained weights in fp32, frozen in weight_dtype
            unet.train()
        student_names = {n for n, p in student_unet.named_parameters() if p.requires_grad}
        fake_names = {n for n, p in fake_unet.named_parameters() if p.requires_grad}
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        student_params = [p for p in student_unet.parameters() if p.requires_grad]
        opt_generator = torch.optim.AdamW(student_params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
        head = GANHead(real_unet.config.block_out_channels[-1], cfg.gan_head_channels) if use_gan else None
        fake_params = [p for p in fake_unet.parameters() if p.requires_grad]
        head_params = list(head.parameters()) if use_gan else []
        opt_fake = torch.optim.AdamW(fake_params + head_params, lr=cfg.lr_fake, betas=betas,
                                     weight_decay=cfg.weight_decay)
        generator, fake, opt_generator, opt_fake = accelerator.prepare(
            ConditionedUNet(student_unet), ConditionedUNet(fake_unet), opt_generator, opt_fake)
        if use_gan:
            head = accelerator.prepare(head)
        # The prepared (data-parallel) modules are called where their weights get gradients; where they
        # are frozen (the generator step's fake score and head) the plain modules are, without a sync.
        fake_plain = accelerator.unwrap_model(fake)
        head_plain = accelerator.unwrap_model(head) if use_gan else None
        real = ConditionedUNet(real_unet)
        n_trained = sum(p.numel() for p in student_params)
        if main:
            print(f"student LoRA rank {cfg.lora_rank}: {n_trained / 1e6:.2f}M trained parameters; fake score "
                  + (f"LoRA rank {cfg.fake_lora_rank}" if cfg.fake_lora_rank else "full copy")
                  + f" ({sum(p.numel() for p in fake_params) / 1e6:.2f}M); {n_student} step(s) at "
                  f"{list(cfg.student_timesteps)}; {accelerator.num_processes} process(es) on {device.type}, "
                  f"mixed precision {precision}", flush=True)

        # 4. Resume: trained weights, optimisers, step counters and every process's RNG state.
        fake_updates_total = 0
        train_seconds = 0.0
        if resumed:
            ckpt = run.load_checkpoint()
            load_trainable_state(student_unet, ckpt["student"], "student")
            load_trainable_state(fake_unet, ckpt["fake_score"], "fake score")
            if use_gan:
                head_plain.load_state_dict(ckpt["gan_head"])
            opt_generator.load_state_dict(ckpt["opt_generator"])
            opt_fake.load_state_dict(ckpt["opt_fake"])
            step = int(ckpt["step"])
            fake_updates_total = int(ckpt["fake_updates_total"])
            train_seconds = float(ckpt.get("train_seconds", 0.0))
            states = ckpt["rng"]
            if len(states) == accelerator.num_processes:
                restore_rng_state(states[accelerator.process_index])
            else:   # another process count: a fresh stream per process (not bit-exact)
                seed_everything(cfg.seed + accelerator.process_index + 7919 * step)
            if main:
                run.truncate_metrics(step)
                print(f"resumed {run.path} at step {step}", flush=True)
        last_checkpoint = step if resumed else -1

        def checkpoint() -> None:
            nonlocal last_checkpoint
            last_checkpoint = step
            rng = gather_object([capture_rng_state()])          # one entry per process, in process order
            if main:
                run.save_checkpoint(step, {
                    "step": step, "fake_updates_total": fake_updates_total, "train_seconds": train_seconds,
                    "student": trainable_state(student_unet, student_names),
                    "fake_score": trainable_state(fake_unet, fake_names),
                    "gan_head": head_plain.state_dict() if use_gan else {},
                    "opt_generator": opt_generator.state_dict(), "opt_fake": opt_fake.state_dict(),
                    "rng": rng, "config": config_to_dict(cfg),
                }, keep=cfg.keep_checkpoints)
            accelerator.wait_for_everyone()

        def prompt_batch(b: int) -> TextConditioning:
            return cond_bank[torch.randint(0, len(cond_bank), (b,))].to(device)

        def generate(cond: TextConditioning) -> torch.Tensor:
            """Student x0 [B, C, h, w] at a random student step per sample (backward simulation)."""
            b = len(cond)
            noise = torch.randn(b, latent_channels, latent_size, latent_size, device=device)
            step_index = torch.randint(0, n_student, (b,), device=device)
            return backward_simulation(generator, noise, cond, student_t, step_index, alphas_cumprod,
                                       prediction_type, accelerator.autocast)

        def gan_noise(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Diffusion-GAN inputs: x0 noised at t ~ U[0, gan_max_t * T)."""
            t = torch.randint(0, max(1, int(cfg.gan_max_t * num_train)), (x0.shape[0],), device=device)
            return add_noise(x0, torch.randn_like(x0), alphas_cumprod[t]), t

        def agreed(flag: bool) -> bool:
            """True when any process says so (all processes stop at the same step)."""
            if accelerator.num_processes == 1:
                return flag
            return bool(accelerator.reduce(torch.tensor([float(flag)], device=device), "max").item() > 0)

        # 5. The loop.
        if main:
            run.set_status("running", step=step, total=cfg.steps)
        meter = RunningMeans()                 # means between log rows
        accumulate = meter.add

        b = cfg.batch
        t_loop = t_log = time.time()
        step_log = step
        stop = time_up = False
        while step < cfg.steps and not stop and not time_up:
            # 5a. Fake score (and GAN head): fake_updates updates on fresh student samples (TTUR, Sec. 4.2).
            for _ in range(cfg.fake_updates):
                cond = prompt_batch(b)
                with torch.no_grad():
                    x = generate(cond)                                                     # [B, C, h, w]
                t = torch.randint(0, num_train, (b,), device=device)
                noise = torch.randn_like(x)
                x_t = add_noise(x, noise, alphas_cumprod[t])
                with accelerator.autocast():
                    pred = fake(x_t, t, encoder_hidden_states=cond).sample
                loss_fake = F.mse_loss(pred.float(), denoising_target(x, noise, alphas_cumprod[t], prediction_type))
                loss = loss_fake
                if use_gan:
                    # Discriminator: noised real latents (their own captions) vs noised student latents.
                    idx = torch.randint(0, len(real_latents), (b,))
                    real_x0 = real_latents[idx].to(device)                                 # [B, C, h, w]
                    both, t_gan = gan_noise(torch.cat([x, real_x0]))
                    with accelerator.autocast():
                        features = bottleneck_features(fake_plain, both, t_gan,
                                                       TextConditioning.cat([cond, real_cond[idx].to(device)]))
                    logits = head(features)                                                # [2B]
                    logits_fake, logits_real = logits[:b], logits[b:]
                    loss_gan_d = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
                    loss = loss + cfg.gan_d_weight * loss_gan_d
                    accumulate(loss_gan_d=loss_gan_d, d_real_logit=logits_real.mean(), d_fake_logit=logits_fake.mean())
                opt_fake.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                grad_norm_fake = accelerator.clip_grad_norm_(fake_params + head_params, cfg.grad_clip)
                opt_fake.step()
                fake_updates_total += 1
                accumulate(loss_fake=loss_fake, grad_norm_fake=grad_norm_fake)

            # 5b. Generator: distribution matching (+ GAN) on x = G(z, c); the fake score is frozen here.
            for p in fake_params + head_params:
                p.requires_grad_(False)
            cond = prompt_batch(b)
            x = generate(cond)                                                             # with gradient
            t = torch.randint(int(cfg.min_t * num_train), int(cfg.max_t * num_train) + 1, (b,), device=device)
            t = t.clamp(max=num_train - 1)
            x_t = add_noise(x.detach(), torch.randn_like(x), alphas_cumprod[t])
            x0_real, x0_fake = score_x0(real, fake_plain, x_t, t, cond,
                                        TextConditioning.cat([uncond.repeat(b), cond]),
                                        guidance_scale=cfg.guidance_scale, alpha_bar=alphas_cumprod[t],
                                        prediction_type=prediction_type, autocast=accelerator.autocast)
            loss_dm, dm_grad = distribution_matching_loss(x, x0_real, x0_fake)
            loss = loss_dm
            if use_gan:
                x_gan, t_gan = gan_noise(x)
                with accelerator.autocast():
                    features = bottleneck_features(fake_plain, x_gan, t_gan, cond)
                loss_gan_g = F.softplus(-head_plain(features)).mean()                     # non-saturating G loss
                loss = loss + cfg.gan_weight * loss_gan_g
                accumulate(loss_gan_g=loss_gan_g)
            opt_generator.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm_g = accelerator.clip_grad_norm_(student_params, cfg.grad_clip)
            opt_generator.step()
            for p in fake_params + head_params:
                p.requires_grad_(True)
            step += 1
            accumulate(loss_dm=loss_dm, loss_g=loss, grad_norm_g=grad_norm_g, dm_grad_abs=dm_grad.abs().mean())

            # 6. Metrics (averaged over processes), checkpoints.
            stop = agreed(stopper.stop)
            if cfg.max_train_minutes is not None:
                time_up = agreed(time.time() - t_loop >= cfg.max_train_minutes * 60)
            last = step == cfg.steps or stop or time_up
            if step % cfg.log_every == 0 or last:
                elapsed = time.time() - t_log
                train_seconds += elapsed
                means = accelerator.reduce(meter.pop(), "mean")
                if main:
                    row = {k: float(v) for k, v in means.items()}
                    row.update(fake_updates_total=fake_updates_total, train_seconds=train_seconds,
                               images_per_s=(step - step_log) * b * accelerator.num_processes / max(elapsed, 1e-9))
                    run.log_metrics(step, **row)
                    run.set_status("running", step=step, total=cfg.steps)
                    print(f"step {step}/{cfg.steps} dm {row['loss_dm']:.4f} fake {row['loss_fake']:.4f}"
                          + (f" gan_g {row['loss_gan_g']:.3f}" if "loss_gan_g" in row else "")
                          + (f" gan_d {row['loss_gan_d']:.3f}" if "loss_gan_d" in row else "")
                          + f" | {row['images_per_s']:.2f} img/s", flush=True)
                t_log, step_log = time.time(), step
            if step % cfg.checkpoint_every == 0 or last:
                checkpoint()

        if stop:
            if last_checkpoint != step:
                checkpoint()
            if main:
                run.set_status("stopped", step=step, total=cfg.steps)
                print(f"stopped at step {step}; resume with --resume true", flush=True)
            return run.path / "lora" / LORA_FILE

        # 7. Export (main process): the student's LoRA + card, then load it the studio's way and sample.
        if time_up and main:
            print(f"max_train_minutes ({cfg.max_train_minutes}) reached at step {step}", flush=True)
        if last_checkpoint != step:
            checkpoint()
        targets = [run.path / "lora"] + ([Path(cfg.export_to)] if cfg.export_to else [])
        if main:
            final = run.metrics()[-1] if run.metrics() else {}
            figures = {"steps": step, "fake_updates": fake_updates_total, "student_steps": n_student,
                       "student_timesteps": list(cfg.student_timesteps), "train_seconds": round(train_seconds, 1),
                       "processes": accelerator.num_processes,
                       **{f"final_{k}": round(float(final[k]), 5) for k in ("loss_dm", "loss_fake", "loss_gan_g",
                                                                              "loss_gan_d") if k in final}}
            launcher = ("python -m" if accelerator.num_processes == 1
                        else f"accelerate launch --num_processes {accelerator.num_processes} -m")
            command = (f"{launcher} pipelines.training.distill_dmd2_hub "
                       + " ".join(shlex.quote(a) for a in sys.argv[1:]))
            sample_timesteps = lcm_timesteps(num_train, info.original_inference_steps, n_student)
            for folder in targets:
                save_lora(student_unet, folder, sdxl=info.sdxl)
                write_lora_card(folder, cfg, info, n_trained, resolution, command, figures, sample_timesteps)
            if cfg.num_samples:
                check_export(info.folder, targets[-1] / LORA_FILE, prompts[:cfg.num_samples], n_student,
                             cfg.seed, device, run.path / "samples" / "export.png")
            run.set_status("finished", step=step, total=cfg.steps, figures=figures)
            print(f"saved {targets[-1] / LORA_FILE} after {step} steps "
                  f"({time.perf_counter() - t_start:.0f}s in all)", flush=True)
        accelerator.wait_for_everyone()
        return targets[-1] / LORA_FILE
    except BaseException as exc:
        if main:
            run.set_status("failed", step=step, total=cfg.steps, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stopper.uninstall()


def check_export(teacher: Path, lora_file: Path, prompts: list[str], steps: int, seed: int, device: torch.device,
                 path: Path) -> None:
    """Load the exported LoRA as the studio does (``load_text_to_image``, "lcm-lora") and save a grid of
    its ``steps``-step samples (guidance 1) to ``path``; fails if it does not load or sample."""
    from pipelines.hub_models import load_text_to_image
    from pipelines.images import make_grid

    pipe = load_text_to_image(teacher, lora_weights=lora_file, device=device)
    out = pipe(prompt=prompts, num_inference_steps=min(steps, max(pipe.defaults.allowed_steps)), guidance_scale=1.0,
               generator=torch.Generator().manual_seed(seed))
    make_grid(out.images, columns=int(math.ceil(math.sqrt(len(out.images))))).save(path)
    print(f"exported LoRA loads through load_text_to_image and samples in {steps} step(s): {path}", flush=True)


def write_lora_card(folder: Path, cfg: HubDMD2Config, info: TeacherInfo, n_trained: int, resolution: int,
                    command: str, figures: dict[str, Any], sample_timesteps: list[int]) -> None:
    """The LoRA's card: what it is, how to load and sample it, the run that made it."""
    from pipelines.cards import write_card

    n = len(cfg.student_timesteps)
    kind = "SDXL" if info.sdxl else "Stable Diffusion"
    fake = f"LoRA rank {cfg.fake_lora_rank}" if cfg.fake_lora_rank else "full UNet"
    note_grid = ("" if sample_timesteps == list(cfg.student_timesteps) else
                 f" The studio's LCMScheduler samples {n} steps at {sample_timesteps}, not exactly the trained "
                 f"{list(cfg.student_timesteps)}; for those, call the diffusers pipeline with "
                 f"timesteps={list(cfg.student_timesteps)}.")
    write_card(folder, title=f"{kind} {n}-step DMD2 LoRA of {cfg.teacher}",
               task=f"text-to-image in {n} step(s) at {resolution} px with the teacher {cfg.teacher}",
               architecture=(f"LoRA rank {cfg.lora_rank} (alpha {cfg.lora_rank}) on the teacher UNet's attention "
                             f"projections {LORA_TARGETS}, {n_trained / 1e6:.2f}M parameters; diffusers LoRA format "
                             f"({LORA_FILE})"),
               source=f"DMD2 distillation run {cfg.out_dir} of teacher {cfg.teacher}",
               command=command, config=config_to_dict(cfg), figures=figures,
               notes=(f"Load with pipelines.hub_models.load_text_to_image(teacher, lora_weights=<this folder>/"
                      f"{LORA_FILE}) and sample with num_inference_steps={n}, guidance_scale=1 (the teacher's "
                      f"guidance {cfg.guidance_scale} is distilled in). Yin et al. 2024, DMD2: distribution "
                      f"matching with a fake score ({fake}) "
                      f"updated {cfg.fake_updates}x per generator step"
                      + (f", GAN weight {cfg.gan_weight} on the fake score's bottleneck" if cfg.gan_weight else
                         ", no GAN loss") + ", no regression loss." + note_grid))


def main(argv: list[str] | None = None) -> Path:
    return train(parse_config(HubDMD2Config, argv))


if __name__ == "__main__":
    main()
