"""Hugging Face PEFT exchange: LoRA adapters of a megatron GPT model <-> ``adapter_config.json`` +
``adapter_model.safetensors`` with PEFT's key names.

Module mapping (Llama-style GPT): ``decoder.layers.{i}.self_attention.linear_qkv`` ->
``model.layers.{i}.self_attn.{q,k,v}_proj``, ``...self_attention.linear_proj`` -> ``o_proj``,
``decoder.layers.{i}.mlp.linear_fc1`` -> ``mlp.{gate,up}_proj`` (``up_proj`` alone, all of
fc1's rows, without a gated linear unit), ``...mlp.linear_fc2`` -> ``down_proj``, the model's
``output_layer`` -> ``lm_head``. PEFT keys are
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (and ``lora_B``;
``base_model.model.lm_head.lora_A.weight``). MoE layers' expert, shared-expert and router
adapters get PEFT's per-expert module names (``model.layers.{i}.mlp.experts.{j}.gate_proj`` ...,
``moe_style='qwen2_moe'``, or Mixtral's ``block_sparse_moe.experts.{j}.w1`` ...): see
``bridge.peft._hf_moe`` for the names, the shared-adapter rule and why not ``target_parameters``.
An adapter on any other module has no PEFT name: export and import name it and stop, unless
``skip_unmapped=True`` leaves it out (with a warning).

Export of a fused LoRA is exact: q, k and v each get ``lora_A = A`` and their rows of B,
de-interleaved from megatron's per-group qkv layout (see ``canonical_lora``); gate/up the halves
of fc1's B; canonical LoRA its per-part factors; DoRA also each projection's rows of the
magnitude (``lora_magnitude_vector``; its norm is per output row). Both files go to temporary
files in the folder, renamed into place: a failed export leaves the adapter there as it was.

Import rule for a fused layer: separate q/k/v (or gate/up) adapters fit one fused adapter exactly
only when their A's are equal; then A is that A and B the parts' B's interleaved. Otherwise this
raises an error naming the layer (it does not stack them into a rank-3r adapter, which would give
one layer a different rank from the others, change the model's parameter shapes and its optimizer
state): use ``CanonicalLoRA``, which imports any PEFT LoRA exactly. Every file, field and tensor
is checked before the first copy, so a failed import leaves the model as it was. Config fields
that change the arithmetic are applied (``rank_pattern`` / ``alpha_pattern`` /
``layers_to_transform``, which must agree with the model's adapters) or refused by name
(``fan_in_fan_out``, ``bias``, ``modules_to_save``, ``use_rslora``, residual inits such as PiSSA,
...). Only tensor-parallel size 1 is supported (gather a TP model's adapters first); layer
numbers are the model's local ones.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import torch
from torch import nn

from bridge.peft import _hf_moe as moe
from bridge.peft._hf_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_config,
    normalise_key,
    read_config,
    read_weights,
    write_atomically,
)
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

HF_ROOT = "base_model.model"
HF_PREFIX = f"{HF_ROOT}.model.layers"
_LAYER = re.compile(r"(?:^|.*\.)decoder\.layers\.(\d+)\."
                    r"(self_attention\.linear_qkv|self_attention\.linear_proj|mlp\.linear_fc1|"
                    r"mlp\.linear_fc2)$")
_OUTPUT = re.compile(r"^(?:.*\.)?output_layer$")
# megatron part name -> HF projection (within the layer; lm_head at the model's root)
_HF_NAME = {"linear_q": "self_attn.q_proj", "linear_k": "self_attn.k_proj",
            "linear_v": "self_attn.v_proj", "linear_proj": "self_attn.o_proj",
            "linear_fc1_gate": "mlp.gate_proj", "linear_fc1_up": "mlp.up_proj",
            "linear_fc2": "mlp.down_proj", "output_layer": "lm_head"}


def _hf_module(index: int | None, part: str) -> str:
    """PEFT's module name (relative to the base model) of a megatron part."""
    return _HF_NAME[part] if index is None else f"model.layers.{index}.{_HF_NAME[part]}"


def _hf_key(index: int | None, part: str) -> str:  # the key prefix of its tensors
    return f"{HF_ROOT}.{_hf_module(index, part)}"


def _layers(model: nn.Module):
    """(layer index or None, megatron module path tail, name, wrapper) for every adapted GPT
    linear and output layer."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, AdapterWrapper):
            continue
        match = _LAYER.match(name) or moe.MOE_LAYER.match(name)
        if match:
            found.append((int(match.group(1)), match.group(2), name, module))
        elif _OUTPUT.match(name):
            found.append((None, "output_layer", name, module))
    return found


def _unmapped(model: nn.Module, layers) -> list[str]:
    """Adapter wrappers with no PEFT name (not below a mapped one)."""
    mapped = {name for _, _, name, _ in layers}
    return sorted(name for name, m in model.named_modules() if isinstance(m, AdapterWrapper)
                  and name not in mapped and not any(name.startswith(f"{n}.") for n in mapped))


def _gated(module: AdapterWrapper) -> bool:
    return bool(getattr(getattr(module.to_wrap, "config", None), "gated_linear_unit", False))


def _is_moe(tail: str) -> bool:
    return moe.MOE_LAYER.match(f"decoder.layers.0.{tail}") is not None


def _check_wrapper(name: str, tail: str, module: AdapterWrapper) -> None:
    from bridge.peft.multi_lora_layers import MultiLoRALinear

    if _is_moe(tail) and not isinstance(module, MultiLoRALinear):
        moe.check_moe_wrapper(name, tail, module)
        return

    if isinstance(module, MultiLoRALinear) and "adapter" not in module._modules:
        raise NotImplementedError(
            f"{name}: a MultiLoRA layer holds {module.n_adapters} adapter slots; export or import "
            "one inside `with expose_adapter_slot(model, idx):` (it then reads as one LoRA)")
    if not isinstance(module, (LoRALinear, _SplitLoRA, DoRALinear, MultiLoRALinear)):
        raise NotImplementedError(
            f"{name}: {type(module).__name__} cannot be exchanged with Hugging Face PEFT yet "
            "(LoRA, canonical LoRA and DoRA only)"
        )
    if isinstance(module, _SplitLoRA) and tail.endswith("linear_fc1") and not _gated(module):
        raise NotImplementedError(
            f"{name}: a split gate/up adapter over an fc1 with no gated linear unit "
            "(gated_linear_unit=False) covers half of fc1's rows, which PEFT's up_proj (all of "
            "them) cannot hold; apply CanonicalLoRA again (linear_fc1_up adapts the whole fc1)")
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
        return ["linear_fc1_gate", "linear_fc1_up"] if _gated(module) else ["linear_fc1_up"]
    return [tail.rsplit(".", 1)[-1]]


def _wrapper_adapters(module: AdapterWrapper) -> list[nn.Module]:
    if isinstance(module, _SplitLoRA):
        return [module.part_adapter(p) for p in module.present_parts()]
    return [module.adapter]


def _part_adapters(tail: str, module: AdapterWrapper) -> dict[str, nn.Module]:
    """part -> the adapter that computes it (the fused one for every part of a fused layer)."""
    if isinstance(module, _SplitLoRA):
        return {p: module.part_adapter(p) for p in _parts(tail, module)
                if module.part_adapter(p) is not None}
    return {p: module.adapter for p in _parts(tail, module)}


def _hf_adapters(index: int | None, tail: str, module: AdapterWrapper, style: str
                 ) -> dict[str, nn.Module]:
    """PEFT module name -> the adapter that computes it, for one layer."""
    if _is_moe(tail):
        return {hf: module.adapter for hf in moe.moe_modules(index, tail, module, style)}
    return {_hf_module(index, p): a for p, a in _part_adapters(tail, module).items()}


def _hf_factors(index: int | None, tail: str, module: AdapterWrapper, style: str
                ) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT module name -> {tensor suffix: tensor}, for one layer."""
    if _is_moe(tail):
        return moe.moe_factors(index, tail, module, style)
    return {_hf_module(index, p): named for p, named in _factors(tail, module).items()}


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
        return {p: {"lora_A.weight": a.linear_in.weight.detach(),
                    "lora_B.weight": a.linear_out.weight.detach()}
                for p, a in _part_adapters(tail, module).items()}
    a = module.adapter.linear_in.weight.detach()
    bs = _split_rows(tail, module, module.adapter.linear_out.weight.detach())
    out = {p: {"lora_A.weight": a, "lora_B.weight": b} for p, b in zip(parts, bs, strict=True)}
    if isinstance(module, DoRALinear):
        ms = _split_rows(tail, module, module.adapter.weight_magnitude.detach())
        for p, m in zip(parts, ms, strict=True):
            out[p]["lora_magnitude_vector"] = m
    return out


def _mapped_layers(model: nn.Module, skip_unmapped: bool, verb: str, error):
    """The exchangeable layers (each checked), after naming the unmapped ones."""
    layers = _layers(model)
    unmapped = _unmapped(model, layers)
    if unmapped and not skip_unmapped:
        raise error(f"adapters with no Hugging Face PEFT name: {unmapped} (PEFT names exist for "
                    "the decoder layers' linear_qkv/linear_proj/linear_fc1/linear_fc2, their MoE "
                    "experts, shared experts and router, and the output_layer); pass "
                    f"skip_unmapped=True to {verb} the others without them")
    if unmapped:
        what = "left out of the export" if verb == "export" else "left as they are"
        warnings.warn(f"adapters with no Hugging Face PEFT name {what}: {unmapped}", UserWarning,
                      stacklevel=3)
    for _, tail, name, module in layers:
        _check_wrapper(name, tail, module)
    return layers


def export_hf_adapter(model: nn.Module, directory: str | os.PathLike,
                      base_model_name_or_path: str | os.PathLike | None = None, *,
                      skip_unmapped: bool = False,
                      moe_style: str = "qwen2_moe") -> dict[str, torch.Tensor]:
    """Write ``model``'s LoRA (canonical LoRA, DoRA) adapters as a Hugging Face PEFT adapter in
    ``directory`` (files replaced atomically).

    Args:
        skip_unmapped: leave out (with a warning) adapters on modules without a PEFT name
            instead of raising.
        moe_style: the HF names of MoE layers: 'qwen2_moe' (``mlp.experts.{j}.gate_proj``,
            ``mlp.shared_expert.*``, ``mlp.gate``) or 'mixtral' (``block_sparse_moe.experts.{j}
            .w1|w3|w2``, ``block_sparse_moe.gate``).

    Returns:
        The tensors written (PEFT key -> tensor).

    Raises:
        ValueError: the model has no LoRA adapters on GPT linears, or their dropouts differ
            (ranks and alphas that differ go to ``rank_pattern`` / ``alpha_pattern``).
        NotImplementedError: adapters without a PEFT name (listed; see ``skip_unmapped``),
            tensor-parallel size > 1, DoRA and LoRA layers mixed, a split fc1 adapter over a
            non-gated fc1.
        TypeError: ``base_model_name_or_path`` is not a str or a path.
    """
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path,
                                                                  (str, os.PathLike)):
        raise TypeError(f"base_model_name_or_path must be a str or a path, got "
                        f"{type(base_model_name_or_path).__name__}")
    moe.check_style(moe_style)
    layers = _mapped_layers(model, skip_unmapped, "export", NotImplementedError)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapters on GPT linears "
                         "(decoder.layers.N.{self_attention.linear_qkv|linear_proj, "
                         "mlp.linear_fc1|linear_fc2}, output_layer); apply LoRA first")
    adapters = [a for _, _, _, m in layers for a in _wrapper_adapters(m)]
    dropouts = {a.dropout_p for a in adapters}
    if len(dropouts) != 1:
        raise ValueError(f"adapters have different dropout: {sorted(dropouts)}; one PEFT "
                         "adapter_config holds one lora_dropout")
    (dropout,) = dropouts
    rank, alpha, patterns = _rank_alpha(layers, moe_style)
    use_dora = _uses_dora(layers)
    tensors, targets = {}, set()
    for index, tail, _, module in layers:
        for hf, named in _hf_factors(index, tail, module, moe_style).items():
            for suffix, t in named.items():
                tensors[f"{HF_ROOT}.{hf}.{suffix}"] = t.contiguous().clone()
            targets.add(hf.rsplit(".", 1)[-1])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": use_dora,
        "base_model_name_or_path": None if base_model_name_or_path is None
        else os.fspath(base_model_name_or_path),
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        **patterns,
    }
    write_atomically(os.fspath(directory), tensors, json.dumps(config, indent=2))
    return tensors


def _rank_alpha(layers, style: str) -> tuple[int, float, dict]:
    """(r, lora_alpha, {rank_pattern, alpha_pattern}) of the export: the most common rank and
    alpha, and each PEFT module whose adapter differs (e.g. experts under normalize_moe_lora)
    named exactly (its escaped full name, PEFT's pattern rule matches only it)."""
    from collections import Counter

    per = {hf: (a.dim, a.alpha) for index, tail, _, m in layers
           for hf, a in _hf_adapters(index, tail, m, style).items()}
    rank = Counter(r for r, _ in per.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in per.values()).most_common(1)[0][0]
    patterns = {"rank_pattern": {re.escape(hf): r for hf, (r, _) in per.items() if r != rank},
                "alpha_pattern": {re.escape(hf): a for hf, (_, a) in per.items() if a != alpha}}
    return rank, alpha, {k: v for k, v in patterns.items() if v}


def _pattern(config: dict, field: str, module: str):
    """PEFT's rule: the first pattern key that matches the end of the module name."""
    for key, value in (config.get(field) or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return key, value
    return None, None


def _check_hparams(config: dict, path: str, layers, style: str) -> None:
    """Each adapter's rank and alpha against the file's (with rank/alpha patterns), and the
    layers it adapts against ``layers_to_transform``."""
    problems = []
    for index, tail, name, module in layers:
        for hf, adapter in _hf_adapters(index, tail, module, style).items():
            r_key, r = _pattern(config, "rank_pattern", hf)
            a_key, alpha = _pattern(config, "alpha_pattern", hf)
            r = config["r"] if r is None else r
            alpha = config.get("lora_alpha", 8) if alpha is None else alpha
            if adapter.dim != r or float(adapter.alpha) != float(alpha):
                notes = [f"{f} {k!r}" for f, k in (("rank_pattern", r_key),
                                                   ("alpha_pattern", a_key)) if k is not None]
                problems.append(
                    f"{name} ({hf}): the model's adapter has r={adapter.dim}, alpha="
                    f"{adapter.alpha}; the file has r={r}, lora_alpha={alpha}"
                    + (f" ({', '.join(notes)})" if notes else ""))
    wanted = config.get("layers_to_transform")
    if wanted is not None:
        wanted = sorted([wanted] if isinstance(wanted, int) else wanted)
        have = sorted({i for i, _, _, _ in layers if i is not None})
        if wanted != have:
            problems.append(f"layers_to_transform={wanted}, but the model adapts layers {have}: "
                            "apply LoRA to the same layers")
    if problems:
        raise AdapterLoadError(f"{path}: " + "; ".join(problems))


def import_hf_adapter(model: nn.Module, directory: str | os.PathLike, *,
                      skip_unmapped: bool = False, moe_style: str = "qwen2_moe") -> None:
    """Load a Hugging Face PEFT LoRA (or DoRA) adapter into ``model``'s LoRA, canonical LoRA or
    DoRA adapters. Everything is checked before the first tensor is copied.

    The model must already carry adapters of the file's rank and alpha on the layers the file
    has (rank_pattern / alpha_pattern / layers_to_transform included).

    Args:
        skip_unmapped: leave adapters on modules without a PEFT name as they are (with a
            warning) instead of raising.
        moe_style: the HF names of MoE layers, as for :func:`export_hf_adapter`.

    Raises:
        AdapterLoadError: naming the file, field, key or layer: an unreadable file, a field
            of a bad type or one this import cannot reproduce, rank/alpha/use_dora unlike the
            model's, missing or unused keys, shapes, q/k/v (gate/up) A's that differ where the
            model has one fused adapter, a shared expert adapter whose experts' copies differ,
            adapters without a PEFT name.
        ValueError: the model has no adapters on GPT linears.
    """
    moe.check_style(moe_style)
    directory = os.fspath(directory)
    path = os.path.join(directory, ADAPTER_CONFIG)
    config = read_config(directory)
    check_config(config, path)
    layers = _mapped_layers(model, skip_unmapped, "import", AdapterLoadError)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapters on GPT linears; apply LoRA "
                         "(or CanonicalLoRA, DoRA) with the adapter's rank first")
    dora = _uses_dora(layers)
    if bool(config.get("use_dora")) != dora:
        raise AdapterLoadError(f"{directory}: the file has use_dora={bool(config.get('use_dora'))}"
                               f" but the model's adapters are {'DoRA' if dora else 'LoRA'}")
    _check_hparams(config, path, layers, moe_style)
    given = {normalise_key(k): v for k, v in read_weights(directory).items()}

    # Which file keys each layer needs (a fused layer needs all of its parts).
    plan, needed = [], set()
    for index, tail, name, module in layers:
        if _is_moe(tail):
            keys = {hf: f"{HF_ROOT}.{hf}" for hf in moe.moe_modules(index, tail, module,
                                                                     moe_style)}
        else:
            keys = {p: _hf_key(index, p) for p in _part_adapters(tail, module)}
        suffixes = ["lora_A.weight", "lora_B.weight"] + (["lora_magnitude_vector"] * dora)
        needed |= {f"{k}.{x}" for k in keys.values() for x in suffixes}
        plan.append((index, name, tail, module, keys))
    missing, unexpected = sorted(needed - set(given)), sorted(set(given) - needed)
    if missing or unexpected:
        raise AdapterLoadError(f"{directory}: keys the model needs but the file lacks: {missing}; "
                               f"keys in the file the model has no adapter for: {unexpected}")

    copies = []  # (param, value): all checked first, copied last

    def put(name: str, param: torch.Tensor, value: torch.Tensor) -> None:
        if param.shape != value.shape:
            raise AdapterLoadError(f"{name}: the model's tensor has shape {tuple(param.shape)}, "
                                   f"the file's {tuple(value.shape)}")
        copies.append((param, value))

    for index, name, tail, module, keys in plan:
        if _is_moe(tail):
            for what, param, value in moe.moe_copies(name, index, tail, module, moe_style, given,
                                                     HF_ROOT, AdapterLoadError):
                put(what, param, value)
            continue
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
    with torch.no_grad():
        for param, value in copies:
            param.copy_(value)


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
