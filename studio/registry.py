"""The model registry: every model the studio can serve, loaded lazily and once.

Entries come from four places: models embedded in ``assets/``, hub ids (loaded only when a network
or a local hub cache has them), local folders the user points at, and finished training runs.
The registry is shared, read-mostly state; loading happens under a lock so two requests that
want the same model at once load it once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.device import default_dtype, select_device

__all__ = ["ModelSpec", "ModelRegistry", "ASSETS_DIR", "GPU_QUEUE", "default_registry"]

# Heavy (model) events of every tab share this concurrency id, so one GPU (or the CPU) serves them
# one at a time instead of thrashing; light events (validation, UI updates) run beside them.
GPU_QUEUE = "gpu"

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

Loader = Callable[[str, torch.device, torch.dtype], Any]


@dataclass
class ModelSpec:
    """How to find and load one model."""
    name: str                 # shown in the UI's model choices
    kind: str                 # what it does: "evaluator", "text_to_image", "stylegan2", ...
    source: str               # "embedded" | "hub" | "local" | "run"
    location: str             # a folder, a file or a hub id
    loader: Loader = field(repr=False)
    description: str = ""


class ModelRegistry:
    """Known models by name; :meth:`get` loads a model on first use and keeps it."""

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self.device = select_device(device if not isinstance(device, torch.device) else str(device))
        self.dtype = dtype or default_dtype(self.device)
        self._specs: dict[str, ModelSpec] = {}
        self._loaded: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def register(self, spec: ModelSpec, *, replace: bool = False) -> None:
        with self._guard:
            if spec.name in self._specs and not replace:
                raise ValueError(f"a model named {spec.name!r} is already registered")
            self._specs[spec.name] = spec
            self._loaded.pop(spec.name, None)
            self._locks.setdefault(spec.name, threading.Lock())

    def names(self, kind: str | None = None) -> list[str]:
        return [n for n, s in self._specs.items() if kind is None or s.kind == kind]

    def spec(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; known: {sorted(self._specs)}") from None

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def get(self, name: str) -> Any:
        """The loaded model ``name``, loading it on first use (once, even under concurrency)."""
        spec = self.spec(name)
        if name in self._loaded:
            return self._loaded[name]
        with self._locks[name]:
            if name not in self._loaded:
                self._loaded[name] = spec.loader(spec.location, self.device, self.dtype)
            return self._loaded[name]

    def unload(self, name: str) -> None:
        self._loaded.pop(name, None)


def default_registry(device: str | torch.device | None = None) -> ModelRegistry:
    """A registry holding the embedded models that exist in ``assets/``."""
    registry = ModelRegistry(device)
    evaluator_dir = ASSETS_DIR / "evaluator"
    if (evaluator_dir / "model.safetensors").exists():
        def load_evaluator(location: str, device: torch.device, dtype: torch.dtype) -> Any:
            from pipelines.evaluation import Evaluator
            return Evaluator.from_pretrained(location, device=device)  # fp32: it is tiny
        registry.register(ModelSpec("Portrait-world evaluator (embedded)", "evaluator", "embedded",
                                    str(evaluator_dir), load_evaluator,
                                    "reads every attribute of a portrait"))
    return registry
