"""Behaviour of the studio's StyleGAN2-ADA networks and ops on tiny random configurations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.stylegan2 import Discriminator, Generator, MinibatchStdLayer
from models.stylegan2.ops import (
    bias_act,
    conv2d_resample,
    downsample2d,
    setup_filter,
    upfirdn2d,
    upsample2d,
)


def tiny_generator(resolution: int, c_dim: int = 0, **synthesis_kwargs) -> Generator:
    torch.manual_seed(0)
    synthesis = dict(channel_base=16 * resolution, channel_max=16, **synthesis_kwargs)
    return Generator(
        z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=resolution, img_channels=3,
        mapping_kwargs=dict(num_layers=2), synthesis_kwargs=synthesis,
    )


def tiny_discriminator(resolution: int, c_dim: int = 0, **kwargs) -> Discriminator:
    torch.manual_seed(1)
    return Discriminator(
        c_dim=c_dim, img_resolution=resolution, img_channels=3, channel_base=16 * resolution, channel_max=16,
        epilogue_kwargs=dict(mbstd_group_size=2), **kwargs,
    )


def one_hot(labels: list[int], c_dim: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(labels), c_dim).float()


def with_noise(G: Generator) -> Generator:
    """Give every noise input a non-zero strength (they start at 0)."""
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
    return G


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [2**i for i in range(2, 11)])
def test_every_resolution_constructs(resolution: int) -> None:
    G = tiny_generator(resolution, c_dim=2)
    D = tiny_discriminator(resolution, c_dim=2)
    log2 = int(math.log2(resolution))
    assert G.num_ws == 2 * log2 - 2  # two convs per block (one in b4) + the last toRGB
    assert G.mapping.w_avg.shape == (8,)
    assert G.synthesis.block_resolutions[-1] == resolution
    assert D.block_resolutions == [2**i for i in range(log2, 2, -1)]


def test_full_size_1024_has_official_names_and_shapes() -> None:
    G = Generator(
        z_dim=512, c_dim=0, w_dim=512, img_resolution=1024, img_channels=3,
        synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256),
    )
    D = Discriminator(c_dim=0, img_resolution=1024, img_channels=3, channel_base=32768, num_fp16_res=4, conv_clamp=256)
    g = {k: tuple(v.shape) for k, v in G.state_dict().items()}
    d = {k: tuple(v.shape) for k, v in D.state_dict().items()}
    assert G.num_ws == 18
    assert g["mapping.fc7.weight"] == (512, 512)
    assert g["mapping.w_avg"] == (512,)
    assert g["synthesis.b4.const"] == (512, 4, 4)
    assert g["synthesis.b1024.conv0.noise_const"] == (1024, 1024)
    assert g["synthesis.b1024.conv1.affine.weight"] == (32, 512)
    assert g["synthesis.b1024.torgb.weight"] == (3, 32, 1, 1)
    assert g["synthesis.b64.resample_filter"] == (4, 4)
    assert d["b1024.fromrgb.weight"] == (32, 3, 1, 1)
    assert d["b1024.skip.weight"] == (64, 32, 1, 1)
    assert d["b4.conv.weight"] == (512, 513, 3, 3)  # + the minibatch-std channel
    assert d["b4.fc.weight"] == (512, 512 * 16)
    assert d["b4.out.weight"] == (1, 512)
    assert sum(v.numel() for v in G.parameters()) == 30_370_060  # as printed by the official training log


def test_init_kwargs_round_trip_through_json() -> None:
    G = tiny_generator(16, c_dim=3, architecture="resnet")
    D = tiny_discriminator(16, c_dim=3, architecture="skip")
    G2 = Generator(**json.loads(json.dumps(G.init_kwargs)))
    D2 = Discriminator(**json.loads(json.dumps(D.init_kwargs)))
    G2.load_state_dict(G.state_dict(), strict=True)
    D2.load_state_dict(D.state_dict(), strict=True)
    assert G2.init_kwargs == G.init_kwargs and D2.init_kwargs == D.init_kwargs


def test_invalid_resolution_is_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        tiny_generator(48)


# ---------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resolution,architecture",
    [(4, "skip"), (8, "skip"), (32, "skip"), (64, "skip"), (4, "resnet"), (32, "resnet"), (8, "orig"), (32, "orig")],
)
@torch.no_grad()
def test_forward_shapes(resolution: int, architecture: str) -> None:
    G = tiny_generator(resolution, c_dim=3, architecture=architecture).eval()
    D = tiny_discriminator(resolution, c_dim=3, architecture=architecture).eval()
    z, c = torch.randn(4, 8), one_hot([0, 1, 2, 0], 3)
    ws = G.mapping(z, c)
    assert ws.shape == (4, G.num_ws, 8)
    img = G.synthesis(ws, noise_mode="const")
    assert img.shape == (4, 3, resolution, resolution) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    logits = D(img, c)
    assert logits.shape == (4, 1) and torch.isfinite(logits).all()


@torch.no_grad()
def test_labels_change_the_output() -> None:
    G = tiny_generator(8, c_dim=3).eval()
    D = tiny_discriminator(8, c_dim=3).eval()
    z = torch.randn(1, 8).repeat(2, 1)
    c = one_hot([0, 2], 3)
    img = G(z, c, noise_mode="const")
    assert not torch.allclose(img[0], img[1])
    assert not torch.allclose(D(img, c), D(img, c.flip(0)))
    with pytest.raises(ValueError, match="c: expected shape"):
        G(z, None)


@torch.no_grad()
def test_truncation_and_cutoff() -> None:
    G = tiny_generator(16).eval()
    G.mapping.w_avg.copy_(torch.randn(8))
    z = torch.randn(3, 8)
    ws = G.mapping(z, None)
    at_mean = G.mapping(z, None, truncation_psi=0)
    torch.testing.assert_close(at_mean, G.mapping.w_avg.expand_as(ws))
    half = G.mapping(z, None, truncation_psi=0.5)
    torch.testing.assert_close(half, G.mapping.w_avg + 0.5 * (ws - G.mapping.w_avg))
    cut = G.mapping(z, None, truncation_psi=0.5, truncation_cutoff=2)
    torch.testing.assert_close(cut[:, :2], half[:, :2])
    torch.testing.assert_close(cut[:, 2:], ws[:, 2:])


def test_w_avg_tracks_the_mean_in_training() -> None:
    G = tiny_generator(8).train()
    z = torch.randn(16, 8)
    before = G.mapping.w_avg.clone()
    G.mapping(z, None, skip_w_avg_update=True)
    assert torch.equal(G.mapping.w_avg, before)
    ws = G.mapping(z, None)
    expected = ws[:, 0].detach().mean(0).lerp(before, 0.995)
    torch.testing.assert_close(G.mapping.w_avg, expected)
    G.eval()
    G.mapping(z, None)
    torch.testing.assert_close(G.mapping.w_avg, expected)  # no update at inference


@torch.no_grad()
def test_noise_modes() -> None:
    G = with_noise(tiny_generator(16)).eval()
    ws = G.mapping(torch.randn(2, 8), None)
    const_a = G.synthesis(ws, noise_mode="const")
    const_b = G.synthesis(ws, noise_mode="const")
    none = G.synthesis(ws, noise_mode="none")
    assert torch.equal(const_a, const_b)
    assert not torch.allclose(const_a, none)
    seeded = [G.synthesis(ws, noise_mode="random", generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    other = G.synthesis(ws, noise_mode="random", generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(seeded[0], other)
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, noise_mode="fixed")


@torch.no_grad()
def test_fused_and_unfused_modconv_agree() -> None:
    G = with_noise(tiny_generator(32, c_dim=2)).eval()
    ws = G.mapping(torch.randn(3, 8), one_hot([0, 1, 1], 2))
    fused = G.synthesis(ws, noise_mode="const", fused_modconv=True)
    unfused = G.synthesis(ws, noise_mode="const", fused_modconv=False)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    G = with_noise(tiny_generator(16, c_dim=2)).train()
    D = tiny_discriminator(16, c_dim=2).train()
    c = one_hot([0, 1, 1, 0], 2)
    img = G(torch.randn(4, 8), c, noise_mode="random")
    loss = F.softplus(-D(img, c)).mean()
    loss.backward()
    for name, p in list(G.named_parameters()) + list(D.named_parameters()):
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), name
    assert G.synthesis.b16.conv1.weight.grad.abs().sum() > 0


def test_minibatch_std_needs_divisible_batch() -> None:
    layer = MinibatchStdLayer(group_size=4)
    x = torch.randn(8, 6, 4, 4)
    y = layer(x)
    assert y.shape == (8, 7, 4, 4)
    assert torch.equal(y[:, :6], x)
    with pytest.raises(ValueError, match="divisible"):
        layer(torch.randn(6, 6, 4, 4))


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


def test_setup_filter() -> None:
    f = setup_filter([1, 3, 3, 1])
    assert f.shape == (4, 4) and f.dtype == torch.float32
    torch.testing.assert_close(f.sum(), torch.tensor(1.0))
    assert setup_filter([1] * 8).shape == (8,)  # long filters stay separable
    torch.testing.assert_close(setup_filter([1, 2], gain=4).sum(), torch.tensor(4.0))


def test_bias_act_gain_and_clamp() -> None:
    x = torch.tensor([[-2.0, 0.5, 3.0]])
    b = torch.tensor([0.0, 0.0, 1.0])
    y = bias_act(x, b, act="lrelu", gain=2.0, clamp=5.0)
    torch.testing.assert_close(y, torch.tensor([[-0.8, 1.0, 5.0]]))
    torch.testing.assert_close(bias_act(x, act="relu"), F.relu(x) * math.sqrt(2))


def test_resampling_keeps_constant_images_constant() -> None:
    f = setup_filter([1, 3, 3, 1])
    ones = torch.ones(1, 2, 8, 8)
    up = upsample2d(ones, f)
    down = downsample2d(ones, f)
    assert up.shape == (1, 2, 16, 16) and down.shape == (1, 2, 4, 4)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))


@pytest.mark.parametrize("flip_weight", [True, False])
@pytest.mark.parametrize("up,down", [(2, 1), (1, 2), (1, 1)])
def test_conv2d_resample_matches_its_definition(up: int, down: int, flip_weight: bool) -> None:
    """Fast paths equal: pad once, upsample with zeros, filter, convolve, filter + decimate."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    f = setup_filter([1, 3, 3, 1]).double()
    actual = conv2d_resample(x, w, f=f, up=up, down=down, padding=1, flip_weight=flip_weight)

    pad = [1, 1, 1, 1]
    if up > 1:
        pad = [p + q for p, q in zip(pad, [2, 1, 2, 1])]  # (fw + up - 1) // 2, (fw - up) // 2
    if down > 1:
        pad = [p + q for p, q in zip(pad, [1, 1, 1, 1])]  # (fw - down + 1) // 2, (fw - down) // 2
    y = upfirdn2d(x, None, up=up, padding=pad)
    if up > 1:
        y = upfirdn2d(y, f, gain=up**2)
    y = F.conv2d(y, w if flip_weight else w.flip([2, 3]))
    if down > 1:
        y = upfirdn2d(y, f, down=down)
    assert actual.shape == y.shape == (2, 5, 8 * up // down, 8 * up // down)
    torch.testing.assert_close(actual, y, atol=1e-10, rtol=0)
