"""Walk a module tree and replace modules by what a transform returns."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Transform = Callable[..., nn.Module]


def map_modules(module: nn.Module, fn: Transform, prefix: str = "") -> nn.Module:
    """Apply ``fn(child, name=name, prefix=prefix)`` to every module below ``module``, depth
    first, replacing each child by the result. A replaced child is not descended into (its
    base linear must not be wrapped twice), nor is an adapter module met again (so applying a
    transform twice wraps once)."""
    for name, child in list(module.named_children()):
        new = fn(child, name=name, prefix=prefix)
        if new is not child:
            setattr(module, name, new)
            continue
        if _is_adapter(child):  # already wrapped: its base and factors must not be wrapped again
            continue
        map_modules(child, fn, f"{prefix}.{name}" if prefix else name)
    return module


def _is_adapter(module: nn.Module) -> bool:
    from bridge.peft.adapter_wrapper import AdapterWrapper
    from bridge.peft.lora_layers import LinearAdapter

    return isinstance(module, (AdapterWrapper, LinearAdapter))
