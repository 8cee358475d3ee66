"""Regularization baselines in plain torch: online EWC, SI and LwF (see ``docs/methods``)."""

from cl_plugins.baselines.ewc import check_ewc_hparams, empirical_fisher, fisher_batch, fisher_per_sample, online_fisher
from cl_plugins.baselines.lwf import check_lwf_hparams, lwf_distillation, old_class_groups
from cl_plugins.baselines.quadratic import quadratic_penalty
from cl_plugins.baselines.si import check_si_hparams, consolidate_importance, path_integral_step

__all__ = [
    "check_ewc_hparams",
    "check_lwf_hparams",
    "check_si_hparams",
    "consolidate_importance",
    "empirical_fisher",
    "fisher_batch",
    "fisher_per_sample",
    "lwf_distillation",
    "old_class_groups",
    "online_fisher",
    "path_integral_step",
    "quadratic_penalty",
]
