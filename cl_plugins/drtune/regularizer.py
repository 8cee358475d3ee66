"""Distribution regularization (DR) of DR-Tune and the hooks that apply it to any "features then head" model.

**The loss.** With downstream features ``f_d`` of the batch and the calibrated pretrained features
``z~`` of the bank (labels ``y_K``), the official code minimizes one cross entropy over the
``B + K`` rows ``cat(f_d, z~)``:

    L = (B * L_CE + K * L_DR) / (B + K),

with ``L_DR = CE(head(z~), y_K)`` (mean over the ``K`` bank rows). Here the user's loss is
``L_CE`` (whatever the ``training_step`` computes from the head's output) and DR-Tune shapes the
step in one of three ways (``weight``):

- ``"official"`` (default): the gradient of the user's loss that flows through the head's output
  is multiplied by ``B / (B + K)`` and ``K / (B + K) * L_DR`` is attached: the step is the
  official loss's at the user's learning rate (``forward`` values are unchanged: the logged
  ``train/loss`` stays the user's ``L_CE``);
- ``"K/B"``: ``L_CE + (K / B) * L_DR``, the official relative weights at the scale of the user's
  ``L_CE``, i.e. ``(B + K) / B`` times the official step (33x at ``B = 64, K = 2048``): pair it
  with learning rates multiplied by ``B / (B + K)``;
- a number ``lambda``: ``L_CE + lambda * L_DR``.

``z~`` has no gradient, so ``L_DR`` trains the head only: the encoder is regularized through a
head that must stay valid for the pretrained distribution. Under ``"official"`` the encoder's
gradient is ``B / (B + K)`` of plain fine-tuning's, as in the official code (where the backbone
learning rate 0.01 acts like about 3e-4 under a plain mean cross entropy); the official code gives
the head a 33x larger learning rate (0.33), see :class:`~cl_plugins.drtune.head.HeadLrScale`.

**Which K.** The mean over ``B + K`` rows weights the DR rows by their *number in that step's
concatenation*. The official ``semantic_calibration`` returns every row of its queue (``model.py``:
``cali_pre_feat [K, dim]`` and ``label_queue``), and the warm-up (``worker.py``: ``K // B + 3``
batches) has filled all of them before the first step, so there the number of rows used equals
the capacity. Here a bank can be partly filled (a class-balanced bank holds no rows of classes
not seen yet, a short warm-up fills a fifo bank part-way) and only filled rows enter ``L_DR``.
``K`` in the weights above is therefore ``n``, the number of filled rows that enter ``L_DR`` in
that step (``bank_rows`` in :attr:`DRTuneTap.last`), with ``B`` the rows of the (gathered)
batch. With a full bank ``n`` is the capacity.

**Order of a step** (official): ``z~`` is built from the bank *before* the batch is written; then
``(f_p, f_d.detach(), y)`` are enqueued.

**Rotation schedule.** The Procrustes rotation is fitted every ``rotation_interval`` steps
(official: 10, counted by the batch index within the epoch; here by DR steps, which is the same
for epochs longer than 10 batches and keeps a regular cadence on tiny experiences). Between
fits, ``cache_rotation=True`` (default, our choice) applies the last fitted rotation;
``cache_rotation=False`` is the official behaviour of applying no rotation on those steps.

**Few fresh rows.** The rotation is fitted on the fresh rows; with fewer of them than feature
dimensions it is restricted to their span (:func:`~cl_plugins.drtune.calibration.span_rotation`:
identity outside it) instead of the official arbitrary completion, which would scramble the
old-class rows. :attr:`DistributionRegularizer.last_fit` says how many rows and what rank the
last fit had.

**Continual streams: stale downstream features** (METHODS notes 2(e)). The downstream features of
classes of past experiences were computed by an older encoder. The chosen option: the rotation is
fitted only on *fresh* pairs (rows written during the current experience, by the current
encoder, and the experience's warm-up); the class-centre step uses every class's stored downstream
rows, so an old class is calibrated onto its *last-known* downstream centre (where the head
learned it) while its shape follows the current rotation. The head is thus kept valid for the old
classes' feature distribution, which is what protects them from being overwritten.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cl_plugins.aux_loss import attach_aux_loss
from cl_plugins.drtune.bank import FeatureBank
from cl_plugins.drtune.calibration import float32_math, mean_norm, procrustes_fit, semantic_calibration
from cl_plugins.drtune.features import check_features, head_linear

#: official defaults (configs/cifar10_k2048_lr001.yaml and model.py)
DEFAULT_BANK_SIZE = 2048
DEFAULT_ROTATION_INTERVAL = 10

#: how the DR term and the user's loss are weighted (module docstring)
DRWeight = float | Literal["official", "K/B"]
DR_WEIGHT_MODES = ("official", "K/B")


def check_dr_weight(weight: object) -> None:
    """Raises a clear error unless ``weight`` is ``"official"``, ``"K/B"`` or a number >= 0."""
    valid = isinstance(weight, str) and weight in DR_WEIGHT_MODES
    valid |= isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0
    if not valid:
        raise ValueError(
            f"dr_weight must be 'official' (the official loss at your learning rate), 'K/B' or a number >= 0, "
            f"got {weight!r}"
        )


def loss_weights(weight: DRWeight, batch: int, bank_rows: int) -> tuple[float, float]:
    """``(task_scale, dr_weight)``: the factor on the gradient of the user's loss and the weight of
    ``L_DR`` for a step with ``batch`` rows and ``bank_rows`` filled bank rows (module docstring)."""
    if weight == "official":
        return batch / (batch + bank_rows), bank_rows / (batch + bank_rows)
    if weight == "K/B":
        return 1.0, bank_rows / batch
    return 1.0, float(weight)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged, with the gradient flowing back through it multiplied by ``scale``."""
    if scale == 1.0 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _ScaleGrad.apply(x, scale)


def dr_loss(head: nn.Module, z: Tensor, labels: Tensor, label_mask: Tensor | None = None) -> Tensor:
    """``CE(head(z), labels)`` (mean, float32); ``label_mask[c]`` (bool, one row per class) restricts the
    logits of rows of class ``c`` to the outputs of its task (task-incremental streams)."""
    logits = head(z).float()
    if label_mask is not None:
        logits = logits.masked_fill(~label_mask.to(logits.device)[labels], torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, labels)


class DistributionRegularizer(nn.Module):
    """The bank, the rotation cache and the step counter; builds ``z~`` and updates the bank.

    Args:
        bank: the paired feature bank.
        rotation_interval: fit the rotation every this many steps (official: 10); 0 never rotates.
        cache_rotation: apply the last fitted rotation between fits (module docstring).
    """

    rotation: Tensor
    has_rotation: Tensor
    step: Tensor
    experience: Tensor

    def __init__(self, bank: FeatureBank, rotation_interval: int = DEFAULT_ROTATION_INTERVAL,
                 cache_rotation: bool = True) -> None:
        super().__init__()
        if rotation_interval < 0:
            raise ValueError(f"rotation_interval must be >= 0 (0: no rotation), got {rotation_interval}")
        self.bank = bank
        self.rotation_interval = rotation_interval
        self.cache_rotation = cache_rotation
        self.register_buffer("rotation", torch.eye(bank.dim))
        self.register_buffer("has_rotation", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("experience", torch.tensor(0, dtype=torch.long))
        #: the last rotation fit: ``{"rows", "rank", "dim"}`` (``rank < dim - 1``: restricted to the span)
        self.last_fit: dict[str, int] | None = None

    def calibrate(self, scale: Tensor | float, head_weight: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(z~, labels)`` of the filled bank rows for the current step, or ``None`` when the bank is empty.

        On a fitting step (every ``rotation_interval`` steps) the rotation is fitted on the *fresh*
        rows only (``FeatureBank.fresh``: written during the current experience; every filled row
        of a fifo bank) and needs at least 2 of them; with fewer the step falls back to the cached
        rotation, if any. The rotation is then applied to all filled rows. With fewer fresh rows
        than feature dimensions the data fix the rotation only on the span of the fresh rows; it
        is the identity outside it (:func:`~cl_plugins.drtune.calibration.procrustes_fit`), so the
        components of old-class rows outside that span are left as they are.
        """
        bank = self.bank
        rows = torch.nonzero(bank.valid, as_tuple=True)[0]
        if rows.numel() == 0:
            return None
        pre, down, labels = bank.pre[rows], bank.down[rows], bank.labels[rows]
        fresh = bank.fresh(int(self.experience))[rows]
        rotation: Tensor | None = None
        interval = self.rotation_interval
        if interval > 0 and int(self.step) % interval == 0 and int(fresh.sum()) >= 2:
            with float32_math(pre.device):
                rotation, rank = procrustes_fit(F.normalize(pre[fresh], dim=1), F.normalize(down[fresh], dim=1))
            self.last_fit = {"rows": int(fresh.sum()), "rank": rank, "dim": bank.dim}
            if self.cache_rotation:
                self.rotation.copy_(rotation)
                self.has_rotation.fill_(True)
        elif interval > 0 and self.cache_rotation and bool(self.has_rotation):
            rotation = self.rotation
        z = semantic_calibration(pre, down, labels, head_weight, scale, rotation, fresh)
        return z, labels

    @torch.no_grad()
    def enqueue(self, pre: Tensor, down: Tensor, labels: Tensor) -> None:
        """Writes paired features of the current experience into the bank (float32)."""
        self.bank.enqueue(pre.float(), down.float(), labels, int(self.experience))

    def set_experience(self, experience: int) -> None:
        """Marks the experience being trained (rows written from now on are fresh)."""
        self.experience.fill_(experience)


Gather = Callable[[Tensor], Tensor]
Attach = Callable[[Tensor, Tensor], Tensor]


class DRTuneTap:
    """Applies DR-Tune to a model through hooks, without changing its training code.

    A forward pre-hook on ``root`` captures the model's input; a forward hook on ``head`` takes the
    downstream features ``f_d`` (the head's input), computes the pretrained features ``f_p`` with
    ``pretrained(*inputs)``, the DR term ``weight * L_DR`` from the bank, attaches it to the head's
    output with ``attach`` (the identity op of :mod:`cl_plugins.aux_loss`, so a backward of any loss
    built on the output adds the term's gradient) and enqueues the batch. Only the first head call
    between :meth:`begin_step` and :meth:`end_step` with gradients enabled is regularized.

    Args:
        root: the module called with the model input (the LightningModule, or a submodule).
        head: the classification head inside ``root``.
        regularizer: bank and calibration state.
        pretrained: ``fn(*args, **kwargs) -> f_p`` with the arguments of ``root`` (a
            :class:`~cl_plugins.drtune.features.FrozenEncoder`, or the user's features function).
        weight: ``"official"`` (default), ``"K/B"`` or a number ``lambda`` (module docstring): with
            ``n`` the filled bank rows that enter ``L_DR`` this step (the capacity ``K`` once the bank
            is full) and ``B`` the rows of the gathered batch ("Which K"), ``"official"`` scales the
            gradient through the head's output by ``B / (B + n)`` and weights ``L_DR`` by
            ``n / (B + n)``.
        gather: concatenates a tensor over processes (DDP), applied to ``f_p``, ``f_d`` and labels
            before they enter the bank; identity by default.
        attach: ``fn(output, term) -> output``; default :func:`~cl_plugins.aux_loss.attach_aux_loss`.
        label_mask: ``(C, C)`` bool, outputs allowed for each class (task-incremental streams).
    """

    def __init__(
        self,
        root: nn.Module,
        head: nn.Module,
        regularizer: DistributionRegularizer,
        pretrained: Callable[..., Tensor],
        weight: DRWeight = "official",
        gather: Gather | None = None,
        attach: Attach | None = None,
        label_mask: Tensor | None = None,
    ) -> None:
        check_dr_weight(weight)
        self.root, self.head, self.regularizer, self.pretrained = root, head, regularizer, pretrained
        self.weight = weight
        self.gather: Gather = gather or (lambda t: t)
        self.attach: Attach = attach or (lambda out, term: attach_aux_loss(out, term))
        self.label_mask = label_mask
        self._handles: list[RemovableHandle] = []
        self._labels: Tensor | None = None
        self._inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._active = self._done = self._busy = self._warmup = False
        self._warmup_features: Tensor | None = None
        #: values of the last regularized step: ``dr_ce`` (unweighted), ``weight`` (of ``L_DR``),
        #: ``task_scale`` (on the gradient of the user's loss), ``bank_rows``, ``scale`` (of ``z~``)
        self.last: dict[str, float] = {}

    # ------------------------------------------------------------------ hooks
    def install(self) -> None:
        """Registers the two hooks (idempotent)."""
        if self._handles:
            return
        self._handles = [
            self.root.register_forward_pre_hook(self._on_input, with_kwargs=True),
            self.head.register_forward_hook(self._on_head),
        ]

    def remove(self) -> None:
        """Removes the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def begin_step(self, labels: Tensor) -> None:
        """Arms the hooks for one training step with the batch's labels."""
        self._labels, self._inputs = labels, None
        self._active, self._done = True, False

    def end_step(self) -> None:
        """Disarms the hooks and drops the references to the step's tensors."""
        self._labels, self._inputs = None, None
        self._active = False

    def _on_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # the last call before the head runs is the model's forward (under DDP, Lightning first routes
        # training_step(batch, batch_idx) through the LightningModule's __call__)
        if (self._active and not self._done) or self._warmup:
            self._inputs = (args, dict(kwargs))

    def _on_head(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if self._busy:
            return None
        if self._warmup:
            if not args or not isinstance(args[0], Tensor):
                raise ValueError("the head was called without a tensor input")
            self._warmup_features = args[0]
            return None
        if not self._active or self._done or not torch.is_grad_enabled():
            return None
        self._done = True
        if self._inputs is None:
            raise RuntimeError(
                "DR-Tune saw the head run before any call of the model it hooks: the training_step must call "
                f"that module ({type(self.root).__name__}, e.g. self(x)), or name the submodule the step calls "
                "(DRTune(encoder='net'))"
            )
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise ValueError("DR-Tune needs a head that maps one feature tensor to one logits tensor")
        f_d = args[0]
        check_features(f_d, module, "downstream")
        term, task_scale = self.step(f_d, self._inputs, self._labels)
        if term is None:
            return None
        return self.attach(scale_grad(output, task_scale), term)

    # ------------------------------------------------------------------ the computation
    def pretrained_features(self, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> Tensor:
        """``f_p`` (float32, no gradient) of the captured inputs."""
        args, kwargs = inputs
        with torch.no_grad():
            f_p = self.pretrained(*args, **kwargs)
        if not isinstance(f_p, Tensor):
            raise TypeError(f"the pretrained features function returned {type(f_p).__name__}, not a tensor")
        check_features(f_p, self.head, "pretrained")
        return f_p.detach().float()

    def step(self, f_d: Tensor, inputs: tuple[tuple[Any, ...], dict[str, Any]],
             labels: Tensor | None) -> tuple[Tensor | None, float]:
        """``(weight * L_DR, task_scale)`` for this batch (``(None, 1.0)`` while the bank is empty),
        then enqueues the batch."""
        if labels is None:
            raise RuntimeError("DR-Tune has no labels for this step: call begin_step(labels) first")
        f_p = self.pretrained_features(inputs)
        if f_p.shape != f_d.shape:
            raise ValueError(f"pretrained features {tuple(f_p.shape)} and downstream features {tuple(f_d.shape)} "
                             "differ in shape: the pretrained encoder must produce the head's input")
        labels = labels.to(f_d.device).long()
        if labels.shape[0] != f_d.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {f_d.shape[0]} samples: batches must be (x, y, ...)")
        all_p = self.gather(f_p)
        all_d = self.gather(f_d.detach().float())
        all_y = self.gather(labels)
        reg = self.regularizer
        scale = mean_norm(all_d)
        term: Tensor | None = None
        task_scale = 1.0
        calibrated = reg.calibrate(scale, head_linear(self.head).weight)
        if calibrated is not None:
            z, bank_labels = calibrated
            # official: a mean over the B + n rows in the concatenation (module docstring, "Which K")
            task_scale, weight = loss_weights(self.weight, all_d.shape[0], bank_labels.shape[0])
            self._busy = True
            try:
                ce = dr_loss(self.head, z.to(f_d.dtype), bank_labels, self.label_mask)
            finally:
                self._busy = False
            term = weight * ce
            self.last = {"dr_ce": float(ce.detach()), "weight": float(weight), "task_scale": float(task_scale),
                         "bank_rows": float(len(bank_labels)), "scale": float(scale)}
        reg.enqueue(all_p, all_d, all_y)
        reg.step += 1
        return term, task_scale

    @torch.no_grad()
    def warmup_batch(self, args: tuple[Any, ...], kwargs: dict[str, Any], labels: Tensor) -> None:
        """Enqueues the paired features of one batch without training (the official warm-up).

        The caller puts the model in eval mode. At the start of fine-tuning the model equals the
        pretrained encoder, so both features coincide, as in the official warm-up (which enqueues
        ``f_p`` twice); at later experiences ``f_d`` comes from the current model.
        """
        self._warmup, self._warmup_features = True, None
        try:
            self.root(*args, **kwargs)
            f_d = self._warmup_features
            if f_d is None:
                raise RuntimeError("the model's forward never reached the head during the DR-Tune warm-up")
            check_features(f_d, self.head, "downstream")
            f_p = self.pretrained_features((args, kwargs))
        finally:
            self._warmup, self._warmup_features, self._inputs = False, None, None
        labels = labels.to(f_d.device).long()
        self.regularizer.enqueue(self.gather(f_p), self.gather(f_d.float()), self.gather(labels))
