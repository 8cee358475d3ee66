"""LoRAMoE as a Lightning callback: routed LoRA experts on the FFN layers of a frozen backbone, with
the localized balancing constraint as an extra loss term.

The method and how its defaults follow the paper and the official code: ``docs/methods/loramoe.md``.
The callback

- injects the experts in ``setup()`` (before the optimizer is built) and freezes everything else
  except the classification head (:class:`~callbacks.injection.InjectionCallback`);
- types every training sample (group 0 "world knowledge / retained", 1 "new task") and hands the
  batch to the layers in ``on_train_batch_start``; the layers attach ``beta * CV(I o Q)^2`` of each
  layer to their output with the aux-loss op, so the user's ``training_step`` is unchanged and the
  gradient follows Lightning's loss scaling, accumulation, AMP and DDP;
- logs ``loramoe/balance_loss`` (summed over layers), ``loramoe/group{g}_weight`` and
  ``loramoe/expert{n}_load`` every step, ``loramoe/type{s}_group{g}_weight`` every epoch.

Sample types in a stream (``sample_type``). Type 0 is "world knowledge / retained" (the first
``num_knowledge_experts`` experts are its group), type 1 "new task". The official code codes them the
other way round: its ``task_type == 1`` is world knowledge (closed-book QA in its data) and is paired
with the *first* half of the experts, ``task_type == 0`` the downstream tasks with the second half
(``peft/tuners/lora.py``, the ``blcls`` term); so official labels port as ``type = 1 - task_type``
with the same expert order (see ``docs/methods/loramoe-in-a-stream.md``).

- ``"experience"`` (default): a sample's type is 0 when the experience its data comes from is one
  of the first ``knowledge_experiences`` (default 1), else 1. The source experience is read per
  sample from its task label (task-incremental streams with distinct task labels) or from its class
  (classes disjoint across experiences), so replayed samples of early experiences keep type 0;
  otherwise (domain-incremental streams) every sample gets the current experience's type.
- ``"current"``: every sample of a batch gets the type of the experience being trained.
- a ``dict`` ``{task_label: type}``: by task label.
- a callable ``fn(batch) -> LongTensor`` of shape ``(batch,)`` with values in ``{0, 1}``.

Forwards on buffer samples inside a step (DER/DER++'s replay forwards, announced through
:func:`cl_plugins.buffer_contract.replay_forward`) are typed the same way, from the buffer samples'
own labels.

The types are checked on the device, without a host sync in the step; a bad one fails the fit at the
end of its epoch.

In a stream, use LoRAMoE with a small replay buffer (:class:`callbacks.ExperienceReplay`): the paper
trains on both data types in every batch, and with ``"experience"`` typing the replayed samples of
the first experience are knowledge-typed, so the balancing constraint keeps holding the knowledge
experts in place after it. Without replay (or another source of knowledge-typed samples, e.g. a
``sample_type`` callable over batches that mix in general data) no knowledge-typed sample follows
the knowledge experiences; the callback counts the types of each experience's training samples
(``type_counts``) and warns at the end of an experience that had none.

With k-FPF (:class:`callbacks.kfpf.KFPF`): k-FPF's buffer phases fine-tune the modules it selects
with their own optimizer. Its defaults select the normalization layers and the first convolution /
patch embedding, which LoRAMoE freezes to keep the pretrained (world) knowledge intact, so the pair
fails at fit start with an error saying so (``allow_backbone_updates=True`` accepts it). Restricted
to trainable modules it works: ``KFPF(norms=False, first_conv=False, patterns=[r"\\.router$"])``
fine-tunes the head and the routers on the buffer; put ``LoRAMoE`` before ``KFPF`` in
``callbacks=[...]`` so that the routers exist when k-FPF selects its modules. The balancing term is
not applied during the phases (they are not training steps of the stream).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.injection import InjectionCallback
from cl_plugins.buffer_contract import ReplayForwardListener
from cl_plugins.peft.loramoe import (
    DEFAULT_ALPHA,
    DEFAULT_BALANCE_WEIGHT,
    DEFAULT_DELTA,
    DEFAULT_DROPOUT,
    DEFAULT_KNOWLEDGE_RATIO,
    DEFAULT_NUM_EXPERTS,
    DEFAULT_RANK,
    NUM_GROUPS,
    LoRAMoEContext,
    inject_loramoe,
    loramoe_layers,
    split_experts,
)
from cl_plugins.protocols import find_head
from datamodules.stream import ContinualDataModule

SampleType = str | Mapping[int, int] | Callable[[Any], Tensor]


class LoRAMoE(InjectionCallback, ReplayForwardListener):
    """LoRAMoE (Dou et al., ACL 2024) for timm ViTs, BERT-style encoders or any model with FFN layers.

    Args:
        targets: regular expressions of the linear layers to equip; ``None``: the feed-forward layers
            (timm ViT ``mlp.fc1`` / ``mlp.fc2``, BERT ``intermediate.dense`` / ``output.dense``).
        num_experts: experts per layer (paper: 6).
        rank: LoRA rank of each expert (paper: 4).
        alpha: LoRA alpha; experts are scaled by ``alpha / rank`` (code: 32).
        dropout: dropout on the experts' input (code: 0.05).
        per_expert_dropout: an independent dropout mask per expert, as the code (slower: ``N``
            masked copies of each input); default: one mask shared by the experts.
        num_knowledge_experts: experts in group 0 (world knowledge / retained data); the others form
            group 1 (new tasks). Give this or ``knowledge_ratio``, not both.
        knowledge_ratio: share of the experts in group 0 (default 0.5, as the code's equal halves).
        balance_weight: ``beta``, weight of each layer's balancing term (paper: 0.1); 0 turns it off.
        delta: ``delta`` of the coefficient matrix (paper: 0.1).
        sample_type: how samples are typed (see the module docstring): ``"experience"``,
            ``"current"``, ``{task_label: type}`` or ``fn(batch) -> LongTensor``.
        knowledge_experiences: for ``"experience"`` / ``"current"``: the first this many experiences
            are type 0 (our choice of default: 1, the first experience).
        allow_backbone_updates: accept other callbacks (k-FPF) that fine-tune parameters LoRAMoE froze.
        log_stats: gather the router statistics every step and log them where Lightning writes step
            metrics, as the mean since the previous write (epoch means exact; off: only the balancing loss
            is logged, and the layers skip the bookkeeping).
        train_head / head_name: see :class:`~callbacks.injection.InjectionCallback`.
    """

    def __init__(
        self,
        targets: Sequence[str] | None = None,
        num_experts: int = DEFAULT_NUM_EXPERTS,
        rank: int = DEFAULT_RANK,
        alpha: float = DEFAULT_ALPHA,
        dropout: float = DEFAULT_DROPOUT,
        num_knowledge_experts: int | None = None,
        knowledge_ratio: float | None = None,
        balance_weight: float = DEFAULT_BALANCE_WEIGHT,
        delta: float = DEFAULT_DELTA,
        sample_type: SampleType = "experience",
        knowledge_experiences: int = 1,
        allow_backbone_updates: bool = False,
        log_stats: bool = True,
        train_head: bool = True,
        head_name: str | None = None,
        per_expert_dropout: bool = False,
    ) -> None:
        super().__init__(train_head=train_head, head_name=head_name)
        self.per_expert_dropout = per_expert_dropout
        if isinstance(targets, str):
            targets = [targets]
        if num_knowledge_experts is not None and knowledge_ratio is not None:
            raise ValueError("give num_knowledge_experts or knowledge_ratio, not both")
        if knowledge_ratio is not None and not 0.0 < knowledge_ratio < 1.0:
            raise ValueError(f"knowledge_ratio must be in (0, 1), got {knowledge_ratio}")
        if num_knowledge_experts is None:
            ratio = DEFAULT_KNOWLEDGE_RATIO if knowledge_ratio is None else knowledge_ratio
            num_knowledge_experts = min(max(int(round(ratio * num_experts)), 1), max(num_experts - 1, 1))
        if isinstance(sample_type, str) and sample_type not in ("experience", "current"):
            raise ValueError(
                f"sample_type must be 'experience', 'current', a dict {{task_label: type}} or a callable "
                f"fn(batch) -> LongTensor, got {sample_type!r}"
            )
        if isinstance(sample_type, Mapping):
            bad = {k: v for k, v in sample_type.items() if v not in range(NUM_GROUPS)}
            if bad:
                raise ValueError(f"sample_type maps task labels to types 0 or 1; got {bad}")
        elif not isinstance(sample_type, str) and not callable(sample_type):
            raise TypeError(f"sample_type must be a string, a dict or a callable, got {type(sample_type).__name__}")
        if knowledge_experiences < 1:
            raise ValueError(f"knowledge_experiences must be >= 1, got {knowledge_experiences}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.targets = list(targets) if targets is not None else None
        self.num_experts, self.rank, self.alpha, self.dropout = num_experts, rank, float(alpha), float(dropout)
        self.num_knowledge_experts = num_knowledge_experts
        self.sample_type = sample_type
        self.knowledge_experiences = knowledge_experiences
        self.allow_backbone_updates = allow_backbone_updates
        self.log_stats = log_stats
        self._stats: dict[str, Tensor] = {}  # the step's router statistics, until the base class logs them
        self.context = LoRAMoEContext(split_experts(num_experts, num_knowledge_experts), delta=delta,
                                      balance_weight=balance_weight, tracker=self.aux)
        self.context.collect_stats = log_stats
        #: qualified names of the equipped layers
        self.layer_names: list[str] = []
        self._lookup: tuple[str, Tensor | None] = ("current", None)
        self._task_lookup: Tensor | None = None
        self._trainer: pl.Trainer | None = None
        self._step_batch: Any = None
        #: per experience, training samples of type 0 and 1 (device tensors, read at experience ends)
        self._type_counts: dict[int, Tensor] = {}
        self._warned_no_knowledge = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(targets=tuple(self.targets) if self.targets else None)

    @property
    def config(self) -> dict[str, Any]:
        """The settings a checkpoint must agree with."""
        return {"num_experts": self.num_experts, "rank": self.rank, "alpha": self.alpha,
                "num_knowledge_experts": self.num_knowledge_experts}

    # ------------------------------------------------------------------ injection
    def inject(self, pl_module: pl.LightningModule) -> list[str]:
        exclude = [find_head(pl_module, self.head_name)[0]] if self.train_head else []
        occupied = self.other_injections(pl_module)
        return inject_loramoe(pl_module, self.context, self.targets, self.rank, self.alpha, self.dropout,
                              exclude=exclude, per_expert_dropout=self.per_expert_dropout, occupied=occupied)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        prefixes = {n.rsplit(".", 1)[0] for n in pl_module.__dict__[self._REGISTRY][self.injection_key]}
        layers = {n: m for n, m in loramoe_layers(pl_module).items() if n in prefixes}
        for name, layer in layers.items():
            shape = (layer.num_experts, layer.experts.rank, layer.experts.alpha)
            if shape != (self.num_experts, self.rank, self.alpha) or not torch.equal(
                    layer.expert_groups.cpu(), self.context.expert_groups):
                raise ValueError(
                    f"{name} carries LoRAMoE experts (experts, rank, alpha) = {shape} with groups "
                    f"{layer.expert_groups.tolist()} from an earlier injection, but this callback has "
                    f"{(self.num_experts, self.rank, self.alpha)} with groups {self.context.expert_groups.tolist()}"
                )
            layer.context = self.context  # a new callback instance on a module injected before
        self.layer_names = list(layers)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.allow_backbone_updates:
            return
        for cb in trainer.callbacks:
            params = getattr(getattr(cb, "selection", None), "params", None)
            if cb is self or not isinstance(params, Mapping):
                continue
            frozen = [n for n, p in params.items() if isinstance(p, torch.nn.Parameter) and not p.requires_grad]
            if frozen:
                raise ValueError(
                    f"{type(cb).__name__} would fine-tune {len(frozen)} parameter tensors that LoRAMoE froze to keep "
                    f"the pretrained knowledge intact (e.g. {frozen[:4]}). Restrict it to trainable modules, e.g. "
                    "KFPF(norms=False, first_conv=False, patterns=[r'\\.router$']) (head and routers; put LoRAMoE "
                    "before it in callbacks=[...]), or pass LoRAMoE(allow_backbone_updates=True) to accept it"
                )

    # ------------------------------------------------------------------ sample types
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        _check_no_activation_checkpointing(pl_module)
        self.prepare_types(self.stream(trainer))

    def prepare_types(self, dm: ContinualDataModule) -> None:
        """Builds the lookups from task label / class to source experience or type for ``dm``."""
        self._lookup = _experience_lookup(dm)
        if isinstance(self.sample_type, Mapping):
            known = {t for ts in dm.task_labels for t in ts}
            missing = sorted(known - set(self.sample_type))
            if missing:
                raise ValueError(
                    f"sample_type maps task labels {sorted(self.sample_type)} but the stream has task labels "
                    f"{missing} too: give a type (0 or 1) for every task label"
                )
            size = 1 + max(max(known, default=0), max(self.sample_type, default=0))
            lut = torch.full((size,), -1, dtype=torch.long)
            for k, v in self.sample_type.items():
                lut[k] = v
            self._task_lookup = lut

    def resolve_types(self, batch: Any) -> Tensor:
        """Type (0 or 1) of every sample of ``batch`` under ``sample_type`` (-1: a label no experience has);
        counted per experience while ``fit`` trains (on the device, no host sync)."""
        types = self._resolve_types(batch)
        if self._trainer is not None and self._trainer.training and types.numel():
            exp = self.stream(self._trainer).current_experience
            flat = types.flatten()
            counts = torch.stack([(flat == 0).sum(), (flat == 1).sum()])
            prev = self._type_counts.get(exp)
            self._type_counts[exp] = counts if prev is None else prev + counts.to(prev.device)
        return types

    @property
    def type_counts(self) -> dict[int, list[int]]:
        """``{experience: [type-0 samples, type-1 samples]}`` seen in training (this process)."""
        return {e: [int(v) for v in c.tolist()] for e, c in sorted(self._type_counts.items())}

    def on_experience_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> None:
        counts = self._type_counts.get(experience)
        if counts is None or experience < self.knowledge_experiences or self._warned_no_knowledge:
            return
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
        if int(counts[0]) == 0:
            self._warned_no_knowledge = True
            rank_zero_warn(
                f"LoRAMoE: experience {experience} trained on no knowledge-typed (type 0) sample, so the balancing "
                "constraint did not hold the knowledge experts in place. The paper mixes both types in every batch: "
                "add a small replay buffer (callbacks.ExperienceReplay, e.g. buffer_size=200; replayed samples of "
                f"the first {self.knowledge_experiences} experience(s) are type 0) or type general data mixed into "
                "the batches as 0 with sample_type=fn(batch)"
            )

    def _resolve_types(self, batch: Any) -> Tensor:
        if callable(self.sample_type) and not isinstance(self.sample_type, Mapping):
            out = self.sample_type(batch)
            if not isinstance(out, Tensor):
                raise TypeError(f"sample_type callable must return a LongTensor, got {type(out).__name__}")
            return out
        if not isinstance(batch, (list, tuple)) or len(batch) != 3:
            raise TypeError(
                "LoRAMoE types samples from stream batches (x, y, task_label); got "
                f"{type(batch).__name__}: pass sample_type=fn(batch) -> LongTensor for other batches"
            )
        _, y, t = batch
        if isinstance(self.sample_type, Mapping):
            lut = self._task_lookup
            if lut is None:
                raise RuntimeError("LoRAMoE builds its task-label mapping in on_train_start, which did not run")
            if lut.device != t.device:
                lut = self._task_lookup = lut.to(t.device)  # once, not a copy from the host every step
            return _lookup(lut, t)
        kind, lut = self._lookup
        if self.sample_type == "current" or lut is None:
            if self._trainer is None:
                raise RuntimeError("LoRAMoE types samples by the current experience during trainer.fit only")
            exp = self.stream(self._trainer).current_experience
            return torch.full((y.shape[0],), int(exp >= self.knowledge_experiences), dtype=torch.long,
                              device=y.device)
        keys = t if kind == "task" else y
        if lut.device != keys.device:
            lut = lut.to(keys.device)  # once, not a copy from the host every step
            self._lookup = (kind, lut)
        exp = _lookup(lut, keys)
        return torch.where(exp < 0, exp, (exp >= self.knowledge_experiences).long())  # -1 stays: reported

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._trainer = trainer
        self._step_batch = batch
        self.context.begin_step(batch, self.resolve_types)

    @contextmanager
    def replay_forward_context(self, samples: dict[str, Tensor]) -> Iterator[None]:
        """A forward on buffer samples in the step (DER's replay): its samples are typed like a batch's
        (from their own labels), then the step's batch is handed back to the layers."""
        step = self._step_batch
        self.context.begin_step([samples["x"], samples["y"], samples["t"]], self.resolve_types)
        try:
            yield
        finally:
            if step is None:
                self.context.end_forward()
            else:
                self.context.begin_step(step, self.resolve_types)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        self.context.end_forward()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._step_batch = None
        self.context.end_forward()
        stats = self.context.pop_stats()
        if "balance_loss" in stats:
            self.aux.record("loramoe/balance_loss", stats.pop("balance_loss"))
        self._stats = {f"loramoe/{k}": v for k, v in stats.items()} if self.log_stats else {}
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # logs them with the terms

    step_value_kind = "LoRAMoE router statistic"

    def step_values(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """This step's router statistics (logged with the balancing term, in one write)."""
        stats, self._stats = self._stats, {}
        return stats

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the checks and statistics that need the host, once per epoch rather than every step
        self.context.check_types()
        type_stats = self.context.pop_type_stats()
        if self.log_stats:
            for key, value in type_stats.items():
                pl_module.log(f"loramoe/{key}", value, on_step=False, on_epoch=True)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.context.end_forward()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config", {})
        if saved and saved != self.config:
            raise ValueError(
                f"the checkpoint's LoRAMoE was built with {saved}, this callback has {self.config}: "
                "resume with the same num_experts, rank, alpha and expert split"
            )


def _check_no_activation_checkpointing(model: torch.nn.Module) -> None:
    """Raises when Hugging Face or timm activation checkpointing is on somewhere in ``model``."""
    checkpointed = [n or "<root>" for n, m in model.named_modules()
                    if getattr(m, "gradient_checkpointing", False) is True
                    or getattr(m, "grad_checkpointing", False) is True]
    if checkpointed:
        raise ValueError(
            f"LoRAMoE attaches its balancing term in the forward of the training step and cannot follow "
            f"activation checkpointing (enabled on {checkpointed[:3]}): a reentrant recomputation runs without "
            "gradients and would drop the term. Disable it (model.gradient_checkpointing_disable() for "
            "Hugging Face models, set_grad_checkpointing(False) for timm)"
        )


def _experience_lookup(dm: ContinualDataModule) -> tuple[str, Tensor | None]:
    """How to find a sample's source experience: by task label, by class, or not at all."""
    tasks = dm.task_labels
    flat = [t for ts in tasks for t in ts]
    if len(set(flat)) > 1 and len(flat) == len(set(flat)):
        lut = torch.full((1 + max(flat),), -1, dtype=torch.long)
        for e, ts in enumerate(tasks):
            lut[list(ts)] = e
        return "task", lut
    classes = dm.classes_in_experience
    flat = [c for cs in classes for c in cs]
    if len(classes) > 1 and len(flat) == len(set(flat)):
        lut = torch.full((1 + max(flat),), -1, dtype=torch.long)
        for e, cs in enumerate(classes):
            lut[list(cs)] = e
        return "class", lut
    return "current", None


def _lookup(lut: Tensor, keys: Tensor) -> Tensor:
    """``lut[keys]``, -1 for keys outside the table, on the keys' device without a host sync: the
    context's end-of-epoch type check reports the -1 entries (classes or task labels no experience has)."""
    keys = keys.long()
    lut = lut.to(keys.device)
    inside = (keys >= 0) & (keys < lut.numel())
    return torch.where(inside, lut[keys.clamp(0, lut.numel() - 1)], -1)
