"""StyleGAN2-ADA training loop: tiny CPU runs, resume, kill-safety, the ADA pipe, bad configs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.stylegan2.augment import AugmentPipe
from pipelines.training.runs import RunFolder
from pipelines.training.train_stylegan2 import StyleGAN2TrainConfig, ada_adjust, train, validate_config

REPO = Path(__file__).resolve().parents[3]

# A tiny network on a 64-image bank of 16 px portraits; R1 and path length both exercised.
TINY = dict(
    resolution=16, bank_size=64, batch=8, z_dim=32, w_dim=32, map_layers=2, channel_base=256, channel_max=32,
    r1_interval=4, pl_weight=2.0, pl_interval=2, ada_interval=2, ada_kimg=1.0, log_every=2, sample_every=4,
    checkpoint_every=4, num_samples=4, workers=1, device="cpu",
)


@pytest.fixture(scope="module")
def bank_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Render the 64-image bank once for the module; every run loads it from this cache."""
    from pipelines.data.bank import render_bank

    path = tmp_path_factory.mktemp("bank") / "bank.npz"
    render_bank(TINY["bank_size"], size=TINY["resolution"], seed=0, workers=1, cache=path)
    return str(path)


def tiny_config(out_dir: Path, bank_cache: str, **overrides) -> StyleGAN2TrainConfig:
    return StyleGAN2TrainConfig(out_dir=str(out_dir), bank_cache=bank_cache, **{**TINY, **overrides})


def metric_steps(out_dir: Path) -> list[int]:
    return [int(r["step"]) for r in RunFolder(out_dir).metrics()]


# ---------------------------------------------------------------------------------------------
# Augmentation pipe
# ---------------------------------------------------------------------------------------------


def test_augment_is_identity_at_p0() -> None:
    pipe = AugmentPipe()
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    assert torch.equal(pipe(x), x)


def test_augment_at_p1_keeps_shape_and_range_and_is_twice_differentiable() -> None:
    torch.manual_seed(0)
    pipe = AugmentPipe()
    pipe.p.fill_(1.0)
    x = (torch.rand(16, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = pipe(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert y.abs().max() < 20  # colour ops may leave [-1, 1], but not by orders of magnitude
    changed = (y - x).flatten(1).abs().amax(1) > 1e-3
    assert changed.float().mean() > 0.9  # nearly every image drew some op at p = 1
    # R1 differentiates the gradient of D(aug(x)) with respect to x: needs a double backward.
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    (g,) = torch.autograd.grad(torch.nn.functional.conv2d(y, w).square().sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(g.square().sum(), w)
    assert torch.isfinite(gw).all() and gw.abs().sum() > 0


def test_augment_xflip_only_gives_image_or_its_mirror() -> None:
    torch.manual_seed(1)
    pipe = AugmentPipe(translate=False, scale=False, rotate=False, color=False)
    pipe.p.fill_(1.0)
    x = torch.rand(32, 3, 8, 8) * 2 - 1
    y = pipe(x)
    same = (y == x).flatten(1).all(1)
    mirrored = torch.isclose(y, x.flip(-1), atol=1e-5).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_ada_adjust_follows_the_sign_of_r_t() -> None:
    p = torch.tensor(0.5)
    up = ada_adjust(p, torch.tensor(0.9), target=0.6, nimg=100, ada_kimg=1.0)
    down = ada_adjust(p, torch.tensor(0.1), target=0.6, nimg=100, ada_kimg=1.0)
    assert up.item() == pytest.approx(0.6) and down.item() == pytest.approx(0.4)
    assert ada_adjust(torch.tensor(0.0), torch.tensor(-1.0), target=0.6, nimg=100, ada_kimg=1.0).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    dict(total_steps=0),
    dict(total_kimg=0.0),
    dict(lr_g=-1e-3),
    dict(lr_d=0.0),
    dict(batch=6, mbstd_group=4),
    dict(resolution=48),
    dict(beta2=1.0),
    dict(r1_gamma=-1.0),
    dict(outlier_rate=1.5),
    dict(precision="bf17"),
    dict(exclude_file="/nonexistent/excluded.json"),
    dict(max_train_minutes=0.0),
])
def test_bad_configs_are_refused_before_anything_runs(tmp_path: Path, overrides: dict) -> None:
    config = StyleGAN2TrainConfig(out_dir=str(tmp_path / "run"), **overrides)
    with pytest.raises(ValueError):
        train(config)
    assert not (tmp_path / "run").exists()


def test_validate_resolves_automatic_values() -> None:
    c = validate_config(StyleGAN2TrainConfig(batch=32, total_kimg=1.0))
    assert c.total_steps == 32 and c.total_kimg is None
    assert c.r1_gamma == pytest.approx(0.0002 * 64**2 / 32) and c.ema_kimg == pytest.approx(10.0)


def test_exclude_file_drops_bank_indices(tmp_path: Path, bank_cache: str) -> None:
    from pipelines.training.train_stylegan2 import _load_bank_images

    excluded = tmp_path / "excluded.json"
    excluded.write_text(json.dumps([0, 5, 63]))
    config = tiny_config(tmp_path, bank_cache, exclude_file=str(excluded))
    images, info = _load_bank_images(config, torch.device("cpu"))
    assert images.shape == (61, 3, 16, 16) and images.dtype == torch.uint8
    assert info["num_train_images"] == 61 and info["num_excluded"] == 3
    excluded.write_text(json.dumps([64]))
    with pytest.raises(ValueError, match="outside the bank"):
        _load_bank_images(config, torch.device("cpu"))


def test_outlier_rate_mixes_outliers_into_the_bank(tmp_path: Path) -> None:
    from pipelines.training.train_stylegan2 import _load_bank_images

    config = StyleGAN2TrainConfig(out_dir=str(tmp_path), **{**TINY, "bank_size": 32}, outlier_rate=0.5,
                                  bank_cache="none")
    images, info = _load_bank_images(config, torch.device("cpu"))
    assert images.shape == (32, 3, 16, 16)
    assert 4 <= info["num_outliers"] <= 28  # about half of 32


# ---------------------------------------------------------------------------------------------
# Tiny runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_run_writes_everything_and_resume_continues_exactly(tmp_path: Path, bank_cache: str) -> None:
    from pipelines.stylegan_io import load_generator

    # An uninterrupted 8-step run ...
    straight = tmp_path / "straight"
    out = train(tiny_config(straight, bank_cache, total_steps=8))
    rows = RunFolder(straight).metrics()
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for r in rows:
        for key in ("loss_G", "loss_D", "r1", "pl", "p", "kimg", "imgs_per_s"):
            assert key in r and torch.isfinite(torch.tensor(r[key])), (key, r)
    assert RunFolder(straight).status()["state"] == "finished"
    assert (straight / "samples" / "step_0000004.png").is_file()
    assert RunFolder(straight).latest_checkpoint().name == "step_0000008.pt"
    assert (out / "model.safetensors").is_file() and (out / "card.json").is_file()
    G = load_generator(out)
    img = G(torch.randn(2, 32), None, noise_mode="const")
    assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()

    # ... equals a 4-step run resumed after it ended and extended to 8 steps.
    resumed = tmp_path / "resumed"
    train(tiny_config(resumed, bank_cache, total_steps=4))
    train(tiny_config(resumed, bank_cache, total_steps=8, resume=True))
    assert metric_steps(resumed) == [2, 4, 6, 8]
    a = RunFolder(straight).load_checkpoint()
    b = RunFolder(resumed).load_checkpoint()
    for key in ("G", "D", "G_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert torch.equal(a["augment"]["p"], b["augment"]["p"])

    # A second start without --resume is refused rather than overwriting the run.
    with pytest.raises(FileExistsError):
        train(tiny_config(resumed, bank_cache, total_steps=8))


@pytest.mark.slow
def test_crash_mid_run_then_resume_loses_at_most_one_checkpoint_interval(tmp_path: Path, bank_cache: str) -> None:
    class Crash(RuntimeError):
        pass

    def crash_after_step_7(step: int, total: int, preview) -> None:
        if step == 7:
            raise Crash("simulated kill")

    config = tiny_config(tmp_path, bank_cache, total_steps=10, log_every=1)
    with pytest.raises(Crash):
        train(config, progress=crash_after_step_7)
    run = RunFolder(tmp_path)
    assert run.status()["state"] == "failed"
    assert run.latest_checkpoint().name == "step_0000004.pt"  # 7 - 4 <= checkpoint_every
    assert metric_steps(tmp_path) == list(range(1, 8))

    seen: list[int] = []
    train(dataclasses.replace(config, resume=True), progress=lambda s, t, p: seen.append(s))
    assert seen[0] == 5  # restarted right after the checkpoint
    assert metric_steps(tmp_path) == list(range(1, 11))  # rows 5..7 of the crashed run replaced
    assert run.status()["state"] == "finished"


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_stops(tmp_path: Path, bank_cache: str) -> None:
    def term_at_step_3(step: int, total: int, preview) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    train(tiny_config(tmp_path, bank_cache, total_steps=20), progress=term_at_step_3)
    run = RunFolder(tmp_path)
    assert run.status()["state"] == "stopped" and run.status()["step"] == 3
    assert run.latest_checkpoint().name == "step_0000003.pt"
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back


@pytest.mark.slow
def test_sigkill_of_the_cli_then_resume(tmp_path: Path, bank_cache: str) -> None:
    out_dir = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in TINY.items()] + [
        f"--out_dir={out_dir}", f"--bank_cache={bank_cache}", "--total_steps=100000", "--checkpoint_every=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.training.train_stylegan2", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = RunFolder(out_dir)
    try:
        deadline = time.time() + 40
        while time.time() < deadline and (not (out_dir / "checkpoints").is_dir() or len(run.checkpoints()) < 2):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    ckpts = run.checkpoints()
    assert ckpts, "no checkpoint appeared within 40 s"
    ckpt_step = int(ckpts[-1].stem.split("_")[1])
    logged = metric_steps(out_dir)
    assert logged and max(logged) - ckpt_step <= 2 + 1  # at most one interval (plus the step in flight)

    config = StyleGAN2TrainConfig(out_dir=str(out_dir), bank_cache=bank_cache,
                                  **{**TINY, "total_steps": ckpt_step + 3, "checkpoint_every": 2}, resume=True)
    seen: list[int] = []
    train(config, progress=lambda s, t, p: seen.append(s))
    assert seen == [ckpt_step + 1, ckpt_step + 2, ckpt_step + 3]
    steps = metric_steps(out_dir)
    assert steps == sorted(set(steps)) and steps[-1] == ckpt_step + 3


@pytest.mark.slow
def test_time_limit_stops_early_and_still_exports(tmp_path: Path, bank_cache: str) -> None:
    out = train(tiny_config(tmp_path, bank_cache, total_steps=10_000, max_train_minutes=0.5 / 60))
    status = RunFolder(tmp_path).status()
    assert status["state"] == "finished" and status["time_limit_hit"] and 0 < status["step"] < 10_000
    assert (out / "model.safetensors").is_file()
    assert RunFolder(tmp_path).latest_checkpoint().name == f"step_{status['step']:07d}.pt"


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path: Path, bank_cache: str) -> None:
    """The self-filtering retrain: weights and p from the raw run, fresh step count and optimisers."""
    raw = tmp_path / "raw"
    train(tiny_config(raw, bank_cache, total_steps=4))
    source = RunFolder(raw).load_checkpoint()
    exclude = tmp_path / "exclude.json"
    exclude.write_text("[0, 1, 2]")
    retrain = tmp_path / "retrain"
    cfg = tiny_config(retrain, bank_cache, total_steps=2, init_from=str(raw), exclude_file=str(exclude),
                      lr_g=1e-12, lr_d=1e-12, log_every=1)
    train(cfg)
    assert metric_steps(retrain) == [1, 2]
    after = RunFolder(retrain).load_checkpoint()
    assert int(after["step"]) == 2
    # with a vanishing learning rate the weights stay those of the source run (w_avg, a running
    # mean of the mapping outputs, keeps moving)
    for name, tensor in source["G"].items():
        if name.endswith("w_avg"):
            continue
        assert torch.allclose(tensor, after["G"][name], atol=1e-6), name
    with pytest.raises(ValueError, match="init_from"):
        validate_config(tiny_config(tmp_path / "x", bank_cache, init_from=str(tmp_path / "missing")))
    wrong = tiny_config(tmp_path / "wrong", bank_cache, total_steps=1, init_from=str(raw), channel_max=16)
    with pytest.raises(ValueError, match="does not fit"):
        train(wrong)
