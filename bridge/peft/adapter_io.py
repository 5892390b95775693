"""Adapter-only checkpoints: save the adapters of a model, load them into a fresh one, with the
mismatches (missing keys, unexpected keys, shapes, settings) named in one clear error; and the
distributed (``dist_checkpointing``) pair, ``save_peft_adapter_checkpoint`` /
``load_peft_adapter_checkpoint`` (Megatron-Bridge's loader name), which keeps every
tensor-parallel shard.

``adapter_state_dict`` stores, beside each adapter-wrapped layer's tensors, the settings they
were trained with (wrapper kind; per adapter module: rank, alpha, dropout, dropout position) as
``<layer>.adapter._extra_state``: a uint8 tensor of JSON, so the dict still saves with
``torch.save`` and safetensors, and loaders that skip ``_extra_state`` entries (this package's
earlier ``load_adapter_state_dict`` did) read it as before. ``load_adapter_state_dict`` compares
them with the model's: a difference is a warning, or an error with ``strict=True``. State dicts
without them (written before) load as before.

Adapter state dicts written with the earlier folded ``LinearAdapter`` layout
(``<linear>.lora_a.weight`` / ``<linear>.lora_b.weight``) load into today's layout
(``<linear>.adapter.linear_in.weight`` / ``.linear_out.weight``), with a deprecation warning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["SETTINGS_KEY", "AdapterLoadError", "adapter_settings", "adapter_state_dict",
           "is_adapter_key", "load_adapter_state_dict", "load_peft_adapter_checkpoint",
           "save_peft_adapter_checkpoint"]

SETTINGS_KEY = "adapter._extra_state"  # relative to the wrapped layer
_SETTINGS_FORMAT = 1


class AdapterLoadError(ValueError):
    """Adapter weights that do not fit the model, or a file that cannot be read (the message
    lists every mismatch, or names the file)."""


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an adapter tensor (under an ``adapter.`` segment, or a
    MultiLoRA slot's ``adapters.<i>.``)."""
    return ".adapter." in key or key.startswith("adapter.") or ".adapters." in key \
        or key.startswith("adapters.")


def _wrappers(model: nn.Module):
    from bridge.peft.adapter_wrapper import AdapterWrapper

    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterWrapper)]


def _key(layer: str, rest: str) -> str:
    return f"{layer}.{rest}" if layer else rest


def adapter_settings(wrapper: nn.Module) -> dict:
    """What a wrapped layer's adapters compute with: ``{"wrapper": class name, "adapters":
    {path below .adapter ('' for the adapter itself): {"kind", "dim", "alpha", "dropout",
    "dropout_position"}}}``, for each adapter module that has a rank and an alpha, and for
    each MultiLoRA slot (path ``adapters.<i>``: the slot's rank and alpha)."""
    adapters = {}
    adapter = getattr(wrapper, "adapter", None)
    for path, m in adapter.named_modules() if isinstance(adapter, nn.Module) else ():
        if isinstance(getattr(m, "dim", None), int) and getattr(m, "alpha", None) is not None:
            adapters[path] = _module_settings(m, m.dim, m.alpha)
    slots = getattr(wrapper, "adapters", None)
    ranks, alphas = getattr(wrapper, "_slot_rank", None), getattr(wrapper, "_slot_alpha", None)
    if isinstance(slots, nn.ModuleList) and isinstance(ranks, list) and isinstance(alphas, list):
        # MultiLoRA: each slot's rank and alpha live on the layer (init_adapter_slot), not in
        # its (non-persistent, as upstream's) buffers: recorded here so a load can check them
        for i, slot in enumerate(slots):
            adapters[f"adapters.{i}"] = _module_settings(slot, int(ranks[i]), alphas[i])
    return {"format": _SETTINGS_FORMAT, "wrapper": type(wrapper).__name__, "adapters": adapters}


def _module_settings(m: nn.Module, dim: int, alpha) -> dict:
    return {"kind": type(m).__name__, "dim": dim, "alpha": float(alpha),
            "dropout": float(getattr(m, "dropout_p", 0.0)),
            "dropout_position": getattr(m, "dropout_position", "pre")}


def _encode(settings: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(settings, sort_keys=True).encode()), dtype=torch.uint8)


def _decode(key: str, value: torch.Tensor) -> dict:
    try:
        settings = json.loads(bytes(value.detach().cpu().to(torch.uint8).tolist()).decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{key}: the adapter settings entry is not readable ({err}); "
                               "drop it from the state dict to load the tensors alone") from err
    if not isinstance(settings, dict) or not isinstance(settings.get("adapters"), dict):
        raise AdapterLoadError(f"{key}: the adapter settings entry is not a settings record")
    return settings


def adapter_state_dict(model: nn.Module, key_filter: Callable[[str], bool] | None = None) -> dict:
    """The adapter entries of ``model.state_dict()`` (``key_filter`` defaults to
    :func:`is_adapter_key`; pass ``peft.adapter_key_filter`` to use the transform's own),
    detached tensors only (megatron's ``_extra_state`` entries are left out), plus the settings
    of each layer that has entries here (``<layer>.adapter._extra_state``, see the module
    docstring)."""
    key_filter = key_filter or is_adapter_key
    out = {k: v.detach() for k, v in model.state_dict().items()
           if key_filter(k) and isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    for name, wrapper in _wrappers(model):
        prefixes = (_key(name, "adapter."), _key(name, "adapters."))
        settings = adapter_settings(wrapper)
        if settings["adapters"] and any(k.startswith(prefixes) for k in out):
            out[_key(name, SETTINGS_KEY)] = _encode(settings)
    return out


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


def _settings_mismatches(wrappers: dict, settings: dict[str, dict]) -> list[str]:
    """'layer[.part]: field X in the checkpoint, Y in the model' for every difference."""
    out = []
    for layer, saved in sorted(settings.items()):
        wrapper = wrappers.get(layer)
        if wrapper is None:
            continue
        now = adapter_settings(wrapper)
        where = layer or type(wrapper).__name__
        if saved.get("wrapper") not in (None, now["wrapper"]):
            out.append(f"{where}: {saved['wrapper']} in the checkpoint, {now['wrapper']} in the "
                       "model")
        for path, mine in now["adapters"].items():
            theirs = saved["adapters"].get(path)
            if not isinstance(theirs, dict):
                continue
            diffs = [f"{field} {theirs[field]!r} in the checkpoint, {mine[field]!r} in the model"
                     for field in ("dim", "alpha", "dropout", "dropout_position")
                     if field in theirs and theirs[field] != mine[field]]
            if diffs:
                out.append(f"{where}{'.' + path if path else ''}: " + ", ".join(diffs))
    return out


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                            strict: bool = False) -> None:
    """Copy adapter tensors into ``model``; its base weights are left as they are. Everything is
    checked before anything is copied.

    Args:
        strict: a difference between the settings the checkpoint records (rank, alpha,
            dropout, dropout position, wrapper kind) and the model's is an error; by default
            it is a warning (the tensors load: e.g. a model built with dropout 0 for eval).

    Raises:
        AdapterLoadError: a value that is not a tensor; layers that are merged (merge_lora: the
            base holds the old adapter); the adapter keys the model has but ``state_dict``
            lacks, the keys ``state_dict`` has that the model has no adapter for, each shape
            mismatch (key, the model's shape, the given shape); with ``strict``, each settings
            difference. Nothing is copied then.
    """
    if not isinstance(state_dict, Mapping):
        raise AdapterLoadError(f"expected a mapping of key -> tensor, got "
                               f"{type(state_dict).__name__}")
    # megatron's own _extra_state entries may be None or bytes: skipped, as before
    odd = [f"{k}: expected a torch.Tensor, got {type(v).__name__}"
           for k, v in state_dict.items() if not isinstance(v, torch.Tensor)
           and (not k.endswith("_extra_state") or k.endswith(SETTINGS_KEY))]
    if odd:
        raise AdapterLoadError("cannot load the adapter state dict: " + "; ".join(odd))
    wrappers = dict(_wrappers(model))
    settings = {}
    for key, value in state_dict.items():
        if key == SETTINGS_KEY or key.endswith("." + SETTINGS_KEY):
            layer = key[: -len(SETTINGS_KEY)].rstrip(".")
            if layer in wrappers:
                settings[layer] = _decode(key, value)
    expected = adapter_state_dict(model)
    expected = {k: v for k, v in expected.items() if not k.endswith("_extra_state")}
    given = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
    given = _upgrade_legacy_keys(model, given, expected)
    merged = sorted(name for name, m in wrappers.items() if m.__dict__.get("_lora_merged")
                    and any(k.startswith(_key(name, "adapter.")) for k in given))
    if merged:
        raise AdapterLoadError(
            f"cannot load adapters into merged layers {merged}: their base weights hold the "
            "current adapters, which a later unmerge_lora would then not remove; unmerge_lora "
            "first (or load before merging)")
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
    mismatches = _settings_mismatches(wrappers, settings)
    if mismatches and strict:
        problems.append("settings differ (strict=True): " + "; ".join(mismatches))
    if problems:
        raise AdapterLoadError("cannot load the adapter state dict: " + " | ".join(problems))
    if mismatches:
        warnings.warn("loading adapters trained with other settings (the outputs will differ "
                      "from the trained model's where alpha or rank differ; pass strict=True "
                      "to refuse): " + "; ".join(mismatches), UserWarning, stacklevel=2)
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
