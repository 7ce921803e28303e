"""CLIP edits with the embedded models (skipped until assets/clip and the generator exist): the
editor finds the mapper and global directions made for this CLIP, and each method moves the
portrait towards the text."""

import pytest
import torch

from pipelines.clip_edit import world_vocabulary
from pipelines.clip_edit_session import CLIPEditor
from pipelines.clip_models import EMBEDDED_CLIP, load_clip
from pipelines.evaluation import EMBEDDED_EVALUATOR, Evaluator
from pipelines.stylegan_session import StyleGANEditor
from studio.registry import ASSETS_DIR

pytestmark = pytest.mark.weights
FOLDER = ASSETS_DIR / "stylegan2_portraits64"


@pytest.fixture(scope="module")
def editor():
    if not (EMBEDDED_CLIP / "open_clip_config.json").is_file() or not (FOLDER / "config.json").is_file():
        pytest.skip("needs assets/clip and assets/stylegan2_portraits64")
    torch.set_num_threads(1)
    stylegan = StyleGANEditor.from_folder(FOLDER, evaluator=Evaluator.from_pretrained(EMBEDDED_EVALUATOR))
    return CLIPEditor.from_stylegan(stylegan, load_clip("embedded"), clip_name="PortraitCLIP",
                                    vocabulary=world_vocabulary())


def test_every_shipped_method_is_used_and_raises_the_clip_score(editor):
    assert editor.load_notes == []
    expected = ["optimise"] + [m for m, folder in (("global", "clip_global_directions"), ("mapper", "clip_mapper"))
                               if (FOLDER / folder).is_dir()]
    assert editor.methods() == expected
    session = editor.start(editor.stylegan.sample(7))
    for method in expected:
        out = editor.edit(session, text="blue hair", method=method, steps=30)
        assert out.clip_score_after > out.clip_score_before, (method, out)


def test_ungrounded_text_carries_a_warning(editor):
    session = editor.start(editor.stylegan.sample(8))
    out = editor.edit(session, text="make it a car", method=editor.methods()[-1], steps=10)
    assert out.warnings
