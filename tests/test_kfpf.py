"""k-FPF cores against hand-computed values: buffer, sensitivity, selection, schedule, one phase."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from cl_plugins.buffers import ReservoirBuffer
from cl_plugins.kfpf import (
    ComputeLedger,
    SensitivityTracker,
    fine_tune_mode,
    forward_flops_per_sample,
    fpf_loss,
    mean_abs_change,
    optimizer_steps_per_epoch,
    parameter_groups,
    phase_schedule,
    run_fpf_phase,
    select_modules,
    stream_optimizer_steps,
)
from cl_plugins.models import ContinualClassifier, SmallCNN
from tests.tolerances import EPS32, ULPS


# ---------------------------------------------------------------------------------------------- buffer
def test_reservoir_in_batches_keeps_each_sample_with_probability_capacity_over_n():
    """30 samples offered in batches of 7 (as k-FPF inserts them) to a 6-slot buffer: each is
    kept with probability 6/30; chi-square over 30 cells (df 29) stays below 62 (p ~ 3e-4)."""
    n, capacity, trials = 30, 6, 3000
    counts = torch.zeros(n)
    ids = torch.arange(n)
    for seed in range(trials):
        buf = ReservoirBuffer(capacity, seed=seed, store_logits=True)
        for start in range(0, n, 7):
            chunk = ids[start:start + 7]
            buf.add(chunk.float().unsqueeze(1), chunk, torch.zeros_like(chunk),
                    logits=chunk.float().unsqueeze(1).repeat(1, 3))
        assert len(buf) == capacity
        # every stored row is consistent: x, logits and y of the same sample
        assert torch.equal(buf.data["x"][:, 0].long(), buf.data["y"])
        assert torch.equal(buf.data["logits"][:, 2].long(), buf.data["y"])
        counts[buf.data["y"]] += 1
    expected = trials * capacity / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 62.0, (chi2, counts)
    assert counts.sum() == trials * capacity


# ---------------------------------------------------------------------------------------------- sensitivity
def test_mean_abs_change_by_hand():
    a = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0.0, 0.0])]
    b = [torch.tensor([[1.0, 2.5], [3.0, 3.0]]), torch.tensor([0.5, 0.0])]
    # |diffs| = 0.5 + 1.0 + 0.5 over 6 elements
    assert mean_abs_change(a, b) == pytest.approx(2.0 / 6)
    with pytest.raises(ValueError, match="shapes"):
        mean_abs_change([torch.zeros(2)], [torch.zeros(3)])


def test_sensitivity_tracker_scores_each_module_by_hand():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 2))
    groups = parameter_groups(model)
    assert set(groups) == {"0", "1", "1.running_stats", "3"}
    tracker = SensitivityTracker(groups)
    assert tracker.update(epoch=0) == {}  # first call only takes the snapshot
    with torch.no_grad():
        model[0].weight[0, 0] += 0.8
        model[0].bias -= 0.1  # 2 elements
        model[1].weight += 0.5  # 2 elements
        model[1].running_mean[0] = 2.0  # running stats: mean 2 + var 2 elements
    scores = tracker.update(epoch=1, experience=0)
    # |(w + 0.8) - w| in float32 is 0.8 within eps * (|w| + 0.8), |w| <= 1 / sqrt(3): a mean of such changes
    assert scores["0"] == pytest.approx((0.8 + 0.2) / 8, abs=ULPS * EPS32 * 2)
    assert scores["1"] == pytest.approx(1.0 / 4)
    assert scores["1.running_stats"] == pytest.approx(2.0 / 4)
    assert scores["3"] == 0.0
    assert tracker.ranking()[0][0] == "1.running_stats"
    assert tracker.update(epoch=2)["0"] == 0.0  # re-snapshotted: no change since
    clone = SensitivityTracker(parameter_groups(model))
    clone.load_state_dict(tracker.state_dict())
    assert clone.history == tracker.history
    assert all(torch.equal(x, y) for g in tracker.snapshot for x, y in zip(tracker.snapshot[g], clone.snapshot[g]))
    with pytest.raises(KeyError, match="epoch 7"):
        tracker.ranking(epoch=7)
    # restricted to selected tensors: the head and the BN with its statistics only
    restricted = parameter_groups(model, [model[1].weight, model[1].bias, model[3].weight])
    assert set(restricted) == {"1", "1.running_stats", "3"} and len(restricted["3"]) == 1


# ---------------------------------------------------------------------------------------------- selection
def test_selection_small_cnn_defaults_and_patterns():
    model = ContinualClassifier("small_cnn", num_classes=10, backbone_kwargs={"width": 4})
    sel = select_modules(model)
    assert set(sel.modules) == {"net.head", "net.bn1", "net.bn2", "net.conv1"}
    assert set(sel.norm_with_stats) == {"net.bn1", "net.bn2"}
    assert set(sel.params) == {"net.head.weight", "net.head.bias", "net.bn1.weight", "net.bn1.bias",
                               "net.bn2.weight", "net.bn2.bias", "net.conv1.weight"}
    assert sel.reasons["net.head"] == "head" and sel.reasons["net.conv1"] == "first_conv"
    only_conv2 = select_modules(model, head=False, norms=False, first_conv=False, patterns=[r"conv2"])
    assert set(only_conv2.params) == {"net.conv2.weight"} and not only_conv2.norm_with_stats
    with pytest.raises(ValueError, match="matches no module.*net.conv1"):
        select_modules(model, patterns=[r"layer9"])
    with pytest.raises(ValueError, match="selected no parameters"):
        select_modules(model, head=False, norms=False, first_conv=False)


def test_selection_timm_resnet_and_vit():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    sel = select_modules(resnet, patterns=[r"layer4\.1\.conv2"])
    bns = {n for n, m in resnet.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(bns) == 20 and "layer2.0.downsample.1" in bns
    assert set(sel.modules) == bns | {"fc", "conv1", "layer4.1.conv2"}
    assert set(sel.norm_with_stats) == bns
    assert "layer1.0.conv1.weight" not in sel.params

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8)
    sel = select_modules(vit, patterns=[r"^pos_embed$"])
    norms = {n for n, m in vit.named_modules() if isinstance(m, nn.LayerNorm)}
    assert len(norms) == 25  # 12 blocks x (norm1, norm2) + final norm
    assert set(sel.modules) == norms | {"head", "patch_embed.proj"}
    assert "pos_embed" in sel.params and "cls_token" not in sel.params
    assert not sel.norm_with_stats  # LayerNorm keeps no running statistics
    assert "blocks.0.attn.qkv.weight" not in sel.params


# ---------------------------------------------------------------------------------------------- schedule
def test_phase_schedule_and_step_counts_by_hand():
    assert phase_schedule(100, 3, at_end=False) == [33, 66, 99]
    assert phase_schedule(100, 3, at_end=True) == [33, 66, 100]
    assert phase_schedule(7, 1) == [7]
    assert phase_schedule(4, 4) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="do not fit"):
        phase_schedule(3, 4)
    with pytest.raises(ValueError, match=">= 1"):
        phase_schedule(10, 0)
    assert optimizer_steps_per_epoch(270, 32) == 9  # ceil(270/32)
    assert optimizer_steps_per_epoch(270, 32, world_size=2) == 5  # ceil(135/32)
    assert optimizer_steps_per_epoch(270, 32, accumulate=2) == 5  # ceil(9/2): last partial window steps
    assert optimizer_steps_per_epoch(270, 32, limit_batches=0.5) == 4  # int(9 * 0.5)
    assert optimizer_steps_per_epoch(270, 32, limit_batches=3) == 3
    assert stream_optimizer_steps([270, 270, 300], 32) == 9 + 9 + 10


# ---------------------------------------------------------------------------------------------- one phase
def _tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, num_classes=4, width=4)
    buf = ReservoirBuffer(64, seed=seed, store_logits=True)
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 4, (64,))
    buf.add(x, y, torch.zeros(64), logits=torch.randn(64, 4))
    return model, buf


def _same(a, b) -> bool:
    """Deep equality of nested state dicts holding tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("freeze", [False, True])
def test_phase_changes_only_selected_and_restores_flags_modes_grads(freeze):
    model, buf = _tiny_setup()
    sel = select_modules(model, first_conv=False)  # head + bn1 + bn2
    # the user's own state that a phase must restore: a frozen param, an eval-mode module, a grad
    model.conv2.weight.requires_grad_(False)
    model.train()
    model.bn2.eval()
    model.head.weight.grad = torch.full_like(model.head.weight, 7.0)
    main_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model(torch.randn(8, 1, 8, 8)).sum().backward()
    main_opt.step()
    sched = torch.optim.lr_scheduler.StepLR(main_opt, step_size=1, gamma=0.5)
    opt_before, sched_before = copy.deepcopy(main_opt.state_dict()), copy.deepcopy(sched.state_dict())
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    assert grads["head.weight"] is not None and grads["bn1.weight"] is not None
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    before = _state(model)

    result = run_fpf_phase(model, sel, lambda: buf.sample(16), model, iterations=5, lr=0.1, momentum=0.9,
                           alpha=0.5, freeze_norm_stats=freeze)

    after = _state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    params_changed = {k for k in changed if "running" not in k and "num_batches" not in k}
    assert params_changed == set(sel.params), params_changed
    stats = {f"{m}.{s}" for m in ("bn1", "bn2") for s in ("running_mean", "running_var", "num_batches_tracked")}
    assert (changed & stats) == (set() if freeze else stats)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():  # the phase's gradients do not leak into the main ones
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n])), n
    assert _same(main_opt.state_dict(), opt_before) and _same(sched.state_dict(), sched_before)
    assert result.iterations == 5 and result.samples == 80


def test_phase_restores_everything_when_it_fails():
    model, buf = _tiny_setup()
    sel = select_modules(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def broken(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_fpf_phase(model, sel, lambda: buf.sample(4), broken, iterations=2, lr=0.1)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with fine_tune_mode(model, sel):
        assert not model.conv2.weight.requires_grad and model.head.weight.requires_grad
    assert model.conv2.weight.requires_grad


def test_phase_lowers_the_buffer_loss_and_kd_loss_by_hand():
    model, buf = _tiny_setup()
    sel = select_modules(model)
    fixed = buf.sample(64)
    result = run_fpf_phase(model, sel, lambda: fixed, model, iterations=40, lr=0.1)
    assert result.last_loss < 0.8 * result.first_loss
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, y)
    stored = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # MSE = (0 + 1 + 0 + 4) / 4; float32 terms of size <= 2 (logits, log-sum-exp) and 5/4: a few eps of 4
    tol = ULPS * EPS32 * 4
    assert fpf_loss(logits, y, stored_logits=stored, alpha=0.5) == pytest.approx(float(ce) + 0.5 * 5 / 4, abs=tol)
    # task-IL: the CE uses masked logits, the MSE the raw ones
    masked = logits.masked_fill(torch.tensor([[False, True], [False, False]]), -1e9)
    assert fpf_loss(logits, y, ce_logits=masked) == pytest.approx(
        float(torch.nn.functional.cross_entropy(masked, y)), abs=tol)


def test_grad_scaler_and_reduce_paths():
    """fp16-style scaling and the DDP gradient averaging hook (identity reduce, counted)."""
    model, buf = _tiny_setup()
    sel = select_modules(model)
    calls = []

    def reduce(t):
        calls.append(t.numel())
        return t

    ref = copy.deepcopy(model)
    batches = [buf.sample(16) for _ in range(3)]
    it = iter(batches)
    run_fpf_phase(model, sel, lambda: next(it), model, iterations=3, lr=0.1, reduce=reduce,
                  scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    it = iter(batches)
    run_fpf_phase(ref, select_modules(ref), lambda: next(it), ref, iterations=3, lr=0.1)
    n_sel = sum(p.numel() for p in sel.params.values())
    n_stats = sum(m.running_mean.numel() * 2 for m in sel.norm_with_stats.values())
    assert calls == [n_sel] * 3 + [n_stats]
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        # the scaled path gives the unscaled result exactly: scaling by 2^10 and back is exact in float
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_flops_and_ledger_by_hand():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(6, 4))
    assert forward_flops_per_sample(lin, torch.randn(5, 2, 3)) == 2 * 6 * 4
    ledger = ComputeLedger(flops_per_sample=10.0, train_samples=100, fpf_phases=2, fpf_iterations=4,
                           fpf_samples=50)
    r = ledger.report()
    assert r["train_flops"] == 3000 and r["fpf_flops"] == 1000 and r["replay_extra_flops"] == 3000
    assert r["fpf_share"] == pytest.approx(0.25) and r["fpf_vs_replay"] == pytest.approx(1 / 3)
    clone = ComputeLedger()
    clone.load_state_dict(ledger.state_dict())
    assert clone == ledger


def test_cosine_phase_schedule_by_hand(monkeypatch):
    model, buf = _tiny_setup()
    sel = select_modules(model)
    lrs = []
    step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    run_fpf_phase(model, sel, lambda: buf.sample(8), model, iterations=4, lr=0.2, lr_schedule="cosine")
    # 0.5 * 0.2 * (1 + cos(pi * i / 4)) for i = 0..3
    assert lrs == pytest.approx([0.2, 0.1 * (1 + 2 ** -0.5), 0.1, 0.1 * (1 - 2 ** -0.5)])
    lrs.clear()
    run_fpf_phase(model, sel, lambda: buf.sample(8), model, iterations=3, lr=0.2)
    assert lrs == [0.2] * 3
    with pytest.raises(ValueError, match="lr_schedule"):
        run_fpf_phase(model, sel, lambda: buf.sample(8), model, iterations=3, lr=0.2, lr_schedule="step")
