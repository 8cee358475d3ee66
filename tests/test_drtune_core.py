"""DR-Tune cores against hand-computed values: Procrustes, class-centre shift, rescaling, the bank,
the rotation schedule, the frozen encoder, and the DR term's gradients through the hooks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_plugins.drtune import (
    DistributionRegularizer,
    DRTuneTap,
    FeatureBank,
    FrozenEncoder,
    class_centre_shift,
    dr_loss,
    frozen_copy,
    mean_norm,
    procrustes_rotation,
    rescale,
    semantic_calibration,
)
from tests.tolerances import EPS32, EPS_BF16, ULPS, assert_close_accumulated


def _rot_z(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _procrustes_atol(p: torch.Tensor, q: torch.Tensor, eps: float = EPS32, ulps: float = ULPS) -> float:
    """How far a Procrustes fit of ``p`` onto ``q`` may land from the exact rotation when ``S = P_c^T Q_c`` is
    rounded entrywise by ``ulps * eps * (|P_c|^T |Q_c|)``. The fitted rotation is the orthogonal polar factor of
    ``S`` with the smallest singular value's sign flipped when ``det S < 0`` (the reflection fix); a perturbation
    ``dS`` turns it by at most ``2 ||dS|| / (sigma_{D-1} + sign(det S) sigma_D)`` (its smallest pair sum)."""
    pc, qc = p.double() - p.double().mean(0), q.double() - q.double().mean(0)
    s = pc.T @ qc
    sigma = torch.linalg.svdvals(s)
    rounding = ulps * eps * (pc.abs().T @ qc.abs()).norm()
    return float(2 * rounding / (sigma[-2] + torch.sign(torch.linalg.det(s)) * sigma[-1]))


def _calibration_magnitude(rows: int, scale: float) -> float:
    """What :func:`semantic_calibration` accumulates into an entry: four float32 stages (normalize, rotate, shift
    by means over at most ``rows`` unit rows, normalize) of sums of at most ``rows`` terms of size <= 1, times
    ``scale``."""
    return 4 * rows * scale


def _orthogonal_atol(dim: int) -> float:
    """``R R^T - I`` and ``det R - 1`` of a rotation from a float32 SVD: its factors are orthonormal to a few eps
    per dimension, and each entry of ``R R^T`` sums ``dim`` products of entries of size at most 1."""
    return ULPS * EPS32 * dim


# ---------------------------------------------------------------------------- Procrustes
def test_procrustes_recovers_a_known_rotation_and_ignores_translation():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(40, 3, generator=g)
    r0 = _rot_z(30.0)
    q = p @ r0.T + torch.tensor([1.0, -2.0, 0.5])
    r = procrustes_rotation(p, q)
    torch.testing.assert_close(r, r0, atol=_procrustes_atol(p, q), rtol=0)
    assert torch.linalg.det(r).item() == pytest.approx(1.0, abs=_orthogonal_atol(3))


def test_procrustes_turns_a_reflection_into_the_best_rotation():
    # q mirrors p across the y axis (det -1). p spreads 2x more along y than x, so S = diag(-2, 8):
    # the unconstrained optimum V U^T = diag(-1, 1) is a reflection; flipping the last singular
    # direction (x, singular value 2) gives the best proper rotation, the identity.
    p = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    q = p * torch.tensor([-1.0, 1.0])
    r = procrustes_rotation(p, q)
    torch.testing.assert_close(r, torch.eye(2), atol=_procrustes_atol(p, q), rtol=0)
    # a rotation composed with a reflection in 3-d: result is orthogonal with det +1
    p3 = torch.cat([torch.diag(torch.tensor([3.0, 2.0, 0.1])), -torch.diag(torch.tensor([3.0, 2.0, 0.1]))])
    q3 = p3 @ (_rot_z(40.0) @ torch.diag(torch.tensor([1.0, 1.0, -1.0]))).T
    r3 = procrustes_rotation(p3, q3)
    torch.testing.assert_close(r3 @ r3.T, torch.eye(3), atol=_orthogonal_atol(3), rtol=0)
    assert torch.linalg.det(r3).item() == pytest.approx(1.0, abs=_orthogonal_atol(3))
    # S = diag(18, 8, 0.02) D R^T: flipping the direction of the smallest singular value (z, the
    # reflected axis) leaves exactly the 40 degree rotation
    torch.testing.assert_close(r3, _rot_z(40.0), atol=_procrustes_atol(p3, q3), rtol=0)


def test_procrustes_runs_in_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(2)
    p = torch.randn(20, 3, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = procrustes_rotation(p.bfloat16(), (p @ _rot_z(10.0).T).bfloat16())
    assert r.dtype == torch.float32
    # the inputs were rounded to bf16 (each entry by up to eps_bf16 / 2 of its size, so S by about eps_bf16 of
    # |P|^T |Q|); the float32 fit itself adds nothing comparable
    q = p @ _rot_z(10.0).T
    torch.testing.assert_close(r, _rot_z(10.0), atol=_procrustes_atol(p, q, eps=EPS_BF16, ulps=1.0), rtol=0)


# ---------------------------------------------------------------------------- class centres
def test_class_centre_shift_hand_example_with_one_sample_and_absent_class():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    w = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # class 2 has no rows
    shifted, present = class_centre_shift(p, q, labels, w)
    # class 0: cos(q0, w0) = 1, cos(q1, w0) = 0 -> weights e/(e+1), 1/(e+1)
    a = math.e / (math.e + 1)
    mu_d0 = torch.tensor([a, 1 - a], dtype=torch.float64)
    mu_p0 = torch.tensor([0.5, 0.5], dtype=torch.float64)
    p64 = p.double()
    expected = torch.stack([p64[0] + mu_d0 - mu_p0, p64[1] + mu_d0 - mu_p0,
                            # class 1 (one row): weight 1, a vector offset q2 - p2 (not a scalar)
                            torch.tensor([0.0, 3.0], dtype=torch.float64)])
    # each entry sums a row and two weighted means of rows, all of size at most 3
    assert_close_accumulated(shifted, expected, 3 * 3.0)
    assert present.tolist() == [True, True, False]
    assert torch.isfinite(shifted).all()


def test_class_centre_weights_use_cosine_not_dot_product():
    # same directions, different norms: the cosine weights are equal -> plain mean of q
    p = torch.zeros(2, 2)
    q = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[1.0, 1.0]])
    shifted, _ = class_centre_shift(p, q, torch.tensor([0, 0]), w)
    assert_close_accumulated(shifted, torch.tensor([[1.5, 0.5], [1.5, 0.5]]), 2 * 3.0)  # a mean of 2 rows <= 3


def test_rescale_and_mean_norm():
    assert_close_accumulated(rescale(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), 10.0),
                             torch.tensor([[6.0, 8.0], [0.0, 10.0]]), 2 * 10.0)  # normalize, then scale by 10
    assert mean_norm(torch.tensor([[3.0, 4.0], [0.0, 2.0]])).item() == pytest.approx(3.5)


def test_semantic_calibration_composes_normalize_rotate_shift_rescale():
    g = torch.Generator().manual_seed(3)
    pre, down = torch.randn(12, 3, generator=g), torch.randn(12, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1])
    w = torch.randn(4, 3, generator=g)
    r = _rot_z(25.0)
    fit = torch.tensor([True] * 8 + [False] * 4)
    z = semantic_calibration(pre, down, labels, w, 2.5, rotation=r, fit_rows=fit)
    # the reference in float64
    pre, down, w, r = pre.double(), down.double(), w.double(), r.double()
    p, q = F.normalize(pre, dim=1), F.normalize(down, dim=1)
    p = p @ r.T + (q[fit].mean(0) - p[fit].mean(0) @ r.T)
    for c in range(3):
        m = labels == c
        ww = torch.softmax(q[m] @ F.normalize(w[c], dim=0), dim=0)
        p[m] = p[m] + ((ww[:, None] * q[m]).sum(0) - p[m].mean(0))
    assert_close_accumulated(z, F.normalize(p, dim=1) * 2.5, _calibration_magnitude(12, 2.5))
    assert_close_accumulated(z.norm(dim=1), torch.full((12,), 2.5), 2 * 2.5)  # normalize, then the norm: eps each


# ---------------------------------------------------------------------------- bank
def test_class_balanced_bank_keeps_every_class_and_the_latest_rows():
    bank = FeatureBank(size=7, dim=1, num_classes=3)  # 2 slots per class
    assert bank.size == 6 and bank.per_class == 2
    f = torch.arange(5.0).unsqueeze(1)
    bank.enqueue(f, -f, torch.tensor([0, 0, 0, 1, 0]), stamp=0)
    # class 0 got rows 0,1,2,4: a ring of 2 keeps the last two (2 and 4)
    assert sorted(bank.pre[bank.labels == 0].squeeze(1).tolist()) == [2.0, 4.0]
    assert bank.class_counts().tolist() == [2, 1, 0]
    assert torch.equal(bank.down[bank.valid], -bank.pre[bank.valid])
    bank.enqueue(torch.tensor([[9.0], [8.0]]), torch.zeros(2, 1), torch.tensor([1, 1]), stamp=1)
    assert sorted(bank.pre[bank.labels == 1].squeeze(1).tolist()) == [8.0, 9.0]  # 3.0 was overwritten
    assert sorted(bank.pre[bank.labels == 0].squeeze(1).tolist()) == [2.0, 4.0]  # old class kept
    assert bank.fresh(1).sum().item() == 2 and bank.fresh(0).sum().item() == 2
    with pytest.raises(ValueError, match="labels must lie"):
        bank.enqueue(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([3]), stamp=0)


def test_fifo_bank_is_the_official_ring():
    bank = FeatureBank(size=4, dim=1, num_classes=3, mode="fifo")
    bank.enqueue(torch.tensor([[1.0], [2.0], [3.0]]), torch.zeros(3, 1), torch.tensor([0, 1, 2]), stamp=0)
    bank.enqueue(torch.tensor([[4.0], [5.0], [6.0]]), torch.zeros(3, 1), torch.tensor([0, 0, 0]), stamp=1)
    assert bank.pre.squeeze(1).tolist() == [5.0, 6.0, 3.0, 4.0] and int(bank.ptr) == 2
    assert bank.fresh(1).all()  # fifo: every filled row counts as fresh


# ---------------------------------------------------------------------------- rotation schedule
def _filled_regularizer(cache: bool, interval: int = 3) -> DistributionRegularizer:
    g = torch.Generator().manual_seed(4)
    bank = FeatureBank(size=40, dim=3, num_classes=2)
    pre = torch.randn(20, 3, generator=g)
    bank.enqueue(pre, pre @ _rot_z(60.0).T, torch.arange(20) % 2, stamp=0)  # stale pairs
    reg = DistributionRegularizer(bank, rotation_interval=interval, cache_rotation=cache)
    reg.set_experience(1)
    pre1 = torch.randn(20, 3, generator=g)
    bank.enqueue(pre1, pre1 @ _rot_z(20.0).T, torch.arange(20) % 2, stamp=1)  # fresh pairs
    return reg


def test_rotation_is_fitted_on_fresh_rows_and_cached_between_fits():
    w = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    reg = _filled_regularizer(cache=True)
    z0, labels = reg.calibrate(1.0, w)
    fresh = reg.bank.fresh(1)
    p, q = F.normalize(reg.bank.pre[fresh], dim=1), F.normalize(reg.bank.down[fresh], dim=1)  # what is fitted
    torch.testing.assert_close(reg.rotation, _rot_z(20.0), atol=_procrustes_atol(p, q), rtol=0)  # fresh pairs'
    reg.step += 1
    z1, _ = reg.calibrate(1.0, w)  # not a fitting step: the cached rotation is applied
    assert_close_accumulated(z1, z0, _calibration_magnitude(40, 1.0))
    # official behaviour: no rotation between fits
    off = _filled_regularizer(cache=False)
    off.calibrate(1.0, w)
    assert not bool(off.has_rotation)
    off.step += 1
    z_off, _ = off.calibrate(1.0, w)
    b = off.bank
    rows = b.valid
    assert_close_accumulated(z_off, semantic_calibration(b.pre[rows], b.down[rows], b.labels[rows], w, 1.0),
                             _calibration_magnitude(40, 1.0))
    assert not torch.allclose(z_off, z0)


# ---------------------------------------------------------------------------- frozen encoder
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
        self.head = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_frozen_encoder_is_an_eval_copy_without_the_originals_hooks():
    net = Net()
    marker = object()
    net.owner = marker  # stands for the trainer a LightningModule points to
    calls = []
    net.head.register_forward_hook(lambda m, a, o: calls.append(1))
    frozen = FrozenEncoder(net, "head", exclude=[marker])
    assert frozen.model.owner is None
    assert all(not p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.model.training and not frozen.model.body[1].training
    x = torch.randn(6, 4)
    f = frozen(x)
    assert calls == [] and not f.requires_grad
    net.eval()
    torch.testing.assert_close(f, net.body(x))
    assert all(p.requires_grad for p in net.parameters())
    clone = frozen_copy(net)
    assert clone.head is not net.head and not clone.training


# ---------------------------------------------------------------------------- the DR term through hooks
def _tap(weight: float | str = 0.7) -> tuple[Net, DRTuneTap]:
    torch.manual_seed(0)
    net = Net()
    frozen = FrozenEncoder(net, "head")
    with torch.no_grad():  # fine-tuning has moved the model away from the pretrained copy
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    reg = DistributionRegularizer(FeatureBank(size=20, dim=3, num_classes=5), rotation_interval=2)
    tap = DRTuneTap(net, net.head, reg, frozen, weight=weight)
    tap.install()
    net.eval()
    for _ in range(2):
        tap.warmup_batch((torch.randn(8, 4),), {}, torch.arange(8) % 5)  # 16 rows: 4, 4, 4, 2, 2
    net.train()
    return net, tap


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    return out


def test_dr_term_reaches_only_the_head():
    net, tap = _tap()
    x, y = torch.randn(8, 4), torch.randint(0, 5, (8,))
    F.cross_entropy(net(x), y).backward()  # not armed: plain loss
    plain = _grads(net)
    tap.begin_step(y)
    F.cross_entropy(net(x), y).backward()
    tap.end_step()
    with_dr = _grads(net)
    assert tap.last["dr_ce"] > 0 and tap.last["bank_rows"] == 16
    for name in plain:
        if name.startswith("body."):
            torch.testing.assert_close(with_dr[name], plain[name], rtol=0, atol=0, msg=name)
        else:
            assert not torch.allclose(with_dr[name], plain[name]), name


@pytest.mark.parametrize("weight", [0.7, "K/B"])
def test_attached_term_equals_loss_plus_weighted_dr(weight):
    net, tap = _tap(weight)
    reg_before = copy.deepcopy(tap.regularizer)
    x, y = torch.randn(8, 4), torch.arange(8) % 5
    net_direct = copy.deepcopy(net)

    tap.begin_step(y)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    tap.end_step()
    attached = _grads(net)

    feats = net_direct.body(x)
    z, labels = reg_before.calibrate(mean_norm(feats.detach()), net_direct.head.weight)
    lam = weight if weight != "K/B" else 16 / 8  # K / B, K = the 16 filled rows (capacity 20)
    names, params = zip(*net_direct.named_parameters())
    ce = torch.autograd.grad(F.cross_entropy(net_direct.head(feats), y), params)
    dr = torch.autograd.grad(lam * dr_loss(net_direct.head, z, labels), params, allow_unused=True)
    dr = [torch.zeros_like(p) if g is None else g for p, g in zip(params, dr)]  # the body: no DR gradient
    # the hooks add the same two float32 gradients (the same z~, rotation included) in another order: they
    # differ by the rounding of |CE gradient| + |weighted DR gradient| at most
    for name, g_ce, g_dr in zip(names, ce, dr):
        assert_close_accumulated(attached[name], g_ce + g_dr, g_ce.abs() + g_dr.abs(), msg=name)
    # the step enqueued the batch after building z~ and advanced the schedule
    assert int(tap.regularizer.step) == 1 and len(tap.regularizer.bank) == 18


def test_kb_weight_counts_filled_rows_and_equals_the_official_mean_over_b_plus_k():
    """A partly filled bank (16 of 20 rows): the "K/B" weight is n / B with n = 16 filled rows,
    not the capacity 20, so that ``B / (B + n) * (L_CE + weight * L_DR)`` is the official cross
    entropy averaged over the ``B + n`` concatenated rows."""
    net, tap = _tap("K/B")
    reg = tap.regularizer
    assert reg.bank.size == 20 and len(reg.bank) == 16
    reg_before = copy.deepcopy(reg)
    x, y = torch.randn(8, 4), torch.arange(8) % 5
    with torch.no_grad():
        feats = net.body(x)
        z, labels = reg_before.calibrate(mean_norm(feats), net.head.weight)
        logits = net.head(torch.cat([feats, z]))
        official = F.cross_entropy(logits, torch.cat([y, labels]))
        plain_ce = F.cross_entropy(net.head(feats), y)
    tap.begin_step(y)
    net(x)
    tap.end_step()
    assert tap.last["bank_rows"] == 16 and tap.last["weight"] == pytest.approx(16 / 8)
    assert tap.last["weight"] != pytest.approx(20 / 8)  # the capacity would over-weight L_DR
    ours = 8 / (8 + 16) * (float(plain_ce) + tap.last["weight"] * tap.last["dr_ce"])
    # each row's cross entropy, logsumexp(l) - l_y, is rounded by a few eps of max|l| + log(5), in both routes
    assert ours == pytest.approx(float(official), abs=ULPS * EPS32 * 2 * (float(logits.abs().max()) + math.log(5)))
    # once the bank is full the two definitions agree: n = capacity
    tap.begin_step(y)
    net(x)
    tap.end_step()
    assert len(reg.bank) == 20
    tap.begin_step(y)
    net(x)
    tap.end_step()
    assert tap.last["bank_rows"] == 20 and tap.last["weight"] == pytest.approx(20 / 8)


def test_tap_errors_when_the_model_input_was_not_seen_or_features_are_not_pooled():
    net, tap = _tap()
    tap.begin_step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="before any call of the model"):
        net.head(torch.randn(3, 3))
    tap.end_step()

    class Tokens(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x).unsqueeze(1))  # (batch, 1, 3) enters the head

    tokens = Tokens()
    tok_tap = DRTuneTap(tokens, tokens.head, tap.regularizer, FrozenEncoder(tokens, "head"), weight=1.0)
    tok_tap.install()
    tok_tap.begin_step(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="pooled"):
        tokens(torch.randn(4, 4))
