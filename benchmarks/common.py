"""Helpers shared by the benchmark scripts: JSON output with the machine it ran on."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, help="write the figures here as JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--card", action="store_true",
                   help="also merge the figures (as benchmark_*) into the card of the model measured")
    return p


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "machine": platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def command_line(name: str) -> str:
    """How this benchmark was run: ``python -m <name>`` and the arguments it was given."""
    return "python -m " + name + " " + " ".join(sys.argv[1:])


def write(figures: dict[str, Any], path: Path | None, name: str, card: Path | None = None) -> None:
    """Print the figures as JSON, write them to ``path`` and, with ``card``, into that model card."""
    command = command_line(name)
    out = {"benchmark": name, "command": command,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "figures": figures}
    text = json.dumps(out, indent=1, default=float)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    if card is not None:
        from pipelines.cards import add_figures

        add_figures(card, figures, command=command)
