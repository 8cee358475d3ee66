"""L2M as a Lightning callback: a key-selected modulation pool on a frozen transformer.

The method, its defaults and how they follow the official code: ``docs/methods/l2m.md``.
The callback injects the pool in ``setup()`` (before the optimizer is built), computes the query in
forward hooks (no change to the user's ``training_step``), learns the keys (``key_update="mean"``, the
default: after each training batch every selected key becomes the mean direction of the queries that
selected it, summed over DDP ranks; ``"gradient"``: the key-matching loss is attached with
:meth:`ContinualCallback.attach_loss`; the key loss is logged as ``l2m/key_loss`` in both), counts
which keys each experience selects in training (``key_histograms``; logged as ``l2m/key{i}_frac`` at
the end of the experience) and sets the count penalty at the start of each experience.

It also counts the keys selected in evaluation, per test experience (``eval_key_histograms``: one
``bincount`` per eval batch, one all-reduce per eval pass), so training and test selection can be
compared: the fraction of test experience ``j``'s samples that select a key training experience
``j`` selected is logged as ``l2m/val_key_match_exp{j}`` (``l2m/test_...`` in ``trainer.test``).
L2M identifies the task from the input alone, so this is its task-identification rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from callbacks.injection import InjectionCallback
from cl_plugins.peft.l2m import (
    DEFAULT_KEY_LOSS_WEIGHT,
    DEFAULT_KEY_UPDATE,
    DEFAULT_POOL_SIZE,
    DEFAULT_RANK,
    DEFAULT_TOP_K,
    ModulationPool,
    QueryHooks,
    find_pad_token_id,
    find_query_module,
    find_query_tap,
    install_l2m,
    probe_query_dim,
    resolve_targets,
)
from cl_plugins.protocols import find_head

#: attribute of the LightningModule that holds the pool (keys, count penalty)
POOL_NAME = "l2m_pool"


class L2M(InjectionCallback):
    """Learning to Modulate (Schmied et al., NeurIPS 2023) for any timm ViT / BERT-style classifier.

    Args:
        targets: regular expressions of the linear layers to modulate (their outputs); ``None``:
            the official placement for the detected architecture (timm ViT: ``attn.qkv`` q and v
            slices and ``mlp.fc1`` for LoRA, ``attn.qkv`` k and v slices for (IA)^3; BERT:
            ``query``, ``value``, ``intermediate.dense`` / ``key``, ``value``).
        pool_size: entries ``M`` of the pool (paper: 30).
        top_k: entries selected per sample (paper: 1); more are averaged.
        rank: LoRA rank (paper: 8).
        modulator: ``"lora"`` (default) or ``"ia3"`` (learned scaling vectors).
        query: ``"embedding"`` (default, as the paper: token mean of the frozen embedding layer's
            output before its dropout, see ``query_tap``; no extra cost) or ``"pooled"`` (the frozen,
            unmodulated model's pooled features, i.e. the input of the head: one extra no-grad
            forward per step).
        key_loss_weight: weight of ``1 - cos(q, k_selected)`` (official ``pull_constraint_coef``
            0.5); 0 freezes the keys.
        key_update: ``"mean"`` (default): after each training batch, every key that training samples
            selected is set to the mean direction of all the (unit) queries that have selected it, the
            minimiser of the key loss over them; the keys are a buffer outside the optimizer. This is
            the state upstream's keys reach in its 100k steps per task (AdamW, lr 1e-4), reached at any
            budget, so that test-time selection (plain cosine) finds the keys each task trained.
            ``"gradient"``: upstream's mechanism (the key loss through the user's optimizer); at a few
            hundred steps per experience the keys barely leave their random start and later
            experiences' test samples select other experiences' keys (see
            ``docs/methods/l2m-key-selection.md``).
        alpha: LoRA ``alpha`` (default ``2 * rank``, as upstream).
        count_penalty: from the second experience on, penalise keys that earlier experiences
            selected, in training only (upstream default for L2M).
        key_init: ``"uniform"`` (U[-1, 1], upstream) or ``"normal"``.
        input_targets: (IA)^3 only: layers whose *input* is scaled (default: the second FF layer,
            i.e. the FF activation, as (IA)^3).
        qkv_parts: slices of a fused ``qkv`` layer to modulate (default "qv" LoRA, "kv" (IA)^3).
        query_module: qualified name of the embedding module for ``query="embedding"`` (default:
            ``patch_embed`` / ``embeddings``); its input gives the token ids of the padding mask.
        query_tap: qualified name of the module (``query_module`` or a submodule) whose output is
            averaged into the query. Default: ``query_module`` when it holds no dropout, else its
            ``LayerNorm`` child (Hugging Face ``embeddings``: the embedding before the dropout), so
            the query of an input is the same in every training forward and at test time; a query
            module with dropout and no single ``LayerNorm`` child needs it (see
            :func:`cl_plugins.peft.l2m.find_query_tap`).
        lora_init: ``"upstream"`` (default: every LoRA ``A`` drawn with the bound of upstream's
            single Kaiming-uniform call on the whole pooled tensor, ~17x below ``nn.Linear``'s on
            MiniLM-L6) or ``"linear"`` (each layer's ``1 / sqrt(d_in)``).
        query_root: qualified name of the module whose forward receives the input batch (default:
            the LightningModule itself); its forward hooks compute the pooled query and clear the
            selection after each forward.
        query_dim: dimension of the query; default: probed with one forward of one training sample.
        pad_token_id: padding id masked out of the token mean (default: from the Hugging Face config).
        train_head / head_name: see :class:`InjectionCallback`.

    Distributed training works with plain ``strategy="ddp"``: each pool tensor is one parameter
    indexed per sample, so entries no sample selected still receive a (zero) gradient and DDP's
    reducer sees every parameter; the selection counts are all-reduced after each training batch
    (one all-reduce of ``pool_size`` integers), so every rank holds the same histograms and count
    penalty. Regularizer math (similarities, key loss) runs in float32 under any precision.

    After ``fit`` the model stays modulated (hooks and pool in place): ``validate``/``test``/
    ``predict`` select keys from the input alone.

    Attributes:
        key_histograms: ``{experience: [count of key 0, ..., key M-1]}``: how many training samples
            selected each key in each experience (summed over DDP ranks); part of the state dict.
        eval_key_histograms: ``{"validate" | "test": {test experience: [count per key]}}`` of the
            latest validation / test pass (sanity checks excluded; summed over DDP ranks).
        pool: the :class:`ModulationPool` (keys) once set up.
    """

    def __init__(
        self,
        targets: Sequence[str] | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        top_k: int = DEFAULT_TOP_K,
        rank: int = DEFAULT_RANK,
        modulator: str = "lora",
        query: str = "embedding",
        key_loss_weight: float = DEFAULT_KEY_LOSS_WEIGHT,
        alpha: float | None = None,
        count_penalty: bool = True,
        key_init: str = "uniform",
        key_update: str = DEFAULT_KEY_UPDATE,
        input_targets: Sequence[str] | None = None,
        qkv_parts: str | None = None,
        query_module: str | None = None,
        query_tap: str | None = None,
        lora_init: str = "upstream",
        query_root: str | None = None,
        query_dim: int | None = None,
        pad_token_id: int | None = None,
        train_head: bool = True,
        head_name: str | None = None,
    ) -> None:
        super().__init__(train_head=train_head, head_name=head_name)
        if modulator not in ("lora", "ia3"):
            raise ValueError(f"modulator must be 'lora' or 'ia3', got {modulator!r}")
        if query not in ("embedding", "pooled"):
            raise ValueError(f"query must be 'embedding' or 'pooled', got {query!r}")
        if pool_size < 1 or not 1 <= top_k <= pool_size:
            raise ValueError(f"need pool_size >= 1 and 1 <= top_k <= pool_size, got {pool_size=}, {top_k=}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if key_loss_weight < 0:
            raise ValueError(f"key_loss_weight must be >= 0, got {key_loss_weight}")
        if lora_init not in ("upstream", "linear"):
            raise ValueError(f"lora_init must be 'upstream' or 'linear', got {lora_init!r}")
        if key_update not in ("mean", "gradient"):
            raise ValueError(f"key_update must be 'mean' or 'gradient', got {key_update!r}")
        self.key_update = key_update
        self.targets = None if targets is None else list(targets)
        self.pool_size, self.top_k, self.rank, self.alpha = pool_size, top_k, rank, alpha
        self.modulator, self.query = modulator, query
        self.key_loss_weight, self.count_penalty, self.key_init = key_loss_weight, count_penalty, key_init
        self.input_targets = None if input_targets is None else list(input_targets)
        self.qkv_parts, self.query_module, self.query_root = qkv_parts, query_module, query_root
        self.query_dim, self.pad_token_id = query_dim, pad_token_id
        self.query_tap, self.lora_init = query_tap, lora_init
        self.pool: ModulationPool | None = None
        self.hooks: QueryHooks | None = None
        self._counts: dict[int, Tensor] = {}
        #: per stage, the counts of the eval pass in progress (test experience -> counts)
        self._eval_pass: dict[str, dict[int, Tensor]] = {}
        #: per stage, the counts of the latest finished eval pass
        self._eval_counts: dict[str, dict[int, Tensor]] = {}
        self._trainer: pl.Trainer | None = None

    # ------------------------------------------------------------------ injection
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        super().setup(trainer, pl_module, stage)
        pool = getattr(pl_module, POOL_NAME, None)
        if not isinstance(pool, ModulationPool):
            raise RuntimeError(f"L2M: the module has no '{POOL_NAME}' after injection")
        if pool.key_update != self.key_update:
            raise ValueError(
                f"L2M(key_update={self.key_update!r}) on a module whose pool was injected with "
                f"key_update={pool.key_update!r}: use the same key_update for every fit of this module"
            )
        self.pool = pool
        pool.state.loss_hook = self._attach_key_loss
        pool.auto_key_update = False  # applied in on_train_batch_end, summed over DDP ranks

    def _attach_key_loss(self, output: Tensor, term: Tensor) -> Tensor:
        return self.attach_loss(output, term, "l2m/key_loss")

    def _example_input(self, pl_module: pl.LightningModule) -> Tensor:
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError("L2M needs the trainer to probe the query dimension: pass query_dim=...")
        dm = self.stream(trainer)
        dataset = dm.train_dataset(dm.experience_at_epoch(max(trainer.current_epoch, 0)))
        x = dataset[0][0]
        x = x if isinstance(x, Tensor) else torch.as_tensor(x)
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        return x.unsqueeze(0).to(device)

    def inject(self, pl_module: pl.LightningModule) -> list[str]:
        head_name, head = find_head(pl_module, self.head_name)
        occupied = self.other_injections(pl_module)
        placement = resolve_targets(pl_module, self.modulator, self.targets, self.input_targets, self.qkv_parts,
                                    exclude=[head_name], occupied=occupied)
        root = pl_module if self.query_root is None else pl_module.get_submodule(self.query_root)
        query_module = tap = None
        if self.query == "embedding":
            query_name, query_module = find_query_module(pl_module, self.query_module, placement.preset)
            _, tap = find_query_tap(pl_module, query_name, query_module, self.query_tap)
        key_dim = self.query_dim
        if key_dim is None:
            key_dim = probe_query_dim(root, self._example_input(pl_module), self.query, tap, head)
        pool, placement = install_l2m(
            pl_module, key_dim, modulator=self.modulator, pool_size=self.pool_size, top_k=self.top_k, rank=self.rank,
            alpha=self.alpha, key_loss_weight=self.key_loss_weight, key_init=self.key_init, pool_name=POOL_NAME,
            placement=placement, lora_init=self.lora_init, key_update=self.key_update,  # type: ignore[arg-type]
        )
        pad = self.pad_token_id if self.pad_token_id is not None else find_pad_token_id(pl_module)
        self.hooks = QueryHooks(pool, root, self.query, query_module, head, pad, query_tap=tap).install()
        return [POOL_NAME, *placement.output, *placement.input]

    # ------------------------------------------------------------------ experiences
    def on_experience_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> None:
        pool = self._pool()
        earlier = [c.to(pool.keys.device) for e, c in self._counts.items() if e < experience]
        counts = torch.stack(earlier).sum(0) if (self.count_penalty and earlier) else None
        pool.set_count_penalty(counts)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pool = self._pool()
        distributed = (trainer.world_size > 1 and torch.distributed.is_available()
                       and torch.distributed.is_initialized())
        if pool.key_update == "mean":
            if pool.state.key_sums is not None and pool.last_key_loss is not None:
                self.aux.record("l2m/key_loss", pool.last_key_loss)  # monitoring only: no gradient in this mode
            sums = pool.pop_key_sums()
            if distributed:
                torch.distributed.all_reduce(sums)
            pool.apply_key_update(sums)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        counts = pool.pop_counts()
        if distributed:
            torch.distributed.all_reduce(counts)
        exp = self.stream(trainer).experience_at_epoch(trainer.current_epoch)
        prev = self._counts.get(exp)
        self._counts[exp] = counts if prev is None else prev.to(counts.device) + counts

    def on_experience_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> None:
        counts = self._counts.get(experience)
        if counts is None:
            return
        frac = counts.double() / counts.sum().clamp_min(1)
        for i, f in enumerate(frac.tolist()):
            pl_module.log(f"l2m/key{i}_frac", f, on_step=False, on_epoch=True, sync_dist=False)

    # ------------------------------------------------------------------ evaluation selection
    def _eval_start(self, stage: str) -> None:
        self._pool().pop_eval_counts()  # drop selections of forwards outside this pass
        self._eval_pass[stage] = {}

    def _eval_batch_end(self, trainer: pl.Trainer, stage: str, dataloader_idx: int) -> None:
        counts = self._pool().pop_eval_counts()
        if trainer.sanity_checking:
            return
        run = self._eval_pass.setdefault(stage, {})
        prev = run.get(dataloader_idx)
        run[dataloader_idx] = counts if prev is None else prev + counts

    def _eval_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, prefix: str) -> None:
        run = self._eval_pass.pop(stage, {})
        if trainer.sanity_checking:
            return
        pool = self._pool()
        n_exp = max([self.stream(trainer).num_test_experiences, *(j + 1 for j in run)])
        table = torch.zeros(n_exp, pool.pool_size, dtype=torch.long, device=pool.keys.device)
        for j, c in run.items():
            table[j] += c.to(table.device)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(table)
        self._eval_counts[stage] = {j: table[j] for j in range(n_exp) if int(table[j].sum()) > 0}
        for j, match in self.eval_key_match(stage).items():
            pl_module.log(f"l2m/{prefix}_key_match_exp{j}", match, on_step=False, on_epoch=True, sync_dist=False)

    def eval_key_match(self, stage: str = "validate") -> dict[int, float]:
        """Per test experience ``j`` of the latest ``stage`` pass: the share of its samples whose
        selected key is one that training experience ``j`` selected (``j`` trained so far only)."""
        out = {}
        for j, counts in self._eval_counts.get(stage, {}).items():
            trained = self._counts.get(j)
            if trained is not None:
                used = trained.to(counts.device) > 0
                out[j] = float(counts[used].sum()) / max(int(counts.sum()), 1)
        return out

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start("validate")

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, "validate", dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "validate", "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start("test")

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, "test", dataloader_idx)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "test", "test")

    def _pool(self) -> ModulationPool:
        if self.pool is None:
            raise RuntimeError("L2M is not set up: add it to the Trainer's callbacks before fit")
        return self.pool

    # ------------------------------------------------------------------ selection statistics
    @property
    def key_histograms(self) -> dict[int, list[int]]:
        """Training samples that selected each key, per experience."""
        return {e: [int(v) for v in c.tolist()] for e, c in sorted(self._counts.items())}

    @property
    def key_fractions(self) -> dict[int, list[float]]:
        """Fraction of each experience's training samples that selected each key."""
        out = {}
        for e, counts in self.key_histograms.items():
            total = max(sum(counts), 1)
            out[e] = [c / total for c in counts]
        return out

    @property
    def eval_key_histograms(self) -> dict[str, dict[int, list[int]]]:
        """Samples of each test experience that selected each key in the latest validation / test pass."""
        return {stage: {j: [int(v) for v in c.tolist()] for j, c in sorted(run.items())}
                for stage, run in self._eval_counts.items()}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"key_counts": self.key_histograms, "eval_key_counts": self.eval_key_histograms,
                "key_update": self.key_update}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # checkpoints written before key_update existed learnt the keys by gradient (a parameter in the optimizer)
        saved = state_dict.get("key_update", "gradient")
        if saved != self.key_update:
            raise ValueError(
                f"the checkpoint's L2M learnt its keys with key_update={saved!r}, this callback has "
                f"key_update={self.key_update!r}: resume with L2M(key_update={saved!r}) (the keys are a "
                "parameter of the optimizer in 'gradient' mode and a buffer in 'mean' mode)"
            )
        self._counts = {int(e): torch.tensor(c, dtype=torch.long) for e, c in state_dict["key_counts"].items()}
        # checkpoints written before evaluation counts were kept have no "eval_key_counts"
        self._eval_counts = {
            stage: {int(j): torch.tensor(c, dtype=torch.long) for j, c in run.items()}
            for stage, run in state_dict.get("eval_key_counts", {}).items()
        }
