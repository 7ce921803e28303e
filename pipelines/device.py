"""Device and precision choice shared by every pipeline."""

from __future__ import annotations

import torch

__all__ = ["select_device", "default_dtype"]


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
