"""The LoRA transform (Megatron-Bridge's ``LoRA``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from bridge.kernels.backend import validate_backend_name
from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.base import PEFT
from bridge.peft.lora_layers import LinearAdapter, LoRALinear
from bridge.peft.module_matcher import DEFAULT_TARGETS, ModuleMatcher
from bridge.peft.parallel_linear_adapter import (
    ParallelLinearAdapter,
    check_adapter_hparams,
    check_lora_dtype,
)
from bridge.peft.utils import (
    get_adapter_attributes_from_linear,
    is_expert_linear,
    is_linear_like,
    is_te_module,
)

logger = logging.getLogger(__name__)

__all__ = ["LoRA"]


@dataclass
class LoRA(PEFT, ModuleMatcher):
    """Low-rank adapters on the matched linears: y = base(x) + (alpha/dim) · B(A(dropout(x))).

    Args:
        target_modules: names or ``*`` patterns (default: the four transformer linears).
        exclude_modules: with ``target_modules=[]``, every linear except these.
        dim: rank r. alpha: scale numerator. dropout, dropout_position ('pre' | 'post').
        lora_A_init_method, lora_B_init_method: 'xavier' | 'normal' | 'kaiming' | 'zero'.
        lora_dtype: dtype of the adapter weights (default: the base's params dtype).
        kernel_backend: 'auto' | 'triton' | 'cuda' | 'eager' (see bridge.kernels.backend).
    """

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dim: int = 32
    alpha: int = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    a2a_experimental: bool = False
    lora_dtype: torch.dtype | None = None
    kernel_backend: str = "auto"

    def __post_init__(self) -> None:
        ModuleMatcher.__post_init__(self)
        PEFT.__post_init__(self)
        check_adapter_hparams(self.dim, self.alpha, self.dropout, self.dropout_position,
                              (self.lora_A_init_method, self.lora_B_init_method))
        check_lora_dtype(self.lora_dtype)
        self.kernel_backend = validate_backend_name(self.kernel_backend, what="kernel_backend")

    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None):
        """Wrap ``module`` in LoRA if it matches; an already wrapped module is left alone (so the
        transform is idempotent)."""
        if isinstance(module, (AdapterWrapper, LinearAdapter)):
            return self.keep_wrapped(module, self.match(module, name, prefix))
        ans = self.match(module, name, prefix)
        if ans is None:
            return module
        pattern, full_name = ans
        if "*" in pattern and name != pattern and not is_linear_like(module):
            # A wildcard also matches containers ('decoder.layers.0.*' matches '...0.mlp'):
            # those are walked into, not wrapped. An exact name must be a linear.
            return module
        self.record_match(pattern)
        if isinstance(module, nn.Linear) and not is_te_module(module):
            return LinearAdapter(
                module, dim=self.dim, alpha=self.alpha, dropout=self.dropout,
                dropout_position=self.dropout_position, lora_A_init_method=self.lora_A_init_method,
                lora_B_init_method=self.lora_B_init_method, lora_dtype=self.lora_dtype,
                kernel_backend=self.kernel_backend,
            )
        is_expert = is_expert_linear(full_name)
        input_is_parallel, in_features, out_features, disable_sp_comm, base_is_parallel = (
            get_adapter_attributes_from_linear(module, is_expert=is_expert)
        )
        logger.info("Adding LoRA to %s", full_name)
        adapter = ParallelLinearAdapter(
            in_features, out_features, self.dim, base_linear_name=full_name,
            activation="identity", column_init_method=self.lora_A_init_method,
            row_init_method=self.lora_B_init_method, input_is_parallel=input_is_parallel,
            dropout=self.dropout, model_parallel_config=getattr(module, "config", None),
            alpha=self.alpha, dropout_position=self.dropout_position, is_expert=is_expert,
            a2a_experimental=self.a2a_experimental,
            disable_sequence_parallel_comm=disable_sp_comm,
            base_linear_is_parallel=base_is_parallel, params_dtype=self.lora_dtype,
        )
        return LoRALinear(module, adapter, kernel_backend=self.kernel_backend)
