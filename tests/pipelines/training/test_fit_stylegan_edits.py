"""Fitting edit directions and truncation modes for a generator, and self-filtering a bank."""

import json

import pytest
import torch

from models.evaluator import AttributeEvaluator
from models.stylegan2 import Generator
from pipelines.data.portrait_world import ATTRIBUTES
from pipelines.evaluation import Evaluator
from pipelines.stylegan_editing import MultiModalTruncation, load_directions
from pipelines.stylegan_io import save_generator
from pipelines.training.fit_stylegan_edits import FitEditsConfig, fit
from pipelines.training.self_filter import SelfFilterConfig, filter_report, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("edits")
    torch.manual_seed(0)
    G = Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3, mapping_kwargs={"num_layers": 2},
                  synthesis_kwargs={"channel_base": 256, "channel_max": 16})
    save_generator(G, root / "G")
    torch.manual_seed(1)
    # every attribute of the world, so the fit sees real attribute names; random weights read random values
    Evaluator(AttributeEvaluator([(k, len(v)) for k, v in ATTRIBUTES.items()], resolution=16, width=8,
                                 feature_dim=16)).save_pretrained(root / "ev", fp16=False)
    return root


def test_fit_writes_directions_modes_a_latent_classifier_and_a_summary(assets):
    cfg = FitEditsConfig(generator=str(assets / "G"), evaluator=str(assets / "ev"), device="cpu", num_samples=300,
                         min_samples=5, k=4, mode_samples=100, lc_samples=300, lc_mining_rounds=1,
                         lc_mining_samples=100, lc_epochs=2, lc_hidden=16)
    out = fit(cfg, command="python -m pipelines.training.fit_stylegan_edits ...")
    directions = load_directions(out / "directions")
    assert directions, "no direction was fitted"
    for key, d in directions.items():
        attr, value = key.split("=")
        assert value in ATTRIBUTES[attr]
        assert abs(float(d.vector.norm()) - 1) < 1e-4 and d.kind == "interfacegan"
    modes = MultiModalTruncation.load(out / "modes")
    assert modes.k == 4 and int(modes.sizes.sum()) == 100
    summary = json.loads((out / "edits.json").read_text())
    assert summary["command"].startswith("python -m pipelines.training.fit_stylegan_edits")
    assert set(summary["directions"]) == set(directions)
    # the guided-edit classifier: trained on 300 sampled latents, then 100 of its own edits relabelled
    from pipelines.stylegan_guided_edit import LatentAttributeClassifier
    clf = LatentAttributeClassifier.from_pretrained(out / "latent_classifier")
    assert (clf.num_ws, clf.w_dim) == (assets_num_ws(assets), 16) and list(clf.attributes) == list(ATTRIBUTES)
    assert clf.members == 3 and clf.has_prototypes  # the last round trains the ensemble; prototypes follow
    rounds = summary["latent_classifier"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["latents"] > rounds[0]["latents"]
    assert set(summary["commands"]) == {"directions", "modes", "latent_classifier"}

    # refitting one part keeps the others and their summary
    before = (out / "modes" / "modes.safetensors").read_bytes()
    fit(FitEditsConfig(generator=str(assets / "G"), evaluator=str(assets / "ev"), device="cpu",
                       parts="latent_classifier", lc_samples=200, lc_mining_rounds=0, lc_epochs=1, lc_hidden=16,
                       lc_members=1),
        command="python -m pipelines.training.fit_stylegan_edits --parts latent_classifier")
    again = json.loads((out / "edits.json").read_text())
    assert (out / "modes" / "modes.safetensors").read_bytes() == before and again["directions"] == summary["directions"]
    assert again["commands"]["modes"] == summary["commands"]["modes"]
    assert again["commands"]["latent_classifier"].endswith("--parts latent_classifier")
    assert len(again["latent_classifier"]["rounds"]) == 1
    # hard mining: round 2 draws its targets by how round 1's edits fared; each round says how they did
    fit(FitEditsConfig(generator=str(assets / "G"), evaluator=str(assets / "ev"), device="cpu",
                       parts="latent_classifier", lc_samples=200, lc_mining_rounds=2, lc_mining_samples=60,
                       lc_mining_chunk=20, lc_hard_mining=True, lc_epochs=1, lc_hidden=16, lc_members=1),
        command="python -m pipelines.training.fit_stylegan_edits --parts latent_classifier --lc_hard_mining true")
    hard = json.loads((out / "edits.json").read_text())["latent_classifier"]["rounds"]
    assert [r["round"] for r in hard] == [0, 1, 2] and hard[2]["latents"] > hard[1]["latents"] > hard[0]["latents"]
    assert all(0 <= r["edits_reached"] <= 1 and 1 <= len(r["hardest"]) <= 3 for r in hard[1:])
    with pytest.raises(ValueError, match="lc_mining_chunk"):
        FitEditsConfig(generator=str(assets / "G"), evaluator=str(assets / "ev"), lc_mining_chunk=0).validate()
    with pytest.raises(ValueError, match="parts"):
        FitEditsConfig(generator=str(assets / "G"), evaluator=str(assets / "ev"), parts="colours").validate()
    with pytest.raises(ValueError, match="k"):
        fit(FitEditsConfig(generator=str(assets / "G"), evaluator=str(assets / "ev"), k=200, mode_samples=100))


def assets_num_ws(root) -> int:
    from pipelines.stylegan_io import load_generator
    return int(load_generator(root / "G").num_ws)


def test_filter_report_counts_precision_and_recall():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.0, 0.05, 0.15, 0.25])
    truth = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    rep = filter_report(scores, truth, rate=0.3)  # drops 0.9, 0.8, 0.7: two of three outliers
    assert rep["dropped"] == 3 and rep["precision"] == pytest.approx(2 / 3) and rep["recall"] == pytest.approx(2 / 3)


def test_self_filter_script_writes_an_exclude_list_and_a_report(assets, tmp_path):
    cfg = SelfFilterConfig(generator=str(assets / "G"), evaluator=str(assets / "ev"), out=str(tmp_path / "sf"),
                           device="cpu", bank_size=40, outlier_rate=0.25, steps=2, rate=0.25, batch_size=20,
                           workers=1, bank_cache=str(tmp_path / "bank.npz"))
    report = run(cfg, command="python -m pipelines.training.self_filter ...")
    excluded = json.loads((tmp_path / "sf" / "exclude.json").read_text())
    assert len(excluded) == 10 and all(0 <= i < 40 for i in excluded) and excluded == sorted(excluded)
    assert report["combined"]["outliers"] == report["generator_only"]["outliers"] > 0
    assert json.loads((tmp_path / "sf" / "report.json").read_text())["combined"] == report["combined"]


def test_self_filter_with_an_encoder_is_one_pass(assets, tmp_path):
    from models.stylegan2.encoder import StyleGANEncoder
    from pipelines.stylegan_inversion import save_encoder

    torch.manual_seed(3)
    save_encoder(StyleGANEncoder(6, 16, 16, channel_base=64, channel_max=16), tmp_path / "enc")
    cfg = SelfFilterConfig(generator=str(assets / "G"), encoder=str(tmp_path / "enc"), evaluator="none",
                           out=str(tmp_path / "sf"), device="cpu", bank_size=40, outlier_rate=0.25, rate=0.25,
                           batch_size=40, workers=1, bank_cache=str(tmp_path / "bank.npz"))
    report = run(cfg)
    assert report["combined"] == report["generator_only"]  # no evaluator: the generator alone
    with pytest.raises(ValueError, match="encoder"):
        SelfFilterConfig(generator=str(assets / "G"), encoder=str(tmp_path / "missing")).validate()
