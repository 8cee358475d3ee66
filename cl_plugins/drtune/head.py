"""The official head recipe of DR-Tune, as options: the head's initialization and its larger learning rate.

The official code (``model.py``, ``worker.py``, ``configs/cifar10_k2048_lr001.yaml``) draws the
head's weight from ``N(0, 0.01)`` (its bias keeps PyTorch's default) and trains the head with
learning rate 0.33 against 0.01 for the backbone: a 33x multiplier, equal to ``(B + K) / B`` at
``B = 64, K = 2048``. The optimizer here is the user's, so the multiplier is applied by scaling
the head's parameter *updates* (:class:`HeadLrScale`), which equals multiplying its learning rate
for every optimizer whose update is proportional to the learning rate (SGD with momentum,
Nesterov and weight decay, Adam, AdamW, RMSprop).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

#: official head recipe: weight ~ N(0, 0.01); head lr 0.33 against the backbone's 0.01
OFFICIAL_HEAD_INIT_STD = 0.01
OFFICIAL_HEAD_LR_SCALE = 33.0


@torch.no_grad()
def init_head_weight(linear: nn.Linear, std: float) -> None:
    """Draws ``linear.weight`` from ``N(0, std)`` in place (the bias is left as it is, as officially)."""
    if not std > 0:
        raise ValueError(f"the head's init std must be > 0, got {std}")
    linear.weight.normal_(mean=0.0, std=std)


class HeadLrScale:
    """Multiplies every update an optimizer makes to ``params`` by ``scale``.

    A step pre-hook keeps a copy of the parameters, a post-hook sets ``p = old + scale * (p - old)``.
    A step the optimizer skips (fp16 ``GradScaler`` overflow) calls neither hook.

    Args:
        optimizers: the optimizers to hook (those holding none of ``params`` are left alone).
        params: the head's parameters.
        scale: the learning-rate multiplier (official: 33).

    Raises:
        ValueError: when no optimizer holds any of ``params`` (a frozen head has no learning rate).
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer], params: Iterable[Tensor], scale: float) -> None:
        if not scale > 0:
            raise ValueError(f"the head's learning-rate multiplier must be > 0, got {scale}")
        self.scale = float(scale)
        wanted = {id(p): p for p in params}
        self._handles: list[RemovableHandle] = []
        self._saved: dict[int, list[tuple[Tensor, Tensor]]] = {}
        hooked = 0
        for opt in optimizers:
            held = [p for group in opt.param_groups for p in group["params"] if id(p) in wanted]
            if not held:
                continue
            hooked += len(held)
            self._handles.append(opt.register_step_pre_hook(self._pre(held)))
            self._handles.append(opt.register_step_post_hook(self._post()))
        if hooked == 0:
            raise ValueError(
                "head_lr_scale needs the head's parameters in an optimizer, and no optimizer holds them (is the "
                "head frozen?): leave head_lr_scale=1 or train the head"
            )

    def _pre(self, held: list[Tensor]) -> Any:
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._saved[id(opt)] = [(p, p.detach().clone()) for p in held]

        return hook

    def _post(self) -> Any:
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            with torch.no_grad():
                for p, old in self._saved.pop(id(opt), []):
                    p.copy_(old + self.scale * (p - old))

        return hook

    def remove(self) -> None:
        """Removes the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._saved.clear()
