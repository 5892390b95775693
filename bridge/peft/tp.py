"""Tensor-parallel plumbing of the adapters, in one place: the group and size of a base or an
adapter, detached gathers for merges and norms, the base's own input/output communication that
the adapter layout leaves out, and the sequence helpers of Megatron-Bridge's ``peft.utils``
(``pad_seq_to_mult``, ``unpad_seq_to_mult``, ``all2all_hp2sp``).

Everything here works without megatron-core (TP size 1) and without an initialised process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "acc",
    "all2all_hp2sp",
    "base_tp_io",
    "default_tp_group",
    "gather_along_dim0",
    "group_size",
    "pad_seq_to_mult",
    "tp_group_and_size",
    "unpad_seq_to_mult",
]


def group_size(group) -> int:
    """World size of ``group``, read from the group itself (no global state): 1 without one."""
    if group is None:
        return 1
    size = getattr(group, "size", None)
    if callable(size):
        return int(size())
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def default_tp_group(is_expert: bool = False):
    """megatron's (expert) tensor-parallel group, or None when model parallelism is not set up."""
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if not dist.is_available() or not dist.is_initialized() \
            or not parallel_state.model_parallel_is_initialized():
        return None
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=False)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=False)


def tp_group_and_size(adapter: nn.Module) -> tuple[object | None, int]:
    """The tensor-parallel group of an adapter's factors and its size: (None, 1) for plain
    ``nn.Linear`` factors (a ``LinearAdapter``, or an adapter of a duplicated base)."""
    if not getattr(adapter, "_megatron", False):
        return None, 1
    group = getattr(adapter, "tp_group", None) or getattr(adapter.linear_in, "tp_group", None)
    if group is None:
        group = default_tp_group(bool(getattr(adapter, "is_expert", False)))
    return group, group_size(group)


def acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached in the accumulation dtype: fp32, or fp64 for fp64 tensors."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def gather_along_dim0(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """All-gather equal shards of ``t`` over ``group`` and concatenate them on dim 0 (no autograd:
    for merges and DoRA norms, which are detached)."""
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def base_tp_io(base: nn.Module, adapter: nn.Module) -> tuple[bool, bool, object]:
    """(scatter the adapter's input on K?, gather its output on N?, TP group): the base's own
    communication that the adapter layout leaves out. A megatron row base with
    ``input_is_parallel=False`` takes x whole and splits it itself; a column base with
    ``gather_output=True`` returns y whole. Both only matter at TP > 1."""
    if not getattr(adapter, "_megatron", False):
        return False, False, None
    group = getattr(base, "tp_group", None)
    if group_size(group) == 1:
        return False, False, None
    scatter_in = adapter.input_is_parallel and not getattr(base, "input_is_parallel", True)
    gather_out = not adapter.input_is_parallel and bool(getattr(base, "gather_output", False))
    return scatter_in, gather_out, group


# ---- sequence helpers (Megatron-Bridge's names) -------------------------------------------------
def pad_seq_to_mult(x: torch.Tensor, mult: int) -> tuple[torch.Tensor, int]:
    """Pad dim 0 of ``x`` with zero rows up to a multiple of ``mult``.

    Returns:
        (padded x, number of rows added).
    """
    if mult <= 0:
        raise ValueError(f"pad_seq_to_mult needs a positive multiple, got {mult}")
    pad = -x.shape[0] % mult
    if pad == 0:
        return x, 0
    return nn.functional.pad(x, (0,) * (2 * x.dim() - 1) + (pad,)), pad


def unpad_seq_to_mult(x: torch.Tensor, pad_len: int) -> torch.Tensor:
    """Drop the ``pad_len`` rows :func:`pad_seq_to_mult` added (dim 0)."""
    return x if pad_len <= 0 else x[: x.shape[0] - pad_len]


class _All2AllHp2Sp(torch.autograd.Function):
    """All-to-all from hidden-parallel [S, ..., H/tp] to sequence-parallel [S/tp, ..., H]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group, split_dim=0, cat_dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group, split_dim=-1, cat_dim=0), None


def _all_to_all(x: torch.Tensor, group, *, split_dim: int, cat_dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[split_dim] % size:
        raise ValueError(f"all2all_hp2sp: dim {split_dim} of {tuple(x.shape)} is not divisible by "
                         f"the tensor-parallel size {size}")
    send = [t.contiguous() for t in x.chunk(size, dim=split_dim)]
    recv = [torch.empty_like(send[0]) for _ in range(size)]
    dist.all_to_all(recv, send, group=group)
    return torch.cat(recv, dim=cat_dim)


def all2all_hp2sp(input_: torch.Tensor, tensor_parallel_group=None) -> torch.Tensor:
    """All-to-all from hidden-parallel to sequence-parallel layout: each rank's [S, ..., H/tp]
    becomes [S/tp, ..., H] (its sequence shard, every hidden column); the backward is the inverse
    all-to-all. ``tensor_parallel_group`` defaults to megatron's TP group."""
    group = tensor_parallel_group if tensor_parallel_group is not None else default_tp_group()
    return _All2AllHp2Sp.apply(input_, group)
