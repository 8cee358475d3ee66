"""In-memory uint8 image tensors served as normalized floats, with optional on-the-fly
augmentation, resizing and a fixed pixel permutation (Permuted-MNIST).

Images stay uint8 in memory (MNIST: 47 MB, CIFAR-10: 184 MB) and are converted per item, so
several experiences can share one tensor (a permuted stream holds no permuted copies).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


class ImageTensorDataset(Dataset):
    """Items ``(x, y)``: ``x`` float32 of shape (C, S, S), ``y`` an int.

    Per item: scale to [0, 1]; permute pixels (``permutation``, over the flattened C*H*W values);
    when ``augment``: pad 4 (zeros) + random crop back to H x W and random horizontal flip, as in
    the standard CIFAR recipe; bilinear resize to ``image_size`` when it differs from H; then
    ``(x - mean) / std`` per channel when ``mean``/``std`` are given.

    Augmentation draws from torch's global RNG (seeded by ``seed_everything`` and, in DataLoader
    workers, by the per-worker seed).

    Args:
        images: uint8 tensor (N, C, H, W).
        targets: labels (N,).
        mean, std: per-channel normalization (``None``: keep [0, 1]).
        augment: random crop with padding 4 and horizontal flip (training data only).
        image_size: output side length (default: H).
        permutation: a permutation of ``range(C*H*W)`` applied to the pixels.
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool = False,
        image_size: int | None = None,
        permutation: Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = torch.as_tensor(targets).long()
        c, h, w = images.shape[1:]
        self.image_size = image_size or h
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        if self.mean is not None and self.mean.numel() not in (1, c):
            raise ValueError(f"mean has {self.mean.numel()} values for {c} channels")
        self.augment = augment
        if permutation is not None and permutation.numel() != c * h * w:
            raise ValueError(f"permutation has {permutation.numel()} entries for {c * h * w} pixels")
        self.permutation = permutation

    def __len__(self) -> int:
        return len(self.targets)

    def _augment(self, x: Tensor) -> Tensor:
        _, h, w = x.shape
        padded = F.pad(x, (4, 4, 4, 4))
        i, j = torch.randint(0, 9, (2,)).tolist()
        x = padded[:, i : i + h, j : j + w]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    @property
    def supports_batches(self) -> bool:
        """Whether :meth:`get_batch` gives the samples of ``__getitem__`` (no augmentation, no resizing)."""
        return not self.augment and self.image_size == self.images.shape[-1] == self.images.shape[-2]

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Items ``indices`` as the default collate stacks them: ``x`` (B, C, H, W) float32 and ``y`` int64, in
        one operation per step instead of one per sample (the same element-wise operations, so the same values).
        Only where :attr:`supports_batches`."""
        if not self.supports_batches:
            raise ValueError("get_batch reads without augmentation or resizing: use __getitem__ for this dataset")
        x = self.images[indices].float().div_(255.0)
        if self.permutation is not None:
            x = x.flatten(1)[:, self.permutation].view_as(x)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x, self.targets[indices]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.images[index].float().div_(255.0)
        if self.permutation is not None:
            x = x.flatten()[self.permutation].view_as(x)
        if self.augment:
            x = self._augment(x)
        if self.image_size != x.shape[-1] or self.image_size != x.shape[-2]:
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)[0]
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x, int(self.targets[index])
