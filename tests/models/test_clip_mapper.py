"""The text-conditioned latent mapper: groups, identity at initialisation, text conditioning, shapes."""

import pytest
import torch

from models.clip_mapper import CLIPTextMapper, default_groups


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (the shared fixture in conftest.py)."""


def test_default_groups_follow_styleclip_by_resolution():
    # a 1024-px generator (18 ws): coarse 0-3, medium 4-7, fine 8-17, as in StyleCLIP's mapper
    assert default_groups(18) == [[0, 1, 2, 3], [4, 5, 6, 7], list(range(8, 18))]
    # the embedded 64-px generator (10 ws)
    assert default_groups(10) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # a 16-px generator has no fine ws
    assert default_groups(6) == [[0, 1, 2, 3], [4, 5], []]


def test_untrained_mapper_is_the_identity_and_training_makes_it_text_conditioned():
    torch.manual_seed(0)
    mapper = CLIPTextMapper(num_ws=6, w_dim=8, text_dim=12, hidden=16, num_layers=2)
    assert set(mapper.mappers) == {"coarse", "medium"}
    w = torch.randn(4, 6, 8)
    t = torch.nn.functional.normalize(torch.randn(4, 12), dim=-1)
    assert torch.equal(mapper.edit(w, t), w)
    # a few steps towards a text-dependent target: the offset then depends on the text
    target = torch.randn(12, 6 * 8) * 0.1
    opt = torch.optim.Adam(mapper.parameters(), lr=1e-2)
    for _ in range(60):
        loss = (mapper(w, t) - (t @ target).view(4, 6, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3
    t2 = t.roll(1, dims=0)
    assert not torch.allclose(mapper(w, t), mapper(w, t2), atol=1e-3)
    # one embedding [text_dim] serves the whole batch
    assert torch.equal(mapper(w, t[0]), mapper(w, t[:1].expand(4, -1)))


def test_standardisation_buffers_and_frozen_groups():
    torch.manual_seed(1)
    mapper = CLIPTextMapper(num_ws=10, w_dim=8, text_dim=4, edit_groups=("fine",))
    assert set(mapper.mappers) == {"fine"}
    with torch.no_grad():
        mapper.mappers["fine"].out.weight.normal_()
        mapper.w_avg.fill_(3.0)
        mapper.w_std.fill_(2.0)
    w = torch.randn(2, 10, 8)
    delta = mapper(w, torch.randn(2, 4))
    assert delta[:, :8].abs().max() == 0 and delta[:, 8:].abs().max() > 0   # coarse and medium ws kept
    state = mapper.state_dict()
    assert "w_avg" in state and "w_std" in state
    rebuilt = CLIPTextMapper(**mapper.init_kwargs)
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(rebuilt(w, torch.ones(2, 4)), mapper(w, torch.ones(2, 4)))


def test_bad_shapes_and_groups_are_refused():
    mapper = CLIPTextMapper(num_ws=6, w_dim=8, text_dim=4)
    with pytest.raises(ValueError, match="w_plus"):
        mapper(torch.zeros(2, 5, 8), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="text"):
        mapper(torch.zeros(2, 6, 8), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="split"):
        CLIPTextMapper(num_ws=6, w_dim=8, text_dim=4, groups=[[0, 1], [2], [3]])
    with pytest.raises(ValueError, match="edit_groups"):
        CLIPTextMapper(num_ws=6, w_dim=8, text_dim=4, edit_groups=("hair",))
