"""Guided edits: a latent classifier learns attributes of W+ latents, and edits follow it per latent."""

import pytest
import torch

from pipelines.stylegan_guided_edit import (LatentAttributeClassifier, fit_latent_classifier, guided_edit,
                                            label_latents, mine_edit_latents, mining_weights, parse_target,
                                            sample_training_latents)
from pipelines.stylegan_inversion import synthesize
from tests._tiny import tiny_generator, tiny_world_evaluator

ATTRS = {"glasses": ["no", "yes"], "colour": ["red", "green", "blue"]}


def planted_labels(w: torch.Tensor) -> torch.Tensor:
    """Two attributes of [N, 4, 8] latents: glasses = |mean of coordinate 0| > 0.8 (not linear),
    colour = argmax of coordinates 1..3, both of the layer mean."""
    m = w.mean(1)
    return torch.stack([(m[:, 0].abs() > 0.8).long(), m[:, 1:4].argmax(1)], 1)


@pytest.fixture(scope="module")
def planted():
    w = torch.randn(6000, 4, 8, generator=torch.Generator().manual_seed(0))
    model, accuracy = fit_latent_classifier(w, planted_labels(w), ATTRS, epochs=30, hidden=128, seed=0)
    return model, accuracy


def test_the_classifier_learns_a_nonlinear_attribute(planted):
    model, accuracy = planted
    assert set(accuracy) == set(ATTRS) and min(accuracy.values()) > 0.9, accuracy
    w = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(9))
    pred = model.predict(w)
    assert len(pred) == 5 and set(pred[0]) == set(ATTRS) and pred[0]["colour"] in ATTRS["colour"]


def test_guided_edit_reaches_the_target_and_keeps_the_rest(planted):
    model, _ = planted
    w = torch.randn(400, 4, 8, generator=torch.Generator().manual_seed(1))
    truth = planted_labels(w)
    top2 = w.mean(1)[:, 1:4].topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.3       # colours not on the brink of a tie
    w = w[(truth[:, 0] == 0) & clear][:100]       # no glasses
    colour = planted_labels(w)[:, 1]
    out = guided_edit(model, w, "glasses=yes", steps=300)
    after = planted_labels(out.w_plus)
    assert float((after[:, 0] == 1).float().mean()) >= 0.9      # glasses appear (either sign of coordinate 0)
    assert float((after[:, 1] == colour).float().mean()) >= 0.9  # colour kept
    assert out.reached.float().mean() >= 0.9 and out.probability.shape == (100,)
    # a multi-target edit moves both
    both = guided_edit(model, w, ["glasses=yes", ("colour", "blue")], steps=300)
    after = planted_labels(both.w_plus)
    assert float(((after[:, 0] == 1) & (after[:, 1] == 2)).float().mean()) >= 0.85


def test_guided_edit_moves_only_the_chosen_layers_and_stops_when_reached(planted):
    model, _ = planted
    w = torch.randn(8, 4, 8, generator=torch.Generator().manual_seed(2))
    out = guided_edit(model, w, "colour=green", layers=[1, 2], steps=50)
    assert torch.equal(out.w_plus[:, [0, 3]], w[:, [0, 3]]) and not torch.equal(out.w_plus[:, 1:3], w[:, 1:3])
    # already there: nothing moves
    there = w[planted_labels(w)[:, 1] == 1]
    if len(there):
        p = torch.softmax(model(there)["colour"], 1)[:, 1]
        done = there[p > 0.999]
        if len(done):
            assert torch.equal(guided_edit(model, done, "colour=green", threshold=0.99).w_plus, done)
    # a [B, w_dim] latent is broadcast to every layer
    assert guided_edit(model, w[:, 0], "glasses=yes", steps=2).w_plus.shape == (8, 4, 8)


def test_bad_targets_and_settings_say_what_is_wrong(planted):
    model, _ = planted
    w = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="attribute=value"):
        guided_edit(model, w, "hat")
    with pytest.raises(ValueError, match="no value 'purple'"):
        guided_edit(model, w, "colour=purple")
    with pytest.raises(ValueError, match="one value per attribute"):
        guided_edit(model, w, ["colour=red", "colour=blue"])
    with pytest.raises(ValueError, match="threshold"):
        guided_edit(model, w, "colour=red", threshold=1.5)
    with pytest.raises(ValueError, match="layers"):
        guided_edit(model, w, "colour=red", layers=[7])
    with pytest.raises(ValueError, match=r"\[B, 4, 8\]"):
        guided_edit(model, torch.zeros(1, 3, 8), "colour=red")
    assert parse_target(" glasses = yes ", ATTRS) == ("glasses", "yes")


def test_save_and_load_round_trip_and_refuse_broken_files(planted, tmp_path):
    model, _ = planted
    model.save_pretrained(tmp_path / "lc", extra={"training": {"latents": 6000}})
    back = LatentAttributeClassifier.from_pretrained(tmp_path / "lc")
    w = torch.randn(16, 4, 8, generator=torch.Generator().manual_seed(3))
    for k, v in model(w).items():
        assert torch.allclose(back(w)[k], v, atol=2e-2)          # fp16 weights
    assert torch.equal(back.w_mean, model.w_mean)                 # normalisation kept in fp32
    weights = tmp_path / "lc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read"):
        LatentAttributeClassifier.from_pretrained(tmp_path / "lc")
    with pytest.raises(FileNotFoundError, match="no latent classifier"):
        LatentAttributeClassifier.from_pretrained(tmp_path / "missing")


def test_labels_come_from_the_rendered_images_and_mining_adds_edited_latents():
    G, ev = tiny_generator(), tiny_world_evaluator()
    w = sample_training_latents(G, 40, generator=torch.Generator().manual_seed(0))
    assert w.shape == (40, G.num_ws, G.w_dim) and not torch.equal(w[:, 0], w[:, -1])  # some are mixed
    names = ["hair_color", "glasses"]
    labels, outlier = label_latents(G, ev, w, names, batch_size=16)
    with torch.no_grad():
        direct = ev.run(synthesize(G, w))
    assert torch.equal(labels[:, 0], direct["hair_color"]) and torch.equal(labels[:, 1], direct["glasses"])
    assert outlier.shape == (40,)
    from pipelines.data.portrait_world import ATTRIBUTES
    all_labels, _ = label_latents(G, ev, w, list(ATTRIBUTES))
    model, _ = fit_latent_classifier(w, all_labels, ATTRIBUTES, epochs=1, hidden=8, val_fraction=0)
    mw, ml, mo, reached = mine_edit_latents(model, G, ev, w, 24, chunk=8, generator=torch.Generator().manual_seed(1),
                                            steps=3)
    assert mw.shape == (24, G.num_ws, G.w_dim) and ml.shape == (24, len(ATTRIBUTES)) and mo.shape == (24,)
    with torch.no_grad():
        assert torch.equal(ml[:, 0], ev.run(synthesize(G, mw))["hair_color"])
    assert sum(n for _, n in reached.values()) == 24 and all(0 <= h <= n for h, n in reached.values())
    for key, (hit, n) in reached.items():  # each tally is the share of its edits the evaluator reads as asked
        assert n % 8 == 0 and hit <= n

    # hard mining: every chunk goes to the one target with weight, and its tally counts the readings
    hard = mine_edit_latents(model, G, ev, w, 16, chunk=8, generator=torch.Generator().manual_seed(2), steps=3,
                             target_weights={"glasses=yes": 1.0})
    hit = int((hard.labels[:, list(ATTRIBUTES).index("glasses")] == list(ATTRIBUTES["glasses"]).index("yes")).sum())
    assert hard.reached == {"glasses=yes": (hit, 16)}
    with pytest.raises(ValueError, match="does not know"):
        mine_edit_latents(model, G, ev, w, 8, target_weights={"glasses=maybe": 1.0})
    with pytest.raises(ValueError, match="not all zero"):
        mine_edit_latents(model, G, ev, w, 8, target_weights={"glasses=yes": 0.0})


def test_mining_weights_favour_targets_whose_edits_missed():
    keys = ["a=x", "a=y", "b=z"]
    weights = mining_weights({"a=x": (98, 100), "a=y": (40, 100)}, keys)
    assert weights["a=y"] > weights["b=z"] * 1.1 > weights["a=x"]  # missed 60 % > untried (0.5) > missed 2 %
    assert weights["b=z"] == 0.5 and weights["a=y"] == pytest.approx(61 / 102)
    assert weights["a=x"] == 0.05  # 3 / 102, raised to the floor: solved targets still get some edits
    assert mining_weights({"a=x": (98, 100)}, keys, floor=0.0)["a=x"] == pytest.approx(3 / 102)


def test_prototypes_are_class_means_and_give_unfinished_edits_a_second_start(planted, tmp_path):
    model, _ = planted
    model = LatentAttributeClassifier.from_pretrained(model.save_pretrained(tmp_path / "lc"))  # a private copy
    assert not model.has_prototypes
    w = torch.randn(3000, 4, 8, generator=torch.Generator().manual_seed(4))
    counts = model.fit_prototypes(w)
    assert model.has_prototypes and sum(counts[f"colour={v}"] for v in ATTRS["colour"]) == 3000
    red = torch.softmax(model(w)["colour"], 1).argmax(1) == 0
    assert torch.allclose(model.prototype("colour", "red"), w[red].mean(0) - w.mean(0), atol=1e-5)
    assert float(model.prototype("colour", "red").mean(0)[1]) > 0.3  # red = coordinate 1 is the largest

    # steps=0, start=0: the first start leaves every latent where it is, the second starts at the prototype shift
    x = torch.randn(16, 4, 8, generator=torch.Generator().manual_seed(5))
    first = guided_edit(model, x, "colour=red", steps=0, start=0.0, restart=0.0)
    assert torch.equal(first.w_plus, x)
    todo = ~first.reached
    assert todo.any() and (~todo).any()
    second = guided_edit(model, x, "colour=red", steps=0, start=0.0, restart=1.0)
    proto = model.prototype("colour", "red")
    assert torch.allclose(second.w_plus[todo], x[todo] + proto, atol=1e-6)
    assert torch.equal(second.w_plus[~todo], x[~todo])
    # the default first start is half way to the prototype, for the latents not there yet
    half = guided_edit(model, x, "colour=red", steps=0, restart=0.0)
    assert torch.allclose(half.w_plus[todo], x[todo] + 0.5 * proto, atol=1e-6)
    assert torch.equal(half.w_plus[~todo], x[~todo])
    assert torch.allclose(half.step_norm[todo], 0.5 * proto.flatten().norm().expand(int(todo.sum())), atol=1e-5)
    with pytest.raises(ValueError, match="start"):
        guided_edit(model, x, "colour=red", start=-0.5)
    # kept through save/load; a classifier saved without prototypes loads with none
    back = LatentAttributeClassifier.from_pretrained(model.save_pretrained(tmp_path / "lc2"))
    assert torch.equal(back.prototypes, model.prototypes)
    with pytest.raises(ValueError, match="restart"):
        guided_edit(model, x, "colour=red", restart=-1.0)
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "lc2" / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "prototypes"}, str(tmp_path / "lc2" / "model.safetensors"))
    assert not LatentAttributeClassifier.from_pretrained(tmp_path / "lc2").has_prototypes


def test_an_ensemble_averages_its_members_log_probabilities_and_loads_single_mlp_files(tmp_path):
    w = torch.randn(600, 4, 8, generator=torch.Generator().manual_seed(6))
    ens, acc = fit_latent_classifier(w, planted_labels(w), ATTRS, epochs=2, hidden=16, members=3)
    assert ens.members == 3 and len(ens.nets) == 3 and set(acc) == set(ATTRS)
    x = (w[:5] - ens.w_mean) / ens.w_std
    member_logits = [net(x)[:, 2:5] for net in ens.nets]          # the 'colour' head of each member
    expected = torch.stack([torch.log_softmax(m, 1) for m in member_logits]).mean(0)
    assert torch.allclose(ens(w[:5])["colour"], expected, atol=1e-6)
    assert not torch.allclose(member_logits[0], member_logits[1])  # the members differ
    back = LatentAttributeClassifier.from_pretrained(ens.save_pretrained(tmp_path / "ens"))
    assert back.members == 3 and torch.allclose(back(w[:5])["colour"], ens(w[:5])["colour"], atol=2e-2)
    # a file from before ensembles ('net.*' keys) still loads as one member
    single, _ = fit_latent_classifier(w, planted_labels(w), ATTRS, epochs=1, hidden=16)
    single.save_pretrained(tmp_path / "one")
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "one" / "model.safetensors"))
    save_file({k.replace("nets.0.", "net."): v for k, v in state.items()}, str(tmp_path / "one" / "model.safetensors"))
    old = LatentAttributeClassifier.from_pretrained(tmp_path / "one")
    assert torch.allclose(old(w[:5])["colour"], single(w[:5])["colour"], atol=2e-2)
