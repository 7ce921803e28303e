"""An e4e-style encoder from images into StyleGAN's W+ space.

Tov et al. 2021, "Designing an Encoder for StyleGAN Image Manipulation" (e4e): the encoder predicts
one base latent ``w`` and per-layer offsets ``delta_i``; layer ``i`` receives ``w + delta_i``
(``delta_0 = 0``) plus the generator's ``w_avg``. Keeping the offsets small (a delta regulariser
in training, offsets switched on progressively) keeps the codes close to W, where edits work. The
backbone is a small residual CNN with a feature pyramid as in pSp (Richardson et al. 2021,
"Encoding in Style"): coarse layers read the 4x4 level, middle layers the 8x8 level, fine layers
the 16x16 level.

Pure ``nn.Module``: no I/O. Training: ``pipelines/training/train_stylegan_encoder.py``; saving and
loading: ``pipelines/stylegan_inversion.py``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StyleGANEncoder", "ws_resolution"]


def ws_resolution(index: int) -> int:
    """The synthesis resolution that reads ``ws[index]`` in a StyleGAN2 generator.

    Block 4 reads ws 0 (conv) and 1 (toRGB); block ``r = 2**k`` (k >= 3) reads ws ``2k - 5`` and
    ``2k - 4`` with its convolutions (its toRGB shares the next block's first w).
    """
    return 2 ** max(2, (index + 5) // 2)


class _DownBlock(nn.Module):
    """Residual block that halves the resolution: conv3x3 (stride 2) -> conv3x3, plus an
    average-pooled 1x1 shortcut; GroupNorm and leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm0 = nn.GroupNorm(min(groups, out_channels), out_channels)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(min(groups, out_channels), out_channels)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, H, W] -> [B, Cout, H/2, W/2]
        y = F.leaky_relu(self.norm0(self.conv0(x)), 0.2)
        y = F.leaky_relu(self.norm1(self.conv1(y)), 0.2)
        return (y + self.skip(F.avg_pool2d(x, 2))) * (1 / math.sqrt(2))


class _LevelHead(nn.Module):
    """Pyramid level -> one w-sized vector per layer it serves (pSp's map2style, made small:
    pool to 4x4, one hidden dense layer, then a dense output per layer)."""

    def __init__(self, channels: int, hidden: int, w_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.w_dim = w_dim
        self.hidden = nn.Linear(channels * 16, hidden)
        self.out = nn.Linear(hidden, num_layers * w_dim)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, num_layers, w_dim]
        x = F.adaptive_avg_pool2d(feature, 4).flatten(1)
        x = F.leaky_relu(self.hidden(x), 0.2)
        return self.out(x).reshape(-1, self.num_layers, self.w_dim)


class StyleGANEncoder(nn.Module):
    """Images ``[B, C, H, W]`` in [-1, 1] -> ``w_plus [B, num_ws, w_dim]`` (e4e parametrisation).

    ``w_plus[:, i] = w_avg + w_base + delta_i`` with ``delta_0 = 0``; ``w_avg`` is a buffer copied
    from the generator (``encoder.w_avg.copy_(G.mapping.w_avg)``). The output heads start at zero,
    so an untrained encoder returns ``w_avg`` for every image.
    """

    def __init__(
        self,
        num_ws: int,  # ws of the generator (G.num_ws)
        w_dim: int,  # width of w (G.w_dim)
        img_resolution: int,  # the generator's output resolution
        img_channels: int = 3,  # image channels
        input_resolution: int | None = None,  # side the encoder reads; None = min(img_resolution, 256)
        channel_base: int = 4096,  # channels at resolution r: min(channel_base // r, channel_max)
        channel_max: int = 256,  # maximum channels of any stage
        hidden: int | None = None,  # width of the heads' hidden layer; None = max(w_dim, 64)
        groups: int = 8,  # GroupNorm groups (batch-independent, like the evaluator)
    ) -> None:
        super().__init__()
        if input_resolution is None:
            input_resolution = min(img_resolution, 256)
        if input_resolution < 8 or input_resolution & (input_resolution - 1):
            raise ValueError(f"input_resolution must be a power of two >= 8, got {input_resolution}")
        if num_ws < 1 or w_dim < 1:
            raise ValueError(f"num_ws and w_dim must be positive, got {num_ws}, {w_dim}")
        self._init_kwargs = dict(num_ws=num_ws, w_dim=w_dim, img_resolution=img_resolution,
                                 img_channels=img_channels, input_resolution=input_resolution,
                                 channel_base=channel_base, channel_max=channel_max, hidden=hidden, groups=groups)
        self.num_ws = num_ws
        self.w_dim = w_dim
        self.input_resolution = input_resolution
        hidden = hidden or max(w_dim, 64)

        def channels(res: int) -> int:
            return max(8, min(channel_base // res, channel_max))

        # Backbone: stem at the input resolution, then residual blocks down to 4x4.
        self.stem = nn.Conv2d(img_channels, channels(input_resolution), 3, padding=1)
        self.stem_norm = nn.GroupNorm(min(groups, channels(input_resolution)), channels(input_resolution))
        self.block_resolutions = [2**k for k in range(int(math.log2(input_resolution)) - 1, 1, -1)]
        self.blocks = nn.ModuleList(
            _DownBlock(channels(2 * res), channels(res), groups) for res in self.block_resolutions)

        # Feature pyramid (pSp / FPN): levels 4, 8, 16 px where the input reaches them; each
        # finer level adds a 1x1 lateral projection to the upsampled coarser one.
        self.level_resolutions = [r for r in (4, 8, 16) if r <= input_resolution]
        top = channels(4)
        self.laterals = nn.ModuleDict({str(r): nn.Conv2d(channels(r), top, 1) for r in self.level_resolutions[1:]})

        # Which level serves which w: coarse (<= 8 px) -> 4x4, middle (<= 32 px) -> 8x8, fine -> 16x16.
        levels = []
        for i in range(num_ws):
            res = ws_resolution(i)
            want = 4 if res <= 8 else 8 if res <= 32 else 16
            levels.append(max(r for r in self.level_resolutions if r <= want))
        self.ws_levels = levels
        self.heads = nn.ModuleDict({
            str(r): _LevelHead(top, hidden, w_dim, levels.count(r)) for r in self.level_resolutions if r in levels})
        for head in self.heads.values():  # start at w_avg: zero outputs
            nn.init.zeros_(head.out.weight)
            nn.init.zeros_(head.out.bias)
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments: ``StyleGANEncoder(**enc.init_kwargs)`` rebuilds it."""
        return copy.deepcopy(self._init_kwargs)

    def pyramid(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Pyramid features ``{resolution: [B, C_top, r, r]}``."""
        x = images.to(self.stem.weight.dtype)
        if x.shape[-1] != self.input_resolution or x.shape[-2] != self.input_resolution:
            x = F.interpolate(x, size=(self.input_resolution, self.input_resolution), mode="bilinear",
                              antialias=True, align_corners=False)
        x = F.leaky_relu(self.stem_norm(self.stem(x)), 0.2)
        features = {self.input_resolution: x}
        for res, block in zip(self.block_resolutions, self.blocks):
            x = block(x)
            features[res] = x
        levels = {4: features[4]}
        for res in self.level_resolutions[1:]:
            up = F.interpolate(levels[res // 2], scale_factor=2, mode="nearest")
            levels[res] = self.laterals[str(res)](features[res]) + up
        return levels

    def forward(
        self,
        images: torch.Tensor,  # [B, img_channels, H, W] in [-1, 1]
        *,
        num_offsets: int | None = None,  # e4e progressive training: only deltas 1..num_offsets; None = all
        return_deltas: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``w_plus [B, num_ws, w_dim]`` (and ``deltas [B, num_ws - 1, w_dim]`` when asked)."""
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
        return self.from_levels(self.pyramid(images), num_offsets=num_offsets, return_deltas=return_deltas)

    def from_levels(self, levels: dict[int, torch.Tensor], *, num_offsets: int | None = None,
                    return_deltas: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The heads on :meth:`pyramid` features: ``w_plus`` (and ``deltas`` when asked)."""
        top = levels[4]
        raw = torch.empty(top.shape[0], self.num_ws, self.w_dim, device=top.device, dtype=top.dtype)
        for res_key, head in self.heads.items():
            idx = [i for i, r in enumerate(self.ws_levels) if r == int(res_key)]
            raw[:, idx] = head(levels[int(res_key)])
        base = raw[:, :1]                                   # [B, 1, w_dim]
        deltas = raw[:, 1:]                                 # [B, num_ws - 1, w_dim]
        if num_offsets is not None and num_offsets < deltas.shape[1]:
            keep = (torch.arange(deltas.shape[1], device=deltas.device) < num_offsets).to(deltas.dtype)
            deltas = deltas * keep[None, :, None]
        w_plus = self.w_avg.to(base.dtype) + base + torch.cat([torch.zeros_like(base), deltas], dim=1)
        return (w_plus, deltas) if return_deltas else w_plus
