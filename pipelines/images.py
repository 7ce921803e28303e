"""Conversions between tensors in [-1, 1] and PIL images, and sample grids."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["tensor_to_pil", "pil_to_tensor", "make_grid"]


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, C, H, W] in [-1, 1] (C = 1 or 3) -> list of PIL images."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected [B, 1|3, H, W], got {tuple(images.shape)}")
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    mode = "L" if arr.shape[-1] == 1 else "RGB"
    return [Image.fromarray(a[..., 0] if mode == "L" else a, mode) for a in arr]


def pil_to_tensor(images: Image.Image | Sequence[Image.Image], *, size: int | None = None,
                  mode: str = "RGB") -> torch.Tensor:
    """PIL image(s) -> [B, C, H, W] float32 in [-1, 1], converted to ``mode`` and resized to
    ``size`` x ``size`` (Lanczos) when given."""
    if isinstance(images, Image.Image):
        images = [images]
    out = []
    for img in images:
        img = img.convert(mode)
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.LANCZOS)
        a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def make_grid(images: Sequence[Image.Image], *, columns: int | None = None,
              pad: int = 2, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile equally sized PIL images into one RGB grid."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w + (columns + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(img.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
