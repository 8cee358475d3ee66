""""Features then head": where a classifier's pooled features end and its head begins.

Methods such as DR-Tune (the head also classifies pretrained features) and k-FPF (the head is a
forgetting-prone module) need the head module and the features that enter it. Defaults recognise
timm models (``get_classifier()``), Hugging Face sequence classifiers (``classifier`` /
``score``), this library's ``SmallCNN`` / ``MLP`` (``head``) and any module exposing ``head`` or
``fc``; a user can name the head explicitly. The heads of the families in
:mod:`cl_plugins.peft.presets` come first.
"""

from __future__ import annotations

from torch import nn

from cl_plugins.peft.presets import PRESETS
from cl_plugins.peft.targets import linear_layer_names

_HEAD_ATTRS = tuple(dict.fromkeys([*(p.head for p in PRESETS.values()), "head", "fc", "score", "linear"]))


def _unwrap(model: nn.Module) -> nn.Module:
    """Skips thin wrappers (``ContinualClassifier.net``, ``HFSequenceClassifier.model``)."""
    for attr in ("net", "model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and not any(isinstance(getattr(model, a, None), nn.Module)
                                                     for a in _HEAD_ATTRS):
            return _unwrap(inner)
    return model


def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """Returns ``(qualified name, module)`` of the classification head of ``model``.

    ``name`` (a qualified module name such as ``"net.fc"``) overrides the defaults. Raises a
    ``ValueError`` listing the model's linear layers when no head is found.
    """
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            raise ValueError(f"no module named '{name}' in the model; linear layers: {linear_layer_names(model)}")
        return name, modules[name]
    inner = _unwrap(model)
    getter = getattr(inner, "get_classifier", None)
    head: nn.Module | None = None
    if callable(getter):
        candidate = getter()
        if isinstance(candidate, nn.Module) and not isinstance(candidate, nn.Identity):
            head = candidate
    if head is None:
        for attr in _HEAD_ATTRS:
            candidate = getattr(inner, attr, None)
            if isinstance(candidate, nn.Module) and not isinstance(candidate, nn.Identity):
                head = candidate
                break
    if head is None:
        raise ValueError(
            f"could not find the classification head of {type(inner).__name__}: name it explicitly "
            f"(head_name=...); linear layers: {linear_layer_names(model)}"
        )
    qualified = next(n for n, m in model.named_modules() if m is head)
    return qualified, head

