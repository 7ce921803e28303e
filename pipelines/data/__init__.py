"""Embedded data: the procedural portrait world, outlier images, and torch datasets over them.

Names are re-exported lazily, so ``python -m pipelines.data.outliers`` and numpy-only users of the
world do not import the other modules (torch in particular).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    **{name: "pipelines.data.portrait_world" for name in (
        "ATTRIBUTES", "HELD_OUT_COMBINATIONS", "STROKE_GROUPS", "Portrait", "PortraitAttributes", "PortraitWorld",
        "Stroke", "caption_attributes", "is_held_out", "measure_render_rate")},
    **{name: "pipelines.data.outliers" for name in ("OutlierImages", "fetch_outliers", "outlier_dir")},
    "PortraitDataset": "pipelines.data.datasets",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
