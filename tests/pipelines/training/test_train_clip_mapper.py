"""A tiny text-mapper run on a tiny random generator, CLIP and evaluator: it trains, resumes where it
stopped, exports a mapper the CLIP editor loads, and refuses bad configs before any work."""

import json

import open_clip
import pytest
import torch

from models.stylegan2.encoder import StyleGANEncoder
from pipelines.clip_edit import clip_probe, load_mapper, mapper_edit, probe_similarity
from pipelines.clip_models import load_clip, save_clip
from pipelines.data.portrait_world import ATTRIBUTES
from pipelines.stylegan_inversion import save_encoder
from pipelines.stylegan_io import save_generator
from pipelines.training.train_clip_mapper import ClipMapperTrainConfig, sample_texts, train
from tests._tiny import register_tiny_clip, tiny_generator, tiny_world_evaluator

pytestmark = pytest.mark.slow

TINY = "PortraitCLIP-Test-Mapper"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (the shared fixture in conftest.py)."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    register_tiny_clip(root / "cfg", TINY)
    G = tiny_generator(0)
    save_generator(G, root / "G")
    encoder = StyleGANEncoder(G.num_ws, G.w_dim, G.img_resolution, G.img_channels, channel_base=128, channel_max=16)
    save_encoder(encoder, root / "G" / "encoder")
    save_clip(open_clip.create_model(TINY), root / "clip", model_name=TINY, fp16=False)
    tiny_world_evaluator().save_pretrained(root / "ev", fp16=False)
    return root


def _config(tmp_path, assets, **over):
    cfg = dict(out_dir=str(tmp_path / "run"), generator=str(assets / "G"), clip=str(assets / "clip"),
               evaluator=str(assets / "ev"), pool_size=16, real_images=8, eval_latents=6, w_avg_samples=500,
               hidden=16, num_layers=2, steps=6, batch=4, lr=1e-3, log_every=1, sample_every=3,
               checkpoint_every=3, device="cpu")
    cfg.update(over)
    return ClipMapperTrainConfig(**cfg)


def test_tiny_run_trains_resumes_and_exports_a_loadable_mapper(tmp_path, assets):
    previews = []
    folder = train(_config(tmp_path, assets), progress=lambda s, n, p: previews.append(p))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "clip" in r]
    assert steps == list(range(1, 7))
    assert all({"clip", "l2", "target", "keep", "loss"} <= set(r) for r in rows if "clip" in r)
    assert sum(p is not None for p in previews) == 2 and (tmp_path / "run" / "samples" / "step_0000006.png").is_file()
    assert (tmp_path / "run" / "real_bank.npz").is_file()                        # inverted renders joined
    # the mapper moved away from the identity it starts as
    mapper, probe = load_mapper(folder)
    clip = load_clip(assets / "clip")
    assert probe is not None and probe_similarity(probe, clip_probe(clip)) > 0.999
    w = torch.randn(2, mapper.num_ws, mapper.w_dim)
    assert mapper(w, clip_probe(clip)[1]).abs().max() > 0
    card = json.loads((folder / "card.json").read_text())
    assert "heldout_success_single" in card["figures"] and "train_clip_mapper" in card["command"]
    # resume: continues from step 6, each step logged once, the same weights as an uninterrupted run
    train(_config(tmp_path, assets, steps=8, resume=True))
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "clip" in json.loads(l)]
    assert steps == list(range(1, 9))
    straight = train(_config(tmp_path / "straight", assets, steps=8))
    resumed, _ = load_mapper(tmp_path / "run" / "clip_mapper")
    uninterrupted, _ = load_mapper(straight)
    for (k, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    from pipelines.stylegan_io import load_generator
    G = load_generator(assets / "G")
    res = mapper_edit(G, clip, resumed, G.mapping(torch.randn(1, 16), None), "blue hair and glasses")
    assert res.images.shape == (1, 3, 16, 16)


def test_texts_ask_for_values_the_portrait_does_not_show():
    g = torch.Generator().manual_seed(0)
    readings = torch.zeros(200, len(ATTRIBUTES), dtype=torch.long)     # every attribute at its first value
    texts = sample_texts(readings, list(ATTRIBUTES), 0.5, g)
    assert all(ATTRIBUTES[n].index(v) != 0 for _, asked in texts for n, v in asked.items())
    doubles = [t for t in texts if len(t[1]) == 2]
    assert 60 < len(doubles) < 140 and all(" and " in phrase for phrase, _ in doubles)
    only_hair = sample_texts(readings[:20], ["hair_color"], 0.0, g)
    assert all(list(asked) == ["hair_color"] and "hair" in phrase for phrase, asked in only_hair)


def test_bad_config_is_refused_before_work(tmp_path, assets):
    with pytest.raises(ValueError, match="lr"):
        train(_config(tmp_path, assets, lr=0.0))
    with pytest.raises(ValueError, match="does not exist"):
        train(_config(tmp_path, assets, clip=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="unknown attributes"):
        train(_config(tmp_path, assets, attributes="hair_color,wings"))
    with pytest.raises(ValueError, match="evaluator"):
        train(_config(tmp_path, assets, evaluator="none"))
    assert not (tmp_path / "run").exists()
