"""DR-Tune's error paths: each error says what was wrong and how to fix it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from callbacks.drtune import DRTune
from cl_plugins import ContinualClassifier
from cl_plugins.drtune import DistributionRegularizer, DRTuneTap, FeatureBank, FrozenEncoder, head_linear
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs


def _fit(dr: DRTune, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    kwargs = dict(limit_train_batches=1, limit_val_batches=0) | trainer_kwargs
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[dr], **kwargs))
    trainer.fit(model, datamodule=dm)
    return trainer


def test_head_without_a_linear_layer():
    with pytest.raises(ValueError, match=r"the head \(BatchNorm2d\) has no nn.Linear: DR-Tune reads the class "
                                         r"prototypes .* head_name="):
        _fit(DRTune(head_name="net.bn1"))
    with pytest.raises(ValueError, match="has no nn.Linear"):
        head_linear(nn.Sequential(nn.ReLU(), nn.Identity()))


def test_bank_smaller_than_the_number_of_classes():
    with pytest.raises(ValueError, match=r"class-balanced bank of 5 rows cannot give each of the 10 classes a slot: "
                                         r"set bank_size >= 10"):
        _fit(DRTune(bank_size=5))
    with pytest.raises(ValueError, match="bank_size must be >= 1, got 0"):
        DRTune(bank_size=0)


def test_bad_encoder():
    with pytest.raises(ValueError, match=r"encoder='body' is not a submodule of ContinualClassifier: name the "
                                         r"submodule .* top-level submodules: \['net'\]"):
        _fit(DRTune(encoder="body"))
    with pytest.raises(ValueError, match=r"the head net.head is not inside encoder='net.conv1': name a submodule "
                                         r"that contains the head"):
        _fit(DRTune(encoder="net.conv1"))
    # the right submodule works: the step calls self(x), which calls self.net(x)
    dr = DRTune(encoder="net", dr_weight=1.0, bank_size=20)
    trainer = _fit(dr)
    assert dr.tap is not None and dr.tap.root is trainer.lightning_module.net
    assert int(dr.regularizer.step) == 5 and dr.tap.last == {}  # one DR step per training step, logged


def test_resuming_with_a_changed_bank_config():
    dr = DRTune(dr_weight=1.0, bank_size=100)
    _fit(dr)
    state = dr.state_dict()
    assert state["config"] == {"bank_size": 100, "bank_mode": "class_balanced", "dim": 16, "num_classes": 10}
    for changed in (dict(bank_size=60), dict(bank_mode="fifo", bank_size=100)):
        resumed = DRTune(dr_weight=1.0, **changed)
        resumed.load_state_dict(state)  # as Lightning does before on_fit_start
        with pytest.raises(ValueError, match=r"the checkpoint's DR-Tune state was made with \{'bank_size': 100, "
                                             r"'bank_mode': 'class_balanced'.*but this run has .*resume with the "
                                             r"same bank settings and head"):
            _fit(resumed)
    same = DRTune(dr_weight=1.0, bank_size=100)
    same.load_state_dict(state)
    _fit(same)
    assert int(same.regularizer.step) == int(dr.regularizer.step) + 5  # continued from the saved state


def test_negative_dr_weight():
    with pytest.raises(ValueError, match=r"dr_weight must be 'official' \(.*\), 'K/B' or a number >= 0, got -1"):
        DRTune(dr_weight=-1)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    reg = DistributionRegularizer(FeatureBank(4, 3, 2))
    with pytest.raises(ValueError, match="a number >= 0, got -0.5"):
        DRTuneTap(net, net[1], reg, FrozenEncoder(net, "1"), weight=-0.5)


def test_other_invalid_arguments():
    with pytest.raises(ValueError, match="bank_mode must be 'class_balanced' or 'fifo', got 'ring'"):
        DRTune(bank_mode="ring")
    with pytest.raises(ValueError, match=r"rotation_interval must be >= 0 \(0: no rotation\), got -1"):
        DRTune(rotation_interval=-1)
    with pytest.raises(ValueError, match="warmup_batches must be >= 0, got -2"):
        DRTune(warmup_batches=-2)
    with pytest.raises(TypeError, match="pretrained_features must be a callable"):
        DRTune(pretrained_features=torch.zeros(3))
