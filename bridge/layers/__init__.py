"""Megatron-Core-compatible layers that transformer-engine would otherwise provide."""

from bridge.layers.gpt_spec import get_gpt_layer_norm_linear_spec
from bridge.layers.layernorm_linear import LayerNormColumnParallelLinear

__all__ = ["LayerNormColumnParallelLinear", "get_gpt_layer_norm_linear_spec"]
