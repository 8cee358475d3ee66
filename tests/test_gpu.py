"""Every mitigation on a whole tiny stream under mixed precision: CUDA (16-mixed, bf16-mixed), FSDP on one
CUDA device for the PEFT methods, and the same bodies on CPU with bf16-mixed.

Each test body is a plain function of ``accelerator``, ``precision`` and ``strategy`` (``BODIES``): the
``gpu`` tests call them on CUDA (skipped without it), the CPU tests call them with ``bf16-mixed`` so that
the bodies themselves are exercised on every machine. A body trains the whole stream (Split-Digits,
5 experiences) with ``ContinualMetrics`` and checks the full accuracy matrix, the precision the forward
ran in, the device, and what the method did (buffer filled, phases run, bank filled, only injected
parameters and the head changed, ...).
"""

from __future__ import annotations

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
from datamodules import SplitDigits
from tests._subprocess import run_script
from tests.conftest import quiet_trainer_kwargs

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


def fit_stream(callbacks: list[pl.Callback], make_model: Callable[[], ContinualClassifier], tmp_path: Path,
               accelerator: str, precision: str, strategy: Any = "auto",
               ) -> tuple[pl.Trainer, ContinualClassifier, Probe]:
    """Trains a fresh ``make_model()`` on the whole stream and checks what every body shares: a full, finite
    accuracy matrix (and the untrained row) in which some experience was learnt, a finite training loss, the
    device, the autocast dtype of the forward, and that no parameter outside the trainable ones changed."""
    pl.seed_everything(0, verbose=False)
    model = make_model()
    dm = _digits()
    metrics = ContinualMetrics(plot=False, output_dir=str(tmp_path))
    probe = Probe()
    # deterministic="warn": CUDA kernels without a deterministic implementation (e.g. attention backward)
    # warn instead of raising; the CPU tests of this file run the same settings
    trainer = pl.Trainer(**quiet_trainer_kwargs(
        accelerator=accelerator, precision=precision, strategy=strategy, deterministic="warn",
        callbacks=[probe, *callbacks, metrics, probe.end]))
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
