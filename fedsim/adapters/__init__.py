"""Adapters: the LoRA-SB layer and injector, LoRA-SB initialisation, one view over adapted layers, PEFT export."""

from fedsim.adapters.init import accumulate_gradients, lora_sb_factors
from fedsim.adapters.layers import AdaptedLayer, adapted_layers, adapter_product
from fedsim.adapters.lora_sb import LoraSBLinear, inject_lora_sb, target_linear_names

__all__ = [
    "AdaptedLayer",
    "LoraSBLinear",
    "accumulate_gradients",
    "adapted_layers",
    "adapter_product",
    "inject_lora_sb",
    "lora_sb_factors",
    "target_linear_names",
]
