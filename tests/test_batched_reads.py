"""The stream's loaders read whole batches (``datamodules.batched``) and yield exactly the batches of the
per-sample path (Avalanche's ``__getitem__`` and the default collate): same values, dtypes and types, for the
built-in streams, tensor streams, joint mode, remapped class ids and loader workers; datasets the batched path
does not understand keep the per-sample path. The evaluation batch is independent of the training batch."""

from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from torch.utils.data import DataLoader

from datamodules import ContinualDataModule, PermutedMNIST, SplitDigits, SplitMNIST, StreamConfigError
from datamodules.batched import BatchedView, batched_view
from datamodules.common import split_benchmark
from datamodules.digits import load_digits_tensors
from datamodules.imagedata import ImageTensorDataset
from datamodules.mnist import load_mnist_tensors
from datamodules.stream import DEFAULT_EVAL_BATCH_SIZE


def _same_batches(a: DataLoader, b: DataLoader, limit: int | None = None) -> int:
    n = 0
    for x, y in zip(a, b, strict=True):
        assert type(x) is type(y) is list and len(x) == len(y)
        for u, v in zip(x, y):
            assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v)
        n += 1
        if limit is not None and n >= limit:
            break
    return n


def _mnist_sample() -> tuple[torch.Tensor, ...]:
    """2,000 training and 500 test images of MNIST (uint8, as the image streams hold them)."""
    tx, ty, vx, vy = load_mnist_tensors()
    return tx[:2000], ty[:2000], vx[:500], vy[:500]


def _per_sample(dm: ContinualDataModule, loader: DataLoader, dataset) -> DataLoader:
    """The loader the stream would build without batched reads (same sampler and batch size)."""
    return DataLoader(dataset, batch_size=loader.batch_size, sampler=loader.sampler)


def _check_stream(dm: ContinualDataModule, limit: int | None = None) -> None:
    _ = dm.benchmark
    phases = 1 if dm.joint else dm.num_experiences
    for epoch in range(phases):
        dataset = dm.train_dataset(epoch)
        loader = dm.train_dataloader() if epoch == 0 else dm._loader(dataset, dm.batch_size, None)
        assert isinstance(loader.dataset, BatchedView), type(loader.dataset)
        assert _same_batches(loader, _per_sample(dm, loader, dataset), limit) > 0
    for j, loader in enumerate(dm.val_dataloader()):
        assert isinstance(loader.dataset, BatchedView)
        assert _same_batches(loader, _per_sample(dm, loader, dm.test_dataset(j))) > 0


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_split_mnist_batches_equal_the_per_sample_path(scenario):
    _check_stream(SplitMNIST(batch_size=10, scenario=scenario, train_samples_per_class=60,
                             test_samples_per_class=20, eval_batch_size=32), limit=20)


def test_permuted_mnist_digits_and_joint_batches_equal_the_per_sample_path():
    _check_stream(PermutedMNIST(n_experiences=3, batch_size=16, train_samples_per_class=30, test_samples_per_class=10,
                                eval_batch_size=64), limit=10)
    _check_stream(SplitDigits(n_experiences=5, batch_size=32, eval_batch_size=50))
    _check_stream(SplitDigits(n_experiences=5, batch_size=32, joint=True, eval_batch_size=50))


def test_tensor_stream_and_remapped_class_ids_equal_the_per_sample_path():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 3, 4, 4, generator=g), torch.arange(10).repeat(30)
    _check_stream(ContinualDataModule(benchmark=split_benchmark(x, y, x[:100], y[:100], 5), batch_size=8,
                                      eval_batch_size=30))
    # class ids renumbered from zero in the order the (shuffled) classes arrive: a lookup in the target transform
    tx, ty, vx, vy = _mnist_sample()
    bm = nc_benchmark(_make_taskaware_classification_dataset(ImageTensorDataset(tx, ty), targets=ty.tolist()),
                      _make_taskaware_classification_dataset(ImageTensorDataset(vx, vy), targets=vy.tolist()),
                      n_experiences=5, task_labels=False, shuffle=True, seed=3,
                      class_ids_from_zero_from_first_exp=True)
    dm = ContinualDataModule(benchmark=bm, batch_size=32, eval_batch_size=40)
    _check_stream(dm)
    assert sorted(bm.classes_order_original_ids[:2]) != [0, 1]  # the renumbering is not the identity here
    first = next(iter(dm.train_dataloader()))
    assert set(first[1].tolist()) <= {0, 1}  # renumbered by the batched path too


def test_loader_workers_get_the_same_batches():
    dm = SplitDigits(n_experiences=5, batch_size=32, num_workers=1)
    _ = dm.benchmark
    loader = dm.train_dataloader()
    assert isinstance(loader.dataset, BatchedView)
    assert _same_batches(loader, _per_sample(dm, loader, dm.train_dataset(0))) > 0


def test_augmentation_transforms_and_odd_leaves_keep_the_per_sample_path():
    tx, ty, vx, vy = _mnist_sample()
    augmented = _make_taskaware_classification_dataset(ImageTensorDataset(tx, ty, augment=True), targets=ty.tolist())
    assert batched_view(augmented) is None
    transformed = _make_taskaware_classification_dataset(ImageTensorDataset(tx, ty), targets=ty.tolist(),
                                                         transform=lambda img: img * 2)
    assert batched_view(transformed) is None
    dx, dy, dvx, dvy = load_digits_tensors()
    dm = ContinualDataModule(benchmark=split_benchmark(dx, dy, dvx, dvy, 5), batch_size=16)
    _ = dm.benchmark
    plain = torch.utils.data.TensorDataset(dx, dy)  # not a stream dataset: items are pairs without task labels
    assert batched_view(plain) is None and dm.loader_dataset(plain) is plain


class _WrongBatches(ImageTensorDataset):
    """Claims batched reads but returns other values: the check at view construction must catch it."""

    def get_batch(self, indices):
        x, y = super().get_batch(indices)
        return x + 1e-3, y


def test_a_leaf_whose_batches_differ_from_its_samples_is_not_used():
    tx, ty, _, _ = _mnist_sample()
    data = _make_taskaware_classification_dataset(_WrongBatches(tx, ty), targets=ty.tolist())
    assert batched_view(data) is None
    right = _make_taskaware_classification_dataset(ImageTensorDataset(tx, ty), targets=ty.tolist())
    assert isinstance(batched_view(right), BatchedView)


def test_evaluation_batch_is_large_by_default_and_independent_of_the_training_batch():
    dm = SplitDigits(n_experiences=5, batch_size=8)
    _ = dm.benchmark
    assert dm.eval_batch_size == DEFAULT_EVAL_BATCH_SIZE == 1000
    assert [loader.batch_size for loader in dm.val_dataloader()] == [1000] * 5
    assert dm.train_dataloader().batch_size == 8
    assert SplitDigits(batch_size=8, eval_batch_size=64).eval_batch_size == 64
    with pytest.raises(StreamConfigError, match="eval_batch_size must be >= 1"):
        SplitDigits(eval_batch_size=0)
