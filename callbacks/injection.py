"""Base of the callbacks that do model surgery (ARCHITECTURE.md section 2, way 1).

``setup()`` runs before Lightning builds the optimizer, so parameters injected there are trained
by the user's ``configure_optimizers`` as long as it takes the trainable parameters. The backbone
is frozen (the classification head stays trainable unless ``train_head=False``), injection is
done once per module (later ``fit`` calls, e.g. one per experience, reuse it) and
``on_fit_start`` checks that every injected trainable parameter is in an optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
from torch import nn

from callbacks.base import ContinualCallback
from cl_plugins.peft.adapters import INJECTED, INJECTED_PARAMS
from cl_plugins.peft.targets import freeze_parameters
from cl_plugins.protocols import find_head


class InjectionCallback(ContinualCallback):
    """Freezes the model, calls :meth:`inject` once, and checks the optimizer sees the new params.

    Args:
        train_head: keep the classification head trainable (new classes need it in class-IL).
        head_name: qualified name of the head when the defaults of ``find_head`` do not find it.
    """

    #: attributes on the LightningModule recording which callbacks already injected (shared with
    #: :mod:`cl_plugins.export`, which drops an injection it merged away and restores saved ones)
    _REGISTRY = INJECTED
    _PARAM_REGISTRY = INJECTED_PARAMS

    def __init__(self, train_head: bool = True, head_name: str | None = None) -> None:
        super().__init__()
        self.train_head = train_head
        self.head_name = head_name
        self.injected_parameter_names: list[str] = []

    @property
    def injection_key(self) -> str:
        """Identifies this callback's injection on a module (one injection per key)."""
        return self.state_key

    def other_injections(self, pl_module: pl.LightningModule) -> dict[str, list[str]]:
        """The modules other injections registered on ``pl_module`` (injection key -> qualified names),
        for :func:`cl_plugins.peft.adapters.refuse_adapted`."""
        registry: dict[str, list[str]] = pl_module.__dict__.get(self._REGISTRY, {})
        return {k: v for k, v in registry.items() if k != self.injection_key}

    def inject(self, pl_module: pl.LightningModule) -> Iterable[str]:
        """Adds the method's modules to ``pl_module``; returns the qualified names of the new modules."""
        raise NotImplementedError(f"{type(self).__name__} must implement inject()")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # injection key -> qualified names of the modules that callback injected
        done: dict[str, list[str]] = pl_module.__dict__.setdefault(self._REGISTRY, {})
        # injection key -> names of the trainable parameters it injected
        params: dict[str, list[str]] = pl_module.__dict__.setdefault(self._PARAM_REGISTRY, {})
        if self.injection_key in done:
            self.injected_parameter_names = params[self.injection_key]
            return
        keep: list[str] = []
        if self.train_head:
            keep.append(find_head(pl_module, self.head_name)[0])
        freeze_parameters(pl_module, keep=keep)
        # parameters injected by earlier callbacks stay trainable; matching them by parameter name
        # (not module prefix) keeps the frozen base weight inside a wrapper frozen
        earlier = {n for names in params.values() for n in names}
        for n, p in pl_module.named_parameters():
            if n in earlier:
                p.requires_grad_(True)
        new_modules = list(self.inject(pl_module))
        if not new_modules:
            raise RuntimeError(f"{type(self).__name__}.inject() added no module")
        prefixes = tuple(m + "." for m in new_modules)
        self.injected_parameter_names = [
            n for n, p in pl_module.named_parameters() if n.startswith(prefixes) and p.requires_grad
        ]
        done[self.injection_key] = list(new_modules)
        params[self.injection_key] = list(self.injected_parameter_names)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        in_optim = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [n for n in self.injected_parameter_names if n in params and id(params[n]) not in in_optim]
        if missing:
            raise RuntimeError(
                f"{type(self).__name__} injected trainable parameters that no optimizer holds "
                f"({len(missing)}, e.g. {missing[:3]}): configure_optimizers must be built from "
                "[p for p in self.parameters() if p.requires_grad] (it runs after the callbacks' setup)"
            )


def count_trainable(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
