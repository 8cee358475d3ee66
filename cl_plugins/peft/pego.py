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

import torch
from torch import Tensor

from cl_plugins.peft.lora import LoRAGroupLinear

#: defaults of the official code's run.sh (OfficeHome, VLCS, TerraIncognita, DomainNet)
DEFAULT_NUM_LORAS = 4
DEFAULT_RANK = 4
DEFAULT_WEIGHT = 1e-3


def _check(a: Tensor, b: Tensor) -> None:
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[1] or a.shape[1] != b.shape[2]:
        raise ValueError(
            f"expected A of shape (N, r, d_in) and B of shape (d_out, N, r), got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def preserve_loss(w0: Tensor, a: Tensor, b: Tensor, scaling: float = 1.0) -> Tensor:
    """``sum_i || W0 dW_i^T ||_1`` with ``dW_i = scaling * B_i A_i``, in float32.

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
        w0, a, b = w0.detach().float(), a.float(), b.float()
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
        a, b = a.float(), b.float()
        i, j = torch.triu_indices(n, n, offset=1, device=a.device)
        gram = torch.einsum("prd,psd->prs", a[i], a[j])  # A_i A_j^T: (pairs, r, r)
        left = torch.einsum("opr,prs->pos", b[:, i], gram)  # B_i A_i A_j^T: (pairs, d_out, r)
        prod = torch.einsum("pos,qps->poq", left, b[:, j])  # dW_i dW_j^T / s^2: (pairs, d_out, d_out)
        return (scaling * scaling) * prod.abs().sum()


def pego_losses(
    layers: Iterable[LoRAGroupLinear], diversify: bool = True, preserve: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """``(L_d, L_p)`` summed over every group of every layer (float32, unweighted).

    A term that is not asked for, or ``L_d`` when every group has a single module, is ``None``.
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
