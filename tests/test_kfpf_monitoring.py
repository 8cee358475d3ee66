"""What k-FPF measures and logs in real training: sensitivity scores without the phases' own
updates, ``freeze_norm_stats`` at the callback level, and the logged compute ledger by hand."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from callbacks.kfpf import KFPF
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import RecordingLogger
from tests.tolerances import EPS32, ULPS


def _fit(callbacks, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, **trainer_kwargs))
    trainer.fit(model, datamodule=dm)
    return trainer, model


def _head(pl_module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in pl_module.net.head.parameters(recurse=False)])


class PhaseDeltas(KFPF):
    """Records the epoch and the head's change of every phase."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.deltas: list[tuple[int, torch.Tensor]] = []

    def run_phase(self, trainer, pl_module):
        before = _head(pl_module)
        result = super().run_phase(trainer, pl_module)
        self.deltas.append((trainer.current_epoch, _head(pl_module) - before))
        return result


class EpochHeads(pl.Callback):
    """The head at every epoch's start and end (placed after k-FPF: the end is after its phases)."""

    def __init__(self):
        self.start, self.end = {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.start[trainer.current_epoch] = _head(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.end[trainer.current_epoch] = _head(pl_module)


@pytest.mark.parametrize("k", [5, 4], ids=["phases-on-last-steps", "phases-mid-epoch"])
def test_sensitivity_scores_the_training_not_the_phases(k):
    """9 steps per epoch: k=5 runs a phase on each epoch's last step (after steps 9, 18, ...), k=4
    inside epochs (after 11, 22, 33, 45). Either way the head's score is the change of the training
    steps alone: (end - start - phase changes) of the epoch."""
    cb = PhaseDeltas(k=k, iterations=20, lr=0.2, buffer_size=64, sensitivity="selected")
    heads = EpochHeads()
    _fit([cb, heads], limit_val_batches=1)
    assert cb.phases_done == k and len(cb.sensitivity.history) == 5
    phase_moved = False
    for entry in cb.sensitivity.history:
        e = entry["epoch"]
        phases = sum((d for ep, d in cb.deltas if ep == e), torch.zeros_like(heads.start[e]))
        training = heads.end[e] - heads.start[e] - phases
        expected = float(training.abs().mean())
        # both sides take differences of float32 weights and phase changes: eps of their sizes, averaged
        phase_sizes = sum((d.abs() for ep, d in cb.deltas if ep == e), torch.zeros_like(heads.start[e]))
        rounding = ULPS * EPS32 * float((heads.end[e].abs() + heads.start[e].abs() + 2 * phase_sizes).mean())
        assert entry["scores"]["net.head"] == pytest.approx(expected, abs=rounding), e
        with_phases = float((heads.end[e] - heads.start[e]).abs().mean())
        phase_moved |= abs(with_phases - expected) > 0.1 * expected
    assert phase_moved, "the phases must move the head for this test to tell the two scores apart"


class NormStats(KFPF):
    """Records the running statistics and the normalization weights around every phase."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.records = []

    def run_phase(self, trainer, pl_module):
        def take():
            return {n: b.clone() for n, b in pl_module.named_buffers() if "running" in n} | {
                n: p.detach().clone() for n, p in pl_module.named_parameters() if ".bn" in n}

        before = take()
        result = super().run_phase(trainer, pl_module)
        self.records.append((before, take()))
        return result


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_norm_stats_keeps_running_statistics_through_a_phase(freeze):
    cb = NormStats(k=2, iterations=5, buffer_size=64, freeze_norm_stats=freeze)
    _fit([cb], limit_train_batches=2, limit_val_batches=0)
    assert len(cb.records) == 2
    for before, after in cb.records:
        stats = [n for n in before if "running" in n]
        assert stats and {n for n in before if ".bn" in n and "running" not in n}
        for name in before:
            same = torch.equal(before[name], after[name])
            if "running" in name:
                assert same == freeze, name  # frozen: untouched; else re-estimated on buffer batches
            else:
                assert not same, name  # the affine parameters are fine-tuned either way


def test_logged_ledger_equals_hand_computed_values():
    """2 steps of 32 samples per epoch, 5 epochs: phases after steps 5 and 10 (epochs 2 and 4) of
    3 iterations on 8 buffer samples. Cost model: training 3F per sample, FPF 2F per sample,
    replay 3F per training sample, so fpf_share = 2f / (3t + 2f), fpf_vs_replay = 2f / 3t."""
    cb = KFPF(k=2, iterations=3, batch_size=8, buffer_size=20)
    logger = RecordingLogger()
    _fit([cb], logger=logger, limit_train_batches=2, limit_val_batches=0)
    assert cb.schedule == [5, 10] and [e["step"] for e in cb.phase_log] == [5, 10]
    rows = [r for r, _ in logger.rows if "kfpf/fpf_share" in r]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]
    for epoch, row in enumerate(rows):
        t = 64 * (epoch + 1)
        phases = (epoch >= 2) + (epoch >= 4)
        f = phases * 3 * 8
        assert row["kfpf/fpf_iterations"] == 3 * phases
        assert row["kfpf/fpf_share"] == pytest.approx(2 * f / (3 * t + 2 * f), rel=1e-6)
        assert row["kfpf/fpf_vs_replay"] == pytest.approx(2 * f / (3 * t), rel=1e-6)
    assert rows[-1]["kfpf/fpf_share"] == pytest.approx(96 / 1056, rel=1e-6)
    assert cb.compute_report()["fpf_samples"] == 48 and cb.ledger.train_samples == 320
