"""A stand-in training script for the run-manager tests: the same contract as the real ones
(dataclass config, run folder, metrics, checkpoints with state, SIGTERM checkpoint, resume,
an exported folder at the end), but every step is a short sleep."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.training.runs import RunFolder, parse_config


@dataclass
class FakeConfig:
    out_dir: str = "runs/fake"
    resume: bool = False
    device: str = "cpu"
    steps: int = 20
    lr: float = 0.1
    step_seconds: float = 0.05
    checkpoint_every: int = 5
    fail_at: int = 0  # raise at this step (0: never)
    log_every: int = 1
    startup_seconds: float = 0.0  # sleep before the first step (data, models)
    memory_mb: int = 0  # hold this much memory while training
    generator: str = ""  # a base model folder (the run-manager tests of parts of a generator)

    def validate(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(FakeConfig, argv)
    cfg.validate()
    run = RunFolder(cfg.out_dir)
    resumed = run.create(cfg, resume=cfg.resume)
    step, value = 0, 0.0
    if resumed:
        ckpt = run.load_checkpoint()
        step, value = int(ckpt["step"]), float(ckpt["value"])
        run.truncate_metrics(step)
        print(f"resumed at step {step}", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    run.set_status("running", step=step, total=cfg.steps)
    time.sleep(cfg.startup_seconds)
    held = bytearray(cfg.memory_mb * 2**20)  # noqa: F841 (held while the loop runs)
    for i in range(0, len(held), 4096):
        held[i] = 1  # touch every page, so it is resident
    try:
        while step < cfg.steps and not stop:
            time.sleep(cfg.step_seconds)
            step += 1
            value += cfg.lr
            if cfg.fail_at and step == cfg.fail_at:
                raise RuntimeError(f"exploded at step {step}")
            if step % cfg.log_every == 0:
                run.log_metrics(step, loss=1.0 / step, value=value)
            run.set_status("running", step=step, total=cfg.steps)
            if step % cfg.checkpoint_every == 0:
                run.save_checkpoint(step, {"step": step, "value": value})
        if stop:
            run.save_checkpoint(step, {"step": step, "value": value})
            print(f"SIGTERM: checkpoint at step {step}", flush=True)
            return
        export = Path(cfg.out_dir) / "model"
        export.mkdir(exist_ok=True)
        (export / "value.txt").write_text(str(value))
        run.set_status("finished", step=step, total=cfg.steps)
        print("done", flush=True)
    except BaseException as exc:
        run.set_status("failed", step=step, total=cfg.steps, error=f"{type(exc).__name__}: {exc}")
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
