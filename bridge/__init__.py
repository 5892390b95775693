"""Fused-kernel PEFT for Megatron-Core: Megatron-Bridge's PEFT API over Triton/CUDA kernels."""

from bridge._version import __version__

__all__ = ["__version__"]
