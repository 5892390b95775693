"""Multi-adapter LoRA on grouped MoE expert linears (Megatron-Bridge's
``MultiLoRAGroupedExpertLinear``, ``ExpertSlotRouting``, ``install_moe_slot_routing``; imported
from bridge/peft/multi_lora_layers.py, upstream's module).

Inside the experts the rows are the token dispatcher's expert-major permutation of tokens (from
every expert-parallel rank), not the micro-batch's slot-major order, so the tokens per slot alone
cannot segment them. A forward pre-hook on each MoE layer's ``experts`` module carries a per-token
slot id through the dispatcher's own recorded permutation (local permute, expert-parallel
all-to-all, local-expert sort) and publishes the resulting (slot, local expert) segmentation to
the layer's wrapped ``linear_fc1`` / ``linear_fc2``, which share it.

Each slot is a ``GroupedExpertLinearAdapter`` (bridge/peft/expert_adapters.py, upstream's
choice too): one low-rank pair per local expert, A [E, r, K] and B [E, N, r], checkpointed with
the global expert axis sharded over expert parallelism. The base grouped GEMM runs as its module
(megatron's ``TEGroupedMLP`` linears; the fused multi-adapter op has one frozen weight, not one
per expert); the slots' term runs eagerly as n·E (slot, expert) groups through
``multi_lora_shrink`` / ``multi_lora_expand`` (two grouped mms, or a loop), scale in fp32. Tested
against megatron-core's ``MoEAlltoAllTokenDispatcher`` and ``TEGroupedMLP`` over
tests/te_standins.py's grouped linears on the CPU.

Refused as upstream refuses them (each would mis-route tokens silently): expert tensor
parallelism, fp8/fp4 experts, a dispatcher other than ``alltoall``, ``moe_permute_fusion``,
``moe_pad_expert_input_to_capacity``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bridge.kernels.lora_linear import apply_dropout_mask
from bridge.kernels.multi_lora_linear import multi_lora_expand, multi_lora_shrink
from bridge.kernels.philox import draw_seed, dropout_keep_mask
from bridge.peft.adapter_init import get_init_fn
from bridge.peft.errors import UnsupportedModuleError, UnsupportedOptionError
from bridge.peft.expert_adapters import GroupedExpertLinearAdapter
from bridge.peft.multi_lora_layers import MultiLoRALinear, _chunks, _iter_multi_lora_modules
from bridge.peft.multi_lora_slots import SlotTokens
from bridge.peft.utils import get_adapter_attributes_from_linear

__all__ = ["ExpertSlotRouting", "MultiLoRAGroupedExpertLinear", "install_moe_slot_routing"]


@dataclass
class ExpertSlotRouting:
    """One MoE layer forward's map from dispatched expert rows to (slot, local expert) groups,
    shared by that layer's ``linear_fc1`` and ``linear_fc2`` (same rows, same order).

    Attributes:
        sort_idx: permutation ordering the dispatched rows by (slot, local expert), slot-major.
        inverse_idx: its inverse (back to the base layer's order).
        group_offsets: inclusive cumsum of the n_adapters * E group sizes (group s * E + e).
        slot_token_counts: rows per slot. num_tokens: rows the routing was built for.
        offsets: int32 [n * E + 1], group_offsets with a leading 0 (what the eager ops take).
    """

    sort_idx: torch.Tensor
    inverse_idx: torch.Tensor
    group_offsets: torch.Tensor
    slot_token_counts: torch.Tensor
    num_tokens: int
    offsets: torch.Tensor | None = None


def _refuse(option: str, why: str, name: str) -> None:
    raise UnsupportedOptionError(f"Multi-LoRA on MoE experts ({name}): {option} is not supported: "
                                 f"{why}")


class MultiLoRAGroupedExpertLinear(MultiLoRALinear):
    """A grouped MoE expert linear (``mlp.experts.linear_fc1/2`` of ``TEGroupedMLP``) with
    ``n_adapters`` slots, each one LoRA pair per local expert. Rows are segmented per forward by
    the ``ExpertSlotRouting`` that ``install_moe_slot_routing``'s hook publishes.

    Raises:
        UnsupportedModuleError: the base has no megatron config.
        UnsupportedOptionError: expert tensor parallelism, fp8/fp4, a dispatcher other than
            'alltoall', moe_permute_fusion, moe_pad_expert_input_to_capacity (each would
            mis-route the rows; upstream refuses them too).
    """

    _expert_rng = True

    def __init__(self, to_wrap: nn.Module, n_adapters: int, dim: int, alpha: float,
                 full_name: str, num_local_experts: int, column_init_method: str = "xavier",
                 row_init_method: str = "zero", dropout: float = 0.0,
                 dropout_position: str = "pre") -> None:
        nn.Module.__init__(self)
        config = getattr(to_wrap, "config", None)
        if config is None:
            raise UnsupportedModuleError(
                f"{full_name}: {type(to_wrap).__name__} has no megatron config; multi-LoRA on "
                "experts reads its MoE dispatch settings from it")
        self._check_config(config, full_name)
        self.to_wrap = to_wrap
        self._adapter_enabled = True
        self._return_bare_tensor = False
        self.n_adapters, self.max_rank, self.base_linear_name = n_adapters, dim, full_name
        self.num_local_experts = num_local_experts
        self._column_init_method, self._row_init_method = column_init_method, row_init_method
        self.kernel_backend, self.kernel_gemm = "eager", "auto"
        attrs = get_adapter_attributes_from_linear(to_wrap, is_expert=True)
        self.input_is_parallel = attrs.input_is_parallel
        # expert TP is off: the dispatched rows are whole; the adapter communicates nothing
        self.disable_sequence_parallel_comm, self.use_a2a = True, False
        self.base_linear_is_parallel = attrs.base_linear_is_parallel
        weight = next(to_wrap.parameters())
        self.adapters = nn.ModuleList([
            GroupedExpertLinearAdapter(
                attrs.in_features, attrs.out_features, dim, num_local_experts=num_local_experts,
                base_linear_name=full_name, activation="identity",
                column_init_method=column_init_method, row_init_method=row_init_method,
                input_is_parallel=attrs.input_is_parallel, dropout=dropout,
                model_parallel_config=config, alpha=alpha, dropout_position=dropout_position,
                base_linear_is_parallel=attrs.base_linear_is_parallel,
                params_device=weight.device, params_dtype=weight.dtype)
            for _ in range(n_adapters)])
        self.expert_slot_routing: ExpertSlotRouting | None = None
        self._init_slot_state(dim, weight)
        self._register_load_state_dict_pre_hook(self._remap_base_keys)

    @staticmethod
    def _check_config(config, name: str) -> None:
        from megatron.core import parallel_state

        # the larger of megatron's group and the config (which defaults it to the TP size)
        etp = getattr(config, "expert_tensor_parallel_size", 1) or 1
        if parallel_state.model_parallel_is_initialized():
            etp = max(etp, parallel_state.get_expert_tensor_parallel_world_size() or 1)
        if etp > 1:
            _refuse(f"expert_tensor_parallel_size={etp}", "expert TP would shard the slots' rank "
                    "axis and need collectives between the two GEMMs; use 1", name)
        if getattr(config, "fp8", None) or getattr(config, "fp4", None):
            _refuse("fp8/fp4 experts", "the quantisation padding changes the dispatched row "
                    "order the slot routing is built for", name)
        dispatcher = getattr(config, "moe_token_dispatcher_type", None)
        if dispatcher != "alltoall":
            _refuse(f"moe_token_dispatcher_type={dispatcher!r}", "the slot routing replays the "
                    "'alltoall' dispatcher's permutation; set moe_token_dispatcher_type="
                    "'alltoall'", name)
        if getattr(config, "moe_permute_fusion", False):
            _refuse("moe_permute_fusion=True", "the fused permute records a row_id_map, not a "
                    "token gather index the slot ids can follow; set it False", name)
        if getattr(config, "moe_pad_expert_input_to_capacity", False):
            _refuse("moe_pad_expert_input_to_capacity=True", "the drop-and-pad dispatch has no "
                    "slot routing", name)

    def _rank_shard(self, idx: int) -> tuple[int, int]:
        return 0, self.max_rank  # expert TP is refused: the rank axis is whole

    def _apply_rank_mask(self, idx: int) -> None:
        rank = self._slot_rank[idx]
        if rank >= self.max_rank:
            return
        adapter = self._slot_modules()[idx]
        with torch.no_grad():
            adapter.linear_in.weight[:, rank:, :].zero_()
            adapter.linear_out.weight[..., rank:].zero_()

    def reset_adapter(self, idx: int) -> None:
        """Re-initialise slot ``idx`` expert by expert (each [rows, cols] matrix drawn whole in
        fp32, as the adapter's construction does), through megatron's expert RNG tracker."""
        from bridge.peft.multi_lora_slots import _rng_fork

        self._check_idx(idx)
        adapter = self._slot_modules()[idx]
        inits = (get_init_fn(self._column_init_method), get_init_fn(self._row_init_method))
        with torch.no_grad(), _rng_fork(True):
            for weight, init in zip((adapter.linear_in.weight, adapter.linear_out.weight), inits,
                                    strict=True):
                for e in range(weight.shape[0]):
                    full = torch.empty(weight.shape[1:], dtype=torch.float32)
                    init(full)
                    weight[e].copy_(full.to(device=weight.device, dtype=weight.dtype))

    def training_plan(self):
        """(plan, 'planned'): always the module path (the base's grouped GEMM runs as its
        module, then the (slot, expert) groups' term in torch)."""
        from bridge.kernels.multi_lora_linear import grouped_mm_available
        from bridge.peft.multi_lora_forward import MultiLoRAPlan

        slot = self._slot_modules()[0]
        dtype, k, n, r = slot.linear_in.weight.dtype, slot.in_features, slot.out_features, \
            self.max_rank
        impl = "grouped mm"
        for ok, why in (grouped_mm_available(dtype, k, r, r), grouped_mm_available(dtype, r, n, r)):
            if not ok:
                impl = f"slot loop ({why})"
                break
        return MultiLoRAPlan((), "eager", None, "eager",
                             "grouped expert base: its grouped GEMM runs as a module, then the "
                             "(slot, expert) groups' term", "auto", impl), "planned"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        out, bias, ln_out = self.base_linear_forward(x, *args, **kwargs)
        if not self._adapter_enabled:
            return self.wrap_output(out, bias)
        routing = self.expert_slot_routing
        if routing is None:
            raise RuntimeError(
                f"{self.base_linear_name}: no expert slot routing for this forward; "
                "install_moe_slot_routing(model) must run after MultiLoRA is applied (MultiLoRA's "
                "__call__ does), and set_tokens_per_adapter_slot(model, counts) before every "
                "forward")
        slots = self._slot_modules()
        x2d = ln_out.reshape(-1, ln_out.shape[-1])
        if routing.num_tokens == 0:
            # keep every slot in the graph (megatron's grad hooks expect each parameter)
            zero = sum(a.linear_in.weight.sum() + a.linear_out.weight.sum() for a in slots) * 0.0
            return self.wrap_output(out + zero.to(out.dtype), bias)
        if x2d.shape[0] != routing.num_tokens:
            raise RuntimeError(
                f"{self.base_linear_name}: the base received {x2d.shape[0]} rows but the slot "
                f"routing was built for {routing.num_tokens}; the grouped linear must not pad or "
                "reorder its input between dispatch and the expert GEMMs")
        a, b, _ = self.stacked_factors()
        groups = self.n_adapters * self.num_local_experts
        a = a.reshape(groups, *a.shape[2:])
        b = b.reshape(groups, *b.shape[2:])
        ranks, _, scales = self.slot_tensors(x2d.device)
        ranks = ranks.repeat_interleave(self.num_local_experts)
        scales = scales.repeat_interleave(self.num_local_experts)
        p = float(slots[0].dropout_p) if self.training else 0.0
        post = slots[0].dropout_position == "post"
        seed = draw_seed(x2d.device) if p > 0 else None
        if seed is not None and not post:  # the mask follows the dispatched rows' order
            x2d = apply_dropout_mask(x2d, dropout_keep_mask(seed, x2d.shape, p, x2d.device), p)
        xs = x2d.index_select(0, routing.sort_idx)
        s_mat = multi_lora_shrink(xs, a, routing.offsets, ranks)
        low = multi_lora_expand(s_mat, b, routing.offsets, ranks, scales)
        low = low.index_select(0, routing.inverse_idx)
        if seed is not None and post:
            low = apply_dropout_mask(low, dropout_keep_mask(seed, low.shape, p, low.device), p)
        return self.wrap_output(torch.add(out, low.reshape(out.shape)).to(out.dtype), bias)


# ---- slot routing through the token dispatcher ------------------------------------------------
def _split_list(splits):
    if splits is None:
        return None
    return splits.tolist() if isinstance(splits, torch.Tensor) else [int(s) for s in splits]


def _co_permute_slot_ids(dispatcher, slot_ids: torch.Tensor, num_local_experts: int):
    """The dispatcher's stages replayed on one int32 per token (local permute, EP all-to-all,
    local-expert sort), so the result lines up row for row with what the experts receive."""
    from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if not isinstance(dispatcher, MoEAlltoAllTokenDispatcher):
        raise UnsupportedOptionError(
            f"Multi-LoRA on MoE experts replays MoEAlltoAllTokenDispatcher's permutation; got "
            f"{type(dispatcher).__name__}: set moe_token_dispatcher_type='alltoall'")
    slot_ids = slot_ids.index_select(0, dispatcher.reversed_local_input_permutation_mapping)
    if getattr(dispatcher, "ep_size", 1) > 1:
        from megatron.core.tensor_parallel.mappings import all_to_all

        slot_ids = all_to_all(dispatcher.ep_group, slot_ids, _split_list(dispatcher.output_splits),
                              _split_list(dispatcher.input_splits))
    if getattr(dispatcher, "tp_size", 1) > 1:
        raise UnsupportedOptionError(
            "Multi-LoRA on MoE experts requires expert_tensor_parallel_size=1; the dispatcher "
            f"reports expert TP size {dispatcher.tp_size}")
    if num_local_experts > 1:
        slot_ids, _ = sort_chunks_by_idxs(slot_ids,
                                          dispatcher.num_global_tokens_per_local_expert.ravel(),
                                          dispatcher.sort_input_by_local_experts, fused=False)
    return slot_ids


def _build_expert_slot_routing(dispatcher, tokens_per_expert, tokens_per_adapter,
                               n_adapters: int, num_local_experts: int,
                               device: torch.device) -> ExpertSlotRouting:
    """The (slot, local expert) segmentation of one MoE layer's dispatched rows (upstream's
    signature). ``tokens_per_adapter`` counts the whole micro-batch (a tensor, or the layers'
    ``SlotTokens``, whose host counts need no sync); the MoE input may be this rank's
    sequence-parallel shard of it, contiguous in the same flattened order, so its slot ids are
    the TP rank's window.

    Raises:
        RuntimeError: the counts cover neither the local tokens nor their TP multiple.
    """
    from megatron.core import parallel_state

    tokens = tokens_per_adapter if isinstance(tokens_per_adapter, SlotTokens) else \
        SlotTokens(tokens_per_adapter, n_adapters)
    local = int(dispatcher.hidden_shape_before_permute[0])
    start = 0
    if tokens.total != local:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tokens.total != local * tp:
            raise RuntimeError(
                f"Cannot map {tokens.total} adapter-slot token ids onto {local} local MoE tokens "
                f"with tensor_model_parallel_size={tp}; pass this micro-batch's counts to "
                "set_tokens_per_adapter_slot()")
        start = parallel_state.get_tensor_model_parallel_rank() * local
    _, _, counts_t = tokens.window(start, local, device)
    slot_ids = torch.repeat_interleave(torch.arange(n_adapters, device=device, dtype=torch.int32),
                                       counts_t.to(torch.int64), output_size=local)
    slot_ids = _co_permute_slot_ids(dispatcher, slot_ids, num_local_experts)
    per_expert = tokens_per_expert.to(device=device, dtype=torch.long) \
        if isinstance(tokens_per_expert, torch.Tensor) else \
        torch.tensor(list(tokens_per_expert), device=device, dtype=torch.long)
    expert_ids = torch.repeat_interleave(torch.arange(num_local_experts, device=device),
                                         per_expert, output_size=slot_ids.shape[0])
    # slot-major keys; a stable sort keeps the dispatcher's expert order inside each slot
    keys = slot_ids.long() * num_local_experts + expert_ids
    sort_idx = torch.argsort(keys, stable=True)
    inverse_idx = torch.empty_like(sort_idx)
    inverse_idx[sort_idx] = torch.arange(sort_idx.shape[0], device=device)
    sizes = torch.bincount(keys, minlength=n_adapters * num_local_experts)
    ends = sizes.cumsum(0, dtype=torch.int32)
    return ExpertSlotRouting(sort_idx=sort_idx, inverse_idx=inverse_idx, group_offsets=ends,
                             slot_token_counts=sizes.view(n_adapters, num_local_experts).sum(1),
                             num_tokens=int(sort_idx.shape[0]),
                             offsets=torch.nn.functional.pad(ends, (1, 0)))


def _slot_routing_hook(moe_layer: nn.Module, layers: list[MultiLoRAGroupedExpertLinear]):
    """The experts' forward pre-hook: rebuilt on every experts forward (recompute included) from
    the layers' current tokens per slot (so recompute must run before the next micro-batch's
    counts are set: true without pipelining, as upstream notes)."""

    def hook(module: nn.Module, args: tuple) -> None:
        if not any(layer._adapter_enabled for layer in layers):
            return None
        if len(args) < 2:
            raise RuntimeError(f"expected the experts to be called as (hidden_states, "
                               f"tokens_per_expert, ...); got {len(args)} positional arguments")
        ref = layers[0]
        routing = _build_expert_slot_routing(moe_layer.token_dispatcher, args[1],
                                             ref.slot_tokens(), ref.n_adapters,
                                             ref.num_local_experts, args[0].device)
        for layer in layers:
            layer.expert_slot_routing = routing
        return None

    return hook


def install_moe_slot_routing(model) -> int:
    """Install the slot-routing pre-hook on each MoE layer whose experts carry multi-LoRA slots
    (idempotent; a no-op without such experts). Returns the number of MoE layers hooked."""
    if not any(isinstance(m, MultiLoRAGroupedExpertLinear)
               for m in _iter_multi_lora_modules(model)):
        return 0
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    installed = 0
    for chunk in _chunks(model):
        for module in chunk.modules():
            experts = getattr(module, "experts", None) if isinstance(module, BaseMoELayer) \
                else None
            if experts is None:
                continue
            layers = [m for m in experts.modules() if isinstance(m, MultiLoRAGroupedExpertLinear)]
            if not layers or getattr(experts, "_multi_lora_slot_routing_handle", None):
                continue
            experts._multi_lora_slot_routing_handle = experts.register_forward_pre_hook(
                _slot_routing_hook(module, layers))
            installed += 1
    return installed

