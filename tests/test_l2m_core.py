"""L2M core math against hand-computed values: selection, key loss, count penalty, modulated layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cl_plugins.peft.l2m import (
    COUNT_EPS,
    ModulationPool,
    PooledIA3Linear,
    PooledLoRALinear,
    QueryHooks,
    find_query_module,
    find_query_tap,
    install_l2m,
    inverse_frequency,
    key_matching_loss,
    masked_token_mean,
    pooled_lora_delta,
    resolve_targets,
    select_entries,
    upstream_lora_fan_in,
)
from cl_plugins.peft.lora import inject_lora_groups
from tests.tolerances import FLOAT64_TOL, abs_magnitude, assert_close_accumulated


def _pool(keys: torch.Tensor, top_k: int = 1, weight: float = 0.5) -> ModulationPool:
    # upstream's key learning (the key loss through an optimizer); key_update="mean" is tested in test_l2m_keys.py
    pool = ModulationPool(pool_size=keys.shape[0], key_dim=keys.shape[1], top_k=top_k, key_loss_weight=weight,
                          key_update="gradient")
    with torch.no_grad():
        pool.keys.copy_(keys)
    return pool


def test_selection_picks_the_nearest_key_by_cosine_not_by_dot_product():
    # key 0 has the largest dot product with q but key 1 points the same way
    keys = torch.tensor([[10.0, 0.0], [0.5, 0.5], [-1.0, 0.0]])
    q = torch.tensor([[1.0, 1.0], [-2.0, 0.1]])
    idx, cos = select_entries(q, keys, top_k=1)
    assert idx.tolist() == [[1], [2]]
    # a cosine: normalize both (a few eps each) and a dot product of unit vectors (|terms| sum <= 1)
    assert_close_accumulated(cos[:, 0], torch.tensor([1.0, 2.0 / math.sqrt(4.01)], dtype=torch.float64), 4.0)
    idx2, cos2 = select_entries(q, keys, top_k=2)
    assert idx2.tolist() == [[1, 0], [2, 1]]
    assert_close_accumulated(cos2[0], torch.tensor([1.0, 1 / math.sqrt(2)], dtype=torch.float64), 4.0)


def test_key_matching_loss_value_and_one_sgd_step_pulls_keys_toward_queries():
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    q = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 2.0, 1.0]])
    pool = _pool(keys, weight=0.5)
    pool.train()
    pool.select(q)
    # hand: sample 0 -> key 0 or 1 (tie at 1/sqrt2, topk keeps the first), 1 -> key 1, 2 -> key 1
    cos = torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2), 2 / math.sqrt(5)], dtype=torch.float64)
    expected = 0.5 * (1 - cos).mean()
    assert_close_accumulated(pool.last_key_loss, expected, 4.0)  # a mean of 1 - cos, each cosine as above
    before = key_matching_loss(select_entries(q, pool.keys.detach(), 1)[1]).item()
    opt = torch.optim.SGD([pool.keys], lr=0.5)
    pool.last_key_loss.backward()
    opt.step()
    after = key_matching_loss(select_entries(q, pool.keys.detach(), 1)[1]).item()
    assert after < before - 1e-3


def test_count_penalty_steers_training_selection_only():
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    pool = _pool(keys)
    q = torch.tensor([[1.0, 0.1]])
    counts = torch.tensor([3, 1, 0])
    # hand: freq = [0.75, 0.25, 0], inv = 1 / (freq + eps), normalised
    inv = torch.tensor([1 / (0.75 + COUNT_EPS), 1 / (0.25 + COUNT_EPS), 1 / COUNT_EPS], dtype=torch.float64)
    # a float32 sum of 3 positive terms and a division: a few eps of each normalised entry
    assert_close_accumulated(inverse_frequency(counts), inv / inv.sum(), 4 * inv / inv.sum())
    pool.train()
    assert pool.select(q).tolist() == [[0]]  # uniform penalty = plain cosine ranking
    pool.set_count_penalty(counts)
    assert pool.select(q).tolist() == [[2]]  # the unused key wins in training
    pool.eval()
    assert pool.select(q).tolist() == [[0]]  # test time: plain cosine, no penalty, no task id
    assert pool.last_key_loss is not None and pool.state.pending_loss is None  # no loss in eval
    pool.train()
    pool.set_count_penalty(None)
    assert pool.select(q).tolist() == [[0]]


def test_training_selections_are_counted_and_popped():
    pool = _pool(torch.eye(3))
    pool.train()
    pool.select(torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 0, 2.0]]))
    pool.select(torch.tensor([[0, 1.0, 0]]))
    assert pool.pop_counts().tolist() == [1, 1, 2]
    assert pool.pop_counts().tolist() == [0, 0, 0]
    pool.eval()
    pool.select(torch.tensor([[1.0, 0, 0]]))
    assert pool.pop_counts().tolist() == [0, 0, 0]


def _lora_layer(pool, d_in=5, d_out=6, rank=2, out_index=None, seed=0):
    torch.manual_seed(seed)
    layer = PooledLoRALinear(nn.Linear(d_in, d_out), pool, rank=rank, alpha=3.0, out_index=out_index, name="l")
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _pooled_lora_reference(layer: PooledLoRALinear, x: torch.Tensor, entries: list[int]):
    """``x W^T + b`` with ``W = W0 + s * mean_{i in entries} B_i A_i`` in float64, and the same on absolute values:
    the magnitude of the terms the layer sums."""
    def f(x_, w0, b0, lora_b, lora_a):
        update = sum(lora_b[i] @ lora_a[i] for i in entries) * layer.scaling / len(entries)
        return x_ @ (w0 + update).t() + b0

    args = (x, layer.base.weight, layer.base.bias, layer.lora_B, layer.lora_A)
    return f(*[a.detach().double() for a in args]), abs_magnitude(f, *args)


def test_lora_layer_mixed_selection_in_one_batch_matches_per_sample_hand_computation():
    pool = _pool(torch.randn(3, 4))
    layer = _lora_layer(pool)
    x = torch.randn(4, 7, 5)  # 4 samples of 7 tokens
    pool.state.idx = torch.tensor([[0], [2], [1], [2]])
    out = layer(x)
    assert layer.scaling == 3.0 / 2
    for b, i in enumerate([0, 2, 1, 2]):
        assert_close_accumulated(out[b], *_pooled_lora_reference(layer, x[b], [i]))
    # top-2: the mean of the two selected updates
    pool.state.idx = torch.tensor([[0, 1], [2, 0], [1, 1], [2, 1]])
    out2 = layer(x)
    for b, (i, j) in enumerate([(0, 1), (2, 0), (1, 1), (2, 1)]):
        assert_close_accumulated(out2[b], *_pooled_lora_reference(layer, x[b], [i, j]))
    # 2-D inputs (no token axis) too
    x2 = torch.randn(4, 5)
    pool.state.idx = torch.tensor([[1], [1], [0], [2]])
    out3 = layer(x2)
    for b, i in enumerate([1, 1, 0, 2]):
        assert_close_accumulated(out3[b], *_pooled_lora_reference(layer, x2[b], [i]))


def test_lora_on_fused_qkv_touches_only_the_q_and_v_slices():
    pool = _pool(torch.randn(2, 4))
    index = torch.cat([torch.arange(0, 4), torch.arange(8, 12)])  # q and v of a 3 x 4 output
    layer = _lora_layer(pool, d_in=4, d_out=12, out_index=index)
    assert layer.lora_B.shape == (2, 8, 2)
    x = torch.randn(3, 2, 4)
    pool.state.idx = torch.tensor([[1], [0], [1]])
    out, base = layer(x), layer.base(x)
    assert torch.equal(out[..., 4:8], base[..., 4:8])  # k untouched
    for b, i in enumerate([1, 0, 1]):
        def f(x_, w0, b0, lora_b, lora_a, i=i):
            return (x_ @ w0.t() + b0)[..., index] + 1.5 * x_ @ (lora_b[i] @ lora_a[i]).t()

        args = (x[b], layer.base.weight, layer.base.bias, layer.lora_B, layer.lora_A)
        assert_close_accumulated(out[b][..., index], f(*[a.detach().double() for a in args]), abs_magnitude(f, *args))


def test_lora_starts_at_the_base_layer_and_only_selected_entries_get_gradient():
    pool = _pool(torch.randn(4, 3))
    torch.manual_seed(0)
    layer = PooledLoRALinear(nn.Linear(5, 6), pool, rank=2, name="l")
    layer.base.requires_grad_(False)
    x = torch.randn(3, 5)
    pool.state.idx = torch.tensor([[0], [2], [0]])
    torch.testing.assert_close(layer(x), layer.base(x))  # B = 0
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(x).pow(2).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    for entry in (1, 3):  # unselected: present (for DDP) but exactly zero
        assert torch.count_nonzero(layer.lora_A.grad[entry]) == 0
        assert torch.count_nonzero(layer.lora_B.grad[entry]) == 0
    for entry in (0, 2):
        assert torch.count_nonzero(layer.lora_A.grad[entry]) > 0


def test_pooled_lora_delta_rejects_a_selection_for_another_batch():
    with pytest.raises(ValueError, match="selection for 2 samples"):
        pooled_lora_delta(torch.randn(3, 4), torch.randn(2, 1, 4), torch.randn(2, 5, 1), torch.zeros(2, 1).long(), 1.0)


def test_ia3_output_and_input_scaling_match_hand_computation():
    pool = _pool(torch.randn(3, 4), top_k=2)
    torch.manual_seed(0)
    kv = torch.arange(4, 12)  # k and v of a fused 3 x 4 output
    out_layer = PooledIA3Linear(nn.Linear(4, 12), pool, side="output", index=kv, name="qkv")
    in_layer = PooledIA3Linear(nn.Linear(6, 4), pool, side="input", name="fc2")
    torch.testing.assert_close(out_layer.scale, torch.ones(3, 8))  # identity at init
    with torch.no_grad():
        out_layer.scale.uniform_(0.5, 1.5)
        in_layer.scale.uniform_(0.5, 1.5)
    x, h = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    pool.state.idx = torch.tensor([[0, 2], [1, 1]])
    y, z = out_layer(x), in_layer(h)
    for b, (i, j) in enumerate([(0, 2), (1, 1)]):
        # references in float64, magnitudes: the same on absolute values
        def out_ref(x_, w0, b0, scale, i=i, j=j):
            full = torch.ones(12, dtype=x_.dtype)
            full[4:] = (scale[i] + scale[j]) / 2
            return (x_ @ w0.t() + b0) * full

        def in_ref(h_, w0, b0, scale, i=i, j=j):
            return (h_ * (scale[i] + scale[j]) / 2) @ w0.t() + b0

        for got, ref, layer, inp in ((y[b], out_ref, out_layer, x[b]), (z[b], in_ref, in_layer, h[b])):
            args = (inp, layer.base.weight, layer.base.bias, layer.scale)
            assert_close_accumulated(got, ref(*[a.detach().double() for a in args]), abs_magnitude(ref, *args))


def test_masked_token_mean_skips_padding():
    emb = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(masked_token_mean(emb, mask), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(masked_token_mean(emb), emb.mean(1))
    torch.testing.assert_close(masked_token_mean(emb.view(1, 3, 1, 2)), emb.mean(1))  # (B, H, W, D)


def _tiny_vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, in_chans=1, img_size=8,
                             patch_size=4, embed_dim=16, depth=1, num_heads=2)


@pytest.mark.parametrize("modulator", ["lora", "ia3"])
def test_selection_is_per_sample_and_depends_only_on_x(modulator):
    """No task id anywhere: a sample's output is the same alone or in any batch, and each sample uses its own
    entry (batches mix entries)."""
    model = _tiny_vit()
    model.requires_grad_(False)
    reference = _tiny_vit()
    pool, placement = install_l2m(model, key_dim=16, modulator=modulator, pool_size=4, exclude=["head"])
    if modulator == "lora":
        assert placement.output == {"blocks.0.attn.qkv": "qv", "blocks.0.mlp.fc1": None}
    else:
        assert placement.output == {"blocks.0.attn.qkv": "kv"} and placement.input == ["blocks.0.mlp.fc2"]
    _, qmod = find_query_module(model, None, placement.preset)
    QueryHooks(pool, model, "embedding", qmod).install()
    # in float64: batching, the query pass and the modulated layers change only the order of float64 sums (the
    # selection casts the query to float32: the same float32 query, alone or batched)
    model.double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    model.eval()
    torch.testing.assert_close(model(x), reference.double().eval()(x), **FLOAT64_TOL)  # starts at the pretrained model
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p is not pool.keys:
                p.add_(0.3 * torch.randn_like(p))
        pool.keys.copy_(torch.randn(4, 16, dtype=torch.float64) * 0.05 + pool.keys)
        chosen = []
        hook = model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: chosen.append(pool.state.idx.clone()))
        batched = model(x)
        hook.remove()
        alone = torch.cat([model(x[i: i + 1]) for i in range(6)])
        reversed_ = model(x.flip(0)).flip(0)
    torch.testing.assert_close(batched, alone, **FLOAT64_TOL)
    torch.testing.assert_close(batched, reversed_, **FLOAT64_TOL)
    assert len(set(chosen[0].flatten().tolist())) > 1, "expected a batch that mixes pool entries"
    assert pool.state.idx is None  # cleared after the forward


def test_resolve_targets_errors_are_explicit():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="pass targets="):
        resolve_targets(mlp, "lora")
    with pytest.raises(ValueError, match="input_targets apply to"):
        resolve_targets(mlp, "lora", targets=["0"], input_targets=["2"])
    with pytest.raises(ValueError, match="match no linear layer"):
        resolve_targets(mlp, "lora", targets=["nope"])
    with pytest.raises(ValueError, match="modulator must be"):
        resolve_targets(mlp, "prefix")
    with pytest.raises(ValueError, match="qkv_parts"):
        resolve_targets(_tiny_vit(), "lora", qkv_parts="qx")
    with pytest.raises(ValueError, match="found no embedding layer"):
        find_query_module(mlp, None, None)


def test_a_deep_copy_of_a_modulated_model_has_its_own_pool_and_hooks():
    import copy

    model = _tiny_vit()
    model.requires_grad_(False)
    pool, placement = install_l2m(model, key_dim=16, pool_size=3, exclude=["head"])
    QueryHooks(pool, model, "embedding", find_query_module(model, None, placement.preset)[1]).install()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.lora_B.normal_()
    twin = copy.deepcopy(model).eval()
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
        assert twin.blocks[0].mlp.fc1.pool[0] is twin.l2m_pool and twin.l2m_pool is not pool
        twin.blocks[0].mlp.fc1.lora_B.add_(1.0)
        assert not torch.allclose(twin(x), model(x))


def test_eval_selections_are_counted_apart_from_training_ones():
    pool = _pool(torch.eye(3))
    pool.eval()
    pool.select(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    pool.select(torch.tensor([[0, 0, 3.0]]))
    assert pool.pop_counts().tolist() == [0, 0, 0]
    assert pool.pop_eval_counts().tolist() == [1, 0, 2]
    assert pool.pop_eval_counts().tolist() == [0, 0, 0]
    pool.train()
    pool.select(torch.tensor([[0, 1.0, 0]]))
    assert pool.pop_eval_counts().tolist() == [0, 0, 0] and pool.pop_counts().tolist() == [0, 1, 0]


def _bert(dropout: float = 0.1, layers: int = 2, hidden: int = 32):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=4 * hidden, hidden_dropout_prob=dropout))


def _upstream_a_bound(pool_size: int, n_layer: int, embed_dim: int, rank: int, length: int = 6) -> float:
    """Upstream's bound: one kaiming_uniform_(a=sqrt(5)) on A of shape (M, n_layer, length, embed_dim, rank)."""
    t = torch.empty(pool_size, n_layer, length, embed_dim, rank)
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(t)
    assert fan_in == n_layer * length * embed_dim * rank
    return 1.0 / math.sqrt(fan_in)  # gain(a=sqrt(5)) * sqrt(3 / fan_in)


def test_lora_a_init_follows_upstreams_pooled_fan_in_by_default_and_linear_on_request():
    # MiniLM-L6 shape (6 layers, d 384, FF 1536), rank 8, q + v + FF: upstream's bound is 17x below 1/sqrt(d)
    with torch.device("meta"):
        minilm = _bert(layers=6, hidden=384)
    placement = resolve_targets(minilm, "lora")
    assert upstream_lora_fan_in(minilm, placement, rank=8) == 6 * 6 * 384 * 8
    ratio = _upstream_a_bound(30, 6, 384, 8) * math.sqrt(384)
    assert ratio == pytest.approx(1 / math.sqrt(288)) and 1 / ratio == pytest.approx(16.97, abs=0.01)

    bert = _bert()
    bert.requires_grad_(False)
    install_l2m(bert, key_dim=32, pool_size=5, rank=4)
    bound = _upstream_a_bound(5, 2, 32, 4)
    for name in ("attention.self.query", "attention.self.value", "intermediate.dense"):
        a = bert.encoder.layer[1].get_submodule(name).lora_A
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound, name
    vit = _tiny_vit()  # 1 block, d 16: qkv on q and v (2 slots) + fc1 (4 slots)
    install_l2m(vit, key_dim=16, pool_size=3, rank=2, exclude=["head"])
    a = vit.blocks[0].attn.qkv.lora_A
    assert a.abs().max() <= _upstream_a_bound(3, 1, 16, 2) and a.abs().max() > 0.9 * _upstream_a_bound(3, 1, 16, 2)

    linear = _bert()
    install_l2m(linear, key_dim=32, pool_size=5, rank=4, lora_init="linear")
    a = linear.encoder.layer[0].intermediate.dense.lora_A
    assert a.abs().max() <= 1 / math.sqrt(32) and a.abs().max() > 0.9 / math.sqrt(32)
    with pytest.raises(ValueError, match="lora_init must be"):
        install_l2m(_bert(), key_dim=32, lora_init="kaiming")


def test_query_tap_is_the_embedding_before_dropout():
    assert find_query_module(_bert(), None, "bert")[0] == "embeddings"
    bert = _bert(dropout=0.1)
    assert find_query_tap(bert, "embeddings", bert.embeddings)[0] == "embeddings.LayerNorm"
    no_drop = _bert(dropout=0.0)
    assert find_query_tap(no_drop, "embeddings", no_drop.embeddings)[0] == "embeddings"
    vit = _tiny_vit()
    assert find_query_tap(vit, "patch_embed", vit.patch_embed)[0] == "patch_embed"
    assert find_query_tap(bert, "embeddings", bert.embeddings, "embeddings.word_embeddings")[0] == (
        "embeddings.word_embeddings")
    with pytest.raises(ValueError, match="must be the query module"):
        find_query_tap(bert, "embeddings", bert.embeddings, "encoder")
    with pytest.raises(ValueError, match="is not a module"):
        find_query_tap(bert, "embeddings", bert.embeddings, "nope")
    model = nn.Sequential()
    model.add_module("embed", nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2)))
    with pytest.raises(ValueError, match=r"contains dropout \(\['embed.1'\]\).*query_tap="):
        find_query_tap(model, "embed", model.embed)
    assert find_query_tap(model, "embed", model.embed, "embed.0")[0] == "embed.0"


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.unused = nn.LayerNorm(4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.tok(ids))


def test_query_hooks_mask_padding_from_the_query_modules_ids_and_reject_a_tap_that_never_runs():
    torch.manual_seed(0)
    model = nn.Sequential(_Embed(), nn.Linear(4, 3))
    pool = _pool(torch.randn(3, 4))
    hooks = QueryHooks(pool, model, "embedding", model[0], pad_token_id=0, query_tap=model[0].LayerNorm).install()
    seen = []
    original = pool.select
    pool.select = lambda q: (seen.append(q), original(q))[1]
    ids = torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0]])
    model(ids)
    emb = model[0](ids).detach()
    # means of at most 2 LayerNorm outputs of size <= 2 (4 features)
    assert_close_accumulated(seen[0], torch.stack([emb[0, :2].double().mean(0), emb[1, 0].double()]), 2 * 2.0)
    hooks.remove()
    QueryHooks(pool, model, "embedding", model[0], query_tap=model[0].unused).install()
    with pytest.raises(RuntimeError, match="query tap .* did not run inside the query module"):
        model(ids)
    with pytest.raises(ValueError, match="query_tap must be the query module or one of its submodules"):
        QueryHooks(pool, model, "embedding", model[0], query_tap=model[1])


def test_l2m_refuses_layers_another_adapter_already_wraps():
    vit = _tiny_vit()
    inject_lora_groups(vit, [r"attn\.qkv$"], qkv_parts="qv")
    # default placement: finds the LoRA wrapper at blocks.0.attn.qkv
    with pytest.raises(RuntimeError, match=r"L2M cannot adapt 'blocks.0.attn.qkv'.*LoRAGroupLinear"):
        install_l2m(vit, key_dim=16, pool_size=3, exclude=["head"])
    assert not hasattr(vit, "l2m_pool")
    # a user pattern that matches the wrapper's inner base layer
    with pytest.raises(RuntimeError, match=r"L2M cannot adapt 'blocks.0.attn.qkv'"):
        resolve_targets(vit, "lora", targets=[r"attn\.qkv"])
    # an explicit placement is checked too
    with pytest.raises(RuntimeError, match=r"L2M cannot adapt 'blocks.0.attn.qkv'"):
        install_l2m(vit, key_dim=16, placement=resolve_targets(_tiny_vit(), "lora", exclude=["head"]))
    # disjoint layers are fine
    pool, placement = install_l2m(vit, key_dim=16, pool_size=3, targets=[r"mlp\.fc1$"])
    assert list(placement.output) == ["blocks.0.mlp.fc1"]
    # and LoRA then refuses the layer L2M wraps
    with pytest.raises(RuntimeError, match=r"cannot adapt 'blocks.0.mlp.fc1'.*PooledLoRALinear"):
        inject_lora_groups(vit, [r"mlp\.fc1$"])
