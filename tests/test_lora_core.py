"""LoRAGroupLinear alone: forward against explicit matrices, merging, state, injection, PEFT export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from callbacks.lora import LoRA
from callbacks.pego import PEGO
from cl_plugins.models import ContinualClassifier
from cl_plugins.peft.adapters import fused_qkv_rows
from cl_plugins.peft.lora import LoRAGroupLinear, inject_lora_groups, peft_lora_state_dict
from cl_plugins.peft.presets import detect_family
from tests.tolerances import (
    EPS_BF16,
    FLOAT64_TOL,
    abs_forward,
    assert_close_accumulated,
    merged_weight_magnitude,
)

VIT_KW = dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2)
BERT_CFG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _vit() -> ContinualClassifier:
    return ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                               backbone_kwargs=VIT_KW)


def _bert() -> ContinualClassifier:
    return ContinualClassifier("hf-config", num_classes=4, hf_config=BERT_CFG)


def _explicit_layer() -> tuple[LoRAGroupLinear, nn.Linear]:
    """d_in = 3, d_out = 4, a group of N = 2 rank-1 modules with alpha = 2 (scale alpha / r = 2)."""
    base = nn.Linear(3, 4)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0]))
    layer = LoRAGroupLinear(copy.deepcopy(base), num_loras=2, rank=1, alpha=2.0)
    with torch.no_grad():
        layer.lora_A[0].copy_(torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]]))  # A_1, A_2: (2, 1, 3)
        layer.lora_B[0].copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]], [[2.0], [0.0]], [[0.0], [-1.0]]]))
    return layer, base


def test_group_forward_equals_base_plus_sum_of_scaled_low_rank_updates():
    layer, base = _explicit_layer()
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # by hand: W0 x + b = [1, 2, 3, 6] + [0.5, -0.5, 0, 1] = [1.5, 1.5, 3, 7]
    # A_1 x = 1, A_2 x = 5; B_1 = [1, 0, 2, 0]^T, B_2 = [0, 1, 0, -1]^T
    # 2 * (B_1 * 1 + B_2 * 5) = [2, 10, 4, -10]
    torch.testing.assert_close(layer(x), torch.tensor([[3.5, 11.5, 7.0, -3.0]]))
    a1, a2 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 1.0]])
    b1, b2 = torch.tensor([[1.0], [0.0], [2.0], [0.0]]), torch.tensor([[0.0], [1.0], [0.0], [-1.0]])
    xs = torch.randn(5, 7, 3)
    x64, base64 = xs.double(), copy.deepcopy(base).double()
    want = base64(x64) + 2.0 * (x64 @ (b1 @ a1).double().T + x64 @ (b2 @ a2).double().T)  # float64 reference
    assert_close_accumulated(layer(xs), want, abs_forward(layer, xs))
    torch.testing.assert_close(layer.delta_weights()[0], 2.0 * (b1 @ a1 + b2 @ a2))


def test_fused_qkv_parts_adapt_only_query_and_value_rows():
    torch.manual_seed(0)
    base = nn.Linear(4, 12)
    parts = fused_qkv_rows(12, "qv")
    assert parts == [("q", 0, 4), ("v", 8, 12)]
    layer = LoRAGroupLinear(copy.deepcopy(base), num_loras=3, rank=2, alpha=4.0, parts=parts)
    x = torch.randn(6, 4)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: the pretrained function
    assert all(a.abs().sum() > 0 for a in layer.lora_A) and all(b.abs().sum() == 0 for b in layer.lora_B)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    want = copy.deepcopy(base).double()(x.double())  # float64 reference
    for (s, e), a, b in zip(layer.row_ranges, layer.lora_A, layer.lora_B):
        delta = sum(b[:, i].double() @ a[i].double() for i in range(3)) * 2.0  # (alpha / r) sum_i B_i A_i
        want[:, s:e] += x.double() @ delta.T
    out = layer(x)
    assert_close_accumulated(out, want, abs_forward(layer, x))
    assert torch.equal(out[:, 4:8], base(x)[:, 4:8])  # the key rows are untouched
    with pytest.raises(ValueError, match="subset of 'qkv'"):
        fused_qkv_rows(12, "qx")
    with pytest.raises(ValueError, match="divisible by 3"):
        fused_qkv_rows(10, "qv")


def test_merge_equals_unmerged_and_the_flag_travels_with_the_state_dict():
    torch.manual_seed(0)
    base = nn.Linear(8, 12)
    layer = LoRAGroupLinear(copy.deepcopy(base), num_loras=2, rank=3, alpha=6.0, parts=fused_qkv_rows(12, "qv"))
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(5, 8)
    layer.eval()
    unmerged = layer(x)
    # merged, unmerged, merged again: each output is the same sum of products, rounded in another order, and
    # each weight the same |W0| + |update| rounded once more by merging and again by unmerging
    out_mag, weight_mag = abs_forward(layer, x), merged_weight_magnitude(layer)
    keys = set(layer.state_dict())
    layer.merge()
    assert layer.merged and int(layer.lora_merged) == 1
    assert_close_accumulated(layer(x), unmerged, out_mag)
    # a merged layer is one linear layer: the update lives in the weight
    assert_close_accumulated(nn.functional.linear(x, layer.base.weight, layer.base.bias), layer(x), out_mag)
    assert set(layer.state_dict()) == keys  # same structure merged or not
    merged_sd = copy.deepcopy(layer.state_dict())
    layer.merge()  # idempotent
    torch.testing.assert_close(layer.state_dict()["base.weight"], merged_sd["base.weight"])
    layer.unmerge()
    assert not layer.merged
    assert_close_accumulated(layer.base.weight, base.weight, weight_mag)
    assert_close_accumulated(layer(x), unmerged, out_mag)

    # a merged checkpoint into an unmerged module: the flag comes with the merged weights
    fresh = LoRAGroupLinear(copy.deepcopy(base), num_loras=2, rank=3, alpha=6.0, parts=fused_qkv_rows(12, "qv"))
    fresh.load_state_dict(merged_sd)
    fresh.eval()
    assert fresh.merged
    assert_close_accumulated(fresh(x), unmerged, out_mag)
    fresh.unmerge()
    assert_close_accumulated(fresh.base.weight, base.weight, weight_mag)
    # an unmerged checkpoint into a merged module
    layer.merge()
    layer.load_state_dict(fresh.state_dict())
    assert not layer.merged
    assert_close_accumulated(layer(x), unmerged, out_mag)

    # training a merged layer would not reach the group: refused with a clear message
    layer.merge()
    layer.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)
    with torch.no_grad():
        layer(x)  # inference is fine


def test_bf16_autocast_forward_and_float32_merge():
    torch.manual_seed(0)
    layer = LoRAGroupLinear(nn.Linear(16, 16), num_loras=2, rank=4)
    with torch.no_grad():
        layer.lora_B[0].normal_()
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        deltas = layer.delta_weights()
    assert y.dtype == torch.bfloat16 and deltas[0].dtype == torch.float32
    # autocast rounds x, W0, A, B, the rank-4 intermediate and the output to bf16 (eps_bf16 / 2 each, relative to
    # the size of the products they enter): at most 2 eps_bf16 of sum |terms| (float32 accumulation adds ~nothing)
    assert_close_accumulated(y, layer(x), 2 * abs_forward(layer, x), ulps=1, eps=EPS_BF16)


def test_constructor_errors_are_explicit():
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRAGroupLinear(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="rank"):
        LoRAGroupLinear(nn.Linear(2, 2), rank=0)
    with pytest.raises(ValueError, match="alpha"):
        LoRAGroupLinear(nn.Linear(2, 2), alpha=0.0)
    with pytest.raises(ValueError, match="overlap"):
        LoRAGroupLinear(nn.Linear(2, 6), parts=[("a", 0, 4), ("b", 2, 6)])
    with pytest.raises(ValueError, match="dropout"):
        LoRA(dropout=1.0)
    with pytest.raises(ValueError, match="qkv"):
        PEGO(qkv_parts="qq")
    with pytest.raises(ValueError, match=">= 0"):
        PEGO(ortho_weight=-1.0)


def test_default_targets_per_family_and_unknown_models_need_targets():
    vit, bert = _vit(), _bert()
    assert detect_family(vit) == "timm_vit" and detect_family(bert) == "bert"
    lora_vit = LoRA().apply_to(vit)
    assert sorted(lora_vit) == [f"net.blocks.{i}.attn.{n}" for i in range(2) for n in ("proj", "qkv")]
    assert all(m.part_names == ("all",) for m in lora_vit.values())
    pego_bert = PEGO().apply_to(bert)
    assert sorted(n.rsplit(".", 1)[1] for n in pego_bert) == ["query", "query", "value", "value"]
    lora_bert = LoRA().apply_to(_bert())
    assert len(lora_bert) == 8 and any(n.endswith("attention.output.dense") for n in lora_bert)
    pego_vit = PEGO().apply_to(_vit())
    assert sorted(pego_vit) == ["net.blocks.0.attn.qkv", "net.blocks.1.attn.qkv"]
    assert all(m.part_names == ("q", "v") and m.num_loras == 4 and m.rank == 4 for m in pego_vit.values())
    # only the factors are trainable; the wrapped weights stay frozen
    trainable = [n for n, p in vit.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or n.startswith("net.head.") for n in trainable)

    mlp = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="targets=") as err:
        LoRA().apply_to(mlp)
    assert "net.body.1" in str(err.value)  # lists the linear layers
    with pytest.raises(ValueError, match="match no linear layer"):
        LoRA(targets=[r"nothing$"]).apply_to(mlp)
    assert len(LoRA(targets=[r"body\.\d+$"]).apply_to(mlp)) == 2


def test_a_layer_already_adapted_cannot_be_adapted_again():
    model = _vit()
    inject_lora_groups(model, [r"attn\.qkv$"], method="first")
    with pytest.raises(RuntimeError, match="no longer a plain nn.Linear but a LoRAGroupLinear"):
        inject_lora_groups(model, [r"attn\.qkv$"], method="second")
    with pytest.raises(RuntimeError, match="cannot adapt 'net.blocks.0.attn.qkv'"):
        inject_lora_groups(model, ["qkv"], method="second")  # would match the wrapped base layer
    assert len(inject_lora_groups(model, [r"attn\.proj$"], method="second")) == 2  # disjoint: fine


def test_export_to_peft_computes_the_same_function():
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)
    model = _vit()
    reference = copy.deepcopy(model.net)
    layers = PEGO(num_loras=2, rank=3, alpha=6.0).apply_to(model)
    with torch.no_grad():
        for layer in layers.values():
            for b in layer.lora_B:
                b.normal_()
    config, state = peft_lora_state_dict(model, strip="net.")
    assert config["rank_pattern"] == {r"blocks\.0\.attn\.qkv": 12, r"blocks\.1\.attn\.qkv": 12}  # 2 parts x 2 x 3
    peft_model = get_peft_model(reference, LoraConfig(**config))
    result = set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys
    model.eval().double()  # both in float64: they agree to float64 rounding, on any CPU
    peft_model.eval().double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = model(x), peft_model(x)
        with peft_model.disable_adapter():
            plain = peft_model(x)
    torch.testing.assert_close(theirs, ours, **FLOAT64_TOL)
    assert (plain - ours).abs().max() > 1e-3  # the adapters do change the function
    next(iter(layers.values())).merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        peft_lora_state_dict(model)
