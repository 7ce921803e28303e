"""The registry's four sources: embedded assets, local folders, finished runs, hub ids."""

import json
import shutil
import time

import pytest
import torch

from models.stylegan2.networks import Generator
from pipelines.stylegan_io import save_generator
from studio.registry import (ASSETS_DIR, ModelRegistry, add_finished_runs, add_hub, add_local,
                             default_registry, detect_kind)


def test_detect_kind_from_the_files_savers_write(tmp_path):
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3,
                  mapping_kwargs={"num_layers": 1}, synthesis_kwargs={"channel_base": 64, "channel_max": 8})
    save_generator(G, tmp_path / "gen")
    assert detect_kind(tmp_path / "gen") == "stylegan2"
    (tmp_path / "diff").mkdir()
    (tmp_path / "diff" / "model_index.json").write_text("{}")
    assert detect_kind(tmp_path / "diff") == "text_to_image"
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "open_clip_config.json").write_text("{}")
    assert detect_kind(tmp_path / "clip") == "clip"
    assert detect_kind(ASSETS_DIR / "evaluator") == "evaluator"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a model folder"):
        detect_kind(tmp_path / "junk")
    with pytest.raises(ValueError, match="does not exist"):
        detect_kind(tmp_path / "missing")


def test_local_generator_folder_loads_through_the_registry(tmp_path):
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3,
                  mapping_kwargs={"num_layers": 1}, synthesis_kwargs={"channel_base": 64, "channel_max": 8})
    save_generator(G, tmp_path / "mygan")
    reg = ModelRegistry("cpu")
    spec = add_local(reg, tmp_path / "mygan")
    assert spec.kind == "stylegan2" and spec.source == "local"
    loaded = reg.get(spec.name)
    z = torch.randn(2, 8)
    assert torch.allclose(loaded(z, None, noise_mode="const"), G.eval()(z, None, noise_mode="const"), atol=1e-5)


def test_finished_runs_are_discovered_and_unfinished_ones_skipped(tmp_path):
    for name, state in (("done", "finished"), ("busy", "running")):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "status.json").write_text(json.dumps({"state": state}))
        shutil.copytree(ASSETS_DIR / "evaluator", run / "evaluator")
    reg = default_registry("cpu", runs_dir=tmp_path)
    run_models = [n for n in reg.names() if reg.spec(n).source == "run"]
    assert run_models == ["done/evaluator (run)"]
    assert reg.names("evaluator")[0] == "Portrait-world evaluator (embedded)"
    assert add_finished_runs(ModelRegistry("cpu"), tmp_path / "nothing-here") == []


def test_hub_id_is_registered_lazily_and_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reg = ModelRegistry("cpu")
    spec = add_hub(reg, "stabilityai/sd-turbo")
    assert spec.source == "hub" and not reg.is_loaded(spec.name)
    t0 = time.time()
    with pytest.raises(Exception, match="(?i)cache|offline"):
        reg.get(spec.name)
    assert time.time() - t0 < 30
    with pytest.raises(ValueError, match="unknown kind"):
        add_hub(reg, "x/y", kind="sound")
