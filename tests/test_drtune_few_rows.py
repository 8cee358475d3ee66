"""DR-Tune's rotation with fewer fitted rows than feature dimensions (the few-shot benchmark's regime:
1280-d features, a bank of hundreds of rows) and with many dimensions (the reflection fix)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cl_plugins.drtune import DistributionRegularizer, FeatureBank, procrustes_fit, semantic_calibration

EPS = torch.finfo(torch.float32).eps


def _random_rotation(dim: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    if torch.linalg.slogdet(q).sign < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


def test_fit_on_fewer_rows_than_dimensions_is_the_identity_outside_the_fitted_span():
    """200 pairs in 512 dimensions: the data fix the rotation on 199 directions. The fitted rows are
    aligned as well as by any optimal rotation, and a direction orthogonal to both fitted spans is
    left where it is (the official completion, the SVD's arbitrary null-space basis, moves it)."""
    g = torch.Generator().manual_seed(0)
    n, dim = 200, 512
    p = torch.randn(n, dim, generator=g)
    q = p @ _random_rotation(dim, g).T + 0.05 * torch.randn(n, dim, generator=g)
    r, rank = procrustes_fit(p, q)
    assert rank == n - 1  # centring removes one direction
    # orthogonal with det +1; float32 products of dim terms of size <= 1
    torch.testing.assert_close(r @ r.T, torch.eye(dim), atol=50 * dim**0.5 * EPS, rtol=0)
    assert float(torch.linalg.slogdet(r.double()).sign) == 1.0

    # fitted rows: any rotation mapping each u_i onto v_i reaches the optimum
    # ||Pc||^2 + ||Qc||^2 - 2 sum(sigma), computed here in float64
    pc, qc = (p - p.mean(0)).double(), (q - q.mean(0)).double()
    optimum = (pc.square().sum() + qc.square().sum() - 2 * torch.linalg.svdvals(pc.T @ qc).sum()).sqrt()
    residual = (pc @ r.double().T - qc).norm()
    assert float(residual) == pytest.approx(float(optimum), rel=1e-3)

    # a direction orthogonal to both fitted spans is not moved
    basis = torch.linalg.svd(torch.cat([pc, qc]).T, full_matrices=False)[0][:, : 2 * (n - 1)]
    x = torch.randn(3, dim, generator=g, dtype=torch.float64)
    x = (x - (x @ basis) @ basis.T).float()
    moved = (x @ r.T - x).norm(dim=1) / x.norm(dim=1)
    assert float(moved.max()) < 1e-4, moved


def test_enough_rows_in_many_dimensions_still_get_the_reflection_fix():
    """800 rows in 400 dimensions, mirrored along their axis of least spread (in a random frame, so
    that the singular vectors are dense): ``S = 2 B diag(s^2) M B^T`` with ``M`` negating the last
    axis, so the best proper rotation is the identity. In float32, ``det`` of a dense 400 x 400
    orthogonal matrix comes out as 0, which disabled the fix."""
    dim = 400
    frame = _random_rotation(dim, torch.Generator().manual_seed(1))
    spread = torch.linspace(2.0, 1.0, dim)
    p = torch.cat([torch.diag(spread), -torch.diag(spread)]) @ frame.T
    mirror = torch.ones(dim)
    mirror[-1] = -1.0
    q = p @ (frame @ torch.diag(mirror) @ frame.T).T
    r, rank = procrustes_fit(p, q)
    assert rank == dim
    assert float(torch.linalg.slogdet(r.double()).sign) == 1.0
    torch.testing.assert_close(r, torch.eye(dim), atol=1e-3, rtol=0)


def _few_shot_bank(dim: int = 1280, per_class: int = 40) -> FeatureBank:
    """8 old classes (experience 0) and 2 fresh ones (experience 1) of ``per_class`` rows each in
    ``dim`` dimensions: the fresh pairs differ by a rotation of the whole space."""
    g = torch.Generator().manual_seed(0)
    bank = FeatureBank(10 * per_class, dim, 10)
    means = torch.randn(10, dim, generator=g)
    old_y = torch.arange(8).repeat_interleave(per_class)
    p_old = means[old_y] + 0.7 * torch.randn(len(old_y), dim, generator=g)
    bank.enqueue(p_old, p_old + 0.3 * torch.randn(len(old_y), dim, generator=g), old_y, stamp=0)
    new_y = torch.tensor([8, 9]).repeat_interleave(per_class)
    p_new = means[new_y] + 0.7 * torch.randn(len(new_y), dim, generator=g)
    q_new = p_new @ _random_rotation(dim, g).T + 0.1 * torch.randn(len(new_y), dim, generator=g)
    bank.enqueue(p_new, q_new, new_y, stamp=1)
    return bank


def _class_deviations(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=10).clamp(min=1)
    means = torch.zeros(10, z.shape[1]).index_add_(0, labels, z) / counts[:, None]
    return z - means[labels]


def test_old_class_rows_keep_their_shape_when_the_rotation_is_fitted_on_few_fresh_rows():
    """1280-d bank, 80 fresh rows: the rotation fitted on them must not scramble the 320 rows of the
    8 old classes. Their within-class structure (deviation from the class centre) after calibration
    matches the calibration without rotation; with the official completion it is unrelated to it
    (cosine about 0)."""
    bank = _few_shot_bank()
    head = torch.randn(10, bank.dim, generator=torch.Generator().manual_seed(3))
    reg = DistributionRegularizer(bank, rotation_interval=1)
    reg.set_experience(1)
    z, labels = reg.calibrate(1.0, head)
    assert reg.last_fit == {"rows": 80, "rank": 79, "dim": 1280}

    rows = bank.valid
    plain = semantic_calibration(bank.pre[rows], bank.down[rows], bank.labels[rows], head, 1.0)
    old = labels < 8
    cos = F.cosine_similarity(_class_deviations(z, labels)[old], _class_deviations(plain, labels)[old], dim=1)
    assert float(cos.min()) > 0.7, (float(cos.min()), float(cos.mean()))
    # the fresh rows are rotated: the fit did something
    fresh_cos = F.cosine_similarity(z[~old], plain[~old], dim=1)
    assert float(fresh_cos.mean()) < 0.9


def _failing_float32_svd(monkeypatch) -> list[torch.dtype]:
    """``torch.linalg.svd`` as LAPACK's float32 solver when it does not converge (seen on the text stream,
    seed 1: 'The algorithm failed to converge because the input matrix is ill-conditioned or has too many
    repeated singular values'); float64 calls go through. Returns the dtypes it was called with."""
    real = torch.linalg.svd
    calls: list[torch.dtype] = []

    def svd(x, *args, **kwargs):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1).")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    return calls


def test_rotation_falls_back_to_float64_when_the_float32_svd_does_not_converge(monkeypatch):
    """Nearly coinciding fitted spans (a small rotation of the same rows) in the few-rows regime: the fit is
    the same rotation as with a converging solver, in float32."""
    g = torch.Generator().manual_seed(3)
    n, dim = 40, 96
    p = torch.randn(n, dim, generator=g)
    q = p @ _random_rotation(dim, g).T * 1e-3 + p
    expected, rank = procrustes_fit(p, q)
    calls = _failing_float32_svd(monkeypatch)
    r, rank_fb = procrustes_fit(p, q)
    assert torch.float32 in calls and torch.float64 in calls  # it failed in float32 and was retried
    assert r.dtype == torch.float32 and rank_fb == rank
    # float32 vs float64 factors of a dim x dim rotation: entries of size <= 1 summed over dim terms
    torch.testing.assert_close(r, expected, atol=50 * dim * EPS, rtol=0)


def test_non_finite_features_are_reported_as_divergence_not_retried(monkeypatch):
    p = torch.randn(10, 16)
    q = p.clone()
    q[3, 5] = float("nan")
    calls = _failing_float32_svd(monkeypatch)
    with pytest.raises(FloatingPointError, match="non-finite features .* lower the learning rate"):
        procrustes_fit(p, q)
    assert torch.float64 not in calls
