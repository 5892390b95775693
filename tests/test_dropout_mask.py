"""Adapter dropout (bridge/peft/dropout.py): one source of truth for p (issue 15 item 13) and one
mask per seed on every path (item 15).

The adapters' dropout is an ``nn.Dropout`` (so the usual ``m.p = 0`` loop turns it off), and
``adapter.dropout_p``, which the fused path reads per call, is that module's p. The eager module
path draws the fused kernels' Philox mask from a seed drawn as the fused path draws it, so with
the same torch generator state the eager and the fused forward drop the same elements."""

from __future__ import annotations

import pytest
import torch
from bridge.kernels.lora_linear import lora_linear
from bridge.kernels.philox import SEED_HIGH, philox_keep_mask
from torch import nn

from bridge.peft import LinearAdapter, LoRALinear, ParallelLinearAdapter
from bridge.peft.dropout import LoRADropout
from tests.conftest import requires_kernel_device
from tests.numerics import assert_close_rel

K, N, R = 12, 10, 3
PATHS = ["eager", pytest.param("triton", marks=requires_kernel_device())]


def _lora(backend: str, p: float, position: str = "pre", adapter: str = "linear") -> LoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    base.requires_grad_(False)
    if adapter == "linear":
        ad = LinearAdapter(base, dim=R, alpha=6, dropout=p, dropout_position=position,
                           lora_B_init_method="normal")
    else:
        ad = ParallelLinearAdapter(K, N, R, activation="identity", alpha=6, dropout=p,
                                   dropout_position=position, row_init_method="normal")
    return LoRALinear(base, ad, kernel_backend=backend).train()


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 5, K, generator=torch.Generator().manual_seed(seed))


def _expected(module: LoRALinear, x: torch.Tensor, p: float, rng_seed: int,
              position: str = "pre") -> torch.Tensor:
    """The output for the seed draw_seed takes after torch.manual_seed(rng_seed)."""
    torch.manual_seed(rng_seed)
    seed = int(torch.randint(0, SEED_HIGH, (1,)))
    a = module.adapter
    return lora_linear(x, module.to_wrap.weight, module.to_wrap.bias, a.linear_in.weight,
                       a.linear_out.weight, scale=a.scale, dropout=p, dropout_position=position,
                       seed=seed, backend="eager")


def test_lora_dropout_is_an_nn_dropout_with_the_philox_mask():
    d = LoRADropout(0.3)
    assert isinstance(d, nn.Dropout) and d.p == 0.3
    x = torch.randn(4, 7, requires_grad=True)
    y = d(x, seed=9)
    keep = philox_keep_mask(9, x.shape, 0.3, "cpu")
    assert torch.equal(y, x * keep / 0.7)
    y.sum().backward()
    assert torch.equal(x.grad, keep / 0.7)
    assert torch.equal(d.eval()(x), x)
    with pytest.raises(ValueError, match=r"dropout probability p must be in \[0, 1\), got 1.0"):
        d.p = 1.0


@pytest.mark.parametrize("adapter", ["linear", "parallel"])
def test_dropout_p_is_the_dropout_modules_p(adapter):
    m = _lora("eager", 0.5, adapter=adapter)
    assert isinstance(m.adapter.dropout, nn.Dropout) and m.adapter.dropout_p == 0.5
    m.adapter.dropout.p = 0.25
    assert m.adapter.dropout_p == 0.25
    m.adapter.dropout_p = 0.1  # the setter writes the module's p
    assert m.adapter.dropout.p == 0.1


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("position", ["pre", "post"])
def test_setting_every_nn_dropout_p_to_zero_turns_adapter_dropout_off(backend, position):
    m = _lora(backend, 0.5, position)
    x = _x()
    m(x)  # a first forward (the fused path keeps a plan per module)
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    assert m.adapter.dropout_p == 0.0
    assert_close_rel(m(x), m.eval()(x), 1e-6, f"{backend}: train with p=0 vs eval")


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("position", ["pre", "post"])
def test_a_new_p_after_the_first_forward_takes_effect(backend, position):
    m = _lora(backend, 0.5, position)
    x = _x()
    torch.manual_seed(5)
    assert_close_rel(m(x), _expected(m, x, 0.5, 5, position), 1e-6, "p=0.5")
    m.adapter.dropout.p = 0.2
    torch.manual_seed(6)
    assert_close_rel(m(x), _expected(m, x, 0.2, 6, position), 1e-6, "p=0.2 after the change")


@requires_kernel_device()
@pytest.mark.parametrize("adapter", ["linear", "parallel"])
@pytest.mark.parametrize("position", ["pre", "post"])
def test_eager_module_and_fused_path_drop_the_same_elements(adapter, position):
    """Same generator state -> same seed -> same mask: eager and fused give one result."""
    x = _x(2)
    outs = {}
    for backend in ("eager", "triton"):
        m = _lora(backend, 0.4, position, adapter)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(11)
        y = m(xi)
        y.square().sum().backward()
        outs[backend] = (y, xi.grad, m.adapter.linear_in.weight.grad,
                         m.adapter.linear_out.weight.grad)
    for name, got, want in zip(("y", "dx", "dA", "dB"), outs["triton"], outs["eager"],
                               strict=True):
        assert_close_rel(got, want, 2e-5, f"{adapter} {position}: {name}")
    # and it is dropout: another generator state gives another result
    m = _lora("eager", 0.4, position, adapter)
    torch.manual_seed(12)
    assert (m(x) - outs["eager"][0]).abs().max() > 1e-3
