"""LoRA / DoRA over transformer-engine's own LayerNormLinear (unwrapped, tests/te_standins.py):
TE returns ``(out, ln_out)`` with ``return_layernorm_output=True`` and ``return_bias=False``
(its bias inside ``out``), ``(out, bias, ln_out)`` with both; megatron's wrapper nests the first
as ``((out, ln_out), None)``. The adapter must read ``ln_out`` (not ``x``) and the layer must
return what the base returns without its ln output (a bare tensor, or ``(out, bias)``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bridge.peft import DoRA, LoRA, kernel_report
from tests.conftest import requires_kernel_device
from tests.numerics import assert_close_rel, dtype_tol
from tests.te_standins import LayerNormLinear

K, N, R, ALPHA = 16, 24, 4, 8.0


class Holder(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.linear_qkv = base

    def forward(self, x):
        return self.linear_qkv(x)


def te_layernorm_linear(bias: bool, return_bias: bool, normalization: str = "LayerNorm"):
    torch.manual_seed(0)
    base = LayerNormLinear(K, N, bias=bias, return_bias=return_bias, normalization=normalization,
                           params_dtype=torch.float32, device="cpu")
    with torch.no_grad():  # norm parameters away from 1 / 0, so ln(x) differs from x visibly
        base.layer_norm_weight.uniform_(0.5, 1.5)
        if base.layer_norm_bias is not None:
            base.layer_norm_bias.uniform_(-0.5, 0.5)
        if bias:
            base.bias.uniform_(-1, 1)
    return base


def base_out_and_ln(base: nn.Module, x: torch.Tensor):
    """The base's own (out, ln_out), in fp64, as TE returns them (return_layernorm_output)."""
    got = base(x)
    out, ln_out = (got[0], got[2]) if base.return_bias else got
    return out.double(), ln_out.double()


KINDS = ["lora-eager", pytest.param("lora-triton", marks=requires_kernel_device()), "dora"]


@pytest.mark.parametrize("return_bias", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_an_adapter_over_te_layernorm_linear_reads_its_layernorm_output(kind, bias, return_bias):
    """LoRA on the eager module path and on the fused norm op, DoRA (eager)."""
    base = te_layernorm_linear(bias, return_bias)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(3))
    plain_before = base(x)
    kind, _, backend = kind.partition("-")
    extra = {"kernel_backend": backend} if kind == "lora" else {}
    transform = (LoRA if kind == "lora" else DoRA)(target_modules=["linear_qkv"], dim=R,
                                                     alpha=ALPHA, **extra)
    model = transform(Holder(base))
    layer = model.linear_qkv
    assert layer.to_wrap is base and base.return_layernorm_output is True
    with torch.no_grad():
        layer.adapter.linear_out.weight.normal_()  # B = 0 at init: make the term visible
    got = layer(x)

    # the return style of the base without its ln output: bare, or (out, bias)
    assert type(got) is type(plain_before)
    if isinstance(plain_before, tuple):
        assert len(got) == 2 and torch.equal(got[1], plain_before[1])
        got = got[0]

    with torch.no_grad():
        out, ln_out = base_out_and_ln(base, x)
        a = layer.adapter.linear_in.weight.double()
        b = layer.adapter.linear_out.weight.double()
        lora = ln_out @ a.t() @ b.t() * (ALPHA / R)
        if kind == "lora":
            want = out + lora
        else:  # W' = m / ||W0 + s B A|| * (W0 + s B A), rows; the bias stays outside
            w0 = base.weight.double()
            bias_in = base.bias.double() if bias and not return_bias else 0.0
            merged = w0 + (ALPHA / R) * b @ a
            m = layer.adapter.weight_magnitude.double()
            want = (ln_out @ merged.t()) * (m / merged.norm(dim=1)) + bias_in
    assert_close_rel(got, want, dtype_tol(torch.float32, "chain"), f"{kind} output")
    # and the ln output really differs from x (a test that reads x would fail)
    assert not torch.allclose(ln_out.float(), x, atol=1e-2)
    (row,) = kernel_report(model)
    assert row.path == ("fused" if backend == "triton" else "eager"), row


def test_the_te_ln_output_pair_is_told_apart_from_out_and_bias():
    """split_base_output on TE's raw pair vs megatron's (out, bias): the attribute decides."""
    base = te_layernorm_linear(bias=True, return_bias=False)
    model = LoRA(target_modules=["linear_qkv"], dim=R, alpha=ALPHA,
                 kernel_backend="eager")(Holder(base))
    layer = model.linear_qkv
    x = torch.randn(3, K)
    out, ln_out = torch.randn(3, N), torch.randn(3, K)
    got_out, got_bias, got_ln = layer.split_base_output((out, ln_out), x)
    assert got_out is out and got_ln is ln_out and got_bias is base.bias
    assert layer._return_bare_tensor
    base.return_layernorm_output = False  # then a flat pair is (out, bias), the input is x
    bias = torch.randn(N)
    got_out, got_bias, got_ln = layer.split_base_output((out, bias), x)
    assert got_out is out and got_bias is bias and got_ln is x
    assert not layer._return_bare_tensor
