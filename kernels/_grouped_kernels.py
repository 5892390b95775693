"""The Triton kernels of the grouped (MoE expert) LoRA linear (``bridge.kernels.grouped_lora_linear``
holds the reference, the registered ops and the functional op): the kernels, their launch
configurations per architecture, the host launchers and the AOT specs.

Tile schedule: no row tile straddles two experts. Expert e owns cdiv(c_e, BLOCK_M) consecutive row
tiles; each program finds its (expert, first row) from the E counts in its prologue (an E-wide
prefix sum of an L2-resident int32 vector), so the schedule needs no host sync, no extra launch,
is CUDA-graph safe and lets BLOCK_M be autotuned. The grid is sized by the bound
cdiv(M, BLOCK_M) + E - 1 on the tile count, known on the host from M and E alone; programs past
the last tile exit at once.

Backward (W frozen, so no dW), every reduction over tokens inside one program or in a fixed order:
dS = s dY B_e and dB_e from one pass over dY (per-row-tile partials summed per expert in tile order)
or, when those partials would cost more traffic than a second read of dY, dB_e by a per-expert
reduction kernel; dX = dY W_e + (dS A_e) m / (1 - p) in the GEMM kernel of the forward (roles
swapped); dA_e = dS_e^T x~_e per expert. A shared factor reuses the dense kernels of
kernels/_lowrank.py over all M rows (its gradient sums every expert's tokens).
"""

from __future__ import annotations

import torch
from bridge.kernels._lowrank import DSDB_BLOCK_M
from bridge.kernels._triton_common import (
    GEMM_RANK_STEP,
    HAS_TRITON,
    autotuned,
    cfg,
    current_arch,
    dot_operand,
    load_f32,
    tl,
    triton,
    triton_next_pow2,
)
from bridge.kernels.philox import keep_mask

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    from bridge.kernels._gemm import _grouped_tile

    @triton.jit
    def _tile_of(counts_ptr, t, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
        """Row tile ``t`` of the expert-major schedule -> (expert, first row, expert's end row).
        Expert e owns tiles [sum_{i<e} cdiv(c_i, BLOCK_M), sum_{i<=e} cdiv(c_i, BLOCK_M)); a tile
        past the last gets an expert >= E (its program exits)."""
        ei = tl.arange(0, E_PAD)
        c = tl.load(counts_ptr + ei, mask=ei < E, other=0)
        tiles = (c + BLOCK_M - 1) // BLOCK_M
        tiles_end = tl.cumsum(tiles, 0)
        rows_end = tl.cumsum(c, 0)
        e = tl.sum((tiles_end <= t).to(tl.int32), 0)
        here = ei == e
        first_tile = tl.sum(tl.where(here, tiles_end - tiles, 0), 0)
        end = tl.sum(tl.where(here, rows_end, 0), 0)
        start = end - tl.sum(tl.where(here, c, 0), 0)
        return e, start + (t - first_tile) * BLOCK_M, end

    @triton.jit
    def _span_of(counts_ptr, e, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
        """Expert ``e`` -> (first row, end row, first row tile, number of row tiles)."""
        ei = tl.arange(0, E_PAD)
        c = tl.load(counts_ptr + ei, mask=ei < E, other=0)
        before = ei < e
        start = tl.sum(tl.where(before, c, 0), 0)
        n = tl.sum(tl.where(ei == e, c, 0), 0)
        first_tile = tl.sum(tl.where(before, (c + BLOCK_M - 1) // BLOCK_M, 0), 0)
        return start, start + n, first_tile, (n + BLOCK_M - 1) // BLOCK_M

    @triton.jit
    def _grouped_lora_gemm_kernel(
        l_ptr,  # [M, D] left operand, strided: x (forward) or dY (dX)
        w_ptr,  # stacked [E, N, K] base weights, or (W_PTRS) weight 0, for its dtype
        wptrs_ptr,  # int64 [E] addresses of the per-expert [N, K] weights (read when W_PTRS)
        bias_ptr,  # [E, C] per-expert bias, contiguous (read when HAS_BIAS)
        s_ptr,  # [M, R] fp32, contiguous: S (forward) or dS (dX)
        q_ptr,  # low-rank right operand: B [(E,) N, R] (forward) or A [(E,) R, K] (dX)
        out_ptr,  # [M, C] output, contiguous: y (forward) or dX
        counts_ptr,  # int32 [E] tokens per expert (the tile schedule)
        seed_ptr,  # int64 [1] dropout seed (read when MASKED)
        M, C, D, R, E,  # rows, output columns, reduction length, rank, experts
        stride_lm, stride_ld,  # left operand strides
        stride_we,  # weight expert stride (stacked only)
        stride_wd, stride_wc,  # weight strides along D and along C (forward: K, N; dX: N, K)
        stride_be,  # bias expert stride
        stride_qe,  # low-rank factor expert stride: 0 when one factor is shared by all experts
        stride_qr, stride_qc,  # low-rank factor strides along R and along C
        low_scale,  # fp32 factor of the low-rank term: s (forward; S is unscaled) or 1 (dX)
        p,  # fp32 dropout probability (MASKED only)
        keep_scale,  # fp32 1 / (1 - p)
        HAS_BIAS: tl.constexpr,  # add bias[e] in the epilogue
        MASKED: tl.constexpr,  # mask the [M, C] low-rank product ('post' forward, 'pre' dX)
        W_PTRS: tl.constexpr,  # weights through the address array instead of a stacked tensor
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,  # tiles
        BLOCK_R: tl.constexpr,  # rank step of the K-concatenation
        GROUP_M: tl.constexpr,  # row tiles per L2 group
        E_PAD: tl.constexpr,  # power of two >= E (schedule vectors)
    ):
        """out_e = L_e W_e' + low_scale (S_e Q_e) (* m / (1 - p) when MASKED) (+ b_e), one fp32
        accumulator (a second for the masked product), written once. Forward: L = x, W' = W_e^T,
        Q = B_e^T; dX: L = dY, W' = W_e, Q = A_e (the same GEMM with roles swapped)."""
        n_tiles = tl.cdiv(M, BLOCK_M) + E - 1  # bound on sum_e cdiv(c_e, BLOCK_M)
        pid_t, pid_c = _grouped_tile(tl.program_id(0), n_tiles * BLOCK_M, C, BLOCK_M, BLOCK_C,
                                     GROUP_M)
        e, row0, row_end = _tile_of(counts_ptr, pid_t, E, BLOCK_M, E_PAD)
        if e >= E:
            return
        rm = row0 + tl.arange(0, BLOCK_M)
        rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_ok = rm < row_end
        c_ok = rc < C
        if W_PTRS:
            w_base = tl.load(wptrs_ptr + e).to(tl.pointer_type(w_ptr.dtype.element_ty))
            # the host checks 16-byte alignment; without this hint the loads are scalar
            w_base = tl.multiple_of(w_base, 16)
        else:
            w_base = w_ptr + e.to(tl.int64) * stride_we
        rd0 = tl.arange(0, BLOCK_D)
        l_rows = l_ptr + rm.to(tl.int64)[:, None] * stride_lm
        w_cols = w_base + rc.to(tl.int64)[None, :] * stride_wc
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + rd0
            d_ok = rd < D
            lt = load_f32(l_rows + rd[None, :] * stride_ld, m_ok[:, None] & d_ok[None, :],
                          INTERPRET)
            wt = load_f32(w_cols + rd.to(tl.int64)[:, None] * stride_wd,
                          d_ok[:, None] & c_ok[None, :], INTERPRET)
            acc = tl.dot(lt, wt, acc, input_precision=PRECISION)
        # the low-rank term: more reduction steps over the rank, operands S (fp32) and Q_e
        op_dtype = q_ptr.dtype.element_ty
        rr0 = tl.arange(0, BLOCK_R)
        s_rows = s_ptr + rm.to(tl.int64)[:, None] * R
        q_cols = q_ptr + e.to(tl.int64) * stride_qe + rc.to(tl.int64)[None, :] * stride_qc
        if MASKED:
            low = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + rr0
                r_ok = rr < R
                s = tl.load(s_rows + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                q = load_f32(q_cols + rr[:, None] * stride_qr, r_ok[:, None] & c_ok[None, :],
                             INTERPRET)
                low = tl.dot(dot_operand(s, op_dtype, INTERPRET), q, low, input_precision=PRECISION)
            keep = keep_mask(tl.load(seed_ptr), rm, rc, C, p)
            acc += tl.where(keep, low * (low_scale * keep_scale), 0.0)
        else:
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + rr0
                r_ok = rr < R
                s = tl.load(s_rows + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                # the scale applied in fp32 before the operand cast: never round s and B together
                s = dot_operand(s * low_scale, op_dtype, INTERPRET)
                q = load_f32(q_cols + rr[:, None] * stride_qr, r_ok[:, None] & c_ok[None, :],
                             INTERPRET)
                acc = tl.dot(s, q, acc, input_precision=PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + e.to(tl.int64) * stride_be + rc, mask=c_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _grouped_shrink_kernel(
        x_ptr,  # [M, K] input, strided
        a_ptr,  # [E, R, K] per-expert lora_a, strided
        s_ptr,  # [M, R] fp32 output S, contiguous
        counts_ptr,  # int32 [E] tokens per expert
        seed_ptr,  # int64 [1] dropout seed (read when HAS_DROPOUT)
        M, K, R, E,  # sizes
        stride_xm, stride_xk,  # x strides
        stride_ae, stride_ar, stride_ak,  # lora_a strides
        p,  # fp32 dropout probability
        keep_scale,  # fp32 1 / (1 - p)
        HAS_DROPOUT: tl.constexpr,  # apply the 'pre' mask of x [M, K]
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr,  # rows per program
        BLOCK_K: tl.constexpr,  # reduction step
        BLOCK_R: tl.constexpr,  # rank tile (padded bucket, >= 16)
        E_PAD: tl.constexpr,  # power of two >= E
    ):
        """S[m, j] = sum_k x~[m, k] A_e[j, k] for the rows m of expert e: grid (tiles, R tiles)."""
        e, row0, row_end = _tile_of(counts_ptr, tl.program_id(0), E, BLOCK_M, E_PAD)
        if e >= E:
            return
        rm = row0 + tl.arange(0, BLOCK_M)
        rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rk0 = tl.arange(0, BLOCK_K)
        m_ok = rm < row_end
        r_ok = rr < R
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        a_cols = a_ptr + e.to(tl.int64) * stride_ae + rr.to(tl.int64)[None, :] * stride_ar
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            k_ok = rk < K
            x = load_f32(x_rows + rk[None, :] * stride_xk, m_ok[:, None] & k_ok[None, :], INTERPRET)
            if HAS_DROPOUT:  # zeroing is exact; 1/(1-p) is applied once, in fp32, at the end
                x = tl.where(keep_mask(seed, rm, rk, K, p), x, tl.zeros_like(x))
            a = load_f32(a_cols + rk[:, None] * stride_ak, k_ok[:, None] & r_ok[None, :], INTERPRET)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
        if HAS_DROPOUT:
            acc = acc * keep_scale
        tl.store(s_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], acc,
                 mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _grouped_dsdb_kernel(
        dy_ptr,  # [M, N] upstream gradient, strided (stride 0 when expanded)
        b_ptr,  # [E, N, R] per-expert lora_b, strided
        s_ptr,  # [M, R] fp32 S saved by the forward, contiguous
        ds_ptr,  # [M, R] fp32 output dS, contiguous
        dbp_ptr,  # [tiles, N, R] fp32 output: the partial dB of each row tile, contiguous
        counts_ptr,  # int32 [E] tokens per expert
        seed_ptr,  # int64 [1] dropout seed (read when POST_DROPOUT)
        M, N, R, E,  # sizes
        stride_dym, stride_dyn,  # dY strides
        stride_be, stride_bn, stride_br,  # lora_b strides
        scale,  # fp32 s
        p,  # fp32 dropout probability ('post' only)
        keep_scale,  # fp32 1 / (1 - p)
        POST_DROPOUT: tl.constexpr,  # the low-rank term's gradient is dY * m / (1 - p)
        WRITE_DB: tl.constexpr,  # write the dB partials (else dB comes from _grouped_rowgemm)
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr,  # rows per tile (host-fixed: it sizes the partials)
        BLOCK_N: tl.constexpr,  # N step
        BLOCK_R: tl.constexpr,  # rank tile
        E_PAD: tl.constexpr,  # power of two >= E
    ):
        """One pass over dY: dS = s G B_e [M, R] and the partial s G_t^T S_t [N, R] of each row
        tile t (summed per expert in tile order by _grouped_db_reduce_kernel). G = dY (* m/(1-p))."""
        pid_t = tl.program_id(0)
        e, row0, row_end = _tile_of(counts_ptr, pid_t, E, BLOCK_M, E_PAD)
        if e >= E:
            return
        rm = row0 + tl.arange(0, BLOCK_M)
        rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rn0 = tl.arange(0, BLOCK_N)
        m_ok = rm < row_end
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
        b_rows = b_ptr + e.to(tl.int64) * stride_be + rr.to(tl.int64)[None, :] * stride_br
        dbp_rows = dbp_ptr + pid_t.to(tl.int64) * N * R + rr[None, :]
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
    def _grouped_db_reduce_kernel(
        dbp_ptr,  # [tiles, N*R] fp32 partials of _grouped_dsdb_kernel, contiguous
        db_ptr,  # [E, N*R] output dB, contiguous, lora_b's dtype
        counts_ptr,  # int32 [E] tokens per expert
        NR, E,  # N * R, experts
        TILE_M: tl.constexpr,  # rows per tile of the partials (the dS/dB kernel's BLOCK_M)
        BLOCK: tl.constexpr,  # elements per program
        E_PAD: tl.constexpr,  # power of two >= E
    ):
        """dB_e = sum of expert e's tile partials, in tile order (deterministic); 0 for an expert
        without tokens. Grid (E, cdiv(N*R, BLOCK))."""
        e = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < NR
        _, _, first, n_tiles = _span_of(counts_ptr, e, E, TILE_M, E_PAD)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        ptrs = dbp_ptr + first.to(tl.int64) * NR + offs
        for _ in range(0, n_tiles):
            acc += tl.load(ptrs, mask=ok, other=0.0)
            ptrs += NR
        tl.store(db_ptr + e.to(tl.int64) * NR + offs, acc.to(db_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _grouped_rowgemm_kernel(
        l_ptr,  # [M, R] fp32 left factor, contiguous: dS (for dA) or S (for dB)
        g_ptr,  # [M, C] strided: x (for dA) or dY (for dB and the bias gradient)
        out_ptr,  # per-expert output: element (e, j, c) at e*stride_oe + j*stride_or + c*stride_oc
        counts_ptr,  # int32 [E] tokens per expert
        seed_ptr,  # int64 [1] dropout seed (read when MASKED)
        C, R, E,  # columns of g, rank (1 for ROWSUM), experts
        stride_gm, stride_gc,  # g strides
        stride_oe, stride_or, stride_oc,  # output strides (dA [E, R, K]; dB [E, N, R] transposed)
        scale,  # fp32 factor of the result (1/(1-p) for dA with 'pre', s (/(1-p)) for dB)
        p,  # fp32 dropout probability (MASKED only)
        MASKED: tl.constexpr,  # g carries the dropout mask of the [M, C] tensor it is
        ROWSUM: tl.constexpr,  # out_e[c] = sum of g's rows (the bias gradient): no l, R = 1
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_C: tl.constexpr,  # output columns per program
        BLOCK_M: tl.constexpr,  # reduction step over the expert's rows
        BLOCK_R: tl.constexpr,  # output rank rows per program (1 for ROWSUM)
        E_PAD: tl.constexpr,  # power of two >= E
    ):
        """out_e[j, c] = scale * sum_{m in expert e} l[m, j] g~[m, c], reduced inside one program
        (deterministic, no partials): dA_e = dS_e^T x~_e, dB_e = s G_e^T S_e (stored transposed
        through the output strides), db_e = sum_m dY_e. Grid (E, C tiles, R tiles)."""
        e = tl.program_id(0)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        c_ok = rc < C
        r_ok = rr < R
        start, end, _, _ = _span_of(counts_ptr, e, E, BLOCK_M, E_PAD)
        if MASKED:
            seed = tl.load(seed_ptr)
        op_dtype = g_ptr.dtype.element_ty
        rm0 = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rm = m0 + rm0
            m_ok = rm < end
            g = load_f32(g_ptr + rm.to(tl.int64)[:, None] * stride_gm + rc[None, :] * stride_gc,
                         m_ok[:, None] & c_ok[None, :], INTERPRET)
            if MASKED:
                g = tl.where(keep_mask(seed, rm, rc, C, p), g, tl.zeros_like(g))
            if ROWSUM:
                acc += tl.sum(g.to(tl.float32), 0)[None, :]
            else:
                lt = tl.load(l_ptr + rm.to(tl.int64)[None, :] * R + rr[:, None],
                             mask=r_ok[:, None] & m_ok[None, :], other=0.0)
                acc = tl.dot(dot_operand(lt, op_dtype, INTERPRET), g, acc,
                             input_precision=PRECISION)
        out = (out_ptr + e.to(tl.int64) * stride_oe + rr.to(tl.int64)[:, None] * stride_or
               + rc.to(tl.int64)[None, :] * stride_oc)
        tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])

else:  # pragma: no cover
    _grouped_lora_gemm_kernel = _grouped_shrink_kernel = _grouped_dsdb_kernel = None
    _grouped_db_reduce_kernel = _grouped_rowgemm_kernel = None


# ---------------------------------------------------------------------------------------------
# Launch configurations: one named list per architecture and kernel, autotuned per (columns,
# reduction length, rank bucket; the autotuner adds a power-of-two bucket of M, which routing
# moves every step). The GEMM tiles are the dense op's (kernels/_gemm.py), re-checked for spills
# with the schedule prologue by kernels/aot.py's sweep of aot_specs() below; BLOCK_M is autotuned
# too, since the schedule is computed in-kernel. The dS/dB row tile is fixed per arch (it sizes
# the dB partials).
# ---------------------------------------------------------------------------------------------

REDUCE_BLOCK = 512  # dB partial elements per program of the per-expert reduction


def _gemm_cfg(w: int, s: int, bm: int, bc: int, bd: int):
    return cfg(w, s, BLOCK_M=bm, BLOCK_C=bc, BLOCK_D=bd, GROUP_M=8)


def _configs_sm80() -> dict[str, list]:
    """A100 (sm_80, 164 KB smem/SM, mma.sync): the dense op's tiles, less what spilled with the
    schedule prologue and expert offsets on top (AOT, ptxas -v): the 4-warp 128x128 forward tile
    (255 registers, 20 B spilled; 8 warps instead), the 8-warp 128x64 masked shrink, and the
    masked row reductions (dA, dB) with 32 Philox-masked elements a thread (4-12 B spilled by
    triton 3.6's ptxas): 8 warps, and 32-row steps for the 128-wide tile."""
    return {
        "fwd": [_gemm_cfg(8, 3, 128, 128, 32), _gemm_cfg(4, 4, 64, 128, 32),
                _gemm_cfg(4, 4, 128, 64, 32), _gemm_cfg(4, 4, 64, 64, 64)],
        # a second [BM, BC] accumulator and the Philox mask in the epilogue: half-height tiles
        "fwd_two_acc": [_gemm_cfg(8, 3, 64, 128, 32), _gemm_cfg(4, 4, 64, 64, 64)],
        "dx": [_gemm_cfg(8, 3, 128, 128, 32), _gemm_cfg(4, 4, 64, 128, 32),
               _gemm_cfg(4, 4, 64, 64, 64)],
        "dx_two_acc": [_gemm_cfg(8, 3, 64, 128, 32), _gemm_cfg(4, 4, 64, 64, 64)],
        "shrink": [cfg(4, 3, BLOCK_M=64, BLOCK_K=64), cfg(8, 3, BLOCK_M=128, BLOCK_K=32)],
        "dsdb": [cfg(8, 3, BLOCK_N=64), cfg(8, 3, BLOCK_N=32)],
        "rowgemm": [cfg(8, 3, BLOCK_C=64, BLOCK_M=64), cfg(8, 3, BLOCK_C=128, BLOCK_M=32)],
    }


def _configs_sm90() -> dict[str, list]:
    """H100 (sm_90a, 228 KB smem/SM, wgmma): deeper pipelines, 64-wide reduction steps."""
    gemm = [_gemm_cfg(8, 4, 128, 256, 64), _gemm_cfg(8, 4, 128, 128, 64),
            _gemm_cfg(4, 4, 64, 128, 64), _gemm_cfg(4, 4, 128, 64, 64),
            _gemm_cfg(4, 5, 64, 64, 64)]
    two_acc = [_gemm_cfg(8, 4, 64, 128, 64), _gemm_cfg(4, 5, 64, 64, 64)]
    return {
        "fwd": gemm, "fwd_two_acc": two_acc, "dx": gemm, "dx_two_acc": two_acc,
        "shrink": [cfg(4, 4, BLOCK_M=64, BLOCK_K=64), cfg(8, 4, BLOCK_M=128, BLOCK_K=64)],
        "dsdb": [cfg(8, 4, BLOCK_N=64), cfg(8, 4, BLOCK_N=32)],
        "rowgemm": [cfg(4, 4, BLOCK_C=64, BLOCK_M=64), cfg(8, 4, BLOCK_C=128, BLOCK_M=64),
                    cfg(8, 4, BLOCK_C=128, BLOCK_M=128)],
    }


def _configs_interpret() -> dict[str, list]:
    """CPU interpreter: one big-block config per kernel (fewer, larger programs are faster)."""
    gemm = [_gemm_cfg(4, 1, 64, 64, 64)]
    return {"fwd": gemm, "fwd_two_acc": gemm, "dx": gemm, "dx_two_acc": gemm,
            "shrink": [cfg(4, 1, BLOCK_M=64, BLOCK_K=64)], "dsdb": [cfg(4, 1, BLOCK_N=64)],
            "rowgemm": [cfg(4, 1, BLOCK_C=64, BLOCK_M=64)]}


_CONFIGS = {"sm80": _configs_sm80, "sm90": _configs_sm90, "interpret": _configs_interpret}
_AUTOTUNE_KEYS = {"fwd": ("C", "D", "R"), "fwd_two_acc": ("C", "D", "R"), "dx": ("C", "D", "R"),
                  "dx_two_acc": ("C", "D", "R"), "shrink": ("K", "R"), "dsdb": ("N", "R"),
                  "rowgemm": ("C", "R")}


def configs(arch: str, name: str) -> list:
    """Config list of kernel ``name`` for ``arch`` (sm80 | sm90 | interpret)."""
    return _CONFIGS[arch]()[name]


def _kernel(kernel, name: str, device: torch.device):
    return autotuned(kernel, current_arch(device), name, configs, _AUTOTUNE_KEYS[name])


def _e_pad(e: int) -> int:
    return max(16, triton_next_pow2(e))


def aot_specs() -> list[dict]:
    """This op's kernels for ``kernels/aot.py``: dicts of kernel, variant, configs (a config-list
    name for ``configs_fn``, or None: tiles in ``fixed``), sig (argument -> Triton type, or an int
    passed as is: 1 is a unit stride), fixed constexprs, uses_dot, gemm, dropout_tile. bf16, the
    largest rank tiles (64; the GEMMs' 32-wide rank step), 64 experts' schedule vectors, the
    variants with the most work (bias, dropout on) plus the per-expert-weights address path."""
    dt, f32, i32, i64p, f32p, i32p = "*bf16", "fp32", "i32", "*i64", "*fp32", "*i32"
    common = {"INTERPRET": False, "PRECISION": "ieee", "E_PAD": 64}
    gemm_sig = {"l_ptr": dt, "w_ptr": dt, "wptrs_ptr": dt, "bias_ptr": dt, "s_ptr": f32p,
                "q_ptr": dt, "out_ptr": dt, "counts_ptr": i32p, "seed_ptr": i64p, "M": i32,
                "C": i32, "D": i32, "R": i32, "E": i32, "stride_lm": i32, "stride_ld": 1,
                "stride_we": i32, "stride_wd": 1, "stride_wc": i32, "stride_be": i32,
                "stride_qe": i32, "stride_qr": 1, "stride_qc": i32, "low_scale": f32, "p": f32,
                "keep_scale": f32}
    # dX: dY [M, N] row-major, W_e read along N (stride K), A_e [R, K] row-major
    dx_sig = {**gemm_sig, "stride_wd": i32, "stride_wc": 1, "stride_qr": i32, "stride_qc": 1}
    shrink_sig = {"x_ptr": dt, "a_ptr": dt, "s_ptr": f32p, "counts_ptr": i32p, "seed_ptr": i64p,
                  "M": i32, "K": i32, "R": i32, "E": i32, "stride_xm": i32, "stride_xk": 1,
                  "stride_ae": i32, "stride_ar": i32, "stride_ak": 1, "p": f32,
                  "keep_scale": f32}
    dsdb_sig = {"dy_ptr": dt, "b_ptr": dt, "s_ptr": f32p, "ds_ptr": f32p, "dbp_ptr": f32p,
                "counts_ptr": i32p, "seed_ptr": i64p, "M": i32, "N": i32, "R": i32, "E": i32,
                "stride_dym": i32, "stride_dyn": 1, "stride_be": i32, "stride_bn": i32,
                "stride_br": 1, "scale": f32, "p": f32, "keep_scale": f32}
    reduce_sig = {"dbp_ptr": f32p, "db_ptr": dt, "counts_ptr": i32p, "NR": i32, "E": i32}
    row_sig = {"l_ptr": f32p, "g_ptr": dt, "out_ptr": dt, "counts_ptr": i32p, "seed_ptr": i64p,
               "C": i32, "R": i32, "E": i32, "stride_gm": i32, "stride_gc": 1, "stride_oe": i32,
               "stride_or": i32, "stride_oc": 1, "scale": f32, "p": f32}
    gemm = {**common, "BLOCK_R": GEMM_RANK_STEP, "W_PTRS": False}
    rows64 = {**common, "BLOCK_R": 64}

    def spec(kernel, variant, configs_name, sig, fixed, tile, *, uses_dot=True, is_gemm=False):
        return {"kernel": kernel, "variant": variant, "configs": configs_name, "sig": sig,
                "fixed": fixed, "uses_dot": uses_dot, "gemm": is_gemm, "dropout_tile": tile,
                "configs_fn": configs}

    g_tile, k = ("BLOCK_M", "BLOCK_C"), _grouped_lora_gemm_kernel
    return [
        spec(k, "fwd+bias", "fwd", gemm_sig, {**gemm, "HAS_BIAS": True, "MASKED": False},
             g_tile, is_gemm=True),
        spec(k, "fwd+bias+post-dropout", "fwd_two_acc", gemm_sig,
             {**gemm, "HAS_BIAS": True, "MASKED": True}, g_tile, is_gemm=True),
        spec(k, "fwd+bias, per-expert weight addresses", "fwd",
             {**gemm_sig, "wptrs_ptr": i64p},
             {**gemm, "HAS_BIAS": True, "MASKED": False, "W_PTRS": True}, g_tile, is_gemm=True),
        spec(k, "dx", "dx", dx_sig, {**gemm, "HAS_BIAS": False, "MASKED": False}, g_tile,
             is_gemm=True),
        spec(k, "dx+pre-dropout", "dx_two_acc", dx_sig,
             {**gemm, "HAS_BIAS": False, "MASKED": True}, g_tile, is_gemm=True),
        spec(_grouped_shrink_kernel, "pre-dropout", "shrink", shrink_sig,
             {**rows64, "HAS_DROPOUT": True}, ("BLOCK_M", "BLOCK_K")),
        spec(_grouped_dsdb_kernel, "post-dropout, dB partials", "dsdb", dsdb_sig,
             {**rows64, "POST_DROPOUT": True, "WRITE_DB": True, "BLOCK_M": DSDB_BLOCK_M["sm80"]},
             ("BLOCK_M", "BLOCK_N")),
        spec(_grouped_dsdb_kernel, "dS only", "dsdb", dsdb_sig,
             {**rows64, "POST_DROPOUT": False, "WRITE_DB": False,
              "BLOCK_M": DSDB_BLOCK_M["sm80"]}, ("BLOCK_M", "BLOCK_N")),
        spec(_grouped_db_reduce_kernel, "", None, reduce_sig,
             {"TILE_M": DSDB_BLOCK_M["sm80"], "BLOCK": REDUCE_BLOCK, "E_PAD": 64}, None,
             uses_dot=False),
        spec(_grouped_rowgemm_kernel, "dA+pre-dropout", "rowgemm", row_sig,
             {**rows64, "MASKED": True, "ROWSUM": False}, ("BLOCK_M", "BLOCK_C")),
        spec(_grouped_rowgemm_kernel, "dB (second pass)+post-dropout", "rowgemm",
             {**row_sig, "stride_or": 1, "stride_oc": i32},
             {**rows64, "MASKED": True, "ROWSUM": False}, ("BLOCK_M", "BLOCK_C")),
        spec(_grouped_rowgemm_kernel, "bias grad (row sums)", "rowgemm", {**row_sig, "R": 1},
             {**common, "BLOCK_R": 1, "MASKED": False, "ROWSUM": True}, None, uses_dot=False),
    ]
