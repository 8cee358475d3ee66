"""Experience replay (ER): every training batch is extended with a batch from a reservoir buffer.

The buffer is a uniform sample of every training sample seen so far (reservoir sampling), so no
task boundary is needed. Under DDP each rank keeps its own buffer over its own shard (seeded by
``seed + rank``). The buffer (and its RNG) is part of the callback state, so checkpoints resume
exactly.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.base import ContinualCallback
from cl_plugins.buffers import ReservoirBuffer


class ExperienceReplay(ContinualCallback):
    """Concatenates ``replay_batch_size`` buffer samples to each training batch, in place.

    Args:
        buffer_size: samples kept in the reservoir (per rank under DDP).
        replay_batch_size: buffer samples added to each batch (default: the batch's own size).
        seed: seeds the buffer's generator (plus the global rank).

    The batch must be a mutable list ``[x, y, task_label]`` (what the default collate gives for
    stream datasets). Buffer samples are drawn before the current batch is inserted, so a batch is
    never replayed against itself.
    """

    def __init__(self, buffer_size: int = 500, replay_batch_size: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be >= 1, got {replay_batch_size}")
        self.buffer_size = buffer_size
        self.replay_batch_size = replay_batch_size
        self.seed = seed
        self.buffer = ReservoirBuffer(buffer_size, seed=seed)
        self._rank_seeded = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._rank_seeded and self.buffer.num_seen == 0:
            self.buffer = ReservoirBuffer(self.buffer_size, seed=self.seed + trainer.global_rank)
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
        if len(self.buffer) > 0:
            mem = self.buffer.sample(self.replay_batch_size or len(y), device=x.device)
            batch[0] = torch.cat([x, mem["x"].to(x.dtype)])
            batch[1] = torch.cat([y, mem["y"]])
            batch[2] = torch.cat([t, mem["t"]])
        self.buffer.add(x, y, t)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "rank_seeded": self._rank_seeded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state_dict["buffer"])
        self._rank_seeded = bool(state_dict.get("rank_seeded", True))
