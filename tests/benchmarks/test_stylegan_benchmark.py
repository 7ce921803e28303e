"""The StyleGAN benchmark's mode counts and edit figures, on hand-made readings and a tiny generator."""

import torch

from benchmarks.stylegan import coverage, edit_figures, kept_share, pair_coverage
from tests._tiny import tiny_generator, tiny_world_evaluator


def test_mode_counts():
    a = {"hair": "blue", "glasses": "yes"}
    b = {"hair": "blue", "glasses": "no"}
    c = {"hair": "pink", "glasses": "no"}
    readings = [a] * 6 + [b] * 3 + [c]
    assert coverage(readings, 0.1) == 4                       # blue, pink, yes, no
    assert pair_coverage(readings, 0.1) == 3                  # (blue, yes), (blue, no), (pink, no)
    assert pair_coverage(readings, 0.2) == 2                  # (pink, no) is 10 %
    reference = [a] * 5 + [c] * 5                             # pink: 50 %; yes: 50 %
    # in `readings` pink has 10 % (< half of 50 %), blue 90 %, yes 60 %, no 40 %
    assert kept_share(readings, reference, 0.1) == 3


def test_edit_figures_count_success_only_where_the_value_was_absent():
    G, ev = tiny_generator(), tiny_world_evaluator()
    w = G.mapping(torch.randn(12, 16, generator=torch.Generator().manual_seed(0)), None)
    unchanged = edit_figures(G, ev, lambda w_plus, key: w_plus, w, ["glasses=yes", "glasses=no"])
    assert unchanged["edit_success"] == 0.0 and unchanged["edit_preservation"] == 1.0
    assert unchanged["edits"] == 12  # each latent lacks exactly one of the two values
    assert set(unchanged["edit_per_target"]) <= {"glasses=yes", "glasses=no"}
