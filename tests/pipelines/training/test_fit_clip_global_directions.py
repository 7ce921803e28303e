"""Global directions for a tiny random generator and CLIP: written into the generator folder with a
card, loaded back by the CLIP editor, and refused for bad settings before any work."""

import json

import open_clip
import pytest
import torch

from pipelines.clip_edit import GlobalDirections
from pipelines.clip_models import load_clip, save_clip
from pipelines.stylegan_io import load_generator, save_generator
from pipelines.training.fit_clip_global_directions import GlobalDirectionsConfig, fit, main
from tests._tiny import register_tiny_clip, tiny_generator

pytestmark = pytest.mark.slow

TINY = "PortraitCLIP-Test-Directions"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (the shared fixture in conftest.py)."""


@pytest.fixture
def assets(tmp_path):
    register_tiny_clip(tmp_path / "cfg", TINY)
    save_generator(tiny_generator(0, map_layers=1), tmp_path / "G")
    save_clip(open_clip.create_model(TINY), tmp_path / "clip", model_name=TINY, fp16=False)
    return tmp_path


def test_directions_are_written_into_the_generator_folder_and_fit_it(assets):
    out = main(["--generator", str(assets / "G"), "--clip", str(assets / "clip"), "--num_samples", "2",
                "--std_samples", "64", "--channel_batch", "16", "--device", "cpu"])
    assert out == assets / "G" / "clip_global_directions"
    card = json.loads((out / "card.json").read_text())
    assert "fit_clip_global_directions" in card["command"] and card["figures"]["channels"] == 80
    directions = GlobalDirections.load(out)
    assert directions.meta["num_samples"] == 2 and not directions.meta["include_torgb"]
    directions.check(load_generator(assets / "G"), load_clip(assets / "clip"))


def test_bad_settings_are_refused_before_work(assets):
    with pytest.raises(ValueError, match="num_samples"):
        fit(GlobalDirectionsConfig(generator=str(assets / "G"), clip=str(assets / "clip"), num_samples=0))
    with pytest.raises(ValueError, match="train the embedded one"):
        fit(GlobalDirectionsConfig(generator=str(assets / "G"), clip=str(assets / "nope")))
    assert not (assets / "G" / "clip_global_directions").exists()
