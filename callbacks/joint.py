"""Joint training: the upper-bound reference that sees every experience's data at once."""

from __future__ import annotations

import lightning.pytorch as pl

from callbacks.base import ContinualCallback


class JointTraining(ContinualCallback):
    """Switches the stream to joint mode: one phase of ``epochs_per_experience`` epochs over the
    union of all training experiences, validated on every test experience (one matrix row).

    Naive fine-tuning, the lower reference, is the stream with no mitigation callback at all.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dm = self.stream(trainer)
        if dm.pinned_experience is not None:
            raise ValueError("JointTraining trains on all experiences at once: unpin the datamodule "
                             "(set_experience(None)) and call fit once")
        dm.joint = True
        if stage == "fit":
            dm.check_trainer(trainer)
