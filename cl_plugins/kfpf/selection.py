"""Forgetting-prone modules: which parameters FPF / k-FPF fine-tune on the buffer.

Zhao et al. (ICML 2023) find that only a few modules change sharply between tasks and carry most
of the forgetting; for ResNets these are the classifier head, the normalization layers (affine
parameters and running statistics) and the first convolution. :func:`select_modules` picks that
set by default for any architecture:

- ``head``: the classification head, found with :func:`cl_plugins.protocols.find_head`
  (timm ``get_classifier()``, ``head`` / ``fc`` / ``classifier`` attributes) or named explicitly;
- ``norms``: every normalization layer that owns parameters or running statistics (BatchNorm,
  GroupNorm, LayerNorm, InstanceNorm, RMSNorm, and custom classes named ``*LayerNorm`` /
  ``*RMSNorm`` / ...), whose running statistics are re-estimated during a phase;
- ``first_conv``: the first convolution in registration order (``conv1`` of a ResNet, the patch
  embedding ``patch_embed.proj`` of a timm ViT); models without a convolution (text transformers)
  contribute nothing here;
- ``patterns``: regular expressions (``re.search``) matched against qualified module names and
  parameter names, for anything else (e.g. ``r"layer4\\.1\\."`` or ``r"pos_embed"``).

The ViT defaults (LayerNorms, head, patch embedding) are this library's analogue of the paper's
ResNet finding; the paper does not verify them for transformers. ``KFPF(modules="auto")``
chooses from measured sensitivity instead (:mod:`cl_plugins.kfpf.auto`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from cl_plugins.protocols import find_head

#: normalization classes recognised by type
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm, LazyBatchNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
#: custom normalization classes (e.g. Hugging Face ``LlamaRMSNorm``, ``T5LayerNorm``) recognised by name
_NORM_NAME = re.compile(r"(Batch|Layer|Group|Instance|RMS)Norm")
_CONV_TYPES = (nn.modules.conv._ConvNd,)


def is_norm(module: nn.Module) -> bool:
    """True for a normalization layer (by type, or a custom class named like one)."""
    return isinstance(module, NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def has_running_stats(module: nn.Module) -> bool:
    """True when ``module`` keeps running statistics (BatchNorm, tracked InstanceNorm)."""
    return (
        getattr(module, "track_running_stats", False)
        and getattr(module, "running_mean", None) is not None
    )


@dataclass
class ModuleSelection:
    """The outcome of :func:`select_modules`.

    Attributes:
        modules: selected modules by qualified name (all their parameters are selected; with
            ``modules="auto"`` only their own, :mod:`cl_plugins.kfpf.auto`).
        params: every selected parameter by qualified name (modules' and pattern-matched ones).
        norm_with_stats: selected modules keeping running statistics (re-estimated in a phase).
        reasons: why each module or parameter was selected (``head``, ``norm``, ``first_conv``,
            ``pattern:<regex>``).
    """

    modules: dict[str, nn.Module] = field(default_factory=dict)
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    norm_with_stats: dict[str, nn.Module] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def num_params(self) -> int:
        """Number of selected scalar parameters."""
        return sum(p.numel() for p in self.params.values())

    def describe(self, limit: int = 12) -> str:
        """A short human-readable summary (for logs)."""
        names = list(self.reasons)
        shown = ", ".join(names[:limit]) + (f", ... (+{len(names) - limit})" if len(names) > limit else "")
        return f"{len(self.params)} tensors / {self.num_params():,} parameters in [{shown}]"


def _param_owning_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]


class SelectionBuilder:
    """Accumulates a :class:`ModuleSelection` without duplicates (shared by the fixed list and
    :func:`cl_plugins.kfpf.auto.select_by_sensitivity`)."""

    def __init__(self) -> None:
        self.selection = ModuleSelection()
        self._seen: set[int] = set()

    def add_param(self, name: str, p: nn.Parameter, reason: str) -> None:
        """Selects one parameter."""
        if id(p) not in self._seen:
            self._seen.add(id(p))
            self.selection.params[name] = p
            self.selection.reasons.setdefault(name, reason)

    def add_module(self, name: str, module: nn.Module, reason: str, recurse: bool = True) -> None:
        """Selects a module's parameters (its own only with ``recurse=False``) and the running
        statistics of the normalization layers among them."""
        sel = self.selection
        if name in sel.modules:
            return
        sel.modules[name] = module
        sel.reasons.setdefault(name or "<root>", reason)
        for pname, p in module.named_parameters(recurse=recurse):
            if id(p) not in self._seen:
                self._seen.add(id(p))
                sel.params[f"{name}.{pname}" if name else pname] = p
        subs = module.named_modules(prefix=name) if recurse else [(name, module)]
        for sub_name, sub in subs:
            if has_running_stats(sub):
                sel.norm_with_stats[sub_name] = sub

    def add_patterns(self, model: nn.Module, patterns: Sequence[str]) -> None:
        """Selects the modules and parameters whose qualified names match each regular expression."""
        for pattern in patterns:
            rx = re.compile(pattern)
            matched = False
            for name, m in model.named_modules():
                if name and rx.search(name):
                    self.add_module(name, m, f"pattern:{pattern}")
                    matched = True
            for pname, p in model.named_parameters():
                if rx.search(pname):
                    matched = True
                    self.add_param(pname, p, f"pattern:{pattern}")
            if not matched:
                names = _param_owning_module_names(model)
                shown = ", ".join(names[:60]) + (f", ... (+{len(names) - 60})" if len(names) > 60 else "")
                raise ValueError(
                    f"k-FPF module pattern {pattern!r} matches no module or parameter name of "
                    f"{type(model).__name__}; modules with parameters: {shown}"
                )


def select_modules(
    model: nn.Module,
    head: bool = True,
    norms: bool = True,
    first_conv: bool = True,
    patterns: Sequence[str] = (),
    head_name: str | None = None,
) -> ModuleSelection:
    """Selects the forgetting-prone modules of ``model`` (see the module docstring).

    Args:
        model: the network (usually the LightningModule; names are relative to it).
        head: select the classification head.
        norms: select every normalization layer, running statistics included.
        first_conv: select the first convolution / patch embedding.
        patterns: regular expressions over qualified module and parameter names.
        head_name: the head's qualified name, overriding the automatic lookup.

    Raises:
        ValueError: when a pattern matches nothing (the message lists the model's modules), or
            when the selection is empty.
    """
    build = SelectionBuilder()
    if head:
        hname, hmod = find_head(model, head_name)
        build.add_module(hname, hmod, "head")
    if norms:
        for name, m in model.named_modules():
            if name and is_norm(m) and (any(True for _ in m.parameters()) or has_running_stats(m)):
                build.add_module(name, m, "norm")
    if first_conv:
        for name, m in model.named_modules():
            if isinstance(m, _CONV_TYPES):
                build.add_module(name, m, "first_conv")
                break
    build.add_patterns(model, patterns)
    if not build.selection.params:
        raise ValueError(
            "k-FPF selected no parameters: enable head / norms / first_conv or give patterns= that "
            "match modules with parameters"
        )
    return build.selection
