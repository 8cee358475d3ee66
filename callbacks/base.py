"""``ContinualCallback``: Lightning epoch hooks turned into experience hooks (ARCHITECTURE.md 2)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from cl_plugins.aux_loss import AuxLossTracker, attach_aux_loss
from cl_plugins.steplog import log_this_step
from datamodules.stream import ContinualDataModule


def get_stream(trainer: pl.Trainer) -> ContinualDataModule:
    """The trainer's ``ContinualDataModule``, or a clear error when it has none."""
    dm = getattr(trainer, "datamodule", None)
    if not isinstance(dm, ContinualDataModule):
        raise TypeError(
            "continual callbacks need the stream as a ContinualDataModule: call "
            "trainer.fit(model, datamodule=dm) with a datamodules.ContinualDataModule "
            f"(got {type(dm).__name__ if dm is not None else 'no datamodule'})"
        )
    return dm


class ContinualCallback(Callback):
    """Base of every mitigation: adds ``on_experience_start`` / ``on_experience_end``.

    Boundaries are derived from ``trainer.current_epoch`` and the datamodule, so they are
    right after resuming from a checkpoint and when a user calls ``fit`` once per experience.
    Subclasses that override the epoch hooks must call ``super()``.

    Subclasses with extra loss terms use :meth:`attach_loss`; their gradients follow Lightning's loss scaling
    exactly. Each term is logged as ``<name>`` (``<name>_step`` and ``<name>_epoch`` for the loggers) where
    Lightning writes step metrics and at the last batch of each epoch
    (:func:`cl_plugins.steplog.log_this_step`): the step value is the term's mean over the steps since the
    previous write, the epoch value its mean over the epoch's steps (exact: each write counts its steps).
    A NaN or infinite term raises ``FloatingPointError`` naming it at those steps; no host sync on the
    others.
    """

    def __init__(self) -> None:
        super().__init__()
        self.aux = AuxLossTracker()
        # per term: sum of the step means since the last write, and how many steps it holds
        self._aux_window: dict[str, tuple[Tensor, int]] = {}
        self._aux_window_start = 0

    # ---- experience hooks for subclasses
    def on_experience_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> None:
        """Called before the first training batch of ``experience``."""

    def on_experience_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> None:
        """Called after the last training epoch of ``experience`` (after its validation)."""

    # ---- helpers
    @staticmethod
    def stream(trainer: pl.Trainer) -> ContinualDataModule:
        """The trainer's stream datamodule."""
        return get_stream(trainer)

    def attach_loss(self, output: Tensor, term: Tensor, name: str) -> Tensor:
        """Adds ``term`` to the loss that ``output`` reaches (identity on ``output``)."""
        return attach_aux_loss(output, term, self.aux, name)

    # ---- Lightning hooks
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = self.stream(trainer)
        epoch = trainer.current_epoch
        if dm.is_experience_start(epoch):
            self.on_experience_start(trainer, pl_module, dm.experience_at_epoch(epoch))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = self.stream(trainer)
        epoch = trainer.current_epoch
        if dm.is_experience_end(epoch):
            self.on_experience_end(trainer, pl_module, dm.experience_at_epoch(epoch))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.aux.update_seed(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        means = self.aux.pop_means(check_finite=False)
        if means and not self._aux_window:
            self._aux_window_start = trainer.global_step
        for name, value in means.items():
            total, steps = self._aux_window.get(name, (0.0, 0))
            self._aux_window[name] = (value + total, steps + 1)
        if not self._aux_window or not log_this_step(trainer, batch_idx):
            return
        names = list(self._aux_window)
        totals = torch.stack([self._aux_window[n][0] for n in names]).tolist()  # one host read per write
        for name, total in zip(names, totals):
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"auxiliary loss term '{name}' was non-finite ({total}) in the steps since step "
                    f"{self._aux_window_start}: lower its weight or the learning rate, or train in bf16-mixed / "
                    "32-true if it overflows in 16-mixed"
                )
        for name, (total, steps) in self._aux_window.items():
            pl_module.log(name, total / steps, on_step=True, on_epoch=True, prog_bar=False, sync_dist=False,
                          batch_size=steps)
        self._aux_window.clear()
