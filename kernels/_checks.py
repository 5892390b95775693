"""Argument checks shared by the fused ops: every bad input gets an error that names it."""

from __future__ import annotations

import torch

DROPOUT_POSITIONS = ("pre", "post")


def check_dropout(p: float, position: str) -> None:
    """Dropout probability in [0, 1) and a known position, else ``ValueError``."""
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {p!r}")
    if position not in DROPOUT_POSITIONS:
        raise ValueError(
            f"unknown dropout_position {position!r}; expected one of {', '.join(DROPOUT_POSITIONS)}"
        )


def check_lora_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
) -> None:
    """Shapes, dtypes and devices of a LoRA linear call: x [..., K], weight [N, K], bias [N],
    lora_a [r, K], lora_b [N, r], all of one dtype and on one device."""
    tensors = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(
            "weight, lora_a and lora_b must be 2-D ([N, K], [r, K], [N, r]); got shapes "
            f"{tuple(weight.shape)}, {tuple(lora_a.shape)}, {tuple(lora_b.shape)}"
        )
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]; got a 0-d tensor")
    n, k = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != k or lora_a.shape[1] != k:
        raise ValueError(
            f"in_features disagree: x {tuple(x.shape)} (K={x.shape[-1]}), weight {tuple(weight.shape)}"
            f" (K={k}), lora_a {tuple(lora_a.shape)} (K={lora_a.shape[1]})"
        )
    if lora_b.shape != (n, r):
        raise ValueError(
            f"lora_b must have shape [N, r] = [{n}, {r}] to match weight {tuple(weight.shape)} and "
            f"lora_a {tuple(lora_a.shape)}; got {tuple(lora_b.shape)}"
        )
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1; lora_a has shape {tuple(lora_a.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [{n}]; got {tuple(bias.shape)}")
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        listed = ", ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in dtypes.items())
        raise TypeError(f"all tensors must share one dtype; got {listed}")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        listed = ", ".join(f"{k}={v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listed}")


def check_norm_args(
    normalization: str, eps: float, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None, k: int
) -> None:
    """A known normalization, eps > 0, and norm parameters of size K."""
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise ValueError(
            f"unknown normalization {normalization!r}; expected 'LayerNorm' or 'RMSNorm'"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must have shape [{k}] (K of x); got {tuple(norm_weight.shape)}")
    if normalization == "LayerNorm" and norm_bias is not None and norm_bias.shape != (k,):
        raise ValueError(f"norm_bias must have shape [{k}] (K of x); got {tuple(norm_bias.shape)}")
    if normalization == "RMSNorm" and norm_bias is not None:
        raise ValueError("RMSNorm takes no norm_bias; pass norm_bias=None")
