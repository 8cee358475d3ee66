"""What the parameter-efficient methods (LoRA, PEGO, LoRAMoE, L2M) share: the adapter base class, the
model-family presets, finding and replacing target layers."""

from cl_plugins.peft.adapters import (
    AdapterLayer,
    adapter_layers,
    fused_qkv_rows,
    inject_adapters,
    is_adapter,
    resolve_targets,
)
from cl_plugins.peft.presets import PRESETS, FamilyPreset, detect_family
from cl_plugins.peft.targets import find_linear_layers, freeze_parameters, linear_layer_names, set_submodule

__all__ = [
    "PRESETS",
    "AdapterLayer",
    "FamilyPreset",
    "adapter_layers",
    "detect_family",
    "find_linear_layers",
    "freeze_parameters",
    "fused_qkv_rows",
    "inject_adapters",
    "is_adapter",
    "linear_layer_names",
    "resolve_targets",
    "set_submodule",
]
