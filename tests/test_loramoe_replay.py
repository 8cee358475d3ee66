"""LoRAMoE in a stream: knowledge-typed samples after the first experience come from replay; without them the
callback says so."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest

from callbacks.loramoe import LoRAMoE
from callbacks.replay import ExperienceReplay
from cl_plugins.models import ContinualClassifier
from datamodules.digits import SplitDigits
from tests.conftest import quiet_trainer_kwargs


def _vit() -> ContinualClassifier:
    return ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                               backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2),
                               optimizer="adam", lr=3e-3)


def _fit(callbacks: list[pl.Callback]) -> list[str]:
    pl.seed_everything(0)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=16)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, limit_train_batches=3, limit_val_batches=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_vit(), datamodule=dm)
    return [str(w.message) for w in caught if "knowledge-typed" in str(w.message)]


def test_without_replay_no_knowledge_typed_sample_follows_the_first_experience_and_the_callback_warns():
    moe = LoRAMoE(num_experts=4)
    messages = _fit([moe])
    # 3 batches of 16 per experience; classes of experience 0 are type 0, the others type 1
    assert moe.type_counts == {0: [48, 0], 1: [0, 48], 2: [0, 48], 3: [0, 48], 4: [0, 48]}
    assert len(messages) == 1 and "experience 1" in messages[0] and "ExperienceReplay" in messages[0]


@pytest.mark.parametrize("knowledge_experiences", [1, 2])
def test_with_replay_every_later_experience_trains_on_knowledge_typed_samples(knowledge_experiences):
    moe = LoRAMoE(num_experts=4, knowledge_experiences=knowledge_experiences)
    replay = ExperienceReplay(buffer_size=200, replay_batch_size=16)
    messages = _fit([moe, replay])
    counts = moe.type_counts
    assert counts[0] == [16 + 32 + 32, 0]  # nothing to replay in the first batch, then experience 0's own samples
    # later batches carry 16 replayed samples, of earlier experiences; with knowledge_experiences=2
    # experience 1's own samples are knowledge-typed too
    assert all(sum(counts[e]) == 96 and counts[e][0] > 0 for e in range(1, 5))
    if knowledge_experiences == 2:
        assert counts[1][0] >= 48
    assert messages == []
