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
the oracle), the eager backend (its shrink and expand halves, ``multi_lora_shrink`` /
``multi_lora_expand``, are public: the MultiLoRA layer runs them around its tensor-parallel
collectives; two ``torch._grouped_mm`` where torch has them, else a loop), the registered ops and
the functional op. The Triton kernels, their configurations per architecture, the launchers and
the AOT specs live in kernels/_multi_lora_kernels.py. Three kernels, each used twice with roles
swapped:

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
from bridge.kernels._multi_lora_kernels import _launch_gemm, _launch_project, _launch_wgrad
from bridge.kernels._triton_common import current_arch
from bridge.kernels.backend import resolve_backend
from bridge.kernels.lora_linear import _compute_dtype, apply_dropout_mask, lora_linear_ref
from bridge.kernels.philox import draw_seed, dropout_keep_mask, seed_tensor

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
    """The eager backend's keep mask: kernels/philox.py's convention for ``seed`` (an int or an
    int64 tensor; drawn from torch's generator as the fused path draws it when None), so one seed
    gives one mask on every backend."""
    if p == 0.0:
        return None
    if seed is None:
        seed = draw_seed(device)
    return dropout_keep_mask(seed, shape, p, device)


def _rank_keep(ranks: torch.Tensor, r: int, rank_offset: int) -> torch.Tensor:
    """bool [n, r]: entry j of each slot's rank axis (global index rank_offset + j) is in use."""
    return (torch.arange(r, device=ranks.device) + rank_offset) < ranks.to(torch.int64)[:, None]


def _counts(offsets: torch.Tensor, counts) -> list[int]:
    return list(counts) if counts is not None else offsets.diff().tolist()  # the loop's sync


def multi_lora_shrink(inp: torch.Tensor, lora_a: torch.Tensor, offsets: torch.Tensor,
                      ranks: torch.Tensor, *, counts: Sequence[int] | None = None,
                      rank_offset: int = 0) -> torch.Tensor:
    """Eager shrink: S[i] = inp[i] A_j^T for the rows i of slot j, 0 at the slot's padding ranks.

    Args:
        inp: [M, C] rows grouped by slot (any dropout already applied).
        lora_a: [n, r, C] (strided is fine); row j of a slot is its global rank
            ``rank_offset + j`` (a tensor-parallel shard of the rank axis passes its offset).
        offsets: int32 [n + 1] row offsets; ranks: [n] slot ranks (global).
        counts: rows per slot as Python ints, when the caller has them (the slot loop needs
            them; otherwise one host sync).

    Returns:
        S [M, r] in the compute dtype (fp32; fp64 for fp64): two ``torch._grouped_mm`` where
        ``grouped_mm_available`` says so, else a loop over the slots. Padding is selected away
        with ``where`` (never multiplied: it may hold anything) and gets a zero gradient.
    """
    m, c = inp.shape
    r = lora_a.shape[1]
    ct = _compute_dtype(inp.dtype)
    keep = _rank_keep(ranks, r, rank_offset)
    a = torch.where(keep[:, :, None], lora_a, 0).to(ct)
    xc = inp.to(ct)
    if grouped_mm_available(inp.dtype, c, r, r, inp.device)[0]:
        s_mat = torch._grouped_mm(xc.contiguous(), a.transpose(1, 2), offsets[1:])
    else:
        s_mat = torch.cat([rows @ a[j].t()
                           for j, rows in enumerate(xc.split(_counts(offsets, counts)))])
    return _DenseGrad.apply(s_mat)


def multi_lora_expand(s_mat: torch.Tensor, lora_b: torch.Tensor, offsets: torch.Tensor,
                      ranks: torch.Tensor, scales: torch.Tensor, *,
                      counts: Sequence[int] | None = None) -> torch.Tensor:
    """Eager expand: out[i] = (s_j S[i]) B_j^T for the rows i of slot j, s_j = alpha_j / rank_j
    applied in fp32 to S (never folded into B), B's padding ranks selected away.

    Args:
        s_mat: [M, r] (from :func:`multi_lora_shrink`, possibly gathered over tensor parallel).
        lora_b: [n, N, r]; offsets, ranks, counts: as :func:`multi_lora_shrink`; scales: fp32 [n].

    Returns:
        [M, N] in the compute dtype of ``s_mat``.
    """
    m, r = s_mat.shape
    n_out = lora_b.shape[1]
    ct = _compute_dtype(s_mat.dtype)
    keep = _rank_keep(ranks, r, 0)
    b = torch.where(keep[:, None, :], lora_b, 0).to(ct)
    sc = s_mat.to(ct)
    scales = scales.to(ct)
    if grouped_mm_available(s_mat.dtype, r, n_out, r, s_mat.device)[0]:
        row_scale = torch.repeat_interleave(scales, offsets.diff(), output_size=m)
        out = torch._grouped_mm((sc * row_scale[:, None]).contiguous(), b.transpose(1, 2),
                                offsets[1:])
    else:
        out = torch.cat([(rows * scales[j]) @ b[j].t()
                         for j, rows in enumerate(sc.split(_counts(offsets, counts)))])
    return _DenseGrad.apply(out)


def _eager_multi_lora_linear(x2d, weight, bias, lora_a, lora_b, slots: _Slots, *, p, post,
                             skip_bias_add, seed):
    """The eager backend on x2d [M, K], in fp32 (fp64 for fp64): the frozen GEMM over all rows,
    then the low-rank term by :func:`multi_lora_shrink` and :func:`multi_lora_expand`. The
    dropout mask follows kernels/philox.py, as the fused kernels draw it."""
    m, k = x2d.shape
    r_max = lora_a.shape[1]
    n = weight.shape[0]
    if slots.host is None and slots.deferred:
        _check_slot_tensors(slots.offsets, slots.ranks, slots.scales, m, r_max)
    mask = _eager_mask((m, n) if post else (m, k), p, seed, x2d.device)
    ct = _compute_dtype(x2d.dtype)
    xc = x2d.to(ct)
    y = xc @ weight.to(ct).t()
    if bias is not None and not skip_bias_add:
        y = y + bias.to(ct)
    xd = xc if post else apply_dropout_mask(xc, mask, p)
    counts = slots.host[0] if slots.host is not None else None
    s_mat = multi_lora_shrink(xd, lora_a, slots.offsets, slots.ranks, counts=counts)
    low = multi_lora_expand(s_mat, lora_b, slots.offsets, slots.ranks, slots.scales,
                            counts=counts)
    if post:
        low = apply_dropout_mask(low, mask, p)
    return (y + low).to(x2d.dtype)


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


@gemm_strategy.assume_constant_result
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
        dropout, dropout_position, training, skip_bias_add, seed: as ``lora_linear``; the mask
            follows kernels/philox.py over x [M, K] ('pre') or y [M, N] ('post') on every
            backend, so one seed gives one mask (seed None: drawn from torch's generator).
        backend: auto | triton | eager (no CUDA C++ kernel exists for this op). The eager backend
            runs two torch._grouped_mm in fp32 (``grouped_mm_available``), else a loop over the
            slots (:func:`multi_lora_shrink`, :func:`multi_lora_expand`).
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
        y2d = _eager_multi_lora_linear(x2d, weight, bias, lora_a, lora_b, slots, p=p,
                                       post=post, skip_bias_add=skip_bias_add, seed=seed)
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
