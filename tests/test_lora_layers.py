"""LoRALinear, LinearAdapter, ParallelLinearAdapter, argument checks, name matching and base-linear
introspection (megatron-core's linears and tests/te_standins.py's TE wrappers at TP=1;
transformer-engine is never imported)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from bridge.kernels import lora_linear_ref
from torch import nn

from bridge.peft import (
    LinearAdapter,
    LoRA,
    LoRALinear,
    ParallelLinearAdapter,
    PEFTConfigError,
    UnsupportedModuleError,
    get_adapter_attributes_from_linear,
    wildcard_match,
)
from bridge.peft.utils import AdapterAttributes, is_expert_linear
from tests.conftest import requires_kernel_device
from tests.numerics import assert_close_rel, dtype_tol

K, N, R = 12, 10, 4
ALPHA = 8.0
SCALE = ALPHA / R


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def lora_ref(x, w, b, a, bb, *, mask=None, p=0.0, position="pre"):
    """The package's eager reference (bridge.kernels.lora_linear_ref) in fp64, as fp32;
    ``mask`` is a 0/1 keep mask of x ('pre') or of y ('post')."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return lora_linear_ref(d(x), d(w), d(b), d(a), d(bb), scale=SCALE, dropout=p,
                           dropout_mask=mask, dropout_position=position).float()


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
                      m.adapter.linear_out.weight)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


def test_lora_linear_weight_is_the_effective_weight_and_bias_is_the_base_bias():
    m = plain_lora()
    w, a, b = (t.detach().double() for t in (m.to_wrap.weight, m.adapter.linear_in.weight,
                                             m.adapter.linear_out.weight))
    merged = m.weight
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, (w + SCALE * b @ a).float(), rtol=1e-6, atol=1e-6)
    assert m.bias is m.to_wrap.bias
    # the effective weight reproduces the LoRA output (no dropout) ...
    x = randn(7, K, seed=2)
    torch.testing.assert_close(m(x), x @ merged.t() + m.bias, rtol=1e-5, atol=1e-5)
    # ... and is differentiable in the factors (Megatron-Bridge's LoRALinear.weight is)
    (merged * randn(N, K, seed=3)).sum().backward()
    g = randn(N, K, seed=3).double()
    torch.testing.assert_close(m.adapter.linear_out.weight.grad, (SCALE * g @ a.t()).float())
    torch.testing.assert_close(m.adapter.linear_in.weight.grad, (SCALE * b.t() @ g).float())


def test_lora_linear_weight_with_the_adapter_disabled_is_the_base_weight():
    m = plain_lora()
    m.disable_adapter_layers()
    assert m.weight is m.to_wrap.weight
    m.enable_adapter_layers()
    assert m.weight is not m.to_wrap.weight
    assert not torch.equal(m.weight, m.to_wrap.weight)


def test_lora_linear_weight_with_mismatched_factors_raises():
    m = plain_lora()
    m.adapter.linear_in = nn.Linear(K // 2, R, bias=False)  # as a TP shard of A would be
    with pytest.raises(ValueError, match=r"LoRA factors do not fit the base weight shard: W "
                                         r"\(10, 12\), linear_out \(B\) \(10, 4\), linear_in "
                                         r"\(A\) \(4, 6\), tensor-parallel size 1"):
        _ = m.weight


def test_lora_linear_rejects_an_unknown_backend_and_gemm_strategy():
    with pytest.raises(ValueError, match=r"unknown kernel_backend 'foo'; expected one of auto, "
                                         r"cuda, triton, eager"):
        LoRALinear(nn.Linear(2, 2), nn.Linear(2, 2), kernel_backend="foo")
    with pytest.raises(ValueError, match=r"unknown kernel_gemm 'tf32'; expected one of 'auto', "
                                         r"'fused', 'cublas'"):
        LoRALinear(nn.Linear(2, 2), nn.Linear(2, 2), kernel_gemm="tf32")


@pytest.mark.parametrize("gemm", ["auto", "fused", "cublas", "CUBLAS", None])
def test_kernel_gemm_reaches_every_lora_linear(gemm):
    from bridge.peft import CanonicalLoRA

    want = (gemm or "auto").lower()
    assert LoRALinear(nn.Linear(2, 2), nn.Linear(2, 2), kernel_gemm=gemm).kernel_gemm == want
    model = nn.Sequential()
    model.add_module("linear_proj", nn.Linear(K, N))
    LoRA(target_modules=["linear_proj"], dim=2, kernel_gemm=gemm)(model)
    assert model.linear_proj.kernel_gemm == want
    model = nn.Sequential()
    model.add_module("linear_proj", nn.Linear(K, N))
    CanonicalLoRA(target_modules=["linear_proj"], dim=2, kernel_gemm=gemm)(model)
    assert model.linear_proj.kernel_gemm == want
    for cls in (LoRA, CanonicalLoRA):
        with pytest.raises(ValueError, match=r"unknown kernel_gemm 'fast'"):
            cls(kernel_gemm="fast")


# ---- LinearAdapter: the LoRA term of an nn.Linear, wrapped with its base ----------------------
def linear_lora(**kw) -> LoRALinear:
    """LoRALinear(nn.Linear, LinearAdapter) as Megatron-Bridge builds it, base frozen as LoRA
    freezes it."""
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    base.requires_grad_(False)
    kw.setdefault("dim", R)
    kw.setdefault("alpha", ALPHA)
    return LoRALinear(base, LinearAdapter(base, **kw), kernel_backend="eager")


def test_linear_adapter_holds_only_the_factors_and_computes_only_the_delta():
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    adapter = LinearAdapter(base, dim=R, alpha=ALPHA, lora_B_init_method="normal")
    assert sorted(adapter.state_dict()) == ["linear_in.weight", "linear_out.weight"]
    assert adapter.linear_in.weight.shape == (R, K) and adapter.linear_out.weight.shape == (N, R)
    assert (adapter.scale, adapter.dim, adapter.alpha) == (SCALE, R, ALPHA)
    assert adapter.dropout_p == 0.0 and isinstance(adapter.dropout, nn.Identity)
    assert adapter.activation_name == "identity" and adapter.dropout_position == "pre"
    x = randn(3, K, seed=1)
    a, b = adapter.linear_in.weight.double(), adapter.linear_out.weight.double()
    torch.testing.assert_close(adapter(x), (SCALE * x.double() @ a.t() @ b.t()).float())


def test_lora_linear_over_linear_adapter_state_dict_keys():
    m = linear_lora()
    assert sorted(m.state_dict()) == ["adapter.linear_in.weight", "adapter.linear_out.weight",
                                      "bias", "weight"]
    model = nn.Module()
    model.lin = nn.Linear(K, N)
    LoRA(target_modules=["lin"], dim=R)(model)
    assert type(model.lin) is LoRALinear and type(model.lin.adapter) is LinearAdapter
    assert model.lin.to_wrap.__class__ is nn.Linear
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "lin.adapter.linear_in.weight", "lin.adapter.linear_out.weight"]


def test_regression_linear_adapter_pattern_adds_the_base_output_once():
    """Megatron-Bridge's documented pattern LoRALinear(base, LinearAdapter(base)) once returned
    twice the base output here (the adapter folded the base in). With B = 0 it is the base."""
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    m = LoRALinear(base, LinearAdapter(base), kernel_backend="eager")
    x = randn(6, K, seed=3)
    assert torch.count_nonzero(m.adapter.linear_out.weight) == 0
    assert torch.equal(m(x), base(x))


def test_regression_an_adapter_holding_the_base_is_refused():
    base = nn.Linear(K, N)
    with pytest.raises(PEFTConfigError, match=r"the adapter \(Linear\) holds parameters of the "
                                              r"base \(Linear\).*LinearAdapter\(linear\)"):
        LoRALinear(base, base)
    holder = nn.Sequential(base)
    with pytest.raises(AssertionError, match=r"holds parameters of the base"):
        LoRALinear(base, holder)


@pytest.mark.parametrize("b_init", ["normal", "kaiming", "xavier", "uniform"])
def test_linear_adapter_nonzero_b_init_changes_the_output(b_init):
    m = linear_lora(lora_B_init_method=b_init)
    assert torch.count_nonzero(m.adapter.linear_out.weight) == m.adapter.linear_out.weight.numel()
    x = randn(6, K, seed=3)
    base = m.to_wrap(x)
    y = m(x)
    assert (y - base).abs().max() > 1e-3
    expect = lora_ref(x, m.to_wrap.weight, m.to_wrap.bias, m.adapter.linear_in.weight,
                      m.adapter.linear_out.weight)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape", [(1, K), (2, 3, K)])
def test_linear_adapter_grads_only_on_the_factors(x_shape):
    m = linear_lora(lora_B_init_method="normal")
    x = randn(*x_shape, seed=4).requires_grad_(True)
    g = randn(*x_shape[:-1], N, seed=5)
    (m(x) * g).sum().backward()
    assert m.to_wrap.weight.grad is None and m.to_wrap.bias.grad is None
    leaves = [t.detach().double().requires_grad_(True)
              for t in (x, m.adapter.linear_in.weight, m.adapter.linear_out.weight)]
    y64 = lora_linear_ref(leaves[0], m.to_wrap.weight.double(), m.to_wrap.bias.double(),
                          leaves[1], leaves[2], scale=SCALE)
    (y64 * g.double()).sum().backward()
    for got, want in zip((x, m.adapter.linear_in.weight, m.adapter.linear_out.weight), leaves,
                         strict=True):
        torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["pre", "post"])
def test_linear_adapter_dropout_position(position):
    p = 0.5
    m = linear_lora(lora_B_init_method="normal", dropout=p, dropout_position=position)
    x = randn(8, K, seed=6)
    w, b, a, bb = (m.to_wrap.weight, m.to_wrap.bias, m.adapter.linear_in.weight,
                   m.adapter.linear_out.weight)
    m.eval()
    torch.testing.assert_close(m(x), lora_ref(x, w, b, a, bb), rtol=1e-5, atol=1e-5)
    m.train()
    torch.manual_seed(123)
    y = m(x)
    # the adapter's dropout draws one seed from torch's generator (as the fused path does) and
    # the Philox keep-mask of the tensor it drops (bridge/peft/dropout.py): replay it
    from bridge.kernels.philox import SEED_HIGH, philox_keep_mask

    torch.manual_seed(123)
    seed = int(torch.randint(0, SEED_HIGH, (1,)))
    mask_shape = x.shape if position == "pre" else (x.shape[0], N)
    mask = philox_keep_mask(seed, mask_shape, p, "cpu")
    torch.testing.assert_close(y, lora_ref(x, w, b, a, bb, mask=mask, p=p, position=position),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, m.eval()(x))
    # the other position's mask would give something else
    other = "post" if position == "pre" else "pre"
    other_mask = torch.ones(x.shape if other == "pre" else (x.shape[0], N)).bernoulli_(0.5) != 0
    assert not torch.allclose(y, lora_ref(x, w, b, a, bb, mask=other_mask, p=p, position=other))


@pytest.mark.parametrize("position", ["pre", "post"])
def test_linear_adapter_zero_dropout_in_train_mode_equals_reference(position):
    m = linear_lora(lora_B_init_method="normal", dropout=0.0, dropout_position=position).train()
    x = randn(5, K, seed=7)
    expect = lora_ref(x, m.to_wrap.weight, m.to_wrap.bias, m.adapter.linear_in.weight,
                      m.adapter.linear_out.weight)
    torch.testing.assert_close(m(x), expect, rtol=1e-5, atol=1e-5)


def test_linear_adapter_lora_dtype():
    m = linear_lora(lora_B_init_method="normal", lora_dtype=torch.float64)
    assert m.adapter.linear_in.weight.dtype == torch.float64
    assert m.to_wrap.weight.dtype == torch.float32
    x = randn(4, K, seed=8)
    y = m(x)
    assert y.dtype == torch.float32  # the base's dtype, whatever the adapter's
    expect = lora_ref(x, m.to_wrap.weight, m.to_wrap.bias, m.adapter.linear_in.weight,
                      m.adapter.linear_out.weight)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


def test_linear_adapter_refuses_kernel_backend_and_names_the_wrapper():
    with pytest.raises(TypeError, match=r"pass kernel_backend to its wrapper: LoRALinear\(linear, "
                                        r"LinearAdapter\(linear\), kernel_backend='eager'\)"):
        LinearAdapter(nn.Linear(K, N), kernel_backend="eager")


def test_linear_adapter_rejects_non_linear():
    with pytest.raises(TypeError, match=r"LinearAdapter wraps an nn.Linear, got Conv1d"):
        LinearAdapter(nn.Conv1d(2, 2, 1))


def _folded_state(seed=0):
    """A state dict of the earlier folded LinearAdapter layout: weight, bias, lora_a, lora_b."""
    return {"weight": randn(N, K, seed=seed), "bias": randn(N, seed=seed + 1),
            "lora_a.weight": randn(R, K, seed=seed + 2), "lora_b.weight": randn(N, R, seed=seed + 3)}


def test_old_folded_layout_loads_with_one_deprecation_warning(monkeypatch):
    from bridge.peft import lora_layers

    monkeypatch.setattr(lora_layers, "_legacy_warned", False)
    model = nn.Module()
    model.a, model.b = nn.Linear(K, N), nn.Linear(K, N)
    LoRA(target_modules=["a", "b"], dim=R)(model)
    old = {f"{name}.{k}": v for name in ("a", "b") for k, v in _folded_state(ord(name)).items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_state_dict(old, strict=True)
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(deprecations) == 1, [str(w.message) for w in caught]
    assert "deprecated folded LinearAdapter layout" in str(deprecations[0].message)
    for name in ("a", "b"):
        layer = getattr(model, name)
        assert torch.equal(layer.to_wrap.weight, old[f"{name}.weight"])
        assert torch.equal(layer.to_wrap.bias, old[f"{name}.bias"])
        assert torch.equal(layer.adapter.linear_in.weight, old[f"{name}.lora_a.weight"])
        assert torch.equal(layer.adapter.linear_out.weight, old[f"{name}.lora_b.weight"])
    # the next save writes the current layout
    assert "a.adapter.linear_in.weight" in model.state_dict()
    assert not any("lora_a" in k for k in model.state_dict())
    # a LinearAdapter alone accepts the folded factor names too
    adapter = LinearAdapter(nn.Linear(K, N), dim=R)
    adapter.load_state_dict({"lora_a.weight": old["a.lora_a.weight"],
                             "lora_b.weight": old["a.lora_b.weight"]}, strict=True)
    assert torch.equal(adapter.linear_in.weight, old["a.lora_a.weight"])


def test_old_folded_layout_adapter_only_load(monkeypatch):
    from bridge.peft import adapter_state_dict, load_adapter_state_dict, lora_layers

    monkeypatch.setattr(lora_layers, "_legacy_warned", False)
    model = nn.Module()
    model.lin = nn.Linear(K, N)
    LoRA(target_modules=["lin"], dim=R)(model)
    old = _folded_state(5)
    with pytest.warns(FutureWarning, match="deprecated folded LinearAdapter layout"):
        load_adapter_state_dict(model, {"lin.lora_a.weight": old["lora_a.weight"],
                                        "lin.lora_b.weight": old["lora_b.weight"]})
    saved = adapter_state_dict(model)
    assert sorted(saved) == ["lin.adapter._extra_state", "lin.adapter.linear_in.weight",
                             "lin.adapter.linear_out.weight"]  # the settings, and the factors
    assert torch.equal(saved["lin.adapter.linear_in.weight"], old["lora_a.weight"])
    assert torch.equal(saved["lin.adapter.linear_out.weight"], old["lora_b.weight"])


# ---- init methods ------------------------------------------------------------------------------
FAN_OUT, FAN_IN = 48, 64


@pytest.mark.parametrize("name", ["xavier", "normal", "kaiming", "uniform", "zero"])
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
        else:  # kaiming / uniform, a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
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
    (dict(alpha=0), r"alpha must be a finite number > 0 \(the scale is alpha / dim; None for a "
                    r"scale of 1\), got 0"),
    (dict(alpha=-1.5), r"alpha must be a finite number > 0 .*, got -1\.5"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1\.0"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\), got -0\.1"),
    (dict(dropout_position="mid"), r"unknown dropout_position 'mid'; expected 'pre' or 'post'"),
    (dict(a_init="he"),
     r"unknown init method 'he'; expected one of xavier, normal, kaiming, uniform, zero"),
    (dict(b_init="ones"), r"unknown init method 'ones'; expected one of xavier, normal, kaiming, "
                          r"uniform, zero"),
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
    with pytest.raises(ValueError, match=message) as info:
        _build(kind, **kwargs)
    # what Megatron-Bridge raises for these, so code catching that still catches them
    upstream = NotImplementedError if "init method" in message else AssertionError
    assert isinstance(info.value, upstream)


def test_parallel_linear_adapter_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'softplus'; expected one of "
                                         r"identity, relu, gelu, swish, silu, tanh, sigmoid"):
        ParallelLinearAdapter(K, N, R, activation="softplus")


@pytest.mark.parametrize("name, cls", [("identity", nn.Identity), ("swish", nn.SiLU),
                                       ("gelu", nn.GELU), ("tanh", nn.Tanh)])
def test_parallel_linear_adapter_activation_and_dropout_are_modules(name, cls):
    m = ParallelLinearAdapter(K, N, R, activation=name)
    assert isinstance(m.activation, cls) and m.activation_name == name
    assert isinstance(m.dropout, nn.Identity) and m.dropout_p == 0.0
    d = ParallelLinearAdapter(K, N, R, dropout=0.25)
    assert isinstance(d.dropout, nn.Dropout) and d.dropout.p == 0.25
    assert d.dropout_position == "pre"  # Megatron-Bridge's default


def test_parallel_linear_adapter_unexpected_keyword():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'rank'"):
        ParallelLinearAdapter(K, N, R, rank=3)


def test_parallel_linear_adapter_expert_keeps_the_base_parallel_state():
    # expert adapters are supported (issue 12; tests/test_moe_lora*.py prove them): the base
    # communicates elsewhere, so the adapter's term stays a shard / partial sum like the base's
    adapter = ParallelLinearAdapter(K, N, R, base_linear_name="decoder.mlp.experts",
                                    is_expert=True)
    assert adapter.is_expert and adapter.explicit_comm


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("kind", ["column", "row", "te-column", "te-row"])
def test_adapter_linears_get_the_bases_tp_group_without_megatrons_warning(kind, recwarn):
    """The adapter's Column/RowParallelLinears are built on the base's own TP group (a group of
    its own here, not megatron's default), so megatron's "tp_group is None ... mandatory"
    DeprecationWarning is never raised for them."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from tests.megatron_utils import make_config

    cfg = make_config(hidden_size=K)
    ColumnParallelLinear(K, N, config=cfg, init_method=nn.init.normal_, bias=False)
    assert any("tp_group is None" in str(w.message) for w in recwarn), \
        "megatron no longer warns for a missing tp_group: this test proves nothing"
    group = dist.new_group([0])
    common = dict(config=cfg, init_method=nn.init.normal_, bias=False, tp_group=group)
    if kind.startswith("te-"):
        from tests import te_standins as te

        common.update(skip_bias_add=False, is_expert=False)
        base = te.TEColumnParallelLinear(K, N, gather_output=False, **common) \
            if kind == "te-column" else te.TERowParallelLinear(K, N, input_is_parallel=True,
                                                               **common)
    elif kind == "column":
        base = ColumnParallelLinear(K, N, gather_output=False, **common)
    else:
        base = RowParallelLinear(K, N, input_is_parallel=True, skip_bias_add=True, **common)
    assert base.tp_group is group
    recwarn.clear()
    model = nn.Module()
    model.linear_fc1 = base
    LoRA(target_modules=["linear_fc1"], dim=R)(model)
    adapter = model.linear_fc1.adapter
    assert not [str(w.message) for w in recwarn if "tp_group" in str(w.message)]
    assert adapter.tp_group is group
    assert adapter.linear_in.tp_group is group and adapter.linear_out.tp_group is group


def test_unknown_kernel_backend():
    msg = r"unknown kernel_backend 'foo'; expected one of auto, cuda, triton, eager"
    with pytest.raises(ValueError, match=msg):
        LoRA(kernel_backend="foo")


def test_target_and_exclude_modules_together():
    """Refused when applied (as upstream, a recipe may still clear target_modules after
    construction), as the AssertionError upstream raises."""
    peft = LoRA(target_modules=["linear_qkv"], exclude_modules=["linear_fc2"])
    model = nn.Module()
    model.linear_qkv = nn.Linear(K, N)
    with pytest.raises(PEFTConfigError, match=re.escape(
            "exclude_modules should be empty when using target_modules: target_modules and "
            "exclude_modules cannot both be set (got target_modules=['linear_qkv'], "
            "exclude_modules=['linear_fc2'])")):
        peft(model)
    with pytest.raises(AssertionError, match="exclude_modules should be empty"):
        peft.match(model.linear_qkv, "linear_qkv")
    peft.target_modules = []
    peft(model)
    assert isinstance(model.linear_qkv, LoRALinear)


@pytest.mark.parametrize("module", [nn.Conv1d(2, 2, 1), nn.LayerNorm(4), nn.Embedding(3, 4)])
def test_get_adapter_attributes_rejects_unsupported_modules(module):
    name = type(module).__name__
    with pytest.raises(UnsupportedModuleError, match=rf"Layer type is unrecognized for LoRA: "
                                                     rf"torch\.nn\..*\.{name}; expected "
                                                     r"megatron-core ColumnParallelLinear/"
                                                     r"RowParallelLinear, .*torch\.nn\.Linear"):
        get_adapter_attributes_from_linear(module)
    # Megatron-Bridge raises NotImplementedError here; ours is that and a TypeError
    with pytest.raises(NotImplementedError):
        get_adapter_attributes_from_linear(module)


def test_lora_on_an_unsupported_module_raises_when_named():
    model = nn.Module()
    model.conv = nn.Conv1d(2, 2, 1)
    with pytest.raises(TypeError, match=r"Layer type is unrecognized for LoRA: .*Conv1d"):
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
])
def test_wildcard_match(pattern, key, expected):
    assert wildcard_match(pattern, key) is expected


def test_wildcard_match_of_no_key_is_none():
    assert wildcard_match("x", None) is None
    assert wildcard_match("*", None) is None


@pytest.mark.parametrize("fqn, expected", [
    ("decoder.layers.0.mlp.experts.linear_fc1", True),
    ("decoder.layers.0.mlp.experts.local_experts.3.linear_fc2", True),
    ("decoder.layers.0.mlp.linear_fc1", False),
    ("decoder.layers.0.mlp.experts.linear_fc1.adapter", False),
    ("decoder.layers.0.mlp.shared_experts.linear_fc1", False),
    (None, False),
])
def test_is_expert_linear(fqn, expected):
    assert is_expert_linear(fqn) is expected


# ---- transformer-engine bases (tests/te_standins.py's, recognised by class name and attributes) --
def attributes(input_is_parallel, k, n, disable_sp, parallel, disable_tp=False):
    return AdapterAttributes(input_is_parallel=input_is_parallel, in_features=k, out_features=n,
                             disable_tensor_parallel_comm=disable_tp,
                             disable_sequence_parallel_comm=disable_sp,
                             base_linear_is_parallel=parallel)

def te_base(kind: str, sequence_parallel=False, **config):
    """tests/te_standins.py's megatron TE wrapper of ``kind`` ("lncol" | "column" | "row" |
    "duplicated" | "linear:column" | "linear:row" for TELinear), 16 -> 24 features, at TP=1 (no
    process group needed). ``sequence_parallel`` is set on the config after its validation,
    which refuses SP without TP: the partitioned sizes are the full sizes at TP=1."""
    pytest.importorskip("megatron.core", reason="megatron-core not installed")
    from tests import te_standins as te
    from tests.megatron_utils import make_config

    cfg = make_config(hidden_size=16, **config)
    cfg.sequence_parallel = sequence_parallel
    common = dict(config=cfg, init_method=nn.init.normal_, bias=False, skip_bias_add=False)
    if kind == "lncol":
        return te.TELayerNormColumnParallelLinear(16, 24, gather_output=False, is_expert=False,
                                                  tp_comm_buffer_name="qkv", **common)
    if kind == "column":
        return te.TEColumnParallelLinear(16, 24, gather_output=False, is_expert=False, **common)
    if kind == "row":
        return te.TERowParallelLinear(16, 24, input_is_parallel=True, is_expert=False, **common)
    mode = kind.removeprefix("linear:")  # TELinear itself, as MLA's projections use it
    return te.TELinear(16, 24, parallel_mode=mode, skip_weight_param_allocation=False, **common)


@pytest.mark.parametrize("sp", [False, True])
def test_te_layernorm_column_stand_in(sp):
    m = te_base("lncol", sequence_parallel=sp)
    attrs = get_adapter_attributes_from_linear(m)
    # returned ungathered (TE drops a gathered one's gradient): with SP the adapter gathers it
    assert attrs == attributes(False, 16, 24, not sp, True)
    assert m.return_layernorm_output is True
    assert m.return_layernorm_output_gathered is False


def test_te_layernorm_column_stand_in_with_ub_overlap_keeps_the_adapter_gather():
    m = te_base("lncol", sequence_parallel=True, tp_comm_overlap=True)
    assert get_adapter_attributes_from_linear(m) == attributes(False, 16, 24, False, True)
    assert m.return_layernorm_output is True
    assert not getattr(m, "return_layernorm_output_gathered", False)


@pytest.mark.parametrize("sp", [False, True])
def test_te_column_and_row_stand_ins(sp):
    # At tensor-parallel size 1 the partitioned sizes are the full sizes.
    assert get_adapter_attributes_from_linear(te_base("column", sequence_parallel=sp)) == \
        attributes(False, 16, 24, not sp, True)
    assert get_adapter_attributes_from_linear(te_base("row", sequence_parallel=sp)) == \
        attributes(True, 16, 24, not sp, True)


def test_te_linear_stand_in_duplicated_and_by_parallel_mode():
    # megatron hands TE parallel_mode=None for a duplicated TELinear: no TP communication at all
    assert get_adapter_attributes_from_linear(te_base("duplicated")) == attributes(
        False, 16, 24, True, False, disable_tp=True)
    assert get_adapter_attributes_from_linear(te_base("linear:column")) == attributes(
        False, 16, 24, True, True)
    assert get_adapter_attributes_from_linear(te_base("linear:row")) == attributes(
        True, 16, 24, True, True)


def test_te_base_without_tp_communication_is_flagged():
    """parallel_mode=None (MoE shared experts with overlap): TP-sharded weights, no TP
    communication in the base, so none in the adapter's sequence path either."""
    m = te_base("column", sequence_parallel=True)
    m.parallel_mode = None  # what megatron's TELinear hands TE for explicit expert communication
    attrs = get_adapter_attributes_from_linear(m)
    assert attrs.disable_tensor_parallel_comm and attrs.disable_sequence_parallel_comm


def test_nn_linear_attributes():
    assert get_adapter_attributes_from_linear(nn.Linear(7, 3)) == attributes(False, 7, 3, True,
                                                                             False)


@pytest.mark.parametrize("sp", [False, True])
def test_duplicated_te_linear_adapter_grads_are_marked_for_the_tp_reduction(sp):
    """A duplicated TELinear sees only this rank's sequence shard under sequence parallelism, so
    megatron marks its weight ``sequence_parallel`` (grads all-reduced over TP); the adapter's
    replicated factors (and DoRA's magnitude) need the same mark, or they are never summed."""
    from bridge.peft import DoRA

    model = nn.Module()
    model.linear_q_down_proj = te_base("duplicated", sequence_parallel=sp)
    LoRA(target_modules=["linear_q_down_proj"], dim=2)(model)
    adapter = model.linear_q_down_proj.adapter
    for p in (adapter.linear_in.weight, adapter.linear_out.weight):
        assert getattr(p, "sequence_parallel", False) is sp
    model = nn.Module()
    model.linear_q_down_proj = te_base("duplicated", sequence_parallel=sp)
    DoRA(target_modules=["linear_q_down_proj"], dim=2)(model)
    adapter = model.linear_q_down_proj.adapter
    for p in (adapter.linear_in.weight, adapter.linear_out.weight, adapter.weight_magnitude):
        assert getattr(p, "sequence_parallel", False) is sp


@requires_kernel_device()
@pytest.mark.parametrize("bias", [True, False])
def test_linear_adapter_takes_the_fused_path(bias, kernel_device):
    """LoRALinear(nn.Linear, LinearAdapter) runs as one fused op (the wrapper hands the call to
    bridge.kernels) with the eager module's values and gradients."""
    from bridge.peft.fused_forward import fused_lora_forward

    results = {}
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        base = nn.Linear(K, N, bias=bias).requires_grad_(False).to(kernel_device)
        m = LoRALinear(base, LinearAdapter(base, dim=R, alpha=ALPHA, lora_B_init_method="normal"),
                       kernel_backend=backend)
        x = randn(3, 5, K, seed=11).to(kernel_device).requires_grad_(True)
        fused = fused_lora_forward(m, x, (), {})
        assert (fused is None) is (backend == "eager")  # triton: the fused op ran
        y = m(x)
        (y * randn(3, 5, N, seed=12).to(kernel_device)).sum().backward()
        results[backend] = (y, x.grad, m.adapter.linear_in.weight.grad,
                            m.adapter.linear_out.weight.grad)
    for name, got, want in zip(("y", "dx", "dA", "dB"), results["triton"], results["eager"],
                               strict=True):
        assert_close_rel(got, want, dtype_tol(torch.float32), what=name)


@pytest.mark.parametrize("name", ["xavier", "uniform"])
def test_linear_adapter_a_init_as_megatron_bridge(name):
    """LinearAdapter's 'xavier' is Xavier-uniform, 'uniform' Kaiming-uniform (a = sqrt 5)."""
    torch.manual_seed(0)
    adapter = LinearAdapter(nn.Linear(64, 48), dim=32, lora_A_init_method=name)
    w = adapter.linear_in.weight  # [32, 64]
    bound = math.sqrt(6.0 / (64 + 32)) if name == "xavier" else 1.0 / math.sqrt(64)
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.1  # uniform, not normal
    assert torch.count_nonzero(adapter.linear_out.weight) == 0
