"""A tiny e4e encoder run on a tiny random generator: loss falls, it exports, loads and resumes."""

import json

import pytest
import torch

from models.evaluator import AttributeEvaluator
from models.stylegan2 import Generator
from models.stylegan2.encoder import StyleGANEncoder
from pipelines.evaluation import Evaluator
from pipelines.stylegan_inversion import load_encoder
from pipelines.stylegan_io import save_generator
from pipelines.training.train_stylegan_encoder import EncoderTrainConfig, sample_training_latents, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    G = Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3, mapping_kwargs={"num_layers": 2},
                  synthesis_kwargs={"channel_base": 256, "channel_max": 16})
    save_generator(G, root / "G")
    Evaluator(AttributeEvaluator([("glasses", 2)], resolution=16, width=8, feature_dim=16)).save_pretrained(
        root / "ev", fp16=False)
    return root


def _config(tmp_path, assets, **over):
    cfg = dict(out_dir=str(tmp_path / "run"), generator=str(assets / "G"), evaluator=str(assets / "ev"),
               channel_base=128, channel_max=16, steps=32, batch=16, lr=3e-3, log_every=1, sample_every=16,
               checkpoint_every=16, progressive_every=4, image_loss_every=8, pixel_weight=0.1, feature_weight=0.1, eval_images=4, num_samples=4,
               w_avg_samples=500, device="cpu")
    cfg.update(over)
    return EncoderTrainConfig(**cfg)


def test_tiny_run_learns_exports_loads_and_resumes(tmp_path, assets):
    previews = []
    folder = train(_config(tmp_path, assets), progress=lambda s, n, p: previews.append(p))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    latent = [r["latent"] for r in rows if "latent" in r]
    assert len(latent) == 32
    assert sum(latent[-6:]) / 6 < 0.8 * sum(latent[:4]) / 4, latent
    assert any(r.get("pixel") is not None for r in rows) and any("feature" in r for r in rows)
    assert sum(p is not None for p in previews) == 2

    enc = load_encoder(folder)
    assert isinstance(enc, StyleGANEncoder)
    w = enc(torch.zeros(2, 3, 16, 16))
    assert w.shape == (2, 6, 16)
    card = json.loads((folder / "card.json").read_text())
    assert "heldout_reconstruction_mse" in card["figures"] and "train_stylegan_encoder" in card["command"]

    # resume: continues from step 32, each step logged once
    train(_config(tmp_path, assets, steps=34, resume=True))
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "latent" in json.loads(l)]
    assert steps == list(range(1, 35))


def test_bad_config_is_refused_before_work(tmp_path, assets):
    with pytest.raises(ValueError, match="lr"):
        train(_config(tmp_path, assets, lr=0.0))
    with pytest.raises(ValueError, match="does not exist"):
        train(_config(tmp_path, assets, generator=str(tmp_path / "nope")))
    assert not (tmp_path / "run").exists()


def test_training_latents_mix_and_truncate():
    torch.manual_seed(0)
    G = Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3, mapping_kwargs={"num_layers": 2},
                  synthesis_kwargs={"channel_base": 256, "channel_max": 16})
    w_avg = torch.zeros(16)
    g = torch.Generator().manual_seed(0)
    w = sample_training_latents(G, 64, w_avg, truncation_min=0.5, style_mixing=1.0, generator=g)
    assert w.shape == (64, G.num_ws, 16)
    distinct = torch.tensor([torch.unique(x, dim=0).shape[0] for x in w])
    assert (distinct == 2).all()  # every target mixes two latents
    plain = sample_training_latents(G, 8, w_avg, truncation_min=1.0, style_mixing=0.0, generator=g)
    assert all(torch.unique(x, dim=0).shape[0] == 1 for x in plain)


def test_pool_mode_renders_once_and_trains(tmp_path, assets):
    folder = train(_config(tmp_path, assets, steps=4, pool_size=24, sample_every=4, checkpoint_every=4,
                           image_loss_every=2, evaluator="none"))
    assert load_encoder(folder).num_ws == 6
    with pytest.raises(ValueError, match="pool_size"):
        train(_config(tmp_path / "b", assets, pool_size=-1))


def test_real_world_images_join_with_image_losses_only(tmp_path, assets):
    folder = train(_config(tmp_path, assets, steps=6, real_images=16, real_every=2, image_loss_every=0,
                           log_every=1, checkpoint_every=100, sample_every=100))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_step = {r["step"]: r for r in rows if "latent" in r}
    # odd steps (2, 4, 6 counted from 1) are real batches: no latent target, image terms only
    assert per_step[2]["latent"] == 0 and "pixel" in per_step[2]
    assert per_step[1]["latent"] > 0 and "pixel" not in per_step[1]
    assert (tmp_path / "run" / "real_bank.npz").is_file() and (folder / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="real_images"):
        _config(tmp_path, assets, real_images=-1).validate()


def test_init_from_an_exported_encoder_starts_where_it_ended(tmp_path, assets):
    trained = train(_config(tmp_path / "a", assets, steps=32, image_loss_every=0, sample_every=100,
                            checkpoint_every=100))

    def first_latent_loss(run_dir, **over):
        train(_config(run_dir, assets, steps=1, image_loss_every=0, sample_every=100, checkpoint_every=100, **over))
        rows = [json.loads(line) for line in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]
        return [r["latent"] for r in rows if "latent" in r][0]

    fresh = first_latent_loss(tmp_path / "b")
    warm = first_latent_loss(tmp_path / "c", init_from=str(trained))
    assert warm < 0.8 * fresh, (warm, fresh)
    with pytest.raises(ValueError, match="does not fit"):
        train(_config(tmp_path / "d", assets, channel_max=8, init_from=str(trained)))
