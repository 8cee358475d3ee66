"""The layers of the model families the adapter methods know, in one table.

A :class:`FamilyPreset` names, as regular expressions searched in qualified module names, where a
family keeps its attention projections (fused in one ``qkv`` layer or separate), its attention
output, its feed-forward layers, the module that embeds the input and the classification head.
Each method picks its default placement from these roles (LoRA: the attention projections; PEGO:
query and value; LoRAMoE: the FFN; L2M: query, value and the first FFN layer), so adding a family
is one entry here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

#: a method's default placement: the roles it adapts, as patterns of a family
Roles = Callable[["FamilyPreset"], Sequence[str]]


@dataclass(frozen=True)
class FamilyPreset:
    """Layer-name patterns of one model family (``re.search`` over qualified module names).

    A family has either ``fused_qkv`` (one layer whose output rows are ``[q; k; v]``, as timm's
    ``attn.qkv``) or the three projections ``query`` / ``key`` / ``value``.
    """

    name: str
    label: str
    attention_output: str
    ffn_in: str
    ffn_out: str
    query_module: str
    head: str
    fused_qkv: str | None = None
    query: str | None = None
    key: str | None = None
    value: str | None = None

    def __post_init__(self) -> None:
        separate = [p is not None for p in (self.query, self.key, self.value)]
        fused = self.fused_qkv is not None
        if (fused and any(separate)) or (not fused and not all(separate)):
            raise ValueError(f"family {self.name!r}: give fused_qkv or all of query / key / value, not both")

    @property
    def detect(self) -> str:
        """The pattern that identifies the family: its fused qkv layer or its query projection."""
        return self.fused_qkv if self.fused_qkv is not None else self.query  # type: ignore[return-value]

    def projections(self, parts: str) -> tuple[str, ...]:
        """The layers that hold the attention ``parts`` (a subset of "qkv"): the fused layer once
        (the parts are then row slices of it), else each named projection."""
        if not parts or set(parts) - set("qkv"):
            raise ValueError(f"attention parts must be a non-empty subset of 'qkv', got {parts!r}")
        if self.fused_qkv is not None:
            return (self.fused_qkv,)
        by_part = {"q": self.query, "k": self.key, "v": self.value}
        return tuple(by_part[p] for p in "qkv" if p in parts)  # type: ignore[misc]

    @property
    def attention(self) -> tuple[str, ...]:
        """Every attention projection: q, k, v (or the fused layer) and the attention output."""
        return (*self.projections("qkv"), self.attention_output)

    @property
    def ffn(self) -> tuple[str, ...]:
        """The two feed-forward layers."""
        return (self.ffn_in, self.ffn_out)


TIMM_VIT = FamilyPreset(
    name="timm_vit",
    label="timm ViT",
    fused_qkv=r"attn\.qkv$",
    attention_output=r"attn\.proj$",
    ffn_in=r"mlp\.fc1$",
    ffn_out=r"mlp\.fc2$",
    query_module=r"(^|\.)patch_embed$",
    head="head",
)
BERT = FamilyPreset(
    name="bert",
    label="BERT-style encoder",
    query=r"attention\.self\.query$",
    key=r"attention\.self\.key$",
    value=r"attention\.self\.value$",
    attention_output=r"attention\.output\.dense$",
    ffn_in=r"intermediate\.dense$",
    ffn_out=r"(?<!attention\.)output\.dense$",
    query_module=r"(^|\.)embeddings$",
    head="classifier",
)
#: every known family, in the order they are tried
PRESETS: dict[str, FamilyPreset] = {p.name: p for p in (TIMM_VIT, BERT)}


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def detect_family(model: nn.Module) -> str | None:
    """The name of the first family whose :attr:`FamilyPreset.detect` layer ``model`` has, else ``None``
    (a layer another adapter wraps keeps its name, so an adapted model still names its family)."""
    names = _names(model)
    for preset in PRESETS.values():
        rx = re.compile(preset.detect)
        if any(rx.search(n) for n in names):
            return preset.name
    return None


def family_with(model: nn.Module, roles: Roles) -> FamilyPreset | None:
    """The first family whose every ``roles`` pattern names a module of ``model``, else ``None``."""
    names = _names(model)
    for preset in PRESETS.values():
        if all(any(re.search(p, n) for n in names) for p in roles(preset)):
            return preset
    return None


def describe_roles(roles: Roles) -> str:
    """``roles`` for every family, for error messages."""
    return "; ".join(f"{p.label}: {', '.join(roles(p))}" for p in PRESETS.values())
