"""Norm-fused LoRA linear: ln = norm(x); y = ln W^T + b + s * B(A(dropout(ln))).

Read top to bottom: the eager reference (the oracle and the eager backend), the Triton row
kernels (forward: norm + shrink; backward: dx rows, then dgamma/dbeta/dA columns), their launch
configuration, the host launchers of the row pass (Triton, or the CUDA twin in csrc/), the
registered torch.library ops, and the functional op that picks a backend per call.

Shapes: x [M, K] (leading dims flattened), norm weight/bias [K], W [N, K], b [N], A [r, K],
B [N, r]. Forward saves x, mean/rstd (fp32 [M]), S (fp32 [M, r]) and the seed; ln is
recomputed in backward and the dropout mask regenerated (kernels/philox.py), never stored.
"""

from __future__ import annotations

import dataclasses

import torch
from bridge.kernels import gemm_strategy
from bridge.kernels._checks import (
    check_dropout,
    check_lora_args,
    check_norm_args,
    check_scale,
    check_seed,
)
from bridge.kernels._lowrank import launch_dsdb
from bridge.kernels._triton_common import (
    HAS_TRITON,
    current_arch,
    dot_operand,
    dot_precision,
    load_f32,
    rank_block,
    tl,
    triton,
)
from bridge.kernels.backend import (
    BackendChoice,
    probe_triton,
    resolve_backend,
)
from bridge.kernels.gemm_strategy import gemm_dx, gemm_forward, requested_gemm
from bridge.kernels.lora_linear import (
    _compute_dtype,
    _eager_lora_linear,
    _needs_grad,
    lora_linear_ref,
)
from bridge.kernels.philox import draw_seed, keep_mask, seed_tensor


def norm_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    *,
    normalization: str,
    eps: float,
    zero_centered_gamma: bool = False,
) -> torch.Tensor:
    """LayerNorm (with weight and optional bias) or RMSNorm (weight only) over the last dim,
    fp32 statistics (fp64 for fp64 inputs); returns x's dtype. ``zero_centered_gamma`` means the
    stored weight is gamma - 1 (as in Megatron/TE)."""
    check_norm_args(normalization, eps, norm_weight, norm_bias, x.shape[-1])
    ct = _compute_dtype(x.dtype)
    xc = x.to(ct)
    gamma = norm_weight.to(ct) + (1.0 if zero_centered_gamma else 0.0)
    if normalization == "LayerNorm":
        mean = xc.mean(-1, keepdim=True)
        var = (xc - mean).pow(2).mean(-1, keepdim=True)
        out = (xc - mean) * torch.rsqrt(var + eps) * gamma
        if norm_bias is not None:
            out = out + norm_bias.to(ct)
    else:
        out = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps) * gamma
    return out.to(x.dtype)


def norm_lora_linear_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    normalization: str,
    eps: float,
    scale: float,
    dropout: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    dropout_position: str = "pre",
    skip_bias_add: bool = False,
    zero_centered_gamma: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of the norm-fused LoRA linear.

    Args:
        x: [..., K]; norm_weight [K], norm_bias [K] or None (LayerNorm only).
        weight [N, K], bias [N] or None, lora_a [r, K], lora_b [N, r], scale s = alpha / r.
        dropout, dropout_mask, dropout_position, skip_bias_add: as in ``lora_linear_ref``
            (the 'pre' mask has x's shape and applies to ln).

    Returns:
        (y [..., N], ln [..., K]) in x's dtype. ln is rounded to x's dtype before the GEMM, as
        an unfused norm followed by a linear would do.
    """
    ln = norm_ref(x, norm_weight, norm_bias, normalization=normalization, eps=eps,
                  zero_centered_gamma=zero_centered_gamma)
    y = lora_linear_ref(ln, weight, bias, lora_a, lora_b, scale=scale, dropout=dropout,
                        dropout_mask=dropout_mask, dropout_position=dropout_position,
                        skip_bias_add=skip_bias_add)
    return y, ln




# ---------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    # The normalised row, written once: the forward and both backward kernels compute xhat and ln
    # through these helpers, so ln is rounded identically by construction (as csrc's norm_apply).
    @triton.jit
    def _xhat_tile(x_ptr, rows64, cols, msk, stride_xm, mean, rstd):
        """xhat = (x - mean) rstd, fp32 [BLOCK_M, BLOCK_K], of x's tile (masked loads read 0)."""
        xv = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=msk, other=0.0)
        return (xv.to(tl.float32) - mean[:, None]) * rstd[:, None]

    @triton.jit
    def _ln_tile(xhat, w, b, HAS_BIAS: tl.constexpr):
        """ln = xhat (w + shift) (+ b) in fp32; ``w`` already holds w + shift, ``b`` the bias
        (read only when HAS_BIAS). The callers round it to the activations' dtype."""
        y = xhat * w[None, :]
        if HAS_BIAS:
            y += b[None, :]
        return y

    @triton.jit
    def _grad_tile(g_ptr, go_ptr, rows64, cols, msk, stride_gm, stride_gk, stride_om,
                   stride_ok, HAS_LN_GRAD: tl.constexpr):
        """g = dln (+ dln_out, the gradient of the returned ln), fp32, any strides."""
        g = tl.load(g_ptr + rows64[:, None] * stride_gm + cols[None, :] * stride_gk, mask=msk,
                    other=0.0).to(tl.float32)
        if HAS_LN_GRAD:
            g += tl.load(go_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_ok,
                         mask=msk, other=0.0).to(tl.float32)
        return g

    @triton.jit
    def _norm_lora_fwd_kernel(
        x_ptr,  # [M, K] norm input; row stride stride_xm, unit column stride
        nw_ptr,  # [K] norm weight (gamma, or gamma - 1 with zero-centred gamma)
        nb_ptr,  # [K] norm bias (read only when HAS_BIAS)
        a_ptr,  # [R, K] lora_a, contiguous
        seed_ptr,  # int64 [1]: dropout seed (read only when HAS_DROPOUT)
        ln_ptr,  # [M, K] out, contiguous: norm(x) in x's dtype
        mean_ptr,  # fp32 [M] out: row mean (0 for RMSNorm)
        rstd_ptr,  # fp32 [M] out: 1 / sqrt(var + eps) (RMSNorm: 1 / sqrt(mean(x^2) + eps))
        s_ptr,  # fp32 [M, R] out: S = keep(ln) A^T / (1 - p)
        M,  # rows
        K,  # hidden size
        R,  # LoRA rank
        stride_xm,  # row stride of x
        eps,  # fp32 epsilon
        p,  # fp32 dropout probability ('pre' dropout; 0 otherwise)
        gamma_shift,  # fp32: 1.0 with zero-centred gamma, else 0.0
        IS_RMS: tl.constexpr,  # RMSNorm (else LayerNorm)
        HAS_BIAS: tl.constexpr,  # LayerNorm with a bias
        HAS_DROPOUT: tl.constexpr,  # p > 0
        BLOCK_M: tl.constexpr,  # rows per program (>= 16 for tl.dot)
        BLOCK_K: tl.constexpr,  # columns per step of the two K loops
        BLOCK_R: tl.constexpr,  # rank tile (grid axis 1 tiles larger ranks)
        INTERPRET: tl.constexpr,  # upcast loads to fp32 (the interpreter's bf16 is wrong)
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
    ):
        """mean, rstd in fp32; ln = (x - mean) rstd (w + shift) + b; S = keep(ln) A^T / (1 - p).

        Two passes over K: statistics (chunk moments merged with Chan's formula, stable when
        |mean| >> std), then normalise, store ln and accumulate S with tl.dot. Programs of rank
        tile > 0 recompute ln but leave the ln/mean/rstd stores to rank tile 0.
        """
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            msk = row_ok[:, None] & (cols < K)[None, :]
            xv = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=msk, other=0.0)
            xv = xv.to(tl.float32)
            if IS_RMS:
                m2 += tl.sum(xv * xv, axis=1)
            else:
                n_a = k0 * 1.0
                n_b = tl.minimum(K - k0, BLOCK_K) * 1.0
                mean_b = tl.sum(xv, axis=1) / n_b
                d = tl.where(msk, xv - mean_b[:, None], 0.0)
                delta = mean_b - mean
                n = n_a + n_b
                mean += delta * (n_b / n)
                m2 += tl.sum(d * d, axis=1) + delta * delta * (n_a * n_b / n)
        rstd = 1.0 / tl.sqrt(m2 / K + eps)
        first = pid_r == 0
        tl.store(mean_ptr + rows, mean, mask=row_ok & first)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok & first)

        seed = 0
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            msk = row_ok[:, None] & col_ok[None, :]
            w = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + gamma_shift
            bias = w  # a placeholder unless HAS_BIAS
            if HAS_BIAS:
                bias = tl.load(nb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            xhat = _xhat_tile(x_ptr, rows64, cols, msk, stride_xm, mean, rstd)
            ln = _ln_tile(xhat, w, bias, HAS_BIAS).to(ln_ptr.dtype.element_ty)
            tl.store(ln_ptr + rows64[:, None] * K + cols[None, :], ln, mask=msk & first)
            lnf = tl.where(msk, ln.to(tl.float32), 0.0)
            if HAS_DROPOUT:
                lnf = tl.where(keep_mask(seed, rows, cols, K, p), lnf, 0.0)
            # the A^T tile [BLOCK_K, BLOCK_R]
            a = load_f32(a_ptr + ranks[None, :] * K + cols[:, None],
                         rank_ok[None, :] & col_ok[:, None], INTERPRET)
            acc = tl.dot(dot_operand(lnf, ln_ptr.dtype.element_ty, INTERPRET), a, acc,
                         input_precision=PRECISION)
        s = acc * (1.0 / (1.0 - p))
        tl.store(s_ptr + rows64[:, None] * R + ranks[None, :], s,
                 mask=row_ok[:, None] & rank_ok[None, :])

    @triton.jit
    def _norm_bwd_dx_kernel(
        x_ptr,  # [M, K] norm input; row stride stride_xm
        g_ptr,  # [M, K] gradient of ln through the linear; strides (stride_gm, stride_gk)
        go_ptr,  # [M, K] gradient of the returned ln (read only when HAS_LN_GRAD)
        nw_ptr,  # [K] norm weight
        mean_ptr,  # fp32 [M]
        rstd_ptr,  # fp32 [M]
        dx_ptr,  # [M, K] out, contiguous
        M,  # rows
        K,  # hidden size
        stride_xm,  # row stride of x
        stride_gm, stride_gk,  # strides of g (any: an expanded gradient has stride 0)
        stride_om, stride_ok,  # strides of go
        gamma_shift,  # fp32: 1.0 with zero-centred gamma
        IS_RMS: tl.constexpr,  # RMSNorm (no mean term)
        HAS_LN_GRAD: tl.constexpr,  # go is given
        BLOCK_M: tl.constexpr,  # rows per program
        BLOCK_K: tl.constexpr,  # columns per step
    ):
        """dx = (w' g - xhat c1 - c2) rstd with c1 = mean_k(xhat w' g), c2 = mean_k(w' g)
        (RMSNorm: c2 = 0), g = dln + dln_out, w' = w + shift, xhat = (x - mean) rstd."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            msk = row_ok[:, None] & col_ok[None, :]
            g = _grad_tile(g_ptr, go_ptr, rows64, cols, msk, stride_gm, stride_gk, stride_om,
                           stride_ok, HAS_LN_GRAD)
            w = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + gamma_shift
            xhat = _xhat_tile(x_ptr, rows64, cols, msk, stride_xm, mean, rstd)
            wdy = w[None, :] * g
            c1 += tl.sum(xhat * wdy, axis=1)
            c2 += tl.sum(wdy, axis=1)
        c1 = c1 / K
        c2 = c2 / K
        if IS_RMS:
            c2 = c2 * 0.0
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            msk = row_ok[:, None] & col_ok[None, :]
            g = _grad_tile(g_ptr, go_ptr, rows64, cols, msk, stride_gm, stride_gk, stride_om,
                           stride_ok, HAS_LN_GRAD)
            w = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + gamma_shift
            xhat = _xhat_tile(x_ptr, rows64, cols, msk, stride_xm, mean, rstd)
            dx = (w[None, :] * g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(dx_ptr + rows64[:, None] * K + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=msk)

    @triton.jit
    def _norm_lora_bwd_col_kernel(
        x_ptr,  # [M, K] norm input; row stride stride_xm
        g_ptr,  # [M, K] gradient of ln through the linear; strides (stride_gm, stride_gk)
        go_ptr,  # [M, K] gradient of the returned ln (read only when HAS_LN_GRAD)
        nw_ptr,  # [K] norm weight
        nb_ptr,  # [K] norm bias (read only when HAS_BIAS)
        mean_ptr,  # fp32 [M]
        rstd_ptr,  # fp32 [M]
        ds_ptr,  # fp32 [M, R] contiguous: dS = s dY B
        seed_ptr,  # int64 [1] (read only when HAS_DROPOUT)
        dw_part_ptr,  # fp32 [G, K] out: partial dgamma of each row group
        db_part_ptr,  # fp32 [G, K] out: partial dbeta
        da_part_ptr,  # fp32 [G, R, K] out: partial dA (before the 1 / (1 - p) scale)
        M,  # rows
        K,  # hidden size
        R,  # LoRA rank
        G,  # row groups (grid axis 1)
        stride_xm,  # row stride of x
        stride_gm, stride_gk,  # strides of g
        stride_om, stride_ok,  # strides of go
        p,  # fp32 dropout probability
        gamma_shift,  # fp32: 1.0 with zero-centred gamma
        IS_RMS: tl.constexpr,  # RMSNorm
        HAS_BIAS: tl.constexpr,  # LayerNorm with a bias
        HAS_DROPOUT: tl.constexpr,  # p > 0
        HAS_LN_GRAD: tl.constexpr,  # go is given
        BLOCK_M: tl.constexpr,  # rows per step
        BLOCK_K: tl.constexpr,  # columns per program
        BLOCK_R: tl.constexpr,  # rank tile (grid axis 2)
        INTERPRET: tl.constexpr,  # fp32 operands under the interpreter
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
    ):
        """Over the rows m = group, group + G, ... (in BLOCK_M steps) of one column tile:
        dgamma += sum_m g xhat, dbeta += sum_m g, dA^T += keep(ln)^T dS, ln recomputed from
        (x, mean, rstd) exactly as the forward kernel computed it."""
        pid_k = tl.program_id(0)
        pid_g = tl.program_id(1)
        pid_r = tl.program_id(2)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        w = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + gamma_shift
        b = tl.zeros([BLOCK_K], dtype=tl.float32)
        if HAS_BIAS:
            b = tl.load(nb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        seed = 0
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        dw = tl.zeros([BLOCK_K], dtype=tl.float32)
        db = tl.zeros([BLOCK_K], dtype=tl.float32)
        da = tl.zeros([BLOCK_K, BLOCK_R], dtype=tl.float32)
        for m0 in range(pid_g * BLOCK_M, M, G * BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            rows64 = rows.to(tl.int64)
            msk = row_ok[:, None] & col_ok[None, :]
            g = _grad_tile(g_ptr, go_ptr, rows64, cols, msk, stride_gm, stride_gk, stride_om,
                           stride_ok, HAS_LN_GRAD)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = _xhat_tile(x_ptr, rows64, cols, msk, stride_xm, mean, rstd)
            dw += tl.sum(g * xhat, axis=0)
            db += tl.sum(g, axis=0)
            ln = _ln_tile(xhat, w, b, HAS_BIAS).to(x_ptr.dtype.element_ty)
            lnf = tl.where(msk, ln.to(tl.float32), 0.0)
            if HAS_DROPOUT:
                lnf = tl.where(keep_mask(seed, rows, cols, K, p), lnf, 0.0)
            dsv = tl.load(ds_ptr + rows64[:, None] * R + ranks[None, :],
                          mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            da = tl.dot(tl.trans(dot_operand(lnf, x_ptr.dtype.element_ty, INTERPRET)),
                        dot_operand(dsv, x_ptr.dtype.element_ty, INTERPRET), da,
                        input_precision=PRECISION)
        first = pid_r == 0
        tl.store(dw_part_ptr + pid_g * K + cols, dw, mask=col_ok & first)
        tl.store(db_part_ptr + pid_g * K + cols, db, mask=col_ok & first)
        da_ptrs = da_part_ptr + (pid_g * R + ranks[None, :]).to(tl.int64) * K + cols[:, None]
        tl.store(da_ptrs, da, mask=col_ok[:, None] & rank_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configuration


@dataclasses.dataclass(frozen=True)
class RowPassConfig:
    """Tile sizes of the three row-pass kernels for one architecture.

    fwd: 64 rows share each read of A (and let sm_90 use wgmma, which needs 64 rows per
    warpgroup); BLOCK_K = 32 because 16 x 128 tiles with the rank-64 A tile and the Philox
    rounds spilled on sm_80 (kernels/aot.py: 255 registers, 144 B spilled; 64 x 32: ~200, none).
    dx: a pure row reduction, wide K steps. col: a [BLOCK_K, BLOCK_R] fp32 dA tile (<= 32
    values per thread at rank 64).
    Under the interpreter, big blocks: each kernel step costs a numpy call, not a cycle.
    """

    fwd_block_m: int
    fwd_block_k: int
    dx_block_m: int
    dx_block_k: int
    col_block_m: int
    col_block_k: int
    num_warps: int

    @classmethod
    def from_heuristic(cls, arch: str) -> RowPassConfig:
        if arch == "interpret":
            return cls(64, 128, 64, 128, 64, 128, 4)
        # sm80 and sm90 share tiles: the row pass is bandwidth-bound, tl.dot is a small share.
        return cls(64, 32, 4, 512, 32, 64, 4)


def _row_groups(m: int, col_tiles: int, r_tiles: int, block_m: int, device: torch.device) -> int:
    """Row groups G of the column kernel: enough programs to fill the GPU twice, never more
    than the row blocks can feed (each group writes a [K] + [r, K] fp32 partial)."""
    row_blocks = max(1, triton.cdiv(m, block_m))
    if device.type != "cuda":
        return min(row_blocks, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_blocks, triton.cdiv(2 * sms, col_tiles * r_tiles)))


# ---------------------------------------------------------------------------------------------
# Host launchers of the row pass (Triton or the CUDA twin)


def _row_fwd_triton(x2d, norm_weight, norm_bias, lora_a, seed, *, eps, p, rms, shift):
    m, k = x2d.shape
    r = lora_a.shape[0]
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    lora_a = lora_a.contiguous()
    f32 = dict(device=x2d.device, dtype=torch.float32)
    ln = torch.empty((m, k), device=x2d.device, dtype=x2d.dtype)
    mean, rstd = torch.empty(m, **f32), torch.empty(m, **f32)
    s = torch.empty((m, r), **f32)
    if m == 0:
        return ln, mean, rstd, s
    cfg = RowPassConfig.from_heuristic(current_arch(x2d.device))
    block_r = rank_block(r)
    grid = (triton.cdiv(m, cfg.fwd_block_m), triton.cdiv(r, block_r))
    _norm_lora_fwd_kernel[grid](
        x2d, norm_weight.contiguous(),
        norm_bias.contiguous() if norm_bias is not None else norm_weight,
        lora_a, seed, ln, mean, rstd, s, m, k, r, x2d.stride(0), float(eps), float(p),
        float(shift), IS_RMS=rms, HAS_BIAS=norm_bias is not None, HAS_DROPOUT=p > 0.0,
        BLOCK_M=cfg.fwd_block_m, BLOCK_K=cfg.fwd_block_k, BLOCK_R=block_r,
        INTERPRET=current_arch(x2d.device) == "interpret", PRECISION=dot_precision(x2d.dtype),
        num_warps=cfg.num_warps,
    )
    return ln, mean, rstd, s


def _row_bwd_triton(x2d, dln, dln_out, norm_weight, norm_bias, mean, rstd, ds, seed, *, p, rms,
                    shift):
    m, k = x2d.shape
    r = ds.shape[1]
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    ds = ds.to(torch.float32).contiguous()
    dx = torch.empty((m, k), device=x2d.device, dtype=x2d.dtype)
    f32 = dict(device=x2d.device, dtype=torch.float32)
    if m == 0:
        return dx, torch.zeros(k, **f32), torch.zeros(k, **f32), torch.zeros((r, k), **f32)
    arch = current_arch(x2d.device)
    cfg = RowPassConfig.from_heuristic(arch)
    go = dln_out if dln_out is not None else dln
    nw = norm_weight.contiguous()
    common = dict(IS_RMS=rms, HAS_LN_GRAD=dln_out is not None, num_warps=cfg.num_warps)
    _norm_bwd_dx_kernel[(triton.cdiv(m, cfg.dx_block_m),)](
        x2d, dln, go, nw, mean, rstd, dx, m, k, x2d.stride(0), dln.stride(0), dln.stride(1),
        go.stride(0), go.stride(1), float(shift), BLOCK_M=cfg.dx_block_m, BLOCK_K=cfg.dx_block_k,
        **common,
    )
    block_r = rank_block(r)
    col_tiles, r_tiles = triton.cdiv(k, cfg.col_block_k), triton.cdiv(r, block_r)
    groups = _row_groups(m, col_tiles, r_tiles, cfg.col_block_m, x2d.device)
    dw_part = torch.empty((groups, k), **f32)
    db_part = torch.empty((groups, k), **f32)
    da_part = torch.empty((groups, r, k), **f32)
    _norm_lora_bwd_col_kernel[(col_tiles, groups, r_tiles)](
        x2d, dln, go, nw, norm_bias.contiguous() if norm_bias is not None else nw, mean, rstd, ds,
        seed,
        dw_part, db_part, da_part, m, k, r, groups, x2d.stride(0), dln.stride(0), dln.stride(1),
        go.stride(0), go.stride(1), float(p), float(shift), HAS_BIAS=norm_bias is not None,
        HAS_DROPOUT=p > 0.0, BLOCK_M=cfg.col_block_m, BLOCK_K=cfg.col_block_k, BLOCK_R=block_r,
        INTERPRET=arch == "interpret", PRECISION=dot_precision(x2d.dtype), **common,
    )
    da = da_part.sum(0)
    if p > 0.0:
        da = da * (1.0 / (1.0 - p))
    return dx, dw_part.sum(0), db_part.sum(0), da


def norm_lora_row_fwd(x2d, norm_weight, norm_bias, lora_a, seed, *, eps, p, rms, shift, backend):
    """Row pass forward: (ln [M, K] x.dtype, mean [M], rstd [M], S [M, r] fp32) on ``backend``
    ('cuda' = bridge._C, 'triton'). S = keep(ln) A^T / (1 - p), unscaled by the LoRA scale."""
    if backend == "cuda":
        return torch.ops.bridge.norm_lora_row_fwd_cuda(
            x2d, norm_weight, norm_bias, lora_a, seed, float(eps), float(p), rms, shift != 0.0)
    return _row_fwd_triton(x2d, norm_weight, norm_bias, lora_a, seed, eps=eps, p=p, rms=rms,
                           shift=shift)


def norm_lora_row_bwd(x2d, dln, dln_out, norm_weight, norm_bias, mean, rstd, ds, seed, *, p, rms,
                      shift, backend):
    """Row pass backward: (dx [M, K] x.dtype, dnorm_weight [K], dnorm_bias [K], dA [r, K]), the
    last three fp32. dln: gradient of ln through the linear; dln_out: of the returned ln."""
    if backend == "cuda":
        return torch.ops.bridge.norm_lora_row_bwd_cuda(
            x2d, dln, dln_out, norm_weight, norm_bias, mean, rstd, ds, seed, float(p), rms,
            shift != 0.0)
    return _row_bwd_triton(x2d, dln, dln_out, norm_weight, norm_bias, mean, rstd, ds, seed, p=p,
                           rms=rms, shift=shift)


# ---------------------------------------------------------------------------------------------
# Registered ops (custom_op + register_fake + register_autograd; DESIGN.md says why not
# triton_op). The row pass runs on ``row_backend`` ('triton' or 'cuda'); the GEMM steps are the
# LoRA linear's, in the strategy ``gemm_fwd`` / ``gemm_bwd`` ('fused' | 'cublas', or 'auto' when
# traced: see kernels/gemm_strategy.py). Saved for backward: x, mean/rstd, S and the seed.
# ---------------------------------------------------------------------------------------------

_FWD_SCHEMA = (
    "(Tensor x, Tensor norm_weight, Tensor? norm_bias, Tensor weight, Tensor? bias, "
    "Tensor lora_a, Tensor lora_b, Tensor? seed, float eps, float scale, float p, bool post, "
    "bool rms, bool zero_centered_gamma, str row_backend, str gemm_fwd=\"fused\", "
    "str gemm_bwd=\"fused\") -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor dy, Tensor? dln_out, Tensor x, Tensor norm_weight, Tensor? norm_bias, "
    "Tensor weight, Tensor lora_a, Tensor lora_b, Tensor mean, Tensor rstd, Tensor s_mat, "
    "Tensor? seed, float scale, float p, bool post, bool rms, bool zero_centered_gamma, "
    "str row_backend, str gemm=\"fused\") -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _dln_dtype(strategy: str, row_backend: str, dtype: torch.dtype) -> torch.dtype:
    """dtype of dln, the dX of the GEMM step: the fused dX hands the Triton row kernels fp32
    (unrounded); cuBLAS writes x's dtype (as an unfused norm + linear would; the CUDA twin
    reads that dtype either way)."""
    return torch.float32 if strategy == "fused" and row_backend == "triton" else dtype


def _resolve(gemm, direction, x2d, weight, lora_a, seed, p, post, bias) -> str:
    n, k = weight.shape
    return gemm_strategy.resolve(gemm, "norm_lora", direction, device=x2d.device,
                                 dtype=x2d.dtype, m=x2d.shape[0], n=n, k=k, r=lora_a.shape[0],
                                 seed=seed, p=p, post=post, bias=bias)


def _seed_arg(seed: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The row pass always takes a seed tensor; with no dropout it is never read (so an
    uninitialised one will do: no fill kernel on the hot path)."""
    return seed if seed is not None else torch.empty(1, dtype=torch.int64, device=like.device)


@torch.library.custom_op("bridge::norm_lora_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _norm_lora_fwd_op(x, norm_weight, norm_bias, weight, bias, lora_a, lora_b, seed, eps, scale,
                      p, post, rms, zero_centered_gamma, row_backend, gemm_fwd="fused",
                      gemm_bwd="fused"):
    """(y [..., N], ln [..., K], mean [M] f32, rstd [M] f32, S [M, r] f32). ``bias`` None means
    no bias in y; ``seed`` None means no dropout; ``post`` masks B(A ln) instead of ln."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    p_pre = p if (seed is not None and not post) else 0.0
    ln, mean, rstd, s_mat = norm_lora_row_fwd(
        x2d, norm_weight, norm_bias, lora_a, _seed_arg(seed, x), eps=eps, p=p_pre, rms=rms,
        shift=1.0 if zero_centered_gamma else 0.0, backend=row_backend)
    strategy = _resolve(gemm_fwd, "fwd", x2d, weight, lora_a, seed, p, post, bias is not None)
    y2d = gemm_forward(strategy, ln, weight, bias, s_mat, lora_b, scale,
                       seed=seed if post else None, p=p)
    return (y2d.view(*x.shape[:-1], weight.shape[0]), ln.view(x.shape), mean, rstd, s_mat)


@_norm_lora_fwd_op.register_fake
def _(x, norm_weight, norm_bias, weight, bias, lora_a, lora_b, seed, eps, scale, p, post, rms,
      zero_centered_gamma, row_backend, gemm_fwd="fused", gemm_bwd="fused"):
    m = x.numel() // x.shape[-1]
    f32 = torch.float32
    return (x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty(x.shape),
            x.new_empty((m,), dtype=f32), x.new_empty((m,), dtype=f32),
            x.new_empty((m, lora_a.shape[0]), dtype=f32))


@torch.library.custom_op("bridge::norm_lora_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _norm_lora_bwd_op(dy, dln_out, x, norm_weight, norm_bias, weight, lora_a, lora_b, mean, rstd,
                      s_mat, seed, scale, p, post, rms, zero_centered_gamma, row_backend,
                      gemm="fused"):
    """(dx of x's shape, dnorm_weight, dnorm_bias (empty without a bias), dA, dB), the parameter
    gradients in their parameters' dtypes. ``gemm``: the strategy of the dln GEMM step."""
    n, k = weight.shape
    dy2d, x2d = dy.reshape(-1, n), x.reshape(-1, k)
    pre_seed, post_seed = (None, seed) if post else (seed, None)
    ds, dlora_b = launch_dsdb(dy2d, lora_b, s_mat, scale, seed=post_seed, p=p)
    strategy = _resolve(gemm, "bwd", x2d, weight, lora_a, seed, p, post, False)
    dln = gemm_dx(strategy, dy2d, weight, ds, lora_a, seed=pre_seed, p=p,
                  out_dtype=_dln_dtype(strategy, row_backend, x.dtype))
    dlo = dln_out.reshape(-1, k) if dln_out is not None else None
    dx, dnw, dnb, da = norm_lora_row_bwd(
        x2d, dln, dlo, norm_weight, norm_bias, mean, rstd, ds, _seed_arg(seed, x),
        p=p if pre_seed is not None else 0.0, rms=rms,
        shift=1.0 if zero_centered_gamma else 0.0, backend=row_backend)
    dnb = dnb.to(norm_bias.dtype) if norm_bias is not None else norm_weight.new_empty(0)
    return dx.view(x.shape), dnw.to(norm_weight.dtype), dnb, da.to(lora_a.dtype), dlora_b


@_norm_lora_bwd_op.register_fake
def _(dy, dln_out, x, norm_weight, norm_bias, weight, lora_a, lora_b, mean, rstd, s_mat, seed,
      scale, p, post, rms, zero_centered_gamma, row_backend, gemm="fused"):
    dnb = norm_weight.new_empty(0) if norm_bias is None else norm_bias.new_empty(norm_bias.shape)
    return (x.new_empty(x.shape), norm_weight.new_empty(norm_weight.shape), dnb,
            lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape))


@dataclasses.dataclass(frozen=True)
class _BwdSettings:
    """The non-tensor arguments backward needs, kept together (not scattered over ctx)."""

    scale: float
    p: float
    post: bool
    rms: bool
    zero_centered_gamma: bool
    row_backend: str
    has_bias: bool
    gemm: str  # the backward's GEMM strategy


def _norm_lora_setup_context(ctx, inputs, output):
    (x, norm_weight, norm_bias, weight, bias, lora_a, lora_b, seed, _eps, scale, p, post, rms,
     zcg, row_backend, _gemm_fwd, gemm_bwd) = inputs
    _, _, mean, rstd, s_mat = output
    ctx.save_for_backward(x, norm_weight, norm_bias, weight, lora_a, lora_b, mean, rstd, s_mat,
                          seed)
    ctx.settings = _BwdSettings(scale, p, post, rms, zcg, row_backend, bias is not None,
                                gemm_bwd)
    ctx.mark_non_differentiable(mean, rstd, s_mat)
    ctx.set_materialize_grads(False)  # an unused ln_out sends None: skip its read


def _norm_lora_backward(ctx, dy, dln_out, _dmean, _drstd, _ds):
    x, norm_weight, norm_bias, weight, lora_a, lora_b, mean, rstd, s_mat, seed = ctx.saved_tensors
    st = ctx.settings
    if dy is None:
        dy = x.new_zeros((*x.shape[:-1], weight.shape[0]))
    dx, dnw, dnb, da, db = torch.ops.bridge.norm_lora_bwd(
        dy, dln_out, x, norm_weight, norm_bias, weight, lora_a, lora_b, mean, rstd, s_mat, seed,
        st.scale, st.p, st.post, st.rms, st.zero_centered_gamma, st.row_backend, st.gemm)
    needs = ctx.needs_input_grad
    dbias = None
    if st.has_bias and needs[4]:
        dbias = dy.reshape(-1, weight.shape[0]).sum(0, dtype=torch.float32).to(dy.dtype)
    return (dx if needs[0] else None, dnw if needs[1] else None,
            dnb if norm_bias is not None and needs[2] else None, None, dbias,
            da if needs[5] else None, db if needs[6] else None,
            None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("bridge::norm_lora_fwd", _norm_lora_backward,
                                setup_context=_norm_lora_setup_context)


class _NormLoRAFunction(torch.autograd.Function):
    """The functional op's way into the registered op: its setup_context and backward, without
    custom_op's per-call schema walk (see lora_linear._LoRALinearFunction; 17 arguments here)."""

    @staticmethod
    def forward(ctx, *inputs):
        out = torch.ops.bridge.norm_lora_fwd(*inputs)  # grad mode is off here: no autograd
        _norm_lora_setup_context(ctx, inputs, out)
        return out

    backward = staticmethod(_norm_lora_backward)


# ---------------------------------------------------------------------------------------------
# Backend choice and the functional op

OP_NAME = "norm_lora_row_fwd"  # bridge._C registers its CUDA twin as bridge::norm_lora_row_fwd_cuda
CUDA_MAX_ROW_BYTES = 96 * 1024  # csrc/norm_lora.cu stages rows in (opt-in) shared memory


def cuda_row_limits(k: int, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the CUDA row kernels take hidden size ``k``: 16-byte vectors and a row buffer of
    at most CUDA_MAX_ROW_BYTES (Triton's row kernels loop over K and take any hidden size)."""
    size = torch.empty((), dtype=dtype).element_size()
    vec = 16 // size
    if k % vec:
        return False, f"hidden size {k} is not a multiple of {vec} (16-byte vectors)"
    if k * size > CUDA_MAX_ROW_BYTES:
        return False, (f"hidden size {k} needs a {k * size}-byte row buffer, above the CUDA row "
                       f"kernel's {CUDA_MAX_ROW_BYTES}")
    return True, ""


def norm_lora_backend(
    requested: str | None, x: torch.Tensor, weight: torch.Tensor,
    constraints: tuple[tuple[bool, str], ...] | list[tuple[bool, str]] = (),
    norm_params: tuple[torch.Tensor | None, ...] = (),
) -> BackendChoice:
    """The backend of the row pass ('cuda' | 'triton' | 'eager') and why; GEMMs are Triton
    whenever the row pass is not eager, so 'cuda' also needs Triton to run here.
    ``constraints``: the caller's extra (ok, reason) checks. ``norm_params``: the norm weight and
    bias (the CUDA row kernels take them in x's dtype only; Triton takes any float dtype)."""
    frozen = (not weight.requires_grad,
              "the base weight requires grad (the fused op treats it as frozen)")
    ok, why = probe_triton(x.device, x.dtype)
    gemms = (ok, f"the GEMMs run on Triton, which cannot run here ({why})")
    odd = sorted({str(p.dtype).replace("torch.", "") for p in norm_params
                  if p is not None and p.dtype != x.dtype})
    same_dtype = (not odd, f"norm parameters in {', '.join(odd)}, the CUDA row kernels take "
                           f"x's dtype ({str(x.dtype).replace('torch.', '')}) only")
    return resolve_backend(requested, OP_NAME, device=x.device, dtype=x.dtype, cuda_op=True,
                           constraints=[frozen, *constraints],
                           cuda_constraints=[cuda_row_limits(x.shape[-1], x.dtype), gemms,
                                             same_dtype])


def norm_lora_linear_fused(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None,
    weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    *, row_backend: str, rms: bool, eps: float, scale: float, p: float, post: bool,
    zero_centered_gamma: bool = False, seed: int | torch.Tensor | None = None,
    gemm: str = "auto", gemm_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, ln) through the fused op after the checks: arguments validated by the caller,
    ``row_backend`` ('triton' | 'cuda') chosen, ``p`` effective (0 in eval), ``bias`` None also
    for skip_bias_add, ``gemm`` the requested strategy after the environment."""
    seed_t = None
    if p > 0.0:
        seed_t = draw_seed(x.device) if seed is None else seed_tensor(seed, x.device)
    x2d = x.reshape(-1, x.shape[-1])
    need_bwd = _needs_grad(x, norm_weight, norm_bias, bias, lora_a, lora_b)
    fwd, bwd = gemm_strategy.select(
        "norm_lora", gemm, x2d=x2d, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
        scale=scale, seed=seed_t, p=p, post=post, need_bwd=need_bwd,
        dx_dtype={g: _dln_dtype(g, row_backend, x.dtype) for g in gemm_strategy.STRATEGIES},
        group=gemm_group)
    y, ln, _, _, _ = _NormLoRAFunction.apply(
        x, norm_weight, norm_bias, weight, bias, lora_a, lora_b, seed_t, float(eps),
        float(scale), float(p), post, rms, bool(zero_centered_gamma), row_backend, fwd, bwd)
    return y, ln


def norm_lora_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    normalization: str,
    eps: float,
    scale: float,
    dropout: float = 0.0,
    dropout_position: str = "pre",
    training: bool = True,
    skip_bias_add: bool = False,
    return_norm_output: bool = False,
    zero_centered_gamma: bool = False,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
    gemm: str = "auto",
    gemm_group=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ln = norm(x); y = ln W^T (+ b) + s * B(A(dropout(ln))).

    Args:
        x: [..., K]; norm_weight [K] (gamma - 1 with ``zero_centered_gamma``), norm_bias [K] or
            None (LayerNorm only); weight [N, K] (frozen), bias [N] or None, lora_a [r, K],
            lora_b [N, r]; all of x's dtype.
        normalization: 'LayerNorm' or 'RMSNorm'; eps > 0; scale: s = alpha / r.
        dropout, dropout_position: probability and 'pre' (on ln) | 'post' (on B(A ln)).
        training: dropout only when True. skip_bias_add: leave b out of y.
        seed: dropout seed (int or int64 tensor [1]); drawn from torch's generator when None.
        backend: 'auto' | 'cuda' | 'triton' | 'eager' (kernels/backend.py).
        gemm: 'auto' | 'fused' | 'cublas' (kernels/gemm_strategy.py); ignored by eager.
        gemm_group: the tensor-parallel group whose ranks must agree on the strategy, or None.

    Returns:
        y [..., N], or (y, ln [..., K]) with ``return_norm_output``.
    """
    check_lora_args(x, weight, bias, lora_a, lora_b)
    check_norm_args(normalization, eps, norm_weight, norm_bias, x.shape[-1], device=x.device)
    check_dropout(dropout, dropout_position)
    scale = check_scale(scale)
    check_seed(seed)
    gemm = requested_gemm(gemm)
    choice = norm_lora_backend(backend, x, weight, norm_params=(norm_weight, norm_bias))
    if choice.name == "eager":
        ln = norm_ref(x, norm_weight, norm_bias, normalization=normalization, eps=eps,
                      zero_centered_gamma=zero_centered_gamma)
        y = _eager_lora_linear(ln, weight, bias, lora_a, lora_b, scale=scale, dropout=dropout,
                               dropout_position=dropout_position, training=training,
                               skip_bias_add=skip_bias_add, seed=seed)
        return (y, ln) if return_norm_output else y
    y, ln = norm_lora_linear_fused(
        x, norm_weight, norm_bias, weight, None if skip_bias_add else bias, lora_a, lora_b,
        row_backend=choice.name, rms=normalization == "RMSNorm", eps=eps, scale=scale,
        p=float(dropout) if training else 0.0, post=dropout_position == "post",
        zero_centered_gamma=zero_centered_gamma, seed=seed, gemm=gemm, gemm_group=gemm_group)
    return (y, ln) if return_norm_output else y


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (kernels/aot.py format)


def aot_specs() -> list[dict]:
    """The row-pass kernels for ``kernels/aot.py``: dicts of kernel, variant, configs (None: the
    tiles are in ``fixed``), sig (argument -> Triton type, or 1 for a unit stride), fixed
    constexprs, uses_dot. bf16, the sm80/sm90 tiles of RowPassConfig, rank tile 64, dropout on."""
    cfg = RowPassConfig.from_heuristic("sm80")
    dt, f32, i32, i64p, f32p = "*bf16", "fp32", "i32", "*i64", "*fp32"
    common = {"INTERPRET": False, "PRECISION": "ieee", "BLOCK_R": 64}
    fwd_sig = {"x_ptr": dt, "nw_ptr": dt, "nb_ptr": dt, "a_ptr": dt, "seed_ptr": i64p,
               "ln_ptr": dt, "mean_ptr": f32p, "rstd_ptr": f32p, "s_ptr": f32p, "M": i32,
               "K": i32, "R": i32, "stride_xm": i32, "eps": f32, "p": f32, "gamma_shift": f32}
    dx_sig = {"x_ptr": dt, "g_ptr": f32p, "go_ptr": dt, "nw_ptr": dt, "mean_ptr": f32p,
              "rstd_ptr": f32p, "dx_ptr": dt, "M": i32, "K": i32, "stride_xm": i32,
              "stride_gm": i32, "stride_gk": 1, "stride_om": i32, "stride_ok": 1,
              "gamma_shift": f32}
    col_sig = {"x_ptr": dt, "g_ptr": f32p, "go_ptr": dt, "nw_ptr": dt, "nb_ptr": dt,
               "mean_ptr": f32p, "rstd_ptr": f32p, "ds_ptr": f32p, "seed_ptr": i64p,
               "dw_part_ptr": f32p, "db_part_ptr": f32p, "da_part_ptr": f32p, "M": i32, "K": i32,
               "R": i32, "G": i32, "stride_xm": i32, "stride_gm": i32, "stride_gk": 1,
               "stride_om": i32, "stride_ok": 1, "p": f32, "gamma_shift": f32}

    def spec(kernel, variant, sig, fixed, uses_dot):
        return {"kernel": kernel, "variant": variant, "configs": None, "sig": sig,
                "fixed": fixed, "uses_dot": uses_dot}

    return [
        spec(_norm_lora_fwd_kernel, "layernorm+bias+pre-dropout", fwd_sig,
             {**common, "IS_RMS": False, "HAS_BIAS": True, "HAS_DROPOUT": True,
              "BLOCK_M": cfg.fwd_block_m, "BLOCK_K": cfg.fwd_block_k}, True),
        spec(_norm_lora_fwd_kernel, "rmsnorm", fwd_sig,
             {**common, "IS_RMS": True, "HAS_BIAS": False, "HAS_DROPOUT": False,
              "BLOCK_M": cfg.fwd_block_m, "BLOCK_K": cfg.fwd_block_k}, True),
        spec(_norm_bwd_dx_kernel, "layernorm+ln-grad", dx_sig,
             {"IS_RMS": False, "HAS_LN_GRAD": True, "BLOCK_M": cfg.dx_block_m,
              "BLOCK_K": cfg.dx_block_k}, False),
        spec(_norm_lora_bwd_col_kernel, "layernorm+bias+pre-dropout+ln-grad", col_sig,
             {**common, "IS_RMS": False, "HAS_BIAS": True, "HAS_DROPOUT": True,
              "HAS_LN_GRAD": True, "BLOCK_M": cfg.col_block_m, "BLOCK_K": cfg.col_block_k},
             True),
    ]
