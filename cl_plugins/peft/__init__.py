"""Shared pieces of the parameter-efficient methods (PEGO, LoRAMoE, L2M): finding target layers."""

from cl_plugins.peft.targets import (
    BERT_ATTENTION,
    BERT_FFN,
    TIMM_VIT_ATTENTION,
    TIMM_VIT_FFN,
    find_linear_layers,
    freeze_parameters,
    set_submodule,
)

__all__ = [
    "BERT_ATTENTION",
    "BERT_FFN",
    "TIMM_VIT_ATTENTION",
    "TIMM_VIT_FFN",
    "find_linear_layers",
    "freeze_parameters",
    "set_submodule",
]
