"""Editing on a tiny random StyleGAN2: SeFa, InterFaceGAN, multi-modal truncation, self-filtering."""

import json

import pytest
import torch

from models.evaluator import AttributeEvaluator
from models.stylegan2 import Generator
from models.stylegan2.encoder import StyleGANEncoder
from pipelines.evaluation import Evaluator
from pipelines.stylegan_editing import (Direction, MultiModalTruncation, apply_edit, cluster_modes,
                                        edit_across_boundary, fit_directions_from_labels,
                                        fit_interfacegan_directions, global_truncate, load_directions,
                                        save_directions, sefa_directions, sefa_labels, select_outliers,
                                        self_filter_scores, style_layers, write_exclude_list)
from pipelines.stylegan_inversion import synthesize


def tiny_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3,
                     mapping_kwargs={"num_layers": 2},
                     synthesis_kwargs={"channel_base": 256, "channel_max": 16}).eval()


def tiny_evaluator() -> Evaluator:
    torch.manual_seed(1)
    return Evaluator(AttributeEvaluator([("hair_color", 8), ("glasses", 2)], resolution=16, width=8, feature_dim=16))


# -- SeFa ------------------------------------------------------------------------------------


def test_sefa_directions_are_orthonormal_sorted_and_respect_layers():
    G = tiny_generator()
    dirs, eig = sefa_directions(G)
    assert dirs.shape == (16, 16) and eig.shape == (16,)
    assert torch.allclose(dirs @ dirs.T, torch.eye(16), atol=1e-5)
    assert torch.all(eig[:-1] >= eig[1:])
    assert sefa_labels(eig)[0].startswith("SeFa 1 (λ = ")

    # layers=[0] uses the 4x4 convolution's affine only: its top eigenvector is A's top right-singular vector
    (w_idx, name, affine), *_ = style_layers(G)
    assert (w_idx, name) == (0, "b4.conv1")
    A = affine.weight.detach() / affine.weight.detach().norm(dim=1, keepdim=True)
    v = torch.linalg.svd(A).Vh[0]
    d0, _ = sefa_directions(G, layers=[0])
    assert abs(float(d0[0] @ v)) > 0.999
    # changing a layer outside the range leaves the directions unchanged; inside, it changes them
    d_all, _ = sefa_directions(G)
    last_idx, _, last = style_layers(G)[-1]
    with torch.no_grad():
        last.weight.mul_(torch.rand(last.weight.shape, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(sefa_directions(G, layers=[0])[0].abs(), d0.abs(), atol=1e-5)
    assert not torch.allclose(sefa_directions(G)[0].abs(), d_all.abs(), atol=1e-3)
    assert not torch.allclose(sefa_directions(G, layers=[last_idx])[0].abs(), d0.abs(), atol=1e-3)
    with pytest.raises(ValueError, match="layers"):
        sefa_directions(G, layers=[G.num_ws])


def test_apply_edit_moves_only_the_chosen_layers():
    w = torch.randn(2, 6, 16)
    n = torch.nn.functional.normalize(torch.randn(16), dim=0)
    d = Direction("x", n, scale=2.0)
    out = apply_edit(w, d, 1.5, layers=range(1, 3))
    assert torch.equal(out[:, [0, 3, 4, 5]], w[:, [0, 3, 4, 5]])
    assert torch.allclose(out[:, 1:3] - w[:, 1:3], (3.0 * n).expand(2, 2, 16), atol=1e-6)
    per_sample = apply_edit(w, n, torch.tensor([1.0, -1.0]))
    assert torch.allclose((per_sample - w)[1], -n.expand(6, 16), atol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        apply_edit(w, n, 1.0, layers=[6])


# -- InterFaceGAN ------------------------------------------------------------------------------


def test_interfacegan_recovers_a_planted_direction_and_conditions():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(800, 16, generator=g) * torch.linspace(0.5, 2.0, 16)  # anisotropic, like W
    n_a = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    n_b = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    labels = {"glasses": ((w @ n_a + 0.3 + 0.1 * torch.randn(800, generator=g)) > 0).long(),
              "expression": ((w @ n_b) > 0.5).long() * 1}  # 0 = neutral, 1 = smile
    dirs = fit_directions_from_labels(w, labels, attributes=["glasses=yes", "expression=smile"])
    assert set(dirs) == {"glasses=yes", "expression=smile"}
    assert float(dirs["glasses=yes"].vector @ n_a) > 0.9
    assert float(dirs["expression=smile"].vector @ n_b) > 0.9
    assert dirs["glasses=yes"].accuracy > 0.9
    # the smallest edit across the boundary makes every sample positive by the planted rule
    moved = edit_across_boundary(w[:, None].expand(-1, 6, -1), dirs["glasses=yes"], distance=0.5)
    assert ((moved[:, 0] @ n_a + 0.3) > 0).float().mean() > 0.95

    cond = fit_directions_from_labels(w, labels, attributes=["glasses=yes"],
                                      conditioned_on={"glasses=yes": ["expression=smile"]})
    assert set(cond) == {"glasses=yes"}
    assert abs(float(cond["glasses=yes"].vector @ dirs["expression=smile"].vector)) < 1e-5
    assert cond["glasses=yes"].conditioned_on == ["expression=smile"]


class LinearReadoutEvaluator:
    """A stand-in evaluator whose 'glasses' label is a fixed linear readout of the pixels."""

    def __init__(self, threshold: float) -> None:
        self.P = torch.randn(3 * 16 * 16, generator=torch.Generator().manual_seed(5))
        self.threshold = threshold

    def readout(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.P

    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"glasses": (self.readout(images) > self.threshold).long(),
                "outlier_score": torch.zeros(images.shape[0])}


def test_interfacegan_directions_edit_what_the_evaluator_reads(tmp_path):
    G = tiny_generator()
    with torch.no_grad():
        imgs = G(torch.randn(256, 16, generator=torch.Generator().manual_seed(1)), None, noise_mode="const")
    ev = LinearReadoutEvaluator(float(LinearReadoutEvaluator(0).readout(imgs).median()))
    dirs = fit_interfacegan_directions(G, ev, num_samples=400, attributes=["glasses"], truncation_psi=1.0,
                                       generator=torch.Generator().manual_seed(2))
    d = dirs["glasses=yes"]
    w = G.mapping(torch.randn(64, 16, generator=torch.Generator().manual_seed(3)), None)
    with torch.no_grad():
        after = ev.run(synthesize(G, apply_edit(w, d, 4.0)))["glasses"].float().mean()
        removed = ev.run(synthesize(G, apply_edit(w, d, -4.0)))["glasses"].float().mean()
    assert after >= 0.9 and removed <= 0.1, (after, removed)

    save_directions(dirs, tmp_path / "dirs")
    back = load_directions(tmp_path / "dirs")
    assert torch.equal(back["glasses=yes"].vector, d.vector) and back["glasses=yes"].scale == d.scale


# -- multi-modal truncation ---------------------------------------------------------------------


def test_multimodal_truncation(tmp_path):
    G = tiny_generator()
    modes = cluster_modes(G, tiny_evaluator(), num_samples=120, k=4, generator=torch.Generator().manual_seed(0))
    assert modes.centres.shape == (4, 16) and int(modes.sizes.sum()) == 120
    w = G.mapping(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)), None)  # [5, num_ws, 16]
    assert torch.allclose(modes.truncate(w, 1.0), w, atol=1e-6)
    at_zero = modes.truncate(w, 0.0)
    idx = modes.nearest(w)
    assert torch.allclose(at_zero, modes.centres[idx][:, None].expand_as(w), atol=1e-6)
    assert torch.equal(modes.nearest(modes.centres), torch.arange(4))
    half = modes.truncate(w[:, 0], 0.5)
    assert torch.allclose(half, (w[:, 0] + modes.centres[idx]) / 2, atol=1e-6)
    cut = modes.truncate(w, 0.0, cutoff=2)
    assert torch.equal(cut[:, 2:], w[:, 2:])
    assert torch.allclose(global_truncate(w, modes.w_avg, 0.0), modes.w_avg.expand_as(w))
    back = MultiModalTruncation.load(modes.save(tmp_path / "modes"))
    assert torch.equal(back.centres, modes.centres)


# -- self-filtering ---------------------------------------------------------------------------


def test_self_filter_ranks_planted_outliers_first():
    G = tiny_generator()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        inliers = G(torch.randn(10, 16, generator=g), None, noise_mode="const").clamp(-1, 1)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2 - 1).float().expand(3, 16, 16)
    outliers = torch.stack([torch.rand(3, 16, 16, generator=g) * 2 - 1, checker, -checker])
    images = torch.cat([inliers[:4], outliers[:1], inliers[4:], outliers[1:]])  # outliers at 4, 11, 12
    scores = self_filter_scores(G, images, steps=25, batch_size=13, generator=torch.Generator().manual_seed(0))
    assert scores.scores.shape == (13,) and scores.outlier_score is None
    assert set(select_outliers(scores, 3 / 13).tolist()) == {4, 11, 12}
    assert select_outliers(scores, 0.0).numel() == 0
    with pytest.raises(ValueError, match="rate"):
        select_outliers(scores, 1.5)


def test_self_filter_with_encoder_and_evaluator(tmp_path):
    G = tiny_generator()
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    enc = StyleGANEncoder(G.num_ws, G.w_dim, G.img_resolution, channel_base=128, channel_max=16)
    scores = self_filter_scores(G, images, encoder=enc, evaluator=tiny_evaluator(), batch_size=4)
    assert scores.outlier_score.shape == (6,) and scores.reconstruction_error.shape == (6,)
    assert scores.latent_distance.shape == (6,) and (scores.latent_distance >= 0).all()
    assert scores.scores.abs().max() <= 30  # three robust z-scores, each clipped to +-10
    # the combination = the generator's verdict + the evaluator's outlier head
    head = scores.scores - scores.generator_scores
    order = torch.argsort(scores.outlier_score)
    assert (head[order][1:] - head[order][:-1] >= -1e-4).all()  # grows with the outlier probability
    picked = select_outliers(scores, 0.5)
    assert picked.numel() == 3 and scores.scores[picked].min() >= scores.scores.median()
    file = write_exclude_list(picked, tmp_path / "exclude.json")
    assert json.loads(file.read_text()) == sorted(picked.tolist())
