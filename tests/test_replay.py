"""Reservoir buffer and the experience-replay / joint baselines."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from callbacks import ExperienceReplay, JointTraining
from cl_plugins import ContinualClassifier
from cl_plugins.buffers import ReservoirBuffer
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs


def test_reservoir_keeps_each_sample_with_probability_capacity_over_n():
    n, capacity, trials = 20, 5, 4000
    counts = torch.zeros(n)
    for seed in range(trials):
        buf = ReservoirBuffer(capacity, seed=seed)
        buf.add(torch.arange(n).float().unsqueeze(1), torch.arange(n), torch.zeros(n))
        counts[buf.data["y"]] += 1
    freq = counts / trials
    # every sample is kept with probability 5/20 = 0.25 (binomial std ~ 0.007)
    assert torch.allclose(freq, torch.full((n,), 0.25), atol=0.03), freq


def test_reservoir_fills_first_then_replaces_and_round_trips():
    buf = ReservoirBuffer(4, seed=0, store_logits=True)
    buf.add(torch.ones(3, 2), torch.tensor([1, 2, 3]), torch.zeros(3), logits=torch.randn(3, 5))
    assert len(buf) == 3 and buf.data["y"][:3].tolist() == [1, 2, 3]
    buf.add(torch.ones(10, 2), torch.arange(10, 20), torch.ones(10), logits=torch.randn(10, 5))
    assert len(buf) == 4 and buf.num_seen == 13
    clone = ReservoirBuffer(4, seed=123, store_logits=True)
    clone.load_state_dict(buf.state_dict())
    a, b = buf.sample(3), clone.sample(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(8).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="pass logits"):
        buf.add(torch.ones(1, 2), torch.tensor([1]), torch.zeros(1))
    with pytest.raises(RuntimeError, match="empty"):
        ReservoirBuffer(2).sample(1)


class BatchSize(pl.Callback):
    def __init__(self):
        self.sizes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append((len(batch[1]), sorted(set(batch[1].tolist()))))


def _final_accuracy(callbacks, seed=0):
    torch.manual_seed(seed)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=3, batch_size=32)
    model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 16})
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks))
    trainer.fit(model, datamodule=dm)
    accs = [float(trainer.callback_metrics[f"val/acc_exp{j}"]) for j in range(5)]
    return sum(accs) / 5, trainer


def test_replay_extends_batches_and_reduces_forgetting():
    sizes = BatchSize()
    replay = ExperienceReplay(buffer_size=200, replay_batch_size=16)
    acc_replay, _ = _final_accuracy([replay, sizes])
    acc_naive, _ = _final_accuracy([])
    # first batch has no memory yet; later batches carry 16 replayed samples, from old classes too
    assert sizes.sizes[0][0] == 32 and sizes.sizes[1][0] == 48
    assert set(sizes.sizes[-1][1]) - {8, 9}, "the last experience's batches replay old classes"
    assert len(replay.buffer) == 200 and set(replay.buffer.data["y"].tolist()) == set(range(10))
    assert acc_naive < 0.35 and acc_replay > acc_naive + 0.25, (acc_naive, acc_replay)


def test_joint_training_is_one_phase_over_all_data():
    sizes = BatchSize()
    acc, trainer = _final_accuracy([JointTraining(), sizes])
    assert trainer.max_epochs == 3  # one phase of epochs_per_experience
    assert set().union(*[set(c) for _, c in sizes.sizes]) == set(range(10))
    assert acc > 0.6  # naive ends near 0.2 on this stream


def test_replay_rejects_tuple_batches():
    replay = ExperienceReplay(buffer_size=4)
    with pytest.raises(TypeError, match="list"):
        replay.on_train_batch_start(None, None, (torch.ones(2), torch.ones(2), torch.ones(2)), 0)


def test_buffer_tags_experiences_and_samples_under_a_mask():
    buf = ReservoirBuffer(6, seed=0)
    buf.add(torch.zeros(3, 2), torch.tensor([0, 1, 0]), torch.zeros(3), experience=0)
    buf.add(torch.ones(3, 2), torch.tensor([2, 3, 2]), torch.zeros(3), experience=1)
    assert buf.data["e"].tolist() == [0, 0, 0, 1, 1, 1]
    for _ in range(5):
        batch = buf.sample(10, where=buf.data["e"] < 1)
        assert sorted(batch["y"].tolist()) == [0, 0, 1]
    with pytest.raises(ValueError, match="every batch or for none"):
        buf.add(torch.ones(1, 2), torch.tensor([4]), torch.zeros(1))
    with pytest.raises(RuntimeError, match="no buffer sample"):
        buf.sample(2, where=torch.zeros(6, dtype=torch.bool))


class ReplayedClasses(pl.Callback):
    """Batch size and classes of the last 16 rows (the replayed part) of each batch; put it after
    ExperienceReplay(replay_batch_size=16)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        exp = trainer.datamodule.current_experience
        self.seen.append((exp, len(batch[1]), set(batch[1][-16:].tolist())))


def test_past_only_replay_never_replays_the_current_experience():
    seen = ReplayedClasses()
    replay = ExperienceReplay(buffer_size=200, replay_batch_size=16, past_only=True)
    acc, trainer = _final_accuracy([replay, seen])
    dm = trainer.datamodule
    assert all(n <= 32 for exp, n, _ in seen.seen if exp == 0)  # nothing to replay in the first experience
    for exp, n, classes in seen.seen:
        if exp > 0:
            assert n > 16 and not classes & set(dm.classes_in_experience[exp]), (exp, n, classes)
    assert set(replay.buffer.data["e"].tolist()) == set(range(5))  # the reservoir still takes everything
    assert acc > 0.5
