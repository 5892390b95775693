"""The norm-fused LoRA linear (Triton backend) against the fp64 reference, on ``KERNEL_DEVICE``
(tests/conftest.py: the CPU interpreter here, the compiled kernels with ``BRIDGE_TEST_GPU=1
TRITON_INTERPRET=0`` on a GPU): values and every gradient, both norms, dropout at both positions,
the returned ln with its own gradient, in both GEMM strategies (``fused`` Triton GEMMs, or
``cublas``: torch's matmul adding our expand kernel's low-rank term); the registered ops under
opcheck; bad input; the backend choice."""

from __future__ import annotations

import pytest
import torch
from bridge.kernels import BackendUnavailableError
from bridge.kernels.norm_lora import (
    cuda_row_limits,
    norm_lora_backend,
    norm_lora_linear,
    norm_lora_linear_ref,
    norm_lora_row_fwd,
    norm_ref,
)

from tests.conftest import KERNEL_DEVICE as DEV
from tests.conftest import requires_kernel_device
from tests.numerics import dtype_tol, norm_lora_inputs, rel_err

triton_kernels = requires_kernel_device()

SEED = 1234
FP32 = dtype_tol(torch.float32, "chain")  # fp32 through the norm and the GEMM


def _inputs(shape, n, r, dtype, norm, *, bias=True, device=DEV):
    """tests/numerics.norm_lora_inputs (seed 0) on the kernel device."""
    return norm_lora_inputs(shape, n, r, dtype, norm, bias=bias, device=device)


def _run_case(dtype, norm, *, shape=(5, 37), n=19, r=3, p=0.0, position="pre", zcg=False,
              ln_grad=True, skip_bias_add=False, bias=True, gemm="fused"):
    t = _inputs(shape, n, r, dtype, norm, bias=bias)
    # with skip_bias_add the bias is passed but stays out of y (Megatron adds it later): it
    # must get no gradient from y
    grad_names = [k for k in ("x", "norm_weight", "norm_bias", "bias", "lora_a", "lora_b")
                  if t[k] is not None and not (k == "bias" and skip_bias_add)]
    leaves = {k: v.clone().requires_grad_(k in grad_names) if v is not None else None
              for k, v in t.items()}
    kw = dict(normalization=norm, eps=1e-5, scale=2.0, dropout=p, dropout_position=position,
              zero_centered_gamma=zcg, skip_bias_add=skip_bias_add)
    y, ln = norm_lora_linear(*leaves.values(), **kw, return_norm_output=True, seed=SEED,
                             backend="triton", gemm=gemm)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g).to(DEV, dtype)
    gl = torch.randn(ln.shape, generator=g).to(DEV, dtype) if ln_grad else None
    loss = (y.float() * gy.float()).sum() + ((ln.float() * gl.float()).sum() if ln_grad else 0)
    grads = torch.autograd.grad(loss, [leaves[k] for k in grad_names])

    from bridge.kernels.philox import dropout_keep_mask

    mask = None
    if p > 0:
        mshape = (*shape[:-1], n) if position == "post" else shape
        mask = dropout_keep_mask(SEED, mshape, p, DEV)
    ref = {k: v.double().requires_grad_(k in grad_names) if v is not None else None
           for k, v in t.items()}
    yr, lr = norm_lora_linear_ref(*ref.values(), **kw, dropout_mask=mask)
    loss_r = (yr * gy.double()).sum() + ((lr * gl.double()).sum() if ln_grad else 0)
    grads_r = torch.autograd.grad(loss_r, [ref[k] for k in grad_names])

    tol = dtype_tol(dtype, "chain")  # ln rounded to the storage type before the GEMM
    if skip_bias_add and bias:  # y without the bias: the bias is not in y's graph at all
        b = t["bias"].clone().requires_grad_(True)
        args = {**t, "bias": b}
        y_skip = norm_lora_linear(*args.values(), **kw, seed=SEED, backend="triton", gemm=gemm)
        assert not any(leaf is b for leaf in _graph_leaves(y_skip)), "the bias reached y"
    assert y.dtype == dtype and y.shape == (*shape[:-1], n) and ln.shape == shape
    assert rel_err(y, yr) < tol, "y"
    assert rel_err(ln, lr) < tol, "ln"
    for name, a, b in zip(grad_names, grads, grads_r, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert rel_err(a, b) < tol, f"grad of {name}: {rel_err(a, b):.2e}"


def _graph_leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors t's autograd graph reaches."""
    leaves, todo, seen = [], [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if hasattr(fn, "variable"):
            leaves.append(fn.variable)
        todo.extend(f for f, _ in fn.next_functions)
    return leaves


@triton_kernels
@pytest.mark.parametrize("gemm", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_values_and_grads(dtype, norm, gemm):
    _run_case(dtype, norm, p=0.2, gemm=gemm)


@triton_kernels
@pytest.mark.parametrize(
    "case",
    [
        # M = 1 and odd K/N, 'post' mask with zero-centred gamma, no gradient into ln
        dict(shape=(1, 37), n=19, r=3, zcg=True, p=0.3, position="post", ln_grad=False),
        # 3-D input, K over several blocks, rank above 16, 'pre' mask, no linear bias
        dict(shape=(2, 3, 301), n=45, r=20, p=0.1, bias=False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cublas_shapes_and_options(case, dtype):
    _run_case(dtype, "LayerNorm", gemm="cublas", **case)


@triton_kernels
@pytest.mark.parametrize(
    "case",
    [
        # M = 1, K and N odd and below one block
        dict(shape=(1, 37), n=19, r=3),
        # 3-D input; K spans several BLOCK_K=128 steps with a ragged tail; rank above 16
        dict(shape=(2, 3, 301), n=45, r=20),
        # more rows than one row block (64) and a second row group in the column kernel
        dict(shape=(130, 40), n=8, r=1),
        # zero-centred gamma, post dropout, no gradient into ln
        dict(zcg=True, p=0.3, position="post", ln_grad=False),
        # Megatron's skip_bias_add: the bias stays out of y (and gets no gradient here)
        dict(skip_bias_add=True, p=0.1),
        # no linear bias at all
        dict(bias=False, zcg=True),
    ],
)
@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_shapes_and_options_fp32(case, norm):
    _run_case(torch.float32, norm, **case)


@triton_kernels
def test_expanded_output_gradient():
    """y.sum().backward() hands the op a stride-0 dY; the kernels must not assume contiguity."""
    t = _inputs((4, 33), 10, 2, torch.float32, "LayerNorm")
    names = [k for k in t if k != "weight"]  # the base weight is frozen
    for k in names:
        t[k].requires_grad_(True)
    y, ln = norm_lora_linear(*t.values(), normalization="LayerNorm", eps=1e-5, scale=0.5,
                             return_norm_output=True, backend="triton")
    (y.sum() + ln.sum()).backward()
    ref = {k: v.detach().double().requires_grad_(k in names) for k, v in t.items()}
    yr, lr = norm_lora_linear_ref(*ref.values(), normalization="LayerNorm", eps=1e-5, scale=0.5)
    (yr.sum() + lr.sum()).backward()
    for k in names:
        assert rel_err(t[k].grad, ref[k].grad) < FP32, k


@triton_kernels
def test_dropout_seed_reproducible_and_eval_has_none():
    t = _inputs((3, 40), 6, 4, torch.float32, "RMSNorm")
    kw = dict(normalization="RMSNorm", eps=1e-6, scale=1.0, dropout=0.5, backend="triton")
    y1 = norm_lora_linear(*t.values(), **kw, seed=7)
    y2 = norm_lora_linear(*t.values(), **kw, seed=7)
    y3 = norm_lora_linear(*t.values(), **kw, seed=8)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    y_eval = norm_lora_linear(*t.values(), **kw, seed=7, training=False)
    y_ref, _ = norm_lora_linear_ref(*t.values(), normalization="RMSNorm", eps=1e-6, scale=1.0)
    assert rel_err(y_eval, y_ref) < FP32


@triton_kernels
def test_row_pass_outputs():
    """mean/rstd are the fp32 statistics; S = keep(ln) A^T / (1 - p); large |mean| stays exact."""
    from bridge.kernels.philox import dropout_keep_mask

    m, k, r, p = 9, 200, 5, 0.25
    x = (torch.randn(m, k, dtype=torch.float64).float() * 0.1 + 300.0).to(DEV)
    nw, nb = (torch.rand(k) + 0.5).to(DEV), torch.randn(k).to(DEV)
    a = torch.randn(r, k).to(DEV)
    seed = torch.tensor([SEED], device=DEV)
    ln, mean, rstd, s = norm_lora_row_fwd(x, nw, nb, a, seed, eps=1e-5, p=p, rms=False, shift=0.0,
                                          backend="triton")
    xd = x.double()
    assert torch.allclose(mean.double(), xd.mean(-1), rtol=1e-6)
    # |mean| / std = 3e3: E[x^2] - mean^2 in fp32 would lose every digit; merged chunk moments
    # keep the variance (fp32 x itself carries ~1e-4 relative noise here)
    assert rel_err(rstd, torch.rsqrt(xd.var(-1, unbiased=False) + 1e-5)) < 1e-3
    ln_ref = norm_ref(xd, nw.double(), nb.double(), normalization="LayerNorm", eps=1e-5)
    assert rel_err(ln, ln_ref) < 1e-3
    keep = dropout_keep_mask(SEED, (m, k), p, DEV)
    s_ref = (ln.double() * keep / (1 - p)) @ a.double().t()
    assert rel_err(s, s_ref) < dtype_tol(torch.float32)


@triton_kernels
@pytest.mark.parametrize("norm,gemm", [("LayerNorm", "fused"), ("RMSNorm", "fused"),
                                       ("LayerNorm", "cublas")])
def test_opcheck(norm, gemm):
    t = _inputs((3, 24), 8, 2, torch.float32, norm)
    seed = torch.tensor([SEED], device=DEV)
    args = (t["x"], t["norm_weight"], t["norm_bias"], t["weight"], t["bias"], t["lora_a"],
            t["lora_b"], seed, 1e-5, 2.0, 0.2, False, norm == "RMSNorm", False, "triton", gemm,
            gemm)
    for v in (t["x"], t["norm_weight"], t["lora_a"], t["lora_b"]):
        v.requires_grad_(True)
    torch.library.opcheck(torch.ops.bridge.norm_lora_fwd.default, args)
    y, ln, mean, rstd, s = torch.ops.bridge.norm_lora_fwd(*args)
    bwd_args = (torch.randn_like(y), torch.randn_like(ln), t["x"].detach(), t["norm_weight"],
                t["norm_bias"], t["weight"], t["lora_a"], t["lora_b"], mean, rstd, s, seed, 2.0,
                0.2, False, norm == "RMSNorm", False, "triton", gemm)
    torch.library.opcheck(torch.ops.bridge.norm_lora_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_eager_backend_matches_reference():
    t = _inputs((2, 3, 20), 7, 2, torch.float32, "LayerNorm", device="cpu")
    y, ln = norm_lora_linear(*t.values(), normalization="LayerNorm", eps=1e-5, scale=1.5,
                             return_norm_output=True, backend="eager")
    yr, lr = norm_lora_linear_ref(*t.values(), normalization="LayerNorm", eps=1e-5, scale=1.5)
    assert torch.equal(y, yr) and torch.equal(ln, lr)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(normalization="BatchNorm"), "unknown normalization 'BatchNorm'"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(eps=-1e-5), "eps must be > 0"),
        (dict(norm_weight=torch.ones(7)), r"norm_weight must have shape \[20\]"),
        (dict(norm_bias=torch.ones(3)), r"norm_bias must have shape \[20\]"),
        (dict(normalization="RMSNorm"), "RMSNorm takes no norm_bias"),
        (dict(dropout=1.0), "dropout must be a float in"),
    ],
)
def test_bad_input_raises(kwargs, message):
    t = _inputs((4, 20), 6, 2, torch.float32, "LayerNorm", device="cpu")
    args = dict(normalization="LayerNorm", eps=1e-5, scale=1.0)
    for name in ("norm_weight", "norm_bias"):
        if name in kwargs:
            t[name] = kwargs.pop(name)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        norm_lora_linear(*t.values(), **args)


def test_cuda_row_limits():
    assert cuda_row_limits(4096, torch.bfloat16) == (True, "")
    ok, reason = cuda_row_limits(4100, torch.bfloat16)
    assert not ok and "multiple of 8" in reason
    ok, reason = cuda_row_limits(65536, torch.bfloat16)
    assert not ok and "row buffer" in reason
    assert cuda_row_limits(4100, torch.float32)[0]


@triton_kernels
def test_backend_choice():
    x, w = torch.randn(2, 8, device=DEV), torch.randn(4, 8, device=DEV)
    choice = norm_lora_backend("auto", x, w)
    if DEV == "cpu":  # the interpreter: Triton, and why not the CUDA row pass
        assert choice.name == "triton" and "cuda:" in choice.reason
        with pytest.raises(BackendUnavailableError, match="norm_lora_row_fwd"):
            norm_lora_backend("cuda", x, w)
    else:  # a GPU: the CUDA row pass where bridge._C has it, else Triton; never eager
        assert choice.name in ("cuda", "triton"), choice
        assert norm_lora_backend("triton", x, w).name == "triton"
    frozen = norm_lora_backend("auto", x, w.requires_grad_(True))
    assert frozen.name == "eager" and "base weight requires grad" in frozen.reason


@triton_kernels
@pytest.mark.parametrize("p,position", [(0.0, "pre"), (0.2, "pre")])
def test_strided_norm_bias(p, position):
    """A LayerNorm bias given as a strided view (stride 2) or expanded (stride 0): the row
    kernels must read it with its stride, in the forward and in the recomputation of ln."""
    t = _inputs((5, 40), 12, 4, torch.float32, "LayerNorm")
    g = torch.Generator().manual_seed(2)
    nb_full = (torch.randn(80, generator=g) * 0.5).to(DEV).requires_grad_()
    names = ("x", "norm_weight", "lora_a", "lora_b")
    for nb_of in (lambda full: full[::2], lambda full: full[:1].expand(40)):
        leaves = {k: v.clone().requires_grad_(k in names) for k, v in t.items() if v is not None}
        nb_full.grad = None
        kw = dict(normalization="LayerNorm", eps=1e-5, scale=2.0, dropout=p,
                  dropout_position=position)
        y, ln = norm_lora_linear(leaves["x"], leaves["norm_weight"], nb_of(nb_full),
                                 leaves["weight"], leaves["bias"], leaves["lora_a"],
                                 leaves["lora_b"], **kw, return_norm_output=True, seed=SEED,
                                 backend="triton")
        gy = torch.randn(y.shape, generator=g).to(DEV)
        (y * gy).sum().backward()

        from bridge.kernels.philox import dropout_keep_mask

        mask = dropout_keep_mask(SEED, (5, 40), p, DEV) if p > 0 else None
        ref = {k: v.detach().double().requires_grad_(k in names) for k, v in t.items()
               if v is not None}
        nb_ref = nb_full.detach().double().requires_grad_()
        yr, lr = norm_lora_linear_ref(ref["x"], ref["norm_weight"], nb_of(nb_ref), ref["weight"],
                                      ref["bias"], ref["lora_a"], ref["lora_b"], **kw,
                                      dropout_mask=mask)
        (yr * gy.double()).sum().backward()
        assert rel_err(y, yr) < FP32 and rel_err(ln, lr) < FP32
        for k in names:
            assert rel_err(leaves[k].grad, ref[k].grad) < FP32, k
        assert rel_err(nb_full.grad, nb_ref.grad) < FP32


def test_norm_params_in_another_dtype_keep_auto_off_the_cuda_row_pass(monkeypatch):
    """The CUDA row kernels take the norm parameters in x's dtype only: with fp32 norm weights
    and bf16 x, auto must move on to Triton (and an explicit 'cuda' must say why)."""
    import bridge.kernels.backend as backend

    monkeypatch.setattr(backend, "probe_cuda", lambda device, dtype, op: (True, ""))
    monkeypatch.setattr(backend, "probe_triton", lambda device, dtype: (True, ""))
    monkeypatch.setattr("bridge.kernels.norm_lora.probe_triton", lambda device, dtype: (True, ""))
    x, w = torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16)
    gamma = torch.ones(16)
    choice = norm_lora_backend("auto", x, w, norm_params=(gamma, None))
    assert choice.name == "triton" and "norm parameters in float32" in choice.reason
    with pytest.raises(BackendUnavailableError, match="norm parameters in float32"):
        norm_lora_backend("cuda", x, w, norm_params=(gamma, None))
    same = norm_lora_backend("auto", x, w, norm_params=(gamma.bfloat16(), None))
    assert same.name == "cuda"


@triton_kernels
@pytest.mark.parametrize("position", ["pre", "post"])
def test_cublas_gives_the_fused_dropout_mask(position):
    """Same seed, both strategies: the same mask (zero exactly where the Philox stream drops),
    seen through an identity adapter on a zero base weight: y = s B A keep(ln) = keep(ln)."""
    t = _inputs((6, 32), 32, 32, torch.float32, "RMSNorm", bias=False)
    t["weight"].zero_()
    t["lora_a"].copy_(torch.eye(32))
    t["lora_b"].copy_(torch.eye(32))
    kw = dict(normalization="RMSNorm", eps=1e-5, scale=1.0, dropout=0.4,
              dropout_position=position, seed=SEED, backend="triton")
    ys = {g: norm_lora_linear(*t.values(), **kw, gemm=g) for g in ("fused", "cublas")}
    from bridge.kernels.philox import dropout_keep_mask

    keep = dropout_keep_mask(SEED, (6, 32), 0.4, DEV)
    assert torch.equal(ys["fused"] != 0, keep) and torch.equal(ys["cublas"] != 0, keep)
    torch.testing.assert_close(ys["cublas"], ys["fused"], rtol=1e-6, atol=1e-6)


@triton_kernels
def test_cublas_saves_the_fused_bytes():
    """Both strategies save x, mean/rstd, S and the seed (never ln, a mask, P or Q)."""
    t = _inputs((12, 40), 24, 4, torch.float32, "LayerNorm")
    leaves = {k: v.clone().requires_grad_(k != "weight") if v is not None else None
              for k, v in t.items()}
    params = {leaves[k].untyped_storage().data_ptr() for k in leaves if k != "x" and leaves[k]
              is not None}

    def saved(gemm: str) -> int:
        seen: dict[int, int] = {}

        def pack(v):
            ptr = v.untyped_storage().data_ptr()
            if ptr not in params:
                seen.setdefault(ptr, v.untyped_storage().nbytes())
            return v

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            norm_lora_linear(*leaves.values(), normalization="LayerNorm", eps=1e-5, scale=1.0,
                             dropout=0.1, seed=SEED, backend="triton", gemm=gemm)
        return sum(seen.values())

    fused = saved("fused")
    assert saved("cublas") == fused
    assert fused <= 12 * 40 * 4 + 2 * 12 * 4 + 12 * 4 * 4 + 64  # x + mean/rstd + S + seed
