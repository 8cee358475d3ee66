"""Base of the quadratic-anchor callbacks (online EWC, SI): ``weight * sum_k w_k (theta_k - theta*_k)^2``.

The regularized parameters are the LightningModule's trainable parameters at fit start (after
other callbacks' surgery in ``setup``). The term depends on parameters only, so once per training
step (per micro-batch under gradient accumulation) it is computed in float32 and attached, with
:meth:`ContinualCallback.attach_loss`, to the output of the first module owning a regularized
parameter that runs in train mode with gradients on: one backward gives exactly the gradient of
``loss + term`` under accumulation, AMP and DDP, with the user's ``training_step`` untouched.
Anchors, importances and the subclass's statistics are in the callback's ``state_dict``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from callbacks.base import ContinualCallback
from cl_plugins.baselines.quadratic import check_same_keys, quadratic_penalty


class QuadraticPenalty(ContinualCallback):
    """Holds ``anchors`` (``theta*``) and ``importance`` (``w``) by parameter name and attaches the penalty.

    Subclasses set :attr:`weight` and :attr:`term_name` and fill ``anchors`` / ``importance`` at
    experience ends. No term is attached before the first consolidation or with weight 0.
    """

    #: name under which the weighted term is logged
    term_name = "penalty"

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = float(weight)
        #: parameter values at the last consolidation, float32, by name
        self.anchors: dict[str, Tensor] | None = None
        #: per-parameter importance (Fisher diagonal, SI's Omega), float32, by name
        self.importance: dict[str, Tensor] | None = None
        #: experiences consolidated so far
        self.consolidations = 0
        self._params: dict[str, nn.Parameter] = {}
        self._hooks: list[RemovableHandle] = []
        self._pending = False
        self._warned = False
        #: terms attached since the last optimizer step (SI reads it)
        self._attached = 0

    # ------------------------------------------------------------------ parameters and the term
    @property
    def params(self) -> dict[str, nn.Parameter]:
        """The regularized parameters by name (set at fit start)."""
        return self._params

    def _collect_params(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError(f"{type(self).__name__}: the model has no trainable parameters to regularize")
        return params

    def snapshot(self) -> dict[str, Tensor]:
        """A float32 copy of the regularized parameters."""
        return {n: p.detach().float().clone() for n, p in self._params.items()}

    def penalty(self) -> Tensor | None:
        """``weight * sum_k importance_k (theta_k - anchor_k)^2``, or ``None`` before any consolidation."""
        if self.importance is None or self.anchors is None:
            return None
        return self.weight * quadratic_penalty(self._params, self.anchors, self.importance)

    def penalty_grad(self) -> dict[str, Tensor] | None:
        """The closed-form gradient of :meth:`penalty`, ``2 * weight * importance * (theta - anchor)``."""
        if self.importance is None or self.anchors is None:
            return None
        with torch.no_grad():
            return {n: 2.0 * self.weight * self.importance[n] * (p.detach().float() - self.anchors[n])
                    for n, p in self._params.items()}

    def _attach(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook of every module owning a regularized parameter; the first to run attaches."""
        if not (self._pending and module.training and torch.is_grad_enabled()):
            return None
        if isinstance(output, Tensor):
            if not output.requires_grad:
                return None
            index = None
        elif isinstance(output, (tuple, list)):
            index = next((i for i, o in enumerate(output) if isinstance(o, Tensor) and o.requires_grad), None)
            if index is None:
                return None
        else:
            return None
        term = self.penalty()
        self._pending = False
        if term is None:
            return None
        self._attached += 1
        if index is None:
            return self.attach_loss(output, term, self.term_name)
        items = list(output)
        items[index] = self.attach_loss(items[index], term, self.term_name)
        return type(output)(items) if isinstance(output, tuple) else items

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._params = self._collect_params(pl_module)
        device = next(iter(self._params.values())).device
        for what in ("anchors", "importance"):
            stored = getattr(self, what)
            if stored is not None:
                check_same_keys(f"{type(self).__name__} {what}", self._params, stored)
                setattr(self, what, {n: t.to(device=device, dtype=torch.float32) for n, t in stored.items()})
        self._remove_hooks()
        owners = {id(p) for p in self._params.values()}
        for m in pl_module.modules():
            if any(id(p) in owners for p in m.parameters(recurse=False)):
                self._hooks.append(m.register_forward_hook(self._attach))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._pending = self.importance is not None and self.weight > 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._pending and not self._warned:
            rank_zero_warn(
                f"{type(self).__name__}: no module with a regularized parameter ran in train mode with gradients "
                "on in this training step, so the penalty was not added; check that the training_step calls the "
                "model in train mode"
            )
            self._warned = True
        self._pending = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._pending = False

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"anchors": self.anchors, "importance": self.importance, "consolidations": self.consolidations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the state; ``on_fit_start`` checks it against the model and moves it to its device."""
        self.anchors = state_dict.get("anchors")
        self.importance = state_dict.get("importance")
        self.consolidations = int(state_dict.get("consolidations", 0))
