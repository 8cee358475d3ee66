"""``modules="auto"``: the forgetting-prone modules chosen from their measured sensitivity.

Zhao et al. (ICML 2023) score each module by its mean absolute per-parameter change
``d = ||dtheta||_1 / |theta|`` (:mod:`cl_plugins.kfpf.sensitivity`) and find that a few modules
move far more than the rest, spiking at task boundaries. The rule here (``docs/methods/kfpf.md``):

1. every scored epoch ``e`` gives each group ``g`` the relative score ``d(g, e) / median_g' d(g', e)``
   (median over the groups that moved), so that epochs of a large and of a decayed learning rate
   count alike;
2. the epochs used are those in which a task boundary fell (the first scored epoch of every
   experience after the first), where the paper sees the spikes; all scored epochs when no
   boundary has been seen yet; the epoch in progress when none has been scored;
3. a group's score is the mean of its relative scores over those epochs;
4. groups scoring at least ``threshold`` are taken in decreasing order of score while the taken
   parameters stay within ``budget`` of the model's parameters (a group that does not fit is
   skipped; the head's groups are not candidates when the head is always taken). A group selects
   its module's own parameters; a normalization layer is one unit, as
   in the paper ("BN layers"): when its parameters or its running statistics stand out, its affine
   parameters are fine-tuned and its statistics re-estimated. The head is always taken when
   ``head=True`` (the paper's first forgetting-prone module in class-incremental learning) and
   ``patterns`` add modules as with the fixed list.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from cl_plugins.kfpf.selection import ModuleSelection, SelectionBuilder
from cl_plugins.protocols import find_head

#: default rule: at least twice the median module's relative change, within 10% of the parameters
DEFAULT_THRESHOLD = 2.0
DEFAULT_BUDGET = 0.1
STATS_SUFFIX = ".running_stats"
ROOT = "<root>"


@dataclass
class AutoChoice:
    """What ``modules="auto"`` chose and why (logged, and kept in the checkpoint).

    Attributes:
        groups: the chosen sensitivity groups, by decreasing score (the head and patterns aside).
        scores: every group's score (mean relative change over ``epochs``).
        epochs: the scored epochs used (``-1``: the epoch in progress).
        boundary: whether ``epochs`` are task-boundary epochs (else all scored epochs).
        threshold, budget: the rule.
        params: own parameters of the chosen groups' modules; ``total_params``: of the model.
        head: the head's qualified name when it is always fine-tuned (``head=True``): its groups
            are scored but neither ranked nor counted in the budget.
    """

    groups: list[str]
    scores: dict[str, float]
    epochs: list[int]
    boundary: bool
    threshold: float
    budget: float
    params: int
    total_params: int
    head: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> AutoChoice:
        return cls(**state)

    def describe(self, below: int = 3) -> str:
        """One line: the rule, the chosen groups with their scores, and the best groups left out."""
        ranked = sorted(self.scores.items(), key=lambda kv: kv[1], reverse=True)
        in_head = [g for g, _ in ranked if self.head is not None and in_module(g, self.head)]
        chosen = ", ".join(f"{g} {self.scores[g]:.1f}x" for g in self.groups) or "none"
        rest = [f"{g} {s:.1f}x" for g, s in ranked if g not in self.groups and g not in in_head][:below]
        where = "task-boundary epochs" if self.boundary else "epochs"
        head = "; head " + ", ".join(f"{g} {self.scores[g]:.1f}x" for g in in_head) + " (always)" if in_head else ""
        return (f"scores = mean ||dtheta||_1/|theta| relative to the median module over {where} {self.epochs}; "
                f"rule: score >= {self.threshold:g}x within {100 * self.budget:g}% of the parameters; chose "
                f"{chosen} ({self.params:,} of {self.total_params:,} parameters){head}; next: "
                f"{', '.join(rest) or '-'}")


def relative_scores(history: Sequence[dict[str, Any]],
                    current: dict[str, float] | None = None) -> tuple[dict[str, float], list[int], bool]:
    """``(score per group, epochs used, boundary)`` by steps 1-3 of the module docstring.

    ``history`` holds :class:`~cl_plugins.kfpf.sensitivity.SensitivityTracker` entries
    (``{"epoch", "experience", "scores"}``) in order; ``current`` the scores of the epoch in
    progress, used when no epoch has been scored.
    """
    entries = [dict(h) for h in history]
    boundary = [h for prev, h in zip(entries, entries[1:]) if h["experience"] != prev["experience"]]
    used, is_boundary = (boundary, True) if boundary else (entries, False)
    if not used and current:
        used = [{"epoch": -1, "experience": None, "scores": current}]
    sums: dict[str, float] = {}
    counted: dict[str, int] = {}
    epochs: list[int] = []
    for h in used:
        moved = [s for s in h["scores"].values() if s > 0]
        if not moved:
            continue
        median = statistics.median(moved)
        epochs.append(int(h["epoch"]))
        for g, s in h["scores"].items():
            sums[g] = sums.get(g, 0.0) + s / median
            counted[g] = counted.get(g, 0) + 1
    return {g: sums[g] / counted[g] for g in sums}, epochs, is_boundary


def in_module(group: str, name: str) -> bool:
    """Whether a sensitivity group belongs to the module ``name`` or one of its submodules."""
    owner = module_name(group)
    return name == "" or owner == name or owner.startswith(name + ".")


def module_name(group: str) -> str:
    """The qualified name of the module a sensitivity group belongs to (``""``: the root)."""
    name = group[: -len(STATS_SUFFIX)] if group.endswith(STATS_SUFFIX) else group
    return "" if name == ROOT else name


def module_sizes(model: nn.Module, groups: Sequence[str]) -> dict[str, int]:
    """Own parameters of the module of each group."""
    return {g: sum(p.numel() for p in model.get_submodule(module_name(g)).parameters(recurse=False))
            for g in groups}


def choose_groups(scores: dict[str, float], sizes: dict[str, int], threshold: float, budget: float,
                  total: int) -> list[str]:
    """Step 4: groups with ``score >= threshold`` by decreasing score, within ``budget * total``
    parameters; ``sizes`` are the own parameters of each group's module (counted once per module)."""
    chosen, spent, taken = [], 0, set()
    for g, s in sorted(scores.items(), key=lambda kv: kv[1], reverse=True):
        if s < threshold:
            break
        cost = 0 if module_name(g) in taken else sizes[g]
        if spent + cost <= budget * total:
            chosen.append(g)
            spent += cost
            taken.add(module_name(g))
    return chosen


def selection_from_groups(model: nn.Module, groups: Sequence[str], scores: dict[str, float], head: bool = True,
                          head_name: str | None = None, patterns: Sequence[str] = ()) -> ModuleSelection:
    """The :class:`ModuleSelection` of the chosen groups (plus the head and patterns)."""
    build = SelectionBuilder()
    if head:
        hname, hmod = find_head(model, head_name)
        build.add_module(hname, hmod, "head")
    for g in groups:
        name = module_name(g)
        build.add_module(name, model.get_submodule(name), f"auto:{scores.get(g, float('nan')):.1f}x", recurse=False)
    build.add_patterns(model, patterns)
    if not build.selection.params and not build.selection.norm_with_stats:
        raise ValueError(
            "k-FPF modules='auto' selected nothing: no module's sensitivity reached the threshold and head=False. "
            "Lower auto_threshold, pass head=True or patterns=, or use modules='fixed'"
        )
    return build.selection


def select_by_sensitivity(
    model: nn.Module,
    history: Sequence[dict[str, Any]],
    current: dict[str, float] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    budget: float = DEFAULT_BUDGET,
    head: bool = True,
    head_name: str | None = None,
    patterns: Sequence[str] = (),
) -> tuple[ModuleSelection, AutoChoice]:
    """Chooses the modules to fine-tune from the sensitivity ``history`` (module docstring)."""
    scores, epochs, boundary = relative_scores(history, current)
    if not scores:
        raise ValueError(
            "k-FPF modules='auto' has no sensitivity scores to choose from: no parameter moved since training "
            "started. Run the phases after training steps, or use modules='fixed'"
        )
    head_module = find_head(model, head_name)[0] if head else None
    candidates = {g: sc for g, sc in scores.items() if head_module is None or not in_module(g, head_module)}
    sizes = module_sizes(model, list(candidates))
    total = sum(p.numel() for p in model.parameters())
    groups = choose_groups(candidates, sizes, threshold, budget, total)
    params = sum(sizes[g] for g in {module_name(g): g for g in groups}.values())
    choice = AutoChoice(groups=groups, scores=scores, epochs=epochs, boundary=boundary, threshold=threshold,
                        budget=budget, params=params, total_params=total, head=head_module)
    return selection_from_groups(model, groups, scores, head, head_name, patterns), choice
