"""LoRAMoE callback with a Trainer: tiny timm ViT on Split-Digits, tiny BERT on a token stream, bf16,
replay, k-FPF, one fit per experience, resume and DDP."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.base import ContinualCallback
from callbacks.kfpf import KFPF
from callbacks.loramoe import LoRAMoE
from callbacks.replay import ExperienceReplay
from cl_plugins.models import ContinualClassifier
from cl_plugins.peft.loramoe import LoRAMoELinear, loramoe_layers
from datamodules.common import split_benchmark
from datamodules.digits import SplitDigits
from datamodules.stream import ContinualDataModule
from tests._subprocess import run_script
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import RecordingLogger, StepLosses, StopAfter, assert_losses_track_float32

VIT_KW = dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2)
BERT_CFG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
INJECTED = (".router.", ".experts.")


def _vit(lr: float = 3e-3) -> ContinualClassifier:
    return ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                               backbone_kwargs=VIT_KW, optimizer="adam", lr=lr)


def _token_stream(n: int = 160, length: int = 12) -> ContinualDataModule:
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
    return ContinualDataModule(benchmark=bm, epochs_per_experience=1, batch_size=16)


def _changed_backbone(before: dict[str, torch.Tensor], model: torch.nn.Module, head: str) -> list[str]:
    """Backbone parameters (outside the experts, routers and head) that changed."""
    changed = []
    for name, p in model.named_parameters():
        if any(k in name for k in INJECTED) or name.startswith(head):
            continue
        if not torch.equal(before[name.replace(".base.", ".")], p.detach()):
            changed.append(name)
    return changed


class TypeProbe(ContinualCallback):
    """Records, per experience, the sample types LoRAMoE resolved for each training batch."""

    def __init__(self, loramoe: LoRAMoE) -> None:
        super().__init__()
        self.loramoe = loramoe
        self.types: dict[int, list[list[int]]] = {}
        self.labels: dict[int, list[list[int]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        exp = self.stream(trainer).experience_at_epoch(trainer.current_epoch)
        self.types.setdefault(exp, []).append(self.loramoe.context.last_types.tolist())
        self.labels.setdefault(exp, []).append(batch[1].tolist())


def test_vit_trains_only_experts_routers_and_head_with_typed_samples():
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    model = _vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moe = LoRAMoE()
    probe = TypeProbe(moe)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[moe, probe]))
    trainer.fit(model, datamodule=dm)

    assert moe.layer_names == [f"net.blocks.{b}.mlp.{f}" for b in range(2) for f in ("fc1", "fc2")]
    assert all(type(blk.attn.qkv).__name__ == "Linear" for blk in model.net.blocks)
    fc1 = model.net.blocks[0].mlp.fc1
    assert isinstance(fc1, LoRAMoELinear) and fc1.experts.lora_A.shape == (6, 4, 32)
    assert fc1.experts.scaling == 8.0
    assert _changed_backbone(before, model, "net.head.") == []
    assert not torch.equal(before["net.head.weight"], model.net.head.weight)
    assert all(m.experts.lora_B.abs().sum() > 0 for m in loramoe_layers(model).values())
    assert all(n.split(".")[-2] in ("router", "experts") for n in moe.injected_parameter_names)
    # experience 0 is the knowledge type, later experiences the new-task type
    assert {t for b in probe.types[0] for t in b} == {0}
    assert all({t for b in probe.types[e] for t in b} == {1} for e in range(1, 5))
    metrics = trainer.callback_metrics
    assert metrics["loramoe/balance_loss_epoch"] > 0
    total = metrics["loramoe/group0_weight_epoch"] + metrics["loramoe/group1_weight_epoch"]
    assert total.item() == pytest.approx(1.0, abs=1e-5)
    assert sum(metrics[f"loramoe/expert{n}_load_epoch"].item() for n in range(6)) == pytest.approx(1.0, abs=1e-5)
    assert "loramoe/type1_group1_weight" in metrics  # logged per epoch
    assert metrics["val/acc_exp4"] > 0.2  # 10 seen classes: chance is 0.1


def _fit_logging(every: int) -> tuple[pl.Trainer, list[str], RecordingLogger]:
    """The ViT stream with LoRAMoE at ``log_every_n_steps=every``: the trainer, ``(global step, name)`` of
    every ``self.log`` call and the logger's rows."""
    pl.seed_everything(0)
    model, calls, logger = _vit(), [], RecordingLogger()
    log = model.log

    def counting_log(name: str, *args, **kwargs):
        calls.append((model.trainer.global_step, name))
        return log(name, *args, **kwargs)

    model.log = counting_log
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[LoRAMoE()], logger=logger, log_every_n_steps=every,
                                                limit_val_batches=0))
    trainer.fit(model, datamodule=SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32))
    return trainer, calls, logger


def test_router_statistics_are_logged_at_logging_steps_with_the_epoch_means_of_every_step():
    """The per-step router statistics cost a ``self.log`` only where Lightning writes step metrics (not one
    per statistic and step), and their epoch means are those of logging every step."""
    _, calls_1, logger_1 = _fit_logging(1)
    trainer, calls_4, logger_4 = _fit_logging(4)
    steps = trainer.global_step
    names_1, names_4 = [n for _, n in calls_1], [n for _, n in calls_4]
    assert names_1.count("loramoe/expert0_load") == steps
    assert 0 < names_4.count("loramoe/expert0_load") < steps / 2
    # the statistics and the balancing term go out in one write: no name twice in a step
    assert len(set(calls_4)) == len(calls_4) and len(set(calls_1)) == len(calls_1)
    # each written step value is the mean of the every-step values since the previous self.log (a logger
    # row's step is the global step before the optimizer step; epoch ends are logged, not written)
    for name in ("loramoe/balance_loss", "loramoe/expert0_load"):
        every, written = logger_1.values(f"{name}_step"), logger_4.values(f"{name}_step")
        ends = [step - 1 for step, n in calls_4 if n == name]
        assert len(every) == steps and set(written) < set(ends)
        for previous, end in zip([-1] + ends, ends):
            window = [v for s, v in every.items() if previous < s <= end]
            if end in written:
                assert written[end] == pytest.approx(sum(window) / len(window), rel=1e-5), (name, end)
    for key in [f"loramoe/expert{n}_load_epoch" for n in range(6)] + ["loramoe/group1_weight_epoch"]:
        means_1, means_4 = list(logger_1.values(key).values()), list(logger_4.values(key).values())
        assert len(means_4) == 5 and means_4 == pytest.approx(means_1, rel=1e-5)


def test_bert_ffn_placement_on_a_token_stream():
    pl.seed_everything(0)
    dm = _token_stream()
    model = ContinualClassifier("hf-config", num_classes=4, hf_config=BERT_CFG, optimizer="adam", lr=3e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moe = LoRAMoE(num_experts=4, balance_weight=0.1)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[moe]))
    trainer.fit(model, datamodule=dm)
    layer = model.net.model.bert.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, LoRAMoELinear) and isinstance(layer.output.dense, LoRAMoELinear)
    assert type(layer.attention.output.dense).__name__ == "Linear"
    assert type(layer.attention.self.query).__name__ == "Linear"
    assert len(moe.layer_names) == 4
    assert _changed_backbone(before, model, "net.model.classifier.") == []
    assert trainer.callback_metrics["loramoe/balance_loss_epoch"] > 0

    model.net.model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="activation checkpointing"):
        pl.Trainer(**quiet_trainer_kwargs(callbacks=[LoRAMoE(num_experts=4)])).fit(model, datamodule=dm)


def _fit_experience_0(precision: str, moe: LoRAMoE) -> tuple[pl.Trainer, ContinualClassifier, StepLosses]:
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, experience=0)
    model = _vit()
    losses = StepLosses(stop=precision == "32-true")  # the 32-true reference: its first steps only
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[moe, losses], precision=precision, limit_val_batches=1))
    trainer.fit(model, datamodule=dm)
    return trainer, model, losses


def test_bf16_mixed_trains_with_float32_router_and_constraint():
    moe = LoRAMoE()
    trainer, model, losses = _fit_experience_0("bf16-mixed", moe)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert_losses_track_float32(losses.losses, _fit_experience_0("32-true", LoRAMoE())[2].losses)
    assert torch.isfinite(trainer.callback_metrics["loramoe/balance_loss_epoch"])
    assert model.net.blocks[1].mlp.fc2.experts.lora_B.abs().sum() > 0
    model.train()
    moe.context.set_types(torch.zeros(4, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(4, 1, 8, 8))
        weights = model.net.blocks[0].mlp.fc1.route(torch.randn(4, 5, 32))
    assert out.dtype == torch.bfloat16 and weights.dtype == torch.float32
    assert moe.context.pop_stats()["balance_loss"].dtype == torch.float32
    moe.context.set_types(None)


@pytest.mark.parametrize("sample_type", ["experience", "current"])
def test_replayed_samples_keep_the_knowledge_type(sample_type):
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=16)
    model = _vit()
    moe = LoRAMoE(num_experts=4, sample_type=sample_type)
    probe = TypeProbe(moe)
    replay = ExperienceReplay(buffer_size=64, replay_batch_size=8)
    # replay extends the batch in place after LoRAMoE saw it: the types are resolved at the forward
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[moe, replay, probe], limit_val_batches=1,
                                                limit_train_batches=4))
    trainer.fit(model, datamodule=dm)
    assert len(probe.types[0][0]) == 16 and all(len(b) == 24 for b in probe.types[1])
    if sample_type == "current":  # the whole batch takes the type of the experience being trained
        assert all(set(b) == {0} for b in probe.types[0]) and all(set(b) == {1} for b in probe.types[1])
        return
    for exp in (0, 1):  # classes 0-4 are experience 0 (type 0), classes 5-9 experience 1
        for types, labels in zip(probe.types[exp], probe.labels[exp]):
            assert types == [int(y >= 5) for y in labels]
    assert all(b[:16] == [1] * 16 and 0 in b[16:] for b in probe.types[1])


def test_kfpf_default_selection_is_refused_and_head_router_selection_works():
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    with pytest.raises(ValueError, match="LoRAMoE froze.*norms=False"):
        pl.Trainer(**quiet_trainer_kwargs(callbacks=[LoRAMoE(), KFPF(k=2)])).fit(_vit(), datamodule=dm)

    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=32)
    model = _vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moe = LoRAMoE(num_experts=4)
    kfpf = KFPF(k=2, iterations=3, batch_size=8, buffer_size=64, norms=False, first_conv=False,
                patterns=[r"\.router$"], sensitivity="off")
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[moe, kfpf], limit_val_batches=1))
    routers = {}

    class Snapshot(ContinualCallback):
        def on_train_start(self, trainer, pl_module):
            routers.update({n: p.detach().clone() for n, p in pl_module.named_parameters() if ".router." in n})

    trainer.callbacks.append(Snapshot())
    trainer.fit(model, datamodule=dm)
    assert kfpf.phases_done == 2
    selected = sorted(kfpf.selection.reasons)
    assert selected[0] == "net.blocks.0.mlp.fc1.router" and "net.head" in selected
    assert all(".router" in n or n == "net.head" for n in selected)
    assert _changed_backbone(before, model, "net.head.") == []
    assert all(not torch.equal(routers[n], p) for n, p in model.named_parameters() if n in routers)
    # the experts and routers are trainable again after the phases
    assert all(p.requires_grad for n, p in model.named_parameters() if any(k in n for k in INJECTED))


def test_one_fit_per_experience_reuses_the_injection_with_a_new_callback():
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, experience=0)
    model = _vit()
    seen = {}
    for exp in (0, 1):
        dm.set_experience(exp)
        moe = LoRAMoE(num_experts=4)
        probe = TypeProbe(moe)
        trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[moe, probe], limit_val_batches=1,
                                                    limit_train_batches=3))
        trainer.fit(model, datamodule=dm)
        seen[exp] = {t for b in probe.types[exp] for t in b}
        assert all(m.context is moe.context for m in loramoe_layers(model).values())
    assert seen == {0: {0}, 1: {1}}
    assert len(loramoe_layers(model)) == 4
    with pytest.raises(ValueError, match="from an earlier injection"):
        pl.Trainer(**quiet_trainer_kwargs(callbacks=[LoRAMoE(num_experts=6)], limit_train_batches=1,
                                          limit_val_batches=1)).fit(model, datamodule=dm)



class _CountDropout(pl.Callback):
    """Counts the training forwards of the experts' dropout, which draws its masks from the global torch RNG."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_start(self, trainer, pl_module):
        for layer in loramoe_layers(pl_module).values():
            assert layer.experts.dropout.p > 0
            layer.experts.dropout.register_forward_hook(self._count)

    def _count(self, module, args, out):
        self.calls += int(module.training)


def _run(tmp: Path, stop_after: int | None = None, ckpt_path: str | None = None):
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=2, epochs_per_experience=2, batch_size=32)
    model = _vit()
    moe = LoRAMoE(num_experts=4)  # expert dropout 0.05 (the official value), on
    dropout = _CountDropout()
    callbacks = [moe, dropout,
                 ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp,
                                                limit_val_batches=1))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, dropout


def test_resume_mid_stream_restores_experts_and_routers_exactly(tmp_path):
    """No seeding beyond Lightning's own: ``seed_everything`` once per run, and in the resumed run the global RNG
    states the stream datamodule saved in the checkpoint (Lightning does not checkpoint them), restored with its
    state before the first resumed batch. The expert dropout masks of the resumed run are then those of the
    uninterrupted run, so the weights end bit for bit equal; without that restore (or without the experts' and
    routers' weights) they differ."""
    _, model_u, dropout_u = _run(tmp_path / "full")
    _run(tmp_path / "stopped", stop_after=0)
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=1.ckpt"
    assert ckpt.exists()
    trainer_b, model_b, dropout_b = _run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert trainer_b.current_epoch == 4
    assert dropout_b.calls > 0 and dropout_u.calls > dropout_b.calls  # the resumed run drew masks (epochs 2-3)
    state_u, state_b = model_u.state_dict(), model_b.state_dict()
    assert state_u.keys() == state_b.keys() and "net.blocks.0.mlp.fc1.router.weight" in state_u
    for name, value in state_u.items():
        torch.testing.assert_close(state_b[name], value, rtol=0, atol=0, msg=name)

    # a checkpoint of another configuration (same shapes, other scaling) is refused with the reason
    model = _vit()
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[LoRAMoE(num_experts=4, alpha=16.0)], limit_val_batches=1))
    with pytest.raises(ValueError, match="'alpha': 32.0.*'alpha': 16.0"):
        trainer.fit(model, datamodule=SplitDigits(n_experiences=2, epochs_per_experience=2, batch_size=32),
                    ckpt_path=str(ckpt))


DDP_SCRIPT = """
import json, os
import lightning.pytorch as pl
import torch
from callbacks.base import ContinualCallback
from callbacks.loramoe import LoRAMoE
from cl_plugins.models import ContinualClassifier
from datamodules.digits import SplitDigits

class Gather(ContinualCallback):
    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for n, p in pl_module.named_parameters() if p.requires_grad])
        self.sums = trainer.strategy.all_gather(torch.stack([flat.sum(), flat.abs().sum()])).tolist()
        self.loss = trainer.callback_metrics["loramoe/balance_loss_epoch"].item()

if __name__ == "__main__":
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=16)
    model = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                                backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2),
                                optimizer="adam", lr=3e-3)
    moe, gather = LoRAMoE(num_experts=4), Gather()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[moe, gather], limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    if trainer.global_rank == 0:
        with open(os.environ["RESULT_PATH"], "w") as f:
            json.dump({"sums": gather.sums, "loss": gather.loss,
                       "lora_B": model.net.blocks[0].mlp.fc1.experts.lora_B.abs().sum().item()}, f)
"""


@pytest.mark.slow
def test_ddp_keeps_replicas_identical(tmp_path):
    res = run_script(DDP_SCRIPT, tmp_path, timeout=300)
    ranks = res["sums"]
    assert len(ranks) == 2 and ranks[0] == pytest.approx(ranks[1], rel=0, abs=0)
    assert res["loss"] > 0 and res["lora_B"] > 0
