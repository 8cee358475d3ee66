"""OnlineEWC under DDP (2 CPU processes, gloo): every rank ends each experience with the same Fisher,
the one of the whole experience's data (not of its own shard), and the replicas stay identical while
the penalty trains them."""

from __future__ import annotations

import pytest

from tests._subprocess import run_script

SCRIPT = """
import json, os
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from callbacks import OnlineEWC
from cl_plugins import ContinualClassifier
from cl_plugins.baselines import empirical_fisher
from datamodules import SplitDigits
from tests.helpers import StopAfter


class WholeExperienceFisher(pl.Callback):
    # after OnlineEWC: the Fisher of the experience's full training set, in one process, at the same weights
    def __init__(self, ewc):
        self.ewc, self.previous, self.rel_err, self.counts = ewc, None, [], []

    def on_train_epoch_end(self, trainer, pl_module):
        dm = trainer.datamodule
        if not dm.is_experience_end(trainer.current_epoch):
            return
        exp = dm.experience_at_epoch(trainer.current_epoch)
        data = dm.train_dataset(exp)
        keep = torch.zeros(10, dtype=torch.bool)
        keep[list(dm.classes_in_experience[exp])] = True
        batches = [(x, y, keep.expand(len(y), 10)) for x, y, _ in DataLoader(data, batch_size=64)]
        pl_module.eval()
        sums, n = empirical_fisher(pl_module, dict(pl_module.named_parameters()), batches)
        pl_module.train()
        self.counts.append(n)
        err = 0.0
        for name, s in sums.items():
            new = self.ewc.fisher[name] - (0 if self.previous is None else self.previous[name])  # gamma = 1
            err = max(err, float((new - s / n).abs().max() / (s / n).abs().max()))
        self.rel_err.append(err)
        self.previous = {k: v.clone() for k, v in self.ewc.fisher.items()}


pl.seed_everything(0, verbose=False)
dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=16, scenario="task")
model = ContinualClassifier(num_classes=10, lr=0.1, backbone="mlp", input_shape=(1, 8, 8),
                            backbone_kwargs={"hidden": 32})
ewc = OnlineEWC(e_lambda=50.0, gamma=1.0)
check = WholeExperienceFisher(ewc)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                     callbacks=[ewc, check, StopAfter(1)])
trainer.fit(model, datamodule=dm)

flat_fisher = torch.cat([f.reshape(-1) for f in ewc.fisher.values()])
flat_params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
fishers = [torch.zeros_like(flat_fisher) for _ in range(2)]
params = [torch.zeros_like(flat_params) for _ in range(2)]
torch.distributed.all_gather(fishers, flat_fisher)
torch.distributed.all_gather(params, flat_params)
if trainer.global_rank == 0:
    with open(os.environ["RESULT_PATH"], "w") as f:
        json.dump({"rel_err": check.rel_err, "counts": check.counts,
                   "sizes": [len(dm.train_dataset(e)) for e in (0, 1)],
                   "fisher_equal": bool(torch.equal(fishers[0], fishers[1])),
                   "params_equal": bool(torch.equal(params[0], params[1])),
                   "consolidations": ewc.consolidations, "world": trainer.world_size,
                   "penalty": float(trainer.callback_metrics["ewc/penalty"])}, f)
"""


@pytest.mark.slow
def test_ddp_fisher_is_the_whole_experiences_and_identical_on_every_rank(tmp_path):
    out = run_script(SCRIPT, tmp_path, timeout=300)
    assert out["world"] == 2 and out["consolidations"] == 2
    assert out["counts"] == out["sizes"]  # the reference covers each experience's full training set
    assert out["fisher_equal"] and out["params_equal"]
    # each rank summed its half, then both halves were all-reduced: equal up to float32 summation order
    assert max(out["rel_err"]) < 1e-5, out["rel_err"]
    assert out["penalty"] > 0
