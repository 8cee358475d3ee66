"""The identity op that attaches an extra loss term to the autograd graph."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from callbacks import ContinualCallback
from cl_plugins import AuxLossTracker, ContinualClassifier, attach_aux_loss
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs


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

    tracker = AuxLossTracker()
    tracker.seed = seed
    out = attach_aux_loss(lin(x), term_of(lin), tracker, "reg")
    (factor * F.cross_entropy(out, y)).backward()
    for g, w in zip([p.grad for p in lin.parameters()], want):
        torch.testing.assert_close(g, w)
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
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for p in pl_module.parameters()])


def _grads(module_cls, callbacks, precision, accumulate):
    torch.manual_seed(0)
    model = module_cls("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    rec = GradRecorder()
    trainer = pl.Trainer(**quiet_trainer_kwargs(
        callbacks=[*callbacks, rec], precision=precision, accumulate_grad_batches=accumulate,
        limit_train_batches=4, limit_val_batches=0, max_epochs=1,
    ))
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=16)
    dm.set_experience(0)
    trainer.fit(model, datamodule=dm)
    return rec.grads


@pytest.mark.parametrize("precision,accumulate", [("32-true", 1), ("32-true", 2), ("bf16-mixed", 2)])
def test_lightning_gradients_match_direct_loss(precision, accumulate):
    want = _grads(DirectModule, [], precision, accumulate)
    got = _grads(ContinualClassifier, [AttachTerm()], precision, accumulate)
    assert len(want) == len(got) == 4 // accumulate
    tol = dict(rtol=1e-4, atol=1e-6) if precision == "32-true" else dict(rtol=2e-2, atol=1e-4)
    for step_want, step_got in zip(want, got):
        for w, g in zip(step_want, step_got):
            torch.testing.assert_close(g, w, **tol)


def test_seed_follows_accumulation_and_grad_scaler():
    class FakeScaler:
        def is_enabled(self):
            return True

        def _get_scale_async(self):
            return torch.tensor(512.0)

    class FakeTrainer:
        accumulate_grad_batches = 4
        lightning_module = type("M", (), {"automatic_optimization": True})()
        precision_plugin = type("P", (), {"scaler": FakeScaler()})()

    tracker = AuxLossTracker()
    tracker.update_seed(FakeTrainer())
    assert float(tracker.seed) == pytest.approx(512.0 / 4)
    FakeTrainer.lightning_module.automatic_optimization = False
    tracker.update_seed(FakeTrainer())
    assert float(tracker.seed) == pytest.approx(512.0)
