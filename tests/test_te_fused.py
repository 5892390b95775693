"""Where a transformer-engine base computes something the fused op does not, LoRA over it stays on
the eager module path and says why (TP=1; TP=2 with userbuffers in test_te_fused_tp2.py): fp8
(megatron's config.fp8, TE's fp8_autocast active at the call, Float8Tensor weights from
fp8_model_init), tp_comm_overlap, delay_wgrad_compute, a trainable base weight. The eager result
is the base's own output plus the adapter term; an explicit ``kernel_backend='triton'`` raises
with the same reason; kernel_report shows it; and once the condition is gone (fp8_autocast
exited) the next call is fused again without being told.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import requires_kernel_device
from tests.numerics import rel_err

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

pytestmark = [requires_kernel_device(), pytest.mark.usefixtures("megatron_tp1")]
K, N, R, S, B = 24, 16, 4, 5, 2


def _base(kind: str, buffer: str | None = None, **cfg_kw):
    from tests import te_standins as te
    from tests.megatron_utils import make_config

    torch.manual_seed(0)
    cfg = make_config(hidden_size=K, **cfg_kw)
    common = dict(config=cfg, init_method=lambda w: nn.init.normal_(w, std=0.3), bias=True,
                  skip_bias_add=False, is_expert=False)
    if buffer is not None:
        common["tp_comm_buffer_name"] = buffer
    if kind == "row":
        base = te.TERowParallelLinear(K, N, input_is_parallel=True, **common)
    elif kind == "column":
        base = te.TEColumnParallelLinear(K, N, gather_output=False, **common)
    else:
        base = te.TELayerNormColumnParallelLinear(K, N, gather_output=False, **common)
    with torch.no_grad():
        base.bias.normal_()
    return base


def _lora(base, backend: str = "auto"):
    from bridge.peft import LoRA

    model = nn.Module()
    model.proj = base
    torch.manual_seed(1)
    LoRA(target_modules=["proj"], dim=R, alpha=8, lora_B_init_method="normal",
         kernel_backend=backend)(model)
    return model


def _expected(wrapper, x, base_out):
    """base output + s B A x~ in fp64 (x~ the normalised input for a norm base; no dropout)."""
    base, adapter = wrapper.to_wrap, wrapper.adapter
    inp = x.double()
    if hasattr(base, "layer_norm_weight"):
        inp = nn.functional.layer_norm(inp, (K,), base.layer_norm_weight.double(),
                                       base.layer_norm_bias.double(), base.eps)
    a, b = adapter.linear_in.weight.double(), adapter.linear_out.weight.double()
    return base_out.double() + adapter.scale * (inp @ a.t()) @ b.t()


def _check_eager(model, x, why: str, base_out=None):
    """The wrapper took the eager path for ``why`` and computed base + adapter; the report says
    so too."""
    from bridge.peft.fused_forward import fused_lora_forward, fused_plan
    from bridge.peft.kernel_report import kernel_report

    wrapper = model.proj
    assert fused_lora_forward(wrapper, x, (), {}) is None
    plan = fused_plan(wrapper)
    assert plan.backend == "eager" and why in plan.reason, plan.reason
    y, _ = wrapper(x)
    if base_out is None:
        base_out = wrapper.base_linear_forward(x)[0]
    assert rel_err(y, _expected(wrapper, x, base_out)) < 1e-5
    (row,) = kernel_report(model)
    assert (row.path, row.backend) == ("eager", "eager") and why in row.reason, row


def _x():
    return torch.randn(S, B, K, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("kind", ["row", "lncol"])
def test_fp8_config_stays_eager(kind):
    base = _base(kind)
    base.config.fp8 = "hybrid"  # megatron then runs the model under TE's fp8_autocast
    _check_eager(_lora(base), _x(), "fp8 training (config.fp8='hybrid')")


@pytest.mark.parametrize("kind", ["row", "column", "lncol"])
def test_fp8_autocast_at_the_call_stays_eager_and_fused_again_after(kind):
    """TE's fp8 state is asked at every call (one call of TE's own probe): the plan made outside
    fp8_autocast is not reused inside it, and the other way round."""
    from bridge.peft.fused_forward import fused_plan
    from tests import te_standins as te

    model = _lora(_base(kind))
    x = _x()
    y_fused, _ = model.proj(x)
    assert fused_plan(model.proj).backend == "triton"
    with te.fp8_autocast(fp8_recipe=te.Float8CurrentScaling()):
        base_out = model.proj.base_linear_forward(x)[0]  # the base in fp8
        _check_eager(model, x, "transformer-engine fp8_autocast is active", base_out)
        y8, _ = model.proj(x)
    assert rel_err(y8, y_fused) > 1e-3  # the fp8 base really ran
    y_again, _ = model.proj(x)
    assert fused_plan(model.proj).backend == "triton"
    torch.testing.assert_close(y_again, y_fused)


def test_fp8_model_init_weights_stay_eager():
    from tests import te_standins as te

    with te.fp8_model_init():
        base = _base("row")
    assert isinstance(base.weight, te.Float8Tensor)
    x = _x()
    _check_eager(_lora(base), x, "base weight is a quantised Float8Tensor (fp8 weights)")
    _check_eager(_lora(base), x, "fp8 primary weights (built under transformer-engine's "
                                 "fp8_model_init)")


def test_tp_comm_overlap_stays_eager():
    _check_eager(_lora(_base("row", "proj", tp_comm_overlap=True)), _x(), "tp_comm_overlap is on")


def test_userbuffers_flag_stays_eager():
    """TE sets its ub_* flags only under SP at TP > 1 (checked at TP=2): here one is set by hand,
    as a layer built with overlap has it."""
    from bridge.peft.fused_forward import forget_fused_plan

    model = _lora(_base("lncol"))
    model.proj(_x())
    model.proj.to_wrap.ub_overlap_ag_fprop = True
    forget_fused_plan(model.proj)  # a construction-time attribute changed in place
    _check_eager(model, _x(), "userbuffers communication overlap is on (ub_overlap_ag_fprop)")


def test_delay_wgrad_compute_stays_eager():
    base = _base("column")
    base.config.delay_wgrad_compute = True  # megatron allows it only with MoE overlap
    base.wgrad_store._delay = True  # as TE's layer built with delay_wgrad_compute=True has it
    _check_eager(_lora(base), _x(), "delay_wgrad_compute is on")


def test_trainable_base_weight_stays_eager():
    model = _lora(_base("row"))
    model.proj.to_wrap.weight.requires_grad_(True)  # the plan key sees it: no forget needed
    _check_eager(model, _x(), "base weight requires grad (the fused path is for a frozen base)")


def test_explicit_triton_request_raises_with_the_reason():
    from bridge.kernels.backend import BackendUnavailableError

    from tests import te_standins as te

    model = _lora(_base("row"), backend="triton")
    with te.fp8_autocast(), pytest.raises(BackendUnavailableError,
                                          match="fp8_autocast is active"):
        model.proj(_x())
