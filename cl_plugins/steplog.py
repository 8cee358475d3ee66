"""Per-step logging without per-step costs: when to call ``self.log``, and a non-finite check without host syncs.

``LightningModule.log`` costs about as much as a small model's whole training step, and reading a device value
(``bool(torch.isfinite(loss))``, ``.item()``) makes the host wait for the device every step. Lightning itself
writes step metrics to the loggers only every ``log_every_n_steps`` steps, so per-step values are logged at
those steps (and at the last batch of each epoch, so that ``callback_metrics`` and the progress bar end every
epoch with the last step's values, as with logging every step), and device values are checked for NaN/inf when
they are logged, a moment at which Lightning reads them anyway.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def is_last_train_batch(trainer: Any, batch_idx: int) -> bool:
    """Whether ``batch_idx`` is the last training batch of the epoch (also under ``limit_train_batches``)."""
    loop = trainer.fit_loop.epoch_loop
    return bool(loop.batch_progress.is_last_batch) or batch_idx + 1 >= trainer.num_training_batches


def log_this_step(trainer: Any, batch_idx: int) -> bool:
    """Whether to ``self.log`` per-step training values at batch ``batch_idx``: where Lightning writes step
    metrics to the loggers (every ``log_every_n_steps`` optimizer steps, when stopping, and every step of a
    ``fast_dev_run``: Lightning's own rule, the same value in ``training_step`` and ``on_train_batch_end``)
    and at the last batch of each epoch. Without a trainer (a module called directly): always."""
    if trainer is None:
        return True
    if trainer.fast_dev_run:
        return True
    try:
        lightning_rule = bool(trainer._logger_connector.should_update_logs)
    except AttributeError:  # another Lightning version: log every step, as before
        return True
    return lightning_rule or is_last_train_batch(trainer, batch_idx)


class NonFiniteWatch:
    """Notices a NaN or infinite value among the values observed since the last :meth:`check`.

    The values are summed where they live (one addition per step, no host sync; a sum of finite losses does not
    overflow float32 in practice) and the sum is read at :meth:`check`, so a report names the steps since the
    previous check. The same on every device, so CPU runs report what accelerator runs report.
    """

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._count = 0

    def observe(self, value: Tensor) -> None:
        """Records ``value`` (any shape) of one step."""
        value = value.detach()
        if value.dim():
            value = value.sum()
        if value.dtype in (torch.float16, torch.bfloat16):  # a 16-bit sum of many losses could overflow
            value = value.float()
        self._sum = value if self._sum is None else self._sum + value
        self._count += 1

    def check(self, step: int) -> str | None:
        """``None`` if every value observed since the last check was finite, else where one was not
        (``"non-finite (nan) at step 12"``, ``"non-finite (inf) at a step in 10..19"``, counting the observed
        steps back from ``step``, the current one); then forgets them."""
        if self._sum is None:
            return None
        total, count = self._sum, self._count
        self._sum, self._count = None, 0
        value = float(total)  # the one host read, at a logging step
        if math.isfinite(value):
            return None
        steps = f"step {step}" if count == 1 else f"a step in {step - count + 1}..{step}"
        return f"non-finite ({value}) at {steps}"
