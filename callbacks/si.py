"""Synaptic Intelligence (Zenke et al. 2017) as a Lightning callback, following Mammoth's ``models/si.py``.

Every optimizer step adds ``-g * (theta_after - theta_before)`` to the path integral ``omega``
(:mod:`cl_plugins.baselines.si`); at each experience end ``Omega += omega / ((theta - theta*)^2 + xi)``,
``theta* <- theta`` and ``omega <- 0``. Later steps add ``c * sum_k Omega_k (theta_k - theta*_k)^2``
through the aux-loss op (:mod:`callbacks.quadratic`), logged as ``si/penalty``.

Where ``g`` comes from (``path_gradient``):

- ``"task"`` (default; Zenke et al. and Mammoth today): the gradient of the loss without SI's own
  penalty, before clipping. It is read in ``on_before_optimizer_step`` (after the AMP unscale and
  DDP's all-reduce, before Lightning clips) minus the penalty's closed-form gradient times the
  backward seed of every attachment since the last step (``1 / accumulate_grad_batches`` each).
- ``"step"`` (Mammoth at the time of the DER paper, ``lr * g^2``): the gradient the optimizer
  stepped with (penalty included, after clipping), read after the step.

``theta_before`` is taken in ``on_before_optimizer_step`` and ``theta_after`` in
``on_train_batch_end``; under DDP both and the all-reduced gradients are the same on every rank,
so ``omega`` and ``Omega`` are too. Mammoth clips gradient values at 1 in SI's step: pass
``Trainer(gradient_clip_val=1.0, gradient_clip_algorithm="value")`` to match it.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from callbacks.quadratic import QuadraticPenalty
from cl_plugins.baselines.quadratic import check_same_keys
from cl_plugins.baselines.si import check_si_hparams, consolidate_importance, path_integral_step

PathGradient = Literal["task", "step"]


class SynapticIntelligence(QuadraticPenalty):
    """Synaptic Intelligence.

    Args:
        c: weight of the surrogate loss (Mammoth's ``--c``; best args 1.0 on Seq-MNIST, 0.5 on Seq-CIFAR-10).
        xi: damping ``xi > 0`` (best args 0.9 on Seq-MNIST, 1.0 on Seq-CIFAR-10).
        path_gradient: ``"task"`` or ``"step"`` (see the module docstring).

    The path integral assumes one optimizer stepping the regularized parameters once per training batch.
    """

    term_name = "si/penalty"

    def __init__(self, c: float = 1.0, xi: float = 0.9, path_gradient: PathGradient = "task") -> None:
        check_si_hparams(c, xi)
        if path_gradient not in ("task", "step"):
            raise ValueError(f"path_gradient must be 'task' (Zenke; Mammoth today) or 'step' (Mammoth of the DER "
                             f"paper), got {path_gradient!r}")
        super().__init__(c)
        self.xi = float(xi)
        self.path_gradient: PathGradient = path_gradient
        #: the running path integral of the current experience, float32, by name
        self.omega: dict[str, Tensor] | None = None
        self._before: dict[str, Tensor] | None = None
        self._grads: dict[str, Tensor] | None = None

    @property
    def c(self) -> float:
        """The penalty weight."""
        return self.weight

    def _grad_of(self, name: str) -> Tensor:
        p = self.params[name]
        if p.grad is None:
            return torch.zeros_like(p, dtype=torch.float32)
        return p.grad.detach().to(torch.float32, copy=True)  # a copy: the caller may change it in place

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.anchors is None:  # Mammoth: the parameters at the start of training
            self.anchors = self.snapshot()
        if self.omega is None:
            self.omega = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        else:
            check_same_keys("SI path integral", self.params, self.omega)
            device = next(iter(self.params.values())).device
            self.omega = {n: t.to(device=device, dtype=torch.float32) for n, t in self.omega.items()}
        self._before = self._grads = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._before is not None:  # a second optimizer in the same batch: the first call holds
            return
        self._before = self.snapshot()
        if self.path_gradient != "task":
            return
        grads = {n: self._grad_of(n) for n in self.params}
        penalty_grad = self.penalty_grad()
        if penalty_grad is not None and self._attached:
            seed = 1.0
            if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
                seed = 1.0 / trainer.accumulate_grad_batches
            share = self._attached * seed
            for n in grads:
                grads[n] -= share * penalty_grad[n]
        self._grads = grads

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._before is None:
            return  # no optimizer step in this batch (gradient accumulation)
        assert self.omega is not None
        grads = self._grads if self.path_gradient == "task" else {n: self._grad_of(n) for n in self.params}
        assert grads is not None
        path_integral_step(self.omega, grads, self._before, {n: p.detach() for n, p in self.params.items()})
        self._before = self._grads = None
        self._attached = 0

    def on_experience_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> None:
        assert self.omega is not None and self.anchors is not None
        self.importance = consolidate_importance(self.importance, self.omega, self.params, self.anchors, self.xi)
        self.anchors = self.snapshot()
        self.omega = {n: torch.zeros_like(w) for n, w in self.omega.items()}
        self.consolidations += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "omega": self.omega}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.omega = state_dict.get("omega")
