"""Helpers of Megatron-Bridge's ``peft.utils``: name matching and base-linear introspection.

``ParallelLinearAdapter`` lives in its own module and is re-exported here for import
compatibility (``from bridge.peft.utils import ParallelLinearAdapter``).
"""

from __future__ import annotations

import re
from functools import lru_cache

from torch import nn

from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter

__all__ = [
    "ParallelLinearAdapter",
    "get_adapter_attributes_from_linear",
    "is_expert_linear",
    "is_te_module",
    "te_parallel_mode",
    "wildcard_match",
]

# transformer-engine classes, recognised by name (TE is never imported here).
TE_LAYERNORM_COLUMN = ("TELayerNormColumnParallelLinear", "LayerNormLinear")
TE_COLUMN = ("TEColumnParallelLinear", "TEColumnParallelGroupedLinear")
TE_ROW = ("TERowParallelLinear", "TERowParallelGroupedLinear")
TE_LINEAR = ("TELinear", "Linear")


@lru_cache(maxsize=256)
def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$")


def wildcard_match(pattern: str, key: str | None) -> bool:
    """Whether ``key`` matches ``pattern``; only ``*`` is special (any run of characters, dots
    included); every other character, ``.`` too, is literal."""
    if key is None:
        return False
    return _pattern_regex(pattern).match(key) is not None


def is_expert_linear(fqn: str | None) -> bool:
    """Whether a module's full name is an MoE expert linear (``...mlp.experts...linear_fc1/2``)."""
    return fqn is not None and re.match(r".*mlp\..*experts.*\.linear_fc[1-2]$", fqn) is not None


def _class_names(m: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(m).__mro__}


def is_te_module(m: nn.Module) -> bool:
    """A transformer-engine layer (or megatron's TE wrapper), recognised without importing TE."""
    return any(
        cls.__module__.startswith(("transformer_engine", "megatron.core.extensions.transformer_engine"))
        for cls in type(m).__mro__
    ) or bool(_class_names(m) & {*TE_LAYERNORM_COLUMN, *TE_COLUMN, *TE_ROW, "TELinear"})


def te_parallel_mode(m: nn.Module) -> str | None:
    """'column', 'row' or 'duplicated' for a TE linear, from its class name and attributes."""
    names = _class_names(m)
    if names & set(TE_LAYERNORM_COLUMN) or names & set(TE_COLUMN):
        return "column"
    if names & set(TE_ROW):
        return "row"
    mode = getattr(m, "parallel_mode", None)
    if mode in ("column", "row"):
        return mode
    return "duplicated"


def is_linear_like(m: nn.Module) -> bool:
    """Whether ``m`` is a linear that LoRA can wrap (a megatron-core, bridge, TE or torch linear)."""
    try:
        get_adapter_attributes_from_linear(m, probe=True)
    except TypeError:
        return False
    return True


def get_adapter_attributes_from_linear(m: nn.Module, is_expert: bool = False, probe: bool = False):
    """What an adapter needs to know about the base linear ``m``.

    Args:
        probe: only classify ``m``; leave its return flags (``return_layernorm_output``) alone.

    Returns:
        ``(input_is_parallel, in_features, out_features, disable_sequence_parallel_comm,
        base_linear_is_parallel)``, with full (unpartitioned) feature sizes.

    Raises:
        TypeError: ``m`` is not a linear this package can wrap (the message lists those it can).
    """
    from bridge.layers import LayerNormColumnParallelLinear

    config = getattr(m, "config", None)
    sequence_parallel = bool(getattr(config, "sequence_parallel", False))
    disable_sp_comm = not sequence_parallel
    base_is_parallel = True
    tp_size = _tp_size(is_expert) if config is not None else 1
    if isinstance(m, LayerNormColumnParallelLinear):
        if not probe:
            m.return_layernorm_output = True
        return False, m.input_size, m.output_size, disable_sp_comm, True
    if is_te_module(m):
        mode = te_parallel_mode(m)
        if _class_names(m) & set(TE_LAYERNORM_COLUMN) and not probe:
            # The adapter reads the normalised input, so the layer must return it.
            m.return_layernorm_output = True
            if sequence_parallel and not getattr(m, "ub_overlap_ag", False):
                # TE gathers the layernorm output itself: no second gather in the adapter.
                m.return_layernorm_output_gathered = True
                disable_sp_comm = True
        if mode == "column":
            return False, m.in_features, m.out_features * tp_size, disable_sp_comm, True
        if mode == "row":
            return True, m.in_features * tp_size, m.out_features, disable_sp_comm, True
        return False, m.in_features, m.out_features, True, False
    try:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    except ImportError:  # megatron-core is optional: plain nn.Linear still works
        ColumnParallelLinear = RowParallelLinear = ()  # noqa: N806
    if ColumnParallelLinear and isinstance(m, ColumnParallelLinear):
        return False, m.input_size, m.output_size, disable_sp_comm, base_is_parallel
    if RowParallelLinear and isinstance(m, RowParallelLinear):
        return True, m.input_size, m.output_size, disable_sp_comm, base_is_parallel
    if isinstance(m, nn.Linear):
        return False, m.in_features, m.out_features, True, False
    raise TypeError(
        f"layer type {type(m).__name__} is not supported for LoRA; expected megatron-core "
        "ColumnParallelLinear/RowParallelLinear, bridge.layers.LayerNormColumnParallelLinear, a "
        "transformer-engine linear (TELinear, TEColumnParallelLinear, TERowParallelLinear, "
        "TELayerNormColumnParallelLinear) or torch.nn.Linear"
    )


def _tp_size(is_expert: bool) -> int:
    try:
        from megatron.core import parallel_state
    except ImportError:
        return 1
    if not parallel_state.model_parallel_is_initialized():
        return 1
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_world_size()
    return parallel_state.get_tensor_model_parallel_world_size()
