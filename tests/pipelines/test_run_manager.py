"""The run manager with a stand-in script: launch, queue, watch, cancel, SIGKILL + resume,
rediscovery by a new manager, refusals."""

import os
import signal
import time

import pytest

from pipelines.run_manager import METHODS, MethodSpec, RunError, RunManager, build_config

FAKE = MethodSpec(key="fake", label="Fake", module="tests._fake_train", config="tests._fake_train:FakeConfig",
                  produces="fake", export="model", steps_field="steps",
                  presets={"quick demo": {"steps": 6, "step_seconds": 0.02}})


# a part of a generator (as the inversion encoder, the sketch encoder and the CLIP mapper are)
PART = MethodSpec(key="part", label="Part", module="tests._fake_train", config="tests._fake_train:FakeConfig",
                  produces="fake_part", export="model", steps_field="steps", base_field="generator",
                  attaches_to="encoder", presets={"quick demo": {"steps": 3, "step_seconds": 0.01}})


def manager(tmp_path, **kw):
    return RunManager(tmp_path / "runs", methods={"fake": FAKE, "part": PART}, nice=0, **kw)


def wait_for(fn, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_launch_runs_to_the_end_and_reports_progress(tmp_path):
    m = manager(tmp_path)
    name = m.launch("fake", {}, preset="quick demo", name="first")
    info = wait_for(lambda: (i := m.info(name)).state == "finished" and i)
    assert info.step == info.total == 6 and info.export.endswith("model")
    assert [r["step"] for r in info.metrics] == [1, 2, 3, 4, 5, 6]
    assert "done" in info.log_tail
    with pytest.raises(RunError, match="already holds a run"):
        m.launch("fake", {}, name="first")
    with pytest.raises(RunError, match="finished"):
        m.resume("first")


@pytest.mark.parametrize("params,fragment", [
    ({"steps": 0}, "steps must be positive"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"lr": float("nan")}, "finite"),
    ({"wings": 2}, "no setting"),
])
def test_invalid_settings_are_refused_before_launch(tmp_path, params, fragment):
    m = manager(tmp_path)
    with pytest.raises(RunError, match=fragment):
        m.launch("fake", params, name="bad")
    assert not (tmp_path / "runs" / "bad").exists()


def test_unknown_method_preset_and_bad_names(tmp_path):
    m = manager(tmp_path)
    with pytest.raises(RunError, match="unknown method"):
        m.launch("dreambooth", {})
    with pytest.raises(RunError, match="unknown preset"):
        m.launch("fake", {}, preset="huge")
    with pytest.raises(RunError, match="folder name"):
        m.launch("fake", {}, name="../escape")


def test_runs_queue_when_every_slot_is_busy(tmp_path):
    m = manager(tmp_path, slots=1)
    a = m.launch("fake", {"steps": 40, "step_seconds": 0.05}, name="a")
    b = m.launch("fake", {"steps": 3, "step_seconds": 0.01}, name="b")
    assert m.info(a).state == "running" and m.info(b).state == "queued"
    wait_for(lambda: m.poll() or m.info(b).state == "finished", timeout=90)
    assert m.info(a).state == "finished"


def test_cancel_checkpoints_and_resume_continues(tmp_path):
    m = manager(tmp_path)
    name = m.launch("fake", {"steps": 400, "step_seconds": 0.02, "checkpoint_every": 1000}, name="c")
    wait_for(lambda: m.info(name).step >= 5)
    m.cancel(name)
    info = m.info(name)
    assert info.state == "cancelled" and info.step >= 5
    m.resume(name)
    wait_for(lambda: m.info(name).state == "running")
    wait_for(lambda: m.info(name).step > info.step)
    m.cancel(name)


def test_sigkill_then_a_new_manager_finds_the_run_interrupted_and_resumes_it(tmp_path):
    m = manager(tmp_path)
    name = m.launch("fake", {"steps": 60, "step_seconds": 0.03, "checkpoint_every": 5}, name="k")
    wait_for(lambda: m.info(name).step >= 12)
    pid = m._read(tmp_path / "runs" / name / "launch.json")["pid"]
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: m.poll() or m.info(name).state == "interrupted")
    killed_at = m.info(name).step

    fresh = manager(tmp_path)  # the app restarted: everything comes from the folders
    assert fresh.names() == [name] and fresh.info(name).state == "interrupted"
    with pytest.raises(RunError, match="is not running"):
        fresh.cancel(name)
    fresh.resume(name)
    info = wait_for(lambda: (i := fresh.info(name)).state == "finished" and i, timeout=90)
    steps = [r["step"] for r in info.metrics]
    assert steps == list(range(1, 61))  # each step logged once: redone steps replaced
    lost = killed_at - (killed_at // 5) * 5
    assert lost < 5
    assert "resumed at step" in info.log_tail or "resumed" in (tmp_path / "runs" / name / "log.txt").read_text()


def test_a_crashing_run_shows_failed_with_its_last_log_lines(tmp_path):
    m = manager(tmp_path)
    name = m.launch("fake", {"steps": 20, "fail_at": 7, "checkpoint_every": 5}, name="boom")
    info = wait_for(lambda: (i := m.info(name)).state == "failed" and i)
    assert "exploded at step 7" in info.error and "RuntimeError" in info.log_tail
    assert (tmp_path / "runs" / name / "checkpoints" / "step_0000005.pt").is_file()


def test_every_method_preset_builds_a_valid_config(tmp_path):
    for spec in METHODS.values():
        for preset, params in spec.presets.items():
            values = dict(params)
            if spec.base_field:
                values[spec.base_field] = str(tmp_path)  # exists; the scripts check files later
            try:
                build_config(spec, values, tmp_path / "out")
            except RunError as exc:
                if spec.base_field and "does not exist" not in str(exc) and "not a" not in str(exc):
                    raise


def test_estimate_probes_the_first_steps_and_extrapolates(tmp_path):
    m = manager(tmp_path)
    est = m.estimate("fake", {"steps": 1000, "step_seconds": 0.1, "startup_seconds": 0.5, "memory_mb": 150},
                     probe_steps=5)
    assert est.steps == 1000 and est.probe_steps == 5
    assert 0.08 <= est.seconds_per_step <= 0.3, est
    assert est.startup_seconds >= 0.4, est
    assert 0.9 * 100 <= est.total_seconds <= 0.3 * 1000 + 30, est
    assert est.peak_host_mb >= 150 and est.peak_cuda_mb is None
    assert "min" in est.summary() and "GB host" in est.summary()
    # the probe leaves nothing behind: no run, no scratch folder
    assert m.names() == [] and list((tmp_path / "runs").iterdir()) == []


def test_estimate_refuses_bad_settings_and_reports_a_failing_probe(tmp_path):
    m = manager(tmp_path)
    with pytest.raises(RunError, match="lr"):
        m.estimate("fake", {"lr": -1.0})
    with pytest.raises(RunError, match=r"(?s)probe of Fake failed.*RuntimeError: exploded at step 2"):
        m.estimate("fake", {"steps": 100, "fail_at": 2})
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_trained_part_is_served_inside_a_copy_of_its_base_generator(tmp_path):
    base = tmp_path / "gen"
    (base / "encoder").mkdir(parents=True)
    (base / "sketch_encoder").mkdir()
    (base / "config.json").write_text('{"architecture": "stylegan2-ada"}')
    (base / "model.safetensors").write_bytes(b"weights")
    (base / "encoder" / "old.txt").write_text("the base's own encoder")
    (base / "sketch_encoder" / "config.json").write_text("{}")
    m = manager(tmp_path)
    plain = m.launch("fake", {}, preset="quick demo", name="plain")
    name = m.launch("part", {"generator": str(base)}, preset="quick demo", name="enc")
    broken = m.launch("part", {"generator": str(base), "fail_at": 2}, preset="quick demo", name="broken")
    done = (lambda n, state="finished": m.poll() or m.info(n).state == state)
    wait_for(lambda: done(plain) and done(name) and done(broken, "failed"))
    with pytest.raises(RunError, match="broken is failed; only a finished run can be used"):
        m.servable(broken)
    assert m.servable(plain) == tmp_path / "runs" / "plain" / "model"          # a whole model: served as is

    bundle = m.servable(name)
    assert bundle == tmp_path / "runs" / "enc" / "with_generator"
    assert (bundle / "model.safetensors").read_bytes() == b"weights"           # the base generator ...
    assert (bundle / "sketch_encoder" / "config.json").is_file()                # ... with its other parts
    assert not (bundle / "encoder" / "old.txt").exists()                        # ... but the trained encoder
    assert (bundle / "encoder" / "value.txt").read_text() == (tmp_path / "runs" / "enc" / "model" / "value.txt"
                                                              ).read_text()
    assert (base / "encoder" / "old.txt").exists()                             # the base is untouched
    stamp = (bundle / "config.json").stat().st_mtime_ns
    assert m.servable(name) == bundle and (bundle / "config.json").stat().st_mtime_ns == stamp   # made once

    # the base gone and no copy yet: a message, not a traceback
    gone = m.launch("part", {"generator": str(base)}, preset="quick demo", name="enc2")
    wait_for(lambda: done(gone))
    import shutil
    shutil.rmtree(base)
    with pytest.raises(RunError, match="no longer exists"):
        m.servable(gone)
    assert not (tmp_path / "runs" / "enc2" / "with_generator").exists()


def test_a_tiny_autoencoder_run_is_served_inside_a_copy_of_its_base_pipeline(tmp_path):
    import json

    base = tmp_path / "teacher"
    for sub in ("unet", "vae", "scheduler"):
        (base / sub).mkdir(parents=True)
        (base / sub / "config.json").write_text(json.dumps({"_class_name": f"{sub} class"}))
    index = {"_class_name": "PortraitDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (base / "model_index.json").write_text(json.dumps(index))
    vae_part = MethodSpec(key="vae_part", label="VAE part", module="tests._fake_train",
                          config="tests._fake_train:FakeConfig", produces="text_to_image", export="model",
                          steps_field="steps", base_field="generator", attaches_to="vae",
                          presets={"quick demo": {"steps": 3, "step_seconds": 0.01}})
    m = RunManager(tmp_path / "runs", methods={"vae_part": vae_part}, nice=0)
    name = m.launch("vae_part", {"generator": str(base)}, preset="quick demo", name="tiny")
    wait_for(lambda: m.poll() or m.info(name).state == "finished")
    export = tmp_path / "runs" / "tiny" / "model"
    (export / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))

    bundle = m.servable(name)
    assert bundle == tmp_path / "runs" / "tiny" / "with_pipeline"
    assert json.loads((bundle / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderTiny"]
    assert json.loads((bundle / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    assert (bundle / "unet" / "config.json").is_file() and (bundle / "scheduler" / "config.json").is_file()
    assert json.loads((base / "model_index.json").read_text())["vae"][1] == "AutoencoderKL"   # base untouched
    assert m.servable(name) == bundle


def test_a_hub_teacher_id_passes_the_launch_check_and_an_uncached_one_is_refused_with_the_reason(tmp_path,
                                                                                                monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = RunManager(tmp_path / "runs", nice=0)
    with pytest.raises(RunError, match="not in the local|not cached|cache"):
        m.launch("dmd2_hub", {"teacher": "nobody-here/no-such-model"}, preset="quick demo", name="hub")
    with pytest.raises(RunError, match="not in the local|not cached|cache"):      # the estimate checks the same
        m.estimate("dmd2_hub", {"teacher": "nobody-here/no-such-model"}, preset="quick demo")
    with pytest.raises(RunError, match="does not exist"):
        m.launch("dmd2", {"teacher": "nobody-here/no-such-model"}, preset="quick demo", name="local")
    assert not (tmp_path / "runs" / "hub").exists() and not (tmp_path / "runs" / "local").exists()


def test_settings_whose_estimate_exceeds_the_free_memory_are_refused_at_launch(tmp_path, monkeypatch):
    from pipelines import run_manager

    m = manager(tmp_path)
    big = {"steps": 50, "memory_mb": 200}
    monkeypatch.setattr(run_manager, "_free_memory_mb", lambda: (150.0, None))    # a small machine
    est = m.estimate("fake", big, probe_steps=3)
    assert est.peak_host_mb >= 200 and "GB of host memory" in est.memory_problem()
    assert "Too big for this machine" in est.summary()
    with pytest.raises(RunError, match=r"would not fit: it needs about 0\.\d+ GB of host memory .* lower the batch"):
        m.launch("fake", big, name="big")
    assert not (tmp_path / "runs" / "big").exists()
    # smaller settings, estimated again, fit and launch
    monkeypatch.setattr(run_manager, "_free_memory_mb", lambda: (4096.0, None))
    assert m.estimate("fake", {"steps": 50, "memory_mb": 20}, probe_steps=3).memory_problem() is None
    assert m.launch("fake", {"steps": 50, "memory_mb": 20}, name="small") == "small"
