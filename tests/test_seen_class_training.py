"""``train_on_seen_classes``: class-IL training restricted to the classes seen so far (mammoth's ``lwf.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from cl_plugins import ContinualClassifier
from datamodules import SplitDigits


class _AtExperience1(SplitDigits):
    current_experience = 1  # what a Trainer in experience 1 would report


def _model_at(**kwargs) -> tuple[ContinualClassifier, SplitDigits]:
    dm = _AtExperience1(n_experiences=5, scenario="class")
    model = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), **kwargs)
    model._trainer = SimpleNamespace(datamodule=dm)  # what the mixin reads the stream from
    return model, dm


def test_training_masks_to_the_seen_classes_only_when_asked_and_evaluation_is_unchanged():
    logits = torch.arange(30, dtype=torch.float32).reshape(3, 10) / 7
    y = torch.tensor([0, 2, 3])  # experience 1 holds 2 and 3; 0 was seen in experience 0
    plain, _ = _model_at()
    assert torch.equal(plain.masked_logits(logits, torch.zeros(3), evaluation=False), logits)

    seen, dm = _model_at(train_on_seen_classes=True)
    masked = seen.masked_logits(logits, torch.zeros(3), evaluation=False)
    allowed = (masked > torch.finfo(masked.dtype).min)[0].nonzero().flatten().tolist()
    assert [sorted(c) for c in dm.classes_in_experience[:2]] == [[0, 1], [2, 3]]
    assert allowed == [0, 1, 2, 3]
    # the loss is the cross-entropy of the softmax over those four outputs, computed by hand in float64
    kept = logits.double()[:, [0, 1, 2, 3]]
    expected = -(kept.gather(1, y[:, None]).squeeze(1) - kept.logsumexp(dim=1)).mean()
    assert abs(float(F.cross_entropy(masked.double(), y)) - float(expected)) < 1e-12

    # evaluation masks to the seen classes either way; mask_unseen_classes does not switch the training mask off
    assert torch.equal(seen.masked_logits(logits, torch.zeros(3), evaluation=True),
                       plain.masked_logits(logits, torch.zeros(3), evaluation=True))
    seen.mask_unseen_classes = False
    assert torch.equal(seen.masked_logits(logits, torch.zeros(3), evaluation=False), masked)
    assert torch.equal(seen.masked_logits(logits, torch.zeros(3), evaluation=True), logits)
