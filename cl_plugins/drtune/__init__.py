"""DR-Tune cores (Zhou, Chen, Huang, "DR-Tune: Improving Fine-tuning of Pretrained Visual Models by
Distribution Regularization with Semantic Calibration", ICCV 2023).

- :mod:`~cl_plugins.drtune.calibration`: semantic calibration (Procrustes rotation, class-centre
  shift with head-weighted downstream centres, rescaling), in float32;
- :mod:`~cl_plugins.drtune.bank`: the paired pretrained / downstream feature bank (class-balanced
  for streams, or the official FIFO queue);
- :mod:`~cl_plugins.drtune.features`: the frozen pretrained encoder (a copy of the model whose head
  input is read by a hook);
- :mod:`~cl_plugins.drtune.regularizer`: the DR loss, the rotation schedule and the hooks that apply
  it to any "features then head" model.

The Lightning adapter is :class:`callbacks.drtune.DRTune`.
"""

from cl_plugins.drtune.bank import BankMode, FeatureBank
from cl_plugins.drtune.calibration import (
    apply_rotation,
    class_centre_shift,
    mean_norm,
    procrustes_rotation,
    rescale,
    semantic_calibration,
)
from cl_plugins.drtune.features import FrozenEncoder, check_features, frozen_copy, head_linear
from cl_plugins.drtune.regularizer import (
    DEFAULT_BANK_SIZE,
    DEFAULT_ROTATION_INTERVAL,
    DistributionRegularizer,
    DRTuneTap,
    dr_loss,
)

__all__ = [
    "DEFAULT_BANK_SIZE",
    "DEFAULT_ROTATION_INTERVAL",
    "BankMode",
    "DRTuneTap",
    "DistributionRegularizer",
    "FeatureBank",
    "FrozenEncoder",
    "apply_rotation",
    "check_features",
    "class_centre_shift",
    "dr_loss",
    "frozen_copy",
    "head_linear",
    "mean_norm",
    "procrustes_rotation",
    "rescale",
    "semantic_calibration",
]
