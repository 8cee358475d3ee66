"""PEGO's orthogonal regularization against hand-computed values and hand-derived gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from callbacks.pego import PEGO
from cl_plugins.models import ContinualClassifier
from cl_plugins.peft.lora import LoRAGroupLinear
from cl_plugins.peft.pego import diversify_loss, pego_losses, preserve_loss
from tests.tolerances import EPS32, abs_magnitude, assert_close_accumulated

VIT_KW = dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _stack(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of A_i (r, d_in) and B_i (d_out, r) as the stacked (N, r, d_in) and (d_out, N, r)."""
    return torch.stack(As), torch.stack(Bs, dim=1)


def _brute_force(w0, As, Bs, s):
    """The official code's loops: sum_i |W0 dW_i^T|.sum() and sum_{i<j} |dW_i dW_j^T|.sum()."""
    dws = [s * b @ a for a, b in zip(As, Bs)]
    pre = sum((w0 @ dw.T).abs().sum() for dw in dws)
    div = sum((dws[i] @ dws[j].T).abs().sum() for i in range(len(dws)) for j in range(i + 1, len(dws)))
    return pre, div


def test_hand_computed_values_zero_when_orthogonal_positive_otherwise():
    w0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    a1, b1 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0], [2.0]])  # dW_1 = [[1,0,0],[2,0,0]]
    a2, b2 = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[1.0], [1.0]])  # dW_2 = [[0,0,1],[0,0,1]]
    # W0 dW_1^T = [[1, 2], [0, 0]] -> 3 ; W0 dW_2^T = 0 (dW_2's rows avoid W0's row space)
    a, b = _stack([a2], [b2])
    assert preserve_loss(w0, a, b).item() == 0.0
    a, b = _stack([a1, a2], [b1, b2])
    assert preserve_loss(w0, a, b).item() == pytest.approx(3.0)
    assert preserve_loss(w0, a, b, scaling=2.0).item() == pytest.approx(6.0)
    # dW_1 dW_2^T = 0: orthogonal modules
    assert diversify_loss(a, b).item() == 0.0
    a3 = torch.tensor([[1.0, 0.0, 1.0]])  # dW_3 = [[1,0,1],[1,0,1]]: dW_1 dW_3^T = [[1,1],[2,2]] -> 6
    a, b = _stack([a1, a3], [b1, b2])
    assert diversify_loss(a, b).item() == pytest.approx(6.0)
    assert diversify_loss(a, b, scaling=2.0).item() == pytest.approx(24.0)  # scale enters squared
    assert diversify_loss(a[:1], b[:, :1]).item() == 0.0  # a single module has no pair

    torch.manual_seed(0)
    w0 = torch.randn(6, 5)
    As, Bs = [torch.randn(2, 5) for _ in range(3)], [torch.randn(6, 2) for _ in range(3)]
    a, b = _stack(As, Bs)
    # the float32 terms against the loops in float64, within the rounding of |terms| summed
    pre, div = _brute_force(w0.double(), [x.double() for x in As], [x.double() for x in Bs], 0.5)
    assert_close_accumulated(preserve_loss(w0, a, b, 0.5), pre, abs_magnitude(
        lambda w, a_, b_: preserve_loss(w, a_, b_, 0.5), w0, a, b))
    assert_close_accumulated(diversify_loss(a, b, 0.5), div, abs_magnitude(
        lambda a_, b_: diversify_loss(a_, b_, 0.5), a, b))
    with pytest.raises(ValueError, match="shape"):
        preserve_loss(w0.T, a, b)


def test_gradients_match_the_hand_derived_formulas_and_finite_differences():
    torch.manual_seed(1)
    n, r, d_in, d_out, s = 3, 2, 5, 4, 1.5
    w0 = torch.randn(d_out, d_in, dtype=torch.float64)
    a = torch.randn(n, r, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, n, r, dtype=torch.float64, requires_grad=True)

    # the functions compute in float32: compared with the float64 formulas within the rounding of the terms
    # each gradient entry accumulates (the gradient of the same function on |W0|, |A|, |B|)
    pre_mag = abs_magnitude(lambda w, a_, b_: preserve_loss(w, a_, b_, s), w0, a, b, wrt=(1, 2))
    div_mag = abs_magnitude(lambda a_, b_: diversify_loss(a_, b_, s), a, b, wrt=(0, 1))

    # preserve: M_i = s W0 A_i^T B_i^T, S_i = sign(M_i): dL/dA_i = s B_i^T S_i^T W0, dL/dB_i = s S_i^T W0 A_i^T
    ga, gb = torch.autograd.grad(preserve_loss(w0, a, b, s), (a, b))
    for i in range(n):
        ai, bi = a[i].detach(), b[:, i].detach()
        sign = torch.sign(s * w0 @ ai.T @ bi.T)
        assert_close_accumulated(ga[i], s * bi.T @ sign.T @ w0, pre_mag[0][i])
        assert_close_accumulated(gb[:, i], s * sign.T @ w0 @ ai.T, pre_mag[1][:, i])

    # diversify: M_ij = s^2 B_i A_i A_j^T B_j^T, S_ij = sign(M_ij), summed over i < j
    ga, gb = torch.autograd.grad(diversify_loss(a, b, s), (a, b))
    want_a, want_b = torch.zeros_like(a), torch.zeros_like(b)
    A, B = a.detach(), b.detach()
    for i in range(n):
        for j in range(i + 1, n):
            sign = torch.sign(B[:, i] @ A[i] @ A[j].T @ B[:, j].T)
            want_a[i] += s**2 * B[:, i].T @ sign @ B[:, j] @ A[j]
            want_a[j] += s**2 * B[:, j].T @ sign.T @ B[:, i] @ A[i]
            want_b[:, i] += s**2 * sign @ B[:, j] @ A[j] @ A[i].T
            want_b[:, j] += s**2 * sign.T @ B[:, i] @ A[i] @ A[j].T
    assert_close_accumulated(ga, want_a, div_mag[0])
    assert_close_accumulated(gb, want_b, div_mag[1])

    # central finite differences of the functions themselves (they compute in float32). The terms are
    # piecewise linear, so a step h = 1e-2 (no kink crossed for these inputs) has no truncation error; each
    # float32 evaluation is off by a few eps * sum|terms| (abs_magnitude), so the difference quotient by
    # eps * sum|terms| / h (measured: under 0.5 of that): atol 4x that. rtol: the float32 step x +- h is off
    # by up to eps * |x| (|x| < 4), 5e-5 of h.
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    h = 1e-2
    for term in (lambda w, a_, b_: preserve_loss(w, a_, b_, s), lambda w, a_, b_: diversify_loss(a_, b_, s)):
        atol = 4 * EPS32 * float(abs_magnitude(term, w0, a, b)) / h
        assert torch.autograd.gradcheck(lambda a_, b_, f=term: f(w0, a_, b_), (a32, b32), eps=h, atol=atol, rtol=1e-3)


def test_terms_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    w0 = torch.randn(8, 8).bfloat16()
    a, b = torch.randn(2, 2, 8).bfloat16(), torch.randn(8, 2, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre, div = preserve_loss(w0, a, b), diversify_loss(a, b)
    assert pre.dtype == div.dtype == torch.float32
    torch.testing.assert_close(pre, preserve_loss(w0.float(), a.float(), b.float()))
    torch.testing.assert_close(div, diversify_loss(a.float(), b.float()))


def _weighted_terms(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """0.2 L_p + 0.3 L_d of one group (A of shape (N, r, d_in), B of (d_out, N, r)) by the official loops."""
    dws = [scaling * b[:, i] @ a[i] for i in range(a.shape[0])]
    pre = sum((w0 @ dw.T).abs().sum() for dw in dws)
    div = sum((dws[i] @ dws[j].T).abs().sum() for i in range(len(dws)) for j in range(i + 1, len(dws)))
    return 0.2 * pre + 0.3 * div


def test_layer_sums_and_attached_gradient_equal_loss_plus_weighted_terms():
    """Without a Trainer: the hook adds the terms once per step, with exactly their gradient."""
    torch.manual_seed(0)
    model = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                                backbone_kwargs=VIT_KW)
    pego = PEGO(ortho_weight=0.3, preserve_weight=0.2)
    layers = list(pego.apply_to(model).values())
    pego.setup(None, model, "fit")  # installs the hook (a Trainer calls this)
    with torch.no_grad():
        for layer in layers:
            for p in layer.lora_B:
                p.normal_()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    params = [p for p in model.parameters() if p.requires_grad]

    # the reference: the cross entropy's gradient (float32, the same forward and backward as the hooked model's)
    # plus the terms' gradients by the official code's loops in float64. The float32 terms differ from them by
    # the rounding of what each gradient entry accumulates: |CE gradient| + the terms' gradient on |W0|, |A|, |B|
    ce = torch.autograd.grad(F.cross_entropy(model(x), y), params)  # _pending is False: no term attached here
    want = [g.double() for g in ce]
    magnitude = [g.abs().double() for g in ce]
    position = {id(p): k for k, p in enumerate(params)}
    for layer in layers:
        for (s, e), a, b in zip(layer.row_ranges, layer.lora_A, layer.lora_B):
            w0 = layer.base.weight[s:e]
            a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
            grads = torch.autograd.grad(_weighted_terms(w0.double(), a64, b64, layer.scaling), (a64, b64))
            sizes = abs_magnitude(lambda w, a_, b_, s_=layer.scaling: _weighted_terms(w, a_, b_, s_), w0, a, b,
                                  wrt=(1, 2))
            for p, g, m in zip((a, b), grads, sizes):
                want[position[id(p)]] += g
                magnitude[position[id(p)]] += m

    pego.on_train_batch_start(None, model, None, 0)
    logits = model(x)
    logits_again = model(x)  # a second forward in the same step attaches nothing more
    got = torch.autograd.grad(F.cross_entropy(logits, y) + 0 * logits_again.sum(), params)
    for g, w, m in zip(got, want, magnitude):
        assert_close_accumulated(g, w, m)
    logged = pego.aux.pop_means()
    div, pre = pego_losses(layers)
    assert set(logged) == {"pego/diversify_loss", "pego/preserve_loss"}
    # the callback's batched products against the per-layer reference: the same sums of |products|, in another
    # order, within the rounding of the terms on |W0|, |A|, |B|
    div_mag = sum(float(abs_magnitude(lambda a_, b_, s_=layer.scaling: diversify_loss(a_, b_, s_), a, b))
                  for layer in layers for _, a, b in layer.factors())
    pre_mag = sum(float(abs_magnitude(lambda w, a_, b_, s_=layer.scaling: preserve_loss(w, a_, b_, s_), w0, a, b))
                  for layer in layers for w0, a, b in layer.factors())
    assert_close_accumulated(logged["pego/diversify_loss"], 0.3 * div.detach(), 0.3 * div_mag)
    assert_close_accumulated(logged["pego/preserve_loss"], 0.2 * pre.detach(), 0.2 * pre_mag)
    assert isinstance(layers[0], LoRAGroupLinear) and pego._hook is not None
    pego.teardown(None, model, "fit")
    assert pego._hook is None
