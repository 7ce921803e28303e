"""The model registry: every model the studio can serve, loaded lazily and once.

Entries come from four places: models embedded in ``assets/``, hub ids (loaded only when a network
or a local hub cache has them), local folders the user points at, and finished training runs.
The registry is shared, read-mostly state; loading happens under a lock so two requests that
want the same model at once load it once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.device import default_dtype, select_device

__all__ = ["ModelSpec", "ModelRegistry", "ASSETS_DIR", "GPU_QUEUE", "LOADERS", "default_registry", "detect_kind",
           "add_local", "add_hub", "add_finished_runs"]

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


# -- loaders, one per kind (imported lazily: the app starts without loading any model) -------
def _load_evaluator(location: str, device: torch.device, dtype: torch.dtype) -> Any:
    from pipelines.evaluation import Evaluator
    return Evaluator.from_pretrained(location, device=device)  # fp32: it is tiny and it measures


def _load_stylegan2(location: str, device: torch.device, dtype: torch.dtype) -> Any:
    from pipelines.stylegan_io import load_generator
    return load_generator(location, device=device, dtype=torch.float32 if device.type == "cpu" else dtype)


def _load_text_to_image(location: str, device: torch.device, dtype: torch.dtype) -> Any:
    from pipelines.hub_models import load_text_to_image
    return load_text_to_image(location, device=device, dtype=dtype)


def _load_clip(location: str, device: torch.device, dtype: torch.dtype) -> Any:
    from pipelines.clip_models import load_clip
    return load_clip(location, device=device, precision="fp32" if device.type == "cpu" else "auto")


LOADERS: dict[str, Loader] = {
    "evaluator": _load_evaluator,
    "stylegan2": _load_stylegan2,
    "text_to_image": _load_text_to_image,
    "clip": _load_clip,
}


def detect_kind(path: str | Path) -> str:
    """What a local model folder (or file) holds, from the files the studio's savers write.

    Raises ``ValueError`` naming what a model folder must contain when it is none of them.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".pkl":
            return "stylegan2"  # read by the restricted unpickler, never executed
        path = path.parent
    if (path / "model_index.json").exists():
        return "text_to_image"
    from pipelines.hub_models import is_lora_folder
    if is_lora_folder(path):
        return "text_to_image"   # a DMD2 LoRA run: its card's teacher with these weights
    if (path / "open_clip_config.json").exists():
        return "clip"
    config = path / "config.json"
    if config.exists():
        try:
            arch = json.loads(config.read_text()).get("architecture")
        except (json.JSONDecodeError, AttributeError):
            arch = None
        kinds = {"portrait-world-evaluator": "evaluator", "stylegan2-ada": "stylegan2"}
        if arch in kinds:
            return kinds[arch]
    raise ValueError(
        f"{path} is not a model folder the studio knows: expected a diffusers folder "
        "(model_index.json), a studio LoRA run (pytorch_lora_weights.safetensors + card.json), an open_clip "
        "folder (open_clip_config.json), a StyleGAN2 generator "
        "(config.json + model.safetensors, or an official .pkl) or an evaluator folder")


def add_local(registry: ModelRegistry, path: str | Path, *, name: str | None = None,
              source: str = "local") -> ModelSpec:
    """Register a local model folder (or .pkl) under ``name`` (default: its folder name)."""
    path = Path(path).resolve()
    kind = detect_kind(path)
    spec = ModelSpec(name or f"{path.name} ({source})", kind, source, str(path), LOADERS[kind])
    registry.register(spec, replace=True)
    return spec


def add_hub(registry: ModelRegistry, repo_id: str, *, kind: str = "text_to_image") -> ModelSpec:
    """Register a hub id; nothing is fetched until the model is first used (offline, that use
    fails at once with a message saying the model is not in the local cache)."""
    if kind not in LOADERS:
        raise ValueError(f"unknown kind {kind!r}; known: {sorted(LOADERS)}")
    spec = ModelSpec(f"{repo_id} (hub)", kind, "hub", repo_id, LOADERS[kind])
    registry.register(spec, replace=True)
    return spec


def add_finished_runs(registry: ModelRegistry, runs_dir: str | Path = "runs") -> list[ModelSpec]:
    """Register the exported models of every finished run in ``runs_dir`` (each run folder holds
    ``status.json``; its exported models are its sub-folders the studio can load)."""
    added = []
    for status_file in sorted(Path(runs_dir).glob("*/status.json")):
        try:
            state = json.loads(status_file.read_text()).get("state")
        except json.JSONDecodeError:
            continue
        if state != "finished":
            continue
        run = status_file.parent
        for sub in sorted(p for p in run.iterdir() if p.is_dir()):
            try:
                added.append(add_local(registry, sub, name=f"{run.name}/{sub.name} (run)", source="run"))
            except ValueError:
                continue  # checkpoints/, samples/, caches: not models
    return added


# (folder in assets/, name in the UI, what it is)
EMBEDDED: tuple[tuple[str, str, str], ...] = (
    ("evaluator", "Portrait-world evaluator (embedded)", "reads every attribute of a portrait"),
    ("stylegan2_portraits64", "Portrait StyleGAN2-ADA 64 px (embedded)",
     "the studio's own StyleGAN2-ADA, trained on the portrait world after self-filtering"),
    ("clip", "PortraitCLIP (embedded)", "a small open_clip model trained contrastively on portrait-world captions"),
    ("portrait_student", "Portrait one-step student (DMD2, embedded)",
     "the studio's latent diffusion teacher distilled with DMD2 to one step"),
    ("portrait_teacher", "Portrait teacher (latent diffusion, embedded)",
     "the studio's own latent diffusion model of the portrait world, MiniLM text encoder"),
)


def default_registry(device: str | torch.device | None = None, *, runs_dir: str | Path | None = None) -> ModelRegistry:
    """A registry holding the embedded models in ``assets/`` and, if given, finished runs."""
    registry = ModelRegistry(device)
    for folder, name, description in EMBEDDED:
        folder = ASSETS_DIR / folder
        if folder.exists():
            spec = add_local(registry, folder, name=name, source="embedded")
            spec.description = description
    if runs_dir is not None and Path(runs_dir).exists():
        add_finished_runs(registry, runs_dir)
    return registry
