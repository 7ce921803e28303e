"""The Sketch to anime tab: shown only with a sketch encoder; strokes give portraits; an empty canvas a prompt."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from models.stylegan2 import Generator
from models.stylegan2.encoder import StyleGANEncoder
from models.stylegan2.sketch_encoder import SketchEncoder
from pipelines.sketch_to_image import save_sketch_encoder
from pipelines.stylegan_inversion import save_encoder
from pipelines.stylegan_io import save_generator
from studio.registry import ModelRegistry, add_local
from studio.tabs.sketch import PipelineCache, draw, sketch_generators


def _folder(tmp_path, with_sketch: bool, with_encoder: bool = False):
    torch.manual_seed(0)
    G = Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3, mapping_kwargs={"num_layers": 1},
                  synthesis_kwargs={"channel_base": 256, "channel_max": 16})
    folder = save_generator(G, tmp_path / ("with" if with_sketch else "without"))
    if with_sketch:
        enc = SketchEncoder(G.num_ws, G.w_dim, G.img_resolution, channel_base=128, channel_max=16)
        with torch.no_grad():  # non-zero heads, so different sketches give different latents
            for head in enc.heads.values():
                head.out.weight.normal_(0, 0.5)
        save_sketch_encoder(enc, folder / "sketch_encoder")
    if with_encoder:
        image_encoder = StyleGANEncoder(G.num_ws, G.w_dim, G.img_resolution, G.img_channels, channel_base=128,
                                        channel_max=16)
        with torch.no_grad():
            for p in image_encoder.parameters():
                p.normal_(0, 0.3)
        save_encoder(image_encoder, folder / "encoder")
    return folder


def _strokes(n: int) -> np.ndarray:
    img = Image.new("RGBA", (256, 256), (255, 255, 255, 0))
    d = ImageDraw.Draw(img)
    shapes = [(60, 40, 200, 220), (90, 100, 120, 120), (140, 100, 170, 120), (110, 170, 150, 180)]
    for box in shapes[:n]:
        d.ellipse(box, outline=(0, 0, 0, 255), width=4)
    return np.asarray(img)


def test_tab_is_shown_only_for_generators_with_a_sketch_encoder(tmp_path):
    from studio.app import build_app

    reg = ModelRegistry("cpu")
    add_local(reg, _folder(tmp_path, False), name="plain")
    assert sketch_generators(reg) == []
    labels = lambda demo: [c.get("props", {}).get("label") for c in demo.get_config_file()["components"]]  # noqa: E731
    assert "Sketch to anime" not in labels(build_app(registry=reg, runs_dir=str(tmp_path / "runs")))
    add_local(reg, _folder(tmp_path, True), name="sketchable")
    assert sketch_generators(reg) == ["sketchable"]
    assert "Sketch to anime" in labels(build_app(registry=reg, runs_dir=str(tmp_path / "runs")))


def test_each_stroke_changes_the_portraits_and_an_empty_canvas_asks_to_draw(tmp_path):
    reg = ModelRegistry("cpu")
    add_local(reg, _folder(tmp_path, True), name="sketchable")
    pipe = PipelineCache(reg).get("sketchable")
    items, sketch, note = draw(pipe, None, candidates=2, colour_seed=0)
    assert items == [] and "Draw" in note
    empty, _, note = draw(pipe, _strokes(0), candidates=1, colour_seed=0)
    assert "draw" in note.lower()
    one, _, note1 = draw(pipe, _strokes(1), candidates=2, colour_seed=3)
    two, sketch2, _ = draw(pipe, _strokes(4), candidates=2, colour_seed=3)
    assert len(one) == len(two) == 2 and "ms" in note1
    a, b = np.asarray(one[0][0], dtype=float), np.asarray(two[0][0], dtype=float)
    assert np.abs(a - b).mean() > 0.5  # the portrait followed the new strokes
    assert sketch2 is not None


def test_a_colour_reference_replaces_the_seeds_and_needs_an_image_encoder(tmp_path):
    reg = ModelRegistry("cpu")
    add_local(reg, _folder(tmp_path / "a", True, with_encoder=True), name="with_encoder")
    add_local(reg, _folder(tmp_path / "b", True), name="sketch_only")
    cache = PipelineCache(reg)
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    seeded, _, _ = draw(cache.get("with_encoder"), _strokes(4), candidates=3, colour_seed=1)
    items, _, note = draw(cache.get("with_encoder"), _strokes(4), candidates=3, colour_seed=1, reference=reference)
    assert len(items) == 1 and items[0][1] == "reference colours" and "ms" in note
    assert np.abs(np.asarray(items[0][0], dtype=float) - np.asarray(seeded[0][0], dtype=float)).mean() > 0.5
    with pytest.raises(ValueError, match="image encoder"):
        draw(cache.get("sketch_only"), _strokes(4), candidates=1, colour_seed=1, reference=reference)
