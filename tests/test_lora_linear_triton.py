"""The Triton fused LoRA linear against the fp64 reference, on ``KERNEL_DEVICE`` (tests/conftest.py):
the CPU interpreter here, the compiled kernels on a GPU (``BRIDGE_TEST_GPU=1 TRITON_INTERPRET=0``),
in both GEMM strategies: ``fused`` (one Triton GEMM) and ``cublas`` (torch's matmul, the CPU's
here, adding the low-rank term our expand kernel wrote).

Values and every gradient are compared with ``lora_linear_ref`` in fp64 (on the same device), fed
the keep mask the kernels draw (``dropout_keep_mask``), by relative error ||out - ref|| / ||ref||.
Shapes stay tiny (the interpreter runs each tile op in Python) and pick the boundaries: M = 1, K
and N that are not multiples of the 64-wide interpreter tiles, ranks below, at and above the
16/32/64 buckets.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from bridge.kernels import backend as backend_mod
from bridge.kernels import lora_linear, lora_linear_ref
from bridge.kernels.backend import BackendUnavailableError
from bridge.kernels.philox import dropout_keep_mask

from tests.conftest import KERNEL_DEVICE as DEV
from tests.conftest import requires_kernel_device
from tests.numerics import dtype_tol, grads, lora_inputs, rel_err

pytestmark = requires_kernel_device()

SEED = 1234


def _inputs(lead, k, n, r, dtype, *, bias=True, device=DEV):
    """tests/numerics.lora_inputs (seed 0) on the kernel device."""
    return lora_inputs(lead, k, n, r, dtype, bias=bias, device=device)


def _check_against_ref(x, w, b, a, bb, *, scale, p, pos, skip_bias_add=False, seed=SEED,
                       dy=None, gemm="fused"):
    """Run the Triton path and the fp64 reference with the kernels' mask; compare all."""
    y = lora_linear(x, w, b, a, bb, scale=scale, dropout=p, dropout_position=pos,
                    skip_bias_add=skip_bias_add, seed=seed, backend="triton", gemm=gemm)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.device, y.dtype) \
        if dy is None else dy
    y.backward(dy)
    mask = None
    if p > 0:
        shape = x.shape if pos == "pre" else y.shape
        mask = dropout_keep_mask(seed, shape, p, x.device)
    r64 = [None if t is None else t.detach().double().requires_grad_() for t in (x, b, a, bb)]
    y_ref = lora_linear_ref(r64[0], w.double(), r64[1], r64[2], r64[3], scale=scale, dropout=p,
                            dropout_mask=mask, dropout_position=pos, skip_bias_add=skip_bias_add)
    y_ref.backward(dy.double())
    tol = dtype_tol(x.dtype)  # one op: about 1 ulp of the storage type
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    errs = {"y": rel_err(y, y_ref)}
    for name, t, t_ref in zip(("dx", "dbias", "dA", "dB"), (x, b, a, bb), r64, strict=True):
        if t is None:
            continue
        if skip_bias_add and name == "dbias":
            assert t.grad is None  # the bias is not part of y
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        errs[name] = rel_err(t.grad, t_ref.grad)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


# (dtype, leading dims, K, N, r, p, position, bias, skip_bias_add): a representative cross
# product. K=72/N=40 are not multiples of the 64-wide interpreter tiles; r = 1/8 pad to 16,
# 33 to 64 (masked rank lanes), 64 takes two 32-wide GEMM rank steps, 100 two rank tiles.
CASES = [
    (torch.float32, (13,), 72, 40, 8, 0.0, "pre", True, False),
    (torch.float32, (1,), 72, 40, 1, 0.1, "pre", True, False),
    (torch.float32, (4, 5), 40, 96, 64, 0.1, "post", True, False),
    (torch.float32, (20,), 40, 24, 100, 0.1, "pre", False, False),
    (torch.float16, (2, 7), 64, 96, 16, 0.1, "post", True, False),
    (torch.float16, (48,), 96, 40, 8, 0.1, "pre", False, False),
    (torch.float16, (1,), 40, 72, 1, 0.0, "pre", True, True),
    (torch.bfloat16, (33,), 72, 40, 33, 0.1, "pre", False, False),
    (torch.bfloat16, (5,), 40, 72, 64, 0.0, "pre", True, True),
    (torch.bfloat16, (2, 3), 72, 40, 1, 0.1, "post", True, False),
    (torch.bfloat16, (17,), 72, 40, 16, 0.1, "pre", True, True),
]


@pytest.mark.parametrize("gemm", ["fused", "cublas"])
@pytest.mark.parametrize("dtype,lead,k,n,r,p,pos,bias,skip", CASES,
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple)
                         else "x".join(map(str, v)))
def test_matches_fp64_reference(dtype, lead, k, n, r, p, pos, bias, skip, gemm):
    x, w, b, a, bb = _inputs(lead, k, n, r, dtype, bias=bias)
    _check_against_ref(x, w, b, a, bb, scale=2.0 / r, p=p, pos=pos, skip_bias_add=skip,
                       gemm=gemm)


@pytest.mark.parametrize("pos", ["pre", "post"])
def test_cublas_mask_is_bitwise_the_fused_mask(pos):
    """Identity adapter (W = 0, A = B = I, s = 1): y and dX are the masked x and dY themselves,
    exact in fp32, so both strategies must give bitwise the same tensors, zero exactly where the
    shared Philox stream drops (dropout_keep_mask)."""
    m, k = 37, 48
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4)).to(DEV) + 3.0  # no zeros
    w = torch.zeros(k, k, device=DEV)
    eye = torch.eye(k, device=DEV)
    dy = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).to(DEV) + 3.0
    out = {}
    for gemm in ("fused", "cublas"):
        xg, a, bb = x.clone().requires_grad_(), eye.clone().requires_grad_(), eye.clone()
        y = lora_linear(xg, w, None, a, bb.requires_grad_(), scale=1.0, dropout=0.3,
                        dropout_position=pos, seed=SEED, backend="triton", gemm=gemm)
        y.backward(dy)
        out[gemm] = (y.detach(), xg.grad)
    mask = dropout_keep_mask(SEED, (m, k), 0.3, DEV)
    for got_f, got_c in zip(out["fused"], out["cublas"], strict=True):
        assert torch.equal(got_f, got_c)
        assert torch.equal(got_c != 0, mask)


@pytest.mark.parametrize("pos", ["pre", "post"])
def test_non_contiguous_x(pos):
    # x as a transposed view (strides (1, M)) and as a strided slice of the last dim
    x, w, b, a, bb = _inputs((24,), 40, 24, 8, torch.float32)
    xt = torch.randn(40, 24, device=DEV).t().requires_grad_()
    assert not xt.is_contiguous()
    _check_against_ref(xt, w, b, a, bb, scale=0.5, p=0.1, pos=pos)
    xs_base = torch.randn(2, 6, 80, device=DEV)
    xs = xs_base[..., ::2].requires_grad_()
    a.grad = bb.grad = b.grad = None
    _check_against_ref(xs, w, b, a, bb, scale=0.5, p=0.1, pos=pos)


@pytest.mark.parametrize("gemm", ["fused", "cublas"])
def test_expanded_dy_matches_dense(gemm):
    # y.sum().backward() hands the op a stride-0 dY; it must equal a dense ones dY bitwise
    x, w, b, a, bb = _inputs((3, 5), 40, 24, 8, torch.float32)
    y = lora_linear(x, w, b, a, bb, scale=0.5, dropout=0.1, seed=3, backend="triton", gemm=gemm)
    y.sum().backward()
    expanded = grads(x, b, a, bb)
    for t in (x, b, a, bb):
        t.grad = None
    y = lora_linear(x, w, b, a, bb, scale=0.5, dropout=0.1, seed=3, backend="triton", gemm=gemm)
    y.backward(torch.ones_like(y))
    for g1, g2 in zip(expanded, grads(x, b, a, bb), strict=True):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("gemm", ["fused", "cublas"])
def test_empty_batch(gemm):
    x, w, b, a, bb = _inputs((0,), 40, 24, 8, torch.bfloat16)
    y = lora_linear(x, w, b, a, bb, scale=0.5, dropout=0.1, backend="triton", gemm=gemm)
    assert y.shape == (0, 24) and y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.shape == (0, 40)
    for t in (b, a, bb):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("pos", ["pre", "post"])
def test_same_seed_bitwise_new_seed_differs(pos):
    x, w, b, a, bb = _inputs((9,), 40, 24, 8, torch.bfloat16)

    def run(seed):
        for t in (x, b, a, bb):
            t.grad = None
        y = lora_linear(x, w, b, a, bb, scale=0.5, dropout=0.3, dropout_position=pos,
                        seed=seed, backend="triton")
        y.backward(torch.ones_like(y))
        return [y.detach(), *grads(x, b, a, bb)]

    first, again, other = run(11), run(11), run(12)
    assert all(torch.equal(u, v) for u, v in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_seed_drawn_from_torch_generator():
    # seed=None: a fresh mask per call, reproducible through torch.manual_seed
    x, w, b, a, bb = _inputs((9,), 40, 24, 8, torch.float32)
    run = lambda: lora_linear(x, w, b, a, bb, scale=0.5, dropout=0.3, backend="triton")
    torch.manual_seed(5)
    y1, y2 = run(), run()
    torch.manual_seed(5)
    y3 = run()
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)


def test_eval_mode_ignores_dropout():
    x, w, b, a, bb = _inputs((9,), 40, 24, 8, torch.float32)
    y_eval = lora_linear(x, w, b, a, bb, scale=0.5, dropout=0.3, training=False,
                         backend="triton")
    y_nodrop = lora_linear(x, w, b, a, bb, scale=0.5, dropout=0.0, backend="triton")
    assert torch.equal(y_eval, y_nodrop)


def test_keep_rate_within_three_sigma():
    p, n = 0.1, 1_000_000
    keep = dropout_keep_mask(SEED, (1000, 1000), p, DEV)
    rate = keep.double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 3 * sigma, (rate, sigma)
    # the mask is a function of the flat element index: any leading-dims view agrees
    assert torch.equal(dropout_keep_mask(SEED, (2, 5, 1000), p, DEV).reshape(10, 1000),
                       keep[:10])
    assert not torch.equal(dropout_keep_mask(SEED + 1, (10, 1000), p, DEV), keep[:10])


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


@pytest.mark.parametrize("pos", ["pre", "post"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes(dtype, pos):
    m, k, n, r = 48, 96, 64, 8
    x, w, b, a, bb = _inputs((m,), k, n, r, dtype)
    call = lambda backend, gemm="auto": lora_linear(x, w, b, a, bb, scale=0.5, dropout=0.1,
                                                    dropout_position=pos, seed=1,
                                                    backend=backend, gemm=gemm)
    fused = _saved_bytes(lambda: call("triton", "fused"), (w, b, a, bb))
    cublas = _saved_bytes(lambda: call("triton", "cublas"), (w, b, a, bb))
    eager = _saved_bytes(lambda: call("eager"), (w, b, a, bb))
    x_bytes, s_bytes = x.numel() * x.element_size(), m * r * 4
    assert cublas == fused, (cublas, fused)  # x, S and the seed: never a mask, P or Q
    assert fused <= x_bytes + s_bytes + 64, (fused, x_bytes, s_bytes)
    # eager also keeps the mask and x~ ('pre'), or the mask of y and its unmasked product
    assert eager >= (1.8 if pos == "pre" else 1.2) * fused, (eager, fused)


@pytest.mark.parametrize("gemm", ["fused", "cublas"])
@pytest.mark.parametrize("post", [False, True])
def test_opcheck(post, gemm):
    x, w, b, a, bb = _inputs((2, 3), 24, 20, 4, torch.float32)
    seed = torch.tensor([7], device=DEV)
    fwd = torch.ops.bridge.lora_linear_fwd.default
    torch.library.opcheck(fwd, (x, w, b, a, bb, seed, 2.0, 0.1, post, gemm, gemm))
    torch.library.opcheck(fwd, (x, w, None, a, bb, None, 2.0, 0.0, post, gemm, gemm))
    dy, s_mat = torch.randn(2, 3, 20, device=DEV), torch.randn(6, 4, device=DEV)
    torch.library.opcheck(torch.ops.bridge.lora_linear_bwd.default,
                          (dy, x.detach(), w, a.detach(), bb.detach(), s_mat, seed, 2.0, 0.1,
                           post, True, gemm))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("gemm", ["fused", "cublas"])
def test_torch_compile_fullgraph(gemm):
    torch._dynamo.reset()
    x, w, b, a, bb = _inputs((2, 5), 40, 24, 8, torch.float32)

    def f(x, w, b, a, bb):
        return lora_linear(x, w, b, a, bb, scale=0.5, dropout=0.1, seed=21, backend="triton",
                           gemm=gemm)

    compiled = torch.compile(f, fullgraph=True)
    y = compiled(x, w, b, a, bb)
    y.sum().backward()
    got = [y.detach(), *grads(x, b, a, bb)]
    for t in (x, b, a, bb):
        t.grad = None
    y = f(x, w, b, a, bb)
    y.sum().backward()
    for u, v in zip(got, [y.detach(), *grads(x, b, a, bb)], strict=True):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


# ---- bad input and backend choice ----------------------------------------------------------


def _small(dtype=torch.float32, device=DEV):
    return _inputs((4,), 16, 8, 2, dtype, device=device)


def test_bad_shapes_and_dtypes():
    x, w, b, a, bb = _small()
    with pytest.raises(ValueError, match="in_features disagree"):
        lora_linear(x[:, :15], w, b, a, bb, scale=1.0, backend="triton")
    with pytest.raises(ValueError, match=r"lora_b must have shape \[N, r\]"):
        lora_linear(x, w, b, a, bb[:, :1], scale=1.0, backend="triton")
    with pytest.raises(TypeError, match="share one dtype"):
        lora_linear(x, w.half(), b, a, bb, scale=1.0, backend="triton")
    with pytest.raises(ValueError, match="one device"):
        lora_linear(x, w.to("meta"), b, a, bb, scale=1.0, backend="triton")
    with pytest.raises(ValueError, match="dropout must be"):
        lora_linear(x, w, b, a, bb, scale=1.0, dropout=1.0, backend="triton")


def test_trainable_base_weight_falls_back(caplog):
    x, w, b, a, bb = _small()
    w.requires_grad_()
    with pytest.raises(BackendUnavailableError, match="base weight requires grad"):
        lora_linear(x, w, b, a, bb, scale=1.0, backend="triton")
    backend_mod._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="bridge.kernels"):
        y = lora_linear(x, w, b, a, bb, scale=1.0, backend="auto")
        lora_linear(x, w, b, a, bb, scale=1.0, backend="auto")
    logged = [r for r in caplog.records if "base weight requires grad" in r.getMessage()]
    assert len(logged) == 1  # once per (op, reason)
    y.sum().backward()
    assert w.grad is not None  # the eager path trains the base weight


def test_triton_unavailable_without_interpreter(monkeypatch, caplog):
    # CPU tensors with TRITON_INTERPRET=0: an explicit 'triton' raises and 'auto' runs eager
    # (the reason: no GPU here; on a GPU machine, that the tensors are not on it)
    x, w, b, a, bb = _small(device="cpu")
    why = "no GPU" if not torch.cuda.is_available() else "tensors are on cpu, not on a CUDA GPU"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match=why):
        lora_linear(x, w, b, a, bb, scale=1.0, backend="triton")
    backend_mod._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="bridge.kernels"):
        y = lora_linear(x, w, b, a, bb, scale=1.0)
    assert any("eager backend" in r.getMessage() and why in r.getMessage()
               for r in caplog.records)
    ref = lora_linear_ref(x, w, b, a, bb, scale=1.0)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("gemm", ["fused", "cublas"])
@pytest.mark.parametrize("pos", ["pre", "post"])
def test_non_contiguous_parameters(pos, gemm):
    # the base weight as a transposed view, lora_a/lora_b as transposed views of their leaves,
    # and the bias as a strided slice (stride 2) and as an expanded scalar (stride 0): the
    # kernels must honour every stride, the bias's included
    k, n, r = 40, 24, 8
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, k, generator=g).to(DEV).requires_grad_()
    w = (torch.randn(k, n, generator=g) / k**0.5).to(DEV).t()
    a_t = (torch.randn(k, r, generator=g) / k**0.5).to(DEV).requires_grad_()
    b_t = torch.randn(r, n, generator=g).to(DEV).requires_grad_()
    b_full = torch.randn(2 * n, generator=g).to(DEV).requires_grad_()
    for bias in (b_full[::2], torch.randn(1, generator=g).to(DEV).expand(n)):
        for t in (x, a_t, b_t, b_full):
            t.grad = None
        y = lora_linear(x, w, bias, a_t.t(), b_t.t(), scale=0.5, dropout=0.1,
                        dropout_position=pos, seed=SEED, backend="triton", gemm=gemm)
        dy = torch.randn(y.shape, generator=g).to(DEV)
        y.backward(dy)
        mask = dropout_keep_mask(SEED, x.shape if pos == "pre" else y.shape, 0.1, DEV)
        r64 = [t.detach().double().requires_grad_() for t in (x, a_t, b_t)]
        y_ref = lora_linear_ref(r64[0], w.double(), bias.detach().double(), r64[1].t(),
                                r64[2].t(), scale=0.5, dropout=0.1, dropout_mask=mask,
                                dropout_position=pos)
        y_ref.backward(dy.double())
        assert rel_err(y, y_ref) < dtype_tol(torch.float32)
        for t, t_ref in zip((x, a_t, b_t), r64, strict=True):
            assert rel_err(t.grad, t_ref.grad) < dtype_tol(torch.float32)


def test_opcheck_empty_batch_non_contiguous_lora_b():
    # M = 0: dB is zeros; its strides must match the fake's (contiguous) whatever lora_b's are
    w, a = torch.randn(20, 24, device=DEV), torch.randn(4, 24, device=DEV)
    b_t = torch.randn(4, 20, device=DEV).t()
    torch.library.opcheck(torch.ops.bridge.lora_linear_bwd.default,
                          (torch.randn(0, 20, device=DEV), torch.randn(0, 24, device=DEV), w, a,
                           b_t, torch.empty(0, 4, device=DEV), None, 2.0, 0.0, False, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_db_as_its_own_gemm_past_the_partials_limit(monkeypatch, dtype):
    """With the dB partials over DB_PARTIALS_MAX_BYTES (forced here to 0) and no 'post' mask, dB
    comes from one GEMM on the host instead: same values and grads against the fp64 reference;
    a 'post' mask keeps the partials (dY must be masked)."""
    lowrank = importlib.import_module("bridge.kernels._lowrank")
    monkeypatch.setattr(lowrank, "DB_PARTIALS_MAX_BYTES", 0)
    for p, pos in [(0.0, "pre"), (0.1, "pre"), (0.1, "post")]:
        x, w, b, a, bb = _inputs((70,), 40, 72, 8, dtype, bias=True)
        _check_against_ref(x, w, b, a, bb, scale=2.0, p=p, pos=pos, skip_bias_add=False)


def test_unknown_gemm_is_a_value_error_naming_the_allowed_ones(monkeypatch):
    x, w, b, a, bb = _small()
    with pytest.raises(ValueError, match="unknown gemm 'cuBLASLt'; expected one of auto, fused, "
                                         "cublas"):
        lora_linear(x, w, b, a, bb, scale=1.0, backend="triton", gemm="cuBLASLt")
    monkeypatch.setenv("BRIDGE_LORA_GEMM", "fast")
    with pytest.raises(ValueError, match="BRIDGE_LORA_GEMM value 'fast'"):
        lora_linear(x, w, b, a, bb, scale=1.0, backend="triton")


def test_environment_picks_the_strategy_and_the_argument_wins(monkeypatch):
    """BRIDGE_LORA_GEMM=cublas routes the op through the expand kernel + addmm; gemm='fused'
    overrides it (counted at the expand launcher the cublas GEMM steps call)."""
    strategy = importlib.import_module("bridge.kernels.gemm_strategy")
    calls = []
    real = strategy.launch_expand
    monkeypatch.setattr(strategy, "launch_expand", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, b, a, bb = _small()
    monkeypatch.setenv("BRIDGE_LORA_GEMM", "cublas")
    lora_linear(x, w, b, a, bb, scale=1.0, backend="triton").sum().backward()
    assert len(calls) == 2  # P forward, Q backward
    lora_linear(x, w, b, a, bb, scale=1.0, backend="triton", gemm="fused").sum().backward()
    assert len(calls) == 2
