"""Device and precision choice shared by every pipeline."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["select_device", "default_dtype", "cpu_has_native_bf16", "slow_bf16_warning", "training_autocast"]

# CPU flags of native bf16 arithmetic (x86 AVX512-BF16 / AMX, Arm BF16); without them PyTorch emulates it.
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def select_device(preference: str | None = None) -> torch.device:
    """The device to run on: ``preference`` if given ("cuda", "cuda:1", "mps", "cpu"), else
    CUDA, then Apple MPS, then the CPU.

    Raises ``ValueError`` when the asked device is not present, naming the ones that are.
    """
    available = ["cpu"]
    if torch.cuda.is_available():
        available.insert(0, "cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        available.insert(len(available) - 1, "mps")
    if preference in (None, "", "auto"):
        return torch.device(available[0])
    try:
        device = torch.device(preference)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {preference!r}; use one of {available} or 'auto'") from exc
    if device.type not in available:
        raise ValueError(f"device {preference!r} is not available here; available: {available}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{preference!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on GPUs, fp32 on the CPU (where fp16 kernels are slow or missing)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU computes bf16 natively (AVX512-BF16, AMX or Arm BF16), from its flags;
    None where they cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags = {flag for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for flag in line.split(":", 1)[1].split()}
    return any(f in flags for f in _BF16_FLAGS)


def slow_bf16_warning(device: torch.device, use_bf16: bool, cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """A line to print when bf16 autocast is asked for on a CPU that only emulates bf16 (on a 2-core
    AVX2 EPYC, a VAE encode ran 34x slower than in fp32); None otherwise."""
    if not use_bf16 or device.type != "cpu" or cpu_has_native_bf16(cpuinfo) is not False:
        return None
    return ("warning: bf16 autocast on a CPU without native bf16 (no avx512_bf16 / amx_bf16 flag): "
            "PyTorch emulates it and runs many times slower than fp32; use --mixed_precision no")


def training_autocast(device: torch.device,
                      mixed_precision: str) -> tuple[bool, Callable[[], contextlib.AbstractContextManager]]:
    """``(use_bf16, autocast)`` of a training script's ``--mixed_precision``: "bf16" always, "auto"
    on CUDA only, "no" never. Refuses other values; prints :func:`slow_bf16_warning` where it applies."""
    if mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"mixed_precision must be auto, bf16 or no, got {mixed_precision!r}")
    use_bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    warning = slow_bf16_warning(device, use_bf16)
    if warning:
        print(warning, flush=True)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    return use_bf16, autocast
