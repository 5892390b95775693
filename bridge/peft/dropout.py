"""The adapters' dropout: an ``nn.Dropout`` that draws the fused kernels' mask.

One source of truth for p: an adapter's ``dropout`` module holds it, and ``adapter.dropout_p``
(which the fused path reads on every call) is a property reading that module's ``p``. So the
usual way to switch dropout off, ``for m in model.modules(): if isinstance(m, nn.Dropout):
m.p = 0``, reaches the eager and the fused path alike, and so does any later change of p.

One mask per seed: the mask is kernels/philox.py's convention (element (row, col) of the input
viewed as [rows, C] kept when its Philox uniform is >= p), drawn from a seed taken from torch's
default generator exactly as the fused path takes it (``draw_seed``), or from a given seed. With
the same generator state the eager module path and the fused op drop the same elements, on the
CPU, on a GPU, with or without Triton.

An adapter built with ``dropout=0`` keeps Megatron-Bridge's ``nn.Identity`` there (code written
against upstream checks for it); setting ``dropout_p`` above 0 later puts a ``LoRADropout`` in.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

__all__ = ["LoRADropout", "adapter_dropout", "dropout_p_property"]


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0 \
            or math.isnan(float(p)):
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r} (the fused "
                         "kernels scale kept values by 1 / (1 - p))")
    return float(p)


class LoRADropout(nn.Dropout):
    """Inverted dropout with the Philox mask of the fused kernels (see the module docstring).

    ``forward(x, seed=None)``: x [..., C] of any floating dtype and device (meta included) ->
    ``x * keep / (1 - p)`` in training, x itself in eval or with p = 0. The keep mask is
    ``bridge.kernels.philox.dropout_keep_mask(seed, x.shape, p)``: the Triton mask kernel on a
    CUDA device, the torch implementation elsewhere and inside torch.compile.

    Raises:
        ValueError: p outside [0, 1) (set at construction or later).
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(_check_p(p), inplace)

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = _check_p(value)

    def forward(self, x: torch.Tensor, seed: int | torch.Tensor | None = None) -> torch.Tensor:
        p = self._p
        if not self.training or p == 0.0:
            return x
        from bridge.kernels.lora_linear import eager_keep_mask

        keep = eager_keep_mask(seed, x.shape, p, x.device)
        if self.inplace:
            return x.mul_(keep).div_(1.0 - p)
        return x * keep / (1.0 - p)


def adapter_dropout(p: float) -> nn.Module:
    """The dropout module of an adapter: ``LoRADropout(p)``, or ``nn.Identity()`` for p = 0
    (Megatron-Bridge's structure)."""
    return LoRADropout(p) if p > 0 else nn.Identity()


def dropout_p_property() -> property:
    """``dropout_p`` for an adapter class: reads its ``dropout`` module's p (0 for an Identity,
    or a module without p); setting it writes that p (a LoRADropout replaces an Identity)."""

    def get(self) -> float:
        return float(getattr(self.dropout, "p", 0.0))

    def set_(self, value: float) -> None:
        value = _check_p(value)
        if isinstance(getattr(self, "dropout", None), nn.Dropout):
            self.dropout.p = value
        elif value > 0.0:
            self.dropout = LoRADropout(value)

    return property(get, set_, doc="The dropout probability: the ``dropout`` module's p.")
