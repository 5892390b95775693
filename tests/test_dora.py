"""DoRA: values and gradients against an fp64 formula and HF PEFT's DoRA; TP=2 equals TP=1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bridge.peft.dora import DoRA
from bridge.peft.dora_layers import DoRALinear, ParallelLinearDoRAAdapter

K, N, R, ALPHA = 16, 24, 4, 8.0
S = ALPHA / R


def dora_reference(x, w, b, a, bb, m, s, x_dropped=None):
    """HF PEFT's DoRA in plain torch: W x + b + (m/n - 1) W x~ + (m/n) s B A x~, n detached."""
    xd = x if x_dropped is None else x_dropped
    n = (w + s * bb @ a).norm(dim=1).detach()
    scale = m / n
    out = x @ w.T + (scale - 1) * (xd @ w.T) + scale * s * (xd @ a.T @ bb.T)
    return out + b if b is not None else out


class Holder(nn.Module):
    def __init__(self, dtype=torch.float64, bias=True):
        super().__init__()
        self.lin = nn.Linear(K, N, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


def _dora_holder(dtype=torch.float64, bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = DoRA(target_modules=["lin"], dim=R, alpha=ALPHA, dropout=dropout,
                 lora_B_init_method="normal", lora_dtype=dtype)(Holder(dtype, bias))
    with torch.no_grad():  # a trained-looking magnitude, not the initial norms
        model.lin.adapter.weight_magnitude.mul_(1 + 0.3 * torch.rand(N, dtype=dtype))
    return model


def _leaves(model):
    a = model.lin.adapter
    return a.linear_in.weight, a.linear_out.weight, a.weight_magnitude


@pytest.mark.parametrize("bias", [True, False])
def test_dora_linear_matches_formula_values_and_grads(bias):
    model = _dora_holder(bias=bias)
    assert isinstance(model.lin, DoRALinear)
    lin = model.lin.to_wrap
    x = torch.randn(3, 5, K, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, N, dtype=torch.float64)
    out = model.lin(x)
    (out * g).sum().backward()

    a, bb, m = (t.detach().clone().requires_grad_(True) for t in _leaves(model))
    xr = x.detach().clone().requires_grad_(True)
    ref = dora_reference(xr, lin.weight.detach(), lin.bias.detach() if bias else None, a, bb, m, S)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip((*_leaves(model), x), (a, bb, m, xr), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
    assert lin.weight.grad is None  # the base stays frozen


def test_weight_magnitude_initialised_to_row_norms():
    torch.manual_seed(1)
    model = DoRA(target_modules=["lin"], dim=R, alpha=ALPHA, lora_B_init_method="normal",
                 lora_dtype=torch.float64)(Holder())
    w = model.lin.to_wrap.weight.detach()
    a, bb, m = (t.detach() for t in _leaves(model))
    assert bb.abs().sum() > 0
    torch.testing.assert_close(m, (w + S * bb @ a).norm(dim=1), rtol=1e-12, atol=0)
    # hence, freshly initialised, DoRA equals LoRA: (m/n) = 1
    x = torch.randn(4, K, dtype=torch.float64)
    want = x @ (w + S * bb @ a).T + model.lin.to_wrap.bias.detach()
    torch.testing.assert_close(model.lin(x), want, rtol=1e-12, atol=1e-12)


class FixedMask(nn.Module):
    """Inverted dropout with a known mask, standing in for nn.Dropout."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask / (1 - self.p)


def test_dropout_correction_term_in_training_only():
    p = 0.4
    model = _dora_holder(dropout=p)
    adapter = model.lin.adapter
    assert isinstance(adapter.dropout, nn.Dropout) and adapter.dropout.p == p
    x = torch.randn(6, K, dtype=torch.float64)
    mask = (torch.rand(6, K) > p).double()
    adapter.dropout = FixedMask(mask, p)
    lin = model.lin.to_wrap
    a, bb, m = (t.detach() for t in _leaves(model))
    w, b = lin.weight.detach(), lin.bias.detach()
    model.train()
    want = dora_reference(x, w, b, a, bb, m, S, x_dropped=x * mask / (1 - p))
    torch.testing.assert_close(model.lin(x), want, rtol=1e-12, atol=1e-12)
    # the correction is real: without it the output would differ
    naive = dora_reference(x, w, b, a, bb, m, S)
    assert (naive - want).abs().max() > 1e-3
    model.eval()
    torch.testing.assert_close(model.lin(x), naive, rtol=1e-12, atol=1e-12)


def test_matches_hf_peft_dora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    base = Holder(torch.float32)
    hf = peft.get_peft_model(Holder(torch.float32), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["lin"], use_dora=True, lora_dropout=0.0))
    hf_lin = hf.base_model.model.lin
    ours = DoRA(target_modules=["lin"], dim=R, alpha=ALPHA, lora_B_init_method="normal")(base)
    with torch.no_grad():
        hf_lin.base_layer.weight.copy_(ours.lin.to_wrap.weight)
        hf_lin.base_layer.bias.copy_(ours.lin.to_wrap.bias)
        hf_lin.lora_A["default"].weight.copy_(ours.lin.adapter.linear_in.weight)
        hf_lin.lora_B["default"].weight.copy_(ours.lin.adapter.linear_out.weight)
        ours.lin.adapter.weight_magnitude.mul_(1 + 0.3 * torch.rand(N))
        hf_lin.lora_magnitude_vector["default"].weight.copy_(ours.lin.adapter.weight_magnitude)
    hf.eval()
    ours.eval()
    x = torch.randn(2, 7, K)
    torch.testing.assert_close(ours.lin(x), hf(x), rtol=1e-5, atol=1e-5)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="DoRA only supports pre-adapter dropout at this time: "
                                         "got dropout_position='post'"):
        DoRA(dropout_position="post")
    with pytest.raises(ValueError, match="DoRA only supports pre-adapter dropout"):
        ParallelLinearDoRAAdapter(K, N, R, activation="identity", dropout_position="post")
    adapter = ParallelLinearDoRAAdapter(K, N, R, activation="identity", dropout_position="pre")
    with pytest.raises(ValueError, match=r"shape \(24,\), got a value of shape \(3,\)"):
        adapter.init_weight_magnitude(torch.ones(3))
    with pytest.raises(TypeError, match="ParallelLinearDoRAAdapter"):
        DoRALinear(nn.Linear(K, N), nn.Linear(K, N))


def test_state_dict_keys():
    model = _dora_holder()
    assert sorted(model.state_dict()) == [
        "lin.adapter.linear_in.weight", "lin.adapter.linear_out.weight",
        "lin.adapter.weight_magnitude", "lin.bias", "lin.weight"]


# ---- tensor parallel: two gloo processes ---------------------------------------------------------
def _tp_worker(rank: int) -> None:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from tests.megatron_utils import make_config

    tp = 2
    init = nn.init.normal_

    class Block(nn.Module):
        def __init__(self, skip_bias_add, cfg):
            super().__init__()
            self.linear_fc1 = ColumnParallelLinear(K, N, config=cfg, init_method=init, bias=True,
                                                   gather_output=False,
                                                   skip_bias_add=skip_bias_add)
            self.linear_fc2 = RowParallelLinear(N, K, config=cfg, init_method=init, bias=True,
                                                input_is_parallel=True,
                                                skip_bias_add=not skip_bias_add)

    # (skip_bias_add, sequence_parallel): with sequence parallelism the column base takes and the
    # row base returns sequence shards, and the adapter gathers/scatters around its factors.
    # drop: dropout in training, with known masks, exercises the correction term (W x~ is
    # computed TP-aware: copied/gathered input for the column base, reduced for the row base).
    for skip_bias_add, sp, drop in ((False, False, False), (True, False, True),
                                    (False, True, True)):
        cfg = make_config(params_dtype=torch.float64, sequence_parallel=sp,
                          tensor_model_parallel_size=tp)
        seq = slice(rank * 2, (rank + 1) * 2) if sp else slice(None)
        torch.manual_seed(7)  # the same full tensors on both ranks
        full = {
            "fc1": dict(w=torch.randn(N, K), b=torch.randn(N), a=torch.randn(R, K),
                        bb=torch.randn(N, R), m=torch.rand(N) + 0.5),
            "fc2": dict(w=torch.randn(K, N), b=torch.randn(K), a=torch.randn(R, N),
                        bb=torch.randn(K, R), m=torch.rand(K) + 0.5),
        }
        full = {k: {n: t.double() for n, t in v.items()} for k, v in full.items()}
        x = torch.randn(4, 2, K, dtype=torch.float64)
        g1 = torch.randn(4, 2, N, dtype=torch.float64)
        g2 = torch.randn(4, 2, K, dtype=torch.float64)
        block = Block(skip_bias_add, cfg)
        block = DoRA(target_modules=["linear_fc1", "linear_fc2"], dim=R, alpha=ALPHA,
                     lora_dtype=torch.float64, dropout=0.3 if drop else 0.0)(block)
        mask_c = (torch.rand(4, 2, K) > 0.3).double()
        mask_r = (torch.rand(4, 2, N) > 0.3).double()
        n1, r1, n2 = N // tp, R // tp, N // tp
        sl = slice(rank * n1, (rank + 1) * n1)
        fc1, fc2 = block.linear_fc1, block.linear_fc2
        with torch.no_grad():
            fc1.to_wrap.weight.copy_(full["fc1"]["w"][sl])
            fc1.to_wrap.bias.copy_(full["fc1"]["b"][sl])
            fc1.adapter.linear_in.weight.copy_(full["fc1"]["a"][rank * r1:(rank + 1) * r1])
            fc1.adapter.linear_out.weight.copy_(full["fc1"]["bb"][sl])
            fc2.to_wrap.weight.copy_(full["fc2"]["w"][:, rank * n2:(rank + 1) * n2])
            fc2.to_wrap.bias.copy_(full["fc2"]["b"])
            fc2.adapter.linear_in.weight.copy_(full["fc2"]["a"][:, rank * n2:(rank + 1) * n2])
            fc2.adapter.linear_out.weight.copy_(full["fc2"]["bb"][rank * (K // tp):
                                                                  (rank + 1) * (K // tp)])
        # magnitudes: m is [N/tp] for the column base, [K] replicated for the row base
        assert fc1.adapter.weight_magnitude.shape == (n1,)
        assert fc2.adapter.weight_magnitude.shape == (K,)
        # the norm covers whole rows (all K for fc1, both K/tp halves for fc2)
        for layer, f, rows in ((fc1, full["fc1"], sl), (fc2, full["fc2"], slice(None))):
            want = (f["w"] + S * f["bb"] @ f["a"]).norm(dim=1)[rows]
            torch.testing.assert_close(layer.weight_norm(), want, rtol=1e-12, atol=0)
        with torch.no_grad():
            fc1.adapter.weight_magnitude.copy_(full["fc1"]["m"][sl])
            fc2.adapter.weight_magnitude.copy_(full["fc2"]["m"])

        # TP=1 oracle: nn.Linear DoRA layers with the full tensors
        oracle = {}
        for name, (k_in, n_out) in (("fc1", (K, N)), ("fc2", (N, K))):
            f = full[name]
            base = nn.Linear(k_in, n_out, dtype=torch.float64)
            adapter = ParallelLinearDoRAAdapter(k_in, n_out, R, activation="identity",
                                                alpha=ALPHA, dropout_position="pre",
                                                params_dtype=torch.float64)
            with torch.no_grad():
                base.weight.copy_(f["w"])
                base.bias.copy_(f["b"])
                adapter.linear_in.weight.copy_(f["a"])
                adapter.linear_out.weight.copy_(f["bb"])
            base.requires_grad_(False)
            layer = DoRALinear(base, adapter)
            with torch.no_grad():
                adapter.weight_magnitude.copy_(f["m"])
            oracle[name] = layer
        if drop:
            cols = slice(rank * n2, (rank + 1) * n2)
            fc1.adapter.dropout = FixedMask(mask_c[seq], 0.3)
            fc2.adapter.dropout = FixedMask(mask_r[..., cols], 0.3)
            oracle["fc1"].adapter.dropout = FixedMask(mask_c, 0.3)
            oracle["fc2"].adapter.dropout = FixedMask(mask_r, 0.3)

        # column-parallel fc1: full x in, N/tp shard out
        x1 = x[seq].clone().requires_grad_(True)
        y1, bias1 = fc1(x1)
        y1_full_bias = y1 + bias1 if skip_bias_add else y1
        ox1 = x.clone().requires_grad_(True)
        oy1 = oracle["fc1"](ox1)
        torch.testing.assert_close(y1_full_bias, oy1[..., sl], rtol=1e-10, atol=1e-10)
        (y1 * g1[..., sl]).sum().backward()
        (oy1 * g1).sum().backward()
        oa = oracle["fc1"].adapter
        torch.testing.assert_close(x1.grad, ox1.grad[seq], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fc1.adapter.linear_in.weight.grad,
                                   oa.linear_in.weight.grad[rank * r1:(rank + 1) * r1],
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fc1.adapter.linear_out.weight.grad,
                                   oa.linear_out.weight.grad[sl], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fc1.adapter.weight_magnitude.grad,
                                   oa.weight_magnitude.grad[sl], rtol=1e-10, atol=1e-10)

        # row-parallel fc2: x split on N in, full K out (reduced)
        h = torch.randn(4, 2, N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        cols = slice(rank * n2, (rank + 1) * n2)
        x2 = h[..., cols].clone().requires_grad_(True)
        y2, bias2 = fc2(x2)
        y2_full_bias = y2 + bias2 if not skip_bias_add else y2
        ox2 = h.clone().requires_grad_(True)
        oy2 = oracle["fc2"](ox2)
        torch.testing.assert_close(y2_full_bias, oy2[seq], rtol=1e-10, atol=1e-10)
        (y2 * g2[seq]).sum().backward()
        (oy2 * g2).sum().backward()
        oa = oracle["fc2"].adapter
        torch.testing.assert_close(x2.grad, ox2.grad[..., cols], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fc2.adapter.linear_in.weight.grad,
                                   oa.linear_in.weight.grad[:, cols], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fc2.adapter.linear_out.weight.grad,
                                   oa.linear_out.weight.grad[rank * (K // tp):(rank + 1) * (K // tp)],
                                   rtol=1e-10, atol=1e-10)
        m_grad = fc2.adapter.weight_magnitude.grad.clone()
        if sp:  # each rank saw its sequence shard: megatron all-reduces params marked like this
            assert fc2.adapter.weight_magnitude.sequence_parallel
            torch.distributed.all_reduce(m_grad)
        torch.testing.assert_close(m_grad, oa.weight_magnitude.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_tensor_parallel_2_equals_1(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core not installed")
    from tests.megatron_utils import spawn_gloo

    spawn_gloo(_tp_worker, str(tmp_path))


@pytest.mark.parametrize("kind", ["gather_output", "row_input_not_parallel"])
def test_tp_bases_with_whole_input_or_output_are_refused_at_tp2(megatron_tp1, monkeypatch, kind):
    """DoRA's per-shard norm would be wrong for these bases at TP > 1: a clear error instead."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from tests.megatron_utils import make_config

    cfg = make_config()
    model = nn.Module()
    if kind == "gather_output":
        model.linear_fc1 = ColumnParallelLinear(64, 32, config=cfg, init_method=nn.init.normal_,
                                                bias=False, gather_output=True)
    else:
        model.linear_fc1 = RowParallelLinear(64, 32, config=cfg, init_method=nn.init.normal_,
                                             bias=False, input_is_parallel=False,
                                             skip_bias_add=False)
    monkeypatch.setattr("bridge.peft.dora._tp_size", lambda is_expert=False, m=None: 2)
    with pytest.raises(NotImplementedError, match="not supported at TP > 1"):
        DoRA(target_modules=["linear_fc1"], dim=4)(model)
    monkeypatch.setattr("bridge.peft.dora._tp_size", lambda is_expert=False, m=None: 1)
    DoRA(target_modules=["linear_fc1"], dim=4)(model)  # TP = 1: fine
    assert isinstance(model.linear_fc1, DoRALinear)
