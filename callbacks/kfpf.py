"""k-FPF and FPF as Lightning callbacks (Zhao et al., "Does Continual Learning Equally Forget All
Parameters?", ICML 2023).

k-FPF trains on the current experience only (no replay at every step) and, ``k`` times evenly
spaced over the whole stream's optimizer steps, fine-tunes only the forgetting-prone modules
(head, normalization layers, first conv; see :mod:`cl_plugins.kfpf.selection`; or, with
``modules="auto"``, the modules whose measured sensitivity stands out, :mod:`cl_plugins.kfpf.auto`)
for ``M`` iterations on batches from a reservoir buffer. FPF is one such phase at the very end, on
top of any method (e.g. after experience replay). Method notes, defaults and deviations from the
paper: ``docs/methods/kfpf.md``.

Interaction with :class:`callbacks.replay.ExperienceReplay`: ER extends the batch in place in
``on_train_batch_start``. k-FPF keeps the batch it sees in its own ``on_train_batch_start`` and
inserts (own buffer) and counts (compute ledger) only those samples, so it must come *before* ER
in ``callbacks=[...]``; ``setup`` raises an error otherwise. The logits for k-FPF-KD are the first
rows of the training forward's output, which are the current samples when ER appends its samples
after them.

Whose buffer (``buffer_from``): FPF "on top of" a replay method fine-tunes on *that method's*
buffer (Zhao et al.), so :class:`FPF` by default (``"auto"``) reads the buffer of the trainer's
buffer provider (:class:`~cl_plugins.buffer_contract.BufferProvider`: ``ExperienceReplay``, ``DER``,
``DERPP``) when there is one, and holds no buffer of its own: FPF after ER keeps the memory of ER
alone. It draws its phase batches from that buffer with a private generator, so the owner's
reservoir and replay draws are the same with or without FPF. The shared buffer is saved in the
checkpoint by its owner; k-FPF saves only its generator. k-FPF-KD needs the logits stored at
insertion: DER's buffer holds them, ER's does not (``buffer_from="replay"`` with ``variant="kd"``
on ER raises; ``"auto"`` then builds its own buffer).
:class:`KFPF` defaults to its own buffer (``"own"``): k-FPF itself has no every-step replay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from callbacks.base import ContinualCallback
from cl_plugins.buffer_contract import (
    BufferProvider,
    ReplayForwardListener,
    buffer_providers,
    check_before_batch_extenders,
    find_buffer_provider,
)
from cl_plugins.buffers import ReservoirBuffer
from cl_plugins.kfpf.auto import (
    DEFAULT_BUDGET,
    DEFAULT_THRESHOLD,
    AutoChoice,
    select_by_sensitivity,
    selection_from_groups,
)
from cl_plugins.kfpf.phase import (
    ComputeLedger,
    PhaseResult,
    forward_flops_per_sample,
    optimizer_steps_per_epoch,
    phase_schedule,
    run_fpf_phase,
    stream_optimizer_steps,
)
from cl_plugins.kfpf.selection import ModuleSelection, select_modules
from cl_plugins.kfpf.sensitivity import SensitivityTracker, parameter_groups
from cl_plugins.rank_state import own_rank_state, with_rank_states

#: the phases' SGD learning rate, fixed, whatever the main optimizer's schedule (our choice, see
#: docs/methods/kfpf.md: the main learning rate of every benchmark stream here, within mammoth's 0.03-0.1)
DEFAULT_FPF_LR = 0.05
#: capacity of k-FPF's own buffer when ``buffer_size`` is not given (the mammoth norm: 200, 500, 5120)
DEFAULT_BUFFER_SIZE = 500

#: where the phases' buffer comes from (see the module docstring)
BufferSource = Literal["auto", "own", "replay"]
#: how the fine-tuned modules are chosen
ModuleChoice = Literal["fixed", "auto"]


class KFPF(ContinualCallback, BufferProvider, ReplayForwardListener):
    """k-FPF: plain training plus ``k`` fine-tuning phases of the forgetting-prone modules.

    Args:
        k: number of phases over the whole stream; phase ``j`` runs after ``j * floor(N/k)``
            optimizer steps, ``N`` counted from the datamodule (experience sizes, batch size, world
            size, epochs per experience, ``accumulate_grad_batches``, ``limit_train_batches``).
        iterations: ``M``, SGD iterations per phase.
        buffer_size: capacity of k-FPF's own reservoir (per rank under DDP; default
            ``DEFAULT_BUFFER_SIZE``). With a shared buffer the capacity is the owner's: leave it
            unset (a different value raises).
        buffer_from: ``"own"`` (default for ``KFPF``): a reservoir of k-FPF's own, filled with the
            batches it sees; ``"replay"``: the buffer of the trainer's buffer provider
            (:class:`~cl_plugins.buffer_contract.BufferProvider`: ``ExperienceReplay``, ``DER``,
            ``DERPP``), read only (``"kd"`` needs one that stores logits: DER/DERPP);
            ``"auto"`` (default for :class:`FPF`): ``"replay"`` when the trainer has a buffer
            provider whose buffer serves the variant, else ``"own"``.
        batch_size: buffer batch size of a phase iteration.
        variant: ``"ce"`` (k-FPF-CE: cross-entropy on buffer batches) or ``"kd"`` (k-FPF-KD: plus
            ``alpha * MSE`` to the logits stored at insertion, as in DER).
        alpha: weight of the logit-matching term for ``"kd"``.
        lr: the phases' SGD learning rate (default ``DEFAULT_FPF_LR``), fixed: a decaying schedule of
            the main optimizer, which has driven its learning rate to about 0 by the last phase (the
            one that decides the final accuracy), does not reach the phases.
        momentum, weight_decay: of the phases' SGD (a fresh optimizer every phase).
        lr_schedule: ``"cosine"`` decays the phase's learning rate from ``lr`` to 0 over its
            ``M`` iterations (the phase ends in a low-noise iterate); ``"constant"`` keeps it.
        at_end: move the last phase to the very last optimizer step, so the final model is
            fine-tuned (else up to ``k - 1`` trailing steps follow it).
        modules: ``"fixed"`` (default): the fixed list ``head``, ``norms``, ``first_conv`` plus
            ``patterns`` (:func:`cl_plugins.kfpf.selection.select_modules`); ``"auto"``: at the first
            phase, the modules whose sensitivity stands out (:mod:`cl_plugins.kfpf.auto`; needs
            ``sensitivity="all"``), plus the head (``head=True``) and ``patterns``; ``norms`` and
            ``first_conv`` are then unused. The choice is logged, kept in :attr:`auto_choice` and in
            the checkpoint (a resumed run fine-tunes the same modules).
        auto_threshold, auto_budget: the ``"auto"`` rule: modules whose change, relative to the
            median module's, averages at least ``auto_threshold`` over the task-boundary epochs,
            within ``auto_budget`` of the model's parameters.
        head, norms, first_conv, patterns, head_name: module selection
            (:func:`cl_plugins.kfpf.selection.select_modules`).
        freeze_norm_stats: keep running statistics fixed during phases (default: re-estimate them
            on buffer batches, with the selected normalization layers in train mode).
        sensitivity: score ``||dtheta||_1/|theta|`` per module at every epoch end for ``"all"``
            modules, only the ``"selected"`` ones, or ``"off"``; logged as
            ``kfpf/sensitivity/<module>`` and kept in :attr:`sensitivity.history`.
        transform: applied to buffer inputs (on device) in phases, e.g. training augmentation.
            The buffer holds the inputs as the training step saw them (see below), so with a
            stream that already augments (``augment=True``) this augments a second time; ``setup``
            warns then.
        total_steps: override ``N`` (the whole stream's optimizer steps).
        logits_module: qualified name of the submodule whose forward output are the logits stored
            for ``"kd"`` (default: the LightningModule's own forward).
        seed: seeds the buffer (plus the global rank).

    Defaults: the paper's k, M, learning rate and alpha could not be verified (no official code);
    ``k=2``, ``M=175``, batch 32, momentum 0.9, cosine decay, ``lr=0.05`` and ``alpha=0.5`` are this
    library's choices (``docs/methods/kfpf.md``). Under DDP every rank keeps its own buffer over its
    shard; gradients of the fine-tuned parameters are averaged across ranks at every phase step and
    the re-estimated running statistics at the end of a phase. A checkpoint holds every rank's state
    (:mod:`cl_plugins.rank_state`), so each rank resumes its own buffer.

    What the buffer holds: the inputs ``x`` exactly as the training batch delivers them, i.e.
    after the dataset's transforms. When the stream augments per sample in the dataset (e.g.
    ``SplitCIFAR10(augment=True)``), a buffer row is the one augmented view the training step saw,
    not the raw image: a callback sees only the delivered batch. DER (and the METHODS notes, 1(c))
    store the raw image and re-augment at replay; here a phase replays the stored view, as this
    library's ``ExperienceReplay`` does, unless ``transform`` is given, which is then applied on
    top of the stored augmentation (a warning at ``setup`` says so when the stream has
    ``augment=True``). For DER's behaviour, build the stream without augmentation and pass the
    augmentation both to the model's training (e.g. in ``training_step``) and as ``transform``.

    Sensitivity scores measure the main training's dynamics: the change that a phase makes is
    left out of them (a phase on an epoch's last step runs after that epoch is scored, and a
    phase inside an epoch shifts the reference snapshot by its own change).
    """

    def __init__(
        self,
        k: int = 2,
        iterations: int = 175,
        buffer_size: int | None = None,
        batch_size: int = 32,
        variant: Literal["ce", "kd"] = "ce",
        alpha: float = 0.5,
        lr: float = DEFAULT_FPF_LR,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: Literal["constant", "cosine"] = "cosine",
        at_end: bool = True,
        modules: ModuleChoice = "fixed",
        auto_threshold: float = DEFAULT_THRESHOLD,
        auto_budget: float = DEFAULT_BUDGET,
        head: bool = True,
        norms: bool = True,
        first_conv: bool = True,
        patterns: Sequence[str] = (),
        head_name: str | None = None,
        freeze_norm_stats: bool = False,
        sensitivity: Literal["all", "selected", "off"] = "all",
        transform: Callable[[Tensor], Tensor] | None = None,
        total_steps: int | None = None,
        logits_module: str | None = None,
        seed: int = 0,
        buffer_from: BufferSource = "own",
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k (the number of FPF phases over the stream) must be >= 1, got {k}")
        if iterations < 1:
            raise ValueError(f"iterations (M) must be >= 1, got {iterations}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if variant not in ("ce", "kd"):
            raise ValueError(f"variant must be 'ce' (k-FPF-CE) or 'kd' (k-FPF-KD), got {variant!r}")
        if buffer_from not in get_args(BufferSource):
            raise ValueError(f"buffer_from must be one of {get_args(BufferSource)}, got {buffer_from!r}")
        if buffer_size is not None and buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if sensitivity not in ("all", "selected", "off"):
            raise ValueError(f"sensitivity must be 'all', 'selected' or 'off', got {sensitivity!r}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr (the FPF phases' own learning rate) must be a number > 0 (default "
                             f"{DEFAULT_FPF_LR}), got {lr!r}")
        if modules not in ("fixed", "auto"):
            raise ValueError(f"modules must be 'fixed' or 'auto', got {modules!r}")
        if modules == "auto" and sensitivity != "all":
            raise ValueError(f"modules='auto' chooses from the sensitivity of every module: use sensitivity='all' "
                             f"(got {sensitivity!r}), or modules='fixed'")
        if not auto_threshold > 0 or not 0 < auto_budget <= 1:
            raise ValueError(f"auto_threshold must be > 0 and auto_budget in (0, 1], got {auto_threshold} and "
                             f"{auto_budget}")
        if total_steps is not None and total_steps < k:
            raise ValueError(f"total_steps={total_steps} leaves no room for k={k} phases")
        self.k, self.iterations, self.batch_size = k, iterations, batch_size
        self.buffer_size = buffer_size if buffer_size is not None else DEFAULT_BUFFER_SIZE
        self._buffer_size_given = buffer_size is not None
        self.buffer_from: BufferSource = buffer_from
        self.variant, self.alpha = variant, float(alpha)
        self.lr, self.momentum, self.weight_decay = float(lr), momentum, weight_decay
        self.lr_schedule = lr_schedule
        self.at_end = at_end
        self.selection_kwargs = dict(head=head, norms=norms, first_conv=first_conv, patterns=tuple(patterns),
                                     head_name=head_name)
        self.modules: ModuleChoice = modules
        self.auto_threshold, self.auto_budget = float(auto_threshold), float(auto_budget)
        #: what ``modules="auto"`` chose and why (``None`` until the first phase, or with ``"fixed"``)
        self.auto_choice: AutoChoice | None = None
        self.freeze_norm_stats = freeze_norm_stats
        self.sensitivity_scope = sensitivity
        self.transform = transform
        self.total_steps_override = total_steps
        self.logits_module = logits_module
        self.seed = seed

        #: k-FPF's own buffer (``None`` while the buffer is shared or not chosen yet, see :attr:`buffer`)
        self.own_buffer: ReservoirBuffer | None = None
        #: the buffer provider (ExperienceReplay, DER, ...) whose buffer is shared, when sharing
        self.replay: BufferProvider | None = None
        #: the resolved source, ``"own"`` or ``"replay"`` (``None`` until ``setup`` for ``"auto"``)
        self.buffer_source: Literal["own", "replay"] | None = None
        #: draws phase batches from a shared buffer (the owner's generator stays untouched)
        self._sample_generator: torch.Generator | None = None
        if buffer_from == "own":
            self.own_buffer = self._new_own_buffer(seed)
            self.buffer_source = "own"
        self._rank_seeded = False
        self.sensitivity = SensitivityTracker({})
        self.ledger = ComputeLedger()
        self.selection: ModuleSelection | None = None
        #: optimizer steps counted over the whole stream (across fits and resumes)
        self.steps = 0
        self.phases_done = 0
        self.schedule: list[int] = []
        self.total_steps: int | None = None
        #: one entry per phase: step, iterations, losses, learning rate
        self.phase_log: list[dict[str, Any]] = []

        self._last_global_step = 0
        self._current: tuple[Tensor, Tensor, Tensor] | None = None
        self._captured: Tensor | None = None
        self._capturing = False
        self._hook: RemovableHandle | None = None
        self._scored_epoch = -1
        self._warned_plan = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(k=self.k, variant=self.variant, at_end=self.at_end)

    @property
    def buffer(self) -> ReservoirBuffer:
        """The buffer the phases draw from: k-FPF's own, or the shared provider's."""
        if self.buffer_source == "replay":
            shared = self.replay.replay_buffer if self.replay is not None else None
            if shared is None:
                raise RuntimeError(f"{type(self).__name__} shares a buffer provider's buffer, which it finds when the "
                                   "Trainer sets it up: read .buffer after trainer.fit has started")
            return shared
        if self.own_buffer is None:
            raise RuntimeError(
                f"{type(self).__name__}(buffer_from={self.buffer_from!r}) chooses its buffer when the Trainer sets "
                "it up (own, or a buffer provider's): read .buffer after trainer.fit has started"
            )
        return self.own_buffer

    @property
    def shares_buffer(self) -> bool:
        """Whether the phases read a buffer provider's buffer (and k-FPF holds none)."""
        return self.buffer_source == "replay"

    @property
    def replay_buffer(self) -> ReservoirBuffer | None:
        """k-FPF's own buffer as a :class:`BufferProvider` (``None`` while it reads another's)."""
        return self.own_buffer

    @contextmanager
    def replay_forward_context(self, samples: dict[str, Tensor]) -> Iterator[None]:
        """A forward on buffer samples (DER's replay) is not the training forward whose logits k-FPF-KD keeps."""
        capturing, self._capturing = self._capturing, False
        try:
            yield
        finally:
            self._capturing = capturing

    def _new_own_buffer(self, seed: int) -> ReservoirBuffer:
        return ReservoirBuffer(self.buffer_size, seed=seed, store_logits=self.variant == "kd")

    # ------------------------------------------------------------------ setup
    def _check_callback_order(self, trainer: pl.Trainer) -> None:
        check_before_batch_extenders(trainer, self, "insert (own buffer) and count (compute ledger) only current "
                                                    "samples")

    def _resolve_buffer(self, trainer: pl.Trainer) -> None:
        """Chooses the phases' buffer (``buffer_from``) and builds what it needs, seeded per rank."""
        name = type(self).__name__
        kd = self.variant == "kd"
        providers = buffer_providers(trainer, exclude=self)
        source = self.buffer_from
        if source == "auto":
            if len(providers) == 1 and kd and not providers[0].stores_logits:
                rank_zero_warn(
                    f"{name}(variant='kd') cannot fine-tune on {type(providers[0]).__name__}'s buffer (it stores no "
                    f"logits), so it keeps a buffer of its own ({self.buffer_size} samples) next to it: twice the "
                    "memory. Use variant='ce' to share that buffer, or buffer_from='own' to silence this warning",
                    category=UserWarning,
                )
                source = "own"
            else:
                source = "replay" if providers else "own"
        if source == "replay":
            if not providers:
                raise ValueError(
                    f"{name}(buffer_from='replay') needs an ExperienceReplay callback (or another buffer provider: "
                    "DER, DERPP) in Trainer(callbacks=[...]) to read its buffer, and there is none: add one, or use "
                    "buffer_from='own' (a buffer of its own)"
                )
            replay = find_buffer_provider(trainer, self)
            assert replay is not None and replay.replay_buffer is not None
            owner = type(replay).__name__
            if kd and not replay.stores_logits:
                raise ValueError(
                    f"buffer_from='replay' cannot be used with variant='kd' here: k-FPF-KD matches the logits stored "
                    f"with each buffer sample, and {owner}'s buffer stores none. Use variant='ce' to fine-tune on it, "
                    "read a DER/DERPP buffer (it stores logits), or buffer_from='own' for a buffer of k-FPF's own"
                )
            capacity = replay.replay_buffer.capacity
            if self._buffer_size_given and self.buffer_size != capacity:
                raise ValueError(
                    f"{name} shares {owner}'s buffer ({capacity} samples), but buffer_size="
                    f"{self.buffer_size} was given: drop buffer_size (a shared buffer has its owner's size), or "
                    "pass buffer_from='own' for a separate buffer of that size"
                )
            if self.own_buffer is not None and self.own_buffer.num_seen > 0:
                raise ValueError(
                    f"{name} already filled a buffer of its own ({self.own_buffer.num_seen} samples seen) and would "
                    f"now read {owner}'s: pass buffer_from='own' to keep its buffer across fits"
                )
            self.replay, self.own_buffer = replay, None
            if not self._rank_seeded or self._sample_generator is None:
                self._sample_generator = torch.Generator().manual_seed(self.seed + trainer.global_rank)
        else:
            if self.buffer_source == "replay":
                raise ValueError(
                    f"{name} used another callback's buffer before (an earlier fit, or the loaded state), and this "
                    "trainer has none to share: keep that callback (e.g. ExperienceReplay) in every fit, or use "
                    "buffer_from='own' from the start"
                )
            self.replay = None
            if self.own_buffer is None or (not self._rank_seeded and self.own_buffer.num_seen == 0):
                self.own_buffer = self._new_own_buffer(self.seed + trainer.global_rank)
        self.buffer_source = source
        self._rank_seeded = True

    def _warn_double_augmentation(self, trainer: pl.Trainer) -> None:
        """A warning, not an error: a ``transform`` on top of the stream's augmentation can be meant
        (a stronger recipe, or a transform that is no augmentation), but by default it is a mistake."""
        dm = self.stream(trainer)
        if self.transform is not None and getattr(dm, "augment", False) is True:
            rank_zero_warn(
                f"{type(self).__name__}(transform=...) is applied to buffer samples, but the stream "
                f"{type(dm).__name__} was built with augment=True: the buffer holds the augmented views the "
                "training steps saw, so phase batches are augmented twice. Pass transform=None to replay the "
                "stored views (as ExperienceReplay does), or build the stream with augment=False if the "
                "transform is meant to be the only augmentation of replayed samples",
                category=UserWarning,
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.stream(trainer)
        self._check_callback_order(trainer)
        self._resolve_buffer(trainer)
        self._warn_double_augmentation(trainer)
        if self.modules == "fixed":
            self.selection = select_modules(pl_module, **self.selection_kwargs)
        else:  # chosen at the first phase from the scores (or restored from the checkpoint then)
            self.selection = None
        if self.sensitivity_scope == "all":
            self.sensitivity.groups = parameter_groups(pl_module)
        elif self.sensitivity_scope == "selected":
            assert self.selection is not None
            self.sensitivity.groups = parameter_groups(pl_module, self.selection.params.values())
        if self.variant == "kd":
            self._register_logits_hook(pl_module)
        where = (f"{type(self.replay).__name__}'s buffer (shared)" if self.shares_buffer
                 else f"its own buffer of {self.buffer_size}")
        what = self.selection.describe() if self.selection is not None else (
            f"the modules whose sensitivity stands out (modules='auto', chosen at the first phase; threshold "
            f"{self.auto_threshold:g}x, budget {100 * self.auto_budget:g}%)")
        rank_zero_info(f"k-FPF fine-tunes {what} on {where}")

    def _register_logits_hook(self, pl_module: pl.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
        target: nn.Module = pl_module
        if self.logits_module is not None:
            modules = dict(pl_module.named_modules())
            if self.logits_module not in modules:
                raise ValueError(
                    f"logits_module={self.logits_module!r} is not a submodule of {type(pl_module).__name__}; "
                    f"top-level modules: {[n for n, _ in pl_module.named_children()]}"
                )
            target = modules[self.logits_module]
        self._hook = target.register_forward_hook(self._capture_logits)

    def _capture_logits(self, module: nn.Module, args: Any, output: Any) -> None:
        """Keeps the first output of the training forward (DER stores the logits of the training
        pass at insertion time: no extra forward). Forwards without gradients (other callbacks'
        probes, e.g. FLOP counting) are not the training forward and are skipped."""
        if (self._capturing and self._captured is None and isinstance(output, Tensor)
                and torch.is_grad_enabled()):
            self._captured = output.detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ the plan
    def _limit(self, trainer: pl.Trainer) -> int | float:
        limit = trainer.limit_train_batches
        return 1.0 if limit is None else limit

    def _epoch_sample_counts(self, trainer: pl.Trainer) -> list[int]:
        dm = self.stream(trainer)
        sizes = [dm.experience_info(i).num_train_samples for i in range(dm.num_experiences)]
        if dm.joint and dm.pinned_experience is None:
            sizes = [sum(sizes)]
        return [n for n in sizes for _ in range(dm.epochs_per_experience)]

    def plan_total(self, trainer: pl.Trainer) -> int:
        """``N``: the whole stream's optimizer steps (``total_steps`` when given)."""
        if self.total_steps_override is not None:
            return self.total_steps_override
        dm = self.stream(trainer)
        total = stream_optimizer_steps(self._epoch_sample_counts(trainer), dm.batch_size, trainer.world_size,
                                       trainer.accumulate_grad_batches, self._limit(trainer))
        if dm.pinned_experience is None and trainer.max_steps is not None and trainer.max_steps > 0:
            total = min(total, trainer.max_steps)
        return total

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step
        self._scored_epoch = -1
        total = self.plan_total(trainer)
        schedule = phase_schedule(total, self.k, self.at_end)
        if self.schedule and schedule != self.schedule:
            rank_zero_warn(f"k-FPF phase schedule changed on resume from {self.schedule} to {schedule}")
        self.total_steps, self.schedule = total, schedule
        if self.sensitivity_scope != "off" and not self.sensitivity.snapshot:
            self.sensitivity.take_snapshot()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        dm = self.stream(trainer)
        if self.total_steps_override is not None or self._warned_plan:
            return
        n = dm.experience_info(dm.experience_at_epoch(trainer.current_epoch)).num_train_samples
        if dm.joint and dm.pinned_experience is None:
            n = len(dm.train_dataset(0))
        expected = optimizer_steps_per_epoch(n, dm.batch_size, trainer.world_size, 1, self._limit(trainer))
        have = trainer.num_training_batches
        if have != float("inf") and int(have) != expected:
            self._warned_plan = True
            rank_zero_warn(
                f"k-FPF planned {expected} batches for epoch {trainer.current_epoch} but the loader has {have}: "
                "phases will not be evenly spaced; pass total_steps= (the stream's optimizer steps) to KFPF"
            )

    # ------------------------------------------------------------------ batches
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, (list, tuple)) or len(batch) != 3:
            raise TypeError(
                f"{type(self).__name__} needs stream batches (x, y, task_label); got "
                f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}"
            )
        x, y, t = batch
        if self.ledger.flops_per_sample == 0.0:
            self.ledger.flops_per_sample = forward_flops_per_sample(pl_module, x)
        self._current = (x, y, t)
        self._captured = None
        self._capturing = self.variant == "kd"

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._capturing = False
        if self._current is None:
            raise RuntimeError(f"{type(self).__name__}.on_train_batch_end ran without on_train_batch_start")
        x, y, t = self._current
        self._current = None
        if not self.shares_buffer:  # a shared buffer is filled by its owner
            self._insert(x, y, t)
        self.ledger.train_samples += int(y.shape[0])

        if trainer.global_step > self._last_global_step:
            self.steps += trainer.global_step - self._last_global_step
        self._last_global_step = trainer.global_step
        if batch_idx + 1 == trainer.num_training_batches:
            # score the epoch's training before a phase that runs on its last step changes the model
            self._score_epoch(trainer, pl_module)
        while self.phases_done < len(self.schedule) and self.steps >= self.schedule[self.phases_done]:
            result = self.run_phase(trainer, pl_module)
            pl_module.log("kfpf/phase_loss", result.mean_loss, on_step=True, on_epoch=False, batch_size=1)

    def _insert(self, x: Tensor, y: Tensor, t: Tensor) -> None:
        logits = None
        if self.variant == "kd":
            out = self._captured
            self._captured = None
            where = self.logits_module or "the LightningModule's forward"
            if out is None:
                raise RuntimeError(
                    f"k-FPF-KD found no logits from {where} in this training step: the training_step must call "
                    "it (self(x)) and it must return a logits tensor; or set logits_module= to the submodule "
                    "that returns the logits"
                )
            if out.dim() != 2 or out.shape[0] < y.shape[0]:
                raise RuntimeError(
                    f"k-FPF-KD expected logits of shape (>= {y.shape[0]}, classes) from {where}, got "
                    f"{tuple(out.shape)}: set logits_module= to the submodule that returns the logits"
                )
            logits = out[: y.shape[0]]
        self.buffer.add(x, y, t, logits=logits)

    def _score_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Sensitivity scores of the epoch (once per epoch), logged as ``kfpf/sensitivity/<group>``."""
        epoch = trainer.current_epoch
        if self._scored_epoch == epoch:
            return
        self._scored_epoch = epoch
        if self.sensitivity_scope != "off":
            experience = self.stream(trainer).experience_at_epoch(epoch)
            for group, score in self.sensitivity.update(epoch, experience).items():
                pl_module.log(f"kfpf/sensitivity/{group}", score, on_step=False, on_epoch=True, batch_size=1)

    def _log_ledger(self, pl_module: pl.LightningModule) -> None:
        """The compute ledger so far (phases of this epoch included)."""
        report = self.ledger.report()
        for key in ("fpf_iterations", "fpf_share", "fpf_vs_replay"):
            pl_module.log(f"kfpf/{key}", report[key], on_step=False, on_epoch=True, batch_size=1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # loaders without a length: the last batch was not recognised, score here instead (after any
        # phase of the last step, whose change the snapshot shift of run_phase leaves out anyway)
        if self._scored_epoch != trainer.current_epoch:
            self._score_epoch(trainer, pl_module)
        self._log_ledger(pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phases_done < len(self.schedule) and self._stream_finished(trainer):
            rank_zero_warn(
                f"k-FPF ran {self.phases_done} of {len(self.schedule)} phases: training ended after {self.steps} "
                f"optimizer steps, the plan counted {self.schedule[-1]}. Running the rest now, after the last "
                "validation; pass total_steps= to KFPF to fix the plan"
            )
            while self.phases_done < len(self.schedule):
                self.run_phase(trainer, pl_module)

    def _stream_finished(self, trainer: pl.Trainer) -> bool:
        dm = self.stream(trainer)
        done = trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs
        if dm.pinned_experience is not None:
            return done and dm.pinned_experience == dm.num_experiences - 1
        return done

    # ------------------------------------------------------------------ one phase
    def run_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PhaseResult:
        """One FPF phase on the buffer: ``iterations`` steps of a fresh SGD over the selected modules
        only, under the trainer's precision; the main optimizer and scheduler are not touched."""
        selection = self._ensure_selection(trainer, pl_module)
        buffer = self.buffer
        if len(buffer) == 0:
            whose = f"{type(self.replay).__name__}'s shared buffer is" if self.shares_buffer else "its buffer is"
            raise RuntimeError(
                f"{type(self).__name__} cannot run a phase: {whose} empty (no training batch was inserted before "
                "the phase). Phases run after training steps; call run_phase only once training has started"
            )
        device = pl_module.device
        lr = self.lr

        def sample() -> dict[str, Tensor]:
            b = self._draw(buffer, device)
            if self.transform is not None:
                b["x"] = self.transform(b["x"])
            return b

        masked = getattr(pl_module, "masked_logits", None)
        mask = (lambda lg, t: masked(lg, t, evaluation=False)) if callable(masked) else None
        reduce = (lambda v: trainer.strategy.reduce(v, reduce_op="mean")) if trainer.world_size > 1 else None
        scaler = None
        main_scaler = getattr(trainer.precision_plugin, "scaler", None)
        if main_scaler is not None and main_scaler.is_enabled():
            scaler = torch.amp.GradScaler(device.type)
        watching = self.sensitivity_scope != "off" and bool(self.sensitivity.snapshot)
        before = self.sensitivity.current() if watching else None
        with torch.enable_grad():
            result = run_fpf_phase(
                pl_module, selection, sample, pl_module, self.iterations, lr,
                momentum=self.momentum, weight_decay=self.weight_decay,
                alpha=self.alpha if self.variant == "kd" else 0.0, mask=mask,
                freeze_norm_stats=self.freeze_norm_stats, autocast=trainer.precision_plugin.forward_context,
                reduce=reduce, scaler=scaler, lr_schedule=self.lr_schedule,
            )
        if before is not None:  # the sensitivity scores measure training, not the phase
            self.sensitivity.exclude_change_since(before)
        self.phases_done += 1
        self.ledger.fpf_phases += 1
        self.ledger.fpf_iterations += result.iterations
        self.ledger.fpf_samples += result.samples
        self.phase_log.append({"step": self.steps, "iterations": result.iterations, "lr": lr,
                               "first_loss": result.first_loss, "last_loss": result.last_loss})
        return result

    def _ensure_selection(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ModuleSelection:
        """The modules to fine-tune: the fixed list, or the ``"auto"`` choice (restored from the
        checkpoint, else made now from the sensitivity scores so far, the same on every rank)."""
        if self.selection is not None:
            return self.selection
        if self.modules != "auto":
            raise RuntimeError(f"{type(self).__name__} has no module selection: it was not set up by a Trainer")
        kwargs = {k: self.selection_kwargs[k] for k in ("head", "head_name", "patterns")}
        if self.auto_choice is None:
            _, choice = select_by_sensitivity(
                pl_module, self.sensitivity.history, self.sensitivity.peek(), self.auto_threshold,
                self.auto_budget, **kwargs)
            if trainer.world_size > 1:  # running statistics differ across ranks: rank 0's choice for all
                choice = AutoChoice.from_dict(trainer.strategy.broadcast(choice.to_dict(), src=0))
            self.auto_choice = choice
            if not choice.groups:
                rank_zero_warn(f"k-FPF modules='auto': no module reached {self.auto_threshold:g}x the median "
                               f"module's change (flat scores, e.g. under Adam); fine-tuning the head and patterns "
                               f"only. {choice.describe()}")
        self.selection = selection_from_groups(pl_module, self.auto_choice.groups, self.auto_choice.scores,
                                               **kwargs)
        rank_zero_info(f"k-FPF modules='auto' fine-tunes {self.selection.describe()}: {self.auto_choice.describe()}")
        return self.selection

    def _draw(self, buffer: ReservoirBuffer, device: torch.device) -> dict[str, Tensor]:
        """A phase batch: from k-FPF's own buffer with its generator; from a shared buffer, uniformly
        without replacement among its filled slots with k-FPF's private generator (the owner's
        generator, which drives its reservoir and replay draws, is not advanced)."""
        if not self.shares_buffer:
            return buffer.sample(self.batch_size, device=device)
        assert self._sample_generator is not None
        return buffer.sample(self.batch_size, device=device, generator=self._sample_generator)

    def compute_report(self) -> dict[str, float]:
        """FPF's compute versus training and versus every-step replay (see ``ComputeLedger``)."""
        return self.ledger.report()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """k-FPF's state, every rank's under DDP (each rank's buffer and generator differ). A shared
        buffer is saved by its owner (``ExperienceReplay``); only the generator that draws phase
        batches from it is saved here."""
        return with_rank_states({
            "buffer_source": self.buffer_source,
            "buffer_owner": type(self.replay).__name__ if self.replay is not None else None,
            "buffer": self.own_buffer.state_dict() if self.own_buffer is not None else None,
            "sample_rng": self._sample_generator.get_state() if self._sample_generator is not None else None,
            "rank_seeded": self._rank_seeded,
            "steps": self.steps,
            "phases_done": self.phases_done,
            "schedule": list(self.schedule),
            "phase_log": [dict(e) for e in self.phase_log],
            "ledger": self.ledger.state_dict(),
            "sensitivity": self.sensitivity.state_dict(),
            "auto_choice": self.auto_choice.to_dict() if self.auto_choice is not None else None,
        })

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the state (Lightning calls it after ``setup``, which has chosen the buffer)."""
        state_dict = own_rank_state(state_dict, type(self).__name__)
        source = state_dict.get("buffer_source", "own")  # checkpoints from before buffer sharing: own
        if source is None:
            raise ValueError(f"the checkpoint's {type(self).__name__} state was saved before its buffer was chosen")
        if self.buffer_source is not None and source != self.buffer_source:
            saved_owner = state_dict.get("buffer_owner") or "ExperienceReplay"  # the only provider before
            owner = type(self.replay).__name__ if self.replay is not None else "another callback"
            was = "a buffer of its own" if source == "own" else f"{saved_owner}'s buffer"
            now = "a buffer of its own" if self.buffer_source == "own" else f"{owner}'s buffer"
            raise ValueError(
                f"the checkpoint's {type(self).__name__} phases used {was}, but this run uses "
                f"{now}: resume with buffer_from={source!r} and the same callbacks "
                "(an ExperienceReplay callback exactly when the checkpoint had one to share)"
            )
        if source == "own":
            if self.own_buffer is None:
                self.own_buffer = self._new_own_buffer(self.seed)
            self.own_buffer.load_state_dict(state_dict["buffer"])
        else:
            if self._sample_generator is None:
                self._sample_generator = torch.Generator()
            self._sample_generator.set_state(state_dict["sample_rng"])
        self.buffer_source = source
        self._rank_seeded = bool(state_dict.get("rank_seeded", True))
        self.steps = int(state_dict["steps"])
        self.phases_done = int(state_dict["phases_done"])
        self.schedule = list(state_dict["schedule"])
        self.phase_log = [dict(e) for e in state_dict["phase_log"]]
        self.ledger.load_state_dict(state_dict["ledger"])
        self.sensitivity.load_state_dict(state_dict["sensitivity"])
        auto = state_dict.get("auto_choice")
        if auto is not None and self.modules != "auto":
            raise ValueError(f"the checkpoint's {type(self).__name__} chose its modules automatically "
                             "(modules='auto'): resume with modules='auto' to fine-tune the same ones")
        self.auto_choice = AutoChoice.from_dict(auto) if auto is not None else None
        if self.modules == "auto":
            self.selection = None  # rebuilt from the restored choice at the next phase


class FPF(KFPF):
    """FPF: one fine-tuning phase of the forgetting-prone modules at the very end of the stream, on
    top of any method (put it before ``ExperienceReplay`` in the callback list for FPF after ER).

    Same arguments as :class:`KFPF` except ``k`` and ``at_end`` (fixed to 1 and True). The default
    ``iterations=200`` is this library's choice (the paper's could not be verified).
    ``buffer_from="auto"`` (default): with an ``ExperienceReplay`` callback in the trainer, FPF
    fine-tunes on ER's buffer, as the paper applies FPF to the buffer of the method it follows, and
    holds none of its own; without one (FPF on top of a method without a buffer) it fills its own
    reservoir of ``buffer_size`` samples. ``"replay"`` / ``"own"`` force either.
    """

    def __init__(self, iterations: int = 200, buffer_from: BufferSource = "auto", **kwargs: Any) -> None:
        for fixed in ("k", "at_end"):
            if fixed in kwargs:
                raise TypeError(f"FPF fixes {fixed}; use KFPF(k=..., at_end=...) for periodic phases")
        super().__init__(k=1, iterations=iterations, at_end=True, buffer_from=buffer_from, **kwargs)
