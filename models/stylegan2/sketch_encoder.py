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

An unfinished sketch has many finished portraits. With ``completion_dim > 0`` the encoder is
also a conditional VAE over them (Kingma & Welling 2014; Sohn et al. 2015): a code ``z`` of that
size, read with a summary of the sketch by the completion head, moves the structure ws from the
encoder's mean prediction to one finished portrait. In training ``z`` comes from the posterior
head, which sees what the mean prediction missed (the target's structure ws minus it), under a
KL penalty towards the prior; at inference ``z`` is drawn from the prior (one per candidate), or is
its mean. A complete sketch leaves ``z`` little to say beyond what no sketch shows (skin tone, hair
colour); a half-finished one leaves it the rest (hair, glasses, accessories).

The prior is N(0, I) (``completion_prior='standard'``) or, as in Sohn et al.'s CVAE and the
probabilistic U-Net (Kohl et al. 2018), a Gaussian read from the sketch by a prior head
(``'learned'``): N(mu(sketch), sigma(sketch)^2). With the standard prior, whatever the posterior
puts in the code comes out at random whatever the sketch hints: a half-drawn face's raised brows
say "surprised", but a code drawn from N(0, I) picks any expression. The learned prior learns
which codes a sketch makes likely. Either way the caller's ``z`` is a standard normal draw that
the prior maps to a code (``mu + sigma * z``).

Pure ``nn.Module``: no I/O.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
        completion_dim: int = 0,  # size of the completion code z (conditional VAE); 0 = a deterministic encoder
        completion_prior: str = "standard",  # the code's prior: 'standard' N(0, I) or 'learned' from the sketch
    ) -> None:
        super().__init__(num_ws, w_dim, img_resolution, img_channels=1, input_resolution=input_resolution,
                         channel_base=channel_base, channel_max=channel_max, hidden=hidden, groups=groups)
        if structure_layers is None:
            structure_layers = default_structure_layers(num_ws, img_resolution)
        if not 1 <= structure_layers <= num_ws:
            raise ValueError(f"structure_layers must be in 1..{num_ws}, got {structure_layers}")
        self.structure_layers = int(structure_layers)
        if isinstance(completion_dim, bool) or not isinstance(completion_dim, int) or completion_dim < 0:
            raise ValueError(f"completion_dim must be an int >= 0, got {completion_dim!r}")
        self.completion_dim = completion_dim
        if completion_prior not in ("standard", "learned"):
            raise ValueError(f"completion_prior must be 'standard' or 'learned', got {completion_prior!r}")
        if completion_prior == "learned" and not completion_dim:
            raise ValueError("completion_prior 'learned' needs a completion code (completion_dim > 0)")
        self.completion_prior = completion_prior
        kwargs = dict(self._init_kwargs)
        kwargs.pop("img_channels")
        kwargs["structure_layers"] = self.structure_layers
        if completion_dim:  # folders of deterministic encoders keep their config as it was
            kwargs["completion_dim"] = completion_dim
        if completion_prior != "standard":
            kwargs["completion_prior"] = completion_prior
        self._init_kwargs = kwargs
        if completion_dim:
            summary = next(iter(self.heads.values())).hidden.in_features // 16  # pyramid channels
            width = max(2 * self.w_dim, 128)
            size = self.structure_layers * self.w_dim
            self.completion = nn.Sequential(nn.Linear(completion_dim + summary, width), nn.LeakyReLU(0.2),
                                            nn.Linear(width, size))
            nn.init.zeros_(self.completion[-1].weight)  # starts at the mean prediction
            nn.init.zeros_(self.completion[-1].bias)
            self.posterior = nn.Sequential(nn.Linear(size + summary, width), nn.LeakyReLU(0.2),
                                           nn.Linear(width, 2 * completion_dim))
        if completion_prior == "learned":
            self.prior = nn.Sequential(nn.Linear(size + summary, width), nn.LeakyReLU(0.2),
                                       nn.Linear(width, 2 * completion_dim))
            nn.init.zeros_(self.prior[-1].weight)  # starts as N(0, I), the standard prior
            nn.init.zeros_(self.prior[-1].bias)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments: ``SketchEncoder(**enc.init_kwargs)`` rebuilds it."""
        return dict(self._init_kwargs)

    def pyramid(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"sketches must be [B, 1, H, W] in [-1, 1] (white paper, black ink), "
                             f"got {tuple(images.shape)}")
        return super().pyramid((1 - images) * 0.5)

    def mean_and_summary(self, sketches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean prediction ``w_plus [B, num_ws, w_dim]`` and the sketch summary ``[B, C]`` (the
        finest pyramid level, pooled) that the completion and posterior heads read."""
        levels = self.pyramid(sketches)
        summary = F.adaptive_avg_pool2d(levels[self.level_resolutions[-1]], 1).flatten(1)
        return self.from_levels(levels), summary

    def complete(self, w_mean: torch.Tensor, summary: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``w_mean`` with its structure ws moved by the completion head for codes ``z [B, completion_dim]``."""
        if not self.completion_dim:
            raise ValueError("this sketch encoder has no completion code (completion_dim 0)")
        if z.ndim != 2 or z.shape[1] != self.completion_dim:
            raise ValueError(f"z must be [B, {self.completion_dim}], got {tuple(z.shape)}")
        k = self.structure_layers
        offset = self.completion(torch.cat([z.to(summary), summary.expand(z.shape[0], -1)], dim=1))
        head = w_mean[:, :k].expand(z.shape[0], -1, -1) + offset.reshape(-1, k, self.w_dim)
        return torch.cat([head, w_mean[:, k:].expand(z.shape[0], -1, -1)], dim=1)

    def posterior_params(self, summary: torch.Tensor, missed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` ``[B, completion_dim]`` of q(z | sketch, what the mean missed); ``missed``
        is the target's structure ws minus the mean prediction's, ``[B, structure_layers, w_dim]``."""
        out = self.posterior(torch.cat([missed.flatten(1), summary], dim=1))
        mu, logvar = out.chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 4.0)

    def prior_params(self, w_mean: torch.Tensor, summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` ``[B, completion_dim]`` of the prior p(z | sketch): zeros for the
        standard prior; the prior head's reading of the mean prediction's structure ws and the
        summary for a learned one."""
        if not self.completion_dim:
            raise ValueError("this sketch encoder has no completion code (completion_dim 0)")
        if self.completion_prior == "standard":
            zeros = summary.new_zeros(summary.shape[0], self.completion_dim)
            return zeros, zeros
        out = self.prior(torch.cat([w_mean[:, :self.structure_layers].flatten(1), summary], dim=1))
        mu, logvar = out.chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 4.0)

    def prior_code(self, w_mean: torch.Tensor, summary: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Codes ``[N, completion_dim]`` from standard normal draws ``eps``: ``mu + sigma * eps`` of
        the prior (``eps`` itself for the standard prior)."""
        if self.completion_prior == "standard":
            return eps
        mu, logvar = self.prior_params(w_mean, summary)
        return mu + torch.exp(0.5 * logvar) * eps.to(mu)

    def forward(self, images: torch.Tensor, *, z: torch.Tensor | None = None, num_offsets: int | None = None,
                return_deltas: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``w_plus [B, num_ws, w_dim]``; with a completion code, the standard normal draw ``z [B,
        completion_dim]`` picks one finished portrait through the prior (default: ``z = 0``, the
        prior's mean). A single sketch ``[1, 1, H, W]`` with ``z [N, completion_dim]`` gives N latents."""
        if z is not None and not self.completion_dim:
            raise ValueError("this sketch encoder has no completion code (completion_dim 0)")
        if z is not None and (return_deltas or num_offsets is not None):
            raise ValueError("a completion code z applies to whole latents: drop return_deltas / num_offsets")
        if not self.completion_dim or return_deltas or num_offsets is not None:
            return super().forward(images, num_offsets=num_offsets, return_deltas=return_deltas)
        w_mean, summary = self.mean_and_summary(images)
        if z is None:
            z = torch.zeros(images.shape[0], self.completion_dim, device=w_mean.device, dtype=w_mean.dtype)
        if z.ndim != 2 or z.shape[1] != self.completion_dim:
            raise ValueError(f"z must be [B, {self.completion_dim}], got {tuple(z.shape)}")
        return self.complete(w_mean, summary, self.prior_code(w_mean, summary, z))
