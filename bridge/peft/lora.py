"""The LoRA transforms (Megatron-Bridge's ``LoRA`` and ``VLMLoRA``) and LoRA+'s optimizer
overrides (``get_lora_plus_config_overrides``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from bridge.kernels.backend import validate_backend_name
from bridge.peft.adapter_init import check_adapter_hparams, check_lora_dtype
from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.base import PEFT, _chunks
from bridge.peft.expert_adapters import GroupedExpertLinearAdapter, SharedOuterGroupedExpertAdapter
from bridge.peft.expert_lora_layers import ExpertLoRALinear, is_grouped_linear
from bridge.peft.lora_layers import (
    LinearAdapter,
    LoRALinear,
    LoRATopKRouter,
    TEFusedLoRALinear,
    validate_gemm_strategy,
)
from bridge.peft.module_matcher import DEFAULT_TARGETS, ModuleMatcher
from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter
from bridge.peft.tp import group_size
from bridge.peft.utils import (
    align_expert_dim_for_tp,
    get_adapter_attributes_from_linear,
    get_effective_lora_dim,
    is_expert_linear,
    is_linear_like,
    is_modelopt_linear,
    is_router,
    is_te_module,
)


def unwrap_model(model):
    """megatron-core's ``unwrap_model`` (DDP / Float16Module off), imported on first use; the
    model itself without megatron-core."""
    try:
        from megatron.core.utils import unwrap_model as unwrap
    except ImportError:
        return model
    return unwrap(model)


logger = logging.getLogger(__name__)

__all__ = ["LoRA", "VLMLoRA", "get_lora_plus_config_overrides"]


def get_lora_plus_config_overrides(config, lora_plus_ratio: float) -> dict:
    """Megatron-Core optimizer ``config_overrides`` for LoRA+ (arXiv 2402.12354): B
    (``linear_out``) trains at ``lora_plus_ratio`` times the learning rate of A (``linear_in``).

    Starts from megatron's standard overrides (no weight decay on biases and 1-D parameters), then
    sets A's group to the config's ``lr`` / ``min_lr`` and B's to ratio times those.

    Args:
        config: a megatron ``OptimizerConfig``; its ``lr`` / ``min_lr`` are A's.
        lora_plus_ratio: lr_B / lr_A (e.g. 16); must be > 0.

    Returns:
        ``{ParamKey: ParamGroupOverride}`` for ``get_megatron_optimizer(config_overrides=...)``.

    Raises:
        ValueError: ``lora_plus_ratio <= 0``.
    """
    if not lora_plus_ratio > 0:
        raise ValueError(f"lora_plus_ratio must be > 0, got {lora_plus_ratio}")
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = get_standard_config_overrides(config)
    lr = config.lr
    min_lr = config.min_lr if config.min_lr is not None else 0.0
    overrides[ParamKey(name="*.linear_in.weight")] = ParamGroupOverride(max_lr=lr, min_lr=min_lr)
    overrides[ParamKey(name="*.linear_out.weight")] = ParamGroupOverride(
        max_lr=lr * lora_plus_ratio, min_lr=min_lr * lora_plus_ratio)
    logger.info("LoRA+: lora_plus_ratio=%s (A max_lr=%s, B max_lr=%s)", lora_plus_ratio, lr,
                lr * lora_plus_ratio)
    return overrides


@dataclass
class LoRA(PEFT, ModuleMatcher):
    """Low-rank adapters on the matched linears: y = base(x) + (alpha/dim) · B(A(dropout(x))).

    Args:
        target_modules: names or ``*`` patterns (default: the four transformer linears).
        exclude_modules: with ``target_modules=[]``, every linear except these.
        dim: rank r. alpha: scale numerator. dropout, dropout_position ('pre' | 'post').
        sequence_parallel_input_regather: column-parallel adapters under sequence parallelism
            keep only the local input for backward and gather it again there (less memory).
        lora_A_init_method, lora_B_init_method: 'xavier' | 'normal' | 'kaiming' | 'uniform' |
            'zero'.
        a2a_experimental: row-parallel adapters under sequence parallelism use one all-to-all.
        lora_dtype: dtype of the adapter weights (default: the base's params dtype).
        normalize_moe_lora: expert linears get rank ``dim // moe_router_topk`` (rounded up to
            the expert-TP size beside a column base): a dense model's adapter capacity.
        share_expert_adapters: a grouped expert linear (TE's GroupedLinear over the local
            experts) gets one adapter shared by every expert (default), else one per expert.
        experts_shared_outer_loras: grouped expert linears get the shared-outer layout (fc1: A
            shared, B per expert; fc2: A per expert, B shared).
        kernel_backend: 'auto' | 'triton' | 'cuda' | 'eager' (see bridge.kernels.backend).
        kernel_gemm: 'auto' | 'fused' | 'cublas' (how the fused path runs its big GEMMs).

    A matched MoE router (``TopKRouter``) gets a ``LoRATopKRouter``; a plain ``nn.Linear`` a
    ``LoRALinear`` with a ``LinearAdapter``; an expert linear (SequentialMLP's per-expert linears,
    a grouped expert linear) or a TP-sharded base whose communication is elsewhere (shared
    experts with ``moe_shared_expert_overlap``) an ``ExpertLoRALinear``
    (bridge.peft.expert_lora_layers), whose adapter keeps the base's parallel state; any other
    linear (a duplicated TE linear included) a ``LoRALinear``.
    """

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dim: int = 32
    alpha: int = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    sequence_parallel_input_regather: bool = False
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    a2a_experimental: bool = False
    lora_dtype: torch.dtype | None = None
    normalize_moe_lora: bool = False
    share_expert_adapters: bool = True
    experts_shared_outer_loras: bool = False
    kernel_backend: str = "auto"
    kernel_gemm: str = "auto"

    def __post_init__(self) -> None:
        ModuleMatcher.__post_init__(self)
        check_adapter_hparams(self.dim, self.alpha, self.dropout, self.dropout_position,
                              (self.lora_A_init_method, self.lora_B_init_method))
        check_lora_dtype(self.lora_dtype)
        self.kernel_backend = validate_backend_name(self.kernel_backend, what="kernel_backend")
        self.kernel_gemm = validate_gemm_strategy(self.kernel_gemm)

    def wrapper_kinds(self, base: nn.Module, full_name: str, pattern: str) -> tuple[type, ...]:
        """LoRATopKRouter for a MoE router, LoRALinear for any other linear."""
        return (LoRATopKRouter,) if is_router(base) else (LoRALinear,)

    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None):
        """Wrap ``module`` in LoRA if it matches; an already wrapped module is left alone (so the
        transform is idempotent)."""
        if isinstance(module, AdapterWrapper):
            return self.keep_wrapped(module, self.match(module, name, prefix))
        ans = self.match(module, name, prefix)
        if ans is None:
            return module
        pattern, full_name = ans
        if "*" in pattern and name != pattern and not is_linear_like(module):
            # A wildcard also matches containers ('decoder.layers.0.*' matches '...0.mlp'):
            # those are walked into, not wrapped. An exact name must be a linear.
            return module
        wrapper = dict(kernel_backend=self.kernel_backend, kernel_gemm=self.kernel_gemm)
        if isinstance(module, nn.Linear) and not is_modelopt_linear(module) \
                and not is_te_module(module):
            adapter = LinearAdapter(module, dim=self.dim, alpha=self.alpha, dropout=self.dropout,
                                    dropout_position=self.dropout_position,
                                    lora_A_init_method=self.lora_A_init_method,
                                    lora_dtype=self.lora_dtype,
                                    lora_B_init_method=self.lora_B_init_method)
            return LoRALinear(module, adapter, **wrapper)
        grouped = is_grouped_linear(module)
        is_expert = is_expert_linear(full_name) or grouped or getattr(module, "is_expert",
                                                                       False) is True
        attrs = get_adapter_attributes_from_linear(
            module, is_expert=is_expert,
            sequence_parallel_input_regather=self.sequence_parallel_input_regather and not is_expert)
        dim = get_effective_lora_dim(module, dim=self.dim, normalize_moe_lora=self.normalize_moe_lora,
                                     is_expert=is_expert)
        dim = align_expert_dim_for_tp(module, dim, normalize_moe_lora=self.normalize_moe_lora,
                                      is_expert=is_expert, input_is_parallel=attrs.input_is_parallel)
        logger.info("Adding LoRA to %s", full_name)
        common = dict(base_linear_name=full_name, activation="identity",
                      column_init_method=self.lora_A_init_method,
                      row_init_method=self.lora_B_init_method,
                      input_is_parallel=attrs.input_is_parallel, dropout=self.dropout,
                      model_parallel_config=getattr(module, "config", None), alpha=self.alpha,
                      dropout_position=self.dropout_position,
                      base_linear_is_parallel=attrs.base_linear_is_parallel)
        tp_group = getattr(module, "tp_group", None)
        if is_expert and tp_group is None:
            tp_group = getattr(module, "_tp_group", None)  # TE's grouped linear keeps it here
        if grouped and (self.experts_shared_outer_loras or not self.share_expert_adapters):
            cls = SharedOuterGroupedExpertAdapter if self.experts_shared_outer_loras \
                else GroupedExpertLinearAdapter
            weight = module.weight0
            adapter = cls(attrs.in_features, attrs.out_features, dim,
                          num_local_experts=module.num_gemms, params_device=weight.device,
                          params_dtype=self.lora_dtype or weight.dtype, tp_group=tp_group,
                          **common)
        else:
            adapter = ParallelLinearAdapter(
                attrs.in_features, attrs.out_features, dim, is_expert=is_expert,
                a2a_experimental=self.a2a_experimental,
                disable_tensor_parallel_comm=attrs.disable_tensor_parallel_comm,
                disable_sequence_parallel_comm=attrs.disable_sequence_parallel_comm,
                sequence_parallel_input_regather=self.sequence_parallel_input_regather,
                params_dtype=self.lora_dtype, tp_group=tp_group, **common)
        if is_router(module):
            return LoRATopKRouter(module, adapter)
        if is_expert or _sharded_without_comm(adapter):
            return ExpertLoRALinear(module, adapter, **wrapper)
        if getattr(getattr(module, "config", None), "use_transformer_engine_op_fuser", False) \
                and group_size(tp_group) == 1:
            # upstream's class for this config (its TE op fuser); here a LoRALinear on our kernels
            return TEFusedLoRALinear(module, adapter, **wrapper)
        return LoRALinear(module, adapter, **wrapper)


def _sharded_without_comm(adapter: nn.Module) -> bool:
    """A base whose weight is TP-sharded but whose TP communication happens elsewhere: megatron's
    shared experts with ``moe_shared_expert_overlap`` (megatron-core 0.16 resets their TE linears'
    ``parallel_mode`` to None, or sets its own linears' ``explicit_expert_comm``; the dispatcher
    communicates). Its adapter has megatron factors with explicit communication (the
    contracted-side factor gathered), which ExpertLoRALinear's paths keep; LoRALinear's fused path
    would read such a TE base as a duplicated one and use the sharded factor as a whole one.

    A base without TP communication whose weight is whole (TE ``parallel_mode=None``, megatron's
    duplicated TELinear) gets plain factors: it is LoRALinear's ('duplicated' fused case, with
    TE's return_bias / bare returns / per-call fp8 probe)."""
    return bool(getattr(adapter, "explicit_comm", False) and getattr(adapter, "_megatron", False))


@dataclass
class VLMLoRA(LoRA):
    """LoRA for vision-language models, choosing which of the vision model, the vision
    projection and the language model stay frozen (e.g. adapters on the language model while
    the vision model trains fully: ``freeze_vision_model=False``).

    The parts are found on the (unwrapped) first model chunk, or its ``llava_model``, as
    ``vision_model``, ``vision_projection`` and ``language_model``; a part the model lacks is
    skipped.
    """

    freeze_vision_model: bool = True
    freeze_vision_projection: bool = True
    freeze_language_model: bool = True

    def freeze_model(self, model, training: bool = True) -> None:
        """Freeze the chosen parts only (the adapters added afterwards train)."""
        chunks = _chunks(model)
        root = unwrap_model(chunks)[0]  # DDP / Float16Module wrappers off
        root = getattr(root, "llava_model", root)
        parts = {"vision_model": self.freeze_vision_model,
                 "vision_projection": self.freeze_vision_projection,
                 "language_model": self.freeze_language_model}
        for attr, freeze in parts.items():
            part = getattr(root, attr, None)
            if freeze and isinstance(part, nn.Module):
                for p in part.parameters():
                    p.requires_grad_(False)
        for chunk in chunks:
            chunk.train(training)
