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


# -- tiny Stable Diffusion 1.5 / SDXL folders (hub-model tests, the hub DMD2 distillation) ---------------
CLIP_WORDS = "a cat dog red blue hair portrait glasses smiling photo of the".split()


def clip_tokenizer():
    """A CLIPTokenizer over ``CLIP_WORDS`` and single letters, 16 tokens long."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in CLIP_WORDS:
        vocab[word + "</w>"] = len(vocab)
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def clip_text(with_projection: bool = False):
    """A 2-layer CLIP text encoder of width 32 (with a 32-d projection: SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
                            max_position_embeddings=16, projection_dim=32)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def tiny_vae():
    """A 16-px AutoencoderKL with 8x8x4 latents (VAE scale factor 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=2, sample_size=16)


def tiny_sd_unet():
    """An SD 1.5-shaped UNet2DConditionModel: 8x8x4 latents, CLIP states of width 32."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4)


def tiny_sdxl_unet(seed: int = 0):
    """An SDXL-shaped UNet2DConditionModel: two text encoders' states (32 + 32), pooled text and size ids."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=4)


def save_sd(folder, scheduler) -> None:
    """A tiny random StableDiffusionPipeline folder (16 px) with ``scheduler``."""
    import diffusers

    diffusers.StableDiffusionPipeline(
        unet=tiny_sd_unet(), vae=tiny_vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)


def save_sdxl(folder, scheduler) -> None:
    """A tiny random StableDiffusionXLPipeline folder (16 px) with ``scheduler``."""
    import diffusers

    diffusers.StableDiffusionXLPipeline(
        unet=tiny_sdxl_unet(), vae=tiny_vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(with_projection=True), tokenizer_2=clip_tokenizer(), scheduler=scheduler,
    ).save_pretrained(folder)
