"""The studio's StyleGAN2-ADA networks reproduce the official ones, given the official state dicts.

Reference tensors come from NVlabs/stylegan2-ada-pytorch (see the fixture folder's README.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models.stylegan2 import Discriminator, Generator
from tests._fixtures import shared_fixture_dir

ATOL = 1e-5  # fp32 on the CPU; the measured differences are ~1e-6 or exactly 0


class Case:
    """The official networks of one fixture case, loaded into the studio's classes."""

    def __init__(self, name: str) -> None:
        folder = shared_fixture_dir()
        kwargs = json.loads((folder / f"{name}_kwargs.json").read_text())
        self.G = Generator(**kwargs["G_init_kwargs"]).eval()
        self.D = Discriminator(**kwargs["D_init_kwargs"]).eval()
        self.G.load_state_dict(load_file(folder / f"{name}_G.safetensors"), strict=True)
        self.D.load_state_dict(load_file(folder / f"{name}_D.safetensors"), strict=True)
        self.io = load_file(folder / f"{name}_io.safetensors")


@pytest.fixture(scope="module", params=["uncond", "cond"])
def case(request: pytest.FixtureRequest) -> Case:
    return Case(request.param)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol:g}"


@torch.no_grad()
def test_mapping(case: Case) -> None:
    ws = case.G.mapping(case.io["z"], case.io["c"], truncation_psi=1)
    assert ws.shape == (4, case.G.num_ws, 64)
    assert_matches(ws, case.io["ws"])


@torch.no_grad()
def test_mapping_truncation(case: Case) -> None:
    assert_matches(case.G.mapping(case.io["z"], case.io["c"], truncation_psi=0.7), case.io["ws_psi07"])


@pytest.mark.parametrize("noise_mode", ["const", "none"])
@torch.no_grad()
def test_synthesis(case: Case, noise_mode: str) -> None:
    img = case.G.synthesis(case.io["ws"], noise_mode=noise_mode)
    assert_matches(img, case.io[f"img_noise_{noise_mode}"])


@torch.no_grad()
def test_synthesis_unfused_modconv(case: Case) -> None:
    # The training path scales activations instead of building per-sample weights; it rounds
    # differently, so the tolerance is looser.
    img = case.G.synthesis(case.io["ws"], noise_mode="const", fused_modconv=False)
    assert_matches(img, case.io["img_noise_const"], atol=5e-5)


@torch.no_grad()
def test_generator_end_to_end(case: Case) -> None:
    img = case.G(case.io["z"], case.io["c"], truncation_psi=0.7, noise_mode="const")
    assert_matches(img, case.io["img_psi07_const"])


@torch.no_grad()
def test_discriminator_logits(case: Case) -> None:
    logits = case.D(case.io["img_noise_const"], case.io["c"])
    assert logits.shape == (4, 1)
    assert_matches(logits, case.io["d_logits"])

