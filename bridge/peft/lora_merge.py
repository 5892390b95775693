"""Merge adapters into their base weights and back: Megatron-Bridge's ``LoRAMerge`` tensor helper
and ours, ``merge_lora`` / ``unmerge_lora`` / ``merge_and_unload``.

Every rank merges its own shard: W_local += s · (B @ A)_local in fp32, cast back to W's dtype.
With tensor parallelism the local shard of B @ A needs one gathered factor:

- column-parallel base (W [N/tp, K]): B is split on N like W, A is split on r, so A is gathered:
  (B @ A)_local = B_local @ A_full;
- row-parallel base (W [N, K/tp]): A is split on K like W, B is split on N, so B is gathered:
  (B @ A)_local = B_full @ A_local.

The merge functions know no adapter type: each wrapper computes its own merged weight
(``merged_weight()``) and its inverse (``unmerged_weight(merged)``): LoRA adds s·B@A, canonical
LoRA its parts' deltas in the fused layer's row layout, DoRA rescales rows by m / ||W + s·B@A||.
``merge_lora`` merges in place and switches the adapter off (the wrapper then computes the base
alone, whose weight now holds the adapter); ``unmerge_lora`` switches it back on;
``merge_and_unload`` returns the model without wrappers.

The merged state lives on the module (``_lora_merged``), not in its state dict: a checkpoint of
a merged model holds merged base weights *and* the adapters, so load it into a model that is
merged too (or save after :func:`merge_and_unload`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.tp import group_size
from bridge.peft.walk_utils import map_modules

__all__ = ["LoRAMerge", "MergeError", "merge_and_unload", "merge_lora", "unmerge_lora"]


class MergeError(RuntimeError):
    """A merge or unmerge that cannot be done (already merged, not merged, unsupported layer)."""


def _gather_dim0(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """All-gather equal dim-0 shards; differentiable (reduce-scatter backward) when ``t`` needs a
    gradient, so an effective weight built from it trains its factors."""
    if size == 1:
        return t
    if torch.is_grad_enabled() and t.requires_grad:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True,
                                                    group=group)
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)


class LoRAMerge:
    """Tensor helper that merges LoRA factors into a base weight shard (Megatron-Bridge's
    ``LoRAMerge``), exact under tensor parallelism (see the module docstring)."""

    @staticmethod
    def delta(linear_out: torch.Tensor, linear_in: torch.Tensor, scale: float, *,
              gather: str | None = None, tp_group=None) -> torch.Tensor:
        """s · B @ A in the accumulation dtype (fp32, fp64 for fp64), differentiable.

        Args:
            linear_out: B [N or N/tp, r]. linear_in: A [r or r/tp, K or K/tp].
            gather: None, 'linear_in' (A split on r: column-parallel base) or 'linear_out'
                (B split on N: row-parallel base), gathered over ``tp_group``.
        """
        size = group_size(tp_group)
        if gather == "linear_in":
            linear_in = _gather_dim0(linear_in, tp_group, size)
        elif gather == "linear_out":
            linear_out = _gather_dim0(linear_out, tp_group, size)
        elif gather is not None:
            raise ValueError(f"gather must be None, 'linear_in' or 'linear_out', got {gather!r}")
        dtype = torch.promote_types(torch.promote_types(linear_out.dtype, linear_in.dtype),
                                    torch.float32)
        return scale * (linear_out.to(dtype) @ linear_in.to(dtype))

    def merge(self, base_weight: torch.Tensor, linear_out: torch.Tensor,
              linear_in: torch.Tensor, alpha: float, dim: int, *, tp_group,
              scale: float | None = None) -> torch.Tensor:
        """W + s · B @ A for this rank's shard of W, in W's dtype (computed in fp32).

        Which factor to gather follows from the shapes: A [r/tp, K] beside W [N/tp, K] is a
        column-parallel layout, B [N/tp, r] beside W [N, K/tp] a row-parallel one.

        Args:
            base_weight: W [N or N/tp, K or K/tp]. linear_out: B. linear_in: A.
            alpha, dim: the scale is alpha / dim unless ``scale`` is given.
            tp_group: the adapter's tensor-parallel group (None: no gather).

        Raises:
            ValueError: the shapes fit no layout (they are named).
        """
        s = alpha / dim if scale is None else scale
        n, k = base_weight.shape
        size = group_size(tp_group)
        (n_out, r_out), (r_in, k_in) = linear_out.shape, linear_in.shape
        if (n_out, k_in, r_in) == (n, k, r_out):
            gather = None
        elif size > 1 and (n_out, k_in, r_in * size) == (n, k, r_out):
            gather = "linear_in"
        elif size > 1 and (n_out * size, k_in, r_in) == (n, k, r_out):
            gather = "linear_out"
        else:
            raise ValueError(
                f"LoRA factors do not fit the base weight shard: W {tuple(base_weight.shape)}, "
                f"linear_out (B) {tuple(linear_out.shape)}, linear_in (A) "
                f"{tuple(linear_in.shape)}, tensor-parallel size {size}")
        delta = self.delta(linear_out, linear_in, s, gather=gather, tp_group=tp_group)
        return (base_weight.to(delta.dtype) + delta).to(base_weight.dtype)


# ---- per-module merge --------------------------------------------------------------------------
def _check_shape(name: str, weight: torch.Tensor, new: torch.Tensor) -> None:
    if weight.shape != new.shape:
        raise MergeError(f"cannot merge {name}: the merged weight has shape {tuple(new.shape)} "
                         f"but the base weight shard has shape {tuple(weight.shape)}")


def _merge_one(module: AdapterWrapper, name: str) -> None:
    if getattr(module, "_lora_merged", False):
        raise MergeError(f"{name or type(module).__name__} is already merged; "
                         "unmerge_lora it first")
    weight = module.to_wrap.weight
    with torch.no_grad():
        try:
            new = module.merged_weight()
        except ValueError as err:  # the wrapper names the shapes that do not fit
            raise MergeError(f"cannot merge {name}: {err}") from err
        _check_shape(name, weight, new)
        weight.copy_(new)
    module._lora_merged = True
    module._enabled_before_merge = module.adapter_enabled
    module.disable_adapter_layers()


def _unmerge_one(module: AdapterWrapper, name: str) -> None:
    if not getattr(module, "_lora_merged", False):
        raise MergeError(f"{name or type(module).__name__} is not merged; nothing to unmerge")
    weight = module.to_wrap.weight
    with torch.no_grad():
        weight.copy_(module.unmerged_weight(weight))
    module._lora_merged = False
    if module.__dict__.pop("_enabled_before_merge", True):
        module.enable_adapter_layers()


def _wrappers(module: nn.Module):
    for name, m in module.named_modules():
        if isinstance(m, AdapterWrapper):
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
            merged weight does not match the weight's shape.
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


def _unwrap(m: AdapterWrapper, name: str = "") -> nn.Module:
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
    """Merge every adapter and return the model without wrappers: each ``AdapterWrapper`` (LoRA
    over any base, plain ``nn.Linear`` included; DoRA; canonical LoRA) is replaced by its base
    holding the merged weight. Layers already merged with :func:`merge_lora` are unwrapped as
    they are. Collective under tensor parallelism.

    Raises:
        MergeError: the model has no adapters, or one is switched off.
    """
    wrappers = list(_wrappers(model))
    if not wrappers:
        raise MergeError(f"no LoRA/DoRA adapters found in {type(model).__name__}")
    _refuse_disabled(wrappers)
    if isinstance(model, AdapterWrapper):
        return _unwrap(model)

    def fn(child: nn.Module, name: str, prefix: str) -> nn.Module:
        if isinstance(child, AdapterWrapper):
            return _unwrap(child, f"{prefix}.{name}" if prefix else name)
        return child

    return map_modules(model, fn)
