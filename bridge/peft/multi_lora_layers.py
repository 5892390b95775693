"""Multi-adapter LoRA layers (Megatron-Bridge's ``multi_lora_layers``): ``MultiLoRALinear`` wraps
one base linear with ``n_adapters`` LoRA slots trained in the same batch, the micro-batch's rows
grouped by slot (``set_tokens_per_adapter_slot``); ``MultiLoRAGroupedExpertLinear`` and
``ExpertSlotRouting`` do the same for grouped MoE expert linears (bridge/peft/multi_lora_moe.py).

Each slot is a ``ParallelLinearAdapter`` at the max rank ``dim`` (``adapters.<i>.linear_in/out``,
upstream's checkpoint names), and slot ``i`` uses its first ``rank_i`` ranks with the scale
``alpha_i / rank_i`` (``init_adapter_slot``). Unlike upstream:

- the slots' weights live in one stacked tensor per factor ([n, r, K] and [n, N, r]); each slot's
  parameters are views of it, so the forward hands the fused op the stack without copying (a copy
  only where something re-homed the parameters, e.g. an optimizer's contiguous parameter buffer;
  the plan says so);
- the scale is applied in fp32 inside the op (the fused kernels, or the eager grouped mms), never
  rounded to the activation dtype; the rank padding is never read (the op masks it), so a slot's
  output is exactly the single LoRA of its first ``rank_i`` ranks;
- adapter dropout is supported (kernels/philox.py's mask; one seed gives one mask on the fused
  and the eager path);
- the fused multi-adapter op (bridge.kernels.multi_lora_linear) runs base GEMM and adapters in
  one pass when the backend resolves to Triton; otherwise the base runs as a module and the
  adapters' term eagerly (bridge/peft/multi_lora_forward.py), with the reason in the plan.

Model-level slot lifecycle: ``init_adapter_slot``, ``clear_adapter_slot``, ``load_adapter``,
``expose_adapter_slot`` (one slot as a regular ``.adapter``: what ``adapter_state_dict`` and the
Hugging Face export read), ``hide_adapters``, ``set_tokens_per_adapter_slot``,
``install_moe_slot_routing``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bridge.kernels.backend import validate_backend_name
from bridge.peft.adapter_init import check_adapter_hparams, check_lora_dtype, get_init_fn
from bridge.peft.adapter_io import AdapterLoadError
from bridge.peft.adapter_wrapper import AdapterWrapper, _module_sharded_state_dict, mamba_dim_info
from bridge.peft.errors import PEFTConfigError
from bridge.peft.lora_layers import validate_gemm_strategy
from bridge.peft.multi_lora_slots import (  # noqa: F401  (_narrow_...: upstream's helper name)
    SlotTokens,
    _narrow_token_counts_to_window,
    _pack,
    _rng_fork,
    split_slot_settings,
    stack_slots,
)
from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter
from bridge.peft.tp import default_tp_group, group_size
from bridge.peft.utils import get_adapter_attributes_from_linear

if TYPE_CHECKING:  # served lazily by __getattr__ below (they subclass MultiLoRALinear)
    from bridge.peft.multi_lora_moe import (
        ExpertSlotRouting,
        MultiLoRAGroupedExpertLinear,
        install_moe_slot_routing,
    )

__all__ = [
    "AdapterSlotLoadError",
    "ExpertSlotRouting",
    "MultiLoRAGroupedExpertLinear",
    "MultiLoRALinear",
    "SlotTokens",
    "clear_adapter_slot",
    "expose_adapter_slot",
    "hide_adapters",
    "init_adapter_slot",
    "install_moe_slot_routing",
    "load_adapter",
    "set_tokens_per_adapter_slot",
]

_FACTORS = ("linear_in", "linear_out")


class AdapterSlotLoadError(AdapterLoadError, KeyError):
    """A slot checkpoint that does not match the model's adapters (upstream raises KeyError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# ---- the dense layer -------------------------------------------------------------------------
class MultiLoRALinear(AdapterWrapper):
    """A Megatron (or torch / transformer-engine) linear with ``n_adapters`` LoRA slots.

    Forward: ``base(x)`` plus, for the rows of slot i (``set_tokens_per_adapter_slot``),
    ``(alpha_i / rank_i) · B_i[:, :rank_i] A_i[:rank_i] dropout(x)``. Returns what the base
    returns, less the layernorm output (as ``LoRALinear``).

    Args:
        to_wrap: the base linear. n_adapters: slots. dim: the max rank (every slot's buffer).
        alpha: the adapters' construction alpha (a slot's runtime alpha is set by
            ``init_adapter_slot``; until then alpha 1 at the max rank, as upstream).
        full_name: the base's name in the model.
        column_init_method, row_init_method: init of A and B (also on ``clear_adapter_slot``).
        dropout, dropout_position: adapter dropout ('pre' on x, 'post' on the adapter term).
        a2a_experimental: row base under sequence parallelism: one all-to-all (eager path).
        kernel_backend: 'auto' | 'triton' | 'eager' ('cuda' has no multi-adapter kernel).
        kernel_gemm: 'auto' | 'fused' | 'cublas' (the fused op's GEMM strategy).
        lora_dtype: dtype of the slots (default: the base config's params_dtype, else the base
            weight's).

    Raises:
        PEFTConfigError: n_adapters < 1, or a bad rank / alpha / dropout.
    """

    def __init__(self, to_wrap: nn.Module, n_adapters: int, dim: int, alpha: float,
                 full_name: str, column_init_method: str = "xavier",
                 row_init_method: str = "zero", dropout: float = 0.0,
                 dropout_position: str = "pre", a2a_experimental: bool = False, *,
                 kernel_backend: str = "auto", kernel_gemm: str = "auto",
                 lora_dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        if isinstance(n_adapters, bool) or not isinstance(n_adapters, int) or n_adapters < 1:
            raise PEFTConfigError(f"n_adapters must be a positive int, got {n_adapters!r}")
        check_adapter_hparams(dim, alpha, dropout, dropout_position,
                              (column_init_method, row_init_method))
        check_lora_dtype(lora_dtype)
        self.to_wrap = to_wrap
        self._adapter_enabled = True
        self._return_bare_tensor = False
        self.n_adapters, self.max_rank, self.base_linear_name = n_adapters, dim, full_name
        self._column_init_method, self._row_init_method = column_init_method, row_init_method
        self.kernel_backend = validate_backend_name(kernel_backend, what="kernel_backend")
        self.kernel_gemm = validate_gemm_strategy(kernel_gemm)
        attrs = get_adapter_attributes_from_linear(to_wrap)
        self.input_is_parallel = attrs.input_is_parallel
        self.disable_sequence_parallel_comm = attrs.disable_sequence_parallel_comm
        self.base_linear_is_parallel = attrs.base_linear_is_parallel
        self.use_a2a = a2a_experimental
        weight = next(to_wrap.parameters(), None)
        config = getattr(to_wrap, "config", None)
        dtype = lora_dtype or getattr(config, "params_dtype", None) or \
            (weight.dtype if weight is not None else None)
        self.adapters = nn.ModuleList([
            ParallelLinearAdapter(
                attrs.in_features, attrs.out_features, dim, base_linear_name=full_name,
                activation="identity", alpha=alpha, input_is_parallel=attrs.input_is_parallel,
                column_init_method=column_init_method, row_init_method=row_init_method,
                model_parallel_config=config, dropout=dropout, dropout_position=dropout_position,
                disable_tensor_parallel_comm=attrs.disable_tensor_parallel_comm,
                disable_sequence_parallel_comm=attrs.disable_sequence_parallel_comm,
                base_linear_is_parallel=attrs.base_linear_is_parallel,
                a2a_experimental=a2a_experimental, params_dtype=dtype,
                tp_group=getattr(to_wrap, "tp_group", None))
            for _ in range(n_adapters)])
        if weight is not None and weight.device.type != "meta":
            self.adapters.to(weight.device)
        self._init_slot_state(dim, weight)
        self._register_load_state_dict_pre_hook(self._remap_base_keys)

    def _init_slot_state(self, dim: int, weight: torch.Tensor | None) -> None:
        n = self.n_adapters
        kw = dict(dtype=weight.dtype if weight is not None else torch.float32,
                  device=weight.device if weight is not None else None)
        # Upstream's bookkeeping buffers (non-persistent: the slot lifecycle is managed outside
        # checkpoints). The op reads the host values below, so a bf16 buffer never rounds them.
        self.register_buffer("alpha_values", torch.ones(n, **kw), persistent=False)
        self.register_buffer("rank_values", torch.full((n,), dim, **kw), persistent=False)
        self._slot_alpha: list[float] = [1.0] * n
        self._slot_rank: list[int] = [dim] * n
        self._slot_device: dict = {}
        self.tokens_per_adapter = None
        self.tokens_per_adapter_total: int | None = None
        self._slot_tokens: SlotTokens | None = None
        self._pack_slots()

    # ---- slot storage --------------------------------------------------------------------------
    def _slot_params(self, factor: str) -> list[nn.Parameter]:
        return [getattr(ad, factor).weight for ad in self._slot_modules()]

    def _slot_modules(self) -> nn.ModuleList:
        adapters = self._modules.get("adapters")
        if adapters is None:
            raise RuntimeError(
                f"{self.base_linear_name}: its adapter slots are detached (inside "
                "expose_adapter_slot / hide_adapters): run forward after the block")
        return adapters

    def _pack_slots(self) -> None:
        for factor in _FACTORS:
            _pack(self._slot_params(factor))

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .half() give every parameter new memory: stack the slots again
        out = super()._apply(fn, recurse)
        if "adapters" in self._modules:
            self._pack_slots()
        self._slot_device.clear()
        return out

    def stacked_factors(self) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(A [n, r, K] and B [n, N, r] of this rank's shards, differentiable into each slot's
        parameters; '' or why they were copied)."""
        a, why_a = stack_slots(self._slot_params("linear_in"))
        b, why_b = stack_slots(self._slot_params("linear_out"))
        return a, b, why_a or why_b

    def slot_tensors(self, device: torch.device):
        """(ranks int32 [n], alphas fp32 [n], scales fp32 [n] = alpha / rank in fp32) on
        ``device``, rebuilt only when a slot changes."""
        hit = self._slot_device.get(device)
        if hit is None:
            ranks = torch.tensor(self._slot_rank, dtype=torch.int32).to(device)
            alphas = torch.tensor(self._slot_alpha, dtype=torch.float32).to(device)
            hit = self._slot_device[device] = (ranks, alphas, alphas / ranks.to(torch.float32))
        return hit

    def slot_tokens(self) -> SlotTokens:
        """This micro-batch's tokens per slot (``set_tokens_per_adapter_slot``'s, or read now
        from ``tokens_per_adapter`` when it was set directly: one host sync)."""
        tokens = self.tokens_per_adapter
        if tokens is None:
            raise RuntimeError(
                f"{self.base_linear_name}: no tokens per adapter slot for this forward; call "
                "set_tokens_per_adapter_slot(model, counts) with the micro-batch's counts "
                "(rows grouped by slot) before every forward")
        st = self._slot_tokens
        if st is None or st.source is not tokens:
            st = self._slot_tokens = SlotTokens(tokens, self.n_adapters)
        if len(st.counts) != self.n_adapters:
            raise ValueError(f"{self.base_linear_name}: tokens for {len(st.counts)} slots, the "
                             f"layer has {self.n_adapters}")
        return st

    def slot_rows(self, rows: int, device: torch.device, group=None):
        """(counts, offsets, counts tensor) of the ``rows`` this call's op sees: the whole
        micro-batch, or this rank's sequence-parallel window of it (``group``'s rank)."""
        st = self.slot_tokens()
        if rows == st.total:
            return st.window(0, rows, device)
        group = group if group is not None else default_tp_group()
        tp = group_size(group)
        if rows * tp != st.total:
            raise RuntimeError(
                f"{self.base_linear_name}: the adapter slots' token counts cover {st.total} rows "
                f"but this layer sees {rows}, neither the micro-batch nor its 1/{tp} "
                "sequence-parallel shard; pass this micro-batch's counts to "
                "set_tokens_per_adapter_slot()")
        rank = torch.distributed.get_rank(group) if tp > 1 else 0
        return st.window(rank * rows, rows, device)

    # ---- slot lifecycle ------------------------------------------------------------------------
    def _check_idx(self, idx: int) -> None:
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < self.n_adapters:
            raise IndexError(f"adapter slot {idx!r} out of range: the layer has "
                             f"{self.n_adapters} slots (0..{self.n_adapters - 1})")

    def reset_adapter(self, idx: int) -> None:
        """Re-initialise slot ``idx``'s weights with the construction init methods, through
        megatron's model-parallel RNG tracker (data-parallel replicas stay equal)."""
        self._check_idx(idx)
        adapter = self._slot_modules()[idx]
        col, row = get_init_fn(self._column_init_method), get_init_fn(self._row_init_method)
        with torch.no_grad(), _rng_fork(self._expert_rng):
            col(adapter.linear_in.weight.data)
            row(adapter.linear_out.weight.data)

    _expert_rng = False

    def init_adapter_slot(self, idx: int, rank: int, alpha: float) -> None:
        """Claim slot ``idx``: its rank (<= the max rank) and alpha; the padding ranks of A and
        B are zeroed (no path reads them; exports of the max-rank tensors stay exact).

        Raises:
            IndexError: no such slot. PEFTConfigError: rank not in [1, max rank], alpha not a
                finite number.
        """
        self._check_idx(idx)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= self.max_rank:
            raise PEFTConfigError(f"{self.base_linear_name}: adapter rank {rank!r} must be an int "
                                  f"in (0, {self.max_rank}] (the MultiLoRA dim)")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not math.isfinite(alpha):
            raise PEFTConfigError(f"{self.base_linear_name}: adapter alpha must be a finite "
                                  f"number, got {alpha!r}")
        self._set_slot(idx, rank, float(alpha))
        self._apply_rank_mask(idx)

    def clear_adapter_slot(self, idx: int) -> None:
        """Free slot ``idx``: alpha 0 (silent), max rank, weights re-initialised."""
        self._check_idx(idx)
        self._set_slot(idx, self.max_rank, 0.0)
        self.reset_adapter(idx)

    def _set_slot(self, idx: int, rank: int, alpha: float) -> None:
        self._slot_rank[idx], self._slot_alpha[idx] = rank, alpha
        with torch.no_grad():
            self.alpha_values[idx] = alpha
            self.rank_values[idx] = rank
        self._slot_device.clear()

    def _rank_shard(self, idx: int) -> tuple[int, int]:
        """(first global rank of this TP rank's A rows, number of rows) for slot ``idx``."""
        rows = self._slot_modules()[idx].linear_in.weight.shape[0]
        if rows == self.max_rank:
            return 0, rows
        group = getattr(self._slot_modules()[idx], "tp_group", None)
        rank = torch.distributed.get_rank(group) if group_size(group) > 1 else 0
        return rank * rows, rows

    def _apply_rank_mask(self, idx: int) -> None:
        """Zero slot ``idx``'s A rows and B columns at ranks >= its rank (A's rows may be this
        TP rank's shard of the rank axis)."""
        rank = self._slot_rank[idx]
        if rank >= self.max_rank:
            return
        adapter = self._slot_modules()[idx]
        start, _ = self._rank_shard(idx)
        with torch.no_grad():
            adapter.linear_in.weight[max(0, rank - start):].zero_()
            adapter.linear_out.weight[:, rank:].zero_()

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if not self._adapter_enabled:
            out, bias, _ = self.base_linear_forward(x, *args, **kwargs)
            return self.wrap_output(out, bias)
        from bridge.peft.multi_lora_forward import multi_lora_forward

        return multi_lora_forward(self, x, args, kwargs)

    def training_plan(self):
        """(plan, source) of the next training forward (bridge/peft/multi_lora_forward.py's
        ``MultiLoRAPlan``), without running anything; for ``kernel_report``."""
        from bridge.peft.multi_lora_forward import training_plan

        return training_plan(self)

    # ---- merging: per slot only ----------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        if "adapter" in self._modules:
            return super().delta_weight()
        raise NotImplementedError(
            f"{self.base_linear_name}: a MultiLoRALinear holds {self.n_adapters} adapter slots, "
            "which no single weight delta describes; expose one with expose_adapter_slot(model, "
            "idx) to merge or export it")

    # ---- state dicts ---------------------------------------------------------------------------
    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        """Base keys at ``prefix``; slots under ``adapters.<i>.`` (an exposed slot under
        ``adapter.``; hidden slots not at all)."""
        if destination is None:
            destination = {}
        self.to_wrap.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name, child in self._modules.items():
            if name != "to_wrap" and child is not None:
                child.state_dict(destination=destination, prefix=f"{prefix}{name}.",
                                 keep_vars=keep_vars)
        return destination

    def _remap_base_keys(self, state_dict, prefix, *args) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if not rest.startswith(("adapters.", "adapter.", "to_wrap.")):
                state_dict[f"{prefix}to_wrap.{rest}"] = state_dict.pop(key)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """The base's sharded tensors and every slot's (``adapters.<i>.``), as upstream."""
        out = dict(_module_sharded_state_dict(self.to_wrap, prefix, sharded_offsets, metadata))
        extra = {}
        if "mixer.in_proj" in self.base_linear_name:
            extra["mamba_dim_info"] = mamba_dim_info(self.to_wrap)
        slots = self._modules.get("adapters")
        named = [(f"adapters.{i}.", a) for i, a in enumerate(slots)] if slots is not None else []
        if "adapter" in self._modules:
            named.append(("adapter.", self._modules["adapter"]))
        for name, adapter in named:
            out.update(_module_sharded_state_dict(adapter, prefix + name, sharded_offsets,
                                                  metadata, **extra))
        return out


# ---- model-level functions ---------------------------------------------------------------------
def _chunks(model) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _iter_multi_lora_modules(model) -> Iterator[MultiLoRALinear]:
    for chunk in _chunks(model):
        for module in chunk.modules():
            if isinstance(module, MultiLoRALinear):
                yield module


def set_tokens_per_adapter_slot(model, tokens_per_adapter) -> None:
    """Route the next micro-batch: ``tokens_per_adapter[i]`` rows (of the flattened
    [sequence x batch] rows, grouped by slot in slot order) belong to slot i; they sum to the
    micro-batch's rows on this rank. Read from the host once here (one sync), shared by every
    layer; a layer that sees only its sequence-parallel shard uses its window of them.

    Raises:
        TypeError, ValueError: not integer counts, a negative count, or not one per slot.
    """
    modules = list(_iter_multi_lora_modules(model))
    n_slots = {m.n_adapters for m in modules}
    tokens = SlotTokens(tokens_per_adapter, n_slots.pop() if len(n_slots) == 1 else None)
    for module in modules:
        if len(tokens.counts) != module.n_adapters:
            raise ValueError(f"{module.base_linear_name}: tokens for {len(tokens.counts)} slots, "
                             f"the layer has {module.n_adapters}")
        module.tokens_per_adapter = tokens_per_adapter
        module.tokens_per_adapter_total = tokens.total
        module._slot_tokens = tokens


def init_adapter_slot(model, idx: int, rank: int, alpha: float) -> None:
    """Claim slot ``idx`` in every multi-LoRA layer with ``rank`` and ``alpha``."""
    for module in _iter_multi_lora_modules(model):
        module.init_adapter_slot(idx, rank, alpha)


def clear_adapter_slot(model, idx: int) -> None:
    """Free slot ``idx`` in every multi-LoRA layer (alpha 0, weights re-initialised)."""
    for module in _iter_multi_lora_modules(model):
        module.clear_adapter_slot(idx)


def load_adapter(model, idx: int, state_dict: Mapping[str, torch.Tensor]) -> int:
    """Copy a slot checkpoint into slot ``idx``: ``state_dict`` has the names
    ``named_parameters()`` gives under ``expose_adapter_slot`` (``...adapter.linear_in.weight``,
    this rank's shards), so a checkpoint saved from any slot loads into any other; or it is
    ``adapter_state_dict(model)`` taken under ``expose_adapter_slot``, whose settings records are
    compared with slot ``idx``'s (a difference is a warning: the slot keeps its rank and alpha).

    Returns:
        The number of tensors copied.

    Raises:
        AdapterSlotLoadError: (a KeyError and AdapterLoadError) a model adapter tensor the
            checkpoint lacks, a checkpoint tensor no adapter takes, or a shape mismatch; nothing
            is copied then.
    """
    with expose_adapter_slot(model, idx):
        params = {name: p for chunk in _chunks(model) for name, p in chunk.named_parameters()
                  if ".adapter." in name}
        tensors, settings_diffs = split_slot_settings(_chunks(model), state_dict)
        given = {k: v for k, v in tensors.items() if ".adapter." in k}
        missing = sorted(set(params) - set(given))
        unused = sorted(set(given) - set(params))
        shapes = [f"{k}: model {tuple(params[k].shape)} vs checkpoint {tuple(given[k].shape)}"
                  for k in sorted(set(params) & set(given)) if params[k].shape != given[k].shape]
        problems = []
        if missing:
            problems.append(f"{len(missing)} adapter tensor(s) absent from the checkpoint (e.g. "
                            f"{missing[0]}); they would stay at their old values")
        if unused:
            problems.append(f"{len(unused)} checkpoint tensor(s) matched no adapter parameter "
                            f"(e.g. {unused[0]}); they would be dropped")
        if shapes:
            problems.append("shape mismatch (another max rank or TP size?): " + "; ".join(shapes))
        if problems:
            raise AdapterSlotLoadError(
                f"load_adapter(slot={idx}): " + " | ".join(problems) + ". Did target_modules "
                "change since the checkpoint was saved?")
        if settings_diffs:  # rank and alpha are the slot's (init_adapter_slot), not the file's
            warnings.warn(f"load_adapter(slot={idx}): the checkpoint was saved from a slot with "
                          "other settings (outputs differ from the trained slot's where rank or "
                          "alpha differ; init_adapter_slot sets them): "
                          + "; ".join(settings_diffs), UserWarning, stacklevel=2)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(given[name].to(device=param.device, dtype=param.dtype))
    return len(params)


def _slot_values(m: MultiLoRALinear, idx: int) -> tuple[int, float]:
    """(rank, alpha) of slot ``idx``: the layer's host values (its bookkeeping buffers for a
    layer built without them)."""
    if hasattr(m, "_slot_rank"):
        m._check_idx(idx)
        return m._slot_rank[idx], m._slot_alpha[idx]
    return int(m.rank_values[idx]), float(m.alpha_values[idx])


@contextlib.contextmanager
def expose_adapter_slot(model, idx: int):
    """Inside the block every multi-LoRA layer shows slot ``idx`` as a regular ``.adapter``
    (``adapters`` detached): state dicts, ``named_parameters``, ``adapter_state_dict`` and the
    Hugging Face export see a single LoRA. Its tensors keep the max rank (``dim``), so its
    ``alpha`` reads ``alpha_i * dim / rank_i`` (``alpha / dim`` is the slot's scale) and its
    padding ranks are zeroed first (no path reads them, so the export computes what the slot
    does). Restored on exit, also when the block raises."""
    modules = list(_iter_multi_lora_modules(model))
    saved = []
    try:
        for m in modules:
            if "adapters" not in m._modules:
                continue
            rank, alpha = _slot_values(m, idx)
            if hasattr(m, "_slot_rank"):
                m._apply_rank_mask(idx)
            slots = m._modules.pop("adapters")
            adapter = slots[idx]
            saved.append((m, slots, adapter, adapter.alpha))
            adapter.alpha = alpha * m.max_rank / rank
            m.adapter = adapter
        yield model
    finally:
        for m, slots, adapter, alpha in saved:
            m._modules.pop("adapter", None)
            m._modules["adapters"] = slots
            adapter.alpha = alpha


@contextlib.contextmanager
def hide_adapters(model):
    """Inside the block no multi-LoRA layer shows adapter parameters (e.g. while the base
    checkpoint loads); restored on exit, also when the block raises."""
    saved = []
    try:
        for m in _iter_multi_lora_modules(model):
            if "adapters" in m._modules:
                saved.append((m, m._modules.pop("adapters")))
        yield model
    finally:
        for m, slots in saved:
            m._modules["adapters"] = slots


_MOE_NAMES = ("ExpertSlotRouting", "MultiLoRAGroupedExpertLinear", "install_moe_slot_routing",
              "_build_expert_slot_routing", "_co_permute_slot_ids")


def __getattr__(name: str):
    # The MoE half subclasses MultiLoRALinear, so it lives in multi_lora_moe and is served from
    # here by name (upstream's import path) on first use, without an import cycle.
    if name in _MOE_NAMES:
        from bridge.peft import multi_lora_moe

        return getattr(multi_lora_moe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
