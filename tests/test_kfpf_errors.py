"""k-FPF's error paths: each error says what was wrong and how to fix it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from callbacks.kfpf import FPF, KFPF
from cl_plugins import ContinualClassifier
from cl_plugins.buffers import ReservoirBuffer
from cl_plugins.kfpf import fpf_loss, run_fpf_phase, select_modules
from cl_plugins.models import SmallCNN
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs


def _model(cls=ContinualClassifier) -> ContinualClassifier:
    return cls("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})


def _fit(callbacks, model=None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, limit_val_batches=0, **trainer_kwargs))
    trainer.fit(model or _model(), datamodule=dm)
    return trainer


def _tiny(store_logits: bool):
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=4, width=4)
    buf = ReservoirBuffer(32, store_logits=store_logits)
    buf.add(torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,)), torch.zeros(32),
            logits=torch.randn(32, 4) if store_logits else None)
    return model, buf


@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="sam"), r"variant must be 'ce' \(k-FPF-CE\) or 'kd' \(k-FPF-KD\), got 'sam'"),
    (dict(k=0), r"k \(the number of FPF phases over the stream\) must be >= 1, got 0"),
    (dict(lr=0.0), r"lr \(the FPF phases' own learning rate\) must be a number > 0 \(default 0.05\), got 0.0"),
    (dict(lr=-0.1), r"must be a number > 0.*got -0.1"),
    (dict(lr=None), r"must be a number > 0.*got None"),
    (dict(modules="learned"), r"modules must be 'fixed' or 'auto', got 'learned'"),
    (dict(modules="auto", sensitivity="selected"), r"modules='auto' chooses from .* use sensitivity='all'"),
    (dict(modules="auto", auto_budget=0.0), r"auto_budget in \(0, 1\]"),
    (dict(iterations=0), r"iterations \(M\) must be >= 1, got 0"),
    (dict(batch_size=0), r"batch_size must be >= 1, got 0"),
    (dict(buffer_size=0), r"buffer_size must be >= 1, got 0"),
    (dict(sensitivity="some"), r"sensitivity must be 'all', 'selected' or 'off'"),
    (dict(lr_schedule="step"), r"lr_schedule must be 'constant' or 'cosine'"),
    (dict(k=3, total_steps=2), r"total_steps=2 leaves no room for k=3 phases"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KFPF(**kwargs)


def test_fpf_fixes_k_and_at_end():
    with pytest.raises(TypeError, match="FPF fixes k; use KFPF"):
        FPF(k=2)
    with pytest.raises(TypeError, match="FPF fixes at_end"):
        FPF(at_end=False)


def test_non_finite_phase_loss_raises_and_restores_the_model():
    model, buf = _tiny(store_logits=False)
    sel = select_modules(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"loss is nan at iteration 1 of 3: lower the FPF learning rate"):
        run_fpf_phase(model, sel, lambda: buf.sample(8), lambda x: model(x) * float("nan"), iterations=3, lr=0.1)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_kd_without_stored_logits():
    # the loss and the phase: a buffer batch without logits while alpha > 0
    with pytest.raises(ValueError, match=r"alpha=0.5\) matches the logits stored .* the buffer batch has none"):
        fpf_loss(torch.zeros(2, 3), torch.tensor([0, 1]), alpha=0.5)
    with pytest.raises(ValueError, match="stored logits .* differ in shape"):
        fpf_loss(torch.zeros(2, 3), torch.tensor([0, 1]), stored_logits=torch.zeros(2, 4), alpha=0.5)
    model, buf = _tiny(store_logits=False)
    with pytest.raises(ValueError, match="store_logits=True"):
        run_fpf_phase(model, select_modules(model), lambda: buf.sample(8), model, iterations=1, lr=0.1, alpha=0.5)

    # the callback: a training_step that never calls the LightningModule's forward
    class CallsNetDirectly(ContinualClassifier):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return F.cross_entropy(self.net(x), y)

    with pytest.raises(RuntimeError, match="k-FPF-KD found no logits from the LightningModule's forward.*"
                                           "logits_module="):
        _fit([KFPF(variant="kd", buffer_size=16)], model=_model(CallsNetDirectly), limit_train_batches=1)
    # naming the submodule that does return the logits fixes it
    cb = KFPF(k=1, iterations=1, variant="kd", buffer_size=16, logits_module="net")
    _fit([cb], model=_model(CallsNetDirectly), limit_train_batches=1)
    assert cb.buffer.data["logits"].shape == (16, 10)


def test_wrong_logits_module():
    with pytest.raises(ValueError, match=r"logits_module='net.nope' is not a submodule of ContinualClassifier; "
                                         r"top-level modules: \['net'\]"):
        _fit([KFPF(variant="kd", logits_module="net.nope")], limit_train_batches=1)
    # a submodule whose output is not (batch, classes) logits
    with pytest.raises(RuntimeError, match=r"expected logits of shape \(>= 32, classes\) from net.conv1"):
        _fit([KFPF(variant="kd", logits_module="net.conv1")], limit_train_batches=1)


def test_batches_that_are_not_x_y_t():
    cb = KFPF()
    x, y = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    trainer, model = pl.Trainer(**quiet_trainer_kwargs()), _model()
    with pytest.raises(TypeError, match=r"needs stream batches \(x, y, task_label\); got tuple of length 2"):
        cb.on_train_batch_start(trainer, model, (x, y), 0)
    with pytest.raises(TypeError, match="got dict of length 1"):
        cb.on_train_batch_start(trainer, model, {"x": x}, 0)


def test_phase_with_an_empty_buffer():
    cb, model = KFPF(), _model()
    trainer = pl.Trainer(**quiet_trainer_kwargs())
    with pytest.raises(RuntimeError, match="has no module selection: it was not set up by a Trainer"):
        cb.run_phase(trainer, model)
    cb.selection = select_modules(model)
    with pytest.raises(RuntimeError, match=r"cannot run a phase: its buffer is empty \(no training batch"):
        cb.run_phase(trainer, model)
