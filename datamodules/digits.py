"""Split-Digits: sklearn's 8x8 digits split by class; fast enough for tests."""

from __future__ import annotations

from typing import Any

import torch

from datamodules.common import split_benchmark
from datamodules.stream import ContinualDataModule, Scenario


def load_digits_tensors(test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """sklearn digits as ``(train_x, train_y, test_x, test_y)``, x in [0, 1] of shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


class SplitDigits(ContinualDataModule):
    """sklearn digits (1,797 images, 10 classes) split into ``n_experiences`` by class."""

    def __init__(
        self,
        n_experiences: int = 5,
        scenario: Scenario = "class",
        fixed_class_order: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(scenario=scenario, **kwargs)
        self.n_experiences = n_experiences
        self.fixed_class_order = fixed_class_order

    def build_benchmark(self) -> Any:
        tx, ty, vx, vy = load_digits_tensors(seed=self.seed)
        order = list(range(10)) if self.fixed_class_order else None
        return split_benchmark(tx, ty, vx, vy, self.n_experiences, self._scenario or "class", self.seed, order)
