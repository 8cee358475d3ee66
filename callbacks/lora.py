"""LoRA injection callbacks: the plain LoRA baseline, and the base that PEGO builds on.

``LoRA`` wraps every targeted linear layer in a :class:`~cl_plugins.peft.lora.LoRAGroupLinear` in
``setup()``, before Lightning builds the optimizer; the backbone is frozen, the head stays trainable.
Default targets are the attention projections of the detected family
(:mod:`cl_plugins.peft.presets`). With ``merge_on_end`` the groups are merged into the base weights
when the fit that trains the last experience of the stream ends; a later ``fit`` unmerges them
first. When merging happens with one ``fit`` per experience, and how checkpoints resume:
``docs/methods/lora.md``. To take the trained model away: :mod:`cl_plugins.export`.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from callbacks.base import get_stream
from callbacks.injection import InjectionCallback
from cl_plugins.peft.adapters import fused_qkv_rows
from cl_plugins.peft.lora import LoRAGroupLinear, inject_lora_groups, lora_layers
from cl_plugins.peft.presets import FamilyPreset
from cl_plugins.protocols import find_head


class LoRAGroupCallback(InjectionCallback):
    """Injects a group of ``num_loras`` LoRA modules into every targeted linear layer (see module doc).

    Args:
        targets: regular expressions of the layers to adapt (``None``: the family defaults).
        num_loras: LoRA modules per layer (their updates are summed).
        rank: rank of each module.
        alpha: the update is scaled by ``alpha / rank`` (``None``: ``alpha = rank``).
        dropout: dropout on the LoRA branch's input.
        qkv_parts: adapt a fused ``...qkv`` layer only on these slices ("qv": query and value);
            ``None`` adapts its whole output with one group.
        train_head: keep the classification head trainable.
        head_name: qualified name of the head when ``find_head`` does not find it.
        merge_on_end: merge into the base weights when the last experience has been trained.
    """

    def __init__(
        self,
        targets: Sequence[str] | str | None = None,
        num_loras: int = 1,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        qkv_parts: str | None = None,
        train_head: bool = True,
        head_name: str | None = None,
        merge_on_end: bool = True,
    ) -> None:
        super().__init__(train_head=train_head, head_name=head_name)
        if int(num_loras) < 1 or int(rank) < 1:
            raise ValueError(f"num_loras and rank must be >= 1, got num_loras={num_loras}, rank={rank}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0 (the update is scaled by alpha / rank), got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if qkv_parts is not None:
            fused_qkv_rows(3, qkv_parts)
        if isinstance(targets, str):
            targets = [targets]
        if targets is not None and not targets:
            raise ValueError("targets is empty: name at least one layer pattern, or pass None for the defaults")
        self.targets = None if targets is None else list(targets)
        self.num_loras, self.rank = int(num_loras), int(rank)
        self.alpha = alpha
        self.dropout = dropout
        self.qkv_parts = qkv_parts
        self.merge_on_end = merge_on_end

    @property
    def method_name(self) -> str:
        """Name used in error messages."""
        return type(self).__name__

    def default_targets(self, family: FamilyPreset) -> Sequence[str]:
        """Target patterns when ``targets`` is None: every attention projection of the family."""
        return family.attention

    # ------------------------------------------------------------------ injection
    def inject(self, pl_module: pl.LightningModule) -> list[str]:
        exclude = [find_head(pl_module, self.head_name)[0]] if (self.train_head or self.head_name) else []
        occupied = self.other_injections(pl_module)
        new = inject_lora_groups(
            pl_module, self.targets, num_loras=self.num_loras, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
            qkv_parts=self.qkv_parts, exclude=exclude, method=self.method_name, occupied=occupied,
            defaults=self.default_targets,
        )
        # register the LoRA factors, not the wrappers: the wrapped base weights stay frozen when a
        # later injection callback re-freezes the model around the modules registered here
        return [f"{n}.{p}" for n in new for p in ("lora_A", "lora_B")]

    def apply_to(self, pl_module: pl.LightningModule) -> dict[str, LoRAGroupLinear]:
        """Injects outside a Trainer (e.g. before ``load_state_dict`` of a checkpoint); idempotent."""
        InjectionCallback.setup(self, None, pl_module, "fit")  # type: ignore[arg-type]
        return self.layers(pl_module)

    def layers(self, pl_module: pl.LightningModule) -> dict[str, LoRAGroupLinear]:
        """The layers this callback adapted, by qualified name (model order)."""
        names = pl_module.__dict__.get(self._REGISTRY, {}).get(self.injection_key)
        if names is None:
            raise RuntimeError(
                f"{self.method_name} has not been injected into {type(pl_module).__name__} yet: add the callback "
                "to the Trainer (it injects in setup) or call apply_to(pl_module)"
            )
        return lora_layers(pl_module, dict.fromkeys(n.rpartition(".")[0] for n in names))

    # ------------------------------------------------------------------ merging
    def merge(self, pl_module: pl.LightningModule) -> None:
        """Folds every group into its base weight (no extra inference cost)."""
        for layer in self.layers(pl_module).values():
            layer.merge()

    def unmerge(self, pl_module: pl.LightningModule) -> None:
        """Takes every group out of its base weight again (to train on)."""
        for layer in self.layers(pl_module).values():
            layer.unmerge()

    def is_merged(self, pl_module: pl.LightningModule) -> bool:
        """Whether the groups are merged (all of them; raises if only some are)."""
        states = {layer.merged for layer in self.layers(pl_module).values()}
        if len(states) > 1:
            raise RuntimeError(f"{self.method_name}: some LoRA groups are merged and others are not")
        return states.pop()

    @staticmethod
    def stream_finished(trainer: pl.Trainer) -> bool:
        """True when the fit that just ended trained the last experience of the stream."""
        dm = get_stream(trainer)
        if dm.joint and dm.pinned_experience is None:
            return True
        last_epoch = max(trainer.current_epoch - 1, 0)
        return dm.experience_at_epoch(last_epoch) == dm.num_experiences - 1

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if any(layer.merged for layer in self.layers(pl_module).values()):
            self.unmerge(pl_module)
            rank_zero_info(f"{self.method_name}: unmerged the LoRA groups from the base weights to train them")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.merge_on_end and self.stream_finished(trainer):
            self.merge(pl_module)


class LoRA(LoRAGroupCallback):
    """Plain LoRA (Hu et al., ICLR 2022) on the attention projections: the PEFT baseline.

    One LoRA module per targeted linear layer, ``y = W0 x + (alpha / r) B A x``. Defaults
    ``rank=8, alpha=16`` are common LoRA settings (the LoRA paper tunes them per task); timm ViT
    ``qkv`` is adapted as a whole. See the module docstring for targets and merging.
    """

    def __init__(
        self,
        targets: Sequence[str] | str | None = None,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        train_head: bool = True,
        head_name: str | None = None,
        merge_on_end: bool = True,
    ) -> None:
        super().__init__(targets=targets, num_loras=1, rank=rank, alpha=alpha, dropout=dropout, qkv_parts=None,
                         train_head=train_head, head_name=head_name, merge_on_end=merge_on_end)
