"""LoRAMoE (Dou et al., ACL 2024, arXiv 2312.09979): LoRA experts with a router and the localized
balancing constraint.

A :class:`LoRAMoELinear` adds to a frozen linear layer ``N`` LoRA experts mixed by a dense softmax
router: ``y = W0 x + b + sum_i w_i(x) (alpha / r) B_i A_i dropout(x)``, ``w(x) = softmax(W_g x)``.
Experts form two groups (world knowledge, new tasks); each training sample has a type, and every
layer adds ``beta * CV(I o Q)^2`` (importance ``Q`` of each expert per sample, weighted by ``1 +- delta``
as expert group and sample type agree) to the loss, in float32. The sample types reach the layers
through a :class:`LoRAMoEContext` shared by the layers of one injection. The paper, the official
code, every deviation and what the constraint does: ``docs/methods/loramoe.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_plugins.aux_loss import AuxLossTracker
from cl_plugins.peft.adapters import AdapterLayer, inject_adapters
from cl_plugins.peft.dropout import FastDropout

#: number of experts per layer (paper)
DEFAULT_NUM_EXPERTS = 6
#: LoRA rank of each expert (paper and code)
DEFAULT_RANK = 4
#: LoRA alpha (code's run script); the expert scaling is alpha / rank
DEFAULT_ALPHA = 32.0
#: dropout on each expert's input (code's run script)
DEFAULT_DROPOUT = 0.05
#: delta of the coefficient matrix I (paper)
DEFAULT_DELTA = 0.1
#: beta, weight of the balancing term of each layer (paper)
DEFAULT_BALANCE_WEIGHT = 0.1
#: share of the experts in the world-knowledge group (code: lora_num // 2)
DEFAULT_KNOWLEDGE_RATIO = 0.5
#: epsilon of the squared coefficient of variation (code)
CV_EPS = 1e-10
#: number of expert groups / sample types: world knowledge (0) and downstream / new tasks (1)
NUM_GROUPS = 2


# ---------------------------------------------------------------------------------------------- math
def split_experts(num_experts: int, num_knowledge_experts: int) -> Tensor:
    """Group of each expert: the first ``num_knowledge_experts`` are group 0 (world knowledge),
    the rest group 1 (downstream / new tasks)."""
    if num_experts < 2:
        raise ValueError(f"LoRAMoE needs at least 2 experts (one per group), got num_experts={num_experts}")
    if not 1 <= num_knowledge_experts <= num_experts - 1:
        raise ValueError(
            f"num_knowledge_experts={num_knowledge_experts} must leave at least one expert in each group: "
            f"choose 1..{num_experts - 1} for num_experts={num_experts}"
        )
    groups = torch.ones(num_experts, dtype=torch.long)
    groups[:num_knowledge_experts] = 0
    return groups


def coefficient_matrix(sample_types: Tensor, expert_groups: Tensor, delta: float) -> Tensor:
    """``I`` of shape ``(num_experts, batch)``: ``1 + delta`` where expert ``n``'s group equals
    sample ``j``'s type, else ``1 - delta`` (float32)."""
    match = expert_groups.to(sample_types.device)[:, None] == sample_types[None, :]
    return torch.where(match, 1.0 + delta, 1.0 - delta).float()


def _precise(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 when it is float64 (float64 references stay exact)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def importance(weights: Tensor) -> Tensor:
    """``Q`` of shape ``(num_experts, batch)``: router weights summed over each sample's tokens.

    ``weights`` has shape ``(batch, ..., num_experts)`` (``(batch, num_experts)`` for a 2-D input).
    """
    b, n = weights.shape[0], weights.shape[-1]
    return _precise(weights).reshape(b, -1, n).sum(dim=1).t()


def cv_squared(x: Tensor, eps: float = CV_EPS) -> Tensor:
    """Squared coefficient of variation ``var(x) / (mean(x)^2 + eps)`` of all entries (unbiased
    variance, float32); 0 for a single entry."""
    x = _precise(x).reshape(-1)
    if x.numel() <= 1:
        return x.sum() * 0.0
    return x.var() / (x.mean() ** 2 + eps)


def localized_balancing_loss(q: Tensor, sample_types: Tensor, expert_groups: Tensor, delta: float) -> Tensor:
    """``CV(I o Q)^2`` for importance ``q`` ``(num_experts, batch)`` (float32, not yet weighted by beta)."""
    if q.shape != (expert_groups.numel(), sample_types.numel()):
        raise ValueError(
            f"importance of shape {tuple(q.shape)} does not match {expert_groups.numel()} experts x "
            f"{sample_types.numel()} samples"
        )
    with torch.autocast(device_type=q.device.type, enabled=False):
        return cv_squared(coefficient_matrix(sample_types, expert_groups, delta) * _precise(q))


def cv_squared_batched(z: Tensor, eps: float = CV_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cv_squared` of each ``z[k]`` ``(L, ...)`` at once: ``(cv2, var, mean)``, the last two
    shaped ``(L, 1, ...)`` for :func:`cv_squared_grad`."""
    dims = tuple(range(1, z.dim()))
    if z[0].numel() <= 1:
        zero = z.new_zeros((z.shape[0],) + (1,) * len(dims))
        return zero.reshape(-1), zero, zero
    var, mean = torch.var_mean(z, dim=dims, keepdim=True)
    denom = mean * mean + eps
    return (var / denom).reshape(-1), var, mean


def cv_squared_grad(z: Tensor, var: Tensor, mean: Tensor, eps: float = CV_EPS) -> Tensor:
    """Gradient of ``cv_squared(z[k])`` with respect to ``z[k]`` for every ``k`` (``var``, ``mean`` from
    :func:`cv_squared_batched`): ``2 (z - mean) / ((M - 1) d) - 2 var mean / (M d^2)``, ``d = mean^2 + eps``,
    ``M`` entries per ``z[k]``."""
    m = z[0].numel()
    if m <= 1:
        return torch.zeros_like(z)
    denom = mean * mean + eps
    return ((z - mean) * (2.0 / (m - 1)) - var * mean * (2.0 / m) / denom) / denom


# ---------------------------------------------------------------------------------------------- context
class _StepTerms:
    """The importances ``Q`` of the LoRAMoE layers in the typed forwards of one step, with the step's
    types: every layer's balancing term is computed from them at once (its value for logging, its gradient
    on the first backward through the layers), and the router statistics at the end of the step."""

    def __init__(self, types: Tensor, coeff: Tensor, balance_weight: float, tracker: AuxLossTracker | None) -> None:
        self.types = types
        self.coeff = coeff.t()  # (batch, experts), as the rows of Q below
        self.balance_weight = balance_weight
        self.tracker = tracker
        self.qs: list[Tensor] = []  # per layer: (batch, experts), detached
        self.tokens: list[int] = []
        self._grads: Tensor | None = None
        self._values: Tensor | None = None

    def add(self, q: Tensor, tokens: int) -> int:
        """Keeps one layer's ``Q`` (rows: samples); returns its index."""
        self.qs.append(q.detach())
        self.tokens.append(tokens)
        self._grads = self._values = None
        return len(self.qs) - 1

    def _z(self) -> Tensor:
        return self.coeff * torch.stack(self.qs)  # I o Q, (layers, batch, experts)

    def values(self) -> Tensor:
        """``beta * CV(I o Q)^2`` of every layer ``(layers,)``, without gradient."""
        if self._values is None:
            self._values = self.balance_weight * cv_squared_batched(self._z())[0]
        return self._values

    def grad(self, k: int) -> Tensor:
        """Gradient of the seeded term of layer ``k`` with respect to its ``Q`` (all layers computed on the
        first call)."""
        if self._grads is None:
            z = self._z()
            cv2, var, mean = cv_squared_batched(z)
            self._values = self.balance_weight * cv2
            grads = cv_squared_grad(z, var, mean) * self.coeff * self.balance_weight
            seed = 1.0 if self.tracker is None else self.tracker.seed
            if isinstance(seed, Tensor):
                grads = grads * seed.to(device=grads.device, dtype=grads.dtype)
            elif seed != 1.0:
                grads = grads * seed
            self._grads = grads
        return self._grads[k]

    def shares(self) -> Tensor:
        """``(batch, experts)``: every sample's mean router weight over its tokens, summed over the layers."""
        if len(set(self.tokens)) == 1:
            return torch.stack(self.qs).sum(dim=0) / self.tokens[0]
        return torch.stack([q / t for q, t in zip(self.qs, self.tokens)]).sum(dim=0)


class _AttachBalance(torch.autograd.Function):
    """Identity on a layer's output; its backward gives the layer's ``Q`` the gradient of its balancing
    term (as :func:`cl_plugins.aux_loss.attach_aux_loss` does for a term computed in the forward)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, q: Tensor, terms: _StepTerms, k: int) -> Tensor:
        ctx.terms, ctx.k = terms, k
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, Tensor, None, None]:
        return grad_output, ctx.terms.grad(ctx.k), None, None


class LoRAMoEContext:
    """State shared by the LoRAMoE layers of one injection: the current batch's sample types, the
    constraint's settings, the loss tracker and router statistics of the current step.

    Args:
        expert_groups: group of each expert (``num_experts``,).
        delta: ``delta`` of the coefficient matrix.
        balance_weight: ``beta``; 0 turns the constraint off (statistics are still gathered).
        tracker: seeds the terms' gradients with Lightning's loss scaling (see
            :mod:`cl_plugins.aux_loss`); ``None`` outside a Trainer.
        num_groups: number of groups / sample types.
    """

    def __init__(self, expert_groups: Tensor, delta: float = DEFAULT_DELTA,
                 balance_weight: float = DEFAULT_BALANCE_WEIGHT, tracker: AuxLossTracker | None = None,
                 num_groups: int = NUM_GROUPS) -> None:
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta must be in [0, 1] (I = 1 +- delta), got {delta}")
        if balance_weight < 0:
            raise ValueError(f"balance_weight (beta) must be >= 0, got {balance_weight}")
        self.expert_groups = expert_groups.long().cpu()
        if int(self.expert_groups.min()) < 0 or int(self.expert_groups.max()) >= num_groups:
            raise ValueError(f"expert groups must be in [0, {num_groups}), got {self.expert_groups.tolist()}")
        self.delta = float(delta)
        self.balance_weight = float(balance_weight)
        self.tracker = tracker
        self.num_groups = num_groups
        #: gather the router statistics of :meth:`pop_stats` (off: the constraint alone, no bookkeeping)
        self.collect_stats = True
        self._batch: Any = None
        self._coeff: Tensor | None = None
        self._resolver: Callable[[Any], Tensor] | None = None
        self._types: Tensor | None = None
        #: the types of the last resolved batch (for inspection and tests)
        self.last_types: Tensor | None = None
        self._on_device: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self._type_range: Tensor | None = None
        self._terms: _StepTerms | None = None
        self._reset_stats()

    @property
    def num_experts(self) -> int:
        return self.expert_groups.numel()

    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(expert groups, group one-hot (experts, groups), type ids)`` on ``device``, copied there once
        (a copy from the host in a training step would wait for the device)."""
        if device not in self._on_device:
            ids = torch.arange(self.num_groups)
            onehot = (self.expert_groups[:, None] == ids).float()
            self._on_device[device] = (self.expert_groups.to(device), onehot.to(device), ids.to(device))
        return self._on_device[device]

    # ---- the current batch
    def begin_step(self, batch: Any, resolver: Callable[[Any], Tensor]) -> None:
        """Hands the layers the training batch; ``resolver(batch)`` gives the sample types
        ``(batch,)`` at the first layer forward (after other hooks extended the batch)."""
        self._close_terms()
        self._batch, self._resolver, self._types, self._coeff = batch, resolver, None, None

    def set_types(self, sample_types: Tensor | None) -> None:
        """Sets the sample types directly (outside a Trainer); ``None`` turns the constraint off. Their
        values are checked now (one host sync)."""
        self._close_terms()
        self._batch, self._resolver, self._coeff = None, None, None
        self._types = None if sample_types is None else self._check(sample_types)
        if self._types is not None:
            if self._types.numel():
                self._raise_on_bad_types(*self._types.aminmax())
            self.last_types = self._types.detach()

    def end_forward(self) -> None:
        """Stops typing forwards (called before the backward and at the end of the batch)."""
        self._close_terms()
        self._batch, self._resolver, self._types, self._coeff = None, None, None, None

    def _check(self, types: Tensor) -> Tensor:
        """Shape and dtype (free); the values are watched on the device (see :meth:`check_types`)."""
        if not isinstance(types, Tensor) or types.dim() != 1 or types.is_floating_point():
            shape = tuple(types.shape) if isinstance(types, Tensor) else type(types).__name__
            raise TypeError(f"sample types must be a 1-D integer tensor (one type per sample), got {shape}")
        return types.long()

    def _watch(self, types: Tensor) -> None:
        """Keeps the lowest and highest type seen since :meth:`check_types` on the device (no host sync)."""
        if types.numel():
            lo, hi = types.aminmax()
            seen = torch.stack((-lo, hi))
            self._type_range = seen if self._type_range is None else torch.maximum(self._type_range, seen)

    def check_types(self) -> None:
        """Raises if a sample type resolved in a training step since the last call was outside
        ``[0, num_groups)``. One host sync: the callback calls it at the end of every epoch."""
        if self._type_range is None:
            return
        neg_lo, hi = self._type_range.tolist()
        self._type_range = None
        self._raise_on_bad_types(-neg_lo, hi)

    def _raise_on_bad_types(self, lo: Tensor | int, hi: Tensor | int) -> None:
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= self.num_groups:
            raise ValueError(
                f"sample types must be in [0, {self.num_groups}) (0: world-knowledge / retained data, 1: new-task "
                f"data), got values from {lo} to {hi}. A sample_type callable must return only these; a type -1 "
                "comes from a class or task label that no experience of the stream has"
            )

    def sample_types(self, batch_size: int, device: torch.device) -> Tensor | None:
        """Types of the samples of the current forward, or ``None`` when no batch is typed."""
        if self._types is None and self._resolver is not None:
            self._types = self._check(self._resolver(self._batch))
            self._watch(self._types)
            self.last_types = self._types.detach()
        if self._types is None:
            return None
        if self._types.numel() != batch_size:
            raise RuntimeError(
                f"LoRAMoE got {self._types.numel()} sample types for the training batch but a layer saw a batch of "
                f"{batch_size}: the model's forward must keep the batch dimension first and run on the batch the "
                "training_step received; with other inputs, pass sample_type=callable(batch) giving one type per "
                "row the layers see"
            )
        if self._types.device != device:
            self._close_terms()
            self._types, self._coeff = self._types.to(device), None
        return self._types

    def coefficients(self, types: Tensor) -> Tensor:
        """``I`` for the current step's ``types``, computed once and shared by every layer."""
        if self._coeff is None or self._coeff.shape[1] != types.numel() or self._coeff.device != types.device:
            self._coeff = coefficient_matrix(types, self._constants(types.device)[0], self.delta)
        return self._coeff

    # ---- the constraint and statistics
    def _reset_stats(self) -> None:
        self._closed: list[_StepTerms] = []
        self._loss_sum: Tensor | None = None
        self._share_sum: Tensor | None = None  # (types, experts)
        self._count: Tensor | None = None  # (types,)
        self._type_share: Tensor | None = None
        self._type_count: Tensor | None = None

    def _close_terms(self) -> None:
        """Ends the current :class:`_StepTerms`; more than one pending are folded into sums (constant memory
        in loops that never call :meth:`pop_stats`)."""
        if self._terms is not None and self._terms.qs:
            self._closed.append(self._terms)
        self._terms = None
        if len(self._closed) > 1:
            self._fold()

    def _fold(self) -> None:
        """Adds the closed terms' loss and router shares by sample type to the running sums (device only)."""
        for t in self._closed:
            if self.balance_weight > 0:
                loss = t.values().sum()
                self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            if self.collect_stats:
                ids = self._constants(t.types.device)[2]
                onehot = (t.types[:, None] == ids).to(t.qs[0].dtype)  # (batch, types); a bad type matches none
                share, count = onehot.t() @ t.shares(), onehot.sum(dim=0) * len(t.qs)
                if self._share_sum is None or self._count is None:
                    self._share_sum, self._count = share, count
                else:
                    self._share_sum, self._count = self._share_sum + share, self._count + count
        self._closed = []

    def balance(self, output: Tensor, weights: Tensor, types: Tensor) -> Tensor:
        """Keeps one layer's importance ``Q`` from its router ``weights`` and attaches its balancing term
        to ``output``: the terms of all layers are computed together (value and gradient, see
        :class:`_StepTerms`), exactly ``beta * CV(I o Q)^2`` per layer."""
        if self.balance_weight == 0 and not self.collect_stats:
            return output
        if self._terms is None or self._terms.types is not types:
            self._close_terms()
            self._terms = _StepTerms(types, self.coefficients(types), self.balance_weight, self.tracker)
        n = weights.shape[-1]
        q = _precise(weights.sum(dim=tuple(range(1, weights.dim() - 1))) if weights.dim() > 2 else weights)
        k = self._terms.add(q, weights[0].numel() // n)
        if self.balance_weight > 0 and torch.is_grad_enabled() and q.requires_grad:
            return _AttachBalance.apply(output, q, self._terms, k)
        return output

    def pop_stats(self) -> dict[str, Tensor]:
        """The step's balancing loss (summed over layers) and router statistics, then forgets them.

        Keys: ``balance_loss``; ``expert{n}_load`` (mean router weight of expert ``n`` over the
        step's samples, tokens and layers); ``group{g}_weight`` (the share of group ``g``). The shares
        of each group by sample type are added up for :meth:`pop_type_stats`. No host sync.
        """
        self._close_terms()
        self._fold()
        out: dict[str, Tensor] = {}
        if self._loss_sum is not None:
            out["balance_loss"] = self._loss_sum
        share, count = self._share_sum, self._count
        self._loss_sum = self._share_sum = self._count = None
        if share is None or count is None:
            return out
        load = share.sum(dim=0) / count.sum().clamp_min(1.0)
        group_weight = load @ self._constants(load.device)[1].to(load.dtype)
        for n in range(self.num_experts):
            out[f"expert{n}_load"] = load[n]
        for g in range(self.num_groups):
            out[f"group{g}_weight"] = group_weight[g]
        if self._type_share is None or self._type_count is None:
            self._type_share, self._type_count = share, count
        else:
            self._type_share, self._type_count = self._type_share + share, self._type_count + count
        return out

    def pop_type_stats(self) -> dict[str, Tensor]:
        """``type{s}_group{g}_weight``: the share of group ``g`` for the samples of type ``s``, over the
        steps since the last call, for the types present; then forgets them. One host sync (the
        callback calls it at the end of every epoch)."""
        share, count = self._type_share, self._type_count
        self._type_share = self._type_count = None
        if share is None or count is None:
            return {}
        group_onehot = self._constants(share.device)[1].to(share.dtype)
        per_type = (share / count.clamp_min(1.0)[:, None]) @ group_onehot  # (types, groups)
        out: dict[str, Tensor] = {}
        for s, present in enumerate((count > 0).tolist()):
            if present:
                for g in range(self.num_groups):
                    out[f"type{s}_group{g}_weight"] = per_type[s, g]
        return out


# ---------------------------------------------------------------------------------------------- layers
class LoRAExperts(nn.Module):
    """``N`` LoRA experts stacked: ``A`` ``(N, r, d_in)``, ``B`` ``(N, d_out, r)``.

    ``forward(x, weights)`` returns ``sum_i weights_i * (alpha / r) * B_i A_i dropout_i(x)``.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = DEFAULT_NUM_EXPERTS,
                 rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA, dropout: float = DEFAULT_DROPOUT,
                 per_expert_dropout: bool = False) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_experts, self.rank, self.alpha = num_experts, rank, float(alpha)
        self.scaling = self.alpha / rank
        self.per_expert_dropout = per_expert_dropout
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank))
        # same masks as nn.Dropout, drawn cheaper on the CPU (cl_plugins.peft.dropout)
        self.dropout = FastDropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``A_i`` like ``nn.Linear(d_in, r)`` (Kaiming-uniform, a = sqrt(5)), ``B_i = 0``."""
        with torch.no_grad():
            for i in range(self.num_experts):
                nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
            self.lora_B.zero_()

    def forward(self, x: Tensor, weights: Tensor, base_out: Tensor | None = None) -> Tensor:
        """The weighted sum of the experts' updates, added to ``base_out`` when given (one fused
        ``addmm``: no separate update tensor of the output's size)."""
        n, r, d_in = self.lora_A.shape
        lead = x.shape[:-1]
        if self.training and isinstance(self.dropout, nn.Dropout) and self.per_expert_dropout:
            # an independent dropout mask per expert, as the official code (n masked copies of x)
            xe = self.dropout(x.unsqueeze(-2).expand(*lead, n, d_in))
            h = torch.einsum("...ni,nri->...nr", xe, self.lora_A).reshape(-1, n, r)
        else:
            # one mask shared by the experts (standard LoRA dropout): every expert's A in one matmul
            h = F.linear(self.dropout(x), self.lora_A.reshape(n * r, d_in)).view(-1, n, r)
        w = weights.reshape(-1, n, 1)
        h = (h * (w if w.dtype == h.dtype else w.to(h.dtype))).reshape(-1, n * r)  # routed, on the rank side
        b = self.lora_B.permute(1, 0, 2).reshape(self.lora_B.shape[1], n * r)  # every expert's B, side by side
        if base_out is None:
            return torch.mm(h, b.t()).mul_(self.scaling).view(*lead, b.shape[0])
        dtype, flat = base_out.dtype, base_out.dim() == 2
        out = torch.addmm(base_out if flat else base_out.reshape(-1, b.shape[0]),
                          h if h.dtype == dtype else h.to(dtype), b.t() if b.dtype == dtype else b.t().to(dtype),
                          alpha=self.scaling)
        return out if flat else out.view(base_out.shape)

    def extra_repr(self) -> str:
        n, r, d_in = self.lora_A.shape
        return f"experts={n}, rank={r}, in={d_in}, out={self.lora_B.shape[1]}, alpha={self.alpha}"


class LoRAMoELinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus routed LoRA experts (see the module docstring).

    Args:
        base: the pretrained layer (kept as ``self.base``; its parameters are not touched).
        num_experts, rank, alpha, dropout: of the experts.
        expert_groups: group of each expert; default: two equal halves (first half group 0).
        context: shared :class:`LoRAMoEContext` carrying the sample types; ``None``: no constraint.
    """

    unmergeable_reason = "its router weights the experts per token from the input"

    def __init__(self, base: nn.Linear, num_experts: int = DEFAULT_NUM_EXPERTS, rank: int = DEFAULT_RANK,
                 alpha: float = DEFAULT_ALPHA, dropout: float = DEFAULT_DROPOUT,
                 expert_groups: Tensor | Sequence[int] | None = None,
                 context: LoRAMoEContext | None = None, per_expert_dropout: bool = False) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRAMoELinear wraps an nn.Linear, got {type(base).__name__}")
        if num_experts < 2:
            raise ValueError(f"LoRAMoE needs at least 2 experts, got num_experts={num_experts}")
        self.base = base
        factory: dict[str, Any] = {"device": base.weight.device}
        if base.weight.is_floating_point():
            factory["dtype"] = base.weight.dtype
        self.router = nn.Linear(base.in_features, num_experts, bias=False, **factory)
        self.experts = LoRAExperts(base.in_features, base.out_features, num_experts, rank, alpha, dropout,
                                   per_expert_dropout).to(**factory)
        groups = split_experts(num_experts, num_experts // 2) if expert_groups is None else torch.as_tensor(
            expert_groups, dtype=torch.long)
        if groups.shape != (num_experts,):
            raise ValueError(f"expert_groups needs one group per expert ({num_experts}), got {groups.tolist()}")
        self.register_buffer("expert_groups", groups.to(base.weight.device), persistent=False)
        self.context = context

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def route(self, x: Tensor) -> Tensor:
        """Router weights ``softmax(W_g x)`` over the experts, in float32 (sum to one)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.softmax(F.linear(_precise(x), _precise(self.router.weight)), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # every product on the (tokens, features) matrix: no reshapes inside them
        weights = self.route(x2)
        out = self.experts(x2, weights, base_out=self.base(x2))
        ctx = self.context
        if ctx is not None and self.training and torch.is_grad_enabled():
            types = ctx.sample_types(x.shape[0], x.device)
            if types is not None:
                out = ctx.balance(out, weights.view(x.shape[0], -1, weights.shape[-1]), types)
        return out.view(*x.shape[:-1], out.shape[-1])


# ---------------------------------------------------------------------------------------------- injection
def inject_loramoe(
    model: nn.Module,
    context: LoRAMoEContext,
    targets: Sequence[str] | None = None,
    rank: int = DEFAULT_RANK,
    alpha: float = DEFAULT_ALPHA,
    dropout: float = DEFAULT_DROPOUT,
    exclude: Sequence[str] = (),
    per_expert_dropout: bool = False,
    occupied: Mapping[str, Iterable[str]] | None = None,
) -> list[str]:
    """Replaces the target linear layers of ``model`` with :class:`LoRAMoELinear` sharing ``context``.

    ``targets=None``: the feed-forward layers of the detected family (the paper's placement; see
    :mod:`cl_plugins.peft.presets`). Returns the qualified names of the trainable new modules
    (``<layer>.router``, ``<layer>.experts``). A target that another adapter (LoRA, PEGO, L2M, an
    earlier LoRAMoE) already wraps is refused (:func:`cl_plugins.peft.adapters.inject_adapters`).
    """

    def build(name: str, layer: nn.Linear, rows: list[tuple[str, int, int]] | None) -> LoRAMoELinear:
        return LoRAMoELinear(layer, context.num_experts, rank, alpha, dropout, context.expert_groups, context,
                             per_expert_dropout)

    new = inject_adapters(model, build, targets, method="LoRAMoE", defaults=lambda family: family.ffn,
                          exclude=exclude, occupied=occupied)
    return [f"{name}.{m}" for name in new for m in ("router", "experts")]


def loramoe_layers(model: nn.Module) -> dict[str, LoRAMoELinear]:
    """Every :class:`LoRAMoELinear` of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAMoELinear)}
