"""LoRA layers: a frozen ``nn.Linear`` plus groups of low-rank modules, for plain LoRA and PEGO.

A :class:`LoRAGroupLinear` computes ``y = W0 x + b + sum_i (alpha / r) B_i A_i x`` with a group of
``N`` LoRA modules (``A_i`` Kaiming-uniform, ``B_i`` zero: training starts at the pretrained model);
plain LoRA is the group of one. A group can adapt only some output rows (the q and v slices of a
fused ``qkv`` layer, each slice its own group). :meth:`LoRAGroupLinear.merge` folds the update into
the base weight and records it in the ``lora_merged`` buffer, so checkpoints saved before or after
merging load consistently. :func:`peft_lora_state_dict` writes the groups in Hugging Face PEFT's
format. Why our own layer and not PEFT's, and the merging details: ``docs/methods/lora.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_plugins.peft.adapters import AdapterLayer, inject_adapters
from cl_plugins.peft.dropout import FastDropout
from cl_plugins.peft.presets import FamilyPreset


class LoRAGroupLinear(AdapterLayer):
    """A frozen linear layer plus, on each adapted row range, a group of ``num_loras`` LoRA modules.

    ``y = base(x)``; on rows ``[s, e)`` of each part ``y[..., s:e] += (alpha / r) sum_i B_i A_i dropout(x)``.

    Args:
        base: the pretrained layer (kept as ``self.base``; the caller freezes it).
        num_loras: ``N``, LoRA modules per group (1 = plain LoRA).
        rank: ``r`` of every module.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``None``: ``alpha = r``,
            scale 1, as the official PEGO code, which adds ``B A x`` unscaled).
        dropout: dropout on the input of the LoRA branch, one mask shared by the group.
        parts: ``(name, start, stop)`` row ranges to adapt, each with its own group (default: one
            part ``"all"`` covering every output row).

    Parameters: ``lora_A[p]`` of shape ``(N, r, d_in)`` and ``lora_B[p]`` of shape ``(stop - start, N, r)``
    for part ``p``; the group is one rank ``N*r`` LoRA whose factors are views of these.
    """

    mergeable: ClassVar[bool] = True

    def __init__(
        self,
        base: nn.Linear,
        num_loras: int = 1,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        parts: Sequence[tuple[str, int, int]] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRAGroupLinear wraps an nn.Linear, got {type(base).__name__}")
        if int(num_loras) < 1 or int(rank) < 1:
            raise ValueError(f"num_loras and rank must be >= 1, got num_loras={num_loras}, rank={rank}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0 (the update is scaled by alpha / rank), got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        d_out, d_in = base.out_features, base.in_features
        parts = [("all", 0, d_out)] if parts is None else [(str(n), int(s), int(e)) for n, s, e in parts]
        if not parts:
            raise ValueError("parts must name at least one row range")
        parts.sort(key=lambda p: p[1])
        for (n, s, e), nxt in zip(parts, parts[1:] + [("", d_out, d_out)]):
            if not (0 <= s < e <= nxt[1]):
                raise ValueError(f"part {n!r} rows [{s}, {e}) are empty, overlap the next part or exceed {d_out}")
        self.base = base
        self.num_loras, self.rank = int(num_loras), int(rank)
        self.alpha = float(self.rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        self.part_names = tuple(n for n, _, _ in parts)
        self.row_ranges = tuple((s, e) for _, s, e in parts)
        weight = base.weight
        kw: dict[str, Any] = {"device": weight.device,
                              "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(self.num_loras, self.rank, d_in, **kw)) for _ in parts]
        )
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(e - s, self.num_loras, self.rank, **kw)) for _, s, e in parts]
        )
        self.dropout: nn.Module = FastDropout(dropout) if dropout > 0 else nn.Identity()
        # uint8 rather than bool: DDP broadcasts buffers, and gloo handles uint8 everywhere
        self.register_buffer("lora_merged", torch.zeros((), dtype=torch.uint8, device=weight.device))
        self._merged = False
        self.reset_lora_parameters()

    # ------------------------------------------------------------------ parameters
    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """``A_i`` Kaiming-uniform (``a = sqrt(5)``, ``nn.Linear``'s default, as LoRA and PEGO), ``B_i = 0``."""
        for a in self.lora_A:
            for i in range(self.num_loras):
                nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
        for b in self.lora_B:
            b.zero_()

    @property
    def merged(self) -> bool:
        """Whether the group is folded into ``base.weight``."""
        return self._merged

    def factors(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per part: ``(W0 rows, A (N, r, d_in), B (rows, N, r))``; W0 is the pretrained weight only
        while unmerged (raises otherwise)."""
        if self._merged:
            raise RuntimeError("the LoRA group is merged into the base weight: unmerge() to read W0")
        w = self.base.weight
        return [(w[s:e], a, b) for (s, e), a, b in zip(self.row_ranges, self.lora_A, self.lora_B)]

    def delta_weights(self) -> list[Tensor]:
        """Per part, the update ``(alpha / r) sum_i B_i A_i`` of shape ``(rows, d_in)``, in float32
        (float64 for float64 factors)."""
        out = []
        with torch.autocast(device_type=self.base.weight.device.type, enabled=False):
            for a, b in zip(self.lora_A, self.lora_B):
                dtype = torch.promote_types(a.dtype, torch.float32)
                a2 = a.to(dtype).reshape(-1, a.shape[-1])  # (N*r, d_in)
                b2 = b.to(dtype).reshape(b.shape[0], -1)  # (rows, N*r)
                out.append(self.scaling * (b2 @ a2))
        return out

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self) -> None:
        """Folds the group into ``base.weight`` (float32 sum); no-op when already merged."""
        if self._merged:
            return
        self._add_delta(+1.0)
        self._set_merged(True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the group out of ``base.weight`` again; no-op when not merged."""
        if not self._merged:
            return
        self._add_delta(-1.0)
        self._set_merged(False)

    def _add_delta(self, sign: float) -> None:
        w = self.base.weight
        for (s, e), delta in zip(self.row_ranges, self.delta_weights()):
            w[s:e] = (w[s:e].to(delta.dtype) + sign * delta).to(w.dtype)

    def merge_and_unwrap(self) -> nn.Linear:
        """Merges the group (if not yet) and returns the base layer, which now computes the adapted function."""
        self.merge()
        return self.base

    def _set_merged(self, value: bool) -> None:
        self._merged = value
        self.lora_merged.fill_(int(value))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # the flag arrives with the weights it describes: follow it
        self._merged = bool(self.lora_merged.item())

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self._merged:
            if self.training and torch.is_grad_enabled() and any(a.requires_grad for a in self.lora_A):
                raise RuntimeError(
                    "this LoRA group is merged into the base weight, so training would not reach it: "
                    "call unmerge() on the layer (or the LoRA/PEGO callback's unmerge(pl_module)) first"
                )
            return y
        h = self.dropout(x)
        nr = self.num_loras * self.rank
        if len(self.lora_A) == 1:
            a = self.lora_A[0].reshape(nr, -1)
        else:
            a = torch.cat([p.reshape(nr, -1) for p in self.lora_A])
        h = F.linear(h, a) * self.scaling  # (..., parts * N * r)
        deltas = [F.linear(hp, b.reshape(b.shape[0], nr)) for hp, b in zip(h.split(nr, dim=-1), self.lora_B)]
        if len(deltas) == 1 and self.row_ranges[0] == (0, y.shape[-1]):
            return y + deltas[0].to(y.dtype)
        pieces, pos = [], 0
        for (s, e), d in zip(self.row_ranges, deltas):
            if s > pos:
                pieces.append(y[..., pos:s])
            pieces.append(y[..., s:e] + d.to(y.dtype))
            pos = e
        if pos < y.shape[-1]:
            pieces.append(y[..., pos:])
        return torch.cat(pieces, dim=-1)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}[{s}:{e}]" for n, (s, e) in zip(self.part_names, self.row_ranges))
        return (f"num_loras={self.num_loras}, rank={self.rank}, alpha={self.alpha:g}, parts=({parts}), "
                f"merged={self._merged}")


# ---------------------------------------------------------------------- injection
# ---------------------------------------------------------------------- injection
def inject_lora_groups(
    model: nn.Module,
    patterns: Sequence[str] | str | Mapping[str, str | None] | None,
    num_loras: int = 1,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    qkv_parts: str | None = None,
    exclude: Iterable[str] = (),
    method: str = "LoRA",
    occupied: Mapping[str, Iterable[str]] | None = None,
    defaults: Callable[[FamilyPreset], Sequence[str]] | None = None,
) -> dict[str, LoRAGroupLinear]:
    """Wraps every linear layer of ``model`` matched by ``patterns`` in a :class:`LoRAGroupLinear`.

    ``patterns=None`` takes ``defaults`` (roles of the detected family, see
    :mod:`cl_plugins.peft.presets`). A fused ``...qkv`` layer is adapted only on the ``qkv_parts``
    slices (each its own group) when ``qkv_parts`` is given; every other layer on all its rows.
    Raises when a target is already adapted or a pattern matches nothing
    (:func:`cl_plugins.peft.adapters.inject_adapters`). Returns the new modules by qualified name.
    """

    def build(name: str, layer: nn.Linear, rows: list[tuple[str, int, int]] | None) -> LoRAGroupLinear:
        return LoRAGroupLinear(layer, num_loras=num_loras, rank=rank, alpha=alpha, dropout=dropout, parts=rows)

    new = inject_adapters(model, build, patterns, method=method, defaults=defaults, qkv_parts=qkv_parts,
                          exclude=exclude, occupied=occupied)
    return new  # type: ignore[return-value]



def lora_layers(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, LoRAGroupLinear]:
    """The :class:`LoRAGroupLinear` modules of ``model`` (those at ``names`` when given)."""
    if names is None:
        return {n: m for n, m in model.named_modules() if isinstance(m, LoRAGroupLinear)}
    out = {}
    for n in names:
        m = model.get_submodule(n)
        if not isinstance(m, LoRAGroupLinear):
            raise TypeError(f"'{n}' is a {type(m).__name__}, not a LoRAGroupLinear")
        out[n] = m
    return out


def peft_lora_state_dict(
    model: nn.Module, prefix: str = "base_model.model.", strip: str = ""
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The LoRA groups of ``model`` in Hugging Face PEFT's format: ``(LoraConfig kwargs, state dict)``.

    Each layer becomes one PEFT adapter of rank ``parts * N * r`` (the group's ``A`` stacked; ``B``
    block-structured, zero on rows that are not adapted), with ``lora_alpha = alpha * parts * N`` so
    that PEFT's scale ``lora_alpha / rank`` equals ours: the PEFT model computes exactly the same
    function. Use with ``get_peft_model(base, LoraConfig(**config))`` and
    ``set_peft_model_state_dict``. ``strip`` removes a leading module path (e.g. ``"net."``) so the
    names match the bare backbone PEFT wraps. Merged groups are exported as unmerged deltas of a
    model whose base weights already hold them, so unmerge first to export adapters for W0.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA groups to export")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise RuntimeError(f"unmerge the LoRA groups before exporting them (merged: {merged[:3]})")
    state: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, m in layers.items():
        key = name[len(strip):] if strip and name.startswith(strip) else name
        with torch.no_grad():
            a = torch.cat([p.reshape(-1, p.shape[-1]) for p in m.lora_A]).float()
            d_out = m.base.out_features
            b = torch.zeros(d_out, a.shape[0], dtype=torch.float32, device=a.device)
            nr = m.num_loras * m.rank
            for k, ((s, e), p) in enumerate(zip(m.row_ranges, m.lora_B)):
                b[s:e, k * nr:(k + 1) * nr] = p.reshape(e - s, nr).float()
        state[f"{prefix}{key}.lora_A.weight"] = a.cpu()
        state[f"{prefix}{key}.lora_B.weight"] = b.cpu()
        ranks[key] = a.shape[0]
        alphas[key] = m.alpha * a.shape[0] / m.rank
    config: dict[str, Any] = {
        "r": next(iter(ranks.values())),
        "lora_alpha": next(iter(alphas.values())),
        "target_modules": list(ranks),
        # PEFT matches pattern keys as r"(.*\.)?(key)$": escaped full names select one layer each
        "rank_pattern": {re.escape(k): v for k, v in ranks.items()},
        "alpha_pattern": {re.escape(k): v for k, v in alphas.items()},
        "lora_dropout": 0.0,
        "bias": "none",
    }
    return config, state
