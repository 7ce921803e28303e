"""Negative prompts for one-step students: Negative-Away Steer Attention (NASA).

SNOOPI (Nguyen et al. 2024, "Supercharged One-step Text-to-Image Diffusion Models with Negative
Prompts", arXiv 2412.02687, Sec. 4) steers a one-step generator away from a negative prompt inside
its cross-attention instead of in output space (classifier-free guidance needs several steps to
undo its blending artefacts). For every cross-attention layer, with the image queries Q::

    Z+ = Attention(Q, K+, V+)        keys / values of the prompt
    Z- = Attention(Q, K-, V-)        keys / values of the negative prompt
    Z  = Z+ - scale * Z-             (scale ~ 0.5-1), then the layer's output projection

Self-attention layers are left alone. The method is training-free and costs one extra attention
per cross-attention layer (no second UNet pass).

How the negative prompt reaches the layers: the processor keeps it in ``negative_embeds``
([B or 1, L-, D], set by :func:`nasa` or :func:`enable_nasa`); a call may instead pass it per call as
``cross_attention_kwargs={"negative_encoder_hidden_states": embeds}`` to the UNet, which wins over
the stored one. Without a negative prompt (or with ``scale`` = 0) the processor is plain
scaled-dot-product attention, bit for bit the same as diffusers' ``AttnProcessor2_0``. The
positive branch keeps ``attention_mask``; the negative branch attends to all of its tokens (the
studio's text encoder zeroes padding states, so padded tokens carry no content).

    with nasa(unet, negative_embeds, scale=1.0):
        pred = unet(x, t, encoder_hidden_states=prompt_embeds).sample
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

__all__ = ["NegativeAwaySteerAttnProcessor", "enable_nasa", "disable_nasa", "nasa", "is_nasa_enabled"]

_SAVED_ATTR = "_nasa_original_processors"   # where enable_nasa keeps the processors it replaced


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"NASA scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


class NegativeAwaySteerAttnProcessor:
    """diffusers attention processor computing ``Attn(Q, K+, V+) - scale * Attn(Q, K-, V-)``.

    Args:
        scale: the steering strength alpha (0 = plain attention).
        negative_embeds: the negative prompt's encoder states [B or 1, L-, D], or None.
    """

    def __init__(self, scale: float = 1.0, negative_embeds: torch.Tensor | None = None) -> None:
        self.scale = _check_scale(scale)
        self.negative_embeds = negative_embeds

    def _heads(self, attn, x: torch.Tensor, batch: int) -> torch.Tensor:
        # [B, L, heads * d] -> [B, heads, L, d]
        return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    def _keys_values(self, attn, context: torch.Tensor, batch: int,
                     cross: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, L, D] -> keys, values [B, heads, L, d]
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = self._heads(attn, attn.to_k(context), batch)
        value = self._heads(attn, attn.to_v(context), batch)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return key, value

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 negative_encoder_hidden_states: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        negative = negative_encoder_hidden_states if negative_encoder_hidden_states is not None \
            else self.negative_embeds
        # Self-attention (no encoder states) and scale 0 run plain attention only.
        steer = encoder_hidden_states is not None and negative is not None and self.scale != 0.0

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None \
            else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self._heads(attn, attn.to_q(hidden_states), batch)          # [B, heads, N, d]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if encoder_hidden_states is None:
            key, value = self._keys_values(attn, hidden_states, batch, cross=False)
        else:
            key, value = self._keys_values(attn, encoder_hidden_states, batch)
        # Z+ = softmax(Q K+^T / sqrt(d)) V+
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        if steer:
            if negative.shape[0] not in (1, batch):
                raise ValueError(f"negative prompt states have batch {negative.shape[0]}; expected 1 or {batch}")
            negative = negative.to(query.device, query.dtype).expand(batch, -1, -1)
            neg_key, neg_value = self._keys_values(attn, negative, batch)
            # Z = Z+ - scale * Z-, with Z- = softmax(Q K-^T / sqrt(d)) V-  (SNOOPI, NASA)
            out = out - self.scale * F.scaled_dot_product_attention(query, neg_key, neg_value, dropout_p=0.0,
                                                                    is_causal=False)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)   # output projection
        hidden_states = attn.to_out[1](hidden_states)   # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _cross_attention_names(unet) -> list[str]:
    """Processor names of the cross-attention layers (``Attention.is_cross_attention``)."""
    names = []
    for name, module in unet.named_modules():
        if hasattr(module, "set_processor") and getattr(module, "is_cross_attention", False):
            names.append(f"{name}.processor")
    return names


def is_nasa_enabled(unet) -> bool:
    return hasattr(unet, _SAVED_ATTR)


def enable_nasa(unet, scale: float = 1.0, negative_embeds: torch.Tensor | None = None) -> None:
    """Put a :class:`NegativeAwaySteerAttnProcessor` on every cross-attention layer of ``unet``.

    The replaced processors are kept and put back by :func:`disable_nasa`; enabling twice only
    updates ``scale`` and ``negative_embeds``.
    """
    scale = _check_scale(scale)
    originals = unet.attn_processors                       # name -> processor, every Attention layer
    cross = set(_cross_attention_names(unet))
    if not cross:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers for NASA")
    if is_nasa_enabled(unet):
        for name in cross:
            originals[name].scale = scale
            originals[name].negative_embeds = negative_embeds
        return
    processor = NegativeAwaySteerAttnProcessor(scale, negative_embeds)   # shared by all cross layers
    unet.set_attn_processor({name: processor if name in cross else proc for name, proc in originals.items()})
    setattr(unet, _SAVED_ATTR, originals)


def disable_nasa(unet) -> None:
    """Restore the processors :func:`enable_nasa` replaced (no-op when NASA is off)."""
    originals = getattr(unet, _SAVED_ATTR, None)
    if originals is None:
        return
    unet.set_attn_processor(originals)
    delattr(unet, _SAVED_ATTR)


@contextmanager
def nasa(unet, negative_embeds: torch.Tensor, scale: float = 1.0) -> Iterator[None]:
    """Steer ``unet``'s cross-attention away from ``negative_embeds`` [B or 1, L-, D] inside the block."""
    if is_nasa_enabled(unet):
        raise RuntimeError("NASA is already enabled on this network; nested use is not supported")
    enable_nasa(unet, scale, negative_embeds)
    try:
        yield
    finally:
        disable_nasa(unet)
