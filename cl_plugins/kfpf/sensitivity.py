"""Training-dynamics sensitivity: how much each module moves between epochs.

Zhao et al. (ICML 2023) rank modules by the mean absolute per-parameter change between
consecutive epochs,

    d(theta; t, n) = ||theta_{t,n} - theta_{t,n-1}||_1 / |theta|,

and find spikes at task boundaries for the head, the normalization layers and the first conv.
:class:`SensitivityTracker` computes ``d`` per group against a float32 CPU snapshot. A group is
a module's own parameters (``recurse=False``: ``layer1.0.bn1`` holds its weight and bias), and,
for modules with running statistics, ``<module>.running_stats`` (running mean and variance).
Parameters held directly by the root module (a ViT's ``cls_token``, ``pos_embed``) form the group
``<root>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from cl_plugins.kfpf.selection import has_running_stats


def mean_abs_change(now: Sequence[Tensor], prev: Sequence[Tensor]) -> float:
    """``sum_i ||now_i - prev_i||_1 / sum_i numel(now_i)`` in float32 (0 for no elements)."""
    if len(now) != len(prev):
        raise ValueError(f"mean_abs_change got {len(now)} current and {len(prev)} previous tensors")
    total, count = 0.0, 0
    for a, b in zip(now, prev):
        if a.shape != b.shape:
            raise ValueError(f"tensor shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        total += float((a.detach().float().cpu() - b.float().cpu()).abs().sum())
        count += a.numel()
    return total / count if count else 0.0


def parameter_groups(model: nn.Module, restrict_to: Iterable[Tensor] | None = None) -> dict[str, list[Tensor]]:
    """Groups of tensors whose change is scored: each module's own parameters, and the running
    statistics of normalization layers. ``restrict_to`` keeps only groups made of those tensors
    (e.g. the parameters selected for fine-tuning, plus their modules' statistics)."""
    keep = {id(t) for t in restrict_to} if restrict_to is not None else None
    groups: dict[str, list[Tensor]] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        if keep is not None:
            own = [p for p in own if id(p) in keep]
        if own:
            groups[name or "<root>"] = own
        if has_running_stats(module):
            stats = [module.running_mean, module.running_var]
            stats = [s for s in stats if s is not None]
            selected = keep is None or any(id(p) in keep for p in module.parameters(recurse=False))
            if stats and selected:
                groups[f"{name or '<root>'}.running_stats"] = stats
    return groups


class SensitivityTracker:
    """Scores ``d`` for every group at each :meth:`update`, against the previous snapshot.

    Args:
        groups: the tensors to watch, by group name (see :func:`parameter_groups`).

    ``history`` holds one ``{"epoch": e, "experience": i, "scores": {group: d}}`` entry per
    update; the snapshot and the history are in :meth:`state_dict`, so a resumed run scores its
    next epoch against the same reference as an uninterrupted one.
    """

    def __init__(self, groups: dict[str, list[Tensor]]) -> None:
        self.groups = groups
        self.snapshot: dict[str, list[Tensor]] = {}
        self.history: list[dict[str, Any]] = []

    def take_snapshot(self) -> None:
        """Copies every watched tensor to float32 CPU memory."""
        self.snapshot = self.current()

    def current(self) -> dict[str, list[Tensor]]:
        """Float32 CPU copies of every watched tensor now (the ``before`` of :meth:`exclude_change_since`)."""
        return {g: [t.detach().float().cpu().clone() for t in ts] for g, ts in self.groups.items()}

    def exclude_change_since(self, before: dict[str, list[Tensor]]) -> None:
        """Shifts the snapshot by each watched tensor's change since ``before``, so that the next
        :meth:`update` scores everything but that change (k-FPF: the phases' own updates, so that
        the scores keep measuring the main training). No-op before the first snapshot."""
        if not self.snapshot:
            return
        for g, ts in self.groups.items():
            prev, old = self.snapshot.get(g), before.get(g)
            if prev is None or old is None:
                continue
            for ref, now, then in zip(prev, ts, old):
                ref.add_(now.detach().float().cpu() - then)

    def peek(self) -> dict[str, float]:
        """Scores each group against the snapshot without recording them (the epoch in progress);
        empty before the first snapshot."""
        scores: dict[str, float] = {}
        for g, ts in self.groups.items():
            prev = self.snapshot.get(g)
            if prev is not None:
                scores[g] = mean_abs_change(ts, prev)
        return scores

    def update(self, epoch: int, experience: int | None = None) -> dict[str, float]:
        """Scores each group against the snapshot, records the scores and re-snapshots.

        Returns an empty dict the first time (no snapshot to compare with yet).
        """
        scores: dict[str, float] = {}
        if self.snapshot:
            scores = self.peek()
            self.history.append({"epoch": int(epoch), "experience": experience, "scores": scores})
        self.take_snapshot()
        return scores

    def ranking(self, epoch: int | None = None) -> list[tuple[str, float]]:
        """Groups sorted by decreasing score at ``epoch`` (default: the latest update)."""
        if not self.history:
            return []
        matches = [h for h in self.history if epoch is None or h["epoch"] == epoch]
        if not matches:
            scored = [h["epoch"] for h in self.history]
            raise KeyError(f"no sensitivity scores for epoch {epoch}; scored epochs: {scored}")
        entry = matches[-1]
        return sorted(entry["scores"].items(), key=lambda kv: kv[1], reverse=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "snapshot": {g: [t.clone() for t in ts] for g, ts in self.snapshot.items()},
            "history": [{**h, "scores": dict(h["scores"])} for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot = {g: [t.clone() for t in ts] for g, ts in state["snapshot"].items()}
        self.history = [{**h, "scores": dict(h["scores"])} for h in state["history"]]
