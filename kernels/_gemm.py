"""The fused GEMM of the LoRA linear, one kernel for both directions:

    forward  Y  = x W^T + s S B^T (+ b)        ('post' dropout: low-rank term * m / (1 - p))
    backward dX = dY W + dS A                  ('pre' dropout: low-rank term * m / (1 - p))

Both are ``out[M, J] = A[M, L] Wt[L, J] + c * U[M, R] V[R, J]`` with roles swapped: the forward
has (A, L, J, U, V, c) = (x, K, N, S, B^T, s), dX has (dY, N, K, dS, A, 1). The low-rank term
rides in the GEMM's own fp32 accumulator (one more reduction step over the rank) or, with a
mask, in a second one applied in a split epilogue; out is written once, never read back.

Two kernels compute it: ``_lora_gemm_kernel`` (pointer loads, cp.async pipeline on sm_80/sm_90)
and ``_lora_gemm_tma_kernel`` (sm_90: TMA descriptors, persistent over tiles, TMA stores). The
autotuner takes either where it wins; the host falls back to the pointer kernel whenever TMA's
alignment rules do not hold. Shared by kernels/lora_linear.py and kernels/norm_lora.py.
"""

from __future__ import annotations

import functools

import torch
from bridge.kernels._triton_common import (
    GEMM_RANK_STEP,
    HAS_TRITON,
    Choice,
    Tuner,
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

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4 (or no triton): the pointer kernel only
    TensorDescriptor = None

if HAS_TRITON:

    @triton.jit
    def _grouped_tile(pid, n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                      GROUP: tl.constexpr):
        """Map a 1-D tile id to a (row, col) tile, GROUP row-tiles at a time (L2 reuse)."""
        tiles_r = tl.cdiv(n_rows, BLOCK_ROWS)
        tiles_c = tl.cdiv(n_cols, BLOCK_COLS)
        per_group = GROUP * tiles_c
        first_r = (pid // per_group) * GROUP
        group_rows = min(tiles_r - first_r, GROUP)
        pid_r = first_r + ((pid % per_group) % group_rows)
        pid_c = (pid % per_group) // group_rows
        return pid_r, pid_c

    @triton.jit
    def _lowrank_step(u_ptr, v_ptr, rm, rj, r0, M, J, R, stride_vj, stride_vr, u_scale,
                      SCALE_U: tl.constexpr, OP_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
                      BLOCK_R: tl.constexpr):
        """Rank columns [r0, r0 + BLOCK_R) of the low-rank operands: (U tile [BM, BR] as a dot
        operand, times u_scale in fp32 before the cast when SCALE_U (never c * V: the scale
        stays off the rounded weight), V tile [BR, BJ])."""
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        u = tl.load(u_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :],
                    mask=(rm < M)[:, None] & r_ok[None, :], other=0.0)
        if SCALE_U:
            u = u * u_scale
        v = load_f32(v_ptr + rj[None, :] * stride_vj + rr[:, None] * stride_vr,
                     r_ok[:, None] & (rj < J)[None, :], INTERPRET)
        return dot_operand(u, OP_DTYPE, INTERPRET), v

    @triton.jit
    def _lowrank_rest(acc, u_ptr, v_ptr, rm, rj, M, J, R, stride_vj, stride_vr, u_scale, done,
                      SCALE_U: tl.constexpr, OP_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_STEPS: tl.constexpr,
                      FIRST: tl.constexpr):
        """acc + the rank steps FIRST.. that are not done yet (step i is done when i < done),
        after the main loop. Unrolled, each behind its own branch: a loop would be pipelined
        with buffers of its own, and straight-line code would load every step at once."""
        for i in tl.static_range(FIRST, R_STEPS):
            if (i >= done) & (i * BLOCK_R < R):
                u, v = _lowrank_step(u_ptr, v_ptr, rm, rj, i * BLOCK_R, M, J, R, stride_vj,
                                     stride_vr, u_scale, SCALE_U, OP_DTYPE, INTERPRET, BLOCK_R)
                acc = tl.dot(u, v, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _lowrank_in_loop(acc, u, v, step, u_ptr, v_ptr, rm, rj, M, J, R, stride_vj, stride_vr,
                         u_scale, MASK: tl.constexpr, OP_DTYPE: tl.constexpr,
                         INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_R: tl.constexpr, R_STEPS: tl.constexpr):
        """After main step ``step``'s MMA is issued: load the low-rank operands while it runs
        and the pipeline's next stages are in flight (no load after a drained pipeline). Rank
        step i rides along main step i as one more reduction step of acc; with a mask the
        first one is kept (u, v) for the epilogue's second accumulator. -> (acc, u, v)."""
        if MASK:
            if step == 0:
                u, v = _lowrank_step(u_ptr, v_ptr, rm, rj, 0, M, J, R, stride_vj, stride_vr,
                                     u_scale, False, OP_DTYPE, INTERPRET, BLOCK_R)
        elif step < R_STEPS:
            u0, v0 = _lowrank_step(u_ptr, v_ptr, rm, rj, step * BLOCK_R, M, J, R, stride_vj,
                                   stride_vr, u_scale, True, OP_DTYPE, INTERPRET, BLOCK_R)
            acc = tl.dot(u0, v0, acc, input_precision=PRECISION)
        return acc, u, v

    @triton.jit
    def _lowrank_after(acc, u, v, steps, u_ptr, v_ptr, rm, rj, M, J, R, stride_vj, stride_vr,
                       u_scale, MASK: tl.constexpr, OP_DTYPE: tl.constexpr,
                       INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_R: tl.constexpr, R_STEPS: tl.constexpr):
        """After the main loop of ``steps`` steps -> (acc, low): with a mask low = U V, its own
        fp32 tile (unscaled); else the rank steps the loop was too short for join acc, and low
        is acc."""
        if MASK:
            low = tl.dot(u, v, input_precision=PRECISION)
            low = _lowrank_rest(low, u_ptr, v_ptr, rm, rj, M, J, R, stride_vj, stride_vr,
                                u_scale, 0, False, OP_DTYPE, INTERPRET, PRECISION, BLOCK_R,
                                R_STEPS, 1)
            return acc, low
        else:
            acc = _lowrank_rest(acc, u_ptr, v_ptr, rm, rj, M, J, R, stride_vj, stride_vr,
                                u_scale, steps, True, OP_DTYPE, INTERPRET, PRECISION, BLOCK_R,
                                R_STEPS, 0)
            return acc, acc

    @triton.jit
    def _halves(t, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
        """The left and right column halves of a [BLOCK_M, WIDTH] tile."""
        t = tl.permute(tl.reshape(t, (BLOCK_M, 2, WIDTH // 2)), (0, 2, 1))
        return tl.split(t)

    @triton.jit
    def _epilogue_part(acc, low, off_m, off_j, M, J, bias_ptr, out, seed, p, low_scale,
                       HAS_BIAS: tl.constexpr, MASK: tl.constexpr, USE_TMA: tl.constexpr,
                       BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
        """Columns [off_j, off_j + WIDTH) of the output tile: masked low-rank term, bias, store
        (a TMA store through ``out``'s descriptor, or masked pointer stores)."""
        rm = off_m + tl.arange(0, BLOCK_M)
        rj = off_j + tl.arange(0, WIDTH)
        j_ok = rj < J
        if MASK:
            acc += tl.where(keep_mask(seed, rm, rj, J, p), low * low_scale, 0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rj, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        if USE_TMA:
            out.store([off_m, off_j], acc.to(out.dtype))
        else:
            ptrs = out + rm.to(tl.int64)[:, None] * J + rj[None, :]
            tl.store(ptrs, acc.to(out.dtype.element_ty), mask=(rm < M)[:, None] & j_ok[None, :])

    @triton.jit
    def _epilogue(acc, low, off_m, off_j, M, J, bias_ptr, out, seed, p, low_scale,
                  HAS_BIAS: tl.constexpr, MASK: tl.constexpr, USE_TMA: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, EPI_SPLIT: tl.constexpr):
        """The tile's epilogue, whole (EPI_SPLIT 1) or in two column halves (2): the dropout
        mask and the staging buffer of the TMA store then cover half a tile at a time, which
        bounds the live mask registers and the shared memory the store takes from the
        pipeline's stages."""
        if EPI_SPLIT == 1:
            _epilogue_part(acc, low, off_m, off_j, M, J, bias_ptr, out, seed, p, low_scale,
                           HAS_BIAS, MASK, USE_TMA, BLOCK_M, BLOCK_J)
        else:
            tl.static_assert(EPI_SPLIT == 2, "EPI_SPLIT is 1 or 2")
            half: tl.constexpr = BLOCK_J // 2
            a0, a1 = _halves(acc, BLOCK_M, BLOCK_J)
            l0, l1 = _halves(low, BLOCK_M, BLOCK_J)
            _epilogue_part(a0, l0, off_m, off_j, M, J, bias_ptr, out, seed, p, low_scale,
                           HAS_BIAS, MASK, USE_TMA, BLOCK_M, half)
            _epilogue_part(a1, l1, off_m, off_j + half, M, J, bias_ptr, out, seed, p,
                           low_scale, HAS_BIAS, MASK, USE_TMA, BLOCK_M, half)

    @triton.jit
    def _lora_gemm_kernel(
        a_ptr,  # [M, L] left operand: x (forward) or dY (dX), strided (stride 0 included)
        w_ptr,  # frozen weight, read as Wt[l, j] at w_ptr + j*stride_wj + l*stride_wl
        u_ptr,  # [M, R] fp32 low-rank left operand: S (forward) or dS (dX), contiguous
        v_ptr,  # low-rank right operand, V[r, j] at v_ptr + j*stride_vj + r*stride_vr
        bias_ptr,  # [J] bias (read only when HAS_BIAS)
        out_ptr,  # [M, J] output, contiguous; its dtype is the output dtype
        seed_ptr,  # int64 [1] dropout seed (read only when MASK)
        M, J, L, R,  # rows, output columns, reduction length, rank (all runtime)
        stride_am, stride_al,  # A strides
        stride_wj, stride_wl,  # weight strides along J and L (forward: W's (n, k) strides)
        stride_vj, stride_vr,  # V strides along J and R (forward: B's (n, r) strides)
        u_scale,  # fp32 c: s (forward) or 1 (dX; dS carries s already)
        p,  # fp32 dropout probability (MASK only)
        keep_scale,  # fp32 1 / (1 - p)
        HAS_BIAS: tl.constexpr,  # add the bias in the epilogue
        MASK: tl.constexpr,  # low-rank term * m / (1 - p), mask of out [M, J] regenerated
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,  # output tile
        BLOCK_L: tl.constexpr,  # main-loop reduction step
        BLOCK_R: tl.constexpr,  # rank step (padded rank bucket, <= GEMM_RANK_STEP)
        R_STEPS: tl.constexpr,  # rank steps: the rank bucket / BLOCK_R
        GROUP_M: tl.constexpr,  # row tiles per L2 group
        EPI_SPLIT: tl.constexpr,  # epilogue column parts (1, 2)
    ):
        """out = A Wt + c U V (+ bias), or A Wt + c (U V) * m / (1 - p) (+ bias) with MASK:
        one output tile per program, cp.async-pipelined main loop over L."""
        pid_m, pid_j = _grouped_tile(tl.program_id(0), M, J, BLOCK_M, BLOCK_J, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_j = pid_j * BLOCK_J
        rm = off_m + tl.arange(0, BLOCK_M)
        rj = off_j + tl.arange(0, BLOCK_J)
        m_ok = rm < M
        j_ok = rj < J
        OP_DTYPE: tl.constexpr = w_ptr.dtype.element_ty
        rl0 = tl.arange(0, BLOCK_L)
        a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
        w_cols = w_ptr + rj.to(tl.int64)[None, :] * stride_wj
        acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=OP_DTYPE)  # MASK: carried to the epilogue
        v = tl.zeros((BLOCK_R, BLOCK_J), dtype=v_ptr.dtype.element_ty)
        for l0 in range(0, L, BLOCK_L):
            rl = l0 + rl0
            l_ok = rl < L
            a = load_f32(a_rows + rl[None, :] * stride_al, m_ok[:, None] & l_ok[None, :],
                         INTERPRET)
            w = load_f32(w_cols + rl[:, None] * stride_wl, l_ok[:, None] & j_ok[None, :],
                         INTERPRET)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            acc, u, v = _lowrank_in_loop(acc, u, v, l0 // BLOCK_L, u_ptr, v_ptr, rm, rj, M, J,
                                         R, stride_vj, stride_vr, u_scale, MASK, OP_DTYPE,
                                         INTERPRET, PRECISION, BLOCK_R, R_STEPS)
        acc, low = _lowrank_after(acc, u, v, tl.cdiv(L, BLOCK_L), u_ptr, v_ptr, rm, rj, M, J,
                                  R, stride_vj, stride_vr, u_scale, MASK, OP_DTYPE, INTERPRET,
                                  PRECISION, BLOCK_R, R_STEPS)
        seed = 0
        if MASK:
            seed = tl.load(seed_ptr)
        _epilogue(acc, low, off_m, off_j, M, J, bias_ptr, out_ptr, seed, p,
                  u_scale * keep_scale, HAS_BIAS, MASK, False, BLOCK_M, BLOCK_J, EPI_SPLIT)

    @triton.jit
    def _lora_gemm_tma_kernel(
        a_desc,  # TMA descriptor of A [M, L], block [BLOCK_M, BLOCK_L]
        w_desc,  # TMA descriptor of the weight: [J, L] block [BLOCK_J, BLOCK_L], or with W_LJ
                 # [L, J] block [BLOCK_L, BLOCK_J] (whichever of its strides is 1)
        u_ptr,  # [M, R] fp32 S or dS, contiguous
        v_ptr,  # V[r, j] at v_ptr + j*stride_vj + r*stride_vr (B^T or A)
        bias_ptr,  # [J] bias (HAS_BIAS)
        out_desc,  # TMA descriptor of out [M, J], block [BLOCK_M, BLOCK_J // EPI_SPLIT]
        seed_ptr,  # int64 [1] dropout seed (MASK)
        M, J, L, R,  # sizes
        stride_vj, stride_vr,  # V strides
        u_scale,  # fp32 c (s or 1)
        p,  # fp32 dropout probability (MASK)
        keep_scale,  # fp32 1 / (1 - p)
        HAS_BIAS: tl.constexpr,  # add the bias in the epilogue
        MASK: tl.constexpr,  # masked low-rank term (second accumulator)
        W_LJ: tl.constexpr,  # the weight descriptor is [L, J] (no transpose of its tile)
        INTERPRET: tl.constexpr,  # CPU interpreter: upcast after loads
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,  # output tile
        BLOCK_L: tl.constexpr,  # main-loop reduction step
        BLOCK_R: tl.constexpr,  # rank step
        R_STEPS: tl.constexpr,  # rank steps
        GROUP_M: tl.constexpr,  # row tiles per L2 group
        EPI_SPLIT: tl.constexpr,  # epilogue column parts (1, 2): TMA store staging size
    ):
        """The same out as ``_lora_gemm_kernel``, persistent: the grid is at most one program
        per SM, each walking tiles pid, pid + grid, ...; tile and main loop are flattened into
        one software pipeline, so the next tile's TMA loads are in flight during this tile's
        epilogue. Offsets are int32 (triton 3.6's descriptor loads require it)."""
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(J, BLOCK_J)
        steps = tl.cdiv(L, BLOCK_L)
        OP_DTYPE: tl.constexpr = w_desc.dtype
        seed = 0
        if MASK:
            seed = tl.load(seed_ptr)
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
            pid_m, pid_j = _grouped_tile(tile, M, J, BLOCK_M, BLOCK_J, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_j = pid_j * BLOCK_J
            rm = off_m + tl.arange(0, BLOCK_M)
            rj = off_j + tl.arange(0, BLOCK_J)
            acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
            u = tl.zeros((BLOCK_M, BLOCK_R), dtype=OP_DTYPE)  # MASK: carried to the epilogue
            v = tl.zeros((BLOCK_R, BLOCK_J), dtype=v_ptr.dtype.element_ty)
            for step in range(steps):
                off_l = step * BLOCK_L
                a = a_desc.load([off_m, off_l])  # out of bounds reads as 0
                if W_LJ:
                    w = w_desc.load([off_l, off_j])
                else:
                    w = w_desc.load([off_j, off_l]).T
                if INTERPRET:
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
                acc, u, v = _lowrank_in_loop(acc, u, v, step, u_ptr, v_ptr, rm, rj, M, J, R,
                                             stride_vj, stride_vr, u_scale, MASK, OP_DTYPE,
                                             INTERPRET, PRECISION, BLOCK_R, R_STEPS)
            acc, low = _lowrank_after(acc, u, v, steps, u_ptr, v_ptr, rm, rj, M, J, R,
                                      stride_vj, stride_vr, u_scale, MASK, OP_DTYPE, INTERPRET,
                                      PRECISION, BLOCK_R, R_STEPS)
            _epilogue(acc, low, off_m, off_j, M, J, bias_ptr, out_desc, seed, p,
                      u_scale * keep_scale, HAS_BIAS, MASK, True, BLOCK_M, BLOCK_J, EPI_SPLIT)


# ---------------------------------------------------------------------------------------------
# Launch configurations: one list per architecture and kernel, the same for the forward and dX
# (one GEMM). The tuner keys them on (M bucket, J, L, rank bucket, dtypes, variant); rank steps
# (BLOCK_R) come from the rank bucket, not from the configs. Every entry compiles without
# register spills as a real launch specialises it (sizes and strides divisible by 16).
# ---------------------------------------------------------------------------------------------


def _g(num_warps: int, num_stages: int, bm: int, bj: int, bl: int, split: int = 1, group: int = 8):
    return cfg(num_warps, num_stages, BLOCK_M=bm, BLOCK_J=bj, BLOCK_L=bl, GROUP_M=group,
               EPI_SPLIT=split)


def _configs_sm80() -> dict[str, list]:
    """A100 (sm_80, 164 KB smem/SM, mma.sync, cp.async). The 128x256 tile and the 128x128
    mask tile, once dropped as spilling, are back: built as a launch builds them (sizes divisible
    by 16) they hold 254 and 244 registers without a spill (the old AOT build did not mark the
    sizes, and the S tile rode beside the accumulator after the loop)."""
    return {
        "gemm": [
            _g(8, 3, 128, 256, 32),
            _g(4, 4, 128, 128, 32),
            _g(4, 4, 64, 128, 32),
            _g(4, 4, 128, 64, 32),
            _g(4, 4, 64, 64, 64),
        ],
        # a mask: the second [BM, BJ] fp32 tile and the mask of each epilogue part
        "gemm_mask": [
            _g(8, 3, 128, 128, 32, split=2),
            _g(8, 3, 64, 128, 32),
            _g(4, 4, 64, 64, 64),
        ],
        "gemm_tma": [],
        "gemm_tma_mask": [],
    }


def _configs_sm90() -> dict[str, list]:
    """H100 (sm_90a, 228 KB smem/SM, wgmma): the pointer kernel's tiles and the persistent TMA
    kernel's, whose output staging (BM x BJ / EPI_SPLIT) shares shared memory with the
    pipeline stages."""
    return {
        "gemm": [
            _g(8, 4, 128, 256, 64),
            _g(8, 4, 128, 128, 64),
            _g(4, 4, 64, 128, 64),
            _g(4, 4, 128, 64, 64),
            _g(4, 5, 64, 64, 64),
        ],
        "gemm_mask": [
            _g(8, 4, 128, 128, 64, split=2),
            _g(8, 4, 64, 128, 64),
            _g(4, 5, 64, 64, 64),
        ],
        "gemm_tma": [
            _g(8, 3, 128, 256, 64, split=2),  # 4 stages: 248 KB with the staging, too many
            _g(8, 4, 128, 128, 64),
            _g(4, 4, 128, 128, 64, split=2),
            _g(4, 4, 64, 128, 64),
        ],
        "gemm_tma_mask": [
            _g(8, 4, 128, 128, 64, split=2),
            _g(8, 4, 64, 128, 64),
        ],
    }


def _configs_interpret() -> dict[str, list]:
    """CPU interpreter: one big-block config per kernel (each program costs Python overhead per
    op, so fewer, larger programs are faster; nothing is benchmarked with a single config). The
    split epilogue is on, so the interpreter runs it."""
    gemm = _g(4, 1, 64, 64, 64, split=2)
    return {"gemm": [gemm], "gemm_mask": [gemm], "gemm_tma": [gemm], "gemm_tma_mask": [gemm]}


_CONFIGS = {"sm80": _configs_sm80, "sm90": _configs_sm90, "interpret": _configs_interpret}


def configs(arch: str, name: str) -> list:
    """Config list ``name`` (gemm | gemm_mask | gemm_tma | gemm_tma_mask) for ``arch``
    (sm80 | sm90 | interpret)."""
    return _CONFIGS[arch]()[name]


# Interpreter: a few programs, so the persistent kernel walks several tiles each.
_INTERPRET_PROGRAMS = 3


@functools.cache
def _num_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRET_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _w_lj(args: dict) -> bool:
    """Whether the TMA weight descriptor is [L, J] (the weight's L stride is not 1)."""
    return args["stride_wl"] != 1


def _tma_ok(args: dict) -> bool:
    """TMA's rules: 16-byte aligned bases, unit inner strides, 16-byte multiple row strides
    (no stride 0: an expanded dY takes the pointer kernel)."""
    a, w, out = args["a_ptr"], args["w_ptr"], args["out_ptr"]
    m, j, ell = args["M"], args["J"], args["L"]
    sa, sw = a.element_size(), w.element_size()
    if not (_aligned(a) and _aligned(w) and _aligned(out)) or not out.is_contiguous():
        return False
    if args["stride_al"] != 1 or args["stride_am"] < max(ell, 1) or args["stride_am"] * sa % 16:
        return False
    if _w_lj(args):
        row, inner, width = args["stride_wl"], args["stride_wj"], j
    else:
        row, inner, width = args["stride_wj"], args["stride_wl"], ell
    if inner != 1 or row < width or row * sw % 16:
        return False
    return m > 0 and j * out.element_size() % 16 == 0


def _launch_tma(choice: Choice, _grid, args: dict) -> None:
    """Launch the TMA kernel on ``args`` (the pointer kernel's): descriptors with this config's
    block shapes, and a persistent grid of at most one program per SM."""
    meta = choice.config.kwargs
    bm, bj, bl = meta["BLOCK_M"], meta["BLOCK_J"], meta["BLOCK_L"]
    a, w, out = args["a_ptr"], args["w_ptr"], args["out_ptr"]
    m, j, ell = args["M"], args["J"], args["L"]
    w_lj = _w_lj(args)
    a_desc = TensorDescriptor(a, [m, ell], [args["stride_am"], 1], [bm, bl])
    if w_lj:
        w_desc = TensorDescriptor(w, [ell, j], [args["stride_wl"], 1], [bl, bj])
    else:
        w_desc = TensorDescriptor(w, [j, ell], [args["stride_wj"], 1], [bj, bl])
    out_desc = TensorDescriptor(out, [m, j], [j, 1], [bm, bj // meta["EPI_SPLIT"]])
    tiles = triton.cdiv(m, bm) * triton.cdiv(j, bj)
    grid = (min(tiles, _num_programs(a.device)),)
    choice.kernel[grid](
        a_desc, w_desc, args["u_ptr"], args["v_ptr"], args["bias_ptr"], out_desc,
        args["seed_ptr"], m, j, ell, args["R"], args["stride_vj"], args["stride_vr"],
        args["u_scale"], args["p"], args["keep_scale"], HAS_BIAS=args["HAS_BIAS"],
        MASK=args["MASK"], W_LJ=w_lj, INTERPRET=args["INTERPRET"], PRECISION=args["PRECISION"],
        BLOCK_R=args["BLOCK_R"], R_STEPS=args["R_STEPS"], **choice.config.all_kwargs())


def make_choice(family: str, config) -> Choice:
    """An autotune candidate of the GEMM: ``family`` "ptr" (``_lora_gemm_kernel``) or "tma"
    (``_lora_gemm_tma_kernel``, eligible only where TMA's alignment rules hold)."""
    if family == "ptr":
        return Choice(_lora_gemm_kernel, config, "ptr")
    if family == "tma":
        if TensorDescriptor is None:
            raise RuntimeError("the TMA GEMM needs triton >= 3.4 (triton.tools.tensor_descriptor)")
        return Choice(_lora_gemm_tma_kernel, config, "tma", launch=_launch_tma, eligible=_tma_ok)
    raise ValueError(f"unknown GEMM kernel family {family!r} (ptr | tma)")


@functools.cache
def _tuner(arch: str, direction: str, mask: bool) -> Tuner:
    """The autotuned GEMM for one direction ("fwd" | "dx") and variant: the pointer kernel's
    configs and, where triton has tensor descriptors, the TMA kernel's (sm_90)."""
    suffix = "_mask" if mask else ""
    choices = [make_choice("ptr", c) for c in configs(arch, "gemm" + suffix)]
    if TensorDescriptor is not None:
        choices += [make_choice("tma", c) for c in configs(arch, "gemm_tma" + suffix)]
    return Tuner(f"lora_gemm/{arch}/{direction}{suffix}", _lora_gemm_kernel, choices,
                 ("M", "J", "L", "R"))


# ---------------------------------------------------------------------------------------------
# Host launchers (2-D in, 2-D out). ``seed`` (int64 tensor [1]) turns on the dropout mask of the
# tensor that kernel handles and ``p`` is its probability: fused_gemm takes the 'post' seed (mask
# of y [M, N]), dx the 'pre' seed (mask of x [M, K]). seed=None or p=0 means no mask.
# ---------------------------------------------------------------------------------------------


def _launch(direction: str, a: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int],
            bias: torch.Tensor | None, u: torch.Tensor, v: torch.Tensor,
            v_strides: tuple[int, int], out: torch.Tensor, u_scale: float,
            seed: torch.Tensor | None, p: float, *, family: str | None = None,
            choice: Choice | None = None) -> None:
    """out = a Wt + u_scale * u V (masked with ``seed``): the shared body of both launchers.
    ``family`` restricts the tuner to "ptr" or "tma"; ``choice`` launches one candidate as is
    (tests). Wt[l, j] = w[j * w_strides[0] + l * w_strides[1]], V likewise with v_strides."""
    m, ell = a.shape
    j, r = out.shape[1], u.shape[1]
    block_r = min(rank_block(r), GEMM_RANK_STEP)
    on, seed_arg, p_arg, keep = dropout_args(seed, p, out)
    args = dict(
        a_ptr=a, w_ptr=w, u_ptr=u.contiguous(), v_ptr=v,
        bias_ptr=bias.contiguous() if bias is not None else out, out_ptr=out, seed_ptr=seed_arg,
        M=m, J=j, L=ell, R=r, stride_am=a.stride(0), stride_al=a.stride(1),
        stride_wj=w_strides[0], stride_wl=w_strides[1], stride_vj=v_strides[0],
        stride_vr=v_strides[1], u_scale=float(u_scale), p=p_arg, keep_scale=keep,
        HAS_BIAS=bias is not None, MASK=on, BLOCK_R=block_r,
        R_STEPS=triton.cdiv(max(triton.next_power_of_2(r), 16), block_r),
        **launch_common(a.device, a.dtype))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(j, meta["BLOCK_J"]),)
    if choice is not None:
        if not choice.eligible(args):
            raise ValueError(f"{choice.label} cannot run this call (TMA needs 16-byte aligned "
                             "bases and row strides, and unit inner strides)")
        choice.run(grid, args)
        return
    arch = current_arch(a.device)
    if family is None and arch == "interpret":
        family = "ptr"  # one config, nothing benchmarked; tests ask for "tma" explicitly
    _tuner(arch, direction, on).run(grid, family=family, **args)


def launch_fused_gemm(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       s_mat: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                       seed: torch.Tensor | None = None, p: float = 0.0) -> torch.Tensor:
    """y = x W^T + s S B^T (+ bias), written once: x2d [M, K] (any strides), weight [N, K],
    bias [N] or None (None also for skip_bias_add), s_mat [M, r] fp32 contiguous (from
    ``launch_shrink``), lora_b [N, r] -> y2d [M, N] in x2d's dtype, contiguous. With the 'post'
    ``seed``, the low-rank product is masked: y = x W^T + s (S B^T) * m / (1 - p) (+ bias)."""
    m, _ = x2d.shape
    n, _ = lora_b.shape
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y
    _launch("fwd", x2d, weight, (weight.stride(0), weight.stride(1)), bias, s_mat, lora_b,
            (lora_b.stride(0), lora_b.stride(1)), y, scale, seed, p)
    return y


def launch_dx(dy2d: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_a: torch.Tensor,
               *, seed: torch.Tensor | None = None, p: float = 0.0,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dX = dY W + (dS A) (* m / (1 - p) with the 'pre' ``seed``): dy2d [M, N] (any strides),
    weight [N, K], ds [M, r] fp32 contiguous, lora_a [r, K] -> dx2d [M, K] contiguous in
    ``out_dtype`` (default dy's dtype; fp32 lets a norm backward consume it unrounded)."""
    m, _ = dy2d.shape
    _, k = lora_a.shape
    dx = torch.empty((m, k), dtype=out_dtype or dy2d.dtype, device=dy2d.device)
    if m == 0:
        return dx
    # dX's Wt[l=n, j=k] is W itself; V[r, j=k] is A
    _launch("dx", dy2d, weight, (weight.stride(1), weight.stride(0)), None, ds, lora_a,
            (lora_a.stride(1), lora_a.stride(0)), dx, 1.0, seed, p)
    return dx


# ---------------------------------------------------------------------------------------------
# Ahead-of-time check specs (collected by kernels/aot.py).
# ---------------------------------------------------------------------------------------------


def _aot_configs(arch: str, name: str) -> list:
    """``configs`` for the AOT sweep: a list name, or "list#i" for its config i alone (a TMA
    config is its own spec, since its descriptor types depend on the tile)."""
    base, _, index = name.partition("#")
    entries = configs(arch, base)
    if not index:
        return entries
    return entries[int(index):int(index) + 1]


def aot_specs() -> list[dict]:
    """The GEMM variants for ``kernels/aot.py``: dicts of kernel, variant, configs (a name for
    ``configs_fn``), configs_fn, sig (argument -> Triton type, or 1 for a unit stride), fixed
    constexprs, uses_dot, archs. bf16 operands, the 32-wide rank step: the forward with bias
    (and 'post' mask), dX (and 'pre' mask with the fp32 output of the norm path), and, on the
    two largest tiles of each list, rank 64 (two rank steps: the most registers)."""
    dt, f32, i32, i64p, f32p = "*bf16", "fp32", "i32", "*i64", "*fp32"
    common = {"INTERPRET": False, "PRECISION": "ieee", "BLOCK_R": GEMM_RANK_STEP}
    ptr_sig = {"a_ptr": dt, "w_ptr": dt, "u_ptr": f32p, "v_ptr": dt, "bias_ptr": dt,
               "out_ptr": dt, "seed_ptr": i64p, "M": i32, "J": i32, "L": i32, "R": i32,
               "stride_am": i32, "stride_al": 1, "u_scale": f32, "p": f32, "keep_scale": f32}
    # forward: W [N, K] read along K (l) and B [N, r] along r; dX: W and A read along K (j)
    fwd_sig = {**ptr_sig, "stride_wj": i32, "stride_wl": 1, "stride_vj": i32, "stride_vr": 1}
    dx_sig = {**ptr_sig, "stride_wj": 1, "stride_wl": i32, "stride_vj": 1, "stride_vr": i32}
    dx32_sig = {**dx_sig, "out_ptr": f32p}
    bias, mask = {"HAS_BIAS": True, "MASK": False}, {"HAS_BIAS": False, "MASK": True}
    variants = [  # (name, sig, fixed, config list suffix, configs (None: all), rank steps)
        ("fwd: bias", fwd_sig, bias, "", None, 1),
        ("fwd: bias, post mask", fwd_sig, {"HAS_BIAS": True, "MASK": True}, "_mask", None, 1),
        ("dx", dx_sig, {"HAS_BIAS": False, "MASK": False}, "", None, 1),
        ("dx: pre mask, fp32 out", dx32_sig, mask, "_mask", None, 1),
        ("fwd: bias, rank 64", fwd_sig, bias, "", (0, 1), 2),
        ("dx: pre mask, fp32 out, rank 64", dx32_sig, mask, "_mask", (0,), 2),
    ]
    specs = []
    for variant, sig, fixed, suffix, which, r_steps in variants:
        fixed = {**common, **fixed, "R_STEPS": r_steps}
        w_lj = sig["stride_wj"] == 1  # dX: the weight tile is [L, J] as stored
        for i in which or (None,):
            specs.append({"kernel": _lora_gemm_kernel, "variant": variant,
                          "configs": "gemm" + suffix + ("" if i is None else f"#{i}"),
                          "configs_fn": _aot_configs, "sig": sig, "fixed": fixed,
                          "uses_dot": True, "archs": (80, 90)})
        tma = configs("sm90", "gemm_tma" + suffix)
        for i in which or range(len(tma)):
            bm, bj, bl = (tma[i].kwargs[k] for k in ("BLOCK_M", "BLOCK_J", "BLOCK_L"))
            out_t = sig["out_ptr"][1:]
            tma_sig = {
                "a_desc": f"tensordesc<bf16[{bm}, {bl}]>",
                "w_desc": f"tensordesc<bf16[{bl}, {bj}]>" if w_lj
                else f"tensordesc<bf16[{bj}, {bl}]>",
                "u_ptr": f32p, "v_ptr": dt, "bias_ptr": dt,
                "out_desc": f"tensordesc<{out_t}[{bm}, {bj // tma[i].kwargs['EPI_SPLIT']}]>",
                "seed_ptr": i64p, "M": i32, "J": i32, "L": i32, "R": i32,
                "stride_vj": sig["stride_vj"], "stride_vr": sig["stride_vr"], "u_scale": f32,
                "p": f32, "keep_scale": f32}
            specs.append({"kernel": _lora_gemm_tma_kernel, "variant": f"{variant} (tma)",
                          "configs": f"gemm_tma{suffix}#{i}", "configs_fn": _aot_configs,
                          "sig": tma_sig, "fixed": {**fixed, "W_LJ": w_lj}, "uses_dot": True,
                          "archs": (90,)})
    return specs
