"""Megatron-Bridge's PEFT API over fused kernels."""

from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.base import PEFT
from bridge.peft.lora import LoRA
from bridge.peft.lora_layers import LinearAdapter, LoRALinear
from bridge.peft.module_matcher import ModuleMatcher
from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter
from bridge.peft.utils import get_adapter_attributes_from_linear, wildcard_match

__all__ = [
    "PEFT",
    "AdapterWrapper",
    "LinearAdapter",
    "LoRA",
    "LoRALinear",
    "ModuleMatcher",
    "ParallelLinearAdapter",
    "get_adapter_attributes_from_linear",
    "wildcard_match",
]
