"""The MoE half of the Hugging Face PEFT exchange (``bridge.peft.hf``): expert, shared-expert and
router adapters <-> PEFT's per-expert module names.

Names (``style``), per decoder layer i and global expert j; 'qwen2_moe' (Qwen2-MoE, Qwen3-MoE,
OLMoE) under ``model.layers.{i}.mlp``, 'mixtral' under ``model.layers.{i}.block_sparse_moe``:

    megatron (decoder.layers.{i}.)         'qwen2_moe'                         'mixtral'
    mlp.experts.local_experts.{j}.fc1      experts.{j}.gate_proj / up_proj     experts.{j}.w1 / w3
    mlp.experts.linear_fc1 (grouped)       the same, for every expert j        the same
    mlp.experts...linear_fc2               experts.{j}.down_proj               experts.{j}.w2
    mlp.shared_experts.linear_fc1 / fc2    shared_expert.gate_proj / up_proj   (none: refused)
                                           / down_proj
    mlp.router                             gate                                gate

A gated fc1's B is split into its gate and up halves (gate first, as megatron's SwiGLU and HF's
``gate_up_proj``), A is both halves'; a grouped linear's adapter is written once per expert: a
shared adapter's A and B into every expert (copies: exact), per-expert and shared-outer adapters
their own factors. On import a factor the model keeps once for many experts (the shared adapter,
the shared side of shared-outer) needs every expert's copy in the file equal, bit for bit; else
the error names the layer and the experts that differ.

Why per-expert module names and not PEFT's ``target_parameters`` (LoRA on a fused 3-D expert
parameter such as transformers 5's ``experts.gate_up_proj``): ``target_parameters`` needs that
fused parameter, which only some HF model classes (and transformers releases) have, and its
tensor layout (rank concatenated over gate and up, B block-diagonal) differs between them;
per-expert names are what every HF MoE checkpoint was published with, load into per-expert HF
models with any PEFT version, and PEFT >= 0.18 converts them itself to the fused layout where
transformers 5 fused the experts and PEFT knows the conversion (Mixtral, checked in the tests; for
Qwen2-MoE, PEFT 0.21 with transformers 5.24 has no conversion and leaves the experts out).
Expert parallelism must be 1 (gather the experts first): the names use global expert numbers.
Ranks that differ between modules (``normalize_moe_lora``) are written as ``rank_pattern`` keys
of the exact per-expert names; PEFT 0.21's Mixtral conversion does not rename those keys to the
fused layout (its own TODO), so such an export loads into per-expert HF models and back here, not
into transformers 5's fused Mixtral (PEFT raises a size mismatch there).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from bridge.peft.tp import group_size

__all__ = ["MOE_LAYER", "MOE_STYLES", "check_moe_wrapper", "moe_copies", "moe_factors",
           "moe_modules"]

MOE_LAYER = re.compile(r"(?:^|.*\.)decoder\.layers\.(\d+)\."
                       r"(mlp\.router|mlp\.shared_experts\.linear_fc[12]|mlp\.experts\.linear_fc[12]|"
                       r"mlp\.experts\.local_experts\.\d+\.linear_fc[12])$")
# style -> (MoE block, shared expert (None: the style has none), router, gate, up, down)
MOE_STYLES = {"qwen2_moe": ("mlp", "shared_expert", "gate", "gate_proj", "up_proj", "down_proj"),
              "mixtral": ("block_sparse_moe", None, "gate", "w1", "w3", "w2")}


def check_style(style: str) -> None:
    if style not in MOE_STYLES:
        raise ValueError(f"moe_style must be one of {sorted(MOE_STYLES)}, got {style!r}")


def _gated(module: nn.Module) -> bool:
    return bool(getattr(getattr(module.to_wrap, "config", None), "gated_linear_unit", False))


def _grouped(module: nn.Module) -> bool:
    from bridge.peft.expert_lora_layers import is_grouped_linear

    return is_grouped_linear(module.to_wrap)


def moe_modules(index: int, tail: str, module: nn.Module, style: str
                ) -> dict[str, tuple[int | None, int, int]]:
    """HF module name -> (local expert of a grouped base or None, row chunk, chunks) of a layer:
    the rows of B that HF module holds are ``B[expert].chunk(chunks)[chunk]``."""
    block, shared, router, gate, up, down = MOE_STYLES[style]
    prefix = f"model.layers.{index}.{block}"
    if tail == "mlp.router":
        return {f"{prefix}.{router}": (None, 0, 1)}
    fc = tail.rsplit(".", 1)[-1]
    projs = ([gate, up] if _gated(module) else [up]) if fc == "linear_fc1" else [down]
    if tail.startswith("mlp.shared_experts."):
        if shared is None:
            raise NotImplementedError(f"decoder.layers.{index}.{tail}: the {style!r} naming has "
                                      "no shared expert; use moe_style='qwen2_moe'")
        owners = [(f"{prefix}.{shared}", None)]
    elif tail.startswith("mlp.experts.local_experts."):
        owners = [(f"{prefix}.experts.{int(tail.split('.')[3])}", None)]
    else:  # grouped: every local (= global, EP 1) expert
        owners = [(f"{prefix}.experts.{e}", e) for e in range(module.to_wrap.num_gemms)]
    return {f"{owner}.{p}": (e, k, len(projs)) for owner, e in owners
            for k, p in enumerate(projs)}


def check_moe_wrapper(name: str, tail: str, module: nn.Module) -> None:
    """Plain LoRA at expert-TP and EP size 1 (the names are global, the factors whole)."""
    from bridge.peft.expert_adapters import (
        GroupedExpertLinearAdapter,
        SharedOuterGroupedExpertAdapter,
    )
    from bridge.peft.lora_layers import LoRATopKRouter
    from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter

    adapter = getattr(module, "adapter", None)
    router = tail == "mlp.router"
    kinds = (ParallelLinearAdapter,) if router or not _grouped(module) else (
        ParallelLinearAdapter, GroupedExpertLinearAdapter, SharedOuterGroupedExpertAdapter)
    if router != isinstance(module, LoRATopKRouter) or type(adapter) not in kinds \
            or adapter.activation_name != "identity":
        raise NotImplementedError(f"{name}: {type(module).__name__} with "
                                  f"{type(adapter).__name__} is not plain LoRA")
    sizes = {"tensor": group_size(getattr(adapter, "tp_group", None)),
             "expert": group_size(getattr(adapter, "ep_group", None))}
    big = [k for k, v in sizes.items() if v > 1]
    if big:
        raise NotImplementedError(
            f"{name}: Hugging Face exchange runs at {' and '.join(big)}-parallel size 1 (expert "
            "numbers are global); gather the adapters of a parallel model first")


def _factor_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) parameters: [r, K] / [N, r] shared, or [E, r, K] / [E, N, r] per expert."""
    return module.adapter.linear_in.weight, module.adapter.linear_out.weight


def _pick(t: torch.Tensor, expert: int | None) -> torch.Tensor:
    return t[expert] if t.dim() == 3 else t


def moe_factors(index: int, tail: str, module: nn.Module, style: str
                ) -> dict[str, dict[str, torch.Tensor]]:
    """HF module name -> {'lora_A.weight', 'lora_B.weight'} of one MoE layer."""
    a, b = (t.detach() for t in _factor_params(module))
    out = {}
    for hf, (expert, chunk, chunks) in moe_modules(index, tail, module, style).items():
        out[hf] = {"lora_A.weight": _pick(a, expert),
                   "lora_B.weight": _pick(b, expert).chunk(chunks, dim=0)[chunk]}
    return out


def moe_copies(name: str, index: int, tail: str, module: nn.Module, style: str,
               given: dict[str, torch.Tensor], root: str, error: type[Exception]
               ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, parameter, value) for one MoE layer from the file's tensors ``given`` (keys
    ``{root}.{hf module}.lora_A.weight``): gate/up halves joined, per-expert factors stacked,
    a once-kept factor checked equal over the experts.

    Raises:
        error: gate and up with different A; a shared factor that differs between experts.
    """
    per_expert: dict[int | None, dict[str, list]] = {}
    for hf, (expert, chunk, _) in moe_modules(index, tail, module, style).items():
        slot = per_expert.setdefault(expert, {"names": [], "A": [], "B": []})
        slot["names"].insert(chunk, hf)
        slot["A"].insert(chunk, given[f"{root}.{hf}.lora_A.weight"])
        slot["B"].insert(chunk, given[f"{root}.{hf}.lora_B.weight"])
    joined = {}
    for expert, slot in per_expert.items():
        first = slot["A"][0]
        if any(t.shape != first.shape or not torch.equal(t, first) for t in slot["A"][1:]):
            raise error(f"{name}: the file's {slot['names']} have different lora_A, which one "
                        "gated fc1 adapter (gate and up share A) cannot hold exactly; use "
                        "CanonicalLoRA (dense) or per-projection adapters")
        joined[expert] = (first, torch.cat(slot["B"], dim=0) if len(slot["B"]) > 1
                          else slot["B"][0])
    a_param, b_param = _factor_params(module)
    copies = []
    for what, param, i in (("linear_in (lora_A)", a_param, 0), ("linear_out (lora_B)", b_param, 1)):
        values = [joined[e][i] for e in sorted(joined, key=lambda e: -1 if e is None else e)]
        if param.dim() == 3:  # one per local expert
            if len({tuple(v.shape) for v in values}) != 1:
                raise error(f"{name}: the experts' {what} tensors have different shapes "
                            f"{sorted({tuple(v.shape) for v in values})}")
            value = torch.stack(values)
        else:  # kept once: every expert's copy must be the same
            differ = [e for e, v in zip(sorted(joined, key=lambda e: -1 if e is None else e),
                                        values, strict=True)
                      if v.shape != values[0].shape or not torch.equal(v, values[0])]
            if differ:
                raise error(
                    f"{name}: the model keeps one {what} for all {len(values)} experts (a shared "
                    f"expert adapter), but the file's experts {differ} differ from expert 0's; "
                    "apply LoRA with share_expert_adapters=False (one adapter per expert) to "
                    "import per-expert adapters")
            value = values[0]
        copies.append((f"{name}.adapter.{what.split()[0]}", param, value))
    return copies
