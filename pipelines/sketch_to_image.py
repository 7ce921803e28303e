"""Sketch to portrait: a sketch encoder (AniFaceDrawing's student) into W+, then a StyleGAN2 generator.

Huang et al. 2023, "AniFaceDrawing: Anime Portrait Exploration during Your Sketching". The sketch
decides the leading ws (structure: face, hair style, eyes, glasses, accessories); the ws after
``mix_from_layer`` (colour and fine style) come from a colour seed (a mapped z per candidate) or
from a reference (a W+ code, or an image inverted by an optional image encoder). Each stroke is one
encoder pass and one synthesis pass.

At a low resolution the structure ws also carry colour (in the embedded 64-px generator, skin tone
and most of the hair colour sit in the same ws as the hair style). A sketch cannot say which skin
tone it means, so the encoder predicts the mean one. Where the generator folder holds InterFaceGAN
directions (``fit_stylegan_edits``), the pipeline moves the structure ws to the candidate's colours
within the span of the colour directions (hair colour, skin tone), with the structure directions
projected out of that span (:func:`colour_basis`), so each colour seed gives its own skin tone and
hair colour while the strokes keep the shape.

A sketch encoder with a completion code (``completion_dim > 0``, a conditional VAE) finishes an
unfinished sketch in more than one way: each candidate draws its own code from its seed
(:meth:`SketchToImagePipeline.completion_codes`), so the candidates of a half-drawn face differ in
what is not drawn yet (hair, glasses, accessories); with a reference the code is zero.

The sketch encoder is trained by ``python -m pipelines.training.train_sketch_encoder``; it is saved
as ``model.safetensors`` + ``config.json`` (:func:`save_sketch_encoder`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.stylegan2 import Generator
from models.stylegan2.encoder import StyleGANEncoder
from models.stylegan2.sketch_encoder import SketchEncoder
from pipelines.sketch_data import EMPTY_NOTE, is_empty_sketch, to_sketch
from pipelines.stylegan_inversion import synthesize

__all__ = [
    "COLOUR_ATTRIBUTES",
    "SKETCH_ENCODER_ARCHITECTURE",
    "STRUCTURE_ATTRIBUTES",
    "SketchToImageOutput",
    "SketchToImagePipeline",
    "colour_basis",
    "load_colour_basis",
    "load_sketch_encoder",
    "read_attributes",
    "save_sketch_encoder",
    "sketch_to_tensor",
]

SKETCH_ENCODER_ARCHITECTURE = "stylegan2-sketch-encoder"
# portrait-world attributes a sketch decides, and the colours a seed decides that live in structure ws
STRUCTURE_ATTRIBUTES = ("hair_style", "bangs", "glasses", "expression", "accessory")
COLOUR_ATTRIBUTES = ("hair_color", "skin_tone")
Callback = Callable[[int, int, "Image.Image | None"], None]


# ---------------------------------------------------------------------------------------------
# Sketch encoder I/O (the image encoder's save_encoder / load_encoder, with its own architecture tag)
# ---------------------------------------------------------------------------------------------


def save_sketch_encoder(encoder: SketchEncoder, folder: str | os.PathLike[str], *, generator_source: str | None = None,
                        teacher_source: str | None = None, fp16: bool = False) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (init kwargs, the generator and teacher it was
    trained with), tagged as a sketch encoder so an image-encoder loader refuses it."""
    from pipelines.stylegan_inversion import save_encoder

    if not isinstance(encoder, SketchEncoder):
        raise TypeError(f"save_sketch_encoder expects a SketchEncoder, got {type(encoder).__name__}")
    return save_encoder(encoder, folder, generator_source=generator_source, fp16=fp16,
                        architecture=SKETCH_ENCODER_ARCHITECTURE, teacher=teacher_source)


def load_sketch_encoder(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> SketchEncoder:
    """Load a sketch encoder written by :func:`save_sketch_encoder` (eval mode, float32)."""
    from pipelines.stylegan_inversion import load_encoder

    return load_encoder(folder, device=device, architecture=SKETCH_ENCODER_ARCHITECTURE, cls=SketchEncoder,
                        what="a sketch encoder", script="train_sketch_encoder",
                        mismatch_hint="an image encoder cannot read sketches")


def sketch_to_tensor(sketches: Image.Image | Sequence[Image.Image], size: int) -> torch.Tensor:
    """Sketch image(s) (``"L"``, white paper) -> ``[B, 1, size, size]`` in [-1, 1] (area-resized)."""
    items = [sketches] if isinstance(sketches, Image.Image) else list(sketches)
    out = []
    for img in items:
        img = img.convert("L")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BOX if img.size[0] > size else Image.BICUBIC)
        out.append(np.asarray(img, dtype=np.float32)[None] / 127.5 - 1.0)
    return torch.from_numpy(np.stack(out))


def read_attributes(evaluator: Any, images: torch.Tensor) -> list[dict[str, str]]:
    """The world attributes an :class:`~pipelines.evaluation.Evaluator` reads in ``images``
    ``[B, 3, H, W]`` (only those it has a head for)."""
    from pipelines.data.portrait_world import ATTRIBUTES

    res = evaluator.run(images)
    names = [n for n in ATTRIBUTES if n in res]
    return [{n: ATTRIBUTES[n][int(res[n][i])] for n in names} for i in range(images.shape[0])]


def colour_basis(directions: Mapping[str, Any], *, colours: Sequence[str] = COLOUR_ATTRIBUTES,
                 structure: Sequence[str] = STRUCTURE_ATTRIBUTES) -> torch.Tensor | None:
    """An orthonormal basis ``[w_dim, m]`` of the span of the colour directions (``'hair_color=red'``
    ...) with the span of the structure directions projected out of it; None when ``directions``
    (name -> :class:`~pipelines.stylegan_editing.Direction`) holds no colour direction."""
    def stack(attributes: Sequence[str]) -> torch.Tensor | None:
        vectors = [d.vector.float().cpu() for name, d in directions.items() if name.split("=")[0] in attributes]
        return torch.stack(vectors) if vectors else None

    colour = stack(colours)
    if colour is None:
        return None
    shape = stack(structure)
    if shape is not None:
        q, _ = torch.linalg.qr(shape.T)  # [w_dim, s]
        colour = colour - (colour @ q) @ q.T
    u, sv, _ = torch.linalg.svd(colour.T, full_matrices=False)  # [w_dim, c]
    keep = sv > 1e-4 * sv.max()
    return u[:, keep].contiguous() if bool(keep.any()) else None


def load_colour_basis(generator_folder: str | os.PathLike[str]) -> torch.Tensor | None:
    """:func:`colour_basis` of ``<generator_folder>/directions``; None where there are none."""
    from pipelines.stylegan_editing import load_directions

    folder = Path(generator_folder) / "directions"
    if not folder.is_dir():
        return None
    return colour_basis(load_directions(folder))


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


@dataclass
class SketchToImageOutput:
    """What :class:`SketchToImagePipeline` returns."""

    images: list[Image.Image]        # one portrait per candidate
    w_plus: torch.Tensor             # [N, num_ws, w_dim] the latents the portraits were drawn from
    sketch: Image.Image              # the normalised sketch the encoder read ("L", white paper)
    seeds: list[int | None]          # the colour seed of each candidate (None: colours from the reference)
    timings: dict[str, float]        # seconds: 'prepare', 'encode', 'colour', 'synthesis', 'total'
    notes: list[str] = field(default_factory=list)  # messages for the person (empty canvas, photo input)
    is_empty: bool = False           # the canvas had no strokes: the portraits are the mean structure
    attributes: list[dict[str, str]] | None = None  # what the evaluator reads in each portrait (if any)


SketchInput = Image.Image | np.ndarray | None


class SketchToImagePipeline:
    """A sketch -> ``num_candidates`` portraits of a StyleGAN2 generator (AniFaceDrawing).

    Components: the generator ``G``, the :class:`SketchEncoder` trained for it, optionally an
    ``image_encoder`` (to take colours from a reference image), an ``evaluator`` (to name what
    each portrait shows) and a ``colour_basis`` ``[w_dim, m]`` (:func:`colour_basis`: the colours
    that live in the structure ws follow each candidate's colours).
    """

    def __init__(self, G: Generator, sketch_encoder: SketchEncoder, *, evaluator: Any = None,
                 image_encoder: StyleGANEncoder | None = None, colour_basis: torch.Tensor | None = None) -> None:
        if (sketch_encoder.num_ws, sketch_encoder.w_dim) != (G.num_ws, G.w_dim):
            raise ValueError(f"the sketch encoder predicts [{sketch_encoder.num_ws}, {sketch_encoder.w_dim}] latents, "
                             f"the generator takes [{G.num_ws}, {G.w_dim}]: it was trained for another generator")
        if image_encoder is not None and (image_encoder.num_ws, image_encoder.w_dim) != (G.num_ws, G.w_dim):
            raise ValueError("the image encoder was trained for another generator")
        if colour_basis is not None and (colour_basis.ndim != 2 or colour_basis.shape[0] != G.w_dim):
            raise ValueError(f"colour_basis must be [{G.w_dim}, m], got {tuple(colour_basis.shape)}")
        self.G = G.eval()
        self.sketch_encoder = sketch_encoder.eval()
        device = next(G.parameters()).device
        self.colour_basis = colour_basis.to(device, torch.float32) if colour_basis is not None else None
        self.image_encoder = image_encoder.eval() if image_encoder is not None else None
        self.evaluator = evaluator

    @classmethod
    def from_pretrained(cls, generator_path: str | os.PathLike[str], sketch_encoder_path: str | os.PathLike[str], *,
                        image_encoder_path: str | os.PathLike[str] | None = None,
                        evaluator_path: str | os.PathLike[str] | None = None,
                        device: str | torch.device = "cpu") -> "SketchToImagePipeline":
        """Load the generator (studio folder or official .pkl), the sketch encoder and, optionally,
        an image encoder (for reference images) and the evaluator; a generator folder's
        InterFaceGAN directions give the colour basis."""
        from pipelines.evaluation import Evaluator
        from pipelines.stylegan_inversion import load_encoder
        from pipelines.stylegan_io import load_generator

        G = load_generator(generator_path, device=device)
        sketch_encoder = load_sketch_encoder(sketch_encoder_path, device=device)
        image_encoder = load_encoder(image_encoder_path, device=device) if image_encoder_path is not None else None
        evaluator = Evaluator.from_pretrained(evaluator_path, device=device) if evaluator_path is not None else None
        basis = load_colour_basis(generator_path) if Path(generator_path).is_dir() else None
        return cls(G, sketch_encoder, evaluator=evaluator, image_encoder=image_encoder, colour_basis=basis)

    @property
    def device(self) -> torch.device:
        return next(self.G.parameters()).device

    @property
    def structure_layers(self) -> int:
        return self.sketch_encoder.structure_layers

    # -- pieces -----------------------------------------------------------------------------
    def prepare(self, sketch: SketchInput) -> tuple[Image.Image, list[str]]:
        """Any upload or canvas -> the normalised sketch the encoder reads, and notes."""
        return to_sketch(sketch, size=self.sketch_encoder.input_resolution)

    @torch.no_grad()
    def colour_latents(self, seeds: Sequence[int], *, truncation_psi: float = 0.7) -> torch.Tensor:
        """``[N, num_ws, w_dim]``: one mapped z per seed (``torch.Generator().manual_seed(seed)``),
        truncated towards ``w_avg`` by ``truncation_psi``."""
        zs = torch.stack([torch.randn([self.G.z_dim], generator=torch.Generator().manual_seed(int(s)))
                          for s in seeds]).to(self.device)
        c = torch.zeros([len(seeds), self.G.c_dim], device=self.device)
        return self.G.mapping(zs, c, truncation_psi=truncation_psi, skip_w_avg_update=True)

    @property
    def completion_dim(self) -> int:
        """Size of the sketch encoder's completion code (0: one finished portrait per sketch)."""
        return int(getattr(self.sketch_encoder, "completion_dim", 0))

    def completion_codes(self, seeds: Sequence[int]) -> torch.Tensor:
        """``[N, completion_dim]``: one N(0, I) code per seed, drawn apart from the colour latent's z."""
        return torch.stack([torch.randn([self.completion_dim], generator=torch.Generator().manual_seed(2**40 + int(s)))
                            for s in seeds]).to(self.device)

    # -- running ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        *,
        sketch: SketchInput,
        num_candidates: int = 1,
        colour_seed: int = 0,  # candidate i takes its colours from seed colour_seed + i
        reference_w_plus: torch.Tensor | None = None,  # [num_ws, w_dim] or [1 | N, num_ws, w_dim]: colours from it
        reference_image: Image.Image | None = None,  # colours from this image (needs an image encoder)
        mix_from_layer: int | None = None,  # first w taken from the colours; None = the encoder's structure_layers
        truncation_psi: float = 0.7,  # of the seeded colour latents
        transfer_colours: bool = True,  # with a colour basis: the structure ws take the candidate's colours
        callback: Callback | None = None,
    ) -> SketchToImageOutput:
        """Portraits that follow ``sketch``: W+ from the sketch for ws ``[0, mix_from_layer)``,
        colours and fine style from seeds or a reference for the rest (and, with a colour basis,
        the colours that live in the leading ws: ``transfer_colours``).

        An empty canvas (``None``, blank, or no strokes) is not an error: the result holds the
        portraits of the mean structure (``G.mapping.w_avg`` on the leading ws) with each
        candidate's colours, ``is_empty=True`` and a note asking to draw. A photo or coloured
        picture is traced into a sketch, with a note that the result may be poor.
        """
        # 1. Validate the arguments before any work.
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or not 1 <= num_candidates <= 16:
            raise ValueError(f"num_candidates must be an int in 1..16, got {num_candidates!r}")
        if isinstance(colour_seed, bool) or not isinstance(colour_seed, (int, np.integer)) or \
                not 0 <= colour_seed < 2**63 - 16:
            raise ValueError(f"colour_seed must be a non-negative int, got {colour_seed!r}")
        if reference_w_plus is not None and reference_image is not None:
            raise ValueError("pass reference_w_plus or reference_image, not both")
        if reference_image is not None and self.image_encoder is None:
            raise ValueError("reference_image needs an image encoder: load the pipeline with image_encoder_path "
                             "(the encoder of `python -m pipelines.training.train_stylegan_encoder`), or pass "
                             "reference_w_plus")
        num_ws = self.G.num_ws
        k = self.structure_layers if mix_from_layer is None else mix_from_layer
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_ws:
            raise ValueError(f"mix_from_layer must be an int in 1..{num_ws} ({num_ws} = no mixing), got {k!r}")
        if not 0 <= truncation_psi <= 1.5:
            raise ValueError(f"truncation_psi must be in [0, 1.5], got {truncation_psi}")
        reference = None
        if reference_w_plus is not None:
            reference = torch.as_tensor(reference_w_plus, dtype=torch.float32)
            if reference.ndim == 2:
                reference = reference[None]
            if reference.ndim != 3 or reference.shape[1:] != (num_ws, self.G.w_dim) or \
                    reference.shape[0] not in (1, num_candidates):
                raise ValueError(f"reference_w_plus must be [{num_ws}, {self.G.w_dim}] or [1|N, {num_ws}, "
                                 f"{self.G.w_dim}], got {tuple(reference_w_plus.shape)}")
            reference = reference.to(self.device)
        device = self.device
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        # 2. The sketch: any size or mode -> a normalised sketch; empty canvas -> mean structure.
        prepared, notes = self.prepare(sketch)
        empty = is_empty_sketch(prepared)
        if empty and EMPTY_NOTE not in notes:
            notes = [EMPTY_NOTE]
        timings["prepare"] = time.perf_counter() - t_start

        # 3. Structure: the sketch encoder's leading ws (or w_avg for an empty canvas); an encoder
        # with a completion code finishes the sketch once per candidate (its own seed each).
        t0 = time.perf_counter()
        if empty:
            structure = self.G.mapping.w_avg.to(device, torch.float32)[None, None].expand(1, num_ws, -1)
        else:
            x = sketch_to_tensor(prepared, self.sketch_encoder.input_resolution).to(device)
            z = None
            if self.completion_dim and reference is None and reference_image is None:
                z = self.completion_codes([int(colour_seed) + i for i in range(num_candidates)])
            structure = self.sketch_encoder(x, z=z).float()  # [1 | N, num_ws, w_dim]
        timings["encode"] = time.perf_counter() - t0

        # 4. Colours: a reference (W+ or inverted image), else one seeded latent per candidate.
        t0 = time.perf_counter()
        if reference_image is not None:
            from pipelines.images import pil_to_tensor
            from pipelines.face_alignment import centre_crop

            res = self.G.img_resolution
            img = pil_to_tensor(centre_crop(reference_image.convert("RGB"), res), size=res).to(device)
            reference = self.image_encoder(img).float()
        if reference is not None:
            colours = reference.expand(num_candidates, -1, -1)
            seeds: list[int | None] = [None] * num_candidates
        else:
            seeds = [int(colour_seed) + i for i in range(num_candidates)]
            colours = self.colour_latents(seeds, truncation_psi=truncation_psi)
        shape = structure[:, :k].expand(num_candidates, -1, -1)
        if transfer_colours and self.colour_basis is not None:
            q = self.colour_basis
            shape = shape + ((colours[:, :k] - shape) @ q) @ q.T
        w_plus = torch.cat([shape, colours[:, k:]], dim=1)
        timings["colour"] = time.perf_counter() - t0

        # 5. Synthesis.
        t0 = time.perf_counter()
        images = synthesize(self.G, w_plus)  # [N, C, R, R]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["synthesis"] = time.perf_counter() - t0
        from pipelines.images import tensor_to_pil

        pils = tensor_to_pil(images)
        attributes = read_attributes(self.evaluator, images) if self.evaluator is not None else None
        timings["total"] = time.perf_counter() - t_start
        if callback is not None:
            callback(1, 1, pils[0])
        return SketchToImageOutput(images=pils, w_plus=w_plus, sketch=prepared, seeds=seeds, timings=timings,
                                   notes=notes, is_empty=empty, attributes=attributes)
