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
``merge_and_unload`` returns the model without wrappers. A wrapper whose base holds several
weights (``merge_targets()``: a grouped expert linear's ``weight0 .. weight{E-1}``) returns them
stacked [E, N, K] from ``merged_weight()``; each is merged, kept and restored on its own
(SequentialMLP's expert linears are ordinary one-weight bases).

Exact unmerge: merging rounds W + delta to W's dtype, which loses low bits of W wherever the
delta is larger than W's last bits (bf16 and fp32 alike), so no arithmetic recovers W from the
merged weight. ``merge_lora`` therefore keeps a copy of each base weight shard it overwrites
(``keep_base='cpu'``, the default: host memory the size of the merged weights; ``'device'``:
on the weight's device, faster, the same memory there) and ``unmerge_lora`` copies it back: the
identity, bit for bit, whatever the adapter did in between (an optimizer step, a load), and the
adapter keeps its new values. With ``keep_base=None`` nothing is kept: ``unmerge_lora`` subtracts
the delta recomputed from the adapter (W within the merged weight's rounding) and refuses when
the adapter changed since the merge (the delta would not be the one added). Either way it refuses
when the merged base weight itself was changed in place (its version counter moved), which
unmerging would discard.

The merged state lives on the module (``_lora_merged``) and in its state dict (``lora_merged``,
see ``AdapterWrapper``): a merged state dict loaded into an unmerged model is unmerged on load,
and loads into merged layers are refused, so the adapter is never counted twice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bridge.peft.adapter_wrapper import AdapterWrapper, release_base
from bridge.peft.errors import MergeError
from bridge.peft.tp import group_size
from bridge.peft.walk_utils import map_modules

__all__ = ["LoRAMerge", "MergeError", "merge_and_unload", "merge_lora", "unmerge_lora"]


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
KEEP_BASE = ("cpu", "device", None)
# what a merge remembers on the wrapper (plain attributes: never in its state dict)
_MERGE_STATE = ("_merge_kept_base", "_merge_fingerprint", "_merge_weight_version",
                "_dora_merge_norm", "_enabled_before_merge")


def _check_shape(name: str, weight: torch.Tensor, new: torch.Tensor) -> None:
    if weight.shape != new.shape:
        raise MergeError(f"cannot merge {name}: the merged weight has shape {tuple(new.shape)} "
                         f"but the base weight shard has shape {tuple(weight.shape)}")


def _fingerprint(module: AdapterWrapper) -> tuple[dict[str, torch.Tensor], tuple]:
    """A copy of what the adapter's delta is computed from: its tensors (low rank: cheap) and
    the scales of its adapter modules."""
    tensors = {k: v.detach().clone() for k, v in module.adapter.state_dict(keep_vars=True).items()
               if isinstance(v, torch.Tensor)}
    scales = tuple((n, getattr(m, "scale", None)) for n, m in module.adapter.named_modules()
                   if hasattr(m, "scale"))
    return tensors, scales


def _changed(module: AdapterWrapper, fingerprint) -> bool:
    tensors, scales = _fingerprint(module)
    old_tensors, old_scales = fingerprint
    return scales != old_scales or tensors.keys() != old_tensors.keys() or any(
        not torch.equal(tensors[k], old_tensors[k]) for k in tensors)


def _targets(module: AdapterWrapper) -> list[torch.Tensor]:
    """The base weights a merge overwrites: the wrapper's ``merge_targets()`` (a grouped expert
    base's ``weight0 .. weight{E-1}``), else the base's one weight."""
    return list(module.merge_targets())


def _per_target(name: str, new: torch.Tensor, targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """``new`` (one weight, or [E, ...] stacked for E targets) as one tensor per target."""
    if len(targets) == 1 and new.shape == targets[0].shape:
        return [new]
    if len(targets) > 1 and new.dim() == targets[0].dim() + 1 and new.shape[0] == len(targets):
        parts = list(new.unbind(0))
        for weight, part in zip(targets, parts, strict=True):
            _check_shape(name, weight, part)
        return parts
    raise MergeError(f"cannot merge {name}: the merged weight has shape {tuple(new.shape)} but "
                     f"the base holds {len(targets)} weight(s) of shape "
                     f"{tuple(targets[0].shape)}")


def _merge_one(module: AdapterWrapper, name: str, *, keep_base: str | None = "cpu",
               remember: bool = True) -> None:
    if getattr(module, "_lora_merged", False):
        raise MergeError(f"{name or type(module).__name__} is already merged; "
                         "unmerge_lora it first")
    targets = _targets(module)
    with torch.no_grad():
        try:
            new = module.merged_weight()
        except ValueError as err:  # the wrapper names the shapes that do not fit
            raise MergeError(f"cannot merge {name}: {err}") from err
        parts = _per_target(name, new, targets)
        kept = None
        if remember and keep_base == "cpu":
            kept = [w.detach().to("cpu", copy=True) for w in targets]
        elif remember and keep_base == "device":
            kept = [w.detach().clone() for w in targets]
        for weight, part in zip(targets, parts, strict=True):
            weight.copy_(part)
    state = module.__dict__
    if kept is not None:
        # one tensor for a one-weight base; a grouped base's list, one per expert weight
        state["_merge_kept_base"] = kept[0] if len(kept) == 1 else kept
        state.pop("_dora_merge_norm", None)  # the kept base makes DoRA's inverse unnecessary
    elif remember:
        state["_merge_fingerprint"] = _fingerprint(module)
    state["_merge_weight_version"] = [w._version for w in targets]
    module._lora_merged = True
    module._enabled_before_merge = module.adapter_enabled
    module.disable_adapter_layers()


def _unmerge_problem(module: AdapterWrapper, name: str) -> str | None:
    """Why unmerging ``module`` now would lose data (None: it is safe)."""
    state = module.__dict__
    versions = state.get("_merge_weight_version")
    if versions is not None and [w._version for w in _targets(module)] != versions:
        return (f"{name}: its merged base weight was changed in place after merge_lora; "
                "unmerging would discard that change (merge_and_unload keeps the weights as "
                "they are)")
    fingerprint = state.get("_merge_fingerprint")
    if state.get("_merge_kept_base") is None and fingerprint is not None \
            and _changed(module, fingerprint):
        return (f"{name}: its adapter changed since merge_lora (an optimizer step, a load?), "
                "and merge_lora(keep_base=None) kept no copy of the base: subtracting the new "
                "delta would corrupt the base weight. Restore the adapter's values from the "
                "merge, or merge with keep_base='cpu' (the default) to unmerge exactly")
    return None


def _unmerge_one(module: AdapterWrapper, name: str) -> None:
    targets = _targets(module)
    kept = module.__dict__.get("_merge_kept_base")
    with torch.no_grad():
        if kept is not None:
            for weight, old in zip(targets, kept if isinstance(kept, list) else [kept],
                                   strict=True):
                weight.copy_(old)
        else:
            merged = targets[0] if len(targets) == 1 else torch.stack(targets)
            parts = _per_target(name, module.unmerged_weight(merged), targets)
            for weight, part in zip(targets, parts, strict=True):
                weight.copy_(part)
    enabled = module.__dict__.get("_enabled_before_merge", True)
    for attr in _MERGE_STATE:
        module.__dict__.pop(attr, None)
    module._lora_merged = False
    if enabled:
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


def merge_lora(module: nn.Module, *, keep_base: str | None = "cpu") -> nn.Module:
    """Merge every adapter below (or at) ``module`` into its base weight, in place.

    Each wrapper then runs the base alone. Collective under tensor parallelism: every rank of the
    TP group must call it.

    Args:
        keep_base: where to keep a copy of each base weight shard for an exact
            :func:`unmerge_lora`: 'cpu' (default; host memory the size of the merged weights),
            'device' (beside the weight), or None (no copy: unmerge recomputes the delta, within
            rounding, and refuses once the adapter changed).

    Raises:
        MergeError: a layer is already merged or its adapter is switched off (named), or its
            merged weight does not match the weight's shape.
        ValueError: an unknown ``keep_base``.
    """
    if keep_base not in KEEP_BASE:
        raise ValueError(f"keep_base must be 'cpu', 'device' or None, got {keep_base!r}")
    wrappers = list(_wrappers(module))
    if not wrappers:
        raise MergeError(f"no LoRA/DoRA adapters found in {type(module).__name__}")
    merged = [name for name, m in wrappers if getattr(m, "_lora_merged", False)]
    if merged:
        raise MergeError(f"already merged (unmerge_lora first): {merged}")
    _refuse_disabled(wrappers)
    for name, m in wrappers:
        _merge_one(m, name, keep_base=keep_base)
    return module


def unmerge_lora(module: nn.Module) -> nn.Module:
    """Restore each merged layer's base weight and switch its adapter back on: the base
    weights merge_lora kept, bit for bit (or, after ``keep_base=None``, the merged weight less
    the recomputed delta). Every layer is checked before any is changed.

    Raises:
        MergeError: a layer below ``module`` is not merged, or unmerging it would lose data
            (its merged base weight was changed in place; its adapter changed and no base was
            kept); each is named.
    """
    wrappers = list(_wrappers(module))
    not_merged = [name for name, m in wrappers if not getattr(m, "_lora_merged", False)]
    if not wrappers or not_merged:
        raise MergeError(f"not merged, nothing to unmerge: {not_merged or type(module).__name__}")
    problems = [p for p in (_unmerge_problem(m, name or type(m).__name__) for name, m in wrappers)
                if p is not None]
    if problems:
        raise MergeError("cannot unmerge: " + " | ".join(problems))
    for name, m in wrappers:
        _unmerge_one(m, name)
    return module


def _unwrap(m: AdapterWrapper, name: str = "") -> nn.Module:
    if not getattr(m, "_lora_merged", False):
        _merge_one(m, name, keep_base=None, remember=False)
    for attr in _MERGE_STATE:  # the wrapper goes: nothing to unmerge any more
        m.__dict__.pop(attr, None)
    # LoRA made norm-fused bases return their norm output for the adapter; the bare base must
    # return what its model expects again.
    return release_base(m)


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
