"""Adapter-only state dicts: save the adapters of a model, load them into a fresh one, with the
mismatches (missing keys, unexpected keys, shapes) named in one clear error."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["AdapterLoadError", "adapter_state_dict", "is_adapter_key", "load_adapter_state_dict"]


class AdapterLoadError(ValueError):
    """Adapter weights that do not fit the model (the message lists every mismatch)."""


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an adapter tensor (under an ``adapter.`` segment)."""
    return ".adapter." in key or key.startswith("adapter.")


def adapter_state_dict(model: nn.Module, key_filter: Callable[[str], bool] | None = None) -> dict:
    """The adapter entries of ``model.state_dict()`` (``key_filter`` defaults to
    :func:`is_adapter_key`; pass ``peft.adapter_key_filter`` to use the transform's own), detached
    tensors only (megatron's ``_extra_state`` entries are left out)."""
    key_filter = key_filter or is_adapter_key
    return {k: v.detach() for k, v in model.state_dict().items()
            if key_filter(k) and isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into ``model``; its base weights are left as they are.

    Raises:
        AdapterLoadError: listing the adapter keys the model has but ``state_dict`` lacks, the
            keys ``state_dict`` has that the model has no adapter for, and each shape mismatch
            (key, the model's shape, the given shape). Nothing is copied then.
    """
    expected = adapter_state_dict(model)
    given = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k}: model {tuple(expected[k].shape)} vs checkpoint {tuple(given[k].shape)}"
              for k in sorted(set(expected) & set(given)) if expected[k].shape != given[k].shape]
    problems = []
    if missing:
        problems.append(f"missing adapter keys: {missing}")
    if unexpected:
        problems.append(f"unexpected adapter keys: {unexpected}")
    if shapes:
        problems.append("shape mismatch (wrong rank or layer size?): " + "; ".join(shapes))
    if problems:
        raise AdapterLoadError("cannot load the adapter state dict: " + " | ".join(problems))
    targets = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for k, v in given.items():
            targets[k].copy_(v)
