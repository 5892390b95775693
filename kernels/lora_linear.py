"""Fused LoRA linear: y = x W^T + b + s * B(A(dropout(x))).

Read top to bottom: the eager reference (the oracle and the eager backend), the Triton kernels
(two forward, three backward), their launch configurations, the host launchers (reused by
kernels/norm_lora.py), the registered torch.library ops, and the functional op that picks a
backend per call (kernels/backend.py decides).

Shapes: x [M, K] (any leading dims flattened into M), W [N, K], b [N], A [r, K], B [N, r],
S = x~ A^T [M, r] (fp32), s = scale. Dropout follows kernels/philox.py: x~ = x * m / (1 - p)
with m regenerated from (seed, element index) wherever it is needed, never stored.
"""

from __future__ import annotations

import math

import torch
from bridge.kernels._checks import check_dropout, check_lora_args
from bridge.kernels._triton_common import (
    GEMM_RANK_STEP,
    HAS_TRITON,
    autotuned,
    current_arch,
    dot_operand,
    dot_precision,
    load_f32,
    rank_block,
    tl,
    triton,
)
from bridge.kernels.backend import resolve_backend
from bridge.kernels.philox import draw_seed, keep_mask, seed_tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types; fp64 stays fp64 (the test oracle runs in fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_dropout_mask(t: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """``t * mask / (1 - p)``; ``mask`` is a keep mask (bool or 0/1) of t's shape."""
    if mask is None or p == 0.0:
        return t
    if mask.shape != t.shape:
        raise ValueError(f"dropout mask shape {tuple(mask.shape)} != tensor shape {tuple(t.shape)}")
    return t * mask.to(t.dtype) / (1.0 - p)


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scale: float,
    dropout: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    dropout_position: str = "pre",
    skip_bias_add: bool = False,
) -> torch.Tensor:
    """Eager reference of the fused LoRA linear, computed in fp32 (fp64 for fp64 inputs).

    Args:
        x: [..., K] input.
        weight: [N, K] frozen base weight; bias: [N] or None.
        lora_a: [r, K]; lora_b: [N, r]; scale: s = alpha / r.
        dropout: probability p; dropout_mask: keep mask of x's shape ('pre') or of y's shape
            ('post'); None means no dropout (eval, or p = 0).
        skip_bias_add: leave the bias out of y (the caller adds it later, as Megatron does).

    Returns:
        y [..., N] in x's dtype: x W^T (+ b) + s * B(A(x~)), where x~ = x * mask / (1-p) ('pre'),
        or with the mask applied to B(A(x)) instead ('post').
    """
    check_lora_args(x, weight, bias, lora_a, lora_b)
    check_dropout(dropout, dropout_position)
    ct = _compute_dtype(x.dtype)
    xc, w, a, b = x.to(ct), weight.to(ct), lora_a.to(ct), lora_b.to(ct)
    y = xc @ w.t()
    if bias is not None and not skip_bias_add:
        y = y + bias.to(ct)
    if dropout_position == "pre":
        adapter = (apply_dropout_mask(xc, dropout_mask, dropout) @ a.t()) @ b.t()
    else:
        adapter = apply_dropout_mask((xc @ a.t()) @ b.t(), dropout_mask, dropout)
    return (y + scale * adapter).to(x.dtype)


def _eager_lora_linear(x, weight, bias, lora_a, lora_b, *, scale, dropout, dropout_position,
                       training, skip_bias_add, seed):
    """The eager backend: the reference with a torch-RNG dropout mask (seeded when seed is
    given)."""
    mask = None
    p = dropout if training else 0.0
    if p > 0.0:
        shape = x.shape if dropout_position == "pre" else (*x.shape[:-1], weight.shape[0])
        gen = None
        if seed is not None:
            gen = torch.Generator(device=x.device).manual_seed(int(seed))
        mask = torch.rand(shape, device=x.device, generator=gen) >= p
    return lora_linear_ref(x, weight, bias, lora_a, lora_b, scale=scale, dropout=p,
                           dropout_mask=mask, dropout_position=dropout_position,
                           skip_bias_add=skip_bias_add)


# ---------------------------------------------------------------------------------------------
# Triton kernels. Every kernel accumulates in fp32; under the interpreter (INTERPRET) tiles are
# upcast to fp32 right after loading. Dropout masks are regenerated from the seed (philox.py).
# PRECISION is tl.dot's input_precision for fp32 operands ("ieee" unless torch allows TF32).
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _grouped_tile(pid, n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                      GROUP: tl.constexpr):
        """Map a 1-D program id to a (row, col) tile, GROUP row-tiles at a time (L2 reuse)."""
        tiles_r = tl.cdiv(n_rows, BLOCK_ROWS)
        tiles_c = tl.cdiv(n_cols, BLOCK_COLS)
        per_group = GROUP * tiles_c
        first_r = (pid // per_group) * GROUP
        group_rows = min(tiles_r - first_r, GROUP)
        pid_r = first_r + ((pid % per_group) % group_rows)
        pid_c = (pid % per_group) // group_rows
        return pid_r, pid_c

    @triton.jit
    def _lora_linear_shrink_kernel(
        x_ptr,  # [M, K] input (strided), x dtype
        a_ptr,  # [R, K] lora_a (strided)
        s_ptr,  # [M, R] fp32 output S, contiguous
        seed_ptr,  # int64 [1] dropout seed (read only when HAS_DROPOUT)
        M, K, R,  # sizes (runtime: a new rank or length never recompiles)
        stride_xm, stride_xk,  # x strides (elements)
        stride_ar, stride_ak,  # lora_a strides
        p,  # fp32 dropout probability
        keep_scale,  # fp32 1 / (1 - p)
        HAS_DROPOUT: tl.constexpr,  # apply the 'pre' mask of x [M, K]
        INTERPRET: tl.constexpr,  # running in the CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr,  # rows of x per program
        BLOCK_K: tl.constexpr,  # reduction step
        BLOCK_R: tl.constexpr,  # rank tile (padded rank bucket, >= 16)
    ):
        """S[m, j] = sum_k x~[m, k] A[j, k], x~ = x * m / (1 - p): grid (M tiles, R tiles)."""
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rk0 = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        r_ok = rr < R
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        a_cols = a_ptr + rr.to(tl.int64)[None, :] * stride_ar
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            k_ok = rk < K
            x = load_f32(x_rows + rk[None, :] * stride_xk, m_ok[:, None] & k_ok[None, :], INTERPRET)
            if HAS_DROPOUT:
                # zeroing is exact; the 1/(1-p) factor is applied once, in fp32, at the end
                x = tl.where(keep_mask(seed, rm, rk, K, p), x, tl.zeros_like(x))
            a = load_f32(a_cols + rk[:, None] * stride_ak, k_ok[:, None] & r_ok[None, :], INTERPRET)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
        if HAS_DROPOUT:
            acc = acc * keep_scale
        s_ptrs = s_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :]
        tl.store(s_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _lora_linear_fwd_kernel(
        x_ptr,  # [M, K] input (strided)
        w_ptr,  # [N, K] frozen base weight (strided)
        bias_ptr,  # [N] bias (read only when HAS_BIAS)
        s_ptr,  # [M, R] fp32 S from the shrink kernel, contiguous
        b_ptr,  # [N, R] lora_b (strided)
        y_ptr,  # [M, N] output, contiguous
        seed_ptr,  # int64 [1] seed (read only when POST_DROPOUT)
        M, N, K, R,  # sizes
        stride_xm, stride_xk,  # x strides
        stride_wn, stride_wk,  # weight strides
        stride_bn, stride_br,  # lora_b strides
        scale,  # fp32 s = alpha / r
        p,  # fp32 dropout probability ('post' only)
        keep_scale,  # fp32 1 / (1 - p)
        HAS_BIAS: tl.constexpr,  # add the bias in the epilogue
        POST_DROPOUT: tl.constexpr,  # mask the [M, N] low-rank product (second accumulator)
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # output/K tiles
        BLOCK_R: tl.constexpr,  # rank step of the K-concatenation
        GROUP_M: tl.constexpr,  # row tiles per L2 group
    ):
        """Y = x W^T + (s S) B^T (+ b): one fp32 accumulator over the concatenated reduction
        [x | s S] @ [W | B]^T ('pre'/no dropout), or Y = x W^T + s (S B^T) * m / (1-p) (+ b)
        with the [M, N] mask regenerated here ('post'). Y is written once."""
        pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        rk0 = tl.arange(0, BLOCK_K)
        rr0 = tl.arange(0, BLOCK_R)
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            k_ok = rk < K
            x = load_f32(x_rows + rk[None, :] * stride_xk, m_ok[:, None] & k_ok[None, :], INTERPRET)
            w = load_f32(w_cols + rk[:, None] * stride_wk, k_ok[:, None] & n_ok[None, :], INTERPRET)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        # the low-rank term: a few more reduction steps over the rank, operands S (fp32) and B
        op_dtype = b_ptr.dtype.element_ty
        s_rows = s_ptr + rm.to(tl.int64)[:, None] * R
        b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
        if POST_DROPOUT:
            low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + rr0
                r_ok = rr < R
                s = tl.load(s_rows + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                b = load_f32(b_cols + rr[:, None] * stride_br, r_ok[:, None] & n_ok[None, :],
                             INTERPRET)
                low = tl.dot(dot_operand(s, op_dtype, INTERPRET), b, low, input_precision=PRECISION)
            keep = keep_mask(tl.load(seed_ptr), rm, rn, N, p)
            acc += tl.where(keep, low * (scale * keep_scale), 0.0)
        else:
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + rr0
                r_ok = rr < R
                s = tl.load(s_rows + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                # s applied in fp32 before the operand cast: never round s and B together
                s = dot_operand(s * scale, op_dtype, INTERPRET)
                b = load_f32(b_cols + rr[:, None] * stride_br, r_ok[:, None] & n_ok[None, :],
                             INTERPRET)
                acc = tl.dot(s, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            acc += bias[None, :]
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _lora_linear_bwd_dsdb_kernel(
        dy_ptr,  # [M, N] upstream gradient (strided; stride 0 when expanded)
        b_ptr,  # [N, R] lora_b (strided)
        s_ptr,  # [M, R] fp32 S saved by the forward, contiguous
        ds_ptr,  # [M, R] fp32 output dS, contiguous
        dbp_ptr,  # [cdiv(M, BLOCK_M), N, R] fp32 output: per-row-tile partial dB, contiguous
        seed_ptr,  # int64 [1] seed (read only when POST_DROPOUT)
        M, N, R,  # sizes
        stride_dym, stride_dyn,  # dY strides
        stride_bn, stride_br,  # lora_b strides
        scale,  # fp32 s
        p,  # fp32 dropout probability ('post' only)
        keep_scale,  # fp32 1 / (1 - p)
        POST_DROPOUT: tl.constexpr,  # dY of the low-rank term is dY * m / (1 - p)
        WRITE_DB: tl.constexpr,  # write the dB partials (else the host computes dB itself)
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr,  # rows per program (host-chosen: it sizes the dB partials)
        BLOCK_N: tl.constexpr,  # N step
        BLOCK_R: tl.constexpr,  # rank tile
    ):
        """One pass over dY: dS = s dY B [M, R] and the partial dB_t = s dY_t^T S_t [N, R] of
        each row tile t (summed on the host, deterministically). G = dY * m / (1-p) for 'post'."""
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rn0 = tl.arange(0, BLOCK_N)
        m_ok = rm < M
        r_ok = rr < R
        g_scale = scale
        if POST_DROPOUT:
            seed = tl.load(seed_ptr)
            g_scale = scale * keep_scale
        op_dtype = b_ptr.dtype.element_ty
        s = tl.load(s_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        s = dot_operand(s, op_dtype, INTERPRET)
        dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * stride_dym
        b_rows = b_ptr + rr.to(tl.int64)[None, :] * stride_br
        dbp_rows = dbp_ptr + pid_m.to(tl.int64) * N * R + rr[None, :]
        ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + rn0
            n_ok = rn < N
            dy = load_f32(dy_rows + rn[None, :] * stride_dyn, m_ok[:, None] & n_ok[None, :],
                          INTERPRET)
            if POST_DROPOUT:
                dy = tl.where(keep_mask(seed, rm, rn, N, p), dy, tl.zeros_like(dy))
            b = load_f32(b_rows + rn.to(tl.int64)[:, None] * stride_bn,
                         n_ok[:, None] & r_ok[None, :], INTERPRET)
            ds = tl.dot(dy, b, ds, input_precision=PRECISION)
            if WRITE_DB:
                dbp = tl.dot(tl.trans(dy), s, input_precision=PRECISION)
                tl.store(dbp_rows + rn.to(tl.int64)[:, None] * R, dbp * g_scale,
                         mask=n_ok[:, None] & r_ok[None, :])
        tl.store(ds_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], ds * g_scale,
                 mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _lora_linear_bwd_dx_kernel(
        dy_ptr,  # [M, N] upstream gradient (strided)
        w_ptr,  # [N, K] frozen base weight (strided)
        ds_ptr,  # [M, R] fp32 dS, contiguous
        a_ptr,  # [R, K] lora_a (strided)
        dx_ptr,  # [M, K] output dX, contiguous
        seed_ptr,  # int64 [1] seed (read only when PRE_DROPOUT)
        M, N, K, R,  # sizes
        stride_dym, stride_dyn,  # dY strides
        stride_wn, stride_wk,  # weight strides
        stride_ar, stride_ak,  # lora_a strides
        p,  # fp32 dropout probability ('pre' only)
        keep_scale,  # fp32 1 / (1 - p)
        PRE_DROPOUT: tl.constexpr,  # the low-rank term of dX carries the 'pre' mask
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,  # output tile
        BLOCK_N: tl.constexpr,  # reduction step over N
        BLOCK_R: tl.constexpr,  # reduction step over the rank
        GROUP_M: tl.constexpr,  # row tiles per L2 group
    ):
        """dX = dY W + (dS A) * m / (1 - p): the low-rank term in the same kernel, accumulated in
        the same fp32 accumulator when no mask applies, else in a second one masked at the end."""
        pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        m_ok = rm < M
        k_ok = rk < K
        rn0 = tl.arange(0, BLOCK_N)
        rr0 = tl.arange(0, BLOCK_R)
        dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * stride_dym
        w_cols = w_ptr + rk[None, :] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + rn0
            n_ok = rn < N
            dy = load_f32(dy_rows + rn[None, :] * stride_dyn, m_ok[:, None] & n_ok[None, :],
                          INTERPRET)
            w = load_f32(w_cols + rn.to(tl.int64)[:, None] * stride_wn,
                         n_ok[:, None] & k_ok[None, :], INTERPRET)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
        op_dtype = a_ptr.dtype.element_ty
        ds_rows = ds_ptr + rm.to(tl.int64)[:, None] * R
        a_cols = a_ptr + rk[None, :] * stride_ak
        if PRE_DROPOUT:
            low = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + rr0
                r_ok = rr < R
                ds = tl.load(ds_rows + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                a = load_f32(a_cols + rr.to(tl.int64)[:, None] * stride_ar,
                             r_ok[:, None] & k_ok[None, :], INTERPRET)
                low = tl.dot(dot_operand(ds, op_dtype, INTERPRET), a, low,
                             input_precision=PRECISION)
            keep = keep_mask(tl.load(seed_ptr), rm, rk, K, p)
            acc += tl.where(keep, low * keep_scale, 0.0)
        else:
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + rr0
                r_ok = rr < R
                ds = tl.load(ds_rows + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                a = load_f32(a_cols + rr.to(tl.int64)[:, None] * stride_ar,
                             r_ok[:, None] & k_ok[None, :], INTERPRET)
                acc = tl.dot(dot_operand(ds, op_dtype, INTERPRET), a, acc,
                             input_precision=PRECISION)
        dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _lora_linear_bwd_da_kernel(
        ds_ptr,  # [M, R] fp32 dS, contiguous
        x_ptr,  # [M, K] input (strided)
        da_ptr,  # [R, K] output dA, contiguous
        seed_ptr,  # int64 [1] seed (read only when PRE_DROPOUT)
        M, K, R,  # sizes
        stride_xm, stride_xk,  # x strides
        p,  # fp32 dropout probability ('pre' only)
        keep_scale,  # fp32 1 / (1 - p)
        PRE_DROPOUT: tl.constexpr,  # regenerate x~ = x * m / (1 - p) from x and the seed
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_K: tl.constexpr,  # output columns per program
        BLOCK_M: tl.constexpr,  # reduction step over M
        BLOCK_R: tl.constexpr,  # output rank rows per program
    ):
        """dA = dS^T x~ [R, K], reducing over M inside the program (deterministic)."""
        pid_k = tl.program_id(0)
        pid_r = tl.program_id(1)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rm0 = tl.arange(0, BLOCK_M)
        k_ok = rk < K
        r_ok = rr < R
        if PRE_DROPOUT:
            seed = tl.load(seed_ptr)
        op_dtype = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rm = m0 + rm0
            m_ok = rm < M
            ds_t = tl.load(ds_ptr + rm.to(tl.int64)[None, :] * R + rr[:, None],
                           mask=r_ok[:, None] & m_ok[None, :], other=0.0)
            x = load_f32(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk,
                         m_ok[:, None] & k_ok[None, :], INTERPRET)
            if PRE_DROPOUT:
                x = tl.where(keep_mask(seed, rm, rk, K, p), x, tl.zeros_like(x))
            acc = tl.dot(dot_operand(ds_t, op_dtype, INTERPRET), x, acc, input_precision=PRECISION)
        if PRE_DROPOUT:
            acc = acc * keep_scale
        da_ptrs = da_ptr + rr.to(tl.int64)[:, None] * K + rk[None, :]
        tl.store(da_ptrs, acc.to(da_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])

# ---------------------------------------------------------------------------------------------
# Launch configurations. One named list per architecture and kernel; the autotuner picks per
# (N, K) (and rank bucket), not per M, so a new sequence length does not re-benchmark. Rank tiles
# (BLOCK_R) come from the rank bucket (_triton_common.rank_block), not from the configs.
# ---------------------------------------------------------------------------------------------

# dS/dB: BLOCK_M sizes the dB partials buffer [cdiv(M, BLOCK_M), N, r], so it is fixed per arch
# (128 rows: 1/128 of dY's bytes per rank column; the host sums them) rather than autotuned.
_DSDB_BLOCK_M = {"sm80": 128, "sm90": 128, "interpret": 64}
DB_PARTIALS_MAX_BYTES = 256 << 20  # above this, dB is its own GEMM (see _launch_dsdb)


def _cfg(num_warps: int, num_stages: int, **meta: int):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def _swap_nk(configs: list) -> list:
    """dX configs from forward GEMM configs: dX's output columns are K and it reduces over N."""
    return [_cfg(c.num_warps, c.num_stages, BLOCK_M=c.kwargs["BLOCK_M"],
                 BLOCK_K=c.kwargs["BLOCK_N"], BLOCK_N=c.kwargs["BLOCK_K"],
                 GROUP_M=c.kwargs["GROUP_M"]) for c in configs]


def _configs_sm80() -> dict[str, list]:
    """A100 (sm_80, 164 KB smem/SM, mma.sync). Every entry compiles without register spills
    (tests/test_triton_aot.py). What spilled and was dropped: 128x256 GEMM tiles (the low-rank
    step's S tile on top of a 128-register accumulator), 4-warp 128x128 tiles for dX, and any
    dropout variant with more than 32 mask elements per thread (Philox keeps 4 words of state
    per element through its 10 rounds), which rules out 128x128 two-accumulator tiles."""
    return {
        # shrink: streams x once per rank tile; the 'pre' mask of the x tile sets the budget
        "shrink": [
            _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
            _cfg(8, 3, BLOCK_M=128, BLOCK_K=64),
            _cfg(8, 3, BLOCK_M=128, BLOCK_K=128),
        ],
        # fused GEMM: Triton's matmul-tutorial tiles that fit with the low-rank step
        "fwd": [
            _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        ],
        # 'post' dropout: a second [BM, BN] accumulator and the [BM, BN] mask in the epilogue
        "fwd_two_acc": [
            _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        ],
        # dS/dB: 8 warps hold the [128, BLOCK_R] dS accumulator and the S tile without spilling
        "dsdb": [_cfg(8, 3, BLOCK_N=64), _cfg(8, 3, BLOCK_N=32)],
        # dX: output tile [BM, BK], reduction over N in BLOCK_N steps
        "dx": [
            _cfg(8, 3, BLOCK_M=128, BLOCK_K=128, BLOCK_N=32, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=64, BLOCK_K=128, BLOCK_N=32, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, GROUP_M=8),
        ],
        "dx_two_acc": [
            _cfg(8, 3, BLOCK_M=64, BLOCK_K=128, BLOCK_N=32, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, GROUP_M=8),
        ],
        # dA: output [r, K] is small, the reduction over M long; wide K tiles for parallelism
        "da": [
            _cfg(4, 3, BLOCK_K=64, BLOCK_M=64),
            _cfg(8, 3, BLOCK_K=128, BLOCK_M=64),
        ],
    }


def _configs_sm90() -> dict[str, list]:
    """H100 (sm_90a, 228 KB smem/SM, wgmma): deeper pipelines (more shared memory), 64-wide
    K steps, and the 128x256 8-warp GEMM tile, which fits here with a 32-wide rank step."""
    gemm = [
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ]
    two_acc = [
        _cfg(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ]
    return {
        "shrink": [
            _cfg(4, 4, BLOCK_M=64, BLOCK_K=64),
            _cfg(8, 4, BLOCK_M=128, BLOCK_K=64),
        ],
        "fwd": gemm,
        "fwd_two_acc": two_acc,
        "dsdb": [_cfg(8, 4, BLOCK_N=64), _cfg(8, 4, BLOCK_N=32)],
        "dx": _swap_nk(gemm),
        "dx_two_acc": _swap_nk(two_acc),
        "da": [
            _cfg(4, 4, BLOCK_K=64, BLOCK_M=64),
            _cfg(8, 4, BLOCK_K=128, BLOCK_M=64),
            _cfg(8, 4, BLOCK_K=128, BLOCK_M=128),
        ],
    }


def _configs_interpret() -> dict[str, list]:
    """CPU interpreter: one big-block config per kernel (each program costs Python overhead per
    op, so fewer, larger programs are faster; nothing is benchmarked with a single config)."""
    gemm = _cfg(4, 1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    return {
        "shrink": [_cfg(4, 1, BLOCK_M=64, BLOCK_K=64)],
        "fwd": [gemm],
        "fwd_two_acc": [gemm],
        "dsdb": [_cfg(4, 1, BLOCK_N=64)],
        "dx": [gemm],
        "dx_two_acc": [gemm],
        "da": [_cfg(4, 1, BLOCK_K=64, BLOCK_M=64)],
    }


_CONFIGS = {"sm80": _configs_sm80, "sm90": _configs_sm90, "interpret": _configs_interpret}


def _configs(arch: str, name: str) -> list:
    """Config list of kernel ``name`` for ``arch`` (sm80 | sm90 | interpret)."""
    return _CONFIGS[arch]()[name]


_AUTOTUNE_KEYS = {
    "shrink": ("K", "R"),
    "fwd": ("N", "K", "R"),
    "fwd_two_acc": ("N", "K", "R"),
    "dsdb": ("N", "R"),
    "dx": ("N", "K", "R"),
    "dx_two_acc": ("N", "K", "R"),
    "da": ("K", "R"),
}


def _kernel(kernel, name: str, device: torch.device):
    """The autotuned launcher of ``kernel`` with the config list ``name`` for this device."""
    arch = current_arch(device)
    return autotuned(kernel, arch, name, _configs, _AUTOTUNE_KEYS[name])


# ---------------------------------------------------------------------------------------------
# Host launchers (2-D in, 2-D out). Stable API, reused by kernels/norm_lora.py. In each, ``seed``
# (int64 tensor [1]) turns on the dropout mask *of the tensor that kernel handles* and ``p`` is
# its probability: shrink/dx/da take the 'pre' seed (mask of x [M, K]); fused_gemm/dsdb take the
# 'post' seed (mask of y [M, N]). seed=None or p=0 means no mask in that kernel.
# ---------------------------------------------------------------------------------------------


def _common(device: torch.device, dtype: torch.dtype) -> dict:
    """Constexprs every kernel takes: interpreter flag and fp32 dot precision."""
    return {"INTERPRET": current_arch(device) == "interpret", "PRECISION": dot_precision(dtype)}


def _dropout_args(seed: torch.Tensor | None, p: float, like: torch.Tensor):
    """(mask on?, seed pointer (a dummy tensor when off), fp32 p, fp32 1/(1-p))."""
    on = seed is not None and p > 0.0
    if not on:
        return False, like, 0.0, 1.0
    return True, seed, float(p), float(1.0 / (1.0 - p))


def _launch_shrink(x2d: torch.Tensor, lora_a: torch.Tensor, *, seed: torch.Tensor | None = None,
                   p: float = 0.0) -> torch.Tensor:
    """S = x~ A^T: x2d [M, K] (any strides), lora_a [r, K] -> S [M, r] fp32, contiguous.
    x~ = x * m / (1 - p) with the 'pre' mask of ``seed`` when given (philox.py)."""
    m, k = x2d.shape
    r = lora_a.shape[0]
    s_mat = torch.empty((m, r), dtype=torch.float32, device=x2d.device)
    if m == 0:
        return s_mat
    on, seed_arg, p_arg, keep = _dropout_args(seed, p, s_mat)
    block_r = rank_block(r)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r))
    _kernel(_lora_linear_shrink_kernel, "shrink", x2d.device)[grid](
        x2d, lora_a, s_mat, seed_arg, m, k, r, x2d.stride(0), x2d.stride(1),
        lora_a.stride(0), lora_a.stride(1), p_arg, keep, HAS_DROPOUT=on,
        BLOCK_R=block_r, **_common(x2d.device, x2d.dtype))
    return s_mat


def _launch_fused_gemm(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       s_mat: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                       seed: torch.Tensor | None = None, p: float = 0.0) -> torch.Tensor:
    """y = x W^T + s S B^T (+ bias), written once: x2d [M, K] (any strides), weight [N, K],
    bias [N] or None (None also for skip_bias_add), s_mat [M, r] fp32 contiguous (from
    ``_launch_shrink``), lora_b [N, r] -> y2d [M, N] in x2d's dtype, contiguous. With the 'post'
    ``seed``, the low-rank product is masked: y = x W^T + s (S B^T) * m / (1 - p) (+ bias)."""
    m, k = x2d.shape
    n, r = lora_b.shape
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y
    on, seed_arg, p_arg, keep = _dropout_args(seed, p, y)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _kernel(_lora_linear_fwd_kernel, "fwd_two_acc" if on else "fwd", x2d.device)[grid](
        x2d, weight, bias.contiguous() if bias is not None else y, s_mat.contiguous(), lora_b, y,
        seed_arg,
        m, n, k, r, x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        lora_b.stride(0), lora_b.stride(1), float(scale), p_arg, keep,
        HAS_BIAS=bias is not None, POST_DROPOUT=on,
        BLOCK_R=min(rank_block(r), GEMM_RANK_STEP),
        **_common(x2d.device, x2d.dtype))
    return y


def _launch_dsdb(dy2d: torch.Tensor, lora_b: torch.Tensor, s_mat: torch.Tensor, scale: float, *,
                 seed: torch.Tensor | None = None, p: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s G B and dB = s G^T S from one pass over dY, G = dY (* m / (1 - p) with the 'post'
    ``seed``): dy2d [M, N] (any strides, stride 0 included), lora_b [N, r], s_mat [M, r] fp32 ->
    (dS [M, r] fp32 contiguous, dB [N, r] in lora_b's dtype). dB is reduced over row tiles on
    the host in fp32 (deterministic, no atomics)."""
    m, n = dy2d.shape
    r = lora_b.shape[1]
    ds = torch.empty((m, r), dtype=torch.float32, device=dy2d.device)
    if m == 0:
        return ds, lora_b.new_zeros(lora_b.shape)  # contiguous, as the fake says
    arch = current_arch(dy2d.device)
    block_m, block_r = _DSDB_BLOCK_M[arch], rank_block(r)
    tiles_m = triton.cdiv(m, block_m)
    on, seed_arg, p_arg, keep = _dropout_args(seed, p, ds)
    # The fp32 dB partials cost tiles_m * N * r * 4 bytes (0.47 GB at M=16384, N=14336, r=64);
    # past DB_PARTIALS_MAX_BYTES, and with no 'post' mask on dY, dB = s dY^T S is one more GEMM
    # (about the same traffic: one more read of dY instead of writing and reading the partials).
    write_db = on or tiles_m * n * r * 4 <= DB_PARTIALS_MAX_BYTES
    partial = torch.empty((tiles_m, n, r) if write_db else (1,), dtype=torch.float32,
                          device=dy2d.device)
    s_c = s_mat.contiguous()
    grid = (tiles_m, triton.cdiv(r, block_r))
    _kernel(_lora_linear_bwd_dsdb_kernel, "dsdb", dy2d.device)[grid](
        dy2d, lora_b, s_c, ds, partial, seed_arg, m, n, r,
        dy2d.stride(0), dy2d.stride(1), lora_b.stride(0), lora_b.stride(1), float(scale), p_arg,
        keep, POST_DROPOUT=on, WRITE_DB=write_db, BLOCK_M=block_m, BLOCK_R=block_r,
        **_common(dy2d.device, dy2d.dtype))
    if not write_db:  # s S rounded once to dY's dtype, as the forward's tensor-core operand is
        return ds, (dy2d.t() @ (s_c * scale).to(dy2d.dtype)).to(lora_b.dtype)
    db = partial[0] if tiles_m == 1 else partial.sum(0)
    return ds, db.to(lora_b.dtype)


def _launch_dx(dy2d: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_a: torch.Tensor,
               *, seed: torch.Tensor | None = None, p: float = 0.0,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dX = dY W + (dS A) (* m / (1 - p) with the 'pre' ``seed``): dy2d [M, N] (any strides),
    weight [N, K], ds [M, r] fp32 contiguous, lora_a [r, K] -> dx2d [M, K] contiguous in
    ``out_dtype`` (default dy's dtype; fp32 lets a norm backward consume it unrounded)."""
    m, n = dy2d.shape
    r, k = lora_a.shape
    dx = torch.empty((m, k), dtype=out_dtype or dy2d.dtype, device=dy2d.device)
    if m == 0:
        return dx
    on, seed_arg, p_arg, keep = _dropout_args(seed, p, dx)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)
    _kernel(_lora_linear_bwd_dx_kernel, "dx_two_acc" if on else "dx", dy2d.device)[grid](
        dy2d, weight, ds.contiguous(), lora_a, dx, seed_arg, m, n, k, r,
        dy2d.stride(0), dy2d.stride(1), weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), p_arg, keep, PRE_DROPOUT=on,
        BLOCK_R=min(rank_block(r), GEMM_RANK_STEP), **_common(dy2d.device, dy2d.dtype))
    return dx


def _launch_da(ds: torch.Tensor, x2d: torch.Tensor, *, seed: torch.Tensor | None = None,
               p: float = 0.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dA = dS^T x~: ds [M, r] fp32 contiguous, x2d [M, K] (any strides) -> dA [r, K] contiguous
    in ``out_dtype`` (default x's dtype); x~ regenerated from x and the 'pre' ``seed``."""
    m, k = x2d.shape
    r = ds.shape[1]
    da = torch.empty((r, k), dtype=out_dtype or x2d.dtype, device=x2d.device)
    if m == 0:
        return da.zero_()
    on, seed_arg, p_arg, keep = _dropout_args(seed, p, da)
    block_r = rank_block(r)
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(r, block_r))
    _kernel(_lora_linear_bwd_da_kernel, "da", x2d.device)[grid](
        ds.contiguous(), x2d, da, seed_arg, m, k, r, x2d.stride(0), x2d.stride(1), p_arg, keep,
        PRE_DROPOUT=on, BLOCK_R=block_r, **_common(x2d.device, x2d.dtype))
    return da


# ---------------------------------------------------------------------------------------------
# Registered ops (custom_op + register_fake + register_autograd; see DESIGN.md for why not
# triton_op). Saved for backward: x, S and the seed (plus references to the parameters).
# ---------------------------------------------------------------------------------------------

_FWD_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
               "Tensor? seed, float scale, float p, bool post) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor s_mat, "
               "Tensor? seed, float scale, float p, bool post, bool need_dx) "
               "-> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("bridge::lora_linear_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _lora_linear_fwd_op(x, weight, bias, lora_a, lora_b, seed, scale, p, post):
    """(y [..., N], S [M, r] fp32). ``bias`` None means no bias in y; ``seed`` None or p == 0
    means no dropout; ``post`` puts the mask on B(A x) instead of x."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    s_mat = _launch_shrink(x2d, lora_a, seed=None if post else seed, p=p)
    y2d = _launch_fused_gemm(x2d, weight, bias, s_mat, lora_b, scale,
                             seed=seed if post else None, p=p)
    return y2d.view(*x.shape[:-1], weight.shape[0]), s_mat


@_lora_linear_fwd_op.register_fake
def _(x, weight, bias, lora_a, lora_b, seed, scale, p, post):
    m = math.prod(x.shape[:-1])
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            x.new_empty((m, lora_a.shape[0]), dtype=torch.float32))


@torch.library.custom_op("bridge::lora_linear_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _lora_linear_bwd_op(dy, x, weight, lora_a, lora_b, s_mat, seed, scale, p, post, need_dx):
    """(dx of x's shape, or an empty tensor when not need_dx; dA [r, K]; dB [N, r])."""
    n, k = weight.shape
    dy2d, x2d = dy.reshape(-1, n), x.reshape(-1, k)
    pre_seed, post_seed = (None, seed) if post else (seed, None)
    ds, db = _launch_dsdb(dy2d, lora_b, s_mat, scale, seed=post_seed, p=p)
    if need_dx:
        dx = _launch_dx(dy2d, weight, ds, lora_a, seed=pre_seed, p=p, out_dtype=x.dtype)
        dx = dx.view(x.shape)
    else:
        dx = x.new_empty(0)
    da = _launch_da(ds, x2d, seed=pre_seed, p=p, out_dtype=lora_a.dtype)
    return dx, da, db


@_lora_linear_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, s_mat, seed, scale, p, post, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, seed, scale, p, post = inputs
    _, s_mat = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, s_mat, seed)
    ctx.scale, ctx.p, ctx.post, ctx.has_bias = scale, p, post, bias is not None
    ctx.mark_non_differentiable(s_mat)


def _lora_linear_backward(ctx, dy, _ds_unused):
    x, weight, lora_a, lora_b, s_mat, seed = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = torch.ops.bridge.lora_linear_bwd(dy, x, weight, lora_a, lora_b, s_mat, seed,
                                                  ctx.scale, ctx.p, ctx.post, need_dx)
    dbias = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        dbias = dy.reshape(-1, weight.shape[0]).sum(0, dtype=torch.float32).to(dy.dtype)
    return dx if need_dx else None, None, dbias, da, db, None, None, None, None


torch.library.register_autograd("bridge::lora_linear_fwd", _lora_linear_backward,
                                setup_context=_lora_linear_setup_context)


def _triton_lora_linear(x, weight, bias, lora_a, lora_b, *, scale, dropout, dropout_position,
                        training, skip_bias_add, seed):
    """The Triton backend: draws the seed when needed and calls the registered op."""
    p = float(dropout) if training else 0.0
    seed_t = None
    if p > 0.0:
        seed_t = draw_seed(x.device) if seed is None else seed_tensor(seed, x.device)
    y, _ = torch.ops.bridge.lora_linear_fwd(x, weight, None if skip_bias_add else bias, lora_a,
                                            lora_b, seed_t, float(scale), p,
                                            dropout_position == "post")
    return y


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scale: float,
    dropout: float = 0.0,
    dropout_position: str = "pre",
    training: bool = True,
    skip_bias_add: bool = False,
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x W^T (+ b) + s * B(A(dropout(x))) on the backend that kernels/backend.py picks."""
    check_lora_args(x, weight, bias, lora_a, lora_b)
    check_dropout(dropout, dropout_position)
    frozen = (not weight.requires_grad,
              "base weight requires grad (the fused path is for a frozen base)")
    choice = resolve_backend(backend, "lora_linear", device=x.device, dtype=x.dtype,
                             constraints=(frozen,))
    impl = _eager_lora_linear if choice.name == "eager" else _triton_lora_linear
    return impl(x, weight, bias, lora_a, lora_b, scale=scale, dropout=dropout,
                dropout_position=dropout_position, training=training,
                skip_bias_add=skip_bias_add, seed=seed)
