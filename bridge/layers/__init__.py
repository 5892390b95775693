"""Megatron-Core-compatible layers that transformer-engine would otherwise provide."""

from bridge.layers.layernorm_linear import LayerNormColumnParallelLinear

__all__ = ["LayerNormColumnParallelLinear"]
