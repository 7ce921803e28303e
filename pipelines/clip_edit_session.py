"""One CLIP editing session: chained text edits of a StyleGAN latent with an undo history.

No gradio here: the CLIP edit tab (``studio/tabs/clip_edit.py``) keeps a :class:`CLIPEditSession`
per user in ``gr.State`` and calls :class:`CLIPEditor`; the benchmark and the tests call the same
methods. The algorithms live in :mod:`pipelines.clip_edit`.

A chain of edits is a list of :class:`EditStep`: a W+ latent (what optimisation and the mapper
change) plus the style offsets that global directions add, so edits of all three methods chain.
A generator folder may carry what the faster methods need beside its weights:

- ``clip_global_directions/``: the channel relevance of StyleCLIP global directions;
- ``clip_mapper/``: a text-conditioned mapper trained by ``pipelines/training/train_clip_mapper.py``.

Each is used only when it was made with the CLIP at hand (compared by :func:`clip_probe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models.clip_mapper import CLIPTextMapper
from models.stylegan2 import Generator
from pipelines.clip_edit import (CLIP_EDIT_METHODS, PROBE_MATCH, Callback, GlobalDirections, StyleSpace,
                                 clip_probe, global_edit, load_mapper, mapper_edit, mentioned_attributes,
                                 optimise_edit, probe_similarity, unknown_words)
from pipelines.data.portrait_world import ATTRIBUTES
from pipelines.images import tensor_to_pil
from pipelines.stylegan_inversion import _frozen

__all__ = ["CLIPEditOutput", "CLIPEditSession", "CLIPEditor", "EditStep", "SIDE_EFFECT_WARNING"]


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@dataclass
class EditStep:
    """One state of a chain of edits: a W+ latent plus the style offsets of global edits."""

    w_plus: torch.Tensor                               # [1, num_ws, w_dim] float32 on the CPU
    style_offsets: dict[str, torch.Tensor] | None      # {layer: [1, C_l]} on the CPU, None = none
    label: str                                         # 'source: sample (seed 3)', 'mapper: blue hair'
    clip_score: float | None = None                    # with the text of this edit


@dataclass
class CLIPEditSession:
    """What one user's CLIP edits start from and the chain so far (kept in ``gr.State``)."""

    source: Any                                        # the StyleGAN EditSession (generator, PTI weights, noise)
    history: list[EditStep]                            # history[0] is the source; the last is shown

    @property
    def current(self) -> EditStep:
        return self.history[-1]

    @property
    def can_undo(self) -> bool:
        return len(self.history) > 1


@dataclass
class CLIPEditOutput:
    """What :meth:`CLIPEditor.edit` returns."""

    session: CLIPEditSession           # the chain with this edit appended
    image: Image.Image                 # after the edit
    before: Image.Image                # before the edit
    method: str
    clip_score_before: float
    clip_score_after: float
    seconds: float
    notes: list[str] = field(default_factory=list)      # information (truncation, channels changed)
    warnings: list[str] = field(default_factory=list)   # what the user must see (low score, ungrounded text)
    num_channels: int | None = None


# How the warning about attributes the text did not ask for begins (the other warnings say the
# text was not carried out).
SIDE_EFFECT_WARNING = "the edit also changed what the text did not ask for"


class CLIPEditor:
    """Chained CLIP edits of one generator's latents (see the module docstring).

    ``stylegan`` is the :class:`~pipelines.stylegan_session.StyleGANEditor` of the generator (it
    renders sessions with their PTI weights and noise maps and inverts uploads); ``mapper`` and
    ``directions`` are found in the generator folder (``clip_mapper/``,
    ``clip_global_directions/``) by :meth:`from_stylegan` when they match the CLIP. ``vocabulary``:
    the words the CLIP was trained on (:func:`world_vocabulary` for the embedded CLIP); other words
    in a text raise a warning. ``min_gain``: a CLIP-score gain below it is reported as low.
    """

    def __init__(self, stylegan: Any, clip: Any, *, clip_name: str = "CLIP", mapper: CLIPTextMapper | None = None,
                 directions: GlobalDirections | None = None, evaluator: Any = None,
                 vocabulary: frozenset[str] | set[str] | None = None, min_gain: float = 0.02,
                 min_change: float = 0.01) -> None:
        self.stylegan = stylegan
        self.G = stylegan.G
        self.clip = clip
        self.clip_name = clip_name
        self.evaluator = evaluator if evaluator is not None else getattr(stylegan, "evaluator", None)
        self.mapper = mapper.to(_device_of(self.G)).eval() if mapper is not None else None
        self.directions = directions
        self.vocabulary = vocabulary
        self.min_gain = min_gain
        self.min_change = min_change
        self.load_notes: list[str] = []

    @classmethod
    def from_stylegan(cls, stylegan: Any, clip: Any, *, clip_name: str = "CLIP", evaluator: Any = None,
                      vocabulary: frozenset[str] | set[str] | None = None) -> "CLIPEditor":
        """An editor with the mapper and global directions of the generator's folder, each kept
        only when it was made for this generator and this CLIP (else a note says why not)."""
        mapper = directions = None
        notes = []
        folder = getattr(stylegan, "folder", None)
        if folder is not None and (Path(folder) / "clip_mapper").is_dir():
            try:
                mapper, probe = load_mapper(Path(folder) / "clip_mapper")
                if (mapper.num_ws, mapper.w_dim) != (stylegan.G.num_ws, stylegan.G.w_dim):
                    raise ValueError("it was trained for another generator")
                if probe is not None and probe_similarity(probe, clip_probe(clip)) < PROBE_MATCH:
                    raise ValueError("it was trained with another CLIP model")
            except (ValueError, OSError) as exc:
                notes.append(f"the text mapper is not used: {exc}")
                mapper = None
        if folder is not None and (Path(folder) / "clip_global_directions").is_dir():
            try:
                directions = GlobalDirections.load(Path(folder) / "clip_global_directions")
                directions.check(stylegan.G, clip)
            except (ValueError, OSError) as exc:
                notes.append(f"global directions are not used: {exc}")
                directions = None
        editor = cls(stylegan, clip, clip_name=clip_name, mapper=mapper, directions=directions,
                     evaluator=evaluator, vocabulary=vocabulary)
        editor.load_notes = notes
        return editor

    # -- what the UI offers -------------------------------------------------------------------
    def methods(self) -> list[str]:
        """The methods available: optimisation always, global directions and the mapper when present."""
        return [m for m in CLIP_EDIT_METHODS
                if m == "optimise" or (m == "global" and self.directions is not None)
                or (m == "mapper" and self.mapper is not None)]

    # -- sessions -----------------------------------------------------------------------------
    def start(self, source: Any) -> CLIPEditSession:
        """A chain of edits starting at the StyleGAN ``EditSession`` ``source``."""
        w = source.w_plus.detach().float().cpu()
        if w.ndim != 3 or w.shape[1:] != (self.G.num_ws, self.G.w_dim):
            raise ValueError(f"this latent is {tuple(w.shape)}; the generator takes [1, {self.G.num_ws}, "
                             f"{self.G.w_dim}]: invert the portrait again for it")
        return CLIPEditSession(source=source, history=[EditStep(w[:1].clone(), None, f"source: {source.source}")])

    def undo(self, session: CLIPEditSession) -> CLIPEditSession:
        """The chain without its last edit (the source is never removed)."""
        if not session.can_undo:
            raise ValueError("nothing to undo: this is the source portrait")
        return replace(session, history=session.history[:-1])

    def _generator(self, session: CLIPEditSession) -> tuple[Generator, dict[str, torch.Tensor] | None]:
        G = self.stylegan._generator_for(session.source)  # the PTI-tuned copy when the session has one
        device = _device_of(G)
        noise = session.source.noise
        return G, ({k: v.to(device) for k, v in noise.items()} if noise is not None else None)

    @torch.no_grad()
    def _images(self, session: CLIPEditSession, step: EditStep) -> torch.Tensor:
        G, noise = self._generator(session)
        device = _device_of(G)
        offsets = {k: v.to(device) for k, v in step.style_offsets.items()} if step.style_offsets else None
        with _frozen(G):
            return StyleSpace(G).synthesize(step.w_plus.to(device), offsets, noise)

    def render(self, session: CLIPEditSession, step: EditStep | None = None) -> Image.Image:
        """The image of ``step`` (default: the current state of the chain)."""
        return tensor_to_pil(self._images(session, step or session.current))[0]

    # -- editing ------------------------------------------------------------------------------
    def edit(
        self,
        session: CLIPEditSession,
        *,
        text: str,
        method: str = "optimise",
        neutral_text: str = "",  # global directions: what the portrait is now (default NEUTRAL_TEXT)
        alpha: float = 4.0,  # global directions: strength, in style standard deviations
        beta: float = 0.1,  # global directions: disentanglement threshold in [0, 1]
        strength: float = 1.0,  # mapper: multiple of its offset
        steps: int = 60,  # optimisation steps
        lr: float = 0.1,
        l2_weight: float = 0.008,
        preservation: str = "attributes",
        callback: Callback | None = None,
    ) -> CLIPEditOutput:
        """Apply one edit to the current state of ``session``; returns the new chain and the result.

        Raises ``ValueError`` with a message a person can act on for an empty text, an unknown or
        missing method, or bad values. A text this CLIP cannot ground, or an edit CLIP barely
        sees, still gives a result, with a warning.
        """
        # 1. Validate.
        text = " ".join(str(text or "").split())
        if not text:
            raise ValueError("type what the portrait should become, e.g. 'blue hair' or 'glasses and a smile'")
        if method not in CLIP_EDIT_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {list(CLIP_EDIT_METHODS)}")
        if method not in self.methods():
            need = {"global": "global directions (compute them with "
                              "`python -m pipelines.training.fit_clip_global_directions`)",
                    "mapper": "a text mapper (train one with `python -m pipelines.training.train_clip_mapper`)"}[method]
            raise ValueError(f"{method!r} needs {need} for this generator and CLIP; use 'optimise' meanwhile")
        if not 1 <= int(steps) <= 2000:
            raise ValueError(f"steps must be from 1 to 2000, got {steps}")
        if not math.isfinite(float(alpha)) or not math.isfinite(float(strength)):
            raise ValueError("alpha and strength must be finite numbers")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"β must be in [0, 1], got {beta}")
        warnings: list[str] = []
        if self.vocabulary is not None and (unknown := unknown_words(text, self.vocabulary)):
            warnings.append(f"{self.clip_name} never read {', '.join(repr(w) for w in unknown)} in training and cannot "
                            "ground it: the edit may change little, or the wrong things")

        # 2. Edit from the current state.
        G, noise = self._generator(session)
        device = _device_of(G)
        current = session.current
        offsets = {k: v.to(device) for k, v in current.style_offsets.items()} if current.style_offsets else None
        w = current.w_plus.to(device)
        if method == "optimise":
            result = optimise_edit(G, self.clip, w, text, steps=int(steps), lr=float(lr), l2_weight=float(l2_weight),
                                   preservation=preservation if self.evaluator is not None else "none",
                                   evaluator=self.evaluator, style_offsets=offsets, noise=noise, callback=callback)
            new_offsets = offsets
        elif method == "global":
            with _frozen(G):
                result = global_edit(G, self.clip, self.directions, w, text, neutral_text=neutral_text or None,
                                     alpha=float(alpha), beta=float(beta), style_offsets=offsets, noise=noise)
            new_offsets = result.style_offsets
        else:
            with _frozen(G):
                result = mapper_edit(G, self.clip, self.mapper, w, text, strength=float(strength),
                                     style_offsets=offsets, noise=noise)
            new_offsets = offsets

        # 3. What the user should know.
        before, after = float(result.clip_score_before[0]), float(result.clip_score_after[0])
        notes = list(result.notes)
        if result.num_channels is not None:
            notes.append(f"{result.num_channels} of {self.directions.num_channels} style channels changed "
                         f"(β = {beta:g})")
            if result.num_channels == 0:
                warnings.append(f"no style channel is relevant enough at β = {beta:g}: lower β")
        with torch.no_grad():
            source_images = self._images(session, current)
        change = float((result.images.detach().cpu() - source_images.cpu()).abs().mean())
        if after - before < self.min_gain:
            warnings.append(f"low CLIP score: {before:.3f} → {after:.3f} ({after - before:+.3f}); "
                            f"{self.clip_name} finds little more of “{text}” in the result than before")
        elif change < self.min_change:
            warnings.append("the portrait barely changed; raise the strength (α) or the steps")
        read = getattr(self.evaluator, "predict_attributes", None)
        if callable(read):  # what the edit changed that the text did not ask for
            was, now = read(torch.cat([source_images[:1].cpu(), result.images[:1].detach().float().cpu()]))
            asked = mentioned_attributes(text)
            also = [f"{name.replace('_', ' ')} ({was[name]} → {now[name]})" for name in ATTRIBUTES
                    if name not in asked and was[name] != now[name]]
            if also:
                warnings.append(f"{SIDE_EFFECT_WARNING}: {', '.join(also)}")

        # 4. The new chain.
        step = EditStep(result.w_plus.detach().float().cpu()[:1],
                        {k: v.detach().float().cpu() for k, v in new_offsets.items()} if new_offsets else None,
                        f"{method}: {text}", after)
        new_session = replace(session, history=[*session.history, step])
        return CLIPEditOutput(session=new_session, image=tensor_to_pil(result.images[:1].detach())[0],
                              before=tensor_to_pil(source_images[:1])[0], method=method, clip_score_before=before,
                              clip_score_after=after, seconds=result.seconds, notes=notes, warnings=warnings,
                              num_channels=result.num_channels)
