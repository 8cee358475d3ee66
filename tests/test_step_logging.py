"""Per-step logging at Lightning's logging steps only: ``train/loss`` and the auxiliary terms reach the loggers
with the values of those steps (terms: the mean since the previous write, epoch means exact), ``self.log`` is
not called on the other steps, and non-finite values raise at the next logging step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger

from callbacks import ContinualCallback
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import RecordingLogger

EVERY = 4


class CountingClassifier(ContinualClassifier):
    """Counts ``self.log("train/loss", ...)`` calls."""

    def __init__(self, **kw: Any) -> None:
        super().__init__("mlp", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"hidden": 16}, lr=0.05, **kw)
        self.loss_logs = 0

    def log(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.loss_logs += name == "train/loss"
        super().log(name, *args, **kwargs)


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.last_batches: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if batch_idx + 1 == trainer.num_training_batches:
            self.last_batches.append(len(self.losses) - 1)


class ToyTerm(ContinualCallback):
    """Attaches a term whose value is ``values(k)`` at the k-th training step (0-based, over the whole fit)."""

    def __init__(self, values: Any) -> None:
        super().__init__()
        self.values = values
        self.k = 0

    def setup(self, trainer, pl_module, stage):
        def hook(module, inputs, output):
            term = module.weight.sum() * 0 + float(self.values(self.k))
            return self.attach_loss(output, term, "toy/term")

        pl_module.net.head.register_forward_hook(hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.k += 1


def _fit(*callbacks: pl.Callback, logger: Logger | bool = False) -> tuple[pl.Trainer, CountingClassifier]:
    pl.seed_everything(0, verbose=False)
    model = CountingClassifier()
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=list(callbacks), logger=logger, log_every_n_steps=EVERY,
                                                limit_val_batches=0))
    trainer.fit(model, datamodule=SplitDigits(n_experiences=5, batch_size=16))
    return trainer, model


def test_train_loss_is_logged_at_lightnings_logging_steps_with_their_values():
    logger, losses = RecordingLogger(), LossRecorder()
    trainer, model = _fit(losses, logger=logger)
    steps = len(losses.losses)
    logged = logger.values("train/loss")
    # Lightning's rule: every EVERY-th step; the values are those of the steps themselves
    assert sorted(logged) == [k for k in range(steps) if (k + 1) % EVERY == 0]
    for k, value in logged.items():
        assert value == pytest.approx(losses.losses[k], rel=1e-6)
    # self.log ran only there and at the last batch of each epoch (callback_metrics end each epoch with the
    # last step's loss, as with logging every step), not on every one of the steps
    assert model.loss_logs == len(set(logged) | set(losses.last_batches)) < steps / 2
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(losses.losses[-1], rel=1e-6)


def test_aux_terms_log_window_means_and_exact_epoch_means():
    logger, losses = RecordingLogger(), LossRecorder()
    trainer, _ = _fit(ToyTerm(lambda k: k), losses, logger=logger)
    steps = len(losses.losses)
    ends = losses.last_batches
    written = sorted({k for k in range(steps) if (k + 1) % EVERY == 0} | set(ends))
    step_values = logger.values("toy/term_step")
    assert sorted(step_values) == [k for k in written if (k + 1) % EVERY == 0]
    for previous, k in zip([-1, *written], written):
        if k in step_values:  # the mean of the steps since the previous write
            assert step_values[k] == pytest.approx(sum(range(previous + 1, k + 1)) / (k - previous))
    epoch_values = list(logger.values("toy/term_epoch").values())
    starts = [0] + [e + 1 for e in ends[:-1]]
    assert epoch_values == pytest.approx([sum(range(a, b + 1)) / (b + 1 - a) for a, b in zip(starts, ends)])
    assert float(trainer.callback_metrics["toy/term_epoch"]) == pytest.approx(epoch_values[-1])


def test_non_finite_values_raise_at_the_next_logging_step():
    losses = LossRecorder()
    with pytest.raises(FloatingPointError, match=r"auxiliary loss term 'toy/term' was non-finite \(nan\)"):
        _fit(ToyTerm(lambda k: float("nan") if k == 1 else 0.0), losses)
    assert len(losses.losses) == EVERY - 1  # raised in the step where Lightning logs, not every step checked

    class NanLoss(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                batch[0].fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"training loss is non-finite \(nan\) at a step in 4..7"):
        _fit(NanLoss())


class ToyTermAndStatistic(ToyTerm):
    """``ToyTerm`` plus a step value from :meth:`ContinualCallback.step_values` (``stat(k)`` at step k)."""

    step_value_kind = "toy statistic"

    def __init__(self, values: Any, stat: Any) -> None:
        super().__init__(values)
        self.stat = stat

    def step_values(self, trainer, pl_module):
        return {"toy/stat": torch.tensor(float(self.stat(self.k)))}


def test_step_values_go_out_with_the_aux_terms_in_one_host_read(monkeypatch):
    logger, losses = RecordingLogger(), LossRecorder()
    reads = []
    tolist = torch.Tensor.tolist

    def counting_tolist(t):
        reads.append(t.numel())
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    _fit(ToyTermAndStatistic(lambda k: k, lambda k: 2 * k), losses, logger=logger)
    monkeypatch.undo()
    steps = len(losses.losses)
    writes = {k for k in range(steps) if (k + 1) % EVERY == 0} | set(losses.last_batches)
    assert reads.count(2) == len(writes) and 1 not in reads  # both values in one read per write
    terms, stats = logger.values("toy/term_step"), logger.values("toy/stat_step")
    assert sorted(stats) == sorted(terms) and all(stats[k] == pytest.approx(2 * terms[k]) for k in terms)
    with pytest.raises(FloatingPointError, match=r"toy statistic 'toy/stat' was non-finite \(inf\)"):
        _fit(ToyTermAndStatistic(lambda k: 0.0, lambda k: float("inf") if k == 1 else 0.0))
