"""L2M callback with a Trainer: tiny timm ViT on Split-Digits, tiny BERT on a token stream, bf16, resume, DDP."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.base import ContinualCallback
from callbacks.l2m import L2M
from callbacks.lora import LoRA
from cl_plugins.models import ContinualClassifier
from datamodules.common import split_benchmark
from datamodules.digits import SplitDigits
from datamodules.stream import ContinualDataModule
from tests._subprocess import run_script
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StepLosses, StopAfter, assert_losses_track_float32
from tests.tolerances import FLOAT64_TOL, assert_close_accumulated

VIT_KW = dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2)
BERT_CFG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
INJECTED = ("l2m_pool.", ".lora_A", ".lora_B", ".scale")


def _vit(lr: float = 3e-3) -> ContinualClassifier:
    return ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                               backbone_kwargs=VIT_KW, optimizer="adam", lr=lr)


def _token_stream(epochs: int = 1, n: int = 160, length: int = 12) -> ContinualDataModule:
    """4 classes of random token ids (class c draws from its own id range), variable length, 0-padded."""
    g = torch.Generator().manual_seed(0)

    def make(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(m) % 4
        x = 2 + 9 * y[:, None] + torch.randint(0, 9, (m, length), generator=g)
        lengths = torch.randint(4, length + 1, (m,), generator=g)
        x[torch.arange(length)[None, :] >= lengths[:, None]] = 0
        return x, y

    (tx, ty), (vx, vy) = make(n), make(n // 4)
    bm = split_benchmark(tx, ty, vx, vy, n_experiences=2, class_order=[0, 1, 2, 3])
    return ContinualDataModule(benchmark=bm, epochs_per_experience=epochs, batch_size=16)


def _frozen_unchanged(before: dict[str, torch.Tensor], model: torch.nn.Module, head: str) -> list[str]:
    """Names of backbone parameters (outside the pool and the head) that changed."""
    changed = []
    for name, p in model.named_parameters():
        if any(k in name for k in INJECTED) or name.startswith(head):
            continue
        original = name.replace(".base.", ".")
        if not torch.equal(before[original], p.detach()):
            changed.append(name)
    return changed


def test_vit_lora_trains_only_the_pool_and_head_and_new_experiences_take_fresh_keys():
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    model = _vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    l2m = L2M(pool_size=10)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[l2m]))
    trainer.fit(model, datamodule=dm)

    assert _frozen_unchanged(before, model, "net.head.") == []
    assert not torch.equal(before["net.head.weight"], model.net.head.weight)
    qkv = model.net.blocks[0].attn.qkv
    assert qkv.lora_B.shape == (10, 64, 8) and model.net.blocks[0].mlp.fc1.lora_B.shape == (10, 128, 8)
    used = [e for e in range(10) if l2m.key_histograms[0][e] > 0]
    assert all(qkv.lora_B[e].abs().sum() > 0 for e in used)
    # the pool is saved once, not once per modulated layer; its keys (key_update="mean") are a buffer
    assert [n for n in model.state_dict() if n.endswith("l2m_pool.keys")] == ["l2m_pool.keys"]
    assert not any("l2m_pool" in n for n in l2m.injected_parameter_names)

    hist = l2m.key_histograms
    assert sorted(hist) == [0, 1, 2, 3, 4]
    for e, counts in hist.items():
        assert sum(counts) == dm.experience_info(e).num_train_samples
    keys0 = {i for i, c in enumerate(hist[0]) if c}
    keys1 = {i for i, c in enumerate(hist[1]) if c}
    assert keys0.isdisjoint(keys1), "the count penalty should give experience 1 keys unused by experience 0"
    fr = l2m.key_fractions[4]
    assert trainer.callback_metrics["l2m/key3_frac"].item() == pytest.approx(fr[3])
    assert "l2m/key_loss_epoch" in trainer.callback_metrics
    assert not torch.allclose(model.l2m_pool.inv_freq, torch.full((10,), 0.1))


def test_pooled_query_is_the_frozen_models_pooled_features_at_one_extra_forward():
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, experience=0)
    model = _vit()
    l2m = L2M(pool_size=4, query="pooled", modulator="ia3")
    calls = []
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[l2m], limit_train_batches=3, limit_val_batches=1))
    trainer.fit(model, datamodule=dm)
    x = dm.train_dataset(0)[0][0][None].repeat(3, 1, 1, 1) + 0.1 * torch.randn(3, 1, 8, 8)
    pool = model.l2m_pool
    query = l2m.hooks.pooled_query((x,), {})
    pool.state.enabled = False
    with torch.no_grad():
        expected = model.net.forward_head(model.net.forward_features(x), pre_logits=True)
    pool.state.enabled = True
    torch.testing.assert_close(query, expected)
    # cost: the embedding layer runs twice per forward (query pass + modulated pass)
    handle = model.net.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    model(x).sum().backward()
    handle.remove()
    assert len(calls) == 2
    assert model.net.blocks[0].mlp.fc2.scale.grad is not None


@pytest.mark.parametrize("modulator", ["lora", "ia3"])
def test_bert_on_a_token_stream_with_padding_masked_out_of_the_query(modulator):
    pl.seed_everything(0)
    dm = _token_stream()
    model = ContinualClassifier("hf-config", num_classes=4, hf_config=BERT_CFG, optimizer="adam", lr=3e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    l2m = L2M(pool_size=6, modulator=modulator)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[l2m]))
    trainer.fit(model, datamodule=dm)
    layer = model.net.model.bert.encoder.layer[0]
    if modulator == "lora":
        assert type(layer.attention.self.query).__name__ == "PooledLoRALinear"
        assert type(layer.intermediate.dense).__name__ == "PooledLoRALinear"
        assert type(layer.attention.self.key).__name__ == "Linear"
    else:
        assert type(layer.attention.self.key).__name__ == "PooledIA3Linear"
        assert layer.output.dense.side == "input" and type(layer.attention.output.dense).__name__ == "Linear"
    assert _frozen_unchanged(before, model, "net.model.classifier.") == []
    assert sorted(l2m.key_histograms) == [0, 1]
    # evaluation selections, per test experience, of the last validation pass (after experience 1)
    val = l2m.eval_key_histograms["validate"]
    assert {j: sum(c) for j, c in val.items()} == {j: len(dm.test_dataset(j)) for j in range(2)}
    for j in range(2):
        used = [c > 0 for c in l2m.key_histograms[j]]
        match = sum(c for c, u in zip(val[j], used) if u) / sum(val[j])
        assert trainer.callback_metrics[f"l2m/val_key_match_exp{j}"].item() == pytest.approx(match)
    trainer.test(model, datamodule=dm)
    assert l2m.eval_key_histograms["test"] == val  # same model, same test sets
    assert "l2m/test_key_match_exp1" in trainer.callback_metrics
    assert l2m.state_dict()["eval_key_counts"]["validate"] == val
    # padding does not change the query, hence neither the selection nor the output (in float64: attention over
    # 6 or 11 positions sums in another order, which float64 keeps far below the tolerance on any CPU)
    ids = torch.tensor([[5, 7, 9, 3, 0, 0]])
    longer = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    model.eval().double()
    with torch.no_grad():
        a, b = model(ids), model(longer)
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b, **FLOAT64_TOL)


def test_bert_query_is_the_embedding_before_dropout_so_training_forwards_and_eval_agree():
    """BertEmbeddings ends in dropout (p=0.1): the query is its LayerNorm output, the same in every training
    forward of a batch and at test time (upstream takes the embeddings before the embedding dropout)."""
    pl.seed_everything(0)
    model = ContinualClassifier("hf-config", num_classes=4, hf_config=dict(BERT_CFG, hidden_dropout_prob=0.1))
    embeddings = model.net.model.bert.embeddings
    assert embeddings.dropout.p == 0.1
    l2m = L2M(pool_size=8, query_dim=32)
    l2m.setup(None, model, "fit")  # injects (query_dim given: no probe forward, no trainer needed)
    pool = model.l2m_pool
    queries, chosen = [], []
    original = pool.select

    def select(query: torch.Tensor) -> torch.Tensor:
        idx = original(query)
        queries.append(query.detach().clone())
        chosen.append(idx.clone())
        return idx

    pool.select = select
    ids = torch.randint(1, 40, (16, 10), generator=torch.Generator().manual_seed(1))
    ids[:8, 6:] = 0  # padded
    model.train()
    for _ in range(2):
        model(ids).sum().backward()
    model.eval()
    with torch.no_grad():
        model(ids)
    del pool.select
    assert len(queries) == 3
    with torch.no_grad():
        emb = embeddings(input_ids=ids)  # eval: no dropout
    torch.testing.assert_close(queries[0], queries[1], rtol=0, atol=0)
    # the masked mean of at most 10 LayerNorm outputs: both routes round sums of their absolute values (each
    # LayerNorm output to a few eps of itself), whatever the order
    mask = (ids != 0).unsqueeze(-1).float()
    magnitude = (emb.abs() * mask).sum(1) / mask.sum(1)
    assert_close_accumulated(queries[0], queries[2], magnitude)
    assert torch.equal(chosen[0], chosen[1]) and torch.equal(chosen[0], chosen[2])
    assert_close_accumulated(queries[2], (emb.double() * mask).sum(1) / mask.sum(1), magnitude)
    # the two training forwards fed the key update (key_update="mean"), the eval forward did not
    assert torch.equal(pool.pop_counts(), 2 * torch.bincount(chosen[0].flatten(), minlength=8))
    assert pool.pop_key_sums().abs().sum() > 0


def test_two_adapters_on_one_layer_are_refused_in_either_order():
    model = _vit()
    LoRA().apply_to(model)  # attention projections, incl. net.blocks.N.attn.qkv
    with pytest.raises(RuntimeError, match=r"L2M cannot adapt 'net.blocks.0.attn.qkv'.*LoRAGroupLinear"):
        L2M(pool_size=4, query_dim=32).setup(None, model, "fit")
    model = _vit()
    L2M(pool_size=4, query_dim=32).setup(None, model, "fit")  # attn.qkv and mlp.fc1
    with pytest.raises(RuntimeError, match=r"LoRA cannot adapt 'net.blocks.0.attn.qkv'.*PooledLoRALinear"):
        LoRA().apply_to(model)
    LoRA(targets=[r"attn\.proj$"]).apply_to(model)  # disjoint layers: fine


def _fit_experience_0(precision: str, callbacks: list) -> tuple[pl.Trainer, ContinualClassifier, StepLosses]:
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, experience=0)
    model = _vit()
    losses = StepLosses(stop=precision == "32-true")  # the 32-true reference: its first steps only
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[*callbacks, losses], precision=precision,
                                                limit_val_batches=1))
    trainer.fit(model, datamodule=dm)
    return trainer, model, losses


def test_bf16_mixed_trains_with_float32_selection():
    keys0 = None

    class Snapshot(ContinualCallback):
        def on_train_start(self, trainer, pl_module):
            nonlocal keys0
            keys0 = pl_module.l2m_pool.keys.detach().clone()

    trainer, model, losses = _fit_experience_0("bf16-mixed", [L2M(pool_size=4), Snapshot()])
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert_losses_track_float32(losses.losses, _fit_experience_0("32-true", [L2M(pool_size=4)])[2].losses)
    assert model.l2m_pool.last_key_loss.dtype == torch.float32
    assert not torch.equal(keys0, model.l2m_pool.keys)
    assert model.net.blocks[1].mlp.fc1.lora_B.abs().sum() > 0


def test_one_fit_per_experience_reuses_the_injection_and_the_counts():
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, experience=0)
    model = _vit()
    l2m = L2M(pool_size=6)
    for exp in (0, 1):
        dm.set_experience(exp)
        trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[l2m], limit_val_batches=1))
        trainer.fit(model, datamodule=dm)
    assert sorted(l2m.key_histograms) == [0, 1]
    keys0 = {i for i, c in enumerate(l2m.key_histograms[0]) if c}
    keys1 = {i for i, c in enumerate(l2m.key_histograms[1]) if c}
    assert keys0.isdisjoint(keys1)
    assert sum(1 for n, _ in model.named_modules() if n.endswith("l2m_pool")) == 1



def _run(tmp: Path, stop_after: int | None = None, ckpt_path: str | None = None):
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=2, epochs_per_experience=2, batch_size=32)
    model = _vit()
    l2m = L2M(pool_size=5)
    callbacks = [l2m, ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp,
                                                limit_val_batches=1))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, l2m


def test_resume_mid_stream_restores_pool_keys_modulators_and_counts_exactly(tmp_path):
    _, model_u, l2m_u = _run(tmp_path / "full")
    _run(tmp_path / "stopped", stop_after=0)
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=1.ckpt"
    assert ckpt.exists()
    trainer_b, model_b, l2m_b = _run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert trainer_b.current_epoch == 4
    assert l2m_b.key_histograms == l2m_u.key_histograms
    state_u, state_b = model_u.state_dict(), model_b.state_dict()
    assert state_u.keys() == state_b.keys() and "l2m_pool.inv_freq" in state_u
    for name, value in state_u.items():
        torch.testing.assert_close(state_b[name], value, rtol=0, atol=0, msg=name)


def test_constructor_and_placement_errors_are_explicit():
    with pytest.raises(ValueError, match="modulator must be"):
        L2M(modulator="prefix")
    with pytest.raises(ValueError, match="query must be"):
        L2M(query="cls")
    with pytest.raises(ValueError, match="top_k"):
        L2M(pool_size=2, top_k=3)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, experience=0)
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"hidden": 16})
    with pytest.raises(ValueError, match="pass targets="):
        pl.Trainer(**quiet_trainer_kwargs(callbacks=[L2M()])).fit(model, datamodule=dm)
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"hidden": 16})
    with pytest.raises(ValueError, match="found no embedding layer"):
        pl.Trainer(**quiet_trainer_kwargs(callbacks=[L2M(targets=["body"])])).fit(model, datamodule=dm)


DDP_SCRIPT = """
import json, os
import lightning.pytorch as pl
import torch
from callbacks.base import ContinualCallback
from callbacks.l2m import L2M
from cl_plugins.models import ContinualClassifier
from datamodules.digits import SplitDigits

class Gather(ContinualCallback):
    def on_validation_epoch_start(self, trainer, pl_module):
        self.seen = torch.zeros(2, dtype=torch.long)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen[dataloader_idx] += len(batch[1])

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for n, p in pl_module.named_parameters() if p.requires_grad])
        self.sums = trainer.strategy.all_gather(torch.stack([flat.sum(), flat.abs().sum()])).tolist()
        self.val_seen = trainer.strategy.reduce(self.seen, reduce_op="sum").tolist()

if __name__ == "__main__":
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=16)
    model = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                                backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2),
                                optimizer="adam", lr=3e-3)
    l2m, gather = L2M(pool_size=8), Gather()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[l2m, gather], limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    if trainer.global_rank == 0:
        sizes = [dm.experience_info(e).num_train_samples for e in range(2)]
        with open(os.environ["RESULT_PATH"], "w") as f:
            json.dump({"hist": l2m.key_histograms, "sizes": sizes, "sums": gather.sums,
                       "inv_freq": model.l2m_pool.inv_freq.tolist(), "val_seen": gather.val_seen,
                       "eval_hist": l2m.eval_key_histograms["validate"]}, f)
"""


@pytest.mark.slow
def test_ddp_plain_strategy_without_find_unused_parameters(tmp_path):
    res = run_script(DDP_SCRIPT, tmp_path, timeout=300)
    ranks = res["sums"]
    assert len(ranks) == 2 and ranks[0] == pytest.approx(ranks[1], rel=0, abs=0)  # identical replicas
    for e, size in enumerate(res["sizes"]):
        # DistributedSampler pads each rank to ceil(n / 2): the counts are summed over both ranks
        assert sum(res["hist"][str(e)]) == 2 * ((size + 1) // 2)
    keys0 = {i for i, c in enumerate(res["hist"]["0"]) if c}
    keys1 = {i for i, c in enumerate(res["hist"]["1"]) if c}
    assert keys0.isdisjoint(keys1)
    # evaluation selections of the last validation pass are summed over both ranks
    assert [sum(res["eval_hist"][str(j)]) for j in range(2)] == res["val_seen"]
