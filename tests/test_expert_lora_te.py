"""LoRA over transformer-engine bases without TP communication of their own (TP=1): the right
wrapper, exactly the base's return structure, values and gradients against fp64, and TE's fp8 state
asked at every call.

- A duplicated base whose weight is whole (megatron's ``TELinear(parallel_mode="duplicated")``,
  TE's own ``Linear`` with ``parallel_mode=None``, with and without ``return_bias`` / a bias) is a
  ``LoRALinear`` (its 'duplicated' fused case), not an ``ExpertLoRALinear``.
- A shared expert under ``moe_shared_expert_overlap`` (megatron-core 0.16 sets its TE linears'
  ``parallel_mode = None`` after construction, keeping the TP-sharded weight; its own linears get
  ``explicit_expert_comm``) is an ``ExpertLoRALinear``; so are expert linears. ExpertLoRALinear's
  own fused path returns what the base returns (bare tensor, (y, None), (y, bias), a grouped base's
  per-expert biases) and falls back, with the reason, when fp8_autocast is entered after a call.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import requires_kernel_device
from tests.numerics import assert_close_rel, dtype_tol

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

pytestmark = [requires_kernel_device(), pytest.mark.usefixtures("megatron_tp1")]
K, N, R, ALPHA = 24, 16, 4, 8
SPLITS = [3, 0, 4]  # a grouped base's tokens per expert (one expert gets none)
# under fp8_autocast every expert gets tokens: the stand-in's fp8 emulation (a per-tensor amax)
# cannot quantise an empty chunk
FP8_SPLITS = [3, 1, 3]
TOL = dtype_tol(torch.float32)
FP8_WHY = "transformer-engine fp8_autocast is active"


def _init(w):
    nn.init.normal_(w, std=0.3)


def _base(case: str, flag: bool, bias: bool = True) -> nn.Module:
    """The base of ``case``; ``flag`` is skip_bias_add (megatron's wrappers) or return_bias (TE's
    own classes)."""
    from tests import te_standins as te
    from tests.megatron_utils import make_config

    torch.manual_seed(0)
    cfg = make_config(hidden_size=K)
    wrap = dict(config=cfg, init_method=_init, bias=bias, skip_bias_add=flag, is_expert=False)
    raw = dict(return_bias=flag, bias=bias, params_dtype=torch.float32, init_method=_init)
    if case == "dup":
        base = te.TELinear(K, N, parallel_mode="duplicated", skip_weight_param_allocation=False,
                           **wrap)
    elif case == "raw":
        base = te.Linear(K, N, **raw)
    elif case in ("overlap-col", "overlap-row"):
        if case == "overlap-col":
            base = te.TEColumnParallelLinear(K, N, gather_output=False, **wrap)
        else:
            base = te.TERowParallelLinear(K, N, input_is_parallel=True, **wrap)
        # what megatron-core 0.16's SharedExpertMLP does under moe_shared_expert_overlap
        base.parallel_mode = None
        for f in ("ub_overlap_rs_fprop", "ub_overlap_ag_dgrad", "ub_overlap_ag_fprop",
                  "ub_overlap_rs_dgrad"):
            setattr(base, f, False)
    elif case == "grouped":
        base = te.GroupedLinear(len(SPLITS), K, N, **raw)
    else:
        raise ValueError(case)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.startswith("bias") and p.numel():
                p.normal_()
    return base


def _wrap(case: str, base: nn.Module, backend: str) -> nn.Module:
    """LoRA as a user gets it; TE's own classes (no megatron config, so LoRA cannot build a
    megatron adapter for them) wrapped in ExpertLoRALinear directly as an expert would be."""
    from bridge.peft import LoRA, ParallelLinearAdapter
    from bridge.peft.expert_lora_layers import ExpertLoRALinear

    model = nn.Module()
    model.proj = base
    torch.manual_seed(1)
    if case == "grouped" or (case == "raw" and backend.startswith("expert-")):
        adapter = ParallelLinearAdapter(K, N, R, activation="identity", alpha=ALPHA,
                                        row_init_method="normal", base_linear_is_parallel=False)
        base.requires_grad_(False)
        model.proj = ExpertLoRALinear(base, adapter,
                                      kernel_backend=backend.removeprefix("expert-"))
        return model
    LoRA(target_modules=["proj"], dim=R, alpha=ALPHA, lora_B_init_method="normal",
         kernel_backend=backend)(model)
    return model


def _call(module, x, case, splits=SPLITS):
    return module(x, splits) if case == "grouped" else module(x)


def _x(case: str, splits=SPLITS) -> torch.Tensor:
    shape = (sum(splits), K) if case == "grouped" else (5, 2, K)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


def _reference(wrapper, x, base_out, case):
    """fp64: what the wrapper returns (the base's structure) and the gradients of a random
    projection of y with respect to x, A and B."""
    base, adapter = wrapper.to_wrap, wrapper.adapter
    a = adapter.linear_in.weight.detach().double().requires_grad_(True)
    b = adapter.linear_out.weight.detach().double().requires_grad_(True)
    xd = x.detach().double().requires_grad_(True)
    y_base = base_out if isinstance(base_out, torch.Tensor) else base_out[0]
    if case == "grouped":
        parts = torch.split(xd, SPLITS)
        y = torch.cat([p @ getattr(base, f"weight{i}").double().t() for i, p in enumerate(parts)])
        added = base.use_bias and not base.return_bias
        if added:
            y = y + torch.cat([getattr(base, f"bias{i}").double().expand(n, N)
                               for i, n in enumerate(SPLITS)])
    else:
        y = xd @ base.weight.double().t()
        # the bias the base added itself (in its output, not returned beside it)
        if base.bias is not None and base.bias.numel() and (
                isinstance(base_out, torch.Tensor) or base_out[1] is None):
            y = y + base.bias.double()
    assert_close_rel(y_base, y, TOL, "the base itself")  # the reference reads the base right
    y = y + adapter.scale * (xd @ a.t()) @ b.t()
    return y, (xd, a, b)


def _check_like_base(out, base_out):
    """Same structure as the base's return: a bare tensor, or a tuple whose bias element is the
    base's (None, a tensor, or a grouped base's list of per-expert biases), bit for bit."""
    assert isinstance(out, torch.Tensor) == isinstance(base_out, torch.Tensor), (type(out),
                                                                                 type(base_out))
    if isinstance(base_out, torch.Tensor):
        return out
    assert isinstance(out, tuple) and len(out) == len(base_out) == 2
    got, want = out[1], base_out[1]
    if want is None:
        assert got is None
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    else:
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    return out[0]


def _plan(wrapper):
    from bridge.peft.expert_lora_layers import ExpertLoRALinear
    from bridge.peft.fused_forward import fused_plan

    if isinstance(wrapper, ExpertLoRALinear):
        return wrapper.__dict__[ExpertLoRALinear._PLAN]
    return fused_plan(wrapper)


# (case, flag, bias, the wrapper LoRA must build)
CASES = [("dup", False, True, "LoRALinear"), ("dup", True, True, "LoRALinear"),
         ("dup", True, False, "LoRALinear"),
         ("raw", False, True, "LoRALinear"), ("raw", True, True, "LoRALinear"),
         ("raw", True, False, "LoRALinear"), ("raw", False, False, "LoRALinear"),
         ("overlap-col", False, True, "ExpertLoRALinear"),
         ("overlap-col", True, True, "ExpertLoRALinear"),
         ("overlap-row", True, True, "ExpertLoRALinear"),
         ("overlap-row", False, False, "ExpertLoRALinear")]
IDS = [f"{c}-{'flag' if f else 'noflag'}-{'bias' if b else 'nobias'}" for c, f, b, _ in CASES]

# ExpertLoRALinear built directly over TE's own classes (bare and tuple returns)
EXPERT_CASES = [("raw", False, True), ("raw", True, True), ("raw", True, False),
                ("grouped", False, True), ("grouped", True, True), ("grouped", True, False)]
EXPERT_IDS = [f"{c}-{'return_bias' if f else 'bare'}-{'bias' if b else 'nobias'}"
              for c, f, b in EXPERT_CASES]


def _run_and_check(case, flag, bias, backend):
    model = _wrap(case, _base(case, flag, bias), backend)
    wrapper = model.proj
    x = _x(case).requires_grad_(True)
    with torch.no_grad():
        base_out = _call(wrapper.to_wrap, x, case)
    out = _call(wrapper, x, case)
    y = _check_like_base(out, base_out)
    ref, (xd, a, b) = _reference(wrapper, x, base_out, case)
    assert_close_rel(y, ref, TOL, "y")
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * proj).sum().backward()
    (ref * proj.double()).sum().backward()
    adapter = wrapper.adapter
    for got, want, what in ((x.grad, xd.grad, "dx"), (adapter.linear_in.weight.grad, a.grad, "dA"),
                            (adapter.linear_out.weight.grad, b.grad, "dB")):
        assert_close_rel(got, want, TOL, what)
    return wrapper


@pytest.mark.parametrize("case, flag, bias, kind", CASES, ids=IDS)
def test_lora_gives_the_right_wrapper_and_returns_what_the_base_returns(case, flag, bias, kind):
    """Fused (triton under the interpreter) and eager: the wrapper LoRA builds, the base's return
    structure, y and every gradient against fp64."""
    from bridge.peft.expert_lora_layers import ExpertLoRALinear

    for backend in ("triton", "eager"):
        wrapper = _run_and_check(case, flag, bias, backend)
        assert type(wrapper).__name__ == kind
        if kind == "ExpertLoRALinear":  # the sharded factor is gathered (explicit comm)
            assert wrapper.adapter.explicit_comm and wrapper.adapter._megatron
        else:  # whole plain factors, LoRALinear's duplicated fused case
            assert not wrapper.adapter._megatron and not isinstance(wrapper, ExpertLoRALinear)
        plan = _plan(wrapper)
        assert plan.backend == backend, plan.reason
        if backend == "triton" and kind == "LoRALinear":
            assert plan.kind == "duplicated"


@pytest.mark.parametrize("case, flag, bias", EXPERT_CASES, ids=EXPERT_IDS)
def test_expert_wrapper_fused_path_returns_what_the_base_returns(case, flag, bias):
    for backend in ("expert-triton", "expert-eager"):
        wrapper = _run_and_check(case, flag, bias, backend)
        assert _plan(wrapper).backend == backend.removeprefix("expert-"), _plan(wrapper).reason


def test_megatron_shared_expert_with_overlap_gets_the_expert_wrapper():
    """megatron's own linear under moe_shared_expert_overlap (``explicit_expert_comm = True``):
    ExpertLoRALinear with explicit-comm factors; an ordinary ColumnParallelLinear: LoRALinear."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from bridge.peft import LoRA
    from bridge.peft.expert_lora_layers import ExpertLoRALinear
    from tests.megatron_utils import make_config

    cfg = make_config(hidden_size=K)
    model = nn.Module()
    model.shared = ColumnParallelLinear(K, N, config=cfg, init_method=_init, bias=False,
                                        gather_output=False)
    model.shared.explicit_expert_comm = True
    model.dense = ColumnParallelLinear(K, N, config=cfg, init_method=_init, bias=False,
                                       gather_output=False)
    LoRA(target_modules=["shared", "dense"], dim=R, alpha=ALPHA)(model)
    assert type(model.shared) is ExpertLoRALinear and model.shared.adapter.explicit_comm
    assert type(model.dense).__name__ == "LoRALinear"


FP8_CASES = [("dup", True, True), ("raw", False, True), ("overlap-col", True, True),
             ("overlap-row", False, True)]


@pytest.mark.parametrize("case, flag, bias", FP8_CASES + [("expert-raw", False, True),
                                                          ("grouped", True, True)],
                         ids=[f"{c}-{int(f)}" for c, f, _ in FP8_CASES] + ["expert-raw", "grouped"])
def test_fp8_autocast_entered_after_the_first_call_falls_back_with_the_reason(case, flag, bias):
    """The first call is fused; inside fp8_autocast (entered afterwards) the same wrapper takes
    the eager path, says why (plan and kernel_report), returns the base's structure and its fp8
    output plus the adapter's term; after it, fused again."""
    from bridge.peft.kernel_report import kernel_report
    from tests import te_standins as te

    backend = "triton"
    if case == "expert-raw":
        case, backend = "raw", "expert-auto"
    elif case == "grouped":
        backend = "expert-auto"
    model = _wrap(case, _base(case, flag, bias), backend if backend != "triton" else "auto")
    wrapper = model.proj
    x = _x(case, FP8_SPLITS)
    call = lambda m: _call(m, x, case, FP8_SPLITS)  # noqa: E731
    with torch.no_grad():
        y_fused = call(wrapper)
        assert _plan(wrapper).backend == "triton", _plan(wrapper).reason
        with te.fp8_autocast(fp8_recipe=te.Float8CurrentScaling()):
            base8 = call(wrapper.to_wrap)
            out8 = call(wrapper)
            plan = _plan(wrapper)
            assert plan.backend == "eager" and FP8_WHY in plan.reason, plan.reason
            (row,) = kernel_report(model)
            assert row.path == "eager" and FP8_WHY in row.reason, row
        y8 = _check_like_base(out8, base8)
        ref, _ = _reference_fp8(wrapper, x, base8)
        assert_close_rel(y8, ref, TOL, "fp8 y")
        y0 = y_fused if isinstance(y_fused, torch.Tensor) else y_fused[0]
        assert (y8 - y0).abs().max() > 1e-4  # the base really ran in fp8
        again = call(wrapper)
    assert _plan(wrapper).backend == "triton"
    torch.testing.assert_close(again if isinstance(again, torch.Tensor) else again[0], y0)


def _reference_fp8(wrapper, x, base8):
    """The base's own (fp8) output plus the adapter's term, in fp64."""
    adapter = wrapper.adapter
    y = (base8 if isinstance(base8, torch.Tensor) else base8[0]).double()
    a, b = adapter.linear_in.weight.double(), adapter.linear_out.weight.double()
    return y + adapter.scale * (x.double() @ a.t()) @ b.t(), None
