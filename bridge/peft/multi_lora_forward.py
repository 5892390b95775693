"""The forward of a ``MultiLoRALinear`` (bridge/peft/multi_lora_layers.py): the fused
multi-adapter op where the backend resolves to a fused one, else the module path, with the
decision and its reason kept on the layer (``MultiLoRAPlan``; ``training_plan`` for reports).

Fused path (bridge.kernels.multi_lora_linear: the frozen GEMM over every row, each slot's
low-rank term in its accumulator, scale in fp32), tensor parallelism laid out as the single-LoRA
fused path does (bridge/peft/fused_forward.py), so the op sees whole low-rank factors:

- column base: x gathered over the sequence (SP) or copied (backward all-reduce); the slots' A
  [n, r/tp, K] all-gathered on the rank axis (backward reduce-scatter); B [n, N/tp, r] stays split
  like W; y is this rank's N shard.
- row base: x split on K; A [n, r, K/tp] split like W; B all-gathered on N; y a partial sum over
  K, reduced (reduce-scattered with SP) once, as the base reduces its output. 'pre' dropout on a
  K-split x draws a per-rank stream (seed + TP rank), as the single-LoRA path does.
- duplicated base (plain ``nn.Linear``, TE ``parallel_mode=None``): no communication; under
  sequence parallelism the rows are this rank's shard and the slot counts its window of them.

Module path (anything else: a norm-fused base, TE fp8 or userbuffers, extra call arguments, an
autocast input, the eager backend asked for or the only one available): the base runs as its own
module, then the slots' term in torch (``multi_lora_shrink`` / ``multi_lora_expand``: two grouped
mms, or a loop over the slots) with the slots' own layout (``ParallelLinearAdapter``'s):
column: S = x A_loc^T gathered over r; row: S = x_k A^T all-reduced; B split on N and, for a row
base, its output gathered on N then scattered over the sequence (or one all-to-all). Both paths
draw the same dropout mask for the same seed (kernels/philox.py), so they agree bit for bit on
which elements drop.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, fields

import torch

from bridge.kernels.backend import ENV_VAR as BACKEND_ENV
from bridge.kernels.backend import resolve_backend
from bridge.kernels.gemm_strategy import ENV_GEMM, requested_gemm
from bridge.kernels.lora_linear import apply_dropout_mask
from bridge.kernels.multi_lora_linear import (
    MAX_SLOTS,
    grouped_mm_available,
    multi_lora_expand,
    multi_lora_linear,
    multi_lora_shrink,
)
from bridge.kernels.philox import draw_seed, dropout_keep_mask
from bridge.peft.fused_forward import (
    base_kind,
    call_layout,
    dtype_constraints,
    fused_constraints,
    representative_input,
    te_fp8_probe,
)
from bridge.peft.tp import all2all_hp2sp, base_tp_io, group_size

__all__ = ["MultiLoRAPlan", "forget_multi_lora_plan", "multi_lora_forward", "multi_lora_plan",
           "training_plan"]

_PLAN_ATTR = "_bridge_multi_lora_plan"
_ENV = (BACKEND_ENV, ENV_GEMM, "TRITON_INTERPRET")


@dataclass(frozen=True)
class MultiLoRAPlan:
    """What a MultiLoRA layer's next calls with the same key do.

    Attributes:
        path: 'fused' (the multi-adapter op computes base GEMM and adapters) or 'eager' (the
            base runs as its module, then the slots' term in torch).
        kind: the fused op's layout: column | row | linear | duplicated (None when eager).
        backend: 'triton' | 'eager'. reason: why eager (or what fell back), '' if nothing did.
        gemm: the fused op's requested GEMM strategy (after ``BRIDGE_LORA_GEMM``).
        eager_impl: how the module path computes the slots' term ('grouped mm', or 'slot loop'
            and why); '' on the fused path.
        tp, skip_bias_add, bare, sequence_parallel, scatter_input, gather_output: the layout.
    """

    key: tuple
    path: str
    kind: str | None
    backend: str
    reason: str
    gemm: str
    eager_impl: str = ""
    tp: int = 1
    skip_bias_add: bool = False
    bare: bool = False
    sequence_parallel: bool = False
    scatter_input: bool = False
    gather_output: bool = False
    fp8_probe: object = None
    fp8_on: bool = False


_LAYOUT_FIELDS = {f.name for f in fields(MultiLoRAPlan)}


def _tp(base) -> tuple[object, int]:
    group = getattr(base, "tp_group", None)
    return group, group_size(group)


def _eager_impl(layer, dtype: torch.dtype) -> str:
    slot = layer._slot_modules()[0]
    (r_loc, k), (n, r) = slot.linear_in.weight.shape, slot.linear_out.weight.shape
    for ok, why in (grouped_mm_available(dtype, k, r_loc, r_loc), grouped_mm_available(dtype, r, n, r)):
        if not ok:
            return f"slot loop ({why})"
    return "grouped mm"


def _plan_key(layer, x, has_args: bool, training: bool) -> tuple:
    base, slot = layer.to_wrap, layer._slot_modules()[0]
    weight = getattr(base, "weight", None)
    tensors = tuple((type(t), t.dtype, t.device, t.shape, t.requires_grad)
                    if isinstance(t, torch.Tensor) else None
                    for t in (weight, slot.linear_in.weight, slot.linear_out.weight))
    return (x.device, x.dtype, x.shape[-1], training, torch.is_autocast_enabled(x.device.type),
            layer.kernel_backend, layer.kernel_gemm, tuple(map(os.environ.get, _ENV)), has_args,
            id(base), id(slot), id(getattr(base, "config", None)), layer.n_adapters, tensors)


def _make_plan(layer, x, args, kwargs, key) -> MultiLoRAPlan:
    from bridge.peft.utils import is_te_module

    base, slot = layer.to_wrap, layer._slot_modules()[0]
    constraints = fused_constraints(types.SimpleNamespace(to_wrap=base, adapter=slot), args,
                                    kwargs)
    constraints += dtype_constraints(getattr(base, "weight", None), x)
    kind, _ = base_kind(base)
    constraints += [
        (kind != "norm", "the base fuses a norm in front of its GEMM: no fused multi-adapter "
                         "norm kernel (the base runs, then the slots' term)"),
        (layer.n_adapters <= MAX_SLOTS, f"{layer.n_adapters} slots > {MAX_SLOTS} (kernel slot "
                                        "table)")]
    te = kind is not None and is_te_module(base)
    probe = te_fp8_probe(base) if te else None
    fp8 = dict(fp8_probe=probe, fp8_on=bool(probe()) if probe is not None else False)
    gemm = requested_gemm(layer.kernel_gemm)
    choice = resolve_backend(layer.kernel_backend, "multi_lora_linear", device=x.device,
                             dtype=x.dtype, constraints=constraints)
    if choice.name == "eager":
        failed = [why for ok, why in constraints if not ok]
        reason = choice.reason if not failed or choice.reason.startswith("requested") else \
            "; ".join(failed)
        return MultiLoRAPlan(key, "eager", None, "eager", reason, gemm,
                             _eager_impl(layer, x.dtype), **fp8)
    layout = {k: v for k, v in call_layout(base, kind, te).items() if k in _LAYOUT_FIELDS}
    tp = _tp(base)[1] if kind not in ("duplicated", "linear") else 1
    return MultiLoRAPlan(key, "fused", kind, choice.name, choice.reason, gemm, "", tp, **layout,
                         **fp8)


def _plan(layer, x, args, kwargs) -> MultiLoRAPlan:
    if torch.compiler.is_compiling():
        return _make_plan(layer, x, args, kwargs, ())
    key = _plan_key(layer, x, bool(args or kwargs), layer.training)
    plan = layer.__dict__.get(_PLAN_ATTR)
    if plan is None or plan.key != key or (plan.fp8_probe is not None
                                           and plan.fp8_probe() != plan.fp8_on):
        plan = _make_plan(layer, x, args, kwargs, key)
        layer.__dict__[_PLAN_ATTR] = plan
    return plan


def multi_lora_plan(layer) -> MultiLoRAPlan | None:
    """The plan of the layer's last eager-mode call (None before the first)."""
    return layer.__dict__.get(_PLAN_ATTR)


def forget_multi_lora_plan(layer) -> None:
    """Drop the layer's plan: the next call decides again (after changing base attributes)."""
    layer.__dict__.pop(_PLAN_ATTR, None)


def training_plan(layer) -> tuple[MultiLoRAPlan, str]:
    """(plan, 'last forward' | 'planned') of the layer's next training forward, without running
    anything: its last training call's plan when nothing it depends on changed, else one made
    now for one row of the base weight's dtype and device (not stored)."""
    base = layer.to_wrap
    x = representative_input(base)
    now = _plan_key(layer, x, False, True)
    old = multi_lora_plan(layer)
    # key slots: 3 training, 5-7 backend / strategy / environment, 9- base, slots, tensors
    if old is not None and old.key and old.key[3] and old.key[5:8] == now[5:8] \
            and old.key[9:] == now[9:] and not (old.fp8_probe is not None
                                                and old.fp8_probe() != old.fp8_on):
        return old, "last forward"
    return _make_plan(layer, x, (), {}, now), "planned"


# ---- the two paths ---------------------------------------------------------------------------
def multi_lora_forward(layer, x: torch.Tensor, args: tuple, kwargs: dict):
    """The layer's output (in the base's return style) for input ``x``."""
    plan = _plan(layer, x, args, kwargs)
    if plan.path == "fused":
        return _fused(layer, x, plan)
    return _module_path(layer, x, args, kwargs)


def _dropout(layer) -> tuple[float, bool]:
    slot = layer._slot_modules()[0]
    return (slot.dropout_p if layer.training else 0.0), slot.dropout_position == "post"


def _rank(group) -> int:
    return torch.distributed.get_rank(group) if group_size(group) > 1 else 0


def _gemm_bias(base) -> torch.Tensor | None:
    bias = getattr(base, "bias", None)
    return bias if isinstance(bias, torch.Tensor) and bias.numel() else None


def _gather_axis1(t: torch.Tensor, group) -> torch.Tensor:
    """All-gather [n, d/tp, c] shards on dim 1 (backward: reduce-scatter, i.e. each rank's
    gradient is a partial sum): dim 1 moved in front for megatron's first-dim gather."""
    from megatron.core.tensor_parallel import mappings

    gathered = mappings.gather_from_sequence_parallel_region(
        t.transpose(0, 1).contiguous(), tensor_parallel_output_grad=True, group=group)
    return gathered.transpose(0, 1)


def _op(layer, x, weight, bias, a, b, seed, p, post, plan, window_group=None):
    rows = x.numel() // x.shape[-1]
    _, _, counts_t = layer.slot_rows(rows, x.device, window_group)
    ranks_t, alphas_t, _ = layer.slot_tensors(x.device)
    return multi_lora_linear(x, weight, bias, a, b, counts_t, ranks_t, alphas_t, dropout=p,
                             dropout_position="post" if post else "pre", seed=seed,
                             backend=plan.backend, gemm=plan.gemm, validate=False)


def _fused(layer, x, plan: MultiLoRAPlan):
    base = layer.to_wrap
    a, b, _ = layer.stacked_factors()
    p, post = _dropout(layer)
    seed = draw_seed(x.device) if p > 0 else None
    if layer._return_bare_tensor is not plan.bare:
        layer._return_bare_tensor = plan.bare
    bias = _gemm_bias(base)
    if plan.kind in ("linear", "duplicated"):
        y = _op(layer, x, base.weight, None if plan.skip_bias_add else bias, a, b, seed, p, post,
                plan)
        return y if plan.bare else (y, base.bias if plan.skip_bias_add else None)
    group, tp = _tp(base)
    if tp > 1 or plan.sequence_parallel:
        from megatron.core.tensor_parallel import mappings
    if plan.kind == "row":
        if tp > 1:
            if plan.scatter_input:
                x = mappings.scatter_to_tensor_model_parallel_region(x, group=group)
            b = _gather_axis1(b, group)
            if seed is not None and not post:  # x split on K: each rank drops other features
                seed = seed + _rank(group)
        y = _op(layer, x, base.weight, None, a, b, seed, p, post, plan)
        if plan.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y, group=group)
        elif tp > 1:
            y = mappings.reduce_from_tensor_model_parallel_region(y, group=group)
        if plan.skip_bias_add:
            return y, base.bias
        return (y if bias is None else y + bias), None
    if plan.sequence_parallel:
        x = mappings.gather_from_sequence_parallel_region(x, group=group)
    elif tp > 1:
        x = mappings.copy_to_tensor_model_parallel_region(x, group=group)
    if tp > 1:
        a = _gather_axis1(a, group)
    y = _op(layer, x, base.weight, None if plan.skip_bias_add else bias, a, b, seed, p, post,
            plan)
    if plan.gather_output and tp > 1:
        y = mappings.gather_from_tensor_model_parallel_region(y, group=group)
    return y, (base.bias if plan.skip_bias_add else None)


def _module_path(layer, x, args, kwargs):
    out, bias, ln_out = layer.base_linear_forward(x, *args, **kwargs)
    slot = layer._slot_modules()[0]
    a, b, _ = layer.stacked_factors()
    scatter_in, gather_out, io_group = base_tp_io(layer.to_wrap, slot)
    megatron = bool(getattr(slot, "_megatron", False))
    group = slot.tp_group if megatron else None
    tp = group_size(group)
    column, row = megatron and not slot.input_is_parallel, megatron and slot.input_is_parallel
    sp = megatron and not slot.disable_sequence_parallel_comm
    if scatter_in or gather_out or tp > 1 or sp:
        from megatron.core.tensor_parallel import mappings
    xa = ln_out
    if scatter_in:  # row base with input_is_parallel=False: it splits x on K itself
        xa = mappings.scatter_to_tensor_model_parallel_region(xa, group=io_group)
    if column and sp:
        xa = mappings.gather_from_sequence_parallel_region(xa, group=group)
    elif column and tp > 1:
        xa = mappings.copy_to_tensor_model_parallel_region(xa, group=group)
    x2d = xa.reshape(-1, xa.shape[-1])
    counts, offsets, _ = layer.slot_rows(x2d.shape[0], x2d.device)
    ranks_t, _, scales_t = layer.slot_tensors(x2d.device)
    p, post = _dropout(layer)
    seed = draw_seed(x2d.device) if p > 0 else None
    if seed is not None and not post:
        own = seed + _rank(group) if row and tp > 1 else seed  # as the fused path draws it
        x2d = apply_dropout_mask(x2d, dropout_keep_mask(own, x2d.shape, p, x2d.device), p)
    offset = _rank(group) * a.shape[1] if column and tp > 1 else 0
    s_mat = multi_lora_shrink(x2d, a, offsets, ranks_t, counts=counts, rank_offset=offset)
    if tp > 1:
        s_mat = (mappings.gather_from_tensor_model_parallel_region if column
                 else mappings.reduce_from_tensor_model_parallel_region)(s_mat, group=group)
        # S is whole on every rank and B split on N: its gradient is a sum over the N shards
        s_mat = mappings.copy_to_tensor_model_parallel_region(s_mat, group=group)
    low = multi_lora_expand(s_mat, b, offsets, ranks_t, scales_t, counts=counts)
    low = _row_output(layer, low, seed, p, post, row, sp, tp, group, mappings if tp > 1 else None)
    if gather_out:  # column base with gather_output=True: its output is whole on N
        low = mappings.gather_from_tensor_model_parallel_region(low, group=io_group)
    low = low.reshape(out.shape)
    return layer.wrap_output(torch.add(out, low).to(out.dtype), bias)


def _row_output(layer, low, seed, p, post, row, sp, tp, group, mappings):
    """The slots' term in the base's output layout, 'post' dropout over the [M, N] that the
    fused path masks: the whole N for a row base (before its sequence scatter), else local."""
    m, n_loc = low.shape
    if not (row and tp > 1):
        if seed is not None and post:
            low = apply_dropout_mask(low, dropout_keep_mask(seed, low.shape, p, low.device), p)
        return low
    if sp and layer.use_a2a:  # N split -> sequence split in one all-to-all
        low = all2all_hp2sp(low, group)
        if seed is not None and post:
            whole = dropout_keep_mask(seed, (m, n_loc * tp), p, low.device)
            rows = low.shape[0]
            low = apply_dropout_mask(low, whole[_rank(group) * rows:(_rank(group) + 1) * rows], p)
        return low
    low = mappings.gather_from_tensor_model_parallel_region(low, group=group)
    if seed is not None and post:
        low = apply_dropout_mask(low, dropout_keep_mask(seed, low.shape, p, low.device), p)
    if sp:
        low = mappings.scatter_to_sequence_parallel_region(low, group=group)
    return low
