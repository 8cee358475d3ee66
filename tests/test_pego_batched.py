"""PEGO's batched regularizer (``PEGORegularizer``) against the per-layer reference (``pego_losses``)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from callbacks.pego import PEGO
from cl_plugins.models import ContinualClassifier
from cl_plugins.peft.adapters import fused_qkv_rows as qkv_parts_rows
from cl_plugins.peft.lora import LoRAGroupLinear
from cl_plugins.peft.pego import PEGORegularizer, pego_losses

F64 = torch.float64


def _layers(dtype: torch.dtype = F64, seed: int = 0) -> list[LoRAGroupLinear]:
    """Fused-qkv layers adapted on q and v, plain layers of two shapes, groups of 1 and 3 modules and two
    scalings: four groups of equal-shape parts, with random B (zero B gives zero terms)."""
    torch.manual_seed(seed)
    specs = [  # d_in, d_out, num_loras, rank, alpha, parts
        (6, 12, 3, 2, None, qkv_parts_rows(12, "qv")),
        (6, 12, 3, 2, None, qkv_parts_rows(12, "qv")),
        (5, 4, 3, 2, None, None),
        (5, 4, 3, 2, None, None),
        (5, 4, 3, 2, 3.0, None),  # same shapes, another scaling: its own group
        (7, 3, 1, 3, None, None),  # a single module: no diversify term
        (6, 12, 3, 2, None, qkv_parts_rows(12, "v")),  # a v slice has the q slices' shapes
    ]
    layers = []
    for d_in, d_out, n, r, alpha, parts in specs:
        layer = LoRAGroupLinear(nn.Linear(d_in, d_out).to(dtype), num_loras=n, rank=r, alpha=alpha, parts=parts)
        with torch.no_grad():
            for b in layer.lora_B:
                b.normal_()
        layers.append(layer)
    return layers


def _factors(layers: list[LoRAGroupLinear]) -> list[torch.Tensor]:
    return [p for layer in layers for p in (*layer.lora_A, *layer.lora_B)]


def _terms_and_grads(fn, layers):
    div, pre = fn()
    grads = torch.autograd.grad(0.7 * div + 1.3 * pre, _factors(layers))
    return div.detach(), pre.detach(), grads


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float64 rounding of sums of a few hundred terms of the gradients' magnitude."""
    scale = want.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(scale))


def test_batched_terms_and_gradients_equal_the_per_layer_reference_in_float64():
    layers = _layers()
    reg = PEGORegularizer(layers)
    # the q and v slices of the qkv layers together (5 parts), the two 5 -> 4 layers of scale 1, the one of
    # scale 1.5, the single-module layer
    assert sorted(len(g.parts) for g in reg.groups()) == [1, 1, 2, 5]
    div, pre, grads = _terms_and_grads(reg, layers)
    div_ref, pre_ref, grads_ref = _terms_and_grads(lambda: pego_losses(layers), layers)
    assert div.dtype == pre.dtype == F64 and float(div) > 1 and float(pre) > 1
    _close(div, div_ref)
    _close(pre, pre_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert g_ref.abs().max() > 0
        _close(g, g_ref)
    # one term only, as the callback asks when a weight is 0
    assert reg(diversify=False)[0] is None and reg(preserve=False)[1] is None
    _close(reg(diversify=False)[1].detach(), pre_ref)
    # groups of single modules only: no diversify term (as the reference)
    single = [lay for lay in layers if lay.num_loras == 1]
    assert PEGORegularizer(single)()[0] is None and pego_losses(single)[0] is None


def test_w0_is_stacked_once_and_follows_every_change_of_the_base_weights():
    layers = _layers()
    reg = PEGORegularizer(layers)
    stacks = [g.w0 for g in reg.groups()]
    reg()
    assert [g.w0 for g in reg.groups()] == stacks  # the same tensors: not rebuilt per call
    # an in-place change (as load_state_dict makes) and a merge / unmerge round trip: the terms follow
    with torch.no_grad():
        layers[0].base.weight.mul_(-2.0)
    _close(reg()[1].detach(), pego_losses(layers)[1].detach())
    layers[2].merge()
    with pytest.raises(RuntimeError, match="merged"):
        reg()
    layers[2].unmerge()  # W0 comes back up to rounding: the stack is rebuilt from the weight as it is now
    _close(reg()[1].detach(), pego_losses(layers)[1].detach())
    # a new weight tensor (as moving the module to another device gives)
    layers[3].base.weight = nn.Parameter(layers[3].base.weight.detach() * 0.5, requires_grad=False)
    _close(reg()[1].detach(), pego_losses(layers)[1].detach())


def test_terms_are_float32_under_bf16_autocast_and_match_the_float32_reference():
    layers = _layers(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        div, pre = PEGORegularizer(layers)()
    assert div.dtype == pre.dtype == torch.float32
    div_ref, pre_ref = pego_losses(layers)
    torch.testing.assert_close(div, div_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(pre, pre_ref, rtol=1e-5, atol=0)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("depth", [2, 6])
def test_callback_computes_each_term_with_a_fixed_number_of_products_whatever_the_depth(depth):
    """The callback uses the batched form: the number of operators of the regularizer's forward and backward
    does not grow with the number of adapted layers (the per-layer form: a dozen per part)."""
    model = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=4, in_channels=1, input_shape=(1, 8, 8),
                                backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=32, depth=depth, num_heads=2))
    pego = PEGO(ortho_weight=0.5, preserve_weight=0.25)
    layers = list(pego.apply_to(model).values())
    pego.setup(None, model, "fit")
    with torch.no_grad():
        for layer in layers:
            for b in layer.lora_B:
                b.normal_()
    with _CountOps() as counted:
        terms = pego.regularizer()
        torch.autograd.grad(sum(terms.values()), _factors(layers))
    assert counted.ops["bmm"] + counted.ops["mm"] <= 16, counted.ops  # one group of 2 * depth parts
    assert sum(counted.ops.values()) < 200, counted.ops
    div, pre = pego_losses(layers)
    torch.testing.assert_close(terms["pego/diversify_loss"], 0.5 * div, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["pego/preserve_loss"], 0.25 * pre, rtol=1e-5, atol=0)
    pego.teardown(None, model, "fit")
