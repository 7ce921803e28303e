"""One text-to-image entry point for every model family: the embedded teacher and hub models.

``load_text_to_image(source)`` reads a diffusers folder (or a hub id already in the local cache),
tells its family from ``model_index.json`` and the UNet config, builds it with diffusers' own
pipeline class, and returns something called like :class:`PortraitDiffusionPipeline`: a
keyword-only ``__call__(*, prompt, negative_prompt, num_inference_steps, guidance_scale, generator,
num_images_per_prompt)`` returning :class:`TextToImageOutput`.

Families (``FAMILIES``) and how each is run:

- ``portrait``: the embedded :class:`PortraitDiffusionPipeline` (returned as it is).
- ``sd-turbo`` / ``sdxl-turbo`` (Sauer et al. 2023, ADD): ``StableDiffusion(XL)Pipeline`` whose
  scheduler is Euler / Euler-ancestral with ``timestep_spacing="trailing"``; guidance 0, 1-4 steps.
- ``sana-sprint`` (Chen et al. 2025, sCM + LADD): ``SanaSprintPipeline``; 1-4 steps, embedded
  guidance 4.5; ``intermediate_timesteps`` only for 2 steps (diffusers refuses it otherwise).
- ``dmd2`` (Yin et al. 2024): a DMD2 UNet weights file swapped into a base SDXL UNet, sampled with
  ``LCMScheduler`` at timesteps [399] (1 step) or [999, 749, 499, 249] (4 steps), guidance 0.
- ``lcm-lora`` (Luo et al. 2023): a base SD / SDXL with LCM-LoRA weights (``load_lora_weights``,
  needs ``peft``) and ``LCMScheduler``; 4 steps, guidance 1.

The extra weights of ``dmd2`` / ``lcm-lora`` are given as ``unet_weights=`` / ``lora_weights=`` or
found in the base folder (``*dmd2*.safetensors|bin``, ``pytorch_lora_weights.safetensors``).
Negative prompts on the UNet families follow the embedded pipeline: classifier-free guidance when
``guidance_scale`` > 1, else NASA (:mod:`pipelines.attention`).
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.attention import nasa
from pipelines.device import default_dtype, select_device
from pipelines.text_to_image import TextToImageOutput, check_negative_mode, check_prompt_inputs

__all__ = [
    "FAMILIES",
    "HubTextToImage",
    "ModelNotCachedError",
    "UnsupportedModelError",
    "detect_family",
    "is_lora_folder",
    "load_text_to_image",
    "looks_like_hub_id",
    "lora_teacher",
]

FAMILIES = ("portrait", "sd-turbo", "sdxl-turbo", "sana-sprint", "dmd2", "lcm-lora")
DMD2_TIMESTEPS = {1: [399], 4: [999, 749, 499, 249]}     # DMD2 README, LCMScheduler
LORA_FILE = "pytorch_lora_weights.safetensors"          # diffusers' LoRA file name
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_SD_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
_TURBO_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


class UnsupportedModelError(ValueError):
    """The source is not a model of a supported family (or not a model at all)."""


class ModelNotCachedError(FileNotFoundError):
    """A hub id that is not in the local cache while the hub cannot be reached."""


@dataclass(frozen=True)
class FamilyDefaults:
    steps: int                      # default num_inference_steps
    allowed_steps: tuple[int, ...]  # what the distilled model was trained for
    guidance_scale: float           # default guidance (0 = no CFG for the UNet families)
    negative_prompts: bool          # whether the family takes a negative prompt


DEFAULTS = {
    "sd-turbo": FamilyDefaults(1, (1, 2, 3, 4), 0.0, True),
    "sdxl-turbo": FamilyDefaults(1, (1, 2, 3, 4), 0.0, True),
    "sana-sprint": FamilyDefaults(2, (1, 2, 3, 4), 4.5, False),
    "dmd2": FamilyDefaults(4, (1, 4), 0.0, True),
    "lcm-lora": FamilyDefaults(4, tuple(range(1, 9)), 1.0, True),
}


# -- finding the files ----------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def _not_cached(source: str, reason: str = "offline") -> ModelNotCachedError:
    return ModelNotCachedError(
        f"{source!r} is not in the local cache and the hub is unreachable ({reason}); download it on a "
        "machine with a network (huggingface-cli download " f"{source}) or point to a local folder")


def looks_like_hub_id(text: str | os.PathLike[str]) -> bool:
    """``owner/name``: the form of a hub repository id (whether it exists is not checked)."""
    return bool(_HUB_ID.fullmatch(str(text)))


def is_lora_folder(path: str | os.PathLike[str]) -> bool:
    """A LoRA export of the studio's DMD2 hub script: ``pytorch_lora_weights.safetensors`` and a
    card naming its teacher, without a pipeline of its own."""
    path = Path(path)
    return ((path / LORA_FILE).is_file() and (path / "card.json").is_file()
            and not (path / "model_index.json").exists())


def lora_teacher(folder: str | os.PathLike[str]) -> str:
    """The teacher (folder or hub id) that the card of a LoRA folder names."""
    try:
        teacher = json.loads((Path(folder) / "card.json").read_text())["config"]["teacher"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnsupportedModelError(f"{folder}: its card.json does not name the teacher this LoRA was trained "
                                    f"on ({type(exc).__name__}); load it with load_text_to_image(teacher, "
                                    f"lora_weights={Path(folder) / LORA_FILE})") from None
    return str(teacher)


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """A local folder as it is; a hub id from the local cache (downloaded only when online).

    Never waits on the network when ``HF_HUB_OFFLINE=1``: an uncached id fails at once.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UnsupportedModelError(f"{path} is a file, not a model folder; {_SUPPORTED}")
        return path
    text = str(source)
    if not looks_like_hub_id(text):
        raise FileNotFoundError(f"{text!r}: no such folder, and not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    if _offline():
        raise _not_cached(text)
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(text))
    except OSError as exc:                       # connection errors, timeouts, unknown repos
        raise _not_cached(text, f"{type(exc).__name__}: {exc}") from exc


def _resolve_file(path: str | os.PathLike[str]) -> Path:
    """A local weights file, or ``owner/name/file`` from the hub cache (online: downloaded)."""
    local = Path(path).expanduser()
    if local.is_file():
        return local
    parts = str(path).split("/")
    if len(parts) < 3:
        raise FileNotFoundError(f"{path}: no such file (give a local file or owner/name/filename)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=_offline()))
    except (LocalEntryNotFoundError, OSError) as exc:
        raise _not_cached(str(path)) from exc


def _weights_in(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.suffix in (".safetensors", ".bin"))


def _dmd2_file(folder: Path) -> Path | None:
    found = _weights_in(folder, "*dmd2*")
    return found[0] if found else None


def _lora_file(folder: Path) -> Path | None:
    found = [folder / LORA_FILE] if (folder / LORA_FILE).is_file() else _weights_in(folder, "*lcm*lora*")
    return found[0] if found else None


# -- telling the family ---------------------------------------------------------------------
_SUPPORTED = (f"supported families: {', '.join(FAMILIES)} (a diffusers folder with model_index.json, "
              "or a hub id in the local cache)")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"{file} is not readable JSON ({exc}); {_SUPPORTED}") from exc


def _is_sdxl_unet(folder: Path) -> bool:
    """SDXL UNets add pooled text and size embeddings (``addition_embed_type="text_time"``)."""
    config_file = folder / "unet" / "config.json"
    return config_file.is_file() and _read_json(config_file).get("addition_embed_type") == "text_time"


def detect_family(folder_or_id: str | os.PathLike[str]) -> str:
    """The family of a model folder or cached hub id (one of ``FAMILIES``).

    Raises :class:`UnsupportedModelError` for other models and for folders that hold no model.
    """
    folder = resolve_source(folder_or_id)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        if _dmd2_file(folder) is not None:
            raise UnsupportedModelError(f"{folder} holds DMD2 UNet weights, not a pipeline: load a base SDXL "
                                        f"folder with unet_weights={str(_dmd2_file(folder))!r}")
        if _lora_file(folder) is not None:
            raise UnsupportedModelError(f"{folder} holds LoRA weights, not a pipeline: load a base SD / SDXL "
                                        f"folder with lora_weights={str(_lora_file(folder))!r}")
        config_file = folder / "config.json"
        if config_file.is_file() and "_class_name" in _read_json(config_file):
            name = _read_json(config_file)["_class_name"]
            raise UnsupportedModelError(f"{folder} is a single {name}, not a text-to-image pipeline "
                                        f"folder; {_SUPPORTED}")
        raise UnsupportedModelError(f"{folder} is not a model folder (no model_index.json); {_SUPPORTED}")

    index = _read_json(index_file)
    name = index.get("_class_name")
    if name == "PortraitDiffusionPipeline":
        return "portrait"
    if name == "SanaSprintPipeline":
        return "sana-sprint"
    if name in _SD_CLASSES:
        sdxl = _is_sdxl_unet(folder)
        if _dmd2_file(folder) is not None:
            if not sdxl:
                raise UnsupportedModelError(f"{folder}: DMD2 weights need an SDXL base (this UNet is SD 1/2)")
            return "dmd2"
        if _lora_file(folder) is not None:
            return "lcm-lora"
        scheduler = (index.get("scheduler") or [None, None])[1]
        config_file = folder / "scheduler" / "scheduler_config.json"
        spacing = _read_json(config_file).get("timestep_spacing") if config_file.is_file() else None
        if scheduler in _TURBO_SCHEDULERS and spacing == "trailing":
            return "sdxl-turbo" if sdxl else "sd-turbo"
        raise UnsupportedModelError(
            f"{folder} is a base {'SDXL' if sdxl else 'Stable Diffusion'} model ({scheduler}, "
            f"timestep_spacing={spacing!r}), not a few-step one: add DMD2 UNet weights (unet_weights=..., SDXL) "
            f"or LCM-LoRA weights (lora_weights=...); {_SUPPORTED}")
    raise UnsupportedModelError(f"{folder} holds a {name!r}, which the studio cannot run; {_SUPPORTED}")


# -- loading ----------------------------------------------------------------------------------
def _load_unet_weights(unet, file: Path) -> None:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)   # never unpickles code
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UnsupportedModelError(f"{file} does not fit this UNet: {len(missing)} missing keys "
                                    f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")


def load_text_to_image(source: str | os.PathLike[str], *, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None, family: str | None = None,
                       unet_weights: str | os.PathLike[str] | None = None,
                       lora_weights: str | os.PathLike[str] | None = None, **kw):
    """Build the text-to-image pipeline of ``source`` (folder or cached hub id).

    ``family`` overrides detection; ``unet_weights`` (DMD2) / ``lora_weights`` (LCM-LoRA) name the
    extra weights and imply their family. Other keywords go to the embedded pipeline's loader.
    Returns :class:`PortraitDiffusionPipeline` for "portrait", else :class:`HubTextToImage`.
    """
    if family is not None and family not in FAMILIES:
        raise UnsupportedModelError(f"unknown family {family!r}; {_SUPPORTED}")
    if lora_weights is None and unet_weights is None and is_lora_folder(source):
        # a studio DMD2 LoRA run: its teacher, as the card names it, with these weights
        return load_text_to_image(lora_teacher(source), device=device, dtype=dtype, family=family,
                                  lora_weights=Path(source) / LORA_FILE, **kw)
    folder = resolve_source(source)
    if family is None:
        family = "dmd2" if unet_weights else "lcm-lora" if lora_weights else detect_family(folder)
    device = select_device(None if device is None else str(device))
    dtype = dtype or default_dtype(device)

    if family == "portrait":
        from pipelines.text_to_image import PortraitDiffusionPipeline

        return PortraitDiffusionPipeline.from_pretrained(folder, device=device, dtype=dtype, **kw)
    if kw:
        raise ValueError(f"unexpected options for {family}: {sorted(kw)}")

    import diffusers

    if family == "sana-sprint":
        pipe = diffusers.SanaSprintPipeline.from_pretrained(folder, dtype=dtype)
    elif family in ("sd-turbo", "sdxl-turbo"):
        cls = diffusers.StableDiffusionXLPipeline if family == "sdxl-turbo" else diffusers.StableDiffusionPipeline
        pipe = _load_sd(cls, folder, dtype)
    elif family == "dmd2":
        if not _is_sdxl_unet(folder):
            raise UnsupportedModelError(f"{folder}: DMD2 needs a base SDXL folder (its UNet is not SDXL)")
        file = _resolve_file(unet_weights) if unet_weights else _dmd2_file(folder)
        if file is None:
            raise FileNotFoundError(f"no DMD2 UNet weights: pass unet_weights= or put *dmd2*.safetensors in {folder}")
        unet = diffusers.UNet2DConditionModel.from_config(
            diffusers.UNet2DConditionModel.load_config(folder / "unet"))
        _load_unet_weights(unet, file)
        if dtype != torch.float32:
            unet.to(dtype)
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, unet=unet, dtype=dtype)
        pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    else:  # lcm-lora
        file = _resolve_file(lora_weights) if lora_weights else _lora_file(folder)
        if file is None:
            raise FileNotFoundError(f"no LCM-LoRA weights: pass lora_weights= or put {LORA_FILE} in {folder}")
        cls = diffusers.StableDiffusionXLPipeline if _is_sdxl_unet(folder) else diffusers.StableDiffusionPipeline
        pipe = _load_sd(cls, folder, dtype)
        try:
            import peft  # noqa: F401
        except ImportError as exc:
            raise ImportError("LCM-LoRA weights load through diffusers' PEFT backend: pip install peft") from exc
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return HubTextToImage(pipe.to(device), family)


def _load_sd(cls, folder: Path, dtype: torch.dtype):
    if cls.__name__ == "StableDiffusionPipeline":           # turbo / LCM models ship no safety checker
        return cls.from_pretrained(folder, dtype=dtype, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return cls.from_pretrained(folder, dtype=dtype)


# -- running ----------------------------------------------------------------------------------
class _StageClock:
    """Times text encoding / denoising / decoding of one diffusers call without editing it.

    Denoising starts at the denoiser's first forward and ends where the VAE decode starts; the
    time before is text encoding (plus latent set-up), the time after is decoding (plus
    post-processing). ``vae.decode`` is wrapped for the call, which also records the latents it
    decodes.
    """

    def __init__(self, denoiser: torch.nn.Module, vae: torch.nn.Module, device: torch.device) -> None:
        self.denoiser, self.vae, self.device = denoiser, vae, device
        self.first_forward: float | None = None
        self.decode_start: float | None = None
        self.decoded: torch.Tensor | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __enter__(self) -> "_StageClock":
        def pre_hook(module, args):
            if self.first_forward is None:
                self.first_forward = self._now()

        original_decode = self.vae.decode

        def decode(z, *args, **kwargs):
            self.decode_start = self._now()
            self.decoded = z
            return original_decode(z, *args, **kwargs)

        self._hook = self.denoiser.register_forward_pre_hook(pre_hook)
        self.vae.decode = decode                           # instance attribute shadows the method
        self.start = self._now()
        return self

    def __exit__(self, *exc) -> None:
        self.end = self._now()
        self._hook.remove()
        del self.vae.decode

    def timings(self) -> dict[str, float]:
        first = self.first_forward if self.first_forward is not None else self.start
        decode = self.decode_start if self.decode_start is not None else self.end
        return {"text_encoding": first - self.start, "denoising": decode - first, "decoding": self.end - decode,
                "total": self.end - self.start}


class HubTextToImage:
    """A diffusers pipeline of a supported family behind the studio's text-to-image ``__call__``."""

    def __init__(self, pipe, family: str) -> None:
        if family not in DEFAULTS:
            raise UnsupportedModelError(f"no hub adapter for {family!r}; one of {sorted(DEFAULTS)}")
        self.pipe = pipe
        self.family = family
        self.defaults = DEFAULTS[family]

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer if self.family == "sana-sprint" else self.pipe.unet

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at."""
        size = self.denoiser.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * self.pipe.vae_scale_factor, w * self.pipe.vae_scale_factor

    def _check(self, prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
               output_type, negative_mode, nasa_scale) -> list[str]:
        prompts = check_prompt_inputs(prompt=prompt, negative_prompt=negative_prompt,
                                      guidance_scale=guidance_scale,
                                      num_images_per_prompt=num_images_per_prompt)
        if negative_prompt is not None and not self.defaults.negative_prompts:
            raise ValueError(f"{self.family} takes no negative prompt (it has no unconditional branch)")
        if num_inference_steps not in self.defaults.allowed_steps or isinstance(num_inference_steps, bool):
            raise ValueError(f"{self.family} runs {list(self.defaults.allowed_steps)} steps, "
                             f"got num_inference_steps={num_inference_steps!r}")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        check_negative_mode(negative_mode, nasa_scale)
        if negative_prompt is not None and negative_mode == "cfg" and guidance_scale <= 1:
            raise ValueError("negative_mode='cfg' needs guidance_scale > 1 (no unconditional branch otherwise); "
                             "use negative_mode='nasa' or 'auto'")
        return prompts

    def _truncated(self, prompts: list[str]) -> list[bool]:
        tokenizer = self.pipe.tokenizer
        limit = 300 if self.family == "sana-sprint" else tokenizer.model_max_length   # Sana's max_sequence_length
        return [len(ids) > limit for ids in tokenizer(prompts)["input_ids"]]

    def _negative_embeds(self, negatives: list[str], n: int) -> torch.Tensor:
        """The negative prompts' UNet context [B, L, D] as the pipeline encodes prompts."""
        embeds = self.pipe.encode_prompt(prompt=negatives, device=self.device, num_images_per_prompt=n,
                                         do_classifier_free_guidance=False)[0]
        return embeds

    @torch.no_grad()
    def __call__(self, *, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", negative_mode: str = "auto",
                 nasa_scale: float = 1.0) -> TextToImageOutput:
        """Generate images; ``None`` steps / guidance take the family's defaults (``DEFAULTS``).

        ``negative_mode`` as in :meth:`PortraitDiffusionPipeline.__call__`: "auto" steers attention
        (NASA) when ``guidance_scale`` <= 1 and uses classifier-free guidance above.
        """
        steps = self.defaults.steps if num_inference_steps is None else num_inference_steps
        guidance = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        prompts = self._check(prompt, negative_prompt, steps, guidance, num_images_per_prompt, output_type,
                              negative_mode, nasa_scale)
        n = num_images_per_prompt

        # 1. Family-specific arguments of the diffusers call.
        call: dict[str, Any] = dict(prompt=prompts, num_images_per_prompt=n, generator=generator,
                                    guidance_scale=guidance, output_type="pt")
        if self.family == "dmd2":
            call["timesteps"] = DMD2_TIMESTEPS[steps]       # the timesteps DMD2 was distilled at
        else:
            call["num_inference_steps"] = steps
        if self.family == "sana-sprint":
            height, width = self.image_size
            # The native size needs no aspect-ratio binning; 1.3 is diffusers' default for 2 steps.
            call.update(height=height, width=width, intermediate_timesteps=1.3 if steps == 2 else None,
                        use_resolution_binning=False)

        # 2. Negative prompt: into CFG, or into the cross-attention (NASA) when there is no CFG.
        steering = nullcontext()
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if negative_mode == "nasa" or (negative_mode == "auto" and guidance <= 1):
                negative_embeds = self._negative_embeds(negatives, n)
                if guidance > 1:                          # diffusers batches [uncond, cond]
                    negative_embeds = torch.cat([negative_embeds, negative_embeds])
                steering = nasa(self.pipe.unet, negative_embeds, nasa_scale)
            else:
                call["negative_prompt"] = negatives

        # 3. Run the pipeline, timing its stages.
        with steering, _StageClock(self.denoiser, self.pipe.vae, self.device) as clock:
            images = self.pipe(**call).images                              # [B, 3, H, W] in [0, 1]
        pixels = images.float() * 2 - 1
        if output_type == "pil":
            from pipelines.images import tensor_to_pil

            out_images: Any = tensor_to_pil(pixels)
        else:
            out_images = pixels
        latents = clock.decoded * self.pipe.vae.config.scaling_factor if clock.decoded is not None else None
        return TextToImageOutput(images=out_images, latents=latents, timings=clock.timings(),
                                 truncated=self._truncated(prompts))
