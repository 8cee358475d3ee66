"""LightningModule mixin for classification on a continual stream (ARCHITECTURE.md section 3)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_plugins.steplog import NonFiniteWatch, log_this_step


class ContinualClassificationMixin:
    """Standard ``training_step`` / ``validation_step`` for ``(x, y, task_label)`` stream batches.

    - task-incremental streams: logits are masked to the classes of each sample's task, in
      training and evaluation (a multi-head classifier by masking);
    - class-incremental streams: evaluation covers the classes seen so far
      (``mask_unseen_classes``); training uses every output, or the classes seen so far with
      ``train_on_seen_classes`` (as mammoth's ``lwf.py`` trains);
    - validation logs ``val/loss_exp{j}`` and ``val/acc_exp{j}`` for test experience ``j`` and
      returns ``{"preds", "target"}`` for the metrics callback, and on class-IL streams also
      ``"task_il_preds"`` (the arg-max over experience ``j``'s classes: the task-IL accuracy of a class-IL
      run, as the DER paper's tables report it);
    - ``train/loss`` is logged where Lightning writes step metrics (every ``log_every_n_steps``) and at the
      last batch of each epoch, not every step (``self.log`` costs about a small model's step); a non-finite
      training loss raises ``FloatingPointError`` with what to change at the next of those steps (checking
      every step would make the host wait for the device every step).

    The host class is a ``LightningModule`` whose ``forward(x)`` returns logits.
    """

    #: in class-IL evaluation, restrict predictions to the classes seen so far
    mask_unseen_classes: bool = True
    #: in class-IL training, the cross-entropy over the classes seen so far only (default: every output)
    train_on_seen_classes: bool = False

    # ---- masks from the stream (built once per stream, experience and device: read on every step)
    def _stream(self) -> Any:
        trainer = getattr(self, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        # looked up without running a property (hasattr on the instance would, a list copy on every step)
        found = hasattr(type(dm), "classes_in_experience") or "classes_in_experience" in getattr(dm, "__dict__", {})
        return dm if found else None

    def _cached_mask(self, dm: Any, key: tuple[Any, ...]) -> Tensor | None:
        # entries keep their datamodule: a new datamodule never reuses the masks of an old one with the same id
        entry = self.__dict__.setdefault("_cl_masks", {}).get((id(dm), *key))
        return entry[1] if entry is not None and entry[0] is dm else None

    def _cache_mask(self, dm: Any, key: tuple[Any, ...], mask: Tensor) -> Tensor:
        self.__dict__["_cl_masks"][(id(dm), *key)] = (dm, mask)
        return mask

    def _task_class_mask(self, task_labels: Tensor, num_outputs: int) -> Tensor | None:
        dm = self._stream()
        if dm is None or dm.scenario != "task":
            return None
        key = ("task", num_outputs, task_labels.device)
        table = self._cached_mask(dm, key)
        if table is None:
            n_tasks = 1 + max(t for ts in dm.task_labels for t in ts)
            table = torch.zeros(n_tasks, num_outputs, dtype=torch.bool)
            for classes, tasks in zip(dm.classes_in_experience, dm.task_labels):
                for t in tasks:
                    table[t, list(classes)] = True
            table = self._cache_mask(dm, key, table.to(task_labels.device))
        return table[task_labels.long()]

    def _seen_class_mask(self, num_outputs: int, device: torch.device) -> Tensor | None:
        dm = self._stream()
        if dm is None or dm.scenario != "class" or dm.joint:
            return None
        current = dm.current_experience
        key = ("seen", current, num_outputs, device)
        mask = self._cached_mask(dm, key)
        if mask is None:
            mask = torch.zeros(num_outputs, dtype=torch.bool)
            for classes in dm.classes_in_experience[: current + 1]:
                mask[list(classes)] = True
            mask = self._cache_mask(dm, key, mask.to(device))
        return mask

    def _test_experience_mask(self, experience: int, num_outputs: int, device: torch.device) -> Tensor | None:
        """The classes of test experience ``experience`` of a class-IL stream (``None`` elsewhere)."""
        dm = self._stream()
        if dm is None or dm.scenario != "class":
            return None
        key = ("test_exp", experience, num_outputs, device)
        mask = self._cached_mask(dm, key)
        if mask is None:  # the classes are read once per experience and device, not on every batch
            classes = getattr(dm, "test_classes_in_experience", None)
            if classes is None or experience >= len(classes):
                return None
            mask = torch.zeros(num_outputs, dtype=torch.bool)
            mask[list(classes[experience])] = True
            mask = self._cache_mask(dm, key, mask.to(device))
        return mask

    def task_il_predictions(self, logits: Tensor, experience: int) -> Tensor | None:
        """Predictions of a class-IL model evaluated as task-IL on test experience ``experience``: the arg-max
        over that experience's classes only (mammoth's ``mask_classes``, the "Task-IL" column of the DER
        paper's tables). ``None`` when the stream is not class-IL."""
        mask = self._test_experience_mask(experience, logits.shape[-1], logits.device)
        if mask is None:
            return None
        return logits.masked_fill(~mask, torch.finfo(logits.dtype).min).argmax(dim=-1)

    def masked_logits(self, logits: Tensor, task_labels: Tensor, evaluation: bool) -> Tensor:
        """Masks logits by task (task-IL) or, in class-IL, to the seen classes (in evaluation by default, in
        training with ``train_on_seen_classes``)."""
        mask = self._task_class_mask(task_labels, logits.shape[-1])
        if mask is None and (self.mask_unseen_classes if evaluation else self.train_on_seen_classes):
            mask = self._seen_class_mask(logits.shape[-1], logits.device)
        if mask is None:
            return logits
        return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)

    def check_num_outputs(self, num_outputs: int) -> None:
        """Raises when the model has fewer outputs than the stream has classes."""
        dm = self._stream()
        if dm is not None and num_outputs < dm.num_classes:
            raise ValueError(
                f"the model has {num_outputs} outputs but the stream has {dm.num_classes} classes: "
                f"set num_classes >= {dm.num_classes}"
            )

    # ---- steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, t = batch
        logits = self.masked_logits(self(x), t, evaluation=False)
        loss = F.cross_entropy(logits.float(), y)
        self.log_train_loss(loss, batch_idx)
        return loss

    def log_train_loss(self, loss: Tensor, batch_idx: int) -> None:
        """Logs ``train/loss`` at the steps where Lightning writes step metrics and at the last batch of each
        epoch (:func:`cl_plugins.steplog.log_this_step`), in the progress bar when the trainer has one, and
        raises ``FloatingPointError`` there when a loss since the previous check was NaN or infinite: no host
        sync on the other steps."""
        trainer = getattr(self, "_trainer", None)
        watch = self.__dict__.get("_cl_loss_watch")
        if watch is None:
            watch = self.__dict__["_cl_loss_watch"] = NonFiniteWatch()
        watch.observe(loss)
        if not log_this_step(trainer, batch_idx):
            return
        where = watch.check(self.global_step)
        if where is not None:
            raise FloatingPointError(
                f"training loss is {where} (precision={getattr(trainer, 'precision', '?')}): lower the learning "
                "rate, add gradient clipping (gradient_clip_val), or use precision='bf16-mixed' / '32-true' if "
                "activations overflow in 16-bit"
            )
        # Lightning reads progress-bar values on the host after every step (a sync on an accelerator), so the
        # loss goes to the progress bar only when the trainer shows one
        self.log("train/loss", loss, prog_bar=getattr(trainer, "progress_bar_callback", None) is not None)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        x, y, t = batch
        raw = self(x)
        logits = self.masked_logits(raw, t, evaluation=True)
        loss = F.cross_entropy(logits.float(), y)
        preds = logits.argmax(dim=-1)
        acc = (preds == y).float().mean()
        self.log(f"val/loss_exp{dataloader_idx}", loss, add_dataloader_idx=False, sync_dist=True,
                 batch_size=len(y))
        self.log(f"val/acc_exp{dataloader_idx}", acc, add_dataloader_idx=False, sync_dist=True,
                 batch_size=len(y))
        out = {"preds": preds, "target": y}
        task_il = self.task_il_predictions(raw, dataloader_idx)
        if task_il is not None:
            out["task_il_preds"] = task_il
        return out

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self.validation_step(batch, batch_idx, dataloader_idx)
