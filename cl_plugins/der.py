"""Dark Experience Replay, DER and DER++ (Buzzega et al., NeurIPS 2020), in plain torch.

Per training step, with ``f`` the model and ``B`` a buffer of ``(x, y, logits z)`` samples:

- DER adds ``alpha * MSE(f(x'), z')`` for a replay minibatch ``(x', z')`` drawn uniformly from ``B``;
- DER++ also adds ``beta * CE(f(x''), y'')`` for a *second*, independent draw ``(x'', y'')``;
- after the optimizer step, the step's current samples enter ``B`` (reservoir) with the logits of
  the step's own forward, computed before the step.

The current batch's cross-entropy is the caller's own loss. :class:`DarkExperienceReplay` computes the
replay terms given a function that runs the model on a buffer batch, and inserts samples; the
Lightning adapter is :class:`callbacks.der.DER`. Details taken from mammoth and every deviation:
``docs/methods/der.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_plugins.buffers import ReservoirBuffer


def check_weight(name: str, value: float) -> float:
    """``value`` as a float, or a clear error when it is negative or not finite."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite weight >= 0, got {value}")
    return value


def logit_matching_loss(outputs: Tensor, stored: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between ``outputs`` and the ``stored`` logits over all entries (mammoth's
    ``F.mse_loss``), in float32 at least; with a boolean ``mask`` of the same shape, the mean over the
    masked entries only."""
    if outputs.shape != stored.shape:
        raise ValueError(
            f"the model's outputs on buffer samples have shape {tuple(outputs.shape)} but the stored logits "
            f"{tuple(stored.shape)}: the model's number of outputs must stay what it was when the logits were stored"
        )
    dtype = torch.promote_types(outputs.dtype, torch.float32)
    diff = outputs.to(dtype) - stored.to(device=outputs.device, dtype=dtype)
    if mask is None:
        return diff.pow(2).mean()
    mask = mask.to(outputs.device)
    return diff.pow(2).masked_select(mask).sum() / mask.sum().clamp(min=1)


@dataclass
class ReplayTerms:
    """The weighted sum to add to the loss, and its unweighted parts (for logging)."""

    total: Tensor
    mse: Tensor
    ce: Tensor | None = None


#: ``forward(samples) -> logits`` on a buffer batch ``{"x", "y", "t", "logits", ...}``
ForwardFn = Callable[[dict[str, Tensor]], Tensor]


class DarkExperienceReplay:
    """DER (``beta = 0``) or DER++ (``beta > 0``) on a buffer that stores logits.

    Args:
        buffer: the buffer (``store_logits=True``); its generator draws the replay minibatches.
        alpha: weight of the logit-matching MSE.
        beta: weight of DER++'s cross-entropy on a second draw (0: DER, no second draw).
        batch_size: replay minibatch size (mammoth's ``minibatch_size``); ``None``: the current batch's size.
    """

    def __init__(self, buffer: ReservoirBuffer, alpha: float, beta: float = 0.0, batch_size: int | None = None) -> None:
        if not buffer.store_logits:
            raise ValueError("DER needs a buffer that stores logits (store_logits=True)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"the replay minibatch size must be >= 1, got {batch_size}")
        self.buffer = buffer
        self.alpha = check_weight("alpha", alpha)
        self.beta = check_weight("beta", beta)
        self.batch_size = batch_size

    def replay_terms(self, forward: ForwardFn, current_batch_size: int, device: torch.device | str | None = None,
                     ce_logits: Callable[[Tensor, Tensor], Tensor] | None = None,
                     logit_mask: Callable[[Tensor], Tensor] | None = None) -> ReplayTerms | None:
        """The replay terms of one step, or ``None`` while the buffer is empty.

        ``ce_logits(logits, task_labels)`` transforms the second draw's logits before the
        cross-entropy (e.g. task-IL masking); ``logit_mask(task_labels)`` gives the boolean
        ``(batch, classes)`` entries that enter the MSE (default: all).
        """
        if len(self.buffer) == 0:
            return None
        size = self.batch_size or current_batch_size
        first = self.buffer.sample(size, device=device)
        outputs = forward(first)
        mask = logit_mask(first["t"]) if logit_mask is not None else None
        mse = logit_matching_loss(outputs, first["logits"], mask)
        total = self.alpha * mse
        ce = None
        if self.beta > 0:
            second = self.buffer.sample(size, device=device)  # independent of the first draw
            logits = forward(second)
            if ce_logits is not None:
                logits = ce_logits(logits, second["t"])
            dtype = torch.promote_types(logits.dtype, torch.float32)
            ce = F.cross_entropy(logits.to(dtype), second["y"].to(logits.device))
            total = total + self.beta * ce
        return ReplayTerms(total=total, mse=mse, ce=ce)

    def insert(self, x: Tensor, y: Tensor, task_labels: Tensor, logits: Tensor) -> int:
        """Offers the step's current samples with the logits of the step's forward (reservoir)."""
        if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
            raise ValueError(f"DER stores one row of logits per sample: got logits of shape {tuple(logits.shape)} "
                             f"for {y.shape[0]} samples")
        return self.buffer.add(x, y, task_labels, logits=logits)
