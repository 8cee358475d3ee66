"""A whole Avalanche stream as one LightningDataModule (ARCHITECTURE.md section 1).

Experience ``i`` occupies epochs ``[i*E, (i+1)*E)`` of one ``trainer.fit``; ``train_dataloader()``
returns the current experience (the trainer reloads it every epoch) and ``val_dataloader()``
returns one loader per test experience, so one validation pass fills a row of the accuracy
matrix. Batches are ``(x, y, task_label)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

from datamodules.batched import BatchedView, batched_view, collate_batched

Scenario = Literal["class", "domain", "task"]

#: evaluation batch size when none is given: large, because evaluation keeps no activations for backward and
#: every validation step costs Lightning's per-step work (lower it where a large model's activations at this
#: batch do not fit in memory)
DEFAULT_EVAL_BATCH_SIZE = 1000

#: Lightning turns an unset ``max_epochs`` into this value before any hook runs.
_LIGHTNING_DEFAULT_MAX_EPOCHS = 1000


@dataclass(frozen=True)
class ExperienceInfo:
    """What a callback needs to know of one training experience."""

    index: int
    classes: tuple[int, ...]
    task_labels: tuple[int, ...]
    num_train_samples: int


class StreamConfigError(ValueError):
    """A stream and the trainer (or the stream's own arguments) disagree."""


class _UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sampler for DDP that gives every sample to exactly one rank (no padding).

    Lightning's default pads the last shard with repeated samples, which would bias the
    accuracy matrix under DDP.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class _EpochSeededSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``(seed, epoch)``: the order of an epoch does not depend
    on what ran before it, so a run resumed from a checkpoint sees the same batches.

    The permutation is ``DistributedSampler``'s (``seed + epoch``), which deals it out round-robin
    to the ranks: DDP on ``W`` processes with batch ``B`` then trains on the same global batches as
    one process with batch ``W * B``, so the two runs can be compared step by step."""

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        self.n, self.seed, self.epoch = n, seed, epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def _experience_classes(exp: Any) -> tuple[int, ...]:
    classes = getattr(exp, "classes_in_this_experience", None)
    if classes is None:
        targets = getattr(exp.dataset, "targets", None)
        if targets is None:
            raise StreamConfigError(
                f"experience {getattr(exp, 'current_experience', '?')} exposes neither "
                "classes_in_this_experience nor dataset.targets: build the stream with an "
                "Avalanche classification generator (nc_benchmark, benchmark_from_datasets)"
            )
        classes = sorted({int(t) for t in targets})
    return tuple(sorted(int(c) for c in classes))


def _experience_task_labels(exp: Any) -> tuple[int, ...]:
    labels = getattr(exp, "task_labels", None)
    if labels is None:
        tl = getattr(exp.dataset, "targets_task_labels", None)
        labels = sorted({int(t) for t in tl}) if tl is not None else [0]
    return tuple(int(t) for t in labels)


class ContinualDataModule(pl.LightningDataModule):
    """Wraps an Avalanche benchmark so that one ``trainer.fit`` trains every experience in order.

    Args:
        benchmark: any object with ``train_stream`` and ``test_stream`` of Avalanche experiences.
            Subclasses build theirs in :meth:`build_benchmark` instead.
        epochs_per_experience: ``E``; the trainer needs ``max_epochs = num_experiences * E``
            (set automatically when ``max_epochs`` is left unset).
        batch_size: training batch size (per process under DDP).
        eval_batch_size: batch size of the validation and test loaders, independent of ``batch_size``
            (default :data:`DEFAULT_EVAL_BATCH_SIZE`, 1000; lower it where a large model's evaluation at that
            batch does not fit in memory).
        num_workers: DataLoader workers.
        scenario: ``"class"``, ``"domain"`` or ``"task"``; inferred from the stream when ``None``.
        seed: seeds the shuffling of every epoch (resumable runs see the same batches).
        joint: train once on the union of all training experiences (the upper-bound baseline).
        experience: pin training to this one experience, for users who call ``fit`` once per
            experience (each ``fit`` then trains exactly ``E`` epochs).

    Loaders read whole batches at once where the datasets allow it (:mod:`datamodules.batched`: the built-in
    image and tensor streams), with the same batches as per-sample reads.
    """

    def __init__(
        self,
        benchmark: Any = None,
        epochs_per_experience: int = 1,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        scenario: Scenario | None = None,
        seed: int = 0,
        joint: bool = False,
        experience: int | None = None,
    ) -> None:
        super().__init__()
        if epochs_per_experience < 1:
            raise StreamConfigError(f"epochs_per_experience must be >= 1, got {epochs_per_experience}")
        if batch_size < 1:
            raise StreamConfigError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise StreamConfigError(f"eval_batch_size must be >= 1 (or None for {DEFAULT_EVAL_BATCH_SIZE}), "
                                    f"got {eval_batch_size}")
        if scenario not in (None, "class", "domain", "task"):
            raise StreamConfigError(f"scenario must be 'class', 'domain' or 'task', got {scenario!r}")
        self._benchmark = benchmark
        self.epochs_per_experience = epochs_per_experience
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or DEFAULT_EVAL_BATCH_SIZE
        self.num_workers = num_workers
        self._scenario = scenario
        self.seed = seed
        self.joint = joint
        self._pinned = experience
        self._checked = False
        # per-experience facts of the (fixed) benchmark, computed once: read on every step by the mixin
        self._facts: dict[str, Any] = {}
        # dataset -> its batched view (None: per-sample reads); the dataset is kept so that its id stays unique
        self._views: dict[int, tuple[Dataset, BatchedView | None]] = {}
        self._joint_dataset: Dataset | None = None

    # ------------------------------------------------------------------ the stream
    def build_benchmark(self) -> Any:
        """Builds the Avalanche benchmark; subclasses for built-in streams override this."""
        raise StreamConfigError(
            "ContinualDataModule needs an Avalanche benchmark: pass benchmark=..., or use a built-in "
            "stream (SplitDigits, SplitMNIST, PermutedMNIST, SplitFashionMNIST, SplitCIFAR10, ...)"
        )

    @property
    def benchmark(self) -> Any:
        """The wrapped benchmark, built and validated on first use."""
        if self._benchmark is None:
            self._benchmark = self.build_benchmark()
        if not self._checked:
            self._validate(self._benchmark)
            self._checked = True
        return self._benchmark

    def _validate(self, bm: Any) -> None:
        for name in ("train_stream", "test_stream"):
            if not hasattr(bm, name):
                raise StreamConfigError(
                    f"{type(bm).__name__} has no {name}: pass an Avalanche benchmark "
                    "(nc_benchmark, ni_benchmark, benchmark_from_datasets, SplitMNIST, ...)"
                )
        train, test = list(bm.train_stream), list(bm.test_stream)
        if not train:
            raise StreamConfigError("the benchmark's train_stream has no experiences")
        for i, exp in enumerate(train):
            if len(exp.dataset) == 0:
                raise StreamConfigError(
                    f"training experience {i} is empty (classes {list(_experience_classes(exp))}): "
                    "check the class order, the number of experiences and any filtering of the data"
                )
        for i, exp in enumerate(test):
            if len(exp.dataset) == 0:
                raise StreamConfigError(f"test experience {i} is empty: every experience needs test data")
        if self._pinned is not None and not 0 <= self._pinned < len(train):
            raise StreamConfigError(
                f"experience={self._pinned} is out of range: the stream has {len(train)} experiences"
            )
        self._train_exps, self._test_exps = train, test

    @property
    def num_experiences(self) -> int:
        """Number of training experiences in the stream."""
        return len(self.benchmark.train_stream)

    @property
    def num_train_phases(self) -> int:
        """Experiences the trainer goes through: 1 in joint mode, else ``num_experiences``."""
        return 1 if self.joint else self.num_experiences

    def _fact(self, name: str, compute: Any) -> Any:
        _ = self.benchmark
        if name not in self._facts:
            self._facts[name] = compute()
        return self._facts[name]

    @property
    def classes_in_experience(self) -> list[tuple[int, ...]]:
        """Classes of each training experience."""
        return list(self._fact("classes", lambda: [_experience_classes(e) for e in self._train_exps]))

    @property
    def task_labels(self) -> list[tuple[int, ...]]:
        """Task labels of each training experience."""
        return list(self._fact("task_labels", lambda: [_experience_task_labels(e) for e in self._train_exps]))

    @property
    def test_classes_in_experience(self) -> list[tuple[int, ...]]:
        """Classes of each test experience."""
        return list(self._fact("test_classes", lambda: [_experience_classes(e) for e in self._test_exps]))

    @property
    def num_classes(self) -> int:
        """``1 + `` the largest class id in the stream."""
        return 1 + max(max(c) for c in self.classes_in_experience + self.test_classes_in_experience)

    @property
    def scenario(self) -> Scenario:
        """The scenario kind: given, or inferred (several task labels -> task-IL; the same
        classes in every experience -> domain-IL; else class-IL)."""
        if self._scenario is not None:
            return self._scenario
        return self._fact("scenario", self._infer_scenario)

    def _infer_scenario(self) -> Scenario:
        if len({t for ts in self.task_labels for t in ts}) > 1:
            return "task"
        if len(set(self.classes_in_experience)) == 1 and self.num_experiences > 1:
            return "domain"
        return "class"

    def experience_info(self, index: int) -> ExperienceInfo:
        """Classes, task labels and size of training experience ``index``."""
        _ = self.benchmark
        exp = self._train_exps[index]
        return ExperienceInfo(
            index=index,
            classes=_experience_classes(exp),
            task_labels=_experience_task_labels(exp),
            num_train_samples=len(exp.dataset),
        )

    # ------------------------------------------------------------------ epochs <-> experiences
    @property
    def pinned_experience(self) -> int | None:
        """The experience every ``fit`` trains, in per-experience mode; else ``None``."""
        return self._pinned

    def set_experience(self, index: int | None) -> None:
        """Pins training to one experience (per-experience ``fit`` loops), or unpins with ``None``."""
        if index is not None and not 0 <= index < self.num_experiences:
            raise StreamConfigError(
                f"experience {index} is out of range: the stream has {self.num_experiences}"
            )
        self._pinned = index

    @property
    def expected_max_epochs(self) -> int:
        """``max_epochs`` the whole stream needs (in pinned mode: per ``fit`` from epoch 0)."""
        if self._pinned is not None:
            return self.epochs_per_experience
        return self.num_train_phases * self.epochs_per_experience

    def experience_at_epoch(self, epoch: int) -> int:
        """Index of the experience trained at ``epoch`` (0 in joint mode)."""
        if self._pinned is not None:
            return self._pinned
        if self.joint:
            return 0
        return min(epoch // self.epochs_per_experience, self.num_experiences - 1)

    def _phase_start_epoch(self, epoch: int) -> int:
        if self._pinned is not None:
            max_epochs = self.trainer.max_epochs if self.trainer is not None else None
            if max_epochs is None or max_epochs < 0:
                return 0
            return max_epochs - self.epochs_per_experience
        return (epoch // self.epochs_per_experience) * self.epochs_per_experience

    def is_experience_start(self, epoch: int) -> bool:
        """True at the first epoch of an experience."""
        return epoch == self._phase_start_epoch(epoch)

    def is_experience_end(self, epoch: int) -> bool:
        """True at the last epoch of an experience."""
        return epoch == self._phase_start_epoch(epoch) + self.epochs_per_experience - 1

    @property
    def current_experience(self) -> int:
        """The experience the attached trainer is training now."""
        if self.trainer is None:
            raise RuntimeError("current_experience needs the datamodule to be attached to a Trainer")
        return self.experience_at_epoch(self.trainer.current_epoch)

    # ------------------------------------------------------------------ trainer checks
    def check_trainer(self, trainer: pl.Trainer) -> None:
        """Sets or checks ``max_epochs`` and makes the trainer reload the train loader each epoch."""
        want = self.expected_max_epochs
        have = trainer.fit_loop.max_epochs
        unset = have in (None, -1, _LIGHTNING_DEFAULT_MAX_EPOCHS) or getattr(trainer, "_cl_auto_max_epochs", False)
        if unset and have != want:
            trainer.fit_loop.max_epochs = want
            trainer._cl_auto_max_epochs = True  # a later check (e.g. joint mode) may set it again
            rank_zero_info(f"max_epochs set to {want} from the stream")
        elif self._pinned is None and have != want:
            raise StreamConfigError(
                f"Trainer(max_epochs={have}) disagrees with the stream: {self.num_train_phases} "
                f"experience(s) x epochs_per_experience={self.epochs_per_experience} = {want} epochs. "
                f"Set max_epochs={want} (or leave it unset), or change epochs_per_experience"
            )
        if trainer.reload_dataloaders_every_n_epochs != 1:
            trainer.reload_dataloaders_every_n_epochs = 1

    def setup(self, stage: str) -> None:
        _ = self.benchmark
        if stage == "fit" and self.trainer is not None:
            self.check_trainer(self.trainer)

    # ------------------------------------------------------------------ loaders
    def _dist(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataset(self, experience: int) -> Dataset:
        """Training data of one experience (the union of all of them in joint mode)."""
        _ = self.benchmark
        if self.joint and self._pinned is None:
            if self._joint_dataset is None:
                self._joint_dataset = ConcatDataset([e.dataset for e in self._train_exps])
            return self._joint_dataset
        return self._train_exps[experience].dataset

    def test_dataset(self, experience: int) -> Dataset:
        """Test data of one experience."""
        _ = self.benchmark
        return self._test_exps[experience].dataset

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self._pinned is not None and self.trainer is not None:
            start = self._phase_start_epoch(epoch)
            if epoch < start:
                raise StreamConfigError(
                    f"per-experience fit starts at epoch {epoch} but max_epochs={self.trainer.max_epochs} "
                    f"leaves more than epochs_per_experience={self.epochs_per_experience} epochs: "
                    f"use max_epochs={epoch + self.epochs_per_experience}"
                )
        dataset = self.train_dataset(self.experience_at_epoch(epoch))
        world, rank = self._dist()
        sampler: Sampler[int]
        if world > 1:
            sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=self.seed)
            sampler.set_epoch(epoch)
        else:
            sampler = _EpochSeededSampler(len(dataset), self.seed, epoch)  # type: ignore[arg-type]
        return self._loader(dataset, self.batch_size, sampler)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        world, rank = self._dist()
        sampler = _UnpaddedDistributedSampler(dataset, world, rank) if world > 1 else None
        return self._loader(dataset, self.eval_batch_size, sampler)

    def loader_dataset(self, dataset: Dataset) -> Dataset:
        """What the loaders read for ``dataset``: its :class:`~datamodules.batched.BatchedView` where the
        dataset allows batched reads (built once per dataset), else ``dataset`` itself."""
        cached = self._views.get(id(dataset))
        if cached is None or cached[0] is not dataset:
            cached = (dataset, batched_view(dataset))
            self._views[id(dataset)] = cached
        return cached[1] if cached[1] is not None else dataset

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler[int] | None) -> DataLoader:
        data = self.loader_dataset(dataset)
        extra = {"collate_fn": collate_batched} if isinstance(data, BatchedView) else {}
        return DataLoader(data, batch_size=batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=False, drop_last=False, **extra)

    @property
    def num_test_experiences(self) -> int:
        """Number of test experiences (columns of the accuracy matrix)."""
        return len(self.benchmark.test_stream)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self.test_dataset(j)) for j in range(self.num_test_experiences)]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        # the global RNG states too: Lightning does not checkpoint them, and without them dropout
        # masks (and any other global draws) differ after a resume
        return {"pinned": self._pinned, "joint": self.joint, "seed": self.seed,
                "epochs_per_experience": self.epochs_per_experience,
                "rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("epochs_per_experience", self.epochs_per_experience) != self.epochs_per_experience:
            raise StreamConfigError(
                f"the checkpoint was trained with epochs_per_experience={state_dict['epochs_per_experience']}"
                f", this datamodule has {self.epochs_per_experience}: resume with the same stream settings"
            )
        self._pinned = state_dict.get("pinned", self._pinned)
        self.joint = state_dict.get("joint", self.joint)
        if "rng" in state_dict:
            _set_rng_states(state_dict["rng"])


def _rng_states() -> dict[str, Any]:
    """torch, CUDA, numpy and Python global RNG states as tensors and numbers (loadable with
    ``torch.load(weights_only=True)``, which Lightning uses for checkpoints)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    """Restores what :func:`_rng_states` collected."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), states["numpy_pos"],
                         states["numpy_has_gauss"], states["numpy_gauss"]))
    random.setstate((states["python_version"], tuple(states["python_state"].tolist()), states["python_gauss"]))

