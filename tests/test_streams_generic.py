"""A user's own datasets and tensors as streams: ClassSplitStream and DatasetsStream."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from cl_plugins import ContinualClassifier
from datamodules import ClassSplitStream, DatasetsStream, StreamConfigError
from datamodules.generic import dataset_targets
from tests.conftest import quiet_trainer_kwargs


class LabelledTensors(TensorDataset):
    """A TensorDataset with the ``targets`` attribute Avalanche needs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y


class NoTargets(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.zeros(2), 0


def _data(n: int, classes: int, seed: int, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, dim, generator=g) + 3 * torch.nn.functional.one_hot(y, dim)[:, :dim].float()
    return x, y


def test_class_split_of_a_dataset_and_of_tensors():
    x, y = _data(120, 6, 0)
    vx, vy = _data(60, 6, 1)
    dm = ClassSplitStream(LabelledTensors(x, y), (vx, vy), n_experiences=3)
    assert dm.num_experiences == 3 and dm.scenario == "class"
    assert dm.classes_in_experience == [(0, 1), (2, 3), (4, 5)]
    assert [len(dm.train_dataset(i)) for i in range(3)] == [40, 40, 40]
    assert [len(dm.test_dataset(i)) for i in range(3)] == [20, 20, 20]
    xb, yb, tb = dm.train_dataset(1)[0]
    assert xb.shape == (6,) and int(yb) in (2, 3) and int(tb) == 0
    # a given class order and task labels
    task = ClassSplitStream((x, y), (vx, vy), n_experiences=2, scenario="task", class_order=[5, 4, 3, 2, 1, 0])
    assert task.classes_in_experience == [(3, 4, 5), (0, 1, 2)]
    assert task.task_labels == [(0,), (1,)] and task.scenario == "task"
    assert int(task.test_dataset(1)[0][2]) == 1
    shuffled = ClassSplitStream((x, y), (vx, vy), n_experiences=3, shuffle_classes=True, seed=1)
    assert sorted(c for cs in shuffled.classes_in_experience for c in cs) == list(range(6))


def test_subset_and_concat_targets_are_followed():
    x, y = _data(30, 3, 0)
    base = LabelledTensors(x, y)
    sub = Subset(base, [0, 1, 2, 4, 5, 7])
    assert dataset_targets(sub) == [0, 1, 2, 1, 2, 1]
    both = ConcatDataset([sub, base])
    assert len(dataset_targets(both)) == 36
    dm = ClassSplitStream(both, base, n_experiences=3)
    assert [len(dm.train_dataset(i)) for i in range(3)] == [11, 13, 12]


def test_clear_errors_for_bad_user_data():
    x, y = _data(20, 4, 0)
    with pytest.raises(StreamConfigError, match="no `targets` attribute"):
        ClassSplitStream(NoTargets(), (x, y), n_experiences=2).build_benchmark()
    with pytest.raises(StreamConfigError, match="does not divide the 4 classes"):
        ClassSplitStream((x, y), (x, y), n_experiences=3).build_benchmark()
    with pytest.raises(StreamConfigError, match="permutation of the training classes"):
        ClassSplitStream((x, y), (x, y), n_experiences=2, class_order=[0, 1, 2]).build_benchmark()
    with pytest.raises(StreamConfigError, match="integer class ids"):
        ClassSplitStream((x, y.float()), (x, y), n_experiences=2).build_benchmark()
    with pytest.raises(StreamConfigError, match="one test dataset per training dataset"):
        DatasetsStream([(x, y), (x, y)], [(x, y)]).build_benchmark()
    with pytest.raises(StreamConfigError, match="test classes \\[7\\] never occur"):
        ClassSplitStream((x, y), (x[:2], torch.tensor([0, 7])), n_experiences=2).build_benchmark()


def test_datasets_stream_domain_and_task():
    sets = [_data(40, 4, s) for s in range(3)]
    tests = [_data(12, 4, 10 + s) for s in range(3)]
    dm = DatasetsStream([LabelledTensors(*s) for s in sets], tests)
    assert dm.num_experiences == 3 and dm.scenario == "domain"
    assert dm.classes_in_experience == [(0, 1, 2, 3)] * 3 and dm.task_labels == [(0,)] * 3
    assert torch.equal(dm.train_dataset(2)[5][0], sets[2][0][5])
    task = DatasetsStream(sets, tests, scenario="task")
    assert task.task_labels == [(0,), (1,), (2,)] and int(task.test_dataset(2)[0][2]) == 2


def test_datasets_stream_trains_in_one_fit():
    pl.seed_everything(0)
    sets = [_data(64, 4, s) for s in range(2)]
    tests = [_data(32, 4, 10 + s) for s in range(2)]
    dm = DatasetsStream(sets, tests, scenario="task", batch_size=16, epochs_per_experience=2)
    model = ContinualClassifier("mlp", num_classes=4, input_shape=(6,), lr=0.1)
    trainer = pl.Trainer(**quiet_trainer_kwargs())
    trainer.fit(model, datamodule=dm)
    assert trainer.max_epochs == 4
    assert float(trainer.callback_metrics["val/acc_exp1"]) > 0.7  # separable blobs
