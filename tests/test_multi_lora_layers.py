"""MultiLoRALinear against single LoRA per slot (fp64 oracle), on both of its paths: the fused
multi-adapter op (Triton; the CPU interpreter here) and the module path (the base, then the
slots' term in torch, grouped mm or the slot loop).

Every slot's rows give the output and the gradients (x, each slot's A and B) of one LoRA with
that slot's first rank_i ranks and scale alpha_i / rank_i, for uneven and empty slots, ranks
below the max, alpha 0, dropout ('pre' and 'post', the mask kernels/philox.py draws for the
layer's seed), a plain nn.Linear and megatron's column / row bases (TP=1 here; TP=2 in
test_multi_lora_tp2.py). The slot's padding ranks never reach the output and get no gradient;
slots not in the batch get zero gradients. Also: the stacked-view storage (no copy; a copy with
the reason when the parameters were re-homed), the fp32 scale, the plan and its reasons, the
slot lifecycle on one layer and the errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from bridge.kernels.philox import draw_seed, dropout_keep_mask
from torch import nn

from bridge.peft.errors import PEFTConfigError
from bridge.peft.multi_lora_forward import multi_lora_plan, training_plan
from bridge.peft.multi_lora_layers import (
    MultiLoRALinear,
    _narrow_token_counts_to_window,
    set_tokens_per_adapter_slot,
)
from tests.conftest import KERNEL_DEVICE, requires_kernel_device
from tests.numerics import dtype_tol, rel_err, slotwise_lora_ref

K, N, R_MAX = 40, 24, 8
TOKENS = [5, 0, 13, 2]  # uneven, one empty slot; 20 rows = x [10, 2, K]
RANKS = [4, 8, 1, 6]
ALPHAS = [16.0, 3.0, 0.5, 7.0]
STEP_SEED = 77  # torch.manual_seed before a forward: the layer draws its dropout seed from it


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_base(kind: str, k=K, n=N, dtype=torch.float32, cfg=None):
    """A frozen base: 'linear' (nn.Linear), 'column' / 'row' (megatron's, TP from ``cfg``)."""
    torch.manual_seed(3)
    if kind == "linear":
        base = nn.Linear(k, n, dtype=dtype)
    else:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        from tests.megatron_utils import make_config

        cfg = cfg or make_config(params_dtype=dtype)
        init = lambda w: nn.init.normal_(w, std=0.3)  # noqa: E731
        if kind == "column":
            base = ColumnParallelLinear(k, n, config=cfg, init_method=init, bias=True,
                                        gather_output=False)
        else:
            base = RowParallelLinear(k, n, config=cfg, init_method=init, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)
        with torch.no_grad():
            base.bias.normal_()
    return base.requires_grad_(False)


def make_layer(base, *, backend="triton", dropout=0.0, pos="pre", ranks=RANKS, alphas=ALPHAS,
               r_max=R_MAX, **kw) -> MultiLoRALinear:
    torch.manual_seed(4)
    kw.setdefault("row_init_method", "normal")  # B random, not LoRA's zero: a real test
    layer = MultiLoRALinear(base, len(ranks), r_max, 16, "decoder.layers.0.mlp.linear_fc1",
                            dropout=dropout, dropout_position=pos, kernel_backend=backend, **kw)
    for i, (r, a) in enumerate(zip(ranks, alphas, strict=True)):
        layer.init_adapter_slot(i, r, a)
    with torch.no_grad():  # padding filled with NaN: a path that read it would turn NaN
        for i, r in enumerate(ranks):
            layer.adapters[i].linear_in.weight[r:] = math.nan
            layer.adapters[i].linear_out.weight[:, r:] = math.nan
    return layer.train()


def run(layer, x, tokens, dy=None):
    """Forward and backward: (y, dx, [dA_i], [dB_i]); dy is random unless given."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    set_tokens_per_adapter_slot(layer, torch.tensor(tokens))
    torch.manual_seed(STEP_SEED)
    out = layer(x)
    y = out[0] if isinstance(out, tuple) else out
    dy = randn(*y.shape, seed=9, dtype=y.dtype) if dy is None else dy
    y.backward(dy)
    return (y.detach(), x.grad, [a.linear_in.weight.grad for a in layer.adapters],
            [a.linear_out.weight.grad for a in layer.adapters], dy)


def step_seed(device="cpu") -> torch.Tensor:
    """The dropout seed the layer draws in a forward run by ``run``."""
    torch.manual_seed(STEP_SEED)
    return draw_seed(torch.device(device))


def check_layer(layer, x, tokens, *, p=0.0, pos="pre", tol=None):
    """The layer's y and every gradient against the oracle; padding gradients exactly 0."""
    y, dx, das, dbs, dy = run(layer, x, tokens)
    base = layer.to_wrap
    slots_a = [a.linear_in.weight for a in layer.adapters]
    slots_b = [a.linear_out.weight for a in layer.adapters]
    x2d = x.reshape(-1, x.shape[-1])
    mask = None
    if p > 0:
        shape = x2d.shape if pos == "pre" else (x2d.shape[0], base.weight.shape[0])
        mask = dropout_keep_mask(step_seed(x.device), shape, p, x.device)
    ref = slotwise_lora_ref(x2d, base.weight, base.bias, slots_a, slots_b, tokens,
                            layer._slot_rank, layer._slot_alpha, dy.reshape(-1, dy.shape[-1]),
                            p=p, pos=pos, mask=mask)
    ref = (ref[0], ref[1], ref[3], ref[4])  # y, dx, dA, dB
    tol = tol or dtype_tol(x.dtype, "chain")
    errs = {"y": rel_err(y.reshape(ref[0].shape), ref[0]), "dx": rel_err(dx.reshape(x2d.shape),
                                                                          ref[1])}
    for j, r in enumerate(layer._slot_rank):
        if tokens[j]:
            errs[f"dA{j}"] = rel_err(das[j][:r], ref[2][j][:r])
            errs[f"dB{j}"] = rel_err(dbs[j][:, :r], ref[3][j][:, :r])
        else:  # a slot with no rows: zero gradient (still in the graph)
            assert das[j] is not None and torch.count_nonzero(das[j]) == 0
            assert torch.count_nonzero(dbs[j]) == 0
        assert torch.count_nonzero(das[j][r:]) == 0 and torch.count_nonzero(dbs[j][:, r:]) == 0
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return y


# ---- the two paths against the oracle ------------------------------------------------------------
PATHS = [pytest.param("triton", marks=requires_kernel_device()), "eager"]


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("p,pos", [(0.0, "pre"), (0.3, "pre"), (0.3, "post")])
def test_nn_linear_base_each_slot_equals_its_single_lora(backend, p, pos):
    layer = make_layer(make_base("linear").to(KERNEL_DEVICE), backend=backend, dropout=p,
                       pos=pos)
    y = check_layer(layer, randn(10, 2, K, seed=1).to(KERNEL_DEVICE), TOKENS, p=p, pos=pos)
    assert y.shape == (10, 2, N)
    plan = multi_lora_plan(layer)
    assert (plan.path, plan.kind) == (("fused", "linear") if backend == "triton" else
                                      ("eager", None))


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("kind", ["column", "row"])
def test_megatron_bases_each_slot_equals_its_single_lora(kind, backend):
    layer = make_layer(make_base(kind), backend=backend, dropout=0.2)
    check_layer(layer, randn(10, 2, K, seed=2), TOKENS, p=0.2)
    plan = multi_lora_plan(layer)
    assert plan.kind == (kind if backend == "triton" else None)


def test_slot_loop_when_grouped_mm_cannot_run():
    # K = 38 is not a multiple of 4 (grouped mm's 16-byte strides): the loop, and the plan says so
    layer = make_layer(make_base("linear", k=38), backend="eager")
    check_layer(layer, randn(20, 38, seed=3), TOKENS)
    assert multi_lora_plan(layer).eager_impl.startswith("slot loop (K=38")


@requires_kernel_device()
def test_bf16_fused_and_eager_paths_give_the_same_masks():
    # one seed, one mask: both paths drop the same elements, so they agree to bf16 rounding
    base = make_base("linear", dtype=torch.bfloat16).to(KERNEL_DEVICE)
    x = randn(20, K, seed=4).to(KERNEL_DEVICE, torch.bfloat16)
    fused = make_layer(base, backend="triton", dropout=0.5)
    check_layer(fused, x, TOKENS, p=0.5)
    eager = make_layer(base, backend="eager", dropout=0.5)
    got = [run(m, x, TOKENS) for m in (fused, eager)]
    assert rel_err(got[0][0], got[1][0]) < dtype_tol(torch.bfloat16, "chain")
    assert rel_err(got[0][1], got[1][1]) < dtype_tol(torch.bfloat16, "chain")


def test_scale_is_alpha_over_rank_in_fp32_never_rounded_to_bf16():
    # alpha = 1/3 at rank 3: the bf16 bookkeeping buffer rounds it, the op's scale does not
    layer = make_layer(make_base("linear", dtype=torch.bfloat16), backend="eager",
                       ranks=[3, 8], alphas=[1 / 3, 8.0])
    _, _, scales = layer.slot_tensors(torch.device("cpu"))
    assert scales.dtype == torch.float32
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    assert scales[0] == f32(1 / 3) / f32(3.0)
    assert layer.alpha_values.dtype == torch.bfloat16 and layer.alpha_values[0].item() != 1 / 3


def test_slots_are_views_of_one_stack_and_copied_only_when_re_homed():
    layer = make_layer(make_base("linear"), backend="eager")
    a, b, why = layer.stacked_factors()
    assert why == "" and a.shape == (4, R_MAX, K) and b.shape == (4, N, R_MAX)
    assert a.data_ptr() == layer.adapters[0].linear_in.weight.data_ptr()
    assert b[2].data_ptr() == layer.adapters[2].linear_out.weight.data_ptr()
    ref = check_layer(layer, randn(20, K, seed=5), TOKENS)
    # an optimizer's parameter buffer (or anything else) re-homes a slot: copied, still right
    with torch.no_grad():
        p = layer.adapters[1].linear_in.weight
        p.data = p.data.clone()
    assert "not consecutive in one stack" in layer.stacked_factors()[2]
    torch.testing.assert_close(check_layer(layer, randn(20, K, seed=5), TOKENS), ref)
    # .to() stacks them again (fp64 here), still one view per slot
    layer.double()
    a, _, why = layer.stacked_factors()
    assert why == "" and a.dtype == torch.float64
    assert a.data_ptr() == layer.adapters[0].linear_in.weight.data_ptr()
    # fp64 compute, but the slot table's scale is fp32 (as in the kernels): 7/6 off by ~3e-8
    check_layer(layer, randn(20, K, seed=5, dtype=torch.float64), TOKENS, tol=1e-7)


def test_plan_reasons():
    layer = make_layer(make_base("linear"), backend="eager")
    plan, source = training_plan(layer)
    assert (plan.path, plan.reason, source) == ("eager", "requested by argument", "planned")
    run(layer, randn(20, K), TOKENS)
    assert training_plan(layer) == (multi_lora_plan(layer), "last forward")
    auto = make_layer(make_base("linear"), backend="auto")
    auto.to_wrap.weight.requires_grad_(True)
    run(auto, randn(20, K), TOKENS)
    assert multi_lora_plan(auto).path == "eager"
    assert "base weight requires grad" in multi_lora_plan(auto).reason


@pytest.mark.usefixtures("megatron_tp1")
def test_norm_base_takes_the_module_path_and_says_why():
    from bridge.layers import LayerNormColumnParallelLinear
    from tests.megatron_utils import make_config

    base = LayerNormColumnParallelLinear(K, N, config=make_config(), init_method=nn.init.normal_,
                                         bias=True, gather_output=False,
                                         skip_bias_add=False).requires_grad_(False)
    layer = make_layer(base, backend="auto")
    y = run(layer, randn(20, K, seed=6), TOKENS)[0]
    assert torch.isfinite(y).all()
    plan = multi_lora_plan(layer)
    assert plan.path == "eager" and "fuses a norm" in plan.reason


# ---- slots, lifecycle and errors on one layer -------------------------------------------------
def test_cleared_slot_is_silent_and_re_initialised():
    layer = make_layer(make_base("linear"), backend="eager", row_init_method="zero")
    layer.adapters[2].linear_out.weight.data.fill_(1.0)
    layer.clear_adapter_slot(2)
    assert layer._slot_alpha[2] == 0.0 and layer._slot_rank[2] == R_MAX
    assert layer.alpha_values[2] == 0 and layer.rank_values[2] == R_MAX
    assert torch.count_nonzero(layer.adapters[2].linear_out.weight) == 0  # B re-init: zero
    x = randn(20, K, seed=7)
    y = run(layer, x, [0, 0, 20, 0])[0]
    torch.testing.assert_close(y, layer.to_wrap(x))  # alpha 0: the base alone


def test_init_adapter_slot_masks_the_padding_and_checks_its_arguments():
    layer = MultiLoRALinear(make_base("linear"), 2, R_MAX, 16, "lin", row_init_method="normal")
    layer.init_adapter_slot(1, 3, 6.0)
    assert torch.count_nonzero(layer.adapters[1].linear_in.weight[3:]) == 0
    assert torch.count_nonzero(layer.adapters[1].linear_out.weight[:, 3:]) == 0
    assert torch.count_nonzero(layer.adapters[1].linear_out.weight[:, :3]) > 0
    for bad in (0, -1, R_MAX + 1, 2.0):
        with pytest.raises(PEFTConfigError, match=r"adapter rank .* must be an int in \(0, 8\]"):
            layer.init_adapter_slot(0, bad, 1.0)
    with pytest.raises(AssertionError):  # upstream asserts: PEFTConfigError is one
        layer.init_adapter_slot(0, 0, 1.0)
    with pytest.raises(PEFTConfigError, match="finite"):
        layer.init_adapter_slot(0, 2, math.nan)
    with pytest.raises(IndexError, match="slot 2 out of range: the layer has 2 slots"):
        layer.init_adapter_slot(2, 2, 1.0)


def test_token_count_errors():
    layer = make_layer(make_base("linear"), backend="eager")
    with pytest.raises(RuntimeError, match="call set_tokens_per_adapter_slot"):
        layer(randn(20, K))
    set_tokens_per_adapter_slot(layer, torch.tensor([5, 5, 5, 4]))
    with pytest.raises(RuntimeError, match="cover 19 rows but this layer sees 20"):
        layer(randn(20, K))
    with pytest.raises(ValueError, match="tokens for 3 adapter slots, the model has 4"):
        set_tokens_per_adapter_slot(layer, torch.tensor([5, 5, 10]))
    with pytest.raises(ValueError, match=">= 0"):
        set_tokens_per_adapter_slot(layer, torch.tensor([25, -5, 0, 0]))
    with pytest.raises(TypeError, match="integer"):
        set_tokens_per_adapter_slot(layer, torch.tensor([5.0, 5.0, 5.0, 5.0]))


def test_dense_slot_helpers_keep_upstream_names_and_state_dict_keys():
    layer = make_layer(make_base("linear"), backend="eager")
    keys = set(layer.state_dict())
    assert {"weight", "bias"} <= keys
    assert {f"adapters.{i}.linear_{f}.weight" for i in range(4) for f in ("in", "out")} <= keys
    assert {"alpha_values", "rank_values"} <= dict(layer.named_buffers()).keys()
    fresh = make_layer(make_base("linear"), backend="eager")
    fresh.load_state_dict(layer.state_dict())
    for a, b in zip(fresh.adapters, layer.adapters, strict=True):
        assert torch.equal(a.linear_in.weight.nan_to_num(), b.linear_in.weight.nan_to_num())


@pytest.mark.parametrize("counts,start,rows,want", [
    ([10, 54, 0, 0], 0, 16, [10, 6, 0, 0]), ([10, 54, 0, 0], 16, 16, [0, 16, 0, 0]),
    ([10, 54, 0, 0], 0, 64, [10, 54, 0, 0]), ([4, 3, 5, 0], 3, 6, [1, 3, 2, 0])])
def test_narrow_counts_to_a_sequence_parallel_window(counts, start, rows, want):
    from bridge.peft.multi_lora_slots import _narrow_counts

    assert _narrow_counts(counts, start, rows) == want
    got = _narrow_token_counts_to_window(torch.tensor(counts, dtype=torch.int32), start, rows)
    assert got.tolist() == want and got.dtype == torch.int32
