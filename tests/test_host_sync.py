"""No host syncs from our code in a training step, checked on CPU.

On an accelerator, reading a device value on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``,
a data-dependent shape such as ``t[mask]`` or ``nonzero``) makes the host wait for the device. On CPU nothing
waits, so the test marks the batch as "on the device": its tensors become :class:`OnDevice`, a subclass that
every operation propagates to its results (activations, logits, the loss), and a host read of one from the
files of ``callbacks/``, ``cl_plugins/`` or ``datamodules/`` during a training step is recorded. Steps where
Lightning writes step metrics (and the last batch of each epoch) are left out: logged values are read there.
The CUDA version, with ``torch.cuda.set_sync_debug_mode("error")``, is in ``tests/test_gpu.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from callbacks import ExperienceReplay
from callbacks.metrics import ContinualMetrics
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
OURS = tuple(str(ROOT / pkg) + "/" for pkg in ("callbacks", "cl_plugins", "datamodules"))
TORCH = str(Path(torch.__file__).parent) + "/"

#: reads of a device tensor's values on the host, by the method's name
HOST_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "cpu", "nonzero",
              "unique", "unique_consecutive", "masked_select", "argwhere"}
#: the replay buffer stores its samples in host memory by design: the copy of each batch to it is expected
#: (a D2H copy per step; on CUDA, ``tests/test_gpu.py`` exempts the buffer's add/sample the same way)
ALLOWED = {("cl_plugins/buffers.py", "cpu")}


class Recorder:
    def __init__(self) -> None:
        self.active = False
        self.reads: list[tuple[str, int, str, str]] = []


RECORDER = Recorder()


def _caller() -> tuple[str, int, str] | None:
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(OURS):
        return None
    return frame.f_code.co_filename[len(str(ROOT)) + 1:], frame.f_lineno, frame.f_code.co_name


def _is_host_read(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    name = getattr(func, "__name__", "")
    if name in HOST_READS:
        return name
    if name == "to":
        target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        if target is not None and torch.device(target).type == "cpu":
            return "cpu"
    if name == "__getitem__" and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
            return "boolean indexing"
    return None


class OnDevice(torch.Tensor):
    """A CPU tensor standing for a device tensor: host reads of it from our code are recorded."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if RECORDER.active:
            kind = _is_host_read(func, args, kwargs)
            if kind is not None:
                where = _caller()
                if where is not None and (where[0], kind) not in ALLOWED:
                    RECORDER.reads.append((*where, kind))
        return super().__torch_function__(func, types, args, kwargs)


class MarkBatchOnDevice(pl.Callback):
    """First callback: turns the batch into :class:`OnDevice` tensors and starts recording (except at the
    steps where logged values are read); :attr:`end` (last callback) stops it."""

    def __init__(self) -> None:
        self.steps = 0
        self.end = _StopRecording()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for i, t in enumerate(batch):
            batch[i] = t.as_subclass(OnDevice)
        logging_step = (trainer.global_step + 1) % trainer.log_every_n_steps == 0
        last = batch_idx + 1 >= trainer.num_training_batches
        RECORDER.active = not (logging_step or last)
        self.steps += RECORDER.active


class _StopRecording(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RECORDER.active = False


def _train(tmp_path: Path, *callbacks: pl.Callback, scenario: str = "class") -> int:
    RECORDER.reads.clear()
    mark = MarkBatchOnDevice()
    pl.seed_everything(0, verbose=False)
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"hidden": 16},
                                lr=0.05)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[mark, *callbacks, ContinualMetrics(plot=False), mark.end],
                                                log_every_n_steps=1000, default_root_dir=tmp_path))
    try:
        trainer.fit(model, datamodule=SplitDigits(n_experiences=5, batch_size=32, scenario=scenario))
    finally:
        RECORDER.active = False
    return mark.steps


def _report() -> str:
    return "host reads from our code in training steps:\n" + "\n".join(
        f"  {path}:{line} in {fn}: {kind}" for path, line, fn, kind in sorted(set(RECORDER.reads)))


def test_naive_stream_steps_read_nothing_on_the_host(tmp_path):
    for scenario in ("class", "task"):  # task-IL: the logits are masked by the samples' task labels
        steps = _train(tmp_path, scenario=scenario)
        assert steps > 20
        assert not RECORDER.reads, _report()


def test_experience_replay_steps_read_nothing_on_the_host_but_the_buffer_copy(tmp_path):
    steps = _train(tmp_path, ExperienceReplay(buffer_size=50, replay_batch_size=8))
    assert steps > 20
    assert not RECORDER.reads, _report()


def test_the_check_sees_a_read_from_our_code():
    RECORDER.reads.clear()
    RECORDER.active = True
    try:
        _read_from_our_package(torch.ones(3).as_subclass(OnDevice))
        torch.ones(3).as_subclass(OnDevice).sum().item()  # from a test file: not ours, not recorded
    finally:
        RECORDER.active = False
    assert [(path, kind) for path, _, _, kind in RECORDER.reads] == [("cl_plugins/steplog.py", "item")]


def _read_from_our_package(t: torch.Tensor) -> None:
    """Runs ``t.sum().item()`` with a frame of ``cl_plugins/steplog.py`` as the caller, as our code would."""
    from cl_plugins import steplog

    code = compile("t.sum().item()", steplog.__file__, "eval")
    eval(code, {"t": t})
