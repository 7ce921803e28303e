"""CLIP-guided edits of a StyleGAN2 latent: latent optimisation, global directions, a text mapper.

- :func:`optimise_edit`: StyleCLIP latent optimisation (Patashnik et al. 2021, Sec. 4): Adam on the
  W+ latent against ``D_CLIP(G(w), t) + l2_weight * ||w - w_s||^2 + preservation``. The CLIP term
  is StyleCLIP's plain cosine loss ``1 - cos(E_I(G(w)), E_T(t))`` by default: it is well defined
  at the source latent (the directional loss of StyleGAN-NADA, ``clip_loss="directional"``, is
  undefined there, where the image has not moved yet) and it is the term the CLIP score reports.
  What the text does not mention is kept by the evaluator instead of StyleCLIP's face-identity
  net: the cross-entropy of its reading of every unmentioned attribute against the source's
  reading (``preservation="attributes"``), or its LPIPS-like feature distance ("features").
- :class:`GlobalDirections`: StyleCLIP global directions (Sec. 6): the CLIP image-embedding change
  ``Δi_c`` of each style channel, measured once per (generator, CLIP); a text difference ``Δt``
  becomes the style offset ``Δs_c = α σ_c (Δi_c·Δt) / max|Δi·Δt|`` on the channels with
  ``|Δi_c·Δt| >= β`` (the disentanglement threshold).
- :func:`mapper_edit` with :class:`models.clip_mapper.CLIPTextMapper`: a text-conditioned mapper
  (CLIPInverter / HairCLIP style), trained once by ``pipelines/training/train_clip_mapper.py``,
  that edits a latent in one forward pass.
- :class:`StyleSpace`: the generator's style vectors ``s`` (the outputs of every synthesis
  layer's affine, Wu et al. 2021, "StyleSpace Analysis") and synthesis with per-layer style
  offsets, done with forward hooks on the affine modules, so ``models/`` stays untouched and a
  zero offset reproduces ``G.synthesis`` bit for bit.

The façade the CLIP edit tab calls (chained edits with an undo history, CLIP scores, warnings)
is :class:`pipelines.clip_edit_session.CLIPEditor`. No gradio here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.clip_mapper import CLIPTextMapper
from models.stylegan2 import Generator
from pipelines.clip_models import PROMPT_TEMPLATES, image_features, text_features, tokenize, value_phrases
from pipelines.data.portrait_world import ATTRIBUTES, caption_attributes
from pipelines.images import tensor_to_pil
from pipelines.stylegan_editing import sample_w, style_layers
from pipelines.stylegan_inversion import EvaluatorPerceptualLoss, _frozen, noise_override, w_statistics

__all__ = [
    "CLIP_EDIT_METHODS",
    "DOUBLE_EDITS",
    "SINGLE_EDITS",
    "MAPPER_ARCHITECTURE",
    "NEUTRAL_TEXT",
    "CLIPEditResult",
    "GlobalDirections",
    "StyleSpace",
    "TextEmbedding",
    "clip_probe",
    "clip_scores",
    "edit_phrase",
    "global_edit",
    "load_mapper",
    "measure_edits",
    "mentioned_attributes",
    "mapper_edit",
    "optimise_edit",
    "probe_similarity",
    "prompts_for",
    "save_mapper",
    "text_direction",
    "text_embedding",
    "unknown_words",
    "world_vocabulary",
]

Callback = Callable[[int, int, "Image.Image | None"], None]
CLIP_EDIT_METHODS = ("optimise", "global", "mapper")
MAPPER_ARCHITECTURE = "clip-text-mapper"
NEUTRAL_TEXT = "an anime portrait"        # the neutral text of global directions when none is given
GLOBAL_DIRECTIONS_FILE = "relevance.safetensors"
PROBE_TEXTS = ("an anime portrait", "blue hair", "glasses", "a smile")
PROBE_MATCH = 0.99                        # mean probe cosine above which two CLIPs count as the same
# The edits the benchmark and the mapper's held-out figures measure: one and two attributes.
SINGLE_EDITS: tuple[dict[str, str], ...] = (
    {"hair_color": "blue"}, {"hair_color": "pink"}, {"hair_color": "blonde"}, {"glasses": "yes"},
    {"expression": "smile"}, {"accessory": "hat"}, {"bangs": "yes"}, {"eye_color": "green"},
)
DOUBLE_EDITS: tuple[dict[str, str], ...] = (
    {"hair_color": "blue", "glasses": "yes"}, {"hair_color": "pink", "accessory": "hat"},
    {"expression": "smile", "glasses": "yes"}, {"hair_color": "blonde", "bangs": "yes"},
    {"accessory": "hat", "expression": "smile"}, {"eye_color": "green", "hair_color": "silver"},
)


# ---------------------------------------------------------------------------------------------
# Style space
# ---------------------------------------------------------------------------------------------


class StyleSpace:
    """The style space S of a generator: one vector per synthesis layer, the output of its affine.

    ``include_torgb`` adds the toRGB layers' styles (the affine output, before the toRGB weight
    gain). Offsets are added to the affine outputs by forward hooks while :meth:`offsets` is
    active; as the hooks sit on G's own modules, a generator must not render for two requests at
    once inside it (the studio runs model events one at a time on its GPU queue).
    """

    def __init__(self, G: Generator, *, include_torgb: bool = True) -> None:
        self.G = G
        self.include_torgb = include_torgb
        self.layers = style_layers(G, include_torgb=include_torgb)          # [(w_idx, name, affine)]
        self.names = [name for _, name, _ in self.layers]
        self.channels = [int(affine.out_features) for _, _, affine in self.layers]
        self.num_channels = sum(self.channels)

    def styles(self, w_plus: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{layer name: s [B, C]}`` for ``w_plus [B, num_ws, w_dim]``; keeps gradients."""
        return {name: affine(w_plus[:, w_idx].float()) for w_idx, name, affine in self.layers}

    def flatten(self, per_layer: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-layer tensors ``[..., C_l]`` -> ``[..., num_channels]`` (missing layers are zero)."""
        ref = next(iter(per_layer.values()))
        parts = [per_layer[n] if n in per_layer else ref.new_zeros(*ref.shape[:-1], c)
                 for n, c in zip(self.names, self.channels)]
        return torch.cat(parts, dim=-1)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[..., num_channels]`` -> ``{layer name: [..., C_l]}``."""
        if flat.shape[-1] != self.num_channels:
            raise ValueError(f"expected [..., {self.num_channels}] style channels, got {tuple(flat.shape)}")
        return dict(zip(self.names, flat.split(self.channels, dim=-1)))

    @contextlib.contextmanager
    def offsets(self, offsets: Mapping[str, torch.Tensor] | None) -> Iterator[Generator]:
        """Inside the block, ``G`` adds ``offsets[name]`` (``[B, C]``, ``[1, C]`` or ``[C]``) to the
        style of layer ``name``. ``None`` or ``{}``: no change."""
        if not offsets:
            yield self.G
            return
        modules = {name: affine for _, name, affine in style_layers(self.G, include_torgb=True)}
        unknown = set(offsets) - set(modules)
        if unknown:
            raise ValueError(f"no style layer named {sorted(unknown)}; layers: {list(modules)}")
        handles = []
        try:
            for name, value in offsets.items():
                if value.shape[-1] != modules[name].out_features:
                    raise ValueError(f"offset of {name} must end in {modules[name].out_features} channels, "
                                     f"got {tuple(value.shape)}")

                def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor,
                         value: torch.Tensor = value) -> torch.Tensor:
                    return output + value.to(output)

                handles.append(modules[name].register_forward_hook(hook))
            yield self.G
        finally:
            for handle in handles:
                handle.remove()

    def synthesize(self, w_plus: torch.Tensor, offsets: Mapping[str, torch.Tensor] | None = None,
                   noise: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Images ``[B, C, R, R]`` of ``w_plus`` with style ``offsets``, const (or given) noise."""
        with self.offsets(offsets), noise_override(self.G, noise):
            return self.G.synthesis(w_plus, noise_mode="const")


def _add_offsets(a: Mapping[str, torch.Tensor] | None, b: Mapping[str, torch.Tensor] | None
                 ) -> dict[str, torch.Tensor] | None:
    if not a:
        return dict(b) if b else None
    if not b:
        return dict(a)
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

_DESCRIPTION_WORDS = re.compile(r"\b(portrait|girl|boy|character|woman|man|person|face|anime|photo|picture|"
                                r"image|drawing)\b")
_INSTRUCTION = re.compile(r"^(?:please\s+)?(?:make|give|add|turn|change|put)\s+(?:it|her|him|them|the portrait|"
                          r"the face|the girl)?\s*(?:into\s+|to\s+|with\s+|have\s+)?|^with\s+")
_STOP_WORDS = frozenset(
    "a an the and or with without of in on into to her his its it him them their she he they make give add turn "
    "change put more less some very much please is be have has having wearing look looking".split())


def prompts_for(text: str) -> list[str]:
    """The prompts a text is embedded with. A description ("an anime girl with blue hair") is used
    as it is; a phrase ("blue hair", "make it smile") goes, after a leading instruction is
    dropped, into every template of the studio's zero-shot prompts ("an anime portrait with blue
    hair", ...), and their embeddings are averaged (prompt ensembling, Radford et al. 2021)."""
    t = " ".join(str(text).split())
    if not t:
        raise ValueError("the text is empty")
    if _DESCRIPTION_WORDS.search(t.lower()):
        return [t]
    phrase = _INSTRUCTION.sub("", t, count=1).strip() or t
    return [template.format(phrase) for template in PROMPT_TEMPLATES]


@dataclass
class TextEmbedding:
    """A unit CLIP text embedding and what the user should know about it."""

    vector: torch.Tensor      # [D] float32, unit norm
    prompts: list[str]        # the prompts averaged
    notes: list[str] = field(default_factory=list)  # e.g. truncation


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def text_embedding(clip: Any, text: str) -> TextEmbedding:
    """The unit embedding of ``text`` (templates averaged, see :func:`prompts_for`), with a note
    when the text is longer than the CLIP's context and was truncated."""
    model, tokenizer = clip.model, clip.tokenizer
    prompts = prompts_for(text)
    feats, truncated = text_features(model, tokenizer, prompts)               # [P, D]
    notes = []
    if bool(truncated.any()):
        tokens = tokenize(tokenizer, prompts[:1]).tokens
        kept = ""
        decode = getattr(tokenizer, "decode", None)
        if callable(decode):
            with contextlib.suppress(Exception):
                ids = [int(i) for i in tokens[0] if int(i) != 0][1:-1]
                kept = decode(ids).strip()
        notes.append(f"the text is longer than CLIP's context of {tokens.shape[-1]} tokens and was truncated"
                     + (f"; CLIP read only “{kept}”" if kept else ""))
    return TextEmbedding(F.normalize(F.normalize(feats, dim=-1).mean(0), dim=0), prompts, notes)


def text_direction(clip: Any, target: str, neutral: str | None = None) -> TextEmbedding:
    """``Δt``: the unit difference of the target and neutral text embeddings (StyleCLIP Sec. 6).
    The neutral text defaults to :data:`NEUTRAL_TEXT` ("an anime portrait")."""
    t = text_embedding(clip, target)
    n = text_embedding(clip, neutral if neutral and neutral.strip() else NEUTRAL_TEXT)
    delta = t.vector - n.vector
    if float(delta.norm()) < 1e-6:
        raise ValueError("the target and neutral texts mean the same to CLIP; say what should change")
    return TextEmbedding(F.normalize(delta, dim=0), t.prompts + n.prompts, t.notes + n.notes)


def clip_scores(clip: Any, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CLIP score ``[B]``: the cosine of each image's embedding with the unit text embedding ``[D]``."""
    return image_features(clip.model, images) @ text.to(_device_of(clip.model))


@lru_cache(maxsize=1)
def world_vocabulary() -> frozenset[str]:
    """The words of the portrait world's captions and prompts: all the embedded CLIP ever read."""
    from pipelines.data.portrait_world import PortraitWorld

    world, rng = PortraitWorld(), np.random.default_rng(0)
    texts = [world.caption(world.sample_attributes(rng, split="any"), rng) for _ in range(3000)]
    texts += [t.format(p) for name, values in ATTRIBUTES.items() for v in values
              for p in value_phrases(name, v) for t in PROMPT_TEMPLATES]
    return frozenset(w for t in texts for w in re.findall(r"[a-z]+", t.lower()))


def unknown_words(text: str, vocabulary: frozenset[str] | set[str]) -> list[str]:
    """Words of ``text`` outside ``vocabulary`` (small function words and instructions excepted)."""
    words = re.findall(r"[a-z]+", text.lower())
    return sorted({w for w in words if w not in vocabulary and w not in _STOP_WORDS})


_GENERIC_WORDS = frozenset("a an no with in her hair eyes skin background".split())


def mentioned_attributes(text: str) -> set[str]:
    """The attributes a text asks about: those the portrait world's caption parser finds ("blue
    hair" -> hair colour); when it finds none ("make the hair blue"), every attribute one of whose
    value words occurs in the text (blue -> hair and eye colour), so preservation never fights
    the edit."""
    found = set(caption_attributes(text))
    if found:
        return found
    word = r"[a-z]+(?:-[a-z]+)*"                    # "sky-blue" is one word, not "sky" and "blue"
    words = set(re.findall(word, text.lower()))
    for name, values in ATTRIBUTES.items():
        for value in values:
            for phrase in value_phrases(name, value):
                if (set(re.findall(word, phrase)) - _GENERIC_WORDS) & words:
                    found.add(name)
    return found


def edit_phrase(attribute_values: Mapping[str, str]) -> str:
    """The phrase that asks for ``{attribute: value}`` ("blue hair and glasses")."""
    phrases = [value_phrases(name, value)[0] for name, value in attribute_values.items()]
    if not phrases:
        raise ValueError("no attribute given")
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# CLIP identity: the embeddings of a few probe texts and one probe image. Directions and mappers
# store the probe of the CLIP they were made with; a CLIP matches when its probe agrees (cosine
# above PROBE_MATCH), whatever its precision (fp32, fp16, bf16).
@torch.no_grad()
def clip_probe(clip: Any) -> torch.Tensor:
    """``[P + 1, D]``: unit embeddings of :data:`PROBE_TEXTS` and of a fixed gradient image."""
    texts, _ = text_features(clip.model, clip.tokenizer, list(PROBE_TEXTS))
    ramp = torch.linspace(-1, 1, 64)
    image = torch.stack([ramp[None].expand(64, 64), ramp[:, None].expand(64, 64),
                         (ramp[None] * ramp[:, None])])[None]                      # [1, 3, 64, 64]
    return torch.cat([texts, image_features(clip.model, image)]).float().cpu()


def probe_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of two probes (1.0: the same CLIP); 0.0 when their shapes differ."""
    if a.shape != b.shape:
        return 0.0
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


# ---------------------------------------------------------------------------------------------
# Latent optimisation (StyleCLIP Sec. 4)
# ---------------------------------------------------------------------------------------------


@dataclass
class CLIPEditResult:
    """What one edit of a batch of latents gave."""

    w_plus: torch.Tensor                 # [B, num_ws, w_dim] the edited latents
    images: torch.Tensor                 # [B, C, R, R] in [-1, 1]
    clip_score_before: torch.Tensor      # [B] cosine of the source image with the target text
    clip_score_after: torch.Tensor       # [B] the same for the edited image
    seconds: float                       # wall time of the edit (text encoding and rendering included)
    notes: list[str] = field(default_factory=list)
    loss_history: list[float] = field(default_factory=list)
    style_offsets: dict[str, torch.Tensor] | None = None  # global directions: the offsets added
    num_channels: int | None = None      # global directions: style channels changed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lr_ramp(t: float, rampdown: float = 0.25, rampup: float = 0.05) -> float:
    """The StyleGAN2 projector's / StyleCLIP's learning-rate ramp at progress ``t`` in [0, 1]."""
    ramp = min(1.0, (1.0 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return ramp * min(1.0, t / rampup)


def _evaluator_network(evaluator: Any) -> torch.nn.Module:
    return getattr(evaluator, "network", evaluator)


def _preservation_labels(evaluator: Any, images: torch.Tensor, keep: Sequence[str]) -> dict[str, torch.Tensor]:
    """The evaluator's reading ``[B]`` of each attribute in ``keep`` for ``images``."""
    net = _evaluator_network(evaluator)
    with torch.no_grad():
        logits = net(images.to(_device_of(net))).logits
    return {name: logits[name].argmax(1) for name in keep if name in logits}


def optimise_edit(
    G: Generator,
    clip: Any,  # LoadedCLIP (model, preprocess, tokenizer)
    w_plus: torch.Tensor,  # [B, num_ws, w_dim] the source latents
    target_text: str,
    *,
    neutral_text: str | None = None,  # the 'directional' loss's neutral text (default NEUTRAL_TEXT)
    clip_loss: Literal["cosine", "directional"] = "cosine",
    steps: int = 60,
    lr: float = 0.1,  # peak Adam step, in standard deviations of a w dimension
    l2_weight: float = 0.008,  # StyleCLIP's lambda_L2, on ||w - w_s||^2 in units of the W variance
    preservation: Literal["attributes", "features", "none"] = "attributes",
    preservation_weight: float = 1.0,
    evaluator: Any = None,  # Evaluator / AttributeEvaluator for the preservation term
    style_offsets: Mapping[str, torch.Tensor] | None = None,  # earlier global edits, kept as they are
    noise: Mapping[str, torch.Tensor] | None = None,  # per-image noise maps (optimisation inversions)
    callback: Callback | None = None,
    preview_every: int | None = None,
) -> CLIPEditResult:
    """StyleCLIP latent optimisation (Patashnik et al. 2021, Sec. 4, Eq. 1) in W+.

    ``loss = D_CLIP + l2_weight * ||w - w_s||^2 / var_w + preservation_weight * L_keep`` with
    ``D_CLIP = 1 - cos(E_I(G(w)), E_T(t))`` ('cosine', StyleCLIP) or the directional
    ``1 - cos(E_I(G(w)) - E_I(G(w_s)), E_T(t) - E_T(neutral))`` (StyleGAN-NADA). ``L_keep``:
    'attributes' = mean cross-entropy of the evaluator's logits of every attribute the text does
    not mention against its reading of the source; 'features' = the evaluator-feature distance to
    the source image (:class:`~pipelines.stylegan_inversion.EvaluatorPerceptualLoss`).
    Adam with the projector's cosine learning-rate ramp; the latent is optimised in units of the
    W spread, so ``lr`` and ``l2_weight`` do not depend on the generator's scale.
    """
    # 1. Validate.
    if not str(target_text).strip():
        raise ValueError("the target text is empty: type what the portrait should become, e.g. 'blue hair'")
    if w_plus.ndim != 3 or w_plus.shape[1:] != (G.num_ws, G.w_dim):
        raise ValueError(f"w_plus must be [B, {G.num_ws}, {G.w_dim}], got {tuple(w_plus.shape)}")
    if steps < 1 or not lr > 0:
        raise ValueError(f"steps must be >= 1 and lr positive, got steps={steps}, lr={lr}")
    if clip_loss not in ("cosine", "directional"):
        raise ValueError(f"clip_loss must be 'cosine' or 'directional', got {clip_loss!r}")
    if preservation not in ("attributes", "features", "none"):
        raise ValueError(f"preservation must be 'attributes', 'features' or 'none', got {preservation!r}")
    if preservation != "none" and preservation_weight > 0 and evaluator is None:
        raise ValueError(f"preservation={preservation!r} needs an evaluator; pass one or preservation='none'")
    device = _device_of(G)
    _sync(device)
    t0 = time.perf_counter()
    space = StyleSpace(G)

    with _frozen(G), _frozen(clip.model):
        # 2. Text: the target embedding (and the direction for the directional loss).
        target = text_embedding(clip, target_text)
        notes = list(target.notes)
        direction = text_direction(clip, target_text, neutral_text) if clip_loss == "directional" else None
        text = target.vector.to(device)

        # 3. The source: its image, CLIP embedding and what must be kept.
        source = w_plus.detach().to(device, torch.float32)
        with torch.no_grad():
            source_images = space.synthesize(source, style_offsets, noise)
            source_emb = image_features(clip.model, source_images)                # [B, D]
            score_before = (source_emb @ text).cpu()
        keep_labels: dict[str, torch.Tensor] = {}
        perceptual = None
        if preservation == "attributes" and preservation_weight > 0:
            mentioned = mentioned_attributes(target_text)
            keep = [name for name in ATTRIBUTES if name not in mentioned]
            keep_labels = _preservation_labels(evaluator, source_images, keep)
            if not mentioned:
                notes.append("the text names no attribute the evaluator knows, so every attribute is kept")
        elif preservation == "features" and preservation_weight > 0:
            perceptual = EvaluatorPerceptualLoss(evaluator)
            with torch.no_grad():
                source_acts = [a.detach() for a in perceptual.activations(source_images)]
        _, w_std = w_statistics(G, 2000, torch.Generator(device).manual_seed(0))
        sigma = w_std / math.sqrt(G.w_dim)                                        # std of one w dimension

        # 4. Optimise u = (w - w_s) / sigma.
        u = torch.zeros_like(source, requires_grad=True)
        opt = torch.optim.Adam([u], lr=lr, betas=(0.9, 0.999))
        history: list[float] = []
        every = preview_every or max(1, steps // 10)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * _lr_ramp(step / steps)
            w = source + sigma * u
            images = space.synthesize(w, style_offsets, noise)
            emb = image_features(clip.model, images)                               # [B, D]
            if direction is None:
                loss_clip = 1 - emb @ text
            else:
                moved = F.normalize(emb - source_emb, dim=-1)
                loss_clip = 1 - moved @ direction.vector.to(device)
            loss = loss_clip + l2_weight * u.square().sum((1, 2))                  # [B]
            if keep_labels:
                logits = _evaluator_network(evaluator)(images).logits
                ce = torch.stack([F.cross_entropy(logits[n], y, reduction="none") for n, y in keep_labels.items()])
                loss = loss + preservation_weight * ce.mean(0)
            elif perceptual is not None:
                loss = loss + preservation_weight * perceptual.distance(perceptual.activations(images), source_acts)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            history.append(float(loss.detach().mean()))
            if callback is not None:
                last = step + 1 == steps
                preview = None
                if (step + 1) % every == 0 or last:
                    preview = tensor_to_pil(images[:1].detach())[0]
                callback(step + 1, steps, preview)

        # 5. Result.
        with torch.no_grad():
            w = (source + sigma * u).detach()
            images = space.synthesize(w, style_offsets, noise)
            score_after = (image_features(clip.model, images) @ text).cpu()
    _sync(device)
    return CLIPEditResult(w_plus=w, images=images, clip_score_before=score_before, clip_score_after=score_after,
                          seconds=time.perf_counter() - t0, notes=notes, loss_history=history)


# ---------------------------------------------------------------------------------------------
# Global directions (StyleCLIP Sec. 6)
# ---------------------------------------------------------------------------------------------


@dataclass
class GlobalDirections:
    """The CLIP relevance ``Δi_c`` of every style channel of one generator, for one CLIP."""

    relevance: torch.Tensor              # [C, D] unit CLIP image-embedding change per channel
    style_std: torch.Tensor              # [C] standard deviation of each style channel over W
    layers: list[tuple[str, int]]        # (layer name, channels), in channel order
    probe: torch.Tensor | None = None    # clip_probe() of the CLIP it was measured with
    meta: dict[str, Any] = field(default_factory=dict)  # how it was measured

    @property
    def num_channels(self) -> int:
        return int(self.relevance.shape[0])

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[..., C]`` -> ``{layer name: [..., C_l]}``."""
        return dict(zip([n for n, _ in self.layers], flat.split([c for _, c in self.layers], dim=-1)))

    def check(self, G: Generator, clip: Any | None = None) -> None:
        """Raise ``ValueError`` when these directions do not fit ``G`` (or ``clip``)."""
        space = StyleSpace(G, include_torgb=bool(self.meta.get("include_torgb", False)))
        if [(n, c) for n, c in zip(space.names, space.channels)] != [tuple(x) for x in self.layers]:
            raise ValueError("these global directions were computed for another generator (its style layers differ)")
        if clip is not None and self.probe is not None and probe_similarity(self.probe, clip_probe(clip)) < PROBE_MATCH:
            raise ValueError("these global directions were computed with another CLIP model")

    # -- measuring ----------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def compute(
        cls,
        G: Generator,
        clip: Any,
        *,
        num_samples: int = 32,  # latents per channel (StyleCLIP: 100 image pairs)
        perturbation: float = 5.0,  # s_c is moved by +-perturbation * sigma_c (StyleCLIP: 5)
        truncation_psi: float = 0.7,  # of the sampled latents
        include_torgb: bool = False,  # StyleCLIP manipulates the convolutions' styles only
        channel_batch: int = 4,  # channels rendered per pass: 2 * channel_batch * num_samples images
        batch_size: int = 256,  # images per generator / CLIP forward
        std_samples: int = 4000,  # latents for the style standard deviations
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
    ) -> "GlobalDirections":
        """Measure ``Δi_c`` for every channel (StyleCLIP Sec. 6): render ``num_samples`` latents with
        ``s_c`` moved to ``s_c ± perturbation σ_c``, take the CLIP image-embedding difference of
        each pair (unit), average over the samples and normalise. Costs
        ``2 * num_samples * C`` generator and CLIP forwards (C style channels)."""
        if num_samples < 1 or channel_batch < 1 or batch_size < 1 or not perturbation > 0:
            raise ValueError("num_samples, channel_batch, batch_size and perturbation must be positive")
        device = _device_of(G)
        space = StyleSpace(G, include_torgb=include_torgb)
        with _frozen(G), _frozen(clip.model):
            # 1. Style statistics over W and the latents to perturb.
            w_many = sample_w(G, std_samples, generator=generator)                  # [M, w_dim]
            style_std = torch.cat([affine(w_many).std(0) for _, _, affine in space.layers]).float()  # [C]
            w = sample_w(G, num_samples, truncation_psi=truncation_psi, generator=generator)
            w_plus = w[:, None].expand(-1, G.num_ws, -1)                            # [N, num_ws, w_dim]
            layer_of = torch.repeat_interleave(torch.arange(len(space.names)), torch.tensor(space.channels))
            first = torch.tensor([0] + space.channels).cumsum(0)[:-1]
            relevance = []
            # 2. Channels in batches: rows ordered (channel, sign, sample).
            for start in range(0, space.num_channels, channel_batch):
                chunk = list(range(start, min(start + channel_batch, space.num_channels)))
                rows = 2 * len(chunk) * num_samples
                offsets = {name: torch.zeros(rows, c, device=device) for name, c in zip(space.names, space.channels)}
                for j, c in enumerate(chunk):
                    layer = int(layer_of[c])
                    local = c - int(first[layer])
                    for k, sign in enumerate((-1.0, 1.0)):
                        block = slice((2 * j + k) * num_samples, (2 * j + k + 1) * num_samples)
                        offsets[space.names[layer]][block, local] = sign * perturbation * style_std[c]
                w_rows = w_plus.repeat(2 * len(chunk), 1, 1)
                emb = torch.cat([
                    image_features(clip.model, space.synthesize(
                        w_rows[i:i + batch_size], {n: o[i:i + batch_size] for n, o in offsets.items()}))
                    for i in range(0, rows, batch_size)])                           # [rows, D], unit
                emb = emb.view(len(chunk), 2, num_samples, -1)
                diff = F.normalize(emb[:, 1] - emb[:, 0], dim=-1)                   # [k, N, D]
                relevance.append(F.normalize(diff.mean(1), dim=-1).cpu())
                if callback is not None:
                    callback(chunk[-1] + 1, space.num_channels, None)
            probe = clip_probe(clip)
        meta = {"num_samples": num_samples, "perturbation": perturbation, "truncation_psi": truncation_psi,
                "include_torgb": include_torgb, "std_samples": std_samples}
        return cls(torch.cat(relevance), style_std.cpu(), list(zip(space.names, space.channels)), probe, meta)

    # -- editing ------------------------------------------------------------------------------
    def channel_scores(self, delta_t: torch.Tensor) -> torch.Tensor:
        """``Δi_c · Δt`` for every channel ``[C]``."""
        if delta_t.shape != (self.relevance.shape[1],):
            raise ValueError(f"delta_t must be [{self.relevance.shape[1]}], got {tuple(delta_t.shape)}")
        return self.relevance @ delta_t.to(self.relevance)

    def delta_styles(self, delta_t: torch.Tensor, alpha: float, beta: float) -> tuple[dict[str, torch.Tensor], int]:
        """The style offsets ``{layer: [C_l]}`` of the text direction ``delta_t`` and how many
        channels they change: ``Δs_c = α σ_c r_c / max|r|`` with ``r_c = Δi_c·Δt`` where
        ``|r_c| >= β``, else 0 (StyleCLIP's GetBoundary)."""
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        scores = self.channel_scores(delta_t)
        keep = scores.abs() >= beta
        r = torch.where(keep, scores, torch.zeros_like(scores))
        peak = r.abs().max()
        if peak > 0:
            r = r / peak
        return self.split(alpha * r * self.style_std.to(r)), int(keep.sum())

    def edit(self, styles: Mapping[str, torch.Tensor], delta_t: torch.Tensor, alpha: float,
             beta: float) -> tuple[dict[str, torch.Tensor], int]:
        """Edited styles (``{layer: [B, C_l]}``; layers without directions unchanged) and the
        number of channels changed."""
        offsets, kept = self.delta_styles(delta_t, alpha, beta)
        return {name: s + offsets[name].to(s) if name in offsets else s for name, s in styles.items()}, kept

    # -- files --------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """``relevance.safetensors`` (relevance, style_std, probe) + ``config.json``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"relevance": self.relevance.float().contiguous(), "style_std": self.style_std.float().contiguous()}
        if self.probe is not None:
            tensors["probe"] = self.probe.float().contiguous()
        tmp = folder / (GLOBAL_DIRECTIONS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "kind": "styleclip-global-directions"})
        os.replace(tmp, folder / GLOBAL_DIRECTIONS_FILE)
        config = {"kind": "styleclip-global-directions", "layers": [list(x) for x in self.layers], **self.meta}
        (folder / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "GlobalDirections":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / GLOBAL_DIRECTIONS_FILE).is_file() or not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} holds no {GLOBAL_DIRECTIONS_FILE} + config.json; compute them with "
                                    "`python -m pipelines.training.fit_clip_global_directions`")
        config = json.loads((folder / "config.json").read_text())
        t = load_file(str(folder / GLOBAL_DIRECTIONS_FILE))
        layers = [(str(n), int(c)) for n, c in config.pop("layers")]
        config.pop("kind", None)
        return cls(t["relevance"], t["style_std"], layers, t.get("probe"), config)


# ---------------------------------------------------------------------------------------------
# The text-conditioned mapper
# ---------------------------------------------------------------------------------------------


def save_mapper(mapper: CLIPTextMapper, folder: str | os.PathLike[str], *, probe: torch.Tensor | None = None,
                clip_source: str | None = None, generator_source: str | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (init kwargs, the CLIP and generator it was
    trained for) and, when given, the CLIP probe (``probe.safetensors``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in mapper.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "architecture": MAPPER_ARCHITECTURE})
    os.replace(tmp, folder / "model.safetensors")
    if probe is not None:
        save_file({"probe": probe.float().contiguous()}, str(folder / "probe.safetensors"))
    config = {"architecture": MAPPER_ARCHITECTURE, "init_kwargs": mapper.init_kwargs, "clip": clip_source,
              "generator": generator_source, "prompt_templates": list(PROMPT_TEMPLATES)}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def load_mapper(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu"
                ) -> tuple[CLIPTextMapper, torch.Tensor | None]:
    """``(mapper in eval mode, CLIP probe or None)`` from a folder written by :func:`save_mapper`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not a CLIP mapper folder (needs config.json and model.safetensors); "
                                "train one with `python -m pipelines.training.train_clip_mapper`")
    config = json.loads((folder / "config.json").read_text())
    if config.get("architecture") != MAPPER_ARCHITECTURE:
        raise ValueError(f"{folder}: architecture {config.get('architecture')!r} is not {MAPPER_ARCHITECTURE!r}")
    mapper = CLIPTextMapper(**config["init_kwargs"])
    mapper.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    probe = load_file(str(folder / "probe.safetensors"))["probe"] if (folder / "probe.safetensors").is_file() else None
    return mapper.to(device).eval(), probe


@torch.no_grad()
def mapper_edit(G: Generator, clip: Any, mapper: CLIPTextMapper, w_plus: torch.Tensor, target_text: str, *,
                strength: float = 1.0, style_offsets: Mapping[str, torch.Tensor] | None = None,
                noise: Mapping[str, torch.Tensor] | None = None, score: bool = True) -> CLIPEditResult:
    """Edit ``w_plus [B, num_ws, w_dim]`` toward ``target_text`` in one mapper forward pass.
    ``score=False`` skips the CLIP scores (they cost two CLIP image passes) for timing."""
    if not str(target_text).strip():
        raise ValueError("the target text is empty: type what the portrait should become, e.g. 'blue hair'")
    device = _device_of(G)
    _sync(device)
    t0 = time.perf_counter()
    target = text_embedding(clip, target_text)
    if target.vector.shape[0] != mapper.text_dim:
        raise ValueError(f"the mapper reads {mapper.text_dim}-d text embeddings, this CLIP gives "
                         f"{target.vector.shape[0]}-d ones")
    space = StyleSpace(G)
    source = w_plus.to(device, torch.float32)
    w = mapper.edit(source, target.vector.to(device)[None].expand(source.shape[0], -1), strength)
    images = space.synthesize(w, style_offsets, noise)
    _sync(device)
    seconds = time.perf_counter() - t0
    text = target.vector.to(device)
    before = after = torch.full([source.shape[0]], float("nan"))
    if score:
        before = (image_features(clip.model, space.synthesize(source, style_offsets, noise)) @ text).cpu()
        after = (image_features(clip.model, images) @ text).cpu()
    return CLIPEditResult(w_plus=w, images=images, clip_score_before=before, clip_score_after=after,
                          seconds=seconds, notes=list(target.notes))


@torch.no_grad()
def global_edit(G: Generator, clip: Any, directions: GlobalDirections, w_plus: torch.Tensor, target_text: str, *,
                neutral_text: str | None = None, alpha: float = 4.0, beta: float = 0.1,
                style_offsets: Mapping[str, torch.Tensor] | None = None,
                noise: Mapping[str, torch.Tensor] | None = None) -> CLIPEditResult:
    """Edit ``w_plus [B, num_ws, w_dim]`` with StyleCLIP global directions: the offsets of
    :meth:`GlobalDirections.delta_styles` added to the styles (on top of ``style_offsets``)."""
    if not str(target_text).strip():
        raise ValueError("the target text is empty: type what the portrait should become, e.g. 'blue hair'")
    device = _device_of(G)
    _sync(device)
    t0 = time.perf_counter()
    delta_t = text_direction(clip, target_text, neutral_text)
    delta, kept = directions.delta_styles(delta_t.vector.cpu(), alpha, beta)
    delta = {k: v.to(device)[None] for k, v in delta.items()}
    offsets = _add_offsets(style_offsets, delta)
    space = StyleSpace(G)
    source = w_plus.to(device, torch.float32)
    images = space.synthesize(source, offsets, noise)
    _sync(device)
    seconds = time.perf_counter() - t0
    text = text_embedding(clip, target_text).vector.to(device)
    before = (image_features(clip.model, space.synthesize(source, style_offsets, noise)) @ text).cpu()
    after = (image_features(clip.model, images) @ text).cpu()
    notes = list(delta_t.notes)
    return CLIPEditResult(w_plus=source, images=images, clip_score_before=before, clip_score_after=after,
                          seconds=seconds, notes=notes, style_offsets=offsets, num_channels=kept)


# ---------------------------------------------------------------------------------------------
# Measuring edits with the evaluator
# ---------------------------------------------------------------------------------------------


def measure_edits(evaluator: Any, source_images: torch.Tensor, w_plus: torch.Tensor,
                  edits: Sequence[Mapping[str, str]], apply: Callable[[torch.Tensor, str], CLIPEditResult], *,
                  batch_size: int = 32) -> dict[str, Any]:
    """Edit every latent toward every edit it does not already show and read the results.

    ``source_images`` ``[N, 3, R, R]`` are the renders of ``w_plus`` ``[N, num_ws, w_dim]``;
    ``apply(w_batch, text)`` edits a batch toward :func:`edit_phrase` of an edit. Returns
    ``success`` (the evaluator reads every asked value afterwards), ``preservation`` (the share
    of the other attributes that keep the evaluator's reading), ``clip_gain`` (mean CLIP-score
    change), ``edits`` (how many) and ``per_edit`` figures.
    """
    before = evaluator.predict_attributes(source_images)
    success: list[bool] = []
    preserved: list[float] = []
    gains: list[float] = []
    per_edit: dict[str, dict[str, float]] = {}
    for edit in edits:
        todo = [i for i, r in enumerate(before) if any(r[k] != v for k, v in edit.items())]
        if not todo:
            continue
        text = edit_phrase(edit)
        s_edit, p_edit = [], []
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            result = apply(w_plus[idx], text)
            after = evaluator.predict_attributes(result.images.detach().float().cpu())
            gains += (result.clip_score_after - result.clip_score_before).tolist()
            for i, a in zip(idx, after):
                s_edit.append(all(a[k] == v for k, v in edit.items()))
                others = [name for name in ATTRIBUTES if name not in edit]
                p_edit.append(float(np.mean([a[o] == before[i][o] for o in others])))
        success += s_edit
        preserved += p_edit
        per_edit[text] = {"n": len(s_edit), "success": float(np.mean(s_edit)), "preservation": float(np.mean(p_edit))}
    if not success:
        raise ValueError("every portrait already shows every asked edit; nothing to measure")
    return {"success": float(np.mean(success)), "preservation": float(np.mean(preserved)),
            "clip_gain": float(np.nanmean(gains)) if gains else float("nan"), "edits": len(success),
            "per_edit": per_edit}
