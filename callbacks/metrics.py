"""``ContinualMetrics``: the accuracy matrix of a stream, its summary metrics and reports.

After the last epoch of every experience, the validation pass over the test experiences (one
validation loader each) fills row ``i`` of ``R[i][j]``; average accuracy, forgetting, BWT and FWT
(definitions in :mod:`cl_plugins.metrics`) are logged as ``cl/*``, and at the end of ``fit`` the
matrix goes to ``metrics.json``, a heatmap PNG, a printed table and the trainer's loggers (ARCHITECTURE.md
section 5).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from callbacks.base import ContinualCallback
from cl_plugins.metrics import continual_summary, format_matrix

_NAMES = ("avg_acc", "avg_forgetting", "bwt", "fwt")


class ContinualMetrics(ContinualCallback):
    """Builds the accuracy matrix ``R`` with torchmetrics and reports continual metrics.

    Args:
        output_dir: folder of ``metrics.json``, ``accuracy_matrix.txt`` and ``accuracy_matrix.png``
            (default: the trainer's ``log_dir``, else its ``default_root_dir``).
        plot: draw the heatmap (``accuracy_matrix.png``, and an image for the loggers that take images).
        evaluate_initial: at the start of training, evaluate the untrained model on every test
            experience (``b`` of forward transfer; FWT is ``None`` without it).

    Predictions are ``outputs["preds"]`` of ``validation_step`` (class indices, or logits that are
    arg-maxed); where ``validation_step`` returns no ``"preds"``, the callback computes
    ``argmax`` of ``pl_module(x)`` (through ``pl_module.masked_logits(..., evaluation=True)`` when
    the module has it). Accuracy is micro accuracy: the fraction of the experience's test samples
    predicted right, exact under DDP because the stream's validation sampler does not pad.

    On class-IL streams it also fills ``task_il_matrix``: the accuracy of each test experience with the
    predictions restricted to that experience's classes (``outputs["task_il_preds"]``, which
    :class:`cl_plugins.ContinualClassifier` returns; computed from ``pl_module(x)`` where the callback predicts
    itself and the module has ``task_il_predictions``). This is the "Task-IL" figure of a class-IL run in the DER
    paper and mammoth; it goes to ``metrics.json`` (``task_il``), ``cl/task_il_avg_acc`` and the printed table.

    After each experience the callback logs ``cl/avg_acc``, ``cl/avg_forgetting``, ``cl/bwt``,
    ``cl/fwt`` (undefined ones are not logged) and ``cl/acc_exp{j}`` (the new row); at the end of
    every ``fit`` rank zero writes the reports, sends the final metrics and the matrix (a heatmap image where
    the logger takes images) to the trainer's loggers (:meth:`log_to_loggers`: TensorBoard, CSV, W&B, ...)
    and prints the matrix and the summary.

    Only validation inside ``fit`` counts (``trainer.validate`` / ``test`` and the sanity check are
    ignored), and only the validation at the end of an experience's last epoch. Attributes:
    ``matrix`` (list of rows), ``initial_accuracy`` (``b`` or ``None``), ``output_files`` (paths
    written, on rank zero); :meth:`summary` gives the metrics of the last row. The matrix and ``b``
    are checkpointed, and one instance can serve several ``fit`` calls of a per-experience loop.
    """

    def __init__(self, output_dir: str | None = None, plot: bool = True, evaluate_initial: bool = True) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.plot = plot
        self.evaluate_initial = evaluate_initial
        self.matrix: list[list[float]] = []
        #: on class-IL streams, the same matrix with each test experience's predictions restricted to its classes
        self.task_il_matrix: list[list[float]] = []
        self.initial_accuracy: list[float] | None = None
        self.num_test_samples: list[int] | None = None
        self.output_files: list[Path] = []
        self._joint = False
        self._scenario: str | None = None
        self._num_experiences: int | None = None
        self._accuracies: list[MulticlassAccuracy] = []
        self._counts = torch.zeros(0, dtype=torch.long)
        self._task_il_counts = torch.zeros(0, dtype=torch.long)  # (2, loaders): correct, predicted
        self._collecting: int | None = None  # the experience whose row this validation fills
        self._filled: int | None = None  # the experience whose row was filled in this epoch

    # ------------------------------------------------------------------ results
    @property
    def aligned(self) -> bool:
        """Whether test experience ``j`` belongs to training experience ``j`` (same counts)."""
        width = len(self.matrix[0]) if self.matrix else None
        return width is None or self._num_experiences is None or width == self._num_experiences

    def results(self) -> dict[str, Any]:
        """Everything ``metrics.json`` holds: matrix, ``b``, per-experience and final metrics."""
        summary = continual_summary(self.matrix, self.initial_accuracy, joint=self._joint, aligned=self.aligned)
        return {
            "scenario": self._scenario,
            "num_experiences": self._num_experiences,
            "num_test_experiences": len(self.matrix[0]) if self.matrix else None,
            "joint": self._joint,
            "matrix": self.matrix,
            "initial_accuracy": self.initial_accuracy,
            "num_test_samples": self.num_test_samples,
            **summary,
            "task_il": self._task_il_results(),
        }

    def _task_il_results(self) -> dict[str, Any] | None:
        """The task-IL evaluation of a class-IL run (``None`` where there is none): its matrix and metrics."""
        if not self.task_il_matrix or len(self.task_il_matrix) != len(self.matrix):
            return None
        summary = continual_summary(self.task_il_matrix, None, joint=self._joint, aligned=self.aligned)
        return {"matrix": self.task_il_matrix, **summary}

    def summary(self) -> dict[str, float | None]:
        """``avg_acc``, ``avg_forgetting``, ``bwt`` and ``fwt`` after the last completed experience
        (``None`` where undefined, see :mod:`cl_plugins.metrics`)."""
        if not self.matrix:
            raise RuntimeError(
                "ContinualMetrics has no completed experience yet: call summary() after trainer.fit "
                "has trained at least one experience"
            )
        return dict(self.results()["final"])

    # ------------------------------------------------------------------ setup and initial accuracy
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = self.stream(trainer)
        if trainer.limit_val_batches == 0:
            raise ValueError(
                "ContinualMetrics fills the accuracy matrix from validation, but the Trainer has "
                "limit_val_batches=0: set limit_val_batches=1.0 (or remove the ContinualMetrics callback)"
            )
        self._scenario = dm.scenario
        self._num_experiences = dm.num_experiences

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evaluate_initial and not self.matrix and self.initial_accuracy is None:
            self.initial_accuracy = self._evaluate_untrained(trainer, pl_module)
            rank_zero_info("ContinualMetrics: initial accuracy " + ", ".join(f"{a:.3f}" for a in self.initial_accuracy))

    @classmethod
    def _predict(cls, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Any, t: Tensor | None) -> Tensor:
        return cls._predict_both(trainer, pl_module, x, t, None)[0]

    @staticmethod
    def _predict_both(trainer: pl.Trainer, pl_module: pl.LightningModule, x: Any, t: Tensor | None,
                      experience: int | None) -> tuple[Tensor, Tensor | None]:
        """Predictions, and where the module has ``task_il_predictions`` and ``experience`` is given, the
        task-IL predictions on that test experience, from one forward."""
        task_il = None
        with trainer.precision_plugin.val_step_context():
            logits = pl_module(x)
            if not isinstance(logits, Tensor):
                raise TypeError(
                    f"ContinualMetrics predicts with pl_module(x).argmax(-1), but forward returned "
                    f"{type(logits).__name__}: return logits from forward, or return {{'preds': ...}} "
                    "(class indices) from validation_step"
                )
            if experience is not None and hasattr(pl_module, "task_il_predictions"):
                task_il = pl_module.task_il_predictions(logits, experience)
            if t is not None and hasattr(pl_module, "masked_logits"):
                logits = pl_module.masked_logits(logits, t, evaluation=True)
        return logits.argmax(dim=-1), task_il

    def _evaluate_untrained(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[float]:
        """Accuracy of the model before training on every test experience (DDP-summed counts)."""
        dm = self.stream(trainer)
        loaders = dm.val_dataloader()
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        counts = torch.zeros(2, len(loaders), dtype=torch.long, device=pl_module.device)
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad():
                for j, loader in enumerate(loaders):
                    for batch in loader:
                        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=j)
                        x, y = batch[0], batch[1]
                        t = batch[2] if len(batch) > 2 else None
                        preds = self._predict(trainer, pl_module, x, t)
                        counts[0, j] += (preds == y).sum()
                        counts[1, j] += y.numel()
        finally:
            for m, mode in modes.items():
                m.training = mode
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self._check_counts(counts[1].tolist(), "the initial evaluation")
        return (counts[0].double() / counts[1].double()).tolist()

    @staticmethod
    def _check_counts(totals: list[int], where: str) -> None:
        empty = [j for j, n in enumerate(totals) if n == 0]
        if empty:
            raise RuntimeError(
                f"{where} saw no test sample of experience(s) {empty}: every validation loader must "
                "yield data (check limit_val_batches and the test stream)"
            )

    # ------------------------------------------------------------------ validation -> matrix rows
    @staticmethod
    def _epoch_finished(trainer: pl.Trainer) -> bool:
        return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collecting = None
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        dm = self.stream(trainer)
        epoch = trainer.current_epoch
        # mid-epoch validations (val_check_interval < 1) do not count: the experience is not over
        if not dm.is_experience_end(epoch) or not self._epoch_finished(trainer):
            return
        n_loaders = len(trainer.num_val_batches)
        num_classes = max(dm.num_classes, 2)
        # micro accuracy is (preds == target).mean(); num_classes does not enter it, so predictions
        # of a model with more outputs than the stream has classes are fine (validate_args=False)
        self._accuracies = [
            MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False).to(pl_module.device)
            for _ in range(n_loaders)
        ]
        self._counts = torch.zeros(n_loaders, dtype=torch.long, device=pl_module.device)
        self._task_il_counts = torch.zeros(2, n_loaders, dtype=torch.long, device=pl_module.device)
        self._collecting = dm.experience_at_epoch(epoch)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._collecting is None:
            return
        x, y = batch[0], batch[1]
        task_il = outputs.get("task_il_preds") if isinstance(outputs, Mapping) else None
        if isinstance(outputs, Mapping) and "preds" in outputs:
            preds = outputs["preds"]
        else:
            preds, task_il = self._predict_both(trainer, pl_module, x, batch[2] if len(batch) > 2 else None,
                                                dataloader_idx)
        if preds.is_floating_point() and preds.dim() == y.dim() + 1:
            preds = preds.argmax(dim=-1)
        if preds.shape != y.shape:
            raise ValueError(
                f"validation_step's outputs['preds'] has shape {tuple(preds.shape)} but the targets have "
                f"{tuple(y.shape)}: return one class index (or one row of logits) per sample"
            )
        self._accuracies[dataloader_idx].update(preds.detach().to(y.device), y)
        self._counts[dataloader_idx] += y.numel()
        if task_il is not None:
            if task_il.shape != y.shape:
                raise ValueError(
                    f"validation_step's outputs['task_il_preds'] has shape {tuple(task_il.shape)} but the targets "
                    f"have {tuple(y.shape)}: return one class index per sample"
                )
            self._task_il_counts[0, dataloader_idx] += (task_il.detach().to(y.device) == y).sum()
            self._task_il_counts[1, dataloader_idx] += y.numel()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._collecting is None:
            return
        experience, self._collecting = self._collecting, None
        # one collective for the sample counts and the task-IL counts (the same call on every rank)
        counts = trainer.strategy.reduce(torch.cat([self._counts[None], self._task_il_counts]), reduce_op="sum")
        totals, (correct, predicted) = counts[0].tolist(), counts[1:].tolist()
        self._check_counts(totals, f"the validation after experience {experience}")
        row = [float(acc.compute()) for acc in self._accuracies]  # all-reduced by torchmetrics under DDP
        for acc in self._accuracies:
            acc.reset()
        # a task-IL row only where every test sample had a task-IL prediction (class-IL streams)
        task_il_row = [c / n for c, n in zip(correct, totals)] if predicted == totals else None
        self._store_row(trainer, experience, row, totals, task_il_row)

    def _store_row(self, trainer: pl.Trainer, experience: int, row: list[float], totals: list[int],
                   task_il_row: list[float] | None = None) -> None:
        dm = self.stream(trainer)
        if self.matrix and len(row) != len(self.matrix[0]):
            raise RuntimeError(
                f"the validation after experience {experience} has {len(row)} loaders, earlier rows have "
                f"{len(self.matrix[0])}: keep one validation loader per test experience"
            )
        if experience > len(self.matrix):
            raise RuntimeError(
                f"experience {experience} ended but ContinualMetrics holds {len(self.matrix)} row(s), for "
                f"experiences 0..{len(self.matrix) - 1}: use the same ContinualMetrics instance for every fit of a "
                "per-experience loop, and resume with ckpt_path=... so its state is restored"
            )
        if experience < len(self.matrix) - 1:
            raise RuntimeError(
                f"experience {experience} ended again after experience {len(self.matrix) - 1}: a stream's "
                "experiences are trained in order; use a new ContinualMetrics for a new stream"
            )
        if experience == len(self.matrix):
            self.matrix.append(row)
        else:  # the same experience validated again (a resumed run repeating its final validation)
            self.matrix[experience] = row
        if task_il_row is None:
            self.task_il_matrix = []
        elif len(self.task_il_matrix) >= experience:
            del self.task_il_matrix[experience:]
            self.task_il_matrix.append(task_il_row)
        self.num_test_samples = totals
        self._joint = dm.joint
        self._scenario = dm.scenario
        self._num_experiences = dm.num_experiences
        self._filled = experience

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._filled = None

    def on_experience_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> None:
        if not self._epoch_finished(trainer):
            rank_zero_warn(
                f"training stopped inside the last epoch of experience {experience}: ContinualMetrics "
                "records no row for it"
            )
            return
        if self._filled != experience:
            dm = self.stream(trainer)
            raise RuntimeError(
                f"experience {experience} ended at epoch {trainer.current_epoch} without a validation pass "
                "at the end of that epoch, so ContinualMetrics cannot fill its row of the accuracy matrix. "
                f"Use Trainer arguments that validate after the last epoch of every experience: "
                f"limit_val_batches > 0, check_val_every_n_epoch dividing epochs_per_experience="
                f"{dm.epochs_per_experience} (e.g. 1), and val_check_interval=1.0 (or a fraction that "
                "ends on the last batch)"
            )
        k = len(self.matrix) - 1
        final = continual_summary(self.matrix, self.initial_accuracy, joint=self._joint, aligned=self.aligned)["final"]
        for name in _NAMES:
            if final[name] is not None:
                pl_module.log(f"cl/{name}", final[name], on_step=False, on_epoch=True, sync_dist=False)
        for j, acc in enumerate(self.matrix[k]):
            pl_module.log(f"cl/acc_exp{j}", acc, on_step=False, on_epoch=True, sync_dist=False)
        task_il = self._task_il_results()
        if task_il is not None:
            pl_module.log("cl/task_il_avg_acc", task_il["final"]["avg_acc"], on_step=False, on_epoch=True,
                          sync_dist=False)
        rank_zero_info(f"ContinualMetrics after experience {experience}: " + _summary_line(final))

    # ------------------------------------------------------------------ reports
    def _resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        log_dir = trainer.log_dir  # a collective call (broadcast): every rank must make it
        return Path(log_dir if log_dir is not None else trainer.default_root_dir)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = self._resolve_output_dir(trainer)
        if not trainer.is_global_zero:
            return
        if not self.matrix:
            rank_zero_warn("ContinualMetrics: no experience was completed, so no metrics were written")
            return
        self.output_files = self.write_reports(out)
        self.log_to_loggers(trainer)
        print(self.table())

    def log_to_loggers(self, trainer: pl.Trainer) -> None:
        """Sends the results to every logger of ``trainer`` (rank zero calls it at the end of ``fit``):

        - every logger: the final metrics as scalars ``cl/final/<name>`` (``avg_acc``, ``avg_forgetting``,
          ``bwt``, ``fwt`` where defined) through ``log_metrics``;
        - TensorBoard: the heatmap as image ``cl/accuracy_matrix`` (``add_image``) and the printed table as
          text; W&B: the heatmap through ``WandbLogger.log_image`` and the matrix through ``log_table``;
        - any other logger (CSV, MLflow, ...): the matrix entries as scalars ``cl/R/after_<i>/exp_<j>`` in the
          row of the final metrics (``metrics.csv`` then holds the whole matrix).

        All at step ``trainer.global_step``; the heatmap only with ``plot=True``.
        """
        if not trainer.loggers or not self.matrix:
            return
        results = self.results()
        step = trainer.global_step
        scalars = {f"cl/final/{name}": float(v) for name, v in results["final"].items() if v is not None}
        if results["task_il"] is not None:
            scalars["cl/final/task_il_avg_acc"] = float(results["task_il"]["final"]["avg_acc"])
        entries = {f"cl/R/after_{i}/exp_{j}": float(v)
                   for i, row in enumerate(self.matrix) for j, v in enumerate(row) if v is not None}
        image = matrix_image(self.matrix, _plot_title(results["final"])) if self.plot else None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_metrics(scalars, step=step)
                writer = logger.experiment
                if image is not None:
                    writer.add_image("cl/accuracy_matrix", image, step, dataformats="HWC")
                writer.add_text("cl/accuracy_matrix", "\n".join("    " + line for line in self.table().splitlines()),
                                step)
            elif isinstance(logger, WandbLogger):
                logger.log_metrics(scalars, step=step)
                if image is not None:
                    logger.log_image(key="cl/accuracy_matrix", images=[image], step=step)
                width = max(len(row) for row in self.matrix)
                logger.log_table(key="cl/accuracy_matrix_table", columns=["after"] + [f"exp {j}" for j in range(width)],
                                 data=[[i, *row, *([None] * (width - len(row)))] for i, row in enumerate(self.matrix)],
                                 step=step)
            else:
                logger.log_metrics({**scalars, **entries}, step=step)

    def table(self) -> str:
        """The accuracy matrix as the printed table, with the final summary line (and the task-IL average
        accuracy of a class-IL run)."""
        lines = [
            "Accuracy matrix (%): row i = after training experience i, column j = test experience j",
            format_matrix(self.matrix, self.initial_accuracy),
            _summary_line(self.results()["final"]),
        ]
        task_il = self._task_il_results()
        if task_il is not None:
            lines.append(f"Task-IL average accuracy (each test experience among its own classes): "
                         f"{_fmt(task_il['final']['avg_acc'])}")
        return "\n".join(lines)

    def write_reports(self, output_dir: str | Path) -> list[Path]:
        """Writes ``metrics.json``, the printed table (``accuracy_matrix.txt``) and, when ``plot``,
        the heatmap ``accuracy_matrix.png`` into ``output_dir``."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        results = self.results()
        path = out / "metrics.json"
        path.write_text(json.dumps(results, indent=2))
        table = out / "accuracy_matrix.txt"
        table.write_text(self.table() + "\n")
        files = [path, table]
        if self.plot:
            files.append(plot_matrix(self.matrix, out / "accuracy_matrix.png", title=_plot_title(results["final"])))
        return files

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "matrix": [list(row) for row in self.matrix],
            "task_il_matrix": [list(row) for row in self.task_il_matrix],
            "initial_accuracy": self.initial_accuracy,
            "num_test_samples": self.num_test_samples,
            "joint": self._joint,
            "scenario": self._scenario,
            "num_experiences": self._num_experiences,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "matrix" not in state_dict:
            raise KeyError(f"not a ContinualMetrics state (keys: {sorted(state_dict)})")
        self.matrix = [[float(v) for v in row] for row in state_dict["matrix"]]
        self.task_il_matrix = [[float(v) for v in row] for row in state_dict.get("task_il_matrix", [])]
        b = state_dict.get("initial_accuracy")
        self.initial_accuracy = None if b is None else [float(v) for v in b]
        n = state_dict.get("num_test_samples")
        self.num_test_samples = None if n is None else [int(v) for v in n]
        self._joint = bool(state_dict.get("joint", False))
        self._scenario = state_dict.get("scenario")
        self._num_experiences = state_dict.get("num_experiences")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _summary_line(final: Mapping[str, float | None]) -> str:
    return (f"Average accuracy (avg_acc): {_fmt(final['avg_acc'])} | average forgetting: "
            f"{_fmt(final['avg_forgetting'])} | BWT: {_fmt(final['bwt'])} | FWT: {_fmt(final['fwt'])}")


def _plot_title(final: Mapping[str, float | None]) -> str:
    return f"avg acc {_fmt(final['avg_acc'])}, forgetting {_fmt(final['avg_forgetting'])}"


def matrix_figure(matrix: list[list[float]], title: str | None = None) -> Any:
    """Heatmap of ``R`` (rows: after training experience ``i``; columns: test experience ``j``) with every cell
    annotated in %, as a matplotlib ``Figure`` on an Agg canvas (no pyplot, so no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = len(matrix), max(len(r) for r in matrix)
    data = torch.full((rows, cols), float("nan"))
    for i, row in enumerate(matrix):
        data[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    fig = Figure(figsize=(1.0 + 0.7 * max(cols, 3), 1.0 + 0.6 * max(rows, 3)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(data.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    fontsize = 9 if max(rows, cols) <= 10 else 6
    for i in range(rows):
        for j in range(cols):
            v = float(data[i, j])
            if v == v:  # not NaN
                ax.text(j, i, f"{100 * v:.1f}" if max(rows, cols) <= 10 else f"{100 * v:.0f}",
                        ha="center", va="center", fontsize=fontsize, color="black" if v > 0.6 else "white")
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.set_xlabel("test experience j")
    ax.set_ylabel("after training experience i")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    return fig


def plot_matrix(matrix: list[list[float]], path: str | Path, title: str | None = None) -> Path:
    """Writes the heatmap of :func:`matrix_figure` as a PNG."""
    path = Path(path)
    matrix_figure(matrix, title).savefig(path, dpi=100)
    return path


def matrix_image(matrix: list[list[float]], title: str | None = None) -> Any:
    """The heatmap of :func:`matrix_figure` as an RGB ``uint8`` numpy array (height, width, 3), for loggers."""
    import numpy as np

    fig = matrix_figure(matrix, title)
    fig.set_dpi(100)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
