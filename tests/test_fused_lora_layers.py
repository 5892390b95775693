"""LoRALinear through the fused kernels (Triton, interpreted here) equals its eager module path,
for every base the fused path takes: megatron Column/RowParallelLinear, nn.Linear, bridge's
LayerNormColumnParallelLinear and the transformer-engine stand-ins (tests/te_standins.py:
TELayerNormColumnParallelLinear, TEColumnParallelLinear, TERowParallelLinear, a duplicated
TELinear, TE's own Linear), in all the return patterns they produce (TE's empty bias, its
te_return_bias, a bare tensor); values and the gradients of x, A, B and the norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import requires_kernel_device

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

pytestmark = [requires_kernel_device(), pytest.mark.usefixtures("megatron_tp1")]
K, N, R = 40, 24, 5
TOL = dict(rtol=2e-5, atol=2e-5)


def build(kind: str, skip_bias_add: bool, normalization: str = "LayerNorm", zcg: bool = False):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from bridge.layers import LayerNormColumnParallelLinear
    from tests.megatron_utils import make_config

    torch.manual_seed(0)
    cfg = make_config(hidden_size=K, normalization=normalization,
                      layernorm_zero_centered_gamma=zcg)
    init = lambda w: nn.init.normal_(w, std=0.2)  # noqa: E731
    common = dict(config=cfg, init_method=init, bias=True, skip_bias_add=skip_bias_add)
    if kind == "column":
        return ColumnParallelLinear(K, N, gather_output=False, **common)
    if kind == "row":
        return RowParallelLinear(K, N, input_is_parallel=True, **common)
    if kind == "linear":
        return nn.Linear(K, N)
    if kind == "lncol":
        base = LayerNormColumnParallelLinear(K, N, gather_output=False, **common)
        with torch.no_grad():
            base.layer_norm_weight.normal_(0 if zcg else 1, 0.3)
            if base.layer_norm_bias is not None:
                base.layer_norm_bias.normal_(0, 0.3)
        return base
    return _te_base(kind, cfg, common, zcg)


def _te_base(kind: str, cfg, common: dict, zcg: bool):
    """A transformer-engine stand-in with random norm weights and bias (TE initialises them to
    ones and zeros, which would hide mistakes)."""
    from tests import te_standins as te

    te_common = dict(common, is_expert=False)
    if kind == "te":
        base = te.TELayerNormColumnParallelLinear(K, N, gather_output=False, **te_common)
    elif kind in ("te-column", "te-nobias"):
        base = te.TEColumnParallelLinear(K, N, gather_output=False,
                                         **dict(te_common, bias=kind == "te-column"))
    elif kind == "te-row":
        base = te.TERowParallelLinear(K, N, input_is_parallel=True, **te_common)
    elif kind == "te-dup":
        base = te.TELinear(K, N, parallel_mode="duplicated", skip_weight_param_allocation=False,
                           **common)
    else:  # TE's own Linear (no megatron wrapper): a bare tensor unless return_bias
        base = te.Linear(K, N, return_bias=common["skip_bias_add"], params_dtype=torch.float32,
                         init_method=common["init_method"])
    with torch.no_grad():
        if base.bias.numel():
            base.bias.normal_()
        if kind == "te":
            base.layer_norm_weight.normal_(0 if zcg else 1, 0.3)
            if base.layer_norm_bias is not None:
                base.layer_norm_bias.normal_(0, 0.3)
    return base


def run(kind, backend, skip_bias_add, **kw):
    from bridge.peft import AdapterWrapper, LoRALinear, ParallelLinearAdapter
    from bridge.peft.lora import LoRA

    base = build(kind, skip_bias_add, **kw)
    model = nn.Module()
    if kind in ("linear", "te-dup", "te-raw"):
        # nn.Linear: LoRA would make a LinearAdapter. Wrapped as Megatron-Bridge users can, with
        # plain factors, to test LoRALinear's fused path over them (LoRA() over the TE bases is
        # tests/test_expert_lora_te.py's).
        torch.manual_seed(1)
        adapter = ParallelLinearAdapter(K, N, R, activation="identity", alpha=10,
                                        row_init_method="normal",
                                        model_parallel_config=getattr(base, "config", None),
                                        base_linear_is_parallel=False)
        model.proj = LoRALinear(base, adapter, kernel_backend=backend)
        base.requires_grad_(False)
    else:
        model.proj = base
        torch.manual_seed(1)
        LoRA(target_modules=["proj"], dim=R, alpha=10, lora_B_init_method="normal",
             kernel_backend=backend)(model)
    wrapper = model.proj
    assert isinstance(wrapper, AdapterWrapper)
    norm = [p for n, p in base.named_parameters() if n.startswith("layer_norm")]
    for p in norm:  # trainable here, to check the fused norm backward too
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, K, generator=g).requires_grad_(True)
    out = wrapper(x)
    y, bias = (out, None) if isinstance(out, torch.Tensor) else out
    (y * torch.randn(y.shape, generator=g)).sum().backward()
    a, b = wrapper.adapter.linear_in.weight, wrapper.adapter.linear_out.weight
    return {"y": y, "bias": bias, "bare": isinstance(out, torch.Tensor), "dx": x.grad,
            "wrapper": wrapper,
            "dA": a.grad, "dB": b.grad, **{f"d_norm{i}": p.grad for i, p in enumerate(norm)}}


CASES = [("column", False, {}), ("column", True, {}), ("row", False, {}), ("row", True, {}),
         ("linear", False, {}),
         ("lncol", False, {}), ("lncol", True, {}), ("lncol", False, {"normalization": "RMSNorm"}),
         ("lncol", True, {"zcg": True}),
         ("te", False, {}), ("te", True, {"normalization": "RMSNorm"}), ("te", True, {"zcg": True}),
         ("te-column", False, {}), ("te-column", True, {}), ("te-nobias", True, {}),
         ("te-row", False, {}), ("te-row", True, {}), ("te-dup", False, {}), ("te-dup", True, {}),
         ("te-raw", False, {}), ("te-raw", True, {})]


@pytest.mark.parametrize("kind, skip_bias_add, kw", CASES,
                         ids=[f"{k}-{'skip' if s else 'bias'}-{'-'.join(map(str, kw.values()))}"
                              for k, s, kw in CASES])
def test_fused_equals_eager(kind, skip_bias_add, kw):
    eager = run(kind, "eager", skip_bias_add, **kw)
    fused = run(kind, "triton", skip_bias_add, **kw)
    wrapper = fused.pop("wrapper")
    eager.pop("wrapper")
    assert fused.keys() == eager.keys()
    assert fused["bare"] == eager["bare"] == (kind == "linear" or kind == "te-raw"
                                              and not skip_bias_add)
    for key, ref in eager.items():
        if isinstance(ref, torch.Tensor):
            torch.testing.assert_close(fused[key].detach(), ref.detach(), **TOL, msg=key)
        else:
            assert fused[key] == ref, key
    # the bias comes back separately exactly when skip_bias_add asks for it (and there is one:
    # megatron's TE wrappers return None for bias=False, whatever skip_bias_add says)
    assert (eager["bias"] is not None) == (skip_bias_add and kind not in ("linear", "te-nobias"))
    if kind.startswith("te"):
        from bridge.peft.fused_forward import fused_plan

        assert fused_plan(wrapper).backend == "triton"


def test_te_stand_ins_take_the_fused_path_by_their_parallel_mode():
    from bridge.peft.fused_forward import base_kind

    expect = {"te": "norm", "te-column": "column", "te-nobias": "column", "te-row": "row",
              "te-dup": "duplicated", "te-raw": "duplicated"}
    for kind, layout in expect.items():
        assert base_kind(build(kind, False)) == (layout, ""), kind


def test_input_in_another_dtype_takes_the_eager_path_and_says_why(caplog):
    """An fp64 input to an fp32 base (as under autocast) must not reach the one-dtype fused op:
    auto hands the call to the eager path (and logs why), an explicit 'triton' raises."""
    from bridge.kernels.backend import BackendUnavailableError

    from bridge.peft.fused_forward import fused_lora_forward
    from bridge.peft.lora import LoRA

    model = nn.Module()
    model.proj = build("row", False)  # a fresh op name in the log: row bases log as lora_linear
    LoRA(target_modules=["proj"], dim=R, kernel_backend="triton")(model)
    x = torch.randn(3, 2, K, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="input is torch.float64"):
        model.proj(x)
    model.proj.kernel_backend = "auto"
    with caplog.at_level("WARNING", logger="bridge.kernels"):
        assert fused_lora_forward(model.proj, x, (), {}) is None
    assert fused_lora_forward(model.proj, x.float(), (), {}) is not None


@pytest.mark.parametrize("kind", ["column", "lncol", "linear_adapter", "te-row", "te"])
def test_torch_compile_fullgraph_of_the_wrapped_layer(kind):
    """torch.compile(fullgraph=True) traces LoRALinear's / LinearAdapter's fused forward and
    backward (backend choice, TP plumbing, TE's fp8 probe and the registered ops) without a graph
    break, over megatron, torch and transformer-engine (stand-in) bases alike, and
    gives the eager module's values and gradients."""
    from bridge.peft import LinearAdapter, LoRALinear
    from bridge.peft.lora import LoRA

    def make(backend):
        torch.manual_seed(1)
        if kind == "linear_adapter":  # Megatron-Bridge's LoRALinear(linear, LinearAdapter)
            base = nn.Linear(K, N).requires_grad_(False)
            return LoRALinear(base, LinearAdapter(base, dim=R, alpha=10,
                                                  lora_B_init_method="normal"),
                              kernel_backend=backend)
        model = nn.Module()
        model.proj = build(kind, False)
        LoRA(target_modules=["proj"], dim=R, alpha=10, lora_B_init_method="normal",
             kernel_backend=backend)(model)
        return model.proj

    def loss_of(layer):
        def f(x):
            out = layer(x)
            y = out if isinstance(out, torch.Tensor) else out[0]
            return (y * y).sum()
        return f

    results = {}
    for backend, compiled in (("eager", False), ("triton", True)):
        layer = make(backend)
        fn = torch.compile(loss_of(layer), fullgraph=True) if compiled else loss_of(layer)
        x = torch.randn(3, 2, K, generator=torch.Generator().manual_seed(3), requires_grad=True)
        fn(x).backward()
        grads = [p.grad for p in layer.parameters() if p.requires_grad]
        results[backend] = (x.grad, grads)
    torch.testing.assert_close(results["triton"][0], results["eager"][0], **TOL)
    for got, want in zip(results["triton"][1], results["eager"][1], strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("kind, skip_bias_add, kw", [("column", True, {}), ("row", False, {}),
                                                     ("linear", False, {}),
                                                     ("lncol", False, {"normalization": "RMSNorm"}),
                                                     ("te", True, {}), ("te-row", True, {})])
def test_cublas_strategy_equals_eager(kind, skip_bias_add, kw, monkeypatch):
    """The wrapper's requested GEMM strategy (``kernel_gemm``, read by the fused path) reaches
    the op: with 'cublas' every base gives the eager module's values and gradients."""
    import importlib

    gs = importlib.import_module("bridge.kernels.gemm_strategy")
    calls = []
    real = gs.launch_expand
    monkeypatch.setattr(gs, "launch_expand", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv(gs.ENV_GEMM, raising=False)
    eager = run(kind, "eager", skip_bias_add, **kw)
    from bridge.peft.fused_forward import fused_lora_forward as real_forward

    def with_cublas(wrapper, *args):
        wrapper.kernel_gemm = "cublas"
        return real_forward(wrapper, *args)

    monkeypatch.setattr("bridge.peft.fused_forward.fused_lora_forward", with_cublas)
    fused = run(kind, "triton", skip_bias_add, **kw)
    assert len(calls) == 2  # P in the forward, Q in the backward
    for key, ref in eager.items():
        if isinstance(ref, torch.Tensor):
            torch.testing.assert_close(fused[key].detach(), ref.detach(), **TOL, msg=key)


def test_fused_path_decision_is_made_once_per_key(monkeypatch):
    """The fused-path decision (constraints, base kind, backend, argument checks) is taken on
    the first call of a key and kept on the wrapper; a change of training mode, requested
    strategy or environment makes a new one."""
    from bridge.peft import fused_forward
    from bridge.peft.lora import LoRA

    built = []
    real = fused_forward.fused_constraints
    monkeypatch.setattr(fused_forward, "fused_constraints",
                        lambda *a: built.append(1) or real(*a))
    model = nn.Module()
    model.proj = build("column", False)
    LoRA(target_modules=["proj"], dim=R, kernel_backend="triton")(model)
    wrapper = model.proj
    x = torch.randn(3, 2, K)
    with torch.no_grad():
        wrapper(x)
        wrapper(x)
        wrapper(torch.randn(5, K))  # another M: the same decision
        assert len(built) == 1
        plan = fused_forward.fused_plan(wrapper)
        assert (plan.kind, plan.backend, plan.gemm, plan.tp) == ("column", "triton", "auto", 1)
        wrapper.eval()
        wrapper(x)
        wrapper.kernel_gemm = "cublas"
        wrapper(x)
        assert fused_forward.fused_plan(wrapper).gemm == "cublas"
        wrapper.kernel_backend = "auto"  # then the environment decides
        wrapper(x)
        monkeypatch.setenv("BRIDGE_KERNEL_BACKEND", "eager")
        assert fused_forward.fused_lora_forward(wrapper, x, (), {}) is None
        assert len(built) == 5
        assert "requested by BRIDGE_KERNEL_BACKEND" in fused_forward.fused_plan(wrapper).reason
        with pytest.raises(ValueError, match="in_features disagree"):
            monkeypatch.delenv("BRIDGE_KERNEL_BACKEND")
            wrapper(torch.randn(3, K + 1))  # a new key, checked before any kernel runs
