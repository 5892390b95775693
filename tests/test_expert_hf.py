"""Hugging Face PEFT exchange of MoE adapters (world size 1, the tiny MoE GPT of
test_moe_lora_models): experts (SequentialMLP per-expert; grouped shared, per-expert and
shared-outer), the shared expert and the router, under PEFT's per-expert module names.

Export writes a shared adapter into every expert (exact copies) and splits a gated fc1's B into
gate and up; import into a fresh model restores every adapter tensor bit for bit and the outputs;
a shared adapter refuses experts whose copies differ, naming the layer; the names load into HF's
own model through ``peft`` (Mixtral, whose per-expert names PEFT converts to transformers 5's fused
experts) and give our MoE layer's output on the same weights.
"""

from __future__ import annotations

import pytest
import torch

from tests.numerics import assert_close_rel, dtype_tol
from tests.test_moe_lora_models import (
    EXPERTS,
    HIDDEN,
    TOPK,
    apply_lora,
    copy_weights,
    moe_config,
    moe_gpt,
    tokens,
)

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")
pytest.importorskip("safetensors", reason="safetensors not installed (pip install -e .[test])")

pytestmark = pytest.mark.usefixtures("megatron_tp1")
LAYOUTS = {"sequential": ("sequential", {}), "grouped-shared": ("grouped", {}),
           "grouped-per-expert": ("grouped", {"share_expert_adapters": False}),
           "grouped-shared-outer": ("grouped", {"experts_shared_outer_loras": True})}
ROOT = "base_model.model.model.layers.0.mlp"
FFN = 16  # moe_ffn_hidden_size of moe_config


def _model(layout: str, seed: int = 0, adapter_seed: int = 0, **cfg):
    kind, kw = LAYOUTS[layout]
    model = apply_lora(moe_gpt(kind, moe_config(**cfg), seed=seed), **kw)
    g = torch.Generator().manual_seed(100 + adapter_seed)
    with torch.no_grad():  # adapters random, and different per seed
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}


def _logits(model) -> torch.Tensor:
    ids, pos, mask = tokens()
    with torch.no_grad():
        return model(ids, pos, mask)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_names_and_exact_values(layout, tmp_path):
    from bridge.peft.hf import export_hf_adapter

    model = _model(layout)
    tensors = export_hf_adapter(model, tmp_path)
    experts = model.decoder.layers[0].mlp.experts
    for e in range(EXPERTS):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for f in ("lora_A", "lora_B"):
                assert f"{ROOT}.experts.{e}.{proj}.{f}.weight" in tensors
        fc1 = experts.local_experts[e].linear_fc1 if layout == "sequential" else experts.linear_fc1
        a, b = fc1.adapter.linear_in.weight, fc1.adapter.linear_out.weight
        a, b = (a[e] if a.dim() == 3 else a), (b[e] if b.dim() == 3 else b)
        assert torch.equal(tensors[f"{ROOT}.experts.{e}.gate_proj.lora_A.weight"], a)
        assert torch.equal(tensors[f"{ROOT}.experts.{e}.up_proj.lora_A.weight"], a)
        assert torch.equal(tensors[f"{ROOT}.experts.{e}.gate_proj.lora_B.weight"], b[:FFN])
        assert torch.equal(tensors[f"{ROOT}.experts.{e}.up_proj.lora_B.weight"], b[FFN:])
    if layout == "grouped-shared":  # one adapter, written into every expert
        for e in range(1, EXPERTS):
            assert torch.equal(tensors[f"{ROOT}.experts.{e}.down_proj.lora_B.weight"],
                               tensors[f"{ROOT}.experts.0.down_proj.lora_B.weight"])
    for key in ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
                "gate"):
        assert f"{ROOT}.{key}.lora_A.weight" in tensors, key
    assert f"{ROOT}.gate.lora_B.weight" in tensors and tensors[
        f"{ROOT}.gate.lora_B.weight"].shape == (EXPERTS, 4)
    assert not [k for k in tensors if "local_experts" in k or "linear_fc" in k or "router" in k]
    import json

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {"gate_proj", "up_proj", "down_proj", "gate", "q_proj", "o_proj"} <= set(
        config["target_modules"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_into_a_fresh_model(layout, tmp_path):
    from bridge.peft.hf import export_hf_adapter, import_hf_adapter

    src = _model(layout)
    want, ref = _adapters(src), _logits(src)
    export_hf_adapter(src, tmp_path)
    dst = _model(layout, adapter_seed=1)  # same base weights, other adapters
    assert (_logits(dst) - ref).abs().max() > 1e-3
    import_hf_adapter(dst, tmp_path)
    got = _adapters(dst)
    assert got.keys() == want.keys()
    bad = [n for n in want if not torch.equal(got[n], want[n])]
    assert not bad, bad
    torch.testing.assert_close(_logits(dst), ref, rtol=0, atol=0)


def test_per_expert_adapters_move_between_sequential_and_grouped(tmp_path):
    """The names are the experts' whatever the layout: a SequentialMLP export imports into
    grouped per-expert adapters and computes the same."""
    from bridge.peft.hf import export_hf_adapter, import_hf_adapter

    seq = _model("sequential")
    export_hf_adapter(seq, tmp_path)
    grouped = _model("grouped-per-expert", adapter_seed=1)
    copy_weights(seq, grouped)
    import_hf_adapter(grouped, tmp_path)
    assert_close_rel(_logits(grouped), _logits(seq), dtype_tol(torch.float32, "layer"), "logits")


@pytest.mark.parametrize("into", ["grouped-shared", "grouped-shared-outer"])
def test_a_shared_adapter_refuses_experts_that_differ(into, tmp_path):
    from bridge.peft import AdapterLoadError
    from bridge.peft.hf import export_hf_adapter, import_hf_adapter

    export_hf_adapter(_model("grouped-per-expert"), tmp_path)
    dst = _model(into, adapter_seed=1)
    before = _adapters(dst)
    what = "linear_in" if into == "grouped-shared" else "linear_in|linear_out"
    with pytest.raises(AdapterLoadError, match=rf"decoder\.layers\.0\.mlp\.experts\.linear_fc1: "
                       rf"the model keeps one ({what}).*experts \[1, 2, 3\] differ"):
        import_hf_adapter(dst, tmp_path)
    after = _adapters(dst)  # nothing copied
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_gate_and_up_with_different_a_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from bridge.peft import AdapterLoadError
    from bridge.peft.hf import ADAPTER_WEIGHTS, export_hf_adapter, import_hf_adapter

    export_hf_adapter(_model("sequential"), tmp_path)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    tensors[f"{ROOT}.experts.2.up_proj.lora_A.weight"] += 1
    save_file(tensors, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(AdapterLoadError, match=r"local_experts\.2\.linear_fc1: the file's \["
                       r".*experts\.2\.gate_proj.*experts\.2\.up_proj'\] have different lora_A"):
        import_hf_adapter(_model("sequential", adapter_seed=1), tmp_path)


def test_mixtral_names_and_what_they_cannot_hold(tmp_path):
    from bridge.peft.hf import export_hf_adapter

    with pytest.raises(NotImplementedError, match=r"shared_experts\.linear_fc1: the 'mixtral' "
                       r"naming has no shared expert"):
        export_hf_adapter(_model("grouped-shared"), tmp_path, moe_style="mixtral")
    with pytest.raises(ValueError, match=r"moe_style must be one of \['mixtral', 'qwen2_moe'\]"):
        export_hf_adapter(_model("grouped-shared"), tmp_path, moe_style="deepseek")
    model = _model("grouped-per-expert", moe_shared_expert_intermediate_size=None)
    tensors = export_hf_adapter(model, tmp_path, moe_style="mixtral")
    root = "base_model.model.model.layers.0.block_sparse_moe"
    assert {f"{root}.experts.{e}.{w}.lora_{f}.weight" for e in range(EXPERTS)
            for w in ("w1", "w2", "w3") for f in "AB"} | {f"{root}.gate.lora_A.weight",
                                                           f"{root}.gate.lora_B.weight"} \
        <= set(tensors)


# ---- Hugging Face's own model through peft -------------------------------------------------------
@pytest.mark.parametrize("layout", ["sequential", "grouped-per-expert", "grouped-shared"])
def test_peft_loads_the_export_into_hf_mixtral_and_gives_our_moe_output(layout, tmp_path):
    """Router and expert adapters exported with Mixtral's names, loaded by ``peft`` into
    transformers' MixtralSparseMoeBlock holding our base weights (PEFT converts the per-expert
    names to transformers 5's fused experts): its output on the same hidden states is ours."""
    pytest.importorskip("peft", reason="peft not installed (pip install -e .[test])")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    from peft import PeftModel

    from bridge.peft import AdapterWrapper
    from bridge.peft.expert_lora_layers import _weights
    from bridge.peft.hf import export_hf_adapter

    kind, kw = LAYOUTS[layout]
    model = apply_lora(moe_gpt(kind, moe_config(moe_shared_expert_intermediate_size=None)),
                       target_modules=["linear_fc1", "linear_fc2", "router"], **kw)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    export_hf_adapter(model, tmp_path, moe_style="mixtral")
    mlp = model.decoder.layers[0].mlp

    hf_cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_local_experts=EXPERTS,
        num_experts_per_tok=TOPK, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, router_jitter_noise=0.0)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    block = hf.model.layers[0].mlp
    experts = mlp.experts
    with torch.no_grad():
        block.gate.weight.copy_(mlp.router.to_wrap.weight)
        for e in range(EXPERTS):
            if layout == "sequential":
                w1 = experts.local_experts[e].linear_fc1.to_wrap.weight
                w2 = experts.local_experts[e].linear_fc2.to_wrap.weight
            else:
                w1, w2 = _weights(experts.linear_fc1.to_wrap)[e], _weights(
                    experts.linear_fc2.to_wrap)[e]
            block.experts.gate_up_proj[e].copy_(w1)  # [gate; up] rows, as megatron's SwiGLU
            block.experts.down_proj[e].copy_(w2)
    x = torch.randn(8, 2, HIDDEN, generator=torch.Generator().manual_seed(6))  # [s, b, h]
    x_hf = x.transpose(0, 1).contiguous()  # HF's [b, s, h]
    with torch.no_grad():
        hf_base = block(x_hf).transpose(0, 1)
        peft_model = PeftModel.from_pretrained(hf, str(tmp_path))
        hf_lora = peft_model.base_model.model.model.layers[0].mlp(x_hf)
        ours, _ = mlp(x)
        for m in mlp.modules():
            if isinstance(m, AdapterWrapper):
                m.disable_adapter_layers()
        ours_base, _ = mlp(x)
    tol = dtype_tol(torch.float32, "chain")
    assert_close_rel(hf_base, ours_base, tol, "the base MoE layers agree")
    assert_close_rel(hf_lora.transpose(0, 1), ours, tol, "PEFT's LoRA vs ours")
    assert (ours - ours_base).abs().max() > 1e-2  # the adapters matter


def test_expert_ranks_of_normalize_moe_lora_go_to_rank_pattern(tmp_path):
    """normalize_moe_lora gives experts rank dim // topk: the export names each module whose
    rank differs from the file's r in rank_pattern (exactly that module), and imports back."""
    import json
    import re

    from bridge.peft.hf import export_hf_adapter, import_hf_adapter

    src = apply_lora(moe_gpt("grouped", moe_config()), share_expert_adapters=False,
                     normalize_moe_lora=True)
    experts = src.decoder.layers[0].mlp.experts
    assert experts.linear_fc1.adapter.dim == 4 // TOPK
    want, ref = _adapters(src), _logits(src)
    export_hf_adapter(src, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    ranks = {}
    for key in config.get("rank_pattern", {}):
        assert re.fullmatch(r"[\w\\.]+", key), key  # an escaped module name, not a wildcard
        ranks[key.replace("\\", "")] = config["rank_pattern"][key]
    assert config["r"] == 4 // TOPK  # the 12 expert projections outnumber the 8 others
    assert ranks == {m: 4 for m in (
        *(f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"),
        *(f"model.layers.0.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj",
                                                            "down_proj")),
        "model.layers.0.mlp.gate")}
    dst = apply_lora(moe_gpt("grouped", moe_config()), share_expert_adapters=False,
                     normalize_moe_lora=True, lora_B_init_method="zero")
    import_hf_adapter(dst, tmp_path)
    got = _adapters(dst)
    assert not [n for n in want if not torch.equal(got[n], want[n])]
    torch.testing.assert_close(_logits(dst), ref, rtol=0, atol=0)
