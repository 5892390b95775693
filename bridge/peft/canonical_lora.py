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

from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.base import PEFT
from bridge.peft.lora_layers import LoRALinear
from bridge.peft.lora_merge import adapter_delta, tp_group_and_size
from bridge.peft.module_matcher import ModuleMatcher
from bridge.peft.parallel_linear_adapter import (
    ParallelLinearAdapter,
    check_adapter_hparams,
    check_lora_dtype,
)
from bridge.peft.utils import get_adapter_attributes_from_linear, is_expert_linear

logger = logging.getLogger(__name__)

__all__ = [
    "CANONICAL_TARGETS",
    "AdapterDict",
    "CanonicalLoRA",
    "LoRALinearSplitFC1UpGate",
    "LoRALinearSplitQKV",
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
class AdapterDict(nn.ModuleDict):
    """The per-part adapters of a split layer; its sharded state dict is each adapter's own
    (TP-sharded) one under ``<key>.``."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        from bridge.peft.adapter_wrapper import _module_sharded_state_dict

        out = {}
        for key, adapter in self.items():
            out.update(_module_sharded_state_dict(adapter, f"{prefix}{key}.", sharded_offsets,
                                                  metadata))
        return out


class _SplitLoRA(AdapterWrapper):
    """Base for wrappers whose adapter is a ModuleDict of per-part ParallelLinearAdapters."""

    PARTS: tuple[str, ...] = ()

    def __init__(self, to_wrap: nn.Module, adapter: nn.ModuleDict, part_sizes: dict[str, int]):
        allowed = [self.key(p) for p in self.PARTS]
        if not isinstance(adapter, nn.ModuleDict) or not len(adapter) \
                or set(adapter) - set(allowed):
            got = list(adapter) if isinstance(adapter, nn.ModuleDict) else type(adapter).__name__
            raise ValueError(f"{type(self).__name__} needs a non-empty ModuleDict with keys among "
                             f"{allowed}; got {got}")
        if not isinstance(adapter, AdapterDict):
            adapter = AdapterDict(adapter)
        super().__init__(to_wrap, adapter)
        self.part_sizes = part_sizes  # full (unsplit) rows of each part

    @staticmethod
    def key(part: str) -> str:
        """ModuleDict key of a part: 'linear_q' -> 'adapter_q', 'linear_fc1_up' -> 'adapter_up'."""
        return "adapter_" + part.rsplit("_", 1)[-1]

    def _tp(self) -> int:
        return tp_group_and_size(next(iter(self.adapter.values())))[1]

    def _parts_out(self, x: torch.Tensor, lead: torch.Size) -> list[torch.Tensor]:
        """Each part's adapter output [..., rows/tp] (zeros for a part without an adapter)."""
        tp = self._tp()
        outs = {p: self.adapter[self.key(p)](x) for p in self.PARTS if self.key(p) in self.adapter}
        ref = next(iter(outs.values()))
        return [outs[p].reshape(*lead, -1) if p in outs
                else ref.new_zeros(*lead, self.part_sizes[p] // tp) for p in self.PARTS]

    def _parts_delta(self) -> list[torch.Tensor]:
        """Each part's fp32 s·B@A shard (zeros for a part without an adapter)."""
        tp = self._tp()
        k = self.to_wrap.weight.shape[1]
        return [adapter_delta(self.adapter[self.key(p)]) if self.key(p) in self.adapter
                else torch.zeros(self.part_sizes[p] // tp, k, device=self.to_wrap.weight.device)
                for p in self.PARTS]

    def _combine(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Place the parts' rows (dim 0) or features (dim -1) in megatron's layout: each
        subclass knows its fused layer's."""
        raise NotImplementedError(f"{type(self).__name__} must define _combine")

    def forward(self, x: torch.Tensor, *args, **kwargs):
        linear_output, bias, layernorm_output = self.base_linear_forward(x, *args, **kwargs)
        if not self._adapter_enabled:
            return self.wrap_output(linear_output, bias)
        lead = linear_output.shape[:-1]
        parts = self._parts_out(layernorm_output.contiguous(), lead)
        adapter_output = self._combine(parts, dim=-1)
        return self.wrap_output(linear_output + adapter_output.to(linear_output.dtype), bias)

    def delta_weight(self) -> torch.Tensor:
        """This rank's shard of the whole layer's s·B@A in fp32 (rows in megatron's layout)."""
        return self._combine(self._parts_delta(), dim=0)


class LoRALinearSplitQKV(_SplitLoRA):
    """LoRA on megatron's fused ``linear_qkv`` with separate q, k, v adapters (any subset)."""

    PARTS = QKV_PARTS

    def __init__(self, to_wrap: nn.Module, adapter: nn.ModuleDict):
        heads, groups, head_dim = qkv_sizes(to_wrap.config)
        super().__init__(to_wrap, adapter, {"linear_q": heads * head_dim,
                                            "linear_k": groups * head_dim,
                                            "linear_v": groups * head_dim})
        self.heads, self.groups, self.head_dim = heads, groups, head_dim
        tp = self._tp()
        if groups % tp:
            raise NotImplementedError(
                f"canonical LoRA on linear_qkv needs num_query_groups ({groups}) divisible by the "
                f"tensor-parallel size ({tp})"
            )

    def _combine(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        local_groups = self.groups // self._tp()
        if dim == 0:
            return interleave_qkv(*parts, local_groups)
        q, k, v = parts
        lead = q.shape[:-1]
        grouped = [t.reshape(*lead, local_groups, -1) for t in (q, k, v)]
        return torch.cat(grouped, dim=-1).reshape(*lead, -1)


class LoRALinearSplitFC1UpGate(_SplitLoRA):
    """LoRA on megatron's gated ``linear_fc1`` ([gate; up] halves) with separate adapters."""

    PARTS = FC1_PARTS

    def __init__(self, to_wrap: nn.Module, adapter: nn.ModuleDict):
        out = get_adapter_attributes_from_linear(to_wrap)[2]
        if out % 2:
            raise ValueError(f"gated linear_fc1 has an odd output size {out}")
        super().__init__(to_wrap, adapter, {"linear_fc1_gate": out // 2, "linear_fc1_up": out // 2})

    def _combine(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat(parts, dim=dim)


# ---- the transform ------------------------------------------------------------------------------
@dataclass
class CanonicalLoRA(PEFT, ModuleMatcher):
    """LoRA with Hugging Face's granularity on megatron's fused linears.

    Args:
        target_modules: among ``linear_q, linear_k, linear_v, linear_proj, linear_fc1_up,
            linear_fc1_gate, linear_fc2`` (optionally ``*``-prefixed patterns such as
            ``decoder.layers.0.*.linear_q``); ``linear_qkv`` and ``linear_fc1`` are rejected
            (use plain ``LoRA`` for them).
        dim, alpha, dropout, dropout_position, lora_A_init_method, lora_B_init_method,
        lora_dtype: as for ``LoRA``; every part's adapter gets the same rank and scale.
        kernel_backend: for the ``linear_proj``/``linear_fc2`` LoRALinears.
    """

    target_modules: list[str] = field(default_factory=lambda: list(CANONICAL_TARGETS))
    dim: int = 32
    alpha: int = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    lora_dtype: torch.dtype | None = None
    kernel_backend: str = "auto"

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise ValueError("CanonicalLoRA needs target_modules "
                             "(exclude_modules is not supported)")
        ModuleMatcher.__post_init__(self)
        PEFT.__post_init__(self)
        check_adapter_hparams(self.dim, self.alpha, self.dropout, self.dropout_position,
                              (self.lora_A_init_method, self.lora_B_init_method))
        check_lora_dtype(self.lora_dtype)
        self.canonical_mapping = {}
        for target in self.target_modules:
            base = target.rsplit(".", 1)[-1]
            if base in ("linear_qkv", "linear_fc1"):
                names = QKV_PARTS if base == "linear_qkv" else FC1_PARTS
                raise ValueError(f"CanonicalLoRA does not take {target!r}: name its parts "
                                 f"({', '.join(names)}) or use LoRA for the fused layer")
            if base in QKV_PARTS:
                key = target[: len(target) - len(base)] + "linear_qkv"
            elif base in FC1_PARTS:
                key = target[: len(target) - len(base)] + "linear_fc1"
            else:
                key = target
            self.canonical_mapping.setdefault(key, set()).add(base)

    def _adapter(self, module: nn.Module, full_name: str, out_features: int | None = None):
        is_expert = is_expert_linear(full_name)
        input_is_parallel, in_features, out, disable_sp_comm, base_is_parallel = (
            get_adapter_attributes_from_linear(module, is_expert=is_expert)
        )
        adapter = ParallelLinearAdapter(
            in_features, out_features or out, self.dim, base_linear_name=full_name,
            activation="identity", column_init_method=self.lora_A_init_method,
            row_init_method=self.lora_B_init_method, input_is_parallel=input_is_parallel,
            dropout=self.dropout, model_parallel_config=getattr(module, "config", None),
            alpha=self.alpha, dropout_position=self.dropout_position, is_expert=is_expert,
            disable_sequence_parallel_comm=disable_sp_comm,
            base_linear_is_parallel=base_is_parallel, params_dtype=self.lora_dtype,
        )
        if out_features is not None:  # one part (gate or up) of fc1: plain rows, no [gate; up]
            adapter.swiglu_output = False
        return adapter

    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None):
        """Wrap a matched linear: split q/k/v or up/gate adapters on the fused layers, a
        LoRALinear elsewhere (idempotent)."""
        ans = self.match(module, name, prefix)
        if isinstance(module, AdapterWrapper):
            return self.keep_wrapped(module, ans)
        if ans is None:
            return module
        pattern, full_name = ans
        self.record_match(pattern)
        parts = self.canonical_mapping[pattern]
        logger.info("Adding canonical LoRA %s to %s", sorted(parts), full_name)
        if parts <= set(QKV_PARTS):
            if getattr(module, "config", None) is None:
                raise TypeError(f"{full_name}: split q/k/v LoRA needs a megatron linear_qkv "
                                f"(with a config), got {type(module).__name__}")
            heads, groups, head_dim = qkv_sizes(module.config)
            rows = {"linear_q": heads * head_dim, "linear_k": groups * head_dim,
                    "linear_v": groups * head_dim}
            adapters = AdapterDict({_SplitLoRA.key(p): self._adapter(module, full_name, rows[p])
                                      for p in QKV_PARTS if p in parts})
            return LoRALinearSplitQKV(module, adapters)
        if parts <= set(FC1_PARTS):
            out = get_adapter_attributes_from_linear(module)[2]
            adapters = AdapterDict({_SplitLoRA.key(p): self._adapter(module, full_name, out // 2)
                                      for p in FC1_PARTS if p in parts})
            return LoRALinearSplitFC1UpGate(module, adapters)
        return LoRALinear(module, self._adapter(module, full_name),
                          kernel_backend=self.kernel_backend)
