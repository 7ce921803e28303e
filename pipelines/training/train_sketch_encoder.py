"""Train a sketch encoder into W+ (stage 2 of AniFaceDrawing) for any StyleGAN2 generator.

Huang et al. 2023, "AniFaceDrawing: Anime Portrait Exploration during Your Sketching". Stage 1 is
an image encoder into W+ (the teacher: ``train_stylegan_encoder``'s e4e encoder). Stage 2, this
script, trains a :class:`~models.stylegan2.sketch_encoder.SketchEncoder` (the student) on complete
and partial sketches. For a partial sketch the target is still the latent of the *finished*
portrait, so an unfinished drawing maps to a plausible finished one:

    loss = align_weight       * ||S(sketch)[:k] - w_target[:k]||^2 / var(w)      (feature alignment)
         + align_image_weight * d(G([S(sketch)[:k], c[k:]]), G([w_target[:k], c[k:]]))
                                                                  (alignment in image space, random colours c)
         + pixel_weight       * ||G(w_mix) - x||^2                               (image reconstruction)
         + feature_weight     * d_evaluator(G(w_mix), x)                         (perceptual, LPIPS stand-in)
    w_mix = [S(sketch)[:k], w_target[k:]]   (image_mix_fine; else S(sketch) on all layers)

where ``k = structure_layers``, the leading ws that carry structure (stroke-level
disentanglement), and ``d`` is the pixel plus the perceptual distance. The fine ws stay the
target's in the reconstruction terms. The pipeline later takes them from a colour seed or a
reference, and at a low resolution the fine ws also carry part of the structure (thin glasses
rims, the mouth): a student trained with the target's own fine ws learns to lean on them, and
loses glasses and expression under other colours. The image-space alignment renders the
student's structure and the teacher's with the *same random colour latent*, as the pipeline's
colour seed does, so the structure must hold under any colours. ``align_weight=0`` and
``align_image_weight=0`` train the same student with the reconstruction terms only: the baseline
that shows what the alignment brings.

With ``completion_dim > 0`` the student is a conditional VAE over the finished portraits
(:class:`~models.stylegan2.sketch_encoder.SketchEncoder`): the latent above is its mean plus a
completion offset read from a code ``z``, drawn from a posterior that sees what the mean missed,
and the loss adds ``completion_kl_weight * KL(q(z) || p(z))``, p being N(0, I) or a learned prior.
Complete sketches take ``z`` from the prior (``completion_prior_on_complete``), so what a finished
drawing shows must come out whatever the code, and the code carries only what an unfinished one
leaves open. ``init_from`` starts it from a deterministic encoder. ``completion_prior='learned'``
reads the prior from the sketch (see :mod:`models.stylegan2.sketch_encoder`), and
``completion_prior_share`` trains that share of the unfinished sketches with codes from the prior
as well, as at inference: Sohn et al.'s hybrid of the CVAE and GSNN objectives. Trained only
through the posterior, the code learns to carry what the sketch merely hints at (the brows of a
surprised face), which a prior code then draws at random.

The student can only be as good as its targets. An e4e encoder at 64 px loses part of what a
portrait shows (on 200 tuning portraits the evaluator reads the expression back from 68 % of the
encoder's reconstructions, against 90 % of the portraits themselves), and a student aligned with
it learns those losses: it never learns to read the expression from the brows of a half-finished
sketch. ``teacher_refine_steps`` makes the teacher a hybrid inversion, the encoder's W+ refined
by a few steps of the StyleGAN2 projector (pixels plus the evaluator's features, as the
reconstruction terms; 30 steps: expression 68 -> 91 %, or 65 -> 78 % under other colours). Pixels
alone make it worse (45 %). The refined latents are kept in ``pool_cache`` (by default
``<out_dir>/pool_targets.safetensors``, about 20 min for 2000 portraits on two CPU cores) and
read back on a resume or by another run that names the file.

An unfinished sketch has many finished portraits: a regression onto them lands on their mean. In
W that mean is still a portrait; in image space it is a blend (a smudge where glasses may or may
not be). ``image_terms_partial=False`` keeps the image terms to the complete sketches of a batch
and leaves the unfinished ones to the latent alignment alone.

Two sources of (sketch, target) pairs, both rendered once into a pool (a CPU saver):

- ``world``: portrait-world renders; sketches are the world's exact strokes, cut in drawing order
  for partial sketches and given a hand-drawn look every step (:func:`augment_strokes`); the
  target latent is the teacher's W+ of the colour image, the target image the render itself.
- ``generator``: the generator's own images (any StyleGAN2, e.g. an imported anime model);
  sketches by an edge detector (XDoG or HED), partial sketches by erasing ink pieces; the target
  latent is the teacher's W+ of the image (``align_target='teacher'``) or the sampled latent.

Reads top to bottom: config -> run folder -> generator, teacher, evaluator -> pool -> student ->
resume -> loop -> checkpoint -> held-out figures -> export (safetensors + config.json + card)::

    python -m pipelines.training.train_sketch_encoder --generator assets/stylegan2_portraits64 \\
        --teacher assets/stylegan2_portraits64/encoder --out_dir runs/sketch_encoder \\
        --export_to assets/stylegan2_portraits64/sketch_encoder
    # the baseline without alignment (reconstruction of the target image only)
    python -m pipelines.training.train_sketch_encoder --align_weight 0 --align_image_weight 0 \\
        --pixel_weight 1 --feature_weight 1 --out_dir runs/sketch_encoder_noalign
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from models.stylegan2 import Generator
from models.stylegan2.encoder import StyleGANEncoder
from models.stylegan2.sketch_encoder import SketchEncoder, default_structure_layers
from pipelines.device import select_device
from pipelines.images import make_grid, tensor_to_pil
from pipelines.sketch_data import EDGE_METHODS, augment_strokes, erase_sketch, extract_sketch, partial_strokes, \
    render_strokes
from pipelines.sketch_to_image import STRUCTURE_ATTRIBUTES, read_attributes, save_sketch_encoder
from pipelines.stylegan_inversion import EvaluatorPerceptualLoss, reconstruction_error, synthesize, w_statistics
from pipelines.training.runs import (RunFolder, capture_rng_state, config_to_dict, parse_config, restore_rng_state,
                                     seed_everything)
from pipelines.training.train_stylegan_encoder import sample_training_latents

__all__ = ["SketchEncoderTrainConfig", "SketchPool", "STRUCTURE_ATTRIBUTES", "build_pool", "train", "main"]

Progress = Callable[[int, int, Optional[Image.Image]], None]

_EVAL_SEED_OFFSET = 1_000_000  # world seeds of the held-out portraits, after any pool's


@dataclass
class SketchEncoderTrainConfig:
    """AniFaceDrawing stage 2: a sketch encoder aligned with an image encoder (Huang et al. 2023)."""

    out_dir: str = "runs/sketch_encoder"
    resume: bool = False  # continue from the latest checkpoint in out_dir
    device: str = "auto"  # 'auto', 'cuda', 'cpu'
    seed: int = 0

    # the networks
    generator: str = "assets/stylegan2_portraits64"  # studio generator folder, .safetensors or official .pkl
    teacher: Optional[str] = "assets/stylegan2_portraits64/encoder"  # stage-1 image encoder; 'none' = no teacher
    evaluator: Optional[str] = "assets/evaluator"  # for the feature loss and the figures; 'none' = off
    input_resolution: Optional[int] = None  # side of the sketches the student reads; None = min(G res, 256)
    channel_base: int = 4096  # student channels at resolution r: min(channel_base // r, channel_max)
    channel_max: int = 256
    structure_layers: Optional[int] = None  # leading ws aligned (and taken from the sketch); None = coarse+middle
    completion_dim: int = 0  # > 0: a conditional VAE over finished portraits with a code of this size
    completion_kl_weight: float = 0.05  # weight of KL(q(z | sketch, target) || prior), nats per sketch
    completion_prior_on_complete: bool = True  # complete sketches take z from the prior (nothing is missing)
    completion_prior: str = "standard"  # the code's prior: 'standard' N(0, I) or 'learned' from the sketch
    completion_prior_share: float = 0.0  # share of unfinished sketches also trained with prior codes (Sohn's hybrid)
    completion_prior_code: str = "sample"  # those rows' code: a 'sample' of the prior (GSNN) or its 'mean'
    init_from: Optional[str] = None  # start from this sketch encoder (same sizes; new completion heads start fresh)

    # the data
    source: str = "world"  # 'world' (exact world line art) or 'generator' (G's images, edge-detected)
    pool_size: int = 2000  # (sketch source, target latent, image) triples rendered once
    world_split: str = "train"  # portrait-world split of the pool ('train' keeps held-out combinations out)
    edge_method: str = "xdog"  # source 'generator': 'xdog' or 'hed' (HED weights: python -m pipelines.hed --fetch)
    align_target: str = "teacher"  # source 'generator': align with the teacher's W+ or the 'sampled' latent
    teacher_refine_steps: int = 0  # > 0: the teacher's W+ refined by this many projector steps (see the docstring)
    teacher_refine_lr: float = 0.03  # peak learning rate of that refinement
    pool_cache: Optional[str] = None  # target latents kept here (safetensors); None: <out_dir>/pool_targets.safetensors
    truncation_min: float = 0.5  # source 'generator': per-sample psi drawn from [truncation_min, 1]
    w_avg_samples: int = 10000  # z samples for w_avg and the spread of W

    # sketches
    partial_prob: float = 0.5  # share of the batch that is an unfinished sketch
    partial_min: float = 0.3  # an unfinished sketch keeps a fraction drawn from [partial_min, 1) of the strokes
    augment: bool = True  # hand-drawn look (world: wobble, width, missing/extra strokes; generator: shift, width)
    jitter: float = 0.004  # smooth wobble amplitude, image fractions
    width_min: float = 0.6  # line width scale range
    width_max: float = 1.8
    drop_prob: float = 0.08  # probability that a stroke goes missing
    extra_prob: float = 0.3  # probability of a few extra short strokes

    # length and optimiser
    steps: int = 3000
    batch: int = 16
    lr: float = 5e-4  # Adam
    max_train_minutes: Optional[float] = None  # stop early (checkpoint + export) after this much loop time

    # losses
    align_weight: float = 5.0  # latent alignment on the structure layers; 0 (and align_image_weight 0) = baseline
    align_image_weight: float = 1.0  # teacher alignment in image space under random colours (see the docstring)
    pixel_weight: float = 0.0  # reconstruction of the target image (every image_loss_every steps)
    feature_weight: float = 0.0
    image_loss_every: int = 1  # image terms every N steps; 0 = latent alignment only
    image_mix_fine: bool = True  # reconstruction renders the target's fine ws (colours) with the student's structure
    colour_truncation_min: float = 0.5  # random colour latents: psi drawn from [colour_truncation_min, 1]
    image_terms_partial: bool = True  # False: image terms on the complete sketches of a batch only (see docstring)

    # logging, samples, checkpoints
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_samples: int = 8  # portraits in a sample grid
    eval_images: int = 64  # held-out sketches for the final figures

    export_to: Optional[str] = None  # also write the sketch encoder (with a card) here

    def validate(self) -> None:
        for name in ("steps", "batch", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                     "num_samples", "eval_images", "w_avg_samples", "channel_base", "channel_max", "pool_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.source not in ("world", "generator"):
            raise ValueError(f"source must be 'world' or 'generator', got {self.source!r}")
        if self.edge_method not in EDGE_METHODS:
            raise ValueError(f"edge_method must be one of {EDGE_METHODS}, got {self.edge_method!r}")
        if self.align_target not in ("teacher", "sampled"):
            raise ValueError(f"align_target must be 'teacher' or 'sampled', got {self.align_target!r}")
        if self.completion_prior not in ("standard", "learned"):
            raise ValueError(f"completion_prior must be 'standard' or 'learned', got {self.completion_prior!r}")
        if self.completion_prior_code not in ("sample", "mean"):
            raise ValueError(f"completion_prior_code must be 'sample' or 'mean', got {self.completion_prior_code!r}")
        if not 0 <= self.completion_prior_share <= 1:
            raise ValueError(f"completion_prior_share must be in [0, 1], got {self.completion_prior_share}")
        if self.completion_prior == "learned" and not self.completion_dim:
            raise ValueError("completion_prior 'learned' needs a completion code: pass --completion_dim > 0")
        if self.world_split not in ("train", "heldout", "any"):
            raise ValueError(f"world_split must be 'train', 'heldout' or 'any', got {self.world_split!r}")
        if isinstance(self.teacher_refine_steps, bool) or not isinstance(self.teacher_refine_steps, int) \
                or self.teacher_refine_steps < 0:
            raise ValueError(f"teacher_refine_steps must be an int >= 0, got {self.teacher_refine_steps!r}")
        if not self.teacher_refine_lr > 0:
            raise ValueError(f"teacher_refine_lr must be positive, got {self.teacher_refine_lr}")
        if self.teacher_refine_steps > 0:
            if not self.needs_teacher:
                raise ValueError("teacher_refine_steps refines the teacher's latents, but align_target 'sampled' uses "
                                 "the generator's own: drop --teacher_refine_steps")
            if not self.has_evaluator:
                raise ValueError("teacher_refine_steps needs the evaluator (its features are the refinement's "
                                 "perceptual term; pixels alone lose the expression): pass --evaluator")
        for name in ("align_weight", "align_image_weight", "pixel_weight", "feature_weight", "jitter", "drop_prob",
                     "extra_prob"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_loss_every < 0:
            raise ValueError(f"image_loss_every must be >= 0, got {self.image_loss_every}")
        image_terms = self.image_loss_every > 0 and (self.pixel_weight > 0 or self.feature_weight > 0
                                                     or self.align_image_weight > 0)
        if self.align_weight == 0 and not image_terms:
            raise ValueError("nothing to train: align_weight is 0 and there are no image terms "
                             "(set image_loss_every >= 1 and align_image_weight, pixel_weight or feature_weight > 0)")
        if self.align_weight == 0 and self.image_loss_every != 1:
            raise ValueError("without alignment (align_weight 0) every step needs the image terms: "
                             "pass --image_loss_every 1")
        if not 0 <= self.partial_prob <= 1:
            raise ValueError(f"partial_prob must be in [0, 1], got {self.partial_prob}")
        if not 0 < self.partial_min <= 1:
            raise ValueError(f"partial_min must be in (0, 1], got {self.partial_min}")
        if not 0 < self.width_min <= self.width_max:
            raise ValueError(f"need 0 < width_min <= width_max, got {self.width_min}, {self.width_max}")
        if not 0 <= self.truncation_min <= 1:
            raise ValueError(f"truncation_min must be in [0, 1], got {self.truncation_min}")
        if not 0 <= self.colour_truncation_min <= 1:
            raise ValueError(f"colour_truncation_min must be in [0, 1], got {self.colour_truncation_min}")
        if self.align_image_weight > 0 and self.image_loss_every == 0:
            raise ValueError("align_image_weight is an image term: pass --image_loss_every >= 1")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be positive, got {self.max_train_minutes}")
        if self.completion_dim < 0:
            raise ValueError(f"completion_dim must be >= 0, got {self.completion_dim}")
        if not self.completion_kl_weight >= 0:
            raise ValueError(f"completion_kl_weight must be >= 0, got {self.completion_kl_weight}")
        if self.init_from not in (None, "", "none") and not Path(self.init_from).exists():
            raise ValueError(f"init_from {self.init_from!r} does not exist (a folder of save_sketch_encoder)")
        if self.structure_layers is not None and self.structure_layers < 1:
            raise ValueError(f"structure_layers must be >= 1, got {self.structure_layers}")
        if not Path(self.generator).exists():
            raise ValueError(f"generator {self.generator!r} does not exist; train one with "
                             "`python -m pipelines.training.train_stylegan2` or convert an official .pkl")
        if self.needs_teacher:
            if not self.has_teacher:
                raise ValueError(f"source {self.source!r} with align_target {self.align_target!r} needs the stage-1 "
                                 "image encoder: pass --teacher (train one with "
                                 "`python -m pipelines.training.train_stylegan_encoder`)")
            if not Path(self.teacher).exists():
                raise ValueError(f"teacher {self.teacher!r} does not exist; train it with "
                                 "`python -m pipelines.training.train_stylegan_encoder`")
        if self.has_evaluator and not Path(self.evaluator).exists():
            raise ValueError(f"evaluator {self.evaluator!r} does not exist; pass --evaluator none to train "
                             "without the feature loss")

    @property
    def has_teacher(self) -> bool:
        return self.teacher not in (None, "", "none")

    @property
    def has_evaluator(self) -> bool:
        return self.evaluator not in (None, "", "none")

    @property
    def needs_teacher(self) -> bool:
        return self.source == "world" or self.align_target == "teacher"


# ---------------------------------------------------------------------------------------------
# The pool: what a sketch is made from, its target latent and its target image
# ---------------------------------------------------------------------------------------------


@dataclass
class SketchPool:
    """``N`` training (or held-out) items rendered once."""

    w_target: torch.Tensor          # [N, num_ws, w_dim] the latent the student is aligned with
    images: torch.Tensor            # [N, C, R, R] uint8, the target images (at G's resolution)
    strokes: list | None = None     # source 'world': list of N stroke lists (drawing order)
    sketches: torch.Tensor | None = None  # source 'generator': [N, S, S] uint8 edge sketches
    labels: list[dict[str, str]] | None = None  # source 'world': the attributes of each portrait

    def __len__(self) -> int:
        return self.w_target.shape[0]

    def image_batch(self, index: np.ndarray, device: torch.device) -> torch.Tensor:
        """Target images ``[B, C, R, R]`` in [-1, 1]."""
        return self.images[torch.as_tensor(index)].to(device).float().div(127.5).sub(1.0)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


@torch.no_grad()
def _encode(encoder: StyleGANEncoder, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([encoder(x) for x in images.split(batch)]).float()


def teacher_targets(config: SketchEncoderTrainConfig, G: Generator, teacher: StyleGANEncoder, images: torch.Tensor,
                    evaluator: Any = None, batch: int = 100) -> torch.Tensor:
    """The stage-1 teacher's W+ of ``images`` ``[N, C, R, R]``: the image encoder's, refined by
    ``config.teacher_refine_steps`` steps of the StyleGAN2 projector started from it (pixels plus
    the evaluator's features, no noise maps, so the W+ alone carries the image)."""
    w = _encode(teacher, images)
    if config.teacher_refine_steps <= 0:
        return w
    from pipelines.stylegan_inversion import invert

    out = []
    with torch.enable_grad():
        for i, (x, w0) in enumerate(zip(images.split(batch), w.split(batch))):
            result = invert(G, x, w_init=w0, steps=config.teacher_refine_steps, lr=config.teacher_refine_lr,
                            evaluator=evaluator, optimize_noise=False, initial_noise_factor=0.0,
                            w_avg_samples=config.w_avg_samples,
                            generator=torch.Generator(w.device).manual_seed(config.seed + i))
            out.append(result.w_plus.detach().float())
    return torch.cat(out)


def _pool_key(config: SketchEncoderTrainConfig, n: int, held_out: bool) -> str:
    """What a pool's target latents depend on (a cached set is used only when all of it matches)."""
    keys = ("source", "world_split", "seed", "generator", "teacher", "teacher_refine_steps", "teacher_refine_lr",
            "align_target", "truncation_min")
    key = {name: getattr(config, name) for name in keys}
    key.update(n=n, held_out=held_out, evaluator=config.evaluator if config.teacher_refine_steps else None)
    return json.dumps(key, sort_keys=True)


def _cached_targets(path: Path | None, name: str, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, or the tensor kept under ``name`` in the safetensors file ``path`` when it was
    computed for the same ``key``; a new result is written back beside the file's other entries."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    if path is not None and path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # a truncated or foreign file: recompute and overwrite it
            print(f"ignoring the pool cache {path}: {exc}", flush=True)
            tensors, meta = {}, {}
        if meta.get(name) == key and name in tensors:
            print(f"target latents ({name}) read from {path}", flush=True)
            return tensors[name]
    value = compute()
    if path is not None:
        tensors[name] = value.detach().cpu().contiguous()
        meta[name] = key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    return value


@torch.no_grad()
def build_pool(config: SketchEncoderTrainConfig, G: Generator, teacher: StyleGANEncoder | None, w_avg: torch.Tensor,
               n: int, *, sketch_size: int, held_out: bool = False, evaluator: Any = None,
               cache: Path | None = None) -> SketchPool:
    """Render ``n`` items of ``config.source`` (the held-out set comes from other seeds); the
    target latents are read from ``cache`` when it holds this pool's (see :func:`_cached_targets`)."""
    device = w_avg.device
    name, key = ("held" if held_out else "train"), _pool_key(config, n, held_out)
    res = G.img_resolution
    if config.source == "world":
        from pipelines.data.portrait_world import PortraitWorld

        world = PortraitWorld()
        render_size = min(max(res, PortraitWorld.MIN_SIZE), PortraitWorld.MAX_SIZE)
        base = config.seed * 2 * _EVAL_SEED_OFFSET + (_EVAL_SEED_OFFSET if held_out else 0)
        images, strokes, labels = [], [], []
        for i in range(n):
            portrait = world.sample(base + i, size=render_size, split=config.world_split, with_line_art=False)
            x = torch.from_numpy(np.asarray(portrait.image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
            if render_size != res:
                x = F.interpolate(x, size=(res, res), mode="area" if render_size > res else "bilinear")
            images.append(x)
            strokes.append(portrait.strokes)
            labels.append(portrait.attributes.to_dict())
        images_f = torch.cat(images).to(device)
        w_target = _cached_targets(cache, name, key,
                                   lambda: teacher_targets(config, G, teacher, images_f, evaluator)).to(device)
        return SketchPool(w_target=w_target, images=_to_uint8(images_f), strokes=strokes, labels=labels)

    # source 'generator': G's own images, edge-detected; targets from the teacher or the samples
    gen = torch.Generator(device).manual_seed(config.seed * 2 + 3 + (1 if held_out else 0))
    ws, images = [], []
    for start in range(0, n, 64):
        m = min(64, n - start)
        w = sample_training_latents(G, m, w_avg, truncation_min=config.truncation_min, style_mixing=0.0,
                                    generator=gen)
        ws.append(w)
        images.append(synthesize(G, w))
    w_sampled, images_f = torch.cat(ws), torch.cat(images)
    rgb = images_f if images_f.shape[1] == 3 else images_f.expand(-1, 3, -1, -1)
    sketches = []
    for x in rgb.split(32):
        s = extract_sketch(x, config.edge_method)  # [b, 1, R, R] in [-1, 1]
        if s.shape[-1] != sketch_size:
            s = F.interpolate(s, size=(sketch_size, sketch_size), mode="area" if s.shape[-1] > sketch_size
                              else "bilinear")
        sketches.append(_to_uint8(s)[:, 0])
    w_target = (_cached_targets(cache, name, key, lambda: teacher_targets(config, G, teacher, images_f, evaluator))
                .to(device) if config.align_target == "teacher" else w_sampled)
    return SketchPool(w_target=w_target, images=_to_uint8(images_f), sketches=torch.cat(sketches))


def _augment_sketch_image(sketch: np.ndarray, rng: np.random.Generator, config: SketchEncoderTrainConfig) -> np.ndarray:
    """A hand-drawn look for an edge sketch (uint8 [S, S]): a small shift and a random line width."""
    s = sketch.shape[0]
    max_shift = max(1, int(round(0.015 * s)))
    dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    out = np.full_like(sketch, 255)
    out[max(0, dy):s + min(0, dy), max(0, dx):s + min(0, dx)] = \
        sketch[max(0, -dy):s + min(0, -dy), max(0, -dx):s + min(0, -dx)]
    scale = rng.uniform(config.width_min, config.width_max)
    if scale > 1.4:  # thicker pen
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.MinFilter(3)))
    return out


def make_sketches(pool: SketchPool, index: np.ndarray, fractions: np.ndarray, rng: np.random.Generator,
                  config: SketchEncoderTrainConfig, size: int, *, augment: bool) -> torch.Tensor:
    """Sketches ``[B, 1, size, size]`` in [-1, 1] of pool items ``index``, each keeping
    ``fractions[i]`` of its strokes (world: the first ones in drawing order; generator: ink pieces)."""
    out = []
    for i, fraction in zip(index, fractions):
        if pool.strokes is not None:
            strokes = partial_strokes(pool.strokes[int(i)], float(fraction))
            if augment:
                strokes = augment_strokes(strokes, rng, jitter=config.jitter,
                                          width_range=(config.width_min, config.width_max),
                                          drop_prob=config.drop_prob, extra_prob=config.extra_prob)
            arr = np.asarray(render_strokes(strokes, size=size))
        else:
            arr = erase_sketch(pool.sketches[int(i)].numpy(), float(fraction), rng)
            if augment:
                arr = _augment_sketch_image(arr, rng, config)
        out.append(torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0))
    return torch.stack(out)[:, None]


# ---------------------------------------------------------------------------------------------
# Losses, samples, figures
# ---------------------------------------------------------------------------------------------


def _mix(w_student: torch.Tensor, w_target: torch.Tensor, k: int, mix_fine: bool) -> torch.Tensor:
    return torch.cat([w_student[:, :k], w_target[:, k:]], dim=1) if mix_fine else w_student


def _losses(student: SketchEncoder, G: Generator, sketches: torch.Tensor, w_target: torch.Tensor,
            targets: torch.Tensor | None, perceptual: EvaluatorPerceptualLoss | None,
            config: SketchEncoderTrainConfig, k: int, w_var: float,
            colours: torch.Tensor | None = None, image_rows: torch.Tensor | None = None,
            eps: torch.Tensor | None = None, prior_rows: torch.Tensor | None = None,
            mean_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss terms of one batch (means over the batch); image terms when ``targets`` is given,
    and the image-space alignment when ``colours`` (random W+ latents ``[B, num_ws, w_dim]``) is.
    ``image_rows`` (bool ``[B]``) limits the image terms to those rows. A student with a completion
    code takes ``z = mu + sigma * eps`` from its posterior (``eps [B, completion_dim]``, default
    zero: the posterior mean) and adds the KL term; rows in ``prior_rows`` (bool ``[B]``) take
    ``z = eps`` from the prior instead, and so must come out right whatever their code; rows in
    ``mean_rows`` take the prior's mean code (no KL either)."""
    terms: dict[str, torch.Tensor] = {}
    if getattr(student, "completion_dim", 0):
        w_mean, summary = student.mean_and_summary(sketches)
        mu, logvar = student.posterior_params(summary, (w_target[:, :k] - w_mean[:, :k]).detach())
        z = mu if eps is None else mu + torch.exp(0.5 * logvar) * eps
        # KL(q || p): p is N(0, I), or the learned prior read from the (detached) sketch
        mu_p, logvar_p = student.prior_params(w_mean.detach(), summary.detach())
        kl = 0.5 * (logvar_p - logvar + (logvar.exp() + (mu - mu_p).square()) / logvar_p.exp() - 1).sum(1)  # [B]
        pays_kl = torch.ones_like(kl, dtype=torch.bool)  # rows whose code comes from the posterior
        if prior_rows is not None and eps is not None:
            z = torch.where(prior_rows[:, None], mu_p + torch.exp(0.5 * logvar_p) * eps, z)
            pays_kl &= ~prior_rows
        if mean_rows is not None:
            z = torch.where(mean_rows[:, None], mu_p, z)
            pays_kl &= ~mean_rows
        kl = kl[pays_kl]
        w_hat = student.complete(w_mean, summary, z)  # [B, num_ws, w_dim]
        terms["kl"] = kl.mean() if kl.numel() else kl.sum()
    else:
        w_hat = student(sketches)  # [B, num_ws, w_dim]
    terms["align"] = (w_hat[:, :k] - w_target[:, :k]).square().mean() / w_var
    if image_rows is not None:
        if not bool(image_rows.any()):
            targets = colours = None
        else:
            w_hat, w_target = w_hat[image_rows], w_target[image_rows]
            targets = targets[image_rows] if targets is not None else None
            colours = colours[image_rows] if colours is not None else None
    if targets is not None:
        recon = synthesize(G, _mix(w_hat, w_target, k, config.image_mix_fine))
        terms["pixel"] = reconstruction_error(recon, targets).mean()
        if perceptual is not None and config.feature_weight > 0:
            terms["feature"] = perceptual(recon, targets).mean()
    if colours is not None:
        # the student's structure and the teacher's, each under the same random colours (as the
        # pipeline's colour seed puts them), must give the same portrait
        with torch.no_grad():
            aligned = synthesize(G, _mix(w_target, colours, k, True))
        recoloured = synthesize(G, _mix(w_hat, colours, k, True))
        distance = reconstruction_error(recoloured, aligned)
        if perceptual is not None:
            distance = distance + perceptual(recoloured, aligned)
        terms["align_image"] = distance.mean()
    weights = {"align": config.align_weight, "pixel": config.pixel_weight, "feature": config.feature_weight,
               "align_image": config.align_image_weight, "kl": config.completion_kl_weight}
    terms["loss"] = sum(weights[name] * v for name, v in terms.items())
    return terms


@torch.no_grad()
def _outputs(student: SketchEncoder, G: Generator, sketches: torch.Tensor, w_target: torch.Tensor, k: int,
             batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Student latents and the portraits of [student structure, target fine ws]."""
    w_hat = torch.cat([student(x) for x in sketches.split(batch)])
    images = torch.cat([synthesize(G, w) for w in _mix(w_hat, w_target, k, True).split(batch)])
    return w_hat, images


def _sample_grid(student: SketchEncoder, G: Generator, eval_set: dict[str, Any], k: int, n: int) -> Image.Image:
    rows = []
    for key in ("complete", "partial50"):
        sketches = eval_set[key][:n]
        _, images = _outputs(student, G, sketches.to(eval_set["w_target"].device), eval_set["w_target"][:n], k)
        rows += [tensor_to_pil(F.interpolate(sketches, size=images.shape[-2:], mode="area")
                               if sketches.shape[-1] != images.shape[-1] else sketches), tensor_to_pil(images)]
    rows.append(tensor_to_pil(eval_set["images"][:n]))
    return make_grid([img for row in rows for img in row], columns=min(n, len(rows[0])))


@torch.no_grad()
def _figures(student: SketchEncoder, G: Generator, eval_set: dict[str, Any], evaluator: Any, labels: list | None,
             w_avg: torch.Tensor, k: int, w_var: float, seed: int) -> dict[str, float]:
    """Held-out figures: latent error and image error of complete and 50 % sketches; with an
    evaluator, FD-world to random samples and (world) the structural attributes found again."""
    figures: dict[str, float] = {}
    outputs = {}
    # the pipeline's way: colours of seeded latents at psi 0.7 instead of the target's fine ws
    n = eval_set["w_target"].shape[0]
    z = torch.randn([n, G.z_dim], generator=torch.Generator(w_avg.device).manual_seed(seed + 13), device=w_avg.device)
    colours = w_avg + 0.7 * (G.mapping(z, torch.zeros([n, G.c_dim], device=w_avg.device),
                                       skip_w_avg_update=True) - w_avg)
    completion = getattr(student, "completion_dim", 0)
    z = torch.randn([n, completion], generator=torch.Generator(w_avg.device).manual_seed(seed + 17),
                    device=w_avg.device) if completion else None
    for key in ("complete", "partial50"):
        w_hat, images = _outputs(student, G, eval_set[key].to(w_avg.device), eval_set["w_target"], k)
        outputs[key] = images
        w_seeded = student(eval_set[key].to(w_avg.device), z=z) if completion else w_hat
        outputs[f"{key}_seeded"] = torch.cat([synthesize(G, w) for w in _mix(w_seeded, colours, k, True).split(64)])
        figures[f"latent_error_{key}"] = float((w_hat[:, :k] - eval_set["w_target"][:, :k]).square().mean() / w_var)
        figures[f"image_mse_{key}"] = float(reconstruction_error(images, eval_set["images"]).mean())
    if evaluator is not None and G.img_channels == 3:
        from pipelines.evaluation import frechet_distance

        gen = torch.Generator(w_avg.device).manual_seed(seed + 11)
        w_random = sample_training_latents(G, n, w_avg, truncation_min=1.0, style_mixing=0.0, generator=gen)
        random_images = torch.cat([synthesize(G, w) for w in w_random.split(64)])
        if n >= 4:
            ref = evaluator.run(random_images)["features"].numpy().astype(np.float64)
            fd = {key: frechet_distance(evaluator.run(outputs[key])["features"].numpy().astype(np.float64), ref)
                  for key in outputs}
            figures["fd_complete_vs_samples"] = fd["complete"]
            figures["fd_partial50_vs_samples"] = fd["partial50"]
            figures["partial_fd_ratio"] = fd["partial50"] / max(fd["complete"], 1e-9)
            figures["fd_partial50_seeded_vs_samples"] = fd["partial50_seeded"]
        if labels is not None:
            names = {"complete": "complete_sketch_attr_match", "partial50": "partial50_attr_match"}
            for key in outputs:
                found = read_attributes(evaluator, outputs[key])
                pairs = [(f[a], lab[a]) for f, lab in zip(found, labels) for a in STRUCTURE_ATTRIBUTES if a in f]
                if pairs:
                    base, _, seeded = key.partition("_")
                    figures[names[base] + ("_seeded" if seeded else "")] = float(np.mean([p == t for p, t in pairs]))
    return figures


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(config: SketchEncoderTrainConfig, progress: Progress | None = None) -> Path:
    """Run (or resume) a sketch encoder training run; returns the folder of the exported encoder."""
    from pipelines.evaluation import Evaluator
    from pipelines.stylegan_inversion import load_encoder
    from pipelines.stylegan_io import load_generator

    # 1. Config, run folder, device, seeds.
    config.validate()
    run = RunFolder(config.out_dir)
    resuming = run.create(config, resume=config.resume)
    seed_everything(config.seed)
    device = select_device(config.device)
    step = 0
    try:
        # 2. The frozen generator and its W statistics, the teacher, the evaluator.
        G = load_generator(config.generator, device=device).requires_grad_(False)
        w_avg, w_std = w_statistics(G, config.w_avg_samples, torch.Generator(device).manual_seed(config.seed))
        w_var = w_std**2 / G.w_dim  # per-dimension variance of W
        teacher = None
        if config.needs_teacher:
            teacher = load_encoder(config.teacher, device=device).requires_grad_(False)
            if (teacher.num_ws, teacher.w_dim) != (G.num_ws, G.w_dim):
                raise ValueError(f"the teacher predicts [{teacher.num_ws}, {teacher.w_dim}] latents, the generator "
                                 f"takes [{G.num_ws}, {G.w_dim}]: it was trained for another generator")
        evaluator = Evaluator.from_pretrained(config.evaluator, device=device) if config.has_evaluator else None
        perceptual = (EvaluatorPerceptualLoss(evaluator) if evaluator is not None
                      and (config.feature_weight > 0 or config.align_image_weight > 0) else None)
        if config.source == "world" and G.img_channels != 3:
            raise ValueError(f"source 'world' renders colour portraits; this generator makes {G.img_channels}-channel "
                             "images: use --source generator")
        k = config.structure_layers or default_structure_layers(G.num_ws, G.img_resolution)
        if k > G.num_ws:
            raise ValueError(f"structure_layers {k} exceeds the generator's {G.num_ws} ws")
        print(f"sketch encoder for {config.generator}: {G.img_resolution} px, num_ws {G.num_ws}, w_dim {G.w_dim}, "
              f"structure layers {k}, source {config.source}, on {device}", flush=True)

        # 3. Student and optimiser.
        student = SketchEncoder(G.num_ws, G.w_dim, G.img_resolution, input_resolution=config.input_resolution,
                                channel_base=config.channel_base, channel_max=config.channel_max,
                                structure_layers=k, completion_dim=config.completion_dim,
                                completion_prior=config.completion_prior).to(device)
        student.w_avg.copy_(w_avg)
        if config.init_from not in (None, "", "none") and not resuming:
            from pipelines.sketch_to_image import load_sketch_encoder

            source = load_sketch_encoder(config.init_from, device=device)
            mine = {name: p.shape for name, p in student.state_dict().items()}
            theirs = source.state_dict()
            if any(name not in mine or mine[name] != p.shape for name, p in theirs.items()):
                raise ValueError(f"init_from {config.init_from!r} has other sizes than this student (channel_base, "
                                 "channel_max, structure_layers and the generator must match)")
            student.load_state_dict(theirs, strict=False)  # the completion heads, if new, start fresh
            print(f"started from {config.init_from}", flush=True)
        opt = torch.optim.Adam(student.parameters(), lr=config.lr)
        size = student.input_resolution
        n_params = sum(p.numel() for p in student.parameters())
        print(f"student: {n_params / 1e6:.2f} M parameters, sketches of {size} px", flush=True)

        # 4. The pool (rendered from fixed seeds, so a resumed run gets the same one) and the held-out set.
        t0 = time.time()
        cache = None  # the encoder's latents are quick to remake; refined ones are kept
        if config.pool_cache not in (None, ""):
            cache = Path(config.pool_cache)
        elif config.teacher_refine_steps > 0:
            cache = run.path / "pool_targets.safetensors"
        pool = build_pool(config, G, teacher, w_avg, config.pool_size, sketch_size=size, evaluator=evaluator,
                          cache=cache)
        held = build_pool(config, G, teacher, w_avg, config.eval_images, sketch_size=size, held_out=True,
                          evaluator=evaluator, cache=cache)
        eval_rng = np.random.default_rng([config.seed, 99])
        idx = np.arange(len(held))
        eval_set = {
            "complete": make_sketches(held, idx, np.ones(len(held)), eval_rng, config, size, augment=False),
            "partial50": make_sketches(held, idx, np.full(len(held), 0.5), eval_rng, config, size, augment=False),
            "w_target": held.w_target, "images": held.image_batch(idx, device),
        }
        print(f"rendered a pool of {len(pool)} and {len(held)} held-out items in {time.time() - t0:.1f} s", flush=True)

        # 5. Resume.
        train_seconds = 0.0
        if resuming:
            ckpt = run.load_checkpoint()
            student.load_state_dict(ckpt["student"])
            opt.load_state_dict(ckpt["optimizer"])
            restore_rng_state(ckpt["rng"])
            step = int(ckpt["step"])
            train_seconds = float(ckpt.get("train_seconds", 0.0))
            run.truncate_metrics(step)
            print(f"resumed from step {step}", flush=True)

        def checkpoint() -> None:
            run.save_checkpoint(step, {"step": step, "student": student.state_dict(), "optimizer": opt.state_dict(),
                                       "rng": capture_rng_state(), "train_seconds": train_seconds,
                                       "config": config_to_dict(config)},
                                keep=config.keep_checkpoints)

        # 6. The loop.
        run.set_status("running", step=step, total=config.steps)
        student.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        t_log, step_log, t_start = time.time(), step, time.time()
        last_checkpoint = step if resuming else -1
        time_up = False
        while step < config.steps and not time_up:
            # 6a. A batch: pool items, complete or partial sketches (data randomness seeded by the step,
            # so a resumed run draws what the uninterrupted one would have drawn).
            rng = np.random.default_rng([config.seed, 7, step])
            index = rng.integers(0, len(pool), size=config.batch)
            partial = rng.random(config.batch) < config.partial_prob
            fractions = np.where(partial, rng.uniform(config.partial_min, 1.0, size=config.batch), 1.0)
            sketches = make_sketches(pool, index, fractions, rng, config, size, augment=config.augment).to(device)
            w_target = pool.w_target[torch.as_tensor(index)]
            image_terms = config.image_loss_every > 0 and step % config.image_loss_every == 0
            reconstruct = image_terms and (config.pixel_weight > 0 or config.feature_weight > 0)
            targets = pool.image_batch(index, device) if reconstruct else None
            colours = None
            if image_terms and config.align_image_weight > 0:
                colours = sample_training_latents(
                    G, config.batch, w_avg, truncation_min=config.colour_truncation_min, style_mixing=0.0,
                    generator=torch.Generator(device).manual_seed(config.seed * 1_000_003 + step))

            # 6b. Loss and update.
            image_rows = None if config.image_terms_partial else torch.as_tensor(~partial, device=device)
            eps = None
            if config.completion_dim:
                eps = torch.randn([config.batch, config.completion_dim], device=device,
                                  generator=torch.Generator(device).manual_seed(config.seed * 1_000_033 + step))
            prior = ~partial if config.completion_prior_on_complete else np.zeros(config.batch, bool)
            hybrid = partial & (np.random.default_rng([config.seed, 11, step]).random(config.batch)
                                < config.completion_prior_share)  # the hybrid objective's rows
            if config.completion_prior_code == "sample":  # codes drawn from the prior, as at inference
                prior, hybrid = prior | hybrid, np.zeros_like(hybrid)
            prior_rows, mean_rows = torch.as_tensor(prior, device=device), torch.as_tensor(hybrid, device=device)
            terms = _losses(student, G, sketches, w_target, targets, perceptual, config, k, w_var, colours, image_rows,
                            eps, prior_rows, mean_rows)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            step += 1
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach())
                counts[name] = counts.get(name, 0) + 1

            # 7. Metrics, samples, checkpoints.
            if config.max_train_minutes is not None:
                time_up = time.time() - t_start >= config.max_train_minutes * 60
            last = step == config.steps or time_up
            if step % config.log_every == 0 or last:
                elapsed = time.time() - t_log
                train_seconds += elapsed
                row = {name: sums[name] / counts[name] for name in sums}
                row.update(sketches_per_s=(step - step_log) * config.batch / max(elapsed, 1e-9),
                           train_seconds=train_seconds)
                run.log_metrics(step, **row)
                run.set_status("running", step=step, total=config.steps)
                print(f"step {step}/{config.steps} loss {row['loss']:.4f} align {row['align']:.4f} "
                      f"({row['sketches_per_s']:.1f} sketches/s)", flush=True)
                sums, counts = {}, {}
                t_log, step_log = time.time(), step
            preview = None
            if step % config.sample_every == 0 or last:
                student.eval()
                preview = _sample_grid(student, G, eval_set, k, config.num_samples)
                student.train()
                preview.save(run.sample_path(step))
            if step % config.checkpoint_every == 0 or last:
                checkpoint()
                last_checkpoint = step
            if progress is not None:
                progress(step, config.steps, preview)
        if last_checkpoint != step:
            checkpoint()

        # 8. Held-out figures: complete and half-finished sketches of portraits never trained on.
        student.eval()
        with torch.no_grad():
            one = eval_set["complete"][:1].to(device)
            times = []
            for _ in range(7):  # two warm-up passes, then the median of five
                t0 = time.perf_counter()
                student(one)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            encode_ms = 1000 * float(np.median(times[2:]))
        figures = _figures(student, G, eval_set, evaluator, held.labels, w_avg, k, w_var, config.seed)
        figures.update(encoder_ms_per_sketch=encode_ms, structure_layers=k, align_weight=config.align_weight,
                       steps=step, train_seconds=round(train_seconds, 1))
        run.log_metrics(step, **{name: float(v) for name, v in figures.items()})
        print("held-out:", {name: round(float(v), 5) for name, v in figures.items()}, flush=True)

        # 9. Export with a card.
        targets_out = [run.path / "sketch_encoder"] + ([Path(config.export_to)] if config.export_to else [])
        command = "python -m pipelines.training.train_sketch_encoder " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        from pipelines.cards import write_card

        alignment = (f"aligned with the teacher's W+ on the first {k} of {G.num_ws} ws (weight {config.align_weight})"
                     if config.align_weight > 0 else "trained WITHOUT teacher alignment (image losses only): "
                                                     "the baseline of the alignment ablation")
        for folder in targets_out:
            save_sketch_encoder(student, folder, generator_source=config.generator,
                                teacher_source=config.teacher if teacher is not None else None)
            write_card(folder, title="AniFaceDrawing sketch encoder into W+",
                       task="sketch to portrait (sketch -> w+ structure layers)",
                       architecture=f"e4e-style residual CNN + feature pyramid on 1-channel sketches, "
                                    f"{n_params / 1e6:.2f}M parameters, {size} px input, "
                                    f"{G.num_ws} x {G.w_dim} output, structure layers {k}",
                       source=f"training run {config.out_dir} on generator {config.generator} "
                              f"(source {config.source}, teacher {config.teacher if teacher is not None else 'none'}"
                              + (f", its latents refined by {config.teacher_refine_steps} projector steps"
                                 if teacher is not None and config.teacher_refine_steps else "") + ")",
                       command=command, config=config_to_dict(config), figures=figures,
                       notes=f"Stage 2 of AniFaceDrawing (Huang et al. 2023), {alignment}. Figures are measured "
                             "on held-out sketches: complete ones and ones cut to 50 % of their strokes. Use it only "
                             "with the generator it was trained for.")
        run.set_status("finished", step=step, total=config.steps, figures=figures)
        return targets_out[-1]
    except BaseException as exc:
        run.set_status("failed", step=step, total=config.steps, error=f"{type(exc).__name__}: {exc}")
        raise


def main(argv: list[str] | None = None) -> Path:
    return train(parse_config(SketchEncoderTrainConfig, argv))


if __name__ == "__main__":
    main()
