"""The portrait-world evaluator: a small CNN that reads every attribute of a portrait.

It is the studio's measuring instrument (prompt adherence, edit accuracy and preservation,
FD-world), so it is kept small, deterministic in eval mode and independent of batch statistics
(GroupNorm, not BatchNorm): an image gets the same verdict whatever it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttributeEvaluator", "EvaluatorOutput"]


@dataclass
class EvaluatorOutput:
    logits: dict[str, torch.Tensor]   # name -> [B, num_values]
    outlier_logit: torch.Tensor       # [B]; > 0 means "not a portrait of the world"
    features: torch.Tensor            # [B, feature_dim], the vector FD-world is computed on


class _Stage(nn.Module):
    """3x3 convolution, GroupNorm, SiLU, then 2x average-pool downsampling."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.GroupNorm(min(groups, out_channels), out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.silu(self.norm(self.conv(x))), 2)


class AttributeEvaluator(nn.Module):
    """Predicts each categorical attribute, an outlier flag, and exposes a feature vector.

    Args:
        attributes: ordered (name, number of values) pairs, one classification head each.
        resolution: side in pixels the network sees; other sizes are resized (antialiased) first.
        width: channels of the stride-2 stem; the three stages double it up to ``8 * width``.
        feature_dim: size of the feature vector (FD-world is computed on it).
    """

    def __init__(self, attributes: list[tuple[str, int]] | tuple[tuple[str, int], ...],
                 resolution: int = 64, width: int = 16, feature_dim: int = 256) -> None:
        super().__init__()
        if resolution < 16 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 16, got {resolution}")
        self.init_kwargs = {"attributes": [list(a) for a in attributes], "resolution": resolution,
                            "width": width, "feature_dim": feature_dim}
        self.attribute_names = [name for name, _ in attributes]
        self.resolution = resolution
        # 64 px: stem -> 32, stages -> 16 -> 8 -> 4; the 4x4 map is flattened, not pooled, so the
        # features keep *where* things are (glasses over the eyes, a hat above the hair).
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(_Stage(width, 2 * width), _Stage(2 * width, 4 * width),
                                    _Stage(4 * width, 8 * width))
        side = resolution // 16
        self.to_features = nn.Sequential(nn.Flatten(), nn.Linear(8 * width * side * side, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in attributes})
        self.outlier_head = nn.Linear(feature_dim, 1)

    def forward(self, images: torch.Tensor) -> EvaluatorOutput:
        """images: [B, 3, H, W] in [-1, 1], any H = W >= 16."""
        assert images.ndim == 4 and images.shape[1] == 3, f"expected [B, 3, H, W], got {tuple(images.shape)}"
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   antialias=True, align_corners=False)
        h = self.blocks(F.silu(self.stem(images)))              # [B, 8w, res/16, res/16]
        features = self.to_features(h)                           # [B, feature_dim]
        logits = {name: head(features) for name, head in self.heads.items()}
        return EvaluatorOutput(logits, self.outlier_head(features).squeeze(1), features)
