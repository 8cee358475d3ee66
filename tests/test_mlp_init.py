"""``MLP(init="xavier")``: mammoth's MNISTMLP initialization (the DER paper's Seq-MNIST network)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cl_plugins.models import MLP, ContinualClassifier


def _linears(m: nn.Module) -> list[nn.Linear]:
    return [x for x in m.modules() if isinstance(x, nn.Linear)]


def test_xavier_draws_glorot_uniform_weights_and_zero_biases():
    torch.manual_seed(0)
    net = MLP(784, 10, hidden=100, depth=2, init="xavier")
    layers = _linears(net)
    assert [tuple(m.weight.shape) for m in layers] == [(100, 784), (100, 100), (10, 100)]
    for m in layers:
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # mammoth: sqrt(3) * sqrt(2 / (fan_in + fan_out))
        assert torch.count_nonzero(m.bias) == 0
        assert m.weight.abs().max() <= bound
        # U(-a, a) has std a / sqrt(3); 78,400 / 10,000 / 1,000 draws put the sample std within a few %
        rel = 4.0 / math.sqrt(m.weight.numel())
        assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=rel)
        # and it uses the range: PyTorch's default bound 1/sqrt(fan_in) is below it for these shapes
        assert m.weight.abs().max() > 1.0 / math.sqrt(fan_in)


def test_default_init_is_unchanged_and_the_option_reaches_the_cli_model():
    torch.manual_seed(0)
    plain = MLP(784, 10, hidden=100, depth=2)
    torch.manual_seed(0)
    same = MLP(784, 10, hidden=100, depth=2, init="default")
    for a, b in zip(plain.state_dict().values(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.count_nonzero(_linears(plain)[0].bias) > 0  # PyTorch's default draws biases
    model = ContinualClassifier("mlp", num_classes=10, backbone_kwargs={"hidden": 100, "depth": 2, "init": "xavier"})
    assert all(torch.count_nonzero(m.bias) == 0 for m in _linears(model))


def test_unknown_init_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'default'.*'xavier'"):
        MLP(784, 10, init="kaiming")
