"""Extra loss terms that ride on the autograd graph (ARCHITECTURE.md section 2).

A method that needs ``loss + term`` without touching the user's ``training_step`` attaches
``term`` to a tensor that the loss depends on (a module output) with :func:`attach_aux_loss`.
The forward is the identity; the backward passes the output gradient through unchanged and
seeds ``term``'s gradient with the factor by which Lightning scales the loss before
``backward`` (``1 / accumulate_grad_batches`` times the fp16 ``GradScaler`` scale). The result
is exactly the gradient of ``loss + term``: one backward, DDP's gradient sync, AMP scaling and
gradient accumulation all work unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor


class AuxLossTracker:
    """Holds the backward seed factor and the detached values of the terms of one step.

    One tracker belongs to one callback. :meth:`update_seed` is called from the callback's
    ``on_before_backward`` (after the forward, before the backward), and the backward of every
    term attached in that step reads the factor then.
    """

    def __init__(self) -> None:
        self.seed: float | Tensor = 1.0
        self._values: dict[str, list[Tensor]] = defaultdict(list)

    def update_seed(self, trainer: Any) -> None:
        """Reads the loss scaling that Lightning applies before ``backward`` from ``trainer``."""
        factor: float | Tensor = 1.0
        module = trainer.lightning_module
        if module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            factor = 1.0 / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # the scale tensor stays on the device: no host sync in the hot path
            factor = scaler._get_scale_async() * factor
        self.seed = factor

    def record(self, name: str, value: Tensor) -> None:
        """Keeps a detached copy of a term's value for logging."""
        self._values[name].append(value.detach().float())

    def pop_means(self, check_finite: bool = True) -> dict[str, Tensor]:
        """Mean value of each term recorded since the last call, then forgets them.

        Raises ``FloatingPointError`` naming the term when one was NaN or infinite; ``check_finite=False``
        leaves that check (a host read of every value) to the caller.
        """
        out = {k: torch.stack(v).mean() for k, v in self._values.items() if v}
        self._values.clear()
        if not check_finite:
            return out
        for name, value in out.items():
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"auxiliary loss term '{name}' is {value.item()}: lower its weight or the "
                    "learning rate, or train in bf16-mixed / 32-true if it overflows in 16-mixed"
                )
        return out


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``output``; seeds ``term``'s gradient with the tracker's factor."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, term: Tensor, tracker: AuxLossTracker | None) -> Tensor:
        ctx.tracker = tracker
        ctx.term_shape = term.shape
        ctx.term_dtype = term.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, Tensor, None]:
        seed = 1.0 if ctx.tracker is None else ctx.tracker.seed
        grad_term = torch.ones(ctx.term_shape, dtype=ctx.term_dtype, device=grad_output.device)
        if isinstance(seed, Tensor):
            grad_term = grad_term * seed.to(device=grad_output.device, dtype=ctx.term_dtype)
        elif seed != 1.0:
            grad_term = grad_term * seed
        return grad_output, grad_term, None


def attach_aux_loss(
    output: Tensor,
    term: Tensor,
    tracker: AuxLossTracker | None = None,
    name: str | None = None,
) -> Tensor:
    """Returns ``output`` unchanged, with ``term`` added to whatever loss ``output`` reaches.

    ``term`` must be a scalar. Outside training (no grad, or ``term`` without a graph) nothing is
    attached or recorded. With a ``tracker`` the term's value is recorded under ``name`` for
    logging and its gradient is seeded with the tracker's loss-scaling factor.
    """
    if term.dim() != 0:
        raise ValueError(f"an auxiliary loss term must be a scalar, got shape {tuple(term.shape)}")
    if not (torch.is_grad_enabled() and term.requires_grad):
        return output
    if tracker is not None and name is not None:
        tracker.record(name, term)
    return _AttachAuxLoss.apply(output, term, tracker)
