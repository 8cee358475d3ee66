"""Shared pieces of the built-in streams: tensors to an Avalanche benchmark by scenario."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.benchmarks import dataset_benchmark, nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from torch import Tensor

from datamodules.stream import StreamConfigError


def tensor_dataset(x: Tensor, y: Tensor, task_label: int = 0) -> Any:
    """An Avalanche classification dataset over tensors (items are ``(x, y, task_label)``)."""
    return _make_taskaware_tensor_classification_dataset(x, y.long(), task_labels=task_label)


def split_benchmark(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    n_experiences: int,
    scenario: str = "class",
    seed: int = 0,
    class_order: Sequence[int] | None = None,
) -> Any:
    """Splits a labelled set by class into ``n_experiences`` (class- or task-incremental)."""
    if scenario not in ("class", "task"):
        raise StreamConfigError(f"a split stream is class- or task-incremental, got scenario={scenario!r}")
    n_classes = int(torch.unique(train_y).numel())
    if n_experiences < 1 or n_classes % n_experiences:
        raise StreamConfigError(
            f"n_experiences={n_experiences} does not divide the {n_classes} classes evenly: "
            f"choose a divisor of {n_classes}"
        )
    return nc_benchmark(
        tensor_dataset(train_x, train_y),
        tensor_dataset(test_x, test_y),
        n_experiences=n_experiences,
        task_labels=scenario == "task",
        seed=seed,
        fixed_class_order=list(class_order) if class_order is not None else None,
        class_ids_from_zero_in_each_exp=False,
        shuffle=class_order is None,
    )


def permuted_benchmark(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    n_experiences: int,
    scenario: str = "domain",
    seed: int = 0,
) -> Any:
    """One experience per fixed pixel permutation (the first is the identity); domain- or task-IL."""
    if scenario not in ("domain", "task"):
        raise StreamConfigError(f"a permuted stream is domain- or task-incremental, got scenario={scenario!r}")
    g = torch.Generator().manual_seed(seed)
    d = train_x[0].numel()
    train, test = [], []
    for i in range(n_experiences):
        perm = torch.arange(d) if i == 0 else torch.randperm(d, generator=g)
        t = i if scenario == "task" else 0
        train.append(tensor_dataset(train_x.flatten(1)[:, perm].view_as(train_x), train_y, t))
        test.append(tensor_dataset(test_x.flatten(1)[:, perm].view_as(test_x), test_y, t))
    return dataset_benchmark(train, test)
