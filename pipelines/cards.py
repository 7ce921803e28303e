"""Model cards: a small README.md + card.json beside every model folder the studio writes.

A card says what the model is for, its architecture, where it came from (the command and config of
the run that made it, or a hub id / file) and the figures measured on it.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_card", "read_card", "add_figures"]


def write_card(folder: str | Path, *, title: str, task: str, architecture: str,
               source: str, command: str | None = None, config: Mapping[str, Any] | None = None,
               figures: Mapping[str, Any] | None = None, notes: str = "") -> Path:
    """Write ``card.json`` and a human-readable ``README.md`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card = {
        "title": title, "task": task, "architecture": architecture, "source": source,
        "command": command, "config": dict(config or {}), "figures": dict(figures or {}),
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "trained_on": _hardware(), "notes": notes,
    }
    _write(folder, card)
    return folder


def _write(folder: Path, card: Mapping[str, Any]) -> None:
    (folder / "card.json").write_text(json.dumps(card, indent=1, default=str))
    lines = [f"# {card['title']}", "", f"- **Task**: {card['task']}", f"- **Architecture**: {card['architecture']}",
             f"- **Source**: {card['source']}", f"- **Hardware**: {card['trained_on']}"]
    if card.get("command"):
        lines += ["", "## How it was made", "", "```bash", card["command"], "```"]
    if card.get("figures"):
        lines += ["", "## Measured figures", "", "| figure | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in card["figures"].items()]
    if card.get("config"):
        lines += ["", "## Config", "", "```json", json.dumps(dict(card["config"]), indent=1, default=str), "```"]
    if card.get("notes"):
        lines += ["", card["notes"]]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def add_figures(folder: str | Path, figures: Mapping[str, Any], *, prefix: str = "benchmark_",
                command: str | None = None) -> Path:
    """Merge ``figures`` (as ``<prefix><name>``, numbers only) into an existing card, e.g. a
    benchmark's figures into the card of the model it measured; ``command`` is recorded in the notes."""
    folder = Path(folder)
    card = read_card(folder)
    if not card:
        raise FileNotFoundError(f"{folder} has no card.json to add figures to")
    card["figures"] = {k: v for k, v in card.get("figures", {}).items() if not k.startswith(prefix)}
    card["figures"].update({prefix + k: v for k, v in figures.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if command:
        line = f"Figures `{prefix}*` from `{command}`."
        notes = [n for n in card.get("notes", "").split("\n\n") if n and not n.startswith(f"Figures `{prefix}*`")]
        card["notes"] = "\n\n".join([*notes, line])
    _write(folder, card)
    return folder


def read_card(folder: str | Path) -> dict[str, Any]:
    file = Path(folder) / "card.json"
    return json.loads(file.read_text()) if file.exists() else {}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"
