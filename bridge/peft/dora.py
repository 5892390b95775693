"""The DoRA transform (Megatron-Bridge's ``DoRA``): weight-decomposed low-rank adaptation.

See ``dora_layers`` for the formula (HF PEFT's, bias excluded from the norm) and for how the norm
covers whole rows under tensor parallelism.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from bridge.peft.adapter_init import check_adapter_hparams, check_lora_dtype
from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.base import PEFT
from bridge.peft.dora_layers import DoRALinear, ParallelLinearDoRAAdapter
from bridge.peft.errors import PEFTConfigError, UnsupportedModuleError
from bridge.peft.module_matcher import DEFAULT_TARGETS, ModuleMatcher
from bridge.peft.utils import _tp_size, get_adapter_attributes_from_linear, is_expert_linear

logger = logging.getLogger(__name__)

__all__ = ["DoRA"]


@dataclass
class DoRA(PEFT, ModuleMatcher):
    """DoRA on the matched linears: y = (m / ||W0 + s·B@A||) · (W0 x + s·B A x) + b.

    Args:
        target_modules: names or ``*`` patterns (default: the four transformer linears).
        exclude_modules: with ``target_modules=[]``, every linear except these.
        dim: rank r. alpha: scale numerator (s = alpha / dim). dropout: on the adapter input.
        dropout_position: 'pre' only (DoRA's dropout correction needs the dropped input).
        lora_A_init_method, lora_B_init_method: 'xavier' | 'normal' | 'kaiming' | 'zero'.
        lora_dtype: dtype of A, B and m (default: the base's params dtype).

    A plain ``nn.Linear`` base gets plain ``nn.Linear`` factors (no megatron needed).
    """

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dim: int = 32
    alpha: int = 64
    dropout: float = 0.0
    dropout_position: str = "pre"
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    lora_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.dropout_position != "pre":
            raise PEFTConfigError(
                "DoRA only supports pre-adapter dropout at this time: got dropout_position="
                f"{self.dropout_position!r} (its dropout correction term needs the dropped input "
                "of the base); set DoRA(..., dropout_position='pre')"
            )
        ModuleMatcher.__post_init__(self)
        check_adapter_hparams(self.dim, self.alpha, self.dropout, self.dropout_position,
                              (self.lora_A_init_method, self.lora_B_init_method))
        check_lora_dtype(self.lora_dtype)

    def wrapper_kinds(self, base: nn.Module, full_name: str, pattern: str) -> tuple[type, ...]:
        return (DoRALinear,)

    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None):
        """Wrap ``module`` in DoRA if it matches (idempotent: wrapped modules are left alone)."""
        ans = self.match(module, name, prefix)
        if isinstance(module, AdapterWrapper):
            return self.keep_wrapped(module, ans)
        if ans is None:
            return module
        pattern, full_name = ans
        is_expert = is_expert_linear(full_name)
        attrs = get_adapter_attributes_from_linear(module, is_expert=is_expert)
        whole_io = bool(getattr(module, "gather_output", False)) or (
            attrs.input_is_parallel and not getattr(module, "input_is_parallel", True))
        if whole_io and _tp_size(is_expert, module) > 1:
            raise UnsupportedModuleError(
                f"DoRA on {full_name!r}: a base that gathers its output (gather_output=True) or "
                "splits its input itself (input_is_parallel=False) is not supported at TP > 1; "
                "use LoRA there, or leave it out with exclude_modules")
        logger.info("Adding DoRA to %s", full_name)
        adapter = ParallelLinearDoRAAdapter(
            attrs.in_features, attrs.out_features, self.dim, base_linear_name=full_name,
            activation="identity", column_init_method=self.lora_A_init_method,
            row_init_method=self.lora_B_init_method, input_is_parallel=attrs.input_is_parallel,
            dropout=self.dropout, model_parallel_config=getattr(module, "config", None),
            alpha=self.alpha, dropout_position="pre", is_expert=is_expert,
            disable_tensor_parallel_comm=attrs.disable_tensor_parallel_comm,
            disable_sequence_parallel_comm=attrs.disable_sequence_parallel_comm,
            base_linear_is_parallel=attrs.base_linear_is_parallel,
            params_dtype=self._dtype(module), tp_group=getattr(module, "tp_group", None),
        )
        return DoRALinear(module, adapter)

    def _dtype(self, module: nn.Module) -> torch.dtype | None:
        """lora_dtype, else the config's params dtype, else (plain nn.Linear) the weight's."""
        if self.lora_dtype is not None or getattr(module, "config", None) is not None:
            return self.lora_dtype
        weight = getattr(module, "weight", None)
        return weight.dtype if isinstance(weight, torch.Tensor) else None
