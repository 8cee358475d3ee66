"""Online EWC's plain-torch core against hand-computed values (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_plugins.baselines import (
    check_ewc_hparams,
    empirical_fisher,
    fisher_batch,
    fisher_per_sample,
    online_fisher,
    quadratic_penalty,
)

D = torch.float64


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(2, 3).to(D)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.0], [1.5, 0.25], [-0.75, 2.0]], dtype=D))
        lin.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=D))
    return lin


X = torch.tensor([[1.0, 2.0], [-0.5, 0.5], [2.0, -1.0]], dtype=D)
Y = torch.tensor([2, 0, 1])


def _softmax_rows(z: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """p by the formula exp(z_c) / sum_kept exp(z_k), written out."""
    e = z.exp()
    if keep is not None:
        e = e * keep
    return e / e.sum(dim=1, keepdim=True)


def _hand_terms(lin: nn.Linear, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a linear softmax classifier: d log p_y / dW = (e_y - p) x^T, d log p_y / db = e_y - p."""
    z = X @ lin.weight.detach().T + lin.bias.detach()
    p = _softmax_rows(z, keep)
    r = torch.nn.functional.one_hot(Y, 3).to(D) - p  # (N, C)
    gw = r[:, :, None] * X[:, None, :]  # (N, C, 2)
    return p, r, gw


def test_quadratic_penalty_matches_hand_value_and_gradient():
    params = {"a": torch.tensor([1.0, 2.0], dtype=D, requires_grad=True),
              "b": torch.tensor([[3.0]], dtype=D, requires_grad=True)}
    anchors = {"a": torch.tensor([0.0, 1.0], dtype=D), "b": torch.tensor([[1.0]], dtype=D)}
    imp = {"a": torch.tensor([2.0, 3.0], dtype=D), "b": torch.tensor([[0.5]], dtype=D)}
    value = quadratic_penalty(params, anchors, imp)
    assert value.dtype == D and value.item() == pytest.approx(2 * 1 + 3 * 1 + 0.5 * 4, abs=1e-15)
    value.backward()
    assert params["a"].grad.tolist() == [4.0, 6.0] and params["b"].grad.tolist() == [[2.0]]
    with pytest.raises(KeyError, match="missing"):
        quadratic_penalty(params, {"a": anchors["a"]}, imp)


def test_quadratic_penalty_is_float32_under_bf16_autocast():
    p = {"w": torch.full((4,), 1.001, requires_grad=True)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = quadratic_penalty(p, {"w": torch.ones(4)}, {"w": torch.full((4,), 1000.0)})
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(4 * 1000 * 0.001**2, rel=1e-3)  # bf16 would round 1.001 to 1.0


@pytest.mark.parametrize("method", ["linear", "vmap", "loop"])
def test_per_sample_fisher_is_mammoths_probability_weighted_squared_gradient(method):
    lin = _linear()
    p, r, gw = _hand_terms(lin)
    weight = p[torch.arange(3), Y]  # Mammoth's exp_cond_prob = p(y|x)
    want_w = (weight[:, None, None] * gw.pow(2)).sum(0)
    want_b = (weight[:, None] * r.pow(2)).sum(0)
    got = fisher_per_sample(lin, dict(lin.named_parameters()), X, Y, method=method)
    torch.testing.assert_close(got["weight"].double(), want_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["bias"].double(), want_b, rtol=1e-6, atol=1e-7)
    assert got["weight"].dtype == torch.float32 and lin.weight.grad is None  # no .grad left behind


@pytest.mark.parametrize("method", ["linear", "vmap", "loop"])
def test_per_sample_fisher_with_a_task_mask_uses_the_kept_outputs_only(method):
    lin = _linear()
    keep = torch.tensor([[False, True, True], [True, True, False], [True, True, False]])
    p, r, gw = _hand_terms(lin, keep.to(D))
    weight = p[torch.arange(3), Y]
    got = fisher_per_sample(lin, dict(lin.named_parameters()), X, Y, keep=keep, method=method)
    torch.testing.assert_close(got["bias"].double(), (weight[:, None] * r.pow(2)).sum(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["weight"].double(), (weight[:, None, None] * gw.pow(2)).sum(0), rtol=1e-6,
                               atol=1e-7)
    unmasked = fisher_per_sample(lin, dict(lin.named_parameters()), X, Y, method=method)
    assert not torch.allclose(unmasked["bias"], got["bias"], rtol=1e-3)  # the mask matters here


def test_the_three_per_sample_methods_agree_on_a_network():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5)).to(D)
    x, y = torch.randn(7, 3, 4, dtype=D), torch.randint(0, 5, (7,))
    params = dict(mlp.named_parameters())
    ref = fisher_per_sample(mlp, params, x, y, method="loop")
    for method in ("linear", "vmap", "auto"):
        got = fisher_per_sample(mlp, params, x, y, method=method)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-8, msg=f"{method} {name}")
    assert all(p.grad is None for p in mlp.parameters())


def test_linear_method_refuses_what_it_cannot_compute_exactly():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).to(D)
    x, y = torch.randn(4, 1, 4, 4, dtype=D), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="nn.Linear"):
        fisher_per_sample(conv, dict(conv.named_parameters()), x, y, method="linear")
    auto = fisher_per_sample(conv, dict(conv.named_parameters()), x, y, method="auto")  # falls back to vmap
    torch.testing.assert_close(auto["0.weight"], fisher_per_sample(conv, dict(conv.named_parameters()), x, y,
                                                                   method="loop")["0.weight"], rtol=1e-5, atol=1e-9)

    class Twice(nn.Module):  # one layer used twice: the sum of per-sample squares is not (w g^2)^T a^2
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    twice = Twice().to(D)
    xt, yt = torch.randn(5, 3, dtype=D), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="once"):
        fisher_per_sample(twice, dict(twice.named_parameters()), xt, yt, method="linear")
    torch.testing.assert_close(fisher_per_sample(twice, dict(twice.named_parameters()), xt, yt)["lin.weight"],
                               fisher_per_sample(twice, dict(twice.named_parameters()), xt, yt,
                                                 method="loop")["lin.weight"], rtol=1e-5, atol=1e-9)


def test_batch_fisher_is_the_squared_mean_gradient():
    lin = _linear()
    _, r, gw = _hand_terms(lin)
    got = fisher_batch(lin, dict(lin.named_parameters()), X, Y)
    # d CE_mean / d theta = -mean_i (e_y - p)...; squared
    torch.testing.assert_close(got["bias"].double(), r.mean(0).pow(2), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got["weight"].double(), gw.mean(0).pow(2), rtol=1e-6, atol=1e-8)


def test_empirical_fisher_counts_samples_or_batches():
    lin = _linear()
    params = dict(lin.named_parameters())
    batches = [(X[:2], Y[:2], None), (X[2:], Y[2:], None)]
    sums, n = empirical_fisher(lin, params, batches, "per_sample")
    whole = fisher_per_sample(lin, params, X, Y)
    assert n == 3
    torch.testing.assert_close(sums["weight"], whole["weight"])
    sums_b, n_b = empirical_fisher(lin, params, batches, "batch")
    assert n_b == 2
    want = fisher_batch(lin, params, X[:2], Y[:2])["bias"] + fisher_batch(lin, params, X[2:], Y[2:])["bias"]
    torch.testing.assert_close(sums_b["bias"], want)
    with pytest.raises(ValueError, match="per_sample"):
        empirical_fisher(lin, params, batches, "exact")  # type: ignore[arg-type]


def test_online_fisher_decays_the_old_estimate():
    f0 = {"w": torch.tensor([1.0, 2.0], dtype=D)}
    f1 = {"w": torch.tensor([0.5, 0.0], dtype=D)}
    first = online_fisher(None, f0, 0.5)
    assert first["w"].tolist() == [1.0, 2.0] and first["w"] is not f0["w"]
    assert online_fisher(first, f1, 0.5)["w"].tolist() == [1.0, 1.0]
    assert online_fisher(first, f1, 1.0)["w"].tolist() == [1.5, 2.0]


@pytest.mark.parametrize("e_lambda,gamma,match", [(-1.0, 1.0, "e_lambda"), (1.0, 0.0, "gamma"), (1.0, 1.5, "gamma"),
                                                  (1.0, -0.5, "gamma"), (float("nan"), 1.0, "e_lambda")])
def test_bad_hyperparameters_are_refused(e_lambda, gamma, match):
    with pytest.raises(ValueError, match=match):
        check_ewc_hparams(e_lambda, gamma)
