"""A text-conditioned latent mapper: W+ latent + CLIP text embedding -> latent offset.

The edit of StyleCLIP's latent mapper (Patashnik et al. 2021, Sec. 5), ``w' = w + M(w, t)``,
made text-conditioned as in CLIPInverter (Baykal et al. 2023) and HairCLIP (Wei et al. 2022):
one mapper serves every text, so a single forward pass edits any inverted latent, also for texts
that ask for several attributes at once ("blue hair and glasses").

As in StyleCLIP, the ws are split into coarse (0-3), medium (4-7) and fine (8 and up) groups, each
with its own MLP applied to each of the group's ws.
Every layer of an MLP is ``linear -> LayerNorm (no affine) -> FiLM(t) -> leaky ReLU``, where the
FiLM scale and shift come from the text embedding (Perez et al. 2018; HairCLIP's modulation
module). The output layer starts at zero, so an untrained mapper is the identity edit.

Inputs are standardised with the generator's ``w_avg`` and W spread (buffers set by the training
script), so the same hyperparameters suit generators of any scale. Pure ``nn.Module``: no I/O;
saving and loading live in ``pipelines/clip_edit.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLIPTextMapper", "FiLMLayer", "GroupMapper", "default_groups"]

GROUP_NAMES = ("coarse", "medium", "fine")


def default_groups(num_ws: int) -> list[list[int]]:
    """StyleCLIP's coarse / medium / fine split of ``range(num_ws)``: ws 0-3, 4-7 and 8 onwards
    (the StyleGAN paper's 4-8 px, 16-32 px and 64+ px styles, two ws per resolution). A small
    generator's groups may be empty (a 16-px one, with 6 ws, has no fine ws)."""
    return [[i for i in range(num_ws) if i < 4], [i for i in range(num_ws) if 4 <= i < 8],
            [i for i in range(num_ws) if i >= 8]]


class FiLMLayer(nn.Module):
    """``leaky_relu(FiLM_t(LayerNorm(linear(x))))`` with ``FiLM_t(h) = h * (1 + gamma(t)) + beta(t)``."""

    def __init__(self, in_features: int, out_features: int, text_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.norm = nn.LayerNorm(out_features, elementwise_affine=False)
        self.gamma = nn.Sequential(nn.Linear(text_dim, out_features), nn.LeakyReLU(0.2),
                                   nn.Linear(out_features, out_features))
        self.beta = nn.Sequential(nn.Linear(text_dim, out_features), nn.LeakyReLU(0.2),
                                  nn.Linear(out_features, out_features))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # x: [B, L, in], t: [B, text_dim] -> [B, L, out]
        h = self.norm(self.linear(x))
        h = h * (1 + self.gamma(t)[:, None]) + self.beta(t)[:, None]
        return F.leaky_relu(h, 0.2)


class GroupMapper(nn.Module):
    """The MLP of one layer group: ``num_layers`` FiLM layers and a zero-initialised output."""

    def __init__(self, w_dim: int, text_dim: int, hidden: int, num_layers: int) -> None:
        super().__init__()
        dims = [w_dim] + [hidden] * num_layers
        self.layers = nn.ModuleList(FiLMLayer(a, b, text_dim) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(hidden, w_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # [B, L, w_dim] -> [B, L, w_dim]
        for layer in self.layers:
            x = layer(x, t)
        return self.out(x)


class CLIPTextMapper(nn.Module):
    """``delta = M(w_plus, t)``: per-group FiLM MLPs on standardised ws (see the module docstring).

    :attr:`init_kwargs` holds the constructor arguments, so a config rebuilds the same network.
    """

    def __init__(
        self,
        num_ws: int,  # ws of the generator's W+ latent
        w_dim: int,  # width of each w
        text_dim: int,  # width of the CLIP text embedding (the CLIP's embed_dim)
        hidden: int | None = None,  # width of the MLPs, None = w_dim
        num_layers: int = 4,  # FiLM layers per group (StyleCLIP's mapper: 4)
        groups: Sequence[Sequence[int]] | None = None,  # ws of each group, None = default_groups(num_ws)
        edit_groups: Sequence[str] = GROUP_NAMES,  # groups that may change; the others keep their ws
    ) -> None:
        super().__init__()
        groups = [list(g) for g in (groups if groups is not None else default_groups(num_ws))]
        if len(groups) != len(GROUP_NAMES):
            raise ValueError(f"groups must list {len(GROUP_NAMES)} groups of ws, got {len(groups)}")
        flat = sorted(i for g in groups for i in g)
        if flat != list(range(num_ws)):
            raise ValueError(f"groups must split range({num_ws}) exactly, got {groups}")
        unknown = set(edit_groups) - set(GROUP_NAMES)
        if unknown:
            raise ValueError(f"edit_groups must be among {GROUP_NAMES}, got {sorted(unknown)}")
        hidden = hidden or w_dim
        self._init_kwargs = dict(num_ws=num_ws, w_dim=w_dim, text_dim=text_dim, hidden=hidden,
                                 num_layers=num_layers, groups=groups, edit_groups=list(edit_groups))
        self.num_ws, self.w_dim, self.text_dim = num_ws, w_dim, text_dim
        self.groups = groups
        self.mappers = nn.ModuleDict({name: GroupMapper(w_dim, text_dim, hidden, num_layers)
                                      for name, ws in zip(GROUP_NAMES, groups) if ws and name in edit_groups})
        # W statistics of the generator (set by the training script): the mean w and the standard
        # deviation of one w dimension. Inputs are standardised with them and outputs scaled back,
        # so the MLPs work in units of the W spread whatever the generator.
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.register_buffer("w_std", torch.ones([]))

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return copy.deepcopy(self._init_kwargs)

    def forward(self, w_plus: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``w_plus`` ``[B, num_ws, w_dim]``, ``text`` ``[B, text_dim]`` (or ``[text_dim]``) -> the
        offset ``[B, num_ws, w_dim]`` (zero on the ws of groups that are not edited)."""
        if w_plus.ndim != 3 or w_plus.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"w_plus must be [B, {self.num_ws}, {self.w_dim}], got {tuple(w_plus.shape)}")
        if text.ndim == 1:
            text = text.expand(w_plus.shape[0], -1)
        if text.ndim != 2 or text.shape[1] != self.text_dim or text.shape[0] != w_plus.shape[0]:
            raise ValueError(f"text must be [{w_plus.shape[0]}, {self.text_dim}], got {tuple(text.shape)}")
        x = (w_plus - self.w_avg) / self.w_std                        # [B, num_ws, w_dim]
        t = text.to(x.dtype)
        delta = torch.zeros_like(x)
        for name, ws in zip(GROUP_NAMES, self.groups):
            if name in self.mappers:
                delta[:, ws] = self.mappers[name](x[:, ws], t)
        return delta * self.w_std

    def edit(self, w_plus: torch.Tensor, text: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The edited latent ``w_plus + strength * M(w_plus, text)``."""
        return w_plus + strength * self(w_plus, text)
