"""The low-rank kernels of the LoRA linear: the shrink S = x~ A^T, dS/dB from one pass over dY,
dA = dS^T x~ (x~ regenerated from x and the seed), and the expand E = alpha L F^T (masked, plus a
bias) that the ``cublas`` GEMM strategy hands to cuBLAS as the addend of its GEMM: P = s S B^T
(+ b) in the forward, Q = (dS A) * m / (1 - p) in the backward (kernels/gemm_strategy.py).

Shared by kernels/lora_linear.py and kernels/norm_lora.py. Read top to bottom: the kernels, their
launch configurations per architecture, the host launchers.
"""

from __future__ import annotations

import torch
from bridge.kernels._triton_common import (
    HAS_TRITON,
    autotuned,
    cfg,
    current_arch,
    dot_operand,
    dropout_args,
    launch_common,
    load_f32,
    rank_block,
    tl,
    triton,
)
from bridge.kernels.philox import keep_mask

if HAS_TRITON:

    @triton.jit
    def _lora_linear_shrink_kernel(
        x_ptr,  # [M, K] input (strided), x dtype
        a_ptr,  # [R, K] lora_a (strided)
        s_ptr,  # [SPLIT, M, R] fp32 output: S (SPLIT = 1), else per-K-split partials
        seed_ptr,  # int64 [1] dropout seed (read only when HAS_DROPOUT)
        M, K, R,  # sizes (runtime: a new rank or length never recompiles)
        cols_per_split,  # columns of K each split reduces (a multiple of every BLOCK_K)
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
        """S[m, j] = sum_k x~[m, k] A[j, k], x~ = x * m / (1 - p): grid (M tiles, R tiles, K
        splits); split c reduces columns [c * cols_per_split, next) (the host sums the splits)."""
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        pid_c = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rk0 = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        r_ok = rr < R
        k_lo = pid_c * cols_per_split
        cols_here = tl.minimum(K - k_lo, cols_per_split)  # tile-uniform trip count, tail masked
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + k_lo.to(tl.int64) * stride_xk
        a_cols = a_ptr + rr.to(tl.int64)[None, :] * stride_ar + k_lo.to(tl.int64) * stride_ak
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, cols_here, BLOCK_K):
            rk = k0 + rk0  # columns within this split
            k_ok = rk < cols_here
            x = load_f32(x_rows + rk[None, :] * stride_xk, m_ok[:, None] & k_ok[None, :], INTERPRET)
            if HAS_DROPOUT:
                # zeroing is exact; the 1/(1-p) factor is applied once, in fp32, at the end
                x = tl.where(keep_mask(seed, rm, k_lo + rk, K, p), x, tl.zeros_like(x))
            a = load_f32(a_cols + rk[:, None] * stride_ak, k_ok[:, None] & r_ok[None, :], INTERPRET)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
        if HAS_DROPOUT:
            acc = acc * keep_scale
        s_ptrs = s_ptr + pid_c.to(tl.int64) * M * R + rm.to(tl.int64)[:, None] * R + rr[None, :]
        tl.store(s_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _lora_linear_bwd_dsdb_kernel(
        dy_ptr,  # [M, N] upstream gradient (strided; stride 0 when expanded)
        b_ptr,  # [N, R] lora_b (strided)
        s_ptr,  # [M, R] fp32 S saved by the forward, contiguous
        ds_ptr,  # [SPLIT, M, R] fp32 output: dS (SPLIT = 1), else per-column-split partials
        dbp_ptr,  # [cdiv(M, BLOCK_M), N, R] fp32 output: per-row-tile partial dB, contiguous
        seed_ptr,  # int64 [1] seed (read only when POST_DROPOUT)
        M, N, R,  # sizes
        cols_per_split,  # columns of N each split reduces (a multiple of every BLOCK_N)
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
        each row tile t (summed on the host, deterministically). G = dY * m / (1-p) for 'post'.
        Program (m, r, c) covers columns [c * cols_per_split, next) of N: its dB rows alone, and
        its share of dS (the host sums the splits' dS in a fixed order)."""
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        pid_c = tl.program_id(2)
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
        n_lo = pid_c * cols_per_split
        cols_here = tl.minimum(N - n_lo, cols_per_split)  # tile-uniform trip count, tail masked
        for n0 in range(0, cols_here, BLOCK_N):
            rn = n_lo + n0 + rn0
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
        ds_rows = ds_ptr + pid_c.to(tl.int64) * M * R + rm.to(tl.int64)[:, None] * R
        tl.store(ds_rows + rr[None, :], ds * g_scale, mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _lora_linear_bwd_da_kernel(
        ds_ptr,  # [M, R] fp32 dS, contiguous
        x_ptr,  # [M, K] input (strided)
        da_ptr,  # [SPLIT, R, K] output, contiguous: dA itself (SPLIT = 1), else fp32 partials
        seed_ptr,  # int64 [1] seed (read only when PRE_DROPOUT)
        M, K, R,  # sizes
        rows_per_split,  # rows of M each split reduces (a multiple of every BLOCK_M)
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
        """dA = dS^T x~ [R, K]: program (k, r, s) reduces rows [s * rows_per_split, next) of M
        (deterministic; the host sums the SPLIT partials in a fixed order)."""
        pid_k = tl.program_id(0)
        pid_r = tl.program_id(1)
        pid_s = tl.program_id(2)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rm0 = tl.arange(0, BLOCK_M)
        k_ok = rk < K
        r_ok = rr < R
        if PRE_DROPOUT:
            seed = tl.load(seed_ptr)
        op_dtype = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        # rows [m_lo, m_lo + rows_per_split) of M; the trip count is tile-uniform (the last
        # split's tail is masked), which keeps the loop as cheap as the unsplit one's
        m_lo = pid_s * rows_per_split
        rows_here = tl.minimum(M - m_lo, rows_per_split)
        # the split's first row folded into the base pointers once; rm counts rows within it
        ds_base = ds_ptr + m_lo.to(tl.int64) * R
        x_base = x_ptr + m_lo.to(tl.int64) * stride_xm
        for m0 in range(0, rows_here, BLOCK_M):
            rm = m0 + rm0
            m_ok = rm < rows_here
            ds_t = tl.load(ds_base + rm.to(tl.int64)[None, :] * R + rr[:, None],
                           mask=r_ok[:, None] & m_ok[None, :], other=0.0)
            x = load_f32(x_base + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk,
                         m_ok[:, None] & k_ok[None, :], INTERPRET)
            if PRE_DROPOUT:
                x = tl.where(keep_mask(seed, m_lo + rm, rk, K, p), x, tl.zeros_like(x))
            acc = tl.dot(dot_operand(ds_t, op_dtype, INTERPRET), x, acc, input_precision=PRECISION)
        if PRE_DROPOUT:
            acc = acc * keep_scale
        da_ptrs = da_ptr + pid_s.to(tl.int64) * R * K + rr.to(tl.int64)[:, None] * K + rk[None, :]
        tl.store(da_ptrs, acc.to(da_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _lora_expand_kernel(
        l_ptr,  # [M, R] fp32 left factor (S, or dS), contiguous
        f_ptr,  # [C, R] right factor (strided): lora_b [N, r] as is, or lora_a [r, K] read as A^T
        bias_ptr,  # [C] bias, contiguous (read only when HAS_BIAS)
        out_ptr,  # [M, C] output, contiguous, in the dtype of the tensor cuBLAS adds it to
        seed_ptr,  # int64 [1] seed (read only when HAS_DROPOUT)
        M, C, R,  # sizes
        stride_fc, stride_fr,  # strides of the right factor as [C, R]
        alpha,  # fp32 factor of the product (the LoRA scale s, or 1 for dS, which carries it)
        p,  # fp32 dropout probability
        keep_scale,  # fp32 1 / (1 - p)
        HAS_BIAS: tl.constexpr,  # add the bias (the forward folds the base bias into P)
        HAS_DROPOUT: tl.constexpr,  # mask of the logical [M, C] tensor: y ('post') or x ('pre')
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,  # output tile
        BLOCK_R: tl.constexpr,  # rank step (the padded rank bucket)
    ):
        """E = alpha (L F^T) (* m / (1 - p)) (+ bias): grid (M tiles, C tiles). The product is
        accumulated in fp32 and scaled there (never alpha rounded into an operand); the mask is
        the Philox stream of kernels/philox.py for element (row, col) of [M, C], the same bits
        the fused GEMMs draw for y ('post') or x ('pre'). Memory-bound: E is written once."""
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        rr0 = tl.arange(0, BLOCK_R)
        m_ok = rm < M
        c_ok = rc < C
        op_dtype = f_ptr.dtype.element_ty
        l_rows = l_ptr + rm.to(tl.int64)[:, None] * R
        f_cols = f_ptr + rc.to(tl.int64)[None, :] * stride_fc
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + rr0
            r_ok = rr < R
            lt = tl.load(l_rows + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            ft = load_f32(f_cols + rr.to(tl.int64)[:, None] * stride_fr,
                          r_ok[:, None] & c_ok[None, :], INTERPRET)
            acc = tl.dot(dot_operand(lt, op_dtype, INTERPRET), ft, acc, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = keep_mask(tl.load(seed_ptr), rm, rc, C, p)
            acc = tl.where(keep, acc * (alpha * keep_scale), 0.0)
        else:
            acc = acc * alpha
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])

# ---------------------------------------------------------------------------------------------
# Launch configurations. One named list per architecture and kernel, autotuned per (N or K, rank
# bucket). Rank tiles (BLOCK_R) come from the rank bucket (_triton_common.rank_block).
# ---------------------------------------------------------------------------------------------

# dS/dB: BLOCK_M sizes the dB partials buffer [cdiv(M, BLOCK_M), N, r], so it is fixed per arch
# (128 rows: 1/128 of dY's bytes per rank column; the host sums them) rather than autotuned.
DSDB_BLOCK_M = {"sm80": 128, "sm90": 128, "interpret": 64}
DB_PARTIALS_MAX_BYTES = 256 << 20  # above this, dB is its own GEMM (see launch_dsdb)


def _configs_sm80() -> dict[str, list]:
    """A100 (sm_80, 164 KB smem/SM). Every entry compiles without register spills."""
    return {
        # shrink: streams x once per rank tile; the 'pre' mask of the x tile sets the budget
        "shrink": [
            cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
            # 4 warps: with 8, triton 3.6 caps the split-K kernel at 128 registers and spills 4 B
            cfg(4, 3, BLOCK_M=128, BLOCK_K=64),
            cfg(8, 3, BLOCK_M=128, BLOCK_K=128),
        ],
        # dS/dB: 8 warps hold the [128, BLOCK_R] dS accumulator and the S tile without spilling
        "dsdb": [cfg(8, 3, BLOCK_N=64), cfg(8, 3, BLOCK_N=32)],
        # dA: output [r, K] is small, the reduction over M long; wide K tiles for parallelism
        "da": [
            cfg(4, 3, BLOCK_K=64, BLOCK_M=64),
            cfg(8, 3, BLOCK_K=128, BLOCK_M=64),
        ],
        # expand: a store-bound [BM, BC] tile after a one- or two-step rank loop (wide tiles,
        # 16-byte stores); masked: <= 32 Philox elements per thread, as in the GEMMs. The wide
        # tiles take 210-230 registers here (one 8-warp block per SM): 64x64 keeps 4 blocks
        "expand": [
            cfg(8, 2, BLOCK_M=128, BLOCK_C=128),
            cfg(4, 2, BLOCK_M=64, BLOCK_C=128),
            cfg(4, 2, BLOCK_M=64, BLOCK_C=64),
        ],
        "expand_masked": [
            cfg(8, 2, BLOCK_M=64, BLOCK_C=128),
            cfg(4, 2, BLOCK_M=64, BLOCK_C=64),
        ],
    }


def _configs_sm90() -> dict[str, list]:
    """H100 (sm_90a, 228 KB smem/SM): deeper pipelines."""
    return {
        "shrink": [
            cfg(4, 4, BLOCK_M=64, BLOCK_K=64),
            cfg(8, 4, BLOCK_M=128, BLOCK_K=64),
        ],
        "dsdb": [cfg(8, 4, BLOCK_N=64), cfg(8, 4, BLOCK_N=32)],
        "da": [
            cfg(4, 4, BLOCK_K=64, BLOCK_M=64),
            cfg(8, 4, BLOCK_K=128, BLOCK_M=64),
            cfg(8, 4, BLOCK_K=128, BLOCK_M=128),
        ],
        "expand": [
            cfg(8, 2, BLOCK_M=128, BLOCK_C=128),
            cfg(8, 2, BLOCK_M=64, BLOCK_C=256),
            cfg(4, 2, BLOCK_M=64, BLOCK_C=128),
        ],
        "expand_masked": [
            cfg(8, 2, BLOCK_M=64, BLOCK_C=128),
            cfg(4, 2, BLOCK_M=64, BLOCK_C=64),
        ],
    }


def _configs_interpret() -> dict[str, list]:
    """CPU interpreter: one big-block config per kernel (fewer, larger programs are faster)."""
    return {
        "shrink": [cfg(4, 1, BLOCK_M=64, BLOCK_K=64)],
        "dsdb": [cfg(4, 1, BLOCK_N=64)],
        "da": [cfg(4, 1, BLOCK_K=64, BLOCK_M=64)],
        "expand": [cfg(4, 1, BLOCK_M=64, BLOCK_C=64)],
        "expand_masked": [cfg(4, 1, BLOCK_M=64, BLOCK_C=64)],
    }


_CONFIGS = {"sm80": _configs_sm80, "sm90": _configs_sm90, "interpret": _configs_interpret}


def configs(arch: str, name: str) -> list:
    """Config list of kernel ``name`` for ``arch`` (sm80 | sm90 | interpret)."""
    return _CONFIGS[arch]()[name]


_AUTOTUNE_KEYS = {"shrink": ("K", "R"), "dsdb": ("N", "R"), "da": ("K", "R"),
                  "expand": ("C", "R"), "expand_masked": ("C", "R")}


def _kernel(kernel, name: str, device: torch.device):
    """The autotuned launcher of ``kernel`` with the config list ``name`` for this device."""
    return autotuned(kernel, current_arch(device), name, configs, _AUTOTUNE_KEYS[name])


# ---------------------------------------------------------------------------------------------
# Host launchers (2-D in, 2-D out). ``seed`` (int64 tensor [1]) turns on the dropout mask of the
# tensor that kernel handles and ``p`` is its probability: shrink/da take the 'pre' seed (mask of
# x [M, K]); dsdb the 'post' seed (mask of y [M, N]). seed=None or p=0 means no mask.
# ---------------------------------------------------------------------------------------------


def launch_shrink(x2d: torch.Tensor, lora_a: torch.Tensor, *, seed: torch.Tensor | None = None,
                   p: float = 0.0) -> torch.Tensor:
    """S = x~ A^T: x2d [M, K] (any strides), lora_a [r, K] -> S [M, r] fp32, contiguous.
    x~ = x * m / (1 - p) with the 'pre' mask of ``seed`` when given (philox.py)."""
    m, k = x2d.shape
    r = lora_a.shape[0]
    if m == 0:
        return torch.empty((0, r), dtype=torch.float32, device=x2d.device)
    block_r = rank_block(r)
    # the split is fixed before the autotuner picks BLOCK_M: count programs with the widest
    # row tile (M=2048, K=4096 on 132 SMs: 16 row tiles get 8 splits of 512 columns)
    widest = max(c.kwargs["BLOCK_M"] for c in configs(current_arch(x2d.device), "shrink"))
    split, cols = fill_split(k, triton.cdiv(m, widest) * triton.cdiv(r, block_r), x2d.device)
    s_mat = torch.empty((split, m, r), dtype=torch.float32, device=x2d.device)
    on, seed_arg, p_arg, keep = dropout_args(seed, p, s_mat)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r), split)
    _kernel(_lora_linear_shrink_kernel, "shrink", x2d.device)[grid](
        x2d, lora_a, s_mat, seed_arg, m, k, r, cols, x2d.stride(0), x2d.stride(1),
        lora_a.stride(0), lora_a.stride(1), p_arg, keep, HAS_DROPOUT=on,
        BLOCK_R=block_r, **launch_common(x2d.device, x2d.dtype))
    return s_mat[0] if split == 1 else s_mat.sum(0)



def launch_dsdb(dy2d: torch.Tensor, lora_b: torch.Tensor, s_mat: torch.Tensor, scale: float, *,
                 seed: torch.Tensor | None = None, p: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s G B and dB = s G^T S from one pass over dY, G = dY (* m / (1 - p) with the 'post'
    ``seed``): dy2d [M, N] (any strides, stride 0 included), lora_b [N, r], s_mat [M, r] fp32 ->
    (dS [M, r] fp32 contiguous, dB [N, r] in lora_b's dtype). dB is reduced over row tiles on
    the host in fp32 (deterministic, no atomics)."""
    m, n = dy2d.shape
    r = lora_b.shape[1]
    if m == 0:
        return (torch.empty((0, r), dtype=torch.float32, device=dy2d.device),
                lora_b.new_zeros(lora_b.shape))  # contiguous, as the fake says
    arch = current_arch(dy2d.device)
    block_m, block_r = DSDB_BLOCK_M[arch], rank_block(r)
    tiles_m = triton.cdiv(m, block_m)
    split, cols = fill_split(n, tiles_m * triton.cdiv(r, block_r), dy2d.device)
    # one split writes dS directly; more write fp32 partials [split, M, r] (M * r * 4 bytes each:
    # 0.5 MB at M=8192, r=16) summed below in a fixed order
    ds = torch.empty((split, m, r), dtype=torch.float32, device=dy2d.device)
    on, seed_arg, p_arg, keep = dropout_args(seed, p, ds)
    # The fp32 dB partials cost tiles_m * N * r * 4 bytes (0.47 GB at M=16384, N=14336, r=64);
    # past DB_PARTIALS_MAX_BYTES, and with no 'post' mask on dY, dB = s dY^T S is one more GEMM
    # (about the same traffic: one more read of dY instead of writing and reading the partials).
    write_db = on or tiles_m * n * r * 4 <= DB_PARTIALS_MAX_BYTES
    partial = torch.empty((tiles_m, n, r) if write_db else (1,), dtype=torch.float32,
                          device=dy2d.device)
    s_c = s_mat.contiguous()
    grid = (tiles_m, triton.cdiv(r, block_r), split)
    _kernel(_lora_linear_bwd_dsdb_kernel, "dsdb", dy2d.device)[grid](
        dy2d, lora_b, s_c, ds, partial, seed_arg, m, n, r, cols,
        dy2d.stride(0), dy2d.stride(1), lora_b.stride(0), lora_b.stride(1), float(scale), p_arg,
        keep, POST_DROPOUT=on, WRITE_DB=write_db, BLOCK_M=block_m, BLOCK_R=block_r,
        **launch_common(dy2d.device, dy2d.dtype))
    ds = ds[0] if split == 1 else ds.sum(0)
    if not write_db:  # s S rounded once to dY's dtype, as the forward's tensor-core operand is
        return ds, (dy2d.t() @ (s_c * scale).to(dy2d.dtype)).to(lora_b.dtype)
    db = partial[0] if tiles_m == 1 else partial.sum(0)
    return ds, db.to(lora_b.dtype)



def launch_da(ds: torch.Tensor, x2d: torch.Tensor, *, seed: torch.Tensor | None = None,
               p: float = 0.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dA = dS^T x~: ds [M, r] fp32 contiguous, x2d [M, K] (any strides) -> dA [r, K] contiguous
    in ``out_dtype`` (default x's dtype); x~ regenerated from x and the 'pre' ``seed``."""
    m, k = x2d.shape
    r = ds.shape[1]
    da = torch.empty((r, k), dtype=out_dtype or x2d.dtype, device=x2d.device)
    if m == 0:
        return da.zero_()
    on, seed_arg, p_arg, keep = dropout_args(seed, p, da)
    block_r = rank_block(r)
    split, rows = da_split(m, k, r, block_r, x2d.device)
    # one split writes dA directly; more write fp32 partials [split, r, K] summed here in a
    # fixed order (deterministic; r * K * 4 bytes each: 256 KB at r=16, K=4096)
    out = da if split == 1 else torch.empty((split, r, k), dtype=torch.float32,
                                            device=x2d.device)
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(r, block_r), split)
    _kernel(_lora_linear_bwd_da_kernel, "da", x2d.device)[grid](
        ds.contiguous(), x2d, out, seed_arg, m, k, r, rows, x2d.stride(0), x2d.stride(1), p_arg,
        keep, PRE_DROPOUT=on, BLOCK_R=block_r, **launch_common(x2d.device, x2d.dtype))
    return da if split == 1 else out.sum(0).to(da.dtype)


# Splitting a reduction over programs (dA over M, dS over N): enough splits for about two
# programs per SM, each reducing at least SPLIT_MIN rows/columns (so the fp32 partials stay small
# next to the tensor read), rounded up to a multiple of every config's block along that axis (no
# partial steps inside a split).
SPLIT_MIN = {"cuda": 512, "interpret": 64}
_SPLIT_ALIGN = {"cuda": 128, "interpret": 64}
_DA_NARROWEST_K = 64
_INTERPRET_SMS = 4  # the interpreter: a few splits at test sizes, so the split path is tested


def fill_split(length: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(splits, length per split) of a reduction of ``length`` whose launch has ``programs``
    programs per split."""
    where = "cuda" if device.type == "cuda" else "interpret"
    least, align = SPLIT_MIN[where], _SPLIT_ALIGN[where]
    sms = torch.cuda.get_device_properties(device).multi_processor_count if where == "cuda" \
        else _INTERPRET_SMS
    split = max(1, min(triton.cdiv(length, least), triton.cdiv(2 * sms, programs)))
    per = max(least, triton.cdiv(triton.cdiv(length, split), align) * align)
    return triton.cdiv(length, per), per


def da_split(m: int, k: int, r: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of dA's reduction over M: at M=8192, K=4096, r=16 on 132 SMs,
    dA launches 64 K-tiles; 5 splits of 1664 rows give 320 programs (2.4 per SM) instead of 64
    programs that each read all of M. (dS/dB: 64 row tiles at M=8192 likewise get 5 splits of
    896 columns of N=4096.)"""
    return fill_split(m, triton.cdiv(k, _DA_NARROWEST_K) * triton.cdiv(r, block_r), device)


def launch_expand(l_mat: torch.Tensor, factor: torch.Tensor, alpha: float, *,
                  bias: torch.Tensor | None = None, seed: torch.Tensor | None = None,
                  p: float = 0.0, out_dtype: torch.dtype, transpose: bool = False
                  ) -> torch.Tensor:
    """E = alpha (L F^T) (* m / (1 - p)) (+ bias), written once in ``out_dtype``: the addend
    cuBLAS reads in the ``cublas`` strategy's epilogue.

    Args:
        l_mat: [M, r] fp32 (S from the shrink, or dS from dsdb).
        factor: F as [C, r]: lora_b [N, r] (``transpose=False``), or lora_a [r, K] read as
            A^T (``transpose=True``), any strides.
        alpha: fp32 factor (the LoRA scale for P = s S B^T; 1 for Q = dS A).
        bias: [C] or None, added after the mask (the forward's base bias).
        seed, p: the mask of the logical [M, C] tensor ('post': y's; 'pre': x's).

    Returns:
        E [M, C] contiguous.
    """
    m, r = l_mat.shape
    c = factor.shape[1] if transpose else factor.shape[0]
    stride_fc, stride_fr = (factor.stride(1), factor.stride(0)) if transpose \
        else (factor.stride(0), factor.stride(1))
    out = torch.empty((m, c), dtype=out_dtype, device=l_mat.device)
    if m == 0:
        return out
    on, seed_arg, p_arg, keep = dropout_args(seed, p, out)
    block_r = rank_block(r)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))
    _kernel(_lora_expand_kernel, "expand_masked" if on else "expand", l_mat.device)[grid](
        l_mat.contiguous(), factor, bias.contiguous() if bias is not None else out, out,
        seed_arg, m, c, r, stride_fc, stride_fr, float(alpha), p_arg, keep,
        HAS_BIAS=bias is not None, HAS_DROPOUT=on, BLOCK_R=block_r,
        **launch_common(l_mat.device, factor.dtype))
    return out


def aot_specs() -> list[dict]:
    """Every kernel of this module for ``kernels/aot.py`` (its format: kernel, variant, config
    list name, signature, fixed constexprs, uses_dot, configs_fn): bf16, rank tile 64, the
    variant with the most work (dropout on) and, for dS/dB and the expand, each variant that
    compiles differently."""
    dt, f32, i32, i64p, f32p = "*bf16", "fp32", "i32", "*i64", "*fp32"
    common = {"INTERPRET": False, "PRECISION": "ieee", "BLOCK_R": 64}
    shrink_sig = {"x_ptr": dt, "a_ptr": dt, "s_ptr": f32p, "seed_ptr": i64p, "M": i32, "K": i32,
                  "R": i32, "cols_per_split": i32, "stride_xm": i32, "stride_xk": 1,
                  "stride_ar": i32, "stride_ak": 1, "p": f32, "keep_scale": f32}
    dsdb_sig = {"dy_ptr": dt, "b_ptr": dt, "s_ptr": f32p, "ds_ptr": f32p, "dbp_ptr": f32p,
                "seed_ptr": i64p, "M": i32, "N": i32, "R": i32, "cols_per_split": i32,
                "stride_dym": i32, "stride_dyn": 1, "stride_bn": i32, "stride_br": 1, "scale": f32, "p": f32,
                "keep_scale": f32}
    da_sig = {"ds_ptr": f32p, "x_ptr": dt, "da_ptr": dt, "seed_ptr": i64p, "M": i32, "K": i32,
              "R": i32, "rows_per_split": i32, "stride_xm": i32, "stride_xk": 1, "p": f32,
              "keep_scale": f32}
    # the expand reads lora_b [N, r] (unit rank stride) or lora_a [r, K] as A^T (unit C stride)
    expand_sig = {"l_ptr": f32p, "f_ptr": dt, "bias_ptr": dt, "out_ptr": dt, "seed_ptr": i64p,
                  "M": i32, "C": i32, "R": i32, "stride_fc": i32, "stride_fr": 1, "alpha": f32,
                  "p": f32, "keep_scale": f32}
    expand_t_sig = {**expand_sig, "stride_fc": 1, "stride_fr": i32}
    dsdb_fixed = {**common, "BLOCK_M": DSDB_BLOCK_M["sm80"]}

    def spec(kernel, variant, name, sig, fixed):
        return {"kernel": kernel, "variant": variant, "configs": name, "sig": sig,
                "fixed": fixed, "uses_dot": True, "configs_fn": configs}

    return [
        spec(_lora_linear_shrink_kernel, "pre-dropout", "shrink", shrink_sig,
             {**common, "HAS_DROPOUT": True}),
        spec(_lora_linear_bwd_dsdb_kernel, "post-dropout", "dsdb", dsdb_sig,
             {**dsdb_fixed, "POST_DROPOUT": True, "WRITE_DB": True}),
        spec(_lora_linear_bwd_dsdb_kernel, "no-mask, dB as its own GEMM", "dsdb", dsdb_sig,
             {**dsdb_fixed, "POST_DROPOUT": False, "WRITE_DB": False}),
        spec(_lora_linear_bwd_da_kernel, "pre-dropout", "da", da_sig,
             {**common, "PRE_DROPOUT": True}),
        spec(_lora_linear_bwd_da_kernel, "pre-dropout, split-M fp32 partials", "da",
             {**da_sig, "da_ptr": f32p}, {**common, "PRE_DROPOUT": True}),
        spec(_lora_expand_kernel, "P: bias", "expand", expand_sig,
             {**common, "HAS_BIAS": True, "HAS_DROPOUT": False}),
        spec(_lora_expand_kernel, "P: bias+post-dropout", "expand_masked", expand_sig,
             {**common, "HAS_BIAS": True, "HAS_DROPOUT": True}),
        spec(_lora_expand_kernel, "Q: pre-dropout (A^T)", "expand_masked", expand_t_sig,
             {**common, "HAS_BIAS": False, "HAS_DROPOUT": True}),
        spec(_lora_expand_kernel, "Q: no mask (A^T)", "expand", expand_t_sig,
             {**common, "HAS_BIAS": False, "HAS_DROPOUT": False}),
    ]
