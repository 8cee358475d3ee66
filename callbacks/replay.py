"""Experience replay (ER): every training batch is extended with a batch from a reservoir buffer.

The buffer is a uniform sample of every training sample seen so far (reservoir sampling), so no
task boundary is needed. Under DDP each rank keeps its own buffer over its own shard (seeded by
``seed + rank``). The buffer (and its RNG) is part of the callback state, every rank's under DDP
(:mod:`cl_plugins.rank_state`), so checkpoints resume exactly.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.base import ContinualCallback
from cl_plugins.buffer_contract import BufferProvider, check_batch_extenders
from cl_plugins.buffers import BufferKind, ReservoirBuffer, make_buffer
from cl_plugins.rank_state import own_rank_state, with_rank_states


class ExperienceReplay(ContinualCallback, BufferProvider):
    """Concatenates ``replay_batch_size`` buffer samples to each training batch, in place.

    Args:
        buffer_size: samples kept in the reservoir (per rank under DDP).
        replay_batch_size: buffer samples added to each batch (default: the batch's own size; at most
            ``buffer_size``).
        seed: seeds the buffer's generator (plus the global rank).
        past_only: replay only samples stored during earlier experiences (no replay during the first
            one). The reservoir still takes every sample; by default (``False``, classic ER) a
            replayed batch may hold samples of the current experience too. Avalanche's ``Replay``
            updates its buffer at experience ends, so it replays past experiences only.
        buffer: ``"reservoir"`` (default) or ``"class_balanced"``, the class-balancing reservoir of
            :class:`cl_plugins.buffers.ClassBalancedBuffer` (equal shares for the classes seen).

    The batch must be a mutable list ``[x, y, task_label]`` (what the default collate gives for
    stream datasets). Buffer samples are drawn before the current batch is inserted, so a batch is
    never replayed against itself. It is a :class:`~cl_plugins.buffer_contract.BufferProvider` that
    extends the batch: readers (FPF) find its buffer through the contract, and callbacks that must see
    the original batch (k-FPF, DER) come before it.
    """

    extends_batch = True

    def __init__(self, buffer_size: int = 500, replay_batch_size: int | None = None, seed: int = 0,
                 past_only: bool = False, buffer: BufferKind = "reservoir") -> None:
        super().__init__()
        self.past_only = past_only
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be >= 1, got {replay_batch_size}")
        if replay_batch_size is not None and replay_batch_size > buffer_size:
            raise ValueError(
                f"replay_batch_size={replay_batch_size} exceeds buffer_size={buffer_size}: a replay batch holds "
                "at most the whole buffer. Lower replay_batch_size or raise buffer_size"
            )
        self.buffer_size = buffer_size
        self.replay_batch_size = replay_batch_size
        self.seed = seed
        self.buffer_kind = buffer
        self.buffer = make_buffer(buffer, buffer_size, seed=seed)
        self._rank_seeded = False

    @property
    def replay_buffer(self) -> ReservoirBuffer:
        return self.buffer

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_batch_extenders(trainer)
        if not self._rank_seeded and self.buffer.num_seen == 0:
            self.buffer = make_buffer(self.buffer_kind, self.buffer_size, seed=self.seed + trainer.global_rank)
            self._rank_seeded = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, list) or len(batch) != 3:
            raise TypeError(
                "ExperienceReplay extends the batch in place and needs it as a list [x, y, task_label] "
                f"(the default collate of a stream dataset); got {type(batch).__name__}"
            )
        x, y, t = batch
        experience = self.stream(trainer).current_experience if self.past_only else None
        where = None
        if self.past_only and len(self.buffer) > 0:
            where = self.buffer.data["e"][: len(self.buffer)] < experience
        if len(self.buffer) > 0 and (where is None or bool(where.any())):
            mem = self.buffer.sample(self.replay_batch_size or len(y), device=x.device, where=where)
            batch[0] = torch.cat([x, mem["x"].to(x.dtype)])
            batch[1] = torch.cat([y, mem["y"]])
            batch[2] = torch.cat([t, mem["t"]])
        self.buffer.add(x, y, t, experience=experience)

    def state_dict(self) -> dict[str, Any]:
        # every rank's buffer (each fills its own from its shard), gathered for rank zero's checkpoint
        return with_rank_states({"buffer": self.buffer.state_dict(), "rank_seeded": self._rank_seeded})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = own_rank_state(state_dict, type(self).__name__)
        self.buffer.load_state_dict(state_dict["buffer"])
        self._rank_seeded = bool(state_dict.get("rank_seeded", True))
