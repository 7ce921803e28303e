"""The CLIP edit tab: built with tiny models (its controls and API), hidden without a CLIP, and its
handlers: a typed edit changes the portrait, undo steps back, bad input gives a message."""


import gradio as gr
import open_clip
import pytest
import torch

from pipelines.clip_edit import GlobalDirections
from pipelines.clip_models import save_clip
from pipelines.stylegan_io import save_generator
from studio.registry import ModelRegistry, add_local
from studio.tabs import clip_edit
from tests._tiny import register_tiny_clip, tiny_generator, tiny_world_evaluator
from studio.tabs.clip_edit import CLIPEditorCache, apply_text_edit, start_from_sample, start_from_session, undo_edit

TINY = "PortraitCLIP-Test-Tab"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (the shared fixture in conftest.py)."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    register_tiny_clip(root / "cfg", TINY)
    save_generator(tiny_generator(0, map_layers=1), root / "G")
    save_clip(open_clip.create_model(TINY), root / "clip", model_name=TINY, fp16=False)
    tiny_world_evaluator().save_pretrained(root / "evaluator", fp16=False)
    return root


def _registry(folders, *, with_clip=True):
    reg = ModelRegistry("cpu")
    add_local(reg, folders / "G", name="tiny G")
    add_local(reg, folders / "evaluator", name="tiny evaluator")
    if with_clip:
        add_local(reg, folders / "clip", name="tiny CLIP")
    return reg


def _build(reg, with_source=False):
    with gr.Blocks() as demo:
        with gr.Tabs():
            source = gr.State(None) if with_source else None
            out = clip_edit.build(reg, demo, source_state=source)
    return demo, out


def _labels_and_ids(demo):
    comps = demo.get_config_file()["components"]
    return ([c.get("props", {}).get("label") for c in comps], {c.get("props", {}).get("elem_id") for c in comps})


def test_tab_is_built_with_a_clip_and_a_generator_and_hidden_without_a_clip(folders):
    demo, out = _build(_registry(folders), with_source=True)
    labels, ids = _labels_and_ids(demo)
    assert "CLIP edit" in labels and out is not None
    assert {"clip_text", "clip_apply", "clip_after", "clip_before", "clip_method", "clip_alpha", "clip_beta",
            "clip_neutral", "clip_undo", "clip_info", "clip_from_stylegan", "clip_sample", "clip_upload"} <= ids
    api = {d.get("api_name") for d in demo.get_config_file()["dependencies"]}
    assert {"clip_edit", "clip_sample"} <= api
    demo, out = _build(_registry(folders, with_clip=False))
    labels, ids = _labels_and_ids(demo)
    assert out is None and "CLIP edit" not in labels and "clip_text" not in ids


def test_a_typed_edit_changes_the_portrait_chains_and_undoes(folders, tmp_path):
    reg = _registry(folders)
    editors = CLIPEditorCache(reg)
    assert editors.get("tiny G", "tiny CLIP").vocabulary is not None     # a PortraitCLIP: the world's words
    session, before, after, info, history = start_from_sample(editors, "tiny G", "tiny CLIP", 3)
    assert list(before.getdata()) == list(after.getdata()) and "sample (seed 3)" in info
    out, info, history = apply_text_edit(editors, "tiny CLIP", session, text="blue hair", method="optimise", steps=8)
    assert list(out.image.getdata()) != list(after.getdata())          # the portrait changed
    assert "CLIP score" in info and " s" in info and "1\\. optimise: blue hair" in history
    out2, _, history2 = apply_text_edit(editors, "tiny CLIP", out.session, text="glasses", method="optimise", steps=4)
    assert "2\\. optimise: glasses" in history2
    session3, before3, after3, _, history3 = undo_edit(editors, "tiny CLIP", out2.session)
    assert len(session3.history) == 2 and list(after3.getdata()) == list(out.image.getdata())
    assert "2\\. " not in history3
    # bad input: a clear message, and the state is left as it was
    with pytest.raises(ValueError, match="type what"):
        apply_text_edit(editors, "tiny CLIP", session3, text="", method="optimise")
    with pytest.raises(ValueError, match="start from a portrait"):
        apply_text_edit(editors, "tiny CLIP", None, text="glasses", method="optimise")
    with pytest.raises(ValueError, match="needs global directions"):
        apply_text_edit(editors, "tiny CLIP", session3, text="glasses", method="global")
    # ungrounded text: a visible warning
    out, info, _ = apply_text_edit(editors, "tiny CLIP", session3, text="make it a car", method="optimise", steps=2)
    assert "⚠️" in info and "'car'" in info
    # the StyleGAN edit tab's session is a source too; none there gives a message
    stylegan_session = editors.stylegan.get("tiny G").sample(5)
    taken = start_from_session(editors, "tiny CLIP", stylegan_session)[0]
    assert torch.equal(taken.current.w_plus, stylegan_session.w_plus)
    with pytest.raises(ValueError, match="StyleGAN edit tab has no portrait"):
        start_from_session(editors, "tiny CLIP", None)


def test_global_directions_in_the_generator_folder_add_the_method(folders, tmp_path):
    import shutil

    G_folder = tmp_path / "G"
    shutil.copytree(folders / "G", G_folder)
    reg = ModelRegistry("cpu")
    add_local(reg, G_folder, name="G with directions")
    add_local(reg, folders / "clip", name="tiny CLIP")
    GlobalDirections.compute(reg.get("G with directions"), reg.get("tiny CLIP"), num_samples=2, channel_batch=16,
                             std_samples=100).save(G_folder / "clip_global_directions")
    editors = CLIPEditorCache(reg)
    assert editors.get("G with directions", "tiny CLIP").methods() == ["optimise", "global"]
    session = start_from_sample(editors, "G with directions", "tiny CLIP", 0)[0]
    out, info, _ = apply_text_edit(editors, "tiny CLIP", session, text="blue hair", method="global", alpha=5, beta=0.0)
    assert "style channels changed" in info and out.session.current.style_offsets is not None


def test_the_app_shows_the_tab_only_with_a_clip_and_takes_the_stylegan_session(folders, tmp_path):
    from studio.app import build_app

    labels = lambda demo: _labels_and_ids(demo)[0]  # noqa: E731
    demo = build_app(registry=_registry(folders), runs_dir=str(tmp_path / "runs"))
    assert "CLIP edit" in labels(demo) and "clip_from_stylegan" in _labels_and_ids(demo)[1]
    assert "CLIP edit" not in labels(build_app(registry=_registry(folders, with_clip=False),
                                               runs_dir=str(tmp_path / "runs")))
