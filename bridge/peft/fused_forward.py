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

import os
from dataclasses import dataclass

import torch
from torch import nn

from bridge.kernels._checks import check_dropout, check_lora_args, check_norm_args
from bridge.kernels.backend import ENV_VAR as BACKEND_ENV
from bridge.kernels.backend import BackendChoice, resolve_backend
from bridge.kernels.gemm_strategy import ENV_GEMM, requested_gemm
from bridge.kernels.lora_linear import lora_linear_fused
from bridge.kernels.norm_lora import norm_lora_linear_fused

__all__ = ["FusedPlan", "base_kind", "forget_fused_plan", "fused_constraints",
           "fused_lora_forward", "fused_plan"]


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


# ---- the decision, once per module and key ------------------------------------------------------
# A model calls each LoRA module four times per layer and micro-batch (forward and backward), and
# the host must stay ahead of the GPU: the decision (constraint checks with formatted reasons,
# base_kind, the backend probes, the argument checks of the op) is taken once per key below and
# kept on the wrapper; a call then compares one tuple and runs. What the key leaves out are base
# attributes set at construction (skip_bias_add, sequence_parallel, gather_output,
# input_is_parallel, the norm settings, the TP group, the fields of its config, which the key
# holds by identity): change those in place and call forget_fused_plan.

_PLAN_ATTR = "_bridge_fused_plan"
_ENV = (BACKEND_ENV, ENV_GEMM, "TRITON_INTERPRET")


@dataclass(frozen=True)
class FusedPlan:
    """What a wrapper's next calls with the same key do: the backend ('eager' = the module path)
    and why, the requested GEMM strategy (after ``BRIDGE_LORA_GEMM``), and the call layout."""

    key: tuple
    kind: str | None  # norm | column | row | linear | None (eager)
    backend: str  # cuda | triton | eager
    reason: str  # why eager (or what fell back), "" when nothing did
    gemm: str  # auto | fused | cublas
    tp: int
    skip_bias_add: bool


def _plan_key(wrapper, base, adapter, x, a, b, has_args: bool) -> tuple:
    weight = getattr(base, "weight", None)
    tensors = tuple((t.dtype, t.device, t.shape, t.requires_grad) if isinstance(t, torch.Tensor)
                    else None for t in (weight, a, b))
    return (x.device, x.dtype, x.shape[-1], wrapper.training,
            torch.is_autocast_enabled(x.device.type), wrapper.kernel_backend,
            getattr(wrapper, "kernel_gemm", "auto"), tuple(map(os.environ.get, _ENV)),
            has_args, id(base), id(adapter), id(getattr(base, "config", None)), tensors)


def _make_plan(wrapper, x, args, kwargs, key) -> FusedPlan:
    base, adapter = wrapper.to_wrap, wrapper.adapter
    constraints = fused_constraints(wrapper, args, kwargs)
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor):
        constraints.append((x.dtype == weight.dtype and not torch.is_autocast_enabled(x.device.type),
                            f"input is {x.dtype} and the base weight {weight.dtype} (autocast?): "
                            "the fused path runs in one dtype"))
    kind, _ = base_kind(base)
    gemm = requested_gemm(getattr(wrapper, "kernel_gemm", "auto"))
    choice = _choose(wrapper, x, constraints, kind)
    if choice.name == "eager":
        return FusedPlan(key, None, "eager", choice.reason, gemm, 1, False)
    a, b = adapter.linear_in.weight, adapter.linear_out.weight
    bias = getattr(base, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) and bias.numel() else None
    tp = _tp(base)[1]
    _check_args(base, kind, x, bias, a, b, tp)
    check_dropout(adapter.dropout_p, adapter.dropout_position)
    skip = bool(getattr(base, "skip_bias_add", getattr(base, "te_return_bias", False)))
    return FusedPlan(key, kind, choice.name, choice.reason, gemm, tp, skip)


def _check_args(base, kind, x, bias, a, b, tp: int) -> None:
    """The op's argument checks, once per plan, on the shapes the op will see after the TP
    communication (the key holds every shape they read): column bases gather A over r, row
    bases B over N (and split x on K when their input is not parallel)."""
    whole = lambda t, dim: t.new_empty((1, 1)).expand(  # noqa: E731  (shape only, no copy)
        *(s * tp if d == dim else s for d, s in enumerate(t.shape)))
    if kind == "row":
        k = base.weight.shape[1]
        k_in = k * tp if tp > 1 and not base.input_is_parallel else k
        if x.shape[-1] != k_in:
            raise ValueError(f"{type(base).__name__}: x has {x.shape[-1]} features, the base "
                             f"takes {k_in} (tensor-parallel size {tp})")
        check_lora_args(x[..., :k], base.weight, None, a, whole(b, 0) if tp > 1 else b)
        return
    check_lora_args(x, base.weight, bias, whole(a, 0) if tp > 1 else a, b)
    if kind == "norm":
        check_norm_args(base.normalization, float(base.eps), base.layer_norm_weight,
                        getattr(base, "layer_norm_bias", None), x.shape[-1])


def fused_plan(wrapper: nn.Module) -> FusedPlan | None:
    """The plan of the wrapper's last eager-mode call (None before the first): for reports."""
    return wrapper.__dict__.get(_PLAN_ATTR)


def forget_fused_plan(wrapper: nn.Module) -> None:
    """Drop the wrapper's plan: the next call decides again (after changing base attributes)."""
    wrapper.__dict__.pop(_PLAN_ATTR, None)


def _factors(adapter) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    a = getattr(getattr(adapter, "linear_in", None), "weight", None)
    return a, getattr(getattr(adapter, "linear_out", None), "weight", None)


def _plan(wrapper, base, adapter, x, a, b, args, kwargs) -> FusedPlan:
    if torch.compiler.is_compiling():  # traced once per graph: nothing to save, keep no state
        return _make_plan(wrapper, x, args, kwargs, ())
    key = _plan_key(wrapper, base, adapter, x, a, b, bool(args or kwargs))
    plan = wrapper.__dict__.get(_PLAN_ATTR)
    if plan is None or plan.key != key:
        plan = _make_plan(wrapper, x, args, kwargs, key)
        wrapper.__dict__[_PLAN_ATTR] = plan  # a plain attribute: no nn.Module bookkeeping
    return plan


def fused_lora_forward(wrapper: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict):
    """The wrapper's output through the fused op, or None to take the eager module path."""
    base, adapter = wrapper.to_wrap, wrapper.adapter
    a, b = _factors(adapter)
    plan = _plan(wrapper, base, adapter, x, a, b, args, kwargs)
    if plan.backend == "eager":
        return None
    p = adapter.dropout_p if wrapper.training else 0.0
    common = dict(scale=adapter.scale, p=float(p), post=adapter.dropout_position == "post",
                  gemm=plan.gemm)
    bare = plan.kind == "linear"  # plain nn.Linear: bare tensor out
    if wrapper._return_bare_tensor is not bare:  # nn.Module.__setattr__ is slow: only on change
        wrapper._return_bare_tensor = bare
    if bare:
        return lora_linear_fused(x, base.weight, base.bias, a, b, **common)
    if plan.kind == "row":
        return _row_parallel(base, adapter, x, a, b, common, plan)
    return _column_parallel(base, x, a, b, common, plan)


def _tp(base) -> tuple[object, int]:
    group = getattr(base, "tp_group", None)
    return group, (torch.distributed.get_world_size(group) if group is not None else 1)


def _column_parallel(base, x, a, b, common, plan: FusedPlan):
    group, tp = getattr(base, "tp_group", None), plan.tp
    norm = plan.kind == "norm"
    bias = getattr(base, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.numel() == 0:  # TE keeps an empty bias
        bias = None
    norm_params = (getattr(base, "layer_norm_weight", None), getattr(base, "layer_norm_bias", None)) \
        if norm else ()
    if tp > 1 or getattr(base, "sequence_parallel", False):
        from megatron.core.tensor_parallel import mappings

        if getattr(base, "sequence_parallel", False):
            x = mappings.gather_from_sequence_parallel_region(x, group=group)
        else:
            x = mappings.copy_to_tensor_model_parallel_region(x, group=group)
            if norm:
                norm_params = tuple(
                    None if t is None else mappings.copy_to_tensor_model_parallel_region(
                        t, group=group) for t in norm_params)
        if tp > 1:
            a = mappings.gather_from_sequence_parallel_region(
                a, tensor_parallel_output_grad=True, group=group)
    gemm_group = group if tp > 1 else None
    y_bias = None if plan.skip_bias_add else bias
    if norm:
        y, _ = norm_lora_linear_fused(
            x, norm_params[0], norm_params[1], base.weight, y_bias, a, b,
            row_backend=plan.backend, rms=base.normalization == "RMSNorm", eps=float(base.eps),
            zero_centered_gamma=bool(getattr(base, "zero_centered_gamma", False)),
            gemm_group=gemm_group, **common)
    else:
        y = lora_linear_fused(x, base.weight, y_bias, a, b, gemm_group=gemm_group, **common)
    if getattr(base, "gather_output", False) and tp > 1:
        from megatron.core.tensor_parallel import mappings

        y = mappings.gather_from_tensor_model_parallel_region(y, group=group)
    return y, (bias if plan.skip_bias_add else None)


def _row_parallel(base, adapter, x, a, b, common, plan: FusedPlan):
    group, tp = getattr(base, "tp_group", None), plan.tp
    seed = None
    if tp > 1:
        from megatron.core.tensor_parallel import mappings

        if not base.input_is_parallel:
            x = mappings.scatter_to_tensor_model_parallel_region(x, group=group)
        b = mappings.gather_from_sequence_parallel_region(
            b, tensor_parallel_output_grad=True, group=group)
        if common["p"] > 0 and not common["post"]:
            # x is split on K: each rank drops different features, so each needs its own stream.
            seed = int(torch.randint(0, 2**30, (1,)).item()) + torch.distributed.get_rank(group)
    y = lora_linear_fused(x, base.weight, None, a, b, seed=seed,
                          gemm_group=group if tp > 1 else None, **common)
    if base.sequence_parallel:
        from megatron.core.tensor_parallel import mappings

        y = mappings.reduce_scatter_to_sequence_parallel_region(y, group=group)
    elif tp > 1:
        from megatron.core.tensor_parallel import mappings

        y = mappings.reduce_from_tensor_model_parallel_region(y, group=group)
    if base.bias is not None and not base.skip_bias_add:
        return y + base.bias, None
    return y, base.bias
