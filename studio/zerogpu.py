"""ZeroGPU: GPU handlers carry ``spaces.GPU`` when the ``spaces`` package is present.

On a ZeroGPU Space a GPU is attached only while a function decorated with ``spaces.GPU`` runs,
for at most its ``duration`` seconds; a shorter request is scheduled sooner. ``duration`` may be a
callable that receives the handler's own arguments, so the request grows with the work asked for
(steps, candidates, batch). Elsewhere (no ``spaces`` package: a desktop, CI, a CPU Space) the
handlers are returned unchanged.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["gpu_handler", "steps_duration", "work_duration", "MAX_DURATION"]

F = TypeVar("F", bound=Callable[..., Any])

MAX_DURATION = 300  # seconds: ZeroGPU's per-call ceiling for most accounts


def _number(value: Any, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def steps_duration(base: float, per_step: float, *step_args: int) -> Callable[..., int]:
    """A duration callable: ``base + per_step * (sum of the handler's arguments at positions
    step_args)``, capped at :data:`MAX_DURATION` (values that are not numbers count as 0)."""

    def duration(*args: Any, **_kwargs: Any) -> int:
        steps = sum(_number(args[i]) for i in step_args if i < len(args))
        return int(min(MAX_DURATION, base + per_step * max(steps, 0.0)))

    return duration


def work_duration(base: float, per_unit: float, *factor_args: int) -> Callable[..., int]:
    """A duration callable growing with a product, e.g. steps x batch: ``base + per_unit *
    (product of the handler's arguments at positions factor_args)``, capped at :data:`MAX_DURATION`
    (a missing or non-numeric argument makes the product 0)."""

    def duration(*args: Any, **_kwargs: Any) -> int:
        work = 1.0
        for i in factor_args:
            work *= _number(args[i]) if i < len(args) else 0.0
        return int(min(MAX_DURATION, base + per_unit * max(work, 0.0)))

    return duration


def gpu_handler(duration: int | Callable[..., int] = 60) -> Callable[[F], F]:
    """``spaces.GPU(duration=duration)`` where the ``spaces`` package is installed, else identity."""
    if importlib.util.find_spec("spaces") is None:
        return lambda fn: fn
    import spaces

    return spaces.GPU(duration=duration)
