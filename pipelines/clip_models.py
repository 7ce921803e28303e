"""CLIP models for the studio: the embedded PortraitCLIP and hub models, all through open_clip.

The embedded CLIP is a small open_clip model whose config (``PortraitCLIP-RN-128``: a CLIP
ModifiedResNet taking the 64-px portraits upsampled to 128 px, and a 3-layer text transformer,
sized to train on a 2-core CPU; ``PortraitCLIP-RN-64`` is its first training leg's 64-px input,
``PortraitCLIP-ViT-T-64`` a ViT-T alternative for a GPU) is registered with open_clip when
this module is imported, trained on the portrait
world by :mod:`pipelines.training.train_clip` and shipped in ``assets/clip/`` as
``open_clip_model.safetensors`` + ``open_clip_config.json`` + a card. It loads with the same call
as a hub model::

    model, _, preprocess = open_clip.create_model_and_transforms(
        "PortraitCLIP-RN-128", pretrained="assets/clip/open_clip_model.safetensors")

:func:`load_clip` wraps that call for the embedded folder, hub names with a pretrained tag
(``load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k")``, which fails fast with a clear message
when neither the network nor a local cache has the weights) and local checkpoints. The helpers
below take images as the studio holds them (float ``[B, 3, H, W]`` in [-1, 1]) and keep gradients,
so the CLIP-edit code can optimise through them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipelines.device import default_dtype

__all__ = [
    "EMBEDDED_NAME",
    "GPU_NAME",
    "EMBEDDED_CLIP",
    "CONFIG_DIR",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "LoadedCLIP",
    "TokenizedText",
    "register_configs",
    "load_clip",
    "save_clip",
    "tokenize",
    "prepare_images",
    "image_features",
    "text_features",
    "PROMPT_TEMPLATES",
    "value_phrases",
    "attribute_prompts",
    "class_text_features",
    "zero_shot_classify",
    "zero_shot_accuracy",
]

EMBEDDED_NAME = "PortraitCLIP-RN-128"    # the architecture of assets/clip (trained on the CPU)
GPU_NAME = "PortraitCLIP-ViT-T-64"        # a larger ViT config for a GPU run
CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
EMBEDDED_CLIP = Path(__file__).resolve().parent.parent / "assets" / "clip"
WEIGHTS_FILE = "open_clip_model.safetensors"   # the name open_clip looks for in a model folder
CONFIG_FILE = "open_clip_config.json"          # {"model_name", "model_cfg", "preprocess_cfg"}
_PRECISIONS = ("fp32", "fp16", "bf16")
_PROBE_TIMEOUT_S = 3.0  # how long to wait for the weights' host before calling it unreachable


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

def register_configs() -> list[str]:
    """Register the studio's model configs (``pipelines/clip_configs/*.json``) with open_clip.

    Idempotent; returns the names registered. Runs on import of this module.
    """
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if any(n not in open_clip.list_models() for n in names):
        open_clip.add_model_config(CONFIG_DIR)
    return names


register_configs()


class LoadedCLIP(NamedTuple):
    """What :func:`load_clip` returns; unpacks as ``model, preprocess, tokenizer``."""
    model: torch.nn.Module       # open_clip CLIP in eval mode
    preprocess: Callable         # PIL image -> normalised tensor (open_clip's eval transform)
    tokenizer: Callable          # list[str] -> LongTensor [N, context_length]


# --------------------------------------------------------------------------------------------
# loading and saving
# --------------------------------------------------------------------------------------------

def load_clip(name_or_path: str | os.PathLike[str] = "embedded", *,
              pretrained: str | os.PathLike[str] | None = None,
              device: torch.device | str = "cpu", precision: str = "fp32",
              cache_dir: str | None = None) -> LoadedCLIP:
    """Load a CLIP model through open_clip.

    ``name_or_path`` is one of:
      - ``"embedded"`` (or ``"PortraitCLIP-RN-128"`` without ``pretrained``): the studio's
        PortraitCLIP in ``assets/clip/``;
      - a model folder (``open_clip_config.json`` + ``open_clip_model.safetensors``, as
        :func:`save_clip` and the training script write), or a weights file inside one;
      - an open_clip model name with ``pretrained=`` a tag (``"ViT-B-32"``,
        ``"laion2b_s34b_b79k"``: hub weights, from the local cache when it has them) or a local
        checkpoint path (.safetensors, or .pt/.bin read with ``weights_only=True``);
      - ``"hf-hub:org/repo"``.

    ``precision`` is "fp32", "fp16", "bf16" or "auto" (half precision on GPUs).
    Raises ``FileNotFoundError`` for a missing folder, ``ValueError`` for an unknown name or tag,
    ``RuntimeError`` when hub weights are neither cached nor reachable.
    """
    device = torch.device(device)
    if precision == "auto":
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(default_dtype(device), "fp32")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS} or 'auto', got {precision!r}")
    common = dict(device=device, precision=precision, cache_dir=cache_dir)

    name = str(name_or_path)
    if name == "embedded" or (name == EMBEDDED_NAME and pretrained is None):
        if not (EMBEDDED_CLIP / CONFIG_FILE).exists():
            raise FileNotFoundError(
                f"the embedded CLIP is missing from {EMBEDDED_CLIP}; train it with "
                "`python -m pipelines.training.train_clip --export_to assets/clip`")
        return _load_folder(EMBEDDED_CLIP, None, **common)
    path = Path(name)
    if path.is_dir():
        return _load_folder(path, None, **common)
    if path.is_file():
        if (path.parent / CONFIG_FILE).exists():
            return _load_folder(path.parent, path, **common)
        raise ValueError(f"{path} has no {CONFIG_FILE} beside it; pass the model name and the file: "
                         f"load_clip('<model name>', pretrained={str(path)!r})")
    if name.startswith("local-dir:"):
        return _load_folder(Path(name[len("local-dir:"):]), None, **common)
    if name.startswith("hf-hub:"):
        return _load_hub_repo(name, **common)
    if os.sep in name or name.endswith((".safetensors", ".pt", ".bin", ".pth")):
        raise FileNotFoundError(f"no CLIP model folder or file at {name}")
    return _load_named(name, pretrained, **common)


def save_clip(model: torch.nn.Module, folder: str | os.PathLike[str], *, model_name: str,
              fp16: bool = True) -> Path:
    """Write ``model`` as an open_clip model folder: safetensors weights + ``open_clip_config.json``.

    ``model_name`` must be a registered open_clip config (the architecture of ``model``). The
    folder loads with :func:`load_clip`, with ``open_clip.create_model_and_transforms(model_name,
    pretrained=folder/open_clip_model.safetensors)`` and with ``"local-dir:" + folder``.
    """
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"{model_name!r} is not a registered open_clip config")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if fp16 and value.is_floating_point():
            value = value.half()
        state[key] = value.contiguous().clone()
    save_file(state, str(folder / WEIGHTS_FILE))
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    config = {"model_name": model_name, "model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=list))
    return folder


def _create(name: str, pretrained: str | None, *, device: torch.device, precision: str,
            cache_dir: str | None, **kwargs: Any) -> LoadedCLIP:
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir, **kwargs)
    return LoadedCLIP(model.eval(), preprocess, open_clip.get_tokenizer(name, cache_dir=cache_dir))


def _load_folder(folder: Path, weights: Path | None, **common: Any) -> LoadedCLIP:
    """A studio model folder: by registered name + weights file when the config matches one."""
    config_file = folder / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{folder} is not a CLIP model folder: {CONFIG_FILE} is missing")
    config = json.loads(config_file.read_text())
    if "model_cfg" not in config:
        raise ValueError(f"{config_file} has no 'model_cfg'")
    weights = weights or folder / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{folder} has no weights file {weights.name}")
    name = config.get("model_name")
    if name and open_clip.get_model_config(name) == config["model_cfg"]:
        pp = config.get("preprocess_cfg", {})
        return _create(name, str(weights), image_mean=pp.get("mean"), image_std=pp.get("std"),
                       image_interpolation=pp.get("interpolation"),
                       image_resize_mode=pp.get("resize_mode"), **common)
    # an architecture open_clip does not know by name: let it read the folder's own config
    return _create(f"local-dir:{folder}", None, **common)


def _load_named(name: str, pretrained: str | os.PathLike[str] | None, **common: Any) -> LoadedCLIP:
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown CLIP model {name!r}; open_clip knows {len(open_clip.list_models())} "
                         f"names, e.g. {EMBEDDED_NAME!r}, 'ViT-B-32' (see open_clip.list_models())")
    if pretrained is None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"give pretrained= for {name!r}: a checkpoint path"
                         + (f" or one of the tags {tags}" if tags else ""))
    pretrained = str(pretrained)
    if os.path.isfile(pretrained):
        return _create(name, pretrained, **common)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        if os.sep in pretrained or pretrained.endswith((".safetensors", ".pt", ".bin", ".pth")):
            raise FileNotFoundError(f"no checkpoint file at {pretrained}")
        raise ValueError(f"{pretrained!r} is neither a file nor a pretrained tag of {name!r}; tags: "
                         f"{open_clip.list_pretrained_tags_by_model(name)}")
    cached = _cached_weights(tag_cfg, common["cache_dir"])
    if cached is not None:  # load from the cache without touching the network
        return _create(name, cached, image_mean=tag_cfg.get("mean"), image_std=tag_cfg.get("std"),
                       image_interpolation=tag_cfg.get("interpolation"),
                       image_resize_mode=tag_cfg.get("resize_mode"),
                       force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)), **common)
    where = tag_cfg.get("hf_hub") or tag_cfg.get("url") or "?"
    _require_network(_weights_host(tag_cfg), f"CLIP {name!r} with weights {pretrained!r} ({where})")
    try:
        return _create(name, pretrained, **common)
    except Exception as exc:
        raise RuntimeError(f"loading CLIP {name!r} with weights {pretrained!r} ({where}) needs network "
                           f"or a local cache of the weights; the download failed: {exc}") from exc


def _load_hub_repo(name: str, **common: Any) -> LoadedCLIP:
    _require_network(_hf_host(), f"CLIP {name!r}")
    try:
        return _create(name, None, **common)
    except Exception as exc:
        raise RuntimeError(f"loading CLIP {name!r} needs network or a local cache of the repository; "
                           f"it failed: {exc}") from exc


# -- hub reachability -------------------------------------------------------------------------

def _hf_offline() -> bool:
    if any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
           for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hf_host() -> str:
    try:
        from huggingface_hub import constants
        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except ImportError:
        return "huggingface.co"


def _weights_host(tag_cfg: Mapping[str, Any]) -> str | None:
    """The host a tag downloads from (None: the Hugging Face hub)."""
    if tag_cfg.get("hf_hub"):
        return None
    return urlparse(tag_cfg.get("url", "")).hostname


def _cached_weights(tag_cfg: Mapping[str, Any], cache_dir: str | None) -> str | None:
    """The local file of a pretrained tag when a cache already holds it, else None."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    if tag_cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        repo_id, filename = os.path.split(tag_cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else []
        if filename == "open_clip_pytorch_model.bin":
            candidates = ["open_clip_model.safetensors"]
        for candidate in candidates + [filename]:
            hit = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
        return None
    if tag_cfg.get("url"):
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"),
                              os.path.basename(tag_cfg["url"]))
        return target if os.path.isfile(target) else None
    return None


def _reachable(host: str, port: int = 443, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _require_network(host: str | None, what: str) -> None:
    hub = host is None
    host = host or _hf_host()
    if hub and _hf_offline():
        raise RuntimeError(f"loading {what} needs network or a local cache of the weights: "
                           "HF_HUB_OFFLINE is set and the Hugging Face cache does not hold them. "
                           "Use the embedded CLIP (load_clip('embedded')) or download the weights "
                           "on a connected machine first.")
    if not _reachable(host):
        raise RuntimeError(f"loading {what} needs network or a local cache of the weights: "
                           f"{host} is unreachable and no cached copy was found. Use the embedded "
                           "CLIP (load_clip('embedded')) or download the weights on a connected "
                           "machine first.")


# --------------------------------------------------------------------------------------------
# text and image features
# --------------------------------------------------------------------------------------------

class TokenizedText(NamedTuple):
    tokens: torch.Tensor     # [N, context_length] int64
    truncated: torch.Tensor  # [N] bool: the text was longer than the context and was cut


def tokenize(tokenizer: Callable, texts: str | Sequence[str]) -> TokenizedText:
    """Tokenize ``texts``; texts longer than the context are truncated and flagged."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("texts is empty")
    tokens = tokenizer(texts)
    context = tokens.shape[-1]
    truncated = torch.tensor([_token_count(tokenizer, t, row) > context for t, row in zip(texts, tokens)],
                             dtype=torch.bool)
    return TokenizedText(tokens, truncated)


def _token_count(tokenizer: Callable, text: str, row: torch.Tensor) -> int:
    """Tokens ``text`` needs, special tokens included."""
    if isinstance(tokenizer, open_clip.SimpleTokenizer) and tokenizer.reduction_fn is None:
        return len(tokenizer.encode(text)) + 2  # start and end of text
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
    if callable(inner):
        try:
            return len(inner(text)["input_ids"])
        except Exception:  # noqa: BLE001 - fall back to the conservative test below
            pass
    # unknown tokenizer: a row with no padding left may have been cut
    return int((row != 0).sum()) + (1 if bool((row != 0).all()) else 0)


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    conv = getattr(getattr(model, "visual", None), "conv1", None)
    param = conv.weight if conv is not None else next(model.parameters())
    return param.device, param.dtype


def prepare_images(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Studio images (float [B, 3, H, W] in [-1, 1]) as the model's input: resized (shortest side,
    centre crop), normalised with its mean/std, on its device and dtype. Differentiable."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    device, dtype = _model_device_dtype(model)
    x = (images.to(device=device, dtype=torch.float32) + 1) / 2  # [B, 3, H, W] in [0, 1]
    h, w = x.shape[-2:]
    if (h, w) != (out_h, out_w):
        scale = max(out_h / h, out_w / w)
        new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
        mode = "bicubic" if cfg.get("interpolation", "bicubic") == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, align_corners=False, antialias=True)
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
        x = x[..., top:top + out_h, left:left + out_w].clamp(0, 1)
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def image_features(model: torch.nn.Module, images: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """CLIP image embeddings [B, D] (float32) of studio images in [-1, 1]; keeps gradients."""
    return model.encode_image(prepare_images(model, images), normalize=normalize).float()


def text_features(model: torch.nn.Module, tokenizer: Callable, texts: str | Sequence[str], *,
                  normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP text embeddings [N, D] (float32) and a [N] bool flag of the texts that were truncated."""
    tokens, truncated = tokenize(tokenizer, texts)
    device, _ = _model_device_dtype(model)
    return model.encode_text(tokens.to(device), normalize=normalize).float(), truncated


# --------------------------------------------------------------------------------------------
# zero-shot classification of portrait-world attributes
# --------------------------------------------------------------------------------------------

# Phrases for each attribute value, in the words the portrait world's captions use.
_VALUE_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "hair_color": {v: (f"{v} hair",) for v in
                   ("black", "brown", "blonde", "red", "blue", "pink", "silver", "green")},
    "hair_style": {"short": ("short hair",), "bob": ("a bob cut", "hair in a bob"),
                   "long": ("long hair",), "twintails": ("twintails", "hair in twintails")},
    "bangs": {"no": ("no bangs",), "yes": ("bangs",)},
    "eye_color": {v: (f"{v} eyes",) for v in ("brown", "blue", "green", "red", "purple", "gold")},
    "expression": {"neutral": ("a neutral expression", "a calm face"), "smile": ("a smile", "a gentle smile"),
                   "laughing": ("a big laugh", "an open-mouthed laugh"),
                   "surprised": ("a surprised look", "a surprised face")},
    "glasses": {"no": ("no glasses",), "yes": ("glasses", "round glasses")},
    "accessory": {"none": ("no accessories",), "ribbon": ("a hair ribbon", "a ribbon in her hair"),
                  "hat": ("a hat", "a sun hat")},
    "skin_tone": {v: (f"{v} skin",) for v in ("fair", "light", "tan", "dark")},
    "background": {"white": ("a white background",), "sky": ("a sky-blue background",),
                   "pink": ("a pink background",), "mint": ("a mint background",),
                   "lavender": ("a lavender background",), "peach": ("a peach background",)},
}
PROMPT_TEMPLATES = ("an anime portrait with {}", "an anime girl with {}")


def value_phrases(attribute: str, value: str) -> tuple[str, ...]:
    """Short phrases naming one attribute value ("blue hair", "a hat")."""
    from pipelines.data.portrait_world import ATTRIBUTES
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; one of {', '.join(ATTRIBUTES)}")
    if value not in ATTRIBUTES[attribute]:
        raise ValueError(f"unknown value {value!r} of {attribute!r}; one of {', '.join(ATTRIBUTES[attribute])}")
    return _VALUE_PHRASES[attribute][value]


def attribute_prompts(attribute: str) -> list[list[str]]:
    """For each value of ``attribute`` (in ``ATTRIBUTES`` order), its prompts
    ("an anime portrait with blue hair", ...): every template with every phrase."""
    from pipelines.data.portrait_world import ATTRIBUTES
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; one of {', '.join(ATTRIBUTES)}")
    return [[t.format(p) for t in PROMPT_TEMPLATES for p in value_phrases(attribute, v)]
            for v in ATTRIBUTES[attribute]]


@torch.no_grad()
def class_text_features(model: torch.nn.Module, tokenizer: Callable, attribute: str) -> torch.Tensor:
    """One unit embedding per value of ``attribute`` [V, D]: the normalised mean of its prompts'
    embeddings (prompt ensembling, Radford et al. 2021, sec. 3.1.4)."""
    return _class_features(model, tokenizer, [attribute])[attribute]


def _class_features(model: torch.nn.Module, tokenizer: Callable, attributes: Sequence[str]) -> dict[str, torch.Tensor]:
    """:func:`class_text_features` of several attributes, with one text-encoder call."""
    groups = [(name, prompts) for name in attributes for prompts in attribute_prompts(name)]
    feats, _ = text_features(model, tokenizer, [p for _, prompts in groups for p in prompts])   # [P, D]
    out: dict[str, list[torch.Tensor]] = {name: [] for name in attributes}
    start = 0
    for name, prompts in groups:
        out[name].append(F.normalize(feats[start:start + len(prompts)].mean(0), dim=-1))
        start += len(prompts)
    return {name: torch.stack(values) for name, values in out.items()}


@torch.no_grad()
def _image_features_batched(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    if images.dtype == torch.uint8:  # [B, 3, H, W] uint8 -> converted batch by batch
        return torch.cat([image_features(model, images[i:i + batch_size].float() / 127.5 - 1)
                          for i in range(0, images.shape[0], batch_size)])
    return torch.cat([image_features(model, images[i:i + batch_size])
                      for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def zero_shot_classify(model: torch.nn.Module, tokenizer: Callable, images: torch.Tensor, attribute: str, *,
                       batch_size: int = 256, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted value index (into ``ATTRIBUTES[attribute]``) for each image [B] int64 on the CPU.

    ``images``: float [B, 3, H, W] in [-1, 1] (or uint8 [B, 3, H, W]); the value whose prompts are
    closest in cosine similarity wins. ``classes`` may pass precomputed :func:`class_text_features`.
    """
    classes = class_text_features(model, tokenizer, attribute) if classes is None else classes
    feats = _image_features_batched(model, images, batch_size)          # [B, D]
    return (feats @ classes.to(feats.device).T).argmax(-1).cpu()


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, tokenizer: Callable, images: torch.Tensor,
                       labels: torch.Tensor, *, batch_size: int = 256) -> dict[str, float]:
    """Zero-shot accuracy per attribute (``zs_<name>``) and their mean (``clip_zero_shot_accuracy``).

    ``images``: float in [-1, 1] or uint8, [B, 3, H, W]; ``labels``: [B, num_attributes] indices
    into ``ATTRIBUTES`` (rows with -1, outliers, are skipped).
    """
    from pipelines.data.portrait_world import ATTRIBUTES
    keep = (labels >= 0).all(1)
    images, labels = images[keep], labels[keep].cpu()
    if images.shape[0] == 0:
        raise ValueError("no labelled images to evaluate")
    was_training = model.training
    model.eval()
    feats = _image_features_batched(model, images, batch_size)          # [B, D]
    all_classes = _class_features(model, tokenizer, list(ATTRIBUTES))
    figures = {}
    for j, name in enumerate(ATTRIBUTES):
        classes = all_classes[name].to(feats.device)                     # [V, D]
        pred = (feats @ classes.T).argmax(-1).cpu()
        figures[f"zs_{name}"] = float((pred == labels[:, j]).float().mean())
    figures["clip_zero_shot_accuracy"] = sum(figures.values()) / len(ATTRIBUTES)
    model.train(was_training)
    return figures
