"""Merge LoRA (and DoRA, canonical LoRA) adapters into their base weights, and back.

Every rank merges its own shard: W_local += s · (B @ A)_local in fp32, cast back to W's dtype.
With tensor parallelism the local shard of B @ A needs one gathered factor:

- column-parallel base (W [N/tp, K]): B is split on N like W, A is split on r, so A is gathered:
  (B @ A)_local = B_local @ A_full;
- row-parallel base (W [N, K/tp]): A is split on K like W, B is split on N, so B is gathered:
  (B @ A)_local = B_full @ A_local.

``merge_lora`` merges in place and switches the adapter off (the wrapper then computes the base
alone, whose weight now holds the adapter); ``unmerge_lora`` subtracts the same delta (exact up to
W's dtype rounding) and switches it back on. ``merge_and_unload`` returns the model without
wrappers. DoRA merges to W' = m · (W + sBA) / ||W + sBA|| (row norms over the whole, unsplit row);
its unmerge uses the norm remembered at merge time.

The merged state lives on the module (``_lora_merged``), not in its state dict: a checkpoint of
a merged model holds merged base weights *and* the adapters, so load it into a model that is
merged too (or save after :func:`merge_and_unload`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.lora_layers import LinearAdapter
from bridge.peft.walk import map_modules

__all__ = [
    "MergeError",
    "acc",
    "adapter_delta",
    "gather_along_dim0",
    "merge_and_unload",
    "merge_lora",
    "tp_group_and_size",
    "unmerge_lora",
]


class MergeError(RuntimeError):
    """A merge or unmerge that cannot be done (already merged, not merged, unsupported layer)."""


# ---- tensor-parallel helpers (no autograd: merges and DoRA norms are detached) ------------------
def tp_group_and_size(adapter: nn.Module) -> tuple[object | None, int]:
    """The tensor-parallel group of a ParallelLinearAdapter's factors and its size (1 without
    megatron factors or without an initialised process group)."""
    if not getattr(adapter, "_megatron", False) or not dist.is_available() \
            or not dist.is_initialized():
        return None, 1
    group = getattr(adapter.linear_in, "tp_group", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group, dist.get_world_size(group)


def gather_along_dim0(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """All-gather equal shards of ``t`` over ``group`` and concatenate them on dim 0."""
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached in the accumulation dtype: fp32, or fp64 for fp64 tensors."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def adapter_delta(adapter: nn.Module) -> torch.Tensor:
    """This rank's shard of s · B @ A in fp32, detached: [N/tp, K] for a column-parallel base,
    [N, K/tp] for a row-parallel one, [N, K] otherwise."""
    if getattr(adapter, "activation_name", "identity") != "identity":
        raise MergeError(
            f"adapter of {getattr(adapter, 'base_linear_name', '?')!r} has activation "
            f"{adapter.activation_name!r}; only a linear (identity) adapter can be merged"
        )
    a, b = acc(adapter.linear_in.weight), acc(adapter.linear_out.weight)
    group, size = tp_group_and_size(adapter)
    if adapter.input_is_parallel:
        b = gather_along_dim0(b, group, size)
    else:
        a = gather_along_dim0(a, group, size)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return adapter.scale * (b.to(dtype) @ a.to(dtype))


# ---- per-module merge --------------------------------------------------------------------------
def _is_dora(module: nn.Module) -> bool:
    from bridge.peft.dora_layers import DoRALinear

    return isinstance(module, DoRALinear)


def _wrapper_delta(module: AdapterWrapper) -> torch.Tensor:
    """fp32 delta of this rank's base-weight shard for a LoRA-type wrapper."""
    if hasattr(module, "delta_weight"):  # canonical LoRA (split q/k/v, up/gate)
        return module.delta_weight()
    return adapter_delta(module.adapter)


def _check_shape(name: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
    if weight.shape != delta.shape:
        raise MergeError(
            f"cannot merge {name}: the adapter's delta has shape {tuple(delta.shape)} but the base "
            f"weight shard has shape {tuple(weight.shape)}"
        )


def _linear_adapter_delta(m: LinearAdapter) -> torch.Tensor:
    return m.scale * (acc(m.lora_b.weight) @ acc(m.lora_a.weight))


def _base_weight(module: nn.Module) -> torch.Tensor:
    return module.weight if isinstance(module, LinearAdapter) else module.to_wrap.weight


def _merge_one(module: nn.Module, name: str) -> None:
    if getattr(module, "_lora_merged", False):
        raise MergeError(f"{name or type(module).__name__} is already merged; "
                         "unmerge_lora it first")
    weight = _base_weight(module)
    with torch.no_grad():
        if isinstance(module, LinearAdapter):
            new = acc(weight) + _linear_adapter_delta(module).to(acc(weight).dtype)
        elif _is_dora(module):
            merged, norm = module.merged_weight()
            module._dora_merge_norm = norm
            new = merged
        else:
            delta = _wrapper_delta(module)
            _check_shape(name, weight, delta)
            new = acc(weight) + delta
        weight.copy_(new.to(weight.dtype))
    module._lora_merged = True
    module._enabled_before_merge = module.adapter_enabled
    module.disable_adapter_layers()


def _unmerge_one(module: nn.Module, name: str) -> None:
    if not getattr(module, "_lora_merged", False):
        raise MergeError(f"{name or type(module).__name__} is not merged; nothing to unmerge")
    weight = _base_weight(module)
    with torch.no_grad():
        if isinstance(module, LinearAdapter):
            new = acc(weight) - _linear_adapter_delta(module).to(acc(weight).dtype)
        elif _is_dora(module):
            new = module.unmerged_weight(acc(weight), module._dora_merge_norm)
            del module._dora_merge_norm
        else:
            new = acc(weight) - _wrapper_delta(module)
        weight.copy_(new.to(weight.dtype))
    module._lora_merged = False
    if module.__dict__.pop("_enabled_before_merge", True):
        module.enable_adapter_layers()


def _wrappers(module: nn.Module):
    for name, m in module.named_modules():
        if isinstance(m, (AdapterWrapper, LinearAdapter)):
            yield name, m


def _refuse_disabled(wrappers: list) -> None:
    """Merging a switched-off adapter would change what the model computes: refuse, by name."""
    off = [name for name, m in wrappers
           if not getattr(m, "_lora_merged", False) and not getattr(m, "adapter_enabled", True)]
    if off:
        raise MergeError(f"adapters switched off (disable_adapter_layers): {off}; merging them "
                         "would change the model's outputs: enable_adapter_layers() them first")


def merge_lora(module: nn.Module) -> nn.Module:
    """Merge every adapter below (or at) ``module`` into its base weight, in place.

    Each wrapper then runs the base alone. Collective under tensor parallelism: every rank of the
    TP group must call it.

    Raises:
        MergeError: a layer is already merged or its adapter is switched off (named), or its
            delta does not match the weight's shape.
    """
    wrappers = list(_wrappers(module))
    if not wrappers:
        raise MergeError(f"no LoRA/DoRA adapters found in {type(module).__name__}")
    merged = [name for name, m in wrappers if getattr(m, "_lora_merged", False)]
    if merged:
        raise MergeError(f"already merged (unmerge_lora first): {merged}")
    _refuse_disabled(wrappers)
    for name, m in wrappers:
        _merge_one(m, name)
    return module


def unmerge_lora(module: nn.Module) -> nn.Module:
    """Subtract each merged adapter from its base weight again and switch the adapter back on.

    Raises:
        MergeError: a layer below ``module`` is not merged (named).
    """
    wrappers = list(_wrappers(module))
    not_merged = [name for name, m in wrappers if not getattr(m, "_lora_merged", False)]
    if not wrappers or not_merged:
        raise MergeError(f"not merged, nothing to unmerge: {not_merged or type(module).__name__}")
    for name, m in wrappers:
        _unmerge_one(m, name)
    return module


def _plain_linear(m: LinearAdapter) -> nn.Linear:
    if not getattr(m, "_lora_merged", False):
        _merge_one(m, "")
    w = m.weight
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device,
                    dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if m.bias is not None:
            out.bias.copy_(m.bias)
    out.weight.requires_grad_(w.requires_grad)
    if out.bias is not None:
        out.bias.requires_grad_(m.bias.requires_grad)
    return out


def _unwrap(m: nn.Module, name: str = "") -> nn.Module:
    if isinstance(m, LinearAdapter):
        return _plain_linear(m)
    if not getattr(m, "_lora_merged", False):
        _merge_one(m, name)
    base = m.to_wrap
    # LoRA made norm-fused bases return their norm output for the adapter; the bare base must
    # return what its model expects again.
    for attr in ("return_layernorm_output", "return_layernorm_output_gathered"):
        if hasattr(base, attr):
            setattr(base, attr, False)
    return base


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and return the model without wrappers.

    Each ``AdapterWrapper`` (LoRA, DoRA, canonical LoRA) is replaced by its base with the merged
    weight; each ``LinearAdapter`` by a plain ``nn.Linear``. Layers already merged with
    :func:`merge_lora` are unwrapped as they are. Collective under tensor parallelism.

    Raises:
        MergeError: the model has no adapters.
    """
    wrappers = list(_wrappers(model))
    if not wrappers:
        raise MergeError(f"no LoRA/DoRA adapters found in {type(model).__name__}")
    _refuse_disabled(wrappers)
    if isinstance(model, (AdapterWrapper, LinearAdapter)):
        return _unwrap(model)

    def fn(child: nn.Module, name: str, prefix: str) -> nn.Module:
        if isinstance(child, (AdapterWrapper, LinearAdapter)):
            return _unwrap(child, f"{prefix}.{name}" if prefix else name)
        return child

    return map_modules(model, fn)
