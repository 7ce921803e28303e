"""The portrait world: contract, determinism, labels, splits, captions, line art, sketches, dataset."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from pipelines.data.datasets import PortraitDataset
from pipelines.data.portrait_world import (
    ATTRIBUTES,
    HELD_OUT_COMBINATIONS,
    STROKE_GROUPS,
    PortraitAttributes,
    PortraitWorld,
    _compose_caption,
    caption_attributes,
    is_held_out,
    measure_render_rate,
)

BASE = {"hair_color": "black", "hair_style": "short", "bangs": "no", "eye_color": "brown",
        "expression": "neutral", "glasses": "no", "accessory": "none", "skin_tone": "fair",
        "background": "white"}


@pytest.fixture(scope="module")
def world() -> PortraitWorld:
    return PortraitWorld()


def _arr(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


# -- attributes ---------------------------------------------------------------------------------

def test_attribute_contract() -> None:
    assert list(ATTRIBUTES) == ["hair_color", "hair_style", "bangs", "eye_color", "expression", "glasses",
                                "accessory", "skin_tone", "background"]
    assert ATTRIBUTES["hair_style"] == ("short", "bob", "long", "twintails")
    assert ATTRIBUTES["expression"] == ("neutral", "smile", "laughing", "surprised")
    assert [f.name for f in fields(PortraitAttributes)] == list(ATTRIBUTES)
    assert STROKE_GROUPS == ("outline", "eyes", "hair", "details")


def test_attribute_validation_and_round_trips() -> None:
    a = PortraitAttributes.from_dict(BASE)
    assert a.to_dict() == BASE
    assert a.to_indices() == {k: ATTRIBUTES[k].index(v) for k, v in BASE.items()}
    assert PortraitAttributes.from_indices(a.to_indices()) == a
    assert a.replace(hair_color="pink").hair_color == "pink"
    with pytest.raises(ValueError, match="missing attribute.*glasses"):
        PortraitAttributes.from_dict({k: v for k, v in BASE.items() if k != "glasses"})
    with pytest.raises(ValueError, match="unknown attribute name.*'hat_color'"):
        PortraitAttributes.from_dict({**BASE, "hat_color": "red"})
    with pytest.raises(ValueError, match="allowed values: black, brown, blonde, red, blue, pink, silver, green"):
        PortraitAttributes.from_dict({**BASE, "hair_color": "purple"})
    with pytest.raises(ValueError, match="allowed values: none, ribbon, hat"):
        a.replace(accessory="crown")
    with pytest.raises(ValueError, match="unknown attribute name"):
        a.replace(mood="happy")


def test_render_validation(world: PortraitWorld) -> None:
    for size in (63, 513):
        with pytest.raises(ValueError, match="between 64 and 512"):
            world.render(BASE, seed=0, size=size)
    for seed in (-1, 2**32, 10**20):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
            world.render(BASE, seed=seed, size=64)
    for seed in (1.5, "3", True):
        with pytest.raises(ValueError, match="seed must be an int"):
            world.render(BASE, seed=seed, size=64)
    with pytest.raises(ValueError, match="allowed values"):
        world.render({**BASE, "eye_color": "black"}, seed=0, size=64)
    with pytest.raises(ValueError, match="fraction"):
        world.render_sketch([], size=64, fraction=1.5)
    with pytest.raises(ValueError, match="split"):
        world.sample_attributes(np.random.default_rng(0), split="test")


# -- rendering ----------------------------------------------------------------------------------

def test_render_is_deterministic(world: PortraitWorld) -> None:
    a = world.render(BASE, seed=12345, size=96)
    b = world.render(BASE, seed=12345, size=96)
    assert a.image.mode == "RGB" and a.image.size == (96, 96)
    assert a.line_art.mode == "L" and a.line_art.size == (96, 96)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.line_art.tobytes() == b.line_art.tobytes()
    assert a.caption == b.caption and a.seed == 12345
    c = world.render(BASE, seed=12346, size=96)
    assert a.image.tobytes() != c.image.tobytes()
    # the geometry does not depend on the size, only on the seed
    big = world.render(BASE, seed=12345, size=200)
    assert len(big.strokes) == len(a.strokes)
    assert all(np.array_equal(s.points, t.points) for s, t in zip(a.strokes, big.strokes))
    assert world.sample(7, size=64).image.tobytes() == world.sample(7, size=64).image.tobytes()


def test_pose_is_kept_when_a_colour_changes(world: PortraitWorld) -> None:
    a = world.render(BASE, seed=99, size=64)
    b = world.render({**BASE, "hair_color": "blue", "eye_color": "green"}, seed=99, size=64)
    assert all(np.array_equal(s.points, t.points) for s, t in zip(a.strokes, b.strokes))
    assert a.line_art.tobytes() == b.line_art.tobytes()


@pytest.mark.parametrize("name", list(ATTRIBUTES))
def test_every_attribute_value_changes_the_image(world: PortraitWorld, name: str) -> None:
    base = PortraitAttributes.from_dict(BASE)
    ref = _arr(world.render(base, seed=3, size=64).image)
    for value in ATTRIBUTES[name]:
        if value == getattr(base, name):
            continue
        img = _arr(world.render(base.replace(**{name: value}), seed=3, size=64).image)
        changed = (np.abs(img - ref).max(2) > 16).sum()
        assert changed >= 8, f"{name}={value} changes only {changed} pixels"


def test_strokes_are_well_formed_and_in_group_order(world: PortraitWorld) -> None:
    for seed in range(6):
        p = world.sample(seed, size=64, split="any")
        groups = [STROKE_GROUPS.index(s.group) for s in p.strokes]
        assert groups == sorted(groups) and set(groups) == {0, 1, 2, 3}
        for s in p.strokes:
            assert s.points.dtype == np.float32 and s.points.ndim == 2 and s.points.shape[1] == 2
            assert len(s.points) >= 2 and 0 < s.width < 0.05
            assert s.points.min() >= 0.0 and s.points.max() <= 1.0


def _edge_mask(image) -> np.ndarray:
    """Pixels within 1 px of a colour edge."""
    a = np.asarray(image).astype(np.float32)
    g = np.zeros(a.shape[:2], np.float32)
    g[:, 1:] = np.abs(np.diff(a, axis=1)).max(2)
    g[1:, :] = np.maximum(g[1:, :], np.abs(np.diff(a, axis=0)).max(2))
    m = g > 24
    out = m.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= np.roll(np.roll(m, dy, 0), dx, 1)
    return out


def test_line_art_sits_on_colour_edges(world: PortraitWorld) -> None:
    on, shifted = [], []
    for seed in range(8):
        p = world.sample(seed, size=128, split="any")
        edges = _edge_mask(p.image)
        lines = np.asarray(p.line_art) < 128
        assert lines.sum() > 300
        on.append((edges & lines).sum() / lines.sum())
        moved = np.roll(lines, 5, axis=1)
        shifted.append((edges & moved).sum() / moved.sum())
    assert np.mean(on) > 0.93 and min(on) > 0.85, on
    assert np.mean(shifted) < np.mean(on) - 0.15  # the check does tell aligned from misaligned


def test_partial_sketch_grows_and_ends_at_the_line_art(world: PortraitWorld) -> None:
    p = world.sample(5, size=96)
    dark = []
    for fraction in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        sketch = world.render_sketch(p.strokes, size=96, fraction=fraction)
        assert sketch.mode == "L" and sketch.size == (96, 96)
        dark.append(int((np.asarray(sketch) < 128).sum()))
    assert dark[0] == 0
    assert all(a <= b for a, b in zip(dark, dark[1:])) and dark[-1] > dark[2] > 0
    assert world.render_sketch(p.strokes, size=96).tobytes() == p.line_art.tobytes()


def test_render_without_line_art(world: PortraitWorld) -> None:
    p = world.render(BASE, seed=1, size=64, with_line_art=False)
    assert p.line_art is None and p.image.size == (64, 64) and p.strokes


# -- splits -------------------------------------------------------------------------------------

def test_held_out_combinations_are_valid_pairs() -> None:
    assert 6 <= len(HELD_OUT_COMBINATIONS) <= 10
    for combo in HELD_OUT_COMBINATIONS:
        assert len(combo) == 2
        assert all(k in ATTRIBUTES and v in ATTRIBUTES[k] for k, v in combo.items())
        assert is_held_out({**BASE, **combo})


def test_splits_honour_held_out_combinations(world: PortraitWorld) -> None:
    rng = np.random.default_rng(0)
    assert not any(is_held_out(world.sample_attributes(rng, split="train")) for _ in range(400))
    assert all(is_held_out(world.sample_attributes(rng, split="heldout")) for _ in range(400))
    anys = [is_held_out(world.sample_attributes(rng, split="any")) for _ in range(400)]
    assert 0.05 < np.mean(anys) < 0.6
    assert is_held_out(world.sample(11, size=64, split="heldout").attributes)
    assert not is_held_out(world.sample(11, size=64, split="train").attributes)


# -- captions -----------------------------------------------------------------------------------

def test_captions_parse_back_to_what_they_mention(world: PortraitWorld) -> None:
    mentions = {name: 0 for name in ATTRIBUTES}
    glasses_said = glasses_total = 0
    for seed in range(600):
        rng = np.random.default_rng(seed)
        attrs = world.sample_attributes(rng, split="any")
        caption, mentioned = _compose_caption(attrs, rng)
        assert {"hair_color", "hair_style"} <= mentioned.keys()
        assert all(attrs.to_dict()[k] == v for k, v in mentioned.items())
        assert caption_attributes(caption) == mentioned, caption
        for k in mentioned:
            mentions[k] += 1
        if attrs.glasses == "yes":
            glasses_total += 1
            glasses_said += "glasses" in mentioned
    assert all(n > 0 for n in mentions.values())
    assert glasses_said / glasses_total > 0.8
    # the public caption of a render is one of these
    p = world.sample(3, size=64)
    parsed = caption_attributes(p.caption)
    assert parsed["hair_color"] == p.attributes.hair_color and parsed["hair_style"] == p.attributes.hair_style


def test_captions_vary(world: PortraitWorld) -> None:
    attrs = PortraitAttributes.from_dict({**BASE, "glasses": "yes", "accessory": "ribbon"})
    captions = {world.caption(attrs, np.random.default_rng(s)) for s in range(60)}
    assert len(captions) > 40
    starts = {c.split(" with ")[0].split(",")[0][:12] for c in captions}
    assert len(starts) >= 5


def test_caption_parser_reads_hand_written_prompts() -> None:
    assert caption_attributes("A girl with golden hair in twintails, amber eyes and no glasses") == {
        "hair_color": "blonde", "hair_style": "twintails", "eye_color": "gold", "glasses": "no"}
    assert caption_attributes("anime girl, blue hair, bob cut, glasses, smiling, mint background") == {
        "hair_color": "blue", "hair_style": "bob", "expression": "smile", "glasses": "yes", "background": "mint"}
    assert caption_attributes("long silver hair, without bangs, wearing a hat, dark skin") == {
        "hair_color": "silver", "hair_style": "long", "bangs": "no", "accessory": "hat", "skin_tone": "dark"}
    assert caption_attributes("a landscape with mountains") == {}


# -- speed and dataset --------------------------------------------------------------------------

def test_measure_render_rate_runs() -> None:
    assert measure_render_rate(64, n=5) > 0


def test_portrait_dataset_items() -> None:
    ds = PortraitDataset(size=64, length=6, seed=40, split="heldout")
    assert len(ds) == 6
    item = ds[2]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert -1.0 <= float(item["image"].min()) < float(item["image"].max()) <= 1.0
    assert item["labels"].shape == (len(ATTRIBUTES),) and item["labels"].dtype == torch.long
    assert not bool(item["is_outlier"]) and isinstance(item["caption"], str) and item["caption"]
    attrs = PortraitAttributes.from_indices(item["labels"].tolist())
    assert is_held_out(attrs)
    again = PortraitDataset(size=64, length=6, seed=40, split="heldout")[2]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["labels"], again["labels"])
    # item i is the world's portrait of seed (seed + i)
    expected = PortraitWorld().sample(42, size=64, split="heldout")
    assert attrs == expected.attributes and item["caption"] == expected.caption
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError, match="size"):
        PortraitDataset(size=32, length=4)
