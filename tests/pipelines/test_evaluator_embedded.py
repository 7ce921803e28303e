"""The embedded evaluator and the renderer agree: what is drawn is what is read."""

import numpy as np
import pytest
import torch

from pipelines.data.portrait_world import ATTRIBUTES, PortraitWorld
from pipelines.evaluation import EMBEDDED_EVALUATOR, Evaluator

pytestmark = pytest.mark.weights


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator.from_pretrained(EMBEDDED_EVALUATOR)


def test_embedded_evaluator_reads_held_out_renders(evaluator):
    world = PortraitWorld()
    rng = np.random.default_rng(123)
    portraits = [world.render(world.sample_attributes(rng, split="heldout"), seed=900_000 + i, size=64,
                              with_line_art=False) for i in range(120)]
    preds = evaluator.predict_attributes([p.image for p in portraits])
    for name in ATTRIBUTES:
        acc = np.mean([pred[name] == getattr(p.attributes, name) for pred, p in zip(preds, portraits)])
        assert acc >= 0.8, f"{name}: {acc:.2f}"
    overall = np.mean([pred[n] == getattr(p.attributes, n) for pred, p in zip(preds, portraits) for n in ATTRIBUTES])
    assert overall >= 0.95


def test_changing_one_attribute_changes_that_reading(evaluator):
    world = PortraitWorld()
    base = world.sample_attributes(np.random.default_rng(5), split="train").replace(glasses="no", hair_color="brown")
    images = [world.render(base.replace(**change), seed=42, size=128).image
              for change in ({}, {"glasses": "yes"}, {"hair_color": "pink"})]
    a, b, c = evaluator.predict_attributes(images)
    assert a["glasses"] == "no" and b["glasses"] == "yes"
    assert a["hair_color"] == "brown" and c["hair_color"] == "pink"


def test_outliers_score_higher_than_portraits(evaluator):
    from pipelines.data.outliers import OutlierImages

    outliers = OutlierImages()
    world = PortraitWorld()
    emoji = [outliers.get(k, size=64, seed=k) for k in range(0, 300, 10)]
    portraits = [world.sample(s, size=64, with_line_art=False).image for s in range(30)]
    scores = evaluator.run(emoji + portraits)["outlier_score"]
    assert scores[:30].min() > scores[30:].max()


def test_fd_world_small_between_two_real_sets_large_against_outliers(evaluator):
    from pipelines.data.outliers import OutlierImages

    world = PortraitWorld()
    a = [world.sample(s, size=64, with_line_art=False).image for s in range(0, 150)]
    b = [world.sample(s, size=64, with_line_art=False).image for s in range(1000, 1150)]
    outliers = OutlierImages()
    c = [outliers.get(k, size=64, seed=k) for k in range(1, 1500, 10)]
    assert evaluator.fd_world(a, b) * 5 < evaluator.fd_world(a, c)
