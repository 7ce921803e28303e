"""StyleGAN inversion: optimisation in W / W+, an e4e encoder, and pivotal tuning.

- :func:`invert` is the projector of Karras et al. 2020 ("Analyzing and Improving the Image Quality
  of StyleGAN", Sec. 5 and Appendix D): Adam on the latent plus per-layer noise maps, a ramped
  noise on w early on, a cosine learning-rate ramp, a multi-scale autocorrelation penalty that
  keeps the noise maps from absorbing the image, and noise maps renormalised after every step.
  ``method='w'`` optimises one w per image (Abdal et al. 2019 call the per-layer variant W+).
  No LPIPS weights exist offline, so the perceptual term is an LPIPS-like distance on the
  portrait-world evaluator's activations (:class:`EvaluatorPerceptualLoss`).
- :func:`pivotal_tuning` is PTI (Roich et al. 2021, "Pivotal Tuning for Latent-based Editing of
  Real Images"): the latent (the pivot) stays fixed and a copy of the generator is fine-tuned to
  reproduce the image, optionally with the locality regulariser that keeps the rest of the
  latent space unchanged.
- :class:`InversionPipeline` runs one of five methods on PIL images and returns a dataclass.

Reconstruction error, everywhere in this module, is the per-image mean squared error of pixels in
[-1, 1] (:func:`reconstruction_error`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.stylegan2 import Generator
from models.stylegan2.encoder import StyleGANEncoder

__all__ = [
    "ENCODER_ARCHITECTURE",
    "EvaluatorPerceptualLoss",
    "InversionOutput",
    "InversionPipeline",
    "InversionResult",
    "PivotalTuningResult",
    "INVERSION_METHODS",
    "invert",
    "load_encoder",
    "noise_buffers",
    "noise_override",
    "pivotal_tuning",
    "reconstruction_error",
    "save_encoder",
    "synthesize",
    "w_statistics",
]

Callback = Callable[[int, int, "Image.Image | None"], None]
INVERSION_METHODS = ("optimise-w", "optimise-w+", "encoder", "encoder+pti", "optimise+pti")
ENCODER_ARCHITECTURE = "stylegan2-e4e-encoder"


# ---------------------------------------------------------------------------------------------
# Small helpers shared with stylegan_editing and the encoder training script
# ---------------------------------------------------------------------------------------------


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Normal samples drawn with ``generator`` (on its own device) and moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(list(shape), generator=generator, device=gen_device).to(device)


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily switch off ``requires_grad`` (and training mode) of ``module``; restores both."""
    flags = [p.requires_grad for p in module.parameters()]
    was_training = module.training
    module.requires_grad_(False).eval()
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was_training)


def noise_buffers(G: Generator) -> dict[str, torch.Tensor]:
    """The constant noise maps of the synthesis layers: ``{layer name: [r, r]}``."""
    return {name: module.noise_const for name, module in G.synthesis.named_modules()
            if getattr(module, "use_noise", False)}


@contextlib.contextmanager
def noise_override(G: Generator, noise: Mapping[str, torch.Tensor] | None) -> Iterator[Generator]:
    """Use per-image noise maps ``{layer name: [B, 1, r, r]}`` as G's constant noise inside the
    block (``noise_mode='const'``); G's own buffers are put back afterwards. ``None`` = no change."""
    if not noise:
        yield G
        return
    modules = dict(G.synthesis.named_modules())
    saved = {}
    try:
        for name, value in noise.items():
            module = modules.get(name)
            if module is None or not getattr(module, "use_noise", False):
                raise ValueError(f"{name!r} is not a noise layer of this generator")
            saved[name] = module._buffers["noise_const"]
            module._buffers["noise_const"] = value
        yield G
    finally:
        for name, value in saved.items():
            modules[name]._buffers["noise_const"] = value


def synthesize(G: Generator, w_plus: torch.Tensor, noise: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Images ``[B, C, R, R]`` for ``w_plus [B, num_ws, w_dim]`` with const (or given) noise."""
    with noise_override(G, noise):
        return G.synthesis(w_plus, noise_mode="const")


def reconstruction_error(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared pixel error ``[B]`` (images in [-1, 1])."""
    if images.shape != targets.shape:
        raise ValueError(f"shapes differ: {tuple(images.shape)} vs {tuple(targets.shape)}")
    return (images.float() - targets.float()).square().flatten(1).mean(1)


@torch.no_grad()
def w_statistics(G: Generator, num_samples: int = 10000, generator: torch.Generator | None = None,
                 batch_size: int = 4096) -> tuple[torch.Tensor, float]:
    """Mean ``[w_dim]`` and scalar spread ``sqrt(E||w - w_avg||^2)`` of ``num_samples`` mapped z
    (as the StyleGAN2 projector measures them)."""
    device = _device_of(G)
    ws = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        z = _randn([n, G.z_dim], generator, device)
        c = torch.zeros([n, G.c_dim], device=device)
        ws.append(G.mapping(z, c, skip_w_avg_update=True)[:, 0].float())
    w = torch.cat(ws)  # [N, w_dim]
    w_avg = w.mean(0)
    w_std = float((w - w_avg).square().sum(1).mean().sqrt())
    return w_avg, w_std


# ---------------------------------------------------------------------------------------------
# Perceptual loss on the evaluator
# ---------------------------------------------------------------------------------------------


class EvaluatorPerceptualLoss(nn.Module):
    """An LPIPS-like distance (Zhang et al. 2018) computed on the portrait-world evaluator.

    Each stage's activations are unit-normalised over channels, squared differences are averaged
    over space and summed over stages; the squared distance of the final feature vectors
    (normalised by its size) is added. Accepts an :class:`~pipelines.evaluation.Evaluator` or its
    ``AttributeEvaluator`` network (anything with ``stem``/``blocks``/``to_features`` works
    stage-wise; other networks returning ``.features`` give the vector term only).
    """

    def __init__(self, evaluator: Any) -> None:
        super().__init__()
        network = getattr(evaluator, "network", evaluator)
        if not isinstance(network, nn.Module):
            raise ValueError(f"evaluator must be an Evaluator or an nn.Module, got {type(evaluator).__name__}")
        self.network = network
        self.staged = all(hasattr(network, a) for a in ("stem", "blocks", "to_features", "resolution"))

    def activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Stage activations and the feature vector of ``images [B, 3, H, W]`` in [-1, 1]."""
        net = self.network
        x = images.to(_device_of(net))
        if not self.staged:
            return [net(x).features]
        if x.shape[-1] != net.resolution:
            x = F.interpolate(x, size=(net.resolution, net.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        h = F.silu(net.stem(x))
        acts = [h]
        for block in net.blocks:
            h = block(h)
            acts.append(h)
        acts.append(net.to_features(h))
        return acts

    @staticmethod
    def distance(acts_a: list[torch.Tensor], acts_b: list[torch.Tensor]) -> torch.Tensor:
        """Per-image distance ``[B]`` between two activation lists (the second may be batch 1)."""
        total = 0
        for a, b in zip(acts_a, acts_b):
            if a.ndim == 4:
                a = a / (a.square().sum(1, keepdim=True) + 1e-10).sqrt()
                b = b / (b.square().sum(1, keepdim=True) + 1e-10).sqrt()
                total = total + (a - b).square().sum(1).mean([1, 2])
            else:
                total = total + (a - b).square().mean(1)
        return total

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.distance(self.activations(images), self.activations(targets))


def _pixel_distance(images: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    diff = images - targets
    per = diff.square() if kind == "mse" else diff.abs()
    return per.flatten(1).mean(1)  # [B]


def _noise_regularisation(noise: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Multi-scale autocorrelation penalty of the StyleGAN2 projector, per image ``[B]``: squared
    mean products of each noise map with itself shifted by one pixel (x and y), on a pyramid down
    to 8x8."""
    reg = 0
    for value in noise.values():
        n = value  # [B, 1, r, r]
        while True:
            reg = reg + (n * torch.roll(n, shifts=1, dims=3)).mean([1, 2, 3]).square()
            reg = reg + (n * torch.roll(n, shifts=1, dims=2)).mean([1, 2, 3]).square()
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, kernel_size=2)
    return reg


def _preview(images: torch.Tensor) -> Image.Image:
    from pipelines.images import tensor_to_pil

    return tensor_to_pil(images[:1])[0]


def _check_images(G: Generator, images: torch.Tensor) -> None:
    expected = [G.img_channels, G.img_resolution, G.img_resolution]
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or list(images.shape[1:]) != expected:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be [B, {expected[0]}, {expected[1]}, {expected[2]}] in [-1, 1], got {got}")


# ---------------------------------------------------------------------------------------------
# Optimisation-based inversion
# ---------------------------------------------------------------------------------------------


@dataclass
class InversionResult:
    """What :func:`invert` found."""

    w_plus: torch.Tensor          # [B, num_ws, w_dim]
    images: torch.Tensor          # [B, C, R, R] reconstructions in [-1, 1]
    loss_history: list[float]     # total loss per step, mean over the batch
    seconds: float                # wall time of the optimisation
    noise: dict[str, torch.Tensor] | None = None  # optimised maps {layer: [B, 1, r, r]}; None = G's own
    errors: torch.Tensor | None = None  # [B] reconstruction_error against the targets


def invert(
    G: Generator,
    images: torch.Tensor,  # [B, C, R, R] targets in [-1, 1]
    *,
    method: Literal["w", "w+"] = "w+",
    steps: int = 300,
    lr: float = 0.1,  # peak Adam learning rate (the projector's 0.1)
    evaluator: Any = None,  # Evaluator / AttributeEvaluator for the perceptual term, None = pixels only
    feature_weight: float = 1.0,  # weight of the evaluator-feature distance
    pixel_weight: float = 1.0,  # weight of the pixel distance
    pixel_loss: Literal["mse", "l1"] = "mse",
    noise_reg_weight: float = 1e5,  # the projector's noise regularisation weight
    optimize_noise: bool = True,  # also optimise per-image noise maps (else G's const noise)
    w_init: Literal["mean"] | torch.Tensor = "mean",  # 'mean' or [B, w_dim] / [B, num_ws, w_dim] / [w_dim]
    w_avg_samples: int = 10000,  # z samples for w_avg and the w spread
    initial_noise_factor: float = 0.05,  # w noise at step 0, times the w spread
    noise_ramp_length: float = 0.75,  # fraction of the steps over which the w noise fades out
    lr_rampdown_length: float = 0.25,  # fraction of the steps of the cosine ramp-down
    lr_rampup_length: float = 0.05,  # fraction of the steps of the linear ramp-up
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    preview_every: int | None = None,  # steps between previews for the callback; None = steps // 10
) -> InversionResult:
    """Project ``images`` into W or W+ of ``G`` (StyleGAN2 projector, Karras et al. 2020).

    G is left untouched (its parameters are frozen during the call and restored afterwards).
    """
    # 1. Validate.
    _check_images(G, images)
    if method not in ("w", "w+"):
        raise ValueError(f"method must be 'w' or 'w+', got {method!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if pixel_loss not in ("mse", "l1"):
        raise ValueError(f"pixel_loss must be 'mse' or 'l1', got {pixel_loss!r}")
    device = _device_of(G)
    targets = images.to(device, torch.float32)
    batch = targets.shape[0]
    _sync(device)
    t0 = time.perf_counter()

    with _frozen(G):
        # 2. Starting point and spread of W.
        w_avg, w_std = w_statistics(G, w_avg_samples, generator)
        num_ws_opt = 1 if method == "w" else G.num_ws
        if isinstance(w_init, str):
            if w_init != "mean":
                raise ValueError(f"w_init must be 'mean' or a tensor, got {w_init!r}")
            start = w_avg.expand(batch, num_ws_opt, -1)
        else:
            start = w_init.to(device, torch.float32)
            if start.ndim == 1:
                start = start.expand(batch, -1)
            if start.ndim == 2:
                start = start[:, None]
            if start.ndim != 3 or start.shape[0] not in (1, batch) or start.shape[-1] != G.w_dim:
                raise ValueError(f"w_init must be [w_dim], [B, w_dim] or [B, num_ws, w_dim], got {tuple(w_init.shape)}")
            if method == "w":
                start = start.mean(1, keepdim=True)
            elif start.shape[1] == 1:
                start = start.expand(-1, G.num_ws, -1)
            elif start.shape[1] != G.num_ws:
                raise ValueError(f"w_init has {start.shape[1]} ws, the generator has {G.num_ws}")
            start = start.expand(batch, -1, -1)
        w_opt = start.clone().contiguous().requires_grad_(True)  # [B, 1 | num_ws, w_dim]

        # 3. Noise maps: per image, random, optimised and renormalised (else G's constants).
        noise: dict[str, torch.Tensor] | None = None
        params = [w_opt]
        if optimize_noise:
            noise = {name: _randn([batch, 1, *buf.shape], generator, device).requires_grad_(True)
                     for name, buf in noise_buffers(G).items()}
            params += list(noise.values())
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))

        # 4. Target features, computed once.
        perceptual = EvaluatorPerceptualLoss(evaluator) if evaluator is not None and feature_weight > 0 else None
        target_acts = None
        if perceptual is not None:
            with torch.no_grad():
                target_acts = perceptual.activations(targets)

        def losses(synth: torch.Tensor) -> torch.Tensor:  # [B]
            loss = pixel_weight * _pixel_distance(synth, targets, pixel_loss)
            if perceptual is not None:
                loss = loss + feature_weight * perceptual.distance(perceptual.activations(synth), target_acts).to(device)
            return loss

        # 5. Optimise.
        history: list[float] = []
        every = preview_every or max(1, steps // 10)
        for step in range(steps):
            t = step / steps
            w_noise_scale = w_std * initial_noise_factor * max(0.0, 1.0 - t / noise_ramp_length) ** 2
            lr_ramp = min(1.0, (1.0 - t) / lr_rampdown_length)
            lr_ramp = 0.5 - 0.5 * math.cos(lr_ramp * math.pi)
            lr_ramp = lr_ramp * min(1.0, t / lr_rampup_length) if lr_rampup_length > 0 else lr_ramp
            for group in opt.param_groups:
                group["lr"] = lr * lr_ramp

            w_noise = _randn(w_opt.shape, generator, device) * w_noise_scale
            ws = (w_opt + w_noise).expand(-1, G.num_ws, -1)  # [B, num_ws, w_dim]
            synth = synthesize(G, ws, noise)
            per_image = losses(synth)
            if noise is not None and noise_reg_weight > 0:
                per_image = per_image + noise_reg_weight * _noise_regularisation(noise)
            opt.zero_grad(set_to_none=True)
            per_image.sum().backward()
            opt.step()
            history.append(float(per_image.detach().mean()))

            # Renormalise each noise map to zero mean, unit variance.
            if noise is not None:
                with torch.no_grad():
                    for buf in noise.values():
                        buf -= buf.mean(dim=[1, 2, 3], keepdim=True)
                        buf *= buf.square().mean(dim=[1, 2, 3], keepdim=True).rsqrt()
            if callback is not None:
                last = step + 1 == steps
                callback(step + 1, steps, _preview(synth.detach()) if (step + 1) % every == 0 or last else None)

        # 6. Final latent and images (without the w noise).
        with torch.no_grad():
            w_plus = w_opt.detach().expand(-1, G.num_ws, -1).contiguous()
            noise_out = {k: v.detach() for k, v in noise.items()} if noise is not None else None
            result_images = synthesize(G, w_plus, noise_out)
    _sync(device)
    return InversionResult(w_plus=w_plus, images=result_images, loss_history=history,
                           seconds=time.perf_counter() - t0, noise=noise_out,
                           errors=reconstruction_error(result_images, targets))


# ---------------------------------------------------------------------------------------------
# Pivotal tuning
# ---------------------------------------------------------------------------------------------


class PivotalTuningResult(NamedTuple):
    """``(G_tuned, images, seconds)``; unpacks as a tuple."""

    G: Generator              # a tuned copy; the input generator is unchanged
    images: torch.Tensor      # [B, C, R, R] reconstructions of the pivots by the tuned copy
    seconds: float


def pivotal_tuning(
    G: Generator,
    images: torch.Tensor,  # [B, C, R, R] targets in [-1, 1]
    w_pivot: torch.Tensor,  # [B, num_ws, w_dim] (or [B, w_dim]) pivots, kept fixed
    *,
    steps: int = 350,  # the paper's 350
    lr: float = 3e-4,  # the paper's 3e-4
    evaluator: Any = None,  # perceptual term (stands in for LPIPS), None = pixels only
    feature_weight: float = 1.0,
    pixel_weight: float = 1.0,  # the paper's lambda_L2 = 1 (LPIPS weight 1)
    locality_weight: float = 0.0,  # lambda_R of the locality regulariser (paper: 0.1), 0 = off
    locality_alpha: float = 30.0,  # distance from the pivot of the regulariser's latents (paper: 30)
    locality_every: int = 10,  # apply the regulariser every N steps (paper: 10)
    noise: Mapping[str, torch.Tensor] | None = None,  # per-image noise maps of the pivot (from invert)
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    preview_every: int | None = None,
) -> PivotalTuningResult:
    """Fine-tune a copy of G's synthesis network so that ``G(w_pivot)`` reproduces ``images``
    (PTI, Roich et al. 2021). Returns ``(G_tuned, images, seconds)``."""
    # 1. Validate.
    _check_images(G, images)
    device = _device_of(G)
    if w_pivot.ndim == 2:
        w_pivot = w_pivot[:, None].expand(-1, G.num_ws, -1)
    if w_pivot.ndim != 3 or w_pivot.shape[0] != images.shape[0] or w_pivot.shape[1:] != (G.num_ws, G.w_dim):
        raise ValueError(f"w_pivot must be [B, {G.num_ws}, {G.w_dim}] with B = {images.shape[0]}, "
                         f"got {tuple(w_pivot.shape)}")
    if steps < 0 or not lr > 0:
        raise ValueError(f"steps must be >= 0 and lr positive, got steps={steps}, lr={lr}")
    if locality_weight > 0 and locality_every < 1:
        raise ValueError(f"locality_every must be >= 1, got {locality_every}")
    _sync(device)
    t0 = time.perf_counter()

    # 2. The tuned copy (synthesis weights trainable) and the frozen original.
    G_tuned = copy.deepcopy(G).eval().requires_grad_(False)
    G_tuned.synthesis.requires_grad_(True)
    targets = images.to(device, torch.float32)
    pivot = w_pivot.to(device, torch.float32).detach()
    opt = torch.optim.Adam(G_tuned.synthesis.parameters(), lr=lr)
    perceptual = EvaluatorPerceptualLoss(evaluator) if evaluator is not None and feature_weight > 0 else None

    def loss_fn(synth: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = pixel_weight * _pixel_distance(synth, target, "mse")
        if perceptual is not None:
            loss = loss + feature_weight * perceptual(synth, target).to(device)
        return loss  # [B]

    # 3. Tune.
    every = preview_every or max(1, steps // 10)
    with _frozen(G):
        for step in range(steps):
            synth = synthesize(G_tuned, pivot, noise)
            loss = loss_fn(synth, targets).sum()
            if locality_weight > 0 and step % locality_every == 0:
                # Locality regulariser: latents at distance alpha from the pivot, towards random w,
                # must render as the original generator renders them.
                z = _randn([pivot.shape[0], G.z_dim], generator, device)
                w_z = G.mapping(z, torch.zeros([z.shape[0], G.c_dim], device=device), skip_w_avg_update=True)
                direction = w_z - pivot
                w_r = pivot + locality_alpha * direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-8)
                with torch.no_grad():
                    x_r_orig = synthesize(G, w_r, noise)
                loss = loss + locality_weight * loss_fn(synthesize(G_tuned, w_r, noise), x_r_orig).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if callback is not None:
                last = step + 1 == steps
                callback(step + 1, steps, _preview(synth.detach()) if (step + 1) % every == 0 or last else None)

    # 4. Result.
    G_tuned.requires_grad_(False)
    with torch.no_grad():
        out = synthesize(G_tuned, pivot, noise)
    _sync(device)
    return PivotalTuningResult(G_tuned, out, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Encoder I/O
# ---------------------------------------------------------------------------------------------


def save_encoder(encoder: StyleGANEncoder, folder: str | os.PathLike[str], *, generator_source: str | None = None,
                 fp16: bool = False, architecture: str = ENCODER_ARCHITECTURE, **extra: Any) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (``architecture``, init kwargs, the generator
    it was trained for, and any ``extra`` JSON fields)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in encoder.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "architecture": architecture})
    os.replace(tmp, folder / "model.safetensors")
    config = {"architecture": architecture, "init_kwargs": encoder.init_kwargs, "generator": generator_source, **extra}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def load_encoder(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 architecture: str = ENCODER_ARCHITECTURE, cls: type[nn.Module] = StyleGANEncoder,
                 what: str = "an encoder", script: str = "train_stylegan_encoder",
                 mismatch_hint: str = "") -> nn.Module:
    """Load an encoder written by :func:`save_encoder` (eval mode, float32); the folder's
    architecture tag must be ``architecture`` (``cls`` builds it)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} is not {what} folder (needs config.json and model.safetensors); "
                                f"train one with `python -m pipelines.training.{script}`")
    config = json.loads(config_file.read_text())
    if config.get("architecture") != architecture:
        raise ValueError(f"{config_file}: architecture {config.get('architecture')!r} is not {architecture!r}"
                         + (f" ({mismatch_hint})" if mismatch_hint else ""))
    encoder = cls(**config["init_kwargs"])
    encoder.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()}, strict=True)
    return encoder.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


@dataclass
class InversionOutput:
    """What :class:`InversionPipeline` returns."""

    images: list[Image.Image]          # reconstructions
    w_plus: torch.Tensor               # [B, num_ws, w_dim]
    timings: dict[str, float]          # seconds per stage ('encoder', 'optimise', 'pti') and 'total'
    reconstruction_error: list[float]  # per image, mean squared pixel error in [-1, 1] units
    G: Generator                       # the generator to edit with: a tuned copy after PTI
    noise: dict[str, torch.Tensor] | None = None  # per-image noise maps (optimisation methods)
    targets: torch.Tensor | None = None  # [B, C, R, R] the preprocessed inputs
    loss_history: dict[str, list[float]] = field(default_factory=dict)


ImageInput = Image.Image | np.ndarray | torch.Tensor | Sequence[Image.Image | np.ndarray]


class InversionPipeline:
    """Invert images into a StyleGAN2 generator, by optimisation, an encoder, and/or PTI.

    ``method``: 'optimise-w' | 'optimise-w+' (:func:`invert`), 'encoder' (one e4e forward pass),
    'encoder+pti' / 'optimise+pti' (a pivot from the encoder / from W optimisation, then
    :func:`pivotal_tuning`, as in Roich et al. 2021, who pivot on a W projection).
    """

    def __init__(self, G: Generator, *, encoder: StyleGANEncoder | None = None, evaluator: Any = None) -> None:
        self.G = G.eval()
        self.encoder = encoder.eval() if encoder is not None else None
        self.evaluator = evaluator
        if encoder is not None and (encoder.num_ws, encoder.w_dim) != (G.num_ws, G.w_dim):
            raise ValueError(f"the encoder predicts [{encoder.num_ws}, {encoder.w_dim}] latents, the generator "
                             f"takes [{G.num_ws}, {G.w_dim}]")

    @classmethod
    def from_pretrained(cls, generator_path: str | os.PathLike[str], *, encoder_path: str | os.PathLike[str] | None = None,
                        evaluator_path: str | os.PathLike[str] | None = None,
                        device: str | torch.device = "cpu") -> "InversionPipeline":
        """Load the generator (studio folder or official .pkl), optionally an encoder and an evaluator."""
        from pipelines.evaluation import Evaluator
        from pipelines.stylegan_io import load_generator

        G = load_generator(generator_path, device=device)
        encoder = load_encoder(encoder_path, device=device) if encoder_path is not None else None
        evaluator = Evaluator.from_pretrained(evaluator_path, device=device) if evaluator_path is not None else None
        return cls(G, encoder=encoder, evaluator=evaluator)

    # -- input handling -------------------------------------------------------------------
    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images -> ``[B, C, R, R]`` in [-1, 1] at G's resolution.

        PIL images (any mode; transparency over white) and uint8 arrays ``[H, W(, 3|4)]`` are
        centre-cropped to a square and resized (Lanczos); tensors ``[B, C, H, W]`` / ``[C, H, W]``
        in [-1, 1] are resized (bilinear, antialiased).
        """
        from pipelines.face_alignment import centre_crop
        from pipelines.images import pil_to_tensor

        res = self.G.img_resolution
        if isinstance(images, torch.Tensor):
            x = images.float()
            if x.ndim == 3:
                x = x[None]
            if x.ndim != 4 or x.shape[1] != self.G.img_channels or min(x.shape[-2:]) < 1:
                raise ValueError(f"image tensors must be [B, {self.G.img_channels}, H, W] in [-1, 1], "
                                 f"got {tuple(images.shape)}")
            if x.shape[0] == 0:
                raise ValueError("no images given")
            if x.min() < -1.5 or x.max() > 1.5:
                raise ValueError("image tensors must hold values in [-1, 1] (got a range like [0, 255]?)")
            if x.shape[-2:] != (res, res):
                x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
            return x.clamp(-1, 1).to(_device_of(self.G))
        items = [images] if isinstance(images, (Image.Image, np.ndarray)) else images
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"expected a PIL image, a list of PIL images, a uint8 array or a tensor, got "
                             f"{type(images).__name__}")
        pils = []
        for i, item in enumerate(items):
            if isinstance(item, np.ndarray):
                if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (3, 4)):
                    raise ValueError(f"image {i}: arrays must be uint8 [H, W], [H, W, 3] or [H, W, 4], got "
                                     f"{item.dtype} {item.shape}")
                item = Image.fromarray(item)
            if not isinstance(item, Image.Image):
                raise ValueError(f"image {i} is a {type(item).__name__}, not a PIL image")
            if min(item.size) < 1:
                raise ValueError(f"image {i} is empty ({item.size[0]}x{item.size[1]})")
            pils.append(centre_crop(item, res))
        return pil_to_tensor(pils, size=res).to(_device_of(self.G))

    # -- running --------------------------------------------------------------------------
    def __call__(
        self,
        *,
        image: ImageInput | None = None,
        images: ImageInput | None = None,
        method: str = "optimise-w+",
        steps: int = 300,  # optimisation steps ('optimise-*' and the pivot of 'optimise+pti')
        pti_steps: int = 200,  # tuning steps of the '+pti' methods
        lr: float = 0.1,
        pti_lr: float = 3e-4,
        feature_weight: float = 1.0,
        noise_reg_weight: float = 1e5,
        locality_weight: float = 0.0,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
    ) -> InversionOutput:
        """Invert ``image`` (or ``images``) with ``method``; see the class docstring."""
        # 1. Validate the inputs before any work.
        if (image is None) == (images is None):
            raise ValueError("pass exactly one of image= or images=")
        if method not in INVERSION_METHODS:
            raise ValueError(f"method must be one of {INVERSION_METHODS}, got {method!r}")
        if method.startswith("encoder") and self.encoder is None:
            raise ValueError(f"method {method!r} needs an encoder; this pipeline has none (train one with "
                             "`python -m pipelines.training.train_stylegan_encoder`) - use 'optimise-w+' instead")
        if method.startswith("optimise") and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if method.endswith("pti") and pti_steps < 1:
            raise ValueError(f"pti_steps must be >= 1, got {pti_steps}")
        targets = self.preprocess(image if image is not None else images)
        device = targets.device

        # Stages report progress on one scale.
        total = (steps if method.startswith("optimise") else 1) + (pti_steps if method.endswith("pti") else 0)
        done = 0

        def stage_callback(s: int, _n: int, preview: Image.Image | None) -> None:
            if callback is not None:
                callback(done + s, total, preview)

        timings: dict[str, float] = {}
        history: dict[str, list[float]] = {}
        noise = None
        G_out = self.G
        t_start = time.perf_counter()

        # 2. The latent: optimisation or the encoder.
        if method.startswith("optimise"):
            result = invert(self.G, targets, method="w" if method in ("optimise-w", "optimise+pti") else "w+",
                            steps=steps, lr=lr, evaluator=self.evaluator, feature_weight=feature_weight,
                            noise_reg_weight=noise_reg_weight, generator=generator, callback=stage_callback)
            w_plus, recon, noise = result.w_plus, result.images, result.noise
            timings["optimise"] = result.seconds
            history["optimise"] = result.loss_history
            done += steps
        else:
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                w_plus = self.encoder(targets.to(_device_of(self.encoder)))
                w_plus = w_plus.to(device, torch.float32)
                recon = synthesize(self.G, w_plus)
            _sync(device)
            timings["encoder"] = time.perf_counter() - t0
            done += 1
            stage_callback(0, total, _preview(recon))

        # 3. Pivotal tuning around that latent.
        if method.endswith("pti"):
            tuned = pivotal_tuning(self.G, targets, w_plus, steps=pti_steps, lr=pti_lr, evaluator=self.evaluator,
                                   feature_weight=feature_weight, locality_weight=locality_weight, noise=noise,
                                   generator=generator, callback=stage_callback)
            G_out, recon = tuned.G, tuned.images
            timings["pti"] = tuned.seconds

        # 4. Output.
        timings["total"] = time.perf_counter() - t_start
        from pipelines.images import tensor_to_pil

        errors = reconstruction_error(recon, targets)
        return InversionOutput(images=tensor_to_pil(recon), w_plus=w_plus, timings=timings,
                               reconstruction_error=[float(e) for e in errors], G=G_out, noise=noise,
                               targets=targets, loss_history=history)
