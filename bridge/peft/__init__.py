"""Megatron-Bridge's PEFT API over fused kernels: LoRA, DoRA, canonical LoRA, multi-adapter LoRA,
merging, adapter checkpoints and the Hugging Face PEFT exchange.

Module by module it follows ``megatron.bridge.peft`` (``adapter_wrapper``, ``base``,
``canonical_lora``, ``dora``, ``dora_layers``, ``lora``, ``lora_layers``, ``lora_merge``,
``module_matcher``, ``multi_lora``, ``multi_lora_layers``, ``recompute``, ``utils``,
``walk_utils``), so switching is a change of import.
"""

from bridge.peft.adapter_io import (
    AdapterLoadError,
    adapter_state_dict,
    load_adapter_state_dict,
    load_peft_adapter_checkpoint,
    save_peft_adapter_checkpoint,
)
from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.base import PEFT
from bridge.peft.canonical_lora import CanonicalLoRA, LoRALinearSplitFC1UpGate, LoRALinearSplitQKV
from bridge.peft.dora import DoRA
from bridge.peft.dora_layers import DoRALinear, ParallelLinearDoRAAdapter
from bridge.peft.errors import PEFTConfigError, UnsupportedModuleError, UnsupportedOptionError
from bridge.peft.factory import create_peft, create_peft_hook
from bridge.peft.hf import export_hf_adapter, import_hf_adapter
from bridge.peft.kernel_report import KernelReport, KernelReportRow, kernel_report, kernel_summary
from bridge.peft.lora import LoRA, VLMLoRA, get_lora_plus_config_overrides
from bridge.peft.lora_layers import LinearAdapter, LoRALinear, LoRATopKRouter
from bridge.peft.lora_merge import LoRAMerge, MergeError, merge_and_unload, merge_lora, unmerge_lora
from bridge.peft.module_matcher import ModuleMatcher
from bridge.peft.multi_lora import MultiLoRA
from bridge.peft.multi_lora_layers import MultiLoRALinear
from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter
from bridge.peft.recompute import maybe_enable_recompute_inputs_grad
from bridge.peft.utils import AdapterAttributes, get_adapter_attributes_from_linear, wildcard_match

__all__ = [
    "PEFT",
    "AdapterAttributes",
    "AdapterLoadError",
    "AdapterWrapper",
    "CanonicalLoRA",
    "DoRA",
    "DoRALinear",
    "KernelReport",
    "KernelReportRow",
    "LinearAdapter",
    "LoRA",
    "LoRALinear",
    "LoRALinearSplitFC1UpGate",
    "LoRALinearSplitQKV",
    "LoRAMerge",
    "LoRATopKRouter",
    "MergeError",
    "ModuleMatcher",
    "MultiLoRA",
    "MultiLoRALinear",
    "PEFTConfigError",
    "ParallelLinearAdapter",
    "ParallelLinearDoRAAdapter",
    "UnsupportedModuleError",
    "UnsupportedOptionError",
    "VLMLoRA",
    "adapter_state_dict",
    "create_peft",
    "create_peft_hook",
    "export_hf_adapter",
    "get_adapter_attributes_from_linear",
    "get_lora_plus_config_overrides",
    "import_hf_adapter",
    "kernel_report",
    "kernel_summary",
    "load_adapter_state_dict",
    "load_peft_adapter_checkpoint",
    "maybe_enable_recompute_inputs_grad",
    "merge_and_unload",
    "merge_lora",
    "save_peft_adapter_checkpoint",
    "unmerge_lora",
    "wildcard_match",
]
