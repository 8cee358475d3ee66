"""``ContinualCallback``: Lightning epoch hooks turned into experience hooks (ARCHITECTURE.md 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
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
    exactly. Each term is logged as ``<name>`` (``<name>_step`` and ``<name>_epoch`` for the loggers) through
    :meth:`log_step_values`: where Lightning writes step metrics and at the last batch of each epoch, the
    step value being the term's mean since the previous write and the epoch value its exact epoch mean; a
    NaN or infinite term raises ``FloatingPointError`` naming it there, with no host sync on the other steps.
    """

    def __init__(self) -> None:
        super().__init__()
        self.aux = AuxLossTracker()
        # per name: sum of the values since the last write, their number of steps, the first step, and what
        # the value is (for the non-finite error)
        self._step_window: dict[str, tuple[Tensor, int, int, str]] = {}

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
        values: dict[str, Tensor] = dict(self.aux.pop_means(check_finite=False))
        what = dict.fromkeys(values, "auxiliary loss term")
        extra = self.step_values(trainer, pl_module)
        values.update(extra)
        what.update(dict.fromkeys(extra, self.step_value_kind))
        if values:
            self.log_step_values(trainer, pl_module, batch_idx, values, what=what)

    #: how :meth:`step_values`' entries are named in the error raised when one is non-finite
    step_value_kind = "logged value"

    def step_values(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Mapping[str, Tensor]:
        """Values of this training step to log beside the auxiliary loss terms, in the same write (one host
        read at a logging step for all of them); called from ``on_train_batch_end``. None by default."""
        return {}

    def log_step_values(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int,
                        values: Mapping[str, Tensor], what: str | Mapping[str, str] = "logged value") -> None:
        """Logs one value per name for this training step, as ``pl_module.log(name, on_step=True,
        on_epoch=True)`` every step would for the loggers, without its per-step cost: the values are summed
        where they live and logged where Lightning writes step metrics and at each epoch's last batch
        (:func:`cl_plugins.steplog.log_this_step`) as the mean since the previous write, weighted by its number
        of steps, so the epoch means are exact. A NaN or infinite value raises ``FloatingPointError`` there.
        ``what`` names the values in that error (one string, or one per name). Call it from
        ``on_train_batch_end``, at most once per step per name (the base class's call logs the auxiliary terms
        and :meth:`step_values` together)."""
        for name, value in values.items():
            total, steps, start, _ = self._step_window.get(name, (0.0, 0, trainer.global_step, ""))
            kind = what if isinstance(what, str) else what.get(name, "logged value")
            self._step_window[name] = (value.detach() + total, steps + 1, start, kind)
        if not log_this_step(trainer, batch_idx):
            return
        names = list(self._step_window)  # every open window: also names not given at this step
        windows = [self._step_window.pop(name) for name in names]
        totals = torch.stack([w[0].float() for w in windows]).tolist()  # one host read per write
        for name, total, (_, _, start, kind) in zip(names, totals, windows):
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"{kind} '{name}' was non-finite ({total}) in the steps "
                    f"since step {start}: lower its weight or the learning rate, or train in bf16-mixed / 32-true "
                    "if it overflows in 16-mixed"
                )
        for name, (total, steps, _, _) in zip(names, windows):
            pl_module.log(name, total / steps, on_step=True, on_epoch=True, prog_bar=False, sync_dist=False,
                          batch_size=steps)
