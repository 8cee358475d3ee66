"""LoRAMoE's step without host syncs: the layers against a per-layer, per-expert reference at float64
(outputs, gradients, balancing loss and router statistics), the terms computed once per step, and the
sample-type checks that moved off the step (a clear error at the end of the epoch)."""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from callbacks.loramoe import LoRAMoE
from cl_plugins.aux_loss import AuxLossTracker
from cl_plugins.hostsync import HostSyncCounter
from cl_plugins.models import ContinualClassifier
from cl_plugins.peft.loramoe import LoRAMoEContext, LoRAMoELinear, localized_balancing_loss, split_experts
from datamodules.digits import SplitDigits
from tests.conftest import quiet_trainer_kwargs

F64 = torch.float64
DELTA, BETA, SEED = 0.1, 0.3, 0.5  # the seed: Lightning's loss scaling as the tracker hands it to the terms


def _model(n: int = 4, layers: int = 2, seed: int = 0) -> tuple[nn.Sequential, LoRAMoEContext]:
    """Float64 LoRAMoE layers 6 -> 8 -> ... -> 5 with tanh between, random B and routers, one context."""
    torch.manual_seed(seed)
    tracker = AuxLossTracker()
    tracker.seed = SEED
    ctx = LoRAMoEContext(split_experts(n, n // 2), delta=DELTA, balance_weight=BETA, tracker=tracker)
    dims = [6] + [8] * (layers - 1) + [5]
    mods: list[nn.Module] = []
    for d_in, d_out in zip(dims, dims[1:]):
        layer = LoRAMoELinear(nn.Linear(d_in, d_out).to(F64), num_experts=n, rank=2, alpha=4.0, dropout=0.0,
                              context=ctx)
        with torch.no_grad():
            layer.experts.lora_B.normal_()
            layer.router.weight.normal_()
        layer.base.requires_grad_(False)
        mods += [layer, nn.Tanh()]
    return nn.Sequential(*mods[:-1]), ctx


def _reference_layer(layer: LoRAMoELinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented layer, expert by expert: ``W0 x + b + sum_i w_i s B_i A_i x``; and its router weights."""
    w = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    e = layer.experts
    out = layer.base(x)
    for i in range(layer.num_experts):
        out = out + w[..., i:i + 1] * e.scaling * (x @ e.lora_A[i].t() @ e.lora_B[i].t())
    return out, w


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def test_layers_equal_the_per_expert_reference_with_the_attached_terms_in_float64():
    model, ctx = _model(layers=3)
    x = torch.randn(3, 5, 6, dtype=F64)
    types = torch.tensor([0, 1, 1])
    ctx.set_types(types)
    out = model(x)
    grads = torch.autograd.grad(out.pow(2).mean(), _trainable(model))
    stats = ctx.pop_stats()
    type_stats = ctx.pop_type_stats()

    ctx.set_types(None)
    h, ws, terms = x, [], []
    for m in model:
        if isinstance(m, LoRAMoELinear):
            h, w = _reference_layer(m, h)
            ws.append(w)
            q = w.sum(dim=1).t()  # importance: (experts, samples)
            terms.append(BETA * localized_balancing_loss(q, types, ctx.expert_groups, DELTA))
        else:
            h = m(h)
    torch.testing.assert_close(out, h, rtol=1e-12, atol=1e-12)
    loss_ref = h.pow(2).mean() + SEED * sum(terms)
    for g, g_ref in zip(grads, torch.autograd.grad(loss_ref, _trainable(model))):
        assert g_ref.abs().max() > 0
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12 * float(g_ref.abs().max()))
    assert stats["balance_loss"].dtype == F64
    torch.testing.assert_close(stats["balance_loss"], sum(terms).detach(), rtol=1e-12, atol=0)

    # router statistics: mean router weight per sample over its tokens, then over samples and layers
    share = torch.stack([w.mean(dim=1) for w in ws]).detach()  # (layers, samples, experts)
    load = share.mean(dim=(0, 1))
    for n in range(4):
        torch.testing.assert_close(stats[f"expert{n}_load"], load[n], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(stats["group0_weight"], load[:2].sum(), rtol=1e-12, atol=1e-15)
    by_type = {0: share[:, :1].mean(dim=(0, 1)), 1: share[:, 1:].mean(dim=(0, 1))}
    assert set(type_stats) == {f"type{s}_group{g}_weight" for s in (0, 1) for g in (0, 1)}
    for s, mean in by_type.items():
        torch.testing.assert_close(type_stats[f"type{s}_group1_weight"], mean[2:].sum(), rtol=1e-12, atol=1e-15)
    # a later step with type-0 samples only: the epoch's per-type shares add up over the steps
    ctx.set_types(torch.tensor([0, 0, 0]))
    model(x)
    ctx.pop_stats()
    assert set(ctx.pop_type_stats()) == {"type0_group0_weight", "type0_group1_weight"}


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _step_ops(layers: int, experts: int) -> tuple[Counter[str], dict[str, torch.Tensor]]:
    model, ctx = _model(n=experts, layers=layers)
    ctx.set_types(torch.tensor([0, 1, 1, 0]))
    with _CountOps() as counted:
        out = model(torch.randn(4, 3, 6, dtype=F64))
        out.sum().backward()
        stats = ctx.pop_stats()
    return counted.ops, stats


@pytest.mark.parametrize("layers", [2, 5])
def test_balancing_terms_once_per_step_and_experts_in_one_product_whatever_their_number(layers):
    """Value and gradient of every layer's term come from one batched computation (one ``var_mean``); the
    experts of a layer take one matmul for all ``A`` and one for all ``B``, so the number of products does
    not depend on the number of experts."""
    ops, stats = _step_ops(layers, experts=2)
    assert ops["var_mean"] == 1 and ops["var"] == 0, ops
    assert stats["balance_loss"] > 0
    products = ("mm", "addmm", "bmm", "baddbmm")
    many, _ = _step_ops(layers, experts=8)
    assert [many[k] for k in products] == [ops[k] for k in products]
    # per layer, forward: base, router, all A, all B; backward: input and weight gradients of the trained ones
    assert sum(ops[k] for k in products) <= 11 * layers, ops


def test_a_training_step_makes_no_host_sync():
    """Types resolved by a callable, terms attached, backward, statistics: nothing reads a tensor on the host."""
    model, ctx = _model(layers=3)
    ctx.begin_step((torch.randn(3, 5, 6, dtype=F64),), lambda batch: torch.tensor([0, 1, 1]))
    with HostSyncCounter() as syncs:
        model(ctx._batch[0]).sum().backward()
        ctx.end_forward()
        stats = ctx.pop_stats()
    assert syncs.total == 0, syncs.calls
    assert set(stats) >= {"balance_loss", "expert0_load", "group1_weight"}


def test_bad_types_from_a_resolver_are_reported_by_the_end_of_epoch_check():
    model, ctx = _model()
    for bad, values in ((torch.tensor([0, 2, 1]), "from 0 to 2"), (torch.tensor([-1, 1, 1]), "from -1 to 1")):
        ctx.begin_step(None, lambda batch, t=bad: t)
        model(torch.randn(3, 4, 6, dtype=F64)).sum().backward()  # no error, no sync in the step
        ctx.end_forward()
        ctx.pop_stats()
        with pytest.raises(ValueError, match=rf"sample types must be in \[0, 2\).*{values}.*-1 comes from a class"):
            ctx.check_types()
        ctx.check_types()  # reported once: the next check starts afresh
    ctx.begin_step(None, lambda batch: torch.tensor([1, 0, 1]))
    model(torch.randn(3, 4, 6, dtype=F64))
    ctx.check_types()


def test_unknown_labels_become_type_minus_one_without_a_sync():
    cb = LoRAMoE()
    cb._lookup = ("class", torch.tensor([0, 0, 1, -1]))  # class 3: no experience has it
    batch = [torch.zeros(5), torch.tensor([0, 1, 2, 3, 7]), torch.zeros(5, dtype=torch.long)]
    with HostSyncCounter() as syncs:
        types = cb.resolve_types(batch)
    assert types.tolist() == [0, 0, 1, -1, -1] and syncs.total == 0, syncs.calls


def test_a_fit_with_a_bad_sample_type_fails_at_the_end_of_the_epoch_with_the_fix():
    pl.seed_everything(0)
    model = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                                backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2))
    steps = []

    def types(batch):
        steps.append(1)
        return torch.where(batch[1] == 1, 2, 0)  # class 1 gets the type 2

    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[LoRAMoE(sample_type=types)], limit_train_batches=3,
                                                limit_val_batches=0))
    with pytest.raises(ValueError, match=r"sample types must be in \[0, 2\).*from 0 to 2.*sample_type callable"):
        trainer.fit(model, datamodule=SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=16))
    assert len(steps) == 3  # the whole epoch ran: the check waits for the epoch's end
