"""MoE expert adapters (Megatron-Bridge's ``peft.utils`` names): ``GroupedExpertLinearAdapter`` (one
low-rank pair per local expert of a grouped expert linear), ``SharedOuterGroupedExpertAdapter``
(fc1: A shared, B per expert; fc2: A per expert, B shared: SGLang's ``experts_shared_outer_loras``
serving layout), ``PackedPerExpertLinear`` (its per-expert side) and the expert path of
``ParallelLinearAdapter`` (one adapter per SequentialMLP expert linear, or one shared by all the
experts of a grouped linear).

Every adapter here computes only the low-rank term, in its base's parallel state (see
``expert_parallel``): tokens arrive sorted by local expert with the base's ``m_splits``; the
factor split on the contracted side of the base is gathered over expert TP (A for fc1, B for
fc2) and nothing else communicates. ``grouped_factors()`` returns the factors in the shapes
``bridge.kernels.grouped_lora_linear`` takes (2-D: shared, 3-D: per expert), for the fused path.

Shapes (E local experts, expert-TP size t; in/out features are the base's full sizes):

    layout                   fc1 (column base)              fc2 (row base)
    shared (default)         A [r/t, K]     B [N/t, r]      A [r, K/t]     B [N/t, r]
    per expert               A [E, r/t, K]  B [E, N/t, r]   A [E, r, K/t]  B [E, N/t, r]
    shared outer             A [r/t, K]     B [E, N/t, r]   A [E, r, K/t]  B [N/t, r]
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bridge.peft.adapter_init import check_adapter_hparams, get_init_fn
from bridge.peft.dropout import adapter_dropout, dropout_p_property
from bridge.peft.errors import PEFTConfigError
from bridge.peft.expert_parallel import (
    broadcast_from_first,
    expert_dp_allreduce_flag,
    expert_groups,
    expert_shards,
    gather_factor,
    global_replica,
    group_rank,
    sum_grad_over,
)
from bridge.peft.tp import acc, group_size

__all__ = ["GroupedExpertLinearAdapter", "PackedPerExpertLinear",
           "SharedOuterGroupedExpertAdapter", "check_explicit_comm_options", "expert_splits",
           "expert_sharded_state_dict", "explicit_factors", "explicit_lora_output",
           "finish_expert_adapter", "grouped_lowrank"]


# ---- shared helpers -----------------------------------------------------------------------------
def expert_splits(name: str, n_experts: int, args: tuple, kwargs: dict) -> list[int]:
    """Tokens per local expert from a grouped base's call arguments (``m_splits`` /
    ``tokens_per_expert`` keyword, else the first positional argument).

    Raises:
        ValueError: none given, the wrong number, or a negative count.
    """
    splits = kwargs.get("m_splits", kwargs.get("tokens_per_expert"))
    if splits is None and args:
        splits = args[0]
    if splits is None:
        raise ValueError(f"{name}: per-expert LoRA needs the grouped base's token splits "
                         "(m_splits / tokens_per_expert)")
    splits = splits.tolist() if isinstance(splits, torch.Tensor) else [int(c) for c in splits]
    if len(splits) != n_experts or any(c < 0 for c in splits):
        raise ValueError(f"{name}: expected {n_experts} non-negative expert splits, got {splits}")
    return splits


def grouped_lowrank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, counts: list[int],
                    scale: float, activation: Callable) -> torch.Tensor:
    """scale * B_e(act(A_e x_e)) for tokens sorted by expert ([M, K] -> [M, N]); a 2-D factor is
    shared by every expert. Every expert's factors stay in the graph even without tokens (their
    gradient is then 0), so collectives in their backward run on every rank."""
    x2 = x.reshape(-1, x.shape[-1])
    if a.dim() == 2 and b.dim() == 2:
        return F.linear(activation(F.linear(x2, a)) * scale, b)
    s_all = F.linear(x2, a) if a.dim() == 2 else None
    outs, start = [], 0
    for e, c in enumerate(counts):
        rows = slice(start, start + c)
        start += c
        s = s_all[rows] if s_all is not None else F.linear(x2[rows], a[e])
        outs.append(F.linear(activation(s) * scale, b[e] if b.dim() == 3 else b))
    return torch.cat(outs) if outs else x2.new_zeros((0, b.shape[-2]))


def check_explicit_comm_options(name: str, tp: int, input_is_parallel: bool, activation: str,
                                dropout_position: str, dropout: float) -> None:
    """What the explicit-communication layout cannot do at expert-TP > 1 beside a row base (its
    S and output are partial sums over ranks): a non-linear activation, or 'post' dropout.

    Raises:
        PEFTConfigError: either is asked for (the message says what works).
    """
    if tp <= 1 or not input_is_parallel:
        return
    if activation != "identity":
        raise PEFTConfigError(
            f"{name}: activation {activation!r} beside a row-parallel expert linear at expert "
            "tensor-parallel size > 1 acts on partial sums; use activation='identity' (LoRA)")
    if dropout > 0 and dropout_position == "post":
        raise PEFTConfigError(
            f"{name}: dropout_position='post' beside a row-parallel expert linear at expert "
            "tensor-parallel size > 1 would mask partial sums with different masks; use 'pre'")


def _init_slices(weight: torch.Tensor, full_shape: tuple[int, int], init, tp_dim: int | None,
                 rank: int, tp: int) -> None:
    """Each expert's [rows, cols] factor drawn whole with ``init`` (as megatron draws a master
    weight) and this rank's ``tp_dim`` shard kept."""
    with torch.no_grad():
        for e in range(weight.shape[0]):
            full = torch.empty(full_shape, dtype=torch.float32)
            init(full)
            if tp_dim is not None and tp > 1:
                full = full.chunk(tp, dim=tp_dim)[rank]
            weight[e].copy_(full.to(weight.dtype))


class _GroupedExpertAdapterWeight(nn.Module):
    """A parameter in a module (``linear_in`` / ``linear_out``), so keys read ``.weight`` and a
    DDP forward pre-hook on the module sees it. ``forward(indices)`` returns those experts."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, indices=None) -> torch.Tensor:
        return self.weight if indices is None else self.weight[indices]


class _ExpertAdapterBase(nn.Module):
    """Attributes and plumbing shared by the grouped expert adapters."""

    is_expert = True
    _megatron = False
    dropout_p = dropout_p_property()

    def _setup(self, in_features, out_features, dim, *, num_local_experts, base_linear_name,
               activation, column_init_method, row_init_method, input_is_parallel, dropout,
               model_parallel_config, alpha, dropout_position, base_linear_is_parallel,
               pg_collection, tp_group, params_dtype) -> torch.dtype:
        """The shared part of both grouped adapters' constructors; returns the factors' dtype."""
        from bridge.peft.parallel_linear_adapter import ACTIVATIONS

        check_adapter_hparams(dim, alpha, dropout, dropout_position,
                              (column_init_method, row_init_method))
        if activation not in ACTIVATIONS:
            raise PEFTConfigError(
                f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        if num_local_experts < 1:
            raise PEFTConfigError(f"{base_linear_name}: num_local_experts must be >= 1, got "
                                  f"{num_local_experts}")
        self.base_linear_name = base_linear_name
        self.in_features, self.out_features, self.dim = in_features, out_features, dim
        self.alpha = alpha if alpha is not None else dim
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]()
        self.input_is_parallel = input_is_parallel
        self.dropout_position = dropout_position
        self.dropout = adapter_dropout(dropout)  # dropout_p reads its p (bridge.peft.dropout)
        self.base_linear_is_parallel = base_linear_is_parallel
        self.num_local_experts = num_local_experts
        self.config = model_parallel_config
        self.pg_collection = pg_collection
        self.groups = expert_groups(pg_collection, model_parallel_config, etp=tp_group)
        self.tp_group = self.expert_tp_group = self.groups.etp
        self.ep_group, self.expert_dp_group = self.groups.ep, self.groups.edp
        self.tp_size = group_size(self.tp_group)
        check_explicit_comm_options(base_linear_name, self.tp_size, input_is_parallel, activation,
                                    dropout_position, dropout)
        self._a_init, self._b_init = get_init_fn(column_init_method), get_init_fn(row_init_method)
        return params_dtype or getattr(model_parallel_config, "params_dtype", None) \
            or torch.float32

    @property
    def scale(self) -> float:
        """alpha / dim."""
        return self.alpha / self.dim

    def _tp_split(self, size: int, what: str) -> int:
        if size % self.tp_size:
            raise PEFTConfigError(f"{self.base_linear_name}: {what}={size} is not divisible by "
                                  f"the expert tensor-parallel size {self.tp_size}")
        return size // self.tp_size

    def _mark(self, weight: torch.Tensor, tp_dim: int | None) -> None:
        """megatron's DDP and grad-norm attributes of an expert adapter parameter."""
        weight.allreduce = expert_dp_allreduce_flag(self.groups)
        if tp_dim is not None:
            from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

            set_tensor_model_parallel_attributes(weight, True, tp_dim, 1)

    def _per_expert_weight(self, rows, cols, init, split_dim, dtype, device) -> torch.Tensor:
        """[E, rows(/t), cols(/t)] for ``split_dim`` (0 rows, 1 cols) drawn per expert."""
        shape = [self.num_local_experts, rows, cols]
        shape[1 + split_dim] = self._tp_split(shape[1 + split_dim], ("rows", "cols")[split_dim])
        w = torch.empty(shape, dtype=dtype, device=device)
        _init_slices(w, (rows, cols), init, split_dim, group_rank(self.tp_group), self.tp_size)
        return w

    def _whole(self, t: torch.Tensor, dim: int, shared: bool) -> torch.Tensor:
        """A factor as the math needs it: summed over EP when shared by every expert, gathered
        over expert TP on ``dim`` (None: kept split)."""
        if shared:
            t = sum_grad_over(t, self.ep_group)
        return gather_factor(t, dim, self.tp_group) if dim is not None else t

    def grouped_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in grouped_lora_linear's shapes, differentiable (gathers and EP sums in)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The low-rank term [M, N/t] of tokens x [M, K or K/t] sorted by local expert (the base's
        ``m_splits`` in ``args`` / ``kwargs``)."""
        counts = expert_splits(self.base_linear_name, self.num_local_experts, args, kwargs)
        if sum(counts) != x.reshape(-1, x.shape[-1]).shape[0]:
            raise ValueError(f"{self.base_linear_name}: expert splits sum to {sum(counts)} but "
                             f"x has {x.reshape(-1, x.shape[-1]).shape[0]} tokens")
        if self.dropout_position == "pre":
            x = self.dropout(x)
        a, b = self.grouped_factors()
        out = grouped_lowrank(x.to(a.dtype), a, b, counts, self.scale, self.activation)
        if self.dropout_position == "post":
            out = self.dropout(out)
        return out.view(*x.shape[:-1], out.shape[-1])

    def delta_weights(self) -> torch.Tensor:
        """s · B_e @ A_e per local expert, this rank's shard [E, N/t, K or K/t] (fp32, detached)."""
        if self.activation_name != "identity":
            raise NotImplementedError(f"adapter of {self.base_linear_name!r} has activation "
                                      f"{self.activation_name!r}: no weight delta")
        with torch.no_grad():
            a, b = (acc(t) for t in self.grouped_factors())
            a = a.expand(self.num_local_experts, *a.shape) if a.dim() == 2 else a
            b = b.expand(self.num_local_experts, *b.shape) if b.dim() == 2 else b
            return self.scale * torch.bmm(b, a)

    def _gated(self) -> bool:
        return bool(getattr(self.config, "gated_linear_unit", False)) \
            and self.base_linear_name.rsplit(".", 1)[-1] == "linear_fc1" \
            and not self.input_is_parallel

    def _local_experts(self) -> tuple[int, int]:
        """(first global expert of this EP rank, global experts)."""
        ep = self.groups.ep_size
        return group_rank(self.ep_group) * self.num_local_experts, ep * self.num_local_experts

    def _sharded(self, key: str, t: torch.Tensor, sharded_offsets, *, per_expert: bool,
                 tp_dim: int | None, swiglu_axis: int | None = None):
        """An expert-axis (per expert: EP-sharded dim 0) or globally shared tensor's shards."""
        own = []
        lead = 1 if per_expert else 0
        if per_expert and self.groups.ep_size > 1:
            own.append((0, group_rank(self.ep_group), self.groups.ep_size))
        if tp_dim is not None and self.tp_size > 1:
            own.append((lead + tp_dim, group_rank(self.tp_group), self.tp_size))
        tp_rep = 0 if tp_dim is not None else group_rank(self.tp_group)
        dp_rep = group_rank(self.expert_dp_group) if per_expert else global_replica(self.groups)
        return expert_shards(key, t, sharded_offsets, own, (0, tp_rep, dp_rep),
                             swiglu_axis=swiglu_axis)


class GroupedExpertLinearAdapter(_ExpertAdapterBase):
    """One low-rank pair per local expert of a grouped expert linear (``share_expert_adapters=
    False``): A and B are [E, ...] (see the module docstring), checkpointed with the global expert
    axis sharded over EP, so expert parallelism (and expert TP) can change between save and load.

    Args: ParallelLinearAdapter's, plus ``num_local_experts`` (the base's ``num_gemms``),
    ``params_device``, ``params_dtype`` and ``tp_group`` (the base's expert-TP group).
    """

    def __init__(self, in_features: int, out_features: int, dim: int, *, num_local_experts: int,
                 base_linear_name: str, activation: str = "swish",
                 column_init_method: str = "xavier", row_init_method: str = "zero",
                 input_is_parallel: bool = False, dropout: float = 0.0,
                 model_parallel_config=None, alpha: float | None = None,
                 dropout_position: str = "pre", base_linear_is_parallel: bool = True,
                 params_device: torch.device | None = None,
                 params_dtype: torch.dtype | None = None, pg_collection=None,
                 tp_group=None) -> None:
        super().__init__()
        dtype = self._setup(in_features, out_features, dim, num_local_experts=num_local_experts,
                            base_linear_name=base_linear_name, activation=activation,
                            column_init_method=column_init_method,
                            row_init_method=row_init_method, input_is_parallel=input_is_parallel,
                            dropout=dropout, model_parallel_config=model_parallel_config,
                            alpha=alpha, dropout_position=dropout_position,
                            base_linear_is_parallel=base_linear_is_parallel,
                            pg_collection=pg_collection, tp_group=tp_group,
                            params_dtype=params_dtype)
        # column: A split on r (gathered), B on N; row: A split on K, B on N (gathered)
        a_split = 1 if input_is_parallel else 0
        self._a_tp_dim = 1 + a_split
        self.linear_in = _GroupedExpertAdapterWeight(self._per_expert_weight(
            dim, in_features, self._a_init, a_split, dtype, params_device))
        self.linear_out = _GroupedExpertAdapterWeight(self._per_expert_weight(
            out_features, dim, self._b_init, 0, dtype, params_device))
        self._mark(self.linear_in.weight, self._a_tp_dim)
        self._mark(self.linear_out.weight, 1)

    def grouped_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.linear_in(), self.linear_out()
        if self.input_is_parallel:
            return a, self._whole(b, 1, shared=False)
        return self._whole(a, 1, shared=False), b

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """linear_in / linear_out as [E_global, ...] tensors (EP on the expert axis, expert TP on
        the split axis, a gated fc1's B saved gate and up halves apart)."""
        del metadata
        return {
            f"{prefix}linear_in.weight": self._sharded(
                f"{prefix}linear_in.weight", self.linear_in.weight, sharded_offsets,
                per_expert=True, tp_dim=self._a_tp_dim - 1),
            f"{prefix}linear_out.weight": self._sharded(
                f"{prefix}linear_out.weight", self.linear_out.weight, sharded_offsets,
                per_expert=True, tp_dim=0, swiglu_axis=1 if self._gated() else None),
        }


class PackedPerExpertLinear(nn.Module):
    """A per-expert linear with one packed [E, out, in] weight (the per-expert side of
    ``SharedOuterGroupedExpertAdapter``): ``forward(x, m_splits)`` -> ``(y, None)``."""

    def __init__(self, num_local_experts: int, in_features: int, out_features: int, *,
                 init_method: Callable | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.num_local_experts, self.in_features, self.out_features = (
            num_local_experts, in_features, out_features)
        weight = torch.zeros(num_local_experts, out_features, in_features, dtype=dtype,
                             device=device)
        if init_method is not None:
            _init_slices(weight, (out_features, in_features), init_method, None, 0, 1)
        self.weight = nn.Parameter(weight)
        self.weight.allreduce = False  # experts differ across EP ranks: expert-DP reduction

    def forward(self, x: torch.Tensor, m_splits) -> tuple[torch.Tensor, None]:
        counts = expert_splits("PackedPerExpertLinear", self.num_local_experts, (m_splits,), {})
        parts = torch.split(x.reshape(-1, self.in_features), counts)
        out = torch.cat([F.linear(p, self.weight[e]) for e, p in enumerate(parts)])
        return out.view(*x.shape[:-1], self.out_features), None


class SharedOuterGroupedExpertAdapter(_ExpertAdapterBase):
    """Shared-outer grouped-expert LoRA (``experts_shared_outer_loras=True``): fc1 shares A (hidden
    -> rank) and keeps B per expert; fc2 keeps A per expert and shares B (rank -> hidden). The
    shared side is one tensor for the whole model (synchronised over EP, gradient summed over
    EP), the per-expert side a ``PackedPerExpertLinear``. Arguments as GroupedExpertLinearAdapter.
    """

    def __init__(self, in_features: int, out_features: int, dim: int, *, num_local_experts: int,
                 base_linear_name: str, activation: str = "swish",
                 column_init_method: str = "xavier", row_init_method: str = "zero",
                 input_is_parallel: bool = False, dropout: float = 0.0,
                 model_parallel_config=None, alpha: float | None = None,
                 dropout_position: str = "pre", base_linear_is_parallel: bool = True,
                 params_device: torch.device | None = None,
                 params_dtype: torch.dtype | None = None, pg_collection=None,
                 tp_group=None) -> None:
        super().__init__()
        dtype = self._setup(in_features, out_features, dim, num_local_experts=num_local_experts,
                            base_linear_name=base_linear_name, activation=activation,
                            column_init_method=column_init_method,
                            row_init_method=row_init_method, input_is_parallel=input_is_parallel,
                            dropout=dropout, model_parallel_config=model_parallel_config,
                            alpha=alpha, dropout_position=dropout_position,
                            base_linear_is_parallel=base_linear_is_parallel,
                            pg_collection=pg_collection, tp_group=tp_group,
                            params_dtype=params_dtype)
        self._is_fc1 = not input_is_parallel
        rank, tp = group_rank(self.tp_group), self.tp_size
        if self._is_fc1:  # A [r/t, K] shared; B [E, N/t, r] per expert
            shared = self._shared_weight(dim, in_features, self._a_init, dtype, params_device)
            self.linear_in = _GroupedExpertAdapterWeight(shared)
            per = PackedPerExpertLinear(num_local_experts, dim, self._tp_split(out_features, "N"),
                                        dtype=dtype, device=params_device)
            _init_slices(per.weight.data, (out_features, dim), self._b_init, 0, rank, tp)
            self.linear_out = per
        else:  # A [E, r, K/t] per expert; B [N/t, r] shared
            per = PackedPerExpertLinear(num_local_experts, self._tp_split(in_features, "K"), dim,
                                        dtype=dtype, device=params_device)
            _init_slices(per.weight.data, (dim, in_features), self._a_init, 1, rank, tp)
            self.linear_in = per
            shared = self._shared_weight(out_features, dim, self._b_init, dtype, params_device)
            self.linear_out = _GroupedExpertAdapterWeight(shared)
        shared = self.linear_in if self._is_fc1 else self.linear_out
        broadcast_from_first([shared.weight], self.ep_group)
        self._mark(self.linear_in.weight, 0 if self._is_fc1 else 2)
        self._mark(self.linear_out.weight, 1 if self._is_fc1 else 0)

    def _shared_weight(self, rows, cols, init, dtype, device) -> torch.Tensor:
        w = torch.empty(1, self._tp_split(rows, "rows"), cols, dtype=dtype, device=device)
        _init_slices(w, (rows, cols), init, 0, group_rank(self.tp_group), self.tp_size)
        return w[0]

    def grouped_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.linear_in.weight, self.linear_out.weight
        if self._is_fc1:  # the shared A, gathered on r
            return self._whole(a, 0, shared=True), b
        return a, self._whole(b, 0, shared=True)  # the shared B, gathered on N

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """The shared side as one replicated 2-D tensor (expert TP split), the per-expert side as
        an [E_global, ...] tensor (a gated fc1's B saved gate and up halves apart)."""
        del metadata
        a_key, b_key = f"{prefix}linear_in.weight", f"{prefix}linear_out.weight"
        if self._is_fc1:
            return {a_key: self._sharded(a_key, self.linear_in.weight, sharded_offsets,
                                         per_expert=False, tp_dim=0),
                    b_key: self._sharded(b_key, self.linear_out.weight, sharded_offsets,
                                         per_expert=True, tp_dim=0,
                                         swiglu_axis=1 if self._gated() else None)}
        return {a_key: self._sharded(a_key, self.linear_in.weight, sharded_offsets,
                                     per_expert=True, tp_dim=1),
                b_key: self._sharded(b_key, self.linear_out.weight, sharded_offsets,
                                     per_expert=False, tp_dim=0)}



# ---- the expert path of ParallelLinearAdapter ---------------------------------------------------
def finish_expert_adapter(adapter: nn.Module) -> None:
    """After a ParallelLinearAdapter(is_expert=True) built its megatron factors: megatron DDP's
    reduction flag, and equal factors on every EP rank for one shared by every expert."""
    flag = expert_dp_allreduce_flag(adapter.groups)
    weights = [adapter.linear_in.weight, adapter.linear_out.weight]
    for w in weights:
        w.allreduce = flag
    if adapter._uses_grouped_expert_sharding():
        broadcast_from_first(weights, adapter.ep_group)


def explicit_factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a ParallelLinearAdapter whose base communicates elsewhere, as its term needs
    them: A gathered on r beside a column base, B gathered on N beside a row base (backward
    reduce-scatter), summed over EP first when the adapter is shared by every expert."""
    a, b = adapter.linear_in.weight, adapter.linear_out.weight
    if adapter._uses_grouped_expert_sharding():
        a, b = sum_grad_over(a, adapter.ep_group), sum_grad_over(b, adapter.ep_group)
    if adapter.input_is_parallel:
        return a, gather_factor(b, 0, adapter.tp_group)
    return gather_factor(a, 0, adapter.tp_group), b


def explicit_lora_output(adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """s · B(act(A x)) in the base's parallel state: this rank's N shard beside a column base, a
    partial sum over expert-TP ranks beside a row base (the dispatcher sums both with the base's).
    """
    a, b = explicit_factors(adapter)
    return F.linear(adapter.activation(F.linear(x, a)) * adapter.scale, b)


def expert_sharded_state_dict(adapter: nn.Module, sharded: dict, prefix: str,
                              sharded_offsets) -> dict:
    """A shared grouped-expert adapter's factors with the global expert axis (one copy per
    expert slot of this EP rank, Megatron-Bridge's layout), or, with
    ``use_legacy_shared_expert_adapter_checkpoint``, as 2-D tensors replicated over EP (the
    earlier layout, for loading old checkpoints). ``_extra_state`` keeps one main replica."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    groups = adapter.groups
    tp, tp_rank = group_size(adapter.tp_group), group_rank(adapter.tp_group)
    for key, value in list(sharded.items()):
        if isinstance(value, ShardedObject):
            rid = tuple(value.replica_id)
            value.replica_id = (*rid[:2], global_replica(groups))
            continue
        if not key.endswith(("linear_in.weight", "linear_out.weight")):
            continue
        data = value.data
        is_in = key.endswith("linear_in.weight")
        axis = (1 if adapter.input_is_parallel else 0) if is_in else 0
        own = [(axis, tp_rank, tp)] if tp > 1 else []
        swiglu = 0 if not is_in and adapter.swiglu_output else None
        if adapter.use_legacy_shared_expert_adapter_checkpoint:
            sharded[key] = expert_shards(key, data, sharded_offsets, own,
                                         (0, 0, global_replica(groups)), swiglu_axis=swiglu)
            continue
        per_rank = adapter.local_experts_per_rank()
        slots = (group_rank(adapter.ep_group) * per_rank, per_rank, per_rank * groups.ep_size)
        shards = expert_shards(key, data, sharded_offsets, own,
                               (0, 0, group_rank(adapter.expert_dp_group)), slots=slots,
                               swiglu_axis=swiglu)
        # which adapter wrote it, for enable_legacy_shared_expert_adapter_loading (a weak
        # reference: deep copies of the state dict must not copy the module)
        shards.shared_expert_adapter = weakref.ref(adapter)
        sharded[key] = shards
    return sharded
