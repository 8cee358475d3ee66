"""The shared adapter layer: the family table, each method's default placement on a tiny timm ViT and a
tiny BERT, the wrapper base class, one injection function that refuses occupied layers."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from callbacks.l2m import L2M
from callbacks.lora import LoRA
from callbacks.loramoe import LoRAMoE
from callbacks.pego import PEGO
from cl_plugins.models import ContinualClassifier
from cl_plugins.peft.adapters import (
    AdapterLayer,
    adapter_layers,
    fused_qkv_rows,
    inject_adapters,
    is_adapter,
    resolve_targets,
    rows_index,
)
from cl_plugins.peft.l2m import PooledIA3Linear, PooledLoRALinear, install_l2m
from cl_plugins.peft.l2m import resolve_targets as l2m_targets
from cl_plugins.peft.lora import LoRAGroupLinear, inject_lora_groups
from cl_plugins.peft.loramoe import LoRAMoEContext, LoRAMoELinear, inject_loramoe, split_experts
from cl_plugins.peft.presets import BERT, PRESETS, TIMM_VIT, FamilyPreset, detect_family, family_with
from cl_plugins.protocols import find_head

VIT_KW = dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2)
BERT_CFG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
BLOCKS = range(2)


def _vit() -> ContinualClassifier:
    torch.manual_seed(0)
    return ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                               backbone_kwargs=VIT_KW)


def _bert() -> ContinualClassifier:
    torch.manual_seed(0)
    return ContinualClassifier("hf-config", num_classes=4, hf_config=BERT_CFG)


V = "net.blocks.{}."
B = "net.model.bert.encoder.layer.{}."


def _names(prefix: str, *suffixes: str) -> list[str]:
    return [prefix.format(i) + s for i in BLOCKS for s in suffixes]


# ---------------------------------------------------------------------- the family table
ROLES = {
    "attention": lambda f: f.attention,
    "ffn": lambda f: f.ffn,
    "qv": lambda f: f.projections("qv"),
    "kv": lambda f: f.projections("kv"),
}
EXPECTED = {
    ("timm_vit", "attention"): _names(V, "attn.qkv", "attn.proj"),
    ("timm_vit", "ffn"): _names(V, "mlp.fc1", "mlp.fc2"),
    ("timm_vit", "qv"): _names(V, "attn.qkv"),
    ("timm_vit", "kv"): _names(V, "attn.qkv"),
    ("bert", "attention"): _names(B, "attention.self.query", "attention.self.key", "attention.self.value",
                                  "attention.output.dense"),
    # the FFN output is output.dense, not attention.output.dense
    ("bert", "ffn"): _names(B, "intermediate.dense", "output.dense"),
    ("bert", "qv"): _names(B, "attention.self.query", "attention.self.value"),
    ("bert", "kv"): _names(B, "attention.self.key", "attention.self.value"),
}


@pytest.mark.parametrize("family", ["timm_vit", "bert"])
def test_each_role_of_the_table_names_the_right_layers_of_each_family(family):
    model = _vit() if family == "timm_vit" else _bert()
    assert detect_family(model) == family
    for role, pick in ROLES.items():
        assert family_with(model, pick) is PRESETS[family]
        placement = resolve_targets(model, None, method="test", defaults=pick)
        assert sorted(placement) == sorted(EXPECTED[family, role]), role
        assert all(parts is None for parts in placement.values())  # no qkv_parts asked: whole layers
    # the embedding module (L2M's query) and the head
    modules = dict(model.named_modules())
    query = [n for n in modules if re.search(PRESETS[family].query_module, n)]
    assert query == (["net.patch_embed"] if family == "timm_vit" else ["net.model.bert.embeddings"])
    head_owner = model.net if family == "timm_vit" else model.net.model
    assert find_head(model)[1] is getattr(head_owner, PRESETS[family].head)


def test_a_family_has_either_a_fused_qkv_layer_or_three_projections():
    assert TIMM_VIT.projections("qv") == (r"attn\.qkv$",) and TIMM_VIT.detect == r"attn\.qkv$"
    assert BERT.projections("v") == (BERT.value,) and BERT.detect == BERT.query
    with pytest.raises(ValueError, match="fused_qkv or all of"):
        FamilyPreset("x", "x", "o", "f1", "f2", "emb", "head", fused_qkv="qkv", query="q", key="k", value="v")
    with pytest.raises(ValueError, match="fused_qkv or all of"):
        FamilyPreset("x", "x", "o", "f1", "f2", "emb", "head", query="q", key="k")
    with pytest.raises(ValueError, match="subset of 'qkv'"):
        TIMM_VIT.projections("qx")


def _l2m_layer(x: AdapterLayer) -> tuple[str, str, list[int] | None]:
    """(type, side, modulated output indices or None)."""
    if isinstance(x, PooledLoRALinear):
        index, side = x.out_index, "output"
    else:
        assert isinstance(x, PooledIA3Linear)
        index, side = x.index, x.side
    return type(x).__name__, side, None if index is None else index.tolist()


def _placements(model: nn.Module) -> dict[str, object]:
    """Each method's default placement on a copy of ``model``."""
    out: dict[str, object] = {}
    for method, cb in (("LoRA", LoRA()), ("PEGO", PEGO())):
        out[method] = {n: layer.row_ranges for n, layer in cb.apply_to(copy.deepcopy(model)).items()}
    m = copy.deepcopy(model)
    LoRAMoE(num_experts=2).setup(None, m, "fit")
    out["LoRAMoE"] = sorted(n for n, x in m.named_modules() if isinstance(x, LoRAMoELinear))
    for modulator in ("lora", "ia3"):
        m = copy.deepcopy(model)
        L2M(pool_size=2, query_dim=32, modulator=modulator).setup(None, m, "fit")
        out[f"L2M-{modulator}"] = {n: _l2m_layer(x) for n, x in adapter_layers(m).items()}
    return out


def test_each_method_keeps_its_default_placement_on_a_vit_and_a_bert():
    d = 32
    q, k, v = (list(range(i * d, (i + 1) * d)) for i in range(3))
    vit = _placements(_vit())
    assert vit["LoRA"] == {n: ((0, 3 * d),) if n.endswith("qkv") else ((0, d),)
                           for n in _names(V, "attn.qkv", "attn.proj")}
    assert vit["PEGO"] == {n: ((0, d), (2 * d, 3 * d)) for n in _names(V, "attn.qkv")}  # q and v slices
    assert vit["LoRAMoE"] == sorted(_names(V, "mlp.fc1", "mlp.fc2"))
    assert vit["L2M-lora"] == {**{n: ("PooledLoRALinear", "output", q + v) for n in _names(V, "attn.qkv")},
                               **{n: ("PooledLoRALinear", "output", None) for n in _names(V, "mlp.fc1")}}
    assert vit["L2M-ia3"] == {**{n: ("PooledIA3Linear", "output", k + v) for n in _names(V, "attn.qkv")},
                              **{n: ("PooledIA3Linear", "input", None) for n in _names(V, "mlp.fc2")}}
    bert = _placements(_bert())
    assert set(bert["LoRA"]) == set(EXPECTED["bert", "attention"])
    assert set(bert["PEGO"]) == set(EXPECTED["bert", "qv"])
    assert bert["LoRAMoE"] == sorted(EXPECTED["bert", "ffn"])
    lora = _names(B, "attention.self.query", "attention.self.value", "intermediate.dense")
    assert bert["L2M-lora"] == {n: ("PooledLoRALinear", "output", None) for n in lora}
    assert bert["L2M-ia3"] == {**{n: ("PooledIA3Linear", "output", None) for n in EXPECTED["bert", "kv"]},
                               **{n: ("PooledIA3Linear", "input", None) for n in _names(B, "output.dense")}}


def test_a_model_of_no_known_family_needs_targets_and_lists_its_layers():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"found none of its default layers.*timm ViT: mlp.*pass targets=.*0, 2"):
        resolve_targets(mlp, None, method="LoRAMoE", defaults=lambda f: f.ffn)
    assert list(resolve_targets(mlp, ["0"], method="x")) == ["0"]


# ---------------------------------------------------------------------- the wrapper base class
def test_every_wrapper_is_an_adapter_layer_exposing_its_base_layer():
    from cl_plugins.peft.l2m import ModulationPool

    pool = ModulationPool(pool_size=2, key_dim=3)
    wrappers = [
        lambda lin: LoRAGroupLinear(lin, num_loras=2, rank=2),
        lambda lin: LoRAMoELinear(lin, num_experts=2, rank=2),
        lambda lin: PooledLoRALinear(lin, pool, rank=2),
        lambda lin: PooledIA3Linear(lin, pool),
    ]
    for make in wrappers:
        lin = nn.Linear(3, 6)
        w = make(lin)
        assert isinstance(w, AdapterLayer) and is_adapter(w)
        assert w.base_layer is lin and w.unwrap() is lin
        assert "base.weight" in w.state_dict()  # the wrapped weights keep their names
    assert not is_adapter(nn.Linear(3, 3))


def test_fused_qkv_slicing_is_shared_and_refuses_repeated_parts():
    assert fused_qkv_rows(12, "qv") == [("q", 0, 4), ("v", 8, 12)]
    assert rows_index(fused_qkv_rows(12, "kv")).tolist() == list(range(4, 12))
    with pytest.raises(ValueError, match="without repeats"):
        fused_qkv_rows(12, "qq")
    with pytest.raises(ValueError, match="divisible by 3"):
        fused_qkv_rows(10, "q")
    # L2M slices through the same function: "vv" would add the v update twice
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, in_chans=1, img_size=8,
                            patch_size=4, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="without repeats"):
        l2m_targets(vit, "lora", qkv_parts="vv")


# ---------------------------------------------------------------------- one injection function
class _Scale(AdapterLayer):
    """A minimal adapter: doubles the output."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.base(x)


def test_inject_replaces_the_targets_and_records_the_method():
    model = _vit()
    new = inject_adapters(model, lambda n, layer, rows: _Scale(layer), [r"mlp\.fc2$"], method="Scale")
    assert list(new) == _names(V, "mlp.fc2")
    assert all(isinstance(model.get_submodule(n), _Scale) and new[n].adapter_method == "Scale" for n in new)
    # a user-defined AdapterLayer holds its layers like ours do
    with pytest.raises(RuntimeError, match=r"LoRA cannot adapt 'net\.blocks\.0\.mlp\.fc2': .*_Scale \(injected by Sc"):
        inject_lora_groups(model, [r"mlp\.fc2$"])


@pytest.mark.parametrize("first", ["LoRA", "LoRAMoE", "L2M"])
def test_inject_refuses_layers_another_adapter_holds_and_changes_nothing(first):
    model = _vit()
    if first == "LoRA":
        inject_lora_groups(model, [r"blocks\.0\.mlp\.fc1$"], method="LoRA")
        wrapper = "LoRAGroupLinear"
    elif first == "LoRAMoE":
        inject_loramoe(model, LoRAMoEContext(split_experts(2, 1)), targets=[r"blocks\.0\.mlp\.fc1$"])
        wrapper = "LoRAMoELinear"
    else:
        install_l2m(model, key_dim=32, pool_size=2, targets=[r"blocks\.0\.mlp\.fc1$"])
        wrapper = "PooledLoRALinear"
    before = {n: type(m) for n, m in model.named_modules()}
    occupied = r"cannot adapt 'net\.blocks\.0\.mlp\.fc1': it is no longer a plain nn\.Linear but a " + wrapper
    # by pattern, by a pattern that reaches the wrapped base layer, and by an explicit placement that also
    # names a free layer: nothing is replaced
    for targets in ([r"mlp\.fc1$"], ["fc1"], {"net.blocks.1.mlp.fc1": None, "net.blocks.0.mlp.fc1": None},
                    {"net.blocks.0.mlp.fc1.base": None}):
        with pytest.raises(RuntimeError, match=occupied + rf" \(injected by {first}\)"):
            inject_adapters(model, lambda n, layer, rows: _Scale(layer), targets, method="Scale")
        assert {n: type(m) for n, m in model.named_modules()} == before
    assert isinstance(model.net.blocks[1].mlp.fc1, nn.Linear)


def test_inject_refuses_a_hugging_face_peft_layer_by_its_type():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = _vit().net
    peft_model = get_peft_model(net, LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(RuntimeError, match=r"cannot adapt '.*blocks\.0\.mlp\.fc1': .*Hugging Face PEFT layer "
                                           r"\(peft\.tuners\.lora"):
        inject_lora_groups(peft_model, [r"mlp\.fc1$"])


def test_inject_checks_names_types_and_what_the_builder_returns():
    model = _vit()
    with pytest.raises(ValueError, match="has no module"):
        inject_adapters(model, lambda n, layer, rows: _Scale(layer), {"net.blocks.9.mlp.fc1": None}, method="x")
    with pytest.raises(TypeError, match="adapts nn.Linear layers"):
        inject_adapters(model, lambda n, layer, rows: _Scale(layer), {"net.blocks.0.mlp": None}, method="x")
    with pytest.raises(RuntimeError, match="does not hold that layer"):
        inject_adapters(model, lambda n, layer, rows: _Scale(nn.Linear(32, 128)), [r"fc1$"], method="x")

    def fails_on_the_second(name, layer, rows):
        if "blocks.1" in name:
            raise ValueError("cannot build")
        return _Scale(layer)

    with pytest.raises(ValueError, match="cannot build"):
        inject_adapters(model, fails_on_the_second, [r"fc1$"], method="x")
    assert not adapter_layers(model)  # every wrapper is built before any layer is replaced
    # fused-qkv rows reach the builder only when qkv_parts is given
    seen = {}

    def build(name, layer, rows):
        seen[name] = rows
        return _Scale(layer)

    inject_adapters(model, build, [r"attn\.qkv$", r"attn\.proj$"], method="x", qkv_parts="qv")
    assert seen["net.blocks.0.attn.qkv"] == [("q", 0, 32), ("v", 64, 96)] and seen["net.blocks.0.attn.proj"] is None
