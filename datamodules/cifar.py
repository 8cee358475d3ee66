"""Split-CIFAR-10 from the local JPEG copy, and Avalanche's Split-CIFAR-10/100 for online machines.

:class:`SplitCIFAR10` reads ``cifar10_jpg.tar.gz`` (``train/<class>/*.jpg``, ``test/<class>/*.jpg``;
class folders sort into the standard label order) straight from the archive, or from an extracted
folder, decodes all 60,000 images once into a uint8 tensor file in the cache folder
(``$CL_PLUGINS_CACHE`` or ``~/.cache/cl_plugins``; about 185 MB) and loads that file on later runs.
The archive is streamed, never extracted to disk. Images are normalized with the CIFAR-10
mean/std; training data can be augmented on the fly (random crop with padding 4 + horizontal
flip) and resized (``image_size``, e.g. 224 for ImageNet-pretrained backbones).
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.generic import class_split_benchmark
from datamodules.imagedata import ImageTensorDataset
from datamodules.sources import (
    DataNotFoundError,
    balanced_subset,
    cache_dir,
    cached_build,
    digest,
    file_fingerprint,
    locate_shared,
)
from datamodules.stream import ContinualDataModule, Scenario, StreamConfigError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: per-channel statistics of the CIFAR training sets (the std of the pixels, not the often-copied
#: (0.2023, 0.1994, 0.2010), which is the mean of per-image stds)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
ARCHIVE_NAME = "cifar10_jpg.tar.gz"
_MEMBER = re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+\.(?:jpe?g|png))$", re.IGNORECASE)


def resolve_cifar10_source(root: str | None) -> Path:
    """The archive or extracted folder to read: ``root`` (the archive, the extracted folder, or a
    folder holding the archive), else ``cifar10_jpg.tar.gz`` in ``$CL_DATA_ROOT`` or
    ``../shared/data``."""
    path = locate_shared(root, [ARCHIVE_NAME, "cifar10_jpg"], "CIFAR-10 JPEG copy (cifar10_jpg.tar.gz)")
    if path.is_dir():
        if (path / "train").is_dir() and (path / "test").is_dir():
            return path
        if (path / ARCHIVE_NAME).is_file():
            return path / ARCHIVE_NAME
        raise DataNotFoundError(
            f"{path} holds neither train/<class>/*.jpg + test/<class>/*.jpg nor {ARCHIVE_NAME}: pass the "
            "extracted folder or the archive as root"
        )
    return path


def _iter_images(source: Path) -> Iterator[tuple[str, str, str, bytes]]:
    """``(split, class_name, file_name, jpeg_bytes)`` of every image in the archive or folder."""
    if source.is_dir():
        for split in ("train", "test"):
            for f in sorted((source / split).glob("*/*")):
                m = _MEMBER.search(f.relative_to(source).as_posix())
                if m and f.is_file():
                    yield m.group(1), m.group(2), m.group(3), f.read_bytes()
        return
    with tarfile.open(source, "r|*") as tf:  # streamed: one pass over the gzip
        for member in tf:
            m = _MEMBER.search(member.name)
            if m and member.isfile():
                fh = tf.extractfile(member)
                if fh is not None:
                    yield m.group(1), m.group(2), m.group(3), fh.read()


def decode_image_folder_tree(source: Path) -> dict[str, Any]:
    """Decodes every image into ``{train_x, train_y, test_x, test_y}`` (x uint8 (N, 3, H, W), sorted
    by class then file name) plus ``classes`` (the sorted class folder names)."""
    from PIL import Image

    items: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
    for split, cls, name, data in _iter_images(source):
        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        items[split].append((cls, name, img))
    classes = sorted({c for c, _, _ in items["train"]})
    if not items["train"] or not items["test"]:
        raise DataNotFoundError(f"{source} has no train/<class>/*.jpg or no test/<class>/*.jpg images")
    extra = sorted({c for c, _, _ in items["test"]} - set(classes))
    if extra:
        raise ValueError(f"{source}: test classes {extra} have no training folder")
    out: dict[str, Any] = {"classes": classes}
    for split, rows in items.items():
        rows.sort(key=lambda r: (classes.index(r[0]), r[1]))
        shapes = {r[2].shape for r in rows}
        if len(shapes) != 1:
            raise ValueError(f"{source}: {split} images differ in size {sorted(shapes)}; resize them to one size")
        x = torch.from_numpy(np.stack([r[2] for r in rows])).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_x"] = x
        out[f"{split}_y"] = torch.tensor([classes.index(r[0]) for r in rows], dtype=torch.long)
    return out


def load_cifar10_jpg(root: str | None = None, cache: str | None = None) -> dict[str, Any]:
    """The JPEG CIFAR-10 as uint8 tensors, decoded once into the cache folder and loaded from there
    afterwards; keys ``train_x, train_y, test_x, test_y, classes``."""
    source = resolve_cifar10_source(root)
    fp = [file_fingerprint(source)]
    if source.is_dir():
        fp += [file_fingerprint(source / "train"), file_fingerprint(source / "test")]
    path = cache_dir(cache) / f"cifar10_jpg-{digest(*fp)}.pt"
    return _load_cached(path, source)


_MEMORY: dict[Path, dict[str, Any]] = {}


def _load_cached(path: Path, source: Path) -> dict[str, Any]:
    if path not in _MEMORY:  # also keep it in the process: a second build costs only the split
        _MEMORY.clear()
        _MEMORY[path] = cached_build(path, lambda: decode_image_folder_tree(source))
    return _MEMORY[path]


class SplitCIFAR10(ContinualDataModule):
    """Split-CIFAR-10 from the local JPEG copy: 10 classes split into ``n_experiences``.

    Args:
        root: ``cifar10_jpg.tar.gz``, its extracted folder, or a folder holding it; default:
            ``$CL_DATA_ROOT`` then ``../shared/data`` next to the repository.
        n_experiences: divisor of 10 (default 5 x 2 classes).
        scenario: ``"class"`` or ``"task"`` (task label = experience index).
        class_order: classes in arrival order (default 0..9); ``shuffle_classes`` shuffles with ``seed``.
        train_samples_per_class: few-shot training subsets (fixed ``subset_seed``, class-balanced).
        test_samples_per_class: smaller test sets for fast runs (default: all 1,000 per class).
        subset_seed: seed of the subsets (fixed, independent of the training ``seed``).
        augment: random crop (padding 4) + horizontal flip on the training data.
        image_size: side of the served images (bilinear resize from 32 when different).
        cache_dir: folder of the decoded-tensor cache.
        **kwargs: :class:`ContinualDataModule` arguments (epochs_per_experience, batch_size, seed, joint, ...).
    """

    classes = CIFAR10_CLASSES
    mean, std = CIFAR10_MEAN, CIFAR10_STD

    def __init__(
        self,
        root: str | None = None,
        n_experiences: int = 5,
        scenario: Scenario = "class",
        class_order: list[int] | None = None,
        shuffle_classes: bool = False,
        train_samples_per_class: int | None = None,
        test_samples_per_class: int | None = None,
        subset_seed: int = 0,
        augment: bool = False,
        image_size: int = 32,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if scenario not in ("class", "task"):
            raise StreamConfigError(f"Split-CIFAR-10 is class- or task-incremental, got scenario={scenario!r}")
        if image_size < 1:
            raise StreamConfigError(f"image_size must be >= 1, got {image_size}")
        super().__init__(scenario=scenario, **kwargs)
        self.root, self.cache_dir = root, cache_dir
        self.n_experiences = n_experiences
        self.class_order, self.shuffle_classes = class_order, shuffle_classes
        self.train_samples_per_class, self.test_samples_per_class = train_samples_per_class, test_samples_per_class
        self.subset_seed = subset_seed
        self.augment, self.image_size = augment, image_size

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one served image."""
        return (3, self.image_size, self.image_size)

    def build_benchmark(self) -> Any:
        data = load_cifar10_jpg(self.root, self.cache_dir)
        tx, ty, vx, vy = data["train_x"], data["train_y"], data["test_x"], data["test_y"]
        if self.train_samples_per_class is not None:
            idx = balanced_subset(ty, self.subset_seed, per_class=self.train_samples_per_class)
            tx, ty = tx[idx], ty[idx]
        if self.test_samples_per_class is not None:
            idx = balanced_subset(vy, self.subset_seed, per_class=self.test_samples_per_class)
            vx, vy = vx[idx], vy[idx]
        train = ImageTensorDataset(tx, ty, self.mean, self.std, augment=self.augment, image_size=self.image_size)
        test = ImageTensorDataset(vx, vy, self.mean, self.std, augment=False, image_size=self.image_size)
        return class_split_benchmark(
            train, test, self.n_experiences, self._scenario or "class",
            self.class_order, self.shuffle_classes, self.seed,
        )


class AvalancheSplitCIFAR(ContinualDataModule):
    """Avalanche's classic Split-CIFAR-10 / Split-CIFAR-100 (torchvision's files, downloaded into
    ``dataset_root`` when missing: needs a network the first time).

    Offline, the download failure is raised as a :class:`DataNotFoundError` chained to the original
    error; use :class:`SplitCIFAR10` with the local JPEG copy there.

    Args:
        which: 10 or 100.
        dataset_root: torchvision's CIFAR folder (default: Avalanche's ``~/.avalanche/data/cifar<which>``).
        n_experiences: divisor of ``which``.
        scenario: ``"class"`` or ``"task"``.
        class_order: classes in arrival order (default ascending); ``shuffle_classes`` shuffles with ``seed``.
        augment: random crop (padding 4) + horizontal flip on the training data (Avalanche's default
            recipe; off by default here, as in :class:`SplitCIFAR10`).
        **kwargs: :class:`ContinualDataModule` arguments.
    """

    input_shape = (3, 32, 32)

    def __init__(
        self,
        which: int = 10,
        dataset_root: str | None = None,
        n_experiences: int = 5,
        scenario: Scenario = "class",
        class_order: list[int] | None = None,
        shuffle_classes: bool = False,
        augment: bool = False,
        **kwargs: Any,
    ) -> None:
        if which not in (10, 100):
            raise StreamConfigError(f"which must be 10 or 100 (CIFAR-10 or CIFAR-100), got {which}")
        if scenario not in ("class", "task"):
            raise StreamConfigError(f"Split-CIFAR is class- or task-incremental, got scenario={scenario!r}")
        if n_experiences < 1 or which % n_experiences:
            raise StreamConfigError(f"n_experiences={n_experiences} must divide the {which} classes")
        super().__init__(scenario=scenario, **kwargs)
        self.which, self.dataset_root = which, dataset_root
        self.n_experiences = n_experiences
        self.class_order, self.shuffle_classes = class_order, shuffle_classes
        self.augment = augment

    def _transforms(self) -> tuple[Any, Any]:
        from torchvision import transforms as T

        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if self.which == 10 else (CIFAR100_MEAN, CIFAR100_STD)
        base = [T.ToTensor(), T.Normalize(mean, std)]
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        return T.Compose(aug + base), T.Compose(base)

    def build_benchmark(self) -> Any:
        from avalanche.benchmarks.classic import ccifar10, ccifar100

        if self.which == 10:
            fetch, make = ccifar10.get_cifar10_dataset, ccifar10.SplitCIFAR10
        else:
            fetch, make = ccifar100.get_cifar100_dataset, ccifar100.SplitCIFAR100
        try:  # the step that downloads, and the one that fails offline
            fetch(self.dataset_root)
        except (OSError, RuntimeError) as err:
            where = self.dataset_root or f"Avalanche's default folder (~/.avalanche/data/cifar{self.which})"
            hint = (
                "use datamodules.SplitCIFAR10 with the local JPEG copy (cifar10_jpg.tar.gz) on offline machines"
                if self.which == 10
                else "CIFAR-100 has no offline copy here: put torchvision's cifar-100-python folder in "
                "dataset_root, or use datamodules.SplitCIFAR10 with the local JPEG copy (cifar10_jpg.tar.gz)"
            )
            raise DataNotFoundError(
                f"Avalanche could not load CIFAR-{self.which} from {where}: {type(err).__name__}: {err}. "
                f"It downloads the dataset on first use, which needs internet access; {hint}"
            ) from err
        train_tf, eval_tf = self._transforms()
        order = self.class_order
        if order is None and not self.shuffle_classes:
            order = list(range(self.which))
        return make(
            self.n_experiences,
            return_task_id=self._scenario == "task",
            seed=self.seed,
            fixed_class_order=order,
            shuffle=order is None,
            train_transform=train_tf,
            eval_transform=eval_tf,
            dataset_root=self.dataset_root,
        )


def cifar_tensor_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, 3, H, W) scaled to [0, 1] (to check the constants)."""
    xf = x.float().div_(255.0)
    return xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).tolist()
