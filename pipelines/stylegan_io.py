"""Read official StyleGAN2-ADA ``.pkl`` snapshots safely; save and load the studio's generators.

An official snapshot (NVlabs/stylegan2-ada-pytorch) is a pickle whose networks carry the Python
source of their module, which NVIDIA's loader executes. :class:`RestrictedUnpickler` never does:
it resolves only the handful of globals a snapshot needs, turns every persistent network into an
inert :class:`PersistentRecord` (class name + state), and the loader then rebuilds the studio's own
:class:`~models.stylegan2.Generator` / :class:`~models.stylegan2.Discriminator` from the recorded
constructor arguments and tensors. A generator is converted once to ``model.safetensors`` +
``config.json``::

    python -m pipelines.stylegan_io convert network-snapshot.pkl assets/my_stylegan2

    G = load_generator("assets/my_stylegan2")            # folder, .safetensors or official .pkl
    img = G(z, c, truncation_psi=0.7, noise_mode="const")  # [B, 3, R, R] in about [-1, 1]

Every failure is a :class:`CheckpointError` whose message says what is wrong with which file.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import io
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
from torch import nn

from models.stylegan2 import Discriminator, Generator

__all__ = [
    "ARCHITECTURE",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "EasyDict",
    "PersistentRecord",
    "RestrictedUnpickler",
    "load_official_pickle",
    "save_generator",
    "load_generator",
    "convert_pickle",
    "main",
]

ARCHITECTURE = "stylegan2-ada"  # the "architecture" field of config.json
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Class names of the persistent objects in a StyleGAN2-ADA snapshot (training/networks.py and
# training/augment.py of the official code).
_STYLEGAN2_CLASSES = frozenset({
    "Generator", "MappingNetwork", "FullyConnectedLayer", "SynthesisNetwork", "SynthesisBlock",
    "SynthesisLayer", "ToRGBLayer", "Conv2dLayer", "Discriminator", "DiscriminatorBlock",
    "DiscriminatorEpilogue", "MinibatchStdLayer", "AugmentPipe",
})
# Classes that exist only in StyleGAN3 (training/networks_stylegan3.py).
_STYLEGAN3_CLASSES = frozenset({"SynthesisInput"})


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted, unsafe or of an unsupported kind."""


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a plain dict that also allows attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


@dataclass(frozen=True)
class PersistentRecord:
    """An official persistent network object, read as data instead of being rebuilt.

    ``state`` is the module's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``,
    ``_init_args``, ``_init_kwargs``, ...); ``source_classes`` are the class names that the
    embedded module source defines, found by a regular expression (the source is never run).
    """

    class_name: str
    state: dict[str, Any]
    version: Any = None
    source_classes: frozenset[str] = field(default_factory=frozenset)

    def __setstate__(self, state: Any) -> None:  # a snapshot never BUILDs on a persistent object
        raise CheckpointError("malformed snapshot: unexpected state update on a persistent object")


def _persistent_record(meta: Any) -> PersistentRecord:
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: returns the record
    and ignores ``module_src`` except for listing the class names it defines."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise CheckpointError("malformed snapshot: a persistent object lacks its class name or state")
    src = meta.get("module_src")
    classes = frozenset(re.findall(r"^class\s+(\w+)", src, flags=re.MULTILINE)) if isinstance(src, str) else frozenset()
    return PersistentRecord(
        class_name=str(meta.get("class_name")),
        state=dict(meta["state"]),
        version=meta.get("version"),
        source_classes=classes,
    )


def _load_storage_bytes(data: bytes) -> Any:
    """Replacement for ``torch.storage._load_from_bytes``: the same bytes, read by PyTorch's
    weights-only unpickler (which refuses code) and mapped to the CPU."""
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("malformed snapshot: a tensor storage is not a byte string")
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises several types for bad or unsafe bytes
        raise CheckpointError(f"a tensor storage inside the snapshot cannot be read safely ({exc})") from exc


def _numpy_scalar() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


# (module, name) -> a function returning the object the unpickler may use for that global.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): lambda: _persistent_record,
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("torch._utils", "_rebuild_parameter"): lambda: torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): lambda: torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): lambda: _load_storage_bytes,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("dnnlib.util", "EasyDict"): lambda: EasyDict,
    ("dnnlib", "EasyDict"): lambda: EasyDict,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals an official StyleGAN2-ADA snapshot needs.

    Any other global (``os.system``, ``builtins.exec``, ...) stops loading with a
    :class:`CheckpointError` before it is called; persistent networks become
    :class:`PersistentRecord` objects; no embedded source is executed.
    """

    def __init__(self, file: BinaryIO, *, source: str = "the file") -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is not None:
            return factory()
        if module.startswith("dnnlib.tflib"):
            raise CheckpointError(
                f"{self._source} is a TensorFlow-era StyleGAN/StyleGAN2 snapshot, which is not supported; "
                "convert it to a PyTorch snapshot with legacy.py of NVlabs/stylegan2-ada-pytorch first"
            )
        raise CheckpointError(
            f"{self._source} refuses global {module}.{name}: official StyleGAN2-ADA snapshots never need it; "
            "the file may be malicious, so nothing in it was run"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            f"{self._source} uses persistent ids (it looks like a torch.save checkpoint), "
            "not the format of an official StyleGAN2-ADA snapshot"
        )


# ---------------------------------------------------------------------------------------------
# Official snapshot -> studio networks
# ---------------------------------------------------------------------------------------------


def _sniff(path: Path) -> None:
    """Reject missing, empty and obviously non-pickle files with a precise message."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not an official StyleGAN2-ADA snapshot (.pkl)")
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path} is empty")
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointError(
            f"{path} is a zip archive (a torch.save checkpoint?), not an official StyleGAN2-ADA snapshot (.pkl)"
        )
    if head[0] != 0x80:  # pickle protocol >= 2 starts with PROTO
        if head[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
            raise CheckpointError(f"{path} looks like a safetensors file; load it with load_generator()")
        raise CheckpointError(f"{path} is not a pickle file; expected an official StyleGAN2-ADA snapshot (.pkl)")


def _plain(value: Any) -> Any:
    """EasyDicts, tuples and numpy scalars -> plain JSON-friendly Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _walk(record: PersistentRecord, prefix: str = ""):
    """Yield ``(prefix, record)`` for a record and all its submodule records."""
    yield prefix, record
    for name, child in (record.state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise CheckpointError(f"malformed snapshot: submodule {prefix}{name} is a {type(child).__name__}")
        yield from _walk(child, f"{prefix}{name}.")


def _check_architecture(source: str, key: str, record: PersistentRecord) -> None:
    names = {r.class_name for _, r in _walk(record)}
    if names & _STYLEGAN3_CLASSES or record.source_classes & _STYLEGAN3_CLASSES:
        raise CheckpointError(
            f"StyleGAN3 snapshots are not supported ({source}, {key}: it has a SynthesisInput layer); "
            "the studio runs StyleGAN2-ADA networks only"
        )
    unknown = sorted(names - _STYLEGAN2_CLASSES)
    if unknown:
        raise CheckpointError(
            f"{source} is not a StyleGAN2-ADA snapshot: {key} contains classes the studio does not know "
            f"({', '.join(unknown[:8])})"
        )


def _state_dict(record: PersistentRecord) -> dict[str, torch.Tensor]:
    """The official ``state_dict()`` of a record tree: parameters and persistent buffers by name."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, rec in _walk(record):
        skip = rec.state.get("_non_persistent_buffers_set") or set()
        entries = list((rec.state.get("_parameters") or {}).items())
        entries += [(n, b) for n, b in (rec.state.get("_buffers") or {}).items() if n not in skip]
        for name, tensor in entries:
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"malformed snapshot: {prefix}{name} is a {type(tensor).__name__}, not a tensor")
            tensors[prefix + name] = tensor.detach()
    return tensors


def _build(source: str, key: str, record: PersistentRecord, cls: type[nn.Module]) -> nn.Module:
    """Construct the studio's ``cls`` from a record's constructor arguments and load its tensors."""
    if record.class_name != cls.__name__:
        raise CheckpointError(
            f"{source} is not a StyleGAN2-ADA snapshot: {key} is a {record.class_name}, expected {cls.__name__}"
        )
    _check_architecture(source, key, record)
    args = _plain(record.state.get("_init_args") or [])
    kwargs = _plain(record.state.get("_init_kwargs") or {})
    try:
        bound = inspect.signature(cls).bind(*args, **kwargs)
        net = cls(**bound.arguments)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{source}: the constructor arguments of {key} do not fit the studio's StyleGAN2-ADA {cls.__name__} ({exc})"
        ) from exc
    try:
        net.load_state_dict(_state_dict(record), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: the tensors of {key} do not match a StyleGAN2-ADA {cls.__name__}: {exc}") from exc
    return net.eval()


def load_official_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an official StyleGAN2-ADA training snapshot without running any of its code.

    Returns a dict with the keys present among ``G``, ``D``, ``G_ema`` (studio modules in eval mode,
    on the CPU, float32) and ``training_set_kwargs`` (a plain dict).
    Raises :class:`CheckpointError` for a missing, truncated, corrupted, malicious or unsupported file.
    """
    path = Path(path)
    _sniff(path)
    try:
        with path.open("rb") as f:
            data = RestrictedUnpickler(f, source=str(path)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # EOFError, UnpicklingError, struct/Value/TypeError from damaged bytes
        raise CheckpointError(f"{path} is truncated or corrupted ({type(exc).__name__}: {exc})") from exc

    if isinstance(data, PersistentRecord):  # a lone pickled network
        data = {"G_ema" if data.class_name == "Generator" else "D": data}
    if not isinstance(data, dict) or not any(isinstance(data.get(k), PersistentRecord) for k in ("G", "D", "G_ema")):
        raise CheckpointError(f"{path} is not a StyleGAN2-ADA snapshot: expected a dict with G, D and G_ema networks")

    result: dict[str, Any] = {}
    for key, cls in (("G", Generator), ("D", Discriminator), ("G_ema", Generator)):
        record = data.get(key)
        if record is None:
            continue
        if not isinstance(record, PersistentRecord):
            raise CheckpointError(f"{path} is not a StyleGAN2-ADA snapshot: {key} is a {type(record).__name__}")
        result[key] = _build(str(path), key, record, cls)
    if isinstance(data.get("training_set_kwargs"), dict):
        result["training_set_kwargs"] = _plain(data["training_set_kwargs"])
    return result


# ---------------------------------------------------------------------------------------------
# Studio format: model.safetensors + config.json
# ---------------------------------------------------------------------------------------------


def save_generator(G: Generator, folder: str | os.PathLike[str], *, fp16: bool = False) -> Path:
    """Write ``G`` as ``folder/model.safetensors`` + ``folder/config.json``; returns the folder.

    ``fp16=True`` stores floating-point tensors in half precision (half the size; the embedded
    assets use it); the default keeps float32, exact for converted checkpoints.
    """
    from safetensors.torch import save_file

    if not isinstance(G, Generator):
        raise TypeError(f"save_generator expects a models.stylegan2.Generator, got {type(G).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in G.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if fp16 and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        tensors[name] = tensor.contiguous().clone()
    config = {"architecture": ARCHITECTURE, "init_kwargs": G.init_kwargs}

    # Write next to the target, then rename, so an interrupted save never leaves a half file.
    weights_tmp = folder / (WEIGHTS_NAME + ".tmp")
    config_tmp = folder / (CONFIG_NAME + ".tmp")
    save_file(tensors, str(weights_tmp), metadata={"format": "pt", "architecture": ARCHITECTURE})
    config_tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.chmod(weights_tmp, config_tmp.stat().st_mode & 0o777)  # safetensors creates files owner-only
    os.replace(weights_tmp, folder / WEIGHTS_NAME)
    os.replace(config_tmp, folder / CONFIG_NAME)
    return folder


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a StyleGAN2 weights file needs its config.json beside it")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupted ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("init_kwargs"), dict):
        raise CheckpointError(f"{path} is not a studio StyleGAN2 config: it has no init_kwargs")
    if config.get("architecture") != ARCHITECTURE:
        raise CheckpointError(
            f"{path}: architecture {config.get('architecture')!r} is not supported; expected {ARCHITECTURE!r}"
        )
    return config


def load_generator(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Generator:
    """Load a generator from a studio folder, a ``.safetensors`` file (with ``config.json`` beside
    it) or an official ``.pkl`` snapshot (through the restricted loader; ``G_ema`` is used).

    Returns the generator in eval mode on ``device`` in ``dtype``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"{path} has no {WEIGHTS_NAME}; is it a studio StyleGAN2 folder?")
    else:
        weights = path

    if weights.suffix != ".safetensors":
        official = load_official_pickle(weights)
        G = official.get("G_ema", official.get("G"))
        if G is None:
            raise CheckpointError(f"{weights} holds no generator (neither G_ema nor G)")
        return G.to(device=device, dtype=dtype).eval()

    config = _read_config(weights.parent / CONFIG_NAME)
    try:
        G = Generator(**config["init_kwargs"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{weights.parent / CONFIG_NAME}: init_kwargs do not build a Generator ({exc})") from exc
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights} is truncated or corrupted ({exc})") from exc
    try:
        G.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match its config.json: {exc}") from exc
    return G.to(device=device, dtype=dtype).eval()


def convert_pickle(pkl_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, fp16: bool = False) -> Path:
    """Convert the generator (``G_ema``) of an official snapshot to a studio folder; returns it."""
    official = load_official_pickle(pkl_path)
    G = official.get("G_ema", official.get("G"))
    if G is None:
        raise CheckpointError(f"{pkl_path} holds no generator (neither G_ema nor G)")
    return save_generator(G, out_dir, fp16=fp16)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.stylegan_io convert IN.pkl OUT_DIR [--fp16]``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.stylegan_io",
        description="Convert official StyleGAN2-ADA snapshots (.pkl) without running their embedded code.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert an official .pkl snapshot to safetensors + config.json")
    convert.add_argument("pkl", type=Path, help="official StyleGAN2-ADA snapshot (.pkl)")
    convert.add_argument("out_dir", type=Path, help="folder to write model.safetensors and config.json into")
    convert.add_argument("--fp16", action="store_true", help="store the weights in half precision")
    args = parser.parse_args(argv)

    try:
        folder = convert_pickle(args.pkl, args.out_dir, fp16=args.fp16)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    kwargs = json.loads((folder / CONFIG_NAME).read_text())["init_kwargs"]
    print(
        f"wrote {folder / WEIGHTS_NAME} and {folder / CONFIG_NAME} "
        f"({kwargs['img_resolution']}px, z_dim={kwargs['z_dim']}, c_dim={kwargs['c_dim']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
