"""A trained model leaves the plugin: merge_and_unload for LoRA / PEGO, adapter-only files for every method."""

from __future__ import annotations

import io
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from callbacks.l2m import L2M
from callbacks.lora import LoRA
from callbacks.loramoe import LoRAMoE
from callbacks.pego import PEGO
from cl_plugins.export import load_adapters, merge_and_unload, save_adapters
from cl_plugins.models import ContinualClassifier
from cl_plugins.peft.adapters import NotMergeableError, adapter_layers
from cl_plugins.peft.lora import LoRAGroupLinear
from datamodules.digits import SplitDigits, load_digits_tensors
from tests.conftest import quiet_trainer_kwargs

VIT_KW = dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2)
BERT_CFG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _vit(num_classes: int = 10, **kw) -> ContinualClassifier:
    torch.manual_seed(0)
    return ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=num_classes, in_channels=1,
                               input_shape=(1, 8, 8), backbone_kwargs={**VIT_KW, **kw})


def _bert() -> ContinualClassifier:
    torch.manual_seed(0)
    return ContinualClassifier("hf-config", num_classes=4, hf_config=BERT_CFG)


def _model(family: str) -> ContinualClassifier:
    return _vit() if family == "timm_vit" else _bert()


def _inputs(family: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if family == "timm_vit":
        return torch.randn(5, 1, 8, 8, generator=g)
    x = torch.randint(1, 40, (5, 9), generator=g)
    x[torch.arange(9)[None, :] >= torch.tensor([9, 7, 5, 9, 3])[:, None]] = 0  # padded
    return x


def _user_model(family: str) -> nn.Module:
    """The user's own, unmodified model class (what ContinualClassifier wraps)."""
    if family == "timm_vit":
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, in_chans=1, **VIT_KW)
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(**BERT_CFG, num_labels=4))


def _inner(model: ContinualClassifier, family: str) -> nn.Module:
    return model.net if family == "timm_vit" else model.net.model


def _user_forward(net: nn.Module, family: str, x: torch.Tensor) -> torch.Tensor:
    return net(x) if family == "timm_vit" else net(input_ids=x, attention_mask=(x != 0).long()).logits


def _perturb(model: nn.Module) -> None:
    """Moves every trainable tensor (the adapters and the head) and L2M's keys away from their init."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or name.endswith("pool.keys"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---------------------------------------------------------------------- merge_and_unload
@pytest.mark.parametrize("family", ["timm_vit", "bert"])
@pytest.mark.parametrize("method", ["LoRA", "PEGO", "PEGO-merged"])
def test_merge_and_unload_gives_the_original_keys_and_the_adapted_function(family, method):
    model = _model(family).double()  # float64: the merged function equals the adapted one to ~1e-15
    keys = list(model.state_dict())
    callback = LoRA() if method == "LoRA" else PEGO(num_loras=2)
    injected = list(callback.apply_to(model))
    _perturb(model)
    if method == "PEGO-merged":
        callback.merge(model)  # as merge_on_end leaves it: merging again must not add the update twice
    model.eval()
    x = _inputs(family)
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        adapted = model(x)
        before = _user_forward(_user_model(family).double().eval(), family, x)
    assert (adapted - before).abs().max() > 1e-2  # the adapters change the function

    assert merge_and_unload(model) is model
    assert list(model.state_dict()) == keys and not adapter_layers(model)
    with torch.no_grad():
        merged = model(x)
    torch.testing.assert_close(merged, adapted, rtol=1e-10, atol=1e-10 * float(adapted.abs().max()))
    # the weights load into the user's unmodified class, which then predicts the same
    user = _user_model(family).double().eval()
    user.load_state_dict(_inner(model, family).state_dict())
    with torch.no_grad():
        assert torch.equal(_user_forward(user, family, x), merged)
    # the injection is forgotten: the callback injects fresh adapters on the merged weights
    assert model.__dict__["_cl_injected"] == {}
    assert list(type(callback)().apply_to(model)) == injected


def test_pego_forward_hook_no_longer_runs_after_unload():
    model = _vit()
    pego = PEGO(num_loras=2)
    pego.setup(None, model, "fit")  # injects and hooks the first adapted layer
    _perturb(model)
    x = _inputs("timm_vit")
    pego.on_train_batch_start(None, model, None, 0)
    model(x)
    assert set(pego.aux.pop_means()) == {"pego/diversify_loss", "pego/preserve_loss"}
    merge_and_unload(model)
    assert not any(m._forward_hooks for m in model.modules())
    pego.on_train_batch_start(None, model, None, 0)
    model(x)
    assert pego.aux.pop_means() == {}


@pytest.mark.parametrize("method", ["LoRAMoE", "L2M"])
def test_loramoe_and_l2m_cannot_be_merged_and_the_model_is_left_as_it_was(method):
    model = _vit()
    LoRA(targets=[r"attn\.proj$"]).apply_to(model)  # a mergeable adapter beside it stays unmerged
    if method == "LoRAMoE":
        LoRAMoE(num_experts=2).setup(None, model, "fit")
        reason = "router weights the experts per token from the input"
    else:
        L2M(pool_size=3, query_dim=32).setup(None, model, "fit")
        reason = "selects its modulators from the pool"
    _perturb(model)
    model.eval()
    x = _inputs("timm_vit")
    with torch.no_grad():
        y = model(x)
    keys = list(model.state_dict())
    with pytest.raises(NotMergeableError, match=rf"cannot merge {method} .*{reason}.*save_adapters\(model"):
        merge_and_unload(model)
    assert list(model.state_dict()) == keys
    assert all(not m.merged for m in adapter_layers(model).values() if isinstance(m, LoRAGroupLinear))
    with torch.no_grad():
        assert torch.equal(model(x), y)  # L2M's query hooks still select
    with pytest.raises(ValueError, match="no adapter layers to merge"):
        merge_and_unload(_vit())


# ---------------------------------------------------------------------- adapter-only files
def _inject(model: nn.Module, method: str) -> None:
    if method == "LoRA":
        LoRA().apply_to(model)
    elif method.startswith("PEGO"):
        PEGO(num_loras=2).apply_to(model)
    elif method == "LoRAMoE":
        LoRAMoE(num_experts=4, per_expert_dropout=True).setup(None, model, "fit")
    else:
        kw = {"L2M": {}, "L2M-ia3": {"modulator": "ia3"}, "L2M-pooled": {"query": "pooled"}}[method]
        L2M(pool_size=4, query_dim=32, **kw).setup(None, model, "fit")


def _plain(value) -> bool:
    """Only tensors and plain Python types (what weights_only loading accepts)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool, torch.Tensor))


CASES = [("timm_vit", m) for m in ("LoRA", "PEGO", "PEGO-merged", "LoRAMoE", "L2M", "L2M-ia3", "L2M-pooled")] + [
    ("bert", m) for m in ("LoRA", "PEGO", "LoRAMoE", "L2M")]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_saved_adapters_rebuild_the_same_predictions_in_a_fresh_model(family, method, tmp_path):
    model = _model(family)
    _inject(model, method)
    _perturb(model)
    if method == "PEGO-merged":  # as PEGO leaves the model after the last experience
        for layer in adapter_layers(model).values():
            layer.merge()
    model.eval()
    x = _inputs(family)
    with torch.no_grad():
        y = model(x)
    path = tmp_path / "adapters.pt"
    save_adapters(model, path)

    payload = torch.load(path, weights_only=True)
    assert _plain(payload)
    head = "net.head" if family == "timm_vit" else "net.model.classifier"
    owners = (*adapter_layers(model), "l2m_pool", head)
    assert payload["head"] == head
    assert all(k.startswith(tuple(o + "." for o in owners)) and ".base." not in k for k in payload["state"])
    assert payload["methods"] == [method.split("-")[0]]

    fresh = _model(family).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), y)
    assert load_adapters(fresh, path) is fresh
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == trainable


def test_after_fit_the_adapters_leave_and_come_back_without_a_trainer(tmp_path):
    """The README's use: fit with the callback, save_adapters, later a fresh model + load_adapters; the same
    callback then trains on from the loaded adapters."""

    def fit(module: ContinualClassifier, lora: LoRA) -> None:
        trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[lora], limit_train_batches=2, limit_val_batches=0))
        trainer.fit(module, datamodule=SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=32))

    pl.seed_everything(0)
    module = _vit()
    fit(module, lora := LoRA())
    assert lora.is_merged(module)  # merged after the last experience; the file keeps the factors
    save_adapters(module, tmp_path / "adapters.pt")

    fresh = load_adapters(_vit(), tmp_path / "adapters.pt", method="LoRA")
    x = load_digits_tensors()[2][:16]
    module.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), module(x))
    b0 = fresh.net.blocks[0].attn.qkv.lora_B[0].detach().clone()
    fit(fresh, LoRA())  # no second injection: the loaded adapters are trained
    assert isinstance(fresh.net.blocks[0].attn.qkv, LoRAGroupLinear)
    assert not torch.equal(fresh.net.blocks[0].attn.qkv.lora_B[0], b0)


def test_load_refuses_other_architectures_methods_and_files_and_leaves_the_model_unchanged(tmp_path):
    model = _vit()
    PEGO(num_loras=2).apply_to(model)
    path = tmp_path / "pego.pt"
    save_adapters(model, path)
    cases = [
        (_vit(embed_dim=48), ValueError, "differ from the ones the adapters were trained on"),
        (_vit(depth=1), ValueError, r"lacks 1 of the 2 layers .* \(e\.g\. \['net\.blocks\.1\.attn\.qkv'\]\)"),
        (_vit().net, ValueError, "same kind of module"),
        (_vit(num_classes=5), ValueError, "same number of classes"),
    ]
    for target, error, message in cases:
        with pytest.raises(error, match=message):
            load_adapters(target, path)
        assert not adapter_layers(target)
    with pytest.raises(ValueError, match="holds PEGO adapters, not LoRAMoE"):
        load_adapters(_vit(), path, method="LoRAMoE")
    twice = load_adapters(_vit(), path)
    with pytest.raises(RuntimeError, match="load_adapters cannot adapt 'net.blocks.0.attn.qkv'.*freshly built model"):
        load_adapters(twice, path)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    with pytest.raises(ValueError, match="not an adapter file"):
        load_adapters(_vit(), tmp_path / "state.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not read an adapter file"):
        load_adapters(_vit(), tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_adapters(_vit(), tmp_path / "missing.pt")


def test_save_refuses_a_model_without_adapters_and_warns_about_other_trained_parameters():
    with pytest.raises(ValueError, match="no adapter layers to save"):
        save_adapters(_vit(), io.BytesIO())
    model = _vit()
    LoRA().apply_to(model)
    model.net.norm.weight.requires_grad_(True)  # e.g. trained by another callback
    with pytest.warns(UserWarning, match=r"1 other trainable parameter tensors \(e\.g\. \['net\.norm\.weight'\]\)"):
        save_adapters(model, io.BytesIO())
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    LoRA(targets=["0"], train_head=False).apply_to(mlp)
    with pytest.raises(ValueError, match="head=False"):
        save_adapters(mlp, io.BytesIO())
    buffer = io.BytesIO()
    save_adapters(mlp, buffer, head=False)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["head"] is None


def test_l2m_file_names_the_modules_its_query_hooks_sit_on(tmp_path: Path):
    model = _bert()
    L2M(pool_size=4, query_dim=32).setup(None, model, "fit")
    save_adapters(model, tmp_path / "l2m.pt")
    pool = torch.load(tmp_path / "l2m.pt", weights_only=True)["pools"]["l2m_pool"]
    assert pool["query"] == "embedding" and pool["root"] == ""
    assert pool["query_module"] == "net.model.bert.embeddings"
    assert pool["query_tap"] == "net.model.bert.embeddings.LayerNorm"  # before the embedding dropout
    assert pool["pad_token_id"] == 0 and pool["pool_size"] == 4 and pool["key_dim"] == 32
    fresh = load_adapters(_bert(), tmp_path / "l2m.pt")
    hooks = fresh.l2m_pool.query_hooks
    bert = fresh.net.model.bert
    assert hooks.root is fresh and hooks.query_module is bert.embeddings and hooks.pad_token_id == 0
    assert hooks.query_tap is bert.embeddings.LayerNorm  # in training too, the query is the same as at test
    model.l2m_pool.query_hooks.remove()
    with pytest.raises(ValueError, match="no query hooks installed"):
        save_adapters(model, tmp_path / "again.pt")
