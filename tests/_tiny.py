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


def tiny_diffusion_unet(*, mid_block_type: str = "UNetMidBlock2DCrossAttn"):
    """An 8x8x4-latent UNet2DConditionModel conditioned on MiniLM states (width 384)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type=mid_block_type, cross_attention_dim=384, attention_head_dim=4, norm_num_groups=8,
    )


def tiny_text_to_image_pipeline(text_encoder, tokenizer, *, max_length: int = 16, shift_factor: float | None = None,
                                scheduler=None):
    """A PortraitDiffusionPipeline with random weights: the UNet above, a 16-px AutoencoderKL and,
    unless given, a zero-terminal-SNR v-prediction DDIM scheduler (the teacher's kind)."""
    from diffusers import AutoencoderKL, DDIMScheduler

    from pipelines.text_to_image import PortraitDiffusionPipeline

    unet = tiny_diffusion_unet()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=1.5, shift_factor=shift_factor,
    )
    if scheduler is None:
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing", clip_sample=False)
    return PortraitDiffusionPipeline(unet, vae, scheduler, text_encoder, tokenizer, max_length=max_length)
