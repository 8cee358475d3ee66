"""Learning without Forgetting as a Lightning callback, following Mammoth's ``models/lwf.py``.

- ``on_experience_end``: a frozen copy of the model (eval mode, no gradients, not a submodule of
  the LightningModule: no optimizer sees it and it is not in the module's ``state_dict``) becomes
  the old model;
- ``on_experience_start`` (experiences after the first): Mammoth's warm-up, a few epochs of plain
  SGD on the head alone, with the model in eval mode and the loss over the new classes' outputs
  only, so the new classes' rows start from the old features (:func:`cl_plugins.kfpf.phase.run_fpf_phase`
  runs it: own optimizer, every flag and mode restored, gradients all-reduced under DDP);
- every training step: a forward hook on the module that maps inputs to logits runs the old model
  on the same inputs (no gradients, same autocast) and attaches
  ``alpha * lwf_distillation(new, old, old classes, T)`` (float32) to the logits through the aux-loss
  op, logged as ``lwf/distill``. The user's ``training_step`` is untouched.

The old model's weights are in the callback's ``state_dict``, so a checkpoint resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from callbacks.base import ContinualCallback
from cl_plugins.baselines.lwf import check_lwf_hparams, lwf_distillation, old_class_groups
from cl_plugins.drtune.features import frozen_copy
from cl_plugins.kfpf.phase import PhaseResult, run_fpf_phase
from cl_plugins.kfpf.selection import select_modules


class LwF(ContinualCallback):
    """Learning without Forgetting (Mammoth's softmax distillation over the old classes).

    Args:
        alpha: weight of the distillation term (Mammoth's ``--alpha``; best args 1 on Seq-MNIST, 3 on
            Seq-CIFAR-10).
        temperature: softmax temperature ``T`` (``--softmax_temp``; 2).
        per_task: one softmax per old task instead of one over all old classes (the original
            multi-head LwF); task-incremental streams only.
        warmup_epochs: epochs of Mammoth's head warm-up before each experience after the first;
            ``None``: the stream's ``epochs_per_experience`` (Mammoth's ``n_epochs``); 0: none.
        warmup_lr: learning rate of the warm-up's SGD (default: the main optimizer's first group, as
            Mammoth's ``args.lr``).
        head_name: qualified name of the head for the warm-up (default: :func:`~cl_plugins.protocols.find_head`).
        encoder: qualified name of the submodule that the ``training_step`` calls with the inputs and
            that returns the logits (default: the LightningModule itself, called as ``self(x)``).
    """

    term_name = "lwf/distill"

    def __init__(
        self,
        alpha: float = 1.0,
        temperature: float = 2.0,
        per_task: bool = False,
        warmup_epochs: int | None = None,
        warmup_lr: float | None = None,
        head_name: str | None = None,
        encoder: str | None = None,
    ) -> None:
        super().__init__()
        check_lwf_hparams(alpha, temperature)
        if warmup_epochs is not None and warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0 (0: no head warm-up), got {warmup_epochs}")
        if warmup_lr is not None and not warmup_lr > 0:
            raise ValueError(f"warmup_lr must be > 0, got {warmup_lr}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.per_task = per_task
        self.warmup_epochs = warmup_epochs
        self.warmup_lr = warmup_lr
        self.head_name = head_name
        self.encoder = encoder
        #: the frozen model of the end of the previous experience (``None`` during the first)
        self.old_model: nn.Module | None = None
        #: the groups of old outputs distilled in the current experience
        self.groups: list[list[int]] = []
        #: what each warm-up did, by experience
        self.warmups: dict[int, PhaseResult] = {}
        self._root: nn.Module | None = None
        self._hook: RemovableHandle | None = None
        self._pending = False
        self._pending_state: dict[str, Any] | None = None
        self._warned_missing = False

    # ------------------------------------------------------------------ set-up
    def _resolve_root(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.encoder is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.encoder)
        except AttributeError as err:
            raise ValueError(
                f"encoder={self.encoder!r} is not a submodule of {type(pl_module).__name__}: name the submodule "
                "that the training_step calls with the inputs and that returns the logits (top-level submodules: "
                f"{[n for n, _ in pl_module.named_children()]}), or leave encoder=None for self(x)"
            ) from err

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        dm = self.stream(trainer)
        if self.per_task and dm.scenario != "task":
            raise ValueError(
                f"LwF(per_task=True) distils each old task's head separately, which needs task labels: the stream "
                f"is {dm.scenario}-incremental. Use per_task=False (one softmax over the old classes, Mammoth's "
                "class-IL LwF) or a task-incremental stream (scenario='task')"
            )
        self._root = self._resolve_root(pl_module)
        pending, self._pending_state = self._pending_state, None
        if pending is not None and pending.get("old_model") is not None:
            self.old_model = frozen_copy(self._root, exclude=[trainer])
            self.old_model.load_state_dict(pending["old_model"])
        if self.old_model is not None:
            self.old_model.to(pl_module.device)
        if self._hook is not None:
            self._hook.remove()
        self._hook = self._root.register_forward_hook(self._distil, with_kwargs=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._pending = False

    # ------------------------------------------------------------------ the term
    def distillation(self, new_logits: Tensor, old_logits: Tensor) -> Tensor:
        """``alpha *`` the distillation loss over the current groups (float32)."""
        return self.alpha * lwf_distillation(new_logits, old_logits, self.groups, self.temperature)

    def _distil(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not (self._pending and module.training and torch.is_grad_enabled()):
            return None
        self._pending = False
        if not isinstance(output, Tensor) or output.dim() != 2:
            raise TypeError(
                f"LwF distils the logits that {type(module).__name__} returns, but it returned "
                f"{type(output).__name__}{tuple(output.shape) if isinstance(output, Tensor) else ''}: name the "
                "submodule that returns (batch, classes) logits with encoder=..."
            )
        assert self.old_model is not None
        with torch.no_grad():
            old = self.old_model(*args, **kwargs)
        return self.attach_loss(output, self.distillation(output, old), self.term_name)

    # ------------------------------------------------------------------ experiences
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every epoch, not only at experience starts: a run resumed mid-experience needs the groups too
        dm = self.stream(trainer)
        self.groups = old_class_groups(dm.classes_in_experience, dm.task_labels, dm.current_experience, self.per_task)
        super().on_train_epoch_start(trainer, pl_module)

    def on_experience_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> None:
        dm = self.stream(trainer)
        if experience == 0:
            return
        if self.old_model is None:
            if not self._warned_missing:
                rank_zero_warn(
                    f"LwF: experience {experience} starts without an old model (the callback did not see the end of "
                    "the previous experience, and no checkpoint state was loaded), so nothing is distilled. Reuse the "
                    "same LwF instance across fit calls, or resume from a checkpoint that holds its state"
                )
                self._warned_missing = True
            return
        epochs = dm.epochs_per_experience if self.warmup_epochs is None else self.warmup_epochs
        if epochs > 0:
            self.warmups[experience] = self.warmup(trainer, pl_module, experience, epochs)

    def on_experience_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> None:
        assert self._root is not None
        self.old_model = None  # free the previous copy first
        self.old_model = frozen_copy(self._root, exclude=[trainer])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._pending = self.old_model is not None and self.alpha > 0 and bool(self.groups)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._pending = False

    # ------------------------------------------------------------------ Mammoth's head warm-up
    def warmup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int, epochs: int
               ) -> PhaseResult | None:
        """``epochs`` passes of plain SGD over the training loader on the head only, model in eval mode,
        cross-entropy over the new classes' outputs (Mammoth's ``begin_task``). Returns ``None`` when the
        experience brings no new class (nothing to warm up)."""
        dm = self.stream(trainer)
        seen_before = {c for classes in dm.classes_in_experience[:experience] for c in classes}
        new = sorted(set(dm.classes_in_experience[experience]) - seen_before)
        loader = trainer.train_dataloader
        if not new or loader is None or len(loader) == 0:
            return None
        selection = select_modules(pl_module, head=True, norms=False, first_conv=False, head_name=self.head_name)
        device = pl_module.device
        lr = self.warmup_lr
        if lr is None:
            optimizers = getattr(trainer, "optimizers", None) or []
            if not optimizers:
                raise RuntimeError("LwF's warm-up takes the main optimizer's learning rate, but the trainer has no "
                                   "optimizer: pass warmup_lr=")
            lr = float(optimizers[0].param_groups[0]["lr"])

        def batches() -> Iterator[dict[str, Tensor]]:
            for _ in range(epochs):
                for batch in loader:
                    batch = trainer.strategy.batch_to_device(batch)
                    t = batch[2] if len(batch) > 2 else torch.zeros_like(batch[1])
                    yield {"x": trainer.precision_plugin.convert_input(batch[0]), "y": batch[1], "t": t}

        stream = batches()
        keep: Tensor | None = None

        def new_classes_only(logits: Tensor, task_labels: Tensor) -> Tensor:
            nonlocal keep
            if keep is None or keep.shape[0] != logits.shape[-1]:
                keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                keep[new] = True
            return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)

        reduce = (lambda v: trainer.strategy.reduce(v, reduce_op="mean")) if trainer.world_size > 1 else None
        main_scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaler = torch.amp.GradScaler(device.type) if main_scaler is not None and main_scaler.is_enabled() else None
        assert self._root is not None
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            with torch.enable_grad():
                return run_fpf_phase(
                    pl_module, selection, lambda: next(stream), self._root, epochs * len(loader), lr,
                    mask=new_classes_only, freeze_norm_stats=True, autocast=trainer.precision_plugin.forward_context,
                    reduce=reduce, scaler=scaler,
                )
        finally:
            for m, mode in modes:
                m.training = mode

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"old_model": None if self.old_model is None else self.old_model.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps the old model's weights until ``on_fit_start`` rebuilds the frozen copy (Lightning restores
        callbacks before that hook)."""
        self._pending_state = state_dict
