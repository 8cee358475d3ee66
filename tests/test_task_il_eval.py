"""Task-IL accuracy of a class-IL run (the DER paper's and mammoth's "Task-IL" column): each test experience's
predictions restricted to that experience's classes, beside the class-IL matrix."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from callbacks.metrics import ContinualMetrics
from cl_plugins import ContinualClassifier
from cl_plugins.mixins import ContinualClassificationMixin
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs


class _StreamStub(ContinualClassificationMixin):
    def __init__(self, scenario: str) -> None:
        self.dm = SimpleNamespace(scenario=scenario, test_classes_in_experience=[(0, 1), (2, 3)],
                                  classes_in_experience=[(0, 1), (2, 3)])

    def _stream(self):
        return self.dm


def test_task_il_predictions_are_the_argmax_over_the_experiences_classes():
    logits = torch.tensor([[5.0, 0.0, 1.0, 2.0], [0.0, 1.0, 9.0, 3.0]])
    stub = _StreamStub("class")
    assert stub.task_il_predictions(logits, 0).tolist() == [0, 1]
    assert stub.task_il_predictions(logits, 1).tolist() == [3, 2]
    assert stub.task_il_predictions(logits, 2) is None  # no such test experience
    assert _StreamStub("task").task_il_predictions(logits, 0) is None


class _SelfPredicted(ContinualClassifier):
    """Returns no predictions from validation: ContinualMetrics predicts from ``pl_module(x)`` itself."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return None


def _fit(model_cls, scenario: str = "class") -> tuple[ContinualMetrics, ContinualClassifier, SplitDigits]:
    pl.seed_everything(0, verbose=False)
    model = model_cls("mlp", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"hidden": 32}, lr=0.05)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32, scenario=scenario)
    metrics = ContinualMetrics(plot=False, evaluate_initial=False)
    pl.Trainer(**quiet_trainer_kwargs(callbacks=[metrics])).fit(model, datamodule=dm)
    return metrics, model, dm


def _masked_accuracy(model: ContinualClassifier, dm: SplitDigits, j: int) -> float:
    x = torch.stack([dm.test_dataset(j)[i][0] for i in range(len(dm.test_dataset(j)))])
    y = torch.tensor(list(dm.test_dataset(j).targets))
    mask = torch.zeros(10, dtype=torch.bool)
    mask[list(dm.test_classes_in_experience[j])] = True
    model.eval()
    with torch.no_grad():
        preds = model(x).masked_fill(~mask, float("-inf")).argmax(-1)
    return float((preds == y).double().mean())


def test_class_il_run_reports_its_task_il_matrix_and_it_matches_a_direct_evaluation():
    metrics, model, dm = _fit(ContinualClassifier)
    R, T = metrics.matrix, metrics.task_il_matrix
    assert len(T) == len(R) == 5 and all(len(row) == 5 for row in T)
    # seen experiences: the class-IL mask (seen classes) contains experience j's classes, so a right class-IL
    # prediction is a right task-IL one
    for i in range(5):
        for j in range(i + 1):
            assert T[i][j] >= R[i][j]
    # the last row equals an independent evaluation with each experience's class mask
    assert T[-1] == pytest.approx([_masked_accuracy(model, dm, j) for j in range(5)], abs=1e-12)
    # naive fine-tuning forgets in class-IL (old classes are never predicted) far more than in task-IL
    res = metrics.results()
    assert res["task_il"]["final"]["avg_acc"] == pytest.approx(sum(T[-1]) / 5)
    assert res["task_il"]["final"]["avg_acc"] > res["final"]["avg_acc"] + 0.3
    assert "Task-IL average accuracy" in metrics.table()
    # checkpoint state
    restored = ContinualMetrics()
    restored.load_state_dict(metrics.state_dict())
    assert restored.task_il_matrix == T and restored.results()["task_il"] == res["task_il"]


def test_the_callbacks_own_predictions_give_the_same_task_il_matrix():
    ours, _, _ = _fit(_SelfPredicted)
    module_preds, _, _ = _fit(ContinualClassifier)
    assert ours.task_il_matrix == module_preds.task_il_matrix and ours.matrix == module_preds.matrix


def test_a_task_il_stream_has_no_separate_task_il_evaluation():
    metrics, _, _ = _fit(ContinualClassifier, scenario="task")
    assert metrics.task_il_matrix == [] and metrics.results()["task_il"] is None


class _BadTaskILShape(ContinualClassifier):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        out = super().validation_step(batch, batch_idx, dataloader_idx)
        out["task_il_preds"] = out["task_il_preds"][:1]
        return out


def test_task_il_predictions_of_the_wrong_shape_are_a_clear_error():
    with pytest.raises(ValueError, match=r"outputs\['task_il_preds'\] has shape \(1,\).*one class index per sample"):
        _fit(_BadTaskILShape)
