"""SynapticIntelligence on a tiny stream: less forgetting than naive, the path integral and the
importance exactly as defined (both gradient variants, accumulation, clipping), clear errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from callbacks import SynapticIntelligence
from tests.test_ewc import MLP, fit, forgetting


def test_si_reduces_forgetting_in_task_il():
    naive = forgetting([])
    si = SynapticIntelligence(c=100.0, xi=0.9)
    with_si = forgetting([si])
    # measured (seeds 0, 1, 2): naive 0.046 / 0.141 / 0.024, SI 0.026 / 0.069 / 0.004 (ratio 0.57 / 0.49 / 0.17)
    assert naive > 0.02, naive
    assert with_si < 0.8 * naive, (naive, with_si)
    assert si.consolidations == 2


class PathRecorder(pl.Callback):
    """Recomputes SI's path integral and importance from what it sees around each optimizer step.

    Put it after SynapticIntelligence: it reads the gradient the optimizer steps with (after SI's own
    hook, so an SI that changed ``.grad`` would make the two disagree).
    """

    def __init__(self, si: SynapticIntelligence, variant: str) -> None:
        self.si, self.variant = si, variant
        self.omega = self.anchor = self.importance = None
        self.micro = 0
        self.step = None
        self.checked = 0

    def _params(self):
        return {n: p.detach().float().clone() for n, p in self.si.params.items()}

    def on_train_start(self, trainer, pl_module):
        self.anchor = self._params()
        self.omega = {n: torch.zeros_like(t) for n, t in self.anchor.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.micro += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.detach().float().clone() for n, p in self.si.params.items()}
        if self.variant == "task" and self.importance is not None:
            share = self.micro / trainer.accumulate_grad_batches  # each micro-batch's term is seeded 1/accumulate
            for n, p in self.si.params.items():
                grads[n] -= share * 2 * self.si.c * self.importance[n] * (p.detach().float() - self.anchor[n])
        self.step = (grads, self._params())
        self.micro = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.step is None:
            return
        grads, before = self.step
        if self.variant == "step":  # the clipped gradient the optimizer used, read after the step
            grads = {n: p.grad.detach().float().clone() for n, p in self.si.params.items()}
        for n, p in self.si.params.items():
            self.omega[n] += -grads[n] * (p.detach().float() - before[n])
        self.step = None

    def on_train_epoch_end(self, trainer, pl_module):  # after SI's consolidation
        if not trainer.datamodule.is_experience_end(trainer.current_epoch):
            return
        now = self._params()
        new = {n: self.omega[n] / ((now[n] - self.anchor[n]) ** 2 + self.si.xi) for n in now}
        self.importance = new if self.importance is None else {n: self.importance[n] + new[n] for n in new}
        for n in now:
            torch.testing.assert_close(self.si.importance[n], self.importance[n], rtol=1e-4, atol=1e-7, msg=n)
            torch.testing.assert_close(self.si.anchors[n], now[n], rtol=0, atol=0)
        self.anchor, self.omega = now, {n: torch.zeros_like(t) for n, t in now.items()}
        self.checked += 1


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_task_gradient_path_integral_with_momentum_and_accumulation(precision):
    """Zenke's definition: -g_task * delta, with g_task the gradient without SI's term (which every
    micro-batch adds with seed 1/accumulate), under SGD with momentum so that delta != -lr * g; under
    16-mixed the gradients are read after the scaler's unscale."""
    si = SynapticIntelligence(c=50.0, xi=0.5, path_gradient="task")
    rec = PathRecorder(si, "task")
    trainer, _, _ = fit([si, rec], stop_after=2, epochs=2, model_kwargs={**MLP, "momentum": 0.9}, lr=0.05,
                  accumulate_grad_batches=2, precision=precision)
    assert rec.checked == 3 and si.consolidations == 3
    assert float(trainer.callback_metrics["si/penalty"]) > 0  # the term was there to subtract


def test_step_variant_integrates_the_clipped_total_gradient_as_mammoth_of_the_der_paper():
    """path_gradient="step" with value clipping: omega = sum -clip(g_total) * delta, read after the step
    (lr * clip(g_total)^2 under plain SGD)."""
    si = SynapticIntelligence(c=50.0, xi=0.9, path_gradient="step")
    rec = PathRecorder(si, "step")
    fit([si, rec], stop_after=1, epochs=2, lr=0.1, gradient_clip_val=0.05, gradient_clip_algorithm="value")
    assert rec.checked == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"c": -1.0}, "c"), ({"xi": 0.0}, "xi"), ({"xi": -0.1}, "xi"), ({"path_gradient": "total"}, "path_gradient"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynapticIntelligence(**kwargs)
