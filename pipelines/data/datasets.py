"""Torch datasets over the portrait world (optionally mixed with outlier images)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from pipelines.data.outliers import OutlierImages
from pipelines.data.portrait_world import ATTRIBUTES, SPLITS, PortraitWorld

__all__ = ["PortraitDataset"]


class PortraitDataset(Dataset):
    """``length`` portraits rendered on the fly; item ``i`` is the world's portrait of seed ``seed + i``.

    With ``outlier_rate`` > 0, each item is instead an outlier image with that probability (decided
    from ``(seed, i)``); outliers have labels -1 and an empty caption. Deterministic in (seed, i).
    """

    def __init__(self, *, size: int, length: int, seed: int = 0, split: str = "train",
                 outlier_rate: float = 0.0, outliers: OutlierImages | None = None) -> None:
        if not PortraitWorld.MIN_SIZE <= size <= PortraitWorld.MAX_SIZE:
            raise ValueError(f"size must be between {PortraitWorld.MIN_SIZE} and {PortraitWorld.MAX_SIZE}, got {size}")
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if not 0 <= seed or seed + length > 2**32:
            raise ValueError(f"seed + length must stay within [0, 2**32), got seed={seed}, length={length}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not 0.0 <= outlier_rate <= 1.0:
            raise ValueError(f"outlier_rate must be in [0, 1], got {outlier_rate}")
        self.size, self.length, self.seed, self.split = size, length, seed, split
        self.outlier_rate = outlier_rate
        self.outliers = outliers if outliers is not None or outlier_rate == 0 else OutlierImages()
        self.world = PortraitWorld()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of {self.length}")
        i = int(i) % self.length
        seed = self.seed + i
        rng = np.random.default_rng([seed, 4])
        if self.outlier_rate > 0 and rng.random() < self.outlier_rate:
            assert self.outliers is not None
            k = _outlier_index(int(rng.integers(len(self.outliers))), len(self.outliers), self.split)
            image = self.outliers.get(k, size=self.size, seed=seed)
            labels = torch.full((len(ATTRIBUTES),), -1, dtype=torch.long)
            return {"image": _to_tensor(image), "labels": labels, "is_outlier": torch.tensor(True), "caption": ""}
        p = self.world.sample(seed, size=self.size, split=self.split, with_line_art=False)
        idx = p.attributes.to_indices()
        labels = torch.tensor([idx[name] for name in ATTRIBUTES], dtype=torch.long)
        return {"image": _to_tensor(p.image), "labels": labels, "is_outlier": torch.tensor(False),
                "caption": p.caption}


def _to_tensor(image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [H, W, 3]
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


HELD_OUT_OUTLIER_EVERY = 10  # every 10th outlier image is kept out of training, like the held-out combinations


def _outlier_index(k: int, n: int, split: str) -> int:
    """Map a drawn index onto the split's outlier images: the held-out split uses only every
    ``HELD_OUT_OUTLIER_EVERY``-th image, the train split only the others ("any": all)."""
    if split == "any":
        return k
    if split == "heldout":
        return (k // HELD_OUT_OUTLIER_EVERY) * HELD_OUT_OUTLIER_EVERY
    if k % HELD_OUT_OUTLIER_EVERY == 0:  # a held-out image drawn for training: take its neighbour
        k = k + 1 if k + 1 < n else k - 1
    return k
