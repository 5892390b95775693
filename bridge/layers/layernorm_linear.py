"""LayerNormColumnParallelLinear: a column-parallel linear with a LayerNorm/RMSNorm in front.

Built on megatron-core's ``ColumnParallelLinear`` with the constructor and the return patterns
of megatron's transformer-engine wrapper (``TELayerNormColumnParallelLinear``), so users without
transformer-engine get the norm-fused patterns (and the norm-fused LoRA kernels) through it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

try:
    from megatron.core.tensor_parallel import ColumnParallelLinear
except ImportError as _exc:  # megatron-core is an optional dependency
    _IMPORT_ERROR: ImportError | None = _exc

    class ColumnParallelLinear(nn.Module):  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError(
                "LayerNormColumnParallelLinear needs megatron-core: pip install 'megatron-core>=0.16'"
            ) from _IMPORT_ERROR
else:
    _IMPORT_ERROR = None

# megatron-core 0.18 added ``name`` (the module's dotted path) to ColumnParallelLinear; its
# attention and MLP pass it to every linear they build. Forward it only where the base takes it.
_BASE_TAKES_NAME = "name" in inspect.signature(ColumnParallelLinear.__init__).parameters

__all__ = ["LayerNormColumnParallelLinear", "NORMALIZATIONS"]

NORMALIZATIONS = ("LayerNorm", "RMSNorm")


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """norm(x) followed by a column-parallel linear.

    Returns, per ``skip_bias_add`` and the ``return_layernorm_output`` attribute (which LoRA sets,
    as it does for transformer-engine): ``(out, None)``, ``(out, bias)``, ``((out, ln_out), None)``
    or ``(out, bias, ln_out)``. The norm parameters are ``layer_norm_weight`` and (LayerNorm only)
    ``layer_norm_bias``, transformer-engine's names, so checkpoints interchange.

    The constructor takes what megatron-core's attention (``linear_qkv``) and MLP (``linear_fc1``)
    pass to a spec'd linear, on every supported version: ``stride`` (2 for the gated fc1, forwarded
    so the weight's ``partition_stride`` matches megatron's own fc1) and ``name`` (0.18 and newer;
    forwarded where the base class takes it). ``get_gpt_layer_norm_linear_spec`` builds a GPT layer
    spec with this class in both places.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method: Callable[[torch.Tensor], torch.Tensor],
        gather_output: bool,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool = False,
        skip_weight_param_allocation: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group=None,
        stride: int = 1,
        name: str | None = None,
    ) -> None:
        if gather_output:
            raise ValueError("LayerNormColumnParallelLinear does not support gather_output=True "
                             "(transformer-engine's layer does not either)")
        if skip_weight_param_allocation:
            raise ValueError("LayerNormColumnParallelLinear does not support "
                             "skip_weight_param_allocation=True")
        normalization = getattr(config, "normalization", "LayerNorm")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown config.normalization {normalization!r}; expected one of "
                f"{', '.join(NORMALIZATIONS)}"
            )
        eps = getattr(config, "layernorm_epsilon", 1e-5)
        if not eps > 0:
            raise ValueError(f"config.layernorm_epsilon must be > 0, got {eps!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        extra = {"name": name} if _BASE_TAKES_NAME else {}
        super().__init__(
            input_size, output_size, config=config, init_method=init_method, bias=bias,
            gather_output=False, skip_bias_add=skip_bias_add, is_expert=is_expert,
            tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group, stride=stride, **extra,
        )
        self.normalization = normalization
        self.eps = float(eps)
        self.zero_centered_gamma = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        device = None if torch.cuda.is_available() and not config.use_cpu_initialization else "cpu"
        gamma_init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.layer_norm_weight = nn.Parameter(
            gamma_init(input_size, dtype=config.params_dtype, device=device)
        )
        if normalization == "LayerNorm":
            self.layer_norm_bias = nn.Parameter(
                torch.zeros(input_size, dtype=config.params_dtype, device=device)
            )
        else:
            self.register_parameter("layer_norm_bias", None)
        for p in (self.layer_norm_weight, self.layer_norm_bias):
            if p is not None:
                # Replicated across TP ranks; with sequence parallelism its grads need the
                # all-reduce megatron applies to parameters marked this way.
                p.sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        self.return_layernorm_output = False
        self.return_layernorm_output_gathered = False

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The normalisation in front of the linear (eager, fp32 statistics)."""
        from bridge.kernels.norm_lora import norm_ref

        return norm_ref(x, self.layer_norm_weight, self.layer_norm_bias,
                        normalization=self.normalization, eps=self.eps,
                        zero_centered_gamma=self.zero_centered_gamma)

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        ln_out = self.norm(input_)
        out, bias = super().forward(ln_out, *args, **kwargs)
        if not self.return_layernorm_output:
            return out, bias
        if self.return_layernorm_output_gathered and self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            ln_out = gather_from_sequence_parallel_region(ln_out, group=self.tp_group)
        if self.skip_bias_add:
            return out, bias, ln_out
        return (out, ln_out), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The linear's sharding (weight/bias on axis 0) plus replicated norm parameters."""
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 0, "bias": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
