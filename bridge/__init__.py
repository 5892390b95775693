"""Fused-kernel PEFT for Megatron-Core: Megatron-Bridge's PEFT API over Triton/CUDA kernels."""

__version__ = "0.1.0"
