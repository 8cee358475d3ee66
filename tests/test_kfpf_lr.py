"""k-FPF's phases keep their own learning rate when the main optimizer's schedule decays to about 0."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from callbacks.kfpf import DEFAULT_FPF_LR, FPF
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.test_kfpf_monitoring import PhaseDeltas


class Decaying(ContinualClassifier):
    """The main learning rate halves every 3 optimizer steps: after the stream's 45 steps it is
    0.05 * 0.5**15, about 1.5e-6."""

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** (step / 3))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(callbacks):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    model = Decaying("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, limit_val_batches=1))
    trainer.fit(model, datamodule=dm)
    return trainer


def test_last_phase_uses_the_fixed_phase_lr_under_a_decaying_schedule():
    kfpf = PhaseDeltas(k=2, iterations=20, buffer_size=64)
    trainer = _fit([kfpf])
    main_lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert trainer.global_step == 45 and main_lr < 1e-5  # the schedule has decayed
    assert [e["lr"] for e in kfpf.phase_log] == [DEFAULT_FPF_LR, DEFAULT_FPF_LR]
    # the last phase (on the last step) really trains the head: the move of a phase at lr 0.05, not ~1e-6
    _, last = kfpf.deltas[-1]
    assert float(last.abs().mean()) > 1e-3, float(last.abs().mean())


def test_fpf_lr_is_the_given_one():
    fpf = FPF(iterations=5, lr=0.2)
    _fit([fpf])
    assert [e["lr"] for e in fpf.phase_log] == [pytest.approx(0.2)]
