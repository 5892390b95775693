"""Grouped (MoE expert) LoRA linear: for tokens sorted by expert,
y_e = x_e W_e^T (+ b_e) + s * B_e(A_e(dropout(x_e))), one expert per row block.

Read top to bottom: argument checks and the eager reference (oracle and eager backend), the host
launchers of the Triton kernels (which, with their configurations per architecture and AOT specs,
live in kernels/_grouped_kernels.py), the registered ops and the functional op that asks
kernels/backend.py for a backend.

Shapes: x [M, K] sorted by expert (any leading dims flattened into M), ``tokens_per_expert`` [E]
(m_splits: rows of expert e are the next c_e rows; zeros allowed), W_e [N, K] as a stacked
[E, N, K] tensor or as E separate tensors (Transformer Engine's ``weight{i}``, read in place through
a device array of their addresses), b [E, N], A [r, K] shared or [E, r, K] per expert, B [N, r]
shared or [E, N, r] per expert: Megatron-Bridge's shared adapter (both 2-D), per-expert adapters
(both 3-D) and its shared-outer layouts (fc1: A shared, B per expert; fc2: A per expert, B shared).
S = x~ A_e^T [M, r] is kept in fp32. Dropout follows kernels/philox.py with the row index of the
sorted [M, K] input (or [M, N] output): m is regenerated from the seed, never stored.

The eager backend draws its dropout mask with ``dropout_keep_mask``, the kernels' Philox
convention, so one seed is one mask on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from bridge.kernels._checks import check_dropout
from bridge.kernels._grouped_kernels import (
    REDUCE_BLOCK,
    _e_pad,
    _grouped_db_reduce_kernel,
    _grouped_dsdb_kernel,
    _grouped_lora_gemm_kernel,
    _grouped_rowgemm_kernel,
    _grouped_shrink_kernel,
    _kernel,
)
from bridge.kernels._lowrank import DSDB_BLOCK_M, launch_da, launch_dsdb, launch_shrink
from bridge.kernels._triton_common import (
    GEMM_RANK_STEP,
    current_arch,
    dropout_args,
    launch_common,
    rank_block,
    triton,
)
from bridge.kernels.backend import resolve_backend
from bridge.kernels.philox import draw_seed, dropout_keep_mask, seed_tensor

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
    """The eager backend: the reference under the kernels' Philox mask of ``seed`` (drawn from
    torch's RNG when None, as the fused path draws it), so one seed is one mask on every
    backend."""
    mask = None
    if p > 0.0:
        shape = x.shape if dropout_position == "pre" else (*x.shape[:-1], args.n)
        seed = draw_seed(x.device) if seed is None else seed
        mask = dropout_keep_mask(seed, shape, p, x.device)
    weight = args.weights[0] if args.stacked else args.weights
    return grouped_lora_linear_ref(x, weight, args.bias, lora_a, lora_b, tokens_per_expert,
                                   scale=scale, dropout=p, dropout_mask=mask,
                                   dropout_position=dropout_position)


# ---------------------------------------------------------------------------------------------
# Host launchers (2-D activations; ``counts`` int32 [E] on the activations' device). A 2-D
# lora_a/lora_b is shared by all experts (expert stride 0, or the dense kernels over all M).
# ---------------------------------------------------------------------------------------------

# Past this many bytes of dB partials, dB_e comes from the second pass over dY (rowgemm) whatever
# the traffic model says (_db_in_one_pass).
DB_PARTIALS_MAX_BYTES = 256 << 20
DB_STRATEGY = "auto"  # auto | partials | two_pass (tests force each path)

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
