"""CLIP edits on a tiny random StyleGAN2 and a tiny random open_clip model: style space, latent
optimisation, global directions, the mapper edit, and the editor's messages and undo history."""

from __future__ import annotations


import open_clip
import pytest
import torch

from models.clip_mapper import CLIPTextMapper
from models.stylegan2 import Generator
from pipelines.clip_edit import (NEUTRAL_TEXT, GlobalDirections, StyleSpace, clip_probe, edit_phrase, global_edit,
                                 load_mapper, mapper_edit, optimise_edit, probe_similarity, prompts_for, save_mapper,
                                 text_direction, text_embedding, unknown_words, world_vocabulary)
from pipelines.clip_edit_session import CLIPEditor
from pipelines.clip_models import LoadedCLIP
from pipelines.data.portrait_world import ATTRIBUTES
from pipelines.stylegan_inversion import synthesize
from pipelines.stylegan_session import StyleGANEditor
from tests._tiny import register_tiny_clip, tiny_generator, tiny_world_evaluator

TINY = "PortraitCLIP-Test-ClipEdit"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (the shared fixture in conftest.py)."""


def tiny_clip(tmp_path_factory, seed: int = 0) -> LoadedCLIP:
    register_tiny_clip(tmp_path_factory.mktemp("clip_cfg"), TINY)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    return LoadedCLIP(model.eval(), preprocess, open_clip.get_tokenizer(TINY))


tiny_evaluator = tiny_world_evaluator


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> LoadedCLIP:
    return tiny_clip(tmp_path_factory)


@pytest.fixture(scope="module")
def G() -> Generator:
    return tiny_generator()


def _w_plus(G: Generator, n: int, seed: int = 0) -> torch.Tensor:
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return G.mapping(z, None, skip_w_avg_update=True)


# -- style space -------------------------------------------------------------------------------

def test_zero_offsets_reproduce_synthesis_exactly_and_an_offset_equals_a_shifted_affine_bias(G):
    space = StyleSpace(G)
    w = _w_plus(G, 2)
    convs, torgbs = G.num_ws - 1, len(G.synthesis.block_resolutions)
    assert space.num_channels == sum(space.channels) and len(space.names) == convs + torgbs
    with torch.no_grad():
        ref = synthesize(G, w)
        zeros = {name: torch.zeros(c) for name, c in zip(space.names, space.channels)}
        assert torch.equal(space.synthesize(w, zeros), ref)
        assert torch.equal(space.synthesize(w, None), ref)
        # an offset on one layer's style is the same as moving that affine's bias
        name, c = space.names[3], space.channels[3]
        delta = torch.randn(c, generator=torch.Generator().manual_seed(3))
        edited = space.synthesize(w, {name: delta})
        affine = dict((n, a) for _, n, a in space.layers)[name]
        bias = affine.bias.detach().clone()
        affine.bias.data += delta / affine.bias_gain
        try:
            shifted = synthesize(G, w)
        finally:
            affine.bias.data.copy_(bias)
        torch.testing.assert_close(edited, shifted, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(edited, ref)
        # the hooks are gone after the block, per-image offsets broadcast over the batch
        assert torch.equal(synthesize(G, w), ref)
        per_image = space.synthesize(w, {name: torch.stack([torch.zeros(c), delta])})
        assert torch.equal(per_image[0], ref[0]) and torch.allclose(per_image[1], edited[1], atol=1e-6)
    styles = space.styles(w)
    assert [s.shape for s in styles.values()] == [(2, c) for c in space.channels]
    flat = space.flatten(styles)
    assert all(torch.equal(a, b) for a, b in zip(space.split(flat).values(), styles.values()))
    with pytest.raises(ValueError, match="no style layer"):
        with space.offsets({"b4.nope": torch.zeros(3)}):
            pass


# -- text ----------------------------------------------------------------------------------------

def test_texts_are_templated_truncated_with_a_note_and_checked_against_the_vocabulary(clip):
    assert prompts_for("blue hair") == ["an anime portrait with blue hair", "an anime girl with blue hair"]
    assert prompts_for("make it smile")[0] == "an anime portrait with smile"
    assert prompts_for("an anime girl with glasses") == ["an anime girl with glasses"]
    with pytest.raises(ValueError, match="empty"):
        prompts_for("   ")
    short = text_embedding(clip, "blue hair")
    assert short.notes == [] and abs(float(short.vector.norm()) - 1) < 1e-5
    long = text_embedding(clip, "an anime girl with " + " and ".join(["blue hair", "round glasses"] * 6))
    assert long.notes and "truncated" in long.notes[0] and "context of 16 tokens" in long.notes[0]
    delta = text_direction(clip, "blue hair", "")
    assert delta.prompts[-1] == NEUTRAL_TEXT and abs(float(delta.vector.norm()) - 1) < 1e-5
    with pytest.raises(ValueError, match="same"):
        text_direction(clip, NEUTRAL_TEXT, NEUTRAL_TEXT)
    vocab = world_vocabulary()
    assert {"hair", "blue", "glasses", "smile"} <= vocab
    assert unknown_words("make it a car", vocab) == ["car"]
    assert unknown_words("make the hair blue and add glasses", vocab) == []
    assert edit_phrase({"hair_color": "blue", "glasses": "yes"}) == "blue hair and glasses"


# -- latent optimisation ---------------------------------------------------------------------------

def test_optimisation_raises_the_clip_score_and_keeps_the_latent_near_the_source(G, clip):
    w = _w_plus(G, 2)
    calls = []
    res = optimise_edit(G, clip, w, "blue hair", steps=25, lr=0.3, l2_weight=1e-4, preservation="none",
                        callback=lambda i, n, p: calls.append((i, n, p)))
    assert res.w_plus.shape == w.shape and res.images.shape == (2, 3, 16, 16)
    assert (res.clip_score_after > res.clip_score_before).all(), (res.clip_score_before, res.clip_score_after)
    assert res.loss_history[-1] < res.loss_history[0]
    assert [c[0] for c in calls] == list(range(1, 26)) and calls[-1][2] is not None
    # a strong L2 weight keeps the latent closer to the source
    tight = optimise_edit(G, clip, w, "blue hair", steps=25, lr=0.3, l2_weight=10.0, preservation="none")
    assert (tight.w_plus - w).norm() < (res.w_plus - w).norm()
    # preservation by the evaluator's attributes and features runs (the evaluator must be given)
    ev = tiny_evaluator()
    for mode in ("attributes", "features"):
        out = optimise_edit(G, clip, w[:1], "glasses", steps=3, preservation=mode, evaluator=ev)
        assert torch.isfinite(out.clip_score_after).all()
    with pytest.raises(ValueError, match="evaluator"):
        optimise_edit(G, clip, w, "glasses", steps=2, preservation="attributes")
    with pytest.raises(ValueError, match="empty"):
        optimise_edit(G, clip, w, "  ", steps=2, preservation="none")
    directional = optimise_edit(G, clip, w[:1], "blue hair", steps=5, clip_loss="directional", preservation="none")
    assert torch.isfinite(directional.w_plus).all()


# -- global directions -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def directions(G, clip) -> GlobalDirections:
    progress = []
    d = GlobalDirections.compute(G, clip, num_samples=3, channel_batch=8, std_samples=200,
                                 generator=torch.Generator().manual_seed(0),
                                 callback=lambda i, n, _p: progress.append((i, n)))
    assert progress[-1] == (d.num_channels, d.num_channels)
    return d


def test_global_directions_shapes_thresholds_and_round_trip(G, clip, directions, tmp_path):
    space = StyleSpace(G, include_torgb=False)
    assert directions.relevance.shape == (space.num_channels, 16)
    assert directions.style_std.shape == (space.num_channels,)
    torch.testing.assert_close(directions.relevance.norm(dim=1), torch.ones(space.num_channels), atol=1e-4, rtol=0)
    assert (directions.style_std > 0).all()
    delta_t = text_direction(clip, "blue hair").vector
    offsets, kept = directions.delta_styles(delta_t, alpha=3.0, beta=1.0)
    assert kept == 0 and all(float(o.abs().sum()) == 0 for o in offsets.values())
    offsets, kept = directions.delta_styles(delta_t, alpha=3.0, beta=0.0)
    assert kept == space.num_channels
    flat = torch.cat(list(offsets.values()))
    assert float((flat.abs() / directions.style_std).max()) == pytest.approx(3.0, rel=1e-5)  # alpha sigma at the peak
    mid_beta = float(directions.channel_scores(delta_t).abs().median())
    _, kept_mid = directions.delta_styles(delta_t, alpha=3.0, beta=mid_beta)
    assert 0 < kept_mid < space.num_channels
    styles = space.styles(_w_plus(G, 2))
    edited, kept = directions.edit(styles, delta_t, alpha=2.0, beta=0.0)
    assert kept == space.num_channels and all(edited[k].shape == styles[k].shape for k in styles)
    # save / load round trip, and a check against the generator and the CLIP
    directions.save(tmp_path / "dirs")
    loaded = GlobalDirections.load(tmp_path / "dirs")
    assert torch.equal(loaded.relevance, directions.relevance) and loaded.layers == directions.layers
    assert loaded.meta["num_samples"] == 3
    loaded.check(G, clip)
    with pytest.raises(ValueError, match="another generator"):
        loaded.check(Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=8, img_channels=3,
                               synthesis_kwargs={"channel_base": 256, "channel_max": 16}))
    with pytest.raises(FileNotFoundError):
        GlobalDirections.load(tmp_path / "nothing")
    res = global_edit(G, clip, directions, _w_plus(G, 2), "blue hair", alpha=3.0, beta=0.0)
    assert res.num_channels == space.num_channels and res.images.shape == (2, 3, 16, 16)
    assert not torch.allclose(res.images, synthesize(G, _w_plus(G, 2)))


def test_clip_probe_tells_clip_models_apart(clip, tmp_path_factory):
    other = tiny_clip(tmp_path_factory, seed=5)
    assert probe_similarity(clip_probe(clip), clip_probe(clip)) == pytest.approx(1.0, abs=1e-5)
    assert probe_similarity(clip_probe(clip), clip_probe(other)) < 0.99


# -- mapper ------------------------------------------------------------------------------------------

def test_mapper_edit_and_its_files(G, clip, tmp_path):
    mapper = CLIPTextMapper(G.num_ws, G.w_dim, 16, hidden=16, num_layers=2)
    w = _w_plus(G, 3)
    res = mapper_edit(G, clip, mapper, w, "glasses")
    assert torch.equal(res.w_plus, w)          # an untrained mapper (zero output layer) is the identity
    with torch.no_grad():
        for group in mapper.mappers.values():
            group.out.weight.normal_(0, 0.1)
    res = mapper_edit(G, clip, mapper, w, "glasses")
    assert not torch.allclose(res.w_plus, w) and res.seconds > 0
    save_mapper(mapper, tmp_path / "m", probe=clip_probe(clip), clip_source="tiny")
    loaded, probe = load_mapper(tmp_path / "m")
    assert probe is not None and probe_similarity(probe, clip_probe(clip)) > 0.999
    assert torch.equal(mapper_edit(G, clip, loaded, w, "glasses").w_plus, res.w_plus)


# -- the editor ------------------------------------------------------------------------------------

def test_editor_chains_edits_undoes_them_and_warns(G, clip, directions):
    stylegan = StyleGANEditor(G, name="tiny", evaluator=tiny_evaluator())
    mapper = CLIPTextMapper(G.num_ws, G.w_dim, 16, hidden=16, num_layers=2)
    editor = CLIPEditor(stylegan, clip, clip_name="TinyCLIP", mapper=mapper, directions=directions,
                        vocabulary=world_vocabulary())
    assert editor.methods() == ["optimise", "global", "mapper"]
    session = editor.start(stylegan.sample(3))
    assert not session.can_undo and session.current.label.startswith("source")
    with pytest.raises(ValueError, match="type what"):
        editor.edit(session, text="  ", method="optimise")
    with pytest.raises(ValueError, match="unknown method"):
        editor.edit(session, text="glasses", method="magic")

    out = editor.edit(session, text="blue hair", method="global", alpha=3.0, beta=0.0)
    assert out.num_channels == directions.num_channels and any("style channels changed" in n for n in out.notes)
    assert out.image.size == (16, 16) and out.session.can_undo and len(out.session.history) == 2
    assert out.session.current.style_offsets is not None
    # the next edit starts from the global edit: its "before" is that image
    out2 = editor.edit(out.session, text="glasses", method="optimise", steps=3)
    assert list(out2.before.getdata()) == list(out.image.getdata())
    assert out2.session.current.style_offsets is not None and len(out2.session.history) == 3
    back = editor.undo(out2.session)
    assert len(back.history) == 2 and list(editor.render(back).getdata()) == list(out.image.getdata())
    with pytest.raises(ValueError, match="nothing to undo"):
        editor.undo(editor.undo(back))

    # an untrained mapper changes nothing: the result carries a low-score warning
    same = editor.edit(session, text="glasses", method="mapper")
    assert any("low CLIP score" in w for w in same.warnings)
    # text this CLIP never read: a visible warning, not a silent change
    car = editor.edit(session, text="make it a car", method="mapper")
    assert any("'car'" in w and "cannot ground" in w for w in car.warnings)
    # text longer than the context: truncated, with a note
    long = editor.edit(session, text="blue hair, " * 12 + "and glasses", method="mapper")
    assert any("truncated" in n for n in long.notes)
    bare = CLIPEditor(stylegan, clip)
    assert bare.methods() == ["optimise"]
    with pytest.raises(ValueError, match="needs global directions"):
        bare.edit(session, text="glasses", method="global")


def test_editor_finds_matching_assets_in_the_generator_folder(G, clip, directions, tmp_path, tmp_path_factory):
    from pipelines.stylegan_io import save_generator

    folder = save_generator(G, tmp_path / "G")
    directions.save(folder / "clip_global_directions")
    mapper = CLIPTextMapper(G.num_ws, G.w_dim, 16, hidden=16, num_layers=2)
    save_mapper(mapper, folder / "clip_mapper", probe=clip_probe(clip))
    stylegan = StyleGANEditor.from_folder(folder)
    editor = CLIPEditor.from_stylegan(stylegan, clip)
    assert editor.methods() == ["optimise", "global", "mapper"] and editor.load_notes == []
    other = CLIPEditor.from_stylegan(stylegan, tiny_clip(tmp_path_factory, seed=7))
    assert other.methods() == ["optimise"]
    assert any("another CLIP" in n for n in other.load_notes) and len(other.load_notes) == 2


class _StubReader:
    """An evaluator stand-in whose reading of the edited image differs in hair and eye colour."""

    def predict_attributes(self, images):
        base = {name: values[0] for name, values in ATTRIBUTES.items()}
        return [base, {**base, "hair_color": "blue", "eye_color": "red"}]


def test_editor_warns_about_changes_the_text_did_not_ask_for(G, clip):
    stylegan = StyleGANEditor(G, name="tiny")
    mapper = CLIPTextMapper(G.num_ws, G.w_dim, 16, hidden=16, num_layers=2)
    editor = CLIPEditor(stylegan, clip, mapper=mapper, evaluator=_StubReader())
    out = editor.edit(editor.start(stylegan.sample(0)), text="blue hair", method="mapper")
    also = [w for w in out.warnings if "also changed" in w]
    assert len(also) == 1 and "eye color (brown → red)" in also[0] and "hair color" not in also[0]


def test_mentioned_attributes_parse_world_phrases_and_fall_back_to_value_words():
    from pipelines.clip_edit import mentioned_attributes

    assert mentioned_attributes("blue hair and glasses") == {"hair_color", "glasses"}
    assert mentioned_attributes("make the hair blue") == {"hair_color", "eye_color"}
    assert mentioned_attributes("make it a car") == set()
