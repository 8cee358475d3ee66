"""Continual-learning method cores, mixins, buffers and metrics for PyTorch Lightning."""

from cl_plugins.aux_loss import AuxLossTracker, attach_aux_loss
from cl_plugins.mixins import ContinualClassificationMixin
from cl_plugins.models import ContinualClassifier, build_backbone

__all__ = [
    "AuxLossTracker",
    "ContinualClassificationMixin",
    "ContinualClassifier",
    "attach_aux_loss",
    "build_backbone",
]
