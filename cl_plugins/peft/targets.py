"""Find the linear layers to adapt by name patterns, and replace them in place.

Patterns are regular expressions searched in qualified module names (``re.search``), so
``"qkv"`` matches ``blocks.3.attn.qkv`` and ``r"intermediate\\.dense$"`` matches
``encoder.layer.0.intermediate.dense``. A pattern that matches no linear layer is an error that
lists the model's linear layers. The default targets of each model family are in
:mod:`cl_plugins.peft.presets`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn


def linear_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` in ``model`` (for error messages)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_linear_layers(
    model: nn.Module, patterns: Sequence[str], exclude: Iterable[str] = ()
) -> dict[str, nn.Linear]:
    """Linear layers whose qualified name matches any of ``patterns`` (in model order).

    ``exclude`` holds qualified names to skip (e.g. the classification head). Raises
    ``ValueError`` naming each pattern that matches nothing, with the model's linear layers.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError("no target patterns given: name the linear layers to adapt (e.g. 'qkv', 'query')")
    excluded = set(exclude)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in excluded}
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"target pattern {p!r} is not a valid regular expression: {err}") from err
    unmatched = [p for p, rx in zip(patterns, compiled) if not any(rx.search(n) for n in linears)]
    if unmatched:
        names = linear_layer_names(model)
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise ValueError(
            f"target pattern(s) {unmatched} match no linear layer of {type(model).__name__}. "
            f"Its linear layers are: {shown or 'none'}"
        )
    return {n: m for n, m in linears.items() if any(rx.search(n) for rx in compiled)}


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replaces the submodule at qualified ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_parameters(model: nn.Module, keep: Iterable[str] = ()) -> list[str]:
    """Sets ``requires_grad=False`` on every parameter except those under the module names in
    ``keep``; returns the names of the parameters that stay trainable."""
    prefixes = tuple(k + "." for k in keep)
    trainable = []
    for n, p in model.named_parameters():
        on = n.startswith(prefixes)
        p.requires_grad_(on)
        if on:
            trainable.append(n)
    return trainable
