"""The embedded StyleGAN2 and what ships beside it: it draws portraits, its encoder inverts them,
its directions edit them, and the raw (unfiltered) generator is there for self-filtering."""

import json

import numpy as np
import pytest
import torch

from pipelines.data.portrait_world import PortraitWorld
from pipelines.evaluation import EMBEDDED_EVALUATOR, Evaluator
from pipelines.stylegan_session import StyleGANEditor
from studio.registry import ASSETS_DIR, default_registry

pytestmark = pytest.mark.weights
FOLDER = ASSETS_DIR / "stylegan2_portraits64"


@pytest.fixture(scope="module")
def editor():
    return StyleGANEditor.from_folder(FOLDER, evaluator=Evaluator.from_pretrained(EMBEDDED_EVALUATOR))


def test_the_embedded_generator_is_registered_and_fp16_with_a_card():
    reg = default_registry("cpu")
    assert "Portrait StyleGAN2-ADA 64 px (embedded)" in reg.names("stylegan2")
    card = json.loads((FOLDER / "card.json").read_text())
    assert "train_stylegan2" in card["command"] and card["config"]["init_from"]
    from safetensors import safe_open
    with safe_open(str(FOLDER / "model.safetensors"), "pt") as f:
        assert f.get_tensor("synthesis.b64.conv1.weight").dtype == torch.float16
    raw = json.loads((ASSETS_DIR / "stylegan2_portraits64_raw" / "card.json").read_text())
    assert raw["config"]["outlier_rate"] == 0.1


def test_samples_look_like_portraits_to_the_evaluator(editor):
    images = [editor.render(editor.sample(seed)) for seed in range(24)]
    outlier = editor.evaluator.run(images)["outlier_score"]
    assert float((outlier < 0.5).float().mean()) >= 0.75
    assert np.asarray(images[0]).std() > 10  # not a flat image


def test_the_encoder_inverts_a_held_out_portrait_better_than_the_mean(editor):
    world = PortraitWorld()
    image = world.render(world.sample_attributes(np.random.default_rng(1), split="heldout"), seed=77, size=64).image
    s = editor.invert(image, method="encoder")
    mean = editor.sample(0)
    mean.w_plus = editor.G.mapping.w_avg.float().expand(1, editor.num_ws, -1).clone()
    target = np.asarray(s.target, dtype=float)
    assert np.abs(np.asarray(editor.render(s), float) - target).mean() < np.abs(
        np.asarray(editor.render(mean), float) - target).mean()


def test_the_glasses_direction_puts_glasses_on(editor):
    assert {"Smile", "Glasses"} <= set(editor.named_edits())
    sessions = [editor.sample(seed) for seed in range(40)]
    before = [editor.read(editor.render(s))["glasses"] for s in sessions]
    todo = [s for s, b in zip(sessions, before) if b == "no"][:12]
    after = [editor.read(editor.render(s, editor.edit_latent(s, edits={"Glasses": 3.0})))["glasses"] for s in todo]
    assert np.mean([a == "yes" for a in after]) >= 0.75


def test_guided_edits_change_the_attribute_and_keep_the_rest(editor):
    from pipelines.stylegan_guided_edit import guided_edit
    from pipelines.stylegan_inversion import synthesize

    assert editor.latent_classifier is not None and editor.latent_classifier.members == 3
    assert editor.latent_classifier.has_prototypes
    # held-out world portraits through the encoder, as the benchmark edits them (raw samples are
    # less stable: any change flips more of their readings)
    from pipelines.images import pil_to_tensor
    world = PortraitWorld()
    rng = np.random.default_rng(11)
    photos = [world.render(world.sample_attributes(rng, split="heldout"), seed=i, size=64).image for i in range(80)]
    with torch.no_grad():
        w = editor.encoder(pil_to_tensor(photos, size=64))
        before = editor.evaluator.predict_attributes(synthesize(editor.G, w))
    todo = [i for i, r in enumerate(before) if r["hair_color"] != "pink"]
    edited = guided_edit(editor.latent_classifier, w[todo], "hair_color=pink").w_plus
    with torch.no_grad():
        after = editor.evaluator.predict_attributes(synthesize(editor.G, edited))
    success = np.mean([a["hair_color"] == "pink" for a in after])
    kept = np.mean([a[k] == before[i][k] for i, a in zip(todo, after) for k in a if k != "hair_color"])
    assert success >= 0.75 and kept >= 0.85, (success, kept)  # benchmark (60 pink edits): 0.87 and 0.92


def test_the_embedded_sketch_pipeline_follows_complete_sketches_and_seeds_choose_the_colours():
    """Held-out complete sketches through the shipped sketch encoder: the structural attributes come
    back (the benchmark reads 0.85 on 200), and the colour seeds, carried into the structure ws by
    the colour basis, give each candidate its own skin tone and hair colour. A half-drawn face is
    finished differently by each candidate (the encoder's completion code)."""
    from benchmarks.sketch import attr_match, held_out_portraits
    from pipelines.sketch_to_image import SketchToImagePipeline

    pipe = SketchToImagePipeline.from_pretrained(FOLDER, FOLDER / "sketch_encoder", evaluator_path=EMBEDDED_EVALUATOR)
    assert pipe.colour_basis is not None and pipe.colour_basis.shape[1] >= 8
    portraits = held_out_portraits(40, seed=9_200_000)
    outputs = [pipe(sketch=p.line_art, colour_seed=i).images[0] for i, p in enumerate(portraits)]
    assert attr_match(pipe.evaluator, outputs, portraits) >= 0.8

    def colours(transfer: bool) -> set:
        out = pipe(sketch=portraits[0].line_art, num_candidates=12, colour_seed=100, transfer_colours=transfer)
        return {(a["skin_tone"], a["hair_color"]) for a in out.attributes}

    assert len(colours(True)) >= 6 and len(colours(True)) > len(colours(False))

    from pipelines.sketch_data import partial_strokes, render_strokes

    assert pipe.completion_dim > 0
    half = render_strokes(partial_strokes(portraits[1].strokes, 0.5), size=256)
    out = pipe(sketch=half, num_candidates=8, colour_seed=0)
    assert len({(a["hair_style"], a["glasses"], a["accessory"]) for a in out.attributes}) >= 3
