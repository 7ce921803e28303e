"""Run-manager benchmark: the quick DMD2 preset end to end, resume after SIGKILL, UI latency during a run.

    python -m benchmarks.runs --json benchmarks/results/runs.json

Everything goes through :class:`pipelines.run_manager.RunManager`, as the Distill / train tab does,
in a scratch runs folder (``--runs_dir``, removed afterwards unless ``--keep``).

Figures:

- quick_dmd2_minutes: launch to "finished" (process start, data, distillation, the end-of-run
  evaluation, export) of the "quick demo" DMD2 preset distilling ``--teacher``;
- quick_student_adherence: that student at one step on the text-to-image benchmark's prompt set
  (``--prompts`` prompts x ``--images_per_prompt`` images), read by the evaluator;
- quick_student_card_*: the figures the run wrote into its own card (its quick evaluation);
- resume_lost_steps: a second DMD2 run (``--resume_steps`` steps, a checkpoint every
  ``--checkpoint_every``) is SIGKILLed (its whole process group, as a crash or ``kill -9`` of the
  app would) once it has logged ``--kill_after`` steps; ``RunManager.resume`` restarts it from its
  last checkpoint; the figure is the last step logged before the kill minus the step it resumed
  from (at most the checkpoint interval). ``resume_loss_max_abs_diff``: the largest difference
  between the losses logged for the re-done steps before the kill and after the resume (the resumed
  run restores optimiser and RNG state, so its loss curve continues the first exactly: ~0), and
  ``resume_metrics_contiguous``: the final metrics.jsonl holds every step once, in order;
- ui_latency_idle_ms / ui_latency_during_run_ms / ui_latency_during_run_ratio: the median time of a
  one-step generation (one image, ``--student``) in this process while idle and while the quick run
  trains (the manager starts runs at nice 10 so the studio stays usable).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import parser, write
from pipelines.evaluation import EMBEDDED_EVALUATOR, Evaluator
from pipelines.run_manager import RunManager
from pipelines.text_to_image import PortraitDiffusionPipeline
from pipelines.text_to_image_eval import adherence, generate, prompt_set
from pipelines.training.runs import RunFolder

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEACHER = ROOT / "assets" / "portrait_teacher"
DEFAULT_STUDENT = ROOT / "assets" / "portrait_student"
LOSS_KEYS = ("loss_dm", "loss_fake", "loss_gan_g", "loss_gan_d")


def wait_for(manager: RunManager, name: str, until: Any, *, timeout: float, poll: float = 1.0) -> Any:
    """Poll ``manager`` until ``until(info)`` is true; RuntimeError with the log tail on failure or timeout."""
    deadline = time.time() + timeout
    while True:
        manager.poll()
        info = manager.info(name)
        if until(info):
            return info
        if info.state in ("failed", "cancelled", "interrupted") and not until(info):
            raise RuntimeError(f"run {name} is {info.state}:\n{info.log_tail}")
        if time.time() > deadline:
            raise RuntimeError(f"run {name} took over {timeout:.0f} s (state {info.state}, step {info.step}):\n"
                               f"{info.log_tail}")
        time.sleep(poll)


def one_step_latency(student: PortraitDiffusionPipeline, *, repeats: int) -> float:
    """Median seconds of a one-image, one-step generation (after a warm-up call)."""
    def call():
        student(prompt="a girl with long red hair and glasses", num_inference_steps=1, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0))

    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quick_figures(manager: RunManager, teacher: Path, student: PortraitDiffusionPipeline | None,
                  evaluator: Evaluator, *, prompts: int, images_per_prompt: int, latency_repeats: int,
                  timeout: float, overrides: dict[str, Any]) -> dict[str, Any]:
    """The quick DMD2 preset end to end, with the UI-latency probe while it trains."""
    figures: dict[str, Any] = {}
    if student is not None:
        figures["ui_latency_idle_ms"] = 1000 * one_step_latency(student, repeats=latency_repeats)
    t0 = time.time()
    name = manager.launch("dmd2", {"teacher": str(teacher), **overrides}, name="quick-dmd2", preset="quick demo")
    if student is not None:
        # Once the run logs training steps it is in its heaviest phase: measure then.
        wait_for(manager, name, lambda i: i.step >= 1 or i.state == "finished", timeout=timeout)
        if manager.info(name).state == "running":
            figures["ui_latency_during_run_ms"] = 1000 * one_step_latency(student, repeats=latency_repeats)
            figures["ui_latency_during_run_ratio"] = (figures["ui_latency_during_run_ms"]
                                                      / figures["ui_latency_idle_ms"])
    info = wait_for(manager, name, lambda i: i.state == "finished", timeout=timeout)
    figures["quick_dmd2_minutes"] = (time.time() - t0) / 60
    figures["quick_dmd2_steps"] = info.step
    export = Path(info.export)
    card = json.loads((export / "card.json").read_text())
    figures.update({f"quick_student_card_{k[len('eval_'):]}": v for k, v in card["figures"].items()
                    if k.startswith("eval_") and isinstance(v, (int, float))})
    quick = PortraitDiffusionPipeline.from_pretrained(export, device="cpu", dtype=torch.float32)
    texts = [p["prompt"] for p in prompt_set(prompts)]
    images = generate(quick, texts, steps=1, guidance=1.0, images_per_prompt=images_per_prompt)
    figures["quick_student_adherence"] = adherence(evaluator, images, texts, images_per_prompt)
    return figures


def resume_figures(manager: RunManager, teacher: Path, *, steps: int, checkpoint_every: int, kill_after: int,
                   timeout: float, overrides: dict[str, Any]) -> dict[str, Any]:
    """SIGKILL a DMD2 run mid-way, resume it through the manager, compare the loss curves."""
    params = {"teacher": str(teacher), **overrides, "steps": steps, "checkpoint_every": checkpoint_every,
              "log_every": 1, "sample_every": steps, "eval_prompts": 0}
    name = manager.launch("dmd2", params, name="resume-dmd2", preset="quick demo")
    folder = manager.runs_dir / name
    info = wait_for(manager, name, lambda i: i.step >= kill_after, timeout=timeout, poll=0.2)
    pid = json.loads((folder / "launch.json").read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)
    while manager.info(name).state == "running":
        manager.poll()
        time.sleep(0.1)
    before = RunFolder(folder).metrics()          # (a line cut short by the kill is skipped)
    killed_at = max(r["step"] for r in before)
    state_after_kill = manager.info(name).state
    manager.resume(name)
    info = wait_for(manager, name, lambda i: i.state == "finished", timeout=timeout)
    log = (folder / "log.txt").read_text(errors="replace")
    found = re.findall(r"^resumed .* at step (\d+)$", log, flags=re.M)
    if not found:
        raise RuntimeError(f"run {name} did not resume from a checkpoint:\n{log[-2000:]}")
    resumed_from = int(found[-1])
    after = RunFolder(folder).metrics()
    redone = {r["step"]: r for r in after if resumed_from < r["step"] <= killed_at}
    diffs = [abs(r[k] - redone[r["step"]][k]) for r in before if r["step"] in redone
             for k in LOSS_KEYS if k in r and k in redone[r["step"]]]
    return {"resume_lost_steps": killed_at - resumed_from, "resume_checkpoint_every": checkpoint_every,
            "resume_killed_at_step": killed_at, "resume_from_step": resumed_from,
            "resume_state_after_kill": state_after_kill,
            "resume_loss_max_abs_diff": max(diffs) if diffs else float("nan"),
            "resume_metrics_contiguous": [r["step"] for r in after] == list(range(1, info.step + 1)),
            "resume_final_step": info.step}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__)
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="PortraitDiffusionPipeline folder to distil")
    p.add_argument("--student", default=str(DEFAULT_STUDENT),
                   help="one-step pipeline timed for the UI-latency figures ('' skips them)")
    p.add_argument("--evaluator", default=str(EMBEDDED_EVALUATOR))
    p.add_argument("--runs_dir", default=None, help="scratch runs folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the runs folder")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--latency_repeats", type=int, default=5)
    p.add_argument("--resume_steps", type=int, default=30)
    p.add_argument("--checkpoint_every", type=int, default=10)
    p.add_argument("--kill_after", type=int, default=15, help="SIGKILL once this many steps are logged")
    p.add_argument("--timeout_minutes", type=float, default=60.0, help="per run")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra DMD2 settings for both runs (e.g. --set real_images=64 for a smoke test)")
    p.add_argument("--skip_resume", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    args = p.parse_args(argv)
    if not (0 < args.kill_after < args.resume_steps) or args.checkpoint_every < 1:
        p.error("--kill_after must lie in (0, --resume_steps) and --checkpoint_every be >= 1")
    if not (Path(args.teacher) / PortraitDiffusionPipeline.model_index_name).is_file():
        p.exit(2, f"{p.prog}: the teacher {args.teacher} is not a PortraitDiffusionPipeline folder; make one with "
                  "python -m pipelines.training.train_diffusion_teacher, or pass --teacher PATH\n")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set needs FIELD=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)      # numbers, true/false, lists
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()          # paths and other text
    torch.set_num_threads(args.threads)

    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="bench-runs-"))
    manager = RunManager(runs_dir)
    evaluator = Evaluator.from_pretrained(args.evaluator, device="cpu")
    student = None
    if args.student:
        student = PortraitDiffusionPipeline.from_pretrained(args.student, device="cpu", dtype=torch.float32)
    timeout = 60 * args.timeout_minutes
    try:
        figures = quick_figures(manager, Path(args.teacher), student, evaluator, prompts=args.prompts,
                                images_per_prompt=args.images_per_prompt, latency_repeats=args.latency_repeats,
                                timeout=timeout, overrides=overrides)
        if not args.skip_resume:
            figures.update(resume_figures(manager, Path(args.teacher), steps=args.resume_steps,
                                          checkpoint_every=args.checkpoint_every, kill_after=args.kill_after,
                                          timeout=timeout, overrides=overrides))
    finally:
        if not args.keep and not args.runs_dir:
            shutil.rmtree(runs_dir, ignore_errors=True)
    figures.update(prompts=args.prompts, images_per_prompt=args.images_per_prompt, threads=args.threads)
    write(figures, args.json, "benchmarks.runs")
    return figures


if __name__ == "__main__":
    main()
