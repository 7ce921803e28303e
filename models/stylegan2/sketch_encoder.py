"""The sketch encoder of AniFaceDrawing: sketches into StyleGAN's W+ space.

Huang et al. 2023, "AniFaceDrawing: Anime Portrait Exploration during Your Sketching": a student
encoder reads a (possibly unfinished) sketch and predicts W+; in training its latents on the
layers that carry structure are aligned with the latents that an image encoder (the teacher)
gives the finished portrait, so strokes map to structure ("stroke-level disentanglement") and the
fine layers (colour, texture) are left to a seed or a reference image.

The network is the studio's e4e-style encoder (:class:`~models.stylegan2.encoder.StyleGANEncoder`)
reading one channel. Its input is a sketch ``[B, 1, H, W]`` in [-1, 1] with white paper (+1) and
black ink (-1); it reads "ink" ``(1 - x) / 2`` so that the paper is zero, like the convolutions'
zero padding.

Pure ``nn.Module``: no I/O.
"""

from __future__ import annotations

from typing import Any

import torch

from .encoder import StyleGANEncoder, ws_resolution

__all__ = ["SketchEncoder", "default_structure_layers"]


def default_structure_layers(num_ws: int, img_resolution: int) -> int:
    """The leading ws that carry structure: those read at up to ``min(32, img_resolution / 2)``
    pixels (StyleGAN's coarse and middle styles), at least 1 and leaving at least one fine w.

    With the studio's :func:`ws_resolution`: 7 of 18 ws at 1024 px, 7 of 10 at 64 px, 3 of 6 at 16 px.
    """
    limit = min(32, img_resolution // 2)
    count = sum(1 for i in range(num_ws) if ws_resolution(i) <= limit)
    return max(1, min(count, num_ws - 1)) if num_ws > 1 else 1


class SketchEncoder(StyleGANEncoder):
    """Sketches ``[B, 1, H, W]`` in [-1, 1] (white paper, black ink) -> ``w_plus [B, num_ws, w_dim]``.

    ``structure_layers`` records how many leading ws the encoder was aligned on (the ws that the
    sketch decides); the pipeline takes the ws after them from a colour seed or a reference.
    """

    def __init__(
        self,
        num_ws: int,  # ws of the generator (G.num_ws)
        w_dim: int,  # width of w (G.w_dim)
        img_resolution: int,  # the generator's output resolution
        input_resolution: int | None = None,  # side of the sketch the encoder reads; None = min(img_resolution, 256)
        channel_base: int = 4096,  # channels at resolution r: min(channel_base // r, channel_max)
        channel_max: int = 256,  # maximum channels of any stage
        hidden: int | None = None,  # width of the heads' hidden layer; None = max(w_dim, 64)
        groups: int = 8,  # GroupNorm groups
        structure_layers: int | None = None,  # leading ws the sketch decides; None = default_structure_layers
    ) -> None:
        super().__init__(num_ws, w_dim, img_resolution, img_channels=1, input_resolution=input_resolution,
                         channel_base=channel_base, channel_max=channel_max, hidden=hidden, groups=groups)
        if structure_layers is None:
            structure_layers = default_structure_layers(num_ws, img_resolution)
        if not 1 <= structure_layers <= num_ws:
            raise ValueError(f"structure_layers must be in 1..{num_ws}, got {structure_layers}")
        self.structure_layers = int(structure_layers)
        kwargs = dict(self._init_kwargs)
        kwargs.pop("img_channels")
        kwargs["structure_layers"] = self.structure_layers
        self._init_kwargs = kwargs

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments: ``SketchEncoder(**enc.init_kwargs)`` rebuilds it."""
        return dict(self._init_kwargs)

    def pyramid(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"sketches must be [B, 1, H, W] in [-1, 1] (white paper, black ink), "
                             f"got {tuple(images.shape)}")
        return super().pyramid((1 - images) * 0.5)
