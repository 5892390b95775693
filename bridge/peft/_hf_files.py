"""The file side of the Hugging Face PEFT exchange (``bridge.peft.hf``): ``adapter_config.json``
and ``adapter_model.safetensors`` read and checked (every field this exchange reads, and those it
cannot reproduce, refused by name), and both written atomically."""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import tempfile

import torch

from bridge.peft.adapter_io import AdapterLoadError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "check_config", "normalise_key", "read_config",
           "read_weights", "write_atomically"]

# PEFT config fields whose non-default value this exchange cannot reproduce (value -> why)
_REFUSED = {
    "fan_in_fan_out": (lambda v: bool(v), "weights of a Conv1D (transposed) base"),
    "bias": (lambda v: v not in (None, "none"), "trained biases, which LoRA here has not"),
    "modules_to_save": (lambda v: bool(v), "whole trained modules beside the adapters"),
    "use_rslora": (lambda v: bool(v), "a scale of alpha / sqrt(r), not alpha / r"),
    "lora_bias": (lambda v: bool(v), "a bias on lora_B"),
    "layer_replication": (lambda v: bool(v), "replicated layers"),
    "use_qalora": (lambda v: bool(v), "QA-LoRA's pooled inputs"),
    "trainable_token_indices": (lambda v: bool(v), "trained embedding rows"),
    "target_parameters": (lambda v: bool(v), "LoRA on parameters, not modules"),
    "alora_invocation_tokens": (lambda v: bool(v), "activated LoRA (applies after a token)"),
    "use_bdlora": (lambda v: bool(v), "block-diagonal LoRA"),
    "arrow_config": (lambda v: v is not None, "Arrow routing between adapters"),
    "init_lora_weights": (lambda v: isinstance(v, str) and v.lower().startswith(
        ("pissa", "olora", "corda", "loftq", "lora_ga")),
        "an init that rewrote the base weights (the adapter belongs to that residual base)"),
}


def write_atomically(directory: str, tensors: dict, config_text: str) -> None:
    """Both files to temporary files in ``directory``, then renamed into place (a failure
    before the renames leaves what was there; temporary files are removed)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    temps = []
    try:
        for suffix in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            fd, path = tempfile.mkstemp(dir=directory, prefix=f".{suffix}.", suffix=".tmp")
            os.close(fd)
            temps.append(path)
        save_file(tensors, temps[0], metadata={"format": "pt"})
        with open(temps[1], "w") as f:
            f.write(config_text)
        for path in temps:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.replace(temps[0], os.path.join(directory, ADAPTER_WEIGHTS))
        os.replace(temps[1], os.path.join(directory, ADAPTER_CONFIG))
    finally:
        for path in temps:
            if os.path.exists(path):
                os.remove(path)


def normalise_key(key: str) -> str:
    """PEFT writes keys without the adapter name; accept ``lora_A.default.weight`` too."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def read_config(directory: str) -> dict:
    path = os.path.join(directory, ADAPTER_CONFIG)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"{path} cannot be read as JSON ({err})") from err
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{path} cannot be read as a PEFT config: it holds a "
                               f"{type(config).__name__}, not an object")
    return config


def check_number(path: str, field: str, value, integer: bool) -> None:
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        want = "a positive int"
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) \
            and math.isfinite(value) and value > 0
        want = "a finite number > 0"
    if not ok:
        raise AdapterLoadError(f"{path}: {field!r} must be {want}, got "
                               f"{type(value).__name__} {value!r}")


def check_config(config: dict, path: str) -> None:
    """Types of the fields read, and the fields that change the arithmetic (refused)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"{path}: only LoRA/DoRA adapters can be imported (got peft_type "
                               f"{config.get('peft_type')!r})")
    if "r" not in config:
        raise AdapterLoadError(f"{path} has no 'r' (the LoRA rank); is it a PEFT LoRA config?")
    check_number(path, "r", config["r"], integer=True)
    check_number(path, "lora_alpha", config.get("lora_alpha", 8), integer=False)
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise AdapterLoadError(f"{path}: {field!r} must be an object, got "
                                   f"{type(pattern).__name__}")
        for key, value in pattern.items():
            check_number(path, f"{field}[{key!r}]", value, integer=field == "rank_pattern")
    refused = [f"{field}={config[field]!r} ({why})" for field, (bad, why) in _REFUSED.items()
               if field in config and bad(config[field])]
    if refused:
        raise AdapterLoadError(f"{path} sets what this import cannot reproduce: "
                               + "; ".join(refused) + "; the adapter would compute something "
                               "else here")


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no adapter weights there")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError (and others)
        raise AdapterLoadError(f"{path} cannot be read as safetensors "
                               f"({type(err).__name__}: {err})") from err
