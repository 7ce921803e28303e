import pytest
import torch

from models.evaluator import AttributeEvaluator

ATTRS = [("a", 3), ("b", 2)]


def test_outputs_and_shapes_for_any_input_size():
    net = AttributeEvaluator(ATTRS, resolution=32, width=8, feature_dim=16).eval()
    for size in (32, 64, 128):
        out = net(torch.randn(2, 3, size, size))
        assert out.logits["a"].shape == (2, 3) and out.logits["b"].shape == (2, 2)
        assert out.outlier_logit.shape == (2,) and out.features.shape == (2, 16)


def test_verdict_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    net = AttributeEvaluator(ATTRS, resolution=32, width=8, feature_dim=16).eval()
    x = torch.randn(4, 3, 32, 32)
    alone = net(x[:1]).features
    batched = net(x).features[:1]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_bad_resolution_refused():
    with pytest.raises(ValueError, match="power of two"):
        AttributeEvaluator(ATTRS, resolution=48)
