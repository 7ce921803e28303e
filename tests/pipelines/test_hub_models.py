"""Hub model families (pipelines.hub_models) with tiny random components saved locally, CPU.

Like diffusers' own tests: real classes, tiny configs (4-32 channels, 8-16 px latents), random
weights, ``save_pretrained`` to a temporary folder, then the studio's loader on that folder.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402

from pipelines.hub_models import (  # noqa: E402
    DMD2_TIMESTEPS,
    HubTextToImage,
    ModelNotCachedError,
    UnsupportedModelError,
    detect_family,
    load_text_to_image,
)
from pipelines.text_to_image import TextToImageOutput  # noqa: E402
from tests._tiny import CLIP_WORDS as WORDS  # noqa: E402
from tests._tiny import save_sd, save_sdxl, tiny_sd_unet, tiny_sdxl_unet  # noqa: E402


def trailing(cls):
    return cls(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               timestep_spacing="trailing", steps_offset=1)


def check_output(out, batch: int, size: int) -> None:
    assert isinstance(out, TextToImageOutput)
    assert len(out.images) == batch and all(im.size == (size, size) for im in out.images)
    assert out.latents.shape == (batch, 4, size // 2, size // 2)
    assert {"text_encoding", "denoising", "decoding", "total"} <= set(out.timings)
    assert all(v >= 0 for v in out.timings.values()) and out.timings["total"] > 0


def run(pipe, **kw):
    return pipe(prompt=kw.pop("prompt", "a red cat"), generator=torch.Generator().manual_seed(0), **kw)


# -- SD-Turbo / SDXL-Turbo ----------------------------------------------------------------------
def test_sd_turbo_detect_load_run_1_and_4_steps(tmp_path):
    save_sd(tmp_path, trailing(diffusers.EulerDiscreteScheduler))
    assert detect_family(tmp_path) == "sd-turbo"
    pipe = load_text_to_image(str(tmp_path), device="cpu", dtype=torch.float32)
    assert isinstance(pipe, HubTextToImage) and pipe.family == "sd-turbo"
    assert isinstance(pipe.pipe, diffusers.StableDiffusionPipeline)
    check_output(run(pipe, num_inference_steps=1), 1, 16)
    out = run(pipe, prompt=["a cat", "a dog"], num_inference_steps=4, num_images_per_prompt=2)
    check_output(out, 4, 16)
    assert out.truncated == [False, False]
    assert run(pipe, prompt="a " * 40).truncated == [True]
    pt = run(pipe, output_type="pt").images
    assert pt.shape == (1, 3, 16, 16) and pt.min() >= -1 and pt.max() <= 1
    with pytest.raises(ValueError, match="steps"):
        run(pipe, num_inference_steps=8)


def test_sd_turbo_negative_prompt_nasa_at_guidance_0_cfg_above_1(tmp_path, monkeypatch):
    from pipelines import attention

    save_sd(tmp_path, trailing(diffusers.EulerDiscreteScheduler))
    pipe = load_text_to_image(tmp_path, device="cpu", dtype=torch.float32)
    used = []
    real_nasa = attention.nasa

    def spy(unet, embeds, scale):
        used.append((tuple(embeds.shape), scale))
        return real_nasa(unet, embeds, scale)

    monkeypatch.setattr("pipelines.hub_models.nasa", spy)
    plain = run(pipe, output_type="pt").images
    steered = run(pipe, output_type="pt", negative_prompt="glasses", nasa_scale=0.5).images
    assert used == [((1, 16, 32), 0.5)] and not torch.allclose(plain, steered)
    used.clear()
    run(pipe, num_inference_steps=2, guidance_scale=2.0, negative_prompt="glasses")
    assert used == []
    with pytest.raises(ValueError, match="cfg"):
        run(pipe, negative_prompt="glasses", negative_mode="cfg")


def test_sdxl_turbo_detect_load_run(tmp_path):
    save_sdxl(tmp_path, trailing(diffusers.EulerAncestralDiscreteScheduler))
    assert detect_family(tmp_path) == "sdxl-turbo"
    pipe = load_text_to_image(tmp_path, device="cpu", dtype=torch.float32)
    assert isinstance(pipe.pipe, diffusers.StableDiffusionXLPipeline)
    check_output(run(pipe, num_inference_steps=1), 1, 16)
    check_output(run(pipe, num_inference_steps=4, negative_prompt="blue"), 1, 16)


# -- DMD2 ---------------------------------------------------------------------------------------
def test_dmd2_unet_weights_swapped_into_sdxl_base(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    base = tmp_path / "sdxl-base"
    save_sdxl(base, diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, steps_offset=1))       # leading spacing
    with pytest.raises(UnsupportedModelError, match="base SDXL"):
        detect_family(base)
    student = tiny_sdxl_unet(seed=1)
    weights = tmp_path / "dmd2_sdxl_4step_unet.safetensors"
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, weights)

    pipe = load_text_to_image(base, unet_weights=weights, device="cpu", dtype=torch.float32)
    assert pipe.family == "dmd2" and isinstance(pipe.pipe.scheduler, diffusers.LCMScheduler)
    torch.testing.assert_close(pipe.pipe.unet.state_dict(), student.state_dict())

    seen = []
    real_set = diffusers.LCMScheduler.set_timesteps

    def spy(self, num_inference_steps=None, device=None, original_inference_steps=None, timesteps=None,
            strength=1.0):                                # named: diffusers inspects the signature
        seen.append(timesteps)
        return real_set(self, num_inference_steps, device, original_inference_steps, timesteps, strength)

    monkeypatch.setattr(diffusers.LCMScheduler, "set_timesteps", spy)
    check_output(run(pipe, num_inference_steps=1), 1, 16)
    check_output(run(pipe, num_inference_steps=4), 1, 16)
    assert seen == [DMD2_TIMESTEPS[1], DMD2_TIMESTEPS[4]]
    with pytest.raises(ValueError, match="steps"):
        run(pipe, num_inference_steps=2)

    # The weights file dropped into the base folder is found by detection.
    (base / weights.name).write_bytes(weights.read_bytes())
    assert detect_family(base) == "dmd2"


def test_dmd2_weights_that_do_not_fit_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_sdxl(tmp_path / "base", trailing(diffusers.EulerAncestralDiscreteScheduler))
    save_file({"not.a.unet.key": torch.zeros(2)}, tmp_path / "bad_dmd2.safetensors")
    with pytest.raises(UnsupportedModelError, match="does not fit"):
        load_text_to_image(tmp_path / "base", unet_weights=tmp_path / "bad_dmd2.safetensors", device="cpu")


# -- LCM-LoRA -----------------------------------------------------------------------------------
def test_lcm_lora_detection_and_loading(tmp_path):
    save_sd(tmp_path, diffusers.PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1))
    with pytest.raises(UnsupportedModelError, match="LCM-LoRA"):
        detect_family(tmp_path)
    try:
        import peft  # noqa: F401
        from peft import LoraConfig, get_peft_model_state_dict
    except ImportError:
        (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
        assert detect_family(tmp_path) == "lcm-lora"
        with pytest.raises(ImportError, match="peft"):
            load_text_to_image(tmp_path, device="cpu")
        return
    from diffusers.utils import convert_state_dict_to_diffusers

    unet = tiny_sd_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)
    pipe = load_text_to_image(tmp_path, lora_weights=tmp_path / "lora" / "pytorch_lora_weights.safetensors",
                              device="cpu", dtype=torch.float32)
    assert pipe.family == "lcm-lora" and isinstance(pipe.pipe.scheduler, diffusers.LCMScheduler)
    check_output(run(pipe, num_inference_steps=4), 1, 16)


# -- SANA-Sprint --------------------------------------------------------------------------------
def save_sana_sprint(folder) -> None:
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    torch.manual_seed(0)
    transformer = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=16, qk_norm="rms_norm_across_heads", guidance_embeds=True)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(
        head_dim=16, hidden_size=8, intermediate_size=16, max_position_embeddings=1024, num_attention_heads=2,
        num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(WORDS) + 4, attn_implementation="eager"))
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[])
    diffusers.SanaSprintPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                 scheduler=diffusers.SCMScheduler()).save_pretrained(folder)


def test_sana_sprint_detect_load_run(tmp_path):
    save_sana_sprint(tmp_path)
    assert detect_family(tmp_path) == "sana-sprint"
    pipe = load_text_to_image(tmp_path, device="cpu", dtype=torch.float32)
    assert isinstance(pipe.pipe, diffusers.SanaSprintPipeline) and pipe.image_size == (32, 32)
    for steps in (1, 2, 4):                               # Sana needs sizes divisible by 32
        check_output(run(pipe, num_inference_steps=steps), 1, 32)
    with pytest.raises(ValueError, match="negative"):
        run(pipe, negative_prompt="glasses")


# -- what is not a supported model ----------------------------------------------------------------
def test_unsupported_and_non_model_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedModelError, match="not a model folder") as info:
        detect_family(tmp_path / "empty")
    assert "sd-turbo" in str(info.value) and "sana-sprint" in str(info.value)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UnsupportedModelError, match="KandinskyPipeline.*supported families: portrait"):
        load_text_to_image(other, device="cpu")
    tiny_sd_unet().save_pretrained(tmp_path / "unet-only")
    with pytest.raises(UnsupportedModelError, match="single UNet2DConditionModel"):
        detect_family(tmp_path / "unet-only")
    with pytest.raises(UnsupportedModelError, match="unknown family"):
        load_text_to_image(other, family="flux", device="cpu")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        detect_family(tmp_path / "missing" / "deeper" / "path")


def test_uncached_hub_id_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    with pytest.raises(ModelNotCachedError, match="not in the local cache and the hub is unreachable"):
        load_text_to_image("stabilityai/sd-turbo", device="cpu")
    with pytest.raises(ModelNotCachedError, match="point to a local folder"):
        detect_family("stabilityai/sdxl-turbo")
    assert time.monotonic() - start < 5.0
