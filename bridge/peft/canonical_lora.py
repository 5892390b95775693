"""Canonical LoRA (Megatron-Bridge's ``CanonicalLoRA``): separate adapters for q, k, v and for the
up and gate halves of fc1, as Hugging Face models have them.

Megatron's layouts (megatron-core 0.16, checked in ``attention.get_query_key_value_tensors`` and
``mlp.MLP.forward``):

- ``linear_qkv``'s output rows are interleaved per query group: for each of the ``ng`` groups,
  ``[q heads of the group (np/ng · hn rows); k (hn rows); v (hn rows)]``. Under tensor
  parallelism each rank holds ``ng/tp`` whole groups, in the same layout.
- ``linear_fc1`` with a gated linear unit (SwiGLU) outputs ``[gate; up]`` halves: MLP.forward
  chunks the output in two and computes ``act(first) * second``. Under tensor parallelism each
  rank's local output is ``[gate shard; up shard]``.

Selecting only some parts (e.g. only ``linear_q``, or only ``linear_fc1_up``) is supported: a part
without an adapter contributes zero rows. Each part's adapter is a ``ParallelLinearAdapter``
split on N like its share of the base, held in an ``nn.ModuleDict`` under ``adapter_q``,
``adapter_k``, ``adapter_v``, ``adapter_gate``, ``adapter_up`` (Megatron-Bridge's key names).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from bridge.kernels.backend import validate_backend_name
from bridge.peft.adapter_init import check_adapter_hparams, check_lora_dtype
from bridge.peft.adapter_wrapper import AdapterWrapper, _module_sharded_state_dict
from bridge.peft.base import PEFT
from bridge.peft.errors import PEFTConfigError
from bridge.peft.lora_layers import LinearAdapter, LoRALinear, LoRATopKRouter, validate_gemm_strategy
from bridge.peft.module_matcher import ModuleMatcher
from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter
from bridge.peft.tp import tp_group_and_size
from bridge.peft.utils import (
    align_expert_dim_for_tp,
    get_adapter_attributes_from_linear,
    get_effective_lora_dim,
    is_expert_linear,
    is_modelopt_linear,
    is_router,
    is_te_module,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CANONICAL_TARGETS",
    "AdapterDict",
    "CanonicalLoRA",
    "LoRALinearSplitFC1UpGate",
    "LoRALinearSplitQKV",
    "ModuleDict",
    "interleave_qkv",
    "qkv_sizes",
    "split_qkv",
]

CANONICAL_TARGETS = ["linear_q", "linear_k", "linear_v", "linear_proj",
                     "linear_fc1_up", "linear_fc1_gate", "linear_fc2"]
QKV_PARTS = ("linear_q", "linear_k", "linear_v")
FC1_PARTS = ("linear_fc1_gate", "linear_fc1_up")  # megatron's order of the fc1 halves


# ---- layout helpers (rows on dim 0) -------------------------------------------------------------
def qkv_sizes(config) -> tuple[int, int, int]:
    """(num_heads, num_query_groups, head_dim) of a megatron TransformerConfig."""
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    head_dim = config.kv_channels or config.hidden_size // heads
    return heads, groups, head_dim


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows [q; k; v] (q: groups·qpg·hn rows, k, v: groups·hn rows) -> megatron's per-group
    interleaved rows [q_g; k_g; v_g for g in groups]. Trailing dims are kept."""
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(t: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of :func:`interleave_qkv`: megatron's interleaved qkv rows -> (q, k, v)."""
    qpg = heads // groups
    g = t.reshape(groups, (qpg + 2) * head_dim, *t.shape[1:])
    q, k, v = torch.split(g, [qpg * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *t.shape[1:]), k.reshape(-1, *t.shape[1:]),
            v.reshape(-1, *t.shape[1:]))


# ---- layers -----------------------------------------------------------------------------------
class ModuleDict(nn.ModuleDict):
    """The per-part adapters of a split layer (Megatron-Bridge's ``canonical_lora.ModuleDict``):
    an ``nn.ModuleDict`` whose sharded state dict is each adapter's own (TP-sharded) one under
    ``<key>.``; an entry set to None (a part without an adapter) contributes nothing."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        out = {}
        for key, adapter in self.items():
            if adapter is not None:
                out.update(_module_sharded_state_dict(adapter, f"{prefix}{key}.",
                                                      sharded_offsets, metadata))
        return out


AdapterDict = ModuleDict  # this package's earlier name


class _SplitLoRA(AdapterWrapper):
    """Base for wrappers whose adapter is a ModuleDict of per-part adapters (any subset; a
    missing or None part contributes zero rows)."""

    PARTS: tuple[str, ...] = ()

    def __init__(self, to_wrap: nn.Module, adapter: nn.ModuleDict):
        allowed = [self.key(p) for p in self.PARTS]
        present = [k for k, m in adapter.items()] if isinstance(adapter, nn.ModuleDict) else []
        if not isinstance(adapter, nn.ModuleDict) or set(present) - set(allowed) \
                or all(adapter[k] is None for k in present):
            got = present if isinstance(adapter, nn.ModuleDict) else type(adapter).__name__
            raise PEFTConfigError(f"{type(self).__name__} needs a ModuleDict with at least one "
                                  f"adapter, keys among {allowed}; got {got}")
        if not isinstance(adapter, ModuleDict):
            adapter = ModuleDict(dict(adapter.items()))
        super().__init__(to_wrap, adapter)

    @staticmethod
    def key(part: str) -> str:
        """ModuleDict key of a part: 'linear_q' -> 'adapter_q', 'linear_fc1_up' -> 'adapter_up'."""
        return "adapter_" + part.rsplit("_", 1)[-1]

    def part_adapter(self, part: str) -> nn.Module | None:
        """The adapter of ``part`` (e.g. 'linear_q'), or None."""
        key = self.key(part)
        return self.adapter[key] if key in self.adapter else None

    def present_parts(self) -> list[str]:
        return [p for p in self.PARTS if self.part_adapter(p) is not None]

    def _tp(self) -> int:
        return tp_group_and_size(self.part_adapter(self.present_parts()[0]))[1]

    def _combine(self, parts: dict[str, torch.Tensor], dim: int) -> torch.Tensor:
        """Place the parts' rows (dim 0) or features (dim -1) in megatron's layout, zeros for
        the missing ones: each subclass knows its fused layer's."""
        raise NotImplementedError(f"{type(self).__name__} must define _combine")

    def forward(self, x: torch.Tensor, *args, **kwargs):
        linear_output, bias, layernorm_output = self.base_linear_forward(x, *args, **kwargs)
        if not self._adapter_enabled:
            return self.wrap_output(linear_output, bias)
        ln = layernorm_output.contiguous()
        outs = {p: self.adapter_forward(self.part_adapter(p), ln, *args, **kwargs)
                for p in self.present_parts()}
        adapter_output = self._combine(outs, dim=-1).reshape(linear_output.shape)
        return self.wrap_output(linear_output + adapter_output.to(linear_output.dtype), bias)

    def delta_weight(self) -> torch.Tensor:
        """This rank's shard of the whole layer's s·B@A in fp32 (rows in megatron's layout)."""
        return self._combine({p: self.part_adapter(p).delta_weight()
                              for p in self.present_parts()}, dim=0)


class LoRALinearSplitQKV(_SplitLoRA):
    """LoRA on megatron's fused ``linear_qkv`` with separate q, k, v adapters (any subset).

    The head size comes from the base's config (``kv_channels``, else ``hidden_size /
    num_attention_heads``) or, without those, from the outputs and whichever of
    ``num_query_groups`` / ``num_attention_heads`` the config has; the number of (local) query
    groups from the k/v outputs. Only a missing part needs the config's head counts.
    """

    PARTS = QKV_PARTS

    def _head_size(self, outs: dict[str, torch.Tensor], dim: int) -> int:
        config = getattr(self.to_wrap, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        groups = getattr(config, "num_query_groups", None)
        head = getattr(config, "kv_channels", None)
        hidden = getattr(config, "hidden_size", None)
        tp = self._tp()
        if head:
            return head
        if heads and hidden:
            return hidden // heads
        kv = outs.get("linear_k", outs.get("linear_v"))
        if groups and kv is not None:
            return kv.shape[dim] // max(1, groups // tp)
        if heads and "linear_q" in outs:
            return outs["linear_q"].shape[dim] // max(1, heads // tp)
        raise ValueError(f"{type(self).__name__}: cannot infer the head size: the base's config "
                         "has none of kv_channels, hidden_size/num_attention_heads, "
                         "num_query_groups (with a k or v adapter), num_attention_heads (with q)")

    def _combine(self, parts: dict[str, torch.Tensor], dim: int) -> torch.Tensor:
        head = self._head_size(parts, dim)
        config = getattr(self.to_wrap, "config", None)
        tp = self._tp()
        ref = next(iter(parts.values()))
        kv = parts.get("linear_k", parts.get("linear_v"))
        if kv is not None:
            groups = kv.shape[dim] // head
        else:
            heads = getattr(config, "num_attention_heads", None)
            groups = getattr(config, "num_query_groups", None) or heads
            if not groups:
                raise ValueError(f"{type(self).__name__}: without k and v adapters the number "
                                 "of query groups comes from the config (num_query_groups or "
                                 "num_attention_heads), which has neither")
            groups //= tp
        if "linear_q" in parts:
            qpg = parts["linear_q"].shape[dim] // head // groups
        else:
            heads = getattr(config, "num_attention_heads", None)
            if not heads:
                raise ValueError(f"{type(self).__name__}: without a q adapter the number of "
                                 "heads comes from the config's num_attention_heads")
            qpg = heads // tp // groups
        sizes = {"linear_q": qpg * groups * head, "linear_k": groups * head,
                 "linear_v": groups * head}
        full = [parts[p] if p in parts else _zeros_like(ref, dim, sizes[p]) for p in QKV_PARTS]
        if dim == 0:
            return interleave_qkv(*full, groups)
        lead = ref.shape[:-1]
        grouped = [t.reshape(*lead, groups, -1) for t in full]
        return torch.cat(grouped, dim=-1).reshape(*lead, -1)

    def _interleave_qkv(self, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> torch.Tensor:
        """q, k, v features [..., q], [..., k], [..., v] -> megatron's per-group interleaved
        features (Megatron-Bridge's helper name)."""
        return self._combine({"linear_q": query, "linear_k": key, "linear_v": value}, dim=-1)


def _zeros_like(ref: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(ref.shape)
    shape[dim] = size
    return ref.new_zeros(shape)


class LoRALinearSplitFC1UpGate(_SplitLoRA):
    """LoRA on megatron's gated ``linear_fc1`` ([gate; up] halves) with separate adapters."""

    PARTS = FC1_PARTS

    def _combine(self, parts: dict[str, torch.Tensor], dim: int) -> torch.Tensor:
        ref = next(iter(parts.values()))
        return torch.cat([parts[p] if p in parts else torch.zeros_like(ref) for p in FC1_PARTS],
                         dim=dim)


def _fc1_unfused(full_name: str) -> bool:
    """fc1 layers canonical LoRA keeps as one adapter (a vision tower's, a grouped expert's)."""
    return full_name.startswith("vision_model.") or full_name.endswith(".mlp.experts.linear_fc1")


_should_treat_linear_fc1_as_unfused = _fc1_unfused  # Megatron-Bridge's name


def _non_gated(module: nn.Module) -> bool:
    """An fc1 whose config says it has no gated linear unit (its output is not [gate; up])."""
    config = getattr(module, "config", None)
    return config is not None and getattr(config, "gated_linear_unit", None) is False


# ---- the transform ------------------------------------------------------------------------------
@dataclass
class CanonicalLoRA(PEFT, ModuleMatcher):
    """LoRA with Hugging Face's granularity on megatron's fused linears.

    Args:
        target_modules: among ``linear_q, linear_k, linear_v, linear_proj, linear_fc1_up,
            linear_fc1_gate, linear_fc2`` (optionally ``*``-prefixed patterns such as
            ``decoder.layers.0.*.linear_q``); ``linear_qkv`` and ``linear_fc1`` are rejected
            (use plain ``LoRA`` for them). The mapping to the fused layers is derived again
            each time the transform is applied, so changing ``target_modules`` afterwards takes
            effect.
        dim, alpha, dropout, dropout_position, lora_A_init_method, lora_B_init_method,
        lora_dtype: as for ``LoRA``; every part's adapter gets the same rank and scale.
        kernel_backend, kernel_gemm: for the ``linear_proj``/``linear_fc2`` LoRALinears.
    """

    target_modules: list[str] = field(default_factory=lambda: list(CANONICAL_TARGETS))
    dim: int = 32
    alpha: int = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    normalize_moe_lora: bool = False
    share_expert_adapters: bool = True
    lora_dtype: torch.dtype | None = None
    kernel_backend: str = "auto"
    kernel_gemm: str = "auto"

    def __post_init__(self) -> None:
        check_adapter_hparams(self.dim, self.alpha, self.dropout, self.dropout_position,
                              (self.lora_A_init_method, self.lora_B_init_method))
        check_lora_dtype(self.lora_dtype)
        self.kernel_backend = validate_backend_name(self.kernel_backend, what="kernel_backend")
        self.kernel_gemm = validate_gemm_strategy(self.kernel_gemm)
        self._init_target_match_state()  # fail early on a bad target; rebuilt at each apply

    def _init_target_match_state(self) -> None:
        """canonical_mapping (fused-layer pattern -> parts) and the alias bookkeeping (each
        target is matched through its fused layer) from the current ``target_modules``.

        Raises:
            PEFTConfigError: no targets, or a target naming a fused layer itself.
        """
        self._check_names()
        if not self.target_modules:
            raise PEFTConfigError("CanonicalLoRA needs target_modules "
                                  "(exclude_modules is not supported)")
        mapping: dict[str, set] = {}
        aliases = []
        for target in self.target_modules:
            base = target.rsplit(".", 1)[-1]
            if base in ("linear_qkv", "linear_fc1"):
                names = QKV_PARTS if base == "linear_qkv" else FC1_PARTS
                raise PEFTConfigError(
                    f"Canonical LoRA does not support target {target!r}: name its parts "
                    f"({', '.join(names)}) with CanonicalLoRA, or use {base!r} with LoRA()")
            if base in QKV_PARTS:
                key = target[: len(target) - len(base)] + "linear_qkv"
            elif base in FC1_PARTS:
                key = target[: len(target) - len(base)] + "linear_fc1"
            else:
                key = target
            mapping.setdefault(key, set()).add(base)
            aliases.append((target, key))
        self.canonical_mapping = mapping
        self._pattern_to_alias.clear()
        self._alias_to_pattern.clear()
        self._alias_matches.clear()
        for alias, pattern in aliases:
            self.register_target_alias(alias, pattern)

    def _adapter(self, module: nn.Module, full_name: str, out_features: int | None = None):
        is_expert = is_expert_linear(full_name)
        attrs = get_adapter_attributes_from_linear(module, is_expert=is_expert)
        dim = get_effective_lora_dim(module, dim=self.dim, normalize_moe_lora=self.normalize_moe_lora,
                                     is_expert=is_expert)
        dim = align_expert_dim_for_tp(module, dim, normalize_moe_lora=self.normalize_moe_lora,
                                      is_expert=is_expert, input_is_parallel=attrs.input_is_parallel)
        adapter = ParallelLinearAdapter(
            attrs.in_features, out_features or attrs.out_features, dim,
            base_linear_name=full_name, activation="identity",
            column_init_method=self.lora_A_init_method, row_init_method=self.lora_B_init_method,
            input_is_parallel=attrs.input_is_parallel, dropout=self.dropout,
            model_parallel_config=getattr(module, "config", None), alpha=self.alpha,
            dropout_position=self.dropout_position, is_expert=is_expert,
            disable_tensor_parallel_comm=attrs.disable_tensor_parallel_comm,
            disable_sequence_parallel_comm=attrs.disable_sequence_parallel_comm,
            base_linear_is_parallel=attrs.base_linear_is_parallel, params_dtype=self.lora_dtype,
            tp_group=getattr(module, "tp_group", None),
        )
        if out_features is not None:  # one part (gate or up) of fc1: plain rows, no [gate; up]
            adapter.swiglu_output = False
        return adapter

    def wrapper_kinds(self, base: nn.Module, full_name: str, pattern: str) -> tuple[type, ...]:
        """The wrapper transform() makes for ``base`` (for PEFT's second-application check)."""
        parts = self.canonical_mapping.get(pattern, set())
        if isinstance(base, nn.Linear) and not is_modelopt_linear(base) and not is_te_module(base):
            return (LoRALinear,)
        if parts and parts <= set(QKV_PARTS):
            return (LoRALinearSplitQKV,)
        if parts and parts <= set(FC1_PARTS) and not _fc1_unfused(full_name) \
                and not _non_gated(base):
            return (LoRALinearSplitFC1UpGate,)
        return (LoRATopKRouter,) if is_router(base) else (LoRALinear,)

    def wrapper_parts(self, pattern: str) -> set[str] | None:
        parts = set(self.canonical_mapping.get(pattern, set()))
        return parts if parts and (parts <= set(QKV_PARTS) or parts <= set(FC1_PARTS)) else None

    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None):
        """Wrap a matched linear: split q/k/v or up/gate adapters on the fused layers, a
        LoRALinear elsewhere (idempotent). On an fc1 without a gated linear unit, all of fc1 is
        'up': linear_fc1_up gets one LoRALinear over it, linear_fc1_gate is refused."""
        ans = self.match(module, name, prefix)
        if isinstance(module, AdapterWrapper):
            return self.keep_wrapped(module, ans)
        if ans is None:
            return module
        pattern, full_name = ans
        parts = self.canonical_mapping[pattern]
        wrapper = dict(kernel_backend=self.kernel_backend, kernel_gemm=self.kernel_gemm)
        if isinstance(module, nn.Linear) and not is_modelopt_linear(module) \
                and not is_te_module(module):
            adapter = LinearAdapter(module, dim=self.dim, alpha=self.alpha, dropout=self.dropout,
                                    dropout_position=self.dropout_position,
                                    lora_A_init_method=self.lora_A_init_method,
                                    lora_dtype=self.lora_dtype,
                                    lora_B_init_method=self.lora_B_init_method)
            return LoRALinear(module, adapter, **wrapper)
        logger.info("Adding canonical LoRA %s to %s", sorted(parts), full_name)
        if parts <= set(QKV_PARTS):
            if getattr(module, "config", None) is None:
                raise TypeError(f"{full_name}: split q/k/v LoRA needs a megatron linear_qkv "
                                f"(with a config), got {type(module).__name__}")
            heads, groups, head_dim = qkv_sizes(module.config)
            rows = {"linear_q": heads * head_dim, "linear_k": groups * head_dim,
                    "linear_v": groups * head_dim}
            adapters = ModuleDict({_SplitLoRA.key(p): self._adapter(module, full_name, rows[p])
                                   for p in QKV_PARTS if p in parts})
            return LoRALinearSplitQKV(module, adapters)
        if parts <= set(FC1_PARTS) and not _fc1_unfused(full_name) and not _non_gated(module):
            out = get_adapter_attributes_from_linear(module).out_features
            adapters = ModuleDict({_SplitLoRA.key(p): self._adapter(module, full_name, out // 2)
                                   for p in FC1_PARTS if p in parts})
            return LoRALinearSplitFC1UpGate(module, adapters)
        if parts <= set(FC1_PARTS) and "linear_fc1_gate" in parts and _non_gated(module):
            raise PEFTConfigError(
                f"{full_name}: linear_fc1_gate targets the gate half of a gated fc1, but this "
                "MLP has no gated linear unit (config.gated_linear_unit=False): all of fc1 is "
                "'up' there; target linear_fc1_up (one adapter over the whole fc1)")
        adapter = self._adapter(module, full_name)
        if is_router(module):
            return LoRATopKRouter(module, adapter)
        return LoRALinear(module, adapter, **wrapper)
