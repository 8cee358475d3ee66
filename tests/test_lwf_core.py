"""LwF's plain-torch core against hand-computed values and Mammoth's own formula (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from cl_plugins.baselines import check_lwf_hparams, lwf_distillation, old_class_groups

D = torch.float64


def _mammoth_lwf(old: torch.Tensor, new: torch.Tensor, temp: float) -> torch.Tensor:
    """Mammoth's models/lwf.py written out: smooth(softmax(.), T) then -mean(sum(old * log(new)))."""
    def smooth(probs: torch.Tensor) -> torch.Tensor:
        powered = probs ** (1 / temp)
        return powered / powered.sum(1, keepdim=True)

    return -torch.mean(torch.sum(smooth(torch.softmax(old, 1)) * torch.log(smooth(torch.softmax(new, 1))), 1))


def test_distillation_matches_a_hand_value():
    new = torch.tensor([[0.0, math.log(3.0), 5.0]], dtype=D)
    old = torch.tensor([[0.0, 0.0, -5.0]], dtype=D)
    # old classes 0, 1 at T = 1: p = (1/4, 3/4), q = (1/2, 1/2): -(ln(1/4) + ln(3/4)) / 2 = ln(16/3) / 2
    got = lwf_distillation(new, old, [[0, 1]], temperature=1.0)
    assert got.dtype == D and got.item() == pytest.approx(0.5 * math.log(16 / 3), abs=1e-12)
    # T = 2: p = (1, sqrt 3) / (1 + sqrt 3), q = (1/2, 1/2)
    s3 = math.sqrt(3.0)
    want = -0.5 * (math.log(1 / (1 + s3)) + math.log(s3 / (1 + s3)))
    assert lwf_distillation(new, old, [[0, 1]], temperature=2.0).item() == pytest.approx(want, abs=1e-12)


def test_distillation_equals_mammoths_smoothed_cross_entropy_on_the_old_classes():
    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(6, 10, generator=g, dtype=D) * 3, torch.randn(6, 10, generator=g, dtype=D) * 3
    old_classes = [0, 1, 2, 3]
    for temp in (1.0, 2.0, 0.5):
        want = _mammoth_lwf(old[:, :4], new[:, :4], temp)
        torch.testing.assert_close(lwf_distillation(new, old, [old_classes], temp), want, rtol=1e-10, atol=1e-12)


def test_per_task_groups_sum_one_softmax_per_group():
    g = torch.Generator().manual_seed(1)
    new, old = torch.randn(5, 6, generator=g, dtype=D), torch.randn(5, 6, generator=g, dtype=D)
    both = lwf_distillation(new, old, [[0, 1], [2, 3]], 2.0)
    want = _mammoth_lwf(old[:, :2], new[:, :2], 2.0) + _mammoth_lwf(old[:, 2:4], new[:, 2:4], 2.0)
    torch.testing.assert_close(both, want)
    assert not torch.allclose(both, lwf_distillation(new, old, [[0, 1, 2, 3]], 2.0))


def test_distillation_gradient_is_zero_when_the_old_distribution_is_matched():
    old = torch.tensor([[1.0, -2.0, 0.5, 9.0]], dtype=D)
    new = (old + 3.0).clone().requires_grad_(True)  # a constant shift: same softmax over the old classes
    lwf_distillation(new, old, [[0, 1, 2]], 2.0).backward()
    torch.testing.assert_close(new.grad, torch.zeros_like(new), rtol=0, atol=1e-12)


def test_old_class_groups_from_the_stream():
    classes = [(0, 1), (2, 3), (4, 5)]
    tasks = [(0,), (1,), (2,)]
    assert old_class_groups(classes, tasks, 0) == []
    assert old_class_groups(classes, tasks, 2) == [[0, 1, 2, 3]]
    assert old_class_groups(classes, tasks, 2, per_task=True) == [[0, 1], [2, 3]]
    # a domain-incremental stream (the same classes again) distils all of them
    assert old_class_groups([(0, 1), (0, 1)], [(0,), (0,)], 1) == [[0, 1]]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        check_lwf_hparams(-1.0, 2.0)
    for temp in (0.0, -2.0):
        with pytest.raises(ValueError, match="temperature"):
            check_lwf_hparams(1.0, temp)
    with pytest.raises(ValueError, match="same shape"):
        lwf_distillation(torch.zeros(2, 4), torch.zeros(2, 5), [[0]], 2.0)
    with pytest.raises(ValueError, match="at least one group"):
        lwf_distillation(torch.zeros(2, 4), torch.zeros(2, 4), [], 2.0)
