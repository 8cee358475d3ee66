"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017) as in Mammoth's ``models/lwf.py``.

While learning experience ``t > 0`` the model's outputs on the current batch are distilled towards
those of a frozen copy taken at the end of experience ``t - 1``, over the old classes only:
``alpha * mean_i [ -sum_c q_ic log p_ic ]`` with ``q = softmax(old_logits[:, old] / T)`` and
``p = softmax(new_logits[:, old] / T)`` (Mammoth's ``modified_kl_div(smooth(softmax(old), T),
smooth(softmax(new), T))``: ``smooth`` raises probabilities to ``1/T`` and renormalizes, which is
``softmax(logits / T)``). It is a cross-entropy, not a KL divergence: the two differ by the
entropy of ``q``, a constant, so the gradients are the same. No ``T^2`` factor (Mammoth has none).

With ``per_task`` groups (task-incremental streams, the original multi-head LwF and Avalanche's
multi-head case) each old task's classes get their own softmax and the groups' losses are summed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_lwf_hparams(alpha: float, temperature: float) -> None:
    """Raises a ``ValueError`` for a negative ``alpha`` or a ``temperature`` that is not positive."""
    if not alpha >= 0:
        raise ValueError(f"alpha (the LwF distillation weight) must be >= 0, got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature (LwF's softmax temperature T) must be > 0, got {temperature}; Mammoth uses 2")


def lwf_distillation(
    new_logits: Tensor, old_logits: Tensor, groups: Sequence[Sequence[int] | Tensor], temperature: float
) -> Tensor:
    """Sum over ``groups`` of the batch-mean cross-entropy between the softened old and new
    distributions restricted to the group's outputs; float32 (float64 inputs stay float64)."""
    if new_logits.shape != old_logits.shape or new_logits.dim() != 2:
        raise ValueError(
            f"LwF compares (batch, classes) logits of the same shape, got {tuple(new_logits.shape)} and "
            f"{tuple(old_logits.shape)}: the old model must have the same outputs as the current one"
        )
    if not groups:
        raise ValueError("LwF distils over at least one group of old classes")
    dtype = torch.promote_types(new_logits.dtype, torch.float32)
    total = new_logits.new_zeros((), dtype=dtype)
    with torch.autocast(device_type=new_logits.device.type, enabled=False):
        for group in groups:
            idx = torch.as_tensor(group, dtype=torch.long, device=new_logits.device)
            log_p = torch.log_softmax(new_logits.index_select(1, idx).to(dtype) / temperature, dim=1)
            q = torch.softmax(old_logits.index_select(1, idx).to(dtype) / temperature, dim=1)
            total = total - (q * log_p).sum(dim=1).mean()
    return total


def old_class_groups(
    classes_in_experience: Sequence[Sequence[int]],
    task_labels: Sequence[Sequence[int]],
    experience: int,
    per_task: bool = False,
) -> list[list[int]]:
    """The groups of old outputs distilled while training ``experience``.

    Default: one group, every class of the experiences before ``experience`` (Mammoth's
    ``[:n_past_classes]``; Avalanche's single-head case). ``per_task``: one group per old task
    label, with the classes of that task seen before ``experience``. Empty before the second experience.
    """
    if per_task:
        by_task: dict[int, set[int]] = {}
        for classes, tasks in zip(classes_in_experience[:experience], task_labels[:experience]):
            for t in tasks:
                by_task.setdefault(int(t), set()).update(int(c) for c in classes)
        return [sorted(by_task[t]) for t in sorted(by_task)]
    old = sorted({int(c) for classes in classes_in_experience[:experience] for c in classes})
    return [old] if old else []
