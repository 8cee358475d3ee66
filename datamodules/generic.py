"""A user's own torch datasets or tensors as a continual stream, through Avalanche's generators.

- :class:`ClassSplitStream`: one labelled train/test pair split by class into experiences
  (``nc_benchmark``): class- or task-incremental.
- :class:`DatasetsStream`: one experience per given dataset (``dataset_benchmark``): domain-,
  task- or class-incremental, depending on what the datasets hold.

A dataset is either a ``torch.utils.data.Dataset`` whose items are ``(x, y)`` (or
``(x, y, ...)``) and that has a ``targets`` attribute (a list or tensor with every sample's label;
``Subset`` and ``ConcatDataset`` of such datasets work too), or a pair of tensors ``(x, y)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.benchmarks import dataset_benchmark, nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset

from datamodules.common import tensor_dataset
from datamodules.stream import ContinualDataModule, Scenario, StreamConfigError

DatasetLike = Dataset | tuple[Tensor, Tensor] | list[Tensor]


def dataset_targets(dataset: Dataset, name: str = "dataset") -> list[int]:
    """Every sample's label as a list of ints, from ``dataset.targets`` (through ``Subset`` and
    ``ConcatDataset``); raises a :class:`StreamConfigError` saying how to fix a dataset without."""
    if isinstance(dataset, Subset):
        parent = dataset_targets(dataset.dataset, name)
        return [parent[int(i)] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        return [t for d in dataset.datasets for t in dataset_targets(d, name)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise StreamConfigError(
            f"{name} ({type(dataset).__name__}) has no `targets` attribute: Avalanche needs every sample's "
            "label to build a stream. Set `dataset.targets = <list or LongTensor of the labels>` (length "
            "len(dataset)), or pass the data as a pair of tensors (x, y)"
        )
    t = torch.as_tensor(targets if not isinstance(targets, Tensor) else targets.detach().cpu())
    if t.dim() != 1 or t.is_floating_point():
        raise StreamConfigError(
            f"{name}.targets must be a 1-D sequence of integer class ids, got shape {tuple(t.shape)} of {t.dtype}"
        )
    if len(t) != len(dataset):  # type: ignore[arg-type]
        raise StreamConfigError(f"{name}.targets has {len(t)} labels but the dataset has {len(dataset)} samples")
    return t.long().tolist()


def as_avalanche_dataset(data: DatasetLike, task_label: int = 0, name: str = "dataset") -> Any:
    """Wraps a dataset with ``targets`` (or an ``(x, y)`` pair of tensors) as an Avalanche
    classification dataset whose items are ``(x, y, task_label)``."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(t, Tensor) for t in data):
            raise StreamConfigError(f"{name}: pass a Dataset with `targets` or a pair of tensors (x, y)")
        x, y = data
        if len(x) != len(y):
            raise StreamConfigError(f"{name}: x has {len(x)} samples but y has {len(y)}")
        if y.is_floating_point() or y.dim() != 1:
            raise StreamConfigError(f"{name}: y must be a 1-D tensor of integer class ids")
        return tensor_dataset(x, y.long(), task_label)
    if not isinstance(data, Dataset):
        raise StreamConfigError(
            f"{name} is a {type(data).__name__}: pass a torch Dataset with `targets` or a pair of tensors (x, y)"
        )
    return _make_taskaware_classification_dataset(
        data, task_labels=task_label, targets=dataset_targets(data, name)
    )


def class_split_benchmark(
    train: DatasetLike,
    test: DatasetLike,
    n_experiences: int,
    scenario: str = "class",
    class_order: Sequence[int] | None = None,
    shuffle_classes: bool = False,
    seed: int = 0,
) -> Any:
    """``nc_benchmark`` over one train/test pair: classes split evenly into ``n_experiences``.

    Class ids stay global (not renumbered per experience), so a single head with task masking
    serves task-IL. The class order is ``class_order``, else ascending ids, else (with
    ``shuffle_classes``) a permutation drawn from ``seed``.
    """
    if scenario not in ("class", "task"):
        raise StreamConfigError(f"a class-split stream is class- or task-incremental, got scenario={scenario!r}")
    train_ds = as_avalanche_dataset(train, 0, "train_dataset")
    test_ds = as_avalanche_dataset(test, 0, "test_dataset")
    classes = sorted(set(train_ds.targets))
    if class_order is not None:
        class_order = [int(c) for c in class_order]
        if sorted(class_order) != classes:
            raise StreamConfigError(
                f"class_order {class_order} must be a permutation of the training classes {classes}"
            )
    elif not shuffle_classes:
        class_order = classes
    if n_experiences < 1 or len(classes) % n_experiences:
        raise StreamConfigError(
            f"n_experiences={n_experiences} does not divide the {len(classes)} classes evenly: "
            f"choose a divisor of {len(classes)}"
        )
    missing = sorted(set(test_ds.targets) - set(classes))
    if missing:
        raise StreamConfigError(f"test classes {missing} never occur in the training data")
    return nc_benchmark(
        train_ds,
        test_ds,
        n_experiences=n_experiences,
        task_labels=scenario == "task",
        shuffle=class_order is None,
        seed=seed,
        fixed_class_order=class_order,
        class_ids_from_zero_in_each_exp=False,
    )


def datasets_benchmark(train: Sequence[DatasetLike], test: Sequence[DatasetLike], scenario: str = "domain") -> Any:
    """``dataset_benchmark`` with one experience per dataset; the task label of experience ``i``
    is ``i`` for task-IL and 0 otherwise."""
    if scenario not in ("class", "domain", "task"):
        raise StreamConfigError(f"scenario must be 'class', 'domain' or 'task', got {scenario!r}")
    if len(train) != len(test) or not train:
        raise StreamConfigError(
            f"one test dataset per training dataset is needed: got {len(train)} train and {len(test)} test"
        )
    tl = [i if scenario == "task" else 0 for i in range(len(train))]
    return dataset_benchmark(
        [as_avalanche_dataset(d, t, f"train_datasets[{i}]") for i, (d, t) in enumerate(zip(train, tl))],
        [as_avalanche_dataset(d, t, f"test_datasets[{i}]") for i, (d, t) in enumerate(zip(test, tl))],
    )


class ClassSplitStream(ContinualDataModule):
    """A labelled train/test pair split by class into ``n_experiences`` (Split-X for any data).

    Args:
        train_dataset, test_dataset: datasets with ``targets`` or ``(x, y)`` tensor pairs.
        n_experiences: number of experiences; must divide the number of classes.
        scenario: ``"class"`` (task label 0) or ``"task"`` (task label = experience index).
        class_order: the classes in the order they arrive (default ascending ids).
        shuffle_classes: shuffle the class order with ``seed`` (when no ``class_order``).
        **kwargs: :class:`ContinualDataModule` arguments (epochs_per_experience, batch_size, seed, joint, ...).
    """

    def __init__(
        self,
        train_dataset: Any,
        test_dataset: Any,
        n_experiences: int = 5,
        scenario: Scenario = "class",
        class_order: list[int] | None = None,
        shuffle_classes: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(scenario=scenario, **kwargs)
        self.train_data, self.test_data = train_dataset, test_dataset
        self.n_experiences = n_experiences
        self.class_order = class_order
        self.shuffle_classes = shuffle_classes

    def build_benchmark(self) -> Any:
        return class_split_benchmark(
            self.train_data, self.test_data, self.n_experiences, self._scenario or "class",
            self.class_order, self.shuffle_classes, self.seed,
        )


class DatasetsStream(ContinualDataModule):
    """One experience per dataset: ``train_datasets[i]`` is trained in experience ``i`` and
    ``test_datasets[i]`` is its test set.

    Args:
        train_datasets, test_datasets: equal-length lists of datasets with ``targets`` or ``(x, y)`` pairs.
        scenario: ``"domain"`` (same classes, task label 0; the default), ``"task"`` (task label = index)
            or ``"class"`` (disjoint classes, task label 0).
        **kwargs: :class:`ContinualDataModule` arguments.
    """

    def __init__(
        self,
        train_datasets: list[Any],
        test_datasets: list[Any],
        scenario: Scenario = "domain",
        **kwargs: Any,
    ) -> None:
        super().__init__(scenario=scenario, **kwargs)
        self.train_data, self.test_data = list(train_datasets), list(test_datasets)

    def build_benchmark(self) -> Any:
        return datasets_benchmark(self.train_data, self.test_data, self._scenario or "domain")
