"""L2M core (Schmied et al., "Learning to Modulate pre-trained Models in RL", NeurIPS 2023).

A frozen pretrained transformer gets a *modulation pool*: ``M`` learnable keys and, for every
targeted linear layer, ``M`` modulators (LoRA matrices or (IA)^3 scaling vectors). Per sample, a
query from the frozen model's embedding of the input selects the entry whose key is most
cosine-similar, and that entry's modulators are applied to the sample; keys are pulled toward the
queries that select them (by default each key is the mean direction of the queries that selected
it, the minimiser of ``1 - cos(q, k)``; ``key_update="gradient"`` learns them as upstream does),
modulators learn from the task loss. No task id is used.
Each pool tensor is one parameter per layer indexed per sample (DDP needs no
``find_unused_parameters``). :func:`install_l2m` wraps the target layers of any ``nn.Module`` and
:class:`QueryHooks` computes the query; ``callbacks.l2m.L2M`` does both from a Lightning callback.
The official code's defaults, each deviation and why not Hugging Face PEFT: ``docs/methods/l2m.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_plugins.peft.adapters import (
    AdapterLayer,
    fused_qkv_rows,
    inject_adapters,
    refuse_adapted,
    rows_index,
    target_patterns,
)
from cl_plugins.peft.adapters import resolve_targets as resolve_layers
from cl_plugins.peft.presets import PRESETS, FamilyPreset, detect_family

Modulator = Literal["lora", "ia3"]
QueryMode = Literal["embedding", "pooled"]
LoraInit = Literal["upstream", "linear"]
KeyUpdate = Literal["mean", "gradient"]

#: paper / official-code defaults (configs/agent_params/model_kwargs/prompt_kwargs/l2m_lora.yaml)
DEFAULT_POOL_SIZE = 30
DEFAULT_RANK = 8
DEFAULT_TOP_K = 1
#: ``pull_constraint_coef`` of the official DecisionTransformerSb3
DEFAULT_KEY_LOSS_WEIGHT = 0.5
#: ``1 / (freq + eps)`` in the count penalty, as upstream
COUNT_EPS = 1e-6
#: how the keys learn by default: each key is the minimiser of the key loss over the training queries that
#: selected it (the state upstream's keys converge to), see docs/methods/l2m-key-selection.md
DEFAULT_KEY_UPDATE: KeyUpdate = "mean"


def _lora_targets(family: FamilyPreset) -> tuple[str, ...]:
    """Upstream's LoRA placement: the query and value projections and the first FF layer."""
    return (*family.projections("qv"), family.ffn_in)


def _ia3_targets(family: FamilyPreset) -> tuple[str, ...]:
    """Upstream's (IA)^3 placement: keys and values scaled."""
    return family.projections("kv")


def _ia3_input_targets(family: FamilyPreset) -> tuple[str, ...]:
    """(IA)^3 on the FF activation: the input of the second FF layer is scaled."""
    return (family.ffn_out,)


#: default placement per modulator, as roles of the family table (:mod:`cl_plugins.peft.presets`)
DEFAULT_TARGETS = {"lora": _lora_targets, "ia3": _ia3_targets}
#: slices of a fused qkv layer modulated by default
DEFAULT_QKV_PARTS = {"lora": "qv", "ia3": "kv"}
#: modules whose output is random in train mode (a query module holding one needs a tap before it)
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


# --------------------------------------------------------------------------- selection math
def cosine_similarity_matrix(query: Tensor, keys: Tensor) -> Tensor:
    """``cos(q_b, k_m)`` for every sample and key, ``(B, M)``, in float32 whatever the autocast."""
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = F.normalize(query.float(), dim=-1, eps=1e-12)
        k = F.normalize(keys.float(), dim=-1, eps=1e-12)
        return q @ k.t()


def select_entries(
    query: Tensor, keys: Tensor, top_k: int = 1, inv_freq: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Top-``k`` keys per sample by cosine similarity.

    With ``inv_freq`` (the count penalty of training on later tasks), keys are ranked by
    ``(cos + 1) / 2 * inv_freq`` instead. Returns ``(idx, cos)``: the selected entries ``(B, k)``
    and their (unpenalised, differentiable w.r.t. ``keys``) cosine similarities ``(B, k)``.
    """
    if query.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(
            f"query must be (batch, {keys.shape[1]}) to match the keys, got {tuple(query.shape)}"
        )
    if not 1 <= top_k <= keys.shape[0]:
        raise ValueError(f"top_k must be in [1, pool_size={keys.shape[0]}], got {top_k}")
    sim = cosine_similarity_matrix(query, keys)
    with torch.no_grad():
        ranking = sim if inv_freq is None else (sim + 1) / 2 * inv_freq.float()
        idx = ranking.topk(top_k, dim=1).indices
    return idx, sim.gather(1, idx)


def key_matching_loss(cos_selected: Tensor) -> Tensor:
    """``mean_b sum_k (1 - cos(q_b, k_sel))``: pulls each selected key toward its query."""
    return (1.0 - cos_selected.float()).sum(dim=1).mean()


def inverse_frequency(counts: Tensor, eps: float = COUNT_EPS) -> Tensor:
    """Normalised ``1 / (freq + eps)`` of selection counts (the upstream count penalty)."""
    counts = counts.double()
    freq = counts / counts.sum().clamp_min(1.0)
    inv = 1.0 / (freq + eps)
    return (inv / inv.sum()).float()


def masked_token_mean(embeddings: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the token axes of ``(B, ..., D)`` embeddings, skipping masked-out tokens."""
    if embeddings.dim() == 2:
        return embeddings
    x = embeddings.flatten(1, -2).float()
    if mask is None:
        return x.mean(dim=1)
    m = mask.flatten(1).to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def pooled_lora_delta(x: Tensor, lora_a: Tensor, lora_b: Tensor, idx: Tensor, scaling: float) -> Tensor:
    """Per-sample LoRA update ``scaling * mean_j B_{idx[b,j]} A_{idx[b,j]} x_b``, vectorised.

    ``x``: ``(B, ..., d_in)``; ``lora_a``: ``(M, r, d_in)``; ``lora_b``: ``(M, d_out, r)``;
    ``idx``: ``(B, k)``. Returns ``(B, ..., d_out)``. The selected matrices are gathered per
    sample and applied with batched matmuls (no loop over samples).
    """
    b, k = idx.shape
    if x.shape[0] != b:
        raise ValueError(f"batch of {x.shape[0]} inputs but a selection for {b} samples")
    x3 = x.reshape(b, -1, x.shape[-1])
    a_sel, b_sel = lora_a[idx], lora_b[idx]  # (B, k, r, d_in), (B, k, d_out, r)
    # cast to the input's dtype (under autocast the batched matmuls cast again, to the autocast dtype)
    h = torch.einsum("btd,bkrd->btkr", x3, a_sel.to(x3.dtype))
    delta = torch.einsum("btkr,bkor->bto", h, b_sel.to(h.dtype))
    return (delta * (scaling / k)).reshape(*x.shape[:-1], lora_b.shape[1])


# --------------------------------------------------------------------------- shared state
@dataclass
class SelectionState:
    """What the query hook hands to the modulated layers within one forward (not a checkpoint state).

    ``idx`` is the current per-sample selection ``(B, k)``; ``pending_loss`` the weighted key loss
    waiting to be attached to the first modulated output; ``enabled`` is off during the
    unmodulated query pass. ``counts`` / ``eval_counts`` accumulate the selections of training /
    other (eval or no-grad) forwards until popped; ``key_sums`` (``key_update="mean"``) the sums of
    the unit-normalised training queries per selected key, until applied.
    """

    idx: Tensor | None = None
    pending_loss: Tensor | None = None
    enabled: bool = True
    loss_hook: Callable[[Tensor, Tensor], Tensor] | None = None
    counts: Tensor | None = None
    eval_counts: Tensor | None = None
    key_sums: Tensor | None = None
    in_query_pass: bool = False
    layer_names: list[str] = field(default_factory=list)


class ModulationPool(nn.Module):
    """Keys of the pool, selection, key learning and the count penalty.

    Args:
        pool_size: ``M`` entries.
        key_dim: dimension of the query.
        top_k: entries per sample (their modulators are averaged).
        key_loss_weight: weight of the key-matching loss ``1 - cos(q, k_sel)`` (``key_update="gradient"``;
            with ``"mean"`` it only scales the logged value). 0 freezes the keys in both modes.
        key_init: ``"uniform"`` (U[-1, 1], upstream default) or ``"normal"`` (N(0, 1)).
        key_update: how the keys learn. ``"mean"`` (default): each key is the direction of the sum of
            the unit-normalised training queries that selected it so far, i.e. the minimiser of the key
            loss over those queries, the state upstream's keys converge to in its 100k steps per task
            (``keys`` is then a buffer, updated by :meth:`apply_key_update` after each training step, not
            by the optimizer). ``"gradient"``: upstream's mechanism, the key loss is attached to the
            forward and the user's optimizer moves the keys (a parameter); at a budget of a few hundred
            steps they stay near their random initialisation and test-time selection misses the keys a
            task trained (see docs/methods/l2m-key-selection.md).

    The buffers ``inv_freq`` (the count penalty; uniform, i.e. plain cosine ranking, until
    :meth:`set_count_penalty` is called) and, with ``key_update="mean"``, ``key_sums`` are part of the
    state dict. ``auto_key_update`` (default ``True``): the query hooks apply the pending key update after
    each training forward of the root module (plain torch); the Lightning callback turns it off and
    applies it after each training batch, all-reduced over DDP ranks.
    """

    def __init__(
        self,
        pool_size: int = DEFAULT_POOL_SIZE,
        key_dim: int = 768,
        top_k: int = DEFAULT_TOP_K,
        key_loss_weight: float = DEFAULT_KEY_LOSS_WEIGHT,
        key_init: str = "uniform",
        key_update: KeyUpdate = DEFAULT_KEY_UPDATE,
    ) -> None:
        super().__init__()
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k must be in [1, pool_size={pool_size}], got {top_k}")
        if key_loss_weight < 0:
            raise ValueError(f"key_loss_weight must be >= 0, got {key_loss_weight}")
        if key_update not in ("mean", "gradient"):
            raise ValueError(f"key_update must be 'mean' (keys = mean of their queries) or 'gradient' (keys learn "
                             f"from the key loss through the optimizer), got {key_update!r}")
        self.pool_size, self.key_dim, self.top_k = pool_size, key_dim, top_k
        self.key_loss_weight = float(key_loss_weight)
        self.key_update = key_update
        keys = torch.empty(pool_size, key_dim)
        if key_init == "uniform":
            nn.init.uniform_(keys, -1.0, 1.0)
        elif key_init == "normal":
            nn.init.normal_(keys)
        else:
            raise ValueError(f"key_init must be 'uniform' or 'normal', got {key_init!r}")
        self.keys: Tensor
        if key_update == "gradient":
            # keys without a loss never get a gradient: freeze them (DDP would flag them as unused)
            self.keys = nn.Parameter(keys, requires_grad=self.key_loss_weight > 0)
        else:
            self.register_buffer("keys", keys)
            self.register_buffer("key_sums", torch.zeros(pool_size, key_dim))
        self.register_buffer("inv_freq", torch.full((pool_size,), 1.0 / pool_size))
        self.state = SelectionState()
        #: the :class:`QueryHooks` feeding this pool while installed (read by ``cl_plugins.export``)
        self.query_hooks: QueryHooks | None = None
        self.last_key_loss: Tensor | None = None
        self.auto_key_update = True

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}, key_dim={self.key_dim}, top_k={self.top_k}, key_update={self.key_update}"

    @property
    def keys_learn(self) -> bool:
        """Whether the keys move in training (``key_loss_weight > 0``)."""
        return self.key_loss_weight > 0

    # ---- count penalty
    def set_count_penalty(self, counts: Tensor | None) -> None:
        """Sets the count penalty from earlier selection ``counts`` (``None`` or all zero: off).

        A uniform ``inv_freq`` ranks keys exactly as plain cosine similarity does.
        """
        if counts is None or float(counts.sum()) <= 0:
            self.inv_freq.fill_(1.0 / self.pool_size)
        else:
            self.inv_freq.copy_(inverse_frequency(counts.to(self.inv_freq.device)))

    # ---- selection
    def select(self, query: Tensor) -> Tensor:
        """Selects entries for ``query`` ``(B, key_dim)`` and stores them for the modulated layers.

        In training (module in train mode with grad enabled) the selections are counted in
        ``counts`` and the count penalty applies; with ``key_update="gradient"`` the weighted key
        loss is stored for attachment, with ``"mean"`` the unit-normalised queries are summed per
        selected key for :meth:`apply_key_update` (and the key loss is only recorded, detached, in
        ``last_key_loss``). Other forwards (evaluation) count their selections in ``eval_counts``
        (one ``bincount`` of the batch's indices).
        """
        query = query.detach()
        training = self.training and torch.is_grad_enabled()
        inv = self.inv_freq if training else None
        idx, cos = select_entries(query, self.keys, self.top_k, inv)
        st = self.state
        st.idx = idx
        st.pending_loss = None
        if training and self.keys_learn:
            loss = self.key_loss_weight * key_matching_loss(cos)
            if self.key_update == "gradient":
                st.pending_loss = loss
            else:
                loss = loss.detach()
                sums = self._query_sums(query, idx)
                st.key_sums = sums if st.key_sums is None else st.key_sums + sums
            self.last_key_loss = loss
        counts = torch.bincount(idx.flatten(), minlength=self.pool_size)
        slot = "counts" if training else "eval_counts"
        earlier = getattr(st, slot)
        setattr(st, slot, counts if earlier is None else earlier + counts)
        return idx

    def _query_sums(self, query: Tensor, idx: Tensor) -> Tensor:
        """``(M, D)``: per key, the sum of the unit-normalised queries of the samples that selected it."""
        with torch.autocast(device_type=query.device.type, enabled=False):
            q = F.normalize(query.float(), dim=-1, eps=1e-12)
            k = idx.shape[1]
            rows = q.repeat_interleave(k, dim=0) if k > 1 else q
            out = torch.zeros(self.pool_size, q.shape[1], dtype=torch.float32, device=q.device)
            return out.index_add_(0, idx.flatten(), rows)

    def pop_key_sums(self) -> Tensor:
        """Query sums of the training forwards since the last call (``key_update="mean"``), ``(M, D)``."""
        sums = self.state.key_sums
        self.state.key_sums = None
        if sums is None:
            return torch.zeros(self.pool_size, self.key_dim, dtype=torch.float32, device=self.keys.device)
        return sums

    @torch.no_grad()
    def apply_key_update(self, sums: Tensor | None = None) -> None:
        """``key_update="mean"``: adds ``sums`` (default: :meth:`pop_key_sums`) to ``key_sums`` and sets
        every key that has been selected to the unit direction of its sum, the minimiser of
        ``sum_q (1 - cos(q, k))`` over the queries that selected it. A no-op in ``"gradient"`` mode."""
        if self.key_update != "mean":
            return
        if sums is None:
            sums = self.pop_key_sums()
        self.key_sums.add_(sums.to(self.key_sums.device, torch.float32))
        norms = self.key_sums.norm(dim=1, keepdim=True)
        seen = norms.squeeze(1) > 0
        if bool(seen.any()):
            self.keys[seen] = (self.key_sums[seen] / norms[seen]).to(self.keys.dtype)

    def _pop(self, slot: str) -> Tensor:
        counts = getattr(self.state, slot)
        setattr(self.state, slot, None)
        if counts is None:
            return torch.zeros(self.pool_size, dtype=torch.long, device=self.keys.device)
        return counts

    def pop_counts(self) -> Tensor:
        """Selections counted in training forwards since the last call, ``(M,)`` int64."""
        return self._pop("counts")

    def pop_eval_counts(self) -> Tensor:
        """Selections counted in non-training forwards since the last call, ``(M,)`` int64."""
        return self._pop("eval_counts")

    def clear(self) -> None:
        """Forgets the current selection (called after each forward of the root module)."""
        self.state.idx = None
        self.state.pending_loss = None

    # ---- hooks (bound methods, so that deep copies of the model stay consistent)
    def _current_selection(self, layer: str, batch: int) -> Tensor | None:
        st = self.state
        if not st.enabled:
            return None
        if st.idx is None:
            raise RuntimeError(
                f"L2M: the modulated layer '{layer}' ran without a key selection. The query is computed "
                "by a hook on the query module (query='embedding') or on the root module (query='pooled'): "
                "call the model through that module, or set query_module / query_root accordingly"
            )
        if st.idx.shape[0] != batch:
            raise RuntimeError(
                f"L2M: the modulated layer '{layer}' got a batch of {batch} but the selection holds "
                f"{st.idx.shape[0]} samples: the query hook ran on a different input than this layer"
            )
        return st.idx

    def _attach_pending(self, output: Tensor) -> Tensor:
        st = self.state
        if st.pending_loss is not None and st.loss_hook is not None:
            term, st.pending_loss = st.pending_loss, None
            return st.loss_hook(output, term)
        return output


# --------------------------------------------------------------------------- modulated layers
class PooledLoRALinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus a pool of LoRA modulators selected per sample.

    ``y_b = W0 x_b + (alpha / r) * mean_j B_{idx[b,j]} A_{idx[b,j]} x_b`` on the output features in
    ``out_index`` (all of them when ``None``; a fused qkv layer uses the q and v slices).

    ``A ~ U(-b, b)`` with ``b = 1 / sqrt(init_fan_in)`` (Kaiming-uniform with ``a = sqrt(5)``);
    ``init_fan_in=None`` takes this layer's ``in_features`` (the ``nn.Linear`` / PEFT bound).
    :func:`install_l2m` passes upstream's pooled fan-in (:func:`upstream_lora_fan_in`) by default.
    ``B = 0``.
    """

    unmergeable_reason = "each sample selects its modulators from the pool by its query"

    def __init__(
        self, base: nn.Linear, pool: ModulationPool, rank: int = DEFAULT_RANK, alpha: float | None = None,
        out_index: Tensor | None = None, name: str = "", init_fan_in: int | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if init_fan_in is not None and init_fan_in < 1:
            raise ValueError(f"init_fan_in must be >= 1 (or None for the layer's in_features), got {init_fan_in}")
        self.base = base
        self.rank = rank
        self.alpha = float(2 * rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.name = name
        d_out = base.out_features if out_index is None else int(out_index.numel())
        m = pool.pool_size
        w = base.weight
        # kaiming_uniform(a=sqrt(5)): bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)
        bound = 1.0 / math.sqrt(base.in_features if init_fan_in is None else init_fan_in)
        self.lora_A = nn.Parameter(torch.empty(m, rank, base.in_features, device=w.device).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(m, d_out, rank, device=w.device))
        self.register_buffer("out_index", out_index, persistent=False)
        self.pool = [pool]  # a list, so the pool is not registered (and saved) once per layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, pool_size={self.lora_A.shape[0]}"

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        pool = self.pool[0]
        idx = pool._current_selection(self.name, x.shape[0])
        if idx is None:
            return out
        delta = pooled_lora_delta(x, self.lora_A, self.lora_B, idx, self.scaling).to(out.dtype)
        if self.out_index is None:
            out = out + delta
        else:
            out = out.index_add(-1, self.out_index, delta)
        return pool._attach_pending(out)


class PooledIA3Linear(AdapterLayer):
    """A frozen ``nn.Linear`` whose output (or input) is scaled by per-sample selected (IA)^3 vectors.

    ``side="output"``: ``y_b = l_{idx[b]} * (W0 x_b)`` on the features in ``index`` (keys and values);
    ``side="input"``: ``y_b = W0 (l_{idx[b]} * x_b)`` (the FF activation before the second FF layer).
    With ``top_k > 1`` the selected vectors are averaged. Vectors start at one (identity).
    """

    unmergeable_reason = "each sample selects its scaling vectors from the pool by its query"

    def __init__(
        self, base: nn.Linear, pool: ModulationPool, side: Literal["output", "input"] = "output",
        index: Tensor | None = None, name: str = "",
    ) -> None:
        super().__init__()
        if side not in ("output", "input"):
            raise ValueError(f"side must be 'output' or 'input', got {side!r}")
        self.base, self.side, self.name = base, side, name
        full = base.out_features if side == "output" else base.in_features
        if side == "input" and index is not None:
            raise ValueError("input-side (IA)^3 scales every input feature; index must be None")
        n = full if index is None else int(index.numel())
        self.full = full
        self.scale = nn.Parameter(torch.ones(pool.pool_size, n, device=base.weight.device))
        self.register_buffer("index", index, persistent=False)
        self.pool = [pool]

    def extra_repr(self) -> str:
        return f"side={self.side}, pool_size={self.scale.shape[0]}, features={self.scale.shape[1]}"

    def selected_scale(self, idx: Tensor) -> Tensor:
        """Per-sample scaling vector over all ``full`` features, ``(B, full)``."""
        s = self.scale[idx].mean(dim=1)  # (B, n)
        if self.index is None:
            return s
        ones = torch.ones(s.shape[0], self.full, dtype=s.dtype, device=s.device)
        return ones.index_copy(1, self.index, s)

    def forward(self, x: Tensor) -> Tensor:
        pool = self.pool[0]
        idx = pool._current_selection(self.name, x.shape[0])
        if idx is None:
            return self.base(x)
        s = self.selected_scale(idx)
        shape = (s.shape[0],) + (1,) * (x.dim() - 2) + (s.shape[1],)
        if self.side == "input":
            out = self.base(x * s.view(shape).to(x.dtype))
        else:
            out = self.base(x)
            out = out * s.view(shape).to(out.dtype)
        return pool._attach_pending(out)


# --------------------------------------------------------------------------- installation
@dataclass
class L2MTargets:
    """Resolved placement: ``output`` maps layer name -> fused-qkv parts (or None); ``input``
    lists layers whose input is scaled ((IA)^3 only)."""

    output: dict[str, str | None]
    input: list[str]
    preset: str | None


def resolve_targets(
    model: nn.Module,
    modulator: Modulator,
    targets: Sequence[str] | None = None,
    input_targets: Sequence[str] | None = None,
    qkv_parts: str | None = None,
    exclude: Iterable[str] = (),
    occupied: Mapping[str, Iterable[str]] | None = None,
) -> L2MTargets:
    """Which layers get which modulator.

    ``targets`` / ``input_targets`` are regular expressions (``None``: :data:`DEFAULT_TARGETS` of the
    detected family; (IA)^3 then also scales the input of the second FF layer). A matched fused
    ``qkv`` layer is modulated on the ``qkv_parts`` slices only (default "qv" for LoRA, "kv" for
    (IA)^3, as upstream). A layer another adapter holds is refused with the names of the layer and
    the adapter (:func:`cl_plugins.peft.adapters.resolve_targets`; ``occupied``: injection key ->
    qualified module names, as the injection callbacks record them).
    """
    if modulator not in ("lora", "ia3"):
        raise ValueError(f"modulator must be 'lora' or 'ia3', got {modulator!r}")
    if modulator == "lora" and input_targets:
        raise ValueError("input_targets apply to (IA)^3 only (input scaling); LoRA modulates layer outputs")
    parts = DEFAULT_QKV_PARTS[modulator] if qkv_parts is None else qkv_parts
    fused_qkv_rows(3, parts)  # validates qkv_parts early
    if targets is None:
        targets = target_patterns(model, None, DEFAULT_TARGETS[modulator], "L2M")
        if input_targets is None and modulator == "ia3":
            input_targets = target_patterns(model, None, _ia3_input_targets, "L2M")
    out = resolve_layers(model, targets, method="L2M", qkv_parts=parts, exclude=exclude, occupied=occupied)
    inp = list(resolve_layers(model, input_targets, method="L2M", exclude=exclude, occupied=occupied)) \
        if input_targets else []
    both = sorted(set(out) & set(inp))
    if both:
        raise ValueError(f"layers {both} are both output and input targets: give each layer one role")
    return L2MTargets(output=out, input=inp, preset=detect_family(model))


def find_query_module(model: nn.Module, name: str | None, preset: str | None) -> tuple[str, nn.Module]:
    """The module whose output embeds the input (the ``query="embedding"`` source)."""
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            raise ValueError(f"query_module '{name}' is not a module of {type(model).__name__}")
        return name, modules[name]
    patterns = [PRESETS[preset].query_module] if preset else [s.query_module for s in PRESETS.values()]
    for pattern in patterns:
        hits = [n for n in modules if re.search(pattern, n)]
        if hits:
            best = min(hits, key=lambda n: n.count("."))
            return best, modules[best]
    raise ValueError(
        f"L2M found no embedding layer in {type(model).__name__} (looked for 'patch_embed' / 'embeddings'): "
        "pass query_module='<qualified name of the module that embeds the input>', or use query='pooled'"
    )


def find_query_tap(
    model: nn.Module, query_name: str, query_module: nn.Module, query_tap: str | None = None
) -> tuple[str, nn.Module]:
    """The module whose output is averaged into the query: ``query_module`` or a submodule of it.

    The query must be a deterministic function of the input (upstream takes the embeddings before
    the embedding dropout), else two training forwards of one sample select different keys and
    training selection differs from test selection. ``query_tap`` (a qualified name) picks it
    explicitly. By default: ``query_module`` itself when it holds no dropout module with ``p > 0``
    (timm ``patch_embed``); otherwise its single ``nn.LayerNorm`` child (Hugging Face
    ``embeddings``: ``word + position + type -> LayerNorm -> dropout``); otherwise an error asking
    for ``query_tap``. Dropout called functionally inside ``forward`` cannot be detected: name the
    tap for such a module.
    """
    modules = dict(model.named_modules())
    if query_tap is not None:
        if query_tap not in modules:
            raise ValueError(f"query_tap '{query_tap}' is not a module of {type(model).__name__}")
        if query_tap != query_name and not query_tap.startswith(query_name + ".") and query_name:
            raise ValueError(
                f"query_tap '{query_tap}' must be the query module '{query_name}' or a submodule of it: the token "
                "ids for the padding mask are read from the query module's input in the same forward"
            )
        return query_tap, modules[query_tap]
    dropouts = [n for n, m in query_module.named_modules() if isinstance(m, _DROPOUT_TYPES) and m.p > 0]
    if not dropouts:
        return query_name, query_module
    norms = [n for n, m in query_module.named_children() if isinstance(m, nn.LayerNorm)]
    if len(norms) == 1:
        name = f"{query_name}.{norms[0]}" if query_name else norms[0]
        return name, modules[name]
    where = [f"{query_name}.{n}" if query_name else n for n in dropouts]
    raise ValueError(
        f"L2M: the query module '{query_name}' ({type(query_module).__name__}) contains dropout ({where}), so its "
        "output, hence the query and the selected keys, would change between training forwards of the same input "
        f"and differ from test time. Pass query_tap='<qualified name of the submodule of '{query_name}' whose "
        f"output is the embedding before the dropout>', or query_tap='{query_name}' to accept a random query"
    )


def find_pad_token_id(model: nn.Module) -> int | None:
    """The padding token id of a Hugging Face model inside ``model`` (``None`` if none)."""
    for m in model.modules():
        pad = getattr(m, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    for m in model.modules():
        pad = getattr(getattr(m, "config", None), "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return None


class QueryHooks:
    """Computes the query in forward hooks and hands it to the pool.

    ``mode="embedding"``: a forward pre-hook on ``query_module`` records its token ids (the
    ``input_ids`` keyword or first positional argument, when an integer tensor); a forward hook on
    ``query_tap`` (``query_module`` itself by default, or a submodule of it, see
    :func:`find_query_tap`) averages the tap's output over the tokens, padding masked out when
    ``pad_token_id`` is known and the ids match the output's ``(batch, tokens)``, and selects; a
    forward hook on ``query_module`` checks that the tap ran and forgets the ids.
    ``mode="pooled"``: a forward pre-hook on ``root`` first runs ``root`` once more, unmodulated,
    in eval mode and without gradients, and takes the input of ``head`` (the pooled features).
    A forward hook on ``root`` clears the selection after each forward and, unless the pool's
    ``auto_key_update`` is off (the Lightning callback does it after the batch), applies the pending
    ``key_update="mean"`` update of the keys.
    """

    def __init__(
        self, pool: ModulationPool, root: nn.Module, mode: QueryMode, query_module: nn.Module | None = None,
        head: nn.Module | None = None, pad_token_id: int | None = None, query_tap: nn.Module | None = None,
    ) -> None:
        if mode not in ("embedding", "pooled"):
            raise ValueError(f"query must be 'embedding' or 'pooled', got {mode!r}")
        if mode == "embedding" and query_module is None:
            raise ValueError("query='embedding' needs the query module")
        if mode == "pooled" and head is None:
            raise ValueError("query='pooled' needs the classification head")
        if query_tap is not None and query_module is not None and not any(
            m is query_tap for m in query_module.modules()
        ):
            raise ValueError("query_tap must be the query module or one of its submodules")
        self.pool, self.root, self.mode = pool, root, mode
        self.query_module, self.head, self.pad_token_id = query_module, head, pad_token_id
        self.query_tap = query_module if query_tap is None else query_tap
        self._captured: Tensor | None = None
        self._ids: Tensor | None = None
        self._tapped = False
        self.handles: list[Any] = []

    def install(self) -> QueryHooks:
        """Registers the hooks (idempotent)."""
        if self.handles:
            return self
        self.pool.query_hooks = self
        if self.mode == "embedding":
            self.handles.append(self.query_module.register_forward_pre_hook(self._on_query_start, with_kwargs=True))
            self.handles.append(self.query_tap.register_forward_hook(self._on_tap))
            self.handles.append(self.query_module.register_forward_hook(self._on_query_end))
        else:
            self.handles.append(self.root.register_forward_pre_hook(self._on_root_pre, with_kwargs=True))
        self.handles.append(self.root.register_forward_hook(self._on_root_end))
        return self

    def remove(self) -> None:
        """Removes the hooks."""
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.pool.query_hooks is self:
            self.pool.query_hooks = None

    # ---- query sources
    @staticmethod
    def token_ids(args: tuple, kwargs: dict) -> Tensor | None:
        """The integer token ids among a module call's arguments (``None`` if there are none)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, Tensor) and not ids.is_floating_point() and not ids.is_complex():
            return ids
        return None

    def embedding_query(self, output: Any, ids: Tensor | None = None) -> Tensor:
        """Token mean of the tap's output, padding (``ids == pad_token_id``) masked out."""
        emb = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(emb, Tensor) or emb.dim() < 2:
            raise TypeError(f"L2M: the query tap's output must be a (batch, ..., dim) tensor, got {type(emb)}")
        mask = None
        if (
            self.pad_token_id is not None and ids is not None and emb.dim() == 3
            and tuple(ids.shape) == tuple(emb.shape[:2])
        ):
            mask = ids != self.pad_token_id
        return masked_token_mean(emb.detach(), mask)

    def _on_query_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._ids, self._tapped = self.token_ids(args, kwargs), False

    def _on_tap(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.pool.state.in_query_pass:
            return
        self.pool.select(self.embedding_query(output, self._ids))
        self._tapped = True

    def _on_query_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        tapped, self._ids, self._tapped = self._tapped, None, False
        if not tapped and not self.pool.state.in_query_pass:
            raise RuntimeError(
                f"L2M: the query tap ({type(self.query_tap).__name__}) did not run inside the query module "
                f"({type(self.query_module).__name__}), so no key was selected: pass a query_tap that the query "
                "module calls in its forward"
            )

    def _capture_head_input(self, module: nn.Module, args: tuple) -> None:
        self._captured = args[0]

    def pooled_query(self, args: tuple, kwargs: dict) -> Tensor:
        """Pooled features of the frozen, unmodulated model (one extra no-grad eval forward)."""
        st = self.pool.state
        modes = {m: m.training for m in self.root.modules()}
        handle = self.head.register_forward_pre_hook(self._capture_head_input)
        st.in_query_pass, st.enabled, self._captured = True, False, None
        try:
            self.root.eval()
            with torch.no_grad():
                self.root(*args, **kwargs)
        finally:
            handle.remove()
            st.in_query_pass, st.enabled = False, True
            for m, flag in modes.items():
                m.training = flag
        feats, self._captured = self._captured, None
        if feats is None:
            raise RuntimeError("L2M: the classification head did not run in the query forward (query='pooled')")
        return masked_token_mean(feats.detach())

    def _on_root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.pool.state.in_query_pass:
            return None
        self.pool.select(self.pooled_query(args, kwargs))
        return None

    def _on_root_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.pool.state.in_query_pass:
            self.pool.clear()
            if self.pool.auto_key_update and self.pool.state.key_sums is not None:
                self.pool.apply_key_update()


def upstream_lora_fan_in(model: nn.Module, placement: L2MTargets, rank: int) -> int:
    """The fan-in upstream's single ``kaiming_uniform_`` call gives the pooled LoRA ``A`` tensor.

    Upstream allocates ``A`` as ``(pool_size, n_layer, length, embed_dim, rank)`` with one
    ``embed_dim``-wide slot per modulated d-wide output (q, v: one each; the 4d FF: four), and
    PyTorch's fan-in of that tensor is ``n_layer * length * embed_dim * rank``, i.e. ``rank`` times
    the modulated output width summed over every LoRA layer. Computed here the same way from the
    placement (a fused ``qkv`` layer counts its modulated slices only).
    """
    width = 0
    for name, parts in placement.output.items():
        base = model.get_submodule(name)
        width += base.out_features if parts is None else sum(e - s for _, s, e in fused_qkv_rows(base.out_features,
                                                                                                 parts))
    if width == 0:
        raise ValueError("no LoRA output targets in the placement: nothing to initialise")
    return rank * width


@torch.no_grad()
def probe_query_dim(
    root: nn.Module, example: Tensor, mode: QueryMode, query_module: nn.Module | None, head: nn.Module | None
) -> int:
    """Runs ``root`` once on ``example`` (eval mode, no grad) and returns the query dimension.

    ``query_module`` is the module whose output is the query (the query tap for ``"embedding"``).
    """
    seen: list[Tensor] = []
    if mode == "embedding":
        handle = query_module.register_forward_hook(
            lambda m, a, o: seen.append(o[0] if isinstance(o, (tuple, list)) else o))
    else:
        handle = head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    modes = {m: m.training for m in root.modules()}
    try:
        root.eval()
        root(example)
    finally:
        handle.remove()
        for m, flag in modes.items():
            m.training = flag
    if not seen:
        raise RuntimeError(f"L2M: the {'query module' if mode == 'embedding' else 'head'} did not run in a forward")
    return int(seen[0].shape[-1])


def install_l2m(
    model: nn.Module,
    key_dim: int,
    modulator: Modulator = "lora",
    targets: Sequence[str] | None = None,
    input_targets: Sequence[str] | None = None,
    qkv_parts: str | None = None,
    pool_size: int = DEFAULT_POOL_SIZE,
    top_k: int = DEFAULT_TOP_K,
    rank: int = DEFAULT_RANK,
    alpha: float | None = None,
    key_loss_weight: float = DEFAULT_KEY_LOSS_WEIGHT,
    key_init: str = "uniform",
    exclude: Iterable[str] = (),
    pool_name: str = "l2m_pool",
    key_update: KeyUpdate = DEFAULT_KEY_UPDATE,
    placement: L2MTargets | None = None,
    lora_init: LoraInit = "upstream",
    occupied: Mapping[str, Iterable[str]] | None = None,
) -> tuple[ModulationPool, L2MTargets]:
    """Adds the pool as ``model.<pool_name>`` and wraps the target layers in place.

    ``placement`` (from :func:`resolve_targets`) overrides ``targets`` / ``input_targets`` /
    ``qkv_parts``. ``lora_init``: ``"upstream"`` draws every LoRA ``A`` with upstream's pooled
    bound ``1 / sqrt(upstream_lora_fan_in(...))``, ``"linear"`` with each layer's ``1 / sqrt(d_in)``
    (``docs/methods/l2m.md``). ``occupied``: modules other injections registered (layers inside
    them are refused). The caller installs the query hooks (:class:`QueryHooks`). Returns the pool
    and the placement.
    """
    if hasattr(model, pool_name):
        raise RuntimeError(f"{type(model).__name__} already has an attribute '{pool_name}' (L2M installed twice?)")
    if lora_init not in ("upstream", "linear"):
        raise ValueError(f"lora_init must be 'upstream' (upstream's pooled fan-in) or 'linear' (1/sqrt(d_in)), "
                         f"got {lora_init!r}")
    if placement is None:
        placement = resolve_targets(model, modulator, targets, input_targets, qkv_parts, exclude, occupied)
    else:
        refuse_adapted(model, {*placement.output, *placement.input}.__contains__, "L2M", occupied)
    fan_in = None
    if modulator == "lora" and lora_init == "upstream" and placement.output:
        fan_in = upstream_lora_fan_in(model, placement, rank)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    pool = ModulationPool(pool_size, key_dim, top_k, key_loss_weight, key_init, key_update).to(device)
    model.add_module(pool_name, pool)
    inputs = set(placement.input)

    def build(name: str, base: nn.Linear, rows: list[tuple[str, int, int]] | None) -> AdapterLayer:
        if name in inputs:
            return PooledIA3Linear(base, pool, side="input", name=name)
        index = None if rows is None else rows_index(rows).to(base.weight.device)
        if modulator == "lora":
            return PooledLoRALinear(base, pool, rank=rank, alpha=alpha, out_index=index, name=name, init_fan_in=fan_in)
        return PooledIA3Linear(base, pool, side="output", index=index, name=name)

    inject_adapters(model, build, {**placement.output, **dict.fromkeys(placement.input)}, method="L2M",
                    occupied=occupied)
    pool.state.layer_names = list(placement.output) + list(placement.input)
    return pool, placement
