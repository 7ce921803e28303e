"""Safe import of official StyleGAN2-ADA snapshots, conversion to safetensors, and bad inputs."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from models.stylegan2 import Discriminator, Generator
from pipelines.stylegan_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    convert_pickle,
    load_generator,
    load_official_pickle,
    main,
    save_generator,
)
from tests._fixtures import shared_fixture_dir

ATOL = 1e-4  # measured: 0 (bit-identical on the CPU)
SNAPSHOT = "uncond_snapshot_placeholder_src.pkl"


@pytest.fixture(scope="module")
def fixtures() -> Path:
    return shared_fixture_dir()


@pytest.fixture(scope="module")
def snapshot(fixtures: Path) -> dict:
    return load_official_pickle(fixtures / SNAPSHOT)


@pytest.fixture(scope="module")
def uncond_io(fixtures: Path) -> dict[str, torch.Tensor]:
    return load_file(fixtures / "uncond_io.safetensors")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
def assert_reproduces(G: Generator, io: dict[str, torch.Tensor]) -> None:
    z, c = io["z"], io["c"]
    assert max_diff(G.mapping(z, c), io["ws"]) <= ATOL
    assert max_diff(G.mapping(z, c, truncation_psi=0.7), io["ws_psi07"]) <= ATOL
    assert max_diff(G.synthesis(io["ws"], noise_mode="const"), io["img_noise_const"]) <= ATOL
    assert max_diff(G.synthesis(io["ws"], noise_mode="none"), io["img_noise_none"]) <= ATOL
    assert max_diff(G(z, c, truncation_psi=0.7, noise_mode="const"), io["img_psi07_const"]) <= ATOL


# ---------------------------------------------------------------------------------------------
# Writing snapshots in the official format (for fakes and hostile files)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def official_modules(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Stand-ins for the official ``torch_utils.persistence`` and ``dnnlib.util`` modules, so that
    the test can pickle objects that refer to those globals exactly as a real snapshot does."""

    def _reconstruct_persistent_obj(meta):  # never called: loading goes through the studio
        raise AssertionError("the official reconstruct function must not be called")

    class EasyDict(dict):
        pass

    modules = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": types.ModuleType("torch_utils.persistence"),
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": types.ModuleType("dnnlib.util"),
    }
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    modules["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    modules["dnnlib.util"].EasyDict = EasyDict
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)


class Persistent:
    """Pickles like an official persistent object: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, reconstruct, class_name: str, state: dict, module_src: str) -> None:
        self.reconstruct = reconstruct
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return (self.reconstruct, (self.meta,))


PLACEHOLDER_SRC = "raise RuntimeError('embedded module source was executed')\n"


def as_persistent(module: nn.Module, mods: types.SimpleNamespace, init_args=(), init_kwargs=None) -> Persistent:
    """An official-format record tree of a studio module (state = the module's __dict__)."""
    state = {k: v for k, v in module.__dict__.items() if k not in ("_init_kwargs",)}
    state["_modules"] = OrderedDict((name, as_persistent(child, mods)) for name, child in module._modules.items())
    state["_init_args"] = tuple(init_args)
    state["_init_kwargs"] = mods.EasyDict(init_kwargs or {})
    return Persistent(mods.reconstruct, type(module).__name__, state, PLACEHOLDER_SRC)


def write_pickle(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


# ---------------------------------------------------------------------------------------------
# The official snapshot
# ---------------------------------------------------------------------------------------------


def test_snapshot_reproduces_reference_outputs(snapshot: dict, uncond_io: dict) -> None:
    assert set(snapshot) == {"G", "D", "G_ema", "training_set_kwargs"}
    assert isinstance(snapshot["G_ema"], Generator) and isinstance(snapshot["D"], Discriminator)
    assert snapshot["training_set_kwargs"]["resolution"] == 32
    assert_reproduces(snapshot["G_ema"], uncond_io)
    with torch.no_grad():
        logits = snapshot["D"](uncond_io["img_noise_const"], uncond_io["c"])
    assert max_diff(logits, uncond_io["d_logits"]) <= ATOL


def test_snapshot_init_kwargs_are_the_official_ones(snapshot: dict, fixtures: Path) -> None:
    kwargs = json.loads((fixtures / "uncond_kwargs.json").read_text())
    assert snapshot["G_ema"].init_kwargs == kwargs["G_init_kwargs"]
    D_kwargs = snapshot["D"].init_kwargs
    assert {k: D_kwargs[k] for k in kwargs["D_init_kwargs"]} == kwargs["D_init_kwargs"]


def test_convert_round_trip_is_exact(tmp_path: Path, fixtures: Path, snapshot: dict, uncond_io: dict) -> None:
    out = convert_pickle(fixtures / SNAPSHOT, tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["architecture"] == "stylegan2-ada"
    assert config["init_kwargs"] == snapshot["G_ema"].init_kwargs

    ws = uncond_io["ws"]
    with torch.no_grad():
        expected = snapshot["G_ema"].synthesis(ws, noise_mode="const")
        for source in (out, out / WEIGHTS_NAME, fixtures / SNAPSHOT):
            G = load_generator(source)
            assert not G.training
            assert torch.equal(G.synthesis(ws, noise_mode="const"), expected), source
    assert_reproduces(load_generator(out), uncond_io)


def test_fp16_save_is_close(tmp_path: Path, snapshot: dict, uncond_io: dict) -> None:
    out = save_generator(snapshot["G_ema"], tmp_path / "half", fp16=True)
    assert load_file(out / WEIGHTS_NAME)["synthesis.b4.const"].dtype == torch.float16
    G = load_generator(out)
    assert G.synthesis.b4.const.dtype == torch.float32
    with torch.no_grad():
        img = G.synthesis(uncond_io["ws"], noise_mode="const")
    assert max_diff(img, uncond_io["img_noise_const"]) < 0.05


def test_cli_converts(tmp_path: Path, fixtures: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", str(fixtures / SNAPSHOT), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / WEIGHTS_NAME).is_file()
    assert "32px" in capsys.readouterr().out
    (tmp_path / "bad.pkl").write_bytes(b"hello")
    assert main(["convert", str(tmp_path / "bad.pkl"), str(tmp_path / "never")]) == 1
    assert "not a pickle" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_official_format_with_easydict_and_labels(tmp_path: Path, fixtures: Path, official_modules) -> None:
    """A conditional snapshot written the official way (EasyDict kwargs, positional init args)."""
    kwargs = json.loads((fixtures / "cond_kwargs.json").read_text())
    G = Generator(**kwargs["G_init_kwargs"])
    G.load_state_dict(load_file(fixtures / "cond_G.safetensors"))
    g_kwargs = dict(kwargs["G_init_kwargs"])
    g_args = [g_kwargs.pop(k) for k in ("z_dim", "c_dim")]  # as if passed positionally
    g_kwargs["mapping_kwargs"] = official_modules.EasyDict(g_kwargs["mapping_kwargs"])
    D = Discriminator(**kwargs["D_init_kwargs"])
    D.load_state_dict(load_file(fixtures / "cond_D.safetensors"))
    snapshot = {
        "G_ema": as_persistent(G, official_modules, g_args, g_kwargs),
        "D": as_persistent(D, official_modules, (), kwargs["D_init_kwargs"]),
        "training_set_kwargs": official_modules.EasyDict(resolution=32, use_labels=True),
    }
    loaded = load_official_pickle(write_pickle(tmp_path / "cond.pkl", snapshot))
    assert loaded["training_set_kwargs"] == {"resolution": 32, "use_labels": True}
    assert loaded["G_ema"].init_kwargs == kwargs["G_init_kwargs"]
    io = load_file(fixtures / "cond_io.safetensors")
    assert_reproduces(loaded["G_ema"], io)
    with torch.no_grad():
        assert max_diff(loaded["D"](io["img_noise_const"], io["c"]), io["d_logits"]) <= ATOL


# ---------------------------------------------------------------------------------------------
# Hostile and broken files
# ---------------------------------------------------------------------------------------------


class ShellPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_exec_payload_is_live_with_plain_pickle(tmp_path: Path) -> None:
    """Control: the payload used below really runs under an ordinary unpickler."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(ExecPayload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("payload", [ShellPayload, ExecPayload])
@pytest.mark.parametrize("wrap", ["bare", "inside_snapshot"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, payload: type, wrap: str) -> None:
    marker = tmp_path / "pwned"
    evil = payload(marker)
    obj = evil if wrap == "bare" else {"G": None, "training_set_kwargs": {"path": evil}}
    path = write_pickle(tmp_path / "evil.pkl", obj)
    with pytest.raises(CheckpointError, match=r"refuses global .*(system|exec).*may be malicious"):
        load_official_pickle(path)
    with pytest.raises(CheckpointError, match="malicious"):
        load_generator(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_nested_storage_bytes_cannot_smuggle_code(tmp_path: Path) -> None:
    """``torch.storage._load_from_bytes`` is allowed, but its bytes are read weights-only."""
    marker = tmp_path / "pwned"

    class SmuggledStorage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (pickle.dumps(ExecPayload(marker)),))

    path = write_pickle(tmp_path / "smuggle.pkl", {"G_ema": SmuggledStorage()})
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_official_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("fraction", [0.001, 0.5, 0.999])
def test_truncated_pickle(tmp_path: Path, fixtures: Path, fraction: float) -> None:
    data = (fixtures / SNAPSHOT).read_bytes()
    path = tmp_path / "truncated.pkl"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_official_pickle(path)


@pytest.mark.parametrize("keep", [4, 200, -1000])
def test_truncated_safetensors(tmp_path: Path, snapshot: dict, keep: int) -> None:
    out = save_generator(snapshot["G_ema"], tmp_path / "model")
    weights = out / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_generator(out)


def test_safetensors_without_config(tmp_path: Path, snapshot: dict) -> None:
    out = save_generator(snapshot["G_ema"], tmp_path / "model")
    (out / CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_generator(out / WEIGHTS_NAME)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b"this is not a checkpoint at all\n", "not a pickle"),
        (bytes(range(256)) * 8, "not a pickle"),
        (b"PK\x03\x04" + b"\0" * 64, "zip archive"),
    ],
)
def test_garbage_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_official_pickle(path)
    with pytest.raises(CheckpointError, match=message):
        load_generator(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_generator(tmp_path / "nowhere.pkl")


def test_plain_pickle_that_is_not_a_snapshot(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "list.pkl", [1, 2, 3])
    with pytest.raises(CheckpointError, match="not a StyleGAN2-ADA snapshot"):
        load_official_pickle(path)


def _fake_generator(mods: types.SimpleNamespace, synthesis_children: dict[str, str], src: str) -> Persistent:
    def record(class_name: str, children: dict | None = None) -> Persistent:
        state = {"_parameters": OrderedDict(), "_buffers": OrderedDict(), "_modules": OrderedDict(children or {})}
        return Persistent(mods.reconstruct, class_name, state, src)

    synthesis = record("SynthesisNetwork", {k: record(v) for k, v in synthesis_children.items()})
    G = record("Generator", {"synthesis": synthesis, "mapping": record("MappingNetwork")})
    G.meta["state"]["_init_kwargs"] = mods.EasyDict(z_dim=512, c_dim=0, w_dim=512, img_resolution=1024, img_channels=3)
    return G


def test_stylegan3_snapshot_is_not_supported(tmp_path: Path, official_modules) -> None:
    src = "class SynthesisInput(torch.nn.Module):\n    pass\n" + PLACEHOLDER_SRC
    G = _fake_generator(official_modules, {"input": "SynthesisInput", "L0_36_512": "SynthesisLayer"}, src)
    path = write_pickle(tmp_path / "stylegan3-t.pkl", {"G": G, "D": None, "G_ema": G})
    with pytest.raises(CheckpointError, match="StyleGAN3 snapshots are not supported"):
        load_official_pickle(path)
    with pytest.raises(CheckpointError, match="StyleGAN3 snapshots are not supported"):
        convert_pickle(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_is_not_supported(tmp_path: Path, official_modules) -> None:
    G = _fake_generator(official_modules, {"b4": "SuperResolutionBlock"}, PLACEHOLDER_SRC)
    path = write_pickle(tmp_path / "other.pkl", {"G_ema": G})
    with pytest.raises(CheckpointError, match="not a StyleGAN2-ADA snapshot.*SuperResolutionBlock"):
        load_official_pickle(path)


def test_mismatched_tensors_are_reported(tmp_path: Path, official_modules) -> None:
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3,
                  mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=64, channel_max=8))
    claimed = dict(G.init_kwargs, img_resolution=16)  # the tensors are those of an 8 px network
    path = write_pickle(tmp_path / "mismatch.pkl", {"G_ema": as_persistent(G, official_modules, (), claimed)})
    with pytest.raises(CheckpointError, match="do not match a StyleGAN2-ADA Generator"):
        load_official_pickle(path)
