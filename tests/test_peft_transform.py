"""ModuleMatcher / PEFT / LoRA as a model transform, on a toy model of plain nn.Linear layers
(megatron layers are covered in test_megatron_lora.py and test_gpt_model.py)."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

from bridge.peft import AdapterWrapper, DoRA, LinearAdapter, LoRA, LoRALinear, ModuleMatcher

H = 8
ALL_LINEARS = {f"layers.{i}.{n}" for i in range(2) for n in
               ("attn.linear_qkv", "attn.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.attn = nn.Module()
        self.attn.linear_qkv = nn.Linear(H, 3 * H)
        self.attn.linear_proj = nn.Linear(H, H)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = nn.Linear(H, 2 * H)
        self.mlp.linear_fc2 = nn.Linear(2 * H, H)

    def forward(self, x):
        x = x + self.attn.linear_proj(self.attn.linear_qkv(self.norm(x))[..., :H])
        return x + self.mlp.linear_fc2(torch.relu(self.mlp.linear_fc1(x)))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.output_layer = nn.Linear(H, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.output_layer(x)


def toy(seed=0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def lora(**kw) -> LoRA:
    kw.setdefault("dim", 2)
    kw.setdefault("alpha", 4)
    kw.setdefault("kernel_backend", "eager")
    return LoRA(**kw)


def wrapped(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, AdapterWrapper)}


def x_in(seed=1):
    return torch.randn(3, H, generator=torch.Generator().manual_seed(seed))


def quiet(fn, *args, **kw):
    """Call ``fn`` and fail on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kw)


# ---- what gets wrapped --------------------------------------------------------------------------
def test_default_targets_wrap_the_four_transformer_linears():
    model = quiet(lora(), toy())
    assert wrapped(model) == ALL_LINEARS
    assert type(model.output_layer) is nn.Linear
    for name in ALL_LINEARS:  # Megatron-Bridge's structure for a plain nn.Linear
        m = model.get_submodule(name)
        assert type(m) is LoRALinear and type(m.to_wrap) is nn.Linear
        assert type(m.adapter) is LinearAdapter
    assert ModuleMatcher().target_modules == ["linear_qkv", "linear_proj", "linear_fc1",
                                              "linear_fc2"]


def test_lora_hyperparameters_reach_the_adapters():
    model = quiet(lora(dim=3, alpha=9, dropout=0.25, dropout_position="post",
                       lora_dtype=torch.float64), toy())
    m = model.layers[1].mlp.linear_fc2.adapter
    assert (m.dim, m.alpha, m.scale) == (3, 9, 3.0)
    assert m.linear_in.weight.shape == (3, 2 * H) and m.linear_out.weight.shape == (H, 3)
    assert m.linear_in.weight.dtype == torch.float64
    assert m.dropout_p == 0.25 and m.dropout_position == "post"
    assert model.layers[1].mlp.linear_fc2.kernel_backend == "eager"


@pytest.mark.parametrize("patterns, expected", [
    (["*.linear_fc*"], {f"layers.{i}.mlp.linear_fc{j}" for i in range(2) for j in (1, 2)}),
    (["layers.1.*.linear_qkv"], {"layers.1.attn.linear_qkv"}),
    (["layers.0.attn.linear_proj", "linear_fc2"],
     {"layers.0.attn.linear_proj", "layers.0.mlp.linear_fc2", "layers.1.mlp.linear_fc2"}),
    (["output_layer"], {"output_layer"}),
])
def test_target_patterns(patterns, expected):
    model = quiet(lora(target_modules=patterns), toy())
    assert wrapped(model) == expected


def test_dot_in_a_pattern_is_literal(caplog):
    # 'layers.1.attn.linear.qkv' must not match 'linear_qkv' (no regex '.')
    with caplog.at_level(logging.WARNING, logger="bridge.peft.module_matcher"):
        model = lora(target_modules=["layers.1.attn.linear.qkv"])(toy())
    assert "No modules matched the requested target_modules entries: layers.1.attn.linear.qkv" \
        in caplog.text
    assert wrapped(model) == set()


def test_exclude_modules_with_empty_targets():
    model = quiet(lora(target_modules=[], exclude_modules=["linear_fc2", "layers.0.*"]), toy())
    assert wrapped(model) == {"layers.1.attn.linear_qkv", "layers.1.attn.linear_proj",
                              "layers.1.mlp.linear_fc1", "output_layer"}
    assert isinstance(model.layers[0].norm, nn.LayerNorm)  # not a linear: never wrapped


def test_unmatched_targets_are_logged_by_the_module_matcher_logger(caplog):
    peft = lora(target_modules=["linear_qkv", "linear_nope", "*.experts.*"])
    with caplog.at_level(logging.WARNING, logger="bridge.peft.module_matcher"):
        model = peft(toy())
    records = [r for r in caplog.records if r.name == "bridge.peft.module_matcher"]
    assert [r.getMessage() for r in records] == [
        "No modules matched the requested target_modules entries: *.experts.*, linear_nope"]
    assert wrapped(model) == {"layers.0.attn.linear_qkv", "layers.1.attn.linear_qkv"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bridge.peft.module_matcher"):
        lora()(toy())
    assert not caplog.records  # every default target matched


def test_target_modules_changed_after_construction_take_effect(caplog):
    """Recipes set target_modules after building the transform: the bookkeeping follows."""
    peft = lora()
    peft.target_modules = ["linear_fc2", "linear_gone"]
    with caplog.at_level(logging.WARNING, logger="bridge.peft.module_matcher"):
        model = peft(toy())
    assert wrapped(model) == {"layers.0.mlp.linear_fc2", "layers.1.mlp.linear_fc2"}
    assert peft.unmatched_targets() == ["linear_gone"]
    assert "linear_gone" in caplog.text and "linear_fc2" not in caplog.text
    peft = lora(exclude_modules=["linear_fc2"], target_modules=[])
    peft.target_modules = ["linear_fc1"]
    from bridge.peft import PEFTConfigError

    with pytest.raises(PEFTConfigError, match="cannot both be set"):
        peft(toy())


# ---- freezing, training flag ---------------------------------------------------------------------
def test_freezes_the_base_and_trains_only_the_adapters():
    model = quiet(lora(), toy())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.adapter.linear_{f}.weight" for m in ALL_LINEARS
                         for f in ("in", "out")}
    assert model.training and all(m.training for m in model.modules())


def test_training_false_freezes_adapters_and_sets_eval():
    model = quiet(lora(), toy(), training=False)
    assert wrapped(model) == ALL_LINEARS
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())


def test_list_of_model_chunks():
    chunks = [toy(0), toy(1)]
    out = quiet(lora(target_modules=["linear_qkv"]), chunks)
    assert out is chunks
    for chunk in chunks:
        assert wrapped(chunk) == {"layers.0.attn.linear_qkv", "layers.1.attn.linear_qkv"}
        assert not chunk.output_layer.weight.requires_grad


def test_ddp_wrapped_chunk_transforms_the_inner_module():
    class FakeDDP(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.ddp_config = object()

    chunk = FakeDDP(toy())
    quiet(lora(target_modules=["linear_fc1"]), [chunk])
    assert wrapped(chunk.module) == {"layers.0.mlp.linear_fc1", "layers.1.mlp.linear_fc1"}


def test_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"expected an nn.Module or a list of model chunks, got int"):
        lora()(3)


# ---- idempotence --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"target_modules": [], "exclude_modules": ["linear_fc2"]},
                                {"target_modules": ["*linear*"]}])
def test_applying_twice_wraps_once(kw):
    first = quiet(lora(lora_B_init_method="normal", **kw), toy())
    names = wrapped(first)
    params = {n: p.detach().clone() for n, p in first.named_parameters()}
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    x = x_in()
    y = first(x)
    second = quiet(lora(lora_B_init_method="normal", **kw), first)
    assert second is first
    assert wrapped(second) == names
    assert {n for n, _ in second.named_parameters()} == set(params)
    assert {n for n, p in second.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(second(x), y, rtol=0, atol=0)


# ---- which keys an adapter checkpoint keeps ------------------------------------------------------
def test_set_params_to_save_and_adapter_key_filter():
    peft = lora()
    model = quiet(peft, toy())
    peft.set_params_to_save(model)
    expected = {f"{m}.adapter.linear_{f}.weight" for m in ALL_LINEARS for f in ("in", "out")}
    assert peft.params_to_save == expected
    kept = {k for k in model.state_dict() if peft.adapter_key_filter(k)}
    assert kept == expected
    for name, p in model.named_parameters():
        assert peft.adapter_key_filter((name, p)) is p.requires_grad, name
    # megatron-style adapter names are kept even before set_params_to_save
    assert LoRA().adapter_key_filter("decoder.layers.0.mlp.linear_fc1.adapter.linear_in.weight")
    assert not LoRA().adapter_key_filter("decoder.layers.0.mlp.linear_fc1.weight")


# ---- switching adapters off ---------------------------------------------------------------------
def test_enable_disable_adapter_layers():
    base = toy()
    peft = lora(lora_B_init_method="normal")
    model = quiet(peft, copy.deepcopy(base))
    x = x_in()
    y_base, y_lora = base(x), model(x)
    assert not torch.allclose(y_base, y_lora)
    peft.disable_adapter_layers(model)
    assert not any(model.get_submodule(n).adapter_enabled for n in ALL_LINEARS)
    torch.testing.assert_close(model(x), y_base, rtol=0, atol=0)
    peft.enable_adapter_layers(model)
    torch.testing.assert_close(model(x), y_lora, rtol=0, atol=0)


def test_disable_adapter_context_restores_state_even_on_error():
    base = toy()
    peft = lora(lora_B_init_method="normal")
    model = quiet(peft, copy.deepcopy(base))
    x = x_in()
    y_base, y_lora = base(x), model(x)
    kept_off = model.layers[0].attn.linear_qkv
    kept_off.disable_adapter_layers()
    y_mixed = model(x)
    with peft.disable_adapter(model) as inside:
        assert inside is model
        torch.testing.assert_close(model(x), y_base, rtol=0, atol=0)
    torch.testing.assert_close(model(x), y_mixed, rtol=0, atol=0)
    assert not kept_off.adapter_enabled  # a module off before the block stays off
    kept_off.enable_adapter_layers()
    with pytest.raises(KeyError, match="boom"):
        with peft.disable_adapter(model):
            torch.testing.assert_close(model(x), y_base, rtol=0, atol=0)
            raise KeyError("boom")
    assert all(model.get_submodule(n).adapter_enabled for n in ALL_LINEARS)
    torch.testing.assert_close(model(x), y_lora, rtol=0, atol=0)


def test_wildcard_walks_into_containers_and_wraps_only_linears():
    # '0*' matches the container '0' and its children '0.0' (a linear) and '0.1' (a ReLU):
    # the container is walked into, the linear wrapped, the ReLU left alone.
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    LoRA(target_modules=["0*"], dim=2)(model)
    assert isinstance(model[0][0], LoRALinear) and isinstance(model[0][0].adapter, LinearAdapter)
    assert isinstance(model[0][1], nn.ReLU)
    assert type(model[1]) is nn.Linear


def test_exact_name_of_a_non_linear_raises_naming_the_class():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(TypeError, match=r"Layer type is unrecognized for LoRA: .*ReLU"):
        LoRA(target_modules=["1"], dim=2)(model)


@pytest.mark.parametrize("cls", [LoRA, DoRA])
def test_second_application_keeps_the_adapters_trainable(cls):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    transform = cls(target_modules=["0"], dim=2)
    transform(model)
    first = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    transform(model)
    second = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert first and first == second
    assert not any(n.endswith(("to_wrap.weight", "to_wrap.bias", "0.weight", "0.bias"))
                   for n in second)


def test_adapter_key_filter_on_sharded_state_dict_items(megatron_tp1):
    """(key, ShardedTensor/ShardedObject) pairs of a sharded state dict: a sharded tensor is kept
    when its tensor is trainable, anything else by its key (not by the value's repr)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    peft = lora()
    model = quiet(peft, toy())
    peft.set_params_to_save(model)
    sharded = make_sharded_tensors_for_checkpoint(model.state_dict(keep_vars=True), "", {}, ())
    kept = {k for k, v in sharded.items() if peft.adapter_key_filter((k, v))}
    assert kept == peft.params_to_save
    obj = ShardedObject("decoder.adapters", None, (1,), (0,))
    assert peft.adapter_key_filter(("decoder.adapters", obj))
    assert not peft.adapter_key_filter(("decoder.layers.0._extra_state",
                                        ShardedObject("decoder.layers.0._extra_state", None,
                                                      (1,), (0,))))


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_module_names_given_as_one_string_are_rejected(field):
    """A bare string would be matched character by character (nothing adapted, a warning listing
    single letters): the error names the value and the expected list form."""
    kw = {field: "linear_qkv"}
    if field == "exclude_modules":
        kw["target_modules"] = []
    with pytest.raises(TypeError, match=rf"{field}.*'linear_qkv'.*\['linear_qkv'\]"):
        LoRA(**kw)


@pytest.mark.parametrize("cls", [LoRA, DoRA])
@pytest.mark.parametrize("bad", ["bf16", torch.int8])
def test_bad_lora_dtype_names_the_setting(cls, bad):
    with pytest.raises(TypeError, match=r"lora_dtype must be None or a floating torch.dtype"):
        cls(lora_dtype=bad)
