"""Semantic calibration (SC) of DR-Tune (Zhou, Chen, Huang; ICCV 2023), as plain torch functions.

The pretrained features of the bank are moved onto the downstream feature distribution before the
head classifies them:

1. both banks are l2-normalized row-wise;
2. global shape alignment: the orthogonal Procrustes (Kabsch) rotation ``R`` fitted on paired,
   centred rows, with the reflection fix (``det R = +1``), applied as ``P <- P R^T + (mu_Q - mu_P R^T)``;
   with fewer rows than dimensions ``R`` is restricted to the fitted span (identity outside it,
   :func:`span_rotation`) instead of the official arbitrary completion;
3. class-centre alignment: the rows of class ``c`` are shifted by ``mu_d,c - mu_p,c``, where
   ``mu_p,c`` is the plain mean of the (rotated) pretrained rows of class ``c`` and ``mu_d,c`` the
   confidence-weighted mean of the downstream rows of class ``c``, with weights
   ``softmax_i(cos(Q_i, w_c))`` over the class-``c`` rows (``w_c``: row ``c`` of the head weight);
4. rescaling: every row is l2-normalized and multiplied by the batch's mean downstream feature norm.

Everything is computed in float32 with autocast off, whatever the training precision. The class
statistics are vectorized with ``index_add_`` / ``scatter_reduce``: classes with one row get a
vector offset (the official loop collapses them to a scalar shift, see METHODS notes 2, pitfall 1)
and absent classes are skipped (class-incremental streams).

The official ``rot_align`` centres both sets and its translation ``t`` is the mean of already
centred data (about 0), so it returns the centred, rotated features; the paper's intent is the
translation to ``mu_Q`` written here. Both give the same calibrated features, since step 3 moves
every class centre to ``mu_d,c`` whatever the translation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor


@contextmanager
def float32_math(device: torch.device) -> Iterator[None]:
    """No gradient and no autocast: SVDs and statistics in the dtype of their inputs (float32)."""
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        yield


def procrustes_rotation(p: Tensor, q: Tensor) -> Tensor:
    """The rotation of :func:`procrustes_fit`."""
    return procrustes_fit(p, q)[0]


def procrustes_fit(p: Tensor, q: Tensor) -> tuple[Tensor, int]:
    """``(R, r)``: the rotation ``R`` (``D x D``, orthogonal, ``det R = +1``) minimizing
    ``||(p - mu_p) R^T - (q - mu_q)||_F``, and the rank ``r`` of the fit.

    ``p`` and ``q`` are paired rows ``(n, D)``. With ``S = P_c^T Q_c = U Sigma V^T`` the minimizer
    maps every left singular vector ``u_i`` to ``v_i``. Computed in float32.

    - **Enough rows** (``rank S >= D - 1``, which needs ``n >= D``): ``R = V U^T``, with the sign of
      the last column of ``V`` (smallest singular value) flipped when ``det(V U^T) < 0``: the
      official formula, unique.
    - **Fewer rows than dimensions** (``rank S = r < D - 1``, e.g. a bank of hundreds of rows in
      1280 dimensions): the data fix ``R`` only on the ``r`` fitted directions; the official formula
      completes it with whatever orthogonal basis the SVD returns for the null space, which rotates
      any other row (old classes, held-out rows) arbitrarily. Here ``R`` is :func:`span_rotation`:
      ``u_i -> v_i`` for the fitted directions, the identity on every direction orthogonal to both
      fitted spans, and the rotation closest to the identity in between. The fitted rows are
      aligned exactly as by the official formula (see ``docs/methods/drtune.md``).

    ``r``, the rank of the fit, counts singular values above ``max(n, D) * eps * sigma_max``
    (float32 ``eps``).
    """
    if p.shape != q.shape or p.dim() != 2:
        raise ValueError(f"procrustes_rotation needs paired rows of equal shape (n, D), got {tuple(p.shape)} "
                         f"and {tuple(q.shape)}")
    with float32_math(p.device):
        p, q = p.float(), q.float()
        pc, qc = p - p.mean(dim=0), q - q.mean(dim=0)
        n, dim = pc.shape
        if n > dim:
            u, s, vh = robust_svd(pc.T @ qc)
        else:  # thin: S = Qp (Rp Rq^T) Qq^T with Pc^T = Qp Rp, Qc^T = Qq Rq, an n x n SVD instead of D x D
            qp, rp = torch.linalg.qr(pc.T)
            qq, rq = torch.linalg.qr(qc.T)
            x, s, yh = robust_svd(rp @ rq.T)
            u, vh = qp @ x, yh @ qq.T
        rank = fitted_rank(s, max(n, dim))
        if rank < dim - 1:
            return span_rotation(u[:, :rank], vh[:rank].mT), rank
        v = vh.mT
        # the sign of the LU determinant: det() itself under/overflows to 0 in float32 at D ~ 1000
        sign = torch.linalg.slogdet(v).sign * torch.linalg.slogdet(u).sign
        fix = torch.ones(v.shape[1], dtype=v.dtype, device=v.device)
        fix[-1] = torch.where(sign < 0, -1.0, 1.0)
        return (v * fix) @ u.T, rank


def robust_svd(x: Tensor, full_matrices: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd``, retried in float64 when LAPACK's float32 solver does not converge (it can fail
    on nearly repeated singular values, e.g. when the fitted and the target spans almost coincide); the
    factors come back in ``x``'s dtype. Non-finite input is reported as such, not retried."""
    try:
        return torch.linalg.svd(x, full_matrices=full_matrices)
    except torch.linalg.LinAlgError as err:
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                "DR-Tune's calibration got non-finite features (NaN or inf) from the encoder: the training "
                "diverged; lower the learning rate, add gradient clipping (gradient_clip_val) or use "
                "precision='32-true' / 'bf16-mixed' instead of '16-mixed'"
            ) from err
        if x.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=full_matrices)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def fitted_rank(singular_values: Tensor, size: int) -> int:
    """Singular values above ``size * eps * max`` (float32 ``eps``): the directions the data determine."""
    if singular_values.numel() == 0:
        return 0
    top = singular_values.max()
    if not bool(top > 0):
        return 0
    tol = top * size * torch.finfo(torch.float32).eps
    return int((singular_values > tol).sum())


def span_rotation(u: Tensor, v: Tensor) -> Tensor:
    """The rotation mapping the orthonormal columns of ``u`` onto those of ``v`` (both ``(D, r)``),
    the identity orthogonal to ``span(u) + span(v)``, and closest to the identity in between.

    Inside ``W = span(u) + span(v)`` (dimension ``w``, between ``r`` and ``2r``) the part of ``W``
    orthogonal to ``u`` is mapped onto the part orthogonal to ``v`` by the orthogonal map closest
    to the identity (the polar factor of their overlap). ``det = +1``: if the completion is a
    reflection its weakest direction is flipped; if ``W = span(u) = span(v)`` there is no
    completion and the fitted direction ``v[:, -1]`` (smallest singular value of the fit) is, as in
    the official formula.
    """
    dim, r = u.shape
    eye = torch.eye(dim, dtype=u.dtype, device=u.device)
    if r == 0:
        return eye
    both = torch.cat([u, v], dim=1)
    basis, sv, _ = robust_svd(both, full_matrices=False)
    w = max(fitted_rank(sv, 2 * dim), r)
    basis = basis[:, :w]
    uw, vw = basis.T @ u, basis.T @ v  # (w, r), orthonormal columns in W's coordinates
    if w > r:
        a = robust_svd(uw)[0][:, r:]  # W minus span(u)
        b = robust_svd(vw)[0][:, r:]  # W minus span(v)
        x, _, yh = robust_svd(b.T @ a)
        rot_w = vw @ uw.T + b @ (x @ yh) @ a.T
        if float(torch.linalg.slogdet(rot_w).sign) < 0:
            x = x.clone()
            x[:, -1] = -x[:, -1]
            rot_w = vw @ uw.T + b @ (x @ yh) @ a.T
    else:
        rot_w = vw @ uw.T
        if float(torch.linalg.slogdet(rot_w).sign) < 0:
            vw = vw.clone()
            vw[:, -1] = -vw[:, -1]
            rot_w = vw @ uw.T
    return eye - basis @ basis.T + basis @ rot_w @ basis.T


def apply_rotation(p: Tensor, rotation: Tensor, mean_p: Tensor, mean_q: Tensor) -> Tensor:
    """``p R^T + (mu_q - mu_p R^T)``: rotates ``p`` about ``mu_p`` and moves ``mu_p`` onto ``mu_q``."""
    with float32_math(p.device):
        return p.float() @ rotation.T + (mean_q - mean_p @ rotation.T)


def class_centre_shift(p: Tensor, q: Tensor, labels: Tensor, head_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Moves the centre of every class present in ``labels`` from its pretrained to its downstream centre.

    Args:
        p: pretrained rows ``(n, D)`` (normalized and, when rotating, rotated).
        q: downstream rows ``(n, D)`` paired with ``p`` (l2-normalized in SC).
        labels: class of each row ``(n,)``, below ``head_weight.shape[0]``.
        head_weight: the head's weight ``(C, D)``; row ``c`` is the class-``c`` prototype, read as a constant.

    Returns:
        ``(shifted p, present)``: ``p + (mu_d,y - mu_p,y)`` per row and the ``(C,)`` mask of classes
        with at least one row (the others are untouched: there is nothing to shift).
    """
    if p.shape != q.shape or p.dim() != 2 or labels.shape != p.shape[:1]:
        raise ValueError(f"class_centre_shift: p {tuple(p.shape)}, q {tuple(q.shape)} and labels "
                         f"{tuple(labels.shape)} must be (n, D), (n, D), (n,)")
    num_classes, dim = head_weight.shape
    if dim != p.shape[1]:
        raise ValueError(f"the head weight has {dim} inputs but the features have {p.shape[1]} dimensions")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} has no row in the head weight ({num_classes} classes)")
    with float32_math(p.device):
        p, q = p.float(), q.float()
        labels = labels.long()
        counts = torch.bincount(labels, minlength=num_classes)
        present = counts > 0
        mean_p = torch.zeros(num_classes, dim, device=p.device).index_add_(0, labels, p)
        mean_p = mean_p / counts.clamp(min=1).unsqueeze(1)
        # confidence of each row: cosine to its class's head weight, softmax within the class
        prototypes = F.normalize(head_weight.detach().float(), dim=1)
        cos = (F.normalize(q, dim=1) * prototypes[labels]).sum(dim=1)
        class_max = torch.full((num_classes,), float("-inf"), device=p.device)
        class_max = class_max.scatter_reduce(0, labels, cos, reduce="amax")
        e = torch.exp(cos - class_max[labels])
        denom = torch.zeros(num_classes, device=p.device).index_add_(0, labels, e)
        weights = e / denom[labels]
        mean_d = torch.zeros(num_classes, dim, device=p.device).index_add_(0, labels, weights.unsqueeze(1) * q)
        return p + (mean_d - mean_p)[labels], present


def rescale(p: Tensor, scale: Tensor | float) -> Tensor:
    """Rows l2-normalized and multiplied by ``scale`` (the batch's mean downstream feature norm)."""
    with float32_math(p.device):
        return F.normalize(p.float(), dim=1) * scale


def mean_norm(features: Tensor) -> Tensor:
    """Mean l2 norm of the rows of ``features`` (float32): the scale of the calibrated features."""
    with float32_math(features.device):
        return features.float().norm(dim=1).mean()


def semantic_calibration(
    pre: Tensor,
    down: Tensor,
    labels: Tensor,
    head_weight: Tensor,
    scale: Tensor | float,
    rotation: Tensor | None = None,
    fit_rows: Tensor | None = None,
) -> Tensor:
    """The calibrated pretrained features ``z~`` ``(n, D)`` of the bank rows (float32, no gradient).

    Args:
        pre / down: pretrained and downstream bank rows ``(n, D)`` (paired).
        labels: ``(n,)`` class of each row.
        head_weight: ``(C, D)`` head weight (class prototypes).
        scale: target norm of every output row.
        rotation: ``R`` to apply (see :func:`procrustes_rotation`), or ``None`` for no rotation.
            It is applied to *every* row, including rows it was not fitted on (in DR-Tune's
            stream setting it is fitted on the fresh rows only, see
            :meth:`cl_plugins.drtune.regularizer.DistributionRegularizer.calibrate`); when the
            fit had fewer rows than dimensions ``R`` is the identity outside the fitted spans
            (:func:`span_rotation`), so those rows keep their components there.
        fit_rows: boolean ``(n,)`` mask of the rows ``R`` was fitted on; their means define the
            translation (all rows when ``None`` or empty).
    """
    with float32_math(pre.device):
        p = F.normalize(pre.float(), dim=1)
        q = F.normalize(down.float(), dim=1)
        if rotation is not None:
            rows = fit_rows if fit_rows is not None and bool(fit_rows.any()) else None
            mp = (p if rows is None else p[rows]).mean(dim=0)
            mq = (q if rows is None else q[rows]).mean(dim=0)
            p = apply_rotation(p, rotation, mp, mq)
        p, _ = class_centre_shift(p, q, labels, head_weight)
        return rescale(p, scale)
