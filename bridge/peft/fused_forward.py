"""The fused forward of a LoRA-wrapped linear: one ``bridge.kernels`` op instead of base + adapter.

``fused_lora_forward`` returns None when the call must take the eager module path; the backend
decision (and the reason for any fallback) comes from ``bridge.kernels.backend``. Tensor
parallelism follows the adapter's layout (see ``parallel_linear_adapter``) with the
communication arranged so that the fused op sees whole low-rank factors:

- column-parallel base: x is gathered (sequence parallel) or copied (backward all-reduce) as the
  base would; A is all-gathered over r (backward reduce-scatter: each rank's dA is a partial sum
  over its N shard); B stays split on N like W; y is this rank's N shard.
- row-parallel base: x is split on K; A is split on K like W; B is all-gathered over N
  (backward reduce-scatter); each rank's y = x_k W_k^T + s (x_k A_k^T) B^T is a partial sum over
  K, reduced (or reduce-scattered with sequence parallelism) once, as the base reduces its output.
"""

from __future__ import annotations

import torch
from torch import nn

from bridge.kernels.backend import resolve_backend

__all__ = ["fused_lora_forward", "fused_constraints"]


def _megatron_linear_types():
    try:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    except ImportError:
        return None, None
    return ColumnParallelLinear, RowParallelLinear


def fused_constraints(wrapper: nn.Module, args: tuple, kwargs: dict) -> list[tuple[bool, str]]:
    """The (ok, reason) checks a LoRA wrapper must pass for the fused path."""
    from bridge.layers import LayerNormColumnParallelLinear
    from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter
    from bridge.peft.utils import is_te_module

    base, adapter = wrapper.to_wrap, wrapper.adapter
    col, row = _megatron_linear_types()
    checks = [
        (type(adapter) is ParallelLinearAdapter, f"adapter is {type(adapter).__name__}"),
        (getattr(adapter, "activation_name", None) == "identity", "adapter activation is not identity"),
        (not args and not kwargs, "the base linear was called with extra arguments"),
    ]
    if isinstance(base, LayerNormColumnParallelLinear) or is_te_module(base):
        checks.append((False, f"{type(base).__name__} base takes the norm-fused or eager path"))
    elif col is not None and isinstance(base, (col, row)):
        config = base.config
        checks += [
            (not getattr(base, "is_expert", False), "MoE expert linear"),
            (not getattr(config, "tp_comm_overlap", False), "tp_comm_overlap is on"),
            (getattr(config, "fp8", None) is None, "fp8 training"),
        ]
        if isinstance(base, col):
            checks.append((not getattr(base, "skip_weight_param_allocation", False),
                           "base weight is passed at call time"))
    elif not isinstance(base, nn.Linear):
        checks.append((False, f"unsupported base {type(base).__name__}"))
    weight = getattr(base, "weight", None)
    checks.append((weight is not None and not weight.requires_grad,
                   "base weight requires grad (the fused path is for a frozen base)"))
    return checks


def fused_lora_forward(wrapper: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict):
    """The wrapper's output through the fused op, or None to take the eager module path."""
    from bridge.kernels.lora_linear import lora_linear

    base, adapter = wrapper.to_wrap, wrapper.adapter
    choice = resolve_backend(
        wrapper.kernel_backend, "lora_linear", device=x.device, dtype=x.dtype,
        constraints=fused_constraints(wrapper, args, kwargs),
    )
    if choice.name == "eager":
        return None
    col, row = _megatron_linear_types()
    common = dict(scale=adapter.scale, dropout=adapter.dropout_p,
                  dropout_position=adapter.dropout_position, training=wrapper.training,
                  backend=choice.name)
    a, b = adapter.linear_in.weight, adapter.linear_out.weight
    if col is None or not isinstance(base, (col, row)):  # plain nn.Linear: bare tensor out
        wrapper._return_bare_tensor = True
        return lora_linear(x, base.weight, base.bias, a, b, **common)

    from megatron.core.tensor_parallel import mappings

    wrapper._return_bare_tensor = False
    group = base.tp_group
    tp = torch.distributed.get_world_size(group) if group is not None else 1
    bias = base.bias if base.bias is not None else None
    if isinstance(base, col):
        if base.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, group=group)
        elif tp > 1:
            x = mappings.copy_to_tensor_model_parallel_region(x, group=group)
        if tp > 1:
            a = mappings.gather_from_sequence_parallel_region(
                a, tensor_parallel_output_grad=True, group=group)
        y = lora_linear(x, base.weight, bias, a, b, skip_bias_add=base.skip_bias_add, **common)
        if base.gather_output and tp > 1:
            y = mappings.gather_from_tensor_model_parallel_region(y, group=group)
        return y, (bias if base.skip_bias_add else None)

    # row-parallel base
    if not base.input_is_parallel and tp > 1:
        x = mappings.scatter_to_tensor_model_parallel_region(x, group=group)
    if tp > 1:
        b = mappings.gather_from_sequence_parallel_region(
            b, tensor_parallel_output_grad=True, group=group)
    seed = None
    if adapter.dropout_p > 0 and adapter.dropout_position == "pre" and wrapper.training and tp > 1:
        # x is split on K: each rank drops different features, so each needs its own stream.
        seed = int(torch.randint(0, 2**30, (1,)).item()) + torch.distributed.get_rank(group)
    y = lora_linear(x, base.weight, None, a, b, skip_bias_add=True, seed=seed, **common)
    if base.sequence_parallel:
        y = mappings.reduce_scatter_to_sequence_parallel_region(y, group=group)
    elif tp > 1:
        y = mappings.reduce_from_tensor_model_parallel_region(y, group=group)
    if bias is not None and not base.skip_bias_add:
        return y + bias, None
    return y, bias
