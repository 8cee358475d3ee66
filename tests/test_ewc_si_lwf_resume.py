"""OnlineEWC, SynapticIntelligence and LwF: a run stopped and resumed from its checkpoint ends exactly
where the uninterrupted run ends (weights, the callback's state)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import LwF, OnlineEWC, SynapticIntelligence
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StopAfter

# dropout draws from the global RNG and momentum keeps optimizer state: both must resume too
MODEL = dict(backbone="mlp", input_shape=(1, 8, 8), backbone_kwargs={"hidden": 32, "dropout": 0.2}, momentum=0.9)
CASES = {
    "ewc": (lambda: OnlineEWC(e_lambda=50.0, gamma=0.9), "task"),
    "si": (lambda: SynapticIntelligence(c=1.0, xi=0.5), "class"),
    "lwf": (lambda: LwF(alpha=1.0, warmup_epochs=1), "class"),
}


def _run(tmp: Path, case: str, stop_after: int | None = None, ckpt_path: Path | None = None):
    make, scenario = CASES[case]
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=2, batch_size=32, scenario=scenario)
    model = ContinualClassifier(num_classes=10, lr=0.05, **MODEL)
    cb = make()
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    callbacks = [cb, ckpt] + ([StopAfter(stop_after)] if stop_after is not None else [])
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp))
    trainer.fit(model, datamodule=dm, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return trainer, model, cb


def _state(cb) -> dict[str, torch.Tensor]:
    if isinstance(cb, LwF):
        return {f"old.{k}": v for k, v in cb.old_model.state_dict().items()}
    out = {f"anchor.{k}": v for k, v in cb.anchors.items()} | {f"importance.{k}": v for k, v in cb.importance.items()}
    if isinstance(cb, SynapticIntelligence):
        out |= {f"omega.{k}": v for k, v in cb.omega.items()}
    return out


def _assert_same(model_a, cb_a, model_b, cb_b) -> None:
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    state_a, state_b = _state(cb_a), _state(cb_b)
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        torch.testing.assert_close(state_b[key].to(value.device), value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_stop_after_an_experience_and_resume_matches_the_uninterrupted_run(tmp_path, case):
    trainer_u, model_u, cb_u = _run(tmp_path / "full", case)
    assert trainer_u.current_epoch == 10

    trainer_s, _, cb_s = _run(tmp_path / "stopped", case, stop_after=1)
    assert trainer_s.current_epoch == 4
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=3.ckpt"
    assert ckpt.exists()
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert any(type(cb_s).__name__ in key for key in state), list(state)

    trainer_r, model_r, cb_r = _run(tmp_path / "resumed", case, ckpt_path=ckpt)
    assert trainer_r.current_epoch == 10
    _assert_same(model_u, cb_u, model_r, cb_r)
    if case != "lwf":
        assert cb_r.consolidations == cb_u.consolidations == 5


@pytest.mark.parametrize("case", list(CASES))
def test_resume_mid_experience_matches_the_uninterrupted_run(tmp_path, case):
    """From the checkpoint after the first epoch of experience 1: SI's omega is half accumulated there, and
    LwF must distil from the restored old model without its experience-start hook running again."""
    _, model_u, cb_u = _run(tmp_path / "full", case)
    ckpt = tmp_path / "full" / "ckpt" / "epoch=2.ckpt"
    if case == "si":
        saved = torch.load(ckpt, weights_only=False)["callbacks"]
        (si_state,) = [v for k, v in saved.items() if "SynapticIntelligence" in k]
        assert any(float(w.abs().sum()) > 0 for w in si_state["omega"].values())
    trainer_r, model_r, cb_r = _run(tmp_path / "resumed", case, ckpt_path=ckpt)
    _assert_same(model_u, cb_u, model_r, cb_r)
