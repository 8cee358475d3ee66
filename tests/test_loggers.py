"""``ContinualMetrics`` sends the final metrics and the accuracy matrix to the trainer's loggers: TensorBoard
(scalars, the heatmap image, the table as text), CSV (one row with the final metrics and every matrix entry),
W&B-like loggers (``log_image`` / ``log_table``) and any other logger (``log_metrics``)."""

from __future__ import annotations

import csv
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from callbacks.metrics import ContinualMetrics
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import RecordingLogger

FINAL = ("avg_acc", "avg_forgetting", "bwt", "fwt")


def _fit(tmp_path, logger: Any, plot: bool = True) -> tuple[pl.Trainer, ContinualMetrics]:
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, batch_size=64)
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"hidden": 16},
                                lr=0.1)
    metrics = ContinualMetrics(output_dir=str(tmp_path / "reports"), plot=plot)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[metrics], logger=logger, default_root_dir=tmp_path))
    trainer.fit(model, datamodule=dm)
    return trainer, metrics


def test_tensorboard_gets_the_heatmap_image_the_table_and_the_final_scalars(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer, metrics = _fit(tmp_path, logger)
    acc = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0,
                                                                            "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "cl/accuracy_matrix" in tags["images"]
    image = acc.Images("cl/accuracy_matrix")[-1]
    assert image.step == trainer.global_step and image.width > 100 and image.height > 100
    final = metrics.summary()
    for name in FINAL:
        events = acc.Scalars(f"cl/final/{name}")
        assert events[-1].step == trainer.global_step
        assert events[-1].value == pytest.approx(final[name], abs=1e-6)
    # the per-experience metrics arrive as before, one point per experience
    assert len(acc.Scalars("cl/avg_acc")) == 5
    text = acc.Tensors("cl/accuracy_matrix/text_summary")[-1]
    assert "after 4" in text.tensor_proto.string_val[0].decode()
    # a TensorBoard run does not get the matrix as 25 separate scalars
    assert not [t for t in tags["scalars"] if t.startswith("cl/R/")]


def test_csv_rows_hold_the_final_metrics_and_the_whole_matrix(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer, metrics = _fit(tmp_path, logger, plot=False)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    final_rows = [r for r in rows if r.get("cl/final/avg_acc")]
    assert len(final_rows) == 1
    row = final_rows[0]
    assert int(row["step"]) == trainer.global_step
    final = metrics.summary()
    for name in FINAL:
        assert float(row[f"cl/final/{name}"]) == pytest.approx(final[name], abs=1e-6)
    for i, matrix_row in enumerate(metrics.matrix):
        for j, value in enumerate(matrix_row):
            assert float(row[f"cl/R/after_{i}/exp_{j}"]) == pytest.approx(value, abs=1e-6)
    # the rows of each experience's end (logged through the module) are still there
    assert len([r for r in rows if r.get("cl/avg_acc")]) == 5



class FakeWandb(WandbLogger):
    """``WandbLogger``'s API without a W&B run: records log_metrics / log_image / log_table."""

    def __init__(self) -> None:  # no super().__init__: that would start wandb
        Logger.__init__(self)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @property
    def experiment(self) -> Any:
        return object()  # no W&B run: any use of it by ContinualMetrics fails

    @property
    def name(self) -> str:
        return "fake-wandb"

    @property
    def version(self) -> str:
        return "0"

    @property
    def save_dir(self) -> None:
        return None

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append(("log_metrics", {"metrics": dict(metrics), "step": step}))

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self.calls.append(("log_image", {"key": key, "images": images, "step": step}))

    def log_table(self, key: str, columns: list[str] | None = None, data: list[list[Any]] | None = None,
                  dataframe: Any = None, step: int | None = None) -> None:
        self.calls.append(("log_table", {"key": key, "columns": columns, "data": data, "step": step}))

    def finalize(self, status: str) -> None:
        pass


def test_generic_and_wandb_loggers_through_their_api(tmp_path):
    generic, wandb = RecordingLogger(), FakeWandb()
    trainer, metrics = _fit(tmp_path, [generic, wandb])
    final = metrics.summary()

    last, step = generic.rows[-1]
    assert step == trainer.global_step
    assert {k: last[k] for k in (f"cl/final/{n}" for n in FINAL)} == pytest.approx(
        {f"cl/final/{n}": final[n] for n in FINAL}, abs=1e-6)
    assert last["cl/R/after_4/exp_2"] == pytest.approx(metrics.matrix[4][2], abs=1e-6)

    images = [kw for name, kw in wandb.calls if name == "log_image"]
    assert len(images) == 1 and images[0]["key"] == "cl/accuracy_matrix" and images[0]["step"] == trainer.global_step
    image = images[0]["images"][0]
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
    assert len({tuple(px) for px in image.reshape(-1, 3)[::97].tolist()}) > 5  # a drawn heatmap, not a blank
    tables = [kw for name, kw in wandb.calls if name == "log_table"]
    assert tables[0]["columns"] == ["after"] + [f"exp {j}" for j in range(5)]
    assert tables[0]["data"][4][1:] == pytest.approx(metrics.matrix[4], abs=1e-6)
    wandb_final = [kw["metrics"] for name, kw in wandb.calls if name == "log_metrics" and "cl/final/avg_acc" in
                   kw["metrics"]]
    assert wandb_final and not [k for k in wandb_final[-1] if k.startswith("cl/R/")]

