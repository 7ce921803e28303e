"""Eye regions of world renders: stroke boxes without rasterising, per bank image, as loss-weight maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.data.bank import ImageBank, bank_region_weights, region_weights, render_bank, stroke_boxes
from pipelines.data.portrait_world import PortraitWorld


def test_stroke_box_is_the_rendered_strokes_box_and_holds_the_iris():
    world = PortraitWorld()
    for seed in (3, 11, 40):
        portrait = world.sample(seed, size=128, with_line_art=False)
        points = np.concatenate([s.points for s in portrait.strokes if s.group == "eyes"])
        box = world.stroke_box(seed)
        np.testing.assert_allclose(box, (*points.min(0), *points.max(0)), rtol=0, atol=1e-6)
        # the pixels that change with the eye colour alone (same seed, same geometry) lie in the box
        other = "red" if portrait.attributes.eye_color != "red" else "blue"
        recoloured = world.render(portrait.attributes.replace(eye_color=other), seed=seed, size=128,
                                  with_line_art=False)
        diff = np.abs(np.asarray(portrait.image, dtype=int) - np.asarray(recoloured.image, dtype=int)).sum(-1)
        ys, xs = np.nonzero(diff > 30)
        assert len(xs) > 20
        assert xs.min() >= box[0] * 128 - 1 and xs.max() <= box[2] * 128 + 1
        assert ys.min() >= box[1] * 128 - 1 and ys.max() <= box[3] * 128 + 1
    with pytest.raises(ValueError, match="group must be one of"):
        world.stroke_box(3, group="nose")


def test_bank_boxes_follow_each_images_seed_and_are_cached(tmp_path):
    bank = render_bank(6, size=64, seed=5, split="train", workers=1)
    world = PortraitWorld()
    cache = tmp_path / "eyes.npz"
    boxes = stroke_boxes(bank, cache=cache)
    assert boxes.shape == (6, 4) and boxes.dtype == np.float32
    np.testing.assert_allclose(boxes[4], world.stroke_box(5 + 4), atol=1e-6)
    assert cache.exists()
    np.testing.assert_array_equal(stroke_boxes(bank, cache=cache), boxes)            # read back
    other = render_bank(6, size=64, seed=6, split="train", workers=1)
    assert not np.allclose(stroke_boxes(other, cache=cache), boxes)                  # another bank: recomputed
    outlier = ImageBank(bank.images, bank.labels, torch.tensor([True] + [False] * 5), bank.captions,
                        bank.seeds, bank.meta)
    assert np.isnan(stroke_boxes(outlier)[0]).all() and not np.isnan(stroke_boxes(outlier)[1:]).any()
    with pytest.raises(ValueError, match="how it was rendered"):
        stroke_boxes(ImageBank(bank.images, bank.labels, bank.is_outlier, bank.captions, bank.seeds, None))


def test_region_weights_cover_the_box_cells():
    boxes = np.array([[0.30, 0.45, 0.70, 0.60], [np.nan] * 4, [0.0, 0.0, 0.01, 0.01]])
    w = region_weights(boxes, 16, 4.0)
    assert w.shape == (3, 1, 16, 16)
    inside = w[0, 0] == 5.0
    rows, cols = np.nonzero(inside.numpy())
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (7, 9, 4, 11)     # floor(0.45*16)..ceil(0.6*16)-1
    assert torch.all(w[0, 0][~inside] == 1.0)
    assert torch.all(w[1] == 1.0)                                                 # outlier: uniform
    assert w[2, 0, 0, 0] == 5.0 and w[2].sum() == 256 + 4                         # a tiny box still gets a cell
    with pytest.raises(ValueError, match=">= 0"):
        region_weights(boxes, 16, -1.0)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        region_weights(np.zeros((2, 3)), 16, 1.0)


def test_bank_region_weights_cache_their_boxes_beside_the_bank(tmp_path):
    bank = render_bank(4, size=64, seed=2, split="train", workers=1)
    w = bank_region_weights(bank, 16, 3.0, cache_dir=tmp_path)
    assert w.shape == (4, 1, 16, 16) and set(w.unique().tolist()) == {1.0, 4.0}
    torch.testing.assert_close(w, region_weights(stroke_boxes(bank), 16, 3.0))
    assert [f.name for f in tmp_path.glob("eyes_*.npz")] == ["eyes_n4_s64_seed2_train.npz"]
    torch.testing.assert_close(bank_region_weights(bank, 16, 3.0), w)               # no cache folder
