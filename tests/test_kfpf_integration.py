"""k-FPF / FPF callbacks in real training on Split-Digits: effect, phases, precision, DDP, resume."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import ExperienceReplay
from callbacks.kfpf import DEFAULT_FPF_LR, FPF, KFPF
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits
from tests._subprocess import run_script
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StopAfter

# Split-Digits: 1,348 training samples in 5 experiences of 2 classes (273, 260, 273, 276, 266);
# batch 32 gives 9 batches per epoch for every experience.


def _fit(callbacks, epochs=3, model_cls=ContinualClassifier, dm_kwargs=None, model_kwargs=None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=epochs, batch_size=32, **(dm_kwargs or {}))
    model = model_cls("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 16}, **(model_kwargs or {}))
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, **trainer_kwargs))
    trainer.fit(model, datamodule=dm)
    accs = [float(trainer.callback_metrics[f"val/acc_exp{j}"]) for j in range(5)]
    return sum(accs) / 5, trainer, model


@functools.cache
def _naive_accuracy() -> float:
    return _fit([])[0]


@pytest.mark.parametrize("variant", ["ce", "kd"])
def test_kfpf_improves_over_naive_and_follows_its_schedule(variant):
    cb = KFPF(k=5, iterations=30, buffer_size=200, variant=variant)
    acc, trainer, _ = _fit([cb])
    naive = _naive_accuracy()
    assert naive < 0.3 and acc > naive + 0.4, (naive, acc)
    # the plan counted the stream right: 5 experiences x 3 epochs x 9 batches
    assert trainer.global_step == 135 and cb.schedule == [27, 54, 81, 108, 135]
    assert [e["step"] for e in cb.phase_log] == cb.schedule and cb.phases_done == 5
    assert cb.buffer.num_seen == 3 * 1348 and len(cb.buffer) == 200
    assert set(cb.buffer.data["y"].tolist()) == set(range(10))
    if variant == "kd":
        assert cb.buffer.data["logits"].shape == (200, 10) and cb.buffer.data["logits"].abs().sum() > 0
    report = cb.compute_report()
    assert report["fpf_iterations"] == 150 and report["fpf_samples"] == 150 * 32
    assert report["flops_per_sample"] > 0 and 0 < report["fpf_share"] < 1
    assert report["fpf_vs_replay"] == pytest.approx(2 * 150 * 32 / (3 * 3 * 1348))
    # one sensitivity entry per epoch, per module, logged
    assert len(cb.sensitivity.history) == 15
    assert set(cb.sensitivity.history[0]["scores"]) >= {"net.head", "net.bn1", "net.bn1.running_stats", "net.conv2"}
    assert "kfpf/sensitivity/net.head" in trainer.callback_metrics
    assert all(s >= 0 for h in cb.sensitivity.history for s in h["scores"].values())


class SpyKFPF(KFPF):
    """Records what a phase does to the main optimizer, scheduler, flags, modes and parameters."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.records = []
        self.autocast_dtypes = set()

    def run_phase(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        sched = trainer.lr_scheduler_configs[0].scheduler
        before = dict(
            opt=copy.deepcopy(opt.state_dict()), sched=copy.deepcopy(sched.state_dict()),
            lr=opt.param_groups[0]["lr"],
            state={k: v.clone() for k, v in pl_module.state_dict().items()},
            flags={n: p.requires_grad for n, p in pl_module.named_parameters()},
            modes={n: m.training for n, m in pl_module.named_modules()},
            grads={n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()},
        )
        hook = pl_module.net.head.register_forward_hook(
            lambda m, a, out: self.autocast_dtypes.add(out.dtype))
        try:
            result = super().run_phase(trainer, pl_module)
        finally:
            hook.remove()
        after_state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.records.append(dict(
            before=before,
            opt_after=copy.deepcopy(opt.state_dict()), sched_after=copy.deepcopy(sched.state_dict()),
            changed={k for k in after_state if not torch.equal(after_state[k], before["state"][k])},
            flags={n: p.requires_grad for n, p in pl_module.named_parameters()},
            modes={n: m.training for n, m in pl_module.named_modules()},
            grads={n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()},
        ))
        return result


class ScheduledClassifier(ContinualClassifier):
    """SGD with momentum and a per-step StepLR; conv2 frozen by the user."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, momentum=0.9, **kwargs)
        self.net.conv2.weight.requires_grad_(False)

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 5, 0.5), "interval": "step"}}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_phase_leaves_main_optimizer_scheduler_flags_and_modes_untouched_bf16():
    cb = SpyKFPF(k=3, iterations=10, buffer_size=100, variant="kd")
    _fit([cb], epochs=1, model_cls=ScheduledClassifier, precision="bf16-mixed", accumulate_grad_batches=2)
    # 5 experiences x ceil(9 / 2) optimizer steps
    assert cb.schedule == [8, 16, 25] and len(cb.records) == 3
    assert [e["step"] for e in cb.phase_log] == cb.schedule
    stats = ("running_mean", "running_var", "num_batches_tracked")
    selected = set(cb.selection.params) | {f"{m}.{s}" for m in cb.selection.norm_with_stats for s in stats}
    for rec, log in zip(cb.records, cb.phase_log):
        b = rec["before"]
        assert _equal(rec["opt_after"], b["opt"]) and b["opt"]["state"], "main optimizer state changed"
        assert _equal(rec["sched_after"], b["sched"]), "main scheduler changed"
        assert rec["flags"] == b["flags"] and not b["flags"]["net.conv2.weight"]
        assert rec["modes"] == b["modes"] and all(b["modes"].values())
        assert _equal(rec["grads"], b["grads"]), "phase gradients leaked into the main ones"
        assert rec["changed"] and rec["changed"] <= selected, rec["changed"] - selected
        assert {"net.bn1.running_mean", "net.head.weight", "net.conv1.weight"} <= rec["changed"]
        assert log["lr"] == DEFAULT_FPF_LR and b["lr"] < 0.05  # the phases' own lr, not the decayed main one
    assert cb.autocast_dtypes == {torch.bfloat16}  # phases run under the trainer's autocast
    assert all(p.dtype == torch.float32 for p in cb.selection.params.values())


def test_fpf_after_replay_needs_its_place_and_helps():
    with pytest.raises(ValueError, match="must come before ExperienceReplay"):
        _fit([ExperienceReplay(buffer_size=50), FPF(buffer_size=50)], epochs=1)
    acc_er, _, _ = _fit([ExperienceReplay(buffer_size=200)])
    fpf = FPF(iterations=100, buffer_size=200, variant="kd", buffer_from="own")  # KD: a buffer with logits
    acc_fpf, trainer, _ = _fit([fpf, ExperienceReplay(buffer_size=200)])
    assert fpf.schedule == [135] and fpf.phases_done == 1
    assert fpf.buffer.num_seen == 3 * 1348  # only the current samples, not the replayed ones
    # the stored logits are the current samples' rows of the (current + replayed) forward
    agree = (fpf.buffer.data["logits"].argmax(1) == fpf.buffer.data["y"]).float().mean()
    assert agree > 0.5, agree  # 0.73 here; the replayed rows' logits would agree ~0.2
    assert acc_fpf > acc_er + 0.05, (acc_er, acc_fpf)
    with pytest.raises(TypeError, match="fixes k"):
        FPF(k=2)


def test_per_experience_fits_follow_the_whole_stream_schedule():
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    cb = KFPF(k=2, iterations=5, buffer_size=50, at_end=False, sensitivity="selected")
    for exp in range(5):
        dm.set_experience(exp)
        trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[cb], max_epochs=1))
        trainer.fit(model, datamodule=dm)
    assert cb.steps == 45 and cb.schedule == [22, 44]
    assert [e["step"] for e in cb.phase_log] == [22, 44]
    assert len(cb.sensitivity.history) == 5 and set(cb.sensitivity.history[0]["scores"]) == {
        "net.head", "net.bn1", "net.bn1.running_stats", "net.bn2", "net.bn2.running_stats", "net.conv1"}
    assert [h["experience"] for h in cb.sensitivity.history] == list(range(5))


def _resume_run(tmp: Path, stop_after=None, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=2, batch_size=32)
    model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, momentum=0.9, backbone_kwargs={"width": 8})
    cb = KFPF(k=4, iterations=10, buffer_size=64, variant="kd")
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    callbacks = [cb, ckpt] + ([StopAfter(stop_after)] if stop_after is not None else [])
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, cb


def test_checkpoint_resume_restores_buffer_schedule_and_weights_exactly(tmp_path):
    _, model_u, cb_u = _resume_run(tmp_path / "full")
    assert cb_u.schedule == [22, 44, 66, 90]
    _, _, cb_a = _resume_run(tmp_path / "stopped", stop_after=1)
    assert cb_a.steps == 36 and cb_a.phases_done == 1  # stopped mid-stream, between two phases
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=3.ckpt"
    trainer_b, model_b, cb_b = _resume_run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert trainer_b.global_step == 90 and cb_b.steps == 90 and cb_b.phases_done == 4
    assert cb_b.phase_log == cb_u.phase_log
    assert cb_b.buffer.num_seen == cb_u.buffer.num_seen
    for key, value in cb_u.buffer.data.items():
        assert torch.equal(cb_b.buffer.data[key], value), key
    assert torch.equal(cb_b.buffer.generator.get_state(), cb_u.buffer.generator.get_state())
    assert cb_b.sensitivity.history == cb_u.sensitivity.history
    assert cb_b.ledger == cb_u.ledger
    for (name, p_u), p_b in zip(model_u.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(p_b, p_u, rtol=0, atol=0, msg=name)


DDP_SCRIPT = """
import json, os
import lightning.pytorch as pl
import torch
import torch.distributed as dist
from callbacks.kfpf import KFPF
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits


class Compare(pl.Callback):
    # gathers both ranks' weights and normalization statistics right after every phase

    def __init__(self):
        self.phases_seen = 0
        self.param_diffs, self.stats_diffs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        kfpf = trainer.callbacks[0]
        if kfpf.phases_done == self.phases_seen:
            return
        self.phases_seen = kfpf.phases_done
        params = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        stats = torch.cat([b.detach().float().flatten() for b in pl_module.buffers()])
        mine = torch.cat([params, stats, kfpf.buffer.data["y"].float()[:64]])
        gathered = [torch.zeros_like(mine) for _ in range(2)]
        dist.all_gather(gathered, mine)
        n, m = params.numel(), stats.numel()
        self.param_diffs.append(float((gathered[0][:n] - gathered[1][:n]).abs().max()))
        self.stats_diffs.append(float((gathered[0][n:n + m] - gathered[1][n:n + m]).abs().max()))
        self.buffers_differ = bool((gathered[0][n + m:] != gathered[1][n + m:]).any())

    def on_train_end(self, trainer, pl_module):
        kfpf = trainer.callbacks[0]
        self.result = dict(
            param_diffs=self.param_diffs, stats_diffs=self.stats_diffs, buffers_differ=self.buffers_differ,
            schedule=kfpf.schedule, phase_steps=[e["step"] for e in kfpf.phase_log],
            global_step=trainer.global_step, num_seen=kfpf.buffer.num_seen,
            acc=sum(float(trainer.callback_metrics[f"val/acc_exp{j}"]) for j in range(5)) / 5,
        )


if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=2, batch_size=16)
    model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    compare = Compare()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         precision="bf16-mixed",
                         callbacks=[KFPF(k=3, iterations=20, buffer_size=64, variant="kd", seed=0), compare])
    trainer.fit(model, datamodule=dm)
    if trainer.global_rank == 0:
        with open(os.environ["RESULT_PATH"], "w") as f:
            json.dump(compare.result, f)
"""


def test_ddp_replicas_stay_identical(tmp_path):
    res = run_script(DDP_SCRIPT, tmp_path, timeout=300)
    # 2 ranks: 130-138 samples per rank per experience, batch 16 -> 9 steps; 5 x 2 epochs
    assert res["global_step"] == 90 and res["schedule"] == [30, 60, 90] and res["phase_steps"] == [30, 60, 90]
    assert res["param_diffs"] == [0.0] * 3, res  # weights identical after every phase
    assert res["stats_diffs"] == [0.0] * 3, res  # re-estimated running statistics too
    assert res["buffers_differ"], "each rank keeps its own buffer over its shard"
    assert res["num_seen"] == 2 * sum(math.ceil(n / 2) for n in (273, 260, 273, 276, 266))
    assert res["acc"] > 0.35, res  # naive ends near 0.2 on this stream


class _NoGradProbe(pl.Callback):
    """Another callback's forward without gradients in on_train_batch_start (e.g. FLOP counting)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            pl_module(batch[0][:1])


def test_kd_stores_the_training_forwards_logits_not_another_callbacks_probe():
    cb = KFPF(k=2, iterations=5, buffer_size=64, variant="kd")
    _fit([cb, _NoGradProbe()], epochs=1, limit_val_batches=1)
    assert cb.buffer.data["logits"].shape == (64, 10) and cb.phases_done == 2
