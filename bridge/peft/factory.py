"""Build a PEFT transform from a small config mapping, and the model hook that applies it
(Megatron-Bridge's ``create_peft`` / ``create_peft_hook``, re-exported by ``bridge.peft.utils``,
where upstream has them)."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["PEFT_TYPES", "create_peft", "create_peft_hook", "str_to_dtype"]

# type name -> (module, class); imported only when chosen.
PEFT_TYPES = {
    "lora": ("bridge.peft.lora", "LoRA"),
    "vlm_lora": ("bridge.peft.lora", "VLMLoRA"),
    "canonical_lora": ("bridge.peft.canonical_lora", "CanonicalLoRA"),
    "dora": ("bridge.peft.dora", "DoRA"),
}

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "32": torch.float32,
    "32-true": torch.float32, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "16": torch.float16, "16-mixed": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}


def str_to_dtype(name: str | int | torch.dtype) -> torch.dtype:
    """A floating torch.dtype from ``torch.bfloat16``, 'bf16', 'bfloat16', 'torch.bfloat16',
    16, '16-mixed', ... (case-insensitive).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower()
    key = key[len("torch."):] if key.startswith("torch.") else key
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype: {name!r}. Known names: {sorted(_DTYPES)}")
    return _DTYPES[key]


def _peft_class(peft_type: str) -> type:
    if peft_type not in PEFT_TYPES:
        raise ValueError(f"Unsupported PEFT type {peft_type!r}. Supported types: "
                         f"{', '.join(sorted(PEFT_TYPES))}.")
    module_name, class_name = PEFT_TYPES[peft_type]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"Failed to import PEFT type {peft_type!r} ({module_name}:{class_name}): "
                          f"{err}") from err
    return getattr(module, class_name)


def create_peft(config: Mapping[str, Any], dtype: torch.dtype | str | int | None = None):
    """A PEFT transform from ``config``, or None when its rank is <= 0 (PEFT off).

    Args:
        config: ``type`` ('lora' (default), 'vlm_lora', 'canonical_lora', 'dora'), ``rank`` (or
            ``dim``), ``dtype`` (the adapters' dtype) and any field of the chosen class; keys the
            class does not take are ignored (a trainer's config may carry its own).
        dtype: the adapters' dtype when ``config`` has none (e.g. the model's).

    Raises:
        ValueError: an unknown ``type`` or dtype.
    """
    kwargs = dict(config)
    peft_type = kwargs.pop("type", "lora")
    if "rank" in kwargs:
        kwargs["dim"] = kwargs.pop("rank")
    if (kwargs.get("dim") or 0) <= 0:
        return None
    cls = _peft_class(peft_type)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    config_dtype = kwargs.pop("dtype", None)
    lora_dtype = kwargs.pop("lora_dtype", config_dtype if config_dtype is not None else dtype)
    if lora_dtype is not None and "lora_dtype" in names:
        kwargs["lora_dtype"] = str_to_dtype(lora_dtype)
    return cls(**{k: v for k, v in kwargs.items() if k in names})


def create_peft_hook(peft, training: bool = True) -> Callable:
    """A model hook (e.g. a provider's pre-wrap hook) that applies ``peft`` to the model chunks
    and records the parameters to save (``peft.set_params_to_save``)."""

    def hook(model):
        model = peft(model, training=training)
        peft.set_params_to_save(model)
        return model

    return hook
