"""Hugging Face PEFT exchange: our export loads with PEFT's own loader into a tiny local Llama and
gives the same s·B@A per projection; PEFT's adapters import into canonical LoRA exactly."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed")
peft = pytest.importorskip("peft", reason="peft not installed (pip install peft)")
transformers = pytest.importorskip("transformers", reason="transformers not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors not installed")

from bridge.peft.adapter_io import AdapterLoadError  # noqa: E402
from bridge.peft.canonical_lora import CanonicalLoRA  # noqa: E402
from bridge.peft.dora import DoRA  # noqa: E402
from bridge.peft.hf import export_hf_adapter, import_hf_adapter  # noqa: E402
from bridge.peft.lora import LoRA  # noqa: E402
from tests.megatron_utils import qkv_row_indices as _qkv_row_indices  # noqa: E402
from tests.megatron_utils import tiny_gpt_model  # noqa: E402

R, ALPHA = 4, 8
S = ALPHA / R
LAYERS, HEADS, GROUPS, HEAD_DIM, FFN = 2, 4, 2, 16, 96
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=GROUPS,
                                      intermediate_size=FFN, vocab_size=128)
    return transformers.LlamaForCausalLM(config)


def qkv_rows():
    """q, k, v rows of megatron's fused qkv output, by HF projection name."""
    return {f"{part}_proj": rows
            for part, rows in _qkv_row_indices(HEADS, GROUPS, HEAD_DIM).items()}


def randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name or "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def our_deltas(model) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, HF projection) -> s·B@A from a fused-LoRA megatron model, split by hand."""
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        for wrapper, names in ((layer.self_attention.linear_qkv, None),
                               (layer.self_attention.linear_proj, "o_proj"),
                               (layer.mlp.linear_fc1, None), (layer.mlp.linear_fc2, "down_proj")):
            a = wrapper.adapter.linear_in.weight.detach().double()
            b = wrapper.adapter.linear_out.weight.detach().double()
            delta = S * b @ a
            if names is not None:
                out[(i, names)] = delta
            elif delta.shape[0] == 2 * FFN:  # fc1 = [gate; up]
                out[(i, "gate_proj")], out[(i, "up_proj")] = delta[:FFN], delta[FFN:]
            else:
                for proj, rows in qkv_rows().items():
                    out[(i, proj)] = delta[rows]
    return out


def hf_deltas(peft_model) -> dict[tuple[int, str], torch.Tensor]:
    out = {}
    for i, layer in enumerate(peft_model.base_model.model.model.layers):
        for proj in PROJ:
            mod = getattr(layer.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj")
                          else layer.mlp, proj)
            a = mod.lora_A["default"].weight.detach().double()
            b = mod.lora_B["default"].weight.detach().double()
            out[(i, proj)] = mod.scaling["default"] * b @ a
    return out


def test_export_loads_in_peft_with_equal_deltas(megatron_tp1, tmp_path):
    model = LoRA(dim=R, alpha=ALPHA, kernel_backend="eager")(tiny_gpt_model(num_layers=LAYERS))
    randomise(model)
    written = export_hf_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["bias"]) == \
        (R, ALPHA, 0.0, "none")
    assert sorted(config["target_modules"]) == sorted(PROJ)
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert sorted(written) == sorted(
        f"base_model.model.model.layers.{i}.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}"
        f".lora_{x}.weight" for i in range(LAYERS) for p in PROJ for x in "AB")

    hf = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    ours, theirs = our_deltas(model), hf_deltas(hf)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].abs().max() > 0
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-6, atol=1e-7, msg=str(key))

    # and back: importing the export restores every adapter tensor bitwise
    fresh = LoRA(dim=R, alpha=ALPHA, kernel_backend="eager")(tiny_gpt_model(seed=5,
                                                                           num_layers=LAYERS))
    import_hf_adapter(fresh, tmp_path)
    want = {k: v for k, v in model.state_dict().items() if ".adapter." in k and "extra" not in k}
    got = fresh.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_dora_export_loads_in_peft(megatron_tp1, tmp_path):
    model = DoRA(dim=R, alpha=ALPHA)(tiny_gpt_model(num_layers=LAYERS))
    randomise(model)
    with torch.no_grad():  # magnitudes that are no longer the initial norms
        for name, p in model.named_parameters():
            if name.endswith("weight_magnitude"):
                p.mul_(1 + 0.2 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)))
    export_hf_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    hf = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    ours, theirs = our_deltas(model), hf_deltas(hf)
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-6, atol=1e-7, msg=str(key))
    for i, layer in enumerate(model.decoder.layers):
        hf_layer = hf.base_model.model.model.layers[i]
        m_qkv = layer.self_attention.linear_qkv.adapter.weight_magnitude.detach()
        m_fc1 = layer.mlp.linear_fc1.adapter.weight_magnitude.detach()
        want = {**{p: m_qkv[rows] for p, rows in qkv_rows().items()},
                "gate_proj": m_fc1[:FFN], "up_proj": m_fc1[FFN:],
                "o_proj": layer.self_attention.linear_proj.adapter.weight_magnitude.detach(),
                "down_proj": layer.mlp.linear_fc2.adapter.weight_magnitude.detach()}
        for proj, m in want.items():
            mod = getattr(hf_layer.self_attn if proj in PROJ[:4] else hf_layer.mlp, proj)
            assert torch.equal(mod.lora_magnitude_vector["default"].weight.detach(), m), proj
    fresh = DoRA(dim=R, alpha=ALPHA)(tiny_gpt_model(seed=5, num_layers=LAYERS))
    import_hf_adapter(fresh, tmp_path)
    got = fresh.state_dict()
    for k, v in model.state_dict().items():
        if ".adapter." in k and "extra" not in k:
            assert torch.equal(got[k], v), k
    lora = LoRA(dim=R, alpha=ALPHA, kernel_backend="eager")(tiny_gpt_model(num_layers=LAYERS))
    with pytest.raises(AdapterLoadError, match="use_dora=True but the model's adapters are LoRA"):
        import_hf_adapter(lora, tmp_path)


def _peft_adapter_dir(tmp_path, seed=2):
    """A PEFT LoRA on the tiny Llama with random (different) A's, saved by PEFT itself."""
    hf = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=R, lora_alpha=ALPHA,
                                                           target_modules=PROJ))
    randomise(hf, seed)
    hf.save_pretrained(str(tmp_path))
    return hf


def test_peft_adapter_imports_into_canonical_lora_exactly(megatron_tp1, tmp_path):
    hf = _peft_adapter_dir(tmp_path / "peft")
    model = CanonicalLoRA(dim=R, alpha=ALPHA, kernel_backend="eager")(
        tiny_gpt_model(num_layers=LAYERS))
    import_hf_adapter(model, tmp_path / "peft")
    theirs = hf_deltas(hf)
    for i, layer in enumerate(model.decoder.layers):
        qkv = layer.self_attention.linear_qkv.delta_weight().double()
        for proj, rows in qkv_rows().items():
            torch.testing.assert_close(qkv[rows], theirs[(i, proj)], rtol=1e-6, atol=1e-7)
        fc1 = layer.mlp.linear_fc1.delta_weight().double()
        torch.testing.assert_close(fc1[:FFN], theirs[(i, "gate_proj")], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fc1[FFN:], theirs[(i, "up_proj")], rtol=1e-6, atol=1e-7)
        for wrapper, proj in ((layer.self_attention.linear_proj, "o_proj"),
                              (layer.mlp.linear_fc2, "down_proj")):
            a = wrapper.adapter.linear_in.weight.double()
            b = wrapper.adapter.linear_out.weight.double()
            torch.testing.assert_close(S * b @ a, theirs[(i, proj)], rtol=1e-6, atol=1e-7)
    # canonical export reproduces PEFT's file bitwise
    export_hf_adapter(model, tmp_path / "ours")
    mine = safetensors_torch.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_file = safetensors_torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(peft_file)
    for k in mine:
        assert torch.equal(mine[k], peft_file[k]), k


def test_import_errors(megatron_tp1, tmp_path):
    _peft_adapter_dir(tmp_path / "peft")
    fused = LoRA(dim=R, alpha=ALPHA, kernel_backend="eager")(tiny_gpt_model(num_layers=LAYERS))
    with pytest.raises(AdapterLoadError, match=r"decoder\.layers\.0\.self_attention\.linear_qkv.*"
                                               r"different lora_A.*CanonicalLoRA"):
        import_hf_adapter(fused, tmp_path / "peft")

    wrong_rank = LoRA(dim=8, alpha=ALPHA, kernel_backend="eager")(tiny_gpt_model(num_layers=LAYERS))
    with pytest.raises(AdapterLoadError, match=r"decoder\.layers\.0\..*has r=8, alpha=8; the file has r=4"):
        import_hf_adapter(wrong_rank, tmp_path / "peft")

    # equal A's import into the fused layer; a dropped key and a stray key are both listed
    tensors = safetensors_torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for i in range(LAYERS):
        pre = f"base_model.model.model.layers.{i}"
        for group in (["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]):
            kind = "self_attn" if group[0] == "q_proj" else "mlp"
            for p in group[1:]:
                tensors[f"{pre}.{kind}.{p}.lora_A.weight"] = \
                    tensors[f"{pre}.{kind}.{group[0]}.lora_A.weight"].clone()
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "adapter_config.json").write_text(
        (tmp_path / "peft" / "adapter_config.json").read_text())
    safetensors_torch.save_file(tensors, str(edited / "adapter_model.safetensors"))
    import_hf_adapter(fused, edited)
    qkv = fused.decoder.layers[1].self_attention.linear_qkv.adapter
    b_k = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert torch.equal(qkv.linear_out.weight[qkv_rows()["k_proj"]], b_k)

    broken = dict(tensors)
    del broken["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    broken["base_model.model.model.layers.7.mlp.down_proj.lora_B.weight"] = torch.zeros(64, R)
    safetensors_torch.save_file(broken, str(edited / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match=r"lacks: \['base_model\.model\.model\.layers\.1\."
                                               r"mlp\.down_proj\.lora_B\.weight'\].*layers\.7\."):
        import_hf_adapter(fused, edited)

    shaped = dict(tensors)
    shaped["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"] = torch.zeros(32, R)
    safetensors_torch.save_file(shaped, str(edited / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match=r"layers\.0\.self_attention\.linear_proj.*"
                                               r"\(64, 4\).*\(32, 4\)"):
        import_hf_adapter(fused, edited)


def test_export_without_adapters_fails(megatron_tp1, tmp_path):
    with pytest.raises(ValueError, match="no adapters on GPT linears"):
        export_hf_adapter(tiny_gpt_model(num_layers=1), tmp_path)


def _plain_linear_gpt(seed=0):
    """GPT module paths over plain nn.Linear bases (o_proj and down_proj positions): LoRA gives
    them LoRALinear(nn.Linear, LinearAdapter)."""
    torch.manual_seed(seed)
    root = torch.nn.Module()
    root.decoder = torch.nn.Module()
    layer = torch.nn.Module()
    root.decoder.layers = torch.nn.ModuleList([layer])
    layer.self_attention, layer.mlp = torch.nn.Module(), torch.nn.Module()
    layer.self_attention.linear_proj = torch.nn.Linear(64, 64, bias=False)
    layer.mlp.linear_fc2 = torch.nn.Linear(96, 64, bias=False)
    return root


@pytest.mark.parametrize("transform", [LoRA, CanonicalLoRA])
def test_linear_adapter_layout_round_trips_through_the_hf_format(tmp_path, transform):
    from bridge.peft import LinearAdapter

    make = lambda seed: transform(target_modules=["linear_proj", "linear_fc2"], dim=R,  # noqa: E731
                                  alpha=ALPHA)(_plain_linear_gpt(seed))
    model = make(0)
    proj = model.decoder.layers[0].self_attention.linear_proj
    assert isinstance(proj.adapter, LinearAdapter)
    randomise(model)
    tensors = export_hf_adapter(model, tmp_path)
    assert sorted(tensors) == [f"base_model.model.model.layers.0.{p}.lora_{f}.weight"
                               for p in ("mlp.down_proj", "self_attn.o_proj") for f in "AB"]
    assert torch.equal(tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"],
                       proj.adapter.linear_in.weight)
    fresh = make(1)
    import_hf_adapter(fresh, tmp_path)
    for name, value in model.state_dict().items():
        if ".adapter." in name:
            assert torch.equal(fresh.state_dict()[name], value), name
