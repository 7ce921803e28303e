"""train_clip on the CPU with a tiny model: the loss learns, a killed run resumes, the export loads."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from pipelines.clip_models import WEIGHTS_FILE, load_clip, prepare_images
from pipelines.data.bank import render_bank
from pipelines.data.portrait_world import ATTRIBUTES, PortraitAttributes, caption_attributes
from pipelines.training.runs import RunFolder
from pipelines.training.train_clip import (ClipTrainConfig, augment, build_caption_pool, contrastive_loss,
                                           load_init_weights, positives, prompt_caption, train, vision_summary)

TINY = "PortraitCLIP-Test-TinyTrain"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (the shared fixture in conftest.py)."""


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory) -> str:
    cfg_dir = tmp_path_factory.mktemp("clip_cfg")
    (cfg_dir / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir)
    return TINY


def _config(tmp_path, **kw) -> ClipTrainConfig:
    base = dict(out_dir=str(tmp_path / "run"), model=TINY, train_images=16, val_images=8, batch=8,
                world_captions=2, prompt_captions=1, steps=4, warmup=2, lr=2e-3, checkpoint_every=2,
                log_every=2, eval_every=0, workers=1, device="cpu")
    base.update(kw)
    return ClipTrainConfig(**base)


def test_loss_decreases_on_a_tiny_fixed_batch():
    torch.manual_seed(0)
    bank = render_bank(8, size=64, seed=3, workers=1)
    tok = open_clip.get_tokenizer(TINY)
    model = open_clip.create_model(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = tok(bank.captions)
    x = bank.batch(torch.arange(8))
    losses = []
    for _ in range(25):
        loss = contrastive_loss(model.encode_image(prepare_images(model, x), normalize=True),
                                model.encode_text(text, normalize=True), model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_multi_positive_targets():
    labels = torch.tensor([[0, 1], [0, 2], [1, 1]])
    mentions = torch.tensor([[0, -1], [-1, 2], [1, 1]], dtype=torch.int8)
    match = positives(labels, mentions)                   # [image, caption]
    assert match.tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    f = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    scale = torch.tensor(10.0)
    plain = contrastive_loss(f, f, scale)
    assert torch.isclose(plain, contrastive_loss(f, f, scale, torch.eye(3, dtype=torch.bool)))
    assert not torch.isclose(plain, contrastive_loss(f, f, scale, match))
    # extra negative texts raise the image-to-text loss only; a far-away negative changes nothing
    near = torch.cat([f, f + 0.01 * torch.randn(3, 8)])
    assert contrastive_loss(f, near, scale) > plain
    far = torch.cat([f, -f])
    assert torch.isclose(contrastive_loss(f, far, torch.tensor(100.0)), contrastive_loss(f, f, torch.tensor(100.0)),
                         atol=1e-4)


def test_prompt_captions_say_true_things_and_their_twins_one_false_thing():
    rng = np.random.default_rng(0)
    attrs = PortraitAttributes.from_indices([0] * len(ATTRIBUTES)).replace(hair_color="blue", glasses="yes")
    truth = attrs.to_dict()
    for _ in range(20):
        (text, named), (twin, twin_named) = prompt_caption(attrs, rng)
        assert 1 <= len(named) <= 3 and caption_attributes(text) == named
        assert all(truth[k] == v for k, v in named.items())
        assert caption_attributes(twin) == twin_named and twin_named.keys() == named.keys()
        assert sum(truth[k] != v for k, v in twin_named.items()) == 1


def test_caption_pool_is_deterministic_and_labels_what_captions_say(tmp_path):
    bank = render_bank(6, size=64, seed=5, workers=1)
    one = build_caption_pool(bank, _config(tmp_path, workers=1), tmp_path / "a.npz")
    two = build_caption_pool(bank, _config(tmp_path, workers=2), tmp_path / "b.npz")   # forked workers
    for a, b in zip(vars(one).values(), vars(two).values()):
        assert torch.equal(a, b)
    context, n_attr = TINY_CFG["text_cfg"]["context_length"], len(ATTRIBUTES)
    assert one.tokens.shape == (6, 3, context) and one.mentions.shape == (6, 3, n_attr)
    assert one.neg_tokens.shape == (6, 1, context) and one.neg_mentions.shape == (6, 1, n_attr)
    # captions name only true values; each twin names exactly one false value
    named = one.mentions.long() >= 0
    assert named.any(-1).all()
    assert torch.all((one.mentions.long() == bank.labels[:, None, :]) | ~named)
    neg_named = one.neg_mentions.long() >= 0
    wrong = (one.neg_mentions.long() != bank.labels[:, None, :]) & neg_named
    assert torch.all(wrong.sum(-1) == 1)
    cached = build_caption_pool(bank, _config(tmp_path), tmp_path / "a.npz")
    assert torch.equal(cached.neg_tokens, one.neg_tokens)


def test_augment_keeps_shape_range_and_is_seeded():
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    # colours are kept: the mean colour of a flat image does not move
    flat = torch.tensor([0.8, -0.2, 0.1]).view(1, 3, 1, 1).expand(2, 3, 64, 64).contiguous()
    torch.testing.assert_close(augment(flat, torch.Generator().manual_seed(1)).mean((0, 2, 3)),
                               flat.mean((0, 2, 3)), atol=0.02, rtol=0)


def _nearest_whole_pixel_shift(x: torch.Tensor, y: torch.Tensor) -> float:
    """The smallest max-difference between y and x rolled by whole pixels (or flipped and rolled),
    away from the borders."""
    return min((y - torch.roll(xf, (dy, dx), (-2, -1)))[:, 8:-8, 8:-8].abs().max().item()
               for xf in (x, x.flip(-1)) for dy in range(-4, 5) for dx in range(-4, 5))


def test_augment_without_zoom_or_blur_only_moves_whole_pixels():
    """zoom=0, blur=0: each image is its source shifted (and maybe flipped) by whole pixels, plus the
    small noise, so one-pixel lines stay sharp; the default zoom resamples, which this would catch."""
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    sharp = augment(x, torch.Generator().manual_seed(0), zoom=0, blur=0)
    assert all(_nearest_whole_pixel_shift(x[i], sharp[i]) < 0.2 for i in range(8))
    soft = augment(x, torch.Generator().manual_seed(0))
    assert max(_nearest_whole_pixel_shift(x[i], soft[i]) for i in range(8)) > 0.5
    with pytest.raises(ValueError, match="augment_zoom"):
        ClipTrainConfig(augment_zoom=0.6).validate()


def test_killed_run_resumes_and_exports_a_loadable_model(tmp_path):
    class Killed(Exception):
        pass

    def kill_at_3(step, total, preview):
        if step == 3:
            raise Killed

    config = _config(tmp_path, steps=5)
    with pytest.raises(Killed):
        train(config, progress=kill_at_3)
    run = RunFolder(config.out_dir)
    assert run.latest_checkpoint().name == "step_0000002.pt"

    seen = []
    folder = train(_config(tmp_path, steps=5, resume=True), progress=lambda s, t, p: seen.append(s))
    assert seen == [3, 4, 5]                                  # continued the step count
    assert folder == run.path / "clip"
    assert run.status()["state"] == "finished" and run.status()["step"] == 5
    losses = [r["loss"] for r in run.metrics() if "loss" in r]
    assert losses and all(np.isfinite(losses))
    final = run.metrics()[-1]
    assert 0 <= final["clip_zero_shot_accuracy"] <= 1 and "heldout_zs_hair_color" in final
    # the export is an open_clip checkpoint with a card
    assert {p.name for p in folder.iterdir()} >= {WEIGHTS_FILE, "open_clip_config.json", "card.json", "README.md"}
    model, _, _ = open_clip.create_model_and_transforms(TINY, pretrained=str(folder / WEIGHTS_FILE))
    assert load_clip(folder).model.logit_scale.item() == pytest.approx(model.logit_scale.item())
    card = json.loads((folder / "card.json").read_text())
    assert "clip_zero_shot_accuracy" in card["figures"]
    # a new run can start from the exported weights
    warm = train(_config(tmp_path, out_dir=str(tmp_path / "warm"), steps=1, lr=1e-9, init_from=str(folder)))
    a, b = load_clip(folder).model.state_dict(), load_clip(warm).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)


def test_max_train_minutes_stops_the_run_early(tmp_path):
    train(_config(tmp_path, steps=10_000, max_train_minutes=1 / 60, checkpoint_every=10_000, log_every=10_000))
    status = RunFolder(tmp_path / "run").status()
    assert status["state"] == "finished" and 0 < status["step"] < 10_000


@pytest.mark.parametrize("vision", [
    {"layers": [1, 1, 1, 1], "width": 8},                                          # ModifiedResNet
    {"layers": 1, "width": 32, "head_width": 16, "patch_size": 16},                 # ViT
])
def test_init_from_a_model_of_another_input_size(tmp_path, vision):
    """Weights trained at 64 px continue at 128 px: every weight is kept, the position grid is
    resized (its class row kept), and the model runs at the new size."""
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    torch.manual_seed(0)
    small = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 64, **vision}, text_cfg=text)
    large = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 128, **vision}, text_cfg=text)
    state = {k: v.contiguous() for k, v in small.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"model": state}, tmp_path / "ckpt.pt")
    for path in (tmp_path / "w.safetensors", tmp_path / "ckpt.pt"):
        load_init_weights(large, path)
        got = large.state_dict()
        resized = [k for k in state if got[k].shape != state[k].shape]
        assert len(resized) == 1 and "positional_embedding" in resized[0]
        key = resized[0]
        assert got[key].shape[0] - 1 == 4 * (state[key].shape[0] - 1)          # a grid twice as wide
        assert torch.equal(got[key][:1], state[key][:1])                       # the class position
        assert all(torch.equal(got[k], state[k]) for k in state if k != key)
        with torch.no_grad():
            assert large.encode_image(torch.zeros(1, 3, 128, 128)).shape == (1, 16)
    assert ("ModifiedResNet" if isinstance(vision["layers"], list) else "ViT") in vision_summary(
        {"image_size": 128, **vision})


def test_render_size_renders_smaller_images_than_the_model_input(tmp_path):
    config = _config(tmp_path, steps=1, render_size=32, val_images=4)
    train(config)
    run = RunFolder(config.out_dir)
    from pipelines.data.bank import ImageBank
    assert ImageBank.load(run.path / "train_bank.npz").images.shape[-1] == 32
    with pytest.raises(ValueError, match="render_size"):
        _config(tmp_path, render_size=8).validate()
