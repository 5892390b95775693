"""LoRALinear, LinearAdapter, ParallelLinearAdapter (no megatron), argument checks, name matching
and base-linear introspection (TE-shaped stand-ins; transformer-engine is never imported)."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bridge.peft import (
    LinearAdapter,
    LoRA,
    LoRALinear,
    ParallelLinearAdapter,
    get_adapter_attributes_from_linear,
    wildcard_match,
)
from bridge.peft.utils import is_expert_linear

K, N, R = 12, 10, 4
ALPHA = 8.0
SCALE = ALPHA / R


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def lora_ref(x, w, b, a, bb, scale, pre_mask=None, post_mask=None, p=0.0):
    """y = x W^T + b + s * B(A(dropout(x))) in fp64 (the masks are keep masks already scaled)."""
    x, w, a, bb = (t.double() for t in (x, w, a, bb))
    xa = x * pre_mask.double() if pre_mask is not None else x
    low = xa @ a.t() @ bb.t()
    if post_mask is not None:
        low = low * post_mask.double()
    y = x @ w.t() + scale * low
    return y + b.double() if b is not None else y


# ---- LoRALinear over a plain nn.Linear ---------------------------------------------------------
def plain_lora(bias=True) -> LoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(K, N, bias=bias)
    adapter = ParallelLinearAdapter(K, N, R, activation="identity", column_init_method="normal",
                                    row_init_method="normal", alpha=ALPHA)
    return LoRALinear(base, adapter, kernel_backend="eager")


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_bare_in_bare_out(bias):
    m = plain_lora(bias)
    x = randn(3, 5, K, seed=1)
    y = m(x)
    assert isinstance(y, torch.Tensor) and y.shape == (3, 5, N)
    expect = lora_ref(x, m.to_wrap.weight, m.to_wrap.bias, m.adapter.linear_in.weight,
                      m.adapter.linear_out.weight, SCALE)
    torch.testing.assert_close(y, expect.float(), rtol=1e-5, atol=1e-5)


def test_lora_linear_weight_is_merged_and_bias_is_the_base_bias():
    m = plain_lora()
    w, a, b = (t.detach().double() for t in (m.to_wrap.weight, m.adapter.linear_in.weight,
                                             m.adapter.linear_out.weight))
    merged = m.weight
    assert merged.dtype == torch.float32 and not merged.requires_grad
    torch.testing.assert_close(merged, (w + SCALE * b @ a).float(), rtol=1e-6, atol=1e-6)
    assert m.bias is m.to_wrap.bias
    # the merged weight reproduces the LoRA output (no dropout)
    x = randn(7, K, seed=2)
    torch.testing.assert_close(m(x), x @ merged.t() + m.bias, rtol=1e-5, atol=1e-5)


def test_lora_linear_weight_with_mismatched_factors_raises():
    m = plain_lora()
    m.adapter.linear_in = nn.Linear(K // 2, R, bias=False)  # as a TP shard of A would be
    with pytest.raises(RuntimeError, match=r"merged weight of a tensor-parallel LoRA.*"
                                           r"A \(4, 6\)"):
        _ = m.weight


def test_lora_linear_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown kernel_backend 'foo'; expected one of auto, "
                                         r"cuda, triton, eager"):
        LoRALinear(nn.Linear(2, 2), nn.Linear(2, 2), kernel_backend="foo")


# ---- LinearAdapter ----------------------------------------------------------------------------
def linear_adapter(**kw) -> LinearAdapter:
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    kw.setdefault("kernel_backend", "eager")
    kw.setdefault("dim", R)
    kw.setdefault("alpha", ALPHA)
    return LinearAdapter(base, **kw)


def test_linear_adapter_copies_and_freezes_the_base():
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    m = LinearAdapter(base, dim=R, alpha=ALPHA, kernel_backend="eager")
    assert torch.equal(m.weight, base.weight) and torch.equal(m.bias, base.bias)
    assert m.weight.data_ptr() != base.weight.data_ptr()
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert base.weight.requires_grad  # the original module is left as it was
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable == ["lora_a.weight", "lora_b.weight"]
    assert m.lora_a.weight.shape == (R, K) and m.lora_b.weight.shape == (N, R)
    assert m.scale == SCALE


def test_linear_adapter_rejects_non_linear():
    with pytest.raises(TypeError, match=r"LinearAdapter wraps an nn.Linear, got Conv1d"):
        LinearAdapter(nn.Conv1d(2, 2, 1))


def test_linear_adapter_starts_as_the_base_with_zero_b():
    m = linear_adapter()  # lora_B_init_method='zero' by default
    assert torch.count_nonzero(m.lora_b.weight) == 0
    assert torch.count_nonzero(m.lora_a.weight) > 0
    x = randn(6, K, seed=3)
    assert torch.equal(m(x), nn.functional.linear(x, m.weight, m.bias))


@pytest.mark.parametrize("b_init", ["normal", "kaiming", "xavier"])
def test_linear_adapter_nonzero_b_init_changes_the_output(b_init):
    m = linear_adapter(lora_B_init_method=b_init)
    assert torch.count_nonzero(m.lora_b.weight) == m.lora_b.weight.numel()
    x = randn(6, K, seed=3)
    base = nn.functional.linear(x, m.weight, m.bias)
    y = m(x)
    assert (y - base).abs().max() > 1e-3
    expect = lora_ref(x, m.weight, m.bias, m.lora_a.weight, m.lora_b.weight, SCALE)
    torch.testing.assert_close(y, expect.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape", [(1, K), (2, 3, K)])
def test_linear_adapter_grads_only_on_the_factors(x_shape):
    m = linear_adapter(lora_B_init_method="normal")
    x = randn(*x_shape, seed=4).requires_grad_(True)
    g = randn(*x_shape[:-1], N, seed=5)
    (m(x) * g).sum().backward()
    assert m.weight.grad is None and m.bias.grad is None
    # fp64 oracle through autograd
    x64 = x.detach().double().requires_grad_(True)
    a64 = m.lora_a.weight.detach().double().requires_grad_(True)
    b64 = m.lora_b.weight.detach().double().requires_grad_(True)
    y64 = x64 @ m.weight.detach().double().t() + m.bias.detach().double() + SCALE * (x64 @ a64.t()
                                                                                      @ b64.t())
    (y64 * g.double()).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.lora_a.weight.grad, a64.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.lora_b.weight.grad, b64.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["pre", "post"])
def test_linear_adapter_dropout_position(position):
    p = 0.5
    m = linear_adapter(lora_B_init_method="normal", dropout=p, dropout_position=position)
    x = randn(8, K, seed=6)
    w, b, a, bb = m.weight, m.bias, m.lora_a.weight, m.lora_b.weight
    m.eval()
    torch.testing.assert_close(m(x), lora_ref(x, w, b, a, bb, SCALE).float(), rtol=1e-5, atol=1e-5)
    m.train()
    torch.manual_seed(123)
    y = m(x)
    # nn.Dropout draws one keep-mask (already divided by 1-p) of the tensor it drops: replay it
    torch.manual_seed(123)
    mask_shape = x.shape if position == "pre" else (x.shape[0], N)
    mask = nn.functional.dropout(torch.ones(mask_shape), p, training=True)
    kw = {"pre_mask": mask} if position == "pre" else {"post_mask": mask}
    torch.testing.assert_close(y, lora_ref(x, w, b, a, bb, SCALE, **kw).float(), rtol=1e-5,
                               atol=1e-5)
    assert not torch.allclose(y, m.eval()(x))
    # the other position's mask would give something else
    other = {"post_mask": nn.functional.dropout(torch.ones(x.shape[0], N), p, training=True)} \
        if position == "pre" else {"pre_mask": nn.functional.dropout(torch.ones(x.shape), p,
                                                                      training=True)}
    assert not torch.allclose(y, lora_ref(x, w, b, a, bb, SCALE, **other).float())


@pytest.mark.parametrize("position", ["pre", "post"])
def test_linear_adapter_zero_dropout_in_train_mode_equals_reference(position):
    m = linear_adapter(lora_B_init_method="normal", dropout=0.0, dropout_position=position).train()
    x = randn(5, K, seed=7)
    expect = lora_ref(x, m.weight, m.bias, m.lora_a.weight, m.lora_b.weight, SCALE)
    torch.testing.assert_close(m(x), expect.float(), rtol=1e-5, atol=1e-5)


def test_linear_adapter_lora_dtype():
    m = linear_adapter(lora_B_init_method="normal", lora_dtype=torch.float64)
    assert m.lora_a.weight.dtype == torch.float64 and m.weight.dtype == torch.float32
    x = randn(4, K, seed=8)
    y = m(x)
    assert y.dtype == torch.float32
    expect = lora_ref(x, m.weight, m.bias, m.lora_a.weight, m.lora_b.weight, SCALE)
    torch.testing.assert_close(y, expect.float(), rtol=1e-5, atol=1e-5)


# ---- init methods ------------------------------------------------------------------------------
FAN_OUT, FAN_IN = 48, 64


@pytest.mark.parametrize("name", ["xavier", "normal", "kaiming", "zero"])
def test_init_methods_of_both_factors(name):
    torch.manual_seed(0)
    m = ParallelLinearAdapter(FAN_IN, FAN_OUT, FAN_OUT, activation="identity",
                              column_init_method=name, row_init_method=name)
    for w in (m.linear_in.weight, m.linear_out.weight):  # [48, 64] and [48, 48]
        fan_out, fan_in = w.shape
        if name == "zero":
            assert torch.count_nonzero(w) == 0
            continue
        assert torch.count_nonzero(w) == w.numel()
        if name == "xavier":  # xavier normal: std sqrt(2 / (fan_in + fan_out))
            expect = math.sqrt(2.0 / (fan_in + fan_out))
            assert abs(w.std().item() / expect - 1) < 0.1
        elif name == "normal":
            assert abs(w.std().item() / 0.2 - 1) < 0.1
            assert abs(w.mean().item()) < 0.02
        else:  # kaiming uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(fan_in)
            assert w.abs().max().item() <= bound
            assert w.abs().max().item() > 0.9 * bound


# ---- ParallelLinearAdapter without megatron (plain nn.Linear factors) --------------------------
@pytest.mark.parametrize("alpha, scale", [(ALPHA, ALPHA / R), (1, 0.25), (None, 1.0)])
def test_parallel_linear_adapter_scale(alpha, scale):
    torch.manual_seed(0)
    m = ParallelLinearAdapter(K, N, R, activation="identity", row_init_method="normal",
                              alpha=alpha)
    assert m.scale == scale
    x = randn(3, K, seed=9)
    a, b = m.linear_in.weight.double(), m.linear_out.weight.double()
    torch.testing.assert_close(m(x), (scale * x.double() @ a.t() @ b.t()).float(), rtol=1e-5,
                               atol=1e-6)


def test_parallel_linear_adapter_default_activation_is_applied():
    torch.manual_seed(0)
    m = ParallelLinearAdapter(K, N, R, row_init_method="normal", alpha=R)  # activation swish
    x = randn(3, K, seed=9)
    a, b = m.linear_in.weight.double(), m.linear_out.weight.double()
    expect = nn.functional.silu(x.double() @ a.t()) @ b.t()
    torch.testing.assert_close(m(x), expect.float(), rtol=1e-5, atol=1e-6)


# ---- bad arguments: each a clear error naming the value and what is allowed ---------------------
BAD_HPARAMS = [
    (dict(dim=0), r"dim \(the LoRA rank\) must be a positive int, got 0"),
    (dict(dim=-2), r"dim \(the LoRA rank\) must be a positive int, got -2"),
    (dict(dim=2.0), r"dim \(the LoRA rank\) must be a positive int, got 2\.0"),
    (dict(alpha=0), r"alpha must be > 0 \(or None for a scale of 1\), got 0"),
    (dict(alpha=-1.5), r"alpha must be > 0 \(or None for a scale of 1\), got -1\.5"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1\.0"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\), got -0\.1"),
    (dict(dropout_position="mid"), r"unknown dropout_position 'mid'; expected 'pre' or 'post'"),
    (dict(a_init="uniform"),
     r"unknown init method 'uniform'; expected one of xavier, normal, kaiming, zero"),
    (dict(b_init="ones"), r"unknown init method 'ones'; expected one of xavier, normal, kaiming, "
                          r"zero"),
]


def _build(kind: str, dim=R, alpha=ALPHA, dropout=0.0, dropout_position="pre", a_init="xavier",
           b_init="zero"):
    if kind == "ParallelLinearAdapter":
        return ParallelLinearAdapter(K, N, dim, activation="identity", alpha=alpha,
                                     dropout=dropout, dropout_position=dropout_position,
                                     column_init_method=a_init, row_init_method=b_init)
    if kind == "LinearAdapter":
        return LinearAdapter(nn.Linear(K, N), dim=dim, alpha=alpha, dropout=dropout,
                             dropout_position=dropout_position, lora_A_init_method=a_init,
                             lora_B_init_method=b_init)
    return LoRA(dim=dim, alpha=alpha, dropout=dropout, dropout_position=dropout_position,
                lora_A_init_method=a_init, lora_B_init_method=b_init)


@pytest.mark.parametrize("kind", ["ParallelLinearAdapter", "LinearAdapter", "LoRA"])
@pytest.mark.parametrize("kwargs, message", BAD_HPARAMS)
def test_bad_hyperparameters_raise_value_error(kind, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _build(kind, **kwargs)


def test_parallel_linear_adapter_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'; expected one of identity, "
                                         r"swish, silu, relu, gelu"):
        ParallelLinearAdapter(K, N, R, activation="tanh")


def test_parallel_linear_adapter_unexpected_keyword():
    with pytest.raises(TypeError, match=r"unexpected arguments: \['rank'\]"):
        ParallelLinearAdapter(K, N, R, rank=3)


def test_parallel_linear_adapter_expert_not_supported():
    with pytest.raises(NotImplementedError, match=r"MoE expert linear 'decoder.*experts'"):
        ParallelLinearAdapter(K, N, R, base_linear_name="decoder.mlp.experts", is_expert=True)


@pytest.mark.parametrize("kind", ["LoRA", "LinearAdapter"])
def test_unknown_kernel_backend(kind):
    msg = r"unknown kernel_backend 'foo'; expected one of auto, cuda, triton, eager"
    with pytest.raises(ValueError, match=msg):
        if kind == "LoRA":
            LoRA(kernel_backend="foo")
        else:
            LinearAdapter(nn.Linear(K, N), kernel_backend="foo")


def test_target_and_exclude_modules_together():
    with pytest.raises(ValueError, match=re.escape(
            "target_modules and exclude_modules cannot both be set (got target_modules="
            "['linear_qkv'], exclude_modules=['linear_fc2'])")):
        LoRA(target_modules=["linear_qkv"], exclude_modules=["linear_fc2"])


@pytest.mark.parametrize("module", [nn.Conv1d(2, 2, 1), nn.LayerNorm(4), nn.Embedding(3, 4)])
def test_get_adapter_attributes_rejects_unsupported_modules(module):
    name = type(module).__name__
    with pytest.raises(TypeError, match=rf"layer type {name} is not supported for LoRA; expected "
                                        r"megatron-core ColumnParallelLinear/RowParallelLinear, "
                                        r".*torch\.nn\.Linear"):
        get_adapter_attributes_from_linear(module)


def test_lora_on_an_unsupported_module_raises_when_named():
    model = nn.Module()
    model.conv = nn.Conv1d(2, 2, 1)
    with pytest.raises(TypeError, match=r"layer type Conv1d is not supported for LoRA"):
        LoRA(target_modules=["conv"], kernel_backend="eager")(model)


# ---- wildcard_match and expert names ------------------------------------------------------------
@pytest.mark.parametrize("pattern, key, expected", [
    ("decoder.layers.0.*", "decoder.layers.0.mlp.linear_fc1", True),
    ("decoder.layers.0.*", "decoder.layers.1.mlp.linear_fc1", False),
    ("decoder.layers.0.*", "decoder.layers.10.mlp.linear_fc1", False),
    ("*.linear_qkv", "decoder.layers.3.self_attention.linear_qkv", True),
    ("*.linear_qkv", "linear_qkv", False),
    ("*linear_fc*", "decoder.layers.0.mlp.linear_fc2", True),
    ("*.layers.*.linear_proj", "decoder.layers.7.self_attention.linear_proj", True),
    ("a.b", "a.b", True),
    ("a.b", "axb", False),
    ("a?b", "axb", False),
    ("a[bc]", "ab", False),
    ("a[bc]", "a[bc]", True),
    ("a+", "aa", False),
    ("(x)", "(x)", True),
    ("*", "", True),
    ("linear_qkv", "decoder.linear_qkv", False),
    ("x", None, False),
])
def test_wildcard_match(pattern, key, expected):
    assert wildcard_match(pattern, key) is expected


@pytest.mark.parametrize("fqn, expected", [
    ("decoder.layers.0.mlp.experts.linear_fc1", True),
    ("decoder.layers.0.mlp.experts.local_experts.3.linear_fc2", True),
    ("decoder.layers.0.mlp.linear_fc1", False),
    ("decoder.layers.0.mlp.experts.linear_fc1.adapter", False),
    (None, False),
])
def test_is_expert_linear(fqn, expected):
    assert is_expert_linear(fqn) is expected


# ---- transformer-engine stand-ins (recognised by class name and attributes) ---------------------
class _TEBase(nn.Module):
    def __init__(self, in_features=16, out_features=24, sequence_parallel=False, **attrs):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = SimpleNamespace(sequence_parallel=sequence_parallel)
        for k, v in attrs.items():
            setattr(self, k, v)


class TELayerNormColumnParallelLinear(_TEBase):
    pass


class TEColumnParallelLinear(_TEBase):
    pass


class TERowParallelLinear(_TEBase):
    pass


class TELinear(_TEBase):
    pass


@pytest.mark.parametrize("sp", [False, True])
def test_te_layernorm_column_stand_in(sp):
    m = TELayerNormColumnParallelLinear(sequence_parallel=sp)
    attrs = get_adapter_attributes_from_linear(m)
    # with SP the layer gathers its layernorm output itself, so the adapter must not gather again
    assert attrs == (False, 16, 24, True, True)
    assert m.return_layernorm_output is True
    assert getattr(m, "return_layernorm_output_gathered", False) is sp


def test_te_layernorm_column_stand_in_with_ub_overlap_keeps_the_adapter_gather():
    m = TELayerNormColumnParallelLinear(sequence_parallel=True, ub_overlap_ag=True)
    assert get_adapter_attributes_from_linear(m) == (False, 16, 24, False, True)
    assert m.return_layernorm_output is True
    assert not getattr(m, "return_layernorm_output_gathered", False)


@pytest.mark.parametrize("sp", [False, True])
def test_te_column_and_row_stand_ins(sp):
    # At tensor-parallel size 1 the partitioned sizes are the full sizes.
    assert get_adapter_attributes_from_linear(TEColumnParallelLinear(sequence_parallel=sp)) == (
        False, 16, 24, not sp, True)
    assert get_adapter_attributes_from_linear(TERowParallelLinear(sequence_parallel=sp)) == (
        True, 16, 24, not sp, True)


def test_te_linear_stand_in_duplicated_and_by_parallel_mode():
    assert get_adapter_attributes_from_linear(TELinear()) == (False, 16, 24, True, False)
    assert get_adapter_attributes_from_linear(TELinear(parallel_mode="column")) == (
        False, 16, 24, True, True)
    assert get_adapter_attributes_from_linear(TELinear(parallel_mode="row")) == (
        True, 16, 24, True, True)


def test_nn_linear_attributes():
    assert get_adapter_attributes_from_linear(nn.Linear(7, 3)) == (False, 7, 3, True, False)


@pytest.mark.parametrize("sp", [False, True])
def test_duplicated_te_linear_adapter_grads_are_marked_for_the_tp_reduction(sp):
    """A duplicated TELinear sees only this rank's sequence shard under sequence parallelism, so
    megatron marks its weight ``sequence_parallel`` (grads all-reduced over TP); the adapter's
    replicated factors (and DoRA's magnitude) need the same mark, or they are never summed."""
    from bridge.peft import DoRA

    model = nn.Module()
    model.linear_q_down_proj = TELinear(sequence_parallel=sp)
    LoRA(target_modules=["linear_q_down_proj"], dim=2)(model)
    adapter = model.linear_q_down_proj.adapter
    for p in (adapter.linear_in.weight, adapter.linear_out.weight):
        assert getattr(p, "sequence_parallel", False) is sp
    model = nn.Module()
    model.linear_q_down_proj = TELinear(sequence_parallel=sp)
    model.linear_q_down_proj.weight = nn.Parameter(torch.randn(24, 16))
    DoRA(target_modules=["linear_q_down_proj"], dim=2)(model)
    adapter = model.linear_q_down_proj.adapter
    for p in (adapter.linear_in.weight, adapter.linear_out.weight, adapter.weight_magnitude):
        assert getattr(p, "sequence_parallel", False) is sp


def test_linear_adapter_answers_to_megatron_bridge_factor_names():
    """linear_in / linear_out (Megatron-Bridge's newer names) are the same modules as
    lora_a / lora_b, and a state dict spelled either way loads strictly."""
    from bridge.peft import LinearAdapter

    torch.manual_seed(0)
    m = LinearAdapter(nn.Linear(6, 4), dim=2, lora_B_init_method="normal")
    assert m.linear_in is m.lora_a and m.linear_out is m.lora_b
    renamed = {k.replace("lora_a.", "linear_in.").replace("lora_b.", "linear_out."): v.clone()
               for k, v in m.state_dict().items()}
    assert "linear_in.weight" in renamed and "linear_out.weight" in renamed
    fresh = LinearAdapter(nn.Linear(6, 4), dim=2)
    fresh.load_state_dict(renamed, strict=True)
    for key, value in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
