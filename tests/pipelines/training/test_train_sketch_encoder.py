"""A tiny AniFaceDrawing stage-2 run: tiny random generator, tiny teacher, tiny evaluator, a few steps."""

import json

import numpy as np
import pytest
import torch

from models.evaluator import AttributeEvaluator
from models.stylegan2 import Generator
from models.stylegan2.encoder import StyleGANEncoder
from models.stylegan2.sketch_encoder import SketchEncoder
from pipelines.data.portrait_world import ATTRIBUTES
from pipelines.evaluation import Evaluator
from pipelines.sketch_to_image import load_sketch_encoder
from pipelines.stylegan_inversion import save_encoder
from pipelines.stylegan_io import save_generator
from pipelines.training.train_sketch_encoder import SketchEncoderTrainConfig, _losses, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    G = Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3, mapping_kwargs={"num_layers": 2},
                  synthesis_kwargs={"channel_base": 256, "channel_max": 16})
    save_generator(G, root / "G")
    teacher = StyleGANEncoder(G.num_ws, G.w_dim, 16, channel_base=128, channel_max=16)
    with torch.no_grad():  # a teacher whose latents depend on the image
        for head in teacher.heads.values():
            head.out.weight.normal_(0, 0.05)
    save_encoder(teacher, root / "teacher")
    Evaluator(AttributeEvaluator([(name, len(values)) for name, values in ATTRIBUTES.items()], resolution=16,
                                 width=8, feature_dim=16)).save_pretrained(root / "ev", fp16=False)
    return root


def _config(tmp_path, assets, **over):
    cfg = dict(out_dir=str(tmp_path / "run"), generator=str(assets / "G"), teacher=str(assets / "teacher"),
               evaluator=str(assets / "ev"), channel_base=128, channel_max=16, pool_size=24, eval_images=8,
               num_samples=4, steps=6, batch=4, lr=3e-3, log_every=1, sample_every=3, checkpoint_every=3,
               image_loss_every=2, w_avg_samples=200, device="cpu")
    cfg.update(over)
    return SketchEncoderTrainConfig(**cfg)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_world_run_trains_exports_and_resumes(tmp_path, assets):
    previews = []
    folder = train(_config(tmp_path, assets), progress=lambda s, n, p: previews.append(p))
    rows = _rows(tmp_path / "run")
    steps = [r for r in rows if "align" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) and r["align"] > 0 for r in steps)
    assert sum("align_image" in r for r in steps) == 3  # image terms every 2nd step
    assert not any("pixel" in r for r in steps)  # the default student is not fitted to the target image
    assert sum(p is not None for p in previews) == 2

    figures = rows[-1]
    for name in ("latent_error_complete", "latent_error_partial50", "image_mse_complete", "image_mse_partial50",
                 "partial_fd_ratio", "complete_sketch_attr_match", "encoder_ms_per_sketch"):
        assert name in figures and np.isfinite(figures[name]), name
    assert 0 <= figures["complete_sketch_attr_match"] <= 1

    enc = load_sketch_encoder(folder)
    assert isinstance(enc, SketchEncoder) and enc.structure_layers == 3  # 16 px: the ws read at 4 and 8 px
    assert enc(torch.ones(2, 1, 16, 16)).shape == (2, 6, 16)
    card = json.loads((folder / "card.json").read_text())
    assert "train_sketch_encoder" in card["command"] and "latent_error_partial50" in card["figures"]
    assert json.loads((folder / "config.json").read_text())["teacher"] == str(assets / "teacher")

    # resume: continues from step 6, each step logged once, the optimiser state carried over
    ckpt = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert ckpt["step"] == 6 and ckpt["optimizer"]["state"] and "rng" in ckpt
    train(_config(tmp_path, assets, steps=8, resume=True))
    steps = [r["step"] for r in _rows(tmp_path / "run") if "align" in r]
    assert steps == list(range(1, 9))


def test_resumed_run_equals_uninterrupted_run(tmp_path, assets):
    over = dict(steps=4, image_loss_every=1, evaluator="none", sample_every=100, checkpoint_every=2)
    train(_config(tmp_path / "a", assets, **over))
    train(_config(tmp_path / "b", assets, **dict(over, steps=2)))
    train(_config(tmp_path / "b", assets, **dict(over, resume=True)))
    a = load_sketch_encoder(tmp_path / "a" / "run" / "sketch_encoder").state_dict()
    b = load_sketch_encoder(tmp_path / "b" / "run" / "sketch_encoder").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_without_alignment_trains_on_image_terms_only(tmp_path, assets):
    folder = train(_config(tmp_path, assets, align_weight=0.0, align_image_weight=0.0, pixel_weight=1.0,
                           feature_weight=1.0, image_loss_every=1, steps=3, sample_every=3))
    steps = [r for r in _rows(tmp_path / "run") if "align" in r]
    assert len(steps) == 3 and all("pixel" in r for r in steps)
    assert all(r["loss"] == pytest.approx(r["pixel"] + r["feature"], rel=1e-5) for r in steps)
    assert "WITHOUT teacher alignment" in (folder / "README.md").read_text()
    with pytest.raises(ValueError, match="image_loss_every 1"):
        train(_config(tmp_path / "x", assets, align_weight=0.0, image_loss_every=4))


def test_alignment_moves_only_structure_layers(assets):
    """The alignment term's gradient reaches the structure ws only; the image term with mixed fine ws, too."""
    from pipelines.stylegan_io import load_generator

    G = load_generator(assets / "G")
    student = SketchEncoder(G.num_ws, G.w_dim, 16, channel_base=128, channel_max=16, structure_layers=2)
    sketches = torch.ones(2, 1, 16, 16)
    sketches[:, :, 4:12, 8] = -1
    w_target = torch.randn(2, G.num_ws, G.w_dim)
    cfg = SketchEncoderTrainConfig(align_weight=1.0, pixel_weight=1.0, feature_weight=0.0)
    w_hat = student(sketches).detach().requires_grad_(True)

    class Fixed(torch.nn.Module):  # the student's output as a leaf, to read per-layer gradients
        structure_layers = 2

        def forward(self, x):
            return w_hat

    terms = _losses(Fixed(), G, sketches, w_target, torch.zeros(2, 3, 16, 16), None, cfg, 2, 1.0)
    terms["loss"].backward()
    per_layer = w_hat.grad.abs().sum((0, 2))
    assert (per_layer[:2] > 0).all() and (per_layer[2:] == 0).all()


def test_image_alignment_under_random_colours(assets):
    """The image-space alignment renders the student's structure and the teacher's with the same
    colours: zero when the structure ws agree, whatever the student's fine ws; its gradient reaches
    the structure ws only; ``image_rows`` keeps the image terms to the complete sketches."""
    from pipelines.stylegan_io import load_generator

    G = load_generator(assets / "G")
    k = 2
    w_target = torch.randn(3, G.num_ws, G.w_dim)
    colours = torch.randn(3, G.num_ws, G.w_dim)
    cfg = SketchEncoderTrainConfig(align_weight=0.0, pixel_weight=0.0, feature_weight=0.0, align_image_weight=1.0)

    class Fixed(torch.nn.Module):
        structure_layers = k

        def __init__(self, w):
            super().__init__()
            self.w = w

        def forward(self, x):
            return self.w

    same = torch.cat([w_target[:, :k], torch.randn(3, G.num_ws - k, G.w_dim)], 1)  # other fine ws
    terms = _losses(Fixed(same), G, torch.ones(3, 1, 16, 16), w_target, None, None, cfg, k, 1.0, colours)
    assert terms["align_image"].item() < 1e-10 and terms["loss"].item() < 1e-10

    w_hat = torch.randn(3, G.num_ws, G.w_dim, requires_grad=True)
    rows = torch.tensor([True, False, True])
    terms = _losses(Fixed(w_hat), G, torch.ones(3, 1, 16, 16), w_target, None, None, cfg, k, 1.0, colours, rows)
    assert terms["align_image"].item() > 0
    terms["loss"].backward()
    grad = w_hat.grad.abs().sum(2)  # [B, num_ws]
    assert (grad[[0, 2], :k] > 0).all() and (grad[:, k:] == 0).all() and (grad[1] == 0).all()

    none = _losses(Fixed(w_hat), G, torch.ones(3, 1, 16, 16), w_target, None, None, cfg, k, 1.0, colours,
                   torch.zeros(3, dtype=torch.bool))
    assert "align_image" not in none


def test_image_alignment_run_logs_the_term_and_seeded_figures(tmp_path, assets):
    train(_config(tmp_path, assets, align_image_weight=1.0, image_loss_every=1, steps=3, sample_every=3,
                  image_terms_partial=False, partial_prob=0.5))
    rows = _rows(tmp_path / "run")
    assert any("align_image" in r for r in rows if "loss" in r)
    figures = rows[-1]
    for name in ("complete_sketch_attr_match_seeded", "partial50_attr_match_seeded", "fd_partial50_seeded_vs_samples"):
        assert name in figures and np.isfinite(figures[name]), name


def test_completion_code_trains_with_a_kl_term_and_starts_from_an_earlier_encoder(tmp_path, assets):
    first = train(_config(tmp_path / "a", assets, steps=2, sample_every=2))
    folder = train(_config(tmp_path / "b", assets, steps=3, sample_every=3, completion_dim=4, init_from=str(first)))
    rows = [r for r in _rows(tmp_path / "b" / "run") if "align" in r]
    assert all("kl" in r and r["kl"] >= 0 for r in rows)
    enc = load_sketch_encoder(folder)
    assert enc.completion_dim == 4
    start = load_sketch_encoder(first).state_dict()
    assert set(start) < set(enc.state_dict())  # the completion and posterior heads are new
    assert "complete_sketch_attr_match_seeded" in _rows(tmp_path / "b" / "run")[-1]
    with pytest.raises(ValueError, match="other sizes"):
        train(_config(tmp_path / "c", assets, channel_max=8, init_from=str(first)))


def test_complete_sketches_take_their_code_from_the_prior(assets):
    """Rows marked complete read z = eps (no posterior, no KL): what the sketch shows must not
    travel through the code; unfinished rows read the posterior's z and pay its KL."""
    from pipelines.stylegan_io import load_generator

    G = load_generator(assets / "G")
    torch.manual_seed(0)
    student = SketchEncoder(G.num_ws, G.w_dim, 16, channel_base=128, channel_max=16, completion_dim=3)
    with torch.no_grad():
        student.completion[-1].weight.normal_(0, 0.3)
    sketches = torch.ones(2, 1, 16, 16)
    sketches[1, :, 4:12, 8] = -1
    w_target = torch.randn(2, G.num_ws, G.w_dim)
    eps = torch.randn(2, 3)
    cfg = SketchEncoderTrainConfig(align_weight=1.0, align_image_weight=0.0, completion_kl_weight=1.0)
    k = student.structure_layers
    prior = _losses(student, G, sketches, w_target, None, None, cfg, k, 1.0, eps=eps,
                    prior_rows=torch.tensor([True, True]))
    with torch.no_grad():
        expected = student(sketches, z=eps)
    assert prior["kl"].item() == 0.0
    assert prior["align"].item() == pytest.approx(float((expected[:, :k] - w_target[:, :k]).square().mean()), rel=1e-5)
    posterior = _losses(student, G, sketches, w_target, None, None, cfg, k, 1.0, eps=eps,
                        prior_rows=torch.tensor([True, False]))
    assert posterior["kl"].item() > 0 and posterior["align"].item() != pytest.approx(prior["align"].item())


def test_generator_source_with_xdog_sketches(tmp_path, assets):
    folder = train(_config(tmp_path, assets, source="generator", edge_method="xdog", steps=3, sample_every=3,
                           align_target="sampled", teacher="none"))
    assert load_sketch_encoder(folder).num_ws == 6
    rows = _rows(tmp_path / "run")
    assert "latent_error_partial50" in rows[-1] and "complete_sketch_attr_match" not in rows[-1]


def test_bad_configs_are_refused_before_work(tmp_path, assets):
    for over, match in [(dict(lr=0.0), "lr"), (dict(source="photos"), "source"), (dict(edge_method="canny"), "edge"),
                        (dict(teacher="none"), "needs the stage-1 image encoder"),
                        (dict(generator=str(tmp_path / "nope")), "does not exist"),
                        (dict(align_weight=0.0, image_loss_every=0), "nothing to train"),
                        (dict(partial_min=0.0), "partial_min"),
                        (dict(align_image_weight=1.0, image_loss_every=0), "align_image_weight"),
                        (dict(colour_truncation_min=1.5), "colour_truncation_min"),
                        (dict(completion_dim=-1), "completion_dim"),
                        (dict(init_from=str(tmp_path / "missing")), "init_from")]:
        with pytest.raises(ValueError, match=match):
            train(_config(tmp_path, assets, **over))
    assert not (tmp_path / "run").exists()
