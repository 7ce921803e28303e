"""Image banks: a block of portrait-world renders held in memory as uint8, for fast training.

Rendering is cheap but not free; a training loop that needs thousands of images per second (a GAN
on a GPU) renders its bank once, in parallel, and then samples from memory. A bank can be cached
to an ``.npz`` file so a resumed run sees the same images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageBank", "render_bank", "stroke_boxes", "region_weights", "bank_region_weights"]


@dataclass
class ImageBank:
    images: torch.Tensor      # [N, 3, H, W] uint8
    labels: torch.Tensor      # [N, num_attributes] int64, -1 for outliers
    is_outlier: torch.Tensor  # [N] bool
    captions: list[str]
    seeds: np.ndarray         # [N] int64, the dataset index of each image (dataset seeded with meta["seed"])
    meta: dict | None = None  # how it was rendered: size, seed, split, outlier_rate

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Images ``index`` as float [B, 3, H, W] in [-1, 1] on ``device``."""
        x = self.images[index].to(device, non_blocking=True)
        return x.float().div_(127.5).sub_(1.0)

    def subset(self, index: slice | torch.Tensor) -> "ImageBank":
        if isinstance(index, slice):
            caps = self.captions[index]
        else:
            caps = [self.captions[int(i)] for i in index]
        return ImageBank(self.images[index], self.labels[index], self.is_outlier[index], caps,
                         self.seeds[index.numpy() if isinstance(index, torch.Tensor) else index], self.meta)

    def save(self, path: str | os.PathLike[str]) -> None:
        tmp = Path(str(path) + ".tmp.npz")
        np.savez(tmp, images=self.images.numpy(), labels=self.labels.numpy(),
                 is_outlier=self.is_outlier.numpy(), captions=np.array(self.captions),
                 seeds=self.seeds, meta=np.array(json.dumps(self.meta or {})))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ImageBank":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z else {}
            return cls(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]),
                       torch.from_numpy(z["is_outlier"]), [str(c) for c in z["captions"]],
                       z["seeds"], meta)


def _render_chunk(args: tuple[int, int, int, str, float, int]) -> tuple:
    start, stop, size, split, outlier_rate, seed = args
    from pipelines.data.datasets import PortraitDataset

    outliers = None
    if outlier_rate > 0:
        from pipelines.data.outliers import OutlierImages
        outliers = OutlierImages()
    from pipelines.data.portrait_world import PortraitWorld

    # the world renders 64-512 px; smaller banks (tiny test runs) are area-downsampled from 64 px
    render_size = max(size, PortraitWorld.MIN_SIZE)
    ds = PortraitDataset(size=render_size, length=stop, seed=seed, split=split,
                         outlier_rate=outlier_rate, outliers=outliers)
    imgs, labels, flags, caps = [], [], [], []
    for i in range(start, stop):
        item = ds[i]
        img = item["image"]
        if render_size != size:
            img = torch.nn.functional.interpolate(img[None], size=(size, size), mode="area")[0]
        imgs.append(((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        labels.append(item["labels"])
        flags.append(bool(item["is_outlier"]))
        caps.append(item["caption"])
    return torch.stack(imgs), torch.stack(labels), flags, caps


def render_bank(n: int, *, size: int, seed: int = 0, split: str = "train",
                outlier_rate: float = 0.0, workers: int | None = None,
                cache: str | os.PathLike[str] | None = None) -> ImageBank:
    """Render ``n`` dataset items (``PortraitDataset(seed=seed)[0:n]``) in ``workers`` processes.

    With ``cache``, a bank saved there earlier with the same arguments is loaded instead (a bank
    rendered with more images and otherwise the same arguments serves its first ``n``).
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    meta = {"size": size, "seed": seed, "split": split, "outlier_rate": outlier_rate}
    if cache is not None and Path(cache).exists():
        bank = ImageBank.load(cache)
        if bank.meta == meta and len(bank) >= n:
            return bank.subset(slice(0, n)) if len(bank) > n else bank
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    bounds = np.linspace(0, n, min(workers * 4, n) + 1).astype(int)
    jobs = [(int(a), int(b), size, split, outlier_rate, seed) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if workers == 1:
        parts = [_render_chunk(j) for j in jobs]
    else:
        # spawn, not fork: a forked child of a process that already ran torch ops can deadlock in OpenMP
        with get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    bank = ImageBank(
        images=torch.cat([p[0] for p in parts]),
        labels=torch.cat([p[1] for p in parts]),
        is_outlier=torch.tensor([f for p in parts for f in p[2]], dtype=torch.bool),
        captions=[c for p in parts for c in p[3]],
        seeds=np.arange(n, dtype=np.int64),
        meta=meta,
    )
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        bank.save(cache)
    return bank


def stroke_boxes(bank: ImageBank, group: str = "eyes", *, cache: str | os.PathLike[str] | None = None) -> np.ndarray:
    """[N, 4] float32 ``(x0, y0, x1, y1)`` boxes (normalised) of each bank image's ``group`` strokes
    (:meth:`~pipelines.data.portrait_world.PortraitWorld.stroke_box`, from the seed the image was
    rendered with); NaN rows for outlier images, which have no strokes. ``cache``: an ``.npz`` to
    reuse (kept only for the same bank rendering, group and length)."""
    from pipelines.data.portrait_world import PortraitWorld

    meta = bank.meta or {}
    if "seed" not in meta or "split" not in meta:
        raise ValueError("the bank does not say how it was rendered (meta seed and split); render it with render_bank")
    key = json.dumps({"bank": {k: meta[k] for k in sorted(meta)}, "group": group, "n": len(bank)}, sort_keys=True)
    if cache is not None and Path(cache).exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return z["boxes"]
    world = PortraitWorld()
    boxes = np.full((len(bank), 4), np.nan, dtype=np.float32)
    for i in range(len(bank)):
        if not bool(bank.is_outlier[i]):
            boxes[i] = world.stroke_box(int(meta["seed"]) + int(bank.seeds[i]), split=meta["split"], group=group)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(cache) + ".tmp.npz")
        np.savez(tmp, boxes=boxes, key=np.array(key))
        os.replace(tmp, cache)
    return boxes


def region_weights(boxes: np.ndarray, size: int, weight: float) -> torch.Tensor:
    """[N, 1, size, size] float32 per-cell loss weights: ``1 + weight`` on the cells of a ``size`` x
    ``size`` grid that the box overlaps, 1 elsewhere (and everywhere for a NaN box)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {boxes.shape}")
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    out = torch.ones(len(boxes), 1, size, size)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if np.isnan(x0):
            continue
        c0, r0 = (max(0, min(size - 1, int(np.floor(v * size)))) for v in (x0, y0))
        c1, r1 = (max(0, min(size, int(np.ceil(v * size)))) for v in (x1, y1))
        out[i, 0, r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)] += weight
    return out


def bank_region_weights(bank: ImageBank, size: int, weight: float, *, group: str = "eyes",
                        cache_dir: str | os.PathLike[str] = "") -> torch.Tensor:
    """:func:`region_weights` of the bank's ``group`` boxes on a ``size`` grid (pixels, or latent
    cells); the boxes are cached in ``cache_dir`` next to the bank ("" = no cache)."""
    meta = bank.meta or {}
    name = f"{group}_n{len(bank)}_s{meta.get('size')}_seed{meta.get('seed')}_{meta.get('split')}.npz"
    return region_weights(stroke_boxes(bank, group, cache=Path(cache_dir) / name if cache_dir else None), size, weight)
