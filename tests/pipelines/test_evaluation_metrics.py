import numpy as np
import pytest

from pipelines.data.portrait_world import ATTRIBUTES
from pipelines.evaluation import (adherence_by_attribute, attribute_preservation, edit_accuracy,
                                  frechet_distance, prompt_adherence)


def _attrs(**over):
    base = {name: values[0] for name, values in ATTRIBUTES.items()}
    base.update(over)
    return base


def test_frechet_distance_zero_for_same_set_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    b = rng.normal(size=(500, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    near = frechet_distance(a, b)
    far = frechet_distance(a, b + 3.0)
    assert near < 0.5 and far == pytest.approx(near + 8 * 9.0, rel=0.1)


def test_frechet_distance_refuses_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_prompt_adherence_counts_requested_attributes_only():
    preds = [_attrs(hair_color="blue", glasses="yes"), _attrs(hair_color="red")]
    prompts = [{"hair_color": "blue", "glasses": "yes"}, {"hair_color": "pink"}]
    assert prompt_adherence(preds, prompts) == pytest.approx(2 / 3)


def test_prompt_adherence_parses_captions():
    preds = [_attrs(hair_color="blue", hair_style="long")]
    score = prompt_adherence(preds, ["an anime portrait of a character with long blue hair"])
    assert score == pytest.approx(1.0)


def test_adherence_by_attribute_splits_the_pooled_share():
    predicted = [_attrs(glasses="yes", eye_color="blue"), _attrs(glasses="no", eye_color="blue"),
                 _attrs(glasses="yes", eye_color="red")]
    asked = [{"glasses": "yes", "eye_color": "blue"}, {"glasses": "yes"}, {"eye_color": "green"}]
    shares = adherence_by_attribute(predicted, asked)
    assert shares == {"eye_color": 0.5, "glasses": 0.5}
    assert list(shares) == [n for n in ATTRIBUTES if n in shares]          # the evaluator's order
    # pooled over attributes, weighted by how often each is asked, it is prompt_adherence
    assert prompt_adherence(predicted, asked) == pytest.approx((0.5 * 2 + 0.5 * 2) / 4)
    with pytest.raises(ValueError, match="predictions"):
        adherence_by_attribute(predicted[:2], asked)


def test_edit_accuracy_and_preservation():
    before = [_attrs(), _attrs()]
    after = [_attrs(glasses="yes"), _attrs(glasses="no", hair_color="red")]
    targets = [{"glasses": "yes"}, {"glasses": "yes"}]
    assert edit_accuracy(after, targets) == 0.5
    kept = attribute_preservation(before, after, [["glasses"], ["glasses"]])
    n_other = len(ATTRIBUTES) - 1
    assert kept == pytest.approx((n_other + n_other - 1) / (2 * n_other))
