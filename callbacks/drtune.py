"""DR-Tune (Zhou, Chen, Huang; ICCV 2023) as a Lightning callback for continual streams.

DR-Tune fine-tunes a pretrained model while a frozen copy of the pretrained encoder anchors it: the
head must also classify the pretrained features of a bank of samples, after *semantic
calibration* moves them onto the downstream feature distribution (rotation, class centres,
scale). See :mod:`cl_plugins.drtune` for the method, the loss weighting and the continual choices.

The callback works on any "features then head" model (timm, transformers, this library's
backbones; :func:`cl_plugins.protocols.find_head`) with **no change to the user's training_step**:

- ``on_fit_start``: a frozen copy of the model (eval mode always, no gradients, not a submodule of
  the LightningModule, so no optimizer sees it) becomes the pretrained encoder; a forward
  pre-hook on the model captures its input and a forward hook on the head its input ``f_d``;
- ``on_experience_start``: the warm-up fills the bank with the features of the experience's first
  training batches (model in eval mode), as the official code does before epoch 0;
- every training step: the head hook computes ``f_p`` with the frozen copy, builds the calibrated
  features ``z~`` from the bank, attaches ``lambda * CE(head(z~), bank_labels)`` to the head's
  output (:meth:`ContinualCallback.attach_loss`: exact ``loss + term`` gradients under
  accumulation, AMP and DDP; logged as ``drtune/dr_loss``) and enqueues ``(f_p, f_d, y)``. By
  default (``dr_weight="official"``) the gradient of the user's loss through the head's output
  is scaled by ``B / (B + K)`` and ``lambda = K / (B + K)``: the official loss, one cross entropy
  over the ``B + K`` rows, at the user's learning rate (:mod:`cl_plugins.drtune.regularizer`).

Method notes, official hyperparameters and deviations: ``docs/methods/drtune.md``.

Under DDP the features and labels are all-gathered before they enter the bank, so every rank
holds the same bank and computes the same term. The bank, the cached rotation, the step counter
and the frozen encoder's weights (after a resume, the model at fit start is no longer the
pretrained one) are in the callback's ``state_dict``, so a checkpoint resumes exactly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from callbacks.base import ContinualCallback
from cl_plugins.drtune import (
    DEFAULT_BANK_SIZE,
    DEFAULT_ROTATION_INTERVAL,
    BankMode,
    DistributionRegularizer,
    DRTuneTap,
    DRWeight,
    FeatureBank,
    FrozenEncoder,
    HeadLrScale,
    check_dr_weight,
    head_linear,
    init_head_weight,
)
from cl_plugins.protocols import find_head
from datamodules.stream import ContinualDataModule


class DRTune(ContinualCallback):
    """DR-Tune's distribution regularization on a stream, through hooks.

    Args:
        dr_weight: how ``L_DR`` and the user's loss ``L_CE`` combine, with ``K`` the filled bank rows
            that enter ``L_DR`` in the step (the bank size once it is full) and ``B`` the rows of the
            global batch (:mod:`cl_plugins.drtune.regularizer`). ``"official"`` (default): the
            official loss ``(B * L_CE + K * L_DR) / (B + K)`` at the user's learning rate (the
            gradient of ``L_CE`` through the head's output is scaled by ``B / (B + K)``); ``"K/B"``:
            ``L_CE + (K / B) * L_DR``, ``(B + K) / B`` times the official step (pair it with learning
            rates multiplied by ``B / (B + K)``); a number ``lambda``: ``L_CE + lambda * L_DR``.
        head_init_std: draw the head's weight from ``N(0, std)`` at the first fit start (official:
            0.01, :data:`~cl_plugins.drtune.head.OFFICIAL_HEAD_INIT_STD`); ``None`` (default) leaves
            the head as the model built it. Not applied again on resume or in later fits.
        head_lr_scale: multiply the head's learning rate by this (official: 33, 0.33 against the
            backbone's 0.01), applied as a scale on the head's optimizer updates
            (:class:`~cl_plugins.drtune.head.HeadLrScale`); 1 (default) leaves the optimizer alone.
        bank_size: ``K`` (official: 2048).
        bank_mode: ``"class_balanced"`` (default, our choice for streams: ``K // C`` slots per class,
            old classes stay represented) or ``"fifo"`` (the official queue).
        rotation_interval: fit the Procrustes rotation every this many steps (official: 10; 0: never).
        cache_rotation: apply the last rotation between fits (default, our choice); ``False`` is the
            official behaviour of rotating only on fitting steps.
        warmup_batches: batches of the warm-up; ``None``: ``K // (B * world_size) + 3`` as the official
            code, at most one pass over the experience.
        warmup_each_experience: warm up at the start of every experience (default, so that new
            classes enter the bank with fresh pairs before their first step); ``False``: only while
            the bank is empty (the official warm-up before epoch 0).
        head_name: qualified name of the head (default: :func:`~cl_plugins.protocols.find_head`).
        encoder: qualified name of the submodule that the ``training_step`` calls with the input
            (default: the LightningModule itself, called as ``self(x)``).
        pretrained_features: ``fn(*inputs) -> (B, D)`` giving the pretrained features of the model's
            inputs, instead of a frozen copy of the model (an ``nn.Module`` is moved to the device
            and frozen; its weights are not checkpointed: rebuild it when resuming).
        save_frozen_weights: put the frozen copy's weights in the checkpoint (needed to resume
            exactly: after a resume the model is no longer the pretrained one).
        log_stats: log ``drtune/dr_ce`` (unweighted ``L_DR``), ``drtune/weight`` (of ``L_DR``),
            ``drtune/task_scale`` (on the user's loss gradient), ``drtune/bank_rows`` and
            ``drtune/rotation_rank`` (of the last rotation fit).
    """

    def __init__(
        self,
        dr_weight: DRWeight = "official",
        head_init_std: float | None = None,
        head_lr_scale: float = 1.0,
        bank_size: int = DEFAULT_BANK_SIZE,
        bank_mode: BankMode = "class_balanced",
        rotation_interval: int = DEFAULT_ROTATION_INTERVAL,
        cache_rotation: bool = True,
        warmup_batches: int | None = None,
        warmup_each_experience: bool = True,
        head_name: str | None = None,
        encoder: str | None = None,
        pretrained_features: Callable[..., Tensor] | None = None,
        save_frozen_weights: bool = True,
        log_stats: bool = True,
    ) -> None:
        super().__init__()
        check_dr_weight(dr_weight)
        if head_init_std is not None and not head_init_std > 0:
            raise ValueError(f"head_init_std must be > 0 (official: 0.01) or None, got {head_init_std}")
        if not head_lr_scale > 0:
            raise ValueError(f"head_lr_scale must be > 0 (official: 33; 1 leaves the optimizer alone), got "
                             f"{head_lr_scale}")
        if bank_size < 1:
            raise ValueError(f"bank_size must be >= 1, got {bank_size}")
        if bank_mode not in ("class_balanced", "fifo"):
            raise ValueError(f"bank_mode must be 'class_balanced' or 'fifo', got {bank_mode!r}")
        if rotation_interval < 0:
            raise ValueError(f"rotation_interval must be >= 0 (0: no rotation), got {rotation_interval}")
        if warmup_batches is not None and warmup_batches < 0:
            raise ValueError(f"warmup_batches must be >= 0, got {warmup_batches}")
        if pretrained_features is not None and not callable(pretrained_features):
            raise TypeError("pretrained_features must be a callable fn(*inputs) -> features, or None")
        self.dr_weight = dr_weight
        self.head_init_std, self.head_lr_scale = head_init_std, float(head_lr_scale)
        self.bank_size, self.bank_mode = bank_size, bank_mode
        self.rotation_interval, self.cache_rotation = rotation_interval, cache_rotation
        self.warmup_batches, self.warmup_each_experience = warmup_batches, warmup_each_experience
        self.head_name, self.encoder = head_name, encoder
        self.pretrained_features = pretrained_features
        self.save_frozen_weights = save_frozen_weights
        self.log_stats = log_stats
        #: the frozen pretrained encoder (a copy of the model at the first fit start)
        self.frozen: FrozenEncoder | None = None
        #: bank, cached rotation, step counter
        self.regularizer: DistributionRegularizer | None = None
        self.tap: DRTuneTap | None = None
        self._pending: dict[str, Any] | None = None
        self._config: dict[str, Any] | None = None
        #: whether the stream's first fit start, where ``head_init_std`` applies, has passed (checkpointed)
        self.head_init_done = False
        self._lr_scale: HeadLrScale | None = None
        self._head: nn.Module | None = None
        self._reported_rank = False

    # ------------------------------------------------------------------ set-up
    def _root_and_head(self, pl_module: pl.LightningModule) -> tuple[nn.Module, str, nn.Module]:
        full_name, head = find_head(pl_module, self.head_name)
        if self.encoder is None:
            return pl_module, full_name, head
        try:
            root = pl_module.get_submodule(self.encoder)
        except AttributeError as err:
            raise ValueError(
                f"encoder={self.encoder!r} is not a submodule of {type(pl_module).__name__}: name the submodule "
                "that the training_step calls with the input (its top-level submodules: "
                f"{[n for n, _ in pl_module.named_children()]}), or leave encoder=None for self(x)"
            ) from err
        prefix = self.encoder + "."
        if not full_name.startswith(prefix):
            raise ValueError(f"the head {full_name} is not inside encoder={self.encoder!r}: name a submodule that "
                             "contains the head")
        return root, full_name[len(prefix):], head

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        root, head_rel, head = self._root_and_head(pl_module)
        linear = head_linear(head)
        dim, num_classes = linear.in_features, linear.out_features
        pending, self._pending = self._pending, None
        device = pl_module.device
        self._head, self._reported_rank = head, False
        if pending is not None:  # resuming: the head is the checkpoint's, never re-drawn
            self.head_init_done = True
        if self.head_init_std is not None and not self.head_init_done:
            init_head_weight(linear, self.head_init_std)
            rank_zero_info(f"DR-Tune: head weight drawn from N(0, {self.head_init_std}) (official head init)")
        self.head_init_done = True

        if self.pretrained_features is None:
            if self.frozen is None:  # the first fit: the model is still the pretrained one
                self.frozen = FrozenEncoder(root, head_rel, exclude=[trainer])
            if pending is not None and pending.get("frozen") is not None:
                self.frozen.model.load_state_dict(pending["frozen"])
            self.frozen.to(device)
            pretrained: Callable[..., Tensor] = self.frozen
        else:
            pretrained = self.pretrained_features
            if isinstance(pretrained, nn.Module):
                pretrained.to(device).eval().requires_grad_(False)

        config = {"bank_size": self.bank_size, "bank_mode": self.bank_mode, "dim": dim, "num_classes": num_classes}
        if pending is not None and pending.get("config") != config:
            raise ValueError(f"the checkpoint's DR-Tune state was made with {pending.get('config')}, but this run has "
                             f"{config}: resume with the same bank settings and head")
        if self.regularizer is None or self._config != config:
            bank = FeatureBank(self.bank_size, dim, num_classes, self.bank_mode)
            self.regularizer = DistributionRegularizer(bank, self.rotation_interval, self.cache_rotation)
            self._config = config
        if pending is not None:
            self.regularizer.load_state_dict(pending["regularizer"])
        self.regularizer.to(device)

        if self.tap is not None:
            self.tap.remove()
        self.tap = DRTuneTap(
            root, head, self.regularizer, pretrained, weight=self.dr_weight,
            gather=self._gather_fn(trainer),
            attach=lambda output, term: self.attach_loss(output, term, "drtune/dr_loss"),
            label_mask=_task_label_mask(self.stream(trainer), num_classes),
        )
        self.tap.install()

    @staticmethod
    def _gather_fn(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        """Concatenation over ranks (sizes may differ), or ``None`` in one process."""
        if trainer.world_size <= 1:
            return None
        strategy = trainer.strategy

        def gather(t: Tensor) -> Tensor:
            sizes = strategy.all_gather(torch.tensor([t.shape[0]], device=t.device)).view(-1).tolist()
            most = max(sizes)
            if t.shape[0] < most:
                t = torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])])
            stacked = strategy.all_gather(t.contiguous())
            return torch.cat([stacked[r, :n] for r, n in enumerate(sizes)])

        return gather

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_lr_scale()
        if self.head_lr_scale != 1.0:
            assert self._head is not None
            self._lr_scale = HeadLrScale(trainer.optimizers, self._head.parameters(), self.head_lr_scale)

    def _remove_lr_scale(self) -> None:
        if self._lr_scale is not None:
            self._lr_scale.remove()
            self._lr_scale = None

    # ------------------------------------------------------------------ experiences and warm-up
    def on_experience_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> None:
        assert self.regularizer is not None and self.tap is not None
        self.regularizer.set_experience(experience)
        if self.warmup_each_experience or len(self.regularizer.bank) == 0:
            self.warmup(trainer, pl_module)

    def warmup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Enqueues the features of the first training batches of the current epoch (eval mode, no
        gradients); returns the number of batches used."""
        assert self.regularizer is not None and self.tap is not None
        loader = trainer.train_dataloader
        if loader is None:
            return 0
        if not isinstance(loader, torch.utils.data.DataLoader):
            raise TypeError(f"DR-Tune's warm-up needs one training DataLoader, got {type(loader).__name__}; "
                            "pass warmup_batches=0 to skip it")
        n = self.warmup_batches
        if n is None:
            batch = loader.batch_size or 1
            n = self.regularizer.bank.size // (batch * trainer.world_size) + 3
        n = min(n, len(loader))
        if n == 0:
            return 0
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            batches = iter(loader)
            for _ in range(n):
                batch = trainer.strategy.batch_to_device(next(batches))
                with trainer.precision_plugin.forward_context():
                    self.tap.warmup_batch((batch[0],), {}, batch[1])
        finally:
            for m, mode in modes:
                m.training = mode
        return n

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.tap is None:
            raise RuntimeError("DRTune was not set up: on_fit_start did not run")
        if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[1], Tensor):
            raise ValueError("DR-Tune needs batches (x, y, ...) with class labels y")
        self.tap.begin_step(batch[1])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.tap is None:
            return
        self.tap.end_step()
        if self.log_stats and self.tap.last:
            for key in ("dr_ce", "weight", "task_scale", "bank_rows"):
                pl_module.log(f"drtune/{key}", self.tap.last[key], on_step=True, on_epoch=True, sync_dist=False)
            self.tap.last = {}
        fit = self.regularizer.last_fit if self.regularizer is not None else None
        if fit is not None:
            if self.log_stats:
                pl_module.log("drtune/rotation_rank", float(fit["rank"]), on_step=False, on_epoch=True,
                              sync_dist=False)
            if fit["rank"] < fit["dim"] - 1 and not self._reported_rank:
                self._reported_rank = True
                rank_zero_info(
                    f"DR-Tune: the rotation was fitted on {fit['rows']} fresh rows in {fit['dim']} dimensions (rank "
                    f"{fit['rank']}): it is applied on their span and is the identity outside it, so old-class rows "
                    "keep their other components (docs/methods/drtune.md, 'Few rows')"
                )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tap is not None:
            self.tap.remove()
        self._remove_lr_scale()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.tap is not None:
            self.tap.remove()
        self._remove_lr_scale()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.regularizer is None:
            return {}
        frozen = None
        if self.frozen is not None and self.save_frozen_weights:
            frozen = self.frozen.model.state_dict()
        return {"config": self._config, "regularizer": self.regularizer.state_dict(), "frozen": frozen,
                "head_init_done": self.head_init_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps the state until ``on_fit_start`` builds the bank and the frozen encoder (Lightning
        restores callbacks before that hook)."""
        if state_dict:
            self._pending = state_dict


def _task_label_mask(dm: ContinualDataModule, num_outputs: int) -> Tensor | None:
    """Task-incremental streams: ``mask[c]`` = outputs of the task(s) of class ``c`` (as the mixin masks
    training logits); ``None`` otherwise."""
    if dm.scenario != "task":
        return None
    task_classes: dict[int, set[int]] = defaultdict(set)
    for classes, tasks in zip(dm.classes_in_experience, dm.task_labels):
        for t in tasks:
            task_classes[t].update(classes)
    mask = torch.zeros(num_outputs, num_outputs, dtype=torch.bool)
    for classes, tasks in zip(dm.classes_in_experience, dm.task_labels):
        allowed = sorted({c for t in tasks for c in task_classes[t]})
        for c in classes:
            mask[c, allowed] = True
    mask[~mask.any(dim=1)] = True  # classes of no training experience: unrestricted
    return mask
