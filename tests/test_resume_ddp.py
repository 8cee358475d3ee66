"""Under DDP each rank fills its own reservoir; a checkpoint keeps every rank's, so a 2-process run
stopped after experience 2 and resumed ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import pytest

from tests._subprocess import run_script

SCRIPT = """
import json, os, sys
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from callbacks import KFPF, ExperienceReplay
from callbacks.metrics import ContinualMetrics
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits
from tests.helpers import StopAfter

mode, root = sys.argv[1], sys.argv[2]
pl.seed_everything(0, verbose=False)
dm = SplitDigits(n_experiences=5, epochs_per_experience=2, batch_size=16)
model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, momentum=0.9, backbone_kwargs={"width": 8})
kfpf = KFPF(k=2, iterations=10, buffer_size=48, seed=1)
replay = ExperienceReplay(buffer_size=40, replay_batch_size=8)
metrics = ContinualMetrics(output_dir=os.path.join(root, mode, "out"), plot=False)
ckpt = ModelCheckpoint(dirpath=os.path.join(root, mode, "ckpt"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
callbacks = [kfpf, replay, metrics, ckpt] + ([StopAfter(1)] if mode == "stop" else [])
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
resume = os.path.join(root, "stop", "ckpt", "epoch=3.ckpt") if mode == "resume" else None
trainer.fit(model, datamodule=dm, ckpt_path=resume)

def digest(buffer):
    n = len(buffer)
    return {"num_seen": buffer.num_seen, "y": buffer.data["y"][:n].tolist(),
            "x_sum": float(buffer.data["x"][:n].double().sum())}

mine = {"replay": digest(replay.buffer), "kfpf": digest(kfpf.buffer)}
ranks = [None] * trainer.world_size
torch.distributed.all_gather_object(ranks, mine)
if trainer.global_rank == 0:
    weights = float(sum(p.detach().double().sum() for p in model.parameters()))
    with open(os.environ["RESULT_PATH"], "w") as f:
        json.dump({"ranks": ranks, "matrix": metrics.matrix, "epoch": trainer.current_epoch,
                   "weights": weights, "phases": kfpf.phases_done}, f)
"""


@pytest.mark.slow
def test_ddp_resume_restores_every_ranks_buffers_and_ends_like_the_uninterrupted_run(tmp_path):
    for sub in "abc":
        (tmp_path / sub).mkdir()
    full = run_script(SCRIPT, tmp_path / "a", args=["full", str(tmp_path)])
    stopped = run_script(SCRIPT, tmp_path / "b", args=["stop", str(tmp_path)])
    assert stopped["epoch"] == 4 and len(stopped["matrix"]) == 2
    resumed = run_script(SCRIPT, tmp_path / "c", args=["resume", str(tmp_path)])

    a, b = full["ranks"]
    assert a["replay"] != b["replay"] and a["kfpf"] != b["kfpf"], "each rank keeps its own buffers"
    assert resumed["ranks"] == full["ranks"]  # every rank resumed its own reservoir, not rank zero's
    assert resumed["matrix"] == full["matrix"] and len(full["matrix"]) == 5
    assert resumed["phases"] == full["phases"] == 2
    assert resumed["weights"] == full["weights"]


def test_own_rank_state_picks_this_ranks_part_and_warns_on_another_world_size(monkeypatch):
    from cl_plugins import rank_state

    saved = {rank_state.RANKS_KEY: [{"buffer": "rank0"}, {"buffer": "rank1"}]}
    monkeypatch.setattr(rank_state, "_world", lambda: (1, 2))
    assert rank_state.own_rank_state(saved, "ER") == {"buffer": "rank1"}
    monkeypatch.setattr(rank_state, "_world", lambda: (0, 1))
    assert rank_state.with_rank_states({"buffer": "one"}) == {"buffer": "one"}  # one process: unchanged format
    assert rank_state.own_rank_state({"buffer": "one"}, "ER") == {"buffer": "one"}
    with pytest.warns(UserWarning, match="state of 2 processes and this run has 1"):
        assert rank_state.own_rank_state(saved, "ER") == {"buffer": "rank0"}
