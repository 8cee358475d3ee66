"""The stream datamodule: experience boundaries, trainer checks, per-experience fits, bad input."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from callbacks import ContinualCallback
from cl_plugins import ContinualClassifier
from datamodules import ContinualDataModule, SplitDigits, StreamConfigError
from datamodules.common import split_benchmark
from tests.conftest import quiet_trainer_kwargs
from tests.tolerances import FLOAT64_TOL


class Recorder(ContinualCallback):
    """Records experience hooks and the classes each training epoch sees."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int, int]] = []
        self.epoch_classes: dict[int, set[int]] = {}

    def on_experience_start(self, trainer, pl_module, experience):
        self.events.append(("start", experience, trainer.current_epoch))

    def on_experience_end(self, trainer, pl_module, experience):
        self.events.append(("end", experience, trainer.current_epoch))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epoch_classes.setdefault(trainer.current_epoch, set()).update(batch[1].tolist())


def _fit(dm, callbacks=(), model=None, **trainer_kw):
    model = model or ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), lr=0.05)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=list(callbacks), **trainer_kw))
    trainer.fit(model, datamodule=dm)
    return trainer, model


def test_each_epoch_sees_its_experience_and_hooks_fire():
    dm = SplitDigits(n_experiences=5, epochs_per_experience=2, batch_size=64)
    rec = Recorder()
    trainer, _ = _fit(dm, [rec], limit_val_batches=1)
    assert trainer.max_epochs == 10  # set from the stream
    for epoch, classes in rec.epoch_classes.items():
        assert classes == set(dm.classes_in_experience[epoch // 2]), epoch
    starts = [(e, ep) for kind, e, ep in rec.events if kind == "start"]
    ends = [(e, ep) for kind, e, ep in rec.events if kind == "end"]
    assert starts == [(i, 2 * i) for i in range(5)]
    assert ends == [(i, 2 * i + 1) for i in range(5)]


def test_stream_properties_and_scenarios():
    dm = SplitDigits(n_experiences=5)
    assert dm.num_experiences == 5 and dm.num_classes == 10 and dm.scenario == "class"
    assert dm.classes_in_experience == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert dm.task_labels == [(0,)] * 5
    x, y, t = next(iter(dm.val_dataloader()[3]))
    assert x.shape[1:] == (1, 8, 8) and set(y.tolist()) <= {6, 7} and t.eq(0).all()
    task = SplitDigits(n_experiences=5, scenario="task")
    assert task.scenario == "task" and task.task_labels == [(i,) for i in range(5)]
    info = task.experience_info(2)
    assert info.classes == (4, 5) and info.task_labels == (2,) and info.num_train_samples > 200


def test_task_incremental_masks_logits_to_the_task():
    dm = SplitDigits(n_experiences=5, scenario="task", epochs_per_experience=1, batch_size=64)
    trainer, model = _fit(dm, limit_val_batches=2)
    logits = torch.zeros(3, 10)
    masked = model.masked_logits(logits, torch.tensor([0, 2, 4]), evaluation=True)
    allowed = masked > torch.finfo(masked.dtype).min
    assert allowed[0].nonzero().flatten().tolist() == [0, 1]
    assert allowed[1].nonzero().flatten().tolist() == [4, 5]
    assert allowed[2].nonzero().flatten().tolist() == [8, 9]
    # with the task mask, an untrained task-IL model is ~50% right on each 2-class task
    acc = [float(trainer.callback_metrics[f"val/acc_exp{j}"]) for j in range(5)]
    assert min(acc) > 0.4


def test_max_epochs_that_disagree_with_the_stream_fail_clearly():
    dm = SplitDigits(n_experiences=5, epochs_per_experience=2)
    with pytest.raises(StreamConfigError, match=r"max_epochs=7.*= 10 epochs"):
        _fit(dm, max_epochs=7)


def test_per_experience_fit_loop_fires_hooks_for_each_experience():
    dm = SplitDigits(n_experiences=5, epochs_per_experience=2, batch_size=128)
    rec = Recorder()
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8))
    for i in range(3):
        dm.set_experience(i)
        rec.epoch_classes = {}
        _fit(dm, [rec], model=model, limit_val_batches=1)
        assert rec.epoch_classes == {0: {2 * i, 2 * i + 1}, 1: {2 * i, 2 * i + 1}}
    assert [(k, e) for k, e, _ in rec.events] == [
        ("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2)
    ]


def test_empty_experience_and_bad_arguments():
    x = torch.randn(40, 4)
    y = torch.arange(40) % 4
    bm = split_benchmark(x, y, x, y, n_experiences=2, class_order=[0, 1, 2, 3])
    exps = list(bm.train_stream)
    empty = SimpleNamespace(dataset=exps[1].dataset.subset([]), classes_in_this_experience=[2, 3], task_labels=[0])
    dm = ContinualDataModule(benchmark=SimpleNamespace(train_stream=[exps[0], empty], test_stream=bm.test_stream))
    with pytest.raises(StreamConfigError, match="training experience 1 is empty"):
        _ = dm.num_experiences
    with pytest.raises(StreamConfigError, match="does not divide"):
        split_benchmark(x, y, x, y, n_experiences=3)
    with pytest.raises(StreamConfigError, match="epochs_per_experience"):
        ContinualDataModule(benchmark=bm, epochs_per_experience=0)
    with pytest.raises(StreamConfigError, match="has no train_stream"):
        _ = ContinualDataModule(benchmark=object()).num_experiences
    with pytest.raises(StreamConfigError, match="needs an Avalanche benchmark"):
        _ = ContinualDataModule().num_experiences


def test_unknown_timm_model_and_too_few_outputs():
    with pytest.raises(ValueError, match="unknown timm model 'resnet1888'.*resnet18"):
        ContinualClassifier("timm:resnet1888")
    with pytest.raises(ValueError, match="unknown backbone"):
        ContinualClassifier("alexnet-9000")
    dm = SplitDigits(n_experiences=5)
    with pytest.raises(ValueError, match="has 4 outputs but the stream has 10 classes"):
        _fit(dm, model=ContinualClassifier("mlp", num_classes=4, input_shape=(1, 8, 8)))


def test_callbacks_without_a_stream_datamodule_fail_clearly():
    dm = SplitDigits(n_experiences=5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8))
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[Recorder()], max_epochs=1))
    with pytest.raises(TypeError, match="ContinualDataModule"):
        trainer.fit(model, train_dataloaders=loader)


def test_nan_loss_raises_with_advice():
    dm = SplitDigits(n_experiences=5)
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), lr=1e30)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        _fit(dm, model=model, limit_val_batches=0)


def test_one_process_draws_the_global_batches_of_ddp():
    # DDP on W ranks with batch B deals out the same permutation round-robin: global step k trains on
    # the samples one process with batch W*B trains on at step k
    from torch.utils.data import DistributedSampler

    from datamodules.stream import _EpochSeededSampler

    n, seed, epoch, batch, world = 203, 3, 2, 4, 2
    single = list(_EpochSeededSampler(n, seed, epoch))
    assert sorted(single) == list(range(n)) and single != list(range(n))
    ranks = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
    for k in range(n // (world * batch)):
        union = sorted(i for r in ranks for i in r[k * batch:(k + 1) * batch])
        assert union == sorted(single[k * world * batch:(k + 1) * world * batch])


DDP_STEPS_SCRIPT = """
import json, os, sys
import lightning.pytorch as pl
import torch
from cl_plugins import ContinualClassifier
from datamodules import SplitDigits

pl.seed_everything(0)
dm = SplitDigits(n_experiences=5, epochs_per_experience=2, batch_size=16, seed=1)
model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), lr=0.1)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False, precision="64-true",
                     enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
trainer.fit(model, datamodule=dm)
if trainer.global_rank == 0:
    path = os.path.join(os.path.dirname(os.environ["RESULT_PATH"]), "ddp.pt")
    torch.save(model.state_dict(), path)
    json.dump({"weights": path}, open(os.environ["RESULT_PATH"], "w"))
"""


@pytest.mark.slow
def test_ddp_two_processes_take_the_same_steps_as_one_process_with_twice_the_batch(tmp_path):
    from tests._subprocess import run_script

    result = run_script(DDP_STEPS_SCRIPT, tmp_path)
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=2, batch_size=32, seed=1)
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), lr=0.1)
    start = {k: v.double() for k, v in model.state_dict().items()}
    pl.Trainer(**quiet_trainer_kwargs(max_steps=8, precision="64-true")).fit(model, datamodule=dm)
    ddp = torch.load(result["weights"])
    # in float64: the two runs average the same per-sample gradients in another order (the mean of 32 against the
    # mean of two means of 16), which float64 rounding, even amplified over 8 steps, keeps far below 1e-9
    for name, w in model.state_dict().items():
        assert w.dtype == ddp[name].dtype == torch.float64, name
        assert (w - start[name]).abs().max() > 1e-3, name  # every tensor moved over the 8 steps ...
        torch.testing.assert_close(w, ddp[name], **FLOAT64_TOL, msg=name)  # ... and the same way on 2 processes
