"""The fused GEMMs of the LoRA linear: the forward Y = x W^T + s S B^T (+ b) and the backward
dX = dY W + (dS A) * m / (1 - p), each with the low-rank term in the GEMM's own accumulator.

Shared by kernels/lora_linear.py and kernels/norm_lora.py (after its row pass). Read top to
bottom: the kernels, their launch configurations per architecture, the host launchers.
"""

from __future__ import annotations

import torch
from bridge.kernels._triton_common import (
    GEMM_RANK_STEP,
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


# ---------------------------------------------------------------------------------------------
# Launch configurations. One named list per architecture and kernel; the autotuner picks per
# (N, K) (and rank bucket), not per M, so a new sequence length does not re-benchmark. Rank steps
# (BLOCK_R) come from the rank bucket (_triton_common.rank_block), not from the configs.
# ---------------------------------------------------------------------------------------------


def _swap_nk(configs: list) -> list:
    """dX configs from forward GEMM configs: dX's output columns are K and it reduces over N."""
    return [cfg(c.num_warps, c.num_stages, BLOCK_M=c.kwargs["BLOCK_M"],
                BLOCK_K=c.kwargs["BLOCK_N"], BLOCK_N=c.kwargs["BLOCK_K"],
                GROUP_M=c.kwargs["GROUP_M"]) for c in configs]


def _configs_sm80() -> dict[str, list]:
    """A100 (sm_80, 164 KB smem/SM, mma.sync). Every entry compiles without register spills
    (tests/test_triton_aot.py). What spilled and was dropped: 128x256 GEMM tiles (the low-rank
    step's S tile on top of a 128-register accumulator), 4-warp 128x128 tiles for dX, and any
    dropout variant with more than 32 mask elements per thread (Philox keeps 4 words of state
    per element through its 10 rounds), which rules out 128x128 two-accumulator tiles."""
    return {
        # fused GEMM: Triton's matmul-tutorial tiles that fit with the low-rank step
        "fwd": [
            cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
            cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        ],
        # 'post' dropout: a second [BM, BN] accumulator and the [BM, BN] mask in the epilogue
        "fwd_two_acc": [
            cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        ],
        # dX: output tile [BM, BK], reduction over N in BLOCK_N steps
        "dx": [
            cfg(8, 3, BLOCK_M=128, BLOCK_K=128, BLOCK_N=32, GROUP_M=8),
            cfg(4, 4, BLOCK_M=64, BLOCK_K=128, BLOCK_N=32, GROUP_M=8),
            cfg(4, 4, BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, GROUP_M=8),
        ],
        "dx_two_acc": [
            cfg(8, 3, BLOCK_M=64, BLOCK_K=128, BLOCK_N=32, GROUP_M=8),
            cfg(4, 4, BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, GROUP_M=8),
        ],
    }


def _configs_sm90() -> dict[str, list]:
    """H100 (sm_90a, 228 KB smem/SM, wgmma): deeper pipelines (more shared memory), 64-wide
    K steps, and the 128x256 8-warp GEMM tile, which fits here with a 32-wide rank step."""
    gemm = [
        cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ]
    two_acc = [
        cfg(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ]
    return {"fwd": gemm, "fwd_two_acc": two_acc, "dx": _swap_nk(gemm),
            "dx_two_acc": _swap_nk(two_acc)}


def _configs_interpret() -> dict[str, list]:
    """CPU interpreter: one big-block config per kernel (each program costs Python overhead per
    op, so fewer, larger programs are faster; nothing is benchmarked with a single config)."""
    gemm = cfg(4, 1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    return {"fwd": [gemm], "fwd_two_acc": [gemm], "dx": [gemm], "dx_two_acc": [gemm]}


_CONFIGS = {"sm80": _configs_sm80, "sm90": _configs_sm90, "interpret": _configs_interpret}


def configs(arch: str, name: str) -> list:
    """Config list of kernel ``name`` for ``arch`` (sm80 | sm90 | interpret)."""
    return _CONFIGS[arch]()[name]


_AUTOTUNE_KEYS = {
    "fwd": ("N", "K", "R"),
    "fwd_two_acc": ("N", "K", "R"),
    "dx": ("N", "K", "R"),
    "dx_two_acc": ("N", "K", "R"),
}


def _kernel(kernel, name: str, device: torch.device):
    """The autotuned launcher of ``kernel`` with the config list ``name`` for this device."""
    return autotuned(kernel, current_arch(device), name, configs, _AUTOTUNE_KEYS[name])


# ---------------------------------------------------------------------------------------------
# Host launchers (2-D in, 2-D out). ``seed`` (int64 tensor [1]) turns on the dropout mask of the
# tensor that kernel handles and ``p`` is its probability: fused_gemm takes the 'post' seed (mask
# of y [M, N]), dx the 'pre' seed (mask of x [M, K]). seed=None or p=0 means no mask.
# ---------------------------------------------------------------------------------------------


def launch_fused_gemm(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
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
    on, seed_arg, p_arg, keep = dropout_args(seed, p, y)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _kernel(_lora_linear_fwd_kernel, "fwd_two_acc" if on else "fwd", x2d.device)[grid](
        x2d, weight, bias.contiguous() if bias is not None else y, s_mat.contiguous(), lora_b, y,
        seed_arg,
        m, n, k, r, x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        lora_b.stride(0), lora_b.stride(1), float(scale), p_arg, keep,
        HAS_BIAS=bias is not None, POST_DROPOUT=on,
        BLOCK_R=min(rank_block(r), GEMM_RANK_STEP),
        **launch_common(x2d.device, x2d.dtype))
    return y



def launch_dx(dy2d: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_a: torch.Tensor,
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
    on, seed_arg, p_arg, keep = dropout_args(seed, p, dx)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)
    _kernel(_lora_linear_bwd_dx_kernel, "dx_two_acc" if on else "dx", dy2d.device)[grid](
        dy2d, weight, ds.contiguous(), lora_a, dx, seed_arg, m, n, k, r,
        dy2d.stride(0), dy2d.stride(1), weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), p_arg, keep, PRE_DROPOUT=on,
        BLOCK_R=min(rank_block(r), GEMM_RANK_STEP), **launch_common(dy2d.device, dy2d.dtype))
    return dx


