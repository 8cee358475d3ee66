"""``ContinualCallback``: Lightning epoch hooks turned into experience hooks (ARCHITECTURE.md 2)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from cl_plugins.aux_loss import AuxLossTracker, attach_aux_loss
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

    Subclasses with extra loss terms use :meth:`attach_loss`; the terms are logged as
    ``<name>`` each step and their gradients follow Lightning's loss scaling exactly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.aux = AuxLossTracker()

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
        for name, value in self.aux.pop_means().items():
            pl_module.log(name, value, on_step=True, on_epoch=True, prog_bar=False, sync_dist=False)
