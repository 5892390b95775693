"""The fused multi-adapter LoRA op (MultiLoRA) against single LoRA per slot, on ``KERNEL_DEVICE``
(tests/conftest.py): the CPU interpreter here, the compiled kernels on a GPU.

The oracle is ``lora_linear_ref`` in fp64, run slot by slot on that slot's rows with that slot's
adapter (A[j, :rank_j], B[j, :, :rank_j], scale alpha_j / rank_j) and the keep mask the kernels
draw; y and every gradient are compared by relative error (tests/numerics.py). The rank padding
of A and B holds NaN: a kernel that read it would turn the result NaN, and its gradient must be
exactly zero. Shapes stay tiny (the interpreter) but cross every boundary: the interpreter's
64-row tiles hold several slots (and empty ones), K/N are not multiples of 64, ranks sit below,
at and above the 16/32 rank steps, and the max rank is padded to its bucket.
"""

from __future__ import annotations

import importlib
import logging
import math

import pytest
import torch
from bridge.kernels import backend as backend_mod
from bridge.kernels.backend import BackendUnavailableError
from bridge.kernels.multi_lora_linear import multi_lora_linear, multi_lora_linear_ref
from bridge.kernels.philox import dropout_keep_mask

from tests.conftest import KERNEL_DEVICE as DEV
from tests.conftest import requires_kernel_device
from tests.numerics import dtype_tol, lora_inputs, rel_err, slotwise_lora_ref

mlora = importlib.import_module("bridge.kernels.multi_lora_linear")
mlora_kernels = importlib.import_module("bridge.kernels._multi_lora_kernels")
pytestmark = requires_kernel_device()
SEED = 1234


def _inputs(tokens, k, n, r_max, ranks, dtype, *, lead=None, bias=True, seed=0):
    """x [*lead, K] (lead defaults to (M,)), W, b from tests.numerics.lora_inputs; stacked
    A [n, r_max, K] and B [n, N, r_max] with NaN beyond each slot's rank."""
    m = sum(tokens)
    x, w, b, _, _ = lora_inputs(lead or (m,), k, n, 1, dtype, bias=bias, seed=seed, device=DEV)
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randn(len(tokens), r_max, k, generator=g) / k**0.5
    bb = torch.randn(len(tokens), n, r_max, generator=g)
    for j, r in enumerate(ranks):
        a[j, r:] = math.nan
        bb[j, :, r:] = math.nan
    a = a.to(DEV, dtype).requires_grad_()
    bb = bb.to(DEV, dtype).requires_grad_()
    return x, w, b, a, bb


def _check(x, w, b, a, bb, tokens, ranks, alphas, *, p=0.0, pos="pre", skip=False,
           backend="triton", gemm="fused", dy=None, tol=None):
    """Run the op, compare y and all gradients with the oracle; padding grads exactly zero."""
    y = multi_lora_linear(x, w, b, a, bb, tokens, ranks, alphas, dropout=p, dropout_position=pos,
                          skip_bias_add=skip, seed=SEED, backend=backend, gemm=gemm)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(DEV, y.dtype)
    y.backward(dy)
    mask = None
    if p > 0:  # one seed, one mask on every backend (kernels/philox.py)
        mask = dropout_keep_mask(SEED, x.shape if pos == "pre" else y.shape, p, DEV)
    k, n = w.shape[1], w.shape[0]
    y_ref, dx_ref, dbias_ref, da_ref, db_ref = slotwise_lora_ref(
        x.reshape(-1, k), w, b, a, bb, tokens, ranks, alphas, dy.reshape(-1, n), p=p, pos=pos,
        mask=None if mask is None else mask.reshape(-1, mask.shape[-1]), skip_bias_add=skip)
    y_ref, dx_ref = y_ref.view(*x.shape[:-1], n), dx_ref.view(x.shape)
    tol = tol or dtype_tol(x.dtype)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    errs = {"y": rel_err(y, y_ref), "dx": rel_err(x.grad, dx_ref), "dA": rel_err(a.grad, da_ref),
            "dB": rel_err(bb.grad, db_ref)}
    if b is not None and not skip:
        errs["dbias"] = rel_err(b.grad, dbias_ref)
    elif b is not None:
        assert b.grad is None  # the bias is not part of y
    bad = {k: v for k, v in errs.items() if not v <= tol}  # NaN fails too
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    for t in (x, a, bb):
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
    for j, r in enumerate(ranks):
        assert torch.count_nonzero(a.grad[j, r:]) == 0 and torch.count_nonzero(bb.grad[j, :, r:]) == 0
    return y


# (dtype, tokens, K, N, r_max, ranks, alphas, p, position, bias, skip_bias_add). One 64-row
# interpreter tile spans 3 slots plus an empty one (case 1), tiles 1-2 of case 2 span slots 0-3;
# rank 40 takes two 32-wide GEMM rank steps; alpha 0 silences a slot; 8 one-row slots in a tile.
CASES = [
    (torch.float32, [5, 0, 30, 11], 40, 24, 20, [3, 20, 8, 17], [16.0, 1.0, 0.0, 4.0], 0.0, "pre",
     True, False),
    (torch.float32, [70, 3, 0, 25], 72, 40, 40, [40, 1, 7, 33], [32.0, 2.0, 8.0, 3.0], 0.1, "pre",
     True, False),
    (torch.float32, [1] * 8, 40, 24, 8, [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8], 0.0,
     "pre", False, False),
    (torch.float16, [9, 40], 64, 96, 16, [16, 5], [32.0, 10.0], 0.1, "post", True, False),
    (torch.float16, [1], 40, 72, 8, [8], [16.0], 0.0, "pre", True, True),
    (torch.bfloat16, [17, 16, 31], 72, 40, 32, [32, 9, 1], [64.0, 9.0, 2.0], 0.1, "pre", False,
     False),
    (torch.bfloat16, [33, 0, 0, 2, 12], 40, 72, 64, [64, 3, 2, 50, 16], [16, 3, 4, 50, 8], 0.1,
     "post", True, True),
]


@pytest.mark.parametrize("dtype,tokens,k,n,r_max,ranks,alphas,p,pos,bias,skip", CASES,
                         ids=[f"case{i}" for i in range(len(CASES))])
def test_each_slot_equals_its_single_lora(dtype, tokens, k, n, r_max, ranks, alphas, p, pos,
                                          bias, skip):
    x, w, b, a, bb = _inputs(tokens, k, n, r_max, ranks, dtype, bias=bias)
    _check(x, w, b, a, bb, tokens, ranks, alphas, p=p, pos=pos, skip=skip)


def test_leading_dims_and_empty_edge_slots():
    # x [2, 7, K]: rows flattened; the first and the last slot are empty; 'post' dropout
    tokens, ranks = [0, 14, 0], [4, 12, 16]
    x, w, b, a, bb = _inputs(tokens, 40, 24, 16, ranks, torch.float32, lead=(2, 7))
    _check(x, w, b, a, bb, tokens, ranks, [8.0, 24.0, 1.0], p=0.2, pos="post")


@pytest.mark.parametrize("pos", ["pre", "post"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cublas_strategy(dtype, pos):
    # torch.addmm(P, x, W^T) with our low-rank term P as its input; P is rounded to the storage
    # dtype once before cuBLAS adds it, hence the "chain" tolerance
    tokens, ranks = [20, 0, 45], [8, 2, 17]
    x, w, b, a, bb = _inputs(tokens, 40, 72, 24, ranks, dtype)
    _check(x, w, b, a, bb, tokens, ranks, [16.0, 2.0, 8.0], p=0.1, pos=pos, gemm="cublas",
           tol=dtype_tol(dtype, "chain"))


def test_gemm_strategy_from_the_environment(monkeypatch):
    # gemm='auto' follows BRIDGE_LORA_GEMM (kernels/gemm_strategy.py), else the heuristic
    # ('fused' off sm_90); an unknown value is an error naming the allowed ones
    tokens, ranks = [9, 14], [4, 8]
    x, w, b, a, bb = _inputs(tokens, 40, 24, 8, ranks, torch.float32)
    run = lambda **kw: multi_lora_linear(x, w, b, a, bb, tokens, ranks, [4.0, 8.0],
                                         backend="triton", **kw)
    monkeypatch.setenv("BRIDGE_LORA_GEMM", "cublas")
    assert torch.equal(run(), run(gemm="cublas"))
    monkeypatch.delenv("BRIDGE_LORA_GEMM")
    assert torch.equal(run(), run(gemm="fused")) and not torch.equal(run(), run(gemm="cublas"))
    monkeypatch.setenv("BRIDGE_LORA_GEMM", "cutlass")
    with pytest.raises(ValueError, match="BRIDGE_LORA_GEMM value 'cutlass'"):
        run()


def test_dadb_split_over_rows(monkeypatch):
    # rows of each slot split into chunks (fp32 partials added in order): the GPU grid at M=8192
    monkeypatch.setattr(mlora_kernels, "WGRAD_MIN_ROWS", 4)
    for pos in ("pre", "post"):
        tokens, ranks = [30, 1, 0, 37], [5, 16, 3, 9]
        x, w, b, a, bb = _inputs(tokens, 40, 24, 16, ranks, torch.float32)
        _check(x, w, b, a, bb, tokens, ranks, [4.0, 1.0, 1.0, 18.0], p=0.1, pos=pos)


@pytest.mark.parametrize("gemm", ["fused", "cublas"])
def test_backward_is_bitwise_deterministic(monkeypatch, gemm):
    # no atomics: dA/dB partials over row chunks are added in a fixed order, so two backward
    # passes give the same bits (what a GPU run checks; the interpreter is serial anyway)
    monkeypatch.setattr(mlora_kernels, "WGRAD_MIN_ROWS", 4)
    tokens, ranks = [30, 1, 0, 37], [5, 16, 3, 9]
    x, w, b, a, bb = _inputs(tokens, 40, 24, 16, ranks, torch.bfloat16)
    dy = torch.randn(sum(tokens), 24, generator=torch.Generator().manual_seed(4)).to(DEV,
                                                                                    x.dtype)

    def run():
        for t in (x, b, a, bb):
            t.grad = None
        y = multi_lora_linear(x, w, b, a, bb, tokens, ranks, [4.0, 1.0, 1.0, 18.0], dropout=0.1,
                              seed=5, backend="triton", gemm=gemm)
        y.backward(dy)
        return [y.detach(), *(t.grad.clone() for t in (x, b, a, bb))]

    first = run()
    for name, u, v in zip(("y", "dx", "dbias", "dA", "dB"), first, run(), strict=True):
        assert torch.equal(u, v), name


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_backend(monkeypatch, dtype, grouped):
    if not grouped:
        monkeypatch.setattr(mlora, "grouped_mm_available", lambda *a, **k: (False, "forced"))
    elif not mlora.grouped_mm_available(dtype, 40, 24, 20)[0]:
        pytest.skip(mlora.grouped_mm_available(dtype, 40, 24, 20)[1])
    tokens, ranks = [5, 0, 30, 11], [3, 20, 8, 17]
    for p, pos in [(0.0, "pre"), (0.1, "pre"), (0.1, "post")]:
        x, w, b, a, bb = _inputs(tokens, 40, 24, 20, ranks, dtype)
        _check(x, w, b, a, bb, tokens, ranks, [6.0, 1.0, 16.0, 4.0], p=p, pos=pos,
               backend="eager")


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_expanded_dy_matches_dense(backend):
    # y.sum().backward() hands the op a stride-0 dY; it must equal a dense ones dY bitwise
    tokens, ranks = [6, 0, 9], [4, 1, 8]
    x, w, b, a, bb = _inputs(tokens, 40, 24, 8, ranks, torch.float32)

    def grads(expanded):
        for t in (x, b, a, bb):
            t.grad = None
        y = multi_lora_linear(x, w, b, a, bb, tokens, ranks, [1.0, 1.0, 2.0], dropout=0.1,
                              seed=3, backend=backend)
        y.sum().backward() if expanded else y.backward(torch.ones_like(y))
        return [t.grad.clone() for t in (x, b, a, bb)]

    for g1, g2 in zip(grads(True), grads(False), strict=True):
        assert torch.equal(g1, g2)
    assert not torch.isnan(grads(True)[0]).any()


def test_empty_batch():
    x, w, b, a, bb = _inputs([0, 0], 40, 24, 8, [8, 3], torch.bfloat16)
    y = multi_lora_linear(x, w, b, a, bb, [0, 0], [8, 3], [1.0, 1.0], dropout=0.1,
                          backend="triton")
    assert y.shape == (0, 24) and y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.shape == (0, 40)
    for t in (b, a, bb):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def test_slot_values_as_device_tensors_and_seeds():
    # tokens/ranks/alphas as tensors on x's device give the same bits as lists; a seed repeats
    # its mask bit for bit, seed=None draws from torch's generator; eval mode drops dropout
    tokens, ranks, alphas = [7, 0, 12], [4, 2, 8], [8.0, 1.0, 4.0]
    x, w, b, a, bb = _inputs(tokens, 40, 24, 8, ranks, torch.bfloat16)
    run = lambda t, r, al, **kw: multi_lora_linear(x, w, b, a, bb, t, r, al, dropout=0.3,
                                                   backend="triton", **kw)
    as_t = lambda v, dt: torch.tensor(v, dtype=dt, device=DEV)
    y_list = run(tokens, ranks, alphas, seed=11)
    y_tens = run(as_t(tokens, torch.int64), as_t(ranks, torch.int32),
                 as_t(alphas, torch.float32), seed=11)
    assert torch.equal(y_list, y_tens)
    assert not torch.equal(y_list, run(tokens, ranks, alphas, seed=12))
    torch.manual_seed(5)
    y1, y2 = run(tokens, ranks, alphas), run(tokens, ranks, alphas)
    torch.manual_seed(5)
    assert torch.equal(y1, run(tokens, ranks, alphas)) and not torch.equal(y1, y2)
    assert torch.equal(run(tokens, ranks, alphas, training=False),
                       multi_lora_linear(x, w, b, a, bb, tokens, ranks, alphas, backend="triton"))


def _saved_bytes(fn, params) -> int:
    """Bytes of distinct storages autograd saves while running ``fn``, ``params`` excluded."""
    skip = {t.untyped_storage().data_ptr() for t in params}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saved_bytes_are_x_s_and_the_slot_table():
    tokens, ranks = [20, 0, 28], [8, 3, 16]
    x, w, b, a, bb = _inputs(tokens, 96, 64, 16, ranks, torch.float32)
    fused = _saved_bytes(lambda: multi_lora_linear(x, w, b, a, bb, tokens, ranks, [1, 1, 1],
                                                   dropout=0.1, seed=1, backend="triton"),
                         (w, b, a, bb))
    m, n_slots = sum(tokens), len(tokens)
    table = (n_slots + 1) * 4 + n_slots * 4 + n_slots * 4 + 8  # offsets, ranks, scales, seed
    assert fused <= x.numel() * 4 + m * 16 * 4 + table + 64, fused  # x, S fp32 [M, r_max]


def test_opcheck():
    # the forward with a 'pre' seed and fused GEMM, without dropout/bias on the cuBLAS strategy;
    # the backward with the 'post' seed on the cuBLAS strategy
    tokens, ranks = [3, 0, 4], [2, 4, 3]
    x, w, b, a, bb = _inputs(tokens, 24, 20, 4, ranks, torch.float32)
    a, bb = a.detach().nan_to_num(), bb.detach().nan_to_num()
    offsets = torch.tensor([0, 3, 3, 7], dtype=torch.int32, device=DEV)
    table = (offsets, torch.tensor(ranks, dtype=torch.int32, device=DEV),
             torch.tensor([1.0, 0.5, 2.0], device=DEV))
    seed = torch.tensor([7], device=DEV)
    fwd = torch.ops.bridge.multi_lora_linear_fwd.default
    torch.library.opcheck(fwd, (x, w, b, a, bb, *table, seed, 0.1, False, False, True))
    torch.library.opcheck(fwd, (x, w, None, a, bb, *table, None, 0.0, True, True, False))
    dy, s_mat = torch.randn(7, 20, device=DEV), torch.randn(7, 4, device=DEV)
    torch.library.opcheck(torch.ops.bridge.multi_lora_linear_bwd.default,
                          (dy, x.detach(), w, a, bb, s_mat, *table, seed, 0.1, True, True, True))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    tokens, ranks = [4, 0, 6], [4, 2, 8]
    x, w, b, a, bb = _inputs(tokens, 40, 24, 8, ranks, torch.float32)
    tok_t = torch.tensor(tokens, device=DEV)
    rank_t = torch.tensor(ranks, dtype=torch.int32, device=DEV)
    alpha_t = torch.tensor([8.0, 2.0, 4.0], device=DEV)

    def f(x, w, b, a, bb, tok_t, rank_t, alpha_t):
        return multi_lora_linear(x, w, b, a, bb, tok_t, rank_t, alpha_t, dropout=0.1, seed=21,
                                 backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    got = []
    for fn in (compiled, f):
        for t in (x, b, a, bb):
            t.grad = None
        y = fn(x, w, b, a, bb, tok_t, rank_t, alpha_t)
        y.sum().backward()
        got.append([y.detach(), *(t.grad for t in (x, b, a, bb))])
    for u, v in zip(*got, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
    # the slot values are still checked inside the compiled graph (in the op)
    with pytest.raises(ValueError, match="tokens_per_slot sums to 11 but x has 10 rows"):
        compiled(x, w, b, a, bb, tok_t + torch.tensor([0, 1, 0], device=DEV), rank_t, alpha_t)


# ---- bad input and backend choice ----------------------------------------------------------


def test_bad_slot_values():
    tokens, ranks, alphas = [3, 5], [2, 4], [1.0, 1.0]
    x, w, b, a, bb = _inputs(tokens, 16, 8, 4, ranks, torch.float32)
    call = lambda t=tokens, r=ranks, al=alphas, **kw: multi_lora_linear(
        x, w, b, a, bb, t, r, al, backend="triton", **kw)
    as_t = lambda v, dt=torch.int64: torch.tensor(v, dtype=dt, device=DEV)
    with pytest.raises(ValueError, match="tokens_per_slot sums to 7 but x has 8 rows"):
        call([3, 4])
    with pytest.raises(ValueError, match="tokens_per_slot sums to 9 but x has 8 rows"):
        call(as_t([4, 5]))  # a tensor: checked inside the op
    call(as_t([4, 5]), validate=False)  # trusted: no check, no sync (must not raise)
    with pytest.raises(ValueError, match="tokens_per_slot must be >= 0"):
        call([-1, 9])
    with pytest.raises(ValueError, match=r"ranks must lie in \[1, r_max = 4\].*slot 1: 5"):
        call(r=[2, 5])
    with pytest.raises(ValueError, match=r"slot 0: 0"):
        call(r=as_t([0, 4], torch.int32))
    with pytest.raises(ValueError, match="one entry per slot"):
        call([8])
    with pytest.raises(ValueError, match="one entry per slot"):
        call(al=as_t([1.0, 1.0, 1.0], torch.float32))
    with pytest.raises(TypeError, match="tokens_per_slot must hold integers"):
        call(as_t([3.0, 5.0], torch.float32))
    with pytest.raises(TypeError, match="ranks must hold ints"):
        call(r=[2.0, 4])
    with pytest.raises(ValueError, match="alpha / rank must be finite"):
        call(al=[math.inf, 1.0])
    with pytest.raises(ValueError, match="tokens_per_slot sums to 7"):
        multi_lora_linear_ref(x, w, b, a, bb, [3, 4], ranks, alphas)


def test_bad_shapes_dtypes_devices():
    tokens, ranks, alphas = [3, 5], [2, 4], [1.0, 1.0]
    x, w, b, a, bb = _inputs(tokens, 16, 8, 4, ranks, torch.float32)
    call = lambda *t, **kw: multi_lora_linear(*t, tokens, ranks, alphas, backend="triton", **kw)
    with pytest.raises(ValueError, match=r"lora_a \[n_slots, r_max, K\]"):
        call(x, w, b, a[0], bb)
    with pytest.raises(ValueError, match="in_features disagree"):
        call(x[:, :15], w, b, a, bb)
    with pytest.raises(ValueError, match=r"lora_b must have shape \[n_slots, N, r_max\] = \[2, 8, 4\]"):
        call(x, w, b, a, bb[:, :, :3])
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        call(x, w, b[:7], a, bb)
    with pytest.raises(TypeError, match="share one dtype"):
        call(x, w.half(), b, a, bb)
    with pytest.raises(ValueError, match="one device"):
        call(x, w.to("meta"), b, a, bb)
    with pytest.raises(ValueError, match="dropout must be"):
        call(x, w, b, a, bb, dropout=1.0)
    with pytest.raises(ValueError, match="unknown gemm 'cutlass'"):
        call(x, w, b, a, bb, gemm="cutlass")


def test_backend_fallbacks(caplog):
    # a trainable base or too many slots: 'triton' raises with the reason, 'auto' runs eager
    tokens, ranks, alphas = [3, 5], [2, 4], [1.0, 1.0]
    x, w, b, a, bb = _inputs(tokens, 16, 8, 4, ranks, torch.float32)
    w.requires_grad_()
    with pytest.raises(BackendUnavailableError, match="base weight requires grad"):
        multi_lora_linear(x, w, b, a, bb, tokens, ranks, alphas, backend="triton")
    backend_mod._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="bridge.kernels"):
        y = multi_lora_linear(x, w, b, a, bb, tokens, ranks, alphas, backend="auto")
    assert any("multi_lora_linear runs on the eager backend" in r.getMessage() for r in caplog.records)
    y.sum().backward()
    assert w.grad is not None  # the eager path trains the base weight
    n = mlora.MAX_SLOTS + 1
    xs, ws, _, a_many, b_many = _inputs([1] * n, 16, 8, 1, [1] * n, torch.float32, bias=False)
    with pytest.raises(BackendUnavailableError, match=f"{n} slots > {n - 1}"):
        multi_lora_linear(xs, ws, None, a_many, b_many, [1] * n, [1] * n, [1.0] * n,
                          backend="triton")


@pytest.mark.parametrize("pos", ["pre", "post"])
def test_one_seed_one_mask_on_every_backend(pos):
    # the eager backend draws kernels/philox.py's mask: for a given seed (or generator state when
    # seed=None) it keeps the same elements as the Triton kernels, so the outputs agree
    tokens, ranks = [6, 0, 9], [4, 1, 8]
    x, w, b, a, bb = _inputs(tokens, 40, 24, 8, ranks, torch.float32)
    run = lambda backend, **kw: multi_lora_linear(x, w, b, a, bb, tokens, ranks, [8.0, 1.0, 2.0],
                                                  dropout=0.5, dropout_position=pos,
                                                  backend=backend, **kw)
    assert rel_err(run("eager", seed=7), run("triton", seed=7)) < dtype_tol(torch.float32)
    torch.manual_seed(3)
    eager = run("eager")
    torch.manual_seed(3)
    assert rel_err(eager, run("triton")) < dtype_tol(torch.float32)
    assert rel_err(eager, run("triton", seed=8)) > 1e-2  # another seed: another mask
