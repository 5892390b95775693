"""Bad or edge inputs to bridge.peft get a clear error at the boundary that names the argument
and says what to do (issue 15 item 16 and its "unclear errors"), never a raw error from deep
inside or a silently wrong result."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from bridge.peft import (
    CanonicalLoRA,
    DoRA,
    LinearAdapter,
    LoRA,
    LoRALinear,
    ParallelLinearAdapter,
    PEFTConfigError,
)
from tests.numerics import assert_close_rel


# ---- torch.compile of a module on the eager fallback ----------------------------------------------
def test_compile_fullgraph_of_a_module_on_the_eager_fallback(monkeypatch, caplog):
    """Compiled first (the fallback's log-once memory cleared, so the trace meets the fallback
    before any eager call has logged it): fullgraph=True traces, the result is the module's,
    and the fallback is logged by the next eager call, outside the traced region."""
    from bridge.kernels.backend import _log_once

    from bridge.peft import kernel_report

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no GPU here: 'auto' falls back to eager
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    module = LoRALinear(lin, LinearAdapter(lin, dim=2, lora_B_init_method="normal"))
    module.requires_grad_(False)
    x = torch.randn(3, 8)
    a, b = module.adapter.linear_in.weight, module.adapter.linear_out.weight
    want = x @ lin.weight.t() + lin.bias + module.adapter.scale * (x @ a.t()) @ b.t()
    _log_once.cache_clear()
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="bridge.kernels"):
        got = torch.compile(module, fullgraph=True, backend="eager")(x)
        assert not [r for r in caplog.records if "eager backend" in r.getMessage()]
        module(x)
    assert_close_rel(got, want, 1e-6, "compiled eager fallback")
    assert [r.getMessage() for r in caplog.records if "eager backend" in r.getMessage()] == [
        "bridge.kernels: lora_linear runs on the eager backend: triton: no GPU"]
    (row,) = kernel_report(module)
    assert row.path == "eager" and "no GPU" in row.reason


# ---- meta tensors --------------------------------------------------------------------------------
def test_meta_tensors_through_a_lora_linear_with_dropout():
    lin = nn.Linear(8, 6, device="meta")
    module = LoRALinear(lin, LinearAdapter(lin, dim=2, dropout=0.1)).train()
    y = module(torch.empty(4, 3, 8, device="meta"))
    assert y.device.type == "meta" and y.shape == (4, 3, 6)


# ---- LoRALinear checks its adapter against the base ---------------------------------------------
@pytest.mark.parametrize("base_size, adapter_size", [((8, 6), (4, 6)), ((8, 6), (8, 5))])
def test_lora_linear_refuses_an_adapter_of_other_sizes(base_size, adapter_size):
    base = nn.Linear(*base_size)
    with pytest.raises(PEFTConfigError, match=rf"adapter \(LinearAdapter\) maps "
                                              rf"{adapter_size[0]} -> {adapter_size[1]} features"
                                              rf" but the base \(Linear\) maps "
                                              rf"{base_size[0]} -> {base_size[1]}"):
        LoRALinear(base, LinearAdapter(nn.Linear(*adapter_size)))


def test_lora_linear_refuses_a_parallel_adapter_of_other_sizes():
    base = nn.Linear(8, 6)
    with pytest.raises(PEFTConfigError, match=r"maps 8 -> 12 features but the base"):
        LoRALinear(base, ParallelLinearAdapter(8, 12, 2, activation="identity"))


# ---- transform arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LoRA, DoRA, CanonicalLoRA])
@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_target_modules_entries_must_be_strings(cls, field):
    kw = {field: ["linear_q", 1]}
    if field == "exclude_modules":
        kw["target_modules"] = []
    with pytest.raises(TypeError, match=rf"{field} entries must be module names or '\*' "
                                        r"patterns \(str\); got 1 \(int\)"):
        cls(**kw)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_alpha_must_be_finite(alpha):
    message = rf"alpha must be a finite number > 0.*got {alpha!r}"
    for make in (lambda: LoRA(alpha=alpha), lambda: DoRA(alpha=alpha),
                 lambda: CanonicalLoRA(alpha=alpha),
                 lambda: LinearAdapter(nn.Linear(4, 4), alpha=alpha),
                 lambda: ParallelLinearAdapter(4, 4, 2, alpha=alpha)):
        with pytest.raises(PEFTConfigError, match=message):
            make()
    assert not math.isfinite(alpha)
