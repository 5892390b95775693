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


# ---- one seed, one mask, on every backend: the ops and the norm-fused layer path ----------------
def _run_op(op: str, backend: str, t: dict, leaves: tuple[str, ...], **kw):
    """(y, grads of ``leaves``) of lora_linear / norm_lora_linear on ``backend``."""
    from bridge.kernels.norm_lora import norm_lora_linear

    t = {k: (v.detach().clone().requires_grad_(k in leaves) if v is not None else None)
         for k, v in t.items()}
    if op == "lora":
        y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                        backend=backend, **kw)
    else:
        y = norm_lora_linear(*t.values(), backend=backend, **kw)
    y.square().sum().backward()  # a dY that is not all ones
    return [y] + [t[k].grad for k in leaves]


def _op_reference(op: str, t: dict, mask: torch.Tensor, **kw):
    """fp64 output with the given keep mask (kernels/philox.py's convention applied by hand)."""
    from bridge.kernels.lora_linear import lora_linear_ref
    from bridge.kernels.norm_lora import norm_lora_linear_ref

    t64 = {k: v.double() if v is not None else None for k, v in t.items()}
    kw = {k: v for k, v in kw.items() if k not in ("seed", "training")}
    if op == "lora":
        return lora_linear_ref(t64["x"], t64["weight"], t64["bias"], t64["lora_a"],
                               t64["lora_b"], dropout_mask=mask, **kw)
    return norm_lora_linear_ref(*t64.values(), dropout_mask=mask, **kw)[0]


@requires_kernel_device()
@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("op", ["lora", "norm-LayerNorm", "norm-RMSNorm"])
def test_one_seed_is_one_mask_on_the_eager_and_the_triton_op(op, position):
    """Odd shapes (K=37, one row of 1 and one of 6), an int and a device-tensor seed: eager and
    Triton give the same y and every gradient, both equal the fp64 reference with
    philox_keep_mask's mask, the mask drops (p=0 and another seed give other results)."""
    from tests.conftest import KERNEL_DEVICE
    from tests.numerics import lora_inputs, norm_lora_inputs

    n, k, r, p = 19, 37, 3, 0.4
    if op == "lora":
        x, w, b, a, bb = lora_inputs((1, 6), k, n, r, torch.float32, device=KERNEL_DEVICE,
                                     requires_grad=False)
        t = dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb)
        leaves, extra = ("x", "bias", "lora_a", "lora_b"), {}
    else:
        norm = op.split("-")[1]
        t = norm_lora_inputs((1, 6, k), n, r, torch.float32, norm, device=KERNEL_DEVICE)
        leaves = ("x", "norm_weight", "bias", "lora_a", "lora_b") + (
            ("norm_bias",) if norm == "LayerNorm" else ())
        extra = dict(normalization=norm, eps=1e-5)
    for seed in (7, torch.tensor([2**40 + 3], device=KERNEL_DEVICE)):
        kw = dict(scale=2.0, dropout=p, dropout_position=position, seed=seed, **extra)
        eager = _run_op(op, "eager", t, leaves, **kw)
        triton = _run_op(op, "triton", t, leaves, **kw)
        names = ("y",) + leaves
        for name, got, want in zip(names, triton, eager, strict=True):
            assert_close_rel(got, want, 2e-5, f"{op} {position} seed={seed}: {name}")
        shape = t["x"].shape if position == "pre" else eager[0].shape
        mask = philox_keep_mask(seed, shape, p, KERNEL_DEVICE)
        assert 0 < mask.float().mean() < 1
        ref = _op_reference(op, t, mask, **kw)
        assert_close_rel(eager[0], ref, 1e-5, f"{op} {position}: eager vs the Philox mask")
        off = _run_op(op, "eager", t, leaves, **{**kw, "dropout": 0.0})[0]
        other = _run_op(op, "triton", t, leaves, **{**kw, "seed": 8})[0]
        assert (off - eager[0]).abs().max() > 1e-3 and (other - triton[0]).abs().max() > 1e-3


@requires_kernel_device()
@pytest.mark.parametrize("position", ["pre", "post"])
def test_a_norm_fused_layer_drops_the_same_elements_eager_and_fused(megatron_tp1, position):
    """LoRA over bridge's LayerNormColumnParallelLinear: the eager module path (the adapter's
    LoRADropout on the norm output) and the fused norm_lora op drop the same elements for one
    torch generator state: same y and gradients (x, A, B; the norm is frozen with the base)."""
    from bridge.layers import LayerNormColumnParallelLinear
    from bridge.peft import LoRA, kernel_report
    from tests.megatron_utils import make_config

    outs = {}
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        config = make_config(hidden_size=K, num_attention_heads=1, normalization="LayerNorm")
        holder = nn.Module()
        holder.linear_qkv = LayerNormColumnParallelLinear(
            K, N, config=config, init_method=nn.init.normal_, gather_output=False, bias=True,
            skip_bias_add=False, is_expert=False)
        LoRA(target_modules=["linear_qkv"], dim=R, alpha=6, dropout=0.4,
             dropout_position=position, lora_B_init_method="normal",
             kernel_backend=backend)(holder)
        layer = holder.linear_qkv.train()
        x = _x(3).transpose(0, 1).contiguous().requires_grad_(True)  # [s, b, K]
        torch.manual_seed(21)
        y, _ = layer(x)
        y.square().sum().backward()
        a = layer.adapter
        outs[backend] = (y, x.grad, a.linear_in.weight.grad, a.linear_out.weight.grad)
        (row,) = kernel_report(holder)
        assert (row.path, row.layout) == (("fused", "norm") if backend == "triton"
                                          else ("eager", "")), row
    for name, got, want in zip(("y", "dx", "dA", "dB"), outs["triton"], outs["eager"],
                               strict=True):
        assert got is not None and want is not None, name
        assert_close_rel(got, want, 2e-5, f"{position}: {name}")
