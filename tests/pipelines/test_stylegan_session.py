"""The StyleGAN edit session on a tiny random generator: sources, inversion, edits, files, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from models.evaluator import AttributeEvaluator
from models.stylegan2 import Generator
from models.stylegan2.encoder import StyleGANEncoder
from pipelines.evaluation import Evaluator
from pipelines.stylegan_editing import Direction, cluster_modes, save_directions
from pipelines.stylegan_inversion import save_encoder
from pipelines.stylegan_io import save_generator
from pipelines.stylegan_session import MAX_UPLOAD_SIDE, StyleGANEditor, load_upload


def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3,
                     mapping_kwargs={"num_layers": 2},
                     synthesis_kwargs={"channel_base": 256, "channel_max": 16}).eval()


def tiny_evaluator() -> Evaluator:
    torch.manual_seed(1)
    return Evaluator(AttributeEvaluator([("hair_color", 8), ("glasses", 2)], resolution=16, width=8, feature_dim=16))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A generator folder with what editing needs: directions, modes, an encoder."""
    root = tmp_path_factory.mktemp("sg")
    G = tiny_generator()
    save_generator(G, root)
    gen = torch.Generator().manual_seed(0)
    save_directions({
        "glasses=yes": Direction("glasses=yes", torch.nn.functional.normalize(torch.randn(16, generator=gen), dim=0),
                                 scale=0.5),
        "hair_color=blue": Direction("hair_color=blue",
                                     torch.nn.functional.normalize(torch.randn(16, generator=gen), dim=0), scale=0.5),
    }, root / "directions")
    cluster_modes(G, tiny_evaluator(), num_samples=64, k=3, generator=torch.Generator().manual_seed(0)).save(root / "modes")
    torch.manual_seed(2)
    save_encoder(StyleGANEncoder(num_ws=G.num_ws, w_dim=16, img_resolution=16, channel_base=64, channel_max=16),
                 root / "encoder")
    from pipelines.data.portrait_world import ATTRIBUTES
    from pipelines.stylegan_guided_edit import fit_latent_classifier, label_latents, sample_training_latents
    attrs = {k: ATTRIBUTES[k] for k in ("hair_color", "glasses")}
    w = sample_training_latents(G, 300, generator=torch.Generator().manual_seed(3))
    labels, _ = label_latents(G, tiny_evaluator(), w, list(attrs))
    fit_latent_classifier(w, labels, attrs, epochs=3, hidden=32)[0].save_pretrained(root / "latent_classifier")
    return root


@pytest.fixture
def editor(folder):
    from pipelines.stylegan_io import load_generator
    return StyleGANEditor(load_generator(folder), name="tiny", folder=folder, evaluator=tiny_evaluator())


def _pixels(image):
    return np.asarray(image, dtype=np.float32)


def test_the_folder_brings_directions_modes_and_encoder(editor):
    assert editor.named_edits() == {"Glasses": "glasses=yes"}
    assert editor.colour_values("hair_color") == ["blue"]
    assert editor.modes is not None and editor.modes.k == 3
    assert "encoder" in editor.methods() and "encoder+pti" in editor.methods()


def test_a_generator_without_extras_still_samples_and_edits_with_sefa():
    ed = StyleGANEditor(tiny_generator(), name="bare")
    assert ed.methods() == ["optimise-w", "optimise-w+", "optimise+pti"]
    s = ed.sample(3)
    vectors, labels = ed.sefa(0, ed.num_ws - 1)
    assert vectors.shape == (16, 16) and labels[0].startswith("SeFa 1")
    moved = ed.edit_latent(s, sefa=[3.0])
    assert not torch.allclose(moved, s.w_plus)
    with pytest.raises(ValueError, match="multi-modal"):
        ed.edit_latent(s, psi=0.5, truncation="multimodal")
    with pytest.raises(ValueError, match="encoder"):
        ed.invert(Image.new("RGB", (32, 32)), method="encoder")


def test_samples_are_seeded_and_edits_change_only_what_they_should(editor):
    a, b = editor.sample(5), editor.sample(5)
    assert torch.equal(a.w_plus, b.w_plus) and not torch.equal(a.w_plus, editor.sample(6).w_plus)
    base = _pixels(editor.render(a))
    assert np.array_equal(base, _pixels(editor.render(a, editor.edit_latent(a))))  # no edit = identity
    w = editor.edit_latent(a, edits={"Glasses": 2.0})
    d = editor.directions["glasses=yes"]
    assert torch.allclose(w - a.w_plus, (2.0 * d.scale * d.vector).expand_as(w), atol=1e-5)
    assert np.abs(_pixels(editor.render(a, w)) - base).mean() > 0.5
    # colour edit: target + strength
    wc = editor.edit_latent(a, colour_edits={"hair_color": ("blue", 1.0)})
    assert not torch.allclose(wc, a.w_plus)
    # SeFa on a layer range moves only those ws
    ws = editor.edit_latent(a, sefa=[2.0], sefa_layers=(1, 2))
    changed = (ws - a.w_plus).abs().sum(-1)[0] > 0
    assert changed.tolist() == [i in (1, 2) for i in range(editor.num_ws)]
    # truncation: psi 0 lands on the mean / the nearest mode
    w0 = editor.edit_latent(a, psi=0.0)
    assert torch.allclose(w0[0], editor.G.mapping.w_avg.expand_as(w0[0]), atol=1e-5)
    wm = editor.edit_latent(a, psi=0.0, truncation="multimodal")
    centre = editor.modes.centres[editor.modes.nearest(a.w_plus)]
    assert torch.allclose(wm[0], centre.expand_as(wm[0]), atol=1e-5)


def test_guided_edits_follow_the_latent_classifier_and_are_cached(editor):
    assert ("glasses: yes", "glasses=yes") in editor.guided_choices() and len(editor.guided_choices()) == 10
    a = editor.sample(4)
    clf = editor.latent_classifier
    start = float(torch.softmax(clf(a.w_plus)["glasses"], 1)[0, 1])
    target = "glasses=yes" if start < 0.5 else "glasses=no"
    w = editor.edit_latent(a, guided=[target])
    p = float(torch.softmax(clf(w)["glasses"], 1)[0, 1 if target == "glasses=yes" else 0])
    assert p >= 0.9 and not torch.equal(w, a.w_plus)
    assert torch.equal(editor.edit_latent(a, guided=[target]), w) and len(editor._guided_cache) == 1
    # the sliders act on the guided result
    both = editor.edit_latent(a, guided=[target], edits={"Glasses": 1.0})
    d = editor.directions["glasses=yes"]
    assert torch.allclose(both - w, (d.scale * d.vector).expand_as(w), atol=1e-5)
    with pytest.raises(ValueError, match="one value per attribute"):
        editor.edit_latent(a, guided=["glasses=yes", "glasses=no"])
    with pytest.raises(ValueError, match="attribute=value"):
        editor.edit_latent(a, guided=["wings"])
    with pytest.raises(ValueError, match="no latent classifier"):
        StyleGANEditor(tiny_generator(), name="bare").edit_latent(a, guided=["glasses=yes"])


@pytest.mark.parametrize("kwargs,fragment", [
    ({"edits": {"Wings": 1.0}}, "no direction"),
    ({"colour_edits": {"hair_color": ("plaid", 1.0)}}, "no direction"),
    ({"psi": 3.0}, "psi"),
    ({"truncation": "radial", "psi": 0.5}, "truncation"),
    ({"sefa": [1.0], "sefa_layers": (3, 1)}, "layer range"),
])
def test_bad_edits_are_readable_errors(editor, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        editor.edit_latent(editor.sample(0), **kwargs)


def test_inversion_by_optimisation_reconstructs_better_than_the_mean(editor):
    target_session = editor.sample(11)
    target = editor.render(target_session)
    big = target.resize((200, 120))  # any size: centre-cropped and resized
    s = editor.invert(big, method="optimise-w+", steps=60, seed=0)
    assert s.w_plus.shape == (1, editor.num_ws, 16) and s.info["seconds"] > 0
    mean_session = editor.sample(0)
    mean_session.w_plus = editor.G.mapping.w_avg.expand(1, editor.num_ws, -1).clone()
    crop = _pixels(s.target)
    err = np.abs(_pixels(editor.render(s)) - crop).mean()
    err_mean = np.abs(_pixels(editor.render(mean_session)) - crop).mean()
    assert err < err_mean
    assert s.info["reconstruction_error"] >= 0


def test_pti_keeps_its_tuned_weights_in_the_session_only(editor):
    before = {k: v.clone() for k, v in editor.G.synthesis.state_dict().items()}
    s = editor.invert(editor.render(editor.sample(2)), method="encoder+pti", pti_steps=15)
    assert s.tuned_state is not None
    assert all(torch.equal(before[k], v) for k, v in editor.G.synthesis.state_dict().items())
    plain = editor.sample(2)
    plain.w_plus = s.w_plus
    assert not np.array_equal(_pixels(editor.render(s)), _pixels(editor.render(plain)))


def test_latent_export_round_trips_and_bad_latent_files_are_refused(editor, tmp_path):
    s = editor.sample(4)
    w = editor.edit_latent(s, edits={"Glasses": 1.0})
    path = editor.save_latent(s, w, tmp_path / "latent.npz")
    back = editor.load_latent(path)
    assert torch.equal(back.w_plus, w)
    np.save(tmp_path / "w.npy", w[0, 0].numpy())  # a single w broadcasts to every layer
    assert editor.load_latent(tmp_path / "w.npy").w_plus.shape == w.shape
    np.save(tmp_path / "bad.npy", np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="shape"):
        editor.load_latent(tmp_path / "bad.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a latent file"):
        editor.load_latent(tmp_path / "junk.npz")


def test_uploads_non_images_huge_images_and_faceless_photos(tmp_path, editor):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not an image"):
        load_upload(text)
    huge = Image.new("RGBA", (MAX_UPLOAD_SIDE + 904, 1000), (10, 20, 30, 0))
    image, notes = load_upload(huge)
    assert image.mode == "RGB" and max(image.size) == MAX_UPLOAD_SIDE and "downscaled" in notes[0]
    with pytest.raises(ValueError, match="no face"):
        editor.invert(Image.new("RGB", (300, 300), "white"), method="encoder", align=True)
