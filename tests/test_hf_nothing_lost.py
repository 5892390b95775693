"""The Hugging Face PEFT exchange loses nothing and computes nothing else (issue 15 items 4-7, 9,
10 and its file errors): import validates every file and tensor before copying one, export
replaces the files of a folder atomically, adapters without a PEFT name are exported under
PEFT's (lm_head) or named, canonical LoRA respects a non-gated fc1, and PEFT config fields that
change the arithmetic are applied or refused by name."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors not installed")

from bridge.peft import (  # noqa: E402
    AdapterLoadError,
    CanonicalLoRA,
    LoRA,
    LoRALinear,
    PEFTConfigError,
    export_hf_adapter,
    import_hf_adapter,
)
from bridge.peft.canonical_lora import LoRALinearSplitFC1UpGate, ModuleDict  # noqa: E402
from tests.megatron_utils import gpt_inputs, tiny_gpt_model  # noqa: E402

R, ALPHA, FFN = 4, 8, 96
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
KEY = "base_model.model.model.layers.{}.{}.lora_{}.weight"


def randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def adapters(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if ".adapter." in k and not k.endswith("_extra_state")}


def lora_gpt(seed=0, **kw):
    return LoRA(dim=R, alpha=ALPHA, kernel_backend="eager", **kw)(
        tiny_gpt_model(seed=seed, num_layers=2))


def exported(tmp_path, model=None, name="src"):
    model = model if model is not None else randomise(lora_gpt())
    export_hf_adapter(model, tmp_path / name)
    return model, tmp_path / name


def rewrite(folder, tensors=None, config=None):
    if tensors is not None:
        safetensors_torch.save_file(tensors, str(folder / WEIGHTS))
    if config is not None:
        (folder / CONFIG).write_text(json.dumps(config))


# ---- item 4: a failed import leaves the model as it was ----------------------------------------
@pytest.mark.parametrize("damage", ["late_shape", "late_qkv_a"])
def test_a_failed_import_changes_nothing(megatron_tp1, tmp_path, damage):
    _, folder = exported(tmp_path)
    tensors = safetensors_torch.load_file(str(folder / WEIGHTS))
    if damage == "late_shape":  # the last layer's last tensor has the wrong shape
        tensors[KEY.format(1, "mlp.down_proj", "B")] = torch.zeros(32, R)
        message = r"decoder\.layers\.1\.mlp\.linear_fc2.*\(64, 4\).*\(32, 4\)"
    else:  # layer 1's v has its own A: one fused LoRA cannot hold it
        tensors[KEY.format(1, "self_attn.v_proj", "A")] = torch.randn(R, 64)
        message = r"decoder\.layers\.1\.self_attention\.linear_qkv.*different lora_A"
    rewrite(folder, tensors)
    target = randomise(lora_gpt(seed=3), seed=7)
    before = adapters(target)
    with pytest.raises(AdapterLoadError, match=message):
        import_hf_adapter(target, folder)
    after = adapters(target)
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ---- item 5: a failed export leaves the folder as it was ---------------------------------------
def test_a_failed_export_keeps_the_adapter_already_in_the_folder(megatron_tp1, tmp_path,
                                                                 monkeypatch):
    model, folder = exported(tmp_path, name="out")
    files = {p.name: p.read_bytes() for p in folder.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf_adapter(randomise(lora_gpt(), seed=5), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files  # no temp files either
    monkeypatch.undo()
    with pytest.raises(TypeError, match=r"base_model_name_or_path must be a str or a path, got "
                                        r"int"):
        export_hf_adapter(model, folder, base_model_name_or_path=3)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_a_path_as_base_model_name_is_written_as_a_string(megatron_tp1, tmp_path):
    export_hf_adapter(randomise(lora_gpt()), tmp_path / "out",
                      base_model_name_or_path=tmp_path / "llama")
    config = json.loads((tmp_path / "out" / CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "llama")


# ---- item 6: adapters without a PEFT name -----------------------------------------------------
def test_lora_on_the_output_layer_exports_as_lm_head_and_imports_back(megatron_tp1, tmp_path):
    targets = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"]
    model = randomise(lora_gpt(target_modules=targets))
    tensors = export_hf_adapter(model, tmp_path)
    head = model.output_layer.adapter
    assert torch.equal(tensors["base_model.model.lm_head.lora_A.weight"], head.linear_in.weight)
    assert torch.equal(tensors["base_model.model.lm_head.lora_B.weight"], head.linear_out.weight)
    assert "lm_head" in json.loads((tmp_path / CONFIG).read_text())["target_modules"]
    fresh = lora_gpt(seed=0, target_modules=targets)
    import_hf_adapter(fresh, tmp_path)
    assert all(torch.equal(adapters(fresh)[k], v) for k, v in adapters(model).items())


def test_adapters_without_a_peft_name_are_named_or_skipped_on_request(megatron_tp1, tmp_path):
    model = randomise(lora_gpt())
    extra = torch.nn.Linear(4, 4)
    model.extra = LoRA(target_modules=["lin"], dim=R, alpha=ALPHA)(
        torch.nn.ModuleDict({"lin": extra}))
    with pytest.raises(NotImplementedError, match=r"no Hugging Face PEFT name: \['extra\.lin'\]"
                                                  r".*skip_unmapped=True"):
        export_hf_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.warns(UserWarning, match=r"left out.*\['extra\.lin'\]"):
        export_hf_adapter(model, tmp_path / "a", skip_unmapped=True)
    with pytest.raises(AdapterLoadError, match=r"no Hugging Face PEFT name: \['extra\.lin'\]"):
        import_hf_adapter(model, tmp_path / "a")
    with pytest.warns(UserWarning, match=r"left as they are.*\['extra\.lin'\]"):
        import_hf_adapter(model, tmp_path / "a", skip_unmapped=True)


# ---- items 7, 9: canonical LoRA on a non-gated fc1 -------------------------------------------------
def test_canonical_fc1_up_on_a_non_gated_mlp_adapts_the_whole_fc1(megatron_tp1, tmp_path):
    base = tiny_gpt_model(num_layers=1, gated_linear_unit=False)
    model = CanonicalLoRA(target_modules=["linear_fc1_up", "linear_q"], dim=R, alpha=ALPHA,
                          kernel_backend="eager")(base)
    fc1 = model.decoder.layers[0].mlp.linear_fc1
    assert type(fc1) is LoRALinear and fc1.adapter.linear_out.weight.shape == (FFN, R)
    randomise(model)
    ids, pos, mask = gpt_inputs()
    model.eval()
    want = model(ids, pos, attention_mask=mask)
    tensors = export_hf_adapter(model, tmp_path)
    assert tensors[KEY.format(0, "mlp.up_proj", "B")].shape == (FFN, R)  # the whole height
    fresh = CanonicalLoRA(target_modules=["linear_fc1_up", "linear_q"], dim=R, alpha=ALPHA,
                          kernel_backend="eager")(tiny_gpt_model(num_layers=1,
                                                                 gated_linear_unit=False))
    import_hf_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh.eval()(ids, pos, attention_mask=mask), want, rtol=0, atol=0)


def test_canonical_fc1_gate_on_a_non_gated_mlp_is_refused(megatron_tp1):
    with pytest.raises(PEFTConfigError, match=r"decoder\.layers\.0\.mlp\.linear_fc1.*no gated "
                                              r"linear unit.*linear_fc1_up"):
        CanonicalLoRA(target_modules=["linear_fc1_gate"], dim=R, alpha=ALPHA)(
            tiny_gpt_model(num_layers=1, gated_linear_unit=False))


def test_a_split_fc1_over_a_non_gated_mlp_is_not_exported_half_height(megatron_tp1, tmp_path):
    model = tiny_gpt_model(num_layers=1, gated_linear_unit=False)
    fc1 = model.decoder.layers[0].mlp.linear_fc1
    from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter

    adapter = ParallelLinearAdapter(64, FFN // 2, R, base_linear_name="decoder.layers.0.mlp."
                                    "linear_fc1", activation="identity", alpha=ALPHA,
                                    model_parallel_config=fc1.config)
    model.decoder.layers[0].mlp.linear_fc1 = LoRALinearSplitFC1UpGate(
        fc1, ModuleDict({"adapter_up": adapter}))
    with pytest.raises(NotImplementedError, match=r"linear_fc1.*split.*no gated linear unit"):
        export_hf_adapter(model, tmp_path)


# ---- item 10 and the file errors: what the config says -------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("alpha_pattern", {"q_proj": 16}, r"linear_qkv \(model\.layers\.0\.self_attn\.q_proj\): "
                                      r"the model's adapter has r=4, alpha=8; the file has r=4, "
                                      r"lora_alpha=16 \(alpha_pattern 'q_proj'\)"),
    ("rank_pattern", {"down_proj": 8}, r"linear_fc2 \(model\.layers\.0\.mlp\.down_proj\): .* "
                                       r"the file has r=8, lora_alpha=8 \(rank_pattern"),
    ("layers_to_transform", [0], r"layers_to_transform=\[0\].*the model adapts layers \[0, 1\]"),
    ("fan_in_fan_out", True, r"fan_in_fan_out=True"),
    ("bias", "lora_only", r"bias='lora_only'"),
    ("modules_to_save", ["lm_head"], r"modules_to_save=\['lm_head'\]"),
    ("lora_bias", True, r"lora_bias=True"),
    ("use_rslora", True, r"use_rslora=True"),
    ("init_lora_weights", "pissa", r"init_lora_weights='pissa'"),
    ("layer_replication", [[0, 1]], r"layer_replication"),
    ("r", "4", r"'r' must be a positive int, got str '4'"),
    ("lora_alpha", "8", r"'lora_alpha' must be a finite number > 0, got str '8'"),
])
def test_config_fields_that_change_the_arithmetic_are_refused_by_name(megatron_tp1, tmp_path,
                                                                     field, value, message):
    _, folder = exported(tmp_path)
    config = json.loads((folder / CONFIG).read_text())
    config[field] = value
    rewrite(folder, config=config)
    target = lora_gpt(seed=3)
    before = adapters(target)
    with pytest.raises(AdapterLoadError, match=message):
        import_hf_adapter(target, folder)
    assert all(torch.equal(adapters(target)[k], v) for k, v in before.items())


def test_patterns_that_agree_with_the_model_are_applied(megatron_tp1, tmp_path):
    model, folder = exported(tmp_path)
    config = json.loads((folder / CONFIG).read_text())
    config.update(alpha_pattern={"q_proj": ALPHA}, rank_pattern={"model.layers.1.mlp.up_proj": R},
                  layers_to_transform=[0, 1])
    rewrite(folder, config=config)
    fresh = lora_gpt(seed=3)
    import_hf_adapter(fresh, folder)
    assert all(torch.equal(adapters(fresh)[k], v) for k, v in adapters(model).items())


def test_a_config_without_r_is_named(megatron_tp1, tmp_path):
    _, folder = exported(tmp_path)
    config = json.loads((folder / CONFIG).read_text())
    del config["r"]
    rewrite(folder, config=config)
    with pytest.raises(AdapterLoadError, match=rf"{CONFIG}.*has no 'r' \(the LoRA rank\)"):
        import_hf_adapter(lora_gpt(), folder)


@pytest.mark.parametrize("which", [CONFIG, WEIGHTS])
def test_a_corrupt_file_is_an_adapter_load_error_naming_it(megatron_tp1, tmp_path, which):
    _, folder = exported(tmp_path)
    (folder / which).write_bytes(b"\x00garbage{")
    with pytest.raises(AdapterLoadError, match=rf"{folder / which}.*cannot be read"):
        import_hf_adapter(lora_gpt(), folder)
