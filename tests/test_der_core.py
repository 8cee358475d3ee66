"""DER / DER++ core (plain torch): the terms against hand-computed values in float64, DER++'s two
independent draws, and the errors for bad settings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cl_plugins.buffers import ReservoirBuffer
from cl_plugins.der import DarkExperienceReplay, logit_matching_loss


def test_logit_matching_loss_by_hand():
    outputs = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    stored = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    # squared differences 1, 0, 4, 9: mean 3.5 over all entries, (1 + 4 + 9) / 3 over the masked ones
    assert logit_matching_loss(outputs, stored).item() == 3.5
    mask = torch.tensor([[True, False], [True, True]])
    assert logit_matching_loss(outputs, stored, mask).item() == pytest.approx(14 / 3, rel=1e-15)
    low = logit_matching_loss(outputs.to(torch.bfloat16), stored)
    assert low.dtype == torch.float32 and low.item() == 3.5  # computed in float32 whatever the autocast dtype
    with pytest.raises(ValueError, match="number of outputs must stay"):
        logit_matching_loss(outputs, stored[:, :1])


def _filled_buffer(n: int = 6, classes: int = 3, seed: int = 0) -> ReservoirBuffer:
    g = torch.Generator().manual_seed(seed)
    buf = ReservoirBuffer(n, seed=seed, store_logits=True)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    buf.add(x, torch.arange(n) % classes, torch.zeros(n), logits=torch.randn(n, classes, generator=g))
    return buf


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_replay_terms_and_gradient_match_hand_computation_in_float64(beta):
    buf = _filled_buffer()
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    der = DarkExperienceReplay(buf, alpha=0.3, beta=beta, batch_size=4)
    rng = buf.generator.get_state()

    terms = der.replay_terms(lambda s: s["x"] @ weight.T, current_batch_size=10)
    assert terms is not None
    (grad,) = torch.autograd.grad(terms.total, weight)

    # the same draws by hand: uniform without replacement, the first for the MSE, the second for the CE
    g = torch.Generator().set_state(rng)
    first = torch.randperm(6, generator=g)[:4]
    x, y, z = buf.data["x"], buf.data["y"], buf.data["logits"].double()
    mse = ((x[first] @ weight.T - z[first]) ** 2).mean()
    expected = 0.3 * mse
    if beta:
        second = torch.randperm(6, generator=g)[:4]
        assert not torch.equal(first, second)  # two independent draws
        ce = F.cross_entropy(x[second] @ weight.T, y[second])
        expected = expected + beta * ce
        torch.testing.assert_close(terms.ce, ce, rtol=1e-13, atol=0)
    else:
        assert terms.ce is None
    assert torch.equal(buf.generator.get_state(), g.get_state())  # DER draws once, DER++ twice
    torch.testing.assert_close(terms.mse, mse, rtol=1e-13, atol=0)
    torch.testing.assert_close(terms.total, expected, rtol=1e-13, atol=0)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=0)


def test_replay_size_defaults_to_the_current_batch_and_masks_apply():
    buf = _filled_buffer()
    seen = []
    der = DarkExperienceReplay(buf, alpha=1.0, beta=1.0)

    def forward(samples):
        seen.append(samples["x"].shape[0])
        return samples["logits"].double() + 1.0  # every entry off by one

    mask_rows = []
    terms = der.replay_terms(forward, current_batch_size=5,
                             ce_logits=lambda logits, t: logits * 0.0,  # uniform logits: CE = log(3)
                             logit_mask=lambda t: mask_rows.append(len(t)) or torch.ones(len(t), 3, dtype=torch.bool))
    assert seen == [5, 5] and mask_rows == [5]
    assert terms.mse.item() == 1.0 and terms.ce.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    # more than the buffer holds: all of it
    DarkExperienceReplay(buf, alpha=1.0).replay_terms(forward, current_batch_size=50)
    assert seen[-1] == 6


def test_empty_buffer_gives_no_terms_and_insert_stores_the_given_logits():
    buf = ReservoirBuffer(4, store_logits=True)
    der = DarkExperienceReplay(buf, alpha=1.0)
    assert der.replay_terms(lambda s: s["x"], current_batch_size=2) is None
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    der.insert(torch.zeros(2, 1), torch.tensor([0, 1]), torch.zeros(2), logits)
    assert torch.equal(buf.data["logits"][:2], logits)
    with pytest.raises(ValueError, match="one row of logits per sample"):
        der.insert(torch.zeros(2, 1), torch.tensor([0, 1]), torch.zeros(2), logits[:1])


def test_bad_settings_raise_clear_errors():
    buf = ReservoirBuffer(4, store_logits=True)
    with pytest.raises(ValueError, match="alpha must be a finite weight >= 0, got -0.1"):
        DarkExperienceReplay(buf, alpha=-0.1)
    with pytest.raises(ValueError, match="beta must be a finite weight >= 0, got nan"):
        DarkExperienceReplay(buf, alpha=0.1, beta=float("nan"))
    with pytest.raises(ValueError, match="minibatch size must be >= 1"):
        DarkExperienceReplay(buf, alpha=0.1, batch_size=0)
    with pytest.raises(ValueError, match="stores logits"):
        DarkExperienceReplay(ReservoirBuffer(4), alpha=0.1)
