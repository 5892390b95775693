"""Fused LoRA linear: y = x W^T + b + s * B(A(dropout(x))).

Read top to bottom: the eager reference (the oracle and the eager backend), the registered
torch.library ops, and the functional op that picks a backend per call (kernels/backend.py
decides) and a GEMM strategy (kernels/gemm_strategy.py: ``fused`` or ``cublas``). The Triton
kernels live in two modules shared with kernels/norm_lora.py: kernels/_lowrank.py (shrink, dS/dB,
dA, and the expand the cublas strategy adds in cuBLAS's epilogue) and kernels/_gemm.py (the fused
forward GEMM and dX).

Shapes: x [M, K] (any leading dims flattened into M), W [N, K], b [N], A [r, K], B [N, r],
S = x~ A^T [M, r] (fp32), s = scale. Dropout follows kernels/philox.py: x~ = x * m / (1 - p)
with m regenerated from (seed, element index) wherever it is needed, never stored.
"""

from __future__ import annotations

import math

import torch
from bridge.kernels import gemm_strategy
from bridge.kernels._checks import check_dropout, check_lora_args, check_scale, check_seed
from bridge.kernels._lowrank import launch_da, launch_dsdb, launch_shrink
from bridge.kernels.backend import resolve_backend
from bridge.kernels.gemm_strategy import gemm_dx, gemm_forward, requested_gemm
from bridge.kernels.philox import draw_seed, dropout_keep_mask, seed_tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types; fp64 stays fp64 (the test oracle runs in fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_dropout_mask(t: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """``t * mask / (1 - p)``; ``mask`` is a keep mask (bool or 0/1) of t's shape."""
    if mask is None or p == 0.0:
        return t
    if mask.shape != t.shape:
        raise ValueError(f"dropout mask shape {tuple(mask.shape)} != tensor shape {tuple(t.shape)}")
    return t * mask.to(t.dtype) / (1.0 - p)


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scale: float,
    dropout: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    dropout_position: str = "pre",
    skip_bias_add: bool = False,
) -> torch.Tensor:
    """Eager reference of the fused LoRA linear, computed in fp32 (fp64 for fp64 inputs).

    Args:
        x: [..., K] input.
        weight: [N, K] frozen base weight; bias: [N] or None.
        lora_a: [r, K]; lora_b: [N, r]; scale: s = alpha / r.
        dropout: probability p; dropout_mask: keep mask of x's shape ('pre') or of y's shape
            ('post'); None means no dropout (eval, or p = 0).
        skip_bias_add: leave the bias out of y (the caller adds it later, as Megatron does).

    Returns:
        y [..., N] in x's dtype: x W^T (+ b) + s * B(A(x~)), where x~ = x * mask / (1-p) ('pre'),
        or with the mask applied to B(A(x)) instead ('post').
    """
    check_lora_args(x, weight, bias, lora_a, lora_b)
    check_dropout(dropout, dropout_position)
    ct = _compute_dtype(x.dtype)
    xc, w, a, b = x.to(ct), weight.to(ct), lora_a.to(ct), lora_b.to(ct)
    y = xc @ w.t()
    if bias is not None and not skip_bias_add:
        y = y + bias.to(ct)
    if dropout_position == "pre":
        adapter = (apply_dropout_mask(xc, dropout_mask, dropout) @ a.t()) @ b.t()
    else:
        adapter = apply_dropout_mask((xc @ a.t()) @ b.t(), dropout_mask, dropout)
    return (y + scale * adapter).to(x.dtype)


def eager_keep_mask(seed: int | torch.Tensor | None, shape: tuple[int, ...] | torch.Size,
                    p: float, device: torch.device) -> torch.Tensor:
    """The keep mask the fused kernels would draw for ``seed`` (kernels/philox.py), for the
    eager paths: a seed drawn from torch's generator like the fused path's (``draw_seed``) when
    None. The Triton mask kernel on a CUDA device, the torch implementation elsewhere (CPU, meta,
    and inside torch.compile, where it traces)."""
    seed_t = draw_seed(device) if seed is None else seed
    backend = "torch" if torch.compiler.is_compiling() else None
    return dropout_keep_mask(seed_t, shape, p, device, backend=backend)


def _eager_lora_linear(x, weight, bias, lora_a, lora_b, *, scale, dropout, dropout_position,
                       training, skip_bias_add, seed):
    """The eager backend: the reference with the fused kernels' Philox mask (one seed, one mask
    on every backend; a fresh seed from torch's generator when ``seed`` is None)."""
    mask = None
    p = dropout if training else 0.0
    if p > 0.0:
        shape = x.shape if dropout_position == "pre" else (*x.shape[:-1], weight.shape[0])
        mask = eager_keep_mask(seed, shape, p, x.device)
    return lora_linear_ref(x, weight, bias, lora_a, lora_b, scale=scale, dropout=p,
                           dropout_mask=mask, dropout_position=dropout_position,
                           skip_bias_add=skip_bias_add)


# ---------------------------------------------------------------------------------------------
# Registered ops (custom_op + register_fake + register_autograd; see DESIGN.md for why not
# triton_op). Saved for backward: x, S and the seed (plus references to the parameters), the
# same for both GEMM strategies. ``gemm_fwd`` / ``gemm_bwd``: 'fused' | 'cublas', or 'auto' when
# the call was traced (resolved here from the remembered choice or the heuristic, never timed).
# ---------------------------------------------------------------------------------------------

_FWD_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
               "Tensor? seed, float scale, float p, bool post, str gemm_fwd=\"fused\", "
               "str gemm_bwd=\"fused\") -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor s_mat, "
               "Tensor? seed, float scale, float p, bool post, bool need_dx, "
               "str gemm=\"fused\") -> (Tensor, Tensor, Tensor)")


def _resolve(gemm: str, direction: str, x2d, weight, lora_a, seed, p, post, bias) -> str:
    n, k = weight.shape
    return gemm_strategy.resolve(gemm, "lora_linear", direction, device=x2d.device,
                                 dtype=x2d.dtype, m=x2d.shape[0], n=n, k=k, r=lora_a.shape[0],
                                 seed=seed, p=p, post=post, bias=bias)


@torch.library.custom_op("bridge::lora_linear_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _lora_linear_fwd_op(x, weight, bias, lora_a, lora_b, seed, scale, p, post, gemm_fwd="fused",
                        gemm_bwd="fused"):
    """(y [..., N], S [M, r] fp32). ``bias`` None means no bias in y; ``seed`` None or p == 0
    means no dropout; ``post`` puts the mask on B(A x) instead of x."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    s_mat = launch_shrink(x2d, lora_a, seed=None if post else seed, p=p)
    strategy = _resolve(gemm_fwd, "fwd", x2d, weight, lora_a, seed, p, post, bias is not None)
    y2d = gemm_forward(strategy, x2d, weight, bias, s_mat, lora_b, scale,
                       seed=seed if post else None, p=p)
    return y2d.view(*x.shape[:-1], weight.shape[0]), s_mat


@_lora_linear_fwd_op.register_fake
def _(x, weight, bias, lora_a, lora_b, seed, scale, p, post, gemm_fwd="fused", gemm_bwd="fused"):
    m = math.prod(x.shape[:-1])
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            x.new_empty((m, lora_a.shape[0]), dtype=torch.float32))


@torch.library.custom_op("bridge::lora_linear_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _lora_linear_bwd_op(dy, x, weight, lora_a, lora_b, s_mat, seed, scale, p, post, need_dx,
                        gemm="fused"):
    """(dx of x's shape, or an empty tensor when not need_dx; dA [r, K]; dB [N, r]). ``gemm``
    is the strategy of dX (the bias of the forward does not enter the backward key)."""
    n, k = weight.shape
    dy2d, x2d = dy.reshape(-1, n), x.reshape(-1, k)
    pre_seed, post_seed = (None, seed) if post else (seed, None)
    ds, db = launch_dsdb(dy2d, lora_b, s_mat, scale, seed=post_seed, p=p)
    if need_dx:
        strategy = _resolve(gemm, "bwd", x2d, weight, lora_a, seed, p, post, False)
        dx = gemm_dx(strategy, dy2d, weight, ds, lora_a, seed=pre_seed, p=p, out_dtype=x.dtype)
        dx = dx.view(x.shape)
    else:
        dx = x.new_empty(0)
    da = launch_da(ds, x2d, seed=pre_seed, p=p, out_dtype=lora_a.dtype)
    return dx, da, db


@_lora_linear_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, s_mat, seed, scale, p, post, need_dx, gemm="fused"):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, seed, scale, p, post, _gemm_fwd, gemm_bwd = inputs
    _, s_mat = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, s_mat, seed)
    ctx.scale, ctx.p, ctx.post, ctx.has_bias = scale, p, post, bias is not None
    ctx.gemm_bwd = gemm_bwd
    ctx.mark_non_differentiable(s_mat)


def _lora_linear_backward(ctx, dy, _ds_unused):
    x, weight, lora_a, lora_b, s_mat, seed = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = torch.ops.bridge.lora_linear_bwd(dy, x, weight, lora_a, lora_b, s_mat, seed,
                                                  ctx.scale, ctx.p, ctx.post, need_dx,
                                                  ctx.gemm_bwd)
    dbias = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        dbias = dy.reshape(-1, weight.shape[0]).sum(0, dtype=torch.float32).to(dy.dtype)
    return dx if need_dx else None, None, dbias, da, db, None, None, None, None, None, None


torch.library.register_autograd("bridge::lora_linear_fwd", _lora_linear_backward,
                                setup_context=_lora_linear_setup_context)


class _LoRALinearFunction(torch.autograd.Function):
    """How the functional op calls the registered op: the same setup_context and backward as its
    register_autograd formula (which stays, for direct callers and opcheck), without the autograd
    path of custom_op, which rebuilds the schema's argument list once per argument on every call
    (torch/_library/utils.py fill_defaults: ~5 us per argument here, ~60 us per call)."""

    @staticmethod
    def forward(ctx, *inputs):
        out = torch.ops.bridge.lora_linear_fwd(*inputs)  # grad mode is off here: no autograd
        _lora_linear_setup_context(ctx, inputs, out)
        return out

    backward = staticmethod(_lora_linear_backward)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lora_linear_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, *, scale: float, p: float,
                      post: bool, seed: int | torch.Tensor | None = None, gemm: str = "auto",
                      gemm_group=None) -> torch.Tensor:
    """The fused op after the checks: arguments already validated by the caller (``lora_linear``,
    or bridge.peft.fused_forward once per module and key) and a fused backend chosen.

    ``p`` is the effective dropout probability (0 in eval), ``post`` the mask position, ``bias``
    None also for skip_bias_add; ``gemm`` the requested strategy after the environment
    (``requested_gemm``); ``gemm_group`` the tensor-parallel group whose ranks must agree."""
    seed_t = None
    if p > 0.0:
        seed_t = draw_seed(x.device) if seed is None else seed_tensor(seed, x.device)
    x2d = x.reshape(-1, x.shape[-1])
    fwd, bwd = gemm_strategy.select(
        "lora_linear", gemm, x2d=x2d, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
        scale=scale, seed=seed_t, p=p, post=post, need_bwd=_needs_grad(x, bias, lora_a, lora_b),
        dx_dtype={"fused": x.dtype, "cublas": x.dtype}, group=gemm_group)
    y, _ = _LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, seed_t, float(scale),
                                     float(p), post, fwd, bwd)
    return y


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scale: float,
    dropout: float = 0.0,
    dropout_position: str = "pre",
    training: bool = True,
    skip_bias_add: bool = False,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
    gemm: str = "auto",
    gemm_group=None,
) -> torch.Tensor:
    """y = x W^T (+ b) + s * B(A(dropout(x))) on the backend that kernels/backend.py picks.

    ``gemm``: 'auto' | 'fused' | 'cublas' (kernels/gemm_strategy.py; ``BRIDGE_LORA_GEMM`` when
    'auto' is passed); ignored by the eager backend. ``gemm_group``: the tensor-parallel process
    group of this layer (its ranks then agree on the strategy), or None. ``seed``: the dropout
    seed (int or int64 tensor [1]; drawn from torch's generator when None); one seed gives one
    mask on every backend (kernels/philox.py).

    Raises:
        TypeError, ValueError: a bad argument (named): non-floating or mismatched tensors, a
            scale that is not a finite number, a seed outside int64, dropout outside [0, 1).
        BackendUnavailableError: an explicit backend that cannot run this call (why, and what
            to do)."""
    check_lora_args(x, weight, bias, lora_a, lora_b)
    check_dropout(dropout, dropout_position)
    scale = check_scale(scale)
    check_seed(seed)
    gemm = requested_gemm(gemm)
    frozen = (not weight.requires_grad,
              "base weight requires grad (the fused path is for a frozen base)")
    choice = resolve_backend(backend, "lora_linear", device=x.device, dtype=x.dtype,
                             constraints=(frozen,))
    if choice.name == "eager":
        return _eager_lora_linear(x, weight, bias, lora_a, lora_b, scale=scale, dropout=dropout,
                                  dropout_position=dropout_position, training=training,
                                  skip_bias_add=skip_bias_add, seed=seed)
    return lora_linear_fused(x, weight, None if skip_bias_add else bias, lora_a, lora_b,
                             scale=scale, p=float(dropout) if training else 0.0,
                             post=dropout_position == "post", seed=seed, gemm=gemm,
                             gemm_group=gemm_group)
