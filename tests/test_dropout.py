"""The integer-mask dropout: Bernoulli keep rate, inverted scaling, gradient, seeding, eval identity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cl_plugins.peft.dropout import FastDropout, dropout, effective_p, keep_mask


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_keep_rate_is_one_minus_p_within_sampling_error(p):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of 4: the last word is used in part
    kept = keep_mask((n,), p).double().mean().item()
    q = 1.0 - effective_p(p)
    assert abs(effective_p(p) - p) <= 2**-17
    assert abs(kept - q) < 5 * math.sqrt(q * (1 - q) / n)  # 5 standard errors


def test_every_16_bit_lane_of_a_word_is_uniform():
    """No lane is biased (e.g. a sign bit that is always 0): each of the 4 lanes keeps at the rate."""
    torch.manual_seed(1)
    mask = keep_mask((250_000, 4), 0.5)
    rates = mask.double().mean(dim=0)
    assert torch.all((rates - 0.5).abs() < 5 * math.sqrt(0.25 / 250_000)), rates


def test_forward_scales_kept_elements_and_backward_uses_the_same_mask():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.3)
    kept = y != 0
    scale = 1.0 / (1.0 - effective_p(0.3))
    torch.testing.assert_close(y[kept], x.detach()[kept] * scale)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g * scale, torch.zeros_like(g)))
    # the expectation is the input: the mean over many masks approaches x
    torch.manual_seed(3)
    x0 = torch.randn(8, 8)
    mean = torch.stack([dropout(x0, 0.3) for _ in range(4000)]).mean(dim=0)
    torch.testing.assert_close(mean, x0, atol=0.1, rtol=0.0)


def test_masks_follow_the_global_seed_and_eval_is_the_identity():
    x = torch.randn(10, 20)
    torch.manual_seed(7)
    a = dropout(x, 0.5)
    torch.manual_seed(7)
    b = dropout(x, 0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.5))
    layer = FastDropout(0.5).eval()
    assert layer(x) is x
    assert dropout(x, 0.0) is x
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        keep_mask((3,), 1.0)
    with pytest.raises(ValueError, match="in-place"):
        FastDropout(0.5, inplace=True).train()(x)


def test_bf16_inputs_keep_their_dtype_and_match_f_dropout_statistics():
    torch.manual_seed(4)
    x = torch.ones(200_000, dtype=torch.bfloat16)
    y = dropout(x, 0.05)
    assert y.dtype == torch.bfloat16
    ref = F.dropout(torch.ones(200_000), 0.05)
    assert abs(y.float().mean().item() - ref.mean().item()) < 0.01
