"""Reservoir-sampling replay buffer (Vitter's algorithm R, as in mammoth's ``Buffer``).

The n-th sample offered is kept with probability ``capacity / n``, overwriting a uniformly chosen
slot, so at any time the buffer is a uniform sample of everything seen. Storage is preallocated
tensors on CPU; the RNG is a private ``torch.Generator`` whose state is part of ``state_dict``, so
a resumed run makes the same choices. Under DDP each rank keeps its own buffer over its shard.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ReservoirBuffer:
    """Fixed-capacity reservoir of ``(x, y, task_label[, logits])`` samples.

    Args:
        capacity: number of samples kept.
        seed: seeds the private generator (offer rank-dependent seeds under DDP).
        store_logits: also keep the logits given at insertion (for distillation variants).
    """

    def __init__(self, capacity: int, seed: int = 0, store_logits: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.store_logits = store_logits
        self.num_seen = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.data: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return min(self.num_seen, self.capacity)

    def _allocate(self, fields: dict[str, Tensor]) -> None:
        for key, value in fields.items():
            self.data[key] = torch.zeros((self.capacity, *value.shape[1:]), dtype=value.dtype)

    def add(self, x: Tensor, y: Tensor, task_labels: Tensor, logits: Tensor | None = None,
            experience: int | None = None) -> int:
        """Offers a batch; returns how many of its samples were stored. ``experience`` tags the samples
        with the experience they came from (field ``"e"``; give it for every batch or for none)."""
        fields = {"x": x.detach().cpu(), "y": y.detach().cpu().long(), "t": task_labels.detach().cpu().long()}
        if experience is not None:
            fields["e"] = torch.full_like(fields["y"], int(experience))
        if self.data and set(fields) - {"logits"} != set(self.data) - {"logits"}:
            raise ValueError(f"this buffer holds fields {sorted(self.data)}; the batch offers {sorted(fields)}: "
                             "pass experience= for every batch or for none")
        if self.store_logits:
            if logits is None:
                raise ValueError("this buffer stores logits: pass logits= to add()")
            fields["logits"] = logits.detach().float().cpu()
        if not self.data:
            self._allocate(fields)
        n = fields["y"].shape[0]
        stored = 0
        for i in range(n):
            self.num_seen += 1
            if self.num_seen <= self.capacity:
                slot = self.num_seen - 1
            else:
                slot = int(torch.randint(0, self.num_seen, (1,), generator=self.generator))
                if slot >= self.capacity:
                    continue
            for key, value in fields.items():
                self.data[key][slot] = value[i]
            stored += 1
        return stored

    def sample(self, batch_size: int, device: torch.device | str | None = None,
               where: Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A uniform batch without replacement (all samples when fewer than ``batch_size``), drawn
        among the filled slots where the boolean mask ``where`` (one entry per filled slot) holds.
        ``generator`` draws it instead of the buffer's own (a reader that must not advance the
        owner's draws, e.g. k-FPF on ExperienceReplay's buffer)."""
        generator = self.generator if generator is None else generator
        if len(self) == 0:
            raise RuntimeError("the replay buffer is empty: nothing has been added yet")
        if where is None:
            k = min(batch_size, len(self))
            idx = torch.randperm(len(self), generator=generator)[:k]
        else:
            if where.shape != (len(self),):
                raise ValueError(f"where must be a mask of the {len(self)} filled slots, got {tuple(where.shape)}")
            allowed = torch.nonzero(where.cpu(), as_tuple=True)[0]
            if allowed.numel() == 0:
                raise RuntimeError("no buffer sample satisfies the mask")
            idx = allowed[torch.randperm(allowed.numel(), generator=generator)[:batch_size]]
        return {key: value[idx].to(device) if device is not None else value[idx] for key, value in self.data.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "num_seen": self.num_seen,
            "rng": self.generator.get_state(),
            "data": {k: v.clone() for k, v in self.data.items()},
            "store_logits": self.store_logits,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"checkpointed buffer has capacity {state['capacity']}, this one {self.capacity}: "
                "resume with the same buffer size"
            )
        self.num_seen = int(state["num_seen"])
        self.generator.set_state(state["rng"])
        self.data = {k: v.clone() for k, v in state["data"].items()}
        self.store_logits = bool(state.get("store_logits", self.store_logits))
