"""Per-rank callback state in one checkpoint (buffers that differ between DDP ranks).

Lightning writes the checkpoint from rank zero, so a callback whose state differs per rank (a
reservoir buffer filled from the rank's own shard, its generator) would resume every rank from
rank zero's state. :func:`with_rank_states` gathers every rank's state into the checkpoint while it
is being built (``Trainer.save_checkpoint`` builds it on every rank, so the collective is safe
there), and :func:`own_rank_state` gives each rank its own back on load.

Resuming on another number of processes cannot restore per-rank state one to one: each rank then
takes the saved state of ``rank % saved_ranks`` (rank zero's on one process, as before), with a
warning.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

#: key of the gathered per-rank states in a callback's state dict
RANKS_KEY = "per_rank"


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def with_rank_states(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` itself on one process; under DDP, ``{RANKS_KEY: [every rank's state, in rank order]}``.
    Must be called on every rank (a collective)."""
    rank, world = _world()
    if world == 1:
        return state
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, state)
    return {RANKS_KEY: gathered}


def own_rank_state(state: dict[str, Any], what: str) -> dict[str, Any]:
    """This rank's part of a state dict written by :func:`with_rank_states` (``what`` names the
    callback in the warning)."""
    per_rank = state.get(RANKS_KEY)
    if per_rank is None:
        return state
    rank, world = _world()
    if len(per_rank) != world:
        rank_zero_warn(
            f"{what}: the checkpoint holds the state of {len(per_rank)} processes and this run has {world}; "
            f"each process resumes from the state of process rank % {len(per_rank)}, so the resumed run differs "
            "from an uninterrupted one. Resume on the same number of processes to restore every rank exactly",
            category=UserWarning,
        )
    return per_rank[rank % len(per_rank)]
