"""The frozen pretrained encoder of DR-Tune and helpers for "features then head" models.

The pretrained features ``f_p`` are the input of the head of a frozen copy of the model taken
before fine-tuning (the official code keeps a second ResNet-50 with ``fc = Identity``; a copy of
the whole model with a hook on its head gives the same features for any architecture that
:func:`cl_plugins.protocols.find_head` understands).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

#: per-module hook tables that must not travel into the copy (they belong to callbacks of the original)
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def frozen_copy(module: nn.Module, exclude: Iterable[Any] = ()) -> nn.Module:
    """A deep copy of ``module`` in eval mode with ``requires_grad=False`` everywhere.

    Objects in ``exclude`` (e.g. the Lightning trainer a LightningModule points to) become ``None``
    in the copy instead of being copied, and the forward/backward hooks of the original (those of
    other callbacks) are not copied.
    """
    memo: dict[int, Any] = {id(o): None for o in exclude if o is not None}
    for m in module.modules():
        for table in _HOOK_TABLES:
            hooks = m.__dict__.get(table)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    clone = copy.deepcopy(module, memo)
    clone.requires_grad_(False)
    return clone.eval()


def head_linear(head: nn.Module) -> nn.Linear:
    """The linear layer whose weight rows are the class prototypes: ``head`` itself or its last ``nn.Linear``."""
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"the head ({type(head).__name__}) has no nn.Linear: DR-Tune reads the class prototypes from the "
            "head's linear weight; name a linear classifier with head_name=..."
        )
    return linears[-1]


def check_features(features: Tensor, head: nn.Module, what: str) -> None:
    """Raises unless ``features`` are pooled ``(batch, D)`` vectors that the head's linear layer takes."""
    if features.dim() != 2:
        raise ValueError(
            f"the {what} features entering the head have shape {tuple(features.shape)}; DR-Tune needs pooled "
            "(batch, dim) features. Name a head whose input is pooled (head_name=..., e.g. the final nn.Linear), "
            "or pass pretrained_features= and a model whose head takes (batch, dim)"
        )
    linear = head_linear(head)
    if linear.in_features != features.shape[1]:
        raise ValueError(
            f"the {what} features have {features.shape[1]} dimensions but the head's linear layer takes "
            f"{linear.in_features}: DR-Tune needs a linear head on the pooled features (head_name=...)"
        )


class FrozenEncoder(nn.Module):
    """The pretrained encoder: a frozen copy of a model; ``forward`` returns the input of its head.

    Always in eval mode (``train()`` is a no-op), never builds a graph, and its parameters have
    ``requires_grad=False``; it is not a submodule of the trained model, so no optimizer sees it.

    Args:
        model: the model to copy (called with the same arguments as the original).
        head_name: qualified name of the head inside ``model``.
        exclude: objects replaced by ``None`` in the copy (see :func:`frozen_copy`).
    """

    def __init__(self, model: nn.Module, head_name: str, exclude: Iterable[Any] = ()) -> None:
        super().__init__()
        self.model = frozen_copy(model, exclude)
        self.head_name = head_name
        self._captured: Tensor | None = None
        self.model.get_submodule(head_name).register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not args or not isinstance(args[0], Tensor):
            raise ValueError(f"the head {self.head_name} of the frozen encoder was called without a tensor input")
        self._captured = args[0]

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stays in eval mode: BatchNorm uses its running statistics, dropout is off (official code)."""
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        self.model.eval()
        self._captured = None
        with torch.no_grad():
            self.model(*args, **kwargs)
        features, self._captured = self._captured, None
        if features is None:
            raise RuntimeError(f"the frozen encoder's forward never reached its head {self.head_name}")
        return features
