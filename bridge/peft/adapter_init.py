"""Initialisers and hyper-parameter checks shared by every adapter (Megatron-Bridge's
``init_method_normal`` / ``init_method_kaiming_uniform`` / ``init_method_const`` and the init
method names its adapters take)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import nn

from bridge.peft.errors import PEFTConfigError, UnsupportedOptionError

__all__ = [
    "INIT_METHODS",
    "check_adapter_hparams",
    "check_lora_dtype",
    "get_init_fn",
    "init_method_const",
    "init_method_kaiming_uniform",
    "init_method_normal",
]

# 'uniform' is LinearAdapter's name for kaiming-uniform A (Megatron-Bridge's lora_A_init_method).
INIT_METHODS = ("xavier", "normal", "kaiming", "uniform", "zero")


def init_method_normal(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """In-place N(0, sigma^2) initialiser."""
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=sigma)
    return init_


def init_method_kaiming_uniform(val: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """In-place Kaiming-uniform initialiser with negative slope ``a = val``."""
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.kaiming_uniform_(tensor, a=val)
    return init_


def init_method_const(val: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """In-place constant initialiser."""
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.constant_(tensor, val)
    return init_


def get_init_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The in-place initialiser for ``name`` (ParallelLinearAdapter's meanings): 'xavier'
    (Xavier-normal), 'normal' (N(0, 0.2^2)), 'kaiming' or 'uniform' (Kaiming-uniform, a = sqrt 5),
    'zero'.

    Raises:
        UnsupportedOptionError: (a ValueError and NotImplementedError) for any other name.
    """
    if name == "xavier":
        return nn.init.xavier_normal_
    if name == "normal":
        return init_method_normal(0.2)
    if name in ("kaiming", "uniform"):
        return init_method_kaiming_uniform(math.sqrt(5))
    if name == "zero":
        return init_method_const(0.0)
    raise UnsupportedOptionError(
        f"unknown init method {name!r}; expected one of {', '.join(INIT_METHODS)}")


def check_adapter_hparams(dim: int, alpha: float | None, dropout: float, dropout_position: str,
                          init_methods: tuple[str, ...] = ()) -> None:
    """The checks every adapter shares, each naming the value and what is allowed.

    Raises:
        PEFTConfigError: (a ValueError and AssertionError) for a bad rank, alpha, dropout or
            dropout position.
        UnsupportedOptionError: an unknown init method.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise PEFTConfigError(f"dim (the LoRA rank) must be a positive int, got {dim!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                              or not math.isfinite(alpha) or alpha <= 0):
        raise PEFTConfigError(f"alpha must be a finite number > 0 (the scale is alpha / dim; None "
                              f"for a scale of 1), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= float(dropout) < 1.0:
        raise PEFTConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if dropout_position not in ("pre", "post"):
        raise PEFTConfigError(
            f"unknown dropout_position {dropout_position!r}; expected 'pre' or 'post'")
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
