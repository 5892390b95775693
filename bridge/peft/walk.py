"""Walk a module tree and replace modules by what a transform returns."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Transform = Callable[..., nn.Module]


def map_modules(module: nn.Module, fn: Transform, prefix: str = "") -> nn.Module:
    """Apply ``fn(child, name=name, prefix=prefix)`` to every module below ``module``, depth
    first, replacing each child by the result. A replaced child is not descended into (its
    base linear must not be wrapped twice)."""
    for name, child in list(module.named_children()):
        new = fn(child, name=name, prefix=prefix)
        if new is not child:
            setattr(module, name, new)
            continue
        map_modules(child, fn, f"{prefix}.{name}" if prefix else name)
    return module
