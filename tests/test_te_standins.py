"""The transformer-engine stand-ins (tests/te_standins.py) behave as the real layers do.

At TP=1 (here; TP=2 with and without sequence parallelism in test_te_standins_tp2.py):
each stand-in built from a seed has megatron-core's own weights for that seed, and its outputs,
returned bias and gradients equal megatron-core's local ColumnParallelLinear / RowParallelLinear
(or a norm followed by ColumnParallelLinear, or a plain fp64 computation); its returned tuples
have the megatron TE wrappers' structure; the flags the fused path will inspect (fp8, Float8Tensor
weights, userbuffers, delay_wgrad_compute, SP, TP size and group) take TE's values; and a GPT
built from a TE-shaped layer spec equals the local-spec GPT with the same weights, with and
without LoRA on all four targets.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.numerics import rel_err

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

SEED = 1234
K, N, S, B = 16, 24, 6, 2  # in, out features; sequence, batch
TOL = dict(rtol=1e-6, atol=1e-6)
pytestmark = pytest.mark.usefixtures("megatron_tp1")


def _cfg(**kw):
    from tests.megatron_utils import make_config

    return make_config(hidden_size=K, **kw)


def _init(w):
    return nn.init.normal_(w, std=0.3)


def build(kind: str, cfg, *, bias=True, skip_bias_add=False, seed=SEED, local=False, **kw):
    """A stand-in (``local=False``) or megatron's local layer of the same kind, from ``seed``."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from tests import te_standins as te

    torch.manual_seed(seed)
    common = dict(config=cfg, init_method=_init, bias=bias, skip_bias_add=skip_bias_add)
    if kind in ("column", "lncol"):
        if local:
            return ColumnParallelLinear(K, N, gather_output=False, **common)
        cls = te.TEColumnParallelLinear if kind == "column" else te.TELayerNormColumnParallelLinear
        return cls(K, N, gather_output=False, is_expert=False, **common, **kw)
    if kind == "row":
        if local:
            return RowParallelLinear(N, K, input_is_parallel=True, **common)
        return te.TERowParallelLinear(N, K, input_is_parallel=True, is_expert=False, **common, **kw)
    raise ValueError(kind)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_recognised_as_transformer_engine():
    from bridge.peft.fused_forward import base_kind
    from bridge.peft.utils import get_adapter_attributes_from_linear, is_te_module, te_parallel_mode
    from tests import te_standins as te

    cfg = _cfg()
    dup = te.TELinear(K, N, parallel_mode="duplicated", config=cfg, init_method=_init, bias=True,
                      skip_bias_add=False, skip_weight_param_allocation=False)
    cases = [(build("column", cfg), "column", "transformer_engine.pytorch.module.linear"),
             (build("row", cfg), "row", "transformer_engine.pytorch.module.linear"),
             (build("lncol", cfg), "column", "transformer_engine.pytorch.module.layernorm_linear"),
             (dup, "duplicated", "transformer_engine.pytorch.module.linear")]
    for mode in ("column", "row"):  # TELinear itself, as MLA's projections use it
        m = te.TELinear(K, N, parallel_mode=mode, config=cfg, init_method=_init, bias=False,
                        skip_bias_add=False, skip_weight_param_allocation=False)
        cases.append((m, mode, "transformer_engine.pytorch.module.linear"))
    for m, mode, te_module in cases:
        assert type(m).__module__ == "megatron.core.extensions.transformer_engine"
        assert te_module in {c.__module__ for c in type(m).__mro__}
        assert is_te_module(m) and te_parallel_mode(m) == mode, type(m).__name__
    assert dup.parallel_mode is None and dup.tp_group is None and dup.tp_size == 1
    assert base_kind(cases[2][0]) == ("norm", "")
    attrs = get_adapter_attributes_from_linear(cases[0][0], probe=True)
    assert (attrs.in_features, attrs.out_features) == (K, N)  # full: TE keeps per-rank sizes
    attrs = get_adapter_attributes_from_linear(cases[1][0], probe=True)
    assert attrs.input_is_parallel and (attrs.in_features, attrs.out_features) == (N, K)


@pytest.mark.parametrize("make, error, message", [
    (lambda te, c: te.TEColumnParallelLinear(K, N, config=c, init_method=_init, gather_output=True,
                                             bias=True, skip_bias_add=False, is_expert=False),
     ValueError, "do not support gather_output = True"),
    (lambda te, c: te.TERowParallelLinear(K, N, config=c, init_method=_init, bias=True,
                                          input_is_parallel=False, skip_bias_add=False,
                                          is_expert=False),
     ValueError, "do not support input_is_parallel = False"),
    (lambda te, c: te.TEColumnParallelLinear(K, N, config=c, init_method=_init,
                                             gather_output=False, bias=True, skip_bias_add=False,
                                             is_expert=False, skip_weight_param_allocation=True),
     ValueError, "do not support skip_weight_param_allocation"),
    (lambda te, c: te.TELayerNormColumnParallelLinear(K, N, config=c, init_method=_init,
                                                      gather_output=False, bias=True,
                                                      skip_bias_add=False, is_expert=True),
     ValueError, "do not yet support MoE"),
    (lambda te, c: te.TELinear(K, N, parallel_mode="duplicated", config=c, init_method=_init,
                               bias=True, skip_bias_add=False, skip_weight_param_allocation=False,
                               tp_group=object()),
     AssertionError, "duplicated linear should not have tp_group set"),
    (lambda te, c: te.Linear(K, N, parallel_mode="sideways"), AssertionError,
     "parallel_mode sideways not supported"),
    (lambda te, c: te.LayerNormLinear(K, N, parallel_mode="row"), NotImplementedError,
     "Normalization does not support tensor-parallel distribution"),
])
def test_constructor_contract(make, error, message):
    from tests import te_standins as te

    with pytest.raises(error, match=message):
        make(te, _cfg())


def test_parameter_names_empty_bias_extra_state_and_attributes():
    from tests import te_standins as te

    cfg = _cfg()
    col = build("column", cfg, bias=False)
    assert [n for n, _ in col.named_parameters()] == ["weight"]
    assert isinstance(col.bias, torch.Tensor) and col.bias.numel() == 0  # TE's empty bias
    assert list(col.state_dict()) == ["weight", "_extra_state"]
    extra = col.state_dict()["_extra_state"]
    assert extra.dtype == torch.uint8 and extra.numel() == 0
    assert (col.weight.tensor_model_parallel, col.weight.partition_dim, col.weight.allreduce) == \
        (True, 0, True)
    row = build("row", cfg)
    assert row.weight.partition_dim == 1 and row.bias.sequence_parallel is False
    ln = build("lncol", cfg)
    assert [n for n, _ in ln.named_parameters()] == ["layer_norm_weight", "layer_norm_bias",
                                                     "weight", "bias"]
    assert torch.equal(ln.layer_norm_weight, torch.ones(K))
    assert build("lncol", _cfg(normalization="RMSNorm")).layer_norm_bias is None
    zcg = build("lncol", _cfg(layernorm_zero_centered_gamma=True))
    assert torch.equal(zcg.layer_norm_weight, torch.zeros(K))
    grouped = te.TEColumnParallelGroupedLinear(3, K, N, config=cfg, init_method=_init, bias=True,
                                               skip_bias_add=False, is_expert=True)
    assert [n for n, _ in grouped.named_parameters()] == ["weight0", "bias0", "weight1",
                                                          "bias1", "weight2", "bias2"]
    dup = te.TELinear(K, N, parallel_mode="duplicated", config=cfg, init_method=_init,
                      bias=False, skip_bias_add=True, skip_weight_param_allocation=False)
    assert dup.te_return_bias is False and dup.weight.sequence_parallel is False
    assert repr(col) == f"TEColumnParallelLinear(in_features={K}, out_features={N}, bias=False, TP=1)"
    # TE itself with return_bias but no bias: Linear returns None, LayerNormLinear its empty bias
    x = torch.randn(S, B, K)
    assert te.Linear(K, N, bias=False, return_bias=True)(x)[1] is None
    assert te.LayerNormLinear(K, N, bias=False, return_bias=True)(x)[1].numel() == 0


def test_sharded_state_dict_as_megatron_shards_it():
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from tests import te_standins as te

    cfg = _cfg()
    for kind, keys in (("column", {"weight", "bias"}), ("row", {"weight", "bias"}),
                       ("lncol", {"weight", "bias", "layer_norm_weight", "layer_norm_bias"})):
        sd = build(kind, cfg).sharded_state_dict(prefix="m.")
        assert set(sd) == {f"m.{k}" for k in keys | {"_extra_state"}}, kind
        assert isinstance(sd["m._extra_state"], ShardedObject)
        assert all(isinstance(sd[f"m.{k}"], ShardedTensor) for k in keys)
    dup = te.TELinear(K, N, parallel_mode="duplicated", config=cfg, init_method=_init,
                      bias=False, skip_bias_add=False, skip_weight_param_allocation=False)
    assert set(dup.sharded_state_dict(prefix="d.", metadata={"dp_cp_group": None})) == {
        "d.weight", "d._extra_state"}


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("bias, skip_bias_add", [(True, False), (True, True), (False, True)])
def test_equals_megatron_local_layer(kind, bias, skip_bias_add):
    """Same seed, same weights (bitwise); same outputs, returned bias and dX."""
    cfg = _cfg()
    te_layer = build(kind, cfg, bias=bias, skip_bias_add=skip_bias_add)
    local = build(kind, cfg, bias=bias, skip_bias_add=skip_bias_add, local=True)
    assert torch.equal(te_layer.weight, local.weight)
    k_in = K if kind == "column" else N
    x = _rand(S, B, k_in, seed=1)
    results = []
    for layer in (te_layer, local):
        if bias:
            with torch.no_grad():
                layer.bias.copy_(_rand(layer.bias.shape[0], seed=2))
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        assert isinstance(out, tuple) and len(out) == 2
        y, b = out
        (y * _rand(*y.shape, seed=3)).sum().backward()
        results.append((y, b, xi.grad))
    (y, b, dx), (y_ref, b_ref, dx_ref) = results
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    assert (b is None) == (b_ref is None) == (not (bias and skip_bias_add))
    if b is not None:
        assert torch.equal(b, b_ref)


def _ln_ref(x, w, b, normalization, zcg, eps=1e-5):
    gamma = w + 1 if zcg else w
    if normalization == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma
    mu = x.mean(-1, keepdim=True)
    return (x - mu) * torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps) * gamma + b


@pytest.mark.parametrize("normalization, zcg", [("LayerNorm", False), ("RMSNorm", False),
                                                ("LayerNorm", True)])
@pytest.mark.parametrize("skip_bias_add", [False, True])
@pytest.mark.parametrize("return_ln", [False, True])
def test_layernorm_linear_equals_fp64(normalization, zcg, skip_bias_add, return_ln):
    """All four return patterns; the returned layernorm output's gradient reaches dX."""
    m = build("lncol", _cfg(normalization=normalization, layernorm_zero_centered_gamma=zcg),
              skip_bias_add=skip_bias_add)
    m.return_layernorm_output = return_ln
    params = {"w": m.layer_norm_weight, "W": m.weight, "b": m.bias}
    if m.layer_norm_bias is not None:
        params["lb"] = m.layer_norm_bias
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(_rand(*p.shape, seed=len(name)) * 0.3 + (1.0 if name == "w" and not zcg else 0))
    x = _rand(S, B, K, seed=5).requires_grad_(True)
    out = m(x)
    if skip_bias_add:
        y, bias, ln = out if return_ln else (*out, None)
        assert bias is m.bias or torch.equal(bias, m.bias)
    else:
        (y, ln), bias = out if return_ln else ((out[0], None), out[1])
        assert bias is None
    gy, gl = _rand(S, B, N, seed=6), _rand(S, B, K, seed=7)
    loss = (y * gy).sum() + ((ln * gl).sum() if return_ln else 0)
    leaves = [x, *params.values()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)

    ref = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    x64 = x.detach().double().requires_grad_(True)
    ln64 = _ln_ref(x64, ref["w"], ref.get("lb"), normalization, zcg)
    y64 = ln64 @ ref["W"].t() + (0 if skip_bias_add else ref["b"])
    loss64 = (y64 * gy.double()).sum() + ((ln64 * gl.double()).sum() if return_ln else 0)
    grads64 = torch.autograd.grad(loss64, [x64, *ref.values()], allow_unused=True)
    assert rel_err(y, y64) < 1e-6
    if return_ln:
        assert rel_err(ln, ln64) < 1e-6
    for name, g, g64 in zip(["x", *params], grads, grads64, strict=True):
        if name == "b" and skip_bias_add:  # returned, not added: the caller adds it
            assert g is None or not g.any()
            continue
        assert rel_err(g, g64) < 1e-6, name


@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_grouped_linear_equals_fp64_per_expert(skip_bias_add):
    from tests import te_standins as te

    m = te.TEColumnParallelGroupedLinear(3, K, N, config=_cfg(), init_method=_init, bias=True,
                                         skip_bias_add=skip_bias_add, is_expert=True)
    assert (m.parallel_mode, m.tp_size, m.explicit_expert_comm) == ("column", 1, False)
    with torch.no_grad():
        for i in range(3):
            getattr(m, f"bias{i}").copy_(_rand(N, seed=10 + i))
    splits = [5, 0, 2]  # uneven, one expert without tokens
    x = _rand(7, K, seed=4).requires_grad_(True)
    y, biases = m(x, splits)
    assert (biases is None) != skip_bias_add
    gy = _rand(7, N, seed=8)
    (y * gy).sum().backward()
    x64, parts = x.detach().double(), []
    for i, rows in enumerate(torch.split(torch.arange(7), splits)):
        w, b = getattr(m, f"weight{i}").double(), getattr(m, f"bias{i}").double()
        parts.append(x64[rows] @ w.t() + (0 if skip_bias_add else b))
        if skip_bias_add:
            assert torch.equal(biases[i], getattr(m, f"bias{i}"))
    y64 = torch.cat(parts)
    dx64 = torch.cat([gy.double()[rows] @ getattr(m, f"weight{i}").double()
                      for i, rows in enumerate(torch.split(torch.arange(7), splits))])
    assert rel_err(y, y64) < 1e-6 and rel_err(x.grad, dx64) < 1e-6
    with pytest.raises(AssertionError, match="Number of splits should match number of GEMMs"):
        m(x, [7])


def _qdq64(t: torch.Tensor) -> torch.Tensor:
    """e4m3 with one scale per tensor: 448 / amax (TE's current scaling), in fp64 around it."""
    scale = 448.0 / t.detach().abs().max().double()
    return (t.detach().double() * scale).to(torch.float8_e4m3fn).double() / scale


def test_fp8_autocast_quantises_the_gemm_operands_and_sets_the_flags():
    from tests import te_standins as te

    m = build("column", _cfg(), bias=False)
    x = _rand(S, B, K, seed=1)
    y0, _ = m(x)
    assert m.fp8 is False and m.state_dict()["_extra_state"].numel() == 0
    with te.fp8_autocast(fp8_recipe=te.Float8CurrentScaling()):
        y8, _ = m(x)
        assert m.fp8 is True and m.fp8_meta["recipe"].float8_current_scaling()
        assert m.state_dict()["_extra_state"].numel() > 0
    expect = _qdq64(x) @ _qdq64(m.weight).t()
    assert rel_err(y8, expect) < 1e-6
    assert 1e-3 < rel_err(y8, y0) < 0.1  # fp8-sized error: the base really ran in fp8
    y_after, _ = m(x)
    assert m.fp8 is False and torch.equal(y_after, y0)


def test_fp8_model_init_gives_float8_tensor_weights():
    from tests import te_standins as te

    cfg = _cfg()
    master = build("row", cfg, bias=False).weight.detach().clone()
    with te.fp8_model_init():
        m = build("row", cfg, bias=False)
    w = m.weight
    names = {c.__name__ for c in type(w).__mro__}
    assert {"Float8Tensor", "QuantizedTensor"} <= names and isinstance(w, nn.Parameter)
    assert type(w).__module__ == "transformer_engine.pytorch.tensor.float8_tensor"
    assert w.dtype == torch.float32 and w._data.dtype == torch.uint8 and w._data.shape == w.shape
    assert (w.partition_dim, w.allreduce) == (1, True)  # megatron's attributes survive
    assert torch.equal(w.dequantize(), w.detach().as_subclass(torch.Tensor))
    assert 0 < rel_err(w, master) < 0.07  # e4m3 of the same CPU-initialised master weight
    x = _rand(S, B, N, seed=1)
    y, _ = m(x)
    assert type(y) is torch.Tensor and rel_err(y, x.double() @ w.dequantize().double().t()) < 1e-6
    assert not isinstance(build("row", cfg).weight, te.QuantizedTensor)


def test_delay_wgrad_compute_holds_weight_grads_until_backward_dw():
    cfg = _cfg()
    cfg.delay_wgrad_compute = True  # megatron's config only allows it with MoE overlap; set after
    m = build("column", cfg)
    assert m.need_backward_dw() and m.weight.skip_backward_post_hook
    x = _rand(S, B, K, seed=1).requires_grad_(True)
    y, _ = m(x)
    gy = _rand(*y.shape, seed=2)
    (y * gy).sum().backward()
    assert m.weight.grad is None and m.bias.grad is not None
    assert rel_err(x.grad, gy.double() @ m.weight.double()) < 1e-6
    m.backward_dw()
    dw = gy.double().reshape(-1, N).t() @ x.detach().double().reshape(-1, K)
    assert rel_err(m.weight.grad, dw) < 1e-6


def test_dtype_mismatch_is_refused_as_te_refuses_it():
    m = build("lncol", _cfg())
    with pytest.raises(TypeError, match="Data types for parameters must match .* 'layer_norm_weight'"):
        m(torch.randn(S, B, K, dtype=torch.bfloat16))


def test_userbuffer_flags_follow_te_and_unsupported_buffers_turn_overlap_off():
    cfg = _cfg(tp_comm_overlap=True)
    m = build("lncol", cfg, tp_comm_buffer_name="qkv")
    # TE sets the overlap flags only with SP, which needs TP > 1 (the TP=2 test checks them on)
    assert m.ub_name == "qkv" and not (m.ub_overlap_ag_fprop or m.ub_bulk_wgrad)
    with pytest.warns(UserWarning, match="Disabling TP communication overlap"):
        build("row", cfg, tp_comm_buffer_name="router")
    assert cfg.tp_comm_overlap is False  # megatron switches it off on the shared config


@pytest.mark.parametrize("drop", [True, False])
def test_gathered_layernorm_output_grad_is_dropped_as_te_drops_it(drop):
    """TE's backward adds the returned layernorm output's gradient only when it was returned
    ungathered; with ``return_layernorm_output_gathered`` it is lost (even at TP=1)."""
    m = build("lncol", _cfg(), bias=False)
    m.return_layernorm_output, m.return_layernorm_output_gathered = True, True
    m.drop_gathered_ln_out_grad = drop
    x = _rand(S, B, K, seed=1).requires_grad_(True)
    (y, ln), _ = m(x)
    gy, gl = _rand(S, B, N, seed=2), _rand(S, B, K, seed=3)
    dx_full, = torch.autograd.grad((y * gy).sum() + (ln * gl).sum(), x, retain_graph=True)
    dx_y, = torch.autograd.grad((y * gy).sum(), x)
    if drop:
        torch.testing.assert_close(dx_full, dx_y, **TOL)
    else:
        assert rel_err(dx_full, dx_y) > 1e-2


TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _local_gpt_and_te_gpt(te_spec_fn, lora_backend):
    """megatron's tiny local-spec GPT and the same GPT from ``te_spec_fn()``, LoRA on both when
    ``lora_backend`` is set, every TE-spec parameter copied from its local-spec counterpart.
    Returns (local, te_gpt, {local name: TE-spec name})."""
    from megatron.core.models.gpt import GPTModel

    from bridge.peft import LoRA
    from tests.megatron_utils import tiny_gpt_model

    local = tiny_gpt_model(seed=0, hidden_dropout=0.0, attention_dropout=0.0)
    te_gpt = GPTModel(config=local.config, transformer_layer_spec=te_spec_fn(), vocab_size=128,
                      max_sequence_length=32, position_embedding_type="rope")
    if lora_backend:
        for model in (local, te_gpt):
            LoRA(target_modules=TARGETS, dim=4, alpha=8, lora_B_init_method="normal",
                 kernel_backend=lora_backend)(model)
    # the local spec's separate norms are the TE spec's fused ones
    fused = {"input_layernorm.weight": "self_attention.linear_qkv.",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1."}
    te_params = dict(te_gpt.named_parameters())
    mapping = {}
    for name, p in local.named_parameters():
        head, _, tail = name.partition("layers.")
        idx, _, rest = tail.partition(".")
        te_name = name
        if rest in fused:
            te_name = f"{head}layers.{idx}.{fused[rest]}layer_norm_weight"
            if te_name not in te_params:  # wrapped by LoRA
                te_name = te_name.replace(".layer_norm_weight", ".to_wrap.layer_norm_weight")
        with torch.no_grad():
            te_params[te_name].copy_(p)
        mapping[name] = te_name
    assert sorted(mapping.values()) == sorted(te_params), "every TE-spec parameter is set"
    return local, te_gpt, mapping


@pytest.mark.parametrize("lora_backend", [None, "eager", "auto"])
def test_te_spec_gpt_equals_local_spec_gpt(lora_backend):
    """A GPT from the TE-shaped spec (norms fused into linear_qkv / linear_fc1, TE row linears)
    computes what the local-spec GPT computes, and so does LoRA on all four targets."""
    from bridge.peft import LoRALinear
    from bridge.peft.fused_forward import base_kind
    from tests import te_standins as te
    from tests.conftest import KERNEL_SKIP_WHY
    from tests.megatron_utils import gpt_inputs

    if lora_backend == "auto" and KERNEL_SKIP_WHY:
        pytest.skip(KERNEL_SKIP_WHY)
    local, te_gpt, mapping = _local_gpt_and_te_gpt(te.te_gpt_layer_spec, lora_backend)
    if lora_backend:
        expect = {"linear_qkv": te.TELayerNormColumnParallelLinear,
                  "linear_proj": te.TERowParallelLinear,
                  "linear_fc1": te.TELayerNormColumnParallelLinear,
                  "linear_fc2": te.TERowParallelLinear}
        for layer in te_gpt.decoder.layers:
            for target, cls in expect.items():
                parent = layer.self_attention if target in ("linear_qkv", "linear_proj") \
                    else layer.mlp
                wrapper = getattr(parent, target)
                assert isinstance(wrapper, LoRALinear) and type(wrapper.to_wrap) is cls, target
            assert base_kind(layer.self_attention.linear_qkv.to_wrap)[0] == "norm"
    ids, pos, mask = gpt_inputs(batch=2, seq=8)
    outs = []
    for model in (local, te_gpt):
        logits = model(ids, pos, mask)
        logits.float().pow(2).mean().backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (lg, grads), (lg_te, grads_te) = outs
    torch.testing.assert_close(lg_te, lg, rtol=1e-4, atol=1e-5)
    assert set(grads_te) == {mapping[n] for n in grads}
    for name, g in grads.items():
        assert rel_err(grads_te[mapping[name]], g) < 1e-4, name
    if lora_backend:  # exactly the adapters train: A and B of 4 targets in each of 2 layers
        assert len(grads) == 16 and all(".adapter.linear_" in n for n in grads)
