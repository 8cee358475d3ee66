"""Synaptic Intelligence (Zenke, Poole, Ganguli, ICML 2017) as in Mammoth's ``models/si.py``.

During an experience every optimizer step adds to the path integral of each parameter,
``omega += -g * (theta_after - theta_before)`` (:func:`path_integral_step`), where ``g`` is the
gradient of the loss without SI's own penalty (Zenke et al., current Mammoth) or the gradient the
optimizer stepped with (Mammoth's version of the DER paper, ``lr * g^2`` under plain SGD). At the
experience end the importance is consolidated (:func:`consolidate_importance`):
``Omega += omega / ((theta - theta*)^2 + xi)``, then ``theta* <- theta`` and ``omega <- 0``.
Training adds ``c * sum_k Omega_k (theta_k - theta*_k)^2``
(:func:`cl_plugins.baselines.quadratic.quadratic_penalty`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def check_si_hparams(c: float, xi: float) -> None:
    """Raises a ``ValueError`` for a negative ``c`` or a ``xi`` that is not positive."""
    if not c >= 0:
        raise ValueError(f"c (the SI penalty weight) must be >= 0, got {c}")
    if not xi > 0:
        raise ValueError(
            f"xi (SI's damping) must be > 0, got {xi}: it is added to (theta - theta*)^2 in a denominator, and a "
            "parameter that did not move would divide by zero (Mammoth's best args use 0.9 or 1.0)"
        )


def path_integral_step(
    omega: dict[str, Tensor],
    grads: Mapping[str, Tensor],
    before: Mapping[str, Tensor],
    after: Mapping[str, Tensor],
) -> None:
    """Adds ``-g * (after - before)`` to ``omega`` in place (float32).

    Entries that did not move contribute 0 even where ``g`` is not finite (an optimizer step that a
    gradient scaler skipped).
    """
    for name, acc in omega.items():
        delta = after[name].float() - before[name].float()
        contribution = -grads[name].float() * delta
        acc += torch.where(delta != 0, contribution, torch.zeros_like(contribution))


def consolidate_importance(
    importance: Mapping[str, Tensor] | None,
    omega: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    anchors: Mapping[str, Tensor],
    xi: float,
) -> dict[str, Tensor]:
    """``importance + omega / ((params - anchors)^2 + xi)`` (``importance`` starts at zero), float32."""
    out = {}
    for name, w in omega.items():
        drift = params[name].detach().float() - anchors[name].float()
        new = w.float() / (drift * drift + xi)
        out[name] = new if importance is None else importance[name] + new
    return out
