"""The grouped (MoE expert) LoRA linear against its fp64 reference, on ``KERNEL_DEVICE``
(tests/conftest.py): the CPU interpreter here, the compiled kernels on a GPU.

Every case compares y and every gradient (x, bias, A, B) with ``grouped_lora_linear_ref`` in fp64,
fed the keep mask the kernels draw (``dropout_keep_mask`` over the sorted [M, K] input or [M, N]
output), by relative error. Routing is uneven on purpose: experts without tokens, one expert
holding every token, an expert spanning two 64-row interpreter tiles with M not a multiple of the
tile, M = 1. Layouts: shared A/B (Megatron-Bridge's default), per-expert A/B, both shared-outer
variants (fc1: A shared, B per expert; fc2: the reverse); stacked [E, N, K] weights and separate
per-expert weights read through the address array.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from bridge.kernels import backend as backend_mod
from bridge.kernels.backend import BackendUnavailableError
from bridge.kernels.grouped_lora_linear import grouped_lora_linear, grouped_lora_linear_ref
from bridge.kernels.philox import dropout_keep_mask

from tests.conftest import KERNEL_DEVICE as DEV
from tests.conftest import requires_kernel_device
from tests.numerics import dtype_tol, rel_err

glin = importlib.import_module("bridge.kernels.grouped_lora_linear")
gkern = importlib.import_module("bridge.kernels._grouped_kernels")
pytestmark = requires_kernel_device()
SEED = 4321


def _inputs(counts, k, n, r, dtype, *, a_per_expert, b_per_expert, bias=True, gen_seed=0):
    """Fresh random (x [M, K], W [E, N, K], b [E, N] or None, A, B) at a real layer's scale,
    drawn on the CPU and placed on DEV; x, b, A, B require grad."""
    e, m = len(counts), sum(counts)
    g = torch.Generator().manual_seed(gen_seed)
    on = lambda t, grad=True: t.to(device=DEV, dtype=dtype).requires_grad_(grad)
    x = on(torch.randn(m, k, generator=g))
    w = on(torch.randn(e, n, k, generator=g) / k**0.5, False)
    b = on(torch.randn(e, n, generator=g)) if bias else None
    a = on(torch.randn(*((e,) if a_per_expert else ()), r, k, generator=g) / k**0.5)
    bb = on(torch.randn(*((e,) if b_per_expert else ()), n, r, generator=g))
    return x, w, b, a, bb


def _as_list(w):
    """Separate per-expert weights (own storages, as TE's weight{i} parameters)."""
    return [w[i].clone() for i in range(w.shape[0])]


def _check(x, w, b, a, bb, counts, *, p, pos, weights=None, dy=None, seed=SEED, scale=0.75):
    """Run the Triton path and the fp64 reference under the kernels' mask; compare all."""
    y = grouped_lora_linear(x, w if weights is None else weights, b, a, bb, counts, scale=scale,
                            dropout=p, dropout_position=pos, seed=seed, backend="triton")
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(DEV, y.dtype)
    y.backward(dy)
    mask = None
    if p > 0:
        mask = dropout_keep_mask(seed, x.shape if pos == "pre" else y.shape, p, DEV)
    r64 = [None if t is None else t.detach().double().requires_grad_() for t in (x, b, a, bb)]
    y_ref = grouped_lora_linear_ref(r64[0], w.double(), r64[1], r64[2], r64[3], counts,
                                    scale=scale, dropout=p, dropout_mask=mask,
                                    dropout_position=pos)
    y_ref.backward(dy.double())
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    errs = {"y": rel_err(y, y_ref)}
    for name, t, t_ref in zip(("dx", "dbias", "dA", "dB"), (x, b, a, bb), r64, strict=True):
        if t is not None:
            assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype, name
            errs[name] = rel_err(t.grad, t_ref.grad)
    tol = dtype_tol(x.dtype)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    return y


# (dtype, tokens_per_expert, K, N, r, A per expert, B per expert, separate weights, bias, p, pos).
# K=72/N=40 are not multiples of the 64-wide interpreter tiles; [70, 0, 2] puts one expert over
# two row tiles (M=72 not a multiple of 64) beside an empty one; r=1/8 pad to 16, 33 to 64,
# 64 takes two 32-wide GEMM rank steps, 100 two rank tiles.
CASES = [
    (torch.float32, [5, 0, 9, 3], 40, 24, 8, True, True, False, True, 0.0, "pre"),
    (torch.float32, [70, 0, 2], 40, 24, 8, False, True, False, True, 0.1, "post"),  # fc1 outer
    (torch.float32, [0, 0, 13, 0], 72, 40, 8, True, False, True, False, 0.1, "pre"),  # fc2 outer
    (torch.float32, [1], 40, 24, 4, False, False, True, True, 0.1, "pre"),  # M = 1, shared
    (torch.float16, [3, 11, 0, 6], 72, 40, 16, True, True, True, True, 0.1, "post"),
    (torch.float16, [7, 2], 40, 72, 1, False, False, False, False, 0.1, "pre"),
    (torch.bfloat16, [0, 33, 0], 72, 40, 33, True, False, True, True, 0.1, "pre"),
    (torch.bfloat16, [4, 4, 4, 4, 4], 40, 24, 64, True, True, False, True, 0.1, "post"),
    (torch.bfloat16, [10, 10], 40, 24, 100, True, True, True, False, 0.0, "pre"),
]


@pytest.mark.parametrize("dtype,counts,k,n,r,a_e,b_e,separate,bias,p,pos", CASES,
                         ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_matches_fp64_reference(dtype, counts, k, n, r, a_e, b_e, separate, bias, p, pos):
    x, w, b, a, bb = _inputs(counts, k, n, r, dtype, a_per_expert=a_e, b_per_expert=b_e,
                             bias=bias)
    _check(x, w, b, a, bb, counts, p=p, pos=pos, weights=_as_list(w) if separate else None)


@pytest.mark.parametrize("strategy", ["partials", "two_pass"])
@pytest.mark.parametrize("pos", ["pre", "post"])
def test_per_expert_db_both_strategies(monkeypatch, strategy, pos):
    # dB_e from one pass over dY (per-tile partials reduced per expert) or from a second pass
    monkeypatch.setattr(glin, "DB_STRATEGY", strategy)
    counts = [70, 0, 5]
    x, w, b, a, bb = _inputs(counts, 40, 24, 8, torch.float32, a_per_expert=False,
                             b_per_expert=True)
    _check(x, w, b, a, bb, counts, p=0.1, pos=pos)


def test_auto_db_strategy_follows_the_traffic_model():
    # partials at small rank against the tile (cheaper than re-reading dY), a second pass at r=64
    assert glin._db_in_one_pass(tiles=64 + 7, m=8192, n=2048, r=16, elt=2)
    assert not glin._db_in_one_pass(tiles=64 + 7, m=8192, n=2048, r=64, elt=2)
    assert not glin._db_in_one_pass(tiles=10**4, m=10**6, n=14336, r=16, elt=2)  # byte cap


def test_non_contiguous_inputs():
    # x as a transposed view, per-expert A/B as permuted views of their leaves, a stacked weight
    # stored [E, K, N] (so W_e is read with K strides != 1): every stride is honoured
    counts, k, n, r = [9, 0, 14], 40, 24, 8
    g = torch.Generator().manual_seed(5)
    x = torch.randn(k, 23, generator=g).to(DEV).t().requires_grad_()
    w = (torch.randn(3, k, n, generator=g) / k**0.5).to(DEV).transpose(1, 2)
    a_t = (torch.randn(3, k, r, generator=g) / k**0.5).to(DEV).requires_grad_()
    b_t = torch.randn(r, 3, n, generator=g).to(DEV).requires_grad_()
    b = torch.randn(3, n, generator=g).to(DEV).requires_grad_()
    a, bb = a_t.transpose(1, 2), b_t.permute(1, 2, 0)
    assert not (x.is_contiguous() or w.is_contiguous() or a.is_contiguous() or bb.is_contiguous())
    for pos in ("pre", "post"):
        for t in (x, a_t, b_t, b):
            t.grad = None
        y = grouped_lora_linear(x, w, b, a, bb, counts, scale=0.5, dropout=0.1,
                                dropout_position=pos, seed=SEED, backend="triton")
        dy = torch.randn(y.shape, generator=g).to(DEV)
        y.backward(dy)
        mask = dropout_keep_mask(SEED, x.shape if pos == "pre" else y.shape, 0.1, DEV)
        r64 = [t.detach().double().requires_grad_() for t in (x, a_t, b_t, b)]
        y_ref = grouped_lora_linear_ref(r64[0], w.double(), r64[3], r64[1].transpose(1, 2),
                                        r64[2].permute(1, 2, 0), counts, scale=0.5, dropout=0.1,
                                        dropout_mask=mask, dropout_position=pos)
        y_ref.backward(dy.double())
        assert rel_err(y, y_ref) < dtype_tol(torch.float32)
        for t, t_ref in zip((x, a_t, b_t, b), r64, strict=True):
            assert rel_err(t.grad, t_ref.grad) < dtype_tol(torch.float32)


def test_expanded_dy_and_leading_dims():
    # y.sum().backward() hands the op a stride-0 dY: the same grads as a dense ones dY, bitwise;
    # x [2, 9, K] (leading dims) gives the same values as x [18, K]; list and tensor counts agree
    counts = [6, 0, 12]
    x, w, b, a, bb = _inputs(counts, 40, 24, 8, torch.float32, a_per_expert=True,
                             b_per_expert=True)

    def run(xx, tpe, backward):
        for t in (x, b, a, bb):
            t.grad = None
        y = grouped_lora_linear(xx, w, b, a, bb, tpe, scale=0.5, dropout=0.2, seed=3,
                                backend="triton")
        backward(y)
        return [y.detach().reshape(-1, 24), x.grad, b.grad, a.grad, bb.grad]

    expanded = run(x, counts, lambda y: y.sum().backward())
    dense = run(x, torch.tensor(counts), lambda y: y.backward(torch.ones_like(y)))
    lead = run(x.view(2, 9, 40), tuple(counts), lambda y: y.sum().backward())
    for u, v, t in zip(expanded, dense, lead, strict=True):
        assert torch.equal(u, v) and torch.equal(u, t.reshape(u.shape))


def test_empty_batch_and_eval_mode():
    x, w, b, a, bb = _inputs([0, 0, 0], 40, 24, 8, torch.bfloat16, a_per_expert=True,
                             b_per_expert=False)
    y = grouped_lora_linear(x, w, b, a, bb, [0, 0, 0], scale=0.5, dropout=0.1, backend="triton")
    assert y.shape == (0, 24) and y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.shape == (0, 40)
    for t in (b, a, bb):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()
    x, w, b, a, bb = _inputs([3, 5], 40, 24, 8, torch.float32, a_per_expert=True,
                             b_per_expert=True)
    run = lambda **kw: grouped_lora_linear(x, w, b, a, bb, [3, 5], scale=0.5, backend="triton",
                                           **kw)
    assert torch.equal(run(dropout=0.3, training=False), run(dropout=0.0))


def test_eager_backend_equals_reference_and_fused():
    counts = [4, 0, 7]
    x, w, b, a, bb = _inputs(counts, 40, 24, 8, torch.float32, a_per_expert=True,
                             b_per_expert=False)
    y_eager = grouped_lora_linear(x, _as_list(w), b, a, bb, counts, scale=0.5, backend="eager")
    y_ref = grouped_lora_linear_ref(x, w, b, a, bb, counts, scale=0.5)
    y_fused = grouped_lora_linear(x, w, b, a, bb, counts, scale=0.5, backend="triton")
    assert torch.equal(y_eager, y_ref)
    assert rel_err(y_fused, y_ref) < dtype_tol(torch.float32)
    drop = lambda s, backend="eager", pos="pre": grouped_lora_linear(  # noqa: E731
        x, w, b, a, bb, counts, scale=0.5, dropout=0.5, seed=s, backend=backend,
        dropout_position=pos)
    assert torch.equal(drop(1), drop(1)) and not torch.equal(drop(1), drop(2))


@pytest.mark.parametrize("pos", ["pre", "post"])
def test_one_seed_is_one_mask_on_every_backend(pos):
    # the eager backend draws the kernels' Philox mask (dropout_keep_mask), so eager and Triton
    # agree to rounding under dropout for one seed, and both equal the reference fed that mask;
    # without a seed both draw it from torch's RNG, so a reseeded generator replays either
    counts = [6, 0, 9]
    x, w, b, a, bb = _inputs(counts, 40, 24, 8, torch.float32, a_per_expert=True,
                             b_per_expert=False)
    run = lambda backend, seed=SEED: grouped_lora_linear(  # noqa: E731
        x, w, b, a, bb, counts, scale=0.5, dropout=0.4, seed=seed, backend=backend,
        dropout_position=pos)
    shape = x.shape if pos == "pre" else (x.shape[0], 24)
    ref = grouped_lora_linear_ref(x, w, b, a, bb, counts, scale=0.5, dropout=0.4,
                                  dropout_mask=dropout_keep_mask(SEED, shape, 0.4, DEV),
                                  dropout_position=pos)
    assert torch.equal(run("eager"), ref)
    assert rel_err(run("triton"), ref) < dtype_tol(torch.float32)
    for backend in ("eager", "triton"):
        torch.manual_seed(3)
        first = run(backend, None)
        torch.manual_seed(3)
        assert torch.equal(run(backend, None), first), backend
    torch.manual_seed(3)
    eager = run("eager", None)
    torch.manual_seed(3)
    assert rel_err(run("triton", None), eager) < dtype_tol(torch.float32)


def _saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves while running ``fn``, ``params`` excluded."""
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_are_x_and_s(dtype):
    counts = [20, 0, 28]
    x, w, b, a, bb = _inputs(counts, 96, 64, 8, dtype, a_per_expert=True, b_per_expert=True)
    tpe = torch.tensor(counts, dtype=torch.int32, device=DEV)
    call = lambda backend: grouped_lora_linear(x, w, b, a, bb, tpe, scale=0.5, dropout=0.1, seed=1,
                                               backend=backend)
    fused = _saved_bytes(lambda: call("triton"), (w, b, a, bb, tpe))
    eager = _saved_bytes(lambda: call("eager"), (w, b, a, bb, tpe))
    x_bytes, s_bytes = x.numel() * x.element_size(), sum(counts) * 8 * 4
    # x, S, the seed (8 bytes) and the int32 counts (12 bytes): never the mask nor x~
    assert x_bytes + s_bytes <= fused <= x_bytes + s_bytes + 64, (fused, x_bytes, s_bytes)
    assert eager >= 1.8 * fused, (eager, fused)


@pytest.mark.parametrize("separate,a_e,b_e,post", [(False, True, True, False),
                                                   (True, False, True, True)])
def test_opcheck(separate, a_e, b_e, post):
    # stacked weights with per-expert A/B and 'pre'; separate weights, shared A, 'post', no bias
    counts = [3, 0, 4]
    x, w, b, a, bb = _inputs(counts, 24, 20, 4, torch.float32, a_per_expert=a_e, b_per_expert=b_e,
                             bias=not separate)
    weights = _as_list(w) if separate else [w]
    cnt = torch.tensor(counts, dtype=torch.int32, device=DEV)
    seed = torch.tensor([7], device=DEV)
    torch.library.opcheck(torch.ops.bridge.grouped_lora_linear_fwd.default,
                          (x, weights, b, a, bb, cnt, seed, 2.0, 0.1, post))
    dy, s_mat = torch.randn(7, 20, device=DEV), torch.randn(7, 4, device=DEV)
    torch.library.opcheck(torch.ops.bridge.grouped_lora_linear_bwd.default,
                          (dy, x.detach(), weights, a.detach(), bb.detach(), cnt, s_mat, seed,
                           2.0, 0.1, post, True, not separate))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_fullgraph():
    # separate per-expert weights (a Tensor[] argument), counts as a tensor, dropout on
    torch._dynamo.reset()
    counts = torch.tensor([5, 0, 6])
    x, w, b, a, bb = _inputs([5, 0, 6], 40, 24, 8, torch.float32, a_per_expert=True,
                             b_per_expert=False)
    weights = _as_list(w)

    def f(x, b, a, bb, tpe):
        return grouped_lora_linear(x, weights, b, a, bb, tpe, scale=0.5, dropout=0.1, seed=21,
                                   backend="triton")

    def run(fn):
        for t in (x, b, a, bb):
            t.grad = None
        y = fn(x, b, a, bb, counts)
        y.sum().backward()
        return [y.detach(), x.grad, b.grad, a.grad, bb.grad]

    for u, v in zip(run(torch.compile(f, fullgraph=True)), run(f), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


# ---- bad input and backend choice ----------------------------------------------------------


def test_bad_tokens_per_expert():
    x, w, b, a, bb = _inputs([2, 2], 16, 8, 2, torch.float32, a_per_expert=True,
                             b_per_expert=True)
    call = lambda tpe: grouped_lora_linear(x, w, b, a, bb, tpe, scale=1.0, backend="triton")
    with pytest.raises(ValueError, match="sums to 3 but x has M=4 rows"):
        call([1, 2])
    with pytest.raises(ValueError, match="must be non-negative"):
        call([5, -1])
    with pytest.raises(ValueError, match="3 entries for 2 experts"):
        call([2, 2, 0])
    with pytest.raises(ValueError, match="sums to 5"):
        call(torch.tensor([2, 3]))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        call(torch.tensor([2.0, 2.0]))
    with pytest.raises(TypeError, match="must hold ints"):
        call([2.0, 2.0])
    with pytest.raises(TypeError, match="list/tuple of ints or a 1-D integer tensor"):
        call(4)


def test_bad_shapes_dtypes_devices():
    x, w, b, a, bb = _inputs([2, 2], 16, 8, 2, torch.float32, a_per_expert=True,
                             b_per_expert=True)
    call = lambda **kw: grouped_lora_linear(
        kw.get("x", x), kw.get("w", w), kw.get("b", b), kw.get("a", a), kw.get("bb", bb), [2, 2],
        scale=1.0, backend="triton")
    with pytest.raises(ValueError, match="K=16"):
        call(x=x[:, :15])
    with pytest.raises(ValueError, match="stacked weight must be 3-D"):
        call(w=w[0])
    with pytest.raises(ValueError, match="must share shape, dtype, device and layout"):
        call(w=[w[0], w[1, :, :15]])
    with pytest.raises(ValueError, match="lora_a must be 2-D .* or 3-D with E=2"):
        call(a=a[:1])
    with pytest.raises(ValueError, match=r"lora_b \[\(E,\) N=8, r\]"):
        call(bb=bb[:, :, :1])
    with pytest.raises(ValueError, match=r"bias must have shape \[E, N\] = \[2, 8\]"):
        call(b=b[0])
    with pytest.raises(TypeError, match="share one dtype"):
        call(a=a.detach().half())
    with pytest.raises(ValueError, match="one device"):
        call(w=w.to("meta"))


def test_trainable_weight_and_misaligned_weights_fall_back(caplog):
    x, w, b, a, bb = _inputs([2, 2], 16, 8, 2, torch.float32, a_per_expert=True,
                             b_per_expert=True)
    ref = grouped_lora_linear_ref(x, w, b, a, bb, [2, 2], scale=1.0)
    trainable = w.detach().clone().requires_grad_()
    with pytest.raises(BackendUnavailableError, match="base weight requires grad"):
        grouped_lora_linear(x, trainable, b, a, bb, [2, 2], scale=1.0, backend="triton")
    # a weight view 4 bytes into its storage breaks the 16-byte alignment the kernel assumes
    flat = torch.randn(2 * 8 * 16 + 1, device=DEV)
    shifted = [flat[1 + i * 128: 1 + (i + 1) * 128].view(8, 16) for i in range(2)]
    with pytest.raises(BackendUnavailableError, match=r"weight\[0, 1\] not 16-byte aligned"):
        grouped_lora_linear(x, shifted, b, a, bb, [2, 2], scale=1.0, backend="triton")
    getattr(backend_mod, "_log_once_cached", backend_mod._log_once).cache_clear()
    with caplog.at_level(logging.WARNING, logger="bridge.kernels"):
        y = grouped_lora_linear(x, trainable, b, a, bb, [2, 2], scale=1.0)
    assert any("grouped_lora_linear runs on the eager backend" in r.getMessage()
               and "base weight requires grad" in r.getMessage() for r in caplog.records)
    assert torch.equal(y, ref)
    y.sum().backward()
    assert trainable.grad is not None  # the eager path trains the base weight


def test_aot_specs_name_every_kernel_argument():
    # each spec types every runtime argument and fixes every constexpr its configs leave open,
    # so kernels/aot.py compiles the specialisation a launch produces (run there, not here)
    specs = gkern.aot_specs()
    assert {s["kernel"].__name__ for s in specs} >= {
        "_grouped_lora_gemm_kernel", "_grouped_shrink_kernel", "_grouped_dsdb_kernel",
        "_grouped_db_reduce_kernel", "_grouped_rowgemm_kernel"}
    for s in specs:
        fn = s["kernel"]
        for arch in ("sm80", "sm90"):
            for c in s["configs_fn"](arch, s["configs"]) if s["configs"] else [None]:
                given = {*s["sig"], *s["fixed"], *(c.kwargs if c else ())}
                assert set(fn.arg_names) == given, (fn.__name__, s["variant"],
                                                    set(fn.arg_names) ^ given)
