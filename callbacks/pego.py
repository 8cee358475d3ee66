"""PEGO callback: a group of LoRA modules per adapted layer with orthogonal regularization.

The groups are injected in ``setup()`` (see :mod:`callbacks.lora`, which also merges them after the
last experience). Once per training step the regularizer (:mod:`cl_plugins.peft.pego`) is attached
with ``attach_loss`` to the output of the first adapted layer, so the gradient is that of
``loss + ortho_weight * L_d + preserve_weight * L_p`` without touching the module's
``training_step``; the terms are logged as ``pego/diversify_loss`` and ``pego/preserve_loss``.
Paper, official code and what follows them: ``docs/methods/pego.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from callbacks.lora import LoRAGroupCallback
from cl_plugins.peft.lora import LoRAGroupLinear
from cl_plugins.peft.pego import DEFAULT_NUM_LORAS, DEFAULT_RANK, DEFAULT_WEIGHT, PEGORegularizer
from cl_plugins.peft.presets import FamilyPreset


class PEGO(LoRAGroupCallback):
    """Parameter-Efficient Group with Orthogonal regularization.

    Args:
        targets: regular expressions of the layers to adapt (``None``: query and value projections).
        num_loras: LoRA modules per group, ``N = 4`` (official ``run.sh``; 2 for PACS).
        rank: rank of each module, 4 (``--peft_hp 4``).
        alpha: scale numerator; ``None`` means ``alpha = rank`` (scale 1: the official code adds
            ``B A x`` unscaled).
        ortho_weight: weight of the diversify term ``sum_{i<j} ||dW_i dW_j^T||_1``, 1e-3 (``--ld``).
        preserve_weight: weight of the preserve term ``sum_i ||W0 dW_i^T||_1``, 1e-3 (the official code
            uses one ``ld`` for both terms).
        merge_on_end: merge the groups into the base weights after the last experience (the paper's
            "no extra inference cost").
        qkv_parts: slices of a fused ``...qkv`` layer to adapt, "qv" as the official code.
        dropout: dropout on the LoRA branch's input (0: the official code has none).
        train_head: keep the classification head trainable.
        head_name: qualified name of the head when ``find_head`` does not find it.

    The paper trains with lr 5e-4 (Adam, DomainBed); set the module's optimizer accordingly.
    """

    def default_targets(self, family: FamilyPreset) -> Sequence[str]:
        """PEGO's placement (official code): the query and value projections of every block (a fused
        qkv layer is adapted on its q and v slices through ``qkv_parts="qv"``)."""
        return family.projections("qv")

    def __init__(
        self,
        targets: Sequence[str] | str | None = None,
        num_loras: int = DEFAULT_NUM_LORAS,
        rank: int = DEFAULT_RANK,
        alpha: float | None = None,
        ortho_weight: float = DEFAULT_WEIGHT,
        preserve_weight: float = DEFAULT_WEIGHT,
        merge_on_end: bool = True,
        qkv_parts: str | None = "qv",
        dropout: float = 0.0,
        train_head: bool = True,
        head_name: str | None = None,
    ) -> None:
        super().__init__(targets=targets, num_loras=num_loras, rank=rank, alpha=alpha, dropout=dropout,
                         qkv_parts=qkv_parts, train_head=train_head, head_name=head_name, merge_on_end=merge_on_end)
        if ortho_weight < 0 or preserve_weight < 0:
            raise ValueError(
                f"ortho_weight and preserve_weight must be >= 0, got {ortho_weight} and {preserve_weight}"
            )
        self.ortho_weight = float(ortho_weight)
        self.preserve_weight = float(preserve_weight)
        self._hook: RemovableHandle | None = None
        self._layers: list[LoRAGroupLinear] = []
        self._terms: PEGORegularizer | None = None
        self._pending = False
        self._warned = False

    # ------------------------------------------------------------------ the regularizer
    def regularizer(self, layers: Sequence[LoRAGroupLinear] | None = None) -> dict[str, Tensor]:
        """The weighted terms over ``layers`` (default: the adapted layers), float32, by log name.

        A term whose weight is 0 (or the diversify term of single-module groups) is left out.
        """
        if layers is not None or self._terms is None:
            terms = PEGORegularizer(self._layers if layers is None else layers)  # raises when there are none
        else:
            terms = self._terms
        div, pre = terms(diversify=self.ortho_weight > 0, preserve=self.preserve_weight > 0)
        out = {}
        if div is not None:
            out["pego/diversify_loss"] = self.ortho_weight * div
        if pre is not None:
            out["pego/preserve_loss"] = self.preserve_weight * pre
        return out

    def _attach(self, module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        """Forward hook of the first adapted layer: attaches the terms once per training step."""
        if not (self._pending and module.training and torch.is_grad_enabled()):
            return None
        self._pending = False
        for name, term in self.regularizer().items():
            output = self.attach_loss(output, term, name)
        return output

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._remove_hook()
        self._layers = list(self.layers(pl_module).values())
        self._terms = PEGORegularizer(self._layers)
        self._hook = self._layers[0].register_forward_hook(self._attach)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()
        self._pending = False

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._pending = self.ortho_weight > 0 or self.preserve_weight > 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._pending and not self._warned:
            rank_zero_warn(
                "PEGO: the first adapted layer did not run in this training step (in train mode with gradients "
                "on), so the orthogonal regularization was not added; check that the model's forward uses it"
            )
            self._warned = True
        self._pending = False
