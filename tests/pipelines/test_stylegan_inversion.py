"""Inversion on a tiny random StyleGAN2: W / W+ optimisation, PTI, the pipeline's input handling."""

import numpy as np
import pytest
import torch
from PIL import Image

from models.evaluator import AttributeEvaluator
from models.stylegan2 import Generator
from models.stylegan2.encoder import StyleGANEncoder
from pipelines.evaluation import Evaluator
from pipelines.stylegan_inversion import (InversionPipeline, invert, load_encoder, noise_buffers, noise_override,
                                          pivotal_tuning, reconstruction_error, save_encoder, synthesize)


def tiny_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3,
                     mapping_kwargs={"num_layers": 2},
                     synthesis_kwargs={"channel_base": 256, "channel_max": 16}).eval()


def tiny_evaluator() -> Evaluator:
    torch.manual_seed(1)
    return Evaluator(AttributeEvaluator([("hair_color", 8), ("glasses", 2)], resolution=16, width=8, feature_dim=16))


@pytest.fixture(scope="module")
def setup():
    G = tiny_generator()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ws = G.mapping(torch.randn(2, 16, generator=g), None)
        ws[:, 3:] = G.mapping(torch.randn(2, 16, generator=g), None)[:, 3:]   # style-mixed: a W+ target
        targets = G.synthesis(ws, noise_mode="const")
    ev = tiny_evaluator()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    res_w = invert(G, targets, method="w", steps=24, evaluator=ev, generator=torch.Generator().manual_seed(0))
    res_wp = invert(G, targets, method="w+", steps=24, evaluator=ev, generator=torch.Generator().manual_seed(0))
    return dict(G=G, targets=targets, ev=ev, before=before, res_w=res_w, res_wp=res_wp)


def test_inversion_reduces_error_and_w_plus_beats_w(setup):
    G, targets = setup["G"], setup["targets"]
    with torch.no_grad():
        w_avg = G.mapping(torch.randn(2000, 16, generator=torch.Generator().manual_seed(0)), None)[:, :1].mean(0)
        start = synthesize(G, w_avg.expand(2, G.num_ws, -1))
    e0 = reconstruction_error(start, targets).mean()
    e_w, e_wp = setup["res_w"].errors.mean(), setup["res_wp"].errors.mean()
    assert e_w < 0.5 * e0, (e0, e_w)
    assert e_wp < e_w, (e_w, e_wp)
    for res, n_distinct in ((setup["res_w"], 1), (setup["res_wp"], G.num_ws)):
        assert res.w_plus.shape == (2, G.num_ws, 16)
        assert res.images.shape == targets.shape
        assert len(res.loss_history) == 24 and res.loss_history[-1] < res.loss_history[0]
        assert res.seconds > 0
        # 'w' repeats one latent on every layer; 'w+' does not
        assert torch.unique(res.w_plus[0], dim=0).shape[0] == n_distinct
        # the returned noise reproduces the returned images
        assert torch.allclose(synthesize(G, res.w_plus, res.noise), res.images, atol=1e-5)


def test_generator_is_left_untouched(setup):
    G = setup["G"]
    for k, v in G.state_dict().items():
        assert torch.equal(v, setup["before"][k]), k
    assert all(p.requires_grad for p in G.parameters())  # flags restored


def test_pivotal_tuning_reduces_error_further(setup):
    G, targets, res = setup["G"], setup["targets"], setup["res_wp"]
    tuned, images, seconds = pivotal_tuning(G, targets, res.w_plus, steps=20, lr=3e-3, evaluator=setup["ev"],
                                            noise=res.noise, locality_weight=0.1, locality_every=10,
                                            generator=torch.Generator().manual_seed(0))
    e_pti = reconstruction_error(images, targets).mean()
    assert e_pti < 0.7 * res.errors.mean(), (res.errors.mean(), e_pti)
    assert tuned is not G and seconds > 0
    for k, v in G.state_dict().items():  # the original is unchanged
        assert torch.equal(v, setup["before"][k]), k
    assert not torch.equal(tuned.synthesis.b4.conv1.weight, G.synthesis.b4.conv1.weight)


def test_noise_override_restores_buffers():
    G = tiny_generator()
    bufs = {k: v.clone() for k, v in noise_buffers(G).items()}
    fake = {k: torch.zeros(2, 1, *v.shape) for k, v in bufs.items()}
    with noise_override(G, fake):
        assert all(v.shape[0] == 2 for v in noise_buffers(G).values())
    assert all(torch.equal(noise_buffers(G)[k], v) for k, v in bufs.items())
    with pytest.raises(ValueError, match="not a noise layer"):
        with noise_override(G, {"nope": torch.zeros(1)}):
            pass


def test_invert_validates_inputs():
    G = tiny_generator()
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        invert(G, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="method"):
        invert(G, torch.zeros(1, 3, 16, 16), method="z")
    with pytest.raises(ValueError, match="w_pivot"):
        pivotal_tuning(G, torch.zeros(2, 3, 16, 16), torch.zeros(1, G.num_ws, 16))


# -- pipeline -------------------------------------------------------------------------------


def _pipeline(with_encoder: bool = True) -> InversionPipeline:
    G = tiny_generator()
    enc = StyleGANEncoder(G.num_ws, G.w_dim, G.img_resolution, channel_base=128, channel_max=16) if with_encoder else None
    return InversionPipeline(G, encoder=enc, evaluator=tiny_evaluator())


def test_pipeline_preprocesses_any_pil_image():
    pipe = _pipeline()
    rgba = Image.new("RGBA", (40, 25), (255, 0, 0, 0))  # transparent: composited over white
    gray = Image.new("L", (7, 9), 128)
    arr = np.zeros((20, 30, 3), np.uint8)
    x = pipe.preprocess([rgba, gray, arr])
    assert x.shape == (3, 3, 16, 16)
    assert torch.allclose(x[0], torch.ones_like(x[0]))
    assert torch.allclose(x[1], torch.full_like(x[1], 128 / 127.5 - 1), atol=1e-6)
    assert pipe.preprocess(torch.zeros(2, 3, 32, 32)).shape == (2, 3, 16, 16)


def test_pipeline_refuses_bad_inputs_before_work():
    pipe = _pipeline(with_encoder=False)
    img = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match="PIL image"):
        pipe(image="photo.png", steps=1)
    with pytest.raises(ValueError, match="not a PIL image"):
        pipe(images=[img, 3], steps=1)
    with pytest.raises(ValueError, match="exactly one"):
        pipe(image=img, images=[img])
    with pytest.raises(ValueError, match="method"):
        pipe(image=img, method="magic")
    with pytest.raises(ValueError, match="needs an encoder"):
        pipe(image=img, method="encoder")
    with pytest.raises(ValueError, match="steps"):
        pipe(image=img, method="optimise-w", steps=0)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        pipe(image=torch.full((1, 3, 16, 16), 200.0))
    with pytest.raises(ValueError, match="uint8"):
        pipe(image=np.zeros((4, 4, 3), np.float32))


def test_pipeline_methods_return_dataclass_with_timings():
    pipe = _pipeline()
    img = Image.fromarray((np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8))
    calls = []
    out = pipe(image=img, method="encoder+pti", pti_steps=4, generator=torch.Generator().manual_seed(0),
               callback=lambda s, n, p: calls.append((s, n)))
    assert out.w_plus.shape == (1, pipe.G.num_ws, 16)
    assert len(out.images) == 1 and out.images[0].size == (16, 16)
    assert set(out.timings) == {"encoder", "pti", "total"}
    assert out.G is not pipe.G and len(out.reconstruction_error) == 1
    assert calls[-1] == (5, 5) and [s for s, _ in calls] == sorted(s for s, _ in calls)

    out = pipe(image=img, method="optimise-w", steps=3, generator=torch.Generator().manual_seed(0))
    assert set(out.timings) == {"optimise", "total"} and out.G is pipe.G
    assert torch.unique(out.w_plus[0], dim=0).shape[0] == 1
    out = pipe(images=[img, img], method="optimise+pti", steps=2, pti_steps=2)
    assert out.w_plus.shape[0] == 2 and set(out.timings) == {"optimise", "pti", "total"}


def test_encoder_save_load_round_trip(tmp_path):
    G = tiny_generator()
    enc = StyleGANEncoder(G.num_ws, G.w_dim, G.img_resolution, channel_base=128, channel_max=16)
    torch.nn.init.normal_(enc.heads["4"].out.weight, std=0.1)
    enc.w_avg.normal_()
    save_encoder(enc, tmp_path / "enc", generator_source="tiny")
    loaded = load_encoder(tmp_path / "enc")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(loaded(x), enc.eval()(x), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="train one"):
        load_encoder(tmp_path / "missing")


def test_from_pretrained_loads_generator_encoder_and_evaluator(tmp_path):
    from pipelines.stylegan_io import save_generator

    G = tiny_generator()
    enc = StyleGANEncoder(G.num_ws, G.w_dim, G.img_resolution, channel_base=128, channel_max=16)
    save_generator(G, tmp_path / "G")
    save_encoder(enc, tmp_path / "enc")
    tiny_evaluator().save_pretrained(tmp_path / "ev", fp16=False)
    pipe = InversionPipeline.from_pretrained(tmp_path / "G", encoder_path=tmp_path / "enc", evaluator_path=tmp_path / "ev")
    out = pipe(image=Image.new("RGB", (20, 20), (10, 200, 30)), method="encoder")
    assert out.w_plus.shape == (1, G.num_ws, 16) and set(out.timings) == {"encoder", "total"}
    # an untrained encoder returns w_avg (zero heads): the reconstruction is G(w_avg)
    assert torch.allclose(out.w_plus, enc.w_avg.expand(1, G.num_ws, -1))
    small = StyleGANEncoder(G.num_ws - 1, G.w_dim, G.img_resolution)
    with pytest.raises(ValueError, match="latents"):
        InversionPipeline(G, encoder=small)
