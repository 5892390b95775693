"""Adapter-only checkpoints: save the adapters of a model, load them into a fresh one, with the
mismatches (missing keys, unexpected keys, shapes) named in one clear error; and the distributed
(``dist_checkpointing``) pair, ``save_peft_adapter_checkpoint`` / ``load_peft_adapter_checkpoint``
(Megatron-Bridge's loader name), which keeps every tensor-parallel shard.

Adapter state dicts written with the earlier folded ``LinearAdapter`` layout
(``<linear>.lora_a.weight`` / ``<linear>.lora_b.weight``) load into today's layout
(``<linear>.adapter.linear_in.weight`` / ``.linear_out.weight``), with a deprecation warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["AdapterLoadError", "adapter_state_dict", "is_adapter_key", "load_adapter_state_dict",
           "load_peft_adapter_checkpoint", "save_peft_adapter_checkpoint"]


class AdapterLoadError(ValueError):
    """Adapter weights that do not fit the model (the message lists every mismatch)."""


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an adapter tensor (under an ``adapter.`` segment, or a
    MultiLoRA slot's ``adapters.<i>.``)."""
    return ".adapter." in key or key.startswith("adapter.") or ".adapters." in key \
        or key.startswith("adapters.")


def adapter_state_dict(model: nn.Module, key_filter: Callable[[str], bool] | None = None) -> dict:
    """The adapter entries of ``model.state_dict()`` (``key_filter`` defaults to
    :func:`is_adapter_key`; pass ``peft.adapter_key_filter`` to use the transform's own), detached
    tensors only (megatron's ``_extra_state`` entries are left out)."""
    key_filter = key_filter or is_adapter_key
    return {k: v.detach() for k, v in model.state_dict().items()
            if key_filter(k) and isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _upgrade_legacy_keys(model: nn.Module, given: dict, expected: dict) -> dict:
    """Keys of the folded LinearAdapter layout renamed to today's, where the model has a
    LoRALinear over an nn.Linear at that path."""
    from bridge.peft.lora_layers import LinearAdapter, LoRALinear, upgrade_legacy_key

    out = {}
    for key, value in given.items():
        if key not in expected:
            path, _, leaf = key.rpartition(".")
            owner, _, factor = path.rpartition(".")
            try:
                module = model.get_submodule(owner) if owner else model
            except AttributeError:
                module = None
            if isinstance(module, LoRALinear) and isinstance(module.adapter, LinearAdapter):
                new = upgrade_legacy_key(f"{factor}.{leaf}", "load_adapter_state_dict")
                if new is not None:
                    key = f"{owner}.{new}" if owner else new
        out[key] = value
    return out


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into ``model``; its base weights are left as they are.

    Raises:
        AdapterLoadError: listing the adapter keys the model has but ``state_dict`` lacks, the
            keys ``state_dict`` has that the model has no adapter for, and each shape mismatch
            (key, the model's shape, the given shape). Nothing is copied then.
    """
    expected = adapter_state_dict(model)
    given = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
    given = _upgrade_legacy_keys(model, given, expected)
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


# ---- distributed adapter checkpoints ------------------------------------------------------------
def _model_list(model) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _adapter_sharded_state_dict(model, peft, model_sd_kwargs=None) -> dict:
    """{'model' | 'model<i>': the adapter entries of each chunk's sharded state dict}."""
    chunks = _model_list(model)
    if not getattr(peft, "params_to_save", None):
        peft.set_params_to_save(chunks)
    out = {}
    for i, chunk in enumerate(chunks):
        state = chunk.sharded_state_dict(**dict(model_sd_kwargs or {}))
        out["model" if len(chunks) == 1 else f"model{i}"] = {
            k: v for k, v in state.items()
            if peft.adapter_key_filter(k) and not k.endswith("_extra_state")}
    return out


def save_peft_adapter_checkpoint(model, checkpoint_path: str | os.PathLike, peft,
                                 model_sd_kwargs: Mapping | None = None) -> None:
    """Save only the adapters (``peft.adapter_key_filter``) of ``model`` with megatron's
    ``dist_checkpointing``: every rank writes its own tensor-parallel shards, so the checkpoint
    reloads at any TP size. Collective: every rank calls it."""
    from megatron.core import dist_checkpointing

    path = str(checkpoint_path)
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(_adapter_sharded_state_dict(model, peft, model_sd_kwargs), path)


def load_peft_adapter_checkpoint(model, adapter_checkpoint_path: str | os.PathLike, peft,
                                 strict: bool = False, model_sd_kwargs: Mapping | None = None,
                                 ckpt_format: str = "torch_dist", pg_collection=None,
                                 fully_parallel_load: bool = True, load_strategy=None) -> None:
    """Load an adapter-only distributed checkpoint into a model that ``peft`` already transformed.

    Args:
        model: a module or a list of model chunks (keys 'model', or 'model<i>' per chunk).
        strict: passed to ``load_state_dict`` (the checkpoint holds adapters only, so the
            default False leaves the base weights as they are).
        fully_parallel_load: spread the reads over the data-parallel group (when there is one).
        load_strategy: a dist_checkpointing load strategy (default: torch_dist).

    Raises:
        ValueError: ``ckpt_format`` other than 'torch_dist'.
        KeyError: the checkpoint lacks a chunk's top-level key (the message lists what it has).
    """
    from megatron.core import dist_checkpointing

    if ckpt_format != "torch_dist":
        raise ValueError(f"adapter checkpoints are read in 'torch_dist' format, got {ckpt_format!r}")
    chunks = _model_list(model)
    sharded = _adapter_sharded_state_dict(chunks, peft, model_sd_kwargs)
    if load_strategy is None and fully_parallel_load:
        load_strategy = _fully_parallel_strategy(pg_collection)
    loaded = dist_checkpointing.load(sharded, str(adapter_checkpoint_path), load_strategy)
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        if key not in loaded:
            raise KeyError(f"adapter checkpoint {adapter_checkpoint_path} has no {key!r} entry "
                           f"(it has {sorted(loaded)})")
        chunk.load_state_dict(loaded[key], strict=strict)


def _fully_parallel_strategy(pg_collection):
    """torch_dist reads spread over the data-parallel group, or None (the default strategy)."""
    group = getattr(pg_collection, "dp_cp", None) if pg_collection is not None else None
    if group is None:
        try:
            from megatron.core import parallel_state

            group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        except (AssertionError, RuntimeError, ImportError):
            return None
    if group is None or torch.distributed.get_world_size(group) == 1:
        return None
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    return FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(), group)
