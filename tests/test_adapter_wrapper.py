"""AdapterWrapper: the five base return patterns, state dicts, sharded state dicts, the switch."""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

from bridge.peft import AdapterWrapper, LoRALinear, ParallelLinearAdapter

K, N, R = 6, 5, 3
ALPHA = 6.0
ADAPTER_KEYS = ("adapter.linear_in.weight", "adapter.linear_out.weight")


class PatternBase(nn.Module):
    """A stand-in base linear that returns one of Megatron's patterns, or a bare tensor."""

    PATTERNS = ("out_none", "out_bias", "out_ln_none", "out_bias_ln", "bare")

    def __init__(self, pattern: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(N, K, generator=g))
        self.bias = nn.Parameter(torch.randn(N, generator=g))
        self.pattern = pattern

    @staticmethod
    def ln(x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x + 1.0  # a recognisable stand-in for a norm output

    def forward(self, x):
        out = x @ self.weight.t()
        return {
            "out_none": lambda: (out, None),
            "out_bias": lambda: (out, self.bias),
            "out_ln_none": lambda: ((out, self.ln(x)), None),
            "out_bias_ln": lambda: (out, self.bias, self.ln(x)),
            "bare": lambda: out + self.bias,
        }[self.pattern]()


class ReturnsBase(nn.Module):
    """A base that returns whatever it is told to (for the error path)."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def forward(self, x):
        return self.make(x)


def make_adapter(seed: int = 1) -> ParallelLinearAdapter:
    torch.manual_seed(seed)
    return ParallelLinearAdapter(K, N, R, activation="identity", column_init_method="normal",
                                 row_init_method="normal", alpha=ALPHA)


def make_lora(base: nn.Module) -> LoRALinear:
    return LoRALinear(base, make_adapter(), kernel_backend="eager")


def adapter_ref(wrapper: LoRALinear, inp: torch.Tensor) -> torch.Tensor:
    """s * B A inp in fp64, from the adapter's weights."""
    a = wrapper.adapter.linear_in.weight.detach().double()
    b = wrapper.adapter.linear_out.weight.detach().double()
    return (ALPHA / R) * (inp.double() @ a.t() @ b.t())


def randn(*shape, seed=2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- base_linear_forward: the five patterns ------------------------------------------------------
@pytest.mark.parametrize("pattern", PatternBase.PATTERNS)
def test_base_linear_forward_normalises_every_pattern(pattern):
    base = PatternBase(pattern)
    wrapper = make_lora(base)
    x = randn(4, K)
    out, bias, ln = wrapper.base_linear_forward(x)
    with torch.no_grad():
        xw = x @ base.weight.t()
    expect_out = xw + base.bias.detach() if pattern == "bare" else xw
    torch.testing.assert_close(out, expect_out, rtol=0, atol=0)
    if pattern in ("out_bias", "out_bias_ln", "bare"):
        assert bias is base.bias
    else:
        assert bias is None
    if pattern in ("out_ln_none", "out_bias_ln"):
        torch.testing.assert_close(ln, PatternBase.ln(x), rtol=0, atol=0)
    else:
        assert ln is x


@pytest.mark.parametrize("pattern", PatternBase.PATTERNS)
def test_lora_forward_keeps_the_base_return_style(pattern):
    base = PatternBase(pattern)
    wrapper = make_lora(base)
    x = randn(4, K)
    result = wrapper(x)
    inp = PatternBase.ln(x) if pattern in ("out_ln_none", "out_bias_ln") else x
    expect = (x.double() @ base.weight.detach().double().t()) + adapter_ref(wrapper, inp)
    if pattern == "bare":
        assert isinstance(result, torch.Tensor)
        torch.testing.assert_close(result, (expect + base.bias.detach().double()).float())
        return
    assert isinstance(result, tuple) and len(result) == 2
    out, bias = result
    torch.testing.assert_close(out, expect.float())
    if pattern in ("out_bias", "out_bias_ln"):
        assert bias is base.bias  # passed through, not added (Megatron's bias-dropout-add)
    else:
        assert bias is None


BAD_RETURNS = [
    (lambda x: (x,), "tuple(Tensor(2, 6))"),
    (lambda x: [x, None], "list(Tensor(2, 6), None)"),
    (lambda x: None, "None"),
    (lambda x: "out", "str"),
    (lambda x: (x, 3), "tuple(Tensor(2, 6), int)"),
    (lambda x: (x, None, None), "tuple(Tensor(2, 6), None, None)"),
    (lambda x: ((x,), None), "tuple(tuple(Tensor(2, 6)), None)"),
    (lambda x: ((x, x, x), None), "tuple(tuple(Tensor(2, 6), Tensor(2, 6), Tensor(2, 6)), None)"),
    (lambda x: (x, x[0], x, x), "tuple(Tensor(2, 6), Tensor(6,), Tensor(2, 6), Tensor(2, 6))"),
    (lambda x: {"out": x}, "dict"),
]


@pytest.mark.parametrize("make, described", BAD_RETURNS)
def test_unexpected_base_output_is_a_type_error_naming_it(make, described):
    wrapper = make_lora(ReturnsBase(make))
    x = randn(2, K)
    msg = re.escape(f"ReturnsBase returned {described}; AdapterWrapper expects a Tensor, ")
    with pytest.raises(TypeError, match=msg):
        wrapper.base_linear_forward(x)
    with pytest.raises(AssertionError, match=msg):  # what Megatron-Bridge raises here
        wrapper(x)


def test_constructor_rejects_non_modules():
    with pytest.raises(TypeError, match=r"takes two nn.Modules; got Linear and function"):
        AdapterWrapper(nn.Linear(2, 2), lambda t: t)


# ---- the adapter switch ------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["out_bias", "bare"])
def test_disable_and_enable_adapter_layers(pattern):
    base = PatternBase(pattern)
    wrapper = make_lora(base)
    x = randn(3, K)
    with_adapter = wrapper(x)
    assert wrapper.adapter_enabled
    wrapper.disable_adapter_layers()
    assert not wrapper.adapter_enabled
    off = wrapper(x)
    torch.testing.assert_close(off, base(x), rtol=0, atol=0)
    wrapper.enable_adapter_layers()
    assert wrapper.adapter_enabled
    torch.testing.assert_close(wrapper(x), with_adapter, rtol=0, atol=0)
    lhs = off if pattern == "bare" else off[0]
    rhs = with_adapter if pattern == "bare" else with_adapter[0]
    assert not torch.allclose(lhs, rhs)  # the adapter (non-zero B) does change the output


# ---- state_dict --------------------------------------------------------------------------------
def linear_wrapper() -> LoRALinear:
    torch.manual_seed(3)
    return make_lora(nn.Linear(K, N))


class Parent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.proj = linear_wrapper()
        self.block.other = nn.Linear(N, 2)


def test_state_dict_keys_have_no_to_wrap_segment():
    w = linear_wrapper()
    sd = w.state_dict()
    assert list(sd) == ["weight", "bias", *ADAPTER_KEYS]
    torch.testing.assert_close(sd["weight"], w.to_wrap.weight, rtol=0, atol=0)
    torch.testing.assert_close(sd["bias"], w.to_wrap.bias, rtol=0, atol=0)
    torch.testing.assert_close(sd["adapter.linear_in.weight"], w.adapter.linear_in.weight,
                               rtol=0, atol=0)
    torch.testing.assert_close(sd["adapter.linear_out.weight"], w.adapter.linear_out.weight,
                               rtol=0, atol=0)


def test_state_dict_prefix_and_destination():
    w = linear_wrapper()
    destination = OrderedDict(already=torch.zeros(1))
    returned = w.state_dict(destination=destination, prefix="model.proj.")
    assert returned is destination
    assert list(destination) == ["already", "model.proj.weight", "model.proj.bias",
                                 *(f"model.proj.{k}" for k in ADAPTER_KEYS)]


def test_state_dict_keep_vars():
    w = linear_wrapper()
    kept = w.state_dict(keep_vars=True)
    assert kept["weight"] is w.to_wrap.weight
    assert kept["adapter.linear_in.weight"] is w.adapter.linear_in.weight
    plain = w.state_dict()
    for key, value in plain.items():
        assert not isinstance(value, nn.Parameter), key
        assert not value.requires_grad, key
        torch.testing.assert_close(value, kept[key], rtol=0, atol=0)


def test_state_dict_nested_carries_the_parent_prefix():
    model = Parent()
    assert list(model.state_dict()) == [
        "block.proj.weight", "block.proj.bias",
        *(f"block.proj.{k}" for k in ADAPTER_KEYS),
        "block.other.weight", "block.other.bias",
    ]


def test_strict_load_state_dict_round_trip():
    model = Parent()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for key, value in model.state_dict().items():
        assert not torch.equal(value, saved[key]), key
    keys_before = list(saved)
    result = model.load_state_dict(saved, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert list(saved) == keys_before  # the load-time key remapping leaves the caller's dict alone


def test_strict_load_missing_adapter_key_raises():
    model = Parent()
    sd = model.state_dict()
    del sd["block.proj.adapter.linear_in.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*block\.proj\.adapter\.linear_in"):
        model.load_state_dict(sd, strict=True)


def test_strict_load_missing_base_key_raises():
    model = Parent()
    sd = model.state_dict()
    del sd["block.proj.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*block\.proj\.(to_wrap\.)?weight"):
        model.load_state_dict(sd, strict=True)


def test_strict_load_unexpected_key_raises():
    model = Parent()
    sd = model.state_dict()
    sd["block.proj.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*block\.proj\.(to_wrap\.)?extra"):
        model.load_state_dict(sd, strict=True)


def test_unwrapped_checkpoint_loads_into_the_wrapped_model():
    """A checkpoint of the model before LoRA loads its base keys; only adapter keys are missing."""
    torch.manual_seed(5)
    plain = nn.Module()
    plain.block = nn.Module()
    plain.block.proj = nn.Linear(K, N)
    plain.block.other = nn.Linear(N, 2)
    model = Parent()
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == [f"block.proj.{k}" for k in ADAPTER_KEYS]
    assert result.unexpected_keys == []
    assert torch.equal(model.block.proj.to_wrap.weight, plain.block.proj.weight)
    assert torch.equal(model.block.proj.to_wrap.bias, plain.block.proj.bias)
    assert torch.equal(model.block.other.weight, plain.block.other.weight)


# ---- sharded_state_dict (world size 1; TP=2 replica ids are checked in test_tensor_parallel) ----
def test_sharded_state_dict_of_an_nn_linear_wrapper(megatron_tp1):
    from megatron.core.dist_checkpointing import ShardedTensor

    w = linear_wrapper()
    sharded = w.sharded_state_dict(prefix="decoder.proj.")
    assert sorted(sharded) == sorted(
        ["decoder.proj.weight", "decoder.proj.bias",
         *(f"decoder.proj.{k}" for k in ADAPTER_KEYS)]
    )
    params = {"decoder.proj.weight": w.to_wrap.weight, "decoder.proj.bias": w.to_wrap.bias,
              "decoder.proj.adapter.linear_in.weight": w.adapter.linear_in.weight,
              "decoder.proj.adapter.linear_out.weight": w.adapter.linear_out.weight}
    for key, st in sharded.items():
        assert isinstance(st, ShardedTensor), key
        assert st.key == key
        assert st.data is params[key]
        assert st.global_shape == tuple(params[key].shape)
        assert st.local_shape == tuple(params[key].shape)
        assert st.global_offset == (0,) * params[key].dim()
        assert st.replica_id == (0, 0, 0)


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_lora_linear_with_any_adapter_module(backend):
    """Megatron-Bridge's LoRALinear takes any nn.Module as its adapter (not only a
    ParallelLinearAdapter): the fused-path checks must fall back, not fail on ``linear_in``."""
    base = PatternBase("out_bias")
    adapter = nn.Sequential(nn.Linear(K, 2, bias=False), nn.Linear(2, N, bias=False))
    wrapper = LoRALinear(base, adapter, kernel_backend=backend)
    x = randn(3, K)
    out, bias = wrapper(x)
    torch.testing.assert_close(out, x @ base.weight.t() + adapter(x))
    assert bias is base.bias
