import numpy as np
import pytest

from benchmarks.sketch import paired_gain
from pipelines.sketch_to_image import STRUCTURE_ATTRIBUTES as STRUCTURE


def _hits(rows):
    rows = np.asarray(rows, dtype=bool)
    return {a: rows[:, i] for i, a in enumerate(STRUCTURE)}


def test_paired_gain_is_the_match_difference_with_a_paired_standard_error():
    n = len(STRUCTURE)
    aligned = _hits([[1] * n, [1] * n, [0] * n, [1] + [0] * (n - 1)])
    base = _hits([[1] * n, [0] * n, [0] * n, [0] * n])
    gain, se = paired_gain(aligned, base)
    per_portrait = np.array([0.0, 1.0, 0.0, 1.0 / n])
    assert gain == pytest.approx(per_portrait.mean())
    assert se == pytest.approx(per_portrait.std(ddof=1) / 2)


def test_paired_gain_of_identical_students_is_zero_with_zero_error():
    hits = _hits(np.random.default_rng(0).integers(0, 2, size=(50, len(STRUCTURE))))
    assert paired_gain(hits, hits) == (0.0, 0.0)
