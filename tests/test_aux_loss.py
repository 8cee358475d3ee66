"""The identity op that attaches an extra loss term to the autograd graph."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision

from callbacks import ContinualCallback
from cl_plugins import AuxLossTracker, ContinualClassifier, attach_aux_loss
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.tolerances import assert_close_accumulated


def _model_and_data():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 1, 0])
    return lin, x, y


@pytest.mark.parametrize("seed", [1.0, 0.25, torch.tensor(1024.0)])
def test_gradients_equal_those_of_loss_plus_term(seed):
    lin, x, y = _model_and_data()
    factor = float(seed)

    def term_of(m):
        return 0.3 * (m.weight**2).sum() + m.bias.abs().sum()

    loss = factor * (F.cross_entropy(lin(x), y) + term_of(lin))
    loss.backward()
    want = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    # both sum the same two gradients (factors are powers of 2: exact): at most their rounding apart
    ce = torch.autograd.grad(factor * F.cross_entropy(lin(x), y), list(lin.parameters()))
    reg = torch.autograd.grad(factor * term_of(lin), list(lin.parameters()))

    tracker = AuxLossTracker()
    tracker.seed = seed
    out = attach_aux_loss(lin(x), term_of(lin), tracker, "reg")
    (factor * F.cross_entropy(out, y)).backward()
    for g, w, a, b in zip([p.grad for p in lin.parameters()], want, ce, reg):
        assert_close_accumulated(g, w, a.abs() + b.abs())
    assert float(tracker.pop_means()["reg"]) == pytest.approx(float(term_of(lin)))


def test_identity_forward_and_no_attach_without_grad():
    lin, x, _ = _model_and_data()
    out = lin(x)
    term = (lin.weight**2).sum()
    assert torch.equal(attach_aux_loss(out, term), out)
    tracker = AuxLossTracker()
    with torch.no_grad():
        res = attach_aux_loss(lin(x), (lin.weight**2).sum(), tracker, "reg")
    assert res.grad_fn is None and tracker.pop_means() == {}
    with pytest.raises(ValueError, match="scalar"):
        attach_aux_loss(out, torch.ones(2, requires_grad=True))


def test_non_finite_term_is_reported_by_name():
    tracker = AuxLossTracker()
    lin, x, _ = _model_and_data()
    attach_aux_loss(lin(x), lin.weight.sum() * float("nan"), tracker, "pego/ortho")
    with pytest.raises(FloatingPointError, match="pego/ortho"):
        tracker.pop_means()


# ---------------------------------------------------------------- through Lightning
WEIGHT = 0.05


def _term(module: torch.nn.Module) -> torch.Tensor:
    return WEIGHT * sum((p.float() ** 2).sum() for p in module.net.parameters())


class DirectModule(ContinualClassifier):
    """Adds the term in training_step: the reference."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + _term(self)


class AttachTerm(ContinualCallback):
    """Adds the same term through the identity op on the model output."""

    def setup(self, trainer, pl_module, stage):
        pl_module.net.register_forward_hook(lambda m, i, out: self.attach_loss(out, _term(pl_module), "l2"))


class GradRecorder(pl.Callback):
    """Per optimizer step: the gradients the optimizer gets (unscaled), the accumulated gradients after the
    last backward (as the loss scale left them) with that scale, and the magnitude of what the gradients
    sum, unscaled: per micro-batch the gradient it added (``|increment|``) plus twice the term's
    (``2 * WEIGHT * p / accumulate``), which bounds ``|CE gradient| + |term gradient|`` of that micro-batch."""

    def __init__(self):
        self.grads, self.scaled, self.scales, self.magnitudes, self._last = [], [], [], [], None

    def on_after_backward(self, trainer, pl_module):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else 1.0
        now = [p.grad.detach().clone() for p in pl_module.parameters()]
        last = self._last or [torch.zeros_like(g) for g in now]
        term = [2 * WEIGHT * p.detach() / trainer.accumulate_grad_batches for p in pl_module.parameters()]
        step = [(n - b).abs() / scale + 2 * t.abs() for n, b, t in zip(now, last, term)]
        self.magnitudes.append(step if self._last is None else [m + s for m, s in zip(self.magnitudes.pop(), step)])
        if self._last is not None:
            self.scaled.pop()
            self.scales.pop()
        self.scaled.append(now)
        self.scales.append(scale)
        self._last = now

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for p in pl_module.parameters()])
        self._last = None


def _grads(module_cls, callbacks, precision, accumulate) -> GradRecorder:
    torch.manual_seed(0)
    model = module_cls("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    rec = GradRecorder()
    if precision == "16-mixed":
        # Lightning turns 16-mixed on CPU into bf16-mixed; its fp16 plugin with a real CPU GradScaler runs fp16
        # autocast and loss scaling as on a GPU (2^10: no overflow here, so every step is taken)
        plugin = dict(plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))])
    else:
        plugin = dict(precision=precision)
    trainer = pl.Trainer(**quiet_trainer_kwargs(
        callbacks=[*callbacks, rec], accumulate_grad_batches=accumulate,
        limit_train_batches=4, limit_val_batches=0, max_epochs=1, **plugin,
    ))
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=16)
    dm.set_experience(0)
    trainer.fit(model, datamodule=dm)
    return rec


@pytest.mark.parametrize("precision,accumulate",
                         [("32-true", 1), ("32-true", 2), ("bf16-mixed", 2), ("16-mixed", 2)])
def test_lightning_gradients_match_direct_loss(precision, accumulate):
    direct = _grads(DirectModule, [], precision, accumulate)
    got = _grads(ContinualClassifier, [AttachTerm()], precision, accumulate)
    assert len(direct.grads) == len(got.grads) == 4 // accumulate
    # both routes run the same forward (under autocast included) and add the same per-micro-batch CE and
    # term gradients, only possibly in another order: float32 rounding of what is summed apart at most, and so
    # from equal parameters at every step. Under 16-mixed the direct route's backward is that of
    # scale * (loss + term) / accumulate and the optimizer gets it unscaled: the attached term must match both.
    for k in range(len(got.grads)):
        assert got.scales[k] == direct.scales[k]
        if precision == "16-mixed":
            assert got.scales[k] == 2.0**10
        for g, w, m in zip(got.grads[k], direct.grads[k], direct.magnitudes[k]):
            assert_close_accumulated(g, w, m)
        for g, w, m in zip(got.scaled[k], direct.scaled[k], direct.magnitudes[k]):
            assert_close_accumulated(g, w, got.scales[k] * m)


def test_seed_follows_accumulation_and_a_real_grad_scaler():
    """The seed comes from a real ``torch.amp.GradScaler`` held by Lightning's fp16 plugin: the attached term's
    gradient is that of ``scale * (loss + term) / accumulate`` and, after ``unscale_``, of ``(loss + term) /
    accumulate``; after an overflow the scaler halves its scale and the next seed follows."""
    lin, x, y = _model_and_data()
    params = list(lin.parameters())

    def term_of(m):
        return 0.3 * (m.weight**2).sum() + m.bias.abs().sum()

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**9)
    module = SimpleNamespace(automatic_optimization=True)  # what update_seed reads of the Trainer and module
    trainer = SimpleNamespace(accumulate_grad_batches=4, lightning_module=module,
                              precision_plugin=MixedPrecision("16-mixed", "cpu", scaler))
    ce = torch.autograd.grad(F.cross_entropy(lin(x), y), params)
    reg = torch.autograd.grad(term_of(lin), params)

    tracker = AuxLossTracker()
    out = attach_aux_loss(lin(x), term_of(lin), tracker, "reg")
    scaled = scaler.scale(F.cross_entropy(out, y) / 4)  # what the plugin's pre_backward does ...
    tracker.update_seed(trainer)  # ... before on_before_backward
    assert float(tracker.seed) == 2.0**9 / 4
    scaled.backward()
    # scale and 1 / 4 are powers of 2 (exact): the sum of the two gradients, rounded once
    for p, a, b in zip(params, ce, reg):
        assert_close_accumulated(p.grad, 2.0**9 * (a + b) / 4, 2.0**9 * (a.abs() + b.abs()) / 4)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler.unscale_(opt)
    for p, a, b in zip(params, ce, reg):
        assert_close_accumulated(p.grad, (a + b) / 4, (a.abs() + b.abs()) / 4)

    scaler.step(opt)
    scaler.update()  # finite: the scale stays (it grows after 2000 such steps)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(lin(x), y)).backward()
    params[0].grad[0, 0] = float("inf")  # an overflow: the step is skipped and the scale halved
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    tracker.update_seed(trainer)
    assert float(tracker.seed) == 2.0**8 / 4
    module.automatic_optimization = False  # manual optimization: the user's backward, no accumulation factor
    tracker.update_seed(trainer)
    assert float(tracker.seed) == 2.0**8
