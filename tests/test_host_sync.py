"""No host syncs from our code in naive and replay training steps, checked on CPU.

The steps run under :class:`cl_plugins.hostsync.SyncWindow`, which records every host read (``.item()``,
``bool(t)``, ``.tolist()``, ``.cpu()``, boolean-mask indexing, ``nonzero``...) made from ``callbacks/``,
``cl_plugins/`` or ``datamodules/``. Steps where per-step values are logged (Lightning's logging steps and the
last batch of each epoch) are left out: logged values are read there. The CUDA version, with
``torch.cuda.set_sync_debug_mode("error")``, is in ``tests/test_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from callbacks import ExperienceReplay
from callbacks.metrics import ContinualMetrics
from cl_plugins import ContinualClassifier
from cl_plugins.hostsync import SyncWindow
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs

#: the replay buffer keeps its samples in host memory by design: its copy of each batch is expected (on CUDA,
#: ``tests/test_gpu.py`` exempts the buffer's add/sample the same way)
ALLOWED = ("cl_plugins/buffers.py",)


def _train(tmp_path: Path, *callbacks: pl.Callback, scenario: str = "class") -> SyncWindow:
    window = SyncWindow(skip_logging_steps=True)
    pl.seed_everything(0, verbose=False)
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"hidden": 16},
                                lr=0.05)
    trainer = pl.Trainer(**quiet_trainer_kwargs(
        callbacks=[window, *callbacks, ContinualMetrics(plot=False), window.end], log_every_n_steps=1000,
        default_root_dir=tmp_path))
    trainer.fit(model, datamodule=SplitDigits(n_experiences=5, batch_size=32, scenario=scenario))
    return window


def _ours(window: SyncWindow) -> dict[str, int]:
    return {site: n for site, n in window.calls.items() if not site.startswith(ALLOWED)}


def test_naive_stream_steps_read_nothing_on_the_host(tmp_path):
    for scenario in ("class", "task"):  # task-IL: the logits are masked by the samples' task labels
        window = _train(tmp_path, scenario=scenario)
        assert window.steps > 20
        assert _ours(window) == {}, f"host reads from our code in training steps: {dict(window.calls)}"


def test_experience_replay_steps_read_nothing_on_the_host_but_the_buffer_copy(tmp_path):
    window = _train(tmp_path, ExperienceReplay(buffer_size=50, replay_batch_size=8))
    assert window.steps > 20
    assert _ours(window) == {}, f"host reads from our code in training steps: {dict(window.calls)}"


def test_the_window_sees_a_read_in_a_training_step():
    """Not blind: a batch hook whose code lives in the library (compiled with a library file's name, as our code
    would be) and reads the loss on the host every step is reported, once per counted step, by call site."""
    from cl_plugins import steplog

    namespace: dict[str, object] = {}
    source = "def read_loss(self, trainer, pl_module, outputs, batch, batch_idx):\n    outputs['loss'].item()\n"
    exec(compile(source, steplog.__file__, "exec"), namespace)
    reads = type("Reads", (pl.Callback,), {"on_train_batch_end": namespace["read_loss"]})
    window = SyncWindow(skip_logging_steps=True)
    pl.seed_everything(0, verbose=False)
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"hidden": 16})
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[window, reads(), window.end], log_every_n_steps=1000,
                                                limit_train_batches=6, limit_val_batches=0))
    trainer.fit(model, datamodule=SplitDigits(n_experiences=2, batch_size=32))
    assert window.steps == 2 * 5  # the last batch of each epoch is a logging step
    assert dict(window.calls) == {"cl_plugins/steplog.py:2 (read_loss)": window.steps}
