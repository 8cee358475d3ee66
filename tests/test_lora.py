"""Plain LoRA baseline with a Trainer: what trains, merging at the end of the stream, per-experience fits."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from callbacks.lora import LoRA
from cl_plugins.models import ContinualClassifier
from datamodules.digits import SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.test_pego import BERT_CFG, _changed, _merged_layers_compute_the_unmerged_function, _token_stream, _vit


def test_vit_lora_trains_only_the_adapters_and_head_and_merges_to_the_same_function():
    pl.seed_everything(0)
    model = _vit()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    lora = LoRA()
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[lora], limit_train_batches=8))
    trainer.fit(model, datamodule=SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=32))
    layers = lora.layers(model)
    assert sorted(layers) == [f"net.blocks.{i}.attn.{n}" for i in range(2) for n in ("proj", "qkv")]
    assert all(m.num_loras == 1 and m.rank == 8 and m.scaling == 2.0 for m in layers.values())
    assert lora.is_merged(model)
    assert not [k for k in trainer.callback_metrics if k.startswith("pego/")]  # no regularizer in the baseline
    _merged_layers_compute_the_unmerged_function(model.net)
    lora.unmerge(model)
    changed = _changed(before, model)
    assert all(".lora_" in n or n.startswith("net.head.") for n in changed), changed
    assert {f"net.blocks.{i}.attn.{n}.lora_B.0" for i in range(2) for n in ("qkv", "proj")} <= changed


def test_bert_lora_adapts_every_attention_projection():
    pl.seed_everything(0)
    model = ContinualClassifier("hf-config", num_classes=4, hf_config=BERT_CFG, optimizer="adam", lr=1e-2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    lora = LoRA(rank=4, alpha=8, dropout=0.1, merge_on_end=False)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[lora], limit_train_batches=4))
    trainer.fit(model, datamodule=_token_stream())
    names = sorted(n.split("attention.", 1)[1] for n in lora.layers(model))
    assert names == sorted(["self.query", "self.key", "self.value", "output.dense"] * 2)
    assert not lora.is_merged(model)
    changed = _changed(before, model)
    assert all(".lora_" in n or n.startswith("net.model.classifier.") for n in changed), changed
    assert sum(".lora_B" in n for n in changed) == 8


def test_one_fit_per_experience_merges_only_after_the_last_and_unmerges_to_train_again():
    pl.seed_everything(0)
    model = _vit()
    lora = LoRA(rank=4)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    merged_after = []
    for exp in range(5):
        dm.set_experience(exp)
        trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[lora], max_epochs=1, limit_train_batches=3))
        trainer.fit(model, datamodule=dm)
        merged_after.append(lora.is_merged(model))
    assert merged_after == [False] * 4 + [True]
    assert len(lora.layers(model)) == 4  # injected once, reused by every fit

    # another fit on the merged model: unmerged at its start, trained, merged again at its end
    b_before = model.net.blocks[0].attn.qkv.lora_B[0].detach().clone()
    seen = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(lora.is_merged(pl_module))

    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[lora, Probe()], max_epochs=1, limit_train_batches=3))
    trainer.fit(model, datamodule=dm)
    assert seen == [False] and lora.is_merged(model)
    assert not torch.equal(model.net.blocks[0].attn.qkv.lora_B[0], b_before)
