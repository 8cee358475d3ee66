"""Finding host synchronizations in training steps, on any device (the CPU included).

On an accelerator, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``,
boolean-mask indexing, ``nonzero``...) makes the host wait for the device's queue. On the CPU nothing waits, so
such reads go unnoticed until a GPU run is slow. :class:`HostSyncCounter` records them by call site while
active; :class:`SyncWindow` runs it around chosen training steps of a ``fit``. ``torch.cuda.set_sync_debug_mode``
is the CUDA-only counterpart (``tests/test_gpu.py``).
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cl_plugins.steplog import log_this_step

#: ATen operators whose result depends on a tensor's values on the host (a device synchronization on a GPU)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive",
                      "unique_dim", "masked_select", "equal", "repeat_interleave"})
#: Python-level tensor methods that copy to the host (invisible to the dispatcher on CPU tensors)
SYNC_METHODS = ("tolist", "numpy", "cpu")
#: the repository holding this package, and its library folders (not tests, examples or a virtual environment)
REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("cl_plugins", "callbacks", "datamodules")
_THIS = Path(__file__).resolve()


def _library_frame(library: tuple[str, ...]) -> str | None:
    """``path:line (function)`` of the innermost stack frame in ``library``'s folders (this file's own frames
    left out), if any."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path != _THIS and path.is_relative_to(REPO):
            rel = path.relative_to(REPO)
            if rel.parts[0] in library:
                return f"{rel.as_posix()}:{frame.lineno} ({frame.name})"
    return None


class HostSyncCounter(TorchDispatchMode):
    """Records every host synchronization made from the library's code while active (a context manager).

    An ATen call of :data:`SYNC_OPS` or an indexing with a boolean mask (which calls ``nonzero``), and a call of
    a :data:`SYNC_METHODS` tensor method, count when a stack frame of ``library`` (default :data:`LIBRARY`) is on
    the stack; :attr:`calls` maps the innermost such frame to a count. Calls made only by PyTorch, Lightning and
    the like are not counted.
    """

    def __init__(self, library: tuple[str, ...] = LIBRARY) -> None:
        super().__init__()
        self.library = library
        self.calls: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    def _record(self) -> None:
        where = _library_frame(self.library)
        if where is not None:
            self.calls[where] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        masked = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))
        if name in SYNC_OPS or masked:
            self._record()
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostSyncCounter:
        for method in SYNC_METHODS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def wrapped(t: torch.Tensor, *a: Any, _original: Any = original, **k: Any) -> Any:
                self._record()
                return _original(t, *a, **k)

            setattr(torch.Tensor, method, wrapped)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()
        super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


class SyncWindow(pl.Callback):
    """Counts the host syncs of training steps, from ``on_train_batch_start`` to ``on_train_batch_end``.

    Put it first in ``callbacks=[...]`` and its :attr:`end` last, so every callback's batch hooks fall inside.
    The first ``warmup`` steps are left out, and with ``skip_logging_steps`` the steps where per-step values are
    logged (:func:`cl_plugins.steplog.log_this_step`: logged values are read on the host there, as Lightning
    reads them). :attr:`calls` sums the counts by call site, :attr:`steps` the steps counted.
    """

    def __init__(self, warmup: int = 0, skip_logging_steps: bool = False, library: tuple[str, ...] = LIBRARY) -> None:
        self.warmup = warmup
        self.skip_logging_steps = skip_logging_steps
        self.library = library
        self.seen = 0
        self.steps = 0
        self.calls: Counter[str] = Counter()
        self._counter: HostSyncCounter | None = None
        self.end = _SyncWindowEnd(self)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.seen += 1
        if self.seen <= self.warmup or (self.skip_logging_steps and log_this_step(trainer, batch_idx)):
            return
        self._counter = HostSyncCounter(self.library).__enter__()

    def stop(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.calls.update(self._counter.calls)
            self.steps += 1
            self._counter = None


class _SyncWindowEnd(pl.Callback):
    def __init__(self, window: SyncWindow) -> None:
        self.window = window

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.window.stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.window.stop()
