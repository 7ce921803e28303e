"""Tiny random models shared by the tests: a 16-px StyleGAN2, an evaluator reading every world
attribute, and a registered tiny open_clip config. Random weights: tests check mechanics, not quality."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.evaluator import AttributeEvaluator
from models.stylegan2 import Generator
from pipelines.data.portrait_world import ATTRIBUTES
from pipelines.evaluation import Evaluator


def tiny_clip_config(image_size: int = 16, patch_size: int = 8) -> dict:
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": patch_size},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def register_tiny_clip(folder: Path, name: str, **kwargs) -> str:
    """Write ``name``'s config into ``folder`` and register it with open_clip; returns ``name``."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(tiny_clip_config(**kwargs)))
    open_clip.add_model_config(folder)
    return name


def tiny_generator(seed: int = 0, *, map_layers: int = 2) -> Generator:
    torch.manual_seed(seed)
    return Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3,
                     mapping_kwargs={"num_layers": map_layers},
                     synthesis_kwargs={"channel_base": 256, "channel_max": 16}).eval()


def tiny_world_evaluator(seed: int = 1) -> Evaluator:
    torch.manual_seed(seed)
    return Evaluator(AttributeEvaluator([(n, len(v)) for n, v in ATTRIBUTES.items()], resolution=16, width=8,
                                        feature_dim=16))
