"""distill_dmd2_hub: DMD2 of tiny random SD 1.5 / SDXL folders on the CPU (one process through
accelerate): finite named losses, exact resume, a LoRA export that the studio's loader samples at
one step; bad inputs refused before any work."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import diffusers  # noqa: E402

from pipelines.hub_models import LORA_FILE, load_text_to_image  # noqa: E402
from pipelines.training import distill_dmd2_hub  # noqa: E402
from pipelines.training.distill_dmd2_hub import ConditionedUNet, TextConditioning  # noqa: E402
from tests._tiny import save_sd, save_sdxl, tiny_sdxl_unet  # noqa: E402

LOSSES = ("loss_dm", "loss_fake", "loss_gan_g", "loss_gan_d")


def sd15_scheduler():
    """SD 1.5's own scheduler config: PNDM, scaled-linear betas, epsilon prediction."""
    return diffusers.PNDMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, skip_prk_steps=True, steps_offset=1)


def sdxl_scheduler():
    return diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                            beta_start=0.00085, beta_end=0.012, steps_offset=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny SD 1.5 and SDXL teacher folders, a prompts file, and three real images (one captioned)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("hub_dmd2")
    save_sd(root / "sd15", sd15_scheduler())
    save_sdxl(root / "sdxl", sdxl_scheduler())
    (root / "prompts.txt").write_text("a red cat\n\na blue dog\nportrait of a smiling cat\n")
    photos = root / "photos"
    photos.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):   # not square: resized on the short side, centre-cropped
        pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(photos / f"im{i}.png")
    (photos / "im0.txt").write_text("a photo of a cat")
    return root


def run_args(data, teacher, out, **overrides) -> list[str]:
    options = {"teacher": data / teacher, "prompts_file": data / "prompts.txt", "real_images": data / "photos",
               "out_dir": out, "gan_weight": 1e-3, "batch": 2, "steps": 2, "fake_updates": 2, "lora_rank": 4,
               "fake_lora_rank": 4, "gan_head_channels": 8, "log_every": 1, "checkpoint_every": 1,
               "num_samples": 2, "mixed_precision": "no", **overrides}
    return [a for k, v in options.items() for a in (f"--{k}", str(v))]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_runs(data, one_thread):
    """An uninterrupted 2-step run per family."""
    runs = {}
    for teacher in ("sd15", "sdxl"):
        out = data / "runs" / f"full_{teacher}"
        runs[teacher] = out, distill_dmd2_hub.main(run_args(data, teacher, out, export_to=data / f"export_{teacher}"))
    return runs


# -- the adapter ---------------------------------------------------------------------------------
def test_conditioned_unet_passes_sdxl_pooled_text_and_size_ids():
    unet = ConditionedUNet(tiny_sdxl_unet())
    cond = TextConditioning(torch.randn(2, 5, 64), torch.randn(2, 32), torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 10])
    out = unet(x, t, encoder_hidden_states=cond).sample
    assert out.shape == (2, 4, 8, 8)
    other = TextConditioning(cond.states, torch.randn(2, 32), cond.time_ids)
    assert not torch.allclose(out, unet(x, t, encoder_hidden_states=other).sample)   # pooled text is used
    both = TextConditioning.cat([cond, cond[torch.tensor([1])]])
    assert len(both) == 3 and both.time_ids.shape == (3, 6) and unet.mid_block is unet.unet.mid_block


# -- runs ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["sd15", "sdxl"])
def test_run_logs_finite_losses_and_writes_checkpoints(full_runs, teacher):
    out, lora = full_runs[teacher]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in LOSSES:
            assert torch.isfinite(torch.tensor(row[key])), (key, row)
    assert rows[-1]["fake_updates_total"] == 4
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    ckpt = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 1
    assert ckpt["student"] and all("lora" in k for k in ckpt["student"])     # only the adapter is trained
    assert ckpt["fake_score"] and all("lora" in k for k in ckpt["fake_score"])
    assert lora == out.parent.parent / f"export_{teacher}" / LORA_FILE and lora.is_file()
    assert (out / "samples" / "export.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["sd15", "sdxl"])
def test_resume_continues_with_the_same_losses_as_an_uninterrupted_run(data, full_runs, teacher, one_thread):
    full, _ = full_runs[teacher]
    out = data / "runs" / f"resumed_{teacher}"
    distill_dmd2_hub.main(run_args(data, teacher, out, steps=1))
    distill_dmd2_hub.main(run_args(data, teacher, out, steps=2) + ["--resume", "true"])
    rows, expected = metrics(out), metrics(full)
    assert [r["step"] for r in rows] == [1, 2]
    for key in LOSSES + ("fake_updates_total",):
        assert rows[1][key] == pytest.approx(expected[1][key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["sd15", "sdxl"])
def test_exported_lora_loads_through_load_text_to_image_and_samples_at_1_step(data, full_runs, teacher, one_thread):
    from safetensors.torch import load_file

    _, lora = full_runs[teacher]
    weights = load_file(lora)
    assert weights and all(k.startswith("unet.") for k in weights)
    assert any("lora" in k.lower() and "up" in k.lower() and v.abs().sum() > 0 for k, v in weights.items()), \
        "the student's LoRA B matrices were never trained"
    card = json.loads((lora.parent / "card.json").read_text())
    assert "pipelines.training.distill_dmd2_hub" in card["command"] and card["config"]["lora_rank"] == 4
    assert card["figures"]["student_timesteps"] == [999]

    pipe = load_text_to_image(data / teacher, lora_weights=lora, device="cpu", dtype=torch.float32)
    assert pipe.family == "lcm-lora" and isinstance(pipe.pipe.scheduler, diffusers.LCMScheduler)
    calls = []
    hook = pipe.pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[1]))
    try:
        out = pipe(prompt="a red cat", num_inference_steps=1, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(calls) == 1 and int(torch.as_tensor(calls[0]).flatten()[0]) == 999
    assert len(out.images) == 1 and out.images[0].size == (16, 16)
    # the LoRA is applied: the same call without it gives another image
    base = load_text_to_image(data / teacher, family="lcm-lora", lora_weights=lora, device="cpu", dtype=torch.float32)
    base.pipe.unet.disable_adapters()
    plain = base(prompt="a red cat", num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
    adapted = pipe(prompt="a red cat", num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                   generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(plain.images, adapted.images)


# -- bad input -------------------------------------------------------------------------------------
def refused(data, tmp_path, match: str, **overrides) -> None:
    out = tmp_path / "run"
    teacher = overrides.pop("teacher", "sd15")          # a folder name in data, or an absolute path
    with pytest.raises(ValueError, match=match):
        distill_dmd2_hub.main(run_args(data, teacher, out, **overrides))
    assert not out.exists()                 # refused before any work


def test_a_teacher_that_is_not_sd_or_sdxl_is_refused(data, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "PortraitDiffusionPipeline"}))
    refused(data, tmp_path, "not a StableDiffusionPipeline or StableDiffusionXLPipeline.*distill_dmd2",
            teacher=other)
    refused(data, tmp_path, "no model_index.json", teacher=data / "photos")


def test_an_empty_prompts_file_is_refused(data, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    refused(data, tmp_path, "holds no prompts; write one prompt per line", prompts_file=tmp_path / "empty.txt")
    refused(data, tmp_path, "does not exist", prompts_file=tmp_path / "missing.txt")


def test_gan_weight_without_real_images_is_refused(data, tmp_path):
    refused(data, tmp_path, "needs real images.*--real_images FOLDER.*--gan_weight 0", real_images="")
    empty = tmp_path / "no_photos"
    empty.mkdir()
    refused(data, tmp_path, "holds no images", real_images=empty)


def test_student_timesteps_outside_the_schedule_are_refused(data, tmp_path):
    refused(data, tmp_path, r"\[0, 1000\)", student_timesteps="1000")
    refused(data, tmp_path, "strictly decreasing", student_timesteps="499,749")


def test_an_uncached_hub_teacher_fails_fast_offline(data, tmp_path, monkeypatch):
    from pipelines.hub_models import ModelNotCachedError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    out = tmp_path / "run"
    with pytest.raises(ModelNotCachedError, match="not in the local cache"):
        distill_dmd2_hub.main(run_args(data, "sd15", out) + ["--teacher", "nobody/no-such-model"])
    assert not out.exists()


@pytest.mark.slow
def test_sigterm_checkpoints_stops_and_the_run_resumes_to_the_same_losses(data, full_runs, monkeypatch, one_thread):
    from pipelines.training.runs import StopFlag

    class SignalledAtOnce(StopFlag):       # as if SIGTERM arrived during the first step
        def install(self) -> None:
            self.stop = True

    out = data / "runs" / "stopped_sd15"
    monkeypatch.setattr(distill_dmd2_hub, "StopFlag", SignalledAtOnce)
    distill_dmd2_hub.main(run_args(data, "sd15", out, checkpoint_every=100))
    assert json.loads((out / "status.json").read_text())["state"] == "stopped"
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["step_0000001.pt"]
    assert not (out / "lora").exists()
    monkeypatch.setattr(distill_dmd2_hub, "StopFlag", StopFlag)
    distill_dmd2_hub.main(run_args(data, "sd15", out, checkpoint_every=100) + ["--resume", "true"])
    rows, expected = metrics(out), metrics(full_runs["sd15"][0])
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["loss_dm"] == pytest.approx(expected[1]["loss_dm"], rel=1e-5, abs=1e-7)
    assert (out / "lora" / LORA_FILE).is_file()


@pytest.mark.slow
def test_a_lora_run_folder_is_served_as_its_teacher_with_the_lora(data, full_runs, tmp_path):
    """What "use this model" does with a finished run: the folder alone is enough (its card names the teacher)."""
    from studio.registry import detect_kind

    out, lora = full_runs["sd15"]
    folder = out / "lora"
    assert detect_kind(folder) == "text_to_image"
    served = load_text_to_image(folder, device="cpu", dtype=torch.float32)
    direct = load_text_to_image(data / "sd15", lora_weights=folder / LORA_FILE, device="cpu", dtype=torch.float32)
    assert served.family == "lcm-lora"
    a, b = (p(prompt="a red cat", num_inference_steps=1, guidance_scale=1.0, output_type="pt",
              generator=torch.Generator().manual_seed(0)).images for p in (served, direct))
    torch.testing.assert_close(a, b)
    # a LoRA folder whose card lost its teacher: a message naming the way out
    broken = tmp_path / "lora"
    broken.mkdir()
    (broken / LORA_FILE).write_bytes((folder / LORA_FILE).read_bytes())
    (broken / "card.json").write_text("{}")
    with pytest.raises(ValueError, match="does not name the teacher"):
        load_text_to_image(broken, device="cpu")
