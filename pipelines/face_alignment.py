"""FFHQ-style face alignment from dlib's 68 facial landmarks, and the centre-crop fallback.

The recipe is the one the FFHQ data set was made with (Karras et al. 2019, "A Style-Based Generator
Architecture for GANs", Appendix A): the eye centres and mouth corners define an oriented square
(the *quad*) around the face; the photo is resampled so that the quad becomes the output square.
A StyleGAN trained on FFHQ expects faces aligned this way, so a real photo is aligned before it is
inverted, and the edited face is pasted back through the same transform
(:func:`pipelines.stylegan_editing.paste_back`).

Coordinates are continuous pixel coordinates: pixel ``(i, j)`` covers ``[i, i + 1) x [j, j + 1)``
(Pillow's convention for geometric transforms). ``AlignedFace.transform`` is the 3x3 affine
matrix that maps crop coordinates to photo coordinates.

dlib finds no face in drawings and anime portraits (the portrait world): :class:`NoFaceFound` is
raised, and the studio offers :func:`centre_crop` / :func:`centre_crop_face` instead.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "AlignedFace",
    "NoFaceFound",
    "LandmarkModelMissing",
    "align_face",
    "align_from_landmarks",
    "centre_crop",
    "centre_crop_face",
    "detect_landmarks",
    "ffhq_quad",
    "find_landmark_model",
    "quad_to_transform",
    "to_rgb",
]

LANDMARK_MODEL_NAME = "shape_predictor_68_face_landmarks.dat"
# Where the 68-point model is looked for, after $STUDIO_DLIB_LANDMARKS: the PyPI package
# face-recognition-models (its data folder, found without importing it: its __init__ needs
# setuptools' pkg_resources) and Debian's libdlib-data.
_DEBIAN_MODEL = Path("/usr/share/dlib") / LANDMARK_MODEL_NAME


class NoFaceFound(ValueError):
    """dlib found no face in the image (expected for drawings and anime portraits)."""


class LandmarkModelMissing(RuntimeError):
    """dlib or its 68-point landmark model is not installed."""


@dataclass
class AlignedFace:
    """An aligned face crop and where it came from in the photo."""

    crop: Image.Image            # RGB, output_size x output_size
    quad: np.ndarray             # [4, 2] photo coordinates of the crop's corners: TL, BL, BR, TR
    transform: np.ndarray        # [3, 3] affine, crop (x, y, 1) -> photo (x, y, 1)
    landmarks: np.ndarray | None = None  # [68, 2] photo coordinates (None for a centre crop)

    @property
    def size(self) -> int:
        return self.crop.size[0]


# ---------------------------------------------------------------------------------------------
# Pure geometry
# ---------------------------------------------------------------------------------------------


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ crop quad from 68 landmarks ``[68, 2]`` (x, y) -> ``[4, 2]`` (TL, BL, BR, TR).

    The quad is a square centred slightly below the eyes (10 % of the eye-to-mouth vector), turned
    so that its x axis follows the eye line corrected by the eye-to-mouth direction, with a side of
    ``max(4 * eye distance, 3.6 * eye-to-mouth distance)``.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks must be [68, 2] (dlib's 68-point layout), got {lm.shape}")
    eye_left = lm[36:42].mean(axis=0)     # the subject's right eye, on the image's left
    eye_right = lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5   # outer mouth corners
    eye_to_mouth = mouth_avg - eye_avg

    # x: the eye line, tilted by the perpendicular of the eye-to-mouth vector, then scaled.
    x = eye_to_eye - np.flipud(eye_to_mouth) * np.array([-1.0, 1.0])
    norm = np.hypot(*x)
    if norm < 1e-8:
        raise ValueError("degenerate landmarks: the eyes and the mouth coincide")
    x = x / norm * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * np.array([-1.0, 1.0])   # x turned by 90 degrees (image y points down)
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def quad_to_transform(quad: np.ndarray, size: int) -> np.ndarray:
    """3x3 affine taking crop coordinates (``size`` x ``size`` square) to photo coordinates so
    that the crop's corners (0, 0), (0, size), (size, size), (size, 0) land on ``quad``."""
    q = np.asarray(quad, dtype=np.float64)
    if q.shape != (4, 2):
        raise ValueError(f"quad must be [4, 2], got {q.shape}")
    u = (q[3] - q[0]) / size   # photo displacement per crop pixel along x
    v = (q[1] - q[0]) / size   # ... along y
    return np.array([[u[0], v[0], q[0, 0]], [u[1], v[1], q[0, 1]], [0.0, 0.0, 1.0]])


def _affine_coefficients(matrix: np.ndarray) -> tuple[float, ...]:
    """Pillow's AFFINE data (output pixel -> input pixel) from a 3x3 output->input matrix."""
    return tuple(float(v) for v in matrix[:2].reshape(-1))


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image as RGB; transparent parts are composited over ``background``."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _warp(photo: Image.Image, crop_to_photo: np.ndarray, size: int, supersample: int) -> Image.Image:
    """Resample ``photo`` into a ``size``-pixel crop through ``crop_to_photo``; rendered at
    ``supersample`` x the size and reduced with Lanczos, which anti-aliases large faces."""
    big = size * supersample
    scale = np.diag([1.0 / supersample, 1.0 / supersample, 1.0])
    out = photo.transform((big, big), Image.AFFINE, _affine_coefficients(crop_to_photo @ scale),
                          resample=Image.BICUBIC)
    return out.resize((size, size), Image.LANCZOS) if supersample > 1 else out


def _reflect_pad(photo: Image.Image, quad: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Pad ``photo`` by reflection where the quad leaves it (as the FFHQ script does, without its
    blur fade); returns the padded photo and the offset added to photo coordinates."""
    w, h = photo.size
    lo = np.floor(quad.min(axis=0)).astype(int)
    hi = np.ceil(quad.max(axis=0)).astype(int)
    pad_l, pad_t = max(0, -lo[0]), max(0, -lo[1])
    pad_r, pad_b = max(0, hi[0] - w), max(0, hi[1] - h)
    if not (pad_l or pad_t or pad_r or pad_b):
        return photo, np.zeros(2)
    a = np.asarray(photo)
    # np.pad 'reflect' needs pad < size; repeat it for very large pads.
    while pad_l or pad_t or pad_r or pad_b:
        step = [min(p, s - 1) for p, s in ((pad_t, a.shape[0]), (pad_b, a.shape[0]), (pad_l, a.shape[1]),
                                          (pad_r, a.shape[1]))]
        a = np.pad(a, ((step[0], step[1]), (step[2], step[3]), (0, 0)), mode="reflect")
        pad_t, pad_b, pad_l, pad_r = pad_t - step[0], pad_b - step[1], pad_l - step[2], pad_r - step[3]
    offset = np.array([max(0, -lo[0]), max(0, -lo[1])], dtype=np.float64)
    return Image.fromarray(a), offset


def align_from_landmarks(image: Image.Image, landmarks: np.ndarray, output_size: int = 256) -> AlignedFace:
    """Align ``image`` with given 68-point landmarks (the pure part of :func:`align_face`)."""
    if output_size < 8:
        raise ValueError(f"output_size must be >= 8, got {output_size}")
    photo = to_rgb(image)
    quad = ffhq_quad(landmarks)
    transform = quad_to_transform(quad, output_size)
    padded, offset = _reflect_pad(photo, quad)
    shift = np.array([[1.0, 0.0, offset[0]], [0.0, 1.0, offset[1]], [0.0, 0.0, 1.0]])
    side = float(np.hypot(*(quad[3] - quad[0])))
    supersample = int(min(4, max(1, math.ceil(side / output_size))))
    crop = _warp(padded, shift @ transform, output_size, supersample)
    return AlignedFace(crop=crop, quad=quad, transform=transform, landmarks=np.asarray(landmarks, np.float64))


# ---------------------------------------------------------------------------------------------
# dlib
# ---------------------------------------------------------------------------------------------


def find_landmark_model() -> Path:
    """Path of dlib's ``shape_predictor_68_face_landmarks.dat``.

    Looked for in ``$STUDIO_DLIB_LANDMARKS``, the ``face-recognition-models`` package and Debian's
    ``libdlib-data`` (``/usr/share/dlib``). Raises :class:`LandmarkModelMissing` with the install
    command when none has it.
    """
    env = os.environ.get("STUDIO_DLIB_LANDMARKS")
    candidates = [Path(env)] if env else []
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "models" / LANDMARK_MODEL_NAME)
    candidates.append(_DEBIAN_MODEL)
    for path in candidates:
        if path.is_file():
            return path
    raise LandmarkModelMissing(
        "dlib's 68-point landmark model was not found; install it with "
        "`pip install face-recognition-models` (or `apt-get install libdlib-data`), or set "
        "STUDIO_DLIB_LANDMARKS to the .dat file")


@functools.lru_cache(maxsize=2)
def _dlib_models(model_path: str) -> tuple[Any, Any]:
    """dlib's HOG face detector and the 68-point shape predictor (loaded once, read-only)."""
    try:
        import dlib
    except ImportError as exc:
        raise LandmarkModelMissing("face alignment needs dlib: `pip install dlib-bin`") from exc
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(model_path)


def detect_landmarks(image: Image.Image, *, upsample: int = 1) -> np.ndarray:
    """68 landmarks ``[68, 2]`` of the largest face dlib finds in ``image``.

    Raises :class:`NoFaceFound` when there is none (always the case for anime portraits).
    """
    detector, predictor = _dlib_models(str(find_landmark_model()))
    rgb = np.asarray(to_rgb(image))
    faces = list(detector(rgb, upsample))
    if not faces:
        raise NoFaceFound(
            "no face was found in the image (dlib finds photographed faces, not drawings or anime "
            "portraits); use a centre crop instead (centre_crop / the 'centre crop' option)")
    face = max(faces, key=lambda r: r.width() * r.height())
    shape = predictor(rgb, face)
    return np.array([[p.x + 0.5, p.y + 0.5] for p in shape.parts()], dtype=np.float64)  # pixel centres


def align_face(image: Image.Image, *, output_size: int = 256, upsample: int = 1) -> AlignedFace:
    """Detect the largest face with dlib and align it the FFHQ way into an ``output_size`` crop.

    Raises :class:`NoFaceFound` (a ``ValueError``) when dlib finds no face, and
    :class:`LandmarkModelMissing` when dlib or its model is not installed.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"align_face expects a PIL image, got {type(image).__name__}")
    landmarks = detect_landmarks(image, upsample=upsample)
    return align_from_landmarks(image, landmarks, output_size)


# ---------------------------------------------------------------------------------------------
# Centre crop (drawings, anime portraits, or when no face is found)
# ---------------------------------------------------------------------------------------------


def centre_crop_face(image: Image.Image, size: int) -> AlignedFace:
    """The largest centred square of ``image``, resized to ``size``, as an :class:`AlignedFace`
    (so that :func:`~pipelines.stylegan_editing.paste_back` works for it too)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"centre_crop expects a PIL image, got {type(image).__name__}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    photo = to_rgb(image)
    w, h = photo.size
    side = min(w, h)
    x0, y0 = (w - side) // 2, (h - side) // 2
    box = (x0, y0, x0 + side, y0 + side)
    crop = photo.crop(box)
    if crop.size != (size, size):
        crop = crop.resize((size, size), Image.LANCZOS)
    quad = np.array([[box[0], box[1]], [box[0], box[3]], [box[2], box[3]], [box[2], box[1]]], dtype=np.float64)
    return AlignedFace(crop=crop, quad=quad, transform=quad_to_transform(quad, size))


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square of ``image`` (converted to RGB), resized to ``size`` x ``size``."""
    return centre_crop_face(image, size).crop
