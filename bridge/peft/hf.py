"""Hugging Face PEFT exchange: LoRA adapters of a megatron GPT model <-> ``adapter_config.json`` +
``adapter_model.safetensors`` with PEFT's key names.

Module mapping (Llama-style GPT): ``decoder.layers.{i}.self_attention.linear_qkv`` ->
``model.layers.{i}.self_attn.{q,k,v}_proj``, ``...self_attention.linear_proj`` -> ``o_proj``,
``decoder.layers.{i}.mlp.linear_fc1`` -> ``mlp.{gate,up}_proj`` (``up_proj`` alone without a gated
linear unit), ``...mlp.linear_fc2`` -> ``down_proj``. PEFT keys are
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (and ``lora_B``).

Export of a fused LoRA (one A [r, K] and one B [N, r] per fused layer) is exact: q, k and v each
get ``lora_A = A`` and ``lora_B`` = their rows of B, de-interleaved from megatron's per-group qkv
layout (see ``canonical_lora``); gate/up get the two halves of fc1's B. Canonical LoRA exports its
own per-part factors.

DoRA exports exactly too (``use_dora: true``, plus each projection's rows of the magnitude as
``lora_magnitude_vector``): its norm is per output row, so a projection's rows of
||W0 + s·B@A|| are the norms PEFT computes for that projection.

Import rule for a fused layer: separate q/k/v (or gate/up) adapters fit one fused adapter exactly
only when their A's are equal; then A is that A and B the parts' B's interleaved. Otherwise this
raises an error naming the layer (it does not stack them into a rank-3r adapter, which would give
one layer a different rank from the others, change the model's parameter shapes and its optimizer
state): use ``CanonicalLoRA``, which imports any PEFT LoRA exactly. Only tensor-parallel size 1
is supported (gather a TP model's adapters first); layer numbers are the model's local ones.
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from bridge.peft.adapter_io import AdapterLoadError
from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.canonical_lora import (
    _SplitLoRA,
    interleave_qkv,
    qkv_sizes,
    split_qkv,
)
from bridge.peft.dora_layers import DoRALinear, ParallelLinearDoRAAdapter
from bridge.peft.lora_layers import LinearAdapter, LoRALinear
from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter
from bridge.peft.tp import tp_group_and_size

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "export_hf_adapter", "import_hf_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HF_PREFIX = "base_model.model.model.layers"
_LAYER = re.compile(r"(?:^|.*\.)decoder\.layers\.(\d+)\."
                    r"(self_attention\.linear_qkv|self_attention\.linear_proj|mlp\.linear_fc1|"
                    r"mlp\.linear_fc2)$")
# megatron part name -> HF projection (within the layer)
_HF_NAME = {"linear_q": "self_attn.q_proj", "linear_k": "self_attn.k_proj",
            "linear_v": "self_attn.v_proj", "linear_proj": "self_attn.o_proj",
            "linear_fc1_gate": "mlp.gate_proj", "linear_fc1_up": "mlp.up_proj",
            "linear_fc2": "mlp.down_proj"}


def _layers(model: nn.Module):
    """(layer index, megatron module path tail, wrapper) for every adapted GPT linear."""
    found = []
    for name, module in model.named_modules():
        match = _LAYER.match(name)
        if match and isinstance(module, AdapterWrapper):
            found.append((int(match.group(1)), match.group(2), name, module))
    return found


def _check_wrapper(name: str, module: AdapterWrapper) -> None:
    from bridge.peft.multi_lora_layers import MultiLoRALinear

    if isinstance(module, MultiLoRALinear) and "adapter" not in module._modules:
        raise NotImplementedError(
            f"{name}: a MultiLoRA layer holds {module.n_adapters} adapter slots; export or import "
            "one inside `with expose_adapter_slot(model, idx):` (it then reads as one LoRA)")
    if not isinstance(module, (LoRALinear, _SplitLoRA, DoRALinear, MultiLoRALinear)):
        raise NotImplementedError(
            f"{name}: {type(module).__name__} cannot be exchanged with Hugging Face PEFT yet "
            "(LoRA, canonical LoRA and DoRA only)"
        )
    adapters = _wrapper_adapters(module)
    allowed = (ParallelLinearDoRAAdapter,) if isinstance(module, DoRALinear) \
        else (ParallelLinearAdapter, LinearAdapter)
    for adapter in adapters:
        if type(adapter) not in allowed or adapter.activation_name != "identity":
            raise NotImplementedError(f"{name}: adapter {type(adapter).__name__} is not plain LoRA")
        if tp_group_and_size(adapter)[1] > 1:
            raise NotImplementedError(
                f"{name}: Hugging Face exchange runs at tensor-parallel size 1; gather the "
                "adapters of a TP model first"
            )


def _parts(tail: str, module: AdapterWrapper) -> list[str]:
    """The megatron part names (keys of _HF_NAME) a layer corresponds to."""
    if tail.endswith("linear_qkv"):
        return ["linear_q", "linear_k", "linear_v"]
    if tail.endswith("linear_fc1"):
        gated = bool(getattr(getattr(module.to_wrap, "config", None), "gated_linear_unit", False))
        return ["linear_fc1_gate", "linear_fc1_up"] if gated else ["linear_fc1_up"]
    return [tail.rsplit(".", 1)[-1]]


def _wrapper_adapters(module: AdapterWrapper) -> list[nn.Module]:
    if isinstance(module, _SplitLoRA):
        return [module.part_adapter(p) for p in module.present_parts()]
    return [module.adapter]


def _adapters_of(model: nn.Module) -> list[nn.Module]:
    out = []
    for _, _, name, m in _layers(model):
        _check_wrapper(name, m)
        out.extend(_wrapper_adapters(m))
    return out


def _split_rows(tail: str, module: AdapterWrapper, t: torch.Tensor) -> list[torch.Tensor]:
    """A fused layer's output rows (of B, or of DoRA's m) split per HF projection."""
    if tail.endswith("linear_qkv"):
        return list(split_qkv(t, *qkv_sizes(module.to_wrap.config)))
    if len(_parts(tail, module)) == 2:  # gated fc1: [gate; up]
        return list(t.chunk(2, dim=0))
    return [t]


def _factors(tail: str, module: AdapterWrapper) -> dict[str, dict[str, torch.Tensor]]:
    """part -> {PEFT tensor suffix: tensor} of one layer, in HF's per-projection form:
    ``lora_A.weight``, ``lora_B.weight`` and, for DoRA, ``lora_magnitude_vector``."""
    parts = _parts(tail, module)
    if isinstance(module, _SplitLoRA):
        return {p: {"lora_A.weight": module.part_adapter(p).linear_in.weight.detach(),
                    "lora_B.weight": module.part_adapter(p).linear_out.weight.detach()}
                for p in parts if module.part_adapter(p) is not None}
    a = module.adapter.linear_in.weight.detach()
    bs = _split_rows(tail, module, module.adapter.linear_out.weight.detach())
    out = {p: {"lora_A.weight": a, "lora_B.weight": b} for p, b in zip(parts, bs, strict=True)}
    if isinstance(module, DoRALinear):
        ms = _split_rows(tail, module, module.adapter.weight_magnitude.detach())
        for p, m in zip(parts, ms, strict=True):
            out[p]["lora_magnitude_vector"] = m
    return out


def export_hf_adapter(model: nn.Module, directory: str | os.PathLike,
                      base_model_name_or_path: str | None = None) -> dict[str, torch.Tensor]:
    """Write ``model``'s LoRA (canonical LoRA, DoRA) adapters as a Hugging Face PEFT adapter in
    ``directory``.

    Returns:
        The tensors written (PEFT key -> tensor).

    Raises:
        ValueError: the model has no LoRA adapters on GPT linears, or their ranks/alphas differ.
        NotImplementedError: tensor-parallel size > 1, or DoRA and LoRA layers mixed.
    """
    from safetensors.torch import save_file

    layers = _layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapters on GPT linears "
                         "(decoder.layers.N.{self_attention.linear_qkv|linear_proj, "
                         "mlp.linear_fc1|linear_fc2}); apply LoRA first")
    adapters = _adapters_of(model)
    hparams = {(a.dim, a.alpha, a.dropout_p) for a in adapters}
    if len(hparams) != 1:
        raise ValueError(f"adapters have different (rank, alpha, dropout): {sorted(hparams)}; "
                         "one PEFT adapter_config holds one of each")
    (rank, alpha, dropout), = hparams
    use_dora = _uses_dora(layers)
    tensors, targets = {}, set()
    for index, tail, _, module in layers:
        for part, named in _factors(tail, module).items():
            key = f"{HF_PREFIX}.{index}.{_HF_NAME[part]}"
            for suffix, t in named.items():
                tensors[f"{key}.{suffix}"] = t.contiguous().clone()
            targets.add(_HF_NAME[part].rsplit(".", 1)[-1])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": use_dora,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
    }
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return tensors


def _normalise_key(key: str) -> str:
    """PEFT writes keys without the adapter name; accept ``lora_A.default.weight`` too."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def import_hf_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load a Hugging Face PEFT LoRA (or DoRA) adapter into ``model``'s LoRA, canonical LoRA or
    DoRA adapters.

    The model must already carry adapters of the same rank and alpha on the layers the file has.

    Raises:
        AdapterLoadError: rank/alpha (or use_dora) differ from the model's; keys missing from the file or
            unused by the model (listed); a shape mismatch (layer and both shapes); separate
            q/k/v (or gate/up) A's that differ where the model has one fused adapter (named).
        ValueError: the file is not a LoRA adapter, or the model has no adapters.
    """
    from safetensors.torch import load_file

    with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_rslora"):
        raise ValueError(f"{directory}: only LoRA/DoRA adapters can be imported (got peft_type "
                         f"{config.get('peft_type')!r}, use_rslora={config.get('use_rslora')})")
    layers = _layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapters on GPT linears; apply LoRA "
                         "(or CanonicalLoRA, DoRA) with the adapter's rank first")
    dora = _uses_dora(layers)
    if bool(config.get("use_dora")) != dora:
        raise AdapterLoadError(f"{directory}: the file has use_dora={bool(config.get('use_dora'))}"
                               f" but the model's adapters are {'DoRA' if dora else 'LoRA'}")
    for a in _adapters_of(model):
        if a.dim != config["r"] or float(a.alpha) != float(config["lora_alpha"]):
            raise AdapterLoadError(
                f"{a.base_linear_name}: the model's adapter has r={a.dim}, alpha={a.alpha}; the "
                f"file has r={config['r']}, lora_alpha={config['lora_alpha']}"
            )
    loaded = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    given = {_normalise_key(k): v for k, v in loaded.items()}

    # Which file keys each layer needs (a fused layer needs all of its parts).
    plan, needed = [], set()
    for index, tail, name, module in layers:
        parts = _parts(tail, module)
        if isinstance(module, _SplitLoRA):
            parts = [p for p in parts if module.part_adapter(p) is not None]
        keys = {p: f"{HF_PREFIX}.{index}.{_HF_NAME[p]}" for p in parts}
        suffixes = ["lora_A.weight", "lora_B.weight"] + (["lora_magnitude_vector"] * dora)
        needed |= {f"{k}.{x}" for k in keys.values() for x in suffixes}
        plan.append((name, tail, module, keys))
    missing, unexpected = sorted(needed - set(given)), sorted(set(given) - needed)
    if missing or unexpected:
        raise AdapterLoadError(f"{directory}: keys the model needs but the file lacks: {missing}; "
                               f"keys in the file the model has no adapter for: {unexpected}")

    def put(name: str, param: torch.Tensor, value: torch.Tensor) -> None:
        if param.shape != value.shape:
            raise AdapterLoadError(f"{name}: the model's tensor has shape {tuple(param.shape)}, "
                                   f"the file's {tuple(value.shape)}")
        with torch.no_grad():
            param.copy_(value)

    for name, tail, module, keys in plan:
        a_s = {p: given[f"{k}.lora_A.weight"] for p, k in keys.items()}
        b_s = {p: given[f"{k}.lora_B.weight"] for p, k in keys.items()}
        if isinstance(module, _SplitLoRA):
            for p in keys:
                adapter = module.part_adapter(p)
                put(f"{name}.{module.key(p)}.linear_in", adapter.linear_in.weight, a_s[p])
                put(f"{name}.{module.key(p)}.linear_out", adapter.linear_out.weight, b_s[p])
            continue
        parts = list(keys)
        first = a_s[parts[0]]
        unequal = [p for p in parts[1:]
                   if a_s[p].shape != first.shape or not torch.equal(a_s[p], first)]
        if unequal:
            raise AdapterLoadError(
                f"{name}: the file's {[_HF_NAME[p] for p in parts]} have different lora_A "
                f"({[_HF_NAME[p] for p in unequal]} differ from {_HF_NAME[parts[0]]}), which one "
                "fused LoRA adapter cannot hold exactly; use CanonicalLoRA for this adapter"
            )
        b = _join_rows(name, tail, module, [b_s[p] for p in parts])
        put(f"{name}.adapter.linear_in", module.adapter.linear_in.weight, first)
        put(f"{name}.adapter.linear_out", module.adapter.linear_out.weight, b)
        if dora:
            m = _join_rows(name, tail, module,
                           [given[f"{k}.lora_magnitude_vector"] for k in keys.values()])
            put(f"{name}.adapter.weight_magnitude", module.adapter.weight_magnitude, m)


def _join_rows(name: str, tail: str, module: AdapterWrapper, pieces: list[torch.Tensor]):
    """Inverse of :func:`_split_rows`: per-projection rows -> the fused layer's rows."""
    if not tail.endswith("linear_qkv"):
        return torch.cat(pieces, dim=0)
    heads, groups, head_dim = qkv_sizes(module.to_wrap.config)
    rows, want = [t.shape[0] for t in pieces], [heads * head_dim, groups * head_dim,
                                                groups * head_dim]
    if rows != want:
        raise AdapterLoadError(f"{name}: q/k/v tensors have {rows} rows, expected {want}")
    return interleave_qkv(*pieces, groups)


def _uses_dora(layers) -> bool:
    kinds = {isinstance(m, DoRALinear) for _, _, _, m in layers}
    if len(kinds) > 1:
        raise NotImplementedError("a model mixing DoRA and LoRA layers cannot be one PEFT adapter")
    return kinds == {True}

