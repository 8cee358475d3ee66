"""SI's plain-torch core against hand-computed values (float64 inputs)."""

from __future__ import annotations

import math

import pytest
import torch

from cl_plugins.baselines import check_si_hparams, consolidate_importance, path_integral_step

D = torch.float64


def test_path_integral_adds_minus_gradient_times_displacement():
    omega = {"w": torch.zeros(4)}
    grads = {"w": torch.tensor([1.0, -2.0, math.inf, 0.5], dtype=D)}
    before = {"w": torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=D)}
    after = {"w": torch.tensor([-0.1, 0.2, 1.0, 2.5], dtype=D)}
    path_integral_step(omega, grads, before, after)
    # -g * (after - before): 0.1, 0.4, 0 (did not move: a skipped step's inf gradient is ignored), -0.25
    torch.testing.assert_close(omega["w"], torch.tensor([0.1, 0.4, 0.0, -0.25]), rtol=0, atol=1e-7)
    path_integral_step(omega, grads, after, before)  # the way back: contributions flip sign
    torch.testing.assert_close(omega["w"], torch.zeros(4), rtol=0, atol=1e-7)


def test_path_integral_of_a_plain_sgd_step_is_lr_times_squared_gradient():
    g = torch.tensor([0.3, -1.2, 2.0], dtype=D)
    theta = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    lr = 0.03
    omega = {"w": torch.zeros(3)}
    path_integral_step(omega, {"w": g}, {"w": theta}, {"w": theta - lr * g})
    # Mammoth's version of the DER paper accumulates lr * g^2: the same quantity under plain SGD
    torch.testing.assert_close(omega["w"].double(), lr * g.pow(2), rtol=1e-6, atol=0)


def test_consolidation_divides_by_squared_drift_plus_xi_and_accumulates():
    omega = {"w": torch.tensor([0.5, 1.0], dtype=D)}
    start = {"w": torch.tensor([0.0, 1.0], dtype=D)}
    end = {"w": torch.tensor([1.0, 1.0], dtype=D)}
    first = consolidate_importance(None, omega, end, start, xi=0.25)
    torch.testing.assert_close(first["w"].double(), torch.tensor([0.5 / 1.25, 1.0 / 0.25], dtype=D), rtol=1e-6, atol=0)
    second = consolidate_importance(first, {"w": torch.tensor([2.0, 0.0], dtype=D)}, {"w": end["w"] + 2}, end, xi=0.25)
    torch.testing.assert_close(second["w"].double(), torch.tensor([0.4 + 2 / 4.25, 4.0], dtype=D), rtol=1e-6, atol=0)


@pytest.mark.parametrize("c,xi,match", [(-0.1, 1.0, "c"), (1.0, 0.0, "xi"), (1.0, -1.0, "xi"),
                                        (float("nan"), 1.0, "c")])
def test_bad_hyperparameters_are_refused(c, xi, match):
    with pytest.raises(ValueError, match=match):
        check_si_hparams(c, xi)
