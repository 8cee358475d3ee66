"""The quadratic anchor penalty shared by online EWC and SI: ``sum_k w_k (theta_k - theta*_k)^2``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def check_same_keys(what: str, params: Mapping[str, Tensor], other: Mapping[str, Tensor]) -> None:
    """Raises a ``KeyError`` naming the parameters that ``params`` and ``other`` do not share."""
    if params.keys() != other.keys():
        missing = sorted(set(params) - set(other))
        extra = sorted(set(other) - set(params))
        raise KeyError(
            f"the {what} do not match the regularized parameters: missing {missing[:5]}, unexpected {extra[:5]}; "
            "the model's trainable parameters changed since they were stored"
        )


def quadratic_penalty(
    params: Mapping[str, Tensor], anchors: Mapping[str, Tensor], importances: Mapping[str, Tensor]
) -> Tensor:
    """``sum over names of sum(importance * (param - anchor)^2)``, a scalar.

    Computed in at least float32 whatever the autocast dtype (float64 inputs stay float64); the
    gradient with respect to ``params`` is ``2 * importance * (param - anchor)``.
    """
    check_same_keys("anchors", params, anchors)
    check_same_keys("importances", params, importances)
    if not params:
        raise ValueError("quadratic_penalty needs at least one parameter")
    device = next(iter(params.values())).device
    terms = []
    with torch.autocast(device_type=device.type, enabled=False):
        for name, p in params.items():
            dtype = torch.promote_types(p.dtype, torch.float32)
            diff = p.to(dtype) - anchors[name].to(dtype)
            terms.append((importances[name].to(dtype) * diff * diff).sum())
    return torch.stack(terms).sum()
