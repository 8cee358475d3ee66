"""Continual-learning metrics over an accuracy matrix (ARCHITECTURE.md section 5).

``R[i][j]`` is the accuracy (in ``[0, 1]``) on test experience ``j`` after training experience
``i``. While a stream runs the matrix has only the rows of the experiences trained so far, and a
row may be shorter than the number of test experiences or hold ``None`` where an experience was
not evaluated (e.g. a protocol that evaluates seen experiences only).

Definitions, for the row ``k`` (0-based; ``k`` defaults to the last row):

- **Average accuracy** ``A_k = mean_{j<=k} R[k][j]`` (Chaudhry et al., 2018; Lopez-Paz & Ranzato,
  2017), the same formula for domain-, class- and task-incremental streams (the scenario decides
  how a row was evaluated, e.g. task-label masking, not how it is averaged).
- **Average forgetting** (Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018):
  ``f_j^k = max_{l in [j, k-1]} R[l][j] - R[k][j]`` for ``j < k``, and ``F_k = mean_{j<k} f_j^k``.
  The paper's maximum runs over ``l in [0, k-1]``; before experience ``j`` is trained its accuracy
  is not knowledge that can be forgotten, so (as in most later work) ``l`` starts at ``j``.
- **Backward transfer** (Lopez-Paz & Ranzato, "Gradient Episodic Memory", NeurIPS 2017):
  ``BWT_k = mean_{j<k} (R[k][j] - R[j][j])``; negative values are forgetting.
- **Forward transfer** (same paper): ``FWT_k = mean_{1<=j<=k} (R[j-1][j] - b[j])`` where ``b[j]`` is
  the accuracy on test experience ``j`` of the model before any training.

Undefined values are ``None`` (never NaN, so that they survive JSON): forgetting, BWT and FWT after
the first experience (``k = 0``), FWT without the initial accuracies ``b`` or without the entries
``R[j-1][j]`` (seen-experiences-only protocols), and every metric but the average accuracy of a
joint-training run (a single row over all test experiences; its average accuracy is the mean of
that row). A missing entry that a defined metric needs raises ``ValueError``.

When the number of test experiences differs from the number of training experiences the columns
do not correspond to training experiences; :func:`continual_summary` then reports the mean of each
whole row as its average accuracy (Avalanche's "stream accuracy") and ``None`` for the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Row = Sequence[float | None]
Matrix = Sequence[Row]

#: tolerance of the ``[0, 1]`` range check (accuracies from float arithmetic)
_EPS = 1e-6


def _row_index(R: Matrix, k: int | None) -> int:
    if len(R) == 0:
        raise ValueError("the accuracy matrix has no rows: train at least one experience first")
    if k is None:
        return len(R) - 1
    if not 0 <= k < len(R):
        raise ValueError(f"row k={k} is out of range: the accuracy matrix has {len(R)} row(s)")
    return k


def _value(R: Matrix, i: int, j: int) -> float | None:
    """``R[i][j]`` as a float, ``None`` where it is missing; raises on values outside ``[0, 1]``."""
    if i >= len(R) or j >= len(R[i]):
        return None
    v = R[i][j]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    v = float(v)
    if not -_EPS <= v <= 1 + _EPS:
        raise ValueError(f"R[{i}][{j}] = {v} is not an accuracy in [0, 1] (pass fractions, not percentages)")
    return v


def _need(R: Matrix, i: int, j: int, metric: str) -> float:
    v = _value(R, i, j)
    if v is None:
        raise ValueError(
            f"{metric} needs R[{i}][{j}] (accuracy on test experience {j} after experience {i}), "
            "which is missing: evaluate every seen experience after each training experience"
        )
    return v


def average_accuracy(R: Matrix, k: int | None = None) -> float:
    """``mean_{j<=k} R[k][j]``: accuracy over the experiences seen up to ``k``."""
    k = _row_index(R, k)
    return sum(_need(R, k, j, "average accuracy") for j in range(k + 1)) / (k + 1)


def stream_accuracy(R: Matrix, k: int | None = None) -> float:
    """Mean of the whole row ``k`` (every test experience): the average accuracy of a joint run,
    and of streams whose test experiences do not match the training experiences."""
    k = _row_index(R, k)
    if len(R[k]) == 0:
        raise ValueError(f"row {k} of the accuracy matrix is empty")
    return sum(_need(R, k, j, "stream accuracy") for j in range(len(R[k]))) / len(R[k])


def forgetting(R: Matrix, k: int | None = None) -> list[float]:
    """``[f_0^k, ..., f_{k-1}^k]`` with ``f_j^k = max_{l in [j, k-1]} R[l][j] - R[k][j]``."""
    k = _row_index(R, k)
    out = []
    for j in range(k):
        best = max(_need(R, ell, j, "forgetting") for ell in range(j, k))
        out.append(best - _need(R, k, j, "forgetting"))
    return out


def average_forgetting(R: Matrix, k: int | None = None) -> float | None:
    """Chaudhry et al. (2018): mean of :func:`forgetting` over ``j < k``; ``None`` for ``k = 0``."""
    f = forgetting(R, k)
    return sum(f) / len(f) if f else None


def backward_transfer(R: Matrix, k: int | None = None) -> float | None:
    """Lopez-Paz & Ranzato (2017): ``mean_{j<k} (R[k][j] - R[j][j])``; ``None`` for ``k = 0``."""
    k = _row_index(R, k)
    if k == 0:
        return None
    return sum(_need(R, k, j, "BWT") - _need(R, j, j, "BWT") for j in range(k)) / k


def forward_transfer(R: Matrix, initial: Row | None, k: int | None = None) -> float | None:
    """Lopez-Paz & Ranzato (2017): ``mean_{1<=j<=k} (R[j-1][j] - b[j])`` with ``b = initial``, the
    accuracies before any training. ``None`` for ``k = 0``, without ``initial``, or where an
    ``R[j-1][j]`` or ``b[j]`` is missing (the future experiences were not evaluated)."""
    k = _row_index(R, k)
    if k == 0 or initial is None:
        return None
    total = 0.0
    for j in range(1, k + 1):
        r = _value(R, j - 1, j)
        b = _value([initial], 0, j)
        if r is None or b is None:
            return None
        total += r - b
    return total / k


def continual_summary(
    R: Matrix,
    initial: Row | None = None,
    *,
    joint: bool = False,
    aligned: bool = True,
) -> dict[str, Any]:
    """Every metric after every row: ``{"per_experience": {name: [value per row]}, "final": {name:
    value of the last row}}`` with names ``avg_acc``, ``avg_forgetting``, ``bwt``, ``fwt``.

    ``aligned`` says that test experience ``j`` belongs to training experience ``j`` (the same
    number of test and training experiences). ``joint=True`` (one row over all test experiences)
    and ``aligned=False`` report the whole-row mean as ``avg_acc`` and ``None`` for the rest (see
    the module docstring).
    """
    if joint and len(R) != 1:
        raise ValueError(f"a joint-training run has exactly one row, this matrix has {len(R)}")
    aligned = aligned and not joint
    names = ("avg_acc", "avg_forgetting", "bwt", "fwt")
    per: dict[str, list[float | None]] = {name: [] for name in names}
    for k in range(len(R)):
        if aligned:
            values = (average_accuracy(R, k), average_forgetting(R, k), backward_transfer(R, k),
                      forward_transfer(R, initial, k))
        else:
            values = (stream_accuracy(R, k), None, None, None)
        for name, v in zip(names, values):
            per[name].append(v)
    final = {name: (per[name][-1] if R else None) for name in names}
    return {"per_experience": per, "final": final}


def format_matrix(R: Matrix, initial: Row | None = None, percent: bool = True, digits: int = 1) -> str:
    """The matrix as a plain-text table: one row per training experience (``after i``), one column
    per test experience; the initial accuracies first when given; ``-`` marks missing entries."""
    ncols = max([len(row) for row in R] + [len(initial) if initial is not None else 0])
    scale = 100.0 if percent else 1.0
    width = max(7, digits + 6)

    def cell(v: float | None) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-".rjust(width)
        return f"{float(v) * scale:{width}.{digits}f}"

    label_width = max(9, len(f"after {len(R) - 1}"))
    lines = ["".ljust(label_width) + "".join(f"exp {j}".rjust(width) for j in range(ncols))]
    rows: list[tuple[str, Row]] = []
    if initial is not None:
        rows.append(("initial", initial))
    rows += [(f"after {i}", row) for i, row in enumerate(R)]
    for label, row in rows:
        values = [row[j] if j < len(row) else None for j in range(ncols)]
        lines.append(label.ljust(label_width) + "".join(cell(v) for v in values))
    return "\n".join(lines)
