"""Expert-parallel plumbing of the MoE expert adapters, in one place: the process groups, the
communication of the low-rank factors, megatron's DDP flag and the checkpoint metadata.

The rule every expert adapter follows: its output must be in the parallel state of its base's
output. megatron-core's expert linears (and shared experts with ``moe_shared_expert_overlap``) do
no tensor-parallel communication themselves (``explicit_expert_comm``, TE's ``parallel_mode=None``):
the token dispatcher hands every expert-TP rank the same tokens and sums the ranks' partial outputs
(and, in backward, their partial input gradients) itself. So beside such a base:

- column base (fc1, W [N/t, K], y_local = x W_local^T): A [r/t, K] is gathered to [r, K] (its
  backward reduce-scatters dA, the partial sums over N of each rank), B stays [N/t, r]; the output
  is the rank's N shard, the input gradient a partial sum the dispatcher completes.
- row base (fc2, W [N, K/t], y = sum over ranks): A [r, K/t] stays split on K, B [N/t, r] is
  gathered to [N, r] (backward reduce-scatter); each rank's s (x_k A_k^T) B^T is a partial sum of
  the delta, completed by the dispatcher's sum with the base's.

No other communication: no all-reduce of S (it would be summed again), no output gather.

An adapter shared by every expert (a grouped expert linear's default) is one adapter for the
whole model: its factors start equal on every expert-parallel rank (broadcast from EP rank 0) and
their gradients are summed over the EP group inside autograd (each rank's gradient sums its local
experts' tokens); megatron's DDP then reduces every expert adapter over the expert-data-parallel
group, exactly once, because its parameters carry ``allreduce = False`` (see
:func:`expert_dp_allreduce_flag`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from bridge.peft.tp import group_size

__all__ = [
    "ExpertGroups",
    "broadcast_from_first",
    "enable_legacy_shared_expert_adapter_loading",
    "expert_dp_allreduce_flag",
    "expert_groups",
    "gather_factor",
    "group_rank",
    "set_replica_dp",
    "sum_grad_over",
]


def group_rank(group) -> int:
    """This process's rank in ``group`` (0 without one or without torch.distributed)."""
    if group is None:
        return 0
    rank = getattr(group, "rank", None)
    if callable(rank):
        return int(rank())
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


@dataclass(frozen=True)
class ExpertGroups:
    """The process groups an expert adapter lives in (None: size 1): expert-parallel ``ep``,
    expert-tensor-parallel ``etp``, expert-data-parallel ``edp`` and the dense ``tp`` group."""

    ep: object = None
    etp: object = None
    edp: object = None
    tp: object = None

    @property
    def ep_size(self) -> int:
        return group_size(self.ep)

    @property
    def etp_size(self) -> int:
        return group_size(self.etp)

    @property
    def edp_size(self) -> int:
        return group_size(self.edp)


def _collection_group(owners, names):
    for owner in owners:
        for name in names:
            group = getattr(owner, name, None) if owner is not None else None
            if group is not None and not isinstance(group, int):
                return group
    return None


def expert_groups(pg_collection=None, config=None, etp=None) -> ExpertGroups:
    """The expert groups: ``etp`` when given (the base's own group), else from the
    ``ProcessGroupCollection`` (``ep``, ``expt_tp``, ``expt_dp``, ``tp``), the config's collection,
    else megatron's parallel state (None where it is not initialised)."""
    owners = (pg_collection, getattr(config, "pg_collection", None),
              getattr(config, "_pg_collection", None))
    found = {
        "ep": _collection_group(owners, ("ep",)),
        "etp": etp if etp is not None else _collection_group(owners, ("expt_tp", "etp")),
        "edp": _collection_group(owners, ("expt_dp",)),
        "tp": _collection_group(owners, ("tp",)),
    }
    if all(g is not None for g in found.values()):
        return ExpertGroups(**found)
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return ExpertGroups(**found)
    if not dist.is_available() or not dist.is_initialized() \
            or not ps.model_parallel_is_initialized():
        return ExpertGroups(**found)
    defaults = {
        "ep": lambda: ps.get_expert_model_parallel_group(check_initialized=False),
        "etp": lambda: ps.get_expert_tensor_parallel_group(check_initialized=False),
        "edp": lambda: ps.get_expert_data_parallel_group(check_initialized=False),
        "tp": lambda: ps.get_tensor_model_parallel_group(check_initialized=False),
    }
    return ExpertGroups(**{k: g if g is not None else defaults[k]() for k, g in found.items()})


def expert_dp_allreduce_flag(groups: ExpertGroups) -> bool:
    """megatron DDP's ``allreduce`` attribute for an expert adapter parameter: False (reduce over
    the expert-data-parallel group) whenever that group differs from the dense one, i.e. with
    expert parallelism or an expert-TP size unlike the TP size (megatron-core #5916,
    Megatron-Bridge #5229); True (the dense DP group, the same ranks) otherwise."""
    return not (groups.ep_size > 1 or groups.etp_size != group_size(groups.tp))


# ---- communication of the factors (autograd-aware) ---------------------------------------------
def gather_factor(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather the ``dim`` shards of ``t`` over ``group``; the backward reduce-scatters the
    gradient (each rank holds partial sums of the whole factor's gradient)."""
    size = group_size(group)
    if size == 1:
        return t
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    if dim == 0:
        return gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True,
                                                    group=group)
    moved = t.movedim(dim, 0).contiguous()
    out = gather_from_sequence_parallel_region(moved, tensor_parallel_output_grad=True,
                                               group=group)
    return out.movedim(0, dim)


def sum_grad_over(t: torch.Tensor, group) -> torch.Tensor:
    """``t`` itself forward; its gradient all-reduced (summed) over ``group`` in backward: the
    gradient of a parameter every rank of ``group`` holds and uses on different tokens."""
    if group_size(group) == 1 or not t.requires_grad or not torch.is_grad_enabled():
        return t
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(t, group=group)


@torch.no_grad()
def broadcast_from_first(tensors, group) -> None:
    """Make ``tensors`` equal on every rank of ``group`` (rank 0's values), in place."""
    if group_size(group) == 1:
        return
    src = dist.get_global_rank(group, 0)
    for t in tensors:
        if t.is_meta:
            raise RuntimeError("a shared expert adapter must be materialised (not on the meta "
                               "device) before its factors are synchronised over expert parallel")
        dist.broadcast(t.data, src=src, group=group)


# ---- checkpoint metadata ---------------------------------------------------------------------------
def set_replica_dp(sharded: dict, dp_replica: int) -> dict:
    """Set the data-parallel part of every entry's replica id (``(pp, tp, dp)``) to
    ``dp_replica``: expert tensors are replicated over the expert-data-parallel group, not the
    dense one megatron's linears assume."""
    for value in sharded.values():
        rid = getattr(value, "replica_id", None)
        if rid is None:
            continue
        rid = (0, 0, rid) if isinstance(rid, int) else tuple(rid)
        value.replica_id = (*rid[:2], dp_replica)
    return sharded


def global_replica(groups: ExpertGroups) -> int:
    """A replica index unique over the expert-parallel x expert-data-parallel ranks: the DP part
    of the replica id of a tensor every one of them holds (one main copy is written)."""
    return group_rank(groups.ep) * groups.edp_size + group_rank(groups.edp)


def expert_sharded_tensor(tensor: torch.Tensor, key: str, sharded_offsets, groups: ExpertGroups,
                          *, expert_axis: int | None, tp_axis: int | None):
    """A ShardedTensor for an expert adapter tensor: ``expert_axis`` (local experts, contiguous
    per EP rank) sharded over EP, ``tp_axis`` over expert TP; replicated over expert DP (and over
    EP too when there is no expert axis: one main copy overall)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    prepend = len(sharded_offsets)
    offsets = list(sharded_offsets)
    if expert_axis is not None and groups.ep_size > 1:
        offsets.append((prepend + expert_axis, group_rank(groups.ep), groups.ep_size))
    if tp_axis is not None and groups.etp_size > 1:
        offsets.append((prepend + tp_axis, group_rank(groups.etp), groups.etp_size))
    tp_replica = 0 if tp_axis is not None else group_rank(groups.etp)
    dp_replica = group_rank(groups.edp) if expert_axis is not None else global_replica(groups)
    return ShardedTensor.from_rank_offsets(key, tensor, *offsets,
                                           replica_id=(0, tp_replica, dp_replica),
                                           prepend_axis_num=prepend)


def expert_shards(key: str, data: torch.Tensor, sharded_offsets, own_offsets, replica_id, *,
                  slots: tuple[int, int, int] | None = None, swiglu_axis: int | None = None):
    """The sharded form of one expert adapter tensor: a ShardedTensor, or a factory when the
    tensor is saved in pieces.

    Args:
        sharded_offsets: the caller's prepended offsets (layer, or SequentialMLP's expert axis).
        own_offsets: ``(axis of data, rank, fragments)`` of each sharded axis of ``data``.
        slots: ``(first, count, total)``: ``data`` is one tensor shared by ``count`` consecutive
            expert slots of ``total``; saved once per slot on a new leading expert axis
            (Megatron-Bridge's layout of a shared grouped-expert adapter, so expert parallelism
            can change between save and load). Loading takes the first slot: the copies are
            equal, and one copy is bitwise the saved tensor (a mean of the copies would not be).
        swiglu_axis: the axis of ``data`` holding [gate; up] halves (a gated fc1's B): each half
            is sharded on its own, as megatron saves fc1, so expert TP can change too.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    base = tuple(sharded_offsets)
    shift = 1 if slots is not None else 0
    prepend = len(base) + shift
    own = {axis: (rank, frag) for axis, rank, frag in own_offsets if frag > 1}

    def offsets_for(part: str | None) -> list[tuple[int, int, int]]:
        out = []
        for axis in sorted(set(own) | ({swiglu_axis} if part else set())):
            rank, frag = own.get(axis, (0, 1))
            if part is not None and axis == swiglu_axis:
                rank, frag = (rank if part == "w" else rank + frag), 2 * frag
            if frag > 1:
                out.append((prepend + axis, rank, frag))
        return out

    def one(name: str, t: torch.Tensor, part: str | None, slot: int | None, rid):
        lead = [] if slot is None else [(len(base), slot, slots[2])]
        return ShardedTensor.from_rank_offsets(name, t, *base, *lead, *offsets_for(part),
                                               replica_id=rid, prepend_axis_num=prepend)

    if slots is None and swiglu_axis is None:
        return one(key, data, None, None, replica_id)

    @torch.no_grad()
    def build(name, t, rid, flattened_range):
        # ``name`` is the factory's key at save/load time: megatron's modules rename keys after
        # the adapter made them (e.g. TEGroupedMLP's ``linear_fc1.`` -> ``...experts.linear_fc1.``)
        del flattened_range
        parts = [(None, t)] if swiglu_axis is None else list(zip("wv", t.chunk(2, swiglu_axis),
                                                                strict=True))
        slot_ids = [None] if slots is None else range(slots[0], slots[0] + slots[1])
        return [one(name, piece, part, slot, rid) for slot in slot_ids for part, piece in parts]

    def merge(loaded):
        loaded = list(loaded) if isinstance(loaded, (list, tuple)) else [loaded]
        per_slot = 1 if swiglu_axis is None else 2
        first = loaded[:per_slot]
        return first[0] if swiglu_axis is None else torch.cat(first, dim=swiglu_axis)

    return ShardedTensorFactory(key, data, build, merge, replica_id)


def _factories(tree) -> list:
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(tree, ShardedTensorFactory):
        return [tree]
    if isinstance(tree, dict):
        return [f for v in tree.values() for f in _factories(v)]
    if isinstance(tree, (list, tuple)):
        return [f for v in tree for f in _factories(v)]
    return []


def enable_legacy_shared_expert_adapter_loading(megatron_model, sharded_state_dict,
                                                checkpoint_path) -> bool:
    """Let a checkpoint written with the earlier 2-D layout of shared grouped-expert adapters load
    (Megatron-Bridge's name): the adapters whose tensors the checkpoint holds without the leading
    expert axis switch to that layout (``use_legacy_shared_expert_adapter_checkpoint``); build
    the sharded state dict again before loading.

    Args:
        megatron_model: the model (or its chunks) whose adapters ``sharded_state_dict`` describes.
        sharded_state_dict: its current (adapter) sharded state dict.
        checkpoint_path: the distributed checkpoint directory to inspect.

    Returns:
        True if at least one adapter was switched.
    """
    del megatron_model  # the factories name their adapters
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(checkpoint_path))
    enabled = False
    for factory in _factories(sharded_state_dict):
        ref = getattr(factory, "shared_expert_adapter", None)
        adapter = ref() if ref is not None else None
        saved = metadata.get(factory.key, metadata.get(f"model.{factory.key}"))
        if adapter is None or saved is None:
            continue
        built = factory.build()
        first = built[0] if isinstance(built, list) else built
        # the expert axis is the last of the prepended ones; the 2-D layout has none
        axis, shape = first.prepend_axis_num - 1, tuple(first.global_shape)
        if axis >= 0 and tuple(saved.global_shape) == shape[:axis] + shape[axis + 1:]:
            adapter.use_legacy_shared_expert_adapter_checkpoint = True
            enabled = True
    return enabled
