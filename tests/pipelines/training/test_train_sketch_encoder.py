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


def test_refined_teacher_targets_fit_the_images_better_and_are_cached(tmp_path, assets, monkeypatch):
    import pipelines.stylegan_inversion as inversion
    from pipelines.stylegan_inversion import load_encoder, reconstruction_error, synthesize
    from pipelines.stylegan_io import load_generator
    from pipelines.training.train_sketch_encoder import build_pool, teacher_targets

    G = load_generator(assets / "G").requires_grad_(False)
    teacher = load_encoder(assets / "teacher")
    evaluator = Evaluator.from_pretrained(assets / "ev")
    images = synthesize(G, G.mapping(torch.randn(6, G.z_dim, generator=torch.Generator().manual_seed(1)), None))
    plain = teacher_targets(_config(tmp_path, assets), G, teacher, images, evaluator)
    refined = teacher_targets(_config(tmp_path, assets, teacher_refine_steps=20, teacher_refine_lr=0.05), G, teacher,
                              images, evaluator)
    with torch.no_grad():
        before = reconstruction_error(synthesize(G, plain), images).mean()
        after = reconstruction_error(synthesize(G, refined), images).mean()
    assert after < 0.8 * before  # the projector steps bring the teacher's latents closer to the images

    # a run keeps its refined targets and reads them back; other settings recompute
    cfg = _config(tmp_path, assets, teacher_refine_steps=2, pool_size=6)
    cache = tmp_path / "targets.safetensors"
    w_avg = G.mapping.w_avg.clone()
    first = build_pool(cfg, G, teacher, w_avg, 6, sketch_size=16, evaluator=evaluator, cache=cache)
    held = build_pool(cfg, G, teacher, w_avg, 4, sketch_size=16, held_out=True, evaluator=evaluator, cache=cache)
    calls = []
    real_invert = inversion.invert
    monkeypatch.setattr(inversion, "invert", lambda *a, **k: calls.append(1) or real_invert(*a, **k))
    again = build_pool(cfg, G, teacher, w_avg, 6, sketch_size=16, evaluator=evaluator, cache=cache)
    held_again = build_pool(cfg, G, teacher, w_avg, 4, sketch_size=16, held_out=True, evaluator=evaluator, cache=cache)
    assert not calls and torch.equal(first.w_target, again.w_target) and torch.equal(held.w_target, held_again.w_target)
    other = build_pool(_config(tmp_path, assets, teacher_refine_steps=3, pool_size=6), G, teacher, w_avg, 6,
                       sketch_size=16, evaluator=evaluator, cache=cache)
    assert calls and not torch.equal(first.w_target, other.w_target)
    cache.write_bytes(cache.read_bytes()[:50])  # a truncated cache is recomputed, not an error
    assert build_pool(cfg, G, teacher, w_avg, 6, sketch_size=16, evaluator=evaluator, cache=cache).w_target.shape \
        == first.w_target.shape


def test_refining_run_writes_its_cache_and_names_it_on_the_card(tmp_path, assets):
    folder = train(_config(tmp_path, assets, teacher_refine_steps=2, steps=2, sample_every=2, checkpoint_every=2))
    assert (tmp_path / "run" / "pool_targets.safetensors").exists()
    assert "refined by 2 projector steps" in (folder / "card.json").read_text()
    for over, match in [(dict(teacher_refine_steps=-1), "teacher_refine_steps"),
                        (dict(teacher_refine_steps=5, evaluator="none"), "needs the evaluator"),
                        (dict(teacher_refine_lr=0.0), "teacher_refine_lr"),
                        (dict(teacher_refine_steps=5, source="generator", align_target="sampled", teacher="none"),
                         "sampled")]:
        with pytest.raises(ValueError, match=match):
            train(_config(tmp_path / "bad", assets, **over))
    assert not (tmp_path / "bad").exists()


def test_learned_prior_reads_the_sketch_and_enters_the_kl(assets):
    """A learned prior starts as N(0, I) (so an encoder trained with the standard prior loads into
    it unchanged), maps the caller's standard normal draw through mu + sigma * z, and the KL is
    taken against it: a posterior equal to the prior pays nothing."""
    from pipelines.stylegan_io import load_generator

    G = load_generator(assets / "G")
    torch.manual_seed(0)
    standard = SketchEncoder(G.num_ws, G.w_dim, 16, channel_base=128, channel_max=16, completion_dim=3)
    with torch.no_grad():
        standard.completion[-1].weight.normal_(0, 0.3)
    learned = SketchEncoder(**dict(standard.init_kwargs, completion_prior="learned"))
    assert learned.init_kwargs["completion_prior"] == "learned" and "completion_prior" not in standard.init_kwargs
    missing = learned.load_state_dict(standard.state_dict(), strict=False).missing_keys
    assert missing and all(name.startswith("prior.") for name in missing)
    sketches = torch.ones(2, 1, 16, 16)
    sketches[1, :, 4:12, 8] = -1
    eps = torch.randn(2, 3)
    with torch.no_grad():
        assert torch.equal(learned(sketches, z=eps), standard(sketches, z=eps))  # zero-initialised head: N(0, I)
        learned.prior[-1].bias.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0, 0.0, 0.0]))  # mu (1, -1, .5), sigma 1
        learned.prior[-1].weight.normal_(0, 0.5)
        w_mean, summary = learned.mean_and_summary(sketches)
        mu_p, logvar_p = learned.prior_params(w_mean, summary)
        assert not torch.allclose(mu_p[0], mu_p[1])  # each sketch its own prior
        code = mu_p + torch.exp(0.5 * logvar_p) * eps
        assert torch.allclose(learned(sketches, z=eps), learned.complete(w_mean, summary, code), atol=1e-6)
        assert torch.allclose(learned(sketches), learned.complete(w_mean, summary, mu_p), atol=1e-6)  # z=None: mean

    cfg = SketchEncoderTrainConfig(align_weight=1.0, align_image_weight=0.0, completion_kl_weight=1.0)
    w_target = torch.randn(2, G.num_ws, G.w_dim)
    k = learned.structure_layers
    terms = _losses(learned, G, sketches, w_target, None, None, cfg, k, 1.0, eps=eps,
                    prior_rows=torch.tensor([False, False]))
    with torch.no_grad():
        mu_q, logvar_q = learned.posterior_params(summary, w_target[:, :k] - w_mean[:, :k])
    expected = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(1).mean()
    assert terms["kl"].item() == pytest.approx(expected.item(), rel=1e-4)
    terms["loss"].backward()
    assert learned.prior[-1].weight.grad.abs().sum() > 0  # the prior learns from the KL
    prior_rows = _losses(learned, G, sketches, w_target, None, None, cfg, k, 1.0, eps=eps,
                         prior_rows=torch.tensor([True, True]))
    with torch.no_grad():
        assert prior_rows["align"].item() == pytest.approx(
            float((learned(sketches, z=eps)[:, :k] - w_target[:, :k]).square().mean()), rel=1e-5)
    mean_rows = _losses(learned, G, sketches, w_target, None, None, cfg, k, 1.0, eps=eps,
                        prior_rows=torch.tensor([True, False]), mean_rows=torch.tensor([False, True]))
    with torch.no_grad():  # row 0 a prior sample, row 1 the prior's mean code (z = None), neither pays a KL
        expected = torch.cat([learned(sketches[:1], z=eps[:1]), learned(sketches[1:])])
    assert mean_rows["kl"].item() == 0.0
    assert mean_rows["align"].item() == pytest.approx(float((expected[:, :k] - w_target[:, :k]).square().mean()),
                                                      rel=1e-5)
    with pytest.raises(ValueError, match="needs a completion code"):
        SketchEncoder(G.num_ws, G.w_dim, 16, channel_base=128, channel_max=16, completion_prior="learned")
    with pytest.raises(ValueError, match="completion_prior"):
        SketchEncoder(G.num_ws, G.w_dim, 16, channel_base=128, channel_max=16, completion_dim=2, completion_prior="x")


def test_learned_prior_run_saves_and_reloads_it(tmp_path, assets):
    folder = train(_config(tmp_path, assets, steps=2, sample_every=2, completion_dim=3, completion_prior="learned"))
    enc = load_sketch_encoder(folder)
    assert enc.completion_prior == "learned" and hasattr(enc, "prior")
    assert json.loads((folder / "config.json").read_text())["init_kwargs"]["completion_prior"] == "learned"
    with pytest.raises(ValueError, match="needs a completion code"):
        train(_config(tmp_path / "bad", assets, completion_prior="learned"))


def test_hybrid_objective_trains_unfinished_sketches_with_prior_codes_too(tmp_path, assets):
    """completion_prior_share 1: every unfinished sketch takes its code from the prior, as at
    inference (Sohn et al.'s GSNN rows), so no row pays a KL; share 0: they read the posterior."""
    over = dict(steps=2, sample_every=2, completion_dim=3, completion_prior="learned", partial_prob=1.0)
    train(_config(tmp_path / "all", assets, completion_prior_share=1.0, **over))
    train(_config(tmp_path / "none", assets, completion_prior_share=0.0, **over))
    kl_all = [r["kl"] for r in _rows(tmp_path / "all" / "run") if "align" in r]
    kl_none = [r["kl"] for r in _rows(tmp_path / "none" / "run") if "align" in r]
    assert kl_all == [0.0, 0.0] and all(v > 0 for v in kl_none)
    train(_config(tmp_path / "mean", assets, completion_prior_share=1.0, completion_prior_code="mean", **over))
    assert [r["kl"] for r in _rows(tmp_path / "mean" / "run") if "align" in r] == [0.0, 0.0]
    with pytest.raises(ValueError, match="completion_prior_code"):
        train(_config(tmp_path / "bad", assets, completion_prior_code="mode"))
    with pytest.raises(ValueError, match="completion_prior_share"):
        train(_config(tmp_path / "bad", assets, completion_prior_share=1.5))
