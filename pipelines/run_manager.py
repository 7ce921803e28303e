"""The run manager: launches training scripts as their own processes and keeps track of them.

No gradio here. Each run is a folder under ``runs_dir`` that the training script writes
(``config.json``, ``metrics.jsonl``, ``status.json``, ``samples/``, ``checkpoints/``) plus what the
manager adds: ``launch.json`` (the method, the arguments, the process id) and ``log.txt``. All
state lives in those files, so a manager started later (after the app was restarted or killed)
finds every run again; a run whose process died without finishing shows as ``interrupted`` and
resumes from its last checkpoint (the scripts keep optimiser and RNG state there).

Processes run niced (the studio stays usable), in their own session (a cancel reaches the
whole process group), one per device slot; launches beyond the free slots wait in a queue that
:meth:`RunManager.poll` drains. With more than one CUDA device a script runs under
``accelerate launch``.

Before a launch, :meth:`RunManager.estimate` runs the same script for a few steps in a scratch
folder and extrapolates: start-up, seconds per step, the finishing work (evaluation, export), the
peak host memory of its process tree and, on CUDA, the peak allocated GPU memory.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "MethodSpec", "RunInfo", "RunManager", "RunError", "Estimate", "build_config"]

ROOT = Path(__file__).resolve().parent.parent   # the scripts' working directory
MEMORY_HEADROOM = 0.9   # a run may use at most this share of the memory free before it starts
PROMPTS = ROOT / "pipelines" / "training" / "prompts" / "general.txt"   # hub teachers' default prompts
STATES = ("queued", "running", "finished", "failed", "cancelled", "interrupted")


class RunError(ValueError):
    """A launch, resume or cancel that cannot be done; the message says why."""


@dataclass(frozen=True)
class MethodSpec:
    """A training script the manager can launch."""

    key: str
    label: str
    module: str                      # python -m <module>
    config: str                      # "<module>:<dataclass name>"
    produces: str                    # registry kind of the exported model
    export: str                      # sub-folder of the run folder holding the exported model
    steps_field: str                 # the config field holding the step budget
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    base_field: str | None = None    # the config field naming the teacher / base model (a path)
    base_may_be_hub_id: bool = False  # the base may be a hub id (the script resolves it from the cache)
    attaches_to: str | None = None   # a part of the base generator (its sub-folder): the studio serves
                                     # a copy of the base with the trained part in place


METHODS: dict[str, MethodSpec] = {m.key: m for m in (
    MethodSpec(
        key="dmd2", label="DMD2 one-step distillation (text to image)", module="pipelines.training.distill_dmd2",
        config="pipelines.training.distill_dmd2:DMD2Config", produces="text_to_image", export="pipeline",
        steps_field="steps", base_field="teacher",
        presets={
            # quick demo: a short run learns faster at 2e-4 with 3 fake-score updates per generator
            # update (TTUR) than at the script's 3e-5 with 5; docs/TRAINING.md has the trials.
            "quick demo": dict(steps=170, batch=8, lr_generator=2e-4, lr_fake=2e-4, fake_updates=3,
                               real_images=1500, captions_per_image=1, log_every=10, sample_every=85,
                               checkpoint_every=85, num_samples=4),
            "standard": dict(steps=4000, batch=64, real_images=20000, checkpoint_every=500),
        }),
    MethodSpec(
        key="dmd2_hub", label="DMD2 LoRA for a Stable Diffusion 1.5 / SDXL teacher (GPU)",
        module="pipelines.training.distill_dmd2_hub", config="pipelines.training.distill_dmd2_hub:HubDMD2Config",
        produces="text_to_image", export="lora", steps_field="steps", base_field="teacher", base_may_be_hub_id=True,
        presets={
            # distribution matching alone (a GAN needs a folder of real photos: add "real_images" and
            # "gan_weight"); prompts: a shipped list of general subjects, or your own "prompts_file"
            "quick demo": dict(steps=300, batch=2, prompts_file=str(PROMPTS), real_images="", gan_weight=0.0,
                               lora_rank=16, fake_lora_rank=16, log_every=10, checkpoint_every=100, num_samples=4),
            "standard": dict(steps=2000, batch=4, prompts_file=str(PROMPTS), real_images="", gan_weight=0.0,
                             checkpoint_every=250),
        }),
    MethodSpec(
        key="lcm", label="Latent consistency distillation (LCM, text to image)", module="pipelines.training.distill_lcm",
        config="pipelines.training.distill_lcm:LCMConfig", produces="text_to_image", export="pipeline",
        steps_field="steps", base_field="teacher",
        presets={
            "quick demo": dict(steps=200, batch=8, real_images=2000, captions_per_image=2, log_every=10,
                               sample_every=100, checkpoint_every=100, num_samples=4),
            "standard": dict(steps=4000, batch=64, real_images=20000, checkpoint_every=500),
        }),
    MethodSpec(
        key="compress", label="Compress a one-step student (BK-SDM knowledge distillation, text to image)",
        module="pipelines.training.compress_student",
        config="pipelines.training.compress_student:CompressConfig", produces="text_to_image", export="pipeline",
        steps_field="total_steps", base_field="source",
        presets={
            # the source: a DMD2 run's pipeline/ (the shipped student is already compressed)
            "quick demo": dict(total_steps=120, batch=16, lr=3e-4, real_images=1500, captions_per_image=1,
                               log_every=10, sample_every=60, checkpoint_every=60, num_samples=4),
            "standard": dict(total_steps=1000, batch=32, lr=3e-4, real_images=4000, captions_per_image=2,
                             first_step_share=0.6, checkpoint_every=100),
        }),
    MethodSpec(
        key="tiny_vae", label="Tiny autoencoder (a fast TAESD-style decoder, text to image)",
        module="pipelines.training.distill_tiny_vae", config="pipelines.training.distill_tiny_vae:TinyVAEConfig",
        produces="text_to_image", export="tiny_vae", steps_field="total_steps", base_field="source",
        attaches_to="vae",
        presets={
            "quick demo": dict(total_steps=400, num_images=4000, batch_size=32, log_every=25, sample_every=200,
                               checkpoint_every=100),
            "standard": dict(total_steps=6000, num_images=10000, batch_size=32, eye_weight=5.0,
                             checkpoint_every=500),
        }),
    MethodSpec(
        key="stylegan2", label="StyleGAN2-ADA generator", module="pipelines.training.train_stylegan2",
        config="pipelines.training.train_stylegan2:StyleGAN2TrainConfig", produces="stylegan2",
        export="generator", steps_field="total_steps",
        presets={
            "quick demo": dict(resolution=32, bank_size=2000, batch=16, total_steps=200, channel_base=1024,
                               channel_max=64, z_dim=64, w_dim=64, sample_every=50, checkpoint_every=50,
                               log_every=10),
            "standard": dict(resolution=64, bank_size=20000, batch=32, total_steps=20000, channel_base=2048,
                             channel_max=64, z_dim=128, w_dim=128, sample_every=500, checkpoint_every=250),
        }),
    MethodSpec(
        key="stylegan_encoder", label="Inversion encoder (e4e)", module="pipelines.training.train_stylegan_encoder",
        config="pipelines.training.train_stylegan_encoder:EncoderTrainConfig", produces="stylegan_encoder",
        export="encoder", steps_field="steps", base_field="generator", attaches_to="encoder",
        presets={
            "quick demo": dict(steps=100, batch=8, pool_size=256, channel_base=1024, channel_max=64,
                               image_loss_every=4, log_every=10, sample_every=50, checkpoint_every=50,
                               eval_images=16, w_avg_samples=2000),
            "standard": dict(steps=5000, batch=16, pool_size=4000, real_images=4000, channel_base=2048,
                             channel_max=128, image_loss_every=4, checkpoint_every=500),
        }),
    MethodSpec(
        key="sketch_encoder", label="Sketch encoder (AniFaceDrawing)", module="pipelines.training.train_sketch_encoder",
        config="pipelines.training.train_sketch_encoder:SketchEncoderTrainConfig", produces="sketch_encoder",
        export="sketch_encoder", steps_field="steps", base_field="generator", attaches_to="sketch_encoder",
        presets={
            "quick demo": dict(steps=100, batch=8, pool_size=256, channel_base=1024, channel_max=64, log_every=10,
                               sample_every=50, checkpoint_every=50),
            "standard": dict(steps=3000, batch=16, pool_size=2000, channel_base=2048, channel_max=128,
                             checkpoint_every=250),
        }),
    MethodSpec(
        key="clip_mapper", label="CLIP text mapper (StyleCLIP / CLIPInverter)",
        module="pipelines.training.train_clip_mapper",
        config="pipelines.training.train_clip_mapper:ClipMapperTrainConfig", produces="clip_mapper",
        export="clip_mapper", steps_field="steps", base_field="generator", attaches_to="clip_mapper",
        presets={
            "quick demo": dict(steps=400, batch=8, pool_size=256, real_images=0, w_avg_samples=2000,
                               eval_latents=16, log_every=20, sample_every=200, checkpoint_every=100),
            "standard": dict(steps=1500, batch=8, pool_size=1000, real_images=1000, checkpoint_every=200),
        }),
    MethodSpec(
        key="clip", label="CLIP (contrastive, open_clip)", module="pipelines.training.train_clip",
        config="pipelines.training.train_clip:ClipTrainConfig", produces="clip", export="clip",
        steps_field="steps",
        presets={
            "quick demo": dict(steps=100, batch=64, train_images=2000, val_images=200, eval_every=50,
                               checkpoint_every=50),
            "standard": dict(steps=5000, batch=256, train_images=40000, val_images=2000),
        }),
    MethodSpec(
        key="evaluator", label="Portrait-world evaluator", module="pipelines.training.train_evaluator",
        config="pipelines.training.train_evaluator:EvaluatorTrainConfig", produces="evaluator",
        export="evaluator", steps_field="steps",
        presets={
            "quick demo": dict(steps=100, batch=64, train_images=2000, val_images=400),
            "standard": dict(steps=5000, batch=128, train_images=40000, val_images=4000),
        }),
)}


def _config_class(spec: MethodSpec) -> type:
    module, name = spec.config.split(":")
    return getattr(importlib.import_module(module), name)


def build_config(spec: MethodSpec, params: Mapping[str, Any], out_dir: str | Path) -> Any:
    """The script's config dataclass for ``params`` (after its own validation): raises
    :class:`RunError` naming the bad field, before anything is launched."""
    cls = _config_class(spec)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise RunError(f"{spec.label} has no setting(s) {unknown}")
    values = {**params, "out_dir": str(out_dir)}
    for key, value in values.items():  # common sense before the script's own checks
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise RunError(f"{key} must be a finite number, got {value}")
            if (key in ("lr", "lr_g", "lr_d") or key.endswith("steps") or key in ("batch", "batch_size")) and value <= 0:
                raise RunError(f"{key} must be positive, got {value}")
    try:
        config = cls(**values)
        validate = getattr(config, "validate", None)
        if callable(validate):
            result = validate()
            config = result if result is not None else config
        else:
            module = importlib.import_module(spec.module)
            if hasattr(module, "validate_config"):
                config = module.validate_config(config)
    except (TypeError, ValueError, OSError) as exc:   # OSError: a missing file, an uncached hub id
        raise RunError(f"{spec.label}: {exc}") from None
    return config


def _to_argv(config: Any) -> list[str]:
    """``--field value`` for every field of ``config`` (as the scripts' parse_config reads them)."""
    argv = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        argv += [f"--{f.name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class RunInfo:
    """What the UI shows for one run."""

    name: str
    method: str
    state: str
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    throughput: float | None = None      # steps per second over the recent metric rows
    created: float = 0.0
    error: str | None = None
    log_tail: str = ""
    metrics: list[dict[str, float]] = field(default_factory=list)
    latest_sample: str | None = None
    export: str | None = None           # the exported model folder, once finished
    path: str = ""

    @property
    def progress(self) -> float:
        return self.step / self.total if self.total else 0.0


@dataclass(frozen=True)
class Estimate:
    """What a full run would take, measured on a probe of its first steps."""

    steps: int                   # the full run's step budget
    probe_steps: int             # steps the probe ran
    startup_seconds: float       # process start to the first step (imports, data, models)
    seconds_per_step: float      # median over the probe's steps after the first
    finish_seconds: float        # last step to exit (final evaluation, export)
    peak_host_mb: float          # peak resident memory of the probe's process tree
    peak_cuda_mb: float | None   # peak allocated CUDA memory (None on the CPU)
    time_limit_seconds: float | None = None  # the run's max_train_minutes, when set
    free_host_mb: float | None = None        # memory free when the probe ended (host; the first GPU)
    free_cuda_mb: float | None = None

    def memory_problem(self) -> str | None:
        """Why the full run would not fit in the memory free now (None when it fits). The peak is the
        probe's, at the run's own batch: a run keeps that peak for its whole length."""
        for what, need, free in (("host memory", self.peak_host_mb, self.free_host_mb),
                                 ("GPU memory", self.peak_cuda_mb, self.free_cuda_mb)):
            if need is not None and free is not None and need > MEMORY_HEADROOM * free:
                return (f"it needs about {need / 1024:.2f} GB of {what} (measured on {self.probe_steps} steps at "
                        f"these settings) and {free / 1024:.2f} GB are free; lower the batch size (or the images "
                        "held in memory) and estimate again")
        return None

    @property
    def loop_seconds(self) -> float:
        loop = self.seconds_per_step * self.steps
        return min(loop, self.time_limit_seconds) if self.time_limit_seconds else loop

    @property
    def total_seconds(self) -> float:
        return self.startup_seconds + self.loop_seconds + self.finish_seconds

    def summary(self) -> str:
        limit = " (its time limit)" if self.time_limit_seconds and self.loop_seconds < self.seconds_per_step * self.steps else ""
        memory = f"peak memory {self.peak_host_mb / 1024:.2f} GB host"
        if self.peak_cuda_mb is not None:
            memory += f", {self.peak_cuda_mb / 1024:.2f} GB GPU"
        problem = self.memory_problem()
        return (f"about {_duration(self.total_seconds)}: {self.steps} steps × {self.seconds_per_step:.3g} s"
                f"{limit}, {self.startup_seconds:.0f} s to start, {self.finish_seconds:.0f} s to evaluate and "
                f"export; {memory} (measured on {self.probe_steps} steps)"
                + (f". ⚠️ Too big for this machine: {problem}; Launch refuses these settings" if problem else ""))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MiB (0 once it has gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


class RunManager:
    """Launch, watch, cancel and resume training runs in ``runs_dir``."""

    def __init__(self, runs_dir: str | Path = "runs", *, slots: int | None = None, nice: int = 10,
                 python: str = sys.executable, env: Mapping[str, str] | None = None,
                 methods: Mapping[str, MethodSpec] | None = None) -> None:
        self.methods = dict(methods or METHODS)
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.slots = slots if slots is not None else max(1, _cuda_count())
        self.nice = nice
        self.python = python
        self.env = dict(env or {})
        self._procs: dict[str, subprocess.Popen] = {}
        self._estimates: dict[str, Estimate] = {}   # settings -> their last estimate (the memory check)
        self._lock = threading.RLock()

    # -- files ------------------------------------------------------------------------------
    def _folder(self, name: str) -> Path:
        if not name or "/" in name or name.startswith(".") or name != name.strip():
            raise RunError(f"a run name is one folder name (letters, digits, -, _), got {name!r}")
        return self.runs_dir / name

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _write_launch(self, folder: Path, data: dict[str, Any]) -> None:
        tmp = folder / "launch.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, folder / "launch.json")

    def names(self) -> list[str]:
        """Every run the manager launched in ``runs_dir``, newest first."""
        found = [(self._read(p).get("created", 0), p.parent.name) for p in self.runs_dir.glob("*/launch.json")]
        return [n for _, n in sorted(found, reverse=True)]

    # -- launching ----------------------------------------------------------------------------
    def launch(self, method: str, params: Mapping[str, Any], *, name: str | None = None,
               preset: str | None = None) -> str:
        """Validate and start (or queue) a run; returns its name. Refused with :class:`RunError`
        for bad settings, an unknown method or preset, a folder that already holds a run, or settings
        whose :meth:`estimate` measured more memory than is free."""
        if method not in self.methods:
            raise RunError(f"unknown method {method!r}; one of {sorted(self.methods)}")
        spec = self.methods[method]
        if preset is not None and preset not in spec.presets:
            raise RunError(f"unknown preset {preset!r} for {spec.label}; one of {sorted(spec.presets)}")
        values = {**(spec.presets.get(preset, {}) if preset else {}), **dict(params)}
        name = name or f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder = self._folder(name)
        with self._lock:
            if (folder / "launch.json").exists() or (folder / "config.json").exists():
                raise RunError(f"{folder} already holds a run; resume it or choose another name")
            _check_base(spec, values)
            config = build_config(spec, values, folder)
            est = self._estimates.get(_settings_key(method, values))
            if est is not None and (problem := est.memory_problem()):
                raise RunError(f"{spec.label} would not fit: {problem}")
            folder.mkdir(parents=True, exist_ok=True)
            self._write_launch(folder, {"method": method, "preset": preset, "argv": _to_argv(config),
                                        "created": time.time(), "state": "queued", "pid": None,
                                        "resume": False})
        self.poll()
        return name

    def resume(self, name: str) -> str:
        """Start an interrupted, failed or cancelled run again from its last checkpoint."""
        folder = self._folder(name)
        with self._lock:
            launch = self._read(folder / "launch.json")
            if not launch:
                raise RunError(f"no run named {name!r} in {self.runs_dir}")
            state = self.info(name).state
            if state in ("running", "queued"):
                raise RunError(f"{name} is {state}; it cannot be started twice")
            if state == "finished":
                raise RunError(f"{name} has finished; launch a new run to train further")
            launch.update(state="queued", pid=None, resume=True)
            self._write_launch(folder, launch)
        self.poll()
        return name

    def cancel(self, name: str, *, timeout: float = 30.0) -> None:
        """SIGTERM the run's process group (the scripts checkpoint on it), SIGKILL after ``timeout``."""
        folder = self._folder(name)
        with self._lock:
            launch = self._read(folder / "launch.json")
            if not launch:
                raise RunError(f"no run named {name!r}")
            pid = launch.get("pid")
            if launch.get("state") == "queued":
                launch["state"] = "cancelled"
                self._write_launch(folder, launch)
                return
            if not _pid_alive(pid):
                raise RunError(f"{name} is not running")
            launch["state"] = "cancelled"
            self._write_launch(folder, launch)
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout
        while time.time() < deadline and _pid_alive(pid):
            self._reap()
            time.sleep(0.1)
        if _pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap()

    def _start(self, name: str, launch: dict[str, Any]) -> None:
        folder = self._folder(name)
        spec = self.methods[launch["method"]]
        argv = list(launch["argv"])
        if launch.get("resume"):
            argv += ["--resume", "true"]
        cmd = self._command(spec, argv)
        log = open(folder / "log.txt", "a")
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = self._popen(cmd, log)
        log.close()
        self._procs[name] = proc
        launch.update(state="running", pid=proc.pid, started=time.time(), command=shlex.join(cmd))
        self._write_launch(folder, launch)

    def _command(self, spec: MethodSpec, argv: list[str]) -> list[str]:
        if _cuda_count() > 1:
            return [self.python, "-m", "accelerate.commands.launch", "--num_processes", str(_cuda_count()),
                    "-m", spec.module, *argv]
        return [self.python, "-m", spec.module, *argv]

    def _popen(self, cmd: list[str], log: Any) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
               **self.env}
        root = ROOT
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        nice = self.nice
        return subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=(lambda: os.nice(nice)) if nice else None)

    # -- estimates ----------------------------------------------------------------------------
    def estimate(self, method: str, params: Mapping[str, Any], *, preset: str | None = None,
                 probe_steps: int = 5, timeout: float = 600.0) -> Estimate:
        """Run the method's script for ``probe_steps`` steps (same settings otherwise, in a scratch
        folder removed afterwards) and extrapolate to the full run. Bad settings are refused with
        :class:`RunError` exactly as :meth:`launch` refuses them; so is a probe that fails."""
        import shutil
        import tempfile

        if method not in self.methods:
            raise RunError(f"unknown method {method!r}; one of {sorted(self.methods)}")
        spec = self.methods[method]
        if preset is not None and preset not in spec.presets:
            raise RunError(f"unknown preset {preset!r} for {spec.label}; one of {sorted(spec.presets)}")
        values = {**(spec.presets.get(preset, {}) if preset else {}), **dict(params)}
        _check_base(spec, values)
        scratch = Path(tempfile.mkdtemp(prefix=".estimate-", dir=self.runs_dir))
        try:
            full = build_config(spec, values, scratch / "run")
            steps = int(getattr(full, spec.steps_field))
            n = max(2, min(int(probe_steps), steps))
            fields = {f.name for f in dataclasses.fields(full)}
            probe = {**values, spec.steps_field: n}
            probe.update({k: 1 for k in ("log_every",) if k in fields})
            probe.update({k: n for k in ("sample_every", "checkpoint_every", "eval_every") if k in fields})
            probe.update({k: None for k in ("max_train_minutes", "export_to", "export_dir", "examples_grid")
                          if k in fields})
            if "total_kimg" in fields:
                probe["total_kimg"] = None
            config = build_config(spec, probe, scratch / "run")
            with open(scratch / "log.txt", "w") as log:
                t0 = time.time()
                proc = self._popen(self._command(spec, _to_argv(config)), log)
                peak = 0.0
                while proc.poll() is None:
                    peak = max(peak, _tree_rss_mb(proc.pid))
                    if time.time() - t0 > timeout:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        raise RunError(f"the {n}-step probe of {spec.label} took over {timeout:.0f} s; "
                                       "use a smaller preset or fewer images")
                    time.sleep(0.1)
                t_end = time.time()
            if proc.returncode != 0:
                tail = (scratch / "log.txt").read_text(errors="replace").strip().splitlines()[-8:]
                killed = (" - killed, most likely out of memory: lower the batch size"
                          if proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) else "")
                raise RunError(f"the probe of {spec.label} failed (exit {proc.returncode}{killed}):\n"
                               + "\n".join(tail))
            rows = [json.loads(line) for line in (scratch / "run" / "metrics.jsonl").read_text().splitlines()
                    if line.strip()]
            rows = [r for r in rows if "time" in r]
            if len(rows) < 2:
                raise RunError(f"the probe of {spec.label} logged {len(rows)} step(s); cannot time a step")
            times = sorted(b["time"] - a["time"] for a, b in zip(rows, rows[1:]))
            per_step = times[len(times) // 2] / max(1, rows[1]["step"] - rows[0]["step"])
            cuda = [r["cuda_peak_mb"] for r in rows if "cuda_peak_mb" in r]
            limit = getattr(full, "max_train_minutes", None)
            free_host, free_cuda = _free_memory_mb()
            est = Estimate(steps=steps, probe_steps=n, startup_seconds=max(0.0, rows[0]["time"] - t0 - per_step),
                           seconds_per_step=per_step, finish_seconds=max(0.0, t_end - rows[-1]["time"]),
                           peak_host_mb=peak, peak_cuda_mb=max(cuda) if cuda else None,
                           time_limit_seconds=60 * float(limit) if limit else None,
                           free_host_mb=free_host, free_cuda_mb=free_cuda)
            self._estimates[_settings_key(method, values)] = est
            return est
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _reap(self) -> None:
        for name, proc in list(self._procs.items()):
            if proc.poll() is not None:
                del self._procs[name]
                folder = self._folder(name)
                launch = self._read(folder / "launch.json")
                launch["returncode"] = proc.returncode
                self._write_launch(folder, launch)

    def poll(self) -> None:
        """Reap ended processes and start queued runs while slots are free (oldest first)."""
        with self._lock:
            self._reap()
            busy = sum(1 for n in self.names() if self.info(n).state == "running")
            queued = sorted((self._read(self.runs_dir / n / "launch.json").get("created", 0), n)
                            for n in self.names() if self._read(self.runs_dir / n / "launch.json").get("state") == "queued")
            for _, name in queued:
                if busy >= self.slots:
                    break
                self._start(name, self._read(self.runs_dir / name / "launch.json"))
                busy += 1

    # -- watching -----------------------------------------------------------------------------
    def info(self, name: str, *, log_lines: int = 20) -> RunInfo:
        from pipelines.training.runs import RunFolder

        folder = self._folder(name)
        launch = self._read(folder / "launch.json")
        if not launch:
            raise RunError(f"no run named {name!r} in {self.runs_dir}")
        run = RunFolder(folder)
        status = run.status()
        metrics = run.metrics()
        alive = _pid_alive(launch.get("pid"))
        recorded = launch.get("state", "queued")
        if recorded == "queued":
            state = "queued"
        elif alive:
            state = "cancelled" if recorded == "cancelled" else "running"
        elif status.get("state") == "finished":
            state = "finished"
        elif recorded == "cancelled":
            state = "cancelled"
        elif status.get("state") == "failed" or launch.get("returncode") not in (None, 0, -signal.SIGKILL):
            state = "failed"
        else:
            state = "interrupted"  # killed (SIGKILL, power, app crash) without a word: resumable
        step = int(status.get("step", metrics[-1]["step"] if metrics else 0) or 0)
        total = int(status.get("total", 0) or 0)
        throughput = eta = None
        timed = [r for r in metrics if "time" in r]
        if len(timed) >= 2 and state == "running":
            a, b = timed[max(0, len(timed) - 10)], timed[-1]
            if b["time"] > a["time"] and b["step"] > a["step"]:
                throughput = (b["step"] - a["step"]) / (b["time"] - a["time"])
                eta = max(0.0, (total - step) / throughput) if total else None
        samples = sorted((folder / "samples").glob("*.png")) if (folder / "samples").exists() else []
        export = folder / self.methods[launch["method"]].export
        log_tail = ""
        if (folder / "log.txt").exists():
            log_tail = "\n".join((folder / "log.txt").read_text(errors="replace").splitlines()[-log_lines:])
        return RunInfo(name=name, method=launch["method"], state=state, step=step, total=total, eta_s=eta,
                       throughput=throughput, created=launch.get("created", 0.0), error=status.get("error"),
                       log_tail=log_tail, metrics=metrics, latest_sample=str(samples[-1]) if samples else None,
                       export=str(export) if state == "finished" and export.exists() else None, path=str(folder))

    def runs(self) -> list[RunInfo]:
        return [self.info(n) for n in self.names()]

    def servable(self, name: str) -> Path:
        """The folder the studio serves a finished run's model from: the exported model, or, for a
        part of a model (an inversion encoder, a sketch encoder, a CLIP mapper for a generator; a tiny
        autoencoder for a text-to-image pipeline), a copy of the run's base folder with the trained part
        in place of its own: ``<run>/with_generator/`` or ``<run>/with_pipeline/`` (made once; a later
        call and a restarted studio find it)."""
        info = self.info(name)
        if info.state != "finished" or not info.export:
            raise RunError(f"{name} is {info.state}; only a finished run can be used")
        spec = self.methods[info.method]
        if not spec.attaches_to:
            return Path(info.export)
        folder = Path(info.path)
        base = Path(str(self._read(folder / "config.json").get(spec.base_field) or ""))
        base = base if base.is_absolute() else ROOT / base
        pipeline = (base / "model_index.json").is_file()
        bundle = folder / ("with_pipeline" if pipeline else "with_generator")
        if (bundle / ("model_index.json" if pipeline else "config.json")).is_file():
            return bundle
        if not pipeline and not (base / "config.json").is_file():
            raise RunError(f"{name} trained a {spec.attaches_to} for {base}, which is not a studio generator folder "
                           "(config.json + model.safetensors) nor a pipeline folder (model_index.json), or no "
                           f"longer exists; copy the run's {spec.export}/ into its model folder as "
                           f"{spec.attaches_to}/ instead")
        partial = folder / f".{bundle.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(base, partial, ignore=shutil.ignore_patterns(spec.attaches_to))
        shutil.copytree(info.export, partial / spec.attaches_to)
        if pipeline:   # the index names each component's class: the new part's, from its config
            index = self._read(partial / "model_index.json")
            part = self._read(partial / spec.attaches_to / "config.json")
            if spec.attaches_to in index and part.get("_class_name"):
                index[spec.attaches_to] = [index[spec.attaches_to][0], part["_class_name"]]
            (partial / "model_index.json").write_text(json.dumps(index, indent=1))
        shutil.rmtree(bundle, ignore_errors=True)
        partial.rename(bundle)                       # whole or absent, even if the app dies midway
        return bundle


def _check_base(spec: MethodSpec, values: Mapping[str, Any]) -> None:
    """The teacher / base must exist (or, where the script takes one, be a hub id)."""
    from pipelines.hub_models import looks_like_hub_id

    base = str(values.get(spec.base_field) or "") if spec.base_field else ""
    if base and not Path(base).exists() and not (spec.base_may_be_hub_id and looks_like_hub_id(base)):
        raise RunError(f"{spec.base_field} {base!r} does not exist"
                       + (" (nor is it a hub id, owner/name)" if spec.base_may_be_hub_id else ""))


def _settings_key(method: str, values: Mapping[str, Any]) -> str:
    return json.dumps([method, {k: values[k] for k in sorted(values)}], default=str)


def _free_memory_mb() -> tuple[float, float | None]:
    """Free host memory and free memory of the first GPU (None without one), in MiB."""
    import psutil

    cuda = None
    if _cuda_count():
        import torch
        cuda = torch.cuda.mem_get_info(0)[0] / 2**20
    return psutil.virtual_memory().available / 2**20, cuda


def _cuda_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch / no driver: CPU only
        return 0
