"""The Triton kernels of the fused multi-adapter LoRA op (kernels/multi_lora_linear.py holds its
argument checks, reference, eager backend, registered ops and functional op): the kernels, their
configurations per architecture, the host launchers and the AOT specs.

Three kernels, each used twice with roles swapped (see kernels/multi_lora_linear.py for the
arithmetic): project (the shrink S = x~ A^T and dS = s G B), gemm (the frozen GEMM over all rows
with the per-slot low-rank term in its accumulator: y, and dX) and wgrad (dA, dB per slot). The
launchers take 2-D inputs, the slot table on the device (offsets int32 [n+1], ranks int32 [n],
scales fp32 [n]) and the seed as an int64 tensor [1] or None. ``_launch_project`` and
``_launch_gemm`` are separate calls on purpose: a tensor-parallel layout that needs a collective
between the shrink and the GEMM can issue it between them.
"""

from __future__ import annotations

import torch
from bridge.kernels._gemm import _grouped_tile
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
from bridge.kernels.philox import keep_mask

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _slot_table_load(offsets_ptr, ranks_ptr, n_slots, BLOCK_S: tl.constexpr):
        """The whole slot table as [BLOCK_S] vectors (one load each): lane ids, start rows, end
        rows (past the last slot: INT32_MAX, so no row counts as beyond it) and ranks."""
        sv = tl.arange(0, BLOCK_S)
        ok = sv < n_slots
        starts = tl.load(offsets_ptr + sv, mask=ok, other=0)
        ends = tl.load(offsets_ptr + sv + 1, mask=ok, other=2147483647)
        ranks = tl.load(ranks_ptr + sv, mask=ok, other=0)
        return sv, starts, ends, ranks

    @triton.jit
    def _slot_of(ends, row):
        """Slot owning ``row``: the number of slots that end at or before it (rows are grouped by
        slot, so this skips empty slots too)."""
        return tl.sum((ends <= row).to(tl.int32), axis=0)

    @triton.jit
    def _pick(vec, sv, s):
        """Entry ``s`` of a slot-table vector (a masked sum: exact, one lane is non-zero)."""
        return tl.sum(tl.where(sv == s, vec, tl.zeros_like(vec)), axis=0)

    @triton.jit
    def _factor_tile(ptrs, other_ok, rr, rank, R, RANK_CONTIG: tl.constexpr,
                     INTERPRET: tl.constexpr):
        """A tile of a slot's A or B, zero at ranks >= ``rank`` (the padding never reaches a
        dot). Along a contiguous rank (B [n, N, r_max]) the load covers all R lanes, so it stays
        a vector load (a mask at a runtime rank would split it into scalar loads), and the
        padding is replaced by zeros after the load; otherwise (A) the load is masked by rank."""
        if RANK_CONTIG:
            f = load_f32(ptrs, other_ok & (rr < R), INTERPRET)
            return tl.where(rr < rank, f, tl.zeros_like(f))
        else:
            return load_f32(ptrs, other_ok & (rr < rank), INTERPRET)

    @triton.jit
    def _multi_lora_project_kernel(
        in_ptr,  # [M, C] rows to project (strided): x (shrink) or dY (dS)
        f_ptr,  # per-slot factor read as [n_slots, R, C] (strided): A (shrink) or B (dS)
        out_ptr,  # [M, R] fp32 output, contiguous: S or dS (0 beyond the row's slot rank)
        offsets_ptr,  # int32 [n_slots + 1]: slot j owns rows offsets[j] .. offsets[j+1] - 1
        ranks_ptr,  # int32 [n_slots]: slot ranks (<= R); factor rows beyond are never used
        scales_ptr,  # fp32 [n_slots]: alpha / rank per slot (read only when SLOT_SCALE)
        seed_ptr,  # int64 [1] dropout seed (read only when IN_MASK)
        M, C, R, n_slots,  # sizes (R = r_max); all runtime: a new rank or split never recompiles
        stride_im, stride_ic,  # input strides (stride 0 for an expanded dY)
        stride_fs, stride_fr, stride_fc,  # factor strides: slot, rank, C
        p,  # fp32 dropout probability (IN_MASK only)
        factor,  # fp32 factor of every row: 1 / (1 - p) with a mask, else 1
        IN_MASK: tl.constexpr,  # in~ = in * m (mask of the logical [M, C] input)
        SLOT_SCALE: tl.constexpr,  # rows also scaled by their slot's alpha / rank (dS)
        RANK_CONTIG: tl.constexpr,  # F is contiguous along the rank (B): see _factor_tile
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr,  # rows per program
        BLOCK_C: tl.constexpr,  # reduction step
        BLOCK_R: tl.constexpr,  # rank tile (a grid dimension; rank bucket of r_max)
        BLOCK_S: tl.constexpr,  # slot-table lanes (power of two >= n_slots)
    ):
        """P[m, j] = f_slot(m) * sum_c in~[m, c] F[slot(m), j, c] for j < rank_slot(m), else 0:
        grid (M tiles, R tiles); one reduction loop per slot present in the row tile."""
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rc0 = tl.arange(0, BLOCK_C)
        sv, starts, ends, ranks = _slot_table_load(offsets_ptr, ranks_ptr, n_slots, BLOCK_S)
        if SLOT_SCALE:
            scales = tl.load(scales_ptr + sv, mask=sv < n_slots, other=0.0)
        if IN_MASK:
            seed = tl.load(seed_ptr)
        first = pid_m * BLOCK_M
        last = tl.minimum(first + BLOCK_M, M) - 1
        in_rows = in_ptr + rm.to(tl.int64)[:, None] * stride_im
        row_f = tl.zeros((BLOCK_M,), dtype=tl.float32) + factor
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in range(_slot_of(ends, first), _slot_of(ends, last) + 1):
            start = _pick(starts, sv, s)
            end = _pick(ends, sv, s)
            rank = _pick(ranks, sv, s)
            in_s = (rm >= start) & (rm < end)
            if SLOT_SCALE:
                row_f = tl.where(in_s, factor * _pick(scales, sv, s), row_f)
            f_rows = f_ptr + tl.cast(s, tl.int64) * stride_fs + rr.to(tl.int64)[None, :] * stride_fr
            # no reduction for an empty slot or a rank tile past this slot's rank
            c_end = tl.where((end > start) & (pid_r * BLOCK_R < rank), C, 0)
            for c0 in range(0, c_end, BLOCK_C):
                rc = c0 + rc0
                c_ok = rc < C
                v = load_f32(in_rows + rc[None, :] * stride_ic, in_s[:, None] & c_ok[None, :],
                             INTERPRET)
                if IN_MASK:  # zeroing is exact; 1/(1-p) is applied once, in fp32, at the end
                    v = tl.where(keep_mask(seed, rm, rc, C, p), v, tl.zeros_like(v))
                f = _factor_tile(f_rows + rc[:, None] * stride_fc, c_ok[:, None], rr[None, :],
                                 rank, R, RANK_CONTIG, INTERPRET)
                acc = tl.dot(v, f, acc, input_precision=PRECISION)
        acc = acc * row_f[:, None]
        out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :]
        tl.store(out_ptrs, acc, mask=(rm < M)[:, None] & (rr < R)[None, :])

    @triton.jit
    def _multi_lora_gemm_kernel(
        a_ptr,  # [M, K] left operand (strided): x (forward) or dY (dX)
        w_ptr,  # frozen weight read as [K, N]: element (k, n) at k * stride_wk + n * stride_wn
        bias_ptr,  # [N] bias (read only when HAS_BIAS)
        l_ptr,  # [M, R] fp32 low-rank rows, contiguous: S (forward) or dS (dX)
        f_ptr,  # per-slot low-rank factor read as [n_slots, R, N] (strided): B (fwd) or A (dX)
        out_ptr,  # [M, N] output, contiguous
        offsets_ptr,  # int32 [n_slots + 1]: slot j owns rows offsets[j] .. offsets[j+1] - 1
        ranks_ptr,  # int32 [n_slots]: slot ranks (<= R); rank steps stop at the slot's rank
        scales_ptr,  # fp32 [n_slots]: alpha / rank per slot (read only when SLOT_SCALE)
        seed_ptr,  # int64 [1] dropout seed (read only when LOW_MASK)
        M, N, K, R, n_slots,  # GEMM sizes (K = 0: no frozen GEMM, the cuBLAS strategy's input)
        stride_am, stride_ak,  # left operand strides (stride 0 for an expanded dY)
        stride_wk, stride_wn,  # weight strides in the [K, N] reading
        stride_fs, stride_fr, stride_fn,  # factor strides: slot, rank, N
        p,  # fp32 dropout probability (LOW_MASK only)
        keep_scale,  # fp32 1 / (1 - p)
        HAS_BIAS: tl.constexpr,  # add the bias in the epilogue
        SLOT_SCALE: tl.constexpr,  # scale L's rows by their slot's alpha / rank (forward)
        LOW_MASK: tl.constexpr,  # mask the [M, N] low-rank term ('post' fwd, 'pre' dX): 2nd acc
        RANK_CONTIG: tl.constexpr,  # F is contiguous along the rank (B): see _factor_tile
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # output/K tiles
        BLOCK_R: tl.constexpr,  # rank step of the low-rank term
        GROUP_M: tl.constexpr,  # row tiles per L2 group
        BLOCK_S: tl.constexpr,  # slot-table lanes (power of two >= n_slots)
    ):
        """out = a W' + sum over the slots j in the row tile of (s_j L_j) F_j (+ b): one fp32
        accumulator over [a | s L] @ [W' | F]^T, L_j the tile's rows of slot j (others masked),
        or out = a W' + (L F) * m / (1 - p) with a second accumulator (LOW_MASK). Written once."""
        pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        rk0 = tl.arange(0, BLOCK_K)
        rr0 = tl.arange(0, BLOCK_R)
        # the slot table is loaded before the main loop so its latency hides behind it
        sv, starts, ends, ranks = _slot_table_load(offsets_ptr, ranks_ptr, n_slots, BLOCK_S)
        if SLOT_SCALE:
            scales = tl.load(scales_ptr + sv, mask=sv < n_slots, other=0.0)
        a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
        w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            k_ok = rk < K
            a = load_f32(a_rows + rk[None, :] * stride_ak, m_ok[:, None] & k_ok[None, :],
                         INTERPRET)
            w = load_f32(w_cols + rk.to(tl.int64)[:, None] * stride_wk,
                         k_ok[:, None] & n_ok[None, :], INTERPRET)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        # the low-rank term: a few more reduction steps per slot present in this row tile
        op_dtype = f_ptr.dtype.element_ty
        if LOW_MASK:
            low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            low = acc  # straight into the GEMM's accumulator
        l_rows = l_ptr + rm.to(tl.int64)[:, None] * R
        first = pid_m * BLOCK_M
        last = tl.minimum(first + BLOCK_M, M) - 1
        for s in range(_slot_of(ends, first), _slot_of(ends, last) + 1):
            start = _pick(starts, sv, s)
            end = _pick(ends, sv, s)
            rank = _pick(ranks, sv, s)
            in_s = (rm >= start) & (rm < end)
            f_cols = f_ptr + tl.cast(s, tl.int64) * stride_fs + rn.to(tl.int64)[None, :] * stride_fn
            for r0 in range(0, tl.where(end > start, rank, 0), BLOCK_R):
                rr = r0 + rr0
                # L is 0 past each row's rank (the project kernel writes it so): masking by R
                # keeps the row vector loads
                lo = tl.load(l_rows + rr[None, :], mask=in_s[:, None] & (rr < R)[None, :],
                             other=0.0)
                if SLOT_SCALE:  # s applied in fp32 before the operand cast, never folded into B
                    lo = lo * _pick(scales, sv, s)
                f = _factor_tile(f_cols + rr[:, None] * stride_fr, n_ok[None, :], rr[:, None],
                                 rank, R, RANK_CONTIG, INTERPRET)
                low = tl.dot(dot_operand(lo, op_dtype, INTERPRET), f, low,
                             input_precision=PRECISION)
        if LOW_MASK:
            keep = keep_mask(tl.load(seed_ptr), rm, rn, N, p)
            acc += tl.where(keep, low * keep_scale, 0.0)
        else:
            acc = low
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _multi_lora_wgrad_kernel(
        l_ptr,  # [M, R] fp32 rows, contiguous: dS (dA) or S (dB)
        c_ptr,  # [M, C] rows (strided): x (dA) or dY (dB; stride 0 when expanded)
        out_ptr,  # fp32 partials read as [split, n_slots, R, C] through the strides below
        offsets_ptr,  # int32 [n_slots + 1]: slot j owns rows offsets[j] .. offsets[j+1] - 1
        ranks_ptr,  # int32 [n_slots]: slot ranks; output rows past a slot's rank are 0
        scales_ptr,  # fp32 [n_slots]: alpha / rank per slot (read only when SLOT_SCALE)
        seed_ptr,  # int64 [1] dropout seed (read only when C_MASK)
        M, C, R, n_slots, split,  # sizes; split: row chunks per slot (one program each)
        stride_cm, stride_cc,  # C-operand strides
        stride_op, stride_os, stride_or, stride_oc,  # output strides: chunk, slot, rank, C
        p,  # fp32 dropout probability (C_MASK only)
        factor,  # fp32 factor: 1 / (1 - p) with a mask, else 1
        C_MASK: tl.constexpr,  # C~ = C * m (mask of the logical [M, C] tensor)
        SLOT_SCALE: tl.constexpr,  # also scale by the slot's alpha / rank (dB)
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_C: tl.constexpr,  # output columns per program
        BLOCK_M: tl.constexpr,  # reduction step over the chunk's rows
        BLOCK_R: tl.constexpr,  # output rank rows per program
    ):
        """out[chunk, j, r, c] = f_j * sum over the chunk's rows m of slot j of
        L[m, r] C~[m, c] (r < rank_j, else 0): grid (C tiles, R tiles, n_slots * split)."""
        pid_c = tl.program_id(0)
        pid_r = tl.program_id(1)
        pid_z = tl.program_id(2)
        s = pid_z // split
        chunk = pid_z % split
        start = tl.load(offsets_ptr + s)
        end = tl.load(offsets_ptr + s + 1)
        rank = tl.load(ranks_ptr + s)
        per = tl.cdiv(end - start, split)
        lo = tl.minimum(start + chunk * per, end)
        hi = tl.minimum(lo + per, end)
        rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rm0 = tl.arange(0, BLOCK_M)
        c_ok = rc < C
        if C_MASK:
            seed = tl.load(seed_ptr)
        op_dtype = c_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for m0 in range(lo, tl.where(pid_r * BLOCK_R < rank, hi, lo), BLOCK_M):
            rm = m0 + rm0
            m_ok = rm < hi
            # L is 0 past the slot's rank (written so): masking by R keeps vector loads
            lt = tl.load(l_ptr + rm.to(tl.int64)[None, :] * R + rr[:, None],
                         mask=(rr < R)[:, None] & m_ok[None, :], other=0.0)
            cv = load_f32(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rc[None, :] * stride_cc,
                          m_ok[:, None] & c_ok[None, :], INTERPRET)
            if C_MASK:
                cv = tl.where(keep_mask(seed, rm, rc, C, p), cv, tl.zeros_like(cv))
            acc = tl.dot(dot_operand(lt, op_dtype, INTERPRET), cv, acc, input_precision=PRECISION)
        f = factor
        if SLOT_SCALE:
            f = factor * tl.load(scales_ptr + s)
        out_ptrs = (out_ptr + chunk.to(tl.int64) * stride_op + s.to(tl.int64) * stride_os
                    + rr.to(tl.int64)[:, None] * stride_or + rc[None, :] * stride_oc)
        tl.store(out_ptrs, acc * f, mask=(rr < R)[:, None] & c_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configurations, one named list per architecture and kernel role, autotuned per (C or
# N/K, rank bucket), never per M or per slot split. GEMM tiles in GEMM letters (out [M, N] =
# a [M, K] @ W' [K, N]) for the forward and for dX alike. Rank tiles come from the rank bucket.
# ---------------------------------------------------------------------------------------------


def _configs_sm80() -> dict[str, list]:
    """A100 (sm_80, 164 KB smem/SM, mma.sync); the dense op's lists (kernels/_gemm.py,
    _lowrank.py), kept where they compile without spills here too (kernels/aot.py)."""
    return {
        # spilled, so left out: 4-warp 64x64 and (triton 3.6) 8-warp 128x128 shrink tiles,
        # 8-warp 64x64 and 128x128 dS tiles: the slot loop's state rides on the dense op's tiles
        "shrink": [cfg(8, 3, BLOCK_M=64, BLOCK_C=64), cfg(8, 3, BLOCK_M=128, BLOCK_C=64)],
        "ds": [cfg(4, 3, BLOCK_M=64, BLOCK_C=64), cfg(8, 3, BLOCK_M=128, BLOCK_C=64)],
        # 4-warp 128x128 (the dense op's first tile) spilled with the slot loop: 8 warps here
        "fwd": [cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
                cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
                cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
                cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)],
        "fwd_mask": [cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
                     cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)],
        "dx": [cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
               cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
               cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)],
        "dx_mask": [cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
                    cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)],
        "wgrad": [cfg(4, 3, BLOCK_C=64, BLOCK_M=64), cfg(8, 3, BLOCK_C=128, BLOCK_M=64)],
    }


def _configs_sm90() -> dict[str, list]:
    """H100 (sm_90a, 228 KB smem/SM, wgmma): deeper pipelines, 64-wide K steps; the 128x256
    tile for dX only (the forward's spilled 8 bytes at 255 registers under triton 3.6)."""
    gemm = [cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
            cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)]
    mask = [cfg(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)]
    project = [cfg(4, 4, BLOCK_M=64, BLOCK_C=64), cfg(8, 4, BLOCK_M=128, BLOCK_C=64)]
    return {
        "shrink": project, "ds": project, "fwd": gemm, "fwd_mask": mask,
        "dx": [cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), *gemm],
        "dx_mask": mask,
        "wgrad": [cfg(4, 4, BLOCK_C=64, BLOCK_M=64), cfg(8, 4, BLOCK_C=128, BLOCK_M=64),
                  cfg(8, 4, BLOCK_C=128, BLOCK_M=128)],
    }


def _configs_interpret() -> dict[str, list]:
    """CPU interpreter: one big-block config per kernel (fewer, larger programs are faster)."""
    gemm = [cfg(4, 1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)]
    project = [cfg(4, 1, BLOCK_M=64, BLOCK_C=64)]
    return {"shrink": project, "ds": project, "fwd": gemm, "fwd_mask": gemm,
            "dx": gemm, "dx_mask": gemm, "wgrad": [cfg(4, 1, BLOCK_C=64, BLOCK_M=64)]}


_CONFIGS = {"sm80": _configs_sm80, "sm90": _configs_sm90, "interpret": _configs_interpret}
_KEYS = {"shrink": ("C", "R"), "ds": ("C", "R"), "wgrad": ("C", "R")}


def configs(arch: str, name: str) -> list:
    """Config list of kernel role ``name`` for ``arch`` (sm80 | sm90 | interpret)."""
    return _CONFIGS[arch]()[name]


def _kernel(kernel, name: str, device: torch.device):
    return autotuned(kernel, current_arch(device), name, configs, _KEYS.get(name, ("N", "K", "R")))


# dA/dB reduce over a slot's rows inside one program; a slot's rows are split into chunks (one
# program each, fp32 partials added in order) until the grid fills the GPU: at M = 8192,
# K = 4096, one slot, a 128-column tile gives 32 programs, 8 chunks 256.
WGRAD_MIN_ROWS = 1024  # rows per chunk at least, so the partials stay a small share of traffic
WGRAD_MAX_SPLIT = 8


def _slot_block(n_slots: int) -> int:
    return max(2, triton_next_pow2(n_slots))


# ---------------------------------------------------------------------------------------------
# Host launchers (2-D in; ``seed`` an int64 tensor [1] or None; the slot table on the device)
# ---------------------------------------------------------------------------------------------


def _launch_project(inp, fac, fac_strides, r_max, offsets, ranks, scales, *, slot_scale, seed,
                    p, role) -> torch.Tensor:
    """fp32 [M, r_max] = (slot scale) * inp~ F_slot^T, F read as [n, r_max, C] by fac_strides."""
    m, c = inp.shape
    out = torch.empty((m, r_max), dtype=torch.float32, device=inp.device)
    if m == 0:
        return out
    on, seed_arg, p_arg, keep = dropout_args(seed, p, out)
    block_r = rank_block(r_max)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r_max, block_r))
    _kernel(_multi_lora_project_kernel, role, inp.device)[grid](
        inp, fac, out, offsets, ranks, scales, seed_arg, m, c, r_max, ranks.numel(),
        inp.stride(0), inp.stride(1), *fac_strides, p_arg, keep, IN_MASK=on,
        SLOT_SCALE=slot_scale, RANK_CONTIG=fac_strides[1] == 1, BLOCK_R=block_r,
        BLOCK_S=_slot_block(ranks.numel()), **launch_common(inp.device, inp.dtype))
    return out


def _launch_gemm(a2d, weight, w_strides, l_mat, fac, fac_strides, n_out, bias, offsets, ranks,
                 scales, *, slot_scale, seed, p, out_dtype, role, main=True) -> torch.Tensor:
    """[M, n_out] = a2d W' (skipped when not ``main``) + per-slot L F (+ bias), W' read as
    [K, n_out] by w_strides and F as [n, r_max, n_out] by fac_strides."""
    m, k = a2d.shape
    r_max = l_mat.shape[1]
    out = torch.empty((m, n_out), dtype=out_dtype, device=a2d.device)
    if m == 0:
        return out
    on, seed_arg, p_arg, keep = dropout_args(seed, p, out)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)
    _kernel(_multi_lora_gemm_kernel, role + ("_mask" if on else ""), a2d.device)[grid](
        a2d, weight, bias.contiguous() if bias is not None else out, l_mat.contiguous(), fac,
        out, offsets, ranks, scales,
        seed_arg, m, n_out, k if main else 0, r_max, ranks.numel(), a2d.stride(0),
        a2d.stride(1), *w_strides, *fac_strides, p_arg, keep, HAS_BIAS=bias is not None,
        SLOT_SCALE=slot_scale, LOW_MASK=on, RANK_CONTIG=fac_strides[1] == 1,
        BLOCK_R=min(rank_block(r_max), GEMM_RANK_STEP), BLOCK_S=_slot_block(ranks.numel()),
        **launch_common(a2d.device, a2d.dtype))
    return out


def _launch_wgrad(l_mat, c2d, offsets, ranks, scales, *, slot_scale, seed, p, out_dtype,
                  rank_major) -> torch.Tensor:
    """Per slot f_j L_j^T C~_j: [n, r_max, C] (``rank_major``, dA) or [n, C, r_max] (dB)."""
    m, c = c2d.shape
    r_max, n_slots = l_mat.shape[1], ranks.numel()
    shape = (n_slots, r_max, c) if rank_major else (n_slots, c, r_max)
    if m == 0:
        return torch.zeros(shape, dtype=out_dtype, device=c2d.device)
    split = max(1, min(WGRAD_MAX_SPLIT, m // (n_slots * WGRAD_MIN_ROWS)))
    part = torch.empty((split, *shape), dtype=torch.float32, device=c2d.device)
    st_r, st_c = (part.stride(2), part.stride(3)) if rank_major else (part.stride(3),
                                                                       part.stride(2))
    on, seed_arg, p_arg, keep = dropout_args(seed, p, part)
    block_r = rank_block(r_max)
    grid = lambda meta: (triton.cdiv(c, meta["BLOCK_C"]), triton.cdiv(r_max, block_r),
                         n_slots * split)
    _kernel(_multi_lora_wgrad_kernel, "wgrad", c2d.device)[grid](
        l_mat, c2d, part, offsets, ranks, scales, seed_arg, m, c, r_max, n_slots, split,
        c2d.stride(0), c2d.stride(1), part.stride(0), part.stride(1), st_r, st_c, p_arg, keep,
        C_MASK=on, SLOT_SCALE=slot_scale, BLOCK_R=block_r,
        **launch_common(c2d.device, c2d.dtype))
    return (part[0] if split == 1 else part.sum(0)).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs (kernels/aot.py): bf16, the specialisation a launch at M = 8192,
# K = N = 4096, r_max = 64 (largest rank tile), 8 slots makes; dropout on (the most work).
# ---------------------------------------------------------------------------------------------


def aot_specs() -> list[dict]:
    """One dict per (kernel, variant): kernel, variant, configs (a name for ``configs``), sig
    (argument -> Triton type, or an int passed as is), fixed constexprs, uses_dot, gemm,
    dropout_tile."""
    dt, f32, i32, i32p, i64p, f32p = "*bf16", "fp32", "i32", "*i32", "*i64", "*fp32"
    table = {"offsets_ptr": i32p, "ranks_ptr": i32p, "scales_ptr": f32p, "seed_ptr": i64p,
             "n_slots": 8}
    common = {"INTERPRET": False, "PRECISION": "ieee", "BLOCK_S": _slot_block(8)}
    proj = {**table, "in_ptr": dt, "f_ptr": dt, "out_ptr": f32p, "M": i32, "C": i32, "R": i32,
            "stride_im": i32, "stride_ic": 1, "stride_fs": i32, "p": f32, "factor": f32}
    gemm = {**table, "a_ptr": dt, "w_ptr": dt, "bias_ptr": dt, "l_ptr": f32p, "f_ptr": dt,
            "out_ptr": dt, "M": i32, "N": i32, "K": i32, "R": i32, "stride_am": i32,
            "stride_ak": 1, "stride_fs": i32, "p": f32, "keep_scale": f32}
    wgrad = {**table, "l_ptr": f32p, "c_ptr": dt, "out_ptr": f32p, "M": i32, "C": i32, "R": i32,
             "split": 8, "stride_cm": i32, "stride_cc": 1, "stride_op": i32, "stride_os": i32,
             "p": f32, "factor": f32}
    fwd_w = {"stride_wk": 1, "stride_wn": i32, "stride_fr": 1, "stride_fn": i32}  # W, B rows
    dx_w = {"stride_wk": i32, "stride_wn": 1, "stride_fr": i32, "stride_fn": 1}  # W, A rows
    g_fixed = {**common, "BLOCK_R": GEMM_RANK_STEP, "HAS_BIAS": False}
    fwd_fixed = {**g_fixed, "HAS_BIAS": True, "SLOT_SCALE": True, "RANK_CONTIG": True}
    dx_fixed = {**g_fixed, "SLOT_SCALE": False, "RANK_CONTIG": False}
    rows_r = {**common, "BLOCK_R": rank_block(64)}

    def spec(kernel, variant, name, sig, fixed, tile, is_gemm=False):
        return {"kernel": kernel, "variant": variant, "configs": name, "configs_fn": configs,
                "sig": sig, "fixed": fixed, "uses_dot": True, "gemm": is_gemm,
                "dropout_tile": tile}

    g_tile, p_tile, w_tile = ("BLOCK_M", "BLOCK_N"), ("BLOCK_M", "BLOCK_C"), ("BLOCK_M", "BLOCK_C")
    return [
        spec(_multi_lora_project_kernel, "shrink, pre-dropout", "shrink",
             {**proj, "stride_fr": i32, "stride_fc": 1},
             {**rows_r, "IN_MASK": True, "SLOT_SCALE": False, "RANK_CONTIG": False}, p_tile),
        spec(_multi_lora_project_kernel, "dS, post-dropout", "ds",
             {**proj, "stride_fr": 1, "stride_fc": i32},
             {**rows_r, "IN_MASK": True, "SLOT_SCALE": True, "RANK_CONTIG": True}, p_tile),
        spec(_multi_lora_gemm_kernel, "forward, bias", "fwd", {**gemm, **fwd_w},
             {**fwd_fixed, "LOW_MASK": False}, g_tile, True),
        spec(_multi_lora_gemm_kernel, "forward, bias, post-dropout", "fwd_mask",
             {**gemm, **fwd_w}, {**fwd_fixed, "LOW_MASK": True}, g_tile, True),
        spec(_multi_lora_gemm_kernel, "dX", "dx", {**gemm, **dx_w},
             {**dx_fixed, "LOW_MASK": False}, g_tile, True),
        spec(_multi_lora_gemm_kernel, "dX, pre-dropout", "dx_mask", {**gemm, **dx_w},
             {**dx_fixed, "LOW_MASK": True}, g_tile, True),
        spec(_multi_lora_wgrad_kernel, "dA, pre-dropout", "wgrad",
             {**wgrad, "stride_or": i32, "stride_oc": 1},
             {**rows_r, "C_MASK": True, "SLOT_SCALE": False}, w_tile),
        spec(_multi_lora_wgrad_kernel, "dB, post-dropout", "wgrad",
             {**wgrad, "stride_or": 1, "stride_oc": i32},
             {**rows_r, "C_MASK": True, "SLOT_SCALE": True}, w_tile),
    ]
