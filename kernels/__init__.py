"""Fused LoRA kernels (Triton, CUDA) and their eager references. Import name: ``bridge.kernels``."""

from bridge.kernels.backend import BackendUnavailableError, resolve_backend
from bridge.kernels.lora_linear import lora_linear, lora_linear_ref
from bridge.kernels.norm_lora import norm_lora_linear, norm_lora_linear_ref

__all__ = [
    "BackendUnavailableError",
    "lora_linear",
    "lora_linear_ref",
    "norm_lora_linear",
    "norm_lora_linear_ref",
    "resolve_backend",
]
