"""Feature bank of DR-Tune: paired pretrained / downstream features with their labels.

Two layouts:

- ``"class_balanced"`` (default, for continual streams): each of the ``C`` classes owns
  ``size // C`` slots, a ring of its own. A class keeps its most recent pretrained features after
  its experience ends, so old classes stay represented in the distribution regularization (the
  pretrained encoder is frozen, so these features never go stale).
- ``"fifo"`` (the official code): one ring of ``size`` rows (MoCo-style queue); in a stream it
  holds only the last ``size`` samples, i.e. the current classes.

Each row carries the experience during which it was written (``stamp``; -1 marks an empty slot),
so the rotation can be fitted on fresh pairs only (see :mod:`cl_plugins.drtune.regularizer`).
All state is registered buffers, so the bank moves with ``.to()`` and is saved by ``state_dict()``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BankMode = Literal["class_balanced", "fifo"]


class FeatureBank(nn.Module):
    """Paired feature bank of ``size`` rows of dimension ``dim`` for ``num_classes`` classes.

    Args:
        size: ``K``, rows in total (``class_balanced``: ``size // num_classes`` per class).
        dim: feature dimension ``D``.
        num_classes: classes of the head (labels lie in ``[0, num_classes)``).
        mode: ``"class_balanced"`` or ``"fifo"`` (module docstring).
    """

    pre: Tensor
    down: Tensor
    labels: Tensor
    stamp: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int, num_classes: int, mode: BankMode = "class_balanced") -> None:
        super().__init__()
        if mode not in ("class_balanced", "fifo"):
            raise ValueError(f"bank mode must be 'class_balanced' or 'fifo', got {mode!r}")
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes} and {dim}")
        if mode == "class_balanced" and size < num_classes:
            raise ValueError(
                f"a class-balanced bank of {size} rows cannot give each of the {num_classes} classes a slot: "
                f"set bank_size >= {num_classes} (e.g. {64 * num_classes})"
            )
        if size < 1:
            raise ValueError(f"bank size must be >= 1, got {size}")
        self.mode: BankMode = mode
        self.num_classes = num_classes
        self.per_class = size // num_classes if mode == "class_balanced" else size
        self.size = self.per_class * num_classes if mode == "class_balanced" else size
        self.dim = dim
        self.register_buffer("pre", torch.zeros(self.size, dim))
        self.register_buffer("down", torch.zeros(self.size, dim))
        self.register_buffer("labels", torch.zeros(self.size, dtype=torch.long))
        self.register_buffer("stamp", torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(num_classes if mode == "class_balanced" else 1, dtype=torch.long))
        if mode == "class_balanced":
            self.labels.copy_(torch.arange(num_classes).repeat_interleave(self.per_class))

    @property
    def valid(self) -> Tensor:
        """Boolean ``(size,)`` mask of the filled rows."""
        return self.stamp >= 0

    def __len__(self) -> int:
        return int(self.valid.sum())

    @torch.no_grad()
    def enqueue(self, pre: Tensor, down: Tensor, labels: Tensor, stamp: int) -> None:
        """Writes a batch of paired rows (float32), overwriting the oldest rows of the ring(s).

        When a batch holds more rows than a ring (a class ring in ``class_balanced``), only its last
        rows are kept, as a ring written row by row would.
        """
        n = labels.shape[0]
        if pre.shape != (n, self.dim) or down.shape != (n, self.dim):
            raise ValueError(f"enqueue expects features of shape ({n}, {self.dim}), got {tuple(pre.shape)} and "
                             f"{tuple(down.shape)}")
        if n == 0:
            return
        labels = labels.to(self.labels.device).long()
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}: "
                             "the head has fewer outputs than the stream has classes")
        if self.mode == "fifo":
            keep = torch.arange(max(n - self.size, 0), n, device=labels.device)
            slots = (self.ptr[0] + keep) % self.size
            self.ptr[0] = (self.ptr[0] + n) % self.size
        else:
            onehot = F.one_hot(labels, self.num_classes)
            rank = (onehot.cumsum(dim=0) - 1).gather(1, labels.unsqueeze(1)).squeeze(1)  # order within class
            count = onehot.sum(dim=0)
            keep = torch.nonzero(rank >= (count[labels] - self.per_class), as_tuple=True)[0]
            kl = labels[keep]
            slots = kl * self.per_class + (self.ptr[kl] + rank[keep]) % self.per_class
            self.ptr.copy_((self.ptr + count) % self.per_class)
        self.pre[slots] = pre[keep].to(self.pre)
        self.down[slots] = down[keep].to(self.down)
        self.labels[slots] = labels[keep]
        self.stamp[slots] = stamp

    def fresh(self, experience: int) -> Tensor:
        """Rows whose downstream features are current: written during ``experience`` (``class_balanced``),
        every filled row (``fifo``, as in the official code)."""
        return self.valid if self.mode == "fifo" else self.stamp == experience

    def class_counts(self) -> Tensor:
        """Filled rows per class ``(num_classes,)``."""
        return torch.bincount(self.labels[self.valid], minlength=self.num_classes)
