"""The studio's quality measures, all read through the portrait-world evaluator.

- prompt adherence: the fraction of the attributes a caption asks for that the evaluator finds;
- edit accuracy: the fraction of edits whose target attribute the evaluator finds afterwards;
- attribute preservation: the fraction of the attributes an edit should leave alone that stay;
- FD-world: the Fréchet distance between Gaussians fitted to evaluator features of two image sets
  (the FID recipe of Heusel et al. 2017, in the evaluator's feature space instead of Inception's).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from scipy import linalg

from models.evaluator import AttributeEvaluator
from pipelines.data.portrait_world import ATTRIBUTES, caption_attributes
from pipelines.images import pil_to_tensor

__all__ = [
    "Evaluator",
    "EMBEDDED_EVALUATOR",
    "frechet_distance",
    "prompt_adherence",
    "adherence_by_attribute",
    "edit_accuracy",
    "attribute_preservation",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_EVALUATOR = ASSETS / "evaluator"

ImagesLike = torch.Tensor | Sequence[Image.Image]


class Evaluator:
    """Loads an :class:`AttributeEvaluator` and answers questions about batches of images."""

    def __init__(self, network: AttributeEvaluator, *, device: torch.device | str = "cpu",
                 batch_size: int = 256) -> None:
        self.network = network.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    # -- I/O --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path = EMBEDDED_EVALUATOR, *,
                        device: torch.device | str = "cpu") -> "Evaluator":
        folder = Path(folder)
        config_file, weights = folder / "config.json", folder / "model.safetensors"
        if not config_file.exists() or not weights.exists():
            raise FileNotFoundError(
                f"{folder} is not an evaluator folder (needs config.json and model.safetensors); "
                "train one with `python -m pipelines.training.train_evaluator`")
        config = json.loads(config_file.read_text())
        network = AttributeEvaluator(**config["init_kwargs"])
        state = {k: v.float() for k, v in load_file(weights).items()}
        network.load_state_dict(state, strict=True)
        return cls(network, device=device)

    def save_pretrained(self, folder: str | Path, *, fp16: bool = True) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = torch.float16 if fp16 else torch.float32
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        config = {"architecture": "portrait-world-evaluator", "init_kwargs": self.network.init_kwargs}
        (folder / "config.json").write_text(json.dumps(config, indent=1))

    # -- inference --------------------------------------------------------------------------
    def _as_tensor(self, images: ImagesLike) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
            return images.float()
        return pil_to_tensor(list(images), size=self.network.resolution)

    @torch.no_grad()
    def run(self, images: ImagesLike) -> dict[str, torch.Tensor]:
        """Predictions for every image: ``{attribute: [B] value index, "outlier_score": [B],
        "features": [B, D]}`` (on the CPU)."""
        x = self._as_tensor(images)
        out: dict[str, list[torch.Tensor]] = {}
        for i in range(0, x.shape[0], self.batch_size):
            res = self.network(x[i:i + self.batch_size].to(self.device))
            for name, logits in res.logits.items():
                out.setdefault(name, []).append(logits.argmax(1).cpu())
            out.setdefault("outlier_score", []).append(torch.sigmoid(res.outlier_logit).cpu())
            out.setdefault("features", []).append(res.features.float().cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    def predict_attributes(self, images: ImagesLike) -> list[dict[str, str]]:
        """The attribute values the evaluator reads in each image, by name."""
        res = self.run(images)
        n = res["features"].shape[0]
        return [{name: ATTRIBUTES[name][int(res[name][i])] for name in ATTRIBUTES} for i in range(n)]

    def features(self, images: ImagesLike) -> np.ndarray:
        return self.run(images)["features"].numpy().astype(np.float64)

    def fd_world(self, images_a: ImagesLike, images_b: ImagesLike) -> float:
        """FD-world between two image sets."""
        return frechet_distance(self.features(images_a), self.features(images_b))

    def prompt_adherence(self, images: ImagesLike, prompts: Sequence[str | Mapping[str, str]]) -> float:
        return prompt_adherence(self.predict_attributes(images), prompts)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two [N, D] feature sets."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with equal D, got {features_a.shape} and {features_b.shape}")
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("FD needs at least 2 images per set")
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)  # (no disp=: SciPy 1.18 removed it, and the one result is the same)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as the FID code does
        eps = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def _requested(prompt: str | Mapping[str, str]) -> dict[str, str]:
    return dict(prompt) if isinstance(prompt, Mapping) else caption_attributes(prompt)


def prompt_adherence(predicted: Sequence[Mapping[str, str]],
                     prompts: Sequence[str | Mapping[str, str]]) -> float:
    """Fraction of requested attributes (parsed from each caption, or given as a dict) that the
    evaluator found, pooled over all images."""
    if len(predicted) != len(prompts):
        raise ValueError(f"{len(predicted)} predictions for {len(prompts)} prompts")
    asked = found = 0
    for pred, prompt in zip(predicted, prompts):
        for name, value in _requested(prompt).items():
            asked += 1
            found += pred[name] == value
    if asked == 0:
        raise ValueError("the prompts request no attribute the evaluator knows")
    return found / asked


def adherence_by_attribute(predicted: Sequence[Mapping[str, str]],
                           prompts: Sequence[str | Mapping[str, str]]) -> dict[str, float]:
    """:func:`prompt_adherence` per attribute: for each attribute some prompt requests, the fraction
    of those requests that the evaluator found (attributes in the evaluator's order)."""
    if len(predicted) != len(prompts):
        raise ValueError(f"{len(predicted)} predictions for {len(prompts)} prompts")
    asked: dict[str, int] = {}
    found: dict[str, int] = {}
    for pred, prompt in zip(predicted, prompts):
        for name, value in _requested(prompt).items():
            asked[name] = asked.get(name, 0) + 1
            found[name] = found.get(name, 0) + (pred[name] == value)
    return {name: found[name] / asked[name] for name in ATTRIBUTES if name in asked}


def edit_accuracy(predicted_after: Sequence[Mapping[str, str]],
                  targets: Sequence[Mapping[str, str]]) -> float:
    """Fraction of edits whose every target attribute value is found after the edit."""
    if len(predicted_after) != len(targets) or not targets:
        raise ValueError("need one non-empty target per edited image")
    ok = sum(all(pred[k] == v for k, v in tgt.items()) for pred, tgt in zip(predicted_after, targets))
    return ok / len(targets)


def attribute_preservation(predicted_before: Sequence[Mapping[str, str]],
                           predicted_after: Sequence[Mapping[str, str]],
                           edited: Sequence[Sequence[str]] | Sequence[Mapping[str, str]]) -> float:
    """Fraction of the attributes an edit did not target that keep their value."""
    if not (len(predicted_before) == len(predicted_after) == len(edited)):
        raise ValueError("before, after and edited must have the same length")
    kept = total = 0
    for before, after, names in zip(predicted_before, predicted_after, edited):
        for name in ATTRIBUTES:
            if name in names:
                continue
            total += 1
            kept += before[name] == after[name]
    return kept / max(total, 1)
