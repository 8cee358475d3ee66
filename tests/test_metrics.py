"""Continual metrics: the pure functions against hand-computed values, and ``ContinualMetrics`` on
toy modules whose answers are known exactly (single process, resumed, per-experience fits, joint,
bf16-mixed, and DDP on two CPU processes)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch import nn

from callbacks import JointTraining
from callbacks.metrics import ContinualMetrics
from cl_plugins.metrics import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    continual_summary,
    forgetting,
    format_matrix,
    forward_transfer,
    stream_accuracy,
)
from cl_plugins.mixins import ContinualClassificationMixin
from datamodules import SplitDigits
from datamodules.digits import load_digits_tensors
from tests._subprocess import run_script
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StopAfter

# ---------------------------------------------------------------------------- pure functions
R = [[0.9, 0.1, 0.2],
     [0.95, 0.8, 0.3],
     [0.5, 0.7, 0.95]]
B = [0.1, 0.2, 0.25]


def test_average_accuracy_per_row():
    assert average_accuracy(R, 0) == pytest.approx(0.9)
    assert average_accuracy(R, 1) == pytest.approx((0.95 + 0.8) / 2)
    assert average_accuracy(R, 2) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert average_accuracy(R) == average_accuracy(R, 2)
    assert stream_accuracy(R, 0) == pytest.approx((0.9 + 0.1 + 0.2) / 3)


def test_forgetting_uses_the_best_earlier_accuracy_since_the_experience_was_trained():
    assert forgetting(R, 0) == [] and average_forgetting(R, 0) is None
    # k=1: f_0 = R[0][0] - R[1][0] = 0.9 - 0.95 (accuracy went up: negative forgetting)
    assert forgetting(R, 1) == pytest.approx([-0.05])
    # k=2: f_0 = max(0.9, 0.95) - 0.5 = 0.45 ; f_1 = 0.8 - 0.7 = 0.1
    assert forgetting(R, 2) == pytest.approx([0.45, 0.1])
    assert average_forgetting(R) == pytest.approx(0.275)


def test_backward_and_forward_transfer():
    assert backward_transfer(R, 0) is None
    assert backward_transfer(R, 1) == pytest.approx(0.05)
    assert backward_transfer(R, 2) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)  # -0.25
    assert forward_transfer(R, B, 0) is None
    assert forward_transfer(R, B, 1) == pytest.approx(0.1 - 0.2)
    assert forward_transfer(R, B, 2) == pytest.approx(((0.1 - 0.2) + (0.3 - 0.25)) / 2)  # -0.025
    assert forward_transfer(R, None, 2) is None


def test_partial_rows_and_missing_entries():
    lower = [row[: i + 1] for i, row in enumerate(R)]  # seen experiences only, as a stream in progress
    assert average_accuracy(lower, 1) == pytest.approx(0.875)
    assert average_forgetting(lower) == pytest.approx(0.275)
    assert backward_transfer(lower) == pytest.approx(-0.25)
    assert forward_transfer(lower, B) is None  # R[j-1][j] was never evaluated
    with_none = [[0.9, None, None], [0.95, 0.8, None]]
    assert continual_summary(with_none, B)["final"] == pytest.approx(
        {"avg_acc": 0.875, "avg_forgetting": -0.05, "bwt": 0.05, "fwt": None})
    two = continual_summary(R[:2], B)
    assert two["per_experience"]["avg_acc"] == pytest.approx([0.9, 0.875])
    assert two["per_experience"]["bwt"][0] is None and two["final"]["bwt"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):
        average_accuracy([[0.9], [None, 0.8]])
    with pytest.raises(ValueError, match="not an accuracy"):
        average_accuracy([[90.0]])
    with pytest.raises(ValueError, match="no rows"):
        average_accuracy([])
    with pytest.raises(ValueError, match="out of range"):
        backward_transfer(R, 3)


def test_summary_of_full_matrix_joint_and_unaligned_streams():
    s = continual_summary(R, B)
    assert s["per_experience"]["avg_acc"] == pytest.approx([0.9, 0.875, 2.15 / 3])
    assert s["per_experience"]["avg_forgetting"] == pytest.approx([None, -0.05, 0.275])
    assert s["per_experience"]["fwt"] == pytest.approx([None, -0.1, -0.025])
    assert s["final"] == pytest.approx({"avg_acc": 2.15 / 3, "avg_forgetting": 0.275, "bwt": -0.25, "fwt": -0.025})
    joint = continual_summary([[0.5, 0.7, 0.9]], B, joint=True)
    assert joint["final"] == pytest.approx({"avg_acc": 0.7, "avg_forgetting": None, "bwt": None, "fwt": None})
    unaligned = continual_summary([[0.6, 0.2], [0.4, 0.8]], aligned=False)  # 2 test exps, other train count
    assert unaligned["per_experience"]["avg_acc"] == pytest.approx([0.4, 0.6])
    assert unaligned["final"]["bwt"] is None
    with pytest.raises(ValueError, match="exactly one row"):
        continual_summary(R, joint=True)


def test_format_matrix():
    text = format_matrix([[0.9], [0.95, 0.8]], initial=[0.1, 0.2])
    lines = text.splitlines()
    assert lines[0].split() == ["exp", "0", "exp", "1"]
    assert lines[1].split() == ["initial", "10.0", "20.0"]
    assert lines[2].split() == ["after", "0", "90.0", "-"]
    assert lines[3].split() == ["after", "1", "95.0", "80.0"]
    assert format_matrix([[0.5]], percent=False, digits=3).splitlines()[1].split() == ["after", "0", "0.500"]


# ---------------------------------------------------------------------------- toy modules
#: classes the oracle answers right after each of the 5 Split-Digits experiences (classes 2i, 2i+1)
SCHEDULE = [{0, 1}, {0, 2, 3}, {0, 2, 4, 5, 6}, {0, 1, 2, 6, 7}, {1, 2, 6, 8, 9}]
INITIAL = {0, 4}


class Oracle(pl.LightningModule):
    """Looks every digit up in the full digits set (exact float32 match) and answers its true label
    when the class is in ``known``, else the next class. ``known`` becomes ``schedule[i]`` at the
    last training batch of each epoch of experience ``i`` (``forget_each_epoch``: and is emptied when
    an epoch starts). So ``R[i][j]`` is the share of test experience ``j``'s samples in ``schedule[i]``."""

    def __init__(self, schedule: Sequence[set[int]] = SCHEDULE, initial: set[int] = INITIAL,
                 return_preds: bool = True, forget_each_epoch: bool = False) -> None:
        super().__init__()
        self.schedule = [set(s) for s in schedule]
        self.known = set(initial)
        self.return_preds = return_preds
        self.forget_each_epoch = forget_each_epoch
        self.w = nn.Parameter(torch.zeros(()))
        self.frozen = nn.Dropout().eval()  # a submodule a user keeps in eval mode
        tx, ty, vx, vy = load_digits_tensors()
        self.register_buffer("table", torch.cat([tx, vx]).flatten(1))
        self.register_buffer("labels", torch.cat([ty, vy]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            label = self.labels[torch.cdist(x.flatten(1).float(), self.table).argmin(1)]
        known = torch.tensor([c in self.known for c in range(10)], device=x.device)
        pred = torch.where(known[label], label, (label + 1) % 10)
        return F.one_hot(pred, 10).float() + 0 * self.w

    def on_train_epoch_start(self) -> None:
        if self.forget_each_epoch:
            self.known = set()

    def training_step(self, batch, batch_idx):
        assert self.training and not self.frozen.training  # the initial evaluation restored every mode
        if batch_idx == self.trainer.num_training_batches - 1:
            self.known = self.schedule[self.trainer.datamodule.current_experience]
        return (self.w - 1) ** 2

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y, _ = batch
        return {"preds": self(x).argmax(-1)} if self.return_preds else None

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


def _test_labels(dm: SplitDigits) -> list[torch.Tensor]:
    return [torch.tensor(list(dm.test_dataset(j).targets)) for j in range(dm.num_test_experiences)]


def _share(labels: list[torch.Tensor], known: set[int]) -> list[float]:
    return [float(torch.isin(y, torch.tensor(sorted(known))).double().mean()) for y in labels]


def _dm(**kw) -> SplitDigits:
    kw = {"n_experiences": 5, "epochs_per_experience": 1, "batch_size": 64, **kw}
    return SplitDigits(**kw)


@pytest.fixture(scope="module")
def expected():
    labels = _test_labels(_dm())
    return [_share(labels, s) for s in SCHEDULE], _share(labels, INITIAL)


def _fit(model, dm, metrics, *callbacks, ckpt_path=None, **kw):
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[*callbacks, metrics], **kw))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def _approx(m):
    """Matches a vector, a dict or a matrix (list of rows) to 1e-6: torchmetrics computes in float32."""
    if m and isinstance(m, list) and isinstance(m[0], list):
        return [pytest.approx(row, abs=1e-6) for row in m]
    return pytest.approx(m, abs=1e-6)


def test_matrix_logs_json_heatmap_and_table(tmp_path, capsys, expected):
    R_exp, b_exp = expected
    metrics = ContinualMetrics()
    trainer = _fit(Oracle(), _dm(eval_batch_size=16), metrics, default_root_dir=tmp_path)

    assert metrics.matrix == _approx(R_exp) and metrics.initial_accuracy == _approx(b_exp)
    summary = metrics.summary()
    assert summary == _approx(continual_summary(R_exp, b_exp)["final"])
    assert summary["fwt"] is not None and summary["fwt"] > 0  # classes 4 and 6 were "known" early
    for name, value in summary.items():
        assert float(trainer.callback_metrics[f"cl/{name}"]) == pytest.approx(value, abs=1e-6)
    assert float(trainer.callback_metrics["cl/acc_exp3"]) == pytest.approx(R_exp[4][3], abs=1e-6)

    # logger=False: files go to default_root_dir
    assert metrics.output_files == [tmp_path / "metrics.json", tmp_path / "accuracy_matrix.txt",
                                    tmp_path / "accuracy_matrix.png"]
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["matrix"] == metrics.matrix and data["initial_accuracy"] == metrics.initial_accuracy
    assert data["final"] == summary and data["scenario"] == "class" and data["num_experiences"] == 5
    assert data["per_experience"]["avg_acc"] == _approx(continual_summary(R_exp)["per_experience"]["avg_acc"])
    assert data["num_test_samples"] == [87, 100, 90, 84, 88]
    with Image.open(tmp_path / "accuracy_matrix.png") as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 200

    out = capsys.readouterr().out
    assert format_matrix(metrics.matrix, metrics.initial_accuracy) in out
    assert (tmp_path / "accuracy_matrix.txt").read_text() == metrics.table() + "\n"
    assert metrics.table() in out
    assert "Average accuracy" in out and f"{100 * summary['avg_acc']:.2f}%" in out

    trainer.validate(trainer.lightning_module, datamodule=_dm())  # validation outside fit does not touch the matrix
    assert metrics.matrix == _approx(R_exp)


def test_fallback_predictions_bf16_and_several_epochs_per_experience(tmp_path, expected):
    # validation_step returns no "preds": the callback runs the model itself, under bf16 autocast
    metrics = ContinualMetrics(output_dir=str(tmp_path / "out"), plot=False)
    _fit(Oracle(return_preds=False, forget_each_epoch=True), _dm(epochs_per_experience=2), metrics,
         precision="bf16-mixed",
         limit_train_batches=4, val_check_interval=0.5)  # the mid-epoch validations must not fill rows
    assert metrics.matrix == _approx(expected[0]) and metrics.initial_accuracy == _approx(expected[1])
    assert [p.name for p in metrics.output_files] == ["metrics.json", "accuracy_matrix.txt"]


def test_missing_validation_is_a_clear_error(tmp_path):
    def metrics():
        return ContinualMetrics(plot=False, output_dir=str(tmp_path))

    with pytest.raises(RuntimeError, match="check_val_every_n_epoch dividing epochs_per_experience"):
        _fit(Oracle(), _dm(), metrics(), check_val_every_n_epoch=2)
    with pytest.raises(RuntimeError, match="without a validation pass"):  # validates at batches 2 and 4 of 5
        _fit(Oracle(), _dm(), metrics(), limit_train_batches=5, val_check_interval=0.5)
    with pytest.raises(ValueError, match="limit_val_batches=0"):
        _fit(Oracle(), _dm(), metrics(), limit_val_batches=0)



def test_state_dict_round_trip_and_resume_from_mid_stream_checkpoint(tmp_path, expected):
    R_exp, b_exp = expected
    first = ContinualMetrics(plot=False, output_dir=str(tmp_path))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _fit(Oracle(), _dm(), first, ckpt, StopAfter(1), enable_checkpointing=True)
    assert first.matrix == _approx(R_exp[:2])

    clone = ContinualMetrics()
    clone.load_state_dict(first.state_dict())
    assert clone.matrix == first.matrix and clone.initial_accuracy == first.initial_accuracy
    assert clone.summary() == first.summary()
    with pytest.raises(KeyError, match="not a ContinualMetrics state"):
        clone.load_state_dict({"rows": []})

    # resumed with a model whose untrained answers differ: b must come from the checkpoint
    resumed = ContinualMetrics(plot=False, output_dir=str(tmp_path))
    _fit(Oracle(initial={9}), _dm(), resumed, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    assert resumed.matrix == _approx(R_exp) and resumed.initial_accuracy == _approx(b_exp)


def test_per_experience_fits_accumulate_rows(tmp_path, expected):
    dm, model, metrics = _dm(), Oracle(), ContinualMetrics(plot=False, output_dir=str(tmp_path))
    for i in range(dm.num_experiences):
        dm.set_experience(i)
        _fit(model, dm, metrics, max_epochs=1)
        assert len(metrics.matrix) == i + 1
    assert metrics.matrix == _approx(expected[0]) and metrics.initial_accuracy == _approx(expected[1])
    with pytest.raises(RuntimeError, match="holds 0 row"):  # a fresh callback mid-stream
        dm.set_experience(2)
        _fit(model, dm, ContinualMetrics(plot=False, evaluate_initial=False, output_dir=str(tmp_path)), max_epochs=1)


def test_joint_training_has_one_row_and_no_transfer_metrics(tmp_path, expected):
    metrics = ContinualMetrics(output_dir=str(tmp_path), plot=False)
    schedule = [set(range(10)) - {3}]
    _fit(Oracle(schedule=schedule), _dm(), metrics, JointTraining())
    labels = _test_labels(_dm())
    row = _share(labels, schedule[0])
    assert metrics.matrix == _approx([row])
    assert metrics.summary() == _approx({"avg_acc": sum(row) / 5, "avg_forgetting": None, "bwt": None, "fwt": None})
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["joint"] is True and data["final"]["bwt"] is None


class Ranked(ContinualClassificationMixin, pl.LightningModule):
    """Logits ``0, 1, ..., 9``: the prediction is the largest class the mixin's mask allows."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.arange(10.0, device=x.device).expand(len(x), 10) * self.w

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.0)


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_initial_accuracy_uses_the_modules_masks(scenario, tmp_path):
    dm = _dm(scenario=scenario)
    metrics = ContinualMetrics(plot=False, output_dir=str(tmp_path))
    _fit(Ranked(), dm, metrics)
    labels = _test_labels(dm)
    top = [float((y == 2 * j + 1).double().mean()) for j, y in enumerate(labels)]  # share of the larger class
    if scenario == "task":  # masked to each sample's task: always the task's larger class
        b = top
        rows = [top] * 5
    else:  # masked to the classes seen so far: 1 before training, 2i+1 after experience i
        b = [top[0], 0, 0, 0, 0]
        rows = [[top[i] if j == i else 0.0 for j in range(5)] for i in range(5)]
    assert metrics.initial_accuracy == _approx(b)
    assert metrics.matrix == _approx(rows)


DDP_SCRIPT = """
import json, os
import lightning.pytorch as pl
from callbacks.metrics import ContinualMetrics
from tests.test_metrics import Oracle, _dm
from tests.conftest import quiet_trainer_kwargs

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.environ["RESULT_PATH"]), "out")
    metrics = ContinualMetrics(output_dir=out)
    trainer = pl.Trainer(**quiet_trainer_kwargs(devices=2, strategy="ddp", callbacks=[metrics]))
    trainer.fit(Oracle(), datamodule=_dm(eval_batch_size=16))
    if trainer.is_global_zero:
        with open(os.environ["RESULT_PATH"], "w") as f:
            json.dump({"matrix": metrics.matrix, "initial": metrics.initial_accuracy, "summary": metrics.summary(),
                       "files": [str(p) for p in metrics.output_files], "world": trainer.world_size,
                       "logged": float(trainer.callback_metrics["cl/avg_acc"])}, f)
"""


@pytest.mark.slow
def test_ddp_two_processes_give_the_single_process_matrix(tmp_path):
    single = ContinualMetrics(plot=False, output_dir=str(tmp_path / "single"))
    _fit(Oracle(), _dm(eval_batch_size=16), single)
    res = run_script(DDP_SCRIPT, tmp_path)
    assert res["world"] == 2
    assert res["matrix"] == single.matrix  # exact: the val sampler shards 87, 100, ... samples without padding
    assert res["initial"] == single.initial_accuracy
    assert res["summary"] == single.summary()
    assert res["logged"] == pytest.approx(single.summary()["avg_acc"], abs=1e-6)
    assert sorted(p.rsplit("/", 1)[1] for p in res["files"]) == ["accuracy_matrix.png", "accuracy_matrix.txt",
                                                                  "metrics.json"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_16_mixed_matrix(tmp_path, expected):
    metrics = ContinualMetrics(plot=False, output_dir=str(tmp_path))
    _fit(Oracle(return_preds=False), _dm(), metrics, accelerator="gpu", precision="16-mixed")
    assert metrics.matrix == _approx(expected[0]) and metrics.initial_accuracy == _approx(expected[1])
