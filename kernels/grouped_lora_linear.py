"""Grouped (MoE expert) LoRA linear: for tokens sorted by expert,
y_e = x_e W_e^T (+ b_e) + s * B_e(A_e(dropout(x_e))), one expert per row block.

Read top to bottom: argument checks and the eager reference (oracle and eager backend), the Triton
kernels, their configurations per architecture, the host launchers, the registered ops and the
functional op that asks kernels/backend.py for a backend.

Shapes: x [M, K] sorted by expert (any leading dims flattened into M), ``tokens_per_expert`` [E]
(m_splits: rows of expert e are the next c_e rows; zeros allowed), W_e [N, K] as a stacked
[E, N, K] tensor or as E separate tensors (Transformer Engine's ``weight{i}``, read in place through
a device array of their addresses), b [E, N], A [r, K] shared or [E, r, K] per expert, B [N, r]
shared or [E, N, r] per expert: Megatron-Bridge's shared adapter (both 2-D), per-expert adapters
(both 3-D) and its shared-outer layouts (fc1: A shared, B per expert; fc2: A per expert, B shared).
S = x~ A_e^T [M, r] is kept in fp32. Dropout follows kernels/philox.py with the row index of the
sorted [M, K] input (or [M, N] output): m is regenerated from the seed, never stored.

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

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from bridge.kernels._checks import check_dropout
from bridge.kernels._lowrank import DSDB_BLOCK_M, launch_da, launch_dsdb, launch_shrink
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
    triton_next_pow2,
)
from bridge.kernels.backend import resolve_backend
from bridge.kernels.philox import draw_seed, keep_mask, seed_tensor

MAX_EXPERTS = 1024  # the in-kernel schedule reads all E counts per program (E_PAD-wide vectors)


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by the reference and the functional op)
# ---------------------------------------------------------------------------------------------


class GroupedArgs(NamedTuple):
    """Normalised arguments: ``weights`` is [stacked [E, N, K]] or E tensors [N, K]; ``bias``
    [E, N] or None; ``counts`` the host list of tokens per expert, or None for a device tensor
    (or one traced by torch.compile): checked by a device-side assertion, no host sync."""

    weights: list[torch.Tensor]
    bias: torch.Tensor | None
    n_experts: int
    n: int
    k: int
    r: int
    counts: list[int] | None

    @property
    def stacked(self) -> bool:
        return self.weights[0].dim() == 3


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_grouped_args(x, weight, bias, lora_a, lora_b, tokens_per_expert) -> GroupedArgs:
    """Validate a grouped LoRA call; raise TypeError/ValueError naming the bad argument."""
    if isinstance(weight, torch.Tensor):
        if weight.dim() != 3:
            raise ValueError(f"a stacked weight must be 3-D [E, N, K]; got {_shape(weight)} (pass "
                             "a list of E [N, K] tensors for separate per-expert weights)")
        weights = [weight]
        e, n, k = weight.shape
    elif isinstance(weight, Sequence) and len(weight) > 0:
        weights = list(weight)
        if not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
            raise ValueError("per-expert weights must be a list of 2-D [N, K] tensors")
        first = weights[0]
        for i, w in enumerate(weights):
            if (w.shape, w.dtype, w.device, w.stride()) != (first.shape, first.dtype, first.device,
                                                             first.stride()):
                raise ValueError(
                    f"weight[{i}] {_shape(w)} {w.dtype} on {w.device} strides {w.stride()} differs "
                    f"from weight[0] {_shape(first)} {first.dtype} on {first.device} strides "
                    f"{first.stride()}: per-expert weights must share shape, dtype, device and "
                    "layout")
        e, (n, k) = len(weights), first.shape
    else:
        raise TypeError("weight must be a stacked [E, N, K] tensor or a non-empty list of [N, K] "
                        f"tensors; got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != k:
        got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor [..., K] with K={k} (the weights' in_features); got "
                         f"{got}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3) or (t.dim() == 3
                                                                       and t.shape[0] != e):
            raise ValueError(f"{name} must be 2-D (shared by all experts) or 3-D with E={e} "
                             f"experts first; got {_shape(t) if isinstance(t, torch.Tensor) else t}")
    r = lora_a.shape[-2]
    if lora_a.shape[-1] != k or lora_b.shape[-2:] != (n, r) or r < 1:
        raise ValueError(f"lora_a must be [(E,) r, K={k}] with r >= 1 and lora_b [(E,) N={n}, r]; "
                         f"got {_shape(lora_a)} and {_shape(lora_b)}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        if not isinstance(bias, Sequence) or len(bias) != e:
            raise ValueError(f"bias must be None, a [E, N] tensor or a list of E={e} [N] tensors")
        bias = torch.stack(list(bias))  # E*N elements; autograd routes each expert's gradient
    if bias is not None and _shape(bias) != (e, n):
        raise ValueError(f"bias must have shape [E, N] = [{e}, {n}]; got {_shape(bias)}")
    tensors = {"x": x, "weight": weights[0], "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    if len({t.dtype for t in tensors.values()}) != 1:
        listed = ", ".join(f"{a}={str(t.dtype).replace('torch.', '')}" for a, t in tensors.items())
        raise TypeError(f"all tensors must share one dtype; got {listed}")
    if len({t.device for t in tensors.values()}) != 1:
        listed = ", ".join(f"{a}={t.device}" for a, t in tensors.items())
        raise ValueError(f"all tensors must be on one device; got {listed}")
    m = math.prod(x.shape[:-1])
    return GroupedArgs(weights, bias, e, n, k, r, _check_counts(tokens_per_expert, e, m))


def _check_counts(tokens_per_expert, e: int, m: int) -> list[int] | None:
    """tokens_per_expert: E non-negative ints summing to M (a list/tuple, or a 1-D int tensor)."""
    what = "tokens_per_expert"
    if isinstance(tokens_per_expert, torch.Tensor):
        t = tokens_per_expert
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{what} must be a 1-D integer tensor; got {t.dtype} {_shape(t)}")
        if t.numel() != e:
            raise ValueError(f"{what} has {t.numel()} entries for {e} experts")
        if t.device.type != "cpu" or torch.compiler.is_compiling():
            # no host sync: a device-side assertion, raised at the next synchronisation
            torch._assert_async((t.min() >= 0) & (t.sum() == m),
                                f"{what} must be non-negative and sum to M={m}")
            return None
        counts = [int(c) for c in t.tolist()]
    elif isinstance(tokens_per_expert, Sequence):
        counts = list(tokens_per_expert)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise TypeError(f"{what} must hold ints; got {counts!r}")
        if len(counts) != e:
            raise ValueError(f"{what} has {len(counts)} entries for {e} experts")
    else:
        raise TypeError(f"{what} must be a list/tuple of ints or a 1-D integer tensor; got "
                        f"{type(tokens_per_expert).__name__}")
    if any(c < 0 for c in counts):
        raise ValueError(f"{what} must be non-negative; got {counts}")
    if sum(counts) != m:
        raise ValueError(f"{what} sums to {sum(counts)} but x has M={m} rows (tokens must be "
                         "sorted by expert, every row belonging to one expert)")
    return counts


# ---------------------------------------------------------------------------------------------
# Eager reference
# ---------------------------------------------------------------------------------------------


def _factor(t: torch.Tensor, e: int) -> torch.Tensor:
    return t[e] if t.dim() == 3 else t


def grouped_lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor | Sequence[torch.Tensor],
    bias: torch.Tensor | Sequence[torch.Tensor] | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    tokens_per_expert: Sequence[int] | torch.Tensor,
    *,
    scale: float,
    dropout: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    dropout_position: str = "pre",
) -> torch.Tensor:
    """Eager reference, one expert at a time, in fp32 (fp64 for fp64 inputs).

    Args:
        x: [..., K] tokens sorted by expert; tokens_per_expert: E counts summing to M.
        weight: stacked [E, N, K] or a list of E [N, K]; bias: [E, N], a list of E [N], or None.
        lora_a: [r, K] or [E, r, K]; lora_b: [N, r] or [E, N, r]; scale: s = alpha / r.
        dropout: p; dropout_mask: keep mask of x's shape ('pre') or y's ('post'), None = none.

    Returns:
        y [..., N] in x's dtype.
    """
    args = check_grouped_args(x, weight, bias, lora_a, lora_b, tokens_per_expert)
    check_dropout(dropout, dropout_position)
    counts = args.counts if args.counts is not None else tokens_per_expert.tolist()
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2d = x.reshape(-1, args.k).to(ct)
    mask = None if dropout_mask is None or dropout == 0.0 else dropout_mask
    if mask is not None:
        want = _shape(x) if dropout_position == "pre" else (*x.shape[:-1], args.n)
        if _shape(mask) != want:
            raise ValueError(f"dropout_mask shape {_shape(mask)} != {want} ({dropout_position})")
        mask = mask.reshape(x2d.shape[0], -1).to(ct) / (1.0 - dropout)
    outs, start = [], 0
    for e, c in enumerate(counts):
        rows = slice(start, start + c)
        start += c
        w = args.weights[0][e] if args.stacked else args.weights[e]
        a, b = _factor(lora_a, e).to(ct), _factor(lora_b, e).to(ct)
        xe = x2d[rows]
        y = xe @ w.to(ct).t()
        if args.bias is not None:
            y = y + args.bias[e].to(ct)
        if dropout_position == "pre":
            low = ((xe if mask is None else xe * mask[rows]) @ a.t()) @ b.t()
        else:
            low = (xe @ a.t()) @ b.t()
            low = low if mask is None else low * mask[rows]
        outs.append(y + scale * low)
    y = torch.cat(outs) if outs else x2d.new_empty((0, args.n))
    return y.to(x.dtype).view(*x.shape[:-1], args.n)


def _eager_grouped(x, args: GroupedArgs, lora_a, lora_b, tokens_per_expert, *, scale, p,
                   dropout_position, seed):
    """The eager backend: the reference with a torch-RNG mask (seeded when ``seed`` is given)."""
    mask = None
    if p > 0.0:
        shape = x.shape if dropout_position == "pre" else (*x.shape[:-1], args.n)
        gen = None if seed is None else torch.Generator(device=x.device).manual_seed(int(seed))
        mask = torch.rand(shape, device=x.device, generator=gen) >= p
    weight = args.weights[0] if args.stacked else args.weights
    return grouped_lora_linear_ref(x, weight, args.bias, lora_a, lora_b, tokens_per_expert,
                                   scale=scale, dropout=p, dropout_mask=mask,
                                   dropout_position=dropout_position)


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
# Past this many bytes of dB partials, dB_e comes from the second pass over dY (rowgemm) whatever
# the traffic model says (_db_in_one_pass).
DB_PARTIALS_MAX_BYTES = 256 << 20
DB_STRATEGY = "auto"  # auto | partials | two_pass (tests force each path)


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


# ---------------------------------------------------------------------------------------------
# Host launchers (2-D activations; ``counts`` int32 [E] on the activations' device). A 2-D
# lora_a/lora_b is shared by all experts (expert stride 0, or the dense kernels over all M).
# ---------------------------------------------------------------------------------------------

_PTR_CACHE: dict[tuple, torch.Tensor] = {}


def _weight_pointers(weights: list[torch.Tensor]) -> torch.Tensor:
    """int64 [E] device array of the weights' addresses, cached by those addresses (frozen
    weights do not move), so a step copies nothing to the device. The cached tensor holds exactly
    its key, so a stale entry is never wrong; the cache is bounded."""
    key = (weights[0].device, tuple(w.data_ptr() for w in weights))
    ptrs = _PTR_CACHE.get(key)
    if ptrs is None:
        if len(_PTR_CACHE) >= 256:
            _PTR_CACHE.clear()
        ptrs = _PTR_CACHE[key] = torch.tensor(key[1], dtype=torch.int64).to(weights[0].device)
    return ptrs


def _weight_args(weights: list[torch.Tensor]):
    """(weight tensor, address array, expert stride, stride along N, stride along K, W_PTRS)."""
    w = weights[0]
    if w.dim() == 3:
        return w, w, w.stride(0), w.stride(1), w.stride(2), False
    return w, _weight_pointers(weights), 0, w.stride(0), w.stride(1), True


def launch_grouped_gemm(l2d: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None,
                        s_mat: torch.Tensor, q: torch.Tensor, counts: torch.Tensor, *,
                        forward: bool, scale: float = 1.0, seed: torch.Tensor | None = None,
                        p: float = 0.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """forward: y = x W_e^T + s S B_e^T (+ b_e) [M, N] (l2d = x, q = lora_b, 'post' seed);
    else dX = dY W_e + dS A_e (* m / (1 - p)) [M, K] (l2d = dY, q = lora_a, 'pre' seed).
    Output contiguous, in ``out_dtype`` (default l2d's); s_mat fp32 [M, r] contiguous."""
    m = l2d.shape[0]
    w, wptrs, s_we, s_n, s_k, w_ptrs = _weight_args(weights)
    n, k = w.shape[-2:]
    e = counts.numel()
    if forward:
        c, d, s_wd, s_wc, r, s_qr, s_qc = n, k, s_k, s_n, q.shape[-1], q.stride(-1), q.stride(-2)
    else:
        c, d, s_wd, s_wc, r, s_qr, s_qc = k, n, s_n, s_k, q.shape[-2], q.stride(-2), q.stride(-1)
    out = torch.empty((m, c), dtype=out_dtype or l2d.dtype, device=l2d.device)
    if m == 0:
        return out
    on, seed_arg, p_arg, keep = dropout_args(seed, p, out)
    bias = bias.contiguous() if bias is not None else None
    name = ("fwd" if forward else "dx") + ("_two_acc" if on else "")
    grid = lambda meta: ((triton.cdiv(m, meta["BLOCK_M"]) + e - 1)
                         * triton.cdiv(c, meta["BLOCK_C"]),)
    _kernel(_grouped_lora_gemm_kernel, name, l2d.device)[grid](
        l2d, w, wptrs, out if bias is None else bias, s_mat, q, out, counts, seed_arg,
        m, c, d, r, e, l2d.stride(0), l2d.stride(1), s_we, s_wd, s_wc,
        0 if bias is None else bias.stride(0), q.stride(0) if q.dim() == 3 else 0, s_qr, s_qc,
        float(scale), p_arg, keep, HAS_BIAS=bias is not None, MASKED=on, W_PTRS=w_ptrs,
        BLOCK_R=min(rank_block(r), GEMM_RANK_STEP), E_PAD=_e_pad(e),
        **launch_common(l2d.device, l2d.dtype))
    return out


def launch_grouped_shrink(x2d: torch.Tensor, lora_a: torch.Tensor, counts: torch.Tensor, *,
                          seed: torch.Tensor | None = None, p: float = 0.0) -> torch.Tensor:
    """S = x~ A_e^T for per-expert lora_a [E, r, K] -> S [M, r] fp32 ('pre' seed)."""
    m, k = x2d.shape
    e, r, _ = lora_a.shape
    s_mat = torch.empty((m, r), dtype=torch.float32, device=x2d.device)
    if m == 0:
        return s_mat
    on, seed_arg, p_arg, keep = dropout_args(seed, p, s_mat)
    block_r = rank_block(r)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) + e - 1, triton.cdiv(r, block_r))
    _kernel(_grouped_shrink_kernel, "shrink", x2d.device)[grid](
        x2d, lora_a, s_mat, counts, seed_arg, m, k, r, e, x2d.stride(0), x2d.stride(1),
        *lora_a.stride(), p_arg, keep, HAS_DROPOUT=on, BLOCK_R=block_r, E_PAD=_e_pad(e),
        **launch_common(x2d.device, x2d.dtype))
    return s_mat


def launch_grouped_rowgemm(lhs: torch.Tensor, g2d: torch.Tensor, counts: torch.Tensor,
                           out: torch.Tensor, out_strides: tuple[int, int, int], r: int, *,
                           scale: float = 1.0, seed: torch.Tensor | None = None, p: float = 0.0,
                           rowsum: bool = False) -> torch.Tensor:
    """out_e = scale * lhs_e^T g~_e per expert into ``out`` (strides ``out_strides`` = expert,
    rank, column): dA_e = dS_e^T x~_e, dB_e = s G_e^T S_e, or (``rowsum``) db_e = sum_m dY_e."""
    m, c = g2d.shape
    e = counts.numel()
    if m == 0:
        return out.zero_()
    on, seed_arg, p_arg, keep = dropout_args(seed, p, out)
    block_r = 1 if rowsum else rank_block(r)
    grid = lambda meta: (e, triton.cdiv(c, meta["BLOCK_C"]), triton.cdiv(r, block_r))
    _kernel(_grouped_rowgemm_kernel, "rowgemm", g2d.device)[grid](
        lhs, g2d, out, counts, seed_arg, c, r, e, g2d.stride(0), g2d.stride(1), *out_strides,
        float(scale * keep), p_arg, MASKED=on, ROWSUM=rowsum, BLOCK_R=block_r, E_PAD=_e_pad(e),
        **launch_common(g2d.device, g2d.dtype))
    return out


def _db_in_one_pass(tiles: int, m: int, n: int, r: int, elt: int) -> bool:
    """Partials (written and read once, fp32: 8 * tiles * N * r bytes) beat a second read of dY
    (M * N * elt bytes) when r is small against the row tile: at r=16, 128-row tiles, bf16 they
    cost half a dY read; at r=64 twice one."""
    if DB_STRATEGY != "auto":
        return DB_STRATEGY == "partials"
    return tiles * n * r * 4 <= DB_PARTIALS_MAX_BYTES and 8 * tiles * r <= m * elt


def launch_grouped_dsdb(dy2d: torch.Tensor, lora_b: torch.Tensor, s_mat: torch.Tensor,
                        counts: torch.Tensor, scale: float, *, seed: torch.Tensor | None = None,
                        p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s G B_e [M, r] fp32 and dB [E, N, r] (lora_b's dtype, contiguous) for per-expert
    lora_b, G = dY (* m / (1 - p) with the 'post' seed); dy2d may be expanded (stride 0)."""
    m, n = dy2d.shape
    e, _, r = lora_b.shape
    ds = torch.empty((m, r), dtype=torch.float32, device=dy2d.device)
    db = torch.empty((e, n, r), dtype=lora_b.dtype, device=dy2d.device)
    if m == 0:
        return ds, db.zero_()
    arch = current_arch(dy2d.device)
    block_m, block_r = DSDB_BLOCK_M[arch], rank_block(r)
    tiles = triton.cdiv(m, block_m) + e - 1
    one_pass = _db_in_one_pass(tiles, m, n, r, dy2d.element_size())
    on, seed_arg, p_arg, keep = dropout_args(seed, p, ds)
    partial = torch.empty((tiles, n, r) if one_pass else (1,), dtype=torch.float32,
                          device=dy2d.device)
    _kernel(_grouped_dsdb_kernel, "dsdb", dy2d.device)[(tiles, triton.cdiv(r, block_r))](
        dy2d, lora_b, s_mat, ds, partial, counts, seed_arg, m, n, r, e,
        dy2d.stride(0), dy2d.stride(1), *lora_b.stride(), float(scale), p_arg, keep,
        POST_DROPOUT=on, WRITE_DB=one_pass, BLOCK_M=block_m, BLOCK_R=block_r, E_PAD=_e_pad(e),
        **launch_common(dy2d.device, dy2d.dtype))
    if one_pass:
        _grouped_db_reduce_kernel[(e, triton.cdiv(n * r, REDUCE_BLOCK))](
            partial, db, counts, n * r, e, TILE_M=block_m, BLOCK=REDUCE_BLOCK, E_PAD=_e_pad(e),
            num_warps=4)
    else:  # dB_e[c, j] = s sum_m G[m, c] S[m, j]: the rank is the row of the transposed store
        launch_grouped_rowgemm(s_mat, dy2d, counts, db, (n * r, 1, r), r, scale=scale,
                               seed=seed, p=p)
    return ds, db


# ---------------------------------------------------------------------------------------------
# Registered ops (custom_op + register_fake + register_autograd; see DESIGN.md). ``weight`` is
# [stacked [E, N, K]] or the E per-expert [N, K] tensors; ``counts`` int32 [E] on x's device.
# Saved for backward: x, S, the seed and the counts (plus references to the parameters).
# ---------------------------------------------------------------------------------------------

_FWD_SCHEMA = ("(Tensor x, Tensor[] weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
               "Tensor counts, Tensor? seed, float scale, float p, bool post) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dy, Tensor x, Tensor[] weight, Tensor lora_a, Tensor lora_b, "
               "Tensor counts, Tensor s_mat, Tensor? seed, float scale, float p, bool post, "
               "bool need_dx, bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)")


def _misaligned(weights: Sequence[torch.Tensor]) -> list[int]:
    """Per-expert weights whose address is not 16-byte aligned (the kernel assumes it)."""
    return [i for i, w in enumerate(weights) if w.dim() == 2 and w.data_ptr() % 16]


@torch.library.custom_op("bridge::grouped_lora_linear_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _grouped_fwd_op(x, weight, bias, lora_a, lora_b, counts, seed, scale, p, post):
    """(y [M, N], S [M, r] fp32) for x [M, K] sorted by expert."""
    if _misaligned(weight):
        raise ValueError(f"grouped_lora_linear: weight{_misaligned(weight)} not 16-byte aligned "
                         "(views into a larger buffer?); pass aligned tensors or a stacked one")
    pre_seed, post_seed = (None, seed) if post else (seed, None)
    if lora_a.dim() == 2:  # shared A: the dense shrink over all rows
        s_mat = launch_shrink(x, lora_a, seed=pre_seed, p=p)
    else:
        s_mat = launch_grouped_shrink(x, lora_a, counts, seed=pre_seed, p=p)
    y = launch_grouped_gemm(x, list(weight), bias, s_mat, lora_b, counts, forward=True,
                            scale=scale, seed=post_seed, p=p)
    return y, s_mat


@_grouped_fwd_op.register_fake
def _(x, weight, bias, lora_a, lora_b, counts, seed, scale, p, post):
    return (x.new_empty((x.shape[0], weight[0].shape[-2])),
            x.new_empty((x.shape[0], lora_a.shape[-2]), dtype=torch.float32))


@torch.library.custom_op("bridge::grouped_lora_linear_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _grouped_bwd_op(dy, x, weight, lora_a, lora_b, counts, s_mat, seed, scale, p, post, need_dx,
                    need_dbias):
    """(dX [M, K] or empty, dA like lora_a, dB like lora_b, db [E, N] or empty)."""
    pre_seed, post_seed = (None, seed) if post else (seed, None)
    e, (n, k), r = counts.numel(), weight[0].shape[-2:], lora_a.shape[-2]
    if lora_b.dim() == 2:  # shared B: dS and dB over all rows (dB sums every expert's tokens)
        ds, db = launch_dsdb(dy, lora_b, s_mat, scale, seed=post_seed, p=p)
    else:
        ds, db = launch_grouped_dsdb(dy, lora_b, s_mat, counts, scale, seed=post_seed, p=p)
    dx = x.new_empty(0)
    if need_dx:
        dx = launch_grouped_gemm(dy, list(weight), None, ds, lora_a, counts, forward=False,
                                 seed=pre_seed, p=p, out_dtype=x.dtype)
    if lora_a.dim() == 2:
        da = launch_da(ds, x, seed=pre_seed, p=p, out_dtype=lora_a.dtype)
    else:
        da = torch.empty((e, r, k), dtype=lora_a.dtype, device=x.device)
        launch_grouped_rowgemm(ds, x, counts, da, (r * k, k, 1), r, seed=pre_seed, p=p)
    dbias = dy.new_empty(0)
    if need_dbias:
        dbias = torch.empty((e, n), dtype=x.dtype, device=x.device)
        launch_grouped_rowgemm(dy, dy, counts, dbias, (n, n, 1), 1, rowsum=True)
    return dx, da, db, dbias


@_grouped_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, counts, s_mat, seed, scale, p, post, need_dx, need_dbias):
    e, n = counts.shape[0], weight[0].shape[-2]
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0), lora_a.new_empty(lora_a.shape),
            lora_b.new_empty(lora_b.shape), x.new_empty((e, n)) if need_dbias else x.new_empty(0))


def _grouped_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, counts, seed, scale, p, post = inputs
    ctx.save_for_backward(x, lora_a, lora_b, counts, output[1], seed, *weight)
    ctx.scale, ctx.p, ctx.post, ctx.has_bias = scale, p, post, bias is not None
    ctx.n_weights = len(weight)
    ctx.mark_non_differentiable(output[1])


def _grouped_backward(ctx, dy, _ds_unused):
    x, lora_a, lora_b, counts, s_mat, seed, *weight = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dbias = ctx.has_bias and ctx.needs_input_grad[2]
    dx, da, db, dbias = torch.ops.bridge.grouped_lora_linear_bwd(
        dy, x, weight, lora_a, lora_b, counts, s_mat, seed, ctx.scale, ctx.p, ctx.post, need_dx,
        need_dbias)
    return (dx if need_dx else None, [None] * ctx.n_weights, dbias if need_dbias else None, da,
            db, None, None, None, None, None)


torch.library.register_autograd("bridge::grouped_lora_linear_fwd", _grouped_backward,
                                setup_context=_grouped_setup_context)


# ---------------------------------------------------------------------------------------------
# The functional op
# ---------------------------------------------------------------------------------------------


def _counts_tensor(tokens_per_expert, device: torch.device) -> torch.Tensor:
    """int32 [E] on ``device``: what the kernels' schedule reads."""
    if isinstance(tokens_per_expert, torch.Tensor):
        return tokens_per_expert.to(device=device, dtype=torch.int32)
    return torch.tensor(list(tokens_per_expert), dtype=torch.int32, device=device)


def grouped_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | Sequence[torch.Tensor],
    bias: torch.Tensor | Sequence[torch.Tensor] | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    tokens_per_expert: Sequence[int] | torch.Tensor,
    *,
    scale: float,
    dropout: float = 0.0,
    dropout_position: str = "pre",
    training: bool = True,
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y_e = x_e W_e^T (+ b_e) + s * B_e(A_e(dropout(x_e))) for tokens sorted by expert.

    Args:
        x: [..., K] tokens sorted by expert (fp32/bf16/fp16; fp64 runs eager).
        weight: frozen stacked [E, N, K], or a list of E [N, K] tensors (TE's ``weight{i}``,
            read in place through a device array of their addresses).
        bias: [E, N], a list of E [N], or None.
        lora_a: [r, K] (shared) or [E, r, K]; lora_b: [N, r] (shared) or [E, N, r].
        tokens_per_expert: E counts summing to M. A list/tuple (Megatron's m_splits) is checked
            on the host and copied to the device once per call; a device tensor is used as is
            (checked by a device-side assertion: no host sync). Prefer a tensor under
            torch.compile (a list of ints is specialised on its values) and CUDA-graph capture
            (a list is copied to the device each call; the address array of separate weights
            is built on the first call and cached, so capture after a warm-up step).
        scale: s = alpha / r. dropout, dropout_position: p and 'pre' | 'post'; off when not
            ``training``. seed: int for a reproducible mask; None draws one from torch's RNG.
        backend: auto | triton | eager (kernels/backend.py chooses; there is no CUDA C++ twin).

    Returns:
        y [..., N] in x's dtype.
    """
    args = check_grouped_args(x, weight, bias, lora_a, lora_b, tokens_per_expert)
    check_dropout(dropout, dropout_position)
    constraints = [
        (not any(w.requires_grad for w in args.weights),
         "base weight requires grad (the fused path is for frozen experts)"),
        (args.n_experts <= MAX_EXPERTS, f"{args.n_experts} experts > {MAX_EXPERTS}"),
    ]
    if not torch.compiler.is_compiling():  # addresses are not traceable; the op checks them too
        bad = _misaligned(args.weights)
        constraints.append((not bad, f"weight{bad} not 16-byte aligned"))
    choice = resolve_backend(backend, "grouped_lora_linear", device=x.device, dtype=x.dtype,
                             constraints=constraints)
    p = float(dropout) if training else 0.0
    if choice.name == "eager":
        return _eager_grouped(x, args, lora_a, lora_b, tokens_per_expert, scale=scale, p=p,
                              dropout_position=dropout_position, seed=seed)
    seed_t = None
    if p > 0.0:
        seed_t = draw_seed(x.device) if seed is None else seed_tensor(seed, x.device)
    y, _ = torch.ops.bridge.grouped_lora_linear_fwd(
        x.reshape(-1, args.k), args.weights, args.bias, lora_a, lora_b,
        _counts_tensor(tokens_per_expert, x.device), seed_t, float(scale), p,
        dropout_position == "post")
    return y.view(*x.shape[:-1], args.n)


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
