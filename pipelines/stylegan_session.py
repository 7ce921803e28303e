"""One StyleGAN editing session: a source latent (sample, upload or another tab's image), its
inversion, edits by named directions and SeFa sliders, truncation, export and import.

No gradio here: the StyleGAN edit tab (``studio/tabs/stylegan_edit.py``) keeps an
:class:`EditSession` per user in ``gr.State`` and calls :class:`StyleGANEditor`; the benchmark
and the tests call the same methods.

A generator folder may carry what editing needs beside its weights (written by
``python -m pipelines.training.fit_stylegan_edits``):

- ``directions/``: InterFaceGAN directions fitted from evaluator-labelled samples;
- ``modes/``: the perceptual cluster centres of multi-modal truncation;
- ``latent_classifier/``: the W+ attribute classifier that guided edits follow
  (:mod:`pipelines.stylegan_guided_edit`);
- ``encoder/`` (or ``encoder`` in ``edits.json`` naming a folder): an e4e encoder into its W+.

Without them the editor still samples, inverts by optimisation and edits with SeFa.
"""

from __future__ import annotations

import copy
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from models.stylegan2 import Generator
from pipelines.stylegan_editing import (Direction, MultiModalTruncation, apply_edit, global_truncate,
                                        load_directions, paste_back, sefa_directions, sefa_labels)
from pipelines.stylegan_guided_edit import LatentAttributeClassifier, guided_edit
from pipelines.stylegan_inversion import INVERSION_METHODS, InversionPipeline, load_encoder, synthesize

__all__ = [
    "EditSession",
    "StyleGANEditor",
    "NAMED_EDITS",
    "COLOUR_EDITS",
    "MAX_UPLOAD_SIDE",
    "load_upload",
    "prepare_face",
]

# Slider label -> direction key (an InterFaceGAN one-vs-rest boundary of the evaluator's reading).
NAMED_EDITS: dict[str, str] = {
    "Smile": "expression=smile",
    "Laugh": "expression=laughing",
    "Surprise": "expression=surprised",
    "Glasses": "glasses=yes",
    "Bangs": "bangs=yes",
    "Hat": "accessory=hat",
    "Ribbon": "accessory=ribbon",
    "Long hair": "hair_style=long",
    "Twintails": "hair_style=twintails",
}
# Attributes with many values: a target value and one strength.
COLOUR_EDITS = ("hair_color", "eye_color", "skin_tone", "background")

MAX_UPLOAD_SIDE = 4096  # larger uploads are downscaled (with a note)
NUM_SEFA_SLIDERS = 5


# ---------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------


def load_upload(source: str | os.PathLike[str] | bytes | Image.Image) -> tuple[Image.Image, list[str]]:
    """Open an uploaded image (a path, bytes or PIL image) as RGB; returns ``(image, notes)``.

    Raises ``ValueError`` with a readable message for a file that is not an image. Images over
    :data:`MAX_UPLOAD_SIDE` pixels a side are downscaled (a note says so).
    """
    notes: list[str] = []
    if isinstance(source, Image.Image):
        image = source
    else:
        name = "the upload" if isinstance(source, bytes) else Path(source).name
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            image.load()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            detail = "" if isinstance(exc, UnidentifiedImageError) else f" ({exc})"
            raise ValueError(f"{name} is not an image the studio can read (PNG, JPEG, WebP, ...){detail}") from None
    if min(image.size) < 1:
        raise ValueError(f"the image is empty ({image.size[0]}x{image.size[1]})")
    from pipelines.face_alignment import to_rgb

    image = to_rgb(image)
    if max(image.size) > MAX_UPLOAD_SIDE:
        before = image.size
        image.thumbnail((MAX_UPLOAD_SIDE, MAX_UPLOAD_SIDE), Image.LANCZOS)
        notes.append(f"the image was {before[0]}x{before[1]} px; it was downscaled to "
                     f"{image.size[0]}x{image.size[1]} (at most {MAX_UPLOAD_SIDE} px a side)")
    return image, notes


def prepare_face(image: Image.Image, *, align: bool, size: int) -> tuple[Any, list[str]]:
    """The square crop to invert: FFHQ alignment with dlib for photos (``align``), else a centre
    crop. Returns ``(AlignedFace, notes)``; raises ``ValueError`` when ``align`` finds no face."""
    from pipelines.face_alignment import LandmarkModelMissing, NoFaceFound, align_face, centre_crop_face

    notes: list[str] = []
    if align:
        try:
            return align_face(image, output_size=max(size, 256)), notes
        except NoFaceFound:
            raise ValueError("no face was found in this photo; untick 'Align face' to invert a centre "
                             "crop of it instead (drawings and anime portraits need no alignment)") from None
        except LandmarkModelMissing as exc:
            notes.append(f"face alignment is unavailable ({exc}); a centre crop was used")
    return centre_crop_face(image, size), notes


# ---------------------------------------------------------------------------------------------
# Session state
# ---------------------------------------------------------------------------------------------


@dataclass
class EditSession:
    """What one user's edits start from; small and copyable (kept in ``gr.State``)."""

    w_plus: torch.Tensor                  # [1, num_ws, w_dim] float32 on the CPU: the source latent
    generator: str                        # the registry name of the generator it belongs to
    source: str                           # 'sample (seed 3)', 'upload', ...
    tuned_state: dict[str, torch.Tensor] | None = None  # PTI-tuned synthesis weights (CPU)
    noise: dict[str, torch.Tensor] | None = None        # optimised noise maps (CPU)
    original: Image.Image | None = None   # the uploaded photo, for pasting the edit back
    aligned: Any = None                   # its AlignedFace (crop geometry)
    target: Image.Image | None = None     # the crop that was inverted
    info: dict[str, Any] = field(default_factory=dict)  # method, seconds, error


# ---------------------------------------------------------------------------------------------
# Editor
# ---------------------------------------------------------------------------------------------


def _find_asset(folder: Path | None, name: str) -> Path | None:
    if folder is None:
        return None
    candidate = folder / name
    return candidate if candidate.exists() else None


class StyleGANEditor:
    """Sampling, inversion and editing for one generator (see the module docstring)."""

    def __init__(self, G: Generator, *, name: str = "generator", folder: str | os.PathLike[str] | None = None,
                 evaluator: Any = None, encoder: torch.nn.Module | None = None,
                 directions: Mapping[str, Direction] | None = None,
                 modes: MultiModalTruncation | None = None,
                 latent_classifier: LatentAttributeClassifier | None = None) -> None:
        self.G = G.eval().requires_grad_(False)
        self.name = name
        self.folder = Path(folder) if folder is not None else None
        self.evaluator = evaluator
        self.device = next(G.parameters()).device
        if encoder is None and (path := _find_asset(self.folder, "encoder")) is not None:
            encoder = load_encoder(path, device=self.device)
        if encoder is not None and (encoder.num_ws, encoder.w_dim) != (G.num_ws, G.w_dim):
            encoder = None  # an encoder for another generator: optimisation only
        self.encoder = encoder
        if directions is None and (path := _find_asset(self.folder, "directions")) is not None:
            directions = load_directions(path)
        self.directions: dict[str, Direction] = dict(directions or {})
        if modes is None and (path := _find_asset(self.folder, "modes")) is not None:
            modes = MultiModalTruncation.load(path)
        self.modes = modes
        if latent_classifier is None and (path := _find_asset(self.folder, "latent_classifier")) is not None:
            latent_classifier = LatentAttributeClassifier.from_pretrained(path, device=self.device)
        if latent_classifier is not None and (latent_classifier.num_ws, latent_classifier.w_dim) != (G.num_ws, G.w_dim):
            latent_classifier = None  # trained for another generator
        self.latent_classifier = latent_classifier
        self._guided_cache: dict[tuple, torch.Tensor] = {}
        self._sefa: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._tuned_cache: tuple[int, Generator] | None = None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], *, name: str | None = None, evaluator: Any = None,
                    device: str | torch.device = "cpu") -> "StyleGANEditor":
        from pipelines.stylegan_io import load_generator

        folder = Path(folder)
        G = load_generator(folder, device=device)
        return cls(G, name=name or folder.name, folder=folder if folder.is_dir() else None, evaluator=evaluator)

    # -- what the UI offers -------------------------------------------------------------------
    @property
    def num_ws(self) -> int:
        return int(self.G.num_ws)

    def methods(self) -> list[str]:
        """The inversion methods this generator supports (encoder methods need its encoder)."""
        return [m for m in INVERSION_METHODS if self.encoder is not None or not m.startswith("encoder")]

    def named_edits(self) -> dict[str, str]:
        """Slider label -> direction key, for the directions this generator has."""
        return {label: key for label, key in NAMED_EDITS.items() if key in self.directions}

    def guided_choices(self) -> list[tuple[str, str]]:
        """``(label, 'attribute=value')`` for every value a guided edit can aim at (none without a
        latent classifier)."""
        if self.latent_classifier is None:
            return []
        return [(f"{attr.replace('_', ' ')}: {value}", f"{attr}={value}")
                for attr, values in self.latent_classifier.attributes.items() for value in values]

    def colour_values(self, attribute: str) -> list[str]:
        return [key.split("=", 1)[1] for key in self.directions if key.split("=", 1)[0] == attribute]

    def sefa(self, first_layer: int = 0, last_layer: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """SeFa directions ``[w_dim, w_dim]`` and slider labels for ws ``first..last`` (inclusive)."""
        last = self.num_ws - 1 if last_layer is None else int(last_layer)
        first = int(first_layer)
        if not 0 <= first <= last < self.num_ws:
            raise ValueError(f"the SeFa layer range must satisfy 0 <= first <= last <= {self.num_ws - 1}, "
                             f"got {first}..{last}")
        key = (first, last)
        if key not in self._sefa:
            self._sefa[key] = sefa_directions(self.G, range(first, last + 1))
        vectors, eigenvalues = self._sefa[key]
        return vectors, sefa_labels(eigenvalues)

    # -- sources ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, seed: int) -> EditSession:
        """A random latent (untruncated; truncation is an edit, :meth:`render`'s ``psi``)."""
        z = torch.randn([1, self.G.z_dim], generator=torch.Generator().manual_seed(int(seed))).to(self.device)
        c = torch.zeros([1, self.G.c_dim], device=self.device)
        w_plus = self.G.mapping(z, c, skip_w_avg_update=True).float().cpu()
        return EditSession(w_plus=w_plus, generator=self.name, source=f"sample (seed {int(seed)})",
                           info={"method": "sample", "seed": int(seed)})

    def invert(self, image: Image.Image, *, method: str = "optimise-w+", steps: int = 200, pti_steps: int = 100,
               align: bool = False, seed: int = 0, notes: Sequence[str] = (), source: str = "upload",
               callback: Any = None) -> EditSession:
        """Invert ``image`` (any size, RGB): alignment or centre crop, then ``method``.

        Raises ``ValueError`` for an unknown method, a method this generator lacks, or a photo
        with no face when ``align`` is set.
        """
        if method not in self.methods():
            if method in INVERSION_METHODS:
                raise ValueError(f"{method!r} needs an encoder trained for {self.name}; choose one of {self.methods()}")
            raise ValueError(f"unknown inversion method {method!r}; choose one of {self.methods()}")
        steps, pti_steps = int(steps), int(pti_steps)
        if not 1 <= steps <= 5000 or not 1 <= pti_steps <= 5000:
            raise ValueError(f"optimisation and tuning steps must be from 1 to 5000, got {steps} and {pti_steps}")
        face, align_notes = prepare_face(image, align=align, size=self.G.img_resolution)
        pipe = InversionPipeline(self.G, encoder=self.encoder, evaluator=self.evaluator)
        out = pipe(image=face.crop, method=method, steps=steps, pti_steps=pti_steps,
                   generator=torch.Generator(device=self.device).manual_seed(int(seed)), callback=callback)
        tuned = None
        if out.G is not self.G:
            tuned = {k: v.detach().cpu().clone() for k, v in out.G.synthesis.state_dict().items()}
        noise = {k: v.detach().cpu() for k, v in out.noise.items()} if out.noise is not None else None
        info = {"method": method, "seconds": round(out.timings["total"], 3),
                "timings": {k: round(v, 4) for k, v in out.timings.items()},
                "reconstruction_error": round(out.reconstruction_error[0], 5),
                "notes": [*notes, *align_notes]}
        return EditSession(w_plus=out.w_plus.detach().float().cpu(), generator=self.name,
                           source=source, tuned_state=tuned, noise=noise,
                           original=image if face.landmarks is not None else None, aligned=face,
                           target=face.crop, info=info)

    # -- rendering ----------------------------------------------------------------------------
    def _generator_for(self, session: EditSession) -> Generator:
        if session.tuned_state is None:
            return self.G
        key = id(session.tuned_state)
        if self._tuned_cache is None or self._tuned_cache[0] != key:
            G = copy.deepcopy(self.G)
            G.synthesis.load_state_dict({k: v.to(self.device) for k, v in session.tuned_state.items()})
            self._tuned_cache = (key, G)
        return self._tuned_cache[1]

    def edit_latent(self, session: EditSession, *, edits: Mapping[str, float] | None = None,
                    colour_edits: Mapping[str, tuple[str, float]] | None = None,
                    sefa: Sequence[float] = (), sefa_layers: tuple[int, int] | None = None,
                    psi: float = 1.0, truncation: str = "global", guided: Sequence[str] = ()) -> torch.Tensor:
        """The edited latent ``[1, num_ws, w_dim]``.

        ``guided``: ``'attribute=value'`` targets (one value per attribute) reached first, by the
        latent classifier's guided edit (after truncation, before the slider edits); the result is
        cached per source latent, so moving a slider does not redo it.
        ``edits``: direction key (or :data:`NAMED_EDITS` label) -> strength in standard deviations;
        ``colour_edits``: attribute -> (target value, strength); ``sefa``: strengths of the first
        SeFa directions of ``sefa_layers`` (first, last), applied to those ws; ``psi`` with
        ``truncation`` 'global' (towards the mean w) or 'multimodal' (towards the nearest mode).
        """
        if truncation not in ("global", "multimodal"):
            raise ValueError(f"truncation must be 'global' or 'multimodal', got {truncation!r}")
        if not 0.0 <= float(psi) <= 1.5:
            raise ValueError(f"psi must be in [0, 1.5], got {psi}")
        w = session.w_plus.to(self.device, torch.float32)
        if w.ndim != 3 or w.shape[1:] != (self.num_ws, self.G.w_dim):
            raise ValueError(f"this latent is {tuple(w.shape)}, the generator {self.name} takes "
                             f"[1, {self.num_ws}, {self.G.w_dim}]; invert the image again for it")
        if float(psi) != 1.0:
            if truncation == "multimodal":
                if self.modes is None:
                    raise ValueError(f"{self.name} has no modes for multi-modal truncation; fit them with "
                                     "`python -m pipelines.training.fit_stylegan_edits`")
                w = self.modes.truncate(w, float(psi))
            else:
                w = global_truncate(w, self.G.mapping.w_avg.float(), float(psi))
        targets = tuple(sorted(str(t) for t in guided if t))
        if targets:
            w = self._guided(session, w, targets, (float(psi), truncation))
        for key, strength in (edits or {}).items():
            key = NAMED_EDITS.get(key, key)
            if float(strength) == 0.0:
                continue
            if key not in self.directions:
                raise ValueError(f"{self.name} has no direction {key!r}; it has {sorted(self.directions)}")
            w = apply_edit(w, self.directions[key], float(strength))
        for attribute, (value, strength) in (colour_edits or {}).items():
            if float(strength) == 0.0 or not value:
                continue
            key = f"{attribute}={value}"
            if key not in self.directions:
                raise ValueError(f"{self.name} has no direction for {attribute} = {value}")
            w = apply_edit(w, self.directions[key], float(strength))
        if any(float(s) != 0.0 for s in sefa):
            first, last = sefa_layers if sefa_layers is not None else (0, self.num_ws - 1)
            vectors, _ = self.sefa(first, last)
            for i, strength in enumerate(sefa):
                if float(strength) != 0.0:
                    # SeFa directions are unit vectors in W; strength in units of the w spread.
                    step = vectors[i].to(w) * float(strength) * self._w_spread()
                    w = apply_edit(w, step, 1.0, layers=range(int(first), int(last) + 1))
        return w.cpu()

    def _guided(self, session: EditSession, w: torch.Tensor, targets: tuple[str, ...], truncation: tuple) -> torch.Tensor:
        if self.latent_classifier is None:
            raise ValueError(f"{self.name} has no latent classifier for guided edits; fit one with "
                             "`python -m pipelines.training.fit_stylegan_edits --parts latent_classifier`")
        key = (id(session.w_plus), session.w_plus.data_ptr(), truncation, targets)
        if key not in self._guided_cache:
            if len(self._guided_cache) >= 16:
                self._guided_cache.pop(next(iter(self._guided_cache)))
            # guided_edit checks the targets (known values, one per attribute) before anything is cached
            self._guided_cache[key] = guided_edit(self.latent_classifier, w, list(targets)).w_plus.to(w)
        return self._guided_cache[key].clone()

    def _w_spread(self) -> float:
        if not hasattr(self, "_spread"):
            with torch.no_grad():
                z = torch.randn([512, self.G.z_dim], generator=torch.Generator().manual_seed(0)).to(self.device)
                w = self.G.mapping(z, torch.zeros([512, self.G.c_dim], device=self.device), skip_w_avg_update=True)[:, 0]
                self._spread = float(w.float().std(0).mean())
        return self._spread

    @torch.no_grad()
    def render(self, session: EditSession, w_plus: torch.Tensor | None = None) -> Image.Image:
        """The image of ``w_plus`` (default: the session's source latent), with the session's
        PTI-tuned weights and noise maps when it has them."""
        from pipelines.images import tensor_to_pil

        G = self._generator_for(session)
        w = (session.w_plus if w_plus is None else w_plus).to(self.device, torch.float32)
        noise = ({k: v.to(self.device) for k, v in session.noise.items()} if session.noise is not None else None)
        return tensor_to_pil(synthesize(G, w, noise))[0]

    def paste(self, session: EditSession, edited: Image.Image) -> Image.Image | None:
        """The edited crop pasted back into the uploaded photo (aligned uploads only)."""
        if session.original is None or session.aligned is None:
            return None
        return paste_back(session.original, session.aligned, edited)

    def read(self, image: Image.Image) -> dict[str, str] | None:
        """What the evaluator reads in ``image`` (None without an evaluator)."""
        if self.evaluator is None:
            return None
        return self.evaluator.predict_attributes([image])[0]

    # -- latent files -------------------------------------------------------------------------
    @staticmethod
    def save_latent(session: EditSession, w_plus: torch.Tensor, path: str | os.PathLike[str]) -> Path:
        """Write the edited latent as ``.npz`` (``w_plus`` [1, num_ws, w_dim] float32 + metadata)."""
        path = Path(path)
        meta = {"generator": session.generator, "source": session.source,
                "pti_tuned": session.tuned_state is not None, **{k: v for k, v in session.info.items()
                                                                  if isinstance(v, (int, float, str))}}
        np.savez(path, w_plus=w_plus.detach().float().cpu().numpy(), meta=json.dumps(meta))
        return path

    def load_latent(self, path: str | os.PathLike[str]) -> EditSession:
        """An :class:`EditSession` from a latent written by :meth:`save_latent` (or any ``.npz``
        / ``.npy`` holding a ``[num_ws, w_dim]``, ``[1, num_ws, w_dim]`` or ``[w_dim]`` array)."""
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
            array = data["w_plus"] if isinstance(data, np.lib.npyio.NpzFile) else data
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path.name} is not a latent file (.npz with w_plus, or .npy): {exc}") from None
        w = torch.from_numpy(np.asarray(array, dtype=np.float32))
        if w.ndim == 1:
            w = w[None, None].expand(1, self.num_ws, -1)
        elif w.ndim == 2:
            w = w[None]
        if w.ndim != 3 or w.shape[1:] != (self.num_ws, self.G.w_dim):
            raise ValueError(f"{path.name} holds a latent of shape {tuple(array.shape)}; {self.name} takes "
                             f"[1, {self.num_ws}, {self.G.w_dim}]")
        return EditSession(w_plus=w[:1].clone(), generator=self.name, source=f"latent file {path.name}",
                           info={"method": "latent file"})


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
