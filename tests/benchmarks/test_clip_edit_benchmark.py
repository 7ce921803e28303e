"""benchmarks.clip_edit's warning rates: every warning, and the warnings that an edit failed."""

from types import SimpleNamespace

import torch

from benchmarks.clip_edit import UNGROUNDED, warning_rates
from pipelines.clip_edit_session import SIDE_EFFECT_WARNING


class _Editor:
    """Warns that ungrounded texts failed; every grounded edit gets only a side-effect warning."""

    def start(self, session):
        return session

    def edit(self, session, *, text, **_):
        if text in UNGROUNDED:
            return SimpleNamespace(warnings=[f"low CLIP score for {text!r}",
                                             f"{SIDE_EFFECT_WARNING}: eye color"])
        return SimpleNamespace(warnings=[f"{SIDE_EFFECT_WARNING}: eye color"])


def test_side_effect_warnings_count_as_warnings_but_not_as_failures():
    rates = warning_rates(_Editor(), torch.zeros(2, 4, 8), "mapper", images=2, steps=1, alpha=1.0, beta=0.1,
                          strength=1.0)
    assert rates == {"warning_rate_grounded": 1.0, "failure_warning_rate_grounded": 0.0,
                     "warning_rate_ungrounded": 1.0, "failure_warning_rate_ungrounded": 1.0}
