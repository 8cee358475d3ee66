"""LoRAMoE core math against hand computations: router, expert mixture, balancing constraint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from callbacks.loramoe import LoRAMoE
from cl_plugins.peft.loramoe import (
    LoRAExperts,
    LoRAMoEContext,
    LoRAMoELinear,
    coefficient_matrix,
    cv_squared,
    importance,
    inject_loramoe,
    localized_balancing_loss,
    split_experts,
)
from datamodules.common import permuted_benchmark
from datamodules.digits import SplitDigits, load_digits_tensors
from datamodules.stream import ContinualDataModule
from tests.tolerances import EPS32, ULPS, abs_forward, assert_close_accumulated


def _layer(d_in: int = 4, d_out: int = 3, n: int = 4, rank: int = 2, alpha: float = 4.0, context=None,
           seed: int = 0) -> LoRAMoELinear:
    torch.manual_seed(seed)
    layer = LoRAMoELinear(nn.Linear(d_in, d_out), num_experts=n, rank=rank, alpha=alpha, dropout=0.0,
                          context=context)
    with torch.no_grad():
        layer.experts.lora_B.normal_()
    return layer


def _cv_squared_magnitude(z: torch.Tensor) -> float:
    """What ``var(z) / mean(z)^2`` of non-negative ``z`` accumulates, on absolute values: the squared deviations
    come from entries and a mean of size ``|z| + mean``, so ``sum (z + mean)^2 / (n - 1) / mean^2`` bounds the
    terms its float32 sums round (divided by the value's own scale, ``mean^2``)."""
    z = z.double().flatten()
    m = z.mean()
    return float(((z + m) ** 2).sum() / (z.numel() - 1) / m**2)


def test_router_weights_sum_to_one_in_float32_even_under_bf16_autocast():
    layer = _layer()
    x = torch.randn(5, 7, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = layer.route(x)
        y = layer(x)
    assert w.dtype == torch.float32 and w.shape == (5, 7, 4)
    assert_close_accumulated(w.sum(-1), torch.ones(5, 7), 4.0)  # 4 softmax weights <= 1, each a few eps off
    assert (w > 0).all()  # dense softmax: every expert weighted
    assert y.dtype == torch.bfloat16
    # a backbone already in bf16: router and experts follow its dtype, routing stays float32
    half = LoRAMoELinear(nn.Linear(4, 3).to(torch.bfloat16), num_experts=2, rank=2)
    assert half.experts.lora_A.dtype == torch.bfloat16 and half.router.weight.dtype == torch.bfloat16
    assert half(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert half.route(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_forward_equals_explicit_matrices():
    base = nn.Linear(3, 2)
    layer = LoRAMoELinear(base, num_experts=2, rank=1, alpha=2.0, dropout=0.0)
    W0 = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    b0 = torch.tensor([0.1, -0.2])
    Wg = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    A = [torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[0.0, -1.0, 2.0]])]
    B = [torch.tensor([[1.0], [0.0]]), torch.tensor([[0.5], [-1.0]])]
    with torch.no_grad():
        base.weight.copy_(W0)
        base.bias.copy_(b0)
        layer.router.weight.copy_(Wg)
        layer.experts.lora_A.copy_(torch.stack(A))
        layer.experts.lora_B.copy_(torch.stack(B))
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    out = layer(x)
    scaling = 2.0 / 1
    # the magnitude of the terms: the layer on absolute values with every router weight replaced by its bound 1
    # (which also covers the few eps by which each float32 softmax weight is off)
    magnitude = abs_forward(layer.base, x) + sum(scaling * (B[i].abs() @ (A[i].abs() @ x.abs().T)).T for i in range(2))
    W0, b0, Wg, x64 = W0.double(), b0.double(), Wg.double(), x.double()  # the reference in float64
    A, B = [a.double() for a in A], [b.double() for b in B]
    for j in range(2):
        xj = x64[j]
        logits = Wg @ xj
        w = torch.exp(logits) / torch.exp(logits).sum()
        y = W0 @ xj + b0 + sum(w[i] * scaling * (B[i] @ (A[i] @ xj)) for i in range(2))
        assert_close_accumulated(out[j], y, magnitude[j])
    # first row by hand: logits (1, 5); A x = (3, 4); B A x = (3, 0), (2, -4); W0 x + b = (-1.9, 4.3)
    w1 = 1 / (1 + torch.exp(torch.tensor(4.0, dtype=torch.float64)))
    expected = torch.stack([-1.9 + 2 * (3 * w1 + 2 * (1 - w1)), 4.3 + 2 * (-4 * (1 - w1))])
    assert_close_accumulated(out[0], expected, magnitude[0])
    # tokens: a 3-D input gives the same per-token result
    assert_close_accumulated(layer(x[None])[0], out, magnitude)


def _dropped_inputs(experts: LoRAExperts) -> torch.Tensor:
    """``(experts, d_in)`` mask of the inputs each expert's dropout dropped in one training forward."""
    masks = []
    experts.lora_A.register_hook(lambda g: masks.append(g))
    with torch.no_grad():
        experts.lora_B.fill_(1.0)
    torch.manual_seed(1)
    experts.train()(torch.ones(1, 6), torch.ones(1, 3)).sum().backward()
    return masks[0].abs().sum(dim=1) == 0


def test_zero_initialised_experts_start_at_the_pretrained_layer_and_dropout_is_per_expert():
    base = nn.Linear(6, 5)
    layer = LoRAMoELinear(base, num_experts=3, rank=2, alpha=32.0, dropout=0.5)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), base(x))
    experts = LoRAExperts(6, 5, num_experts=3, rank=2, alpha=2.0, dropout=0.5, per_expert_dropout=True)
    zero_cols = _dropped_inputs(experts)
    assert not all(torch.equal(zero_cols[0], zero_cols[i]) for i in range(1, 3))
    # the per-expert dropout path computes the same mixture as the evaluation path
    experts.dropout = nn.Dropout(0.0)
    x, w = torch.randn(2, 7, 6), torch.softmax(torch.randn(2, 7, 3), dim=-1)
    train_out = experts.train()(x, w)
    # the same sum of products, in another order: within the rounding of their absolute values
    assert_close_accumulated(train_out, experts.eval()(x, w), abs_forward(experts, x, w))


def test_default_dropout_shares_one_mask_across_experts():
    zero_cols = _dropped_inputs(LoRAExperts(6, 5, num_experts=3, rank=2, alpha=2.0, dropout=0.5))
    assert zero_cols[0].any() and all(torch.equal(zero_cols[0], zero_cols[i]) for i in range(1, 3))


def test_balancing_loss_matches_a_hand_computed_value():
    groups = split_experts(4, 2)
    assert groups.tolist() == [0, 0, 1, 1]
    types = torch.tensor([0, 1])
    q = torch.tensor([[3.0, 1.0], [1.0, 1.0], [2.0, 4.0], [2.0, 2.0]])  # experts x samples
    i_mat = coefficient_matrix(types, groups, 0.1)
    torch.testing.assert_close(i_mat, torch.tensor([[1.1, 0.9], [1.1, 0.9], [0.9, 1.1], [0.9, 1.1]]))
    # Z = 3.3 1.1 1.8 1.8 | 0.9 0.9 4.4 2.2: mean 2.05, squared deviations sum 10.78, unbiased var 1.54
    expected = (10.78 / 7) / 2.05**2
    loss = localized_balancing_loss(q, types, groups, 0.1)
    assert loss.dtype == torch.float32
    z = torch.tensor([3.3, 1.1, 1.8, 1.8, 0.9, 0.9, 4.4, 2.2])
    tol = ULPS * EPS32 * _cv_squared_magnitude(z)  # 1.9e-5: the float32 mean, deviations, squares and sums
    assert loss.item() == pytest.approx(expected, abs=tol)
    assert loss.item() == pytest.approx(0.366448, abs=tol + 5e-7)  # the 6-digit literal itself is within 5e-7
    assert cv_squared(torch.tensor([5.0])).item() == 0.0
    # Q from router weights: summed over each sample's tokens
    w = torch.softmax(torch.randn(2, 5, 4), dim=-1)
    assert_close_accumulated(importance(w), w.sum(dim=1).t(), 5.0)  # sums of 5 weights <= 1
    assert_close_accumulated(importance(w).sum(dim=0), torch.full((2,), 5.0), 4 * 5.0)  # 20 weights, each eps off


def test_layer_term_is_beta_times_cv_squared_and_terms_sum_over_layers():
    ctx = LoRAMoEContext(split_experts(4, 2), delta=0.1, balance_weight=0.3)
    l1, l2 = _layer(4, 8, context=ctx, seed=1), _layer(8, 4, context=ctx, seed=2)
    model = nn.Sequential(l1, nn.ReLU(), l2)
    x = torch.randn(3, 5, 4)
    types = torch.tensor([0, 1, 1])
    ctx.set_types(types)
    out = model(x)
    (out.pow(2).mean()).backward()
    stats = ctx.pop_stats()
    got = [p.grad.clone() for p in (l1.router.weight, l2.router.weight, l1.experts.lora_A)]
    model.zero_grad()

    # the reference: the same forward without the attached terms, keeping the router weights each layer computed,
    # and the terms written out on them (so that their gradients meet the output's at the same tensors)
    ctx.set_types(None)
    routed = []
    for layer in (l1, l2):
        layer.route = lambda inp, f=layer.route: routed.append(f(inp)) or routed[-1]
    out_ref = model(x)
    del l1.route, l2.route
    w1, w2 = (w.reshape(*x.shape[:-1], -1) for w in routed)  # the layer routes the flattened tokens
    groups = split_experts(4, 2)
    zs = [coefficient_matrix(types, groups, 0.1) * w.sum(dim=1).t() for w in (w1, w2)]
    terms = [0.3 * cv_squared(z) for z in zs]
    params = (l1.router.weight, l2.router.weight, l1.experts.lora_A)
    # the same gradients added in the same places, in an order autograd may choose: within the rounding of the
    # output's and each term's gradient (each term's scaled by the magnitude of its float32 var / mean^2)
    parts = [torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
             for t in (out_ref.pow(2).mean(), terms[0], terms[1])]
    (out_ref.pow(2).mean() + terms[0] + terms[1]).backward()
    factors = [1.0] + [_cv_squared_magnitude(z) for z in zs]
    magnitudes = []
    for k, (g, p) in enumerate(zip(got, params)):
        pieces = [torch.zeros_like(g) if part[k] is None else part[k] for part in parts]
        magnitudes.append(sum(f * q.abs() for f, q in zip(factors, pieces)))
        assert_close_accumulated(g, p.grad, magnitudes[-1])
    mag = sum(0.3 * _cv_squared_magnitude(z) * cv_squared(z).item() for z in zs)
    assert stats["balance_loss"].item() == pytest.approx((terms[0] + terms[1]).item(), abs=ULPS * EPS32 * mag)
    # shares: means of router weights <= 1 (3 samples x 5 tokens, 4 experts), each a few eps off
    assert_close_accumulated(stats["group0_weight"] + stats["group1_weight"], torch.tensor(1.0), 4.0)
    share0 = (w1[0].mean(0)[:2].sum() + w2[0].mean(0)[:2].sum()) / 2  # type-0 sample: its group-0 share
    assert_close_accumulated(ctx.pop_type_stats()["type0_group0_weight"], share0, 4.0)  # per epoch in a Trainer

    # without the statistics (log_stats=False): the same gradients and loss, no router statistics
    model.zero_grad()
    ctx.collect_stats = False
    ctx.set_types(types)
    model(x).pow(2).mean().backward()
    for g, p, m in zip(got, params, magnitudes):
        assert_close_accumulated(p.grad, g, m)
    lean = ctx.pop_stats()
    assert set(lean) == {"balance_loss"}
    torch.testing.assert_close(lean["balance_loss"], stats["balance_loss"])


def test_gradient_pushes_load_toward_balance_within_the_group():
    groups = split_experts(4, 2)
    logits = torch.tensor([[[1.0, 0.0, 0.5, 0.5]]] * 2, requires_grad=True)  # 2 samples x 1 token
    types = torch.tensor([0, 0])
    loss = localized_balancing_loss(importance(torch.softmax(logits, -1)), types, groups, 0.1)
    loss.backward()
    g = logits.grad[0, 0]
    assert g[0] > 0 > g[1]  # the overloaded expert of group 0 is pushed down, its partner up
    torch.testing.assert_close(g[2], g[3])  # balanced group: moved together
    with torch.no_grad():
        w_before = torch.softmax(logits, -1)[0, 0]
        w_after = torch.softmax(logits - 0.5 * logits.grad, -1)[0, 0]
    assert (w_after[0] - w_after[1]).abs() < (w_before[0] - w_before[1]).abs()


def test_constraint_optimum_balances_within_groups_and_scales_groups_by_inverse_coefficients():
    """Documented behaviour: alone, the loss reaches Q ~ 1 / I (see the module docstring)."""
    torch.manual_seed(0)
    groups = split_experts(4, 2)
    types = torch.tensor([0, 0, 1, 1])
    logits = torch.randn(4, 3, 4, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        localized_balancing_loss(importance(torch.softmax(logits, -1)), types, groups, 0.1).backward()
        opt.step()
    q = importance(torch.softmax(logits, -1)).detach()
    assert localized_balancing_loss(q, types, groups, 0.1).item() < 1e-6
    torch.testing.assert_close(q[0], q[1], atol=1e-3, rtol=0)
    torch.testing.assert_close(q[2], q[3], atol=1e-3, rtol=0)
    own = torch.stack([q[0, 0], q[0, 1], q[2, 2], q[2, 3]])
    other = torch.stack([q[2, 0], q[2, 1], q[0, 2], q[0, 3]])
    torch.testing.assert_close(own / other, torch.full((4,), 0.9 / 1.1), atol=1e-3, rtol=0)


def test_context_checks_types_and_batch_size():
    ctx = LoRAMoEContext(split_experts(4, 2))
    layer = _layer(context=ctx)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        ctx.set_types(torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="1-D integer"):
        ctx.set_types(torch.tensor([0.0, 1.0]))
    ctx.begin_step(None, lambda batch: torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="3 sample types .* batch of 2"):
        layer(torch.randn(2, 4))
    ctx.end_forward()
    layer(torch.randn(2, 4))  # untyped: no constraint
    assert ctx.pop_stats() == {}
    layer.eval()
    ctx.set_types(torch.tensor([0, 1]))
    layer(torch.randn(2, 4))  # evaluation: no constraint
    assert ctx.pop_stats() == {}


def test_injection_targets_ffn_layers_and_reports_models_without_them():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, in_chans=1, img_size=8,
                            patch_size=4, embed_dim=32, depth=2, num_heads=2)
    ctx = LoRAMoEContext(split_experts(6, 3))
    names = inject_loramoe(vit, ctx, exclude=["head"])
    assert names == [f"blocks.{b}.mlp.{f}.{m}" for b in range(2) for f in ("fc1", "fc2") for m in ("router", "experts")]
    assert type(vit.blocks[0].attn.qkv).__name__ == "Linear"
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="pass targets=.*0, 2"):
        inject_loramoe(mlp, ctx)


def test_layers_another_adapter_holds_are_refused_with_the_adapter_named():
    import timm

    from cl_plugins.peft.lora import inject_lora_groups

    def vit() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, in_chans=1, img_size=8,
                                 patch_size=4, embed_dim=32, depth=2, num_heads=2)

    ctx = LoRAMoEContext(split_experts(6, 3))
    lora_first = vit()
    inject_lora_groups(lora_first, [r"mlp\.fc1$"], method="LoRA")
    # default FFN targets: the wrapped fc1 is named as taken, not "no feed-forward layers"
    with pytest.raises(RuntimeError, match=r"LoRAMoE cannot adapt 'blocks\.0\.mlp\.fc1'.*LoRAGroupLinear"):
        inject_loramoe(lora_first, ctx, exclude=["head"])
    # a pattern that would reach the wrapped base layer
    with pytest.raises(RuntimeError, match=r"LoRAMoE cannot adapt 'blocks\.0\.mlp\.fc1'"):
        inject_loramoe(lora_first, ctx, targets=["fc1"])
    assert len(inject_loramoe(lora_first, ctx, targets=[r"mlp\.fc2$"])) == 4  # disjoint layers: fine

    moe_first = vit()
    inject_loramoe(moe_first, ctx, exclude=["head"])
    with pytest.raises(RuntimeError, match=r"LoRA cannot adapt 'blocks\.0\.mlp\.fc1'.*LoRAMoELinear"):
        inject_lora_groups(moe_first, [r"mlp\.fc1$"], method="LoRA")
    with pytest.raises(RuntimeError, match=r"LoRAMoE cannot adapt 'blocks\.0\.mlp\.fc1'.*LoRAMoELinear"):
        inject_loramoe(moe_first, ctx, exclude=["head"])


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="not both"):
        LoRAMoE(num_knowledge_experts=2, knowledge_ratio=0.5)
    with pytest.raises(ValueError, match="at least one expert in each group"):
        LoRAMoE(num_experts=4, num_knowledge_experts=4)
    with pytest.raises(ValueError, match="at least 2 experts"):
        LoRAMoE(num_experts=1)
    with pytest.raises(ValueError, match="sample_type must be"):
        LoRAMoE(sample_type="batch")
    with pytest.raises(ValueError, match="types 0 or 1"):
        LoRAMoE(sample_type={0: 0, 1: 2})
    with pytest.raises(ValueError, match="delta"):
        LoRAMoE(delta=1.5)
    assert LoRAMoE(num_experts=6, knowledge_ratio=1 / 3).context.expert_groups.tolist() == [0, 0, 1, 1, 1, 1]
    assert LoRAMoE().context.expert_groups.tolist() == [0, 0, 0, 1, 1, 1]


def test_sample_types_follow_each_samples_source_experience():
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=8)
    cb = LoRAMoE(knowledge_experiences=2)
    cb.prepare_types(dm)
    assert cb._lookup[0] == "class"
    y = torch.tensor([0, 1, 2, 3, 4, 9])  # classes of experiences 0, 0, 1, 1, 2, 4
    assert cb.resolve_types([torch.zeros(6), y, torch.zeros(6, dtype=torch.long)]).tolist() == [0, 0, 0, 0, 1, 1]

    task_dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=8, scenario="task")
    cb = LoRAMoE(sample_type={0: 0, 1: 1, 2: 1, 3: 0, 4: 1})
    cb.prepare_types(task_dm)
    t = torch.tensor([3, 0, 1, 4])
    assert cb.resolve_types([torch.zeros(4), torch.zeros(4, dtype=torch.long), t]).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="task labels \\[3, 4\\] too"):
        LoRAMoE(sample_type={0: 0, 1: 1, 2: 1}).prepare_types(task_dm)
    cb = LoRAMoE()
    cb.prepare_types(task_dm)
    assert cb._lookup[0] == "task"
    assert cb.resolve_types([torch.zeros(3), torch.tensor([9, 0, 2]), torch.tensor([4, 0, 1])]).tolist() == [1, 0, 1]
    with pytest.raises(TypeError, match="LongTensor"):
        LoRAMoE(sample_type=lambda b: [0, 1]).resolve_types(None)


def test_domain_incremental_streams_type_by_the_current_experience():
    tx, ty, vx, vy = load_digits_tensors()
    dm = ContinualDataModule(benchmark=permuted_benchmark(tx[:100], ty[:100], vx[:50], vy[:50], n_experiences=2))
    cb = LoRAMoE()
    cb.prepare_types(dm)
    assert cb._lookup == ("current", None)
