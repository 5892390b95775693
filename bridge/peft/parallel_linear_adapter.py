"""ParallelLinearAdapter: the low-rank adapter beside a (tensor-)parallel base linear.

Layout (Megatron-Bridge's): for a column-parallel base, ``linear_in`` (A, [r, K]) is a
ColumnParallelLinear split on r with its output gathered, ``linear_out`` (B, [N, r]) a
ColumnParallelLinear split on N like the base; for a row-parallel base (``input_is_parallel``),
``linear_in`` is a RowParallelLinear split on K (S all-reduced) and ``linear_out`` a
ColumnParallelLinear whose output is gathered. With sequence parallelism the column case gathers
the sequence before ``linear_in`` and the row case scatters it after ``linear_out``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["INIT_METHODS", "ParallelLinearAdapter", "get_init_fn"]

INIT_METHODS = ("xavier", "normal", "kaiming", "zero")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "swish": nn.functional.silu,
    "silu": nn.functional.silu,
    "relu": nn.functional.relu,
    "gelu": nn.functional.gelu,
}


def get_init_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The in-place initialiser for ``name`` in ``xavier|normal|kaiming|zero``."""
    if name == "xavier":
        return nn.init.xavier_normal_
    if name == "normal":
        return lambda w: nn.init.normal_(w, mean=0.0, std=0.2)
    if name == "kaiming":
        return lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    if name == "zero":
        return nn.init.zeros_
    raise ValueError(f"unknown init method {name!r}; expected one of {', '.join(INIT_METHODS)}")


def check_adapter_hparams(dim: int, alpha: float | None, dropout: float, dropout_position: str,
                          init_methods: tuple[str, ...] = ()) -> None:
    """The checks every adapter shares: each a ValueError naming the value and the allowed ones."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim (the LoRA rank) must be a positive int, got {dim!r}")
    if alpha is not None and (not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ValueError(f"alpha must be > 0 (or None for a scale of 1), got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if dropout_position not in ("pre", "post"):
        raise ValueError(f"unknown dropout_position {dropout_position!r}; expected 'pre' or 'post'")
    for name in init_methods:
        get_init_fn(name)


def check_lora_dtype(lora_dtype) -> None:
    """None or a floating torch.dtype, else a TypeError naming the value."""
    if lora_dtype is not None and not (isinstance(lora_dtype, torch.dtype)
                                       and lora_dtype.is_floating_point):
        raise TypeError(
            f"lora_dtype must be None or a floating torch.dtype (e.g. torch.bfloat16), "
            f"got {lora_dtype!r}"
        )


class ParallelLinearAdapter(nn.Module):
    """y = scale * B(act(A(dropout(x)))), with Megatron-Bridge's tensor-parallel layout.

    Args:
        in_features, out_features: the base linear's full (unpartitioned) sizes K and N.
        dim: the rank r. alpha: scale = alpha / dim (None: scale 1).
        base_linear_name: the wrapped module's full name (for messages and MoE detection).
        activation: 'identity' for LoRA.
        column_init_method, row_init_method: init of A (linear_in) and B (linear_out).
        input_is_parallel: the base is row-parallel (x arrives split on K).
        dropout, dropout_position: 'pre' (on x) or 'post' (on the adapter output).
        model_parallel_config: the base's megatron config (TP size, sequence parallel, dtype).
        disable_sequence_parallel_comm: skip the sequence gather/scatter (the base already
            returns a gathered layernorm output).
        base_linear_is_parallel: False for a duplicated (non-TP) base: plain nn.Linear factors.
        params_dtype: dtype of A and B (default: the config's params_dtype, else float32).
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
        dropout_position: str = "post",
        a2a_experimental: bool = False,
        is_expert: bool = False,
        disable_sequence_parallel_comm: bool = True,
        dropout_recompute: bool = False,
        base_linear_is_parallel: bool = True,
        params_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        check_adapter_hparams(dim, alpha, dropout, dropout_position,
                              (column_init_method, row_init_method))
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        if a2a_experimental:
            raise NotImplementedError("a2a_experimental (all-to-all expert adapters) is not supported")
        if is_expert:
            raise NotImplementedError(
                f"LoRA on MoE expert linear {base_linear_name!r} is not supported yet; "
                "leave it out with LoRA(exclude_modules=[...]) or target_modules"
            )
        if kwargs:
            raise TypeError(f"ParallelLinearAdapter got unexpected arguments: {sorted(kwargs)}")
        self.base_linear_name = base_linear_name
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.dim = dim
        self.alpha = alpha if alpha is not None else dim
        self.input_is_parallel = input_is_parallel
        self.dropout_position = dropout_position
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.dropout_recompute = dropout_recompute
        self.is_expert = is_expert
        self.disable_sequence_parallel_comm = disable_sequence_parallel_comm
        self.base_linear_is_parallel = base_linear_is_parallel
        self.in_features, self.out_features = in_features, out_features

        config = model_parallel_config
        # B of a gated fc1 adapter holds [gate; up] rows per rank, like the base: checkpoints
        # store it as megatron stores the base (swiglu factory), so it reshards across TP sizes.
        self.swiglu_output = (bool(getattr(config, "gated_linear_unit", False))
                              and base_linear_name.rsplit(".", 1)[-1] == "linear_fc1"
                              and not input_is_parallel)
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        dtype = params_dtype or getattr(config, "params_dtype", None) or torch.float32
        a_init, b_init = get_init_fn(column_init_method), get_init_fn(row_init_method)
        if not base_linear_is_parallel or config is None:
            self.linear_in = nn.Linear(in_features, dim, bias=False, dtype=dtype)
            self.linear_out = nn.Linear(dim, out_features, bias=False, dtype=dtype)
            with torch.no_grad():
                a_init(self.linear_in.weight)
                b_init(self.linear_out.weight)
            self._megatron = False
            if not base_linear_is_parallel and self.sequence_parallel:
                # A duplicated base sees this rank's sequence shard: megatron all-reduces over TP
                # the grads of parameters marked like this (as it marks the base's own weight).
                for p in (self.linear_in.weight, self.linear_out.weight):
                    p.sequence_parallel = True
            self.sequence_parallel = self.sequence_parallel and base_linear_is_parallel
            return

        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        # The adapter's own linears never do sequence-parallel communication: the gather/scatter
        # happens here, once, around them.
        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        cfg.params_dtype = dtype
        if not torch.cuda.is_available():
            cfg.use_cpu_initialization = True
        if input_is_parallel:
            self.linear_in = RowParallelLinear(
                in_features, dim, config=cfg, init_method=a_init, bias=False,
                input_is_parallel=True, skip_bias_add=True,
            )
        else:
            # With sequence parallelism x arrives through the sequence gather in forward, whose
            # backward reduce-scatter already sums dx over the TP ranks: no all-reduce here too.
            self.linear_in = ColumnParallelLinear(
                in_features, dim, config=cfg, init_method=a_init, bias=False, gather_output=True,
                disable_grad_reduce=self.sequence_parallel,
            )
        self.linear_out = ColumnParallelLinear(
            dim, out_features, config=cfg, init_method=b_init, bias=False,
            gather_output=input_is_parallel,
        )
        self._megatron = True

    @property
    def scale(self) -> float:
        """alpha / dim."""
        return self.alpha / self.dim

    def _linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = layer(x)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the base's input (or layernorm output) [..., K or K/tp]; returns [..., N or N/tp]."""
        if self.dropout is not None and self.dropout_position == "pre":
            x = self.dropout(x)
        x = self.lora_output(x)
        if self.dropout is not None and self.dropout_position == "post":
            x = self.dropout(x)
        return x

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """s · B(act(A(x))) without dropout, with the sequence-parallel gather/scatter."""
        if self._megatron and not self.disable_sequence_parallel_comm and not self.input_is_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            x = gather_from_sequence_parallel_region(x)
        x = self._linear(self.linear_in, x.to(self.linear_in.weight.dtype))
        # Everything after the activation is linear, so the scale goes on the [..., r]
        # intermediate instead of the [..., N] output: one pass over the output fewer.
        x = self._linear(self.linear_out, self.activation(x) * self.scale)
        if self._megatron and self.sequence_parallel and self.input_is_parallel:
            from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

            x = scatter_to_sequence_parallel_region(x)
        return x

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """linear_in's and linear_out's sharded tensors (replicated for plain nn.Linear)."""
        from bridge.peft.adapter_wrapper import _module_sharded_state_dict

        out = {}
        for name in ("linear_in", "linear_out"):
            out.update(_module_sharded_state_dict(getattr(self, name), f"{prefix}{name}.",
                                                  sharded_offsets, metadata))
        if self._megatron and self.swiglu_output:
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}linear_out.weight"
            out[key] = apply_swiglu_sharded_factory(
                out[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
        return out
