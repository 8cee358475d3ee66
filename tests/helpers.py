"""Small callbacks shared by the tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger

from callbacks import ContinualCallback
from tests.tolerances import EPS_BF16

COMPARED_STEPS = 5  # training steps of a mixed-precision run compared with the 32-true run


class StopAfter(ContinualCallback):
    """Stops the fit at the end of one experience, as a crash or a time limit would."""

    def __init__(self, experience: int) -> None:
        super().__init__()
        self.experience = experience

    def on_experience_end(self, trainer, pl_module, experience):
        if experience == self.experience:
            trainer.should_stop = True


class StepLosses(pl.Callback):
    """The training losses of the first ``COMPARED_STEPS`` steps; with ``stop`` it then stops the fit (schedules,
    e.g. k-FPF's phases, are still planned for the whole run, unlike with ``max_steps``)."""

    def __init__(self, stop: bool = False) -> None:
        self.losses: list[float] = []
        self.stop = stop

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if len(self.losses) < COMPARED_STEPS:
            self.losses.append(float(outputs["loss"]))
        elif self.stop:
            trainer.should_stop = True


def assert_losses_track_float32(mixed: list[float], float32: list[float]) -> None:
    """The first training losses of a bf16-mixed (or 16-mixed) run against the 32-true run of the same seed.

    The first step sees the same weights and batch: autocast rounds every matmul and convolution operand to 8
    significant bits, which moves the logits, and so the loss, by about eps_bf16 (2^-7) of their terms (logits and
    losses of size about 1 in these tests); each later step starts from weights that differ by about eps_bf16 of
    the updates. Over the first 5 steps the losses stay within eps_bf16 * max(1, loss) (measured on these tests:
    at most 0.16 of that). A term lost or mis-scaled under autocast moves them by far more.
    """
    assert len(mixed) == len(float32) > 0, (mixed, float32)
    for k, (got, want) in enumerate(zip(mixed, float32)):
        assert abs(got - want) <= EPS_BF16 * max(1.0, abs(want)), (k, mixed, float32)


class RecordingLogger(Logger):
    """A generic Lightning logger that keeps every ``log_metrics`` call: ``rows`` of ``(metrics, step)``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((dict(metrics), step))

    def values(self, key: str) -> dict[int, float]:
        """``{step: value}`` of ``key`` over the recorded rows."""
        return {step: m[key] for m, step in self.rows if key in m}
