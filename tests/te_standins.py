"""Transformer-engine stand-ins for the CPU tests: TE's linear layers and megatron-core's wrappers.

transformer-engine cannot run without CUDA, so tests build these instead. They mirror the classes
megatron-core 0.16 builds on (``megatron/core/extensions/transformer_engine.py``) and the TE
release it pins (``transformer-engine>=2.9,<2.12``; read from the 2.11.0 wheel's
``transformer_engine/pytorch/module/{base,linear,layernorm_linear,grouped_linear}.py``) by their
constructor arguments, attributes, parameter names, return values and communication:

    TE (transformer_engine.pytorch.module)   megatron-core wrapper (megatron.core.extensions...)
    linear.Linear                            TELinear, TEColumnParallelLinear, TERowParallelLinear
    layernorm_linear.LayerNormLinear         TELayerNormColumnParallelLinear
    grouped_linear.GroupedLinear             TEGroupedLinear, TEColumnParallelGroupedLinear,
                                             TERowParallelGroupedLinear

Every class carries the real class name and ``__module__``, so detection by name or by module
path sees them as it sees the real ones. The arithmetic is plain torch (norms in fp32, output in
the input dtype). Communication uses megatron-core's tensor_parallel mappings, which do what TE
does: column: all-gather the GEMM input over the sequence with SP (backward reduce-scatter), else
an identity whose backward all-reduces dX; row: reduce-scatter the output with SP (backward
all-gather of dY), else all-reduce; grouped: none (megatron's MoE dispatcher communicates).

Emulated rather than run: fp8 (inside ``fp8_autocast`` the GEMM operands go through a per-tensor
e4m3 quantise-dequantise; under ``fp8_model_init`` weights are ``Float8Tensor``s), userbuffers
(``ub_*`` flags set exactly as TE sets them; the communication stays the plain one; TE's
``initialize_ub`` check is skipped), ``delay_wgrad_compute`` (weight gradients held until
``backward_dw()``; bias gradients are not delayed). ``parameters_split`` is not supported.

Kept on purpose, because the real layer does it: TE never adds the gradient of a layernorm output
returned with ``return_layernorm_output_gathered=True`` (2.11 ``_LayerNormLinear.backward`` adds
``grad_outputs[1]`` only ``if ctx.return_layernorm_output and not
ctx.return_layernorm_output_gathered``), so whatever is computed from that output contributes
nothing to dX. Set a layer's ``drop_gathered_ln_out_grad = False`` (default
``DROP_GATHERED_LN_OUT_GRAD``) for the mathematically complete gradient. (This is why LoRA asks
TE layernorm linears for their output ungathered: bridge/peft/utils.py.)

The TE classes themselves live in ``tests/_te_engine.py``; import everything from here.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tests._te_engine import (  # noqa: F401  (re-exported: tests import the stand-ins from here)
    DROP_GATHERED_LN_OUT_GRAD,
    TE_VERSION,
    DelayedScaling,
    Float8CurrentScaling,
    Float8Tensor,
    FP8GlobalStateManager,
    GroupedLinear,
    LayerNormLinear,
    Linear,
    QuantizedTensor,
    Recipe,
    TransformerEngineBaseModule,
    WeightGradStore,
    _divide,
    _located,
    _tp_attrs,
    fp8_autocast,
    fp8_model_init,
)

_MCORE = "megatron.core.extensions.transformer_engine"


# ---- megatron-core's wrappers --------------------------------------------------------------------
def _condition_init(config, init_method):
    return init_method if config.perform_initialization else (lambda w: None)


def _extra_te_kwargs(config) -> dict:
    if config.use_cpu_initialization:
        device = "cpu"
    elif config.init_model_with_meta_device:
        device = "meta"
    else:
        device = torch.cuda.current_device()
    kw = {"params_dtype": config.params_dtype, "device": device}
    if config.delay_wgrad_compute:
        kw["delay_wgrad_compute"] = True
    return kw


def _rng_tracker():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker if get_cuda_rng_tracker().is_initialized() else None


def _cpu_init(weight, out_size, in_size, per_partition, dim, init, stride, rank, world) -> None:
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    _initialize_affine_weight_cpu(weight, out_size, in_size, per_partition, dim, init_method=init,
                                  stride=stride, return_master_weight=False,
                                  params_dtype=weight.dtype, rank=rank, world_size=world,
                                  skip_set_tensor_parallel_attributes=True)


def _new_bias(size, config, column: bool, stride: int = 1) -> nn.Parameter:
    """megatron's CPU-initialised bias: zeros, marked for the DP all-reduce (and TP / SP)."""
    bias = nn.Parameter(torch.zeros(size, dtype=config.params_dtype))
    if column:
        _tp_attrs(bias, True, 0, stride)
    else:
        bias.sequence_parallel = config.sequence_parallel
    bias.allreduce = True
    return bias


class _WrapperForward:
    """megatron's forward: TE's result as (out, bias) always, ``is_first_microbatch`` tracked."""

    def forward(self, x):
        first = None if self.disable_parameter_transpose_cache else self.is_first_microbatch
        out = super().forward(x, is_first_microbatch=first)
        self.is_first_microbatch = False
        return out if self.te_return_bias else (out, None)

    def backward_dw(self) -> None:
        if self.config.delay_wgrad_compute:
            super().backward_dw()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.use_bias}, TP={self.tp_size})")

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, self._tp_axis_map,
            sharded_offsets, tp_group=self._tp_group, dp_cp_group=metadata["dp_cp_group"])


@_located(_MCORE)
class TELinear(_WrapperForward, Linear):
    """megatron's ``TELinear``: parallel_mode 'column' | 'row' | 'duplicated' (no TP)."""

    _tp_axis_map = None

    def __init__(self, input_size, output_size, *, parallel_mode, config, init_method, bias,
                 skip_bias_add, skip_weight_param_allocation, tp_comm_buffer_name=None,
                 is_expert=False, symmetric_ar_type=None, tp_group=None, name=None) -> None:
        from megatron.core.tensor_parallel.random import (
            get_data_parallel_rng_tracker_name,
            get_expert_parallel_rng_tracker_name,
        )
        from megatron.core.utils import get_pg_size, get_tensor_model_parallel_group_if_none

        self.config = config
        # TE returns an empty bias for bias=False, return_bias=True; megatron returns None
        self.te_return_bias = skip_bias_add and bias
        self.is_first_microbatch = True
        self.disable_parameter_transpose_cache = config.disable_parameter_transpose_cache
        self.symmetric_ar_type = symmetric_ar_type
        if skip_weight_param_allocation:
            raise ValueError(
                "Transformer Engine linear layers do not support skip_weight_param_allocation")
        extra = _extra_te_kwargs(config)
        if config.tp_comm_overlap and tp_comm_buffer_name and \
                tp_comm_buffer_name not in ("qkv", "proj", "fc1", "fc2"):
            config.tp_comm_overlap = False
            warnings.warn(f"The user buffer name {tp_comm_buffer_name} is not supported in"
                          "Transformer Engine. Disabling TP communication overlap for this layer.",
                          stacklevel=2)
        if config.tp_comm_overlap and parallel_mode != "duplicated":
            extra["ub_overlap_ag"] = config.tp_comm_overlap_ag and not is_expert
            extra["ub_overlap_rs"] = config.tp_comm_overlap_rs and not is_expert
            assert tp_comm_buffer_name is not None, \
                "Buffer name should be set to configure communication overlap settings"
            extra["ub_name"] = tp_comm_buffer_name
        if symmetric_ar_type is not None:
            extra["symmetric_ar_type"] = symmetric_ar_type
        if parallel_mode == "duplicated":
            assert tp_group is None, "duplicated linear should not have tp_group set"
            tp_size = 1
        else:
            tp_size = get_pg_size(tp_group)
        self.expert_parallel = config.expert_model_parallel_size > 1
        extra["rng_tracker_name"] = (get_expert_parallel_rng_tracker_name() if is_expert else
                                     get_data_parallel_rng_tracker_name()
                                     if parallel_mode == "duplicated" else None)
        te_mode, te_group = parallel_mode, tp_group
        if parallel_mode == "duplicated":
            te_mode, te_group, tp_size = None, None, 1
        elif is_expert and (tp_size > 1 or self.expert_parallel):  # the dispatcher communicates
            if parallel_mode == "column":
                output_size = _divide(output_size, tp_size)
            elif parallel_mode == "row":
                input_size = _divide(input_size, tp_size)
            te_mode, te_group, tp_size = None, None, 1
        super().__init__(
            in_features=input_size, out_features=output_size,
            sequence_parallel=config.sequence_parallel,
            fuse_wgrad_accumulation=config.gradient_accumulation_fusion,
            tp_group=te_group if torch.distributed.is_initialized() else None, tp_size=tp_size,
            get_rng_state_tracker=_rng_tracker(), init_method=_condition_init(config, init_method),
            bias=bias, return_bias=self.te_return_bias, parallel_mode=te_mode, **extra)
        self.te_quant_params = None
        for param in self.parameters():
            param.allreduce = not (is_expert and self.expert_parallel)
            if parallel_mode == "duplicated":  # replicated over TP: grads summed there under SP
                param.sequence_parallel = config.sequence_parallel
        self._tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        assert self.parallel_mode is None, \
            "TELinear sharded_state_dict can only be used with duplicated parallel mode"
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)


@_located(_MCORE)
class TEColumnParallelLinear(TELinear):
    """megatron's ``TEColumnParallelLinear``: W split on N; ``gather_output`` must be False."""

    _tp_axis_map = {"weight": 0, "bias": 0}
    sharded_state_dict = _WrapperForward.sharded_state_dict  # sharded, unlike TELinear

    def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias,
                 skip_bias_add, is_expert, skip_weight_param_allocation=False,
                 tp_comm_buffer_name=None, tp_group=None, stride=1, name=None) -> None:
        from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none

        if gather_output:
            raise ValueError("Transformer Engine linear layers do not support gather_output = True")
        tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        world, rank = get_pg_size(tp_group), get_pg_rank(tp_group)
        self.stride = stride
        super().__init__(
            input_size, output_size, parallel_mode="column", config=config,
            init_method=(lambda w: None) if config.use_cpu_initialization else
            _condition_init(config, init_method), bias=bias, skip_bias_add=skip_bias_add,
            is_expert=is_expert, skip_weight_param_allocation=skip_weight_param_allocation,
            tp_comm_buffer_name=tp_comm_buffer_name, symmetric_ar_type=config.symmetric_ar_type,
            tp_group=tp_group)
        self.weight.partition_stride = stride
        if config.use_cpu_initialization:
            per_rank = _divide(output_size, world)
            _cpu_init(self.weight, output_size, input_size, per_rank, 0,
                      _condition_init(config, init_method), stride, rank, world)
            if bias:
                self.bias = _new_bias(per_rank, config, column=True, stride=stride)
        self._quantize_primary_weights()


@_located(_MCORE)
class TERowParallelLinear(TELinear):
    """megatron's ``TERowParallelLinear``: W split on K; ``input_is_parallel`` must be True."""

    _tp_axis_map = {"weight": 1}
    sharded_state_dict = _WrapperForward.sharded_state_dict  # sharded, unlike TELinear

    def __init__(self, input_size, output_size, *, config, init_method, bias, input_is_parallel,
                 skip_bias_add, is_expert, tp_comm_buffer_name=None, tp_group=None, name=None) -> None:
        from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none

        if not input_is_parallel:
            raise ValueError(
                "Transformer Engine linear layers do not support input_is_parallel = False")
        tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        super().__init__(
            input_size, output_size, parallel_mode="row", config=config,
            init_method=(lambda w: None) if config.use_cpu_initialization else
            _condition_init(config, init_method), bias=bias, skip_bias_add=skip_bias_add,
            skip_weight_param_allocation=False, is_expert=is_expert,
            tp_comm_buffer_name=tp_comm_buffer_name, symmetric_ar_type=config.symmetric_ar_type,
            tp_group=tp_group)
        if config.use_cpu_initialization:
            world, rank = get_pg_size(tp_group), get_pg_rank(tp_group)
            self.master_weight = _cpu_init(self.weight, output_size, input_size,
                                           _divide(input_size, world), 1,
                                           _condition_init(config, init_method), 1, rank, world)
            if bias:
                self.bias = _new_bias(output_size, config, column=False)
        self._quantize_primary_weights()


@_located(_MCORE)
class TELayerNormColumnParallelLinear(_WrapperForward, LayerNormLinear):
    """megatron's ``TELayerNormColumnParallelLinear``: the norm fused in front of a column GEMM."""

    _tp_axis_map = {"weight": 0, "bias": 0}

    def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias,
                 skip_bias_add, is_expert, skip_weight_param_allocation=False,
                 tp_comm_buffer_name=None, tp_group=None, stride=1, name=None) -> None:
        from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none

        self.config = config
        if gather_output:
            raise ValueError("Transformer Engine linear layers do not support gather_output = True")
        if is_expert:
            raise ValueError("Transformer Engine linear layers do not yet support MoE")
        if skip_weight_param_allocation:
            raise ValueError(
                "Transformer Engine linear layers do not support skip_weight_param_allocation")
        tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        self._tp_group = tp_group
        self.te_return_bias = skip_bias_add and bias
        self.is_first_microbatch = True
        self.disable_parameter_transpose_cache = config.disable_parameter_transpose_cache
        extra = _extra_te_kwargs(config)
        self.tp_size, self.tp_rank = get_pg_size(tp_group), get_pg_rank(tp_group)
        extra["normalization"] = config.normalization
        if config.tp_comm_overlap:
            extra.update(ub_bulk_wgrad=config.tp_comm_bulk_wgrad,
                         ub_bulk_dgrad=config.tp_comm_bulk_dgrad,
                         ub_overlap_ag=config.tp_comm_overlap_ag,
                         ub_overlap_rs_dgrad=config.tp_comm_overlap_rs_dgrad)
            if (tp_comm_buffer_name == "qkv" and config.tp_comm_overlap_disable_qkv) or \
                    (tp_comm_buffer_name == "fc1" and config.tp_comm_overlap_disable_fc1):
                extra.update(ub_overlap_ag=False, ub_overlap_rs_dgrad=False)
            assert tp_comm_buffer_name is not None, \
                "Buffer name should be set to configure communication overlap settings"
            extra["ub_name"] = tp_comm_buffer_name
        if config.symmetric_ar_type is not None:
            extra["symmetric_ar_type"] = config.symmetric_ar_type
        self.stride = stride
        super().__init__(
            in_features=input_size, out_features=output_size, eps=config.layernorm_epsilon,
            sequence_parallel=config.sequence_parallel,
            fuse_wgrad_accumulation=config.gradient_accumulation_fusion,
            tp_group=tp_group if torch.distributed.is_initialized() else None,
            tp_size=config.tensor_model_parallel_size, get_rng_state_tracker=_rng_tracker(),
            init_method=(lambda w: None) if config.use_cpu_initialization else
            _condition_init(config, init_method), bias=bias, return_bias=self.te_return_bias,
            parallel_mode="column", return_layernorm_output=False,
            zero_centered_gamma=config.layernorm_zero_centered_gamma, **extra)
        self.te_quant_params = None
        self.weight.partition_stride = stride
        if config.use_cpu_initialization:
            per_rank = _divide(output_size, self.tp_size)
            _cpu_init(self.weight, output_size, input_size, per_rank, 0,
                      _condition_init(config, init_method), stride, self.tp_rank, self.tp_size)
            if bias:
                self.bias = _new_bias(per_rank, config, column=True, stride=stride)
        self._quantize_primary_weights()


@_located(_MCORE)
class TEGroupedLinear(_WrapperForward, GroupedLinear):
    """megatron's ``TEGroupedLinear`` (experts only): ``forward(x, m_splits)``."""

    def __init__(self, num_gemms, input_size, output_size, *, parallel_mode, config, init_method,
                 bias, skip_bias_add, is_expert=False, tp_comm_buffer_name=None,
                 pg_collection=None, name=None) -> None:
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.tensor_parallel.random import get_expert_parallel_rng_tracker_name
        from megatron.core.utils import get_pg_size

        self.config = config
        self.te_return_bias = skip_bias_add and bias
        self.is_first_microbatch = True
        self.disable_parameter_transpose_cache = config.disable_parameter_transpose_cache
        extra = _extra_te_kwargs(config)
        extra["ub_name"] = tp_comm_buffer_name
        self.expert_parallel = config.expert_model_parallel_size > 1
        if is_expert:
            extra["rng_tracker_name"] = get_expert_parallel_rng_tracker_name()
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self._pg_collection = pg_collection
        assert is_expert, "TEGroupedLinear only supports expert parallelism"
        self._tp_group = tp_group = pg_collection.expt_tp
        tp_size = get_pg_size(tp_group)
        self.explicit_expert_comm = is_expert and (tp_size > 1 or self.expert_parallel)
        if self.explicit_expert_comm:
            if parallel_mode == "column":
                output_size = _divide(output_size, tp_size)
            elif parallel_mode == "row":
                input_size = _divide(input_size, tp_size)
            parallel_mode, tp_size, tp_group = None, 1, None
        super().__init__(
            num_gemms=num_gemms, in_features=input_size, out_features=output_size,
            sequence_parallel=config.sequence_parallel,
            fuse_wgrad_accumulation=config.gradient_accumulation_fusion,
            tp_group=tp_group if torch.distributed.is_initialized() else None, tp_size=tp_size,
            get_rng_state_tracker=_rng_tracker(), init_method=_condition_init(config, init_method),
            bias=bias, return_bias=self.te_return_bias, parallel_mode=parallel_mode, **extra)
        self.te_quant_params = None
        for param in self.parameters():
            param.allreduce = not (is_expert and self.expert_parallel)
        self._register_load_state_dict_pre_hook(self._merge_extra_states)

    def forward(self, x, m_splits):
        first = None if self.disable_parameter_transpose_cache else self.is_first_microbatch
        out = GroupedLinear.forward(self, x, m_splits, is_first_microbatch=first)
        self.is_first_microbatch = False
        return out if self.te_return_bias else (out, None)

    @staticmethod
    def _merge_extra_states(state_dict, prefix, *args) -> None:
        """megatron's load hook: the per-expert ``_extra_state{i}`` copies a sharded checkpoint
        holds fold back into the one ``_extra_state`` (the first's)."""
        for key in [k for k in state_dict if k.startswith(f"{prefix}_extra_state")]:
            if key != f"{prefix}_extra_state":
                state_dict.pop(key)

    def _grouped_sharded_state_dict(self, tp_axis: dict, prefix="", sharded_offsets=(),
                                    metadata=None):
        """megatron's ``TEGroupedLinear._sharded_state_dict_grouped``: expert i's ``weight{i}``
        (and ``bias{i}``, ``_extra_state``) saved as the ``weight`` of global expert
        ep_rank * num_gemms + i on a leading expert axis (SequentialMLP's keys after the MLP's
        prefix change), replicated over expert data parallelism."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        full = self.state_dict(prefix="", keep_vars=True)
        ep = self._pg_collection.ep
        first, total = ep.rank() * self.num_gemms, ep.size() * self.num_gemms
        out = {}
        for i in range(self.num_gemms):
            local = {f"{i}.weight": full[f"weight{i}"], f"{i}._extra_state": full["_extra_state"]}
            if self.use_bias:
                local[f"{i}.bias"] = full[f"bias{i}"]
            sub = make_sharded_tensors_for_checkpoint(
                local, "", {f"{i}.{k}": axis for k, axis in tp_axis.items()},
                (*sharded_offsets, (len(sharded_offsets), first + i, total)),
                tp_group=self._tp_group, dp_cp_group=metadata["dp_cp_group"])
            replace_prefix_for_sharding(sub, f"{i}.", prefix)
            out[f"{prefix}weight{i}"] = sub[f"{i}.weight"]
            out[f"{prefix}_extra_state{'' if i == 0 else i}"] = sub[f"{i}._extra_state"]
            if self.use_bias:
                out[f"{prefix}bias{i}"] = sub[f"{i}.bias"]
        edp = self._pg_collection.expt_dp.rank()
        for value in out.values():
            value.replica_id = (*value.replica_id[:2], edp)
        return out


@_located(_MCORE)
class TEColumnParallelGroupedLinear(TEGroupedLinear):
    def __init__(self, num_gemms, input_size, output_size, *, config, init_method, bias,
                 skip_bias_add, is_expert, tp_comm_buffer_name=None, pg_collection=None, name=None) -> None:
        super().__init__(num_gemms, input_size, output_size, parallel_mode="column",
                         config=config, init_method=_condition_init(config, init_method),
                         bias=bias, skip_bias_add=skip_bias_add, is_expert=is_expert,
                         tp_comm_buffer_name=tp_comm_buffer_name, pg_collection=pg_collection)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Each expert's weight (and bias) sharded on axis 0 over expert TP."""
        return self._grouped_sharded_state_dict({"weight": 0, "bias": 0}, prefix,
                                                sharded_offsets, metadata)


@_located(_MCORE)
class TERowParallelGroupedLinear(TEGroupedLinear):
    def __init__(self, num_gemms, input_size, output_size, *, config, init_method, bias,
                 skip_bias_add, is_expert, tp_comm_buffer_name=None, pg_collection=None, name=None) -> None:
        super().__init__(num_gemms, input_size, output_size, parallel_mode="row",
                         config=config, init_method=_condition_init(config, init_method),
                         bias=bias, skip_bias_add=skip_bias_add, is_expert=is_expert,
                         tp_comm_buffer_name=tp_comm_buffer_name, pg_collection=pg_collection)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Each expert's weight sharded on axis 1 over expert TP (its bias replicated)."""
        return self._grouped_sharded_state_dict({"weight": 1}, prefix, sharded_offsets,
                                                metadata)


# ---- a GPT layer spec built from them -----------------------------------------------------------
def te_gpt_layer_spec(qk_layernorm: bool = False):
    """The structure of megatron's ``get_gpt_layer_with_transformer_engine_spec()`` (dense, no
    MLA) with these stand-ins: the input and pre-MLP norms live in linear_qkv / linear_fc1
    (``TELayerNormColumnParallelLinear``), linear_proj / linear_fc2 are ``TERowParallelLinear``.
    Core attention is megatron's local ``DotProductAttention`` (TE's fused attention has no
    stand-in); qk norms, when asked for, megatron's local norm (TE's ``TENorm`` needs TE)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    qk_norm = IdentityOp
    if qk_layernorm:
        local = get_gpt_layer_local_spec(qk_layernorm=True)
        qk_norm = local.submodules.self_attention.submodules.q_layernorm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=DotProductAttention, linear_proj=TERowParallelLinear,
                    q_layernorm=qk_norm, k_layernorm=qk_norm)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
