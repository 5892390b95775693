"""ParallelLinearAdapter: the low-rank adapter beside a (tensor-)parallel base linear.

Layout (Megatron-Bridge's): for a column-parallel base, ``linear_in`` (A, [r, K]) is a
ColumnParallelLinear split on r with its output gathered, ``linear_out`` (B, [N, r]) a
ColumnParallelLinear split on N like the base; for a row-parallel base (``input_is_parallel``),
``linear_in`` is a RowParallelLinear split on K (S all-reduced) and ``linear_out`` a
ColumnParallelLinear whose output is gathered. With sequence parallelism the column case gathers
the sequence before ``linear_in`` and the row case scatters it after ``linear_out`` (or, with
``a2a_experimental``, leaves B's output split on N and trades it for the sequence shard with one
all-to-all). A duplicated base (``base_linear_is_parallel=False``: TELinear, a ModelOpt linear, a
MoE router) gets plain ``nn.Linear`` factors.

A base that does no tensor-parallel communication itself (``is_expert``: MoE expert linears,
whose token dispatcher communicates; ``disable_tensor_parallel_comm``: shared experts with
``moe_shared_expert_overlap``) gets the same factors, but the adapter then computes its term in the
base's parallel state: the factor split on the base's contracted side is gathered (A for a
column base, B for a row base) and nothing else communicates (see ``expert_parallel``). Beside a
grouped expert linear (not under ``.local_experts.``) the adapter is shared by every expert of
the model: equal on every expert-parallel rank, its gradient summed over them, checkpointed with
Megatron-Bridge's expert axis (or, when ``use_legacy_shared_expert_adapter_checkpoint`` is set,
as the earlier 2-D tensor: see ``enable_legacy_shared_expert_adapter_loading``).

``sequence_parallel_input_regather``: the column case lets ``linear_in`` gather its
sequence-parallel input itself (megatron's sequence-parallel linear), which keeps only the local
shard for backward and gathers it again there: the gathered input is not held between forward and
backward.
"""

from __future__ import annotations

import copy
import inspect
import logging

import torch
from torch import nn

from bridge.peft.adapter_init import check_adapter_hparams, get_init_fn
from bridge.peft.dropout import adapter_dropout, dropout_p_property
from bridge.peft.errors import PEFTConfigError
from bridge.peft.expert_adapters import (
    check_explicit_comm_options,
    expert_sharded_state_dict,
    explicit_lora_output,
    finish_expert_adapter,
)
from bridge.peft.expert_parallel import expert_groups
from bridge.peft.tp import acc, all2all_hp2sp, default_tp_group, group_size

logger = logging.getLogger(__name__)

__all__ = ["ACTIVATIONS", "ParallelLinearAdapter"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}


def _tp_group_from(tp_group, pg_collection, config, is_expert: bool):
    """The adapter's TP group: the explicit one, else the collection's (``tp``, or ``expt_tp``
    for experts), else the config's collection, else megatron's default group."""
    if tp_group is not None:
        return tp_group
    names = ("expt_tp", "etp") if is_expert else ("tp",)
    for owner in (pg_collection, getattr(config, "pg_collection", None),
                  getattr(config, "_pg_collection", None)):
        for name in names:
            group = getattr(owner, name, None) if owner is not None else None
            if group is not None:
                return group
    return default_tp_group(is_expert)


class ParallelLinearAdapter(nn.Module):
    """y = scale * B(act(A(dropout(x)))), with Megatron-Bridge's tensor-parallel layout.

    Args:
        in_features, out_features: the base linear's full (unpartitioned) sizes K and N.
        dim: the rank r. base_linear_name: the wrapped module's full name.
        activation: 'identity' for LoRA (also relu, gelu, swish/silu, tanh, sigmoid).
        column_init_method, row_init_method: init of A (linear_in) and B (linear_out):
            'xavier' | 'normal' | 'kaiming' | 'uniform' | 'zero'.
        input_is_parallel: the base is row-parallel (x arrives split on K).
        dropout, dropout_position: 'pre' (on x) or 'post' (on the adapter output).
        model_parallel_config: the base's megatron config (TP size, sequence parallel, dtype).
        alpha: scale = alpha / dim (None: alpha = dim, a scale of 1).
        a2a_experimental: row case with sequence parallelism: one all-to-all instead of a gather
            and a scatter.
        is_expert: MoE expert linear (its TP group is the expert-TP group; see the module doc).
        disable_tensor_parallel_comm: the base does no TP communication itself (shared experts
            with overlap): the adapter's term stays a shard / partial sum like the base's.
        disable_sequence_parallel_comm: skip the sequence gather/scatter (the base already
            returns a gathered layernorm output).
        base_linear_is_parallel: False for a duplicated (non-TP) base: plain nn.Linear factors.
        pg_collection: a megatron ProcessGroupCollection; its ``tp`` group is the adapter's.
        sequence_parallel_input_regather: see the module docstring.
        params_dtype: dtype of A and B (default: the config's params_dtype, else float32).
        tp_group: the base's TP group (wins over ``pg_collection``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dim: int,
        base_linear_name: str = "",
        activation: str = "swish",
        column_init_method: str = "xavier",
        row_init_method: str = "zero",
        input_is_parallel: bool = False,
        dropout: float = 0.0,
        model_parallel_config=None,
        alpha: float | None = None,
        dropout_position: str = "pre",
        a2a_experimental: bool = False,
        is_expert: bool = False,
        disable_tensor_parallel_comm: bool = False,
        disable_sequence_parallel_comm: bool = True,
        base_linear_is_parallel: bool = True,
        pg_collection=None,
        sequence_parallel_input_regather: bool = False,
        *,
        params_dtype: torch.dtype | None = None,
        tp_group=None,
        dropout_recompute: bool = False,
    ) -> None:
        super().__init__()
        check_adapter_hparams(dim, alpha, dropout, dropout_position,
                              (column_init_method, row_init_method))
        if activation not in ACTIVATIONS:
            raise PEFTConfigError(
                f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        config = model_parallel_config
        self.base_linear_name = base_linear_name
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]()
        self.dim = dim
        self.alpha = alpha if alpha is not None else dim
        self.input_is_parallel = input_is_parallel
        self.dropout_position = dropout_position
        self.dropout = adapter_dropout(dropout)  # dropout_p reads its p (bridge.peft.dropout)
        self.dropout_recompute = dropout_recompute
        self.use_a2a = a2a_experimental
        self.is_expert = is_expert
        self.disable_tensor_parallel_comm = disable_tensor_parallel_comm
        self.base_linear_is_parallel = base_linear_is_parallel
        self.sequence_parallel_input_regather = sequence_parallel_input_regather
        self._regather_fallback_logged = False
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        self.pg_collection = pg_collection
        self.tp_group = _tp_group_from(tp_group, pg_collection, config, is_expert)
        # the base's own TP communication is elsewhere (expert dispatcher, shared-expert overlap)
        self.explicit_comm = bool(is_expert or disable_tensor_parallel_comm)
        self.use_legacy_shared_expert_adapter_checkpoint = False
        self.groups = expert_groups(pg_collection, config,
                                    etp=self.tp_group if is_expert else None)
        self.ep_group, self.expert_dp_group = self.groups.ep, self.groups.edp
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        # SP communication happens only for a parallel base with SP on (Megatron-Bridge's rule).
        self.disable_sequence_parallel_comm = (disable_sequence_parallel_comm
                                               or not self.sequence_parallel
                                               or not base_linear_is_parallel)
        # B of a gated fc1 adapter holds [gate; up] rows per rank, like the base: checkpoints
        # store it as megatron stores the base (swiglu factory), so it reshards across TP sizes.
        self.swiglu_output = (bool(getattr(config, "gated_linear_unit", False))
                              and base_linear_name.rsplit(".", 1)[-1] == "linear_fc1"
                              and not input_is_parallel)
        dtype = params_dtype or getattr(config, "params_dtype", None) or torch.float32
        a_init, b_init = get_init_fn(column_init_method), get_init_fn(row_init_method)
        if not base_linear_is_parallel or config is None:
            self._build_plain(dtype, a_init, b_init)
            return
        if self.explicit_comm:
            check_explicit_comm_options(base_linear_name, group_size(self.tp_group),
                                        input_is_parallel, activation, dropout_position, dropout)
        self._build_megatron(config, dtype, a_init, b_init)
        if is_expert:
            finish_expert_adapter(self)

    def _build_plain(self, dtype, a_init, b_init) -> None:
        self.linear_in = nn.Linear(self.in_features, self.dim, bias=False, dtype=dtype)
        self.linear_out = nn.Linear(self.dim, self.out_features, bias=False, dtype=dtype)
        with torch.no_grad():
            a_init(self.linear_in.weight)
            b_init(self.linear_out.weight)
        self._megatron = False
        if not self.base_linear_is_parallel and self.sequence_parallel:
            # A duplicated base sees this rank's sequence shard: megatron all-reduces over TP
            # the grads of parameters marked like this (as it marks the base's own weight).
            for p in (self.linear_in.weight, self.linear_out.weight):
                p.sequence_parallel = True
        self.sequence_parallel = self.sequence_parallel and self.base_linear_is_parallel

    def _build_megatron(self, config, dtype, a_init, b_init) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        # The adapter's own linears do no sequence-parallel communication: the gather/scatter
        # happens here, once, around them (the caller's config is copied, never modified).
        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        cfg.params_dtype = dtype
        cfg.perform_initialization = True
        if not torch.cuda.is_available():
            cfg.use_cpu_initialization = True
        common = dict(config=cfg, bias=False, tp_group=self.tp_group, is_expert=self.is_expert)
        if self.input_is_parallel:
            self.linear_in = RowParallelLinear(self.in_features, self.dim, init_method=a_init,
                                               input_is_parallel=True, skip_bias_add=True,
                                               **common)
        else:
            # With sequence parallelism x arrives through the sequence gather in forward, whose
            # backward reduce-scatter already sums dx over the TP ranks: no all-reduce here too.
            self.linear_in = ColumnParallelLinear(
                self.in_features, self.dim, init_method=a_init, gather_output=True,
                disable_grad_reduce=self.sequence_parallel, **common)
        a2a = self.use_a2a and self.input_is_parallel and not self.disable_sequence_parallel_comm
        self.linear_out = ColumnParallelLinear(
            self.dim, self.out_features, init_method=b_init,
            gather_output=self.input_is_parallel and not a2a, **common)
        self._megatron = True

    dropout_p = dropout_p_property()

    @property
    def scale(self) -> float:
        """alpha / dim."""
        return self.alpha / self.dim

    def _linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = layer(x)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x: the base's input (or layernorm output) [..., K or K/tp]; returns [..., N or N/tp].
        Extra arguments (the base's call arguments) are ignored."""
        del args, kwargs
        if self.dropout_position == "pre":
            x = self.dropout(x)
        x = self.lora_output(x)
        if self.dropout_position == "post":
            x = self.dropout(x)
        return x

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """s · B(act(A(x))) without dropout, with the sequence-parallel communication."""
        x = x.to(self.linear_in.weight.dtype)
        if self.explicit_comm and self._megatron:
            return explicit_lora_output(self, x)
        regather = self._use_regather()
        if self._megatron and not self.input_is_parallel:
            self.linear_in.sequence_parallel = regather  # megatron's SP linear gathers itself
            if not regather and not self.disable_sequence_parallel_comm:
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                x = gather_from_sequence_parallel_region(x, group=self.tp_group)
        x = self._linear(self.linear_in, x)
        # Everything after the activation is linear, so the scale goes on the [..., r]
        # intermediate instead of the [..., N] output: one pass over the output fewer.
        x = self._linear(self.linear_out, self.activation(x) * self.scale)
        if self._megatron and self.input_is_parallel and not self.disable_sequence_parallel_comm:
            if self.use_a2a:  # B's output is split on N: trade it for the sequence shard
                x = all2all_hp2sp(x, self.tp_group)
            else:
                from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

                x = scatter_to_sequence_parallel_region(x, group=self.tp_group)
        return x

    def local_experts_per_rank(self) -> int:
        """Global experts per expert-parallel rank (1 without ``num_moe_experts``).

        Raises:
            ValueError: ``num_moe_experts`` is not divisible by the expert-parallel size.
        """
        experts = getattr(self.config, "num_moe_experts", None)
        if experts is None:
            return 1
        ep = self.groups.ep_size
        if experts % ep:
            raise ValueError(f"num_moe_experts={experts} must be divisible by the expert-parallel "
                             f"size {ep}")
        return experts // ep

    def _uses_grouped_expert_sharding(self) -> bool:
        """Shared by every expert of a grouped expert linear (saved with an expert axis)."""
        from bridge.peft.utils import is_grouped_expert_linear

        return self.is_expert and self._megatron and is_grouped_expert_linear(
            self.base_linear_name)

    def _use_regather(self) -> bool:
        """Whether this forward lets linear_in gather (and re-gather in backward) its input."""
        ok, reason = self._sequence_parallel_input_regather_eligibility()
        if reason is not None and not self._regather_fallback_logged:
            logger.debug("sequence_parallel_input_regather off for %s: %s",
                         self.base_linear_name, reason)
            self._regather_fallback_logged = True
        return ok

    def _sequence_parallel_input_regather_eligibility(self, x: torch.Tensor | None = None
                                                      ) -> tuple[bool, str | None]:
        """(eligible, why not) for the regather path (Megatron-Bridge's name); the reason is
        None when it was not asked for or nothing is saved (eval, no grad)."""
        if not self.sequence_parallel_input_regather or not self._megatron:
            return False, None
        if not self.training or not torch.is_grad_enabled():
            return False, None
        from megatron.core.tensor_parallel.random import is_checkpointing

        cfg = self.config
        if is_checkpointing() or getattr(cfg, "recompute_granularity", None) == "full":
            return False, "activation recompute already re-runs the adapter"
        if self.input_is_parallel:
            return False, "the adapter is row-parallel"
        if self.disable_sequence_parallel_comm:
            return False, "no sequence-parallel communication (SP off, or the base gathers it)"
        if group_size(self.tp_group) <= 1:
            return False, "tensor-parallel size is 1"
        if not self.linear_in.weight.requires_grad:
            return False, "linear_in is frozen"
        if self.activation_name != "identity":
            return False, "the adapter activation is not identity"
        if getattr(cfg, "cpu_offloading", False) and getattr(cfg, "cpu_offloading_activations",
                                                              False):
            return False, "CPU activation offloading is on"
        return True, None

    @staticmethod
    def _get_init_fn(init_method: str):
        """The initialiser of ``init_method`` (Megatron-Bridge's method name; see get_init_fn)."""
        return get_init_fn(init_method)

    @staticmethod
    def _get_activation_fn(activation: str) -> nn.Module:
        """A fresh activation module for ``activation`` (Megatron-Bridge's method name)."""
        if activation not in ACTIVATIONS:
            raise PEFTConfigError(
                f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        return ACTIVATIONS[activation]()

    def delta_weight(self) -> torch.Tensor:
        """This rank's shard of s · B @ A (fp32, detached): [N/tp, K] beside a column-parallel
        base, [N, K/tp] beside a row-parallel one, [N, K] otherwise."""
        from bridge.peft.lora_merge import LoRAMerge

        if self.activation_name != "identity":
            raise NotImplementedError(
                f"adapter of {self.base_linear_name!r} has activation {self.activation_name!r}; "
                "only a linear (identity) adapter has a weight delta")
        with torch.no_grad():
            gather = None
            if self._megatron:
                gather = "linear_out" if self.input_is_parallel else "linear_in"
            return LoRAMerge.delta(acc(self.linear_out.weight), acc(self.linear_in.weight),
                                   self.scale, gather=gather,
                                   tp_group=self.tp_group if self._megatron else None)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None,
                           mamba_dim_info: dict | None = None) -> dict:
        """linear_in's and linear_out's sharded tensors (replicated for plain nn.Linear); B of a
        gated fc1 split per swiglu half, B of a Mamba in_proj per z/x/B/C/dt block."""
        from bridge.peft.adapter_wrapper import _module_sharded_state_dict

        if self._megatron and (metadata is None or "dp_cp_group" not in metadata):
            # megatron's linears read metadata['dp_cp_group']: a copy with it, for them only
            from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

            metadata = ensure_metadata_has_dp_cp_group(dict(metadata or {}))
        out = {}
        for name in ("linear_in", "linear_out"):
            out.update(_module_sharded_state_dict(getattr(self, name), f"{prefix}{name}.",
                                                  sharded_offsets, metadata))
        key = f"{prefix}linear_out.weight"
        if self._megatron and self.swiglu_output:
            out[key] = swiglu_factory(out[key], sharded_offsets, metadata, self.tp_group)
        if mamba_dim_info is not None and self._megatron:
            out[key] = mamba_in_proj_factory(out[key], mamba_dim_info)
        if self._uses_grouped_expert_sharding():
            out = expert_sharded_state_dict(self, out, prefix, sharded_offsets)
        return out


def swiglu_factory(sh_ten, sharded_offsets, metadata, tp_group):
    """megatron's ``apply_swiglu_sharded_factory`` with the TP/DP groups where its signature
    takes them (newer megatron-core, needed under FSDP2)."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    params = inspect.signature(apply_swiglu_sharded_factory).parameters
    kwargs = {}
    if "singleton_local_shards" in params:
        kwargs["singleton_local_shards"] = (metadata or {}).get("singleton_local_shards", False)
    if "tp_group" in params:
        kwargs["tp_group"] = tp_group
    if "dp_group" in params:
        kwargs["dp_group"] = (metadata or {}).get("dp_cp_group")
    return apply_swiglu_sharded_factory(sh_ten, sharded_offsets, **kwargs)


def mamba_in_proj_factory(sh_ten, info: dict):
    """Split a Mamba in_proj adapter's B ([z; x; B; C; dt] rows per rank) into its five blocks,
    as megatron's MambaMixer saves in_proj, so the checkpoint reshards across TP sizes."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.ssm.mamba_mixer import _split_tensor_factory

    d, g, s, h = (info["d_inner_local_tp"], info["ngroups_local_tp"], info["d_state"],
                  info["nheads_local_tp"])
    if not isinstance(sh_ten, ShardedTensor) or sh_ten.data.shape[0] != 2 * d + 2 * g * s + h:
        return sh_ten
    return _split_tensor_factory(sh_ten, [d, d, g * s, g * s, h], ["z", "x", "B", "C", "dt"], 0)
