"""The Distill / train tab: key settings per method, the off switch, and the launch wiring."""

import pytest

from pipelines.run_manager import METHODS
from studio.registry import ModelRegistry
from studio.tabs.train import format_eta, key_fields


def test_key_fields_name_each_methods_step_budget_batch_and_learning_rate():
    for key, spec in METHODS.items():
        fields = key_fields(key)
        assert spec.steps_field in fields and fields[spec.steps_field] > 0
        assert {"batch", "batch_size"} & set(fields), key
        assert {"lr", "lr_g", "lr_generator"} & set(fields), key


def test_eta_format():
    assert format_eta(None) == "" and format_eta(75) == "1m15s" and format_eta(3725) == "1h02m"


@pytest.mark.parametrize("kwargs,env,shown", [
    ({}, {}, True),
    ({"allow_training": False}, {}, False),
    ({}, {"SPACE_ID": "someone/studio"}, False),
])
def test_training_is_off_on_spaces_and_with_no_train(tmp_path, monkeypatch, kwargs, env, shown):
    from studio.app import build_app

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    demo = build_app(registry=ModelRegistry("cpu"), runs_dir=str(tmp_path / "runs"), **kwargs)
    config = demo.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert ("train_launch" in ids) is shown
    assert ("train_off" in ids) is not shown
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    assert "Distill / train" in labels


def test_estimate_button_shows_time_and_memory_before_launch(tmp_path, monkeypatch):
    import gradio as gr

    from pipelines import run_manager
    from studio.app import build_app
    from tests.pipelines.test_run_manager import FAKE

    monkeypatch.setitem(run_manager.METHODS, "fake", FAKE)
    demo = build_app(registry=ModelRegistry("cpu"), runs_dir=str(tmp_path / "runs"))
    estimate = next(f.fn for f in demo.fns.values() if f.api_name == "train_estimate")
    text = estimate("fake", "", "quick demo", '{"steps": 3000, "step_seconds": 0.05}')
    assert "3000 steps" in text and "GB host" in text and "min" in text
    with pytest.raises(gr.Error, match="lr must be positive"):
        estimate("fake", "", "quick demo", '{"lr": -1}')
    with pytest.raises(gr.Error, match="not valid JSON"):
        estimate("fake", "", "quick demo", '{"steps": ')
    assert not any((tmp_path / "runs").iterdir())  # nothing launched, no scratch left


def test_use_targets_list_the_new_model_and_select_it_only_in_the_tab_that_serves_it(tmp_path):
    from studio.registry import ModelSpec
    from studio.tabs.train import UseTarget

    registry = ModelRegistry("cpu")
    for name, kind in (("base", "stylegan2"), ("enc (run)", "stylegan2"), ("student", "text_to_image")):
        registry.register(ModelSpec(name, kind, "local", str(tmp_path / name), loader=lambda *a: None))
    drawn = ["base"]                                   # say only "base" carries a sketch encoder
    edit = UseTarget("stylegan2", None, selects=("stylegan2", "stylegan_encoder"))
    sketch = UseTarget("stylegan2", None, selects=("sketch_encoder",), choices=lambda r: drawn)
    t2i = UseTarget("text_to_image", None, selects=("text_to_image",))

    # an inversion encoder run: StyleGAN edit lists and selects it; the sketch tab's filter leaves it out
    assert edit.update(registry, "enc (run)", "stylegan2", "stylegan_encoder") == {
        "__type__": "update", "choices": ["base", "enc (run)"], "value": "enc (run)"}
    assert sketch.update(registry, "enc (run)", "stylegan2", "stylegan_encoder") == {
        "__type__": "update", "choices": ["base"]}
    assert t2i.update(registry, "enc (run)", "stylegan2", "stylegan_encoder") == {"__type__": "update"}
    # a sketch encoder run: listed and selected in the sketch tab, only listed in StyleGAN edit
    drawn.append("enc (run)")
    assert sketch.update(registry, "enc (run)", "stylegan2", "sketch_encoder")["value"] == "enc (run)"
    assert "value" not in edit.update(registry, "enc (run)", "stylegan2", "sketch_encoder")
