"""``ExpertLoRALinear``: LoRA beside a base whose tensor-parallel communication happens outside it
(MoE expert linears: one per SequentialMLP expert, or a grouped TE linear over every local expert;
shared experts with ``moe_shared_expert_overlap``), with its fused path.

It is a ``LoRALinear`` (same state dict, merge and checks) whose forward keeps the base's parallel
state (``bridge.peft.expert_parallel``) and whose fused path is

- a grouped base (``num_gemms`` weights ``weight{i}``, called with ``m_splits``):
  ``bridge.kernels.grouped_lora_linear`` over the separate expert weights (read in place through
  their addresses), with the adapter's shared, per-expert or shared-outer factors;
- a single-weight base (a SequentialMLP expert's Column/RowParallelLinear, a shared expert):
  ``bridge.kernels.lora_linear`` with the gathered factor;

when the backend resolves to a fused one (``kernel_backend`` / ``BRIDGE_KERNEL_BACKEND``), else
the eager path, with the reason. The decision is taken once per module and key (shapes, dtypes,
backend requests, environment) and kept as an ``ExpertPlan``; ``training_plan()`` returns the
plan a training forward takes, for ``bridge.peft.kernel_report``.

The fused path returns what the base returns (``bridge.peft.fused_forward.call_layout``'s rules):
a bare tensor for a bare-tensor base (``nn.Linear``, TE's own ``Linear`` / ``GroupedLinear``
without ``return_bias``), else ``(y, bias)`` with the bias added in the GEMM or returned beside y
as ``skip_bias_add`` / TE's ``return_bias`` (megatron's ``te_return_bias``) says. A TE base's fp8
state (``fp8_autocast``) is asked at every call, as LoRALinear's fused path does: a plan made
outside fp8_autocast is not reused inside it, nor the other way round.

Only bases whose TP communication is truly elsewhere get this wrapper (``LoRA`` routes them):
expert linears, and shared experts under ``moe_shared_expert_overlap`` (megatron-core 0.16 sets
``parallel_mode = None`` on their TE linears, ``explicit_expert_comm = True`` on its own, keeping
the TP-sharded weights: the adapter's contracted-side factor must be gathered). A base without TP
communication whose weight is whole (TE ``parallel_mode=None`` / megatron's duplicated TELinear)
is a LoRALinear's 'duplicated' fused case.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bridge.kernels.backend import ENV_VAR as BACKEND_ENV
from bridge.kernels.backend import resolve_backend
from bridge.kernels.gemm_strategy import ENV_GEMM, requested_gemm
from bridge.peft.expert_adapters import (
    GroupedExpertLinearAdapter,
    SharedOuterGroupedExpertAdapter,
    explicit_factors,
)
from bridge.peft.lora_layers import LoRALinear
from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter
from bridge.peft.tp import group_size

__all__ = ["ExpertLoRALinear", "ExpertPlan", "is_grouped_linear"]

_ADAPTERS = (ParallelLinearAdapter, GroupedExpertLinearAdapter, SharedOuterGroupedExpertAdapter)
_ENV = (BACKEND_ENV, ENV_GEMM, "TRITON_INTERPRET")


def is_grouped_linear(module: nn.Module) -> bool:
    """A grouped linear (TE's GroupedLinear and megatron's wrappers of it): ``num_gemms`` weights
    ``weight0 .. weight{n-1}``, called as ``module(x, m_splits)``."""
    n = getattr(module, "num_gemms", None)
    return isinstance(n, int) and n > 0 and isinstance(getattr(module, "weight0", None),
                                                       torch.Tensor)


def _weights(base: nn.Module) -> list[torch.Tensor]:
    if is_grouped_linear(base):
        return [getattr(base, f"weight{i}") for i in range(base.num_gemms)]
    weight = getattr(base, "weight", None)
    return [weight] if isinstance(weight, torch.Tensor) else []


@dataclass(frozen=True)
class ExpertPlan:
    """What the wrapper's next calls with the same key do: ``kind`` 'grouped' (grouped op) or
    'expert' (dense op with the gathered factor), None when eager; ``backend`` cuda | triton |
    eager, ``reason`` why eager (or what fell back), ``gemm`` the big GEMMs' strategy."""

    key: tuple
    kind: str | None
    backend: str
    reason: str
    gemm: str
    path: str = "eager"  # fused | eager (kernel_report reads it)
    skip_bias_add: bool = False  # the bias (or per-expert biases) returned beside y, not added
    bare: bool = False  # the base returns a bare tensor
    fp8_probe: Callable[[], bool] | None = None  # TE's "fp8 on now?", re-asked per call
    fp8_on: bool = False  # its answer when this plan was made


def _base_kind(base: nn.Module) -> tuple[str | None, str]:
    """('grouped' | 'expert', '') for a base the fused path takes, else (None, why not)."""
    from bridge.layers import LayerNormColumnParallelLinear
    from bridge.peft.utils import TE_LAYERNORM_COLUMN, _class_names

    if is_grouped_linear(base):
        return "grouped", ""
    if isinstance(base, LayerNormColumnParallelLinear) or _class_names(base) & set(
            TE_LAYERNORM_COLUMN):
        return None, f"{type(base).__name__} base (a norm in front) has no expert fused path"
    if not isinstance(getattr(base, "weight", None), torch.Tensor):
        return None, f"{type(base).__name__} has no single weight tensor"
    return "expert", ""


def expert_constraints(wrapper: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict
                       ) -> tuple[str | None, list[tuple[bool, str]]]:
    """(kind, the (ok, reason) checks the fused path needs)."""
    from bridge.peft.fused_forward import dtype_constraints, quantized_weight, te_constraints
    from bridge.peft.utils import is_te_module

    base, adapter = wrapper.to_wrap, wrapper.adapter
    kind, why = _base_kind(base)
    checks = [(kind is not None, why),
              (type(adapter) in _ADAPTERS, f"adapter is {type(adapter).__name__}"),
              (getattr(adapter, "activation_name", None) == "identity",
               "adapter activation is not identity")]
    if kind == "grouped":
        call_ok = (len(args) == 1 and not kwargs) or (not args and set(kwargs) == {"m_splits"})
        checks.append((call_ok, "the grouped base was called with arguments besides m_splits"))
    else:
        checks += [(not args and not kwargs, "the base linear was called with extra arguments"),
                   (not getattr(base, "gather_output", False),
                    "the base gathers its output (gather_output=True)"),
                   (getattr(base, "input_is_parallel", True),
                    "the base splits its input itself (input_is_parallel=False)")]
    config = getattr(base, "config", None)
    fp8 = getattr(config, "fp8", None)
    checks += [(fp8 is None, f"fp8 training (config.fp8={fp8!r})"),
               (not getattr(config, "fp4", None), "fp4 training"),
               (not getattr(base, "skip_weight_param_allocation", False),
                "base weight is passed at call time")]
    if kind is not None and is_te_module(base):
        checks += te_constraints(base, config)
    weights = _weights(base)
    if kind is None or not weights:
        return None, checks
    quantized = quantized_weight(weights[0])
    lora = getattr(getattr(adapter, "linear_in", None), "weight", None)
    checks += [(not quantized, f"base weight is a quantised {quantized} (fp8 weights)"),
               (not any(w.requires_grad for w in weights),
                "base weight requires grad (the fused path is for a frozen base)"),
               (lora is None or lora.dtype == weights[0].dtype,
                "lora_dtype differs from the base weight's dtype"),
               *dtype_constraints(weights[0], x)]
    return kind, checks


def _call_layout(base: nn.Module) -> dict:
    """What the base returns: ``skip_bias_add`` (bias beside y) and ``bare`` (no tuple)."""
    from bridge.peft.fused_forward import call_layout
    from bridge.peft.utils import is_te_module

    if is_grouped_linear(base):
        wrapped = getattr(base, "te_return_bias", None)  # megatron's wrapper: always a tuple
        returned = bool(getattr(base, "return_bias", False) if wrapped is None else wrapped)
        return dict(skip_bias_add=returned, bare=wrapped is None and not returned)
    if is_te_module(base):
        # TE Linear's return_bias rules; 'column' only selects them (no norm, no duplicated
        # GEMM agreement: the expert path passes its own group)
        layout = call_layout(base, "column", True)
        return dict(skip_bias_add=layout["skip_bias_add"], bare=layout["bare"])
    if isinstance(base, nn.Linear):
        return dict(skip_bias_add=False, bare=True)
    return dict(skip_bias_add=bool(getattr(base, "skip_bias_add", False)), bare=False)


def _choose(wrapper, x, args, kwargs, key) -> ExpertPlan:
    from bridge.peft.fused_forward import te_fp8_probe
    from bridge.peft.utils import is_te_module

    kind, checks = expert_constraints(wrapper, x, args, kwargs)
    probe = te_fp8_probe(wrapper.to_wrap) if is_te_module(wrapper.to_wrap) else None
    fp8 = dict(fp8_probe=probe, fp8_on=bool(probe()) if probe is not None else False)
    gemm = requested_gemm(wrapper.kernel_gemm)
    op = "grouped_lora_linear" if kind == "grouped" else "lora_linear"
    choice = resolve_backend(wrapper.kernel_backend, op, device=x.device, dtype=x.dtype,
                             constraints=checks)
    if choice.name == "eager":
        failed = [why for ok, why in checks if not ok]
        reason = choice.reason if not failed or choice.reason.startswith("requested") else \
            "; ".join(failed)
        return ExpertPlan(key, None, "eager", reason, gemm, **fp8)
    # the grouped op has one GEMM strategy: the low-rank term in the grouped GEMM's accumulator
    return ExpertPlan(key, kind, choice.name, choice.reason,
                      "fused" if kind == "grouped" else gemm, path="fused",
                      **_call_layout(wrapper.to_wrap), **fp8)


def _fp8_changed(plan: ExpertPlan) -> bool:
    return plan.fp8_probe is not None and plan.fp8_probe() != plan.fp8_on


class ExpertLoRALinear(LoRALinear):
    """base(x) + adapter(x) for a base that communicates elsewhere (see the module docstring).

    Args:
        to_wrap: the base (a grouped or single expert linear, or a shared expert with overlap).
        adapter: ParallelLinearAdapter (is_expert / disable_tensor_parallel_comm),
            GroupedExpertLinearAdapter or SharedOuterGroupedExpertAdapter.
        kernel_backend, kernel_gemm: as for LoRALinear.
    """

    _PLAN = "_bridge_expert_plan"

    # ---- base call ------------------------------------------------------------------------------
    def _base(self, x: torch.Tensor, args: tuple, kwargs: dict):
        """(out, bias or a list of per-expert biases or None, the adapter's input)."""
        result = self.to_wrap(x, *args, **kwargs)
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.Tensor) \
                and isinstance(result[1], (list, tuple)):
            self._return_bare_tensor = False  # a grouped base's (out, [bias_i])
            return result[0], list(result[1]), x
        return self.split_base_output(result, x)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not self._adapter_enabled:
            out, bias, _ = self._base(x, args, kwargs)
            return self.wrap_output(out, bias)
        plan = self._plan(x, args, kwargs)
        if plan.backend != "eager":
            return self._fused(x, args, kwargs, plan)
        out, bias, adapter_input = self._base(x, args, kwargs)
        delta = self.adapter_forward(self.adapter, adapter_input.contiguous(), *args, **kwargs)
        delta = delta.reshape(out.shape)
        if delta.dtype == out.dtype:
            return self.wrap_output(out + delta, bias)
        return self.wrap_output(torch.add(out, delta).to(out.dtype), bias)

    # ---- the fused path -------------------------------------------------------------------------
    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.adapter, ParallelLinearAdapter):
            if self.adapter._megatron:
                return explicit_factors(self.adapter)
            return self.adapter.linear_in.weight, self.adapter.linear_out.weight
        return self.adapter.grouped_factors()

    def _fused(self, x, args, kwargs, plan: ExpertPlan):
        base, adapter = self.to_wrap, self.adapter
        a, b = self._factors()
        p = float(adapter.dropout_p) if self.training else 0.0
        post = adapter.dropout_position == "post"
        if plan.kind == "grouped":
            from bridge.kernels.grouped_lora_linear import grouped_lora_linear

            splits = args[0] if args else kwargs["m_splits"]
            biases = [getattr(base, f"bias{i}") for i in range(base.num_gemms)] \
                if getattr(base, "use_bias", False) else None
            y = grouped_lora_linear(
                x, _weights(base), None if plan.skip_bias_add else biases, a, b, splits,
                scale=adapter.scale, dropout=adapter.dropout_p, dropout_position=
                adapter.dropout_position, training=self.training, backend=plan.backend)
            # TE returns every expert's bias (its empty one for bias=False) in the input dtype
            bias = [getattr(base, f"bias{i}").to(x.dtype) for i in range(base.num_gemms)] \
                if plan.skip_bias_add else None
            return self._returned(y, bias, plan)
        from bridge.kernels.lora_linear import lora_linear_fused

        bias = getattr(base, "bias", None)
        bias = bias if isinstance(bias, torch.Tensor) and bias.numel() else None
        group = getattr(adapter, "tp_group", None)
        y = lora_linear_fused(x, base.weight, None if plan.skip_bias_add else bias, a, b,
                              scale=adapter.scale, p=p, post=post, gemm=plan.gemm,
                              gemm_group=group if group_size(group) > 1 else None)
        return self._returned(y, bias if plan.skip_bias_add else None, plan)

    def _returned(self, y: torch.Tensor, bias, plan: ExpertPlan):
        if self._return_bare_tensor is not plan.bare:  # nn.Module.__setattr__ is slow
            self._return_bare_tensor = plan.bare
        return y if plan.bare else (y, bias)

    # ---- the decision, once per key -------------------------------------------------------------
    def _key(self, x: torch.Tensor, has_args: bool, training: bool) -> tuple:
        weights = _weights(self.to_wrap)
        tensors = tuple((w.dtype, w.device, tuple(w.shape), w.requires_grad)
                        for w in (weights[:1] + [p for p in self.adapter.parameters()][:2]))
        return (x.device, x.dtype, x.shape[-1], training, torch.is_autocast_enabled(
            x.device.type), self.kernel_backend, self.kernel_gemm,
            tuple(map(os.environ.get, _ENV)), has_args, len(weights),
            any(w.requires_grad for w in weights), id(self.to_wrap), id(self.adapter), tensors)

    def _plan(self, x: torch.Tensor, args: tuple, kwargs: dict) -> ExpertPlan:
        if torch.compiler.is_compiling():
            return _choose(self, x, args, kwargs, ())
        key = self._key(x, bool(args or kwargs), self.training)
        plan = self.__dict__.get(self._PLAN)
        if plan is None or plan.key != key or _fp8_changed(plan):
            plan = _choose(self, x, args, kwargs, key)
            self.__dict__[self._PLAN] = plan
        return plan

    def training_plan(self) -> tuple[ExpertPlan, str]:
        """(plan, source) of the next training forward, without running anything: the last
        training call's plan ('last forward') when its key still holds, else one made now for a
        representative input ('planned')."""
        weights = _weights(self.to_wrap)
        ref = weights[0] if weights else next(self.adapter.parameters())
        k = ref.shape[-1] if weights else int(getattr(self.to_wrap, "in_features", 1))
        x = torch.empty((1, k), dtype=ref.dtype, device=ref.device)
        grouped = is_grouped_linear(self.to_wrap)
        args = ([1] + [0] * (self.to_wrap.num_gemms - 1),) if grouped else ()
        key = self._key(x, grouped, True)
        old = self.__dict__.get(self._PLAN)
        if old is not None and old.key == key and not _fp8_changed(old):
            return old, "last forward"
        return _choose(self, x, args, {}, key), "planned"

    # ---- merge (bridge.peft.lora_merge calls these) ---------------------------------------------
    def merge_targets(self) -> list[torch.Tensor]:
        """The base weights merged_weight() replaces: [W], or a grouped base's weight{i}."""
        return _weights(self.to_wrap)

    def delta_weight(self) -> torch.Tensor:
        """This rank's shard of the adapter's delta (fp32): [N/t, K/t] for a single-weight base,
        [E, N/t, K/t] per local expert for a grouped one."""
        if not is_grouped_linear(self.to_wrap):
            return super().delta_weight()
        adapter = self.adapter
        if hasattr(adapter, "delta_weights"):
            return adapter.delta_weights()
        delta = adapter.delta_weight()  # one adapter shared by the local experts
        return delta.expand(self.to_wrap.num_gemms, *delta.shape)

    def merged_weight(self) -> torch.Tensor:
        """The base weight shard(s) with the adapter folded in (fp32, detached): [E, N, K]
        stacked for a grouped base."""
        if not is_grouped_linear(self.to_wrap):
            return super().merged_weight()
        from bridge.peft.tp import acc

        w = torch.stack([acc(t) for t in _weights(self.to_wrap)])
        return w + self._checked_delta(w).to(w.dtype)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of merged_weight (up to rounding)."""
        if not is_grouped_linear(self.to_wrap):
            return super().unmerged_weight(merged)
        from bridge.peft.tp import acc

        merged = acc(merged)
        return merged - self._checked_delta(merged).to(merged.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (see LoRALinear); a grouped base has one per expert: use
        merged_weight()."""
        if is_grouped_linear(self.to_wrap):
            raise AttributeError(f"{type(self.to_wrap).__name__} holds {self.to_wrap.num_gemms} "
                                 "expert weights (weight0..): use merged_weight() [E, N, K]")
        return super().weight
