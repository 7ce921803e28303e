"""Sketch data: world strokes made hand-drawn, partial sketches, XDoG, uploads of any kind."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from pipelines.data.portrait_world import PortraitWorld, Stroke
from pipelines.sketch_data import (EMPTY_NOTE, PHOTO_NOTE, augment_strokes, erase_sketch, extract_sketch,
                                   ink_fraction, is_empty_sketch, looks_like_line_drawing, partial_strokes,
                                   render_strokes, to_sketch, xdog)


@pytest.fixture(scope="module")
def portrait():
    return PortraitWorld(supersample=2).sample(3, size=64)


def _ink(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L")) < 160


def test_render_strokes_matches_world_line_art_and_any_size(portrait):
    ours = np.asarray(render_strokes(portrait.strokes, size=64, supersample=2), dtype=np.float32)
    world = np.asarray(portrait.line_art, dtype=np.float32)
    assert np.abs(ours - world).mean() < 1.0  # the same drawing as render_sketch
    small = render_strokes(portrait.strokes, size=16)
    assert small.size == (16, 16) and small.mode == "L" and ink_fraction(small) > 0.05
    assert render_strokes([], size=16).getextrema() == (255, 255)
    with pytest.raises(ValueError, match="size"):
        render_strokes(portrait.strokes, size=4)


def test_partial_strokes_keep_drawing_order(portrait):
    strokes = portrait.strokes
    half = partial_strokes(strokes, 0.5)
    assert half == strokes[:round(0.5 * len(strokes))]
    assert partial_strokes(strokes, 0.0) == [] and len(partial_strokes(strokes, 1.0)) == len(strokes)
    assert half[0].group == "outline"
    a, b, c = (_ink(render_strokes(partial_strokes(strokes, f), size=64)).sum() for f in (0.25, 0.5, 1.0))
    assert a < b < c
    with pytest.raises(ValueError, match="fraction"):
        partial_strokes(strokes, 1.5)


def test_augment_strokes_wobbles_drops_and_adds(portrait):
    strokes = portrait.strokes
    rng = np.random.default_rng(0)
    plain = augment_strokes(strokes, rng, jitter=0.0, width_range=(1, 1), drop_prob=0.0, extra_prob=0.0, shift=0.0)
    assert len(plain) == len(strokes)
    assert all(np.allclose(p.points, s.points) and p.width == pytest.approx(s.width, rel=0.16)
               for p, s in zip(plain, strokes))

    moved = augment_strokes(strokes, np.random.default_rng(1), jitter=0.01, drop_prob=0.0, extra_prob=0.0)
    shift = np.mean([np.abs(m.points - s.points).mean() for m, s in zip(moved, strokes)])
    assert 0.002 < shift < 0.05
    assert all(((m.points >= 0) & (m.points <= 1)).all() for m in moved)

    dropped = augment_strokes(strokes, np.random.default_rng(2), drop_prob=0.5, extra_prob=0.0)
    assert len(dropped) < len(strokes)
    extra = augment_strokes(strokes, np.random.default_rng(3), drop_prob=0.0, extra_prob=1.0)
    assert len(strokes) < len(extra) <= len(strokes) + 3

    widths = [np.median([s.width for s in augment_strokes(strokes, np.random.default_rng(i), width_range=(0.5, 2.0))])
              for i in range(8)]
    assert max(widths) / min(widths) > 1.3
    # reproducible from the rng, and the source strokes are not modified
    before = strokes[0].points.copy()
    again = [augment_strokes(strokes, np.random.default_rng(5)) for _ in range(2)]
    assert all(np.array_equal(a.points, b.points) for a, b in zip(*again))
    assert np.array_equal(strokes[0].points, before)
    with pytest.raises(ValueError, match="width_range"):
        augment_strokes(strokes, rng, width_range=(2.0, 1.0))


def test_erase_sketch_keeps_about_the_fraction(portrait):
    sketch = np.asarray(portrait.line_art)
    ink = (sketch < 250).sum()
    rng = np.random.default_rng(0)
    kept = [(erase_sketch(sketch, f, rng) < 250).sum() / ink for f in (0.25, 0.5, 0.75)]
    assert kept[0] < kept[1] < kept[2] < 1.0
    assert abs(kept[1] - 0.5) < 0.2
    half = erase_sketch(sketch, 0.5, rng)
    assert ((half == sketch) | (half == 255)).all()  # only erases, never draws
    assert (erase_sketch(sketch, 0.0, rng) == 255).all() and (erase_sketch(sketch, 1.0, rng) == sketch).all()


def test_xdog_traces_edges_on_white():
    img = Image.new("RGB", (48, 48), (240, 200, 180))
    ImageDraw.Draw(img).ellipse((10, 10, 38, 38), fill=(40, 40, 90))
    out = xdog(img)
    assert out.mode == "L" and out.size == (48, 48)
    ink = _ink(out)
    assert ink[24, 24] == 0 and ink[2, 2] == 0  # flat areas of any tone stay paper
    assert ink[9:12, 20:28].any() or ink[10:13, 20:28].any()  # the circle's rim is a line
    assert 0.02 < ink.mean() < 0.3
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    tt = extract_sketch(t, "xdog")
    assert tt.shape == (2, 1, 48, 48) and tt.min() >= -1 and tt.max() <= 1
    assert np.abs((tt[0, 0].numpy() + 1) * 127.5 - np.asarray(out, dtype=np.float32)).max() <= 1.0
    with pytest.raises(ValueError, match="method"):
        extract_sketch(t, "canny")


def test_xdog_on_a_world_portrait_resembles_its_line_art():
    p = PortraitWorld(supersample=2).sample(7, size=64)
    traced, truth = _ink(xdog(p.image)), _ink(p.line_art)
    near_truth = np.asarray(Image.fromarray(truth.astype(np.uint8) * 255).resize((32, 32), Image.BOX)) > 0
    near_traced = np.asarray(Image.fromarray(traced.astype(np.uint8) * 255).resize((32, 32), Image.BOX)) > 0
    assert (near_traced & near_truth).sum() / near_truth.sum() > 0.6


def test_empty_sketches():
    assert is_empty_sketch(None)
    assert is_empty_sketch(Image.new("L", (64, 64), 255))
    assert is_empty_sketch(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))  # a transparent canvas is paper
    dot = Image.new("L", (64, 64), 255)
    dot.putpixel((3, 3), 0)
    assert is_empty_sketch(dot)
    line = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(line).line((10, 10, 50, 40), fill=0, width=2)
    assert not is_empty_sketch(line)
    assert not is_empty_sketch(torch.from_numpy(np.asarray(line, dtype=np.float32) / 127.5 - 1)[None, None])


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1", "LA", "I"])
def test_to_sketch_takes_any_mode_and_size(mode):
    canvas = Image.new("RGB", (300, 180), (255, 255, 255))
    ImageDraw.Draw(canvas).ellipse((100, 20, 200, 160), outline=(30, 30, 200), width=4)  # a blue pen
    img = canvas.convert(mode)
    sketch, notes = to_sketch(img, size=32)
    assert sketch.mode == "L" and sketch.size == (32, 32)
    assert notes == []
    ink = _ink(sketch)
    assert 0.03 < ink.mean() < 0.5
    assert not ink[16, 16]  # inside the circle stays white
    assert np.asarray(sketch).min() < 40  # the blue line became black


def test_to_sketch_pads_wide_drawings_instead_of_cropping():
    canvas = Image.new("L", (400, 100), 255)
    ImageDraw.Draw(canvas).line((5, 50, 60, 50), fill=0, width=6)  # near the left edge
    sketch, _ = to_sketch(canvas, size=64)
    assert _ink(sketch)[:, :16].any()


def test_to_sketch_empty_and_photo():
    for blank in (None, Image.new("RGB", (100, 80), (255, 255, 255)), Image.new("RGBA", (50, 50), (0, 0, 0, 0)),
                  Image.new("L", (40, 40), 200), np.full((20, 30, 3), 255, np.uint8)):
        sketch, notes = to_sketch(blank, size=32)
        assert notes == [EMPTY_NOTE] and is_empty_sketch(sketch) and sketch.size == (32, 32)

    rng = np.random.default_rng(0)
    photo = (np.linspace(0, 1, 96)[None, :, None] * np.array([200, 120, 60]) + rng.normal(0, 20, (80, 96, 3)))
    photo = Image.fromarray(np.clip(photo + 30, 0, 255).astype(np.uint8))
    ImageDraw.Draw(photo).rectangle((30, 20, 60, 60), fill=(10, 10, 10))
    assert not looks_like_line_drawing(photo)
    sketch, notes = to_sketch(photo, size=32)
    assert notes == [PHOTO_NOTE] and sketch.size == (32, 32) and not is_empty_sketch(sketch)

    # white lines on a black board are read as a drawing
    board = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(board).line((10, 32, 54, 32), fill=255, width=3)
    sketch, notes = to_sketch(board, size=32)
    assert notes == [] and _ink(sketch)[14:18, 8:24].any() and not _ink(sketch)[2, 2]


def test_to_sketch_of_world_line_art_is_close_to_it(portrait):
    sketch, notes = to_sketch(portrait.line_art.resize((256, 256), Image.BICUBIC), size=64)
    assert notes == []
    a, b = _ink(sketch), _ink(portrait.line_art)
    assert (a & b).sum() / b.sum() > 0.7 and a.sum() < 2.5 * b.sum()


def test_big_canvas_shortcuts_give_the_full_computation():
    """The canvas path's block minimum and line width (cropped to the ink) equal the plain
    whole-array computations, ink touching the border included."""
    from scipy import ndimage

    from pipelines import sketch_data

    rng = np.random.default_rng(1)
    canvas = Image.new("L", (515, 515), 255)
    draw = ImageDraw.Draw(canvas)
    for _ in range(12):
        draw.line(tuple(rng.integers(0, 515, 4).tolist()), fill=int(rng.integers(0, 90)),
                  width=int(rng.integers(1, 7)))
    draw.line((0, 0, 0, 514), fill=0, width=3)  # along the left edge
    grey = np.asarray(canvas)
    r = 515 // (4 * 64)
    side = 515 // r * r
    expected = grey[:side, :side].reshape(side // r, r, side // r, r).min(axis=(1, 3)).astype(np.float32)
    levels = sketch_data._normalise_levels(expected)
    sketch, _ = to_sketch(canvas, size=64)
    ref = Image.fromarray(levels.round().astype(np.uint8), "L")
    width = sketch_data._line_width(levels < sketch_data.INK_LEVEL)
    ink = levels < sketch_data.INK_LEVEL
    assert width == max(1.0, 4 * float(ndimage.distance_transform_edt(ink)[ink].mean()) - 2)
    grow = int(round(ref.size[0] / 64 - width)) | 1
    if grow >= 3:
        ref = ref.filter(ImageFilter.MinFilter(min(grow, 9)))
    ref = np.asarray(ref.resize((64, 64), Image.BOX), dtype=np.float32)
    darkest = float(np.percentile(ref[ref < 250], 5))
    if darkest > 0:
        ref = np.clip(255.0 - (255.0 - ref) * min(4.0, 255.0 / max(255.0 - darkest, 1.0)), 0, 255)
    assert np.array_equal(np.asarray(sketch), ref.round().astype(np.uint8))
    # a lone line (its bounding box is all ink) and lines on the border, alone
    for box in ((100, 200, 300, 206), (0, 0, 514, 4), (510, 0, 514, 514)):
        mask = np.zeros((515, 515), bool)
        mask[box[1]:box[3], box[0]:box[2]] = True
        full = max(1.0, 4 * float(ndimage.distance_transform_edt(mask)[mask].mean()) - 2)
        assert sketch_data._line_width(mask) == full


def test_strokes_dataclass_roundtrip():
    st = Stroke(group="eyes", points=np.array([[0.2, 0.2], [0.8, 0.8]], np.float32), width=0.01, closed=False)
    out = augment_strokes([st], np.random.default_rng(0), extra_prob=0.0, drop_prob=0.0)
    assert out[0].group == "eyes" and out[0].points.dtype == np.float32 and not out[0].closed


def test_line_drawing_detection_on_world_renders():
    world = PortraitWorld(supersample=2)
    for seed in range(12):
        p = world.sample(seed, size=64)
        assert looks_like_line_drawing(p.line_art), seed
        assert looks_like_line_drawing(render_strokes(p.strokes, size=300)), seed
        assert not looks_like_line_drawing(p.image), seed  # coloured portraits are pictures, not drawings
