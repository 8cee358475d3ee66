"""PEGO with a Trainer: tiny timm ViT on Split-Digits, tiny BERT on a token stream, bf16, resume, replay, DDP."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.base import ContinualCallback
from callbacks.lora import LoRA
from callbacks.pego import PEGO
from callbacks.replay import ExperienceReplay
from cl_plugins.models import ContinualClassifier
from cl_plugins.peft.lora import LoRAGroupLinear
from datamodules.common import split_benchmark
from datamodules.digits import SplitDigits
from datamodules.stream import ContinualDataModule
from tests._subprocess import run_script
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StepLosses, StopAfter, assert_losses_track_float32
from tests.tolerances import EPS32, ULPS, abs_forward, assert_close_accumulated, merged_weight_magnitude

VIT_KW = dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2)
BERT_CFG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TERMS = ("pego/diversify_loss", "pego/preserve_loss")


def _vit(lr: float = 3e-3) -> ContinualClassifier:
    return ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                               backbone_kwargs=VIT_KW, optimizer="adam", lr=lr)


def _digits(n_experiences: int = 2, batch_size: int = 64) -> SplitDigits:
    return SplitDigits(n_experiences=n_experiences, epochs_per_experience=1, batch_size=batch_size)


def _token_stream(n: int = 384, length: int = 10) -> ContinualDataModule:
    """4 classes of token ids (class c draws from ids [2 + 9c, 11 + 9c)), 0-padded, in 2 experiences."""
    g = torch.Generator().manual_seed(0)

    def make(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(m) % 4
        x = 2 + 9 * y[:, None] + torch.randint(0, 9, (m, length), generator=g)
        x[torch.arange(length)[None, :] >= torch.randint(3, length + 1, (m, 1), generator=g)] = 0
        return x, y

    (tx, ty), (vx, vy) = make(n), make(n // 4)
    bm = split_benchmark(tx, ty, vx, vy, n_experiences=2, class_order=[0, 1, 2, 3])
    return ContinualDataModule(benchmark=bm, epochs_per_experience=2, batch_size=16)


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    """Names (pre-injection spelling) of the parameters whose values changed (wrapped base weights:
    beyond the float32 rounding that a merge and unmerge leave, ``ULPS`` eps of ``|W0| + |update|``)."""
    out = set()
    for name, p in model.named_parameters():
        original = name.replace(".base.", ".")
        if original not in before:
            out.add(original)
        elif ".base." in name:
            layer = model.get_submodule(name.split(".base.")[0])
            if name.endswith(".weight"):
                rounding = ULPS * EPS32 * merged_weight_magnitude(layer)
                if ((before[original] - p.detach()).abs() > rounding).any():
                    out.add(original)
            elif not torch.equal(before[original], p.detach()):  # the bias: merging leaves it alone
                out.add(original)
        elif not torch.equal(before[original], p.detach()):
            out.add(original)
    return out


def _merged_layers_compute_the_unmerged_function(net: torch.nn.Module) -> None:
    """Every merged group layer, on the input it gets in a forward of the network, computes what it computes
    unmerged (base output plus the groups' update), within float32 rounding of the sum of |terms| (merging and
    unmerging round the weight once each, the outputs sum the same products in another order); the network is the
    composition of these layers."""
    layers = {n: m for n, m in net.named_modules() if isinstance(m, LoRAGroupLinear)}
    assert layers and all(m.merged for m in layers.values())
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: inputs.__setitem__(n, args[0].detach()))
             for n, m in layers.items()]
    with torch.no_grad():
        net.eval()(torch.randn(16, 1, 8, 8))
    for hook in hooks:
        hook.remove()
    for name, layer in layers.items():
        unmerged = copy.deepcopy(layer)
        unmerged.unmerge()
        with torch.no_grad():
            got, want = layer(inputs[name]), unmerged(inputs[name])
        assert_close_accumulated(got, want, abs_forward(unmerged, inputs[name]), msg=name)


def test_vit_trains_only_the_groups_and_head_merges_at_stream_end_and_logs_both_terms():
    pl.seed_everything(0)
    model = _vit()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    pego = PEGO()
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[pego]))
    trainer.fit(model, datamodule=_digits())
    for key in TERMS:
        assert float(trainer.callback_metrics[key]) > 0, key  # the B_i moved: both terms are active
    layers = pego.layers(model)
    assert pego.is_merged(model)  # merged after the last experience
    qkv0 = layers["net.blocks.0.attn.qkv"].base.weight.detach()
    w_orig = before["net.blocks.0.attn.qkv.weight"]
    assert torch.equal(qkv0[32:64], w_orig[32:64])  # key rows: no group, untouched even merged
    assert not torch.equal(qkv0[:32], w_orig[:32]) and not torch.equal(qkv0[64:], w_orig[64:])

    _merged_layers_compute_the_unmerged_function(model.net)
    pego.unmerge(model)
    changed = _changed(before, model)
    assert all(".lora_" in n or n.startswith("net.head.") for n in changed), changed
    assert any(".lora_B" in n for n in changed) and "net.head.weight" in changed
    qkv0 = layers["net.blocks.0.attn.qkv"]
    assert_close_accumulated(qkv0.base.weight, w_orig, merged_weight_magnitude(qkv0))


class _AccAfterFirst(ContinualCallback):
    """Accuracy on experience 0 right after training it."""

    acc: float = 0.0

    def on_experience_end(self, trainer, pl_module, experience):
        if experience == 0:
            self.acc = float(trainer.callback_metrics["val/acc_exp0"])


def test_bert_on_a_token_stream_adapts_query_and_value_only():
    pl.seed_everything(0)
    model = ContinualClassifier("hf-config", num_classes=4, hf_config=BERT_CFG, optimizer="adam", lr=3e-2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    pego, acc = PEGO(num_loras=2, merge_on_end=False), _AccAfterFirst()
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[pego, acc]))
    trainer.fit(model, datamodule=_token_stream())
    layers = pego.layers(model)
    assert sorted({n.rsplit(".", 1)[1] for n in layers}) == ["query", "value"] and len(layers) == 4
    assert not pego.is_merged(model)
    assert all(float(trainer.callback_metrics[k]) > 0 for k in TERMS)
    changed = _changed(before, model)
    assert all(".lora_" in n or n.startswith("net.model.classifier.") for n in changed), changed
    assert any("attention.self.value.lora_B" in n for n in changed)
    assert acc.acc > 0.65  # two classes (chance 0.5), learnt through the groups and the head


def test_bf16_mixed_trains_with_float32_terms():
    pl.seed_everything(0)
    model = _vit()
    pego = PEGO()

    class Check(ContinualCallback):
        dtypes: set = set()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                self.dtypes |= {t.dtype for t in pego.regularizer().values()}

    check, losses = Check(), StepLosses()
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[pego, check, losses], precision="bf16-mixed",
                                                limit_train_batches=6))
    trainer.fit(model, datamodule=_digits())
    assert check.dtypes == {torch.float32}
    pl.seed_everything(0)  # the 32-true reference: the same run, its first steps
    model32, reference = _vit(), StepLosses(stop=True)
    pl.Trainer(**quiet_trainer_kwargs(callbacks=[PEGO(), reference], limit_train_batches=6)).fit(model32, _digits())
    assert_losses_track_float32(losses.losses, reference.losses)
    assert all(torch.isfinite(trainer.callback_metrics[k]) and trainer.callback_metrics[k] > 0 for k in TERMS)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
    assert pego.is_merged(model)



def _run(tmp: Path, stop_after: int | None = None, ckpt_path: str | None = None):
    pl.seed_everything(0)
    model = _vit()
    pego = PEGO(num_loras=2)
    callbacks = [pego, ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, enable_checkpointing=True,
                                                default_root_dir=tmp, limit_train_batches=5))
    trainer.fit(model, datamodule=_digits(5, batch_size=32), ckpt_path=ckpt_path)
    return trainer, model, pego


def test_resume_mid_stream_restores_the_groups_exactly_and_merged_checkpoints_reload(tmp_path):
    _, model_u, pego_u = _run(tmp_path / "full")
    _, model_a, pego_a = _run(tmp_path / "stopped", stop_after=0)
    assert not pego_a.is_merged(model_a)  # stopped before the last experience: left unmerged
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=0.ckpt"
    trainer_b, model_b, pego_b = _run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert trainer_b.current_epoch == 5 and pego_b.is_merged(model_b) and pego_u.is_merged(model_u)
    for (name, p_u), p_b in zip(model_u.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(p_u, p_b), name

    # a checkpoint saved after the merge loads into a fresh, unmerged model: the flag comes along
    path = tmp_path / "merged.pt"
    torch.save(model_u.state_dict(), path)
    fresh = _vit()
    PEGO(num_loras=2).apply_to(fresh)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    layers = [m for m in fresh.modules() if isinstance(m, LoRAGroupLinear)]
    assert layers and all(m.merged for m in layers)
    x = torch.randn(8, 1, 8, 8)
    model_u.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model_u(x), rtol=0, atol=0)


def test_works_with_experience_replay():
    pl.seed_everything(0)
    model = _vit()
    pego, replay = PEGO(num_loras=2), ExperienceReplay(buffer_size=64, replay_batch_size=16)

    class Sizes(ContinualCallback):
        sizes: list = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.sizes.append(len(batch[1]))

    sizes = Sizes()
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[replay, pego, sizes], limit_train_batches=4))
    trainer.fit(model, datamodule=_digits(batch_size=32))
    assert sizes.sizes[0] == 32 and set(sizes.sizes[1:]) == {48}  # replayed samples join the batch
    assert len(replay.buffer) == 64 and pego.is_merged(model)
    assert all(float(trainer.callback_metrics[k]) > 0 for k in TERMS)


def test_two_injections_on_the_same_layers_fail_clearly_and_disjoint_ones_compose():
    model = _vit()
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[PEGO(), LoRA()], max_epochs=2))
    with pytest.raises(RuntimeError, match=r"LoRA cannot adapt 'net\.blocks\.0\.attn\.qkv'.*injected by PEGO"):
        trainer.fit(model, datamodule=_digits())

    pl.seed_everything(0)
    model = _vit()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    pego, lora = PEGO(num_loras=2), LoRA(targets=[r"mlp\.fc1$"], rank=2)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[pego, lora], limit_train_batches=3))
    trainer.fit(model, datamodule=_digits())
    changed = _changed(before, model)
    assert any("attn.qkv.lora_B" in n for n in changed) and any("mlp.fc1.lora_B" in n for n in changed)
    pego.unmerge(model)
    lora.unmerge(model)
    changed = _changed(before, model)  # the wrapped base weights stayed frozen through both injections
    assert all(".lora_" in n or n.startswith("net.head.") for n in changed), changed


DDP_SCRIPT = """
import json, os
import lightning.pytorch as pl
import torch
from callbacks.base import ContinualCallback
from callbacks.pego import PEGO
from cl_plugins.models import ContinualClassifier
from datamodules.digits import SplitDigits

class Gather(ContinualCallback):
    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for n, p in pl_module.named_parameters() if ".lora_" in n])
        self.sums = trainer.strategy.all_gather(torch.stack([flat.sum(), flat.abs().sum()])).tolist()
        self.terms = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("pego/")}

if __name__ == "__main__":
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=32)
    model = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                                backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2),
                                optimizer="adam", lr=3e-3)
    pego, gather = PEGO(num_loras=2), Gather()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[pego, gather], limit_train_batches=6, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    qkv = model.net.blocks[0].attn.qkv
    checksum = trainer.strategy.all_gather(qkv.base.weight.detach().sum()).tolist()
    if trainer.global_rank == 0:
        with open(os.environ["RESULT_PATH"], "w") as f:
            json.dump({"sums": gather.sums, "terms": gather.terms, "merged": pego.is_merged(model),
                       "merged_weight": checksum}, f)
"""


@pytest.mark.slow
def test_ddp_replicas_stay_identical_and_merge_together(tmp_path):
    res = run_script(DDP_SCRIPT, tmp_path, timeout=300)
    assert len(res["sums"]) == 2 and res["sums"][0] == res["sums"][1]  # identical LoRA groups on both ranks
    assert res["merged"] and res["merged_weight"][0] == res["merged_weight"][1]
    assert set(res["terms"]) >= set(TERMS) and all(v > 0 for v in res["terms"].values())
