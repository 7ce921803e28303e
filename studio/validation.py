"""Parsing of user input shared by the tabs: every failure is a ValueError a person can act on."""

from __future__ import annotations

MAX_SEED = 2**32 - 1

__all__ = ["parse_seed", "MAX_SEED"]


def parse_seed(text: str | int | float | None) -> int:
    """A seed typed in the UI: an integer in [0, 2**32 - 1]."""
    if isinstance(text, bool):
        raise ValueError("the seed must be a whole number")
    if isinstance(text, (int, float)):
        value = text
    else:
        s = (text or "").strip()
        if not s:
            raise ValueError(f"enter a seed: a whole number from 0 to {MAX_SEED}")
        try:
            value = int(s)
        except ValueError:
            raise ValueError(f"the seed must be a whole number from 0 to {MAX_SEED}, not {s[:40]!r}") from None
    if value != int(value):
        raise ValueError(f"the seed must be a whole number, not {value}")
    value = int(value)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"the seed must be between 0 and {MAX_SEED}, got {value}")
    return value
