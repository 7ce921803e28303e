"""Helpers the training scripts share: field-kind checks and the running means between log rows."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pipelines.training.runs import RunningMeans, check_fields


@dataclass
class _Cfg:
    steps: int = 10
    keep: int = 0
    lr: float = 1e-3
    weight: float = 0.0


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": True}, "steps must be a positive integer"),
    ({"keep": -1}, "keep must be an integer >= 0"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"lr": 0}, "lr must be a positive number"),
    ({"weight": -0.5}, "weight must be a finite number >= 0"),
])
def test_check_fields_names_the_bad_field(overrides, message):
    kinds = dict(positive_ints=("steps",), nonneg_ints=("keep",), positive=("lr",), nonneg=("weight",))
    check_fields(_Cfg(), **kinds)                                            # the defaults pass
    with pytest.raises(ValueError, match=message):
        check_fields(_Cfg(**overrides), **kinds)


def test_running_means_average_each_key_over_its_own_count_and_reset_on_pop():
    meter = RunningMeans()
    meter.add(loss=torch.tensor(1.0), gan=torch.tensor(4.0))
    meter.add(loss=torch.tensor(3.0, requires_grad=True))
    means = meter.pop()
    assert list(means) == ["gan", "loss"]                                    # sorted: same order on every process
    assert float(means["loss"]) == 2.0 and float(means["gan"]) == 4.0 and not means["loss"].requires_grad
    assert meter.pop() == {}
