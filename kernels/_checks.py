"""Argument checks shared by the fused ops: every bad input gets an error that names it and says
what to do, at the op's boundary (for every backend), never a raw error from deep inside."""

from __future__ import annotations

import math
import numbers

import torch

DROPOUT_POSITIONS = ("pre", "post")
# what the ops compute in: the fused backends take the first three, eager (the fp64 oracle) all
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT64 = (-(2**63), 2**63 - 1)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, t) -> torch.Tensor:
    """``t`` is a floating torch.Tensor, else a TypeError naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {_dtype_name(t.dtype)}: the LoRA ops compute on floating tensors "
            "(float32, float16 or bfloat16; float64 on the eager backend); convert it with "
            ".float() or .to(torch.bfloat16)")
    return t


def check_scale(scale) -> float:
    """The LoRA scale s = alpha / rank: a finite real number (not a string, not a bool)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number (alpha / rank), got "
                        f"{type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def check_seed(seed) -> None:
    """None, an int within int64, or an integer tensor of one element (kernels/philox.py)."""
    if seed is None:
        return
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1:
            raise ValueError(f"seed tensor must have one element; got shape {tuple(seed.shape)}")
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed tensor must have an integer dtype; got {seed.dtype}")
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an int64 tensor of one element; got "
                        f"{type(seed).__name__} {seed!r}")
    if not _INT64[0] <= seed <= _INT64[1]:
        raise ValueError(f"seed must fit in int64 ([-2**63, 2**63 - 1]); got {seed}")


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
    lora_a [r, K], lora_b [N, r], all floating, of one dtype and on one device."""
    tensors = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        check_tensor(name, t)
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
        listed = ", ".join(f"{k}={_dtype_name(v)}" for k, v in dtypes.items())
        raise TypeError(f"all tensors must share one dtype; got {listed}")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        listed = ", ".join(f"{k}={v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listed}")


def check_norm_args(
    normalization: str, eps: float, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None,
    k: int, *, device: torch.device | None = None,
) -> None:
    """A known normalization, a finite eps > 0, and floating norm parameters of size K (on
    ``device``, x's, when given: a norm weight elsewhere would be read as memory it is not)."""
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise ValueError(
            f"unknown normalization {normalization!r}; expected 'LayerNorm' or 'RMSNorm'"
        )
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number > 0, got {type(eps).__name__} {eps!r}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be > 0 and finite, got {eps!r}")
    params = {"norm_weight": norm_weight}
    if norm_bias is not None:
        params["norm_bias"] = norm_bias
    for name, t in params.items():
        check_tensor(name, t)
    if norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must have shape [{k}] (K of x); got {tuple(norm_weight.shape)}")
    if normalization == "LayerNorm" and norm_bias is not None and norm_bias.shape != (k,):
        raise ValueError(f"norm_bias must have shape [{k}] (K of x); got {tuple(norm_bias.shape)}")
    if normalization == "RMSNorm" and norm_bias is not None:
        raise ValueError("RMSNorm takes no norm_bias; pass norm_bias=None")
    if device is not None:
        for name, t in params.items():
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but x is on {device}: all tensors "
                                 f"must be on one device (move it with .to({str(device)!r}))")
