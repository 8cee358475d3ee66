"""Split-FashionMNIST from the idx files of the Debian package ``dataset-fashion-mnist``.

That package puts the four gzipped idx files flat in ``/usr/share/datasets/fashion-mnist``
(``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``). Any folder holding these files works as ``root`` (also
torchvision's ``<root>/FashionMNIST/raw`` layout). No download is attempted.

Images are ``(1, 28, 28)`` float32 normalized with Fashion-MNIST's mean 0.2860 and std 0.3530
(``normalize=False``: values in [0, 1]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from datamodules.generic import class_split_benchmark
from datamodules.mnist import IDX_NAMES, IdxImageStream, idx_files_in, load_idx_tensors
from datamodules.sources import DataNotFoundError
from datamodules.stream import Scenario, StreamConfigError

DEFAULT_FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def find_fashion_files(root: str | None = None) -> list[Path]:
    """The four Fashion-MNIST idx files in ``root`` (or ``root/FashionMNIST/raw``); raises
    :class:`DataNotFoundError` naming the folders and the install command."""
    base = Path(root or DEFAULT_FASHION_ROOT).expanduser()
    candidates = [base, base / "FashionMNIST" / "raw"]
    for folder in candidates:
        files = idx_files_in(folder)
        if files is not None:
            return files
    raise DataNotFoundError(
        f"Fashion-MNIST idx files ({', '.join(n + '.gz' for n in IDX_NAMES)}) not found in "
        f"{' or '.join(str(c) for c in candidates)}. Install them with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to "
        f"{DEFAULT_FASHION_ROOT}), or pass root=<folder with the four files>"
    )


class SplitFashionMNIST(IdxImageStream):
    """Split-FashionMNIST: the 10 clothing classes split by class into ``n_experiences``.

    Args:
        root: folder with the idx files (default ``/usr/share/datasets/fashion-mnist``).
        n_experiences, scenario, class_order, shuffle_classes, normalize, train_samples_per_class,
            test_samples_per_class, subset_seed: as :class:`datamodules.SplitMNIST`.
        **kwargs: :class:`ContinualDataModule` arguments (epochs_per_experience, batch_size, seed, joint, ...).
    """

    mean = (0.2860,)
    std = (0.3530,)
    classes = FASHION_CLASSES

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
        **kwargs: Any,
    ) -> None:
        if scenario not in ("class", "task"):
            raise StreamConfigError(f"Split-FashionMNIST is class- or task-incremental, got scenario={scenario!r}")
        super().__init__(normalize, train_samples_per_class, test_samples_per_class, subset_seed,
                         scenario=scenario, **kwargs)
        self.root = root
        self.n_experiences = n_experiences
        self.class_order, self.shuffle_classes = class_order, shuffle_classes

    def load_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return load_idx_tensors(find_fashion_files(self.root))

    def build_benchmark(self) -> Any:
        tx, ty, vx, vy = self.subset_tensors()
        return class_split_benchmark(
            self.image_dataset(tx, ty), self.image_dataset(vx, vy), self.n_experiences,
            self._scenario or "class", self.class_order, self.shuffle_classes, self.seed,
        )
