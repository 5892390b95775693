"""Fused LoRA kernels (Triton, CUDA) and their eager references. Import name: ``bridge.kernels``.

One op per module: ``lora_linear``, ``norm_lora_linear``, ``grouped_lora_linear`` (MoE experts,
tokens sorted by expert) and ``multi_lora_linear`` (several adapters on one base, rows grouped by
slot), each beside its fp64-checked eager reference ``<op>_ref``."""

from bridge.kernels.backend import BackendUnavailableError, resolve_backend
from bridge.kernels.grouped_lora_linear import grouped_lora_linear, grouped_lora_linear_ref
from bridge.kernels.lora_linear import lora_linear, lora_linear_ref
from bridge.kernels.multi_lora_linear import multi_lora_linear, multi_lora_linear_ref
from bridge.kernels.norm_lora import norm_lora_linear, norm_lora_linear_ref

__all__ = [
    "BackendUnavailableError",
    "grouped_lora_linear",
    "grouped_lora_linear_ref",
    "lora_linear",
    "lora_linear_ref",
    "multi_lora_linear",
    "multi_lora_linear_ref",
    "norm_lora_linear",
    "norm_lora_linear_ref",
    "resolve_backend",
]
