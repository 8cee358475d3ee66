"""PEGO's orthogonal regularization (Hu et al., ECCV 2024, arXiv 2407.15085).

Each adapted weight gets a group of ``N`` LoRA modules with updates ``dW_i = (alpha / r) B_i A_i``
(:class:`cl_plugins.peft.lora.LoRAGroupLinear`). Two terms, summed over every adapted weight (each
slice of a fused ``qkv`` on its own), push them to be orthogonal in weight space: preserve
``L_p = sum_i ||W0 dW_i^T||_1`` and diversify ``L_d = sum_{i<j} ||dW_i dW_j^T||_1`` (entrywise L1),
computed in float32 from the factors without forming ``dW_i``. How this follows the official code,
and the defaults' sources: ``docs/methods/pego.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from cl_plugins.peft.lora import LoRAGroupLinear

#: defaults of the official code's run.sh (OfficeHome, VLCS, TerraIncognita, DomainNet)
DEFAULT_NUM_LORAS = 4
DEFAULT_RANK = 4
DEFAULT_WEIGHT = 1e-3


def _precise(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 when it is float64 (float64 references stay exact)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _check(a: Tensor, b: Tensor) -> None:
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[1] or a.shape[1] != b.shape[2]:
        raise ValueError(
            f"expected A of shape (N, r, d_in) and B of shape (d_out, N, r), got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def preserve_loss(w0: Tensor, a: Tensor, b: Tensor, scaling: float = 1.0) -> Tensor:
    """``sum_i || W0 dW_i^T ||_1`` with ``dW_i = scaling * B_i A_i``, in float32 (float64 stays float64).

    Args:
        w0: pretrained weight ``(d_out, d_in)`` (treated as a constant).
        a: ``A`` factors ``(N, r, d_in)``.
        b: ``B`` factors ``(d_out, N, r)``.
        scaling: ``alpha / r``.
    """
    _check(a, b)
    if w0.shape != (b.shape[0], a.shape[2]):
        raise ValueError(f"W0 must have shape (d_out, d_in) = {(b.shape[0], a.shape[2])}, got {tuple(w0.shape)}")
    with torch.autocast(device_type=a.device.type, enabled=False):
        a = _precise(a)  # the factors set the precision of the terms
        w0, b = w0.detach().to(a.dtype), b.to(a.dtype)
        left = torch.einsum("od,nrd->nor", w0, a)  # W0 A_i^T: (N, d_out, r)
        prod = torch.einsum("nor,pnr->nop", left, b)  # W0 A_i^T B_i^T: (N, d_out, d_out)
        return scaling * prod.abs().sum()


def diversify_loss(a: Tensor, b: Tensor, scaling: float = 1.0) -> Tensor:
    """``sum_{i<j} || dW_i dW_j^T ||_1`` with ``dW_i = scaling * B_i A_i``, in float32 (0 for ``N = 1``)."""
    _check(a, b)
    n = a.shape[0]
    if n < 2:
        return a.new_zeros((), dtype=torch.float32)
    with torch.autocast(device_type=a.device.type, enabled=False):
        a = _precise(a)
        b = b.to(a.dtype)
        i, j = torch.triu_indices(n, n, offset=1, device=a.device)
        gram = torch.einsum("prd,psd->prs", a[i], a[j])  # A_i A_j^T: (pairs, r, r)
        left = torch.einsum("opr,prs->pos", b[:, i], gram)  # B_i A_i A_j^T: (pairs, d_out, r)
        prod = torch.einsum("pos,qps->poq", left, b[:, j])  # dW_i dW_j^T / s^2: (pairs, d_out, d_out)
        return (scaling * scaling) * prod.abs().sum()


def pego_losses(
    layers: Iterable[LoRAGroupLinear], diversify: bool = True, preserve: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """``(L_d, L_p)`` summed over every group of every layer (float32, unweighted), layer by layer.

    A term that is not asked for, or ``L_d`` when every group has a single module, is ``None``. The
    reference for :class:`PEGORegularizer`, which computes the same in one batched product per shape.
    """
    div: Tensor | None = None
    pre: Tensor | None = None
    seen = False
    for layer in layers:
        for w0, a, b in layer.factors():
            seen = True
            if diversify and a.shape[0] > 1:
                d = diversify_loss(a, b, layer.scaling)
                div = d if div is None else div + d
            if preserve:
                p = preserve_loss(w0, a, b, layer.scaling)
                pre = p if pre is None else pre + p
    if not seen:
        raise ValueError("pego_losses needs at least one LoRAGroupLinear layer")
    return div, pre


class _Group:
    """Parts (adapted row ranges) of equal shapes, scaling, device and dtype, with their stacked ``W0``."""

    def __init__(self, parts: list[tuple[LoRAGroupLinear, int]]) -> None:
        self.parts = parts
        layer, k = parts[0]
        a = layer.lora_A[k]
        self.scaling = layer.scaling
        self.dtype = torch.promote_types(a.dtype, torch.float32)  # the precision of the terms
        rows = [lay.row_ranges[k] for lay, k in parts]
        with torch.no_grad():
            # W0 is frozen: its stack is built once (a float32 copy of the adapted rows), rebuilt when a weight changes
            self.w0 = torch.stack([lay.base.weight[s:e].to(self.dtype) for (lay, _), (s, e) in zip(parts, rows)])
        n = a.shape[0]
        self.pairs = torch.triu_indices(n, n, offset=1, device=a.device) if n > 1 else None

    def factors(self) -> tuple[Tensor, Tensor]:
        """The parts' ``A`` stacked ``(L, N, r, d_in)`` and ``B`` stacked ``(L, d_out, N, r)``, in the precision
        of the terms."""
        a = torch.stack([lay.lora_A[k] for lay, k in self.parts]).to(self.dtype)
        b = torch.stack([lay.lora_B[k] for lay, k in self.parts]).to(self.dtype)
        return a, b

    def preserve(self, a: Tensor, b: Tensor) -> Tensor:
        """``sum_parts sum_i || W0 dW_i^T ||_1``: ``(W0 A^T)`` for all modules in one ``bmm``, then ``B_i``."""
        num, n, r, d_in = a.shape
        d_out = b.shape[1]
        left = torch.bmm(self.w0, a.reshape(num, n * r, d_in).transpose(1, 2))  # (L, d_out, N r)
        prod = torch.matmul(left.view(num, d_out, n, r).transpose(1, 2), b.permute(0, 2, 3, 1))  # (L, N, d_out, d_out)
        return prod.abs().sum() * self.scaling

    def diversify(self, a: Tensor, b: Tensor) -> Tensor | None:
        """``sum_parts sum_{i<j} || dW_i dW_j^T ||_1`` over the pairs at once; ``None`` for single modules."""
        if self.pairs is None:
            return None
        i, j = self.pairs
        gram = torch.matmul(a[:, i], a[:, j].transpose(-1, -2))  # A_i A_j^T: (L, pairs, r, r)
        bt = b.transpose(1, 2)  # (L, N, d_out, r)
        prod = torch.matmul(torch.matmul(bt[:, i], gram), bt[:, j].transpose(-1, -2))  # (L, pairs, d_out, d_out)
        return prod.abs().sum() * (self.scaling * self.scaling)


class PEGORegularizer:
    """``(L_d, L_p)`` of :func:`pego_losses` over ``layers``, in one batched computation per group of parts
    with equal shapes (same values and gradients, fewer and larger products).

    Every adapted row range of every layer is a part; parts with the same factor shapes, scaling, device and
    dtype form a group whose factors are stacked, so each term is a few ``bmm`` per group whatever the number
    of layers. ``W0`` is frozen, so its stack is kept between calls; it is rebuilt when a base weight changes
    (merge and unmerge, loading a checkpoint, a move to another device), which is checked on every call.
    """

    def __init__(self, layers: Iterable[LoRAGroupLinear]) -> None:
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("PEGORegularizer needs at least one LoRAGroupLinear layer")
        self._groups: list[_Group] = []
        self._state: list[tuple[int, int]] | None = None

    def _weights_state(self) -> list[tuple[int, int]]:
        """Storage and version of every base weight: changes whenever a weight is written or moved."""
        return [(layer.base.weight.data_ptr(), layer.base.weight._version) for layer in self.layers]

    def groups(self) -> list[_Group]:
        """The groups of parts, with ``W0`` rebuilt if a base weight changed since the last call."""
        if any(layer.merged for layer in self.layers):
            raise RuntimeError("PEGO's terms need W0 but a LoRA group is merged into its base weight: unmerge() first")
        state = self._weights_state()
        if state != self._state:
            by_key: dict[tuple[Any, ...], list[tuple[LoRAGroupLinear, int]]] = {}
            for layer in self.layers:
                for k, (a, b) in enumerate(zip(layer.lora_A, layer.lora_B)):
                    key = (tuple(a.shape), tuple(b.shape), layer.scaling, a.device, a.dtype)
                    by_key.setdefault(key, []).append((layer, k))
            self._groups = [_Group(parts) for parts in by_key.values()]
            self._state = state
        return self._groups

    def __call__(self, diversify: bool = True, preserve: bool = True) -> tuple[Tensor | None, Tensor | None]:
        """``(L_d, L_p)`` as :func:`pego_losses` returns them."""
        div: Tensor | None = None
        pre: Tensor | None = None
        groups = self.groups()
        with torch.autocast(device_type=groups[0].w0.device.type, enabled=False):
            for group in groups:
                a, b = group.factors()
                if diversify:
                    d = group.diversify(a, b)
                    if d is not None:
                        div = d if div is None else div + d
                if preserve:
                    p = group.preserve(a, b)
                    pre = p if pre is None else pre + p
        return div, pre
