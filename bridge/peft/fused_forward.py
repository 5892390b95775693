"""The fused forward of a LoRA-wrapped linear: one ``bridge.kernels`` op instead of base + adapter.

``fused_lora_forward`` returns None when the call must take the eager module path; the backend
decision (and the reason for any fallback) comes from ``bridge.kernels.backend``. Tensor
parallelism follows the adapter's layout (see ``parallel_linear_adapter``) with the
communication arranged so that the fused op sees whole low-rank factors:

- column-parallel base (also with a norm in front): x is gathered over the sequence (sequence
  parallel) or copied (backward all-reduce) as the base would; A is all-gathered over r
  (backward reduce-scatter: each rank's dA is a partial sum over its N shard); B stays split on N
  like W; y is this rank's N shard. Without sequence parallelism the norm's weights are copied
  too, so their gradients (partial sums over N) are all-reduced; with it, megatron all-reduces
  them as it does for every sequence-parallel parameter.
- row-parallel base: x is split on K; A is split on K like W; B is all-gathered over N
  (backward reduce-scatter); each rank's y = x_k W_k^T + s (x_k A_k^T) B^T is a partial sum over
  K, reduced (or reduce-scattered with sequence parallelism) once, as the base reduces its output.
"""

from __future__ import annotations

import torch
from torch import nn

from bridge.kernels.backend import BackendChoice, resolve_backend

__all__ = ["base_kind", "fused_constraints", "fused_lora_forward"]


def _megatron_linear_types():
    try:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    except ImportError:
        return None, None
    return ColumnParallelLinear, RowParallelLinear


def base_kind(base: nn.Module) -> tuple[str | None, str]:
    """('norm' | 'column' | 'row' | 'linear', '') for a base the fused path takes, else
    (None, reason)."""
    from bridge.layers import LayerNormColumnParallelLinear
    from bridge.peft.utils import TE_LAYERNORM_COLUMN, is_te_module

    col, row = _megatron_linear_types()
    if isinstance(base, LayerNormColumnParallelLinear):
        return "norm", ""
    if is_te_module(base):
        names = {c.__name__ for c in type(base).__mro__}
        if names & set(TE_LAYERNORM_COLUMN) and all(
            hasattr(base, a) for a in ("layer_norm_weight", "normalization", "eps", "weight")
        ):
            return "norm", ""
        return None, f"transformer-engine {type(base).__name__} base runs its own GEMM"
    if col is not None and isinstance(base, col):
        return "column", ""
    if row is not None and isinstance(base, row):
        return "row", ""
    if isinstance(base, nn.Linear):
        return "linear", ""
    return None, f"unsupported base {type(base).__name__}"


def fused_constraints(wrapper: nn.Module, args: tuple, kwargs: dict) -> list[tuple[bool, str]]:
    """The (ok, reason) checks a LoRA wrapper must pass for the fused path."""
    from bridge.peft.lora_layers import LinearAdapter
    from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter

    base, adapter = wrapper.to_wrap, wrapper.adapter
    kind, why = base_kind(base)
    checks = [
        (kind is not None, why),
        (type(adapter) in (ParallelLinearAdapter, LinearAdapter),
         f"adapter is {type(adapter).__name__}"),
        (getattr(adapter, "activation_name", None) == "identity", "adapter activation is not identity"),
        (not args and not kwargs, "the base linear was called with extra arguments"),
    ]
    config = getattr(base, "config", None)
    if kind in ("norm", "column", "row") and config is not None:
        checks += [
            (not getattr(base, "is_expert", False), "MoE expert linear"),
            (not getattr(config, "tp_comm_overlap", False), "tp_comm_overlap is on"),
            (getattr(config, "fp8", None) is None, "fp8 training"),
            (not getattr(base, "skip_weight_param_allocation", False),
             "base weight is passed at call time"),
        ]
    weight = getattr(base, "weight", None)
    checks.append((isinstance(weight, torch.Tensor) and not weight.requires_grad,
                   "base weight requires grad (the fused path is for a frozen base)"))
    lora_weight = getattr(getattr(adapter, "linear_in", None), "weight", None)
    if lora_weight is not None and lora_weight.dtype != getattr(weight, "dtype", None):
        checks.append((False, "lora_dtype differs from the base weight's dtype"))
    return checks


def _choose(wrapper, x, constraints, kind) -> BackendChoice:
    if kind == "norm":
        from bridge.kernels.norm_lora import norm_lora_backend

        base = wrapper.to_wrap
        return norm_lora_backend(wrapper.kernel_backend, x, base.weight, constraints,
                                 norm_params=(base.layer_norm_weight,
                                              getattr(base, "layer_norm_bias", None)))
    return resolve_backend(wrapper.kernel_backend, "lora_linear", device=x.device, dtype=x.dtype,
                           constraints=constraints)


def fused_lora_forward(wrapper: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict):
    """The wrapper's output through the fused op, or None to take the eager module path."""
    base, adapter = wrapper.to_wrap, wrapper.adapter
    constraints = fused_constraints(wrapper, args, kwargs)
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor):
        constraints.append((x.dtype == weight.dtype and not torch.is_autocast_enabled(x.device.type),
                            f"input is {x.dtype} and the base weight {weight.dtype} (autocast?): "
                            "the fused path runs in one dtype"))
    kind, _ = base_kind(base)
    choice = _choose(wrapper, x, constraints, kind)
    if choice.name == "eager":
        return None
    common = dict(scale=adapter.scale, dropout=adapter.dropout_p,
                  dropout_position=adapter.dropout_position, training=wrapper.training,
                  backend=choice.name)
    a, b = adapter.linear_in.weight, adapter.linear_out.weight
    if kind == "linear":  # plain nn.Linear: bare tensor out
        from bridge.kernels.lora_linear import lora_linear

        wrapper._return_bare_tensor = True
        return lora_linear(x, base.weight, base.bias, a, b, **common)
    wrapper._return_bare_tensor = False
    if kind == "row":
        return _row_parallel(base, adapter, x, a, b, common, wrapper.training)
    return _column_parallel(base, x, a, b, common, norm=kind == "norm")


def _tp(base) -> tuple[object, int]:
    group = getattr(base, "tp_group", None)
    return group, (torch.distributed.get_world_size(group) if group is not None else 1)


def _column_parallel(base, x, a, b, common, *, norm: bool):
    from megatron.core.tensor_parallel import mappings

    group, tp = _tp(base)
    skip = bool(getattr(base, "skip_bias_add", getattr(base, "te_return_bias", False)))
    bias = getattr(base, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.numel() == 0:  # TE keeps an empty bias
        bias = None
    norm_params = (getattr(base, "layer_norm_weight", None), getattr(base, "layer_norm_bias", None))
    if getattr(base, "sequence_parallel", False):
        x = mappings.gather_from_sequence_parallel_region(x, group=group)
    elif tp > 1:
        x = mappings.copy_to_tensor_model_parallel_region(x, group=group)
        if norm:
            norm_params = tuple(
                None if p is None else mappings.copy_to_tensor_model_parallel_region(p, group=group)
                for p in norm_params
            )
    if tp > 1:
        a = mappings.gather_from_sequence_parallel_region(
            a, tensor_parallel_output_grad=True, group=group)
    if norm:
        from bridge.kernels.norm_lora import norm_lora_linear

        y = norm_lora_linear(
            x, norm_params[0], norm_params[1], base.weight, bias, a, b,
            normalization=base.normalization, eps=float(base.eps),
            zero_centered_gamma=bool(getattr(base, "zero_centered_gamma", False)),
            skip_bias_add=skip, **common)
    else:
        from bridge.kernels.lora_linear import lora_linear

        y = lora_linear(x, base.weight, bias, a, b, skip_bias_add=skip, **common)
    if getattr(base, "gather_output", False) and tp > 1:
        y = mappings.gather_from_tensor_model_parallel_region(y, group=group)
    return y, (bias if skip else None)


def _row_parallel(base, adapter, x, a, b, common, training: bool):
    from megatron.core.tensor_parallel import mappings

    from bridge.kernels.lora_linear import lora_linear

    group, tp = _tp(base)
    if not base.input_is_parallel and tp > 1:
        x = mappings.scatter_to_tensor_model_parallel_region(x, group=group)
    if tp > 1:
        b = mappings.gather_from_sequence_parallel_region(
            b, tensor_parallel_output_grad=True, group=group)
    seed = None
    if adapter.dropout_p > 0 and adapter.dropout_position == "pre" and training and tp > 1:
        # x is split on K: each rank drops different features, so each needs its own stream.
        seed = int(torch.randint(0, 2**30, (1,)).item()) + torch.distributed.get_rank(group)
    y = lora_linear(x, base.weight, None, a, b, skip_bias_add=True, seed=seed, **common)
    if base.sequence_parallel:
        y = mappings.reduce_scatter_to_sequence_parallel_region(y, group=group)
    elif tp > 1:
        y = mappings.reduce_from_tensor_model_parallel_region(y, group=group)
    if base.bias is not None and not base.skip_bias_add:
        return y + base.bias, None
    return y, base.bias
