"""Nothing lost, nothing silently wrong (issue 15): adapter checkpoints of every kind hold every
trained tensor and say which settings they were trained with; loads into merged layers are
refused; merge + unmerge is the identity on the base weights, also after an optimizer step;
a merged model's state dict never counts the adapter twice; a second transform of another kind
or other settings is refused unless asked to replace."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bridge.peft import (
    AdapterLoadError,
    CanonicalLoRA,
    DoRA,
    DoRALinear,
    LoRA,
    LoRALinear,
    MergeError,
    PEFTConfigError,
    adapter_state_dict,
    load_adapter_state_dict,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

TARGETS = ["linear_proj", "linear_fc2"]
TRANSFORMS = {"lora": LoRA, "dora": DoRA, "canonical": CanonicalLoRA}


class Toy(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.linear_proj = nn.Linear(16, 24, dtype=dtype)
        self.linear_fc2 = nn.Linear(24, 8, dtype=dtype)

    def forward(self, x):
        return self.linear_fc2(torch.relu(self.linear_proj(x)))


def toy(kind="lora", seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    kw = {"target_modules": TARGETS, "dim": 4, "alpha": 8, **kw}
    return TRANSFORMS[kind](**kw)(Toy(dtype))


def randomise(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.copy_((1 + torch.rand(p.shape, generator=g)) if name.endswith("magnitude")
                        else torch.randn(p.shape, generator=g) * scale)
    return model


def bases(model) -> dict[str, torch.Tensor]:
    return {n: m.to_wrap.weight.detach().clone() for n, m in model.named_children()}


def x_in(dtype=torch.float32):
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(9)).to(dtype)


# ---- item 1: adapter checkpoints hold every trained tensor --------------------------------------
@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_adapter_state_dict_holds_every_trainable_tensor_and_round_trips(kind):
    model = randomise(toy(kind))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    sd = adapter_state_dict(model)
    assert trainable and trainable <= set(sd), trainable - set(sd)
    fresh = toy(kind, seed=0)
    load_adapter_state_dict(fresh, sd)
    torch.testing.assert_close(fresh.eval()(x_in()), model.eval()(x_in()), rtol=0, atol=0)


# ---- item 2: loads into merged layers are refused -----------------------------------------------
def test_adapter_load_into_a_merged_model_is_refused_naming_the_layers():
    model = randomise(toy())
    w0 = bases(model)
    merge_lora(model)
    merged = bases(model)
    new = {k: torch.randn_like(v) if v.is_floating_point() else v
           for k, v in adapter_state_dict(model).items()}
    with pytest.raises(AdapterLoadError, match=r"merged layers \['linear_fc2', 'linear_proj'\].*"
                                               r"unmerge_lora"):
        load_adapter_state_dict(model, new)
    assert all(torch.equal(bases(model)[n], merged[n]) for n in merged)  # nothing copied
    with pytest.raises(RuntimeError, match=r"linear_proj.*merged.*unmerge_lora"):
        model.load_state_dict(new, strict=False)
    unmerge_lora(model)
    assert all(torch.equal(bases(model)[n], w0[n]) for n in w0)


# ---- item 3: merge + unmerge is the identity on the base weights --------------------------------
@pytest.mark.parametrize("kind", ["lora", "dora", "canonical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_then_unmerge_restores_the_base_bit_for_bit(kind, dtype):
    model = randomise(toy(kind, dtype=dtype), scale=0.5)
    w0 = bases(model)
    merge_lora(model)
    assert any(not torch.equal(bases(model)[n], w0[n]) for n in w0)
    unmerge_lora(model)
    for n in w0:
        assert torch.equal(bases(model)[n], w0[n]), n


def test_unmerge_after_an_optimizer_step_restores_the_base_and_keeps_the_step():
    model = randomise(toy())
    w0 = bases(model)
    merge_lora(model)
    adapter_params = [p for n, p in model.named_parameters() if ".adapter." in n]
    opt = torch.optim.SGD(adapter_params, lr=0.1)
    for p in adapter_params:
        p.grad = torch.randn_like(p)
    opt.step()
    stepped = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}
    unmerge_lora(model)
    for n in w0:
        assert torch.equal(bases(model)[n], w0[n]), n
    for n, p in model.named_parameters():
        if n in stepped:
            assert torch.equal(p, stepped[n]), n  # the trained adapter stays as trained
    # the model computes base + the stepped adapter
    plain = Toy()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter." not in k})
    assert not torch.allclose(model(x_in()), plain(x_in()))


def test_unmerge_without_a_kept_base_refuses_when_the_adapter_changed():
    model = randomise(toy())
    w0 = bases(model)
    merge_lora(model, keep_base=None)
    a = model.linear_fc2.adapter.linear_in.weight
    merged_a = a.detach().clone()
    with torch.no_grad():
        a.add_(1.0)
    with pytest.raises(MergeError, match=r"linear_fc2.*changed since merge_lora"):
        unmerge_lora(model)
    assert model.linear_fc2.__dict__.get("_lora_merged")  # still merged, nothing half-done
    with torch.no_grad():
        a.copy_(merged_a)
    unmerge_lora(model)  # unchanged adapters: recomputed, within the merged weight's rounding
    for n in w0:
        torch.testing.assert_close(bases(model)[n], w0[n], rtol=0, atol=1e-6)


def test_unmerge_refuses_when_the_merged_base_weight_was_changed_in_place():
    model = randomise(toy())
    merge_lora(model)
    with torch.no_grad():
        model.linear_proj.to_wrap.weight.mul_(2)
    with pytest.raises(MergeError, match=r"linear_proj.*base weight was changed in place"):
        unmerge_lora(model)


@pytest.mark.parametrize("keep_base", ["cpu", "device"])
def test_keep_base_places(keep_base):
    model = randomise(toy())
    merge_lora(model, keep_base=keep_base)
    kept = model.linear_proj.__dict__["_merge_kept_base"]
    assert kept.device == torch.device("cpu") and kept.dtype == torch.float32
    with pytest.raises(ValueError, match=r"keep_base must be 'cpu', 'device' or None"):
        merge_lora(randomise(toy()), keep_base="gpu")


# ---- item 8: a merged model's state dict -----------------------------------------------------------
def test_a_merged_state_dict_loaded_into_an_unmerged_model_is_unmerged_on_load():
    model = randomise(toy())
    w0, x = bases(model), x_in()
    want = model(x)
    merge_lora(model)
    sd = model.state_dict()
    assert sd["linear_proj.lora_merged"].item() is True
    fresh = toy()
    with pytest.warns(UserWarning, match=r"linear_proj.*saved merged.*subtracted"):
        result = fresh.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not fresh.linear_proj.__dict__.get("_lora_merged") and fresh.linear_proj.adapter_enabled
    for n in w0:
        torch.testing.assert_close(bases(fresh)[n], w0[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)


def test_an_unmerged_state_dict_has_no_marker_and_loads_as_before():
    model = randomise(toy())
    sd = model.state_dict()
    assert not any("merged" in k for k in sd)
    fresh = toy()
    fresh.load_state_dict(sd, strict=True)
    torch.testing.assert_close(fresh(x_in()), model(x_in()), rtol=0, atol=0)


def test_a_state_dict_into_a_merged_model_is_refused():
    model = randomise(toy())
    sd = randomise(toy(), seed=3).state_dict()
    merge_lora(model)
    merged = bases(model)
    with pytest.raises(RuntimeError, match=r"linear_proj.*merged.*unmerge_lora"):
        model.load_state_dict(sd)
    assert all(torch.equal(bases(model)[n], merged[n]) for n in merged)


def test_a_merged_dora_state_dict_cannot_be_unmerged_on_load_and_says_so():
    model = randomise(toy("dora"))
    merge_lora(model)
    with pytest.raises(RuntimeError, match=r"linear_proj.*merged DoRA.*merge_and_unload"):
        toy("dora").load_state_dict(model.state_dict())


def test_merge_and_unload_drops_the_kept_bases_and_the_marker():
    model = randomise(toy())
    merge_lora(model)
    plain = merge_and_unload(model)
    assert type(plain.linear_proj) is nn.Linear
    assert "_merge_kept_base" not in plain.linear_proj.__dict__
    assert not any("merged" in k for k in plain.state_dict())


# ---- item 14: a second transform ------------------------------------------------------------------
@pytest.mark.parametrize("first, second, message", [
    (dict(kind="lora", dim=4), dict(kind="lora", dim=8), r"LoRALinear\(dim=4, alpha=8\).*"
                                                         r"LoRALinear\(dim=8, alpha=8\)"),
    (dict(kind="lora", alpha=8), dict(kind="lora", alpha=16), r"alpha=8.*alpha=16"),
    (dict(kind="lora"), dict(kind="dora"), r"LoRALinear.*DoRALinear"),
    (dict(kind="dora"), dict(kind="lora"), r"DoRALinear.*LoRALinear"),
    (dict(kind="lora", lora_dtype=None), dict(kind="lora", lora_dtype=torch.float64),
     r"dtype=float32.*dtype=float64"),
])
def test_a_second_transform_of_another_kind_or_settings_is_refused(first, second, message):
    model = randomise(toy(**{"dim": 4, **first}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kind = second.pop("kind")
    transform = TRANSFORMS[kind](**{"target_modules": TARGETS, "dim": 4, "alpha": 8, **second})
    with pytest.raises(PEFTConfigError, match=rf"linear_proj.*{message}.*replace=True"):
        transform(model)
    # untouched: same wrappers, same tensors, same trainable set
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    replaced = transform(model, replace=True)
    want = DoRALinear if kind == "dora" else LoRALinear
    assert type(replaced.linear_proj) is want and type(replaced.linear_proj.to_wrap) is nn.Linear
    assert torch.equal(replaced.linear_proj.to_wrap.weight, before["linear_proj.weight"])
    assert replaced.linear_proj.adapter.dim == transform.dim


def test_a_second_transform_that_leaves_out_adapted_modules_is_refused():
    model = toy()
    with pytest.raises(PEFTConfigError, match=r"linear_fc2.*not targeted.*replace=True"):
        LoRA(target_modules=["linear_proj"], dim=4, alpha=8)(model)
    LoRA(target_modules=["linear_proj"], dim=4, alpha=8)(model, replace=True)
    assert type(model.linear_fc2) is nn.Linear and type(model.linear_proj) is LoRALinear


def test_the_same_transform_again_keeps_the_adapters_and_updates_runtime_settings():
    model = randomise(toy())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    LoRA(target_modules=TARGETS, dim=4, alpha=8, dropout=0.25, kernel_backend="eager")(model)
    assert model.linear_proj.adapter.dropout_p == 0.25
    assert model.linear_proj.kernel_backend == "eager"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


def test_replacing_a_merged_layer_is_refused():
    model = randomise(toy())
    merge_lora(model)
    with pytest.raises(PEFTConfigError, match=r"linear_proj.*merged.*unmerge_lora"):
        DoRA(target_modules=TARGETS, dim=4, alpha=8)(model, replace=True)


# ---- item 17: settings beside the adapter tensors ---------------------------------------------------
def test_adapter_state_dict_records_the_settings_and_a_mismatch_is_named():
    sd = adapter_state_dict(randomise(toy(alpha=8, dropout=0.1)))
    meta = {k for k in sd if k.endswith("_extra_state")}
    assert meta == {"linear_proj.adapter._extra_state", "linear_fc2.adapter._extra_state"}
    assert all(sd[k].dtype == torch.uint8 for k in meta)  # a tensor: torch.save / safetensors
    with pytest.warns(UserWarning, match=r"linear_proj: alpha 8.0 in the checkpoint, 32.0 in "
                                         r"the model.*dropout 0.1 in the checkpoint, 0.0"):
        load_adapter_state_dict(toy(alpha=32), sd)
    with pytest.raises(AdapterLoadError, match=r"linear_fc2: alpha 8.0 in the checkpoint, 32.0"):
        load_adapter_state_dict(toy(alpha=32), sd, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter_state_dict(toy(alpha=8, dropout=0.1), sd)  # same settings: silent


def test_adapter_state_dict_of_the_earlier_format_still_loads():
    """Checkpoints without settings (written before they were recorded) load as before; and
    the settings entries end in _extra_state, which the earlier loader skips."""
    sd = adapter_state_dict(randomise(toy()))
    old = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    fresh = toy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter_state_dict(fresh, old)
    torch.testing.assert_close(fresh(x_in()), randomise(toy())(x_in()), rtol=0, atol=0)


def test_a_non_tensor_in_an_adapter_state_dict_is_named():
    sd = adapter_state_dict(toy())
    sd["linear_proj.adapter.linear_in.weight"] = [[1.0]]
    with pytest.raises(AdapterLoadError, match=r"linear_proj.adapter.linear_in.weight: expected a "
                                               r"torch.Tensor, got list"):
        load_adapter_state_dict(toy(), sd)


def test_a_distributed_checkpoint_of_a_merged_model_is_refused(megatron_tp1):
    pytest.importorskip("megatron.core", reason="megatron-core not installed")
    from tests.megatron_utils import tiny_gpt_model

    model = LoRA(dim=2, alpha=4, kernel_backend="eager")(tiny_gpt_model(num_layers=1))
    assert model.sharded_state_dict()  # unmerged: fine
    merge_lora(model)
    with pytest.raises(MergeError, match=r"decoder.layers.0.self_attention.linear_\w+ is merged"
                                         r".*unmerge_lora before saving or loading"):
        model.sharded_state_dict()
    unmerge_lora(model)
    assert model.sharded_state_dict()


def test_canonical_lora_with_other_parts_is_refused_and_the_same_parts_kept(megatron_tp1):
    from tests.megatron_utils import tiny_gpt_model

    def canonical(targets):
        return CanonicalLoRA(target_modules=targets, dim=2, alpha=4, kernel_backend="eager")

    model = canonical(["linear_q"])(tiny_gpt_model(num_layers=1))
    canonical(["linear_q"])(model)  # the same parts: kept
    with pytest.raises(PEFTConfigError, match=r"linear_qkv: has LoRALinearSplitQKV\(parts="
                                              r"linear_q, dim=2, alpha=4\).*parts=linear_q\+"
                                              r"linear_v"):
        canonical(["linear_q", "linear_v"])(model)
    with pytest.raises(PEFTConfigError, match=r"linear_qkv: has LoRALinearSplitQKV.*LoRA here "
                                              r"makes LoRALinear\(dim=2"):
        LoRA(target_modules=["linear_qkv"], dim=2, alpha=4)(model)
