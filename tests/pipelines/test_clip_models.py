"""CLIP loading through open_clip: registered config, save/load round trips, truncation, hub offline."""

from __future__ import annotations

import json
import pickle
import time

import open_clip
import pytest
import torch
from PIL import Image

from pipelines import clip_models
from pipelines.clip_models import (CONFIG_DIR, CONFIG_FILE, EMBEDDED_CLIP, EMBEDDED_NAME, GPU_NAME, WEIGHTS_FILE,
                                   attribute_prompts, image_features, load_clip, prepare_images, save_clip,
                                   text_features, tokenize, zero_shot_accuracy, zero_shot_classify)
from pipelines.data.portrait_world import ATTRIBUTES, caption_attributes

TINY = "PortraitCLIP-Test-Tiny"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (the shared fixture in conftest.py)."""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> torch.nn.Module:
    """A randomly initialised tiny model of a config registered the way the studio registers its own."""
    cfg_dir = tmp_path_factory.mktemp("clip_cfg")
    (cfg_dir / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    return open_clip.create_model(TINY).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 3, 64, 64) * 2 - 1     # [B, 3, H, W] in [-1, 1]


def _features(model, images):
    tok = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        return image_features(model.eval(), images), text_features(model, tok, ["a girl", "blue hair"])[0]


def test_embedded_config_is_registered_with_open_clip():
    assert EMBEDDED_NAME in open_clip.list_models()
    cfg = open_clip.get_model_config(EMBEDDED_NAME)
    assert cfg == json.loads((CONFIG_DIR / f"{EMBEDDED_NAME}.json").read_text())
    assert cfg["vision_cfg"]["image_size"] == 128 and cfg["text_cfg"]["vocab_size"] == 49408
    tok = open_clip.get_tokenizer(EMBEDDED_NAME)
    assert isinstance(tok, open_clip.SimpleTokenizer) and tok.context_length == cfg["text_cfg"]["context_length"]
    assert clip_models.register_configs() == sorted([EMBEDDED_NAME, "PortraitCLIP-RN-64", GPU_NAME])  # idempotent
    assert open_clip.list_models().count(EMBEDDED_NAME) == 1
    model = open_clip.create_model(EMBEDDED_NAME)
    assert 5e6 < sum(p.numel() for p in model.parameters()) < 40e6
    with torch.no_grad():
        assert model.encode_image(torch.zeros(1, 3, 128, 128)).shape == (1, cfg["embed_dim"])


def test_saved_model_loads_back_through_open_clip_identically(tiny_model, images, tmp_path):
    folder = save_clip(tiny_model, tmp_path / "clip", model_name=TINY, fp16=False)
    assert (folder / WEIGHTS_FILE).exists() and json.loads((folder / CONFIG_FILE).read_text())["model_name"] == TINY
    ref_img, ref_txt = _features(tiny_model, images)
    # the same call as for a hub model
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=str(folder / WEIGHTS_FILE))
    img, txt = _features(model, images)
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)
    # the studio's loader, and open_clip's own local-dir schema
    for source in (folder, "local-dir:" + str(folder), folder / WEIGHTS_FILE):
        loaded = load_clip(source)
        assert not loaded.model.training
        img, txt = _features(loaded.model, images)
        assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)
    # the fp16 export the training script writes stays close
    half = load_clip(save_clip(tiny_model, tmp_path / "half", model_name=TINY, fp16=True))
    img, _ = _features(half.model, images)
    torch.testing.assert_close(img, ref_img, atol=2e-3, rtol=0)


class _NotATensor:
    pass


def test_torch_checkpoints_load_with_weights_only(tiny_model, images, tmp_path):
    path = tmp_path / "clip.pt"
    torch.save(tiny_model.state_dict(), path)
    model, _, tok = load_clip(TINY, pretrained=path)
    assert torch.equal(_features(model, images)[0], _features(tiny_model, images)[0])
    # a pickle carrying an arbitrary object is refused, not executed
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_model.state_dict(), "x": _NotATensor()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_clip(TINY, pretrained=evil)


def test_preprocessing_of_tensors_matches_open_clip_transform(tiny_model):
    torch.manual_seed(2)
    u8 = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    _, _, preprocess = open_clip.create_model_and_transforms(TINY)
    expected = preprocess(Image.fromarray(u8.permute(1, 2, 0).numpy()))
    got = prepare_images(tiny_model, (u8.float() / 127.5 - 1)[None])[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    big = prepare_images(tiny_model, torch.zeros(2, 3, 128, 96))          # resized and centre-cropped
    assert big.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        prepare_images(tiny_model, torch.zeros(3, 64, 64))


def test_long_text_is_truncated_and_flagged(tiny_model):
    tok = open_clip.get_tokenizer(TINY)
    short, long = "an anime girl with blue hair", "an anime girl with " + "long blue hair and " * 10 + "a hat"
    tokens, truncated = tokenize(tok, [short, long, "a b c d e f g h i j k l m n"])   # last: exactly 16 tokens
    assert tokens.shape == (3, 16) and truncated.tolist() == [False, True, False]
    assert tokens[1, -1] == tok.eot_token_id
    feats, flags = text_features(tiny_model, tok, [long])
    assert feats.shape == (1, 16) and flags.tolist() == [True]
    assert torch.allclose(feats.norm(dim=-1), torch.ones(1))


def test_prompts_name_the_value_they_stand_for():
    for name, values in ATTRIBUTES.items():
        prompts = attribute_prompts(name)
        assert len(prompts) == len(values)
        for value, group in zip(values, prompts):
            for prompt in group:      # read back by the world's own caption parser
                assert caption_attributes(prompt) == {name: value}, prompt
    with pytest.raises(ValueError, match="unknown attribute"):
        attribute_prompts("hair_colour")


def test_zero_shot_classify_and_accuracy(tiny_model, images):
    tok = open_clip.get_tokenizer(TINY)
    pred = zero_shot_classify(tiny_model, tok, images, "hair_color")
    assert pred.shape == (3,) and pred.dtype == torch.int64
    assert int(pred.max()) < len(ATTRIBUTES["hair_color"])
    u8 = ((images + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(zero_shot_classify(tiny_model, tok, u8, "hair_color"), pred)
    labels = torch.zeros(3, len(ATTRIBUTES), dtype=torch.long)
    labels[2] = -1                                                         # an outlier row is skipped
    figures = zero_shot_accuracy(tiny_model, tok, images, labels)
    assert set(figures) == {f"zs_{n}" for n in ATTRIBUTES} | {"clip_zero_shot_accuracy"}
    assert all(0 <= v <= 1 for v in figures.values())


def test_bad_names_and_paths_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown CLIP model"):
        load_clip("ViT-Nonexistent-1")
    with pytest.raises(ValueError, match="give pretrained="):
        load_clip("ViT-B-32")
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        load_clip("ViT-B-32", pretrained="no_such_tag")
    with pytest.raises(FileNotFoundError):
        load_clip("ViT-B-32", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(tmp_path)
    with pytest.raises(ValueError, match="precision"):
        load_clip("embedded", precision="fp8")


@pytest.mark.timeout(60)
def test_hub_weights_offline_fail_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(RuntimeError, match="needs network or a local cache"):
        load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="needs network or a local cache"):
        load_clip("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", cache_dir=str(tmp_path))
    assert time.time() - t0 < 10
    # not marked offline, but the hub cannot be reached: the probe gives up within seconds
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(clip_models, "_hf_offline", lambda: False)
    monkeypatch.setattr(clip_models, "_hf_host", lambda: "hub.unreachable.invalid")
    t0 = time.time()
    with pytest.raises(RuntimeError, match="unreachable"):
        load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert time.time() - t0 < 10


@pytest.mark.weights
def test_embedded_clip_loads_through_open_clip_and_reads_attributes():
    if not (EMBEDDED_CLIP / WEIGHTS_FILE).exists():
        pytest.skip("no embedded CLIP in assets/clip")
    from pipelines.data.bank import render_bank

    model, _, _ = open_clip.create_model_and_transforms(EMBEDDED_NAME, pretrained=str(EMBEDDED_CLIP / WEIGHTS_FILE))
    tok = open_clip.get_tokenizer(EMBEDDED_NAME)
    bank = render_bank(256, size=64, seed=20_000_000, split="heldout", workers=2)
    figures = zero_shot_accuracy(model.eval(), tok, bank.images, bank.labels)
    assert figures["clip_zero_shot_accuracy"] >= 0.85, figures
