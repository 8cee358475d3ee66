"""DR-Tune's defaults: the official loss at the user's learning rate, and the official head recipe
(init std, learning-rate multiplier) as options."""

from __future__ import annotations

import copy
import inspect

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks.drtune import DRTune
from cl_plugins.drtune import DRTuneTap, HeadLrScale, loss_weights, mean_norm
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.test_drtune import GradProbe, _fit, _model
from tests.test_drtune_core import _grads, _tap


def _close_all(actual: dict[str, torch.Tensor], reference: nn.Module) -> None:
    """float32 gradients against a float64 reference. The tolerance comes from the largest gradient
    entry: every entry sums terms of about that size (a bias before a BatchNorm sums to about 0)."""
    scale = max(float(p.grad.abs().max()) for p in reference.parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(actual[name].double(), p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_official_weights_by_hand():
    # B = 64, K = 2048: the user's loss gradient gets 64/2112 = 1/33, L_DR gets 32/33
    assert loss_weights("official", 64, 2048) == pytest.approx((1 / 33, 32 / 33))
    assert loss_weights("K/B", 64, 2048) == (1.0, 32.0)
    assert loss_weights(0.5, 64, 2048) == (1.0, 0.5)
    assert inspect.signature(DRTuneTap).parameters["weight"].default == "official"
    assert DRTune().dr_weight == "official"


def test_default_step_is_the_official_cross_entropy_over_b_plus_n_rows():
    """The default gradient is that of the official loss, one cross entropy averaged over the 8 batch
    rows and the 16 filled bank rows, not (B + n) / B = 3 times it (the former default K/B)."""
    net, tap = _tap("official")
    reg_before = copy.deepcopy(tap.regularizer)
    reference = copy.deepcopy(net).double()
    x, y = torch.randn(8, 4), torch.arange(8) % 5
    tap.begin_step(y)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    tap.end_step()
    ours = _grads(net)
    assert tap.last["task_scale"] == pytest.approx(8 / 24) and tap.last["weight"] == pytest.approx(16 / 24)

    feats = reference.body(x.double())
    z, labels = reg_before.calibrate(mean_norm(feats.detach().float()), reference.head.weight.detach().float())
    official = F.cross_entropy(reference.head(torch.cat([feats, z.double()])), torch.cat([y, labels]))
    official.backward()
    _close_all(ours, reference)
    # the forward value is the user's loss, unscaled (what train/loss logs)
    assert float(loss) == pytest.approx(float(F.cross_entropy(reference.head(feats), y)), rel=1e-5)


def test_default_in_a_fit_under_gradient_accumulation():
    dr = DRTune(bank_size=100, rotation_interval=1)
    probe = GradProbe(dr)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, experience=0)
    trainer, _ = _fit([dr, probe], dm=dm, limit_train_batches=2, accumulate_grad_batches=2, limit_val_batches=0)
    assert len(probe.batches) == 2

    manual = _model().double()
    manual.load_state_dict(probe.start)
    manual.train()
    for (x, y, _), reg in zip(probe.batches, probe.regs):
        feats = manual.net.forward_features(x.double())
        z, labels = reg.calibrate(mean_norm(feats.detach().float()), manual.net.head.weight.detach().float())
        loss = F.cross_entropy(manual.net.head(torch.cat([feats, z.double()])), torch.cat([y, labels]))
        (loss / 2).backward()
    _close_all(probe.grads, manual)
    rows = float(trainer.callback_metrics["drtune/bank_rows"])
    assert float(trainer.callback_metrics["drtune/task_scale"]) == pytest.approx(32 / (32 + rows))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


@pytest.mark.parametrize("make", [
    lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1),
], ids=["sgd-nesterov-wd", "adamw"])
def test_head_lr_scale_equals_a_head_parameter_group_with_a_larger_lr(make):
    """Scaling the head's updates by 33 follows the same trajectory as an optimizer whose head group
    has a 33x learning rate (the official recipe), with momentum, weight decay and Adam's moments."""
    torch.manual_seed(0)
    scaled = _Net().double()
    grouped = copy.deepcopy(scaled)
    opt_scaled = make(scaled.parameters())
    hook = HeadLrScale([opt_scaled], scaled.head.parameters(), 33.0)
    opt_grouped = make([{"params": grouped.body.parameters()}, {"params": grouped.head.parameters()}])
    opt_grouped.param_groups[1]["lr"] *= 33.0
    for _ in range(5):
        x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
        for net, opt in ((scaled, opt_scaled), (grouped, opt_grouped)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for (name, a), b in zip(scaled.named_parameters(), grouped.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    hook.remove()
    assert not opt_scaled._optimizer_step_pre_hooks and not opt_scaled._optimizer_step_post_hooks
    with pytest.raises(ValueError, match="no optimizer holds them"):
        HeadLrScale([torch.optim.SGD(scaled.body.parameters(), lr=0.1)], scaled.head.parameters(), 33.0)


class _HeadProbe(pl.Callback):
    """The head's parameters at the start of training and after the first optimizer step."""

    def __init__(self) -> None:
        self.starts: list[torch.Tensor] = []
        self.model_start: dict[str, torch.Tensor] = {}
        self.after_step: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module):
        self.starts.append(pl_module.net.head.weight.detach().clone())
        self.model_start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.after_step is None:
            self.after_step = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _one_step(scale: float, probe: _HeadProbe, dr: DRTune | None = None):
    dr = dr or DRTune(dr_weight=1.0, bank_size=100, head_init_std=0.01, head_lr_scale=scale)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, experience=0)
    pl.seed_everything(0, verbose=False)
    model = _model()
    bias = model.net.head.bias.detach().clone()
    trainer, _ = _fit([dr, probe], dm=dm, model=model, limit_train_batches=1, limit_val_batches=0)
    return trainer, model, dr, bias


def test_head_init_and_lr_scale_options_in_a_fit():
    plain, scaled = _HeadProbe(), _HeadProbe()
    _one_step(1.0, plain)
    trainer, model, dr, bias = _one_step(4.0, scaled)
    # N(0, 0.01) weight, bias as built
    start = scaled.starts[0]
    assert 0.008 < float(start.std()) < 0.012 and abs(float(start.mean())) < 0.003
    torch.testing.assert_close(scaled.model_start["net.head.bias"], bias, rtol=0, atol=0)
    # same start, same first gradients: the head moves 4x as far, the rest the same
    for name, before in scaled.model_start.items():
        torch.testing.assert_close(before, plain.model_start[name], rtol=0, atol=0, msg=name)
        moved_plain = plain.after_step[name] - before
        moved_scaled = scaled.after_step[name] - before
        factor = 4.0 if name.startswith("net.head.") else 1.0
        torch.testing.assert_close(moved_scaled, factor * moved_plain, rtol=1e-4,
                                   atol=1e-6 * float(moved_plain.abs().max()) + 1e-12, msg=name)
    opt = trainer.optimizers[0]
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # removed after fit
    # the init happens once per stream: a later fit (or a resume, via the state) keeps the trained head
    assert dr.state_dict()["head_init_done"] is True
    end_of_first = model.net.head.weight.detach().clone()
    again = _HeadProbe()
    pl.seed_everything(1, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, experience=1)
    pl.Trainer(**quiet_trainer_kwargs(callbacks=[dr, again], limit_train_batches=1, limit_val_batches=0)).fit(
        model, datamodule=dm)
    torch.testing.assert_close(again.starts[0], end_of_first, rtol=0, atol=0)
    fresh = DRTune(dr_weight=1.0, bank_size=100, head_init_std=0.01)
    fresh.load_state_dict(dr.state_dict())
    model_c = copy.deepcopy(model)
    probe_c = _HeadProbe()
    _fit([fresh, probe_c], dm=dm, model=model_c, limit_train_batches=1, limit_val_batches=0)
    torch.testing.assert_close(probe_c.starts[0], model.net.head.weight.detach(), rtol=0, atol=0)


def test_invalid_head_options():
    with pytest.raises(ValueError, match="head_init_std must be > 0"):
        DRTune(head_init_std=0.0)
    with pytest.raises(ValueError, match="head_lr_scale must be > 0"):
        DRTune(head_lr_scale=-1.0)
    with pytest.raises(ValueError, match="dr_weight must be 'official'"):
        DRTune(dr_weight=None)  # type: ignore[arg-type]
