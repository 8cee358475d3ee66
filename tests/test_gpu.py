"""Every mitigation on a whole tiny stream under mixed precision: CUDA (16-mixed, bf16-mixed), FSDP on one
CUDA device for the PEFT methods, and the same bodies on CPU with bf16-mixed.

Each test body is a plain function of ``accelerator``, ``precision`` and ``strategy`` (``BODIES``): the
``gpu`` tests call them on CUDA (skipped without it), the CPU tests call them with ``bf16-mixed`` so that
the bodies themselves are exercised on every machine. A body trains the whole stream (Split-Digits,
5 experiences) with ``ContinualMetrics`` and checks the full accuracy matrix, the precision the forward
ran in, the device, and what the method did (buffer filled, phases run, bank filled, only injected
parameters and the head changed, ...). Under mixed precision it also compares the run with the same run in
32-true: the untrained row of the matrix and the first training losses (the whole matrix is no measure: over
a tiny stream the two runs drift apart by tens of points on some entries, chaotically, in either direction).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from callbacks import KFPF, L2M, PEGO, DRTune, ExperienceReplay, LoRAMoE
from callbacks.metrics import ContinualMetrics
from cl_plugins import ContinualClassifier
from cl_plugins.aux_loss import AuxLossTracker
from datamodules import SplitDigits
from tests._subprocess import run_script
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import COMPARED_STEPS, StepLosses, assert_losses_track_float32

VIT_KW = dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2)
N_EXP = 5
AUTOCAST_DTYPE = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
CUDA_PRECISIONS = ["16-mixed", "bf16-mixed"]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------------------------------------- pieces
def _vit(lr: float = 3e-3) -> ContinualClassifier:
    return ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                               backbone_kwargs=VIT_KW, optimizer="adam", lr=lr)


def _cnn() -> ContinualClassifier:
    return ContinualClassifier("small_cnn", num_classes=10, lr=0.05, momentum=0.9, backbone_kwargs={"width": 8})


def _digits() -> SplitDigits:
    # task-incremental (logits masked to the task's 2 classes), so that accuracy shows what was learnt rather
    # than the head's bias toward the newest classes; 1,348 training samples in 5 experiences of 2 classes:
    # 9 batches of 32 per epoch, 3 epochs per experience
    return SplitDigits(n_experiences=N_EXP, epochs_per_experience=3, batch_size=32, scenario="task")


def _snapshot(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The module's parameters by name, as float32 CPU copies. Read through the strategy so that a sharded
    (FSDP) model is gathered into full tensors; for the other strategies it is ``pl_module.state_dict()``."""
    names = {n for n, _ in pl_module.named_parameters()}
    state = trainer.strategy.lightning_module_state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in state.items() if k in names}


class Probe(pl.Callback):
    """Goes first in ``callbacks``: at train start records the device, the trainable parameters and their
    values, and hooks the head to record the dtype of its training outputs (the autocast dtype); records
    the training batch sizes. Its :attr:`end` goes last and takes the parameters again at train end (after
    every other callback's ``on_train_end``, e.g. k-FPF's last phase; before ``on_fit_end``, e.g. PEGO's
    merge)."""

    def __init__(self) -> None:
        self.device: torch.device | None = None
        self.trainable: set[str] = set()
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self.head_dtypes: set[torch.dtype] = set()
        self.batch_sizes: list[int] = []
        self._hook: Any = None
        self.end = _ProbeEnd(self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.device = pl_module.device
        self.trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        self.before = _snapshot(trainer, pl_module)

        def record(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            if module.training and torch.is_grad_enabled():
                self.head_dtypes.add(out.dtype)

        self._hook = pl_module.net.head.register_forward_hook(record)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batch_sizes.append(len(batch[1]))  # after ExperienceReplay extended the batch in place

    def changed(self) -> set[str]:
        """Names of the parameters whose values changed between train start and train end."""
        return {n for n, v in self.before.items() if not torch.equal(v, self.after[n])}


class _ProbeEnd(pl.Callback):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe.after = _snapshot(trainer, pl_module)
        if self.probe._hook is not None:
            self.probe._hook.remove()
            self.probe._hook = None


def float32_start(callbacks: list[pl.Callback], make_model: Callable[[], ContinualClassifier], tmp_path: Path,
                  accelerator: str) -> tuple[list[float], list[float]]:
    """The untrained row of the accuracy matrix and the first ``COMPARED_STEPS`` training losses of the same run in
    32-true: same seed, model and data, fresh copies of the (not yet fitted) callbacks."""
    callbacks = copy.deepcopy(callbacks)
    pl.seed_everything(0, verbose=False)
    model = make_model()
    metrics = ContinualMetrics(plot=False, output_dir=str(tmp_path / "float32"))
    losses = StepLosses(stop=True)
    trainer = pl.Trainer(**quiet_trainer_kwargs(
        accelerator=accelerator, precision="32-true", deterministic="warn", callbacks=[*callbacks, metrics, losses]))
    trainer.fit(model, datamodule=_digits())
    assert metrics.initial_accuracy is not None and len(losses.losses) == COMPARED_STEPS
    return metrics.initial_accuracy, losses.losses


def fit_stream(callbacks: list[pl.Callback], make_model: Callable[[], ContinualClassifier], tmp_path: Path,
               accelerator: str, precision: str, strategy: Any = "auto",
               ) -> tuple[pl.Trainer, ContinualClassifier, Probe]:
    """Trains a fresh ``make_model()`` on the whole stream and checks what every body shares: a full, finite
    accuracy matrix (and the untrained row) in which some experience was learnt, a finite training loss, the
    device, the autocast dtype of the forward, that no parameter outside the trainable ones changed, and (on one
    device) that the run starts as the 32-true run does."""
    reference = float32_start(callbacks, make_model, tmp_path, accelerator) if strategy == "auto" else None
    pl.seed_everything(0, verbose=False)
    model = make_model()
    dm = _digits()
    metrics = ContinualMetrics(plot=False, output_dir=str(tmp_path))
    probe = Probe()
    losses = StepLosses()
    # deterministic="warn": CUDA kernels without a deterministic implementation (e.g. attention backward)
    # warn instead of raising; the CPU tests of this file run the same settings
    trainer = pl.Trainer(**quiet_trainer_kwargs(
        accelerator=accelerator, precision=precision, strategy=strategy, deterministic="warn",
        callbacks=[probe, *callbacks, metrics, losses, probe.end]))
    trainer.fit(model, datamodule=dm)

    matrix = torch.tensor(metrics.matrix, dtype=torch.float64)
    assert matrix.shape == (N_EXP, N_EXP), metrics.matrix
    assert torch.isfinite(matrix).all() and ((matrix >= 0) & (matrix <= 1)).all(), metrics.matrix
    assert metrics.initial_accuracy is not None and len(metrics.initial_accuracy) == N_EXP
    # task-IL, 2 classes per task: chance is 0.5; at least one experience was learnt right after training it
    assert matrix.diagonal().max() > 0.8, metrics.matrix
    assert math.isfinite(metrics.summary()["avg_acc"])
    assert torch.isfinite(trainer.callback_metrics["train/loss"])

    assert probe.device is not None and probe.device.type == ("cuda" if accelerator == "gpu" else "cpu")
    assert probe.head_dtypes == {AUTOCAST_DTYPE[precision]}, probe.head_dtypes
    assert probe.trainable and probe.after.keys() == probe.before.keys()
    changed = probe.changed()
    assert changed <= probe.trainable, f"frozen parameters changed: {sorted(changed - probe.trainable)}"
    assert all(torch.isfinite(v).all() for v in probe.after.values())

    if reference is not None:
        initial, first_losses = reference
        # the untrained model in bf16 (or fp16) autocast: operands rounded to 8 (11) significant bits move the
        # logits by about eps_bf16 of their size, which flips a prediction only where the top two logits are that
        # close: a sample or two of a test set at most
        for j, (got, want) in enumerate(zip(metrics.initial_accuracy, initial)):
            assert abs(got - want) <= 2 / len(dm.test_dataset(j)), (j, metrics.initial_accuracy, initial)
        assert_losses_track_float32(losses.losses, first_losses)
    return trainer, model, probe


def _check_peft(probe: Probe, injected: list[str]) -> None:
    """Only the injected parameters and the head are trainable; the backbone is frozen; the head and some
    injected parameters changed (and, by :func:`fit_stream`, nothing frozen did)."""
    head = {n for n in probe.before if n.startswith("net.head.")}
    assert injected and set(injected) <= probe.trainable
    assert probe.trainable == set(injected) | head, sorted(probe.trainable ^ (set(injected) | head))
    assert len(probe.before) > len(probe.trainable)  # a frozen backbone exists
    changed = probe.changed()
    assert head <= changed, "the head did not train"
    assert changed & set(injected), "no injected parameter changed"


# ---------------------------------------------------------------------------------------------- bodies
def check_replay(tmp_path: Path, accelerator: str, precision: str, strategy: Any = "auto") -> dict[str, Any]:
    replay = ExperienceReplay(buffer_size=64, replay_batch_size=16)
    _, _, probe = fit_stream([replay], _cnn, tmp_path, accelerator, precision, strategy)
    assert len(replay.buffer) == 64 and replay.buffer.num_seen == 3 * 1348
    assert len(set(replay.buffer.data["y"].tolist())) >= 8  # the reservoir holds every experience's classes
    # from the second step on, 16 replayed samples join every batch (32, or an experience's last partial one)
    assert probe.batch_sizes[0] == 32 and max(probe.batch_sizes) == 48 and min(probe.batch_sizes[1:]) > 16
    assert probe.changed() == probe.trainable  # plain fine-tuning: every weight trains
    return {"buffer": len(replay.buffer)}


def check_kfpf(tmp_path: Path, accelerator: str, precision: str, strategy: Any = "auto") -> dict[str, Any]:
    kfpf = KFPF(k=2, iterations=5, buffer_size=64, batch_size=16)
    _, _, probe = fit_stream([kfpf], _cnn, tmp_path, accelerator, precision, strategy)
    assert kfpf.phases_done == 2 and len(kfpf.schedule) == 2 and len(kfpf.phase_log) == 2
    assert len(kfpf.buffer) == 64 and kfpf.buffer.num_seen == 3 * 1348
    assert kfpf.compute_report()["fpf_iterations"] == 10
    assert "net.head.weight" in kfpf.selection.params and "net.head.weight" in probe.changed()
    return {"phases": kfpf.phases_done}


def check_drtune(tmp_path: Path, accelerator: str, precision: str, strategy: Any = "auto") -> dict[str, Any]:
    dr = DRTune(dr_weight=1.0, bank_size=100, rotation_interval=2)
    trainer, _, probe = fit_stream([dr], _cnn, tmp_path, accelerator, precision, strategy)
    bank = dr.regularizer.bank
    assert bank.class_counts().tolist() == [10] * 10  # class-balanced over the whole stream
    assert bank.pre.dtype == torch.float32 and torch.isfinite(bank.pre).all()
    assert torch.isfinite(trainer.callback_metrics["drtune/dr_loss_epoch"])
    assert float(trainer.callback_metrics["drtune/dr_loss_epoch"]) > 0
    assert dr.frozen is not None
    for name, p in dr.frozen.model.named_parameters():  # the frozen pretrained encoder never trained
        assert not p.requires_grad and torch.equal(p.detach().float().cpu(), probe.before[name]), name
    assert "net.head.weight" in probe.changed()
    return {"bank": int(bank.class_counts().sum())}


def check_pego(tmp_path: Path, accelerator: str, precision: str, strategy: Any = "auto") -> dict[str, Any]:
    pego = PEGO(num_loras=2)
    trainer, model, probe = fit_stream([pego], _vit, tmp_path, accelerator, precision, strategy)
    _check_peft(probe, pego.injected_parameter_names)
    assert any(".lora_B" in n for n in probe.changed())
    for key in ("pego/diversify_loss", "pego/preserve_loss"):
        value = trainer.callback_metrics[key]
        assert torch.isfinite(value) and float(value) > 0, key
    params = dict(model.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in pego.injected_parameter_names)  # not cast by AMP
    # merged into the base weights after the last experience (on_fit_end, after the probe's snapshot)
    assert pego.is_merged(model)
    name = "net.blocks.0.attn.qkv"
    merged = pego.layers(model)[name].base.weight.detach().float().cpu()
    assert torch.isfinite(merged).all() and not torch.equal(merged, probe.after[f"{name}.base.weight"])
    return {"changed": len(probe.changed())}


def check_loramoe(tmp_path: Path, accelerator: str, precision: str, strategy: Any = "auto") -> dict[str, Any]:
    moe = LoRAMoE(num_experts=4)
    # LoRAMoE's update scale alpha / r is 8 (PEGO's 1): Adam at 3e-3 makes this tiny run unstable
    trainer, _, probe = fit_stream([moe], lambda: _vit(lr=1e-3), tmp_path, accelerator, precision, strategy)
    _check_peft(probe, moe.injected_parameter_names)
    changed = probe.changed()
    assert any(".router." in n for n in changed) and any(".experts.lora_B" in n for n in changed), sorted(changed)
    assert torch.isfinite(trainer.callback_metrics["loramoe/balance_loss_epoch"])
    return {"changed": len(changed)}


def check_l2m(tmp_path: Path, accelerator: str, precision: str, strategy: Any = "auto") -> dict[str, Any]:
    l2m = L2M(pool_size=4)
    trainer, _, probe = fit_stream([l2m], _vit, tmp_path, accelerator, precision, strategy)
    _check_peft(probe, l2m.injected_parameter_names)
    changed = probe.changed()
    assert any(".lora_B" in n for n in changed), sorted(changed)
    # key_update="mean": the keys are a buffer; every key training selected is its queries' unit mean direction
    pool = trainer.lightning_module.l2m_pool
    used = pool.key_sums.norm(dim=1) > 0
    assert used.any() and torch.allclose(pool.keys[used].float().norm(dim=1), torch.ones(int(used.sum()),
                                                                                        device=pool.keys.device))
    assert sorted(l2m.key_histograms) == list(range(N_EXP))
    assert all(sum(h) > 0 for h in l2m.key_histograms.values())
    assert torch.isfinite(trainer.callback_metrics["l2m/key_loss_epoch"])
    return {"changed": len(changed)}


BODIES = {
    "replay": check_replay,
    "kfpf": check_kfpf,
    "drtune": check_drtune,
    "pego": check_pego,
    "loramoe": check_loramoe,
    "l2m": check_l2m,
}
FSDP_METHODS = ["pego", "loramoe", "l2m"]


def fsdp_strategy() -> Any:
    from lightning.pytorch.strategies import FSDPStrategy

    # use_orig_params=True: the injection callbacks freeze the backbone and leave the head and the injected
    # modules trainable, so one FSDP unit holds parameters with and without requires_grad, which FSDP refuses
    # to flatten with use_orig_params=False; it also keeps the original nn.Parameter objects, so the user's
    # configure_optimizers ([p for p in self.parameters() if p.requires_grad]) and the callbacks' "is every
    # injected parameter in the optimizer" check see the parameters they know. (It is Lightning's default;
    # passed to make the requirement explicit.) No auto-wrap policy: the whole module is one FSDP unit, and
    # on one device FSDP runs NO_SHARD, so parameter names and the callbacks' hooks are unchanged.
    return FSDPStrategy(use_orig_params=True)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", list(BODIES))
def test_cpu_bf16_stream(method, tmp_path):
    BODIES[method](tmp_path, accelerator="cpu", precision="bf16-mixed")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", CUDA_PRECISIONS)
@pytest.mark.parametrize("method", list(BODIES))
def test_cuda_stream(method, precision, tmp_path):
    BODIES[method](tmp_path, accelerator="gpu", precision=precision)


FSDP_SCRIPT = """
import json, os, sys
from pathlib import Path

from tests.test_gpu import BODIES, fsdp_strategy

if __name__ == "__main__":
    method, accelerator, precision, strategy = sys.argv[1:5]
    out = Path(os.environ["RESULT_PATH"]).parent / "run"
    res = BODIES[method](out, accelerator=accelerator, precision=precision,
                         strategy=fsdp_strategy() if strategy == "fsdp" else strategy)
    with open(os.environ["RESULT_PATH"], "w") as f:
        json.dump(res, f)
"""


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", FSDP_METHODS)
def test_cuda_fsdp_one_device(method, tmp_path):
    # in a fresh interpreter: FSDP initializes a process group (NCCL) that would otherwise outlive the test
    res = run_script(FSDP_SCRIPT, tmp_path, timeout=600, args=[method, "gpu", "bf16-mixed", "fsdp"])
    assert res["changed"] > 0


# ---------------------------------------------------------------------------------------------- host syncs
def _set_sync_debug(mode: str | int, accelerator: str) -> int:
    """Sets ``torch.cuda.set_sync_debug_mode`` on CUDA (a no-op elsewhere); returns the previous mode."""
    if accelerator != "gpu":
        return 0
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    return before


class SyncErrorSteps(pl.Callback):
    """First in ``callbacks=[...]`` (its :attr:`end` last): the training steps of each epoch but its first (where
    lookups and constants move to the device once) and its last (where logged values are read) run, from
    ``on_train_batch_start`` to ``on_train_batch_end``, under ``torch.cuda.set_sync_debug_mode("error")``, so
    that a host sync (``.item()``, ``bool(t)``, a copy to or from the host, ``nonzero``...) raises."""

    def __init__(self, accelerator: str) -> None:
        self.accelerator = accelerator
        self.checked = 0
        self._active = False
        self.end = _SyncErrorStepsEnd(self)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if 0 < batch_idx < trainer.num_training_batches - 1:
            _set_sync_debug("error", self.accelerator)
            self._active = True

    def stop(self) -> None:
        if self._active:
            _set_sync_debug("default", self.accelerator)
            self._active = False
            self.checked += 1


class _SyncErrorStepsEnd(pl.Callback):
    def __init__(self, window: SyncErrorSteps) -> None:
        self.window = window

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.window.stop()


def check_no_sync_steps(method: str, accelerator: str, monkeypatch: pytest.MonkeyPatch) -> SyncErrorSteps:
    """Bf16-mixed training steps of PEGO or LoRAMoE, after the first of each epoch, under the sync-debug "error"
    mode on CUDA: the methods' forward, balancing / orthogonality terms, backward, optimizer step and
    per-step statistics must not wait for the device."""
    pop_means = AuxLossTracker.pop_means

    def pop_means_with_check(self: AuxLossTracker, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        # the shared aux-loss logging may check on the host that the terms are finite (outside this test)
        before = _set_sync_debug("default", accelerator)
        try:
            return pop_means(self, *args, **kwargs)
        finally:
            _set_sync_debug(before, accelerator)

    monkeypatch.setattr(AuxLossTracker, "pop_means", pop_means_with_check)
    pl.seed_everything(0, verbose=False)
    model = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                                backbone_kwargs=VIT_KW, optimizer="adam", lr=1e-3)
    callback = PEGO(num_loras=2) if method == "pego" else LoRAMoE(num_experts=4)
    window = SyncErrorSteps(accelerator)
    trainer = pl.Trainer(**quiet_trainer_kwargs(
        accelerator=accelerator, precision="bf16-mixed", deterministic="warn", limit_train_batches=6,
        limit_val_batches=0, log_every_n_steps=1000, callbacks=[window, callback, window.end]))
    try:
        trainer.fit(model, datamodule=SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=32))
    finally:
        _set_sync_debug("default", accelerator)
    assert window.checked == 2 * (6 - 2)  # both experiences' steps but the first and last of each
    return window


@pytest.mark.parametrize("method", ["pego", "loramoe"])
def test_cpu_no_sync_steps_body_runs(method, monkeypatch):
    # the body of the CUDA test below, without the sync-debug mode (CPU): it runs and checks its steps
    check_no_sync_steps(method, "cpu", monkeypatch)


def _without_sync_check(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    return call


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["pego", "loramoe"])
def test_cuda_adapter_steps_make_no_host_sync(method, monkeypatch):
    check_no_sync_steps(method, "gpu", monkeypatch)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("scenario", ["class", "task"])
@pytest.mark.parametrize("method", ["naive", "replay"])
def test_cuda_training_steps_do_not_sync(method, scenario, tmp_path, monkeypatch):
    from cl_plugins.buffers import ReservoirBuffer

    callbacks: list[pl.Callback] = []
    if method == "replay":
        # the buffer keeps its samples in host memory by design: copying a batch into it and a replay batch out
        # of it are copies between host and device (a sync each); everything else in the step must not sync
        monkeypatch.setattr(ReservoirBuffer, "add", _without_sync_check(ReservoirBuffer.add))
        monkeypatch.setattr(ReservoirBuffer, "sample", _without_sync_check(ReservoirBuffer.sample))
        callbacks.append(ExperienceReplay(buffer_size=100, replay_batch_size=16))
    guard = SyncErrorSteps("gpu")
    pl.seed_everything(0, verbose=False)
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"hidden": 32}, lr=0.05)
    trainer = pl.Trainer(**quiet_trainer_kwargs(
        accelerator="gpu", devices=1, log_every_n_steps=1000, default_root_dir=tmp_path,
        callbacks=[guard, *callbacks, ContinualMetrics(plot=False), guard.end]))
    try:
        trainer.fit(model, datamodule=SplitDigits(n_experiences=N_EXP, batch_size=32, scenario=scenario))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert guard.checked >= 25


def test_prepared_device_script_parses_and_names_existing_files():
    """``examples/gpu_checks.sh`` is run only where a GPU is lent: check here what can be checked without one
    (bash syntax, the scripts it calls exist)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "examples" / "gpu_checks.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for called in ("examples/bench_throughput.py", "tests"):
        assert called in text and (script.parents[1] / called).exists()
