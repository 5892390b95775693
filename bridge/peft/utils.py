"""Megatron-Bridge's ``peft.utils``: name matching and base-linear introspection.

The rest of upstream's ``utils`` lives in modules of its own and is re-exported here for import
compatibility: ``ParallelLinearAdapter`` (``parallel_linear_adapter``), the init methods
(``adapter_init``), the sequence helpers (``tp``), ``create_peft`` / ``create_peft_hook`` /
``load_peft_adapter_checkpoint`` (``factory``), the MoE expert adapters
``GroupedExpertLinearAdapter`` / ``SharedOuterGroupedExpertAdapter`` / ``PackedPerExpertLinear``
(``expert_adapters``) and ``enable_legacy_shared_expert_adapter_loading`` (``expert_parallel``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bridge.peft._lazy import megatron_linears, module_getattr
from bridge.peft.adapter_init import (
    init_method_const,
    init_method_kaiming_uniform,
    init_method_normal,
)
from bridge.peft.adapter_io import load_peft_adapter_checkpoint
from bridge.peft.errors import UnsupportedModuleError
from bridge.peft.expert_adapters import (
    GroupedExpertLinearAdapter,
    PackedPerExpertLinear,
    SharedOuterGroupedExpertAdapter,
)
from bridge.peft.expert_parallel import enable_legacy_shared_expert_adapter_loading
from bridge.peft.factory import create_peft, create_peft_hook
from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter
from bridge.peft.tp import all2all_hp2sp, group_size, pad_seq_to_mult, unpad_seq_to_mult

__all__ = [
    "AdapterAttributes",
    "CheckpointPath",
    "ModelHook",
    "ModelList",
    "GroupedExpertLinearAdapter",
    "PackedPerExpertLinear",
    "ParallelLinearAdapter",
    "SharedOuterGroupedExpertAdapter",
    "align_expert_dim_for_tp",
    "all2all_hp2sp",
    "create_peft",
    "create_peft_hook",
    "enable_legacy_shared_expert_adapter_loading",
    "get_adapter_attributes_from_linear",
    "get_effective_lora_dim",
    "init_method_const",
    "init_method_kaiming_uniform",
    "init_method_normal",
    "is_expert_linear",
    "is_grouped_expert_linear",
    "is_modelopt_linear",
    "is_te_module",
    "load_peft_adapter_checkpoint",
    "pad_seq_to_mult",
    "te_parallel_mode",
    "unpad_seq_to_mult",
    "wildcard_match",
]

# upstream's type aliases (a MegatronModule is an nn.Module: megatron stays optional here)
ModelList = list[nn.Module]
ModelHook = Callable[[ModelList], ModelList | None]
CheckpointPath = str | Path

# transformer-engine classes, recognised by name (TE is never imported here).
TE_LAYERNORM_COLUMN = ("TELayerNormColumnParallelLinear", "LayerNormLinear")
TE_COLUMN = ("TEColumnParallelLinear", "TEColumnParallelGroupedLinear")
TE_ROW = ("TERowParallelLinear", "TERowParallelGroupedLinear")
TE_LINEAR = ("TELinear", "Linear")


def __getattr__(name: str):
    # ColumnParallelLinear, RowParallelLinear, HAVE_TE, TECL, TERL (upstream's module names)
    return module_getattr(__name__, globals(), name)


@dataclass(frozen=True)
class AdapterAttributes:
    """What an adapter needs to know about its base linear (full, unpartitioned sizes)."""

    input_is_parallel: bool
    in_features: int
    out_features: int
    disable_tensor_parallel_comm: bool
    disable_sequence_parallel_comm: bool
    base_linear_is_parallel: bool


@functools.lru_cache(maxsize=256)
def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$")


def wildcard_match(pattern: str, key: str | None) -> bool | None:
    """Whether ``key`` matches ``pattern`` (None when ``key`` is None, as upstream); only ``*`` is
    special (any run of characters, dots included); every other character, ``.`` too, is
    literal (upstream reads the pattern as a regex, so its ``.`` matches any character)."""
    if key is None:
        return None
    return _pattern_regex(pattern).match(key) is not None


def is_expert_linear(fqn: str | None) -> bool:
    """Whether a module's full name is an MoE expert linear (``...mlp.experts...linear_fc1/2``;
    shared experts are not)."""
    return (fqn is not None and re.match(r".*mlp\..*experts.*\.linear_fc[1-2]$", fqn) is not None
            and ".shared_experts." not in fqn)


def is_grouped_expert_linear(fqn: str | None) -> bool:
    """An expert linear of a grouped-GEMM expert layer (not under ``.local_experts.``)."""
    return is_expert_linear(fqn) and ".local_experts." not in str(fqn)


def get_effective_lora_dim(module: nn.Module, *, dim: int, normalize_moe_lora: bool,
                           is_expert: bool) -> int:
    """The rank for ``module``: ``dim // moe_router_topk`` for an expert linear with
    ``normalize_moe_lora`` (the adapter capacity of a dense model), else ``dim``.

    Raises:
        ValueError: topk unset or not positive, or ``dim`` not divisible by it.
    """
    if not normalize_moe_lora or not is_expert:
        return dim
    topk = getattr(getattr(module, "config", None), "moe_router_topk", None)
    if topk is None or topk <= 0:
        raise ValueError(f"normalize_moe_lora is enabled but moe_router_topk is {topk!r}; set it "
                         "to a positive integer on the model config")
    if dim % topk:
        raise ValueError(f"LoRA dim={dim} must be divisible by moe_router_topk={topk} when "
                         "normalize_moe_lora is enabled")
    return dim // topk


def align_expert_dim_for_tp(module: nn.Module, dim: int, *, normalize_moe_lora: bool,
                            is_expert: bool, input_is_parallel: bool, pg_collection=None) -> int:
    """A normalised expert rank rounded up to a multiple of the expert TP size (a
    column-parallel adapter splits A on r)."""
    if not normalize_moe_lora or not is_expert or input_is_parallel:
        return dim
    tp = _tp_size(True, module, pg_collection)
    return dim if tp <= 1 or dim % tp == 0 else -(-dim // tp) * tp


@functools.lru_cache(maxsize=1)
def _modelopt_linear() -> tuple[type | None, str]:
    try:
        from megatron.core.post_training.modelopt.layers import Linear
    except Exception as exc:  # ImportError, or modelopt/TE missing underneath
        return None, f"{type(exc).__name__}: {exc}"
    return Linear, ""


def is_modelopt_linear(m: nn.Module) -> bool:
    """Whether ``m`` is ModelOpt's local Megatron ``Linear`` (a quantisable ``nn.Linear``).

    Raises:
        UnsupportedModuleError: ``m`` comes from a ModelOpt module but megatron-core's ModelOpt
            layers cannot be imported here (the message names the class and why).
    """
    cls, why = _modelopt_linear()
    if cls is not None:
        return isinstance(m, cls)
    origin = next((c for c in type(m).__mro__ if c.__module__.startswith(
        ("megatron.core.post_training.modelopt", "modelopt."))), None)
    if origin is not None:
        raise UnsupportedModuleError(
            f"{type(m).__module__}.{type(m).__qualname__} is a ModelOpt linear, but "
            f"megatron.core.post_training.modelopt.layers cannot be imported ({why}); install "
            "nvidia-modelopt (and transformer-engine) to add LoRA to a ModelOpt model")
    return False


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


def is_router(m: nn.Module) -> bool:
    """A megatron-core MoE ``TopKRouter``."""
    try:
        from megatron.core.transformer.moe.router import TopKRouter
    except ImportError:
        return False
    return isinstance(m, TopKRouter)


def is_linear_like(m: nn.Module) -> bool:
    """Whether ``m`` is a linear that LoRA can wrap (a megatron-core, bridge, TE or torch linear,
    or a MoE router)."""
    try:
        get_adapter_attributes_from_linear(m, probe=True)
    except TypeError:
        return False
    return True


def get_adapter_attributes_from_linear(m: nn.Module, is_expert: bool = False,
                                       pg_collection=None,
                                       sequence_parallel_input_regather: bool = False, *,
                                       probe: bool = False) -> AdapterAttributes:
    """What an adapter needs to know about the base linear ``m``.

    Sets the return flags a norm-fused base needs so the adapter reads the normalised input
    (``return_layernorm_output``; never ``return_layernorm_output_gathered``, whose gradient TE
    drops: with sequence parallelism the adapter gathers the layernorm output itself).

    Args:
        is_expert: an MoE expert linear (its TP size is the expert TP size).
        pg_collection: the model's process groups (its ``tp``/``expt_tp`` group gives the TP size
            of a TE base, whose sizes are local).
        probe: only classify ``m``; leave its return flags alone.

    Raises:
        UnsupportedModuleError: (a NotImplementedError and TypeError) ``m`` is not a linear this
            package can wrap; the message lists those it can.
    """
    from bridge.layers import LayerNormColumnParallelLinear

    config = getattr(m, "config", None)
    sequence_parallel = bool(getattr(config, "sequence_parallel", False))
    disable_sp = not sequence_parallel
    # MoE shared experts with overlap: the weights are TP-sharded, but the base does no TP
    # communication itself (TE parallel_mode=None, or explicit_expert_comm).
    disable_tp = getattr(m, "parallel_mode", "") is None or bool(getattr(m, "explicit_expert_comm",
                                                                         False))
    if disable_tp:
        disable_sp = True

    def attrs(input_is_parallel, k, n, dsp=None, parallel=True, dtp=None):
        return AdapterAttributes(input_is_parallel, k, n, disable_tp if dtp is None else dtp,
                                 disable_sp if dsp is None else dsp, parallel)

    if is_modelopt_linear(m):
        return attrs(False, m.in_features, m.out_features, dsp=True, parallel=False, dtp=False)
    if is_router(m):
        return attrs(False, m.weight.shape[1], m.weight.shape[0], dsp=True, parallel=False)
    if isinstance(m, LayerNormColumnParallelLinear):
        if not probe:
            m.return_layernorm_output = True
        return attrs(False, m.input_size, m.output_size)
    if is_te_module(m):
        return _te_attributes(m, attrs, sequence_parallel, is_expert, pg_collection,
                              sequence_parallel_input_regather, probe)
    ColumnParallelLinear, RowParallelLinear = megatron_linears(globals())  # noqa: N806
    if ColumnParallelLinear and isinstance(m, ColumnParallelLinear):
        return attrs(False, m.input_size, m.output_size)
    if RowParallelLinear and isinstance(m, RowParallelLinear):
        return attrs(True, m.input_size, m.output_size)
    if isinstance(m, nn.Linear):
        return attrs(False, m.in_features, m.out_features, dsp=True, parallel=False, dtp=False)
    raise UnsupportedModuleError(
        f"Layer type is unrecognized for LoRA: {type(m).__module__}.{type(m).__qualname__}; "
        "expected megatron-core ColumnParallelLinear/RowParallelLinear, a MoE TopKRouter, "
        "bridge.layers.LayerNormColumnParallelLinear, a ModelOpt Linear, a transformer-engine "
        "linear (TELinear, TEColumnParallelLinear, TERowParallelLinear, "
        "TELayerNormColumnParallelLinear) or torch.nn.Linear"
    )


def _te_attributes(m, attrs, sequence_parallel, is_expert, pg_collection, regather, probe):
    tp_size = _tp_size(is_expert, m, pg_collection) if getattr(m, "config", None) is not None \
        else 1
    mode = te_parallel_mode(m)
    dsp = None
    if _class_names(m) & set(TE_LAYERNORM_COLUMN) and not probe:
        # The adapter reads the normalised input, so the layer must return it, and ungathered
        # (unlike Megatron-Bridge): TE (2.11 _LayerNormLinear.backward) adds the returned
        # output's gradient to dX only when it was not returned gathered, so the adapter's share
        # of dX and of the norm's grads would be lost. Under SP the adapter gathers it itself.
        m.return_layernorm_output = True
        m.return_layernorm_output_gathered = False
    if mode == "column":
        return attrs(False, m.in_features, m.out_features * tp_size, dsp=dsp)
    if mode == "row":
        return attrs(True, m.in_features * tp_size, m.out_features, dsp=dsp)
    return attrs(False, m.in_features, m.out_features, dsp=True, parallel=False)


def _tp_size(is_expert: bool, m: nn.Module | None = None, pg_collection=None) -> int:
    """The (expert) TP size of a base: its own group, the collection's, else megatron's."""
    for owner in (m, pg_collection):
        for name in (("expt_tp", "etp") if is_expert else ("tp",)) + ("tp_group", "_tp_group"):
            group = getattr(owner, name, None) if owner is not None else None
            if group is not None and not isinstance(group, int):
                return group_size(group)
    try:
        from megatron.core import parallel_state
    except ImportError:
        return 1
    if not parallel_state.model_parallel_is_initialized():
        return 1
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_world_size()
    return parallel_state.get_tensor_model_parallel_world_size()
