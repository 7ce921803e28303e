"""The StyleGAN edit tab: generator import (safe pickle, safetensors pair, refusals) and the app wiring."""

import os
import pickle

import pytest
import torch

from models.stylegan2 import Generator
from pipelines.stylegan_io import save_generator
from studio.registry import ModelRegistry, add_local
from studio.tabs.stylegan_edit import EditorCache, import_generator
from tests._fixtures import shared_fixture_dir


def _tiny(tmp_path):
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3,
                  mapping_kwargs={"num_layers": 1}, synthesis_kwargs={"channel_base": 64, "channel_max": 8})
    return save_generator(G, tmp_path / "tiny")


def test_official_snapshot_imports_through_the_restricted_loader(tmp_path):
    reg = ModelRegistry("cpu")
    pkl = shared_fixture_dir() / "uncond_snapshot_placeholder_src.pkl"  # its embedded source raises if run
    name = import_generator(reg, [str(pkl)], tmp_path / "imported")
    assert name in reg.names("stylegan2")
    assert (tmp_path / "imported" / pkl.stem / "model.safetensors").is_file()
    editor = EditorCache(reg).get(name)
    assert editor.render(editor.sample(0)).size == (editor.G.img_resolution,) * 2


class _Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_malicious_and_wrong_files_are_refused_with_a_message(tmp_path):
    reg = ModelRegistry("cpu")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"G_ema": _Shell(marker)}))
    with pytest.raises(ValueError, match="malicious"):
        import_generator(reg, [str(evil)], tmp_path / "imported")
    assert not marker.exists() and reg.names("stylegan2") == []
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a generator file"):
        import_generator(reg, [str(text)], tmp_path / "imported")
    with pytest.raises(ValueError, match="choose"):
        import_generator(reg, [], tmp_path / "imported")


def test_safetensors_pair_imports_and_a_lone_or_truncated_one_is_refused(tmp_path):
    reg = ModelRegistry("cpu")
    folder = _tiny(tmp_path)
    with pytest.raises(ValueError, match="config.json"):
        import_generator(reg, [str(folder / "model.safetensors")], tmp_path / "imported")
    name = import_generator(reg, [str(folder / "model.safetensors"), str(folder / "config.json")],
                            tmp_path / "imported")
    assert reg.get(name).img_resolution == 8
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:200])
    (cut / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(ValueError, match="truncated or corrupted"):
        import_generator(reg, [str(cut / "model.safetensors"), str(cut / "config.json")], tmp_path / "imported")
    assert reg.names("stylegan2") == [name]  # the earlier import is kept


def test_app_shows_the_stylegan_tab_and_its_api(tmp_path):
    from studio.app import build_app

    reg = ModelRegistry("cpu")
    add_local(reg, _tiny(tmp_path), name="tiny")
    demo = build_app(registry=reg, runs_dir=str(tmp_path / "runs"))
    config = demo.get_config_file()
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    assert "StyleGAN edit" in labels
    api = {d.get("api_name") for d in config["dependencies"]}
    assert {"stylegan_sample", "stylegan_invert", "render_portrait"} <= api
