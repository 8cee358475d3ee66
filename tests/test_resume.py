"""Stop after experience 2, resume from the checkpoint, and end exactly where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import ExperienceReplay
from callbacks.metrics import ContinualMetrics
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StopAfter

MODELS = {
    "small_cnn": dict(backbone="small_cnn", backbone_kwargs={"width": 8}),
    # dropout draws from the global RNG, which the stream checkpoints
    "mlp_dropout": dict(backbone="mlp", input_shape=(1, 8, 8), backbone_kwargs={"dropout": 0.3, "hidden": 64}),
}


def _run(tmp: Path, arch: str, stop_after: int | None = None, ckpt_path: str | None = None):
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=2, batch_size=32)
    model = ContinualClassifier(num_classes=10, lr=0.05, momentum=0.9, **MODELS[arch])
    replay = ExperienceReplay(buffer_size=64, replay_batch_size=8)
    metrics = ContinualMetrics(output_dir=str(tmp / "out"), plot=False)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    callbacks = [replay, metrics, ckpt]
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, enable_checkpointing=True,
                                                default_root_dir=tmp))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, replay, metrics


@pytest.mark.parametrize("arch", list(MODELS))
def test_resume_after_experience_two_matches_uninterrupted_run(tmp_path, arch):
    _, model_u, replay_u, metrics_u = _run(tmp_path / "full", arch)

    trainer_a, _, _, metrics_a = _run(tmp_path / "stopped", arch, stop_after=1)
    assert trainer_a.current_epoch == 4 and len(metrics_a.matrix) == 2  # stopped after experience 2
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=3.ckpt"
    assert ckpt.exists()

    trainer_b, model_b, replay_b, metrics_b = _run(tmp_path / "resumed", arch, ckpt_path=str(ckpt))
    assert trainer_b.current_epoch == 10
    assert metrics_b.matrix == metrics_u.matrix
    assert len(metrics_b.matrix) == 5
    for key, value in replay_u.buffer.data.items():
        assert torch.equal(replay_b.buffer.data[key], value), key
    assert replay_b.buffer.num_seen == replay_u.buffer.num_seen
    for (name, p_u), p_b in zip(model_u.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(p_b, p_u, rtol=0, atol=0, msg=name)
