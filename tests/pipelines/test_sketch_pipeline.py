"""SketchToImagePipeline on tiny random components: structure from the sketch, colours from seeds or a
reference, N candidates, empty canvases and photos handled with notes, save/load round trip."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from models.evaluator import AttributeEvaluator
from models.stylegan2 import Generator
from models.stylegan2.encoder import StyleGANEncoder
from models.stylegan2.sketch_encoder import SketchEncoder, default_structure_layers
from pipelines.data.portrait_world import ATTRIBUTES, PortraitWorld
from pipelines.evaluation import Evaluator
from pipelines.sketch_data import EMPTY_NOTE, PHOTO_NOTE
from pipelines.sketch_to_image import (SketchToImagePipeline, load_sketch_encoder, save_sketch_encoder,
                                       sketch_to_tensor)
from pipelines.stylegan_inversion import save_encoder
from pipelines.stylegan_io import save_generator


def _generator() -> Generator:
    torch.manual_seed(0)
    G = Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3, mapping_kwargs={"num_layers": 2},
                  synthesis_kwargs={"channel_base": 256, "channel_max": 16})
    G.mapping.w_avg.normal_()  # a trained generator's w_avg is not zero
    return G.eval()


def _sketch_encoder(G: Generator, **kw) -> SketchEncoder:
    torch.manual_seed(1)
    enc = SketchEncoder(G.num_ws, G.w_dim, G.img_resolution, channel_base=128, channel_max=16, **kw)
    with torch.no_grad():
        for head in enc.heads.values():  # untrained heads output w_avg for every sketch: give them weights
            head.out.weight.normal_(0, 0.2)
    enc.w_avg.copy_(G.mapping.w_avg)
    return enc.eval()


@pytest.fixture(scope="module")
def pipe():
    G = _generator()
    return SketchToImagePipeline(G, _sketch_encoder(G))


@pytest.fixture(scope="module")
def drawing():
    return PortraitWorld(supersample=2).sample(2, size=64).line_art.resize((200, 200))


def test_sketch_encoder_reads_one_channel_and_records_structure_layers():
    G = _generator()
    enc = _sketch_encoder(G)
    assert enc.structure_layers == default_structure_layers(6, 16) == 3
    assert default_structure_layers(18, 1024) == 7 and default_structure_layers(10, 64) == 7
    assert SketchEncoder(**enc.init_kwargs).init_kwargs == enc.init_kwargs
    blank, drawn = torch.ones(1, 1, 16, 16), torch.ones(1, 1, 16, 16)
    drawn[:, :, 3:13, 5] = -1
    assert not torch.allclose(enc(blank), enc(drawn))
    with pytest.raises(ValueError, match="B, 1, H, W"):
        enc(torch.ones(1, 3, 16, 16))
    with pytest.raises(ValueError, match="structure_layers"):
        SketchEncoder(6, 16, 16, structure_layers=7)


def test_structure_from_the_sketch_colours_from_the_seed(pipe, drawing):
    out = pipe(sketch=drawing, num_candidates=3, colour_seed=5)
    assert len(out.images) == 3 and all(im.size == (16, 16) and im.mode == "RGB" for im in out.images)
    assert out.w_plus.shape == (3, 6, 16) and out.seeds == [5, 6, 7] and out.notes == [] and not out.is_empty
    k = pipe.structure_layers
    assert torch.allclose(out.w_plus[:1, :k].expand(3, -1, -1), out.w_plus[:, :k])  # one structure
    assert not torch.allclose(out.w_plus[0, k:], out.w_plus[1, k:])  # different colours
    assert out.sketch.mode == "L" and out.sketch.size == (16, 16)
    assert set(out.timings) >= {"prepare", "encode", "colour", "synthesis", "total"}

    # the same seed gives the same colours whatever the number of candidates; another sketch keeps them
    one = pipe(sketch=drawing, num_candidates=1, colour_seed=5)
    assert torch.allclose(one.w_plus[0], out.w_plus[0])
    other = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(other).ellipse((8, 8, 56, 56), outline=0, width=3)
    moved = pipe(sketch=other, colour_seed=5)
    assert torch.allclose(moved.w_plus[0, k:], out.w_plus[0, k:])
    assert not torch.allclose(moved.w_plus[0, :k], out.w_plus[0, :k])


def test_reference_latent_and_mix_layer(pipe, drawing):
    ref = torch.randn(6, 16)
    out = pipe(sketch=drawing, num_candidates=2, reference_w_plus=ref, mix_from_layer=2)
    assert out.seeds == [None, None]
    assert torch.allclose(out.w_plus[:, 2:], ref[2:].expand(2, -1, -1))
    full = pipe(sketch=drawing, mix_from_layer=6)  # no mixing: the sketch encoder's own W+
    x = sketch_to_tensor(full.sketch, 16)
    with torch.no_grad():
        assert torch.allclose(full.w_plus, pipe.sketch_encoder(x), atol=1e-6)
    for bad, match in [(dict(mix_from_layer=0), "mix_from_layer"), (dict(mix_from_layer=7), "mix_from_layer"),
                       (dict(num_candidates=0), "num_candidates"), (dict(colour_seed=-1), "colour_seed"),
                       (dict(reference_w_plus=torch.zeros(5, 16)), "reference_w_plus"),
                       (dict(reference_image=Image.new("RGB", (8, 8))), "image encoder")]:
        with pytest.raises(ValueError, match=match):
            pipe(sketch=drawing, **bad)


def test_reference_image_through_an_image_encoder(drawing):
    G = _generator()
    image_encoder = StyleGANEncoder(G.num_ws, G.w_dim, 16, channel_base=128, channel_max=16).eval()
    pipe = SketchToImagePipeline(G, _sketch_encoder(G), image_encoder=image_encoder)
    out = pipe(sketch=drawing, reference_image=Image.new("RGB", (40, 30), (200, 40, 40)))
    with torch.no_grad():
        expected = image_encoder(torch.tensor([200, 40, 40]).div(127.5).sub(1).view(1, 3, 1, 1).expand(1, 3, 16, 16))
    k = pipe.structure_layers
    assert torch.allclose(out.w_plus[0, k:], expected[0, k:], atol=1e-4)


@pytest.mark.parametrize("blank", [None, Image.new("RGBA", (300, 200), (0, 0, 0, 0)), Image.new("L", (64, 64), 255),
                                   np.full((32, 48, 3), 255, np.uint8)])
def test_empty_canvas_is_a_prompt_not_an_error(pipe, blank):
    out = pipe(sketch=blank, num_candidates=2, colour_seed=3)
    assert out.is_empty and out.notes == [EMPTY_NOTE] and len(out.images) == 2
    k = pipe.structure_layers
    w_avg = pipe.G.mapping.w_avg
    assert torch.allclose(out.w_plus[:, :k], w_avg.expand(2, k, -1))  # the mean structure
    assert out.seeds == [3, 4]


@pytest.mark.parametrize("mode", ["RGBA", "P", "1", "LA", "I"])
def test_any_size_and_mode(pipe, drawing, mode):
    img = drawing.convert("RGB").resize((123, 77)).convert(mode)
    out = pipe(sketch=img)
    assert not out.is_empty and out.notes == [] and len(out.images) == 1


def test_photo_gives_a_result_and_a_note(pipe):
    p = PortraitWorld(supersample=2).sample(4, size=64)
    out = pipe(sketch=p.image)
    assert out.notes == [PHOTO_NOTE] and not out.is_empty and len(out.images) == 1


def test_evaluator_names_what_each_portrait_shows():
    G = _generator()
    ev = Evaluator(AttributeEvaluator([(n, len(v)) for n, v in ATTRIBUTES.items()], resolution=16, width=8,
                                      feature_dim=16))
    out = SketchToImagePipeline(G, _sketch_encoder(G), evaluator=ev)(sketch=None, num_candidates=2)
    assert len(out.attributes) == 2 and set(out.attributes[0]) == set(ATTRIBUTES)


def test_save_load_from_pretrained(tmp_path, drawing):
    G = _generator()
    enc = _sketch_encoder(G, structure_layers=2)
    save_generator(G, tmp_path / "G")
    save_sketch_encoder(enc, tmp_path / "sketch", generator_source="G")
    loaded = load_sketch_encoder(tmp_path / "sketch")
    assert loaded.structure_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), loaded.state_dict().values()))
    pipe = SketchToImagePipeline.from_pretrained(tmp_path / "G", tmp_path / "sketch")
    a = pipe(sketch=drawing, colour_seed=1)
    b = SketchToImagePipeline(G, enc)(sketch=drawing, colour_seed=1)
    assert torch.allclose(a.w_plus, b.w_plus, atol=1e-5)

    # an image encoder folder is not a sketch encoder
    save_encoder(StyleGANEncoder(G.num_ws, G.w_dim, 16, channel_base=128, channel_max=16), tmp_path / "image_enc")
    with pytest.raises(ValueError, match="cannot read sketches"):
        load_sketch_encoder(tmp_path / "image_enc")
    with pytest.raises(FileNotFoundError, match="train_sketch_encoder"):
        load_sketch_encoder(tmp_path / "nothing")
    other = Generator(z_dim=16, c_dim=0, w_dim=8, img_resolution=16, img_channels=3,
                      mapping_kwargs={"num_layers": 2}, synthesis_kwargs={"channel_base": 256, "channel_max": 16})
    with pytest.raises(ValueError, match="another generator"):
        SketchToImagePipeline(other, enc)


def test_colour_basis_spans_the_colour_directions_without_the_structure_ones(tmp_path):
    from pipelines.sketch_to_image import colour_basis, load_colour_basis
    from pipelines.stylegan_editing import Direction, save_directions

    torch.manual_seed(3)
    dirs = {name: Direction(name=name, vector=torch.nn.functional.normalize(torch.randn(16), dim=0))
            for name in ("hair_color=red", "hair_color=blue", "skin_tone=dark", "glasses=yes", "hair_style=bob",
                         "background=sky")}
    q = colour_basis(dirs)
    assert q.shape == (16, 3)  # two hair colours and one skin tone; the background is left to the fine ws
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)
    for name in ("glasses=yes", "hair_style=bob"):  # moving within the basis leaves the structure directions
        assert (dirs[name].vector @ q).abs().max() < 1e-5
    red = dirs["hair_color=red"].vector
    assert (red @ q).norm() > 0.5  # most of a colour direction stays in the span
    assert colour_basis({k: v for k, v in dirs.items() if not k.startswith(("hair_color", "skin"))}) is None

    save_directions(dirs, tmp_path / "G" / "directions")
    assert torch.allclose(load_colour_basis(tmp_path / "G"), q)
    assert load_colour_basis(tmp_path / "other") is None


def test_colour_transfer_moves_structure_ws_only_within_the_basis():
    G = _generator()
    enc = _sketch_encoder(G)
    q, _ = torch.linalg.qr(torch.randn(16, 3, generator=torch.Generator().manual_seed(4)))
    sketch = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(sketch).ellipse((12, 8, 52, 58), outline=0, width=2)
    plain = SketchToImagePipeline(G, enc)(sketch=sketch, num_candidates=3, colour_seed=5)
    pipe = SketchToImagePipeline(G, enc, colour_basis=q)
    out = pipe(sketch=sketch, num_candidates=3, colour_seed=5)
    k = enc.structure_layers
    moved = out.w_plus[:, :k] - plain.w_plus[:, :k]
    assert moved.abs().max() > 1e-3  # the candidates' colours reach the structure ws ...
    assert torch.allclose(moved - (moved @ q) @ q.T, torch.zeros_like(moved), atol=1e-5)  # ... in the span only
    colours = pipe.colour_latents([5, 6, 7])
    assert torch.allclose(out.w_plus[:, :k] @ q, colours[:, :k] @ q, atol=1e-5)  # the span is the seed's
    assert torch.equal(out.w_plus[:, k:], plain.w_plus[:, k:])
    off = pipe(sketch=sketch, num_candidates=3, colour_seed=5, transfer_colours=False)
    assert torch.equal(off.w_plus, plain.w_plus)
    with pytest.raises(ValueError, match="colour_basis"):
        SketchToImagePipeline(G, enc, colour_basis=torch.zeros(8, 2))


def _completion_encoder(G: Generator) -> SketchEncoder:
    enc = _sketch_encoder(G, completion_dim=4)
    with torch.no_grad():  # a trained completion head: give it weights
        enc.completion[-1].weight.normal_(0, 0.3)
    return enc.eval()


def test_completion_code_moves_the_structure_ws_only():
    G = _generator()
    fresh = _sketch_encoder(G, completion_dim=4)
    x = torch.ones(1, 1, 16, 16)
    x[:, :, 2:14, 8] = -1
    z = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.allclose(fresh(x, z=z), fresh(x).expand(3, -1, -1))  # a new head starts at the mean
        enc = _completion_encoder(G)
        w = enc(x, z=z)
        k = enc.structure_layers
        assert w.shape == (3, G.num_ws, G.w_dim)
        assert (w[0, :k] - w[1, :k]).abs().max() > 1e-3 and torch.equal(w[0, k:], w[1, k:])
        assert torch.allclose(enc(x), enc(x, z=torch.zeros(1, 4)))  # no code = the zero code
        mean, summary = enc.mean_and_summary(x)
        mu, logvar = enc.posterior_params(summary, torch.randn(1, k, G.w_dim))
        assert mu.shape == logvar.shape == (1, 4)
    assert SketchEncoder(**enc.init_kwargs).completion_dim == 4
    assert "completion_dim" not in _sketch_encoder(G).init_kwargs  # deterministic encoders' configs unchanged
    with pytest.raises(ValueError, match="no completion code"):
        _sketch_encoder(G)(x, z=z)
    with pytest.raises(ValueError, match="z must be"):
        enc(x, z=torch.randn(3, 5))


def test_each_candidate_finishes_the_sketch_its_own_way(tmp_path):
    G = _generator()
    enc = _completion_encoder(G)
    pipe = SketchToImagePipeline(G, enc)
    sketch = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(sketch).ellipse((12, 8, 52, 58), outline=0, width=2)
    out = pipe(sketch=sketch, num_candidates=3, colour_seed=5)
    k = enc.structure_layers
    assert (out.w_plus[0, :k] - out.w_plus[1, :k]).abs().max() > 1e-3
    again = pipe(sketch=sketch, num_candidates=2, colour_seed=6)  # candidate i is seed colour_seed + i
    assert torch.allclose(again.w_plus[0], out.w_plus[1])
    ref = pipe(sketch=sketch, reference_w_plus=out.w_plus[0])  # a reference: the zero code
    with torch.no_grad():
        mean = enc(sketch_to_tensor(out.sketch, enc.input_resolution))
    assert torch.allclose(ref.w_plus[0, :k], mean[0, :k])
    save_sketch_encoder(enc, tmp_path / "enc")
    loaded = load_sketch_encoder(tmp_path / "enc")
    assert loaded.completion_dim == 4 and torch.allclose(loaded(torch.ones(1, 1, 16, 16)), enc(torch.ones(1, 1, 16, 16)))
