"""What the adapter methods (LoRA, PEGO, LoRAMoE, L2M) share: the wrapper base class, fused-qkv
slicing, and one injection function.

Every wrapper subclasses :class:`AdapterLayer`: it keeps the frozen ``nn.Linear`` it adapts as the
submodule ``base`` (:attr:`~AdapterLayer.base_layer`, :meth:`~AdapterLayer.unwrap`). :func:`inject_adapters`
resolves the targets (regular expressions, or a method's default roles in the family table of
:mod:`cl_plugins.peft.presets`), refuses layers another adapter already holds (naming the layer and
the adapter) and replaces the targets with the wrappers a method builds. A fused ``qkv`` layer is
adapted on row slices given by :func:`fused_qkv_rows`.

The injection callbacks record what they injected on the module (:data:`INJECTED`), so that a
second callback can name the first in its error and :mod:`cl_plugins.export` can forget an
injection it removed.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from cl_plugins.peft.presets import Roles, describe_roles, family_with
from cl_plugins.peft.targets import find_linear_layers, linear_layer_names, set_submodule

#: attribute (in a module's ``__dict__``) mapping injection key -> qualified names of the modules it added
INJECTED = "_cl_injected"
#: attribute mapping injection key -> names of the trainable parameters it added
INJECTED_PARAMS = "_cl_injected_params"

#: resolved targets: qualified layer name -> fused-qkv parts to adapt ("qv", ...), or None for every row
Placement = dict[str, str | None]
#: builds a method's wrapper for (qualified name, layer, fused-qkv row ranges or None)
Builder = Callable[[str, nn.Linear, "list[tuple[str, int, int]] | None"], "AdapterLayer"]


class NotMergeableError(TypeError):
    """An adapter whose update depends on the input cannot be folded into the base weights."""


class AdapterLayer(nn.Module):
    """Base of every adapter that wraps one frozen ``nn.Linear``.

    Subclasses assign the wrapped layer to ``self.base`` (a submodule, so its weights keep the
    state-dict names ``<layer>.base.weight``). :func:`inject_adapters` records the injecting method
    in :attr:`adapter_method`. An adapter whose update is a fixed low-rank matrix sets
    ``mergeable = True`` and overrides :meth:`merge_and_unwrap`; the others say why they are not in
    ``unmergeable_reason``.
    """

    base: nn.Linear
    #: the method that injected this layer ("LoRA", "PEGO", ...); empty when built by hand
    adapter_method: str = ""
    mergeable: ClassVar[bool] = False
    unmergeable_reason: ClassVar[str] = "its update is not a fixed weight matrix"

    @property
    def base_layer(self) -> nn.Linear:
        """The wrapped linear layer."""
        return self.base

    def unwrap(self) -> nn.Linear:
        """The wrapped linear layer as it is now, without the adapter's own modules."""
        return self.base

    def merge_and_unwrap(self) -> nn.Linear:
        """The wrapped layer with the adapter's update folded into its weight."""
        raise NotMergeableError(
            f"{type(self).__name__} cannot be merged into its base layer: {self.unmergeable_reason}"
        )


def is_adapter(module: nn.Module) -> bool:
    """Whether ``module`` adapts a layer: one of ours, or a Hugging Face PEFT tuner layer."""
    if isinstance(module, AdapterLayer):
        return True
    # a PEFT layer can only be in the model if PEFT was imported
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return tuners is not None and isinstance(module, tuners.BaseTunerLayer)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every :class:`AdapterLayer` of ``model`` by qualified name (model order)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


# ---------------------------------------------------------------------- fused qkv
def fused_qkv_rows(out_features: int, parts: str) -> list[tuple[str, int, int]]:
    """Row ranges ``(part, start, stop)`` of the ``parts`` (a subset of "qkv") of a fused projection
    whose output is ``[q; k; v]``."""
    if not parts or set(parts) - set("qkv") or len(set(parts)) != len(parts):
        raise ValueError(f"qkv_parts must be a non-empty subset of 'qkv' without repeats, got {parts!r}")
    if out_features % 3:
        raise ValueError(f"a fused qkv layer needs out_features divisible by 3, got {out_features}")
    d = out_features // 3
    return [(p, i * d, (i + 1) * d) for i, p in enumerate("qkv") if p in parts]


def rows_index(rows: Sequence[tuple[str, int, int]]) -> Tensor:
    """The output indices covered by ``rows``, in order (int64)."""
    return torch.cat([torch.arange(s, e) for _, s, e in rows])


def is_fused_qkv(name: str, layer: nn.Linear) -> bool:
    """A layer whose name ends in ``qkv`` and whose output splits in three is taken as ``[q; k; v]``."""
    return name.rpartition(".")[2].endswith("qkv") and layer.out_features % 3 == 0


# ---------------------------------------------------------------------- targets
def target_patterns(
    model: nn.Module, targets: Sequence[str] | str | None, defaults: Roles | None, method: str
) -> list[str]:
    """``targets`` as a list of patterns, or the ``defaults`` roles of the first family whose layers
    ``model`` has (a layer another adapter wraps keeps its name and counts)."""
    if targets is not None:
        return [targets] if isinstance(targets, str) else list(targets)
    family = family_with(model, defaults) if defaults is not None else None
    if family is None:
        names = linear_layer_names(model)
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        known = f" (it knows {describe_roles(defaults)})" if defaults is not None else ""
        raise ValueError(
            f"{method} found none of its default layers in {type(model).__name__}{known}: pass targets=[...] "
            f"(regular expressions searched in the qualified layer names). Its linear layers are: {shown or 'none'}"
        )
    return list(defaults(family))


def _owner(name: str, occupied: Mapping[str, Iterable[str]]) -> str | None:
    """The injection that registered ``name``, a module inside it or a module around it."""
    for key, names in occupied.items():
        for r in names:
            if name == r or name.startswith(r + ".") or r.startswith(name + "."):
                return key
    return None


def refuse_adapted(
    model: nn.Module, selected: Callable[[str], bool], method: str,
    occupied: Mapping[str, Iterable[str]] | None = None, hint: str | None = None,
) -> None:
    """Raises a ``RuntimeError`` when a module ``selected`` by name is held by another adapter.

    A module is held when it is an adapter or lies inside one (e.g. a pattern reaching the ``base``
    of a wrapper), or when it is a linear layer inside a module another injection registered
    (``occupied``: injection key -> qualified module names, see :data:`INJECTED`). ``hint`` replaces
    the advice at the end of the message.
    """
    occupied = occupied or {}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not name or not selected(name):
            continue
        parts = name.split(".")
        holder = next((h for h in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if is_adapter(modules[h])),
                      None)
        if holder is not None:
            wrapper = modules[holder]
            if isinstance(wrapper, AdapterLayer):
                label, key = type(wrapper).__name__, wrapper.adapter_method or _owner(holder, occupied)
            else:
                label, key = f"Hugging Face PEFT layer ({type(wrapper).__module__}.{type(wrapper).__qualname__})", None
            by = f" (injected by {key})" if key else ""
            where, what = holder, f"it is no longer a plain nn.Linear but a {label}{by}"
        elif isinstance(module, nn.Linear) and (key := _owner(name, occupied)) is not None:
            where, what = name, f"it lies inside a module injected by {key}"
        else:
            continue
        hint = hint or (
            "Two adapters cannot hold the same layers: give them disjoint targets=[...] (e.g. one on the attention "
            "projections, the other on r'mlp\\.fc1$'), or use only one of them"
        )
        raise RuntimeError(f"{method} cannot adapt '{where}': {what}. {hint}")


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str] | str | None,
    *,
    method: str,
    defaults: Roles | None = None,
    qkv_parts: str | None = None,
    exclude: Iterable[str] = (),
    occupied: Mapping[str, Iterable[str]] | None = None,
) -> Placement:
    """The linear layers to adapt (qualified name -> fused-qkv parts or ``None``), in model order.

    ``targets`` are regular expressions (``re.search``); ``None`` takes ``defaults`` of the detected
    family. A matched layer that :func:`is_fused_qkv` is adapted on the ``qkv_parts`` slices when
    ``qkv_parts`` is given. Raises when a pattern matches nothing (listing the linear layers) or a
    matched module is held by another adapter (:func:`refuse_adapted`).
    """
    if qkv_parts is not None:
        fused_qkv_rows(3, qkv_parts)  # validates early
    patterns = target_patterns(model, targets, defaults, method)
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as err:
        raise ValueError(f"{method}: a target pattern in {patterns} is not a valid regular expression: {err}") from err
    refuse_adapted(model, lambda n: any(rx.search(n) for rx in compiled), method, occupied)
    layers = find_linear_layers(model, patterns, exclude=exclude)
    return {n: qkv_parts if qkv_parts is not None and is_fused_qkv(n, m) else None for n, m in layers.items()}


def inject_adapters(
    model: nn.Module,
    build: Builder,
    targets: Sequence[str] | str | Mapping[str, str | None] | None = None,
    *,
    method: str,
    defaults: Roles | None = None,
    qkv_parts: str | None = None,
    exclude: Iterable[str] = (),
    occupied: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, AdapterLayer]:
    """Replaces the target linear layers of ``model`` by the wrappers ``build`` makes.

    ``targets``: patterns or ``None`` (resolved by :func:`resolve_targets` with ``defaults``,
    ``qkv_parts``, ``exclude``), or an explicit placement ``{qualified name: qkv parts or None}``.
    ``build(name, layer, rows)`` receives the fused-qkv row ranges of the layer (``None``: all rows).
    Every target is checked before any is replaced: a layer another adapter holds, a missing name
    or a module that is not an ``nn.Linear`` raises and leaves the model unchanged. Returns the new
    wrappers by qualified name.
    """
    if isinstance(targets, Mapping):
        placement: Placement = dict(targets)
        refuse_adapted(model, placement.__contains__, method, occupied)
    else:
        placement = resolve_targets(model, targets, method=method, defaults=defaults, qkv_parts=qkv_parts,
                                    exclude=exclude, occupied=occupied)
    modules = dict(model.named_modules())
    missing = [n for n in placement if n not in modules]
    if missing:
        raise ValueError(f"{method}: {type(model).__name__} has no module {missing[:5]}; its linear layers are: "
                         f"{linear_layer_names(model)[:40]}")
    wrong = {n: type(modules[n]).__name__ for n in placement if not isinstance(modules[n], nn.Linear)}
    if wrong:
        raise TypeError(f"{method} adapts nn.Linear layers; these targets are not: {wrong}")
    new: dict[str, AdapterLayer] = {}
    for name, parts in placement.items():
        layer = modules[name]
        rows = fused_qkv_rows(layer.out_features, parts) if parts is not None else None
        wrapper = build(name, layer, rows)
        if wrapper.base_layer is not layer:
            raise RuntimeError(f"{method}: the wrapper built for '{name}' does not hold that layer as its base")
        wrapper.adapter_method = method
        new[name] = wrapper
    for name, wrapper in new.items():
        set_submodule(model, name, wrapper)
    return new


def forget_injections(model: nn.Module, removed: Iterable[str]) -> list[str]:
    """Drops from the registry of ``model`` every injection that registered a module at or under
    the ``removed`` qualified names; returns their keys."""
    removed = list(removed)
    registry: dict[str, list[str]] = model.__dict__.get(INJECTED, {})
    params: dict[str, list[str]] = model.__dict__.get(INJECTED_PARAMS, {})
    gone = [k for k, names in registry.items() if any(_owner(n, {k: removed}) for n in names)]
    for k in gone:
        registry.pop(k, None)
        params.pop(k, None)
    return gone
