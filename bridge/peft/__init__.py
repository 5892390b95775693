"""Megatron-Bridge's PEFT API over fused kernels: LoRA, DoRA, canonical LoRA, merging, adapter
checkpoints and the Hugging Face PEFT exchange."""

from bridge.peft.adapter_io import AdapterLoadError, adapter_state_dict, load_adapter_state_dict
from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.base import PEFT
from bridge.peft.canonical_lora import CanonicalLoRA, LoRALinearSplitFC1UpGate, LoRALinearSplitQKV
from bridge.peft.dora import DoRA
from bridge.peft.dora_layers import DoRALinear, ParallelLinearDoRAAdapter
from bridge.peft.hf import export_hf_adapter, import_hf_adapter
from bridge.peft.lora import LoRA
from bridge.peft.lora_layers import LinearAdapter, LoRALinear
from bridge.peft.lora_merge import MergeError, merge_and_unload, merge_lora, unmerge_lora
from bridge.peft.module_matcher import ModuleMatcher
from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter
from bridge.peft.utils import get_adapter_attributes_from_linear, wildcard_match

__all__ = [
    "PEFT",
    "AdapterLoadError",
    "AdapterWrapper",
    "CanonicalLoRA",
    "DoRA",
    "DoRALinear",
    "LinearAdapter",
    "LoRA",
    "LoRALinear",
    "LoRALinearSplitFC1UpGate",
    "LoRALinearSplitQKV",
    "MergeError",
    "ModuleMatcher",
    "ParallelLinearAdapter",
    "ParallelLinearDoRAAdapter",
    "adapter_state_dict",
    "export_hf_adapter",
    "get_adapter_attributes_from_linear",
    "import_hf_adapter",
    "load_adapter_state_dict",
    "merge_and_unload",
    "merge_lora",
    "unmerge_lora",
    "wildcard_match",
]
