"""LoRA on real megatron-core layers (CPU, gloo, world size 1): ColumnParallelLinear,
RowParallelLinear and bridge.layers.LayerNormColumnParallelLinear (LayerNorm and RMSNorm) against
an independent fp64 reference, values and gradients; state dicts and sharded state dicts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group  # noqa: E402

from bridge.layers import LayerNormColumnParallelLinear  # noqa: E402
from bridge.peft import LoRA, LoRALinear, ParallelLinearAdapter  # noqa: E402
from bridge.peft.utils import get_adapter_attributes_from_linear  # noqa: E402
from tests.megatron_utils import make_config  # noqa: E402

S, B, K, N, R = 5, 2, 16, 24, 4
ALPHA = 8.0
SCALE = ALPHA / R
EPS = 1e-5
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 layers against the fp64 reference

pytestmark = pytest.mark.usefixtures("megatron_tp1")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def build_base(kind: str, skip_bias_add: bool, normalization: str = "LayerNorm", seed: int = 0):
    """A megatron base linear with a non-zero bias (and non-trivial norm parameters)."""
    torch.manual_seed(seed)
    init = lambda w: nn.init.normal_(w, std=0.3)  # noqa: E731
    if kind == "column":
        base = ColumnParallelLinear(K, N, config=make_config(), init_method=init, bias=True,
                                    gather_output=False, skip_bias_add=skip_bias_add)
    elif kind == "row":
        base = RowParallelLinear(K, N, config=make_config(), init_method=init, bias=True,
                                 input_is_parallel=True, skip_bias_add=skip_bias_add)
    else:
        cfg = make_config(normalization=normalization, layernorm_epsilon=EPS)
        base = LayerNormColumnParallelLinear(K, N, config=cfg, init_method=init, bias=True,
                                             gather_output=False, skip_bias_add=skip_bias_add)
        with torch.no_grad():
            base.layer_norm_weight.copy_(1 + 0.5 * torch.randn(K, generator=gen(seed + 1)))
            if base.layer_norm_bias is not None:
                base.layer_norm_bias.copy_(0.5 * torch.randn(K, generator=gen(seed + 2)))
    with torch.no_grad():
        base.bias.copy_(torch.randn(N, generator=gen(seed + 3)))
    return base


def wrap(base: nn.Module, **kw) -> nn.Module:
    """LoRA on ``base`` (as ``model.proj``), B initialised non-zero so every gradient is."""
    model = nn.Module()
    model.proj = base
    kw.setdefault("lora_B_init_method", "normal")
    LoRA(target_modules=["proj"], dim=R, alpha=ALPHA, kernel_backend="eager", **kw)(model)
    return model


def norm64(x, weight, bias, normalization):
    if normalization == "LayerNorm":
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        out = (x - mean) / torch.sqrt(var + EPS) * weight
        return out + bias if bias is not None else out
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def leaf64(t):
    return t.detach().double().clone().requires_grad_(True)


def inputs(seed=10):
    x = torch.randn(S, B, K, generator=gen(seed)).requires_grad_(True)
    g = torch.randn(S, B, N, generator=gen(seed + 1))
    return x, g


# ---- column / row ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_lora_on_megatron_linear_matches_fp64_reference(kind, skip_bias_add):
    model = wrap(build_base(kind, skip_bias_add))
    w = model.proj
    assert isinstance(w, LoRALinear) and isinstance(w.to_wrap, (ColumnParallelLinear,
                                                                RowParallelLinear))
    base, a, b = w.to_wrap, w.adapter.linear_in.weight, w.adapter.linear_out.weight
    assert not base.weight.requires_grad and not base.bias.requires_grad
    x, g = inputs()
    y, bias_out = w(x)
    if skip_bias_add:
        assert bias_out is base.bias
    else:
        assert bias_out is None
    (y * g).sum().backward()

    x64, a64, b64 = leaf64(x), leaf64(a), leaf64(b)
    y64 = x64 @ base.weight.double().t() + SCALE * (x64 @ a64.t()) @ b64.t()
    if not skip_bias_add:
        y64 = y64 + base.bias.double()
    (y64 * g.double()).sum().backward()
    torch.testing.assert_close(y, y64.float(), **TOL)
    torch.testing.assert_close(x.grad, x64.grad.float(), **TOL)
    torch.testing.assert_close(a.grad, a64.grad.float(), **TOL)
    torch.testing.assert_close(b.grad, b64.grad.float(), **TOL)
    assert base.weight.grad is None and base.bias.grad is None


def test_adapter_layout_follows_the_base():
    col = wrap(build_base("column", False)).proj.adapter
    row = wrap(build_base("row", False)).proj.adapter
    assert isinstance(col.linear_in, ColumnParallelLinear) and not col.input_is_parallel
    assert isinstance(col.linear_out, ColumnParallelLinear)
    assert isinstance(row.linear_in, RowParallelLinear) and row.input_is_parallel
    assert isinstance(row.linear_out, ColumnParallelLinear)
    for adapter in (col, row):
        assert adapter.linear_in.weight.shape == (R, K)
        assert adapter.linear_out.weight.shape == (N, R)
        assert adapter.scale == SCALE


def test_get_adapter_attributes_of_megatron_layers():
    from bridge.peft.utils import AdapterAttributes

    col = get_adapter_attributes_from_linear(build_base("column", False))
    assert col == AdapterAttributes(input_is_parallel=False, in_features=K, out_features=N,
                                    disable_tensor_parallel_comm=False,
                                    disable_sequence_parallel_comm=True,
                                    base_linear_is_parallel=True)
    row = get_adapter_attributes_from_linear(build_base("row", True))
    assert (row.input_is_parallel, row.in_features, row.out_features) == (True, K, N)
    ln = build_base("lncol", False)
    assert ln.return_layernorm_output is False
    attrs = get_adapter_attributes_from_linear(ln)
    assert (attrs.input_is_parallel, attrs.in_features, attrs.out_features) == (False, K, N)
    assert ln.return_layernorm_output is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        attrs.in_features = 3


def test_disabled_adapter_gives_the_base_output():
    model = wrap(build_base("column", False))
    x, _ = inputs()
    with torch.no_grad():
        on = model.proj(x)[0]
        LoRA().disable_adapter_layers(model)
        off = model.proj(x)[0]
        base = model.proj.to_wrap(x)[0]
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    assert not torch.allclose(on, off)


def test_backend_from_environment(monkeypatch):
    """LoRA's default kernel_backend 'auto' honours BRIDGE_KERNEL_BACKEND=eager."""
    monkeypatch.setenv("BRIDGE_KERNEL_BACKEND", "eager")
    model = nn.Module()
    model.proj = build_base("column", False)
    LoRA(target_modules=["proj"], dim=R, alpha=ALPHA, lora_B_init_method="normal")(model)
    assert model.proj.kernel_backend == "auto"
    x, _ = inputs()
    w = model.proj
    y, _ = w(x)
    with torch.no_grad():
        expect = (x.double() @ w.to_wrap.weight.double().t() + w.to_wrap.bias.double()
                  + SCALE * x.double() @ w.adapter.linear_in.weight.double().t()
                  @ w.adapter.linear_out.weight.double().t())
    torch.testing.assert_close(y, expect.float(), **TOL)


def test_lora_twice_in_exclude_mode_wraps_once():
    model = nn.Module()
    model.proj = build_base("row", False)
    model.other = build_base("column", False)
    peft = LoRA(target_modules=[], exclude_modules=["other"], dim=R, kernel_backend="eager")
    peft(model)
    peft(model)
    assert isinstance(model.proj, LoRALinear)
    assert isinstance(model.proj.to_wrap, RowParallelLinear)
    assert isinstance(model.proj.adapter.linear_in, RowParallelLinear)
    assert isinstance(model.proj.adapter.linear_out, ColumnParallelLinear)
    assert isinstance(model.other, ColumnParallelLinear)


# ---- LayerNormColumnParallelLinear ---------------------------------------------------------------
NORMS = ["LayerNorm", "RMSNorm"]


@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("skip_bias_add", [False, True])
@pytest.mark.parametrize("return_ln", [False, True])
def test_layernorm_column_base_return_patterns(normalization, skip_bias_add, return_ln):
    base = build_base("lncol", skip_bias_add, normalization)
    base.return_layernorm_output = return_ln
    x, g = inputs()
    h = torch.randn(S, B, K, generator=gen(99))
    result = base(x)
    if skip_bias_add and return_ln:
        out, bias, ln = result
    elif return_ln:
        (out, ln), bias = result
    else:
        out, bias = result
        ln = None
    assert bias is (base.bias if skip_bias_add else None)
    loss = (out * g).sum() + ((ln * h).sum() if ln is not None else 0.0)
    loss.backward()

    x64, gw64 = leaf64(x), leaf64(base.layer_norm_weight)
    gb64 = leaf64(base.layer_norm_bias) if base.layer_norm_bias is not None else None
    ln64 = norm64(x64, gw64, gb64, normalization)
    out64 = ln64 @ base.weight.detach().double().t()
    if not skip_bias_add:
        out64 = out64 + base.bias.detach().double()
    loss64 = (out64 * g.double()).sum() + ((ln64 * h.double()).sum() if ln is not None else 0.0)
    loss64.backward()
    torch.testing.assert_close(out, out64.float(), **TOL)
    if ln is not None:
        torch.testing.assert_close(ln, ln64.float(), **TOL)
    torch.testing.assert_close(x.grad, x64.grad.float(), **TOL)
    torch.testing.assert_close(base.layer_norm_weight.grad, gw64.grad.float(), **TOL)
    if gb64 is not None:
        torch.testing.assert_close(base.layer_norm_bias.grad, gb64.grad.float(), **TOL)
    else:
        assert normalization == "RMSNorm" and base.layer_norm_bias is None


@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_lora_on_layernorm_column_matches_fp64_reference(normalization, skip_bias_add):
    model = wrap(build_base("lncol", skip_bias_add, normalization))
    w = model.proj
    base, a, b = w.to_wrap, w.adapter.linear_in.weight, w.adapter.linear_out.weight
    assert base.return_layernorm_output is True  # LoRA reads the normalised input
    # train the norm too, to check its gradient through both the base and the adapter
    norm_params = [p for p in (base.layer_norm_weight, base.layer_norm_bias) if p is not None]
    for p in norm_params:
        p.requires_grad_(True)
    x, g = inputs()
    result = w(x)
    assert isinstance(result, tuple) and len(result) == 2  # the layernorm output is not returned
    y, bias_out = result
    assert bias_out is (base.bias if skip_bias_add else None)
    (y * g).sum().backward()

    x64, a64, b64 = leaf64(x), leaf64(a), leaf64(b)
    norm64_params = [leaf64(p) for p in norm_params]
    ln64 = norm64(x64, norm64_params[0], norm64_params[1] if len(norm64_params) > 1 else None,
                  normalization)
    y64 = ln64 @ base.weight.double().t() + SCALE * (ln64 @ a64.t()) @ b64.t()
    if not skip_bias_add:
        y64 = y64 + base.bias.double()
    (y64 * g.double()).sum().backward()
    torch.testing.assert_close(y, y64.float(), **TOL)
    torch.testing.assert_close(x.grad, x64.grad.float(), **TOL)
    torch.testing.assert_close(a.grad, a64.grad.float(), **TOL)
    torch.testing.assert_close(b.grad, b64.grad.float(), **TOL)
    for p, p64 in zip(norm_params, norm64_params, strict=True):
        torch.testing.assert_close(p.grad, p64.grad.float(), **TOL)


def test_layernorm_column_rejects_bad_configuration():
    init = nn.init.zeros_
    with pytest.raises(ValueError, match=r"unknown config.normalization 'BatchNorm'; expected "
                                         r"one of LayerNorm, RMSNorm"):
        LayerNormColumnParallelLinear(K, N, config=make_config(normalization="BatchNorm"),
                                      init_method=init, bias=True, gather_output=False,
                                      skip_bias_add=False)
    with pytest.raises(ValueError, match=r"gather_output=True"):
        LayerNormColumnParallelLinear(K, N, config=make_config(), init_method=init, bias=True,
                                      gather_output=True, skip_bias_add=False)


# ---- state dicts -------------------------------------------------------------------------------
def test_megatron_wrapper_state_dict_keys_and_strict_round_trip():
    model = wrap(build_base("lncol", True, "LayerNorm"))
    sd = model.state_dict()
    assert sorted(sd) == sorted([
        "proj.weight", "proj.bias", "proj.layer_norm_weight", "proj.layer_norm_bias",
        "proj._extra_state", "proj.adapter.linear_in.weight", "proj.adapter.linear_in._extra_state",
        "proj.adapter.linear_out.weight", "proj.adapter.linear_out._extra_state",
    ])
    saved = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0).add_(0.5)
    model.load_state_dict(saved, strict=True)
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, saved[key]), key


def test_megatron_wrapper_sharded_state_dict():
    model = wrap(build_base("row", False))
    w = model.proj
    sharded = w.sharded_state_dict(prefix="decoder.layers.0.mlp.linear_fc2.",
                                   metadata=ensure_metadata_has_dp_cp_group(None))
    p = "decoder.layers.0.mlp.linear_fc2."
    tensors = {p + "weight": w.to_wrap.weight, p + "bias": w.to_wrap.bias,
               p + "adapter.linear_in.weight": w.adapter.linear_in.weight,
               p + "adapter.linear_out.weight": w.adapter.linear_out.weight}
    objects = {p + "_extra_state", p + "adapter.linear_in._extra_state",
               p + "adapter.linear_out._extra_state"}
    assert set(sharded) == set(tensors) | objects
    for key, t in tensors.items():
        st = sharded[key]
        assert isinstance(st, ShardedTensor) and st.key == key
        assert st.data is t and st.global_shape == tuple(t.shape)
    for key in objects:
        assert isinstance(sharded[key], ShardedObject) and sharded[key].key == key


def test_dist_checkpointing_round_trip_of_a_lora_model(tmp_path):
    from megatron.core import dist_checkpointing

    model = nn.Module()
    model.col = build_base("column", False, seed=1)
    model.row = build_base("row", True, seed=2)
    LoRA(target_modules=["col", "row"], dim=R, lora_B_init_method="normal",
         kernel_backend="eager")(model)
    sharded = {}
    for name in ("col", "row"):
        sharded.update(getattr(model, name).sharded_state_dict(
            prefix=f"{name}.", metadata=ensure_metadata_has_dp_cp_group(None)))
    saved = {k: v.data.clone() for k, v in sharded.items() if isinstance(v, ShardedTensor)}
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(sharded, str(tmp_path / "ckpt"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for key, st in sharded.items():
        if isinstance(st, ShardedTensor):
            assert not torch.equal(st.data, saved[key]), key
    loaded = dist_checkpointing.load(sharded, str(tmp_path / "ckpt"))
    assert {k for k, v in loaded.items() if isinstance(v, torch.Tensor)} == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def test_parallel_linear_adapter_with_megatron_config_dtype():
    cfg = make_config(params_dtype=torch.float64)
    adapter = ParallelLinearAdapter(K, N, R, activation="identity", model_parallel_config=cfg,
                                    row_init_method="normal")
    assert isinstance(adapter.linear_in, ColumnParallelLinear)
    assert adapter.linear_in.weight.dtype == torch.float64
    assert adapter.linear_out.weight.dtype == torch.float64
    adapter32 = ParallelLinearAdapter(K, N, R, activation="identity", model_parallel_config=cfg,
                                      params_dtype=torch.float32)
    assert adapter32.linear_in.weight.dtype == torch.float32


@pytest.mark.parametrize("name", ["xavier", "normal", "kaiming", "zero"])
@pytest.mark.parametrize("input_is_parallel", [False, True])
def test_megatron_adapter_init_methods(name, input_is_parallel):
    torch.manual_seed(0)
    adapter = ParallelLinearAdapter(64, 48, 32, activation="identity", column_init_method=name,
                                    row_init_method=name, input_is_parallel=input_is_parallel,
                                    model_parallel_config=make_config())
    for w in (adapter.linear_in.weight, adapter.linear_out.weight):  # [32, 64], [48, 32]
        fan_out, fan_in = w.shape
        if name == "zero":
            assert torch.count_nonzero(w) == 0
        elif name == "normal":
            assert abs(w.std().item() / 0.2 - 1) < 0.1
        elif name == "xavier":
            assert abs(w.std().item() / (2.0 / (fan_in + fan_out)) ** 0.5 - 1) < 0.1
        else:
            bound = fan_in ** -0.5
            assert 0.9 * bound < w.abs().max().item() <= bound
