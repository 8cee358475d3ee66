"""Replay buffers: a reservoir (Vitter's algorithm R, as in mammoth's ``Buffer``) and a class-balanced
reservoir (Chrysakis & Moens, "Online Continual Learning from Imbalanced Random Streams", ICML 2020).

Reservoir: the n-th sample offered is kept with probability ``capacity / n``, overwriting a
uniformly chosen slot, so at any time the buffer is a uniform sample of everything seen. A batch is
inserted with one random draw for all its samples; later samples of a batch overwrite earlier ones
in order, so the result equals offering the samples one at a time (and does not depend on how the
stream is cut into batches). Storage is preallocated tensors on CPU; the RNG is a private
``torch.Generator`` whose state is part of ``state_dict``, so a resumed run makes the same choices.
Under DDP each rank keeps its own buffer over its shard.

See ``docs/methods/replay.md`` for the class-balanced rule and the state format.
"""

from __future__ import annotations

import bisect
from typing import Any, Literal

import torch
from torch import Tensor

#: buffer policies selectable by name (``make_buffer``, ``ExperienceReplay(buffer=...)``, ``DER(buffer=...)``)
BufferKind = Literal["reservoir", "class_balanced"]
#: version of the state-dict format (1: before the ``kind``/``version`` keys; loads as a reservoir)
STATE_VERSION = 2
#: random integers are drawn in ``[0, 2**62)`` and reduced modulo ``n``: the bias is below ``n / 2**62``
_RANDOM_HIGH = 2**62


#: kept samples up to which a batch is written sample by sample (fewer tensor ops than index tensors)
_FEW_WRITES = 4


class ReservoirBuffer:
    """Fixed-capacity reservoir of ``(x, y, task_label[, logits][, experience])`` samples.

    Args:
        capacity: number of samples kept.
        seed: seeds the private generator (offer rank-dependent seeds under DDP).
        store_logits: also keep the logits given at insertion (for distillation variants).
    """

    kind: BufferKind = "reservoir"

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

    # ------------------------------------------------------------------ insertion
    def _fields(self, x: Tensor, y: Tensor, task_labels: Tensor, logits: Tensor | None,
                experience: int | None) -> dict[str, Tensor]:
        """The batch as detached CPU tensors, checked against what the buffer holds."""
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
            held = self.data.get("logits")
            if held is not None and held.shape[1:] != fields["logits"].shape[1:]:
                raise ValueError(
                    f"the logits offered have shape {tuple(fields['logits'].shape[1:])} per sample, the buffer holds "
                    f"{tuple(held.shape[1:])}: the model's number of outputs changed during the stream. Logit "
                    "replay compares stored and current outputs entry by entry, so build the model with every "
                    "class of the stream from the start (num_classes = the stream's total)"
                )
        n = fields["y"].shape[0]
        for key, value in fields.items():
            if value.shape[0] != n:
                raise ValueError(f"add() got {n} labels but {value.shape[0]} rows of {key!r}")
        return fields

    def _allocate(self, fields: dict[str, Tensor]) -> None:
        for key, value in fields.items():
            self.data[key] = torch.zeros((self.capacity, *value.shape[1:]), dtype=value.dtype)

    def _choose_slots(self, labels: list[int]) -> tuple[int, dict[int, int], int]:
        """Where the batch goes: ``(fill, moves, stored)``. The first ``fill`` samples take the next free
        slots in order; ``moves`` maps each other slot written to the batch row that ends up there (a
        later row of the batch overwrites an earlier one); ``stored`` counts every sample given a slot.
        Advances ``num_seen``."""
        n, seen = len(labels), self.num_seen
        fill = max(0, min(n, self.capacity - seen))
        moves: dict[int, int] = {}
        stored = fill
        if fill < n:
            # one draw for the batch; the sample numbered k (1-based, over the whole stream) takes the slot
            # drawn uniformly in [0, k) when that slot exists, i.e. with probability capacity / k
            draws = torch.randint(0, _RANDOM_HIGH, (n - fill,), generator=self.generator).tolist()
            for row, r in enumerate(draws, start=fill):
                slot = r % (seen + row + 1)
                if slot < self.capacity:
                    moves[slot] = row
                    stored += 1
        self.num_seen += n
        return fill, moves, stored

    def _write(self, fields: dict[str, Tensor], start: int, fill: int, moves: dict[int, int]) -> None:
        """Writes the first ``fill`` rows to slots ``start...`` and row ``moves[slot]`` to each ``slot``."""
        for key, value in fields.items():
            store = self.data[key]
            if fill:
                store[start:start + fill] = value[:fill]
            if 0 < len(moves) <= _FEW_WRITES:
                for slot, row in moves.items():
                    store[slot] = value[row]
        if len(moves) > _FEW_WRITES:
            slots = torch.tensor(list(moves), dtype=torch.long)
            rows = torch.tensor(list(moves.values()), dtype=torch.long)
            for key, value in fields.items():
                self.data[key].index_copy_(0, slots, value.index_select(0, rows))

    def add(self, x: Tensor, y: Tensor, task_labels: Tensor, logits: Tensor | None = None,
            experience: int | None = None) -> int:
        """Offers a batch; returns how many of its samples were stored (a sample stored and then
        overwritten by a later one of the same batch counts). ``experience`` tags the samples with the
        experience they came from (field ``"e"``; give it for every batch or for none)."""
        fields = self._fields(x, y, task_labels, logits, experience)
        if not self.data:
            self._allocate(fields)
        start = len(self)
        fill, moves, stored = self._choose_slots(fields["y"].tolist())
        self._write(fields, start, fill, moves)
        return stored

    # ------------------------------------------------------------------ sampling
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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "capacity": self.capacity,
            "num_seen": self.num_seen,
            "rng": self.generator.get_state(),
            "data": {k: v.clone() for k, v in self.data.items()},
            "store_logits": self.store_logits,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kind = state.get("kind", "reservoir")  # version 1 states (no kind) were reservoirs
        if kind != self.kind:
            raise ValueError(f"the checkpointed buffer is a {kind!r} buffer, this one is {self.kind!r}: resume with "
                             f"buffer={kind!r}")
        version = int(state.get("version", 1))
        if version > STATE_VERSION:
            raise ValueError(f"the checkpointed buffer has state version {version}, this library reads up to "
                             f"{STATE_VERSION}: update the library to resume it")
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"checkpointed buffer has capacity {state['capacity']}, this one {self.capacity}: "
                "resume with the same buffer size"
            )
        self.num_seen = int(state["num_seen"])
        self.generator.set_state(state["rng"])
        self.data = {k: v.clone() for k, v in state["data"].items()}
        self.store_logits = bool(state.get("store_logits", self.store_logits))


class ClassBalancedBuffer(ReservoirBuffer):
    """Class-balancing reservoir (CBRS, Chrysakis & Moens 2020): equal shares for the classes seen.

    Until the buffer is full every sample is stored. Then a class is *full* when it is, or once was,
    the largest class in the buffer. A sample of a class that is not full replaces a uniformly chosen
    sample of the largest class (one of the largest, uniformly, on ties); a sample of a full class
    ``c`` replaces a uniformly chosen stored sample of ``c`` with probability ``m_c / n_c`` (``m_c``
    stored, ``n_c`` seen so far including this one; a reservoir within the class) and is dropped
    otherwise. Classes are the labels ``y`` (integers >= 0).

    Samples are inserted one at a time in offer order (the bookkeeping is Python integers; the
    tensors are written once per batch). Same arguments as :class:`ReservoirBuffer`.
    """

    kind: BufferKind = "class_balanced"

    def __init__(self, capacity: int, seed: int = 0, store_logits: bool = False) -> None:
        super().__init__(capacity, seed=seed, store_logits=store_logits)
        #: samples seen per class (``n_c``)
        self.seen_per_class: dict[int, int] = {}
        #: classes that were chosen as the largest class for a replacement (full ever after)
        self.marked_full: set[int] = set()
        self._slots: dict[int, list[int]] = {}  # sorted slots of each class
        self._largest = 0  # size of the largest class in the buffer

    def stored_per_class(self) -> dict[int, int]:
        """``m_c``: samples of each class in the buffer."""
        return {c: len(s) for c, s in self._slots.items() if s}

    def is_full_class(self, label: int) -> bool:
        """Whether samples of ``label`` go through the within-class reservoir (once the buffer is full)."""
        return label in self.marked_full or (self._largest > 0 and len(self._slots.get(label, ())) == self._largest)

    def _choose_slots(self, labels: list[int]) -> tuple[int, dict[int, int], int]:
        if labels and min(labels) < 0:
            raise ValueError(f"the class-balanced buffer needs class labels >= 0, got {min(labels)}")
        fill = max(0, min(len(labels), self.capacity - self.num_seen))
        draws = torch.randint(0, _RANDOM_HIGH, (len(labels), 2), generator=self.generator).tolist()
        moves: dict[int, int] = {}
        stored = 0
        for row, (label, (r1, r2)) in enumerate(zip(labels, draws)):
            self.seen_per_class[label] = seen = self.seen_per_class.get(label, 0) + 1
            own = self._slots.setdefault(label, [])
            self.num_seen += 1
            if row < fill:  # filling: the next free slot (handed out in increasing order: lists stay sorted)
                own.append(self.num_seen - 1)
                self._largest = max(self._largest, len(own))
                stored += 1
                continue
            if self.is_full_class(label):
                if r1 % seen >= len(own):  # kept with probability m_c / n_c
                    continue
                slot = own[r2 % len(own)]
            else:
                largest = sorted(c for c, s in self._slots.items() if len(s) == self._largest)
                victim = largest[r1 % len(largest)]
                self.marked_full.add(victim)
                victim_slots = self._slots[victim]
                slot = victim_slots.pop(r2 % len(victim_slots))
                bisect.insort(own, slot)
                # the victim shrank (the largest size drops when it was the only largest class), and this
                # class grew by one to at most the old largest size
                self._largest = max(self._largest - (len(largest) == 1), len(own))
            moves[slot] = row
            stored += 1
        return fill, moves, stored

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["seen_per_class"] = dict(self.seen_per_class)
        state["marked_full"] = sorted(self.marked_full)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seen_per_class = {int(c): int(n) for c, n in state["seen_per_class"].items()}
        self.marked_full = {int(c) for c in state["marked_full"]}
        self._slots = {}
        if self.data:
            for slot, label in enumerate(self.data["y"][: len(self)].tolist()):
                self._slots.setdefault(int(label), []).append(slot)
        self._largest = max((len(s) for s in self._slots.values()), default=0)


def make_buffer(kind: BufferKind, capacity: int, seed: int = 0, store_logits: bool = False) -> ReservoirBuffer:
    """A buffer of the named policy: ``"reservoir"`` or ``"class_balanced"``."""
    if kind == "reservoir":
        return ReservoirBuffer(capacity, seed=seed, store_logits=store_logits)
    if kind == "class_balanced":
        return ClassBalancedBuffer(capacity, seed=seed, store_logits=store_logits)
    raise ValueError(f"buffer must be 'reservoir' or 'class_balanced', got {kind!r}")
