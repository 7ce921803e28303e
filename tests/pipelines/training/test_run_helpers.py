"""Helpers the training scripts share: field-kind checks, the running means between log rows, and
the run folder's one-writer lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipelines.training.runs import RunFolder, RunningMeans, check_fields
from tests._fake_train import FakeConfig

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class _Cfg:
    steps: int = 10
    keep: int = 0
    lr: float = 1e-3
    weight: float = 0.0


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": True}, "steps must be a positive integer"),
    ({"keep": -1}, "keep must be an integer >= 0"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"lr": 0}, "lr must be a positive number"),
    ({"weight": -0.5}, "weight must be a finite number >= 0"),
])
def test_check_fields_names_the_bad_field(overrides, message):
    kinds = dict(positive_ints=("steps",), nonneg_ints=("keep",), positive=("lr",), nonneg=("weight",))
    check_fields(_Cfg(), **kinds)                                            # the defaults pass
    with pytest.raises(ValueError, match=message):
        check_fields(_Cfg(**overrides), **kinds)


def test_running_means_average_each_key_over_its_own_count_and_reset_on_pop():
    meter = RunningMeans()
    meter.add(loss=torch.tensor(1.0), gan=torch.tensor(4.0))
    meter.add(loss=torch.tensor(3.0, requires_grad=True))
    means = meter.pop()
    assert list(means) == ["gan", "loss"]                                    # sorted: same order on every process
    assert float(means["loss"]) == 2.0 and float(means["gan"]) == 4.0 and not means["loss"].requires_grad
    assert meter.pop() == {}


def test_a_run_folder_has_one_live_writer_and_no_stale_lock(tmp_path):
    """A second process is refused a folder a live run writes (with its pid); a killed run frees it."""
    out = tmp_path / "run"
    cfg = FakeConfig(out_dir=str(out), steps=2, startup_seconds=60.0)
    proc = subprocess.Popen([sys.executable, "-m", "tests._fake_train", "--out_dir", str(out), "--steps", "2",
                             "--startup_seconds", "60"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 60
        while RunFolder(out).status().get("state") != "running":
            assert proc.poll() is None and time.time() < deadline, "the fake run did not start"
            time.sleep(0.1)
        with pytest.raises(RuntimeError, match=rf"another live process \(pid {proc.pid}\)"):
            RunFolder(out).create(cfg, resume=True)
        assert (out / "config.json").exists() and RunFolder(out).status()["state"] == "running"  # untouched
    finally:
        proc.kill()
        proc.wait()
    assert RunFolder(out).create(cfg, resume=True) is False        # the killed run left no lock behind
    # the same process may create it again (a resume in one process); an ended run frees its lock
    assert RunFolder(out).create(cfg, resume=True) is False
    RunFolder(out).set_status("finished")
    check = subprocess.run([sys.executable, "-c", "from pipelines.training.runs import RunFolder; import sys; "
                            "from tests._fake_train import FakeConfig; "
                            "RunFolder(sys.argv[1]).create(FakeConfig(out_dir=sys.argv[1], steps=2, "
                            "startup_seconds=60.0), resume=True)", str(out)],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_a_refused_create_leaves_the_folder_free_for_another_process(tmp_path):
    out = tmp_path / "run"
    run = RunFolder(out)
    run.create(FakeConfig(out_dir=str(out)), resume=False)
    run.save_checkpoint(1, {"step": 1})
    run.set_status("stopped", step=1)                                # ended: the lock is free
    with pytest.raises(FileExistsError, match="pass --resume true"):
        RunFolder(out).create(FakeConfig(out_dir=str(out)), resume=False)
    check = subprocess.run([sys.executable, "-c", "from pipelines.training.runs import RunFolder; import sys; "
                            "from tests._fake_train import FakeConfig; "
                            "print(RunFolder(sys.argv[1]).create(FakeConfig(out_dir=sys.argv[1]), resume=True))",
                            str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == "True", check.stderr
