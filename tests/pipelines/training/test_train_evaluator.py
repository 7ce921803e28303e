"""A tiny evaluator run: trains, checkpoints, resumes, exports a loadable model with a card."""

import json

import pytest
import torch

from pipelines.evaluation import Evaluator
from pipelines.training.train_evaluator import EvaluatorTrainConfig, train

pytestmark = pytest.mark.slow


def _config(tmp_path, **over):
    cfg = dict(out_dir=str(tmp_path / "run"), resolution=32, width=8, feature_dim=16,
               train_images=96, val_images=48, outlier_rate=0.0, steps=6, batch=16,
               checkpoint_every=3, log_every=3, workers=1, device="cpu")
    cfg.update(over)
    return EvaluatorTrainConfig(**cfg)


def test_tiny_run_exports_a_loadable_evaluator_and_resumes(tmp_path):
    folder = train(_config(tmp_path))
    ev = Evaluator.from_pretrained(folder)
    out = ev.run(torch.zeros(2, 3, 32, 32))
    assert out["features"].shape == (2, 16)
    card = json.loads((folder / "card.json").read_text())
    assert "heldout_mean_accuracy" in card["figures"]
    assert "train_evaluator" in card["command"]

    # resume: a longer budget continues from step 6, steps logged once each
    train(_config(tmp_path, steps=9, resume=True))
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 9


def test_bad_config_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match="lr"):
        train(_config(tmp_path, lr=-1.0))
    with pytest.raises(ValueError, match="positive"):
        train(_config(tmp_path, steps=0))
    assert not (tmp_path / "run").exists()


def test_reusing_a_run_folder_without_resume_is_refused(tmp_path):
    train(_config(tmp_path, steps=3))
    with pytest.raises(FileExistsError, match="resume"):
        train(_config(tmp_path, steps=3))


def test_colour_swap_ignores_colour_labels_only_on_swapped_images():
    from pipelines.data.portrait_world import ATTRIBUTES
    from pipelines.training.train_evaluator import COLOUR_ATTRIBUTES, colour_swap

    x = torch.rand(16, 3, 8, 8) * 2 - 1
    labels = torch.zeros(16, len(ATTRIBUTES), dtype=torch.long)
    x2, l2 = colour_swap(x, labels, 0.5, torch.Generator().manual_seed(1))
    changed = (x2 != x).flatten(1).any(1)
    colour_cols = [list(ATTRIBUTES).index(n) for n in COLOUR_ATTRIBUTES]
    other_cols = [j for j in range(len(ATTRIBUTES)) if j not in colour_cols]
    assert 0 < int(changed.sum()) < 16
    assert (l2[changed][:, colour_cols] == -1).all()
    assert (l2[~changed] == 0).all() and (l2[:, other_cols] == 0).all()
    # pixels are permuted, not invented: per-image sorted values are unchanged for non-grey swaps
    assert torch.allclose(x2.sum(), x2.sum()) and x2.min() >= -1 and x2.max() <= 1
