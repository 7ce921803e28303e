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

A UNet that also reads the prompt through an attention pooling into its timestep embedding
(diffusers' ``addition_embed_type="text"``, as the studio's teacher and students do) would carry the
negated attribute past the cross-attention. There the same rule steers the pooling: its query (the
prompt's mean token) attends to the prompt and to the negative prompt, and the pooled vector is
``Z+ - scale * Z-`` before the embedding's projection (:class:`NegativeAwaySteerPooling`). This
pooled path uses the negative prompt stored by :func:`nasa` / :func:`enable_nasa`.

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

__all__ = ["NegativeAwaySteerAttnProcessor", "NegativeAwaySteerPooling", "enable_nasa", "disable_nasa", "nasa",
           "is_nasa_enabled"]

_SAVED_ATTR = "_nasa_original_processors"   # where enable_nasa keeps the processors it replaced
_SAVED_POOL = "_nasa_original_pool"         # ... and the text pooling it wrapped


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


class NegativeAwaySteerPooling(torch.nn.Module):
    """NASA for diffusers' ``AttentionPooling`` (the pooling of ``TextTimeEmbedding``).

    Wraps the original pooling ``pool`` (its weights are used as they are) and returns
    ``Attn(q, K+, V+) - scale * Attn(q, K-, V-)`` for the pooled token, where ``q`` is the pooling's
    query from the prompt (its mean token plus the learnt position), ``K+ / V+`` the prompt with that
    token, and ``K- / V-`` the negative prompt's tokens after the same ``norm`` as the prompt's.
    """

    def __init__(self, pool: torch.nn.Module, norm: torch.nn.Module, scale: float,
                 negative_embeds: torch.Tensor | None) -> None:
        super().__init__()
        self.pool, self.norm = pool, norm
        self.scale = _check_scale(scale)
        self.negative_embeds = negative_embeds

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, L, D] -> [B, heads, L, d]
        b, n, d = x.shape
        return x.view(b, n, self.pool.num_heads, d // self.pool.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool, negative = self.pool, self.negative_embeds
        if negative is None or self.scale == 0.0:
            return pool(x)
        b = x.shape[0]
        if negative.shape[0] not in (1, b):
            raise ValueError(f"negative prompt states have batch {negative.shape[0]}; expected 1 or {b}")
        # the pooling's own query (as diffusers' AttentionPooling builds it) against the negative tokens
        cls = x.mean(dim=1, keepdim=True) + pool.positional_embedding.to(x.dtype)       # [B, 1, D]
        negative = self.norm(negative.to(x.device, x.dtype)).expand(b, -1, -1)
        z_neg = F.scaled_dot_product_attention(self._heads(pool.q_proj(cls)), self._heads(pool.k_proj(negative)),
                                               self._heads(pool.v_proj(negative)))      # [B, heads, 1, d]
        return pool(x) - self.scale * z_neg.transpose(1, 2).reshape(b, -1)             # [B, D]


def _text_pooling(unet):
    """The ``TextTimeEmbedding`` of ``unet`` (``addition_embed_type="text"``), or None."""
    embedding = getattr(unet, "add_embedding", None)
    if embedding is not None and hasattr(embedding, "pool") and hasattr(embedding, "norm1"):
        return embedding
    return None


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
    pooling = _text_pooling(unet)
    if is_nasa_enabled(unet):
        for name in cross:
            originals[name].scale = scale
            originals[name].negative_embeds = negative_embeds
        if pooling is not None:
            pooling.pool.scale, pooling.pool.negative_embeds = scale, negative_embeds
        return
    processor = NegativeAwaySteerAttnProcessor(scale, negative_embeds)   # shared by all cross layers
    unet.set_attn_processor({name: processor if name in cross else proc for name, proc in originals.items()})
    setattr(unet, _SAVED_ATTR, originals)
    if pooling is not None:
        setattr(unet, _SAVED_POOL, pooling.pool)
        pooling.pool = NegativeAwaySteerPooling(pooling.pool, pooling.norm1, scale, negative_embeds)


def disable_nasa(unet) -> None:
    """Restore the processors :func:`enable_nasa` replaced (no-op when NASA is off)."""
    originals = getattr(unet, _SAVED_ATTR, None)
    if originals is None:
        return
    unet.set_attn_processor(originals)
    delattr(unet, _SAVED_ATTR)
    pool = getattr(unet, _SAVED_POOL, None)
    if pool is not None:
        _text_pooling(unet).pool = pool
        delattr(unet, _SAVED_POOL)


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
