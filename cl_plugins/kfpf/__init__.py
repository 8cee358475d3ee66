"""k-FPF / FPF cores (Zhao et al., "Does Continual Learning Equally Forget All Parameters?", ICML 2023).

- :mod:`~cl_plugins.kfpf.selection`: which modules are forgetting-prone (head, normalization
  layers, first conv / patch embedding, user regexes);
- :mod:`~cl_plugins.kfpf.sensitivity`: the training-dynamics score ``||dtheta||_1 / |theta|`` per
  module between epochs;
- :mod:`~cl_plugins.kfpf.auto`: ``modules="auto"``, the modules chosen from those scores;
- :mod:`~cl_plugins.kfpf.phase`: the phase schedule, one fine-tuning phase with its own optimizer,
  and the compute ledger.

The Lightning adapter is :class:`callbacks.kfpf.KFPF`; the buffer is
:class:`cl_plugins.buffers.ReservoirBuffer`. Method notes: ``docs/methods/kfpf.md``.
"""

from cl_plugins.kfpf.auto import AutoChoice, relative_scores, select_by_sensitivity
from cl_plugins.kfpf.phase import (
    ComputeLedger,
    PhaseResult,
    fine_tune_mode,
    forward_flops_per_sample,
    fpf_loss,
    optimizer_steps_per_epoch,
    phase_schedule,
    run_fpf_phase,
    stream_optimizer_steps,
)
from cl_plugins.kfpf.selection import ModuleSelection, has_running_stats, is_norm, select_modules
from cl_plugins.kfpf.sensitivity import SensitivityTracker, mean_abs_change, parameter_groups

__all__ = [
    "AutoChoice",
    "ComputeLedger",
    "ModuleSelection",
    "PhaseResult",
    "SensitivityTracker",
    "fine_tune_mode",
    "forward_flops_per_sample",
    "fpf_loss",
    "has_running_stats",
    "is_norm",
    "mean_abs_change",
    "optimizer_steps_per_epoch",
    "parameter_groups",
    "phase_schedule",
    "relative_scores",
    "run_fpf_phase",
    "select_by_sensitivity",
    "select_modules",
    "stream_optimizer_steps",
]
