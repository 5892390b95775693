"""Fused multi-adapter LoRA linear (MultiLoRA): n adapter slots trained in one batch on one base.

    y_i = x_i W^T (+ b) + s_j * (x~_i A_j^T) B_j^T     for row i of slot j,   s_j = alpha_j / rank_j

Rows of x [M, K] (leading dims flattened) are grouped by slot: slot j owns the
``tokens_per_slot[j]`` rows after those of the slots before it (zero rows allowed). A
[n, r_max, K] and B [n, N, r_max] stack the slots at the largest rank; slot j uses A[j, :rank_j]
and B[j, :, :rank_j]. The padding beyond rank_j never reaches an operand (masked out of the
loads of A, S and dS; zeroed right after the full-width vector loads of B, which is contiguous
along the rank) and gets a zero gradient; s_j is computed in fp32 and applied inside the
kernels, never folded into B.

Read top to bottom: argument checks, the reference (a loop of ``lora_linear_ref`` over the slots,
the oracle), the eager backend (two ``torch._grouped_mm`` where torch has them, else the loop),
the Triton kernels, their configurations per architecture, the launchers, the registered ops, the
functional op and the AOT specs. Three kernels, each used twice with roles swapped:

* project: P[m, :rank] = f_slot(m) * in~[m] F_slot(m)^T: the shrink S = x~ A^T and dS = s G B
  (G = dY, masked for 'post' dropout).
* gemm: out = a W' + L_slot F_slot (+ b): the frozen GEMM over all M rows, the low-rank term in
  its accumulator: the forward y, and dX = dY W + (dS A) * m / (1 - p).
* wgrad: per slot, f_j L_j^T C~_j over its rows: dA = dS^T x~ and dB = s G^T S.

A row tile of project/gemm that spans slot boundaries loops over the slots present in it, each
step masked to that slot's rows (a masked load fetches nothing, so x is still read once). The slot
table (offsets, ranks, scales) lives on the device: no host sync, and rank and alpha are runtime
values. Saved for backward: x, S (fp32 [M, r_max]), the slot table and the seed; never the mask
(kernels/philox.py regenerates it). Deterministic: no atomics; dA/dB partial sums (split over
rows for parallelism) are added in a fixed order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from bridge.kernels import gemm_strategy
from bridge.kernels._checks import check_dropout
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
from bridge.kernels.backend import resolve_backend
from bridge.kernels.lora_linear import _compute_dtype, apply_dropout_mask, lora_linear_ref
from bridge.kernels.philox import draw_seed, keep_mask, seed_tensor

# The slot table rides in registers of every program (BLOCK_S lanes); past this, the eager path.
MAX_SLOTS = 256
SlotValues = Sequence[int] | Sequence[float] | torch.Tensor


# ---------------------------------------------------------------------------------------------
# Argument checks (shapes, dtypes, devices; slot values)
# ---------------------------------------------------------------------------------------------


def _check_multi_args(x, weight, bias, lora_a, lora_b) -> None:
    """x [..., K], weight [N, K], bias [N], lora_a [n, r_max, K], lora_b [n, N, r_max]: one
    dtype, one device."""
    tensors = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1 or weight.dim() != 2 or lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(
            "expected x [..., K], weight [N, K], lora_a [n_slots, r_max, K] and lora_b "
            f"[n_slots, N, r_max]; got shapes {tuple(x.shape)}, {tuple(weight.shape)}, "
            f"{tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    n, k = weight.shape
    n_slots, r_max, k_a = lora_a.shape
    if x.shape[-1] != k or k_a != k:
        raise ValueError(f"in_features disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
                         f", lora_a {tuple(lora_a.shape)} (K = last dim of x and lora_a)")
    if n_slots < 1 or r_max < 1:
        raise ValueError(f"lora_a [n_slots, r_max, K] needs n_slots >= 1 and r_max >= 1; got "
                         f"{tuple(lora_a.shape)}")
    if lora_b.shape != (n_slots, n, r_max):
        raise ValueError(f"lora_b must have shape [n_slots, N, r_max] = [{n_slots}, {n}, {r_max}]"
                         f" to match weight and lora_a; got {tuple(lora_b.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [{n}]; got {tuple(bias.shape)}")
    if len({t.dtype for t in tensors.values()}) != 1:
        listed = ", ".join(f"{k}={str(t.dtype).replace('torch.', '')}" for k, t in tensors.items())
        raise TypeError(f"all tensors must share one dtype; got {listed}")
    if len({t.device for t in tensors.values()}) != 1:
        listed = ", ".join(f"{k}={t.device}" for k, t in tensors.items())
        raise ValueError(f"all tensors must be on one device; got {listed}")


def _slot_arg(value, name: str, n_slots: int, integral: bool):
    """A 1-D tensor, or a list of Python numbers, with one entry per slot."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.numel() != n_slots:
            raise ValueError(f"{name} must have one entry per slot (n_slots = {n_slots}, "
                             f"lora_a.shape[0]); got a tensor of shape {tuple(value.shape)}")
        if integral and (value.dtype.is_floating_point or value.dtype.is_complex
                         or value.dtype == torch.bool):
            raise TypeError(f"{name} must hold integers; got a {value.dtype} tensor")
        return value
    try:
        values = list(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence or a 1-D tensor; got "
                        f"{type(value).__name__}") from None
    if len(values) != n_slots:
        raise ValueError(f"{name} must have one entry per slot (n_slots = {n_slots}, "
                         f"lora_a.shape[0]); got {len(values)}")
    kind = int if integral else (int, float)
    if any(isinstance(v, bool) or not isinstance(v, kind) for v in values):
        raise TypeError(f"{name} must hold {'ints' if integral else 'numbers'}; got {values}")
    return values


def _check_slot_values(tokens: list[int], ranks: list[int], scales: list[float], m: int,
                       r_max: int) -> None:
    """Counts >= 0 that sum to M, ranks in [1, r_max], finite scales; else ``ValueError``."""
    if any(t < 0 for t in tokens):
        raise ValueError(f"tokens_per_slot must be >= 0; got {tokens}")
    if sum(tokens) != m:
        raise ValueError(f"tokens_per_slot sums to {sum(tokens)} but x has {m} rows (leading dims "
                         f"flattened); give every row to one slot, slots in order: {tokens}")
    bad = [(j, r) for j, r in enumerate(ranks) if not 1 <= r <= r_max]
    if bad:
        raise ValueError(f"ranks must lie in [1, r_max = {r_max}] (r_max = lora_a.shape[1]); got "
                         + ", ".join(f"slot {j}: {r}" for j, r in bad))
    if not all(math.isfinite(s) for s in scales):
        raise ValueError(f"alpha / rank must be finite for every slot; got {scales}")


def _host_scales(alphas: list, ranks: list) -> list[float]:
    return [a / r if r else math.inf for a, r in zip(alphas, ranks, strict=True)]


def _check_slot_tensors(offsets: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                        m: int, r_max: int) -> None:
    """``_check_slot_values`` on the device slot table (a device sync on a GPU)."""
    off = offsets.tolist()
    _check_slot_values([b - a for a, b in itertools.pairwise(off)], ranks.tolist(),
                       scales.tolist(), m, r_max)


@dataclass(frozen=True)
class _Slots:
    """The slot table on x's device: offsets int32 [n+1] (slot j owns rows offsets[j] ..
    offsets[j+1] - 1), ranks int32 [n], scales fp32 [n] = alpha / rank; ``deferred``: values came
    as tensors and are still to be checked (inside the op, which torch.compile does not trace);
    ``host``: (tokens, ranks, alphas) as Python lists when given so (already checked)."""

    offsets: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    deferred: bool
    host: tuple[list, list, list] | None


def _slot_table(tokens_per_slot, ranks, alphas, *, m: int, n_slots: int, r_max: int,
                device: torch.device, validate: bool) -> _Slots:
    tokens = _slot_arg(tokens_per_slot, "tokens_per_slot", n_slots, integral=True)
    ranks = _slot_arg(ranks, "ranks", n_slots, integral=True)
    alphas = _slot_arg(alphas, "alphas", n_slots, integral=False)
    as_tensor = lambda v, dt: (v.to(device=device, dtype=dt) if isinstance(v, torch.Tensor)
                               else torch.tensor(v, dtype=dt, device=device))
    ranks_t = as_tensor(ranks, torch.int32)
    scales = as_tensor(alphas, torch.float32) / ranks_t.to(torch.float32)  # fp32, as in-kernel
    if isinstance(tokens, torch.Tensor):
        offsets = torch.nn.functional.pad(tokens.to(device).cumsum(0), (1, 0)).to(torch.int32)
    else:
        offsets = torch.tensor([0, *itertools.accumulate(tokens)], dtype=torch.int32,
                               device=device)
    host = None
    if not any(isinstance(v, torch.Tensor) for v in (tokens, ranks, alphas)):
        host = (tokens, ranks, alphas)
        if validate:  # host values: checked here, free (and at trace time under torch.compile)
            _check_slot_values(tokens, ranks, _host_scales(alphas, ranks), m, r_max)
    return _Slots(offsets, ranks_t, scales, validate and host is None, host)


# ---------------------------------------------------------------------------------------------
# Reference (the oracle) and the eager backend
# ---------------------------------------------------------------------------------------------


def _values(v) -> list:
    return v.tolist() if isinstance(v, torch.Tensor) else list(v)


def multi_lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    tokens_per_slot: SlotValues,
    ranks: SlotValues,
    alphas: SlotValues,
    *,
    dropout: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    dropout_position: str = "pre",
    skip_bias_add: bool = False,
) -> torch.Tensor:
    """Reference: each slot's rows through ``lora_linear_ref`` with that slot's adapter
    (A[j, :rank_j], B[j, :, :rank_j], scale alpha_j / rank_j), in fp32 (fp64 for fp64 inputs).

    Args:
        x: [..., K], rows (leading dims flattened) grouped by slot; weight [N, K]; bias [N].
        lora_a: [n, r_max, K]; lora_b: [n, N, r_max]; entries beyond a slot's rank are ignored.
        tokens_per_slot, ranks, alphas: [n] each (sequences or tensors).
        dropout_mask: keep mask of x's shape ('pre') or of y's shape ('post'), or None.

    Returns:
        y [..., N] in x's dtype.
    """
    _check_multi_args(x, weight, bias, lora_a, lora_b)
    check_dropout(dropout, dropout_position)
    n_slots, r_max, k = lora_a.shape
    tokens = _values(_slot_arg(tokens_per_slot, "tokens_per_slot", n_slots, True))
    ranks_l = _values(_slot_arg(ranks, "ranks", n_slots, True))
    alphas_l = _values(_slot_arg(alphas, "alphas", n_slots, False))
    m = math.prod(x.shape[:-1])
    _check_slot_values(tokens, ranks_l, _host_scales(alphas_l, ranks_l), m, r_max)
    x2d = x.reshape(m, k)
    masks = [None] * n_slots
    if dropout_mask is not None:
        masks = dropout_mask.reshape(m, dropout_mask.shape[-1]).split(tokens)
    outs = [lora_linear_ref(rows, weight, bias, lora_a[j, :r], lora_b[j, :, :r], scale=a / r,
                            dropout=dropout, dropout_mask=mask, dropout_position=dropout_position,
                            skip_bias_add=skip_bias_add)
            for j, (rows, mask, r, a) in enumerate(zip(x2d.split(tokens), masks, ranks_l,
                                                       alphas_l, strict=True))]
    return torch.cat(outs).view(*x.shape[:-1], weight.shape[0])


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient dense: torch._grouped_mm's backward rejects
    the stride-0 gradient that ``y.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def grouped_mm_available(dtype: torch.dtype, k: int, n: int, r_max: int,
                         device: torch.device | None = None) -> tuple[bool, str]:
    """Whether the eager backend can use ``torch._grouped_mm`` (torch >= 2.9: fp32 on the CPU and
    on CUDA sm_80+ through its fallback; the bf16 fast path is sm_90 only, and the eager backend
    computes in fp32) and, if not, why (it then loops over the slots, one host sync)."""
    version = tuple(int(v) for v in torch.__version__.split(".")[:2] if v.isdigit())
    if not hasattr(torch, "_grouped_mm") or version < (2, 9):
        return False, f"torch {torch.__version__} has no CPU/fp32 torch._grouped_mm (needs 2.9)"
    if _compute_dtype(dtype) != torch.float32:
        return False, "torch._grouped_mm has no fp64"
    # its meta/fake kernel (meta tensors, torch.compile tracing) takes bf16/fp16 only
    if torch.compiler.is_compiling() or (device is not None and device.type == "meta"):
        return False, "torch._grouped_mm's fake kernel takes bf16/fp16 only (compile, meta)"
    if k % 4 or n % 4 or r_max % 4:  # its operands need 16-byte strides (4 fp32)
        return False, f"K={k}, N={n}, r_max={r_max} not all multiples of 4 (16-byte fp32 strides)"
    return True, ""


def _eager_mask(shape, p: float, seed, device) -> torch.Tensor | None:
    """The eager backend's keep mask: ``torch.rand(shape) >= p`` from a generator seeded with
    ``seed`` (the default generator when None), as the dense eager op draws it."""
    if p == 0.0:
        return None
    gen = None if seed is None else torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(shape, device=device, generator=gen) >= p


def _eager_multi_lora_linear(x2d, weight, bias, lora_a, lora_b, slots: _Slots, tokens, *, p,
                             post, skip_bias_add, seed):
    """The eager backend on x2d [M, K], in fp32 (fp64 for fp64): the frozen GEMM over all rows,
    then the low-rank term by two grouped mms where ``grouped_mm_available`` says so, else by a
    loop over the slots (one host sync for tensor counts). Scales are alpha / rank in fp32."""
    m, k = x2d.shape
    n_slots, r_max, _ = lora_a.shape
    n = weight.shape[0]
    if slots.host is None and slots.deferred:
        _check_slot_tensors(slots.offsets, slots.ranks, slots.scales, m, r_max)
    mask = _eager_mask((m, n) if post else (m, k), p, seed, x2d.device)
    ct = _compute_dtype(x2d.dtype)
    xc = x2d.to(ct)
    y = xc @ weight.to(ct).t()
    if bias is not None and not skip_bias_add:
        y = y + bias.to(ct)
    # where, not a multiply: padding may hold anything (inf * 0 is nan) and gets a zero gradient
    keep = torch.arange(r_max, device=x2d.device) < slots.ranks[:, None]
    a = torch.where(keep[:, :, None], lora_a, 0).to(ct)
    b = torch.where(keep[:, None, :], lora_b, 0).to(ct)
    scales = slots.scales.to(ct)
    xd = xc if post else apply_dropout_mask(xc, mask, p)
    if grouped_mm_available(x2d.dtype, k, n, r_max, x2d.device)[0]:
        ends = slots.offsets[1:]
        s_mat = torch._grouped_mm(xd.contiguous(), a.transpose(1, 2), ends)
        row_scale = torch.repeat_interleave(scales, slots.offsets.diff(), output_size=m)
        low = _DenseGrad.apply(torch._grouped_mm(s_mat * row_scale[:, None], b.transpose(1, 2),
                                                 ends))
    else:
        counts = slots.host[0] if slots.host is not None else _values(tokens)
        low = torch.cat([((rows @ a[j].t()) * scales[j]) @ b[j].t()
                         for j, rows in enumerate(xd.split(counts))])
    if post:
        low = apply_dropout_mask(low, mask, p)
    return (y + low).to(x2d.dtype)


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
# Registered ops (custom_op + register_fake + register_autograd, as kernels/lora_linear.py).
# 2-D x; the slot table (offsets int32 [n+1], ranks int32 [n], scales fp32 [n]) on x's device.
# ---------------------------------------------------------------------------------------------

_FWD_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
               "Tensor offsets, Tensor ranks, Tensor scales, Tensor? seed, float p, bool post, "
               "bool cublas, bool check) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
               "Tensor s_mat, Tensor offsets, Tensor ranks, Tensor scales, Tensor? seed, "
               "float p, bool post, bool cublas, bool need_dx) -> (Tensor, Tensor, Tensor)")


def _a_strides(lora_a):  # A [n, r, K] read as [n, r, K]
    return lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)


def _b_strides(lora_b):  # B [n, N, r] read as [n, r, N]
    return lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)


@torch.library.custom_op("bridge::multi_lora_linear_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _multi_lora_fwd_op(x, weight, bias, lora_a, lora_b, offsets, ranks, scales, seed, p, post,
                       cublas, check):
    """(y [M, N], S [M, r_max] fp32). ``check``: validate the slot table first (a host sync);
    ``cublas``: y = addmm(P, x, W^T) with P = the low-rank term (+ bias) from our kernel."""
    r_max = lora_a.shape[1]
    if check:
        _check_slot_tensors(offsets, ranks, scales, x.shape[0], r_max)
    table = (offsets, ranks, scales)
    s_mat = _launch_project(x, lora_a, _a_strides(lora_a), r_max, *table, slot_scale=False,
                            seed=None if post else seed, p=p, role="shrink")
    y = _launch_gemm(x, weight, (weight.stride(1), weight.stride(0)), s_mat, lora_b,
                     _b_strides(lora_b), weight.shape[0], bias, *table, slot_scale=True,
                     seed=seed if post else None, p=p, out_dtype=x.dtype, role="fwd",
                     main=not cublas)
    if cublas:
        y = torch.addmm(y, x, weight.t())
    return y, s_mat


@_multi_lora_fwd_op.register_fake
def _(x, weight, bias, lora_a, lora_b, offsets, ranks, scales, seed, p, post, cublas, check):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_a.shape[1]), dtype=torch.float32))


@torch.library.custom_op("bridge::multi_lora_linear_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _multi_lora_bwd_op(dy, x, weight, lora_a, lora_b, s_mat, offsets, ranks, scales, seed, p,
                       post, cublas, need_dx):
    """(dX [M, K] or an empty tensor when not need_dx, dA [n, r_max, K], dB [n, N, r_max])."""
    r_max = lora_a.shape[1]
    table = (offsets, ranks, scales)
    pre_seed, post_seed = (None, seed) if post else (seed, None)
    ds = _launch_project(dy, lora_b, _b_strides(lora_b), r_max, *table, slot_scale=True,
                         seed=post_seed, p=p, role="ds")
    dx = x.new_empty(0)
    if need_dx:
        dx = _launch_gemm(dy, weight, (weight.stride(0), weight.stride(1)), ds, lora_a,
                          _a_strides(lora_a), weight.shape[1], None, *table, slot_scale=False,
                          seed=pre_seed, p=p, out_dtype=x.dtype, role="dx", main=not cublas)
        if cublas:
            dx = torch.addmm(dx, dy, weight)
    da = _launch_wgrad(ds, x, *table, slot_scale=False, seed=pre_seed, p=p,
                       out_dtype=lora_a.dtype, rank_major=True)
    db = _launch_wgrad(s_mat, dy, *table, slot_scale=True, seed=post_seed, p=p,
                       out_dtype=lora_b.dtype, rank_major=False)
    return dx, da, db


@_multi_lora_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, s_mat, offsets, ranks, scales, seed, p, post, cublas,
      need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, offsets, ranks, scales, seed, p, post, cublas, _ = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], offsets, ranks, scales, seed)
    ctx.p, ctx.post, ctx.cublas, ctx.has_bias = p, post, cublas, bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _ds_unused):
    x, weight, lora_a, lora_b, s_mat, offsets, ranks, scales, seed = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = torch.ops.bridge.multi_lora_linear_bwd(dy, x, weight, lora_a, lora_b, s_mat,
                                                        offsets, ranks, scales, seed, ctx.p,
                                                        ctx.post, ctx.cublas, need_dx)
    dbias = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return (dx if need_dx else None, None, dbias, da, db) + (None,) * 8


torch.library.register_autograd("bridge::multi_lora_linear_fwd", _backward,
                                setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The functional op
# ---------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _auto_gemm(device: str, n: int, k: int) -> str:
    """'auto' resolved without timing: kernels/gemm_strategy.py's heuristic (cuBLAS for large N
    and K on sm_90+), the same on every rank and a constant of a traced graph."""
    return gemm_strategy.heuristic(current_arch(torch.device(device)), n, k)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    tokens_per_slot: SlotValues,
    ranks: SlotValues,
    alphas: SlotValues,
    *,
    dropout: float = 0.0,
    dropout_position: str = "pre",
    training: bool = True,
    skip_bias_add: bool = False,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
    gemm: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """y_i = x_i W^T (+ b) + (alpha_j / rank_j) B_j(A_j(dropout(x_i))) for the rows i of slot j,
    on the backend kernels/backend.py picks.

    Args:
        x: [..., K], rows (leading dims flattened) grouped by slot; weight [N, K], frozen for the
            fused path; bias [N] or None.
        lora_a: [n, r_max, K]; lora_b: [n, N, r_max]: slot j's adapter at the max rank.
        tokens_per_slot: [n] ints >= 0 summing to M (zeros allowed); ranks: [n] ints in
            [1, r_max]; alphas: [n] numbers (0 silences a slot). Python sequences or tensors:
            tensors stay on the device (no sync) and are checked inside the op (one sync) unless
            ``validate=False``.
        dropout, dropout_position, training, skip_bias_add, seed: as ``lora_linear``; the fused
            mask follows kernels/philox.py over x [M, K] ('pre') or y [M, N] ('post').
        backend: auto | triton | eager (no CUDA C++ kernel exists for this op). The eager backend
            runs two torch._grouped_mm in fp32 (``grouped_mm_available``), else a loop over the
            slots, with torch's RNG for dropout.
        gemm: ``fused`` (one Triton GEMM with the low-rank term in its accumulator), ``cublas``
            (torch.addmm with our low-rank term as its input C) or ``auto`` (then
            ``BRIDGE_LORA_GEMM``, else gemm_strategy's heuristic, untimed); Triton backend only.
        validate: check tokens/ranks/alphas values (free for Python sequences).

    Returns:
        y [..., N] in x's dtype.
    """
    _check_multi_args(x, weight, bias, lora_a, lora_b)
    check_dropout(dropout, dropout_position)
    gemm = gemm_strategy.requested_gemm(gemm)  # argument > BRIDGE_LORA_GEMM > auto
    n_slots, r_max, k = lora_a.shape
    m = math.prod(x.shape[:-1])
    slots = _slot_table(tokens_per_slot, ranks, alphas, m=m, n_slots=n_slots, r_max=r_max,
                        device=x.device, validate=validate)
    constraints = ((not weight.requires_grad,
                    "base weight requires grad (the fused path is for a frozen base)"),
                   (n_slots <= MAX_SLOTS, f"{n_slots} slots > {MAX_SLOTS} (kernel slot table)"),
                   (m < 2**31, f"{m} rows do not fit the int32 slot offsets"))
    choice = resolve_backend(backend, "multi_lora_linear", device=x.device, dtype=x.dtype,
                             constraints=constraints)
    x2d = x.reshape(m, k)
    p = float(dropout) if training else 0.0
    post = dropout_position == "post"
    if choice.name == "eager":
        y2d = _eager_multi_lora_linear(x2d, weight, bias, lora_a, lora_b, slots, tokens_per_slot,
                                       p=p, post=post, skip_bias_add=skip_bias_add, seed=seed)
    else:
        seed_t = None
        if p > 0.0:
            seed_t = draw_seed(x.device) if seed is None else seed_tensor(seed, x.device)
        if gemm == "auto":
            gemm = _auto_gemm(str(x.device), weight.shape[0], k)
        y2d, _ = torch.ops.bridge.multi_lora_linear_fwd(
            x2d, weight, None if skip_bias_add else bias, lora_a, lora_b, slots.offsets,
            slots.ranks, slots.scales, seed_t, p, post, gemm == "cublas", slots.deferred)
    return y2d.view(*x.shape[:-1], weight.shape[0])


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
