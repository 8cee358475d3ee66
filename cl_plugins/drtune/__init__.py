"""DR-Tune cores (Zhou, Chen, Huang, "DR-Tune: Improving Fine-tuning of Pretrained Visual Models by
Distribution Regularization with Semantic Calibration", ICCV 2023).

- :mod:`~cl_plugins.drtune.calibration`: semantic calibration (Procrustes rotation, class-centre
  shift with head-weighted downstream centres, rescaling), in float32;
- :mod:`~cl_plugins.drtune.bank`: the paired pretrained / downstream feature bank (class-balanced
  for streams, or the official FIFO queue);
- :mod:`~cl_plugins.drtune.features`: the frozen pretrained encoder (a copy of the model whose head
  input is read by a hook);
- :mod:`~cl_plugins.drtune.regularizer`: the DR loss and its weighting, the rotation schedule and
  the hooks that apply it to any "features then head" model;
- :mod:`~cl_plugins.drtune.head`: the official head recipe (init std, learning-rate multiplier).

The Lightning adapter is :class:`callbacks.drtune.DRTune`.
"""

from cl_plugins.drtune.bank import BankMode, FeatureBank
from cl_plugins.drtune.calibration import (
    apply_rotation,
    class_centre_shift,
    mean_norm,
    procrustes_fit,
    procrustes_rotation,
    rescale,
    semantic_calibration,
    span_rotation,
)
from cl_plugins.drtune.features import FrozenEncoder, check_features, frozen_copy, head_linear
from cl_plugins.drtune.head import OFFICIAL_HEAD_INIT_STD, OFFICIAL_HEAD_LR_SCALE, HeadLrScale, init_head_weight
from cl_plugins.drtune.regularizer import (
    DEFAULT_BANK_SIZE,
    DEFAULT_ROTATION_INTERVAL,
    DistributionRegularizer,
    DRTuneTap,
    DRWeight,
    check_dr_weight,
    dr_loss,
    loss_weights,
    scale_grad,
)

__all__ = [
    "DEFAULT_BANK_SIZE",
    "DEFAULT_ROTATION_INTERVAL",
    "OFFICIAL_HEAD_INIT_STD",
    "OFFICIAL_HEAD_LR_SCALE",
    "BankMode",
    "DRTuneTap",
    "DRWeight",
    "DistributionRegularizer",
    "FeatureBank",
    "FrozenEncoder",
    "HeadLrScale",
    "apply_rotation",
    "check_dr_weight",
    "check_features",
    "class_centre_shift",
    "dr_loss",
    "frozen_copy",
    "head_linear",
    "init_head_weight",
    "loss_weights",
    "mean_norm",
    "procrustes_fit",
    "procrustes_rotation",
    "rescale",
    "scale_grad",
    "semantic_calibration",
    "span_rotation",
]
