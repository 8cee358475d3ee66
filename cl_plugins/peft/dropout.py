"""Inverted dropout whose mask is drawn as 16-bit integers: the same Bernoulli mask, a cheaper draw.

On the CPU, ``torch.nn.functional.dropout`` draws one Bernoulli sample per element
(``bernoulli_``), which costs more than the LoRA matmuls it feeds: on MiniLM's ``output.dense``
input (16 x 64 tokens x 1536 features) forward + backward took 13 ms with 2 threads, against
6 ms for this module (``examples/bench_peft_text.py`` shapes; ``BENCHMARKS.md``). Here four keep
decisions come from each 64-bit random word: a 16-bit lane ``u`` is uniform on ``[0, 2^16)`` and
the element is kept when ``u >= round(p * 2^16)``, i.e. with probability ``1 - p'``,
``p' = round(p * 2^16) / 2^16`` (``|p' - p| <= 2^-17``; p = 0.05 gives 0.0500031). Kept elements
are scaled by ``1 / (1 - p')``, so the expectation is the input exactly, as in inverted dropout.
The words come from torch's default generator on the input's device, so ``seed_everything`` and
checkpointed RNG states reproduce the masks.

Used where a layer owns its dropout (LoRAMoE's experts, the LoRA groups of LoRA and PEGO). On
CUDA, PyTorch's fused dropout kernel is already cheap and is used unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LANES = 2**16
_INT16_MIN = -(2**15)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> Tensor:
    """A boolean mask of ``shape``, each element ``True`` with probability ``1 - p'`` (see the module
    docstring), drawn from 16-bit lanes of random 64-bit words."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    n = 1
    for s in shape:
        n *= int(s)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1)  # full-range words: every 16-bit lane uniform
    threshold = _INT16_MIN + round(p * _LANES)
    return (words.view(torch.int16)[:n] >= threshold).view(shape)


def effective_p(p: float) -> float:
    """The drop probability :func:`keep_mask` realises for ``p`` (rounded to a multiple of 2^-16)."""
    return round(p * _LANES) / _LANES


class _MaskedDropout(torch.autograd.Function):
    """``x * mask / (1 - p')``; the backward multiplies by the same saved boolean mask."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float) -> Tensor:
        mask = keep_mask(x.shape, p, x.device)
        scale = 1.0 / (1.0 - effective_p(p))
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x.mul(mask).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(ctx.scale), None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: the integer-mask version on the CPU, ``F.dropout`` elsewhere."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return _MaskedDropout.apply(x, p)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with the CPU mask drawn by :func:`keep_mask` (same semantics, ``p`` rounded to
    a multiple of 2^-16 on the CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            raise ValueError("FastDropout has no in-place mode")
        return dropout(x, self.p, self.training)
