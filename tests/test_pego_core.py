"""PEGO's orthogonal regularization against hand-computed values and hand-derived gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from callbacks.pego import PEGO
from cl_plugins.models import ContinualClassifier
from cl_plugins.peft.lora import LoRAGroupLinear
from cl_plugins.peft.pego import diversify_loss, pego_losses, preserve_loss

VIT_KW = dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2)
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 arithmetic inside the terms


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
    pre, div = _brute_force(w0, As, Bs, 0.5)
    torch.testing.assert_close(preserve_loss(w0, a, b, 0.5), pre)
    torch.testing.assert_close(diversify_loss(a, b, 0.5), div)
    with pytest.raises(ValueError, match="shape"):
        preserve_loss(w0.T, a, b)


def test_gradients_match_the_hand_derived_formulas_and_finite_differences():
    torch.manual_seed(1)
    n, r, d_in, d_out, s = 3, 2, 5, 4, 1.5
    w0 = torch.randn(d_out, d_in, dtype=torch.float64)
    a = torch.randn(n, r, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, n, r, dtype=torch.float64, requires_grad=True)

    # preserve: M_i = s W0 A_i^T B_i^T, S_i = sign(M_i): dL/dA_i = s B_i^T S_i^T W0, dL/dB_i = s S_i^T W0 A_i^T
    ga, gb = torch.autograd.grad(preserve_loss(w0, a, b, s), (a, b))
    for i in range(n):
        ai, bi = a[i].detach(), b[:, i].detach()
        sign = torch.sign(s * w0 @ ai.T @ bi.T)
        torch.testing.assert_close(ga[i].double(), s * bi.T @ sign.T @ w0, **TOL)
        torch.testing.assert_close(gb[:, i].double(), s * sign.T @ w0 @ ai.T, **TOL)

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
    torch.testing.assert_close(ga.double(), want_a, **TOL)
    torch.testing.assert_close(gb.double(), want_b, **TOL)

    # central finite differences of the functions themselves (they compute in float32)
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    assert torch.autograd.gradcheck(lambda a_, b_: preserve_loss(w0, a_, b_, s), (a32, b32),
                                    eps=1e-3, atol=2e-2, rtol=1e-2)
    assert torch.autograd.gradcheck(lambda a_, b_: diversify_loss(a_, b_, s), (a32, b32),
                                    eps=1e-3, atol=2e-2, rtol=1e-2)


def test_terms_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    w0 = torch.randn(8, 8).bfloat16()
    a, b = torch.randn(2, 2, 8).bfloat16(), torch.randn(8, 2, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre, div = preserve_loss(w0, a, b), diversify_loss(a, b)
    assert pre.dtype == div.dtype == torch.float32
    torch.testing.assert_close(pre, preserve_loss(w0.float(), a.float(), b.float()))
    torch.testing.assert_close(div, diversify_loss(a.float(), b.float()))


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

    def reference() -> torch.Tensor:
        total = F.cross_entropy(model(x), y)
        for layer in layers:
            for (s, e), a, b in zip(layer.row_ranges, layer.lora_A, layer.lora_B):
                w0 = layer.base.weight[s:e]
                dws = [layer.scaling * b[:, i] @ a[i] for i in range(layer.num_loras)]
                total = total + 0.2 * sum((w0 @ dw.T).abs().sum() for dw in dws)
                total = total + 0.3 * sum((dws[i] @ dws[j].T).abs().sum()
                                          for i in range(len(dws)) for j in range(i + 1, len(dws)))
        return total

    want = torch.autograd.grad(reference(), params)  # _pending is False: no term attached here
    pego.on_train_batch_start(None, model, None, 0)
    logits = model(x)
    logits_again = model(x)  # a second forward in the same step attaches nothing more
    got = torch.autograd.grad(F.cross_entropy(logits, y) + 0 * logits_again.sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    logged = pego.aux.pop_means()
    div, pre = pego_losses(layers)
    assert set(logged) == {"pego/diversify_loss", "pego/preserve_loss"}
    torch.testing.assert_close(logged["pego/diversify_loss"], 0.3 * div.detach())
    torch.testing.assert_close(logged["pego/preserve_loss"], 0.2 * pre.detach())
    assert isinstance(layers[0], LoRAGroupLinear) and pego._hook is not None
    pego.teardown(None, model, "fit")
    assert pego._hook is None
