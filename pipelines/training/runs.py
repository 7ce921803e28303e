"""Run folders shared by every training and distillation script.

A run lives in one folder::

    runs/<name>/
        config.json          the dataclass config the run was started with
        metrics.jsonl        one JSON object per logged step
        status.json          {"state": "running"|"finished"|"failed", "step", "total", ...}
        samples/step_000100.png
        checkpoints/step_000100.pt   plain dict of state dicts + config + RNG state
        log.txt              what the script printed (written by the run manager)

Checkpoints are written to a temporary file and renamed, so a run killed mid-write still has its
previous checkpoint, and :func:`RunFolder.latest_checkpoint` never returns a half-written file.

A process that creates a run folder holds an advisory lock on its ``.lock`` file until the run
ends (status finished, failed or stopped) or the process exits, so a second live process that
tries to write the same folder is refused with the first one's pid. The operating system drops the
lock of a killed process, so a killed run never leaves a stale lock (POSIX only; elsewhere no lock).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import threading
import time
import typing
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

ConfigT = TypeVar("ConfigT")

__all__ = [
    "RunFolder",
    "StopFlag",
    "parse_config",
    "config_to_dict",
    "capture_rng_state",
    "restore_rng_state",
    "resume_from_checkpoint",
    "seed_everything",
]


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-serialisable dict."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _field_parser(tp: Any):
    """argparse ``type=`` for a dataclass field annotation (str, int, float, bool, Optional[...])."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _field_parser(args[0])
        return lambda s: None if s.lower() in ("none", "null", "") else inner(s)
    if tp is bool:
        def to_bool(s: str) -> bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
        return to_bool
    if tp in (int, float, str):
        return tp
    if origin in (tuple, list):
        (elem,) = set(typing.get_args(tp)) - {Ellipsis} or {str}
        conv = _field_parser(elem)
        return lambda s: origin(conv(x) for x in s.split(",") if x)
    return str


def parse_config(cls: type[ConfigT], argv: list[str] | None = None, description: str = "") -> ConfigT:
    """Build a dataclass config from ``--field value`` command-line overrides.

    Every field of ``cls`` becomes an option (``--lr 1e-4``, ``--out_dir runs/x``); fields keep
    their defaults otherwise. Unknown options are an error, as argparse makes them.
    """
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        parser.add_argument(
            f"--{field.name}", type=_field_parser(hints[field.name]), default=default,
            help=f"(default: {default})",
        )
    args = parser.parse_args(argv)
    return cls(**vars(args))


def check_fields(config: Any, *, positive_ints: typing.Iterable[str] = (), nonneg_ints: typing.Iterable[str] = (),
                 positive: typing.Iterable[str] = (), nonneg: typing.Iterable[str] = ()) -> None:
    """Refuse config fields of the wrong kind with ``ValueError`` naming the field: integers > 0,
    integers >= 0, finite numbers > 0, finite numbers >= 0 (booleans are not numbers here)."""
    import math

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for names, ok, what in ((positive_ints, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                             "a positive integer"),
                            (nonneg_ints, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                             "an integer >= 0"),
                            (positive, lambda v: number(v) and v > 0, "a positive number"),
                            (nonneg, lambda v: number(v) and v >= 0, "a finite number >= 0")):
        for name in names:
            value = getattr(config, name)
            if not ok(value):
                raise ValueError(f"{name} must be {what}, got {value!r}")


class RunningMeans:
    """Means of a training loop's logged values between two log rows, summed on the device so that
    the loop never waits for the GPU; ``add`` each step, ``pop`` at a log row."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
            self._counts[key] = self._counts.get(key, 0) + 1

    def pop(self) -> dict[str, torch.Tensor]:
        """The means (tensors, keys sorted: the same order on every process), then start afresh."""
        means = {k: self._sums[k] / self._counts[k] for k in sorted(self._sums)}
        self._sums, self._counts = {}, {}
        return means


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, as a checkpoint stores them."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_python_state(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _numpy_state() -> tuple:
    # as plain Python / torch types, so torch.load(weights_only=True) reads it back
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))


def _as_python_state(s: Any) -> tuple:
    # torch.load(weights_only=True) returns lists where random.getstate() had tuples.
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


_HELD_LOCKS: dict[str, Any] = {}        # resolved run folder -> its open lock file, in this process

_END_STATES = ("finished", "failed", "stopped")


class RunFolder:
    """One training run's folder: config, metrics, samples, checkpoints, status."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # -- creation / discovery -------------------------------------------------------------
    def create(self, config: Any, *, resume: bool) -> bool:
        """Prepare the folder for ``config``; returns True when an earlier run is resumed.

        A folder that already holds a different config is refused unless ``resume`` is set and
        the configs agree on everything but the step budget, so two different runs never share a
        folder by accident.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        acquired = self._lock()
        try:
            self._prepare(config, resume=resume)
        except BaseException:
            if acquired:                          # a refused config leaves the folder free for the next try
                self._unlock()
            raise
        return resume and self.latest_checkpoint() is not None

    def _prepare(self, config: Any, *, resume: bool) -> None:
        (self.path / "checkpoints").mkdir(exist_ok=True)
        (self.path / "samples").mkdir(exist_ok=True)
        new = config_to_dict(config)
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            if not resume and self.latest_checkpoint() is not None:
                raise FileExistsError(
                    f"{self.path} already holds a run with checkpoints; pass --resume true to "
                    "continue it or choose another --out_dir"
                )
            # fields that only say how long, where to or how often: a resumed run may change them
            ignore = {"total_steps", "steps", "total_kimg", "resume", "out_dir", "export_to", "export_dir",
                      "examples_grid", "device", "workers", "max_train_minutes", "max_minutes", "log_every",
                      "sample_every", "checkpoint_every"}
            diff = {k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k)}
            if resume and diff:
                raise ValueError(
                    f"cannot resume {self.path}: its config differs in {sorted(diff)}; "
                    "start a new run folder instead"
                )
        self._write_json(cfg_file, new)

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    # -- metrics and status ---------------------------------------------------------------
    def log_metrics(self, step: int, **values: float) -> None:
        row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in values.items()}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # what the run manager's estimate reads
            row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict[str, float]]:
        file = self.path / "metrics.jsonl"
        if not file.exists():
            return []
        rows = []
        for line in file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows past ``after_step`` (those of steps a resumed run will redo)."""
        rows = [r for r in self.metrics() if r["step"] <= after_step]
        tmp = self.path / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path / "metrics.jsonl")

    def set_status(self, state: str, **extra: Any) -> None:
        self._write_json(self.path / "status.json", {"state": state, "time": time.time(), **extra})
        if state in _END_STATES:
            self._unlock()

    # -- one writer at a time -------------------------------------------------------------
    def _lock(self) -> bool:
        """Hold ``.lock`` for this process; refuse a folder another live process holds. True when this
        call took the lock (False: this process held it already, or the platform has no flock)."""
        try:
            import fcntl
        except ImportError:                      # Windows: no advisory locks here
            return False
        key = str(self.path.resolve())
        if key in _HELD_LOCKS:
            return False
        file = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip()
            file.close()
            raise RuntimeError(
                f"{self.path} is being written by another live process"
                + (f" (pid {holder})" if holder else "")
                + "; wait for it to finish, stop it, or choose another --out_dir") from None
        file.truncate(0)
        file.write(str(os.getpid()))
        file.flush()
        _HELD_LOCKS[key] = file
        return True

    def _unlock(self) -> None:
        file = _HELD_LOCKS.pop(str(self.path.resolve()), None)
        if file is not None:
            file.close()                         # closing the file drops the lock

    def status(self) -> dict[str, Any]:
        file = self.path / "status.json"
        if not file.exists():
            return {"state": "new"}
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError:
            return {"state": "unknown"}

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
        """Write ``state`` atomically as ``checkpoints/step_XXXXXXX.pt``; keep the newest ``keep``."""
        final = self.path / "checkpoints" / f"step_{step:07d}.pt"
        tmp = final.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, final)
        for old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return final

    def checkpoints(self) -> list[Path]:
        return sorted((self.path / "checkpoints").glob("step_*.pt"))

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def load_checkpoint(self, path: Path | None = None) -> dict[str, Any]:
        path = path or self.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {self.path / 'checkpoints'}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or corrupted file
            raise ValueError(f"checkpoint {path} is truncated or corrupted ({exc}); delete it to "
                             "resume from the one before") from exc

    # -- samples --------------------------------------------------------------------------
    def sample_path(self, step: int) -> Path:
        return self.path / "samples" / f"step_{step:07d}.png"

    def latest_sample(self) -> Path | None:
        samples = sorted((self.path / "samples").glob("step_*.png"))
        return samples[-1] if samples else None

    @staticmethod
    def _write_json(path: Path, obj: Any) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1, default=str))
        os.replace(tmp, path)


def resume_from_checkpoint(run: RunFolder, **objects: Any) -> tuple[int, dict[str, Any]]:
    """Continue ``run`` from its latest checkpoint: each of ``objects`` (a module or optimiser, named by
    its checkpoint key) loads its state, the RNGs are restored and metrics after the step dropped.
    Returns ``(step, checkpoint)``."""
    ckpt = run.load_checkpoint()
    for key, obj in objects.items():
        obj.load_state_dict(ckpt[key])
    step = int(ckpt["step"])
    restore_rng_state(ckpt["rng"])
    run.truncate_metrics(step)
    print(f"resumed {run.path} at step {step}", flush=True)
    return step, ckpt


class StopFlag:
    """Set by SIGTERM (``install`` in the main thread): the training loop writes a checkpoint and returns."""

    def __init__(self) -> None:
        self.stop = False
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        print("SIGTERM: writing a checkpoint, then stopping", flush=True)
        self.stop = True
