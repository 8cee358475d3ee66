"""DER / DER++ callbacks in a Trainer: forgetting against naive training, the logits stored at
insertion, the step's gradient against mammoth's loss by hand, a user's own module, exact resume,
bf16-mixed against 32-true, errors, and DDP."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from callbacks import DER, DERPP, ContinualCallback
from cl_plugins import ContinualClassifier
from cl_plugins.buffer_contract import ReplayForwardListener
from cl_plugins.buffers import ClassBalancedBuffer
from datamodules import SplitDigits
from tests._subprocess import run_script
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StopAfter


def _mlp(lr: float = 0.1) -> ContinualClassifier:
    """The Seq-MNIST network of the DER paper, scaled to 8x8 digits (hidden 100-100, SGD)."""
    return ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), lr=lr, backbone_kwargs={"hidden": 100})


def _fit(callbacks, n_experiences=5, epochs=1, batch_size=10, model=None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=n_experiences, epochs_per_experience=epochs, batch_size=batch_size)
    model = model or _mlp()
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, **trainer_kwargs))
    trainer.fit(model, datamodule=dm)
    return trainer, model


def _mean_accuracy(trainer, n=5):
    return sum(float(trainer.callback_metrics[f"val/acc_exp{j}"]) for j in range(n)) / n


def test_derpp_reduces_forgetting_against_naive_training():
    # the DER paper's Seq-MNIST recipe on 8x8 digits: MLP 100-100, SGD lr 0.1, batch 10, one epoch
    trainer_n, _ = _fit([])
    der = DERPP(alpha=0.5, beta=1.0, buffer_size=200, replay_batch_size=10)
    trainer_d, _ = _fit([der])
    acc_naive, acc_der = _mean_accuracy(trainer_n), _mean_accuracy(trainer_d)
    assert acc_naive < 0.25 and acc_der > acc_naive + 0.3, (acc_naive, acc_der)
    assert len(der.buffer) == 200 and set(der.buffer.data["y"].tolist()) == set(range(10))
    assert {"der/loss", "der/mse", "der/ce"} <= set(trainer_d.callback_metrics)


class Recorder(ContinualCallback, ReplayForwardListener):
    """Records each step's training forward (input rows, output rows, buffer size then) and, for the
    replay forwards, the buffer size when they ran; the training forward is the first one with
    gradients in a step that is not a replay forward."""

    def __init__(self, der: DER) -> None:
        super().__init__()
        self.der = der
        self.steps: list[dict] = []
        self.replays: list[int] = []
        self._replaying = False
        self._want = False

    def on_fit_start(self, trainer, pl_module):
        pl_module.register_forward_hook(self._hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._want = True

    @contextmanager
    def replay_forward_context(self, samples):
        self._replaying = True
        self.replays.append(self.der.buffer.num_seen)
        try:
            yield
        finally:
            self._replaying = False

    def _hook(self, module, args, output):
        if self._want and not self._replaying and torch.is_grad_enabled():
            self._want = False
            self.steps.append({"x": args[0].detach().clone(), "out": output.detach().clone(),
                               "seen": self.der.buffer.num_seen})


def test_logits_are_those_of_the_insertion_step_and_enter_after_the_step():
    der = DERPP(alpha=0.5, beta=1.0, buffer_size=40, replay_batch_size=10)
    rec = Recorder(der)
    trainer, model = _fit([der, rec], n_experiences=2, limit_val_batches=0)
    steps = rec.steps
    assert len(steps) == trainer.global_step > 20
    # the training forward of a step sees the earlier batches inserted, not its own: insertion comes
    # after the step, and the step's replay draws come from earlier batches only
    before = [sum(len(s["x"]) for s in steps[:k]) for k in range(len(steps))]
    assert [s["seen"] for s in steps] == before
    assert rec.replays == [n for n in before[1:] for _ in range(2)]  # DER++: two draws a step from the 2nd on
    xs = torch.cat([s["x"].flatten(1) for s in steps])
    outs = torch.cat([s["out"] for s in steps])
    buf = der.buffer
    for slot in range(len(buf)):
        row = (xs == buf.data["x"][slot].flatten()).all(dim=1).nonzero()[0, 0]
        assert torch.equal(buf.data["logits"][slot], outs[row].float()), slot  # the step's own raw outputs
    with torch.no_grad():
        now = model(buf.data["x"])
    assert not torch.allclose(now, buf.data["logits"], atol=1e-3)  # not recomputed with the final model


class StepProbe(ContinualCallback):
    """At batch ``at``: the parameters, the batch and the buffer state before the step, the gradients at
    the optimizer step."""

    def __init__(self, der: DER, at: int) -> None:
        super().__init__()
        self.der, self.at = der, at
        self.before: dict = {}
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            self.before = {"params": copy.deepcopy(pl_module.state_dict()), "batch": [b.clone() for b in batch],
                           "buffer": copy.deepcopy(self.der.buffer.state_dict())}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}


def test_step_gradient_is_that_of_mammoths_derpp_loss():
    alpha, beta = 0.3, 0.8
    der = DERPP(alpha=alpha, beta=beta, buffer_size=30, replay_batch_size=8)
    probe = StepProbe(der, at=12)
    _fit([der, probe], n_experiences=2, limit_val_batches=0, max_steps=13)
    model = _mlp()
    model.load_state_dict(probe.before["params"])
    buf = copy.deepcopy(der.buffer)
    buf.load_state_dict(probe.before["buffer"])
    x, y, _ = probe.before["batch"]
    # mammoth's Derpp.observe: CE on the batch + alpha MSE on one draw + beta CE on a second draw
    loss = F.cross_entropy(model(x), y)
    first = buf.sample(8)
    loss = loss + alpha * F.mse_loss(model(first["x"]), first["logits"])
    second = buf.sample(8)
    loss = loss + beta * F.cross_entropy(model(second["x"]), second["y"])
    loss.backward()
    for name, p in model.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(probe.grads[name], p.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


class PlainModule(pl.LightningModule):
    """A user's own module: its own network attribute and a plain training_step, no mixin."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_works_with_a_plain_training_step_given_the_logits_module():
    der = DERPP(buffer_size=50, replay_batch_size=8, logits_module="model")
    trainer, _ = _fit([der], n_experiences=2, model=PlainModule(), limit_train_batches=5, limit_val_batches=0)
    assert der.buffer.num_seen == 2 * 5 * 10 and "der/loss" in trainer.callback_metrics
    with pytest.raises(RuntimeError, match="saw no training forward of PlainModule.*logits_module="):
        _fit([DERPP(buffer_size=50)], model=PlainModule(), limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(ValueError, match="logits_module='net' is not a submodule of PlainModule.*'model'"):
        _fit([DERPP(buffer_size=50, logits_module="net")], model=PlainModule(), limit_train_batches=1)


def _resume_run(tmp: Path, stop_after=None, ckpt_path=None, buffer="reservoir"):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=2, epochs_per_experience=2, batch_size=32)
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), lr=0.05, momentum=0.9,
                                backbone_kwargs={"hidden": 64, "dropout": 0.2})  # dropout: the global RNG too
    der = DERPP(buffer_size=48, replay_batch_size=8, buffer=buffer)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    callbacks = [der, ckpt] + ([StopAfter(stop_after)] if stop_after is not None else [])
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp,
                                                limit_val_batches=1))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, der


@pytest.mark.parametrize("buffer", ["reservoir", "class_balanced"])
def test_stop_and_resume_equals_the_uninterrupted_run(tmp_path, buffer):
    _, model_u, der_u = _resume_run(tmp_path / "full", buffer=buffer)
    trainer_a, _, der_a = _resume_run(tmp_path / "stopped", stop_after=0, buffer=buffer)
    assert trainer_a.current_epoch == 2 and der_a.buffer.num_seen < der_u.buffer.num_seen
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=1.ckpt"
    trainer_b, model_b, der_b = _resume_run(tmp_path / "resumed", ckpt_path=str(ckpt), buffer=buffer)
    assert trainer_b.current_epoch == 4 and der_b.buffer.num_seen == der_u.buffer.num_seen
    assert isinstance(der_b.buffer, ClassBalancedBuffer) == (buffer == "class_balanced")
    for key, value in der_u.buffer.data.items():
        assert torch.equal(der_b.buffer.data[key], value), key
    for (name, p_u), p_b in zip(model_u.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(p_b, p_u, rtol=0, atol=0, msg=name)


def test_bf16_mixed_agrees_with_32_true():
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        der = DERPP(alpha=0.5, beta=1.0, buffer_size=200, replay_batch_size=10)
        trainer, _ = _fit([der], n_experiences=2, precision=precision)
        results[precision] = (der, _mean_accuracy(trainer, 2), float(trainer.callback_metrics["der/loss"]))
    (d32, acc32, loss32), (d16, acc16, loss16) = results["32-true"], results["bf16-mixed"]
    assert d16.buffer.data["logits"].dtype == torch.float32
    # the first batch's logits come from the same initial weights: bf16 rounds the inputs of each matmul
    # (relative 2**-9 per factor, three layers), so they agree within 2% of their scale
    first32, first16 = d32.buffer.data["logits"][:10], d16.buffer.data["logits"][:10]
    torch.testing.assert_close(first16, first32, rtol=0, atol=0.02 * float(first32.abs().max()))
    assert not torch.equal(first16, first32)  # autocast did compute in bf16
    # the runs then drift apart step by step; the outcome and the last step's terms stay alike
    assert abs(acc16 - acc32) < 0.05 and acc16 > 0.7, (acc32, acc16)
    assert abs(loss16 - loss32) < 0.1 * loss32, (loss32, loss16)


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="alpha must be a finite weight >= 0, got -1.0"):
        DER(alpha=-1)
    with pytest.raises(ValueError, match="beta must be a finite weight >= 0, got -0.5"):
        DERPP(beta=-0.5)
    with pytest.raises(ValueError, match=r"DERPP\(beta=0\) is DER"):
        DERPP(beta=0)
    with pytest.raises(ValueError, match="buffer_size must be >= 1"):
        DER(buffer_size=0)
    with pytest.raises(ValueError, match="replay_batch_size=64 exceeds buffer_size=32"):
        DER(buffer_size=32, replay_batch_size=64)
    with pytest.raises(ValueError, match="'reservoir' or 'class_balanced'"):
        DER(buffer="ring")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logit_scope must be"):
        DER(logit_scope="seen")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logit_scope='task'.*task-incremental stream; this stream is class"):
        _fit([DER(logit_scope="task")], limit_train_batches=1)
    with pytest.raises(TypeError, match="needs stream batches"):
        DER().on_train_batch_start(None, None, {"x": torch.zeros(1)}, 0)


def test_task_scope_matches_the_outputs_of_each_samples_task_only():
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=10, scenario="task")
    der = DER(alpha=1.0, buffer_size=50, logit_scope="task")
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[der], limit_train_batches=3, limit_val_batches=0))
    trainer.fit(_mlp(), datamodule=dm)
    mask = der._logit_mask(10)(torch.tensor([0, 3]))
    assert mask.int().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 0, 0]]
    assert "der/mse" in trainer.callback_metrics


def test_a_model_with_another_number_of_outputs_cannot_continue_the_buffer():
    der = DER(buffer_size=30)
    _fit([der], n_experiences=2, limit_train_batches=2, limit_val_batches=0)
    wider = ContinualClassifier("mlp", num_classes=12, input_shape=(1, 8, 8), backbone_kwargs={"hidden": 16})
    with pytest.raises(ValueError, match="number of outputs must stay what it was"):
        _fit([der], n_experiences=2, model=wider, limit_train_batches=2, limit_val_batches=0)


DDP_SCRIPT = """
import json, os
import lightning.pytorch as pl
import torch
from callbacks import DERPP
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits


class Count(pl.Callback):
    seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        Count.seen += len(batch[1])


pl.seed_everything(0, verbose=False)
dm = SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=16)
model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), lr=0.1, backbone_kwargs={"hidden": 32})
der = DERPP(buffer_size=40, replay_batch_size=8)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                     enable_checkpointing=False, callbacks=[der, Count()])
trainer.fit(model, datamodule=dm)
state = der.state_dict()  # a collective: every rank's buffer
restored = DERPP(buffer_size=40, replay_batch_size=8)
restored.load_state_dict(state)
mine = {"num_seen": der.buffer.num_seen, "samples": Count.seen, "y": der.buffer.data["y"].tolist(),
        "restored_own": torch.equal(restored.buffer.data["x"], der.buffer.data["x"]),
        "weights": float(sum(p.detach().double().sum() for p in model.parameters())),
        "steps": trainer.global_step, "loss": float(trainer.callback_metrics["der/loss"])}
ranks = [None] * trainer.world_size
torch.distributed.all_gather_object(ranks, mine)
if trainer.global_rank == 0:
    with open(os.environ["RESULT_PATH"], "w") as f:
        json.dump({"ranks": ranks, "saved_ranks": len(state["per_rank"])}, f)
"""


@pytest.mark.slow
def test_ddp_keeps_a_buffer_per_rank_and_synchronizes_the_replay_gradients(tmp_path):
    out = run_script(DDP_SCRIPT, tmp_path, timeout=300)
    a, b = out["ranks"]
    assert a["y"] != b["y"], "each rank fills its own buffer from its shard"
    assert a["num_seen"] == a["samples"] and b["num_seen"] == b["samples"]  # each rank inserts its own samples
    assert a["samples"] + b["samples"] >= 2 * 16 * (a["steps"] - 2)  # two shards of the stream
    assert a["weights"] == b["weights"]  # the replay terms' gradients are all-reduced with the rest
    assert a["loss"] > 0 and b["loss"] > 0
    assert out["saved_ranks"] == 2 and a["restored_own"] and b["restored_own"]
