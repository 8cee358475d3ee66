"""DER and DER++ (Buzzega et al., NeurIPS 2020) as Lightning callbacks over :mod:`cl_plugins.der`.

The user's ``training_step`` is unchanged and its loss stays the current batch's own loss. A forward
hook on the model (the LightningModule, or ``logits_module``) sees the step's training forward and:

1. keeps the logits of the step's current samples (the first rows of that output: the raw outputs,
   before any masking the step applies, as mammoth stores ``outputs.data``);
2. runs the model on a replay minibatch from the buffer (and on a second, independent one for
   DER++), in forwards of their own as mammoth does, and attaches ``alpha * MSE + beta * CE`` to the
   training output with the aux-loss op (:func:`cl_plugins.attach_aux_loss`): one backward, and
   Lightning's gradient accumulation, AMP scaling and DDP gradient sync apply unchanged.

After the optimizer step (``on_train_batch_end``) the current samples enter the reservoir with the
logits kept in step 1, as mammoth inserts after ``opt.step()``. The replay forwards run inside
:func:`cl_plugins.buffer_contract.replay_forward`, so other callbacks' hooks can tell them from the
training forward (k-FPF-KD skips them, LoRAMoE types their samples).

Under DDP each rank keeps its own buffer over its shard (seeded ``seed + rank``); the checkpoint holds
every rank's buffer (:mod:`cl_plugins.rank_state`), so a resumed run continues exactly. The terms are
logged as ``der/loss`` (weighted sum), ``der/mse`` and, for DER++, ``der/ce`` (unweighted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from callbacks.base import ContinualCallback
from cl_plugins.aux_loss import attach_aux_loss
from cl_plugins.buffer_contract import (
    BufferProvider,
    ReplayForwardListener,
    check_before_batch_extenders,
    replay_forward,
)
from cl_plugins.buffers import BufferKind, ReservoirBuffer, make_buffer
from cl_plugins.der import DarkExperienceReplay, check_weight
from cl_plugins.rank_state import own_rank_state, with_rank_states

LogitScope = Literal["all", "task"]


class DER(ContinualCallback, BufferProvider, ReplayForwardListener):
    """Dark Experience Replay: ``alpha * MSE`` between the model's outputs on buffer samples and the
    logits stored when they were inserted.

    Args:
        alpha: weight of the logit-matching term (mammoth's best Seq-CIFAR-10 value for both buffer
            sizes, 0.3, by default; ``docs/methods/der.md`` lists the published values).
        buffer_size: samples kept (per rank under DDP).
        replay_batch_size: replay minibatch size (mammoth's ``minibatch_size``); default: the current
            batch's size, as mammoth when it is not given.
        buffer: ``"reservoir"`` (DER's) or ``"class_balanced"`` (:class:`cl_plugins.buffers.ClassBalancedBuffer`).
        transform: applied to buffer inputs (on device) before the replay forwards; mammoth stores
            non-augmented inputs and augments them here. The buffer stores the inputs as the batch
            delivers them, so give it with a stream that does not augment (see the method notes).
        logit_scope: ``"all"`` (mammoth: every output) or ``"task"`` (task-incremental streams only:
            the MSE covers the outputs of each sample's task).
        logits_module: qualified name of the submodule whose output are the logits (default: the
            LightningModule's own forward, called as ``self(x)`` in the ``training_step``). The
            module must take the input tensor alone, as the replay forwards call it that way.
        seed: seeds the buffer's generator (plus the global rank), which draws insertions and replay.

    DER++'s cross-entropy term (:class:`DERPP`) masks logits with the module's ``masked_logits`` when
    it has one (:class:`cl_plugins.ContinualClassificationMixin`: task-IL masking, as the user's loss).
    """

    extends_batch = False

    def __init__(
        self,
        alpha: float = 0.3,
        buffer_size: int = 500,
        replay_batch_size: int | None = None,
        buffer: BufferKind = "reservoir",
        transform: Callable[[Tensor], Tensor] | None = None,
        logit_scope: LogitScope = "all",
        logits_module: str | None = None,
        seed: int = 0,
        beta: float = 0.0,
    ) -> None:
        super().__init__()
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be >= 1, got {replay_batch_size}")
        if replay_batch_size is not None and replay_batch_size > buffer_size:
            raise ValueError(
                f"replay_batch_size={replay_batch_size} exceeds buffer_size={buffer_size}: a replay minibatch holds "
                "at most the whole buffer. Lower replay_batch_size or raise buffer_size"
            )
        if logit_scope not in ("all", "task"):
            raise ValueError(f"logit_scope must be 'all' or 'task', got {logit_scope!r}")
        self.buffer_size, self.buffer_kind, self.seed = buffer_size, buffer, seed
        self.transform, self.logit_scope, self.logits_module = transform, logit_scope, logits_module
        self.core = DarkExperienceReplay(make_buffer(buffer, buffer_size, seed=seed, store_logits=True),
                                         alpha=alpha, beta=beta, batch_size=replay_batch_size)
        self._rank_seeded = False
        self._hook: RemovableHandle | None = None
        self._target: nn.Module | None = None
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None
        self._current: tuple[Tensor, Tensor, Tensor] | None = None
        self._logits: Tensor | None = None
        self._armed = False
        self._replaying = 0
        self._task_classes: Tensor | None = None  # (tasks, outputs) bool, for logit_scope="task"

    # ------------------------------------------------------------------ contract
    @property
    def buffer(self) -> ReservoirBuffer:
        """The reservoir of ``(x, y, t, logits)`` samples."""
        return self.core.buffer

    @property
    def replay_buffer(self) -> ReservoirBuffer:
        return self.core.buffer

    @property
    def alpha(self) -> float:
        return self.core.alpha

    @property
    def beta(self) -> float:
        return self.core.beta

    @property
    def replay_batch_size(self) -> int | None:
        return self.core.batch_size

    @contextmanager
    def replay_forward_context(self, samples: dict[str, Tensor]) -> Iterator[None]:
        """Any replay forward (this callback's or another's) is not the training forward."""
        self._replaying += 1
        try:
            yield
        finally:
            self._replaying -= 1

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = self.stream(trainer)
        check_before_batch_extenders(trainer, self, "store only the current samples with their logits")
        if self.logit_scope == "task" and dm.scenario != "task":
            raise ValueError(
                f"{type(self).__name__}(logit_scope='task') matches the outputs of each sample's task, which needs a "
                f"task-incremental stream; this stream is {dm.scenario}-incremental. Use logit_scope='all'"
            )
        if not self._rank_seeded and self.buffer.num_seen == 0:
            self.core.buffer = make_buffer(self.buffer_kind, self.buffer_size, seed=self.seed + trainer.global_rank,
                                           store_logits=True)
            self._rank_seeded = True
        self._task_classes = None
        self._register_hook(pl_module)

    def _register_hook(self, pl_module: pl.LightningModule) -> None:
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
        self._target = target
        self._hook = target.register_forward_hook(self._on_forward)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not isinstance(batch, (list, tuple)) or len(batch) != 3:
            raise TypeError(
                f"{type(self).__name__} needs stream batches (x, y, task_label); got {type(batch).__name__}"
                f"{f' of length {len(batch)}' if hasattr(batch, '__len__') else ''}"
            )
        self._current = (batch[0], batch[1], batch[2])
        self._trainer, self._module = trainer, pl_module
        self._logits, self._armed = None, True

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        """The step's training forward: keep its current logits, attach the replay terms."""
        if not self._armed or self._replaying or not torch.is_grad_enabled():
            return None
        self._armed = False
        where = self.logits_module or "the LightningModule's forward"
        assert self._current is not None
        n = self._current[1].shape[0]
        if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] < n:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise TypeError(
                f"{type(self).__name__} expected logits of shape (>= {n}, classes) from {where}, got {shape}: set "
                "logits_module= to the submodule that returns the logits"
            )
        self._logits = output[:n].detach()
        terms = self.core.replay_terms(self._forward_samples, n, device=output.device,
                                       ce_logits=self._ce_logits(), logit_mask=self._logit_mask(output.shape[1]))
        if terms is None:
            return None
        self.aux.record("der/mse", terms.mse)
        if terms.ce is not None:
            self.aux.record("der/ce", terms.ce)
        return attach_aux_loss(output, terms.total, self.aux, "der/loss")

    def _forward_samples(self, samples: dict[str, Tensor]) -> Tensor:
        """The model's raw outputs on buffer samples, announced as a replay forward."""
        assert self._target is not None and self._trainer is not None
        x = samples["x"]
        if self.transform is not None:
            x = self.transform(x)
        with replay_forward(self._trainer, samples):
            out = self._target(x)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"{type(self).__name__} ran the logits module on {x.shape[0]} buffer samples and got "
                            f"{shape}, not (samples, classes) logits")
        return out

    def _ce_logits(self) -> Callable[[Tensor, Tensor], Tensor] | None:
        masked = getattr(self._module, "masked_logits", None)
        if not callable(masked):
            return None
        return lambda logits, t: masked(logits, t, evaluation=False)

    def _logit_mask(self, num_outputs: int) -> Callable[[Tensor], Tensor] | None:
        if self.logit_scope == "all":
            return None
        if self._task_classes is None or self._task_classes.shape[1] != num_outputs:
            assert self._trainer is not None
            dm = self.stream(self._trainer)
            tasks = 1 + max(t for ts in dm.task_labels for t in ts)
            table = torch.zeros(tasks, num_outputs, dtype=torch.bool)
            for classes, task_labels in zip(dm.classes_in_experience, dm.task_labels):
                if max(classes) >= num_outputs:
                    raise ValueError(f"the stream has class {max(classes)} but the model {num_outputs} outputs")
                for t in task_labels:
                    table[t, list(classes)] = True
            self._task_classes = table
        table = self._task_classes
        return lambda t: table.to(t.device)[t.long()]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._armed = False
        current, logits = self._current, self._logits
        self._current, self._logits = None, None
        if current is None:
            raise RuntimeError(f"{type(self).__name__}.on_train_batch_end ran without on_train_batch_start")
        if logits is None:
            where = self.logits_module or type(pl_module).__name__
            raise RuntimeError(
                f"{type(self).__name__} saw no training forward of {where} in this step: the training_step must call "
                "it on the batch (self(x)) with gradients enabled, or set logits_module= to the submodule it calls"
            )
        x, y, t = current
        self.core.insert(x, y, t, logits)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # every rank's buffer (each fills its own from its shard), gathered for rank zero's checkpoint
        return with_rank_states({"buffer": self.buffer.state_dict(), "rank_seeded": self._rank_seeded})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = own_rank_state(state_dict, type(self).__name__)
        self.buffer.load_state_dict(state_dict["buffer"])
        self._rank_seeded = bool(state_dict.get("rank_seeded", True))


class DERPP(DER):
    """DER++: DER plus ``beta * CE`` on a second, independent replay minibatch with its stored labels.

    Same arguments as :class:`DER`; the defaults ``alpha=0.2``, ``beta=0.5`` are mammoth's best
    Seq-CIFAR-10 values for a 500-sample buffer (``docs/methods/der.md``).
    """

    def __init__(self, alpha: float = 0.2, beta: float = 0.5, **kwargs: Any) -> None:
        if check_weight("beta", beta) == 0:
            raise ValueError("DERPP(beta=0) is DER: use DER(...) for logit matching alone, or give beta > 0")
        super().__init__(alpha=alpha, beta=beta, **kwargs)
