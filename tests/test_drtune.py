"""DRTune callback with a Trainer on Split-Digits: frozen encoder, class-balanced bank, exact gradients
under accumulation, bf16, task-IL, one fit per experience, checkpoint/resume and DDP."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.drtune import DRTune, _task_label_mask
from cl_plugins import ContinualClassifier
from cl_plugins.drtune import dr_loss, mean_norm
from datamodules import SplitDigits
from tests._subprocess import run_script
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StepLosses, StopAfter, assert_losses_track_float32
from tests.tolerances import EPS32, ULPS, assert_close_accumulated


def _model() -> ContinualClassifier:
    return ContinualClassifier("small_cnn", num_classes=10, lr=0.05, momentum=0.9, backbone_kwargs={"width": 8})


def _fit(callbacks, dm=None, model=None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = dm or SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    model = model or _model()
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, **trainer_kwargs))
    trainer.fit(model, datamodule=dm)
    return trainer, model


def test_stream_keeps_a_frozen_pretrained_encoder_and_every_class_in_the_bank():
    pl.seed_everything(0, verbose=False)
    model = _model()
    initial = copy.deepcopy(model.state_dict())
    dr = DRTune(dr_weight=1.0, bank_size=100)
    trainer, model = _fit([dr], model=model)

    frozen = dr.frozen
    assert frozen is not None and not frozen.model.training
    assert all(not p.requires_grad for p in frozen.parameters())
    for name, value in frozen.model.state_dict().items():  # never trained, BN statistics included
        assert torch.equal(value, initial[name]), name
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in frozen.parameters()}
    assert not torch.equal(model.net.head.weight, initial["net.head.weight"])

    bank = dr.regularizer.bank
    assert bank.per_class == 10 and bank.class_counts().tolist() == [10] * 10  # old classes kept
    for c in range(10):  # each class was written during its own experience (2 classes per experience)
        assert set(bank.stamp[bank.labels == c].tolist()) == {c // 2}
    assert bank.pre.dtype == torch.float32 and not torch.equal(bank.pre, bank.down)  # encoder has moved
    assert int(dr.regularizer.step) == trainer.global_step  # one DR step per training step
    metrics = trainer.callback_metrics
    assert 0 < float(metrics["drtune/dr_loss_epoch"]) < 10 and float(metrics["drtune/weight_epoch"]) == 1.0
    assert float(metrics["drtune/bank_rows_epoch"]) == 100
    assert not model.net.head._forward_hooks and not model._forward_pre_hooks  # removed after fit


def test_fifo_bank_holds_only_recent_classes_and_official_weight_is_k_over_b():
    dr = DRTune(dr_weight="K/B", bank_mode="fifo", bank_size=64)
    trainer, _ = _fit([dr], limit_train_batches=4)
    bank = dr.regularizer.bank
    assert len(bank) == 64 and set(bank.labels.tolist()) == {8, 9}
    assert float(trainer.callback_metrics["drtune/weight_epoch"]) == pytest.approx(64 / 32)


class GradProbe(pl.Callback):
    """Records the micro-batches, the bank before each and the gradients of the first optimizer step."""

    def __init__(self, dr: DRTune) -> None:
        self.dr, self.batches, self.regs, self.grads = dr, [], [], None

    def on_train_start(self, trainer, pl_module):
        self.start = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([t.clone() for t in batch])
        self.regs.append(copy.deepcopy(self.dr.regularizer))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters()}


def test_attached_gradients_equal_loss_plus_weighted_dr_under_accumulation():
    dr = DRTune(dr_weight=0.5, bank_size=100, rotation_interval=1)
    probe = GradProbe(dr)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, experience=0)
    _fit([dr, probe], dm=dm, limit_train_batches=2, accumulate_grad_batches=2, limit_val_batches=0)
    assert len(probe.batches) == 2

    manual = _model()
    manual.load_state_dict(probe.start)
    manual.train()
    names, params = zip(*manual.named_parameters())
    want = [torch.zeros_like(p) for p in params]
    magnitude = [torch.zeros_like(p) for p in params]
    for (x, y, _), reg in zip(probe.batches, probe.regs):
        feats = manual.net.forward_features(x)
        z, labels = reg.calibrate(mean_norm(feats.detach()), manual.net.head.weight)
        # the same four float32 gradients (CE and DR of each micro-batch), summed in another order by the
        # Trainer: they differ by the rounding of the sum of their absolute values at most
        for term in (F.cross_entropy(manual.net.head(feats), y), 0.5 * dr_loss(manual.net.head, z, labels)):
            grads = torch.autograd.grad(term / 2, params, retain_graph=True, allow_unused=True)
            for k, g in enumerate(grads):
                if g is not None:  # the DR term reaches only the head
                    want[k] += g
                    magnitude[k] += g.abs()
    for name, w, m in zip(names, want, magnitude):
        assert_close_accumulated(probe.grads[name], w, m, msg=name)


def test_bf16_mixed_keeps_calibration_in_float32():
    dr, losses = DRTune(dr_weight=1.0, bank_size=100, rotation_interval=2), StepLosses()
    trainer, _ = _fit([dr, losses], precision="bf16-mixed", limit_train_batches=3, limit_val_batches=1)
    reference = StepLosses(stop=True)  # the 32-true run's first steps (3 steps per epoch: 2 epochs)
    _fit([DRTune(dr_weight=1.0, bank_size=100, rotation_interval=2), reference], limit_train_batches=3,
         limit_val_batches=1)
    assert_losses_track_float32(losses.losses, reference.losses)
    reg = dr.regularizer
    assert reg.bank.pre.dtype == torch.float32 and reg.rotation.dtype == torch.float32
    assert bool(reg.has_rotation)
    # a rotation from a float32 SVD: orthonormal to a few eps per dimension (16 products of entries <= 1)
    torch.testing.assert_close(reg.rotation @ reg.rotation.T, torch.eye(16), atol=ULPS * EPS32 * 16, rtol=0)
    assert torch.isfinite(trainer.callback_metrics["drtune/dr_loss_epoch"])
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_task_incremental_masks_dr_logits_to_the_task():
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, scenario="task")
    mask = _task_label_mask(dm, 10)
    assert mask[0].nonzero().flatten().tolist() == [0, 1] and mask[9].nonzero().flatten().tolist() == [8, 9]
    dr = DRTune(dr_weight=1.0, bank_size=100)
    trainer, _ = _fit([dr], dm=dm, limit_train_batches=2, limit_val_batches=1)
    # with two allowed logits per row the DR cross entropy is at most about log 2 for a fresh head
    assert 0 < float(trainer.callback_metrics["drtune/dr_ce_epoch"]) < 1.5


def test_one_fit_per_experience_keeps_the_first_pretrained_copy():
    pl.seed_everything(0, verbose=False)
    model = _model()
    initial = copy.deepcopy(model.state_dict())
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, experience=0)
    dr = DRTune(dr_weight=1.0, bank_size=100)
    for exp in range(2):
        dm.set_experience(exp)
        pl.Trainer(**quiet_trainer_kwargs(callbacks=[dr], limit_train_batches=3, limit_val_batches=0)).fit(
            model, datamodule=dm)
    for name, value in dr.frozen.model.state_dict().items():
        assert torch.equal(value, initial[name]), name
    assert set(dr.regularizer.bank.labels[dr.regularizer.bank.valid].tolist()) == {0, 1, 2, 3}


def _resume_run(tmp: Path, stop_after: int | None = None, ckpt_path: str | None = None):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    model = _model()
    dr = DRTune(dr_weight=1.0, bank_size=60, rotation_interval=4)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    callbacks = [dr, ckpt] + ([StopAfter(stop_after)] if stop_after is not None else [])
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp,
                                                limit_train_batches=4, limit_val_batches=1))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, dr


def test_checkpoint_resume_restores_bank_rotation_and_frozen_encoder_exactly(tmp_path):
    _, model_u, dr_u = _resume_run(tmp_path / "full")
    _resume_run(tmp_path / "stopped", stop_after=1)
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=1.ckpt"
    assert ckpt.exists()
    trainer_b, model_b, dr_b = _resume_run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert trainer_b.global_step == 20
    for key, value in dr_u.regularizer.state_dict().items():
        assert torch.equal(dr_b.regularizer.state_dict()[key], value), key
    for key, value in dr_u.frozen.model.state_dict().items():
        assert torch.equal(dr_b.frozen.model.state_dict()[key], value), key
    for (name, p_u), p_b in zip(model_u.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(p_b, p_u, rtol=0, atol=0, msg=name)
    # the resumed run's frozen encoder is the pretrained model, not the checkpoint's fine-tuned one
    stopped = torch.load(ckpt, weights_only=False)["state_dict"]
    assert not torch.equal(dr_b.frozen.model.state_dict()["net.head.weight"], stopped["net.head.weight"])


DDP_SCRIPT = """
import json, os, sys
import lightning.pytorch as pl
import torch
import torch.distributed as dist
from callbacks.drtune import DRTune
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits


class Compare(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "first"):
            self.first = batch[0].sum().reshape(1)

    def on_train_end(self, trainer, pl_module):
        dr = trainer.callbacks[0]
        state = dr.regularizer.state_dict()
        mine = torch.cat([state[k].float().flatten() for k in sorted(state)]
                         + [p.detach().flatten() for p in pl_module.parameters()] + [self.first])
        gathered = [torch.zeros_like(mine) for _ in range(2)]
        dist.all_gather(gathered, mine)
        n_state = sum(state[k].numel() for k in state)
        n_par = sum(p.numel() for p in pl_module.parameters())
        bank = dr.regularizer.bank
        self.result = dict(
            bank_diff=float((gathered[0][:n_state] - gathered[1][:n_state]).abs().max()),
            param_diff=float((gathered[0][n_state:n_state + n_par] - gathered[1][n_state:n_state + n_par]).abs().max()),
            shards_differ=bool(gathered[0][-1] != gathered[1][-1]),
            counts=bank.class_counts().tolist(), step=int(dr.regularizer.step), global_step=trainer.global_step,
            stamps=sorted(set(bank.stamp[bank.valid].tolist())),
            dr_loss=float(trainer.callback_metrics["drtune/dr_loss_epoch"]),
            bank_dtype=str(bank.pre.dtype), has_rotation=bool(dr.regularizer.has_rotation),
            rotation_orthogonality=float((dr.regularizer.rotation @ dr.regularizer.rotation.T
                                          - torch.eye(bank.dim)).abs().max()),
        )


if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=16)
    model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    compare = Compare()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_train_batches=3, limit_val_batches=1, precision=sys.argv[1],
                         callbacks=[DRTune(dr_weight=1.0, bank_size=200, rotation_interval=2), compare])
    trainer.fit(model, datamodule=dm)
    if trainer.global_rank == 0:
        with open(os.environ["RESULT_PATH"], "w") as f:
            json.dump(compare.result, f)
"""


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_ddp_ranks_hold_identical_banks(precision, tmp_path):
    res = run_script(DDP_SCRIPT, tmp_path, timeout=300, args=[precision])
    assert res["shards_differ"], "each rank trains on its own shard"
    assert res["bank_diff"] == 0.0 and res["param_diff"] == 0.0, res
    # 5 experiences x 3 steps; every class got rows from both ranks' gathered batches
    assert res["step"] == res["global_step"] == 15
    assert all(c > 0 for c in res["counts"]) and res["stamps"] == [0, 1, 2, 3, 4]
    assert res["dr_loss"] > 0 and math.isfinite(res["dr_loss"])
    # bank, rotation and calibration stay float32 under bf16 autocast (ARCHITECTURE.md 6)
    assert res["bank_dtype"] == "torch.float32" and res["has_rotation"] and res["rotation_orthogonality"] < 1e-4


@pytest.mark.parametrize("arch", ["timm_vit", "hf_bert"])
def test_timm_vit_and_hf_bert_heads_are_found_and_regularized(arch):
    """No head_name: the head (timm's get_classifier, BERT's classifier) is found and the DR term runs."""
    from tests.test_loramoe import BERT_CFG, VIT_KW, _token_stream

    pl.seed_everything(0, verbose=False)
    if arch == "timm_vit":
        model = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                                    backbone_kwargs=VIT_KW, optimizer="adam", lr=3e-3)
        dm, head, classes = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32), "net.head", 10
    else:
        model = ContinualClassifier("hf-config", num_classes=4, hf_config=BERT_CFG, optimizer="adam", lr=3e-3)
        dm, head, classes = _token_stream(), "net.model.classifier", 4
    dr = DRTune(bank_size=8 * classes, rotation_interval=2)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[dr], limit_train_batches=3, limit_val_batches=1))
    trainer.fit(model, datamodule=dm)
    assert dr.tap is not None and dr.tap.head is model.get_submodule(head)
    seen = dr.regularizer.bank.class_counts()
    assert int((seen > 0).sum()) == classes  # every class of the stream entered the bank
    assert float(trainer.callback_metrics["drtune/dr_ce"]) > 0
    assert bool(dr.regularizer.has_rotation)
