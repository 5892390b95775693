"""Numerics shared by the tests and the benchmarks: tolerances per dtype, the relative error every
comparison uses, the random input factories and the per-slot multi-LoRA oracle (written once;
import them, never copy them).

Tolerances are relative-norm bounds ||out - ref|| / ||ref|| against the fp64 reference, about one
ulp of the storage type for outputs rounded once from fp32 accumulators (bf16 2^-7, fp16 2^-10),
fp32 far above its rounding. ``"op"`` covers one fused op (a GEMM and the low-rank term) at test
sizes; ``"chain"`` several ops rounded in sequence (a norm in front of the GEMM); ``"bench"`` one
op at benchmark sizes (long reductions, fp32 on a GPU with TF32 allowed: see ``tf32``);
``"layer"`` a whole decoder layer step (dozens of roundings, gradients through attention).
"""

from __future__ import annotations

import torch

_TOLS = {
    "op": {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12},
    "chain": {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2,
              torch.float64: 1e-12},
    "bench": {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2,
              torch.float64: 1e-12},
    "layer": {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2,
              torch.float64: 1e-12},
}
TF32_TOL = 2e-3  # fp32 GEMMs on a GPU where TF32 is allowed (10-bit mantissa inputs)


def dtype_tol(dtype: torch.dtype, kind: str = "op", *, tf32: bool = False) -> float:
    """Relative-norm tolerance for results computed in ``dtype`` (``kind``: "op" | "chain" |
    "bench" | "layer"); ``tf32`` widens fp32 to TF32's rounding."""
    if tf32 and dtype == torch.float32:
        return max(TF32_TOL, _TOLS[kind][dtype])
    try:
        return _TOLS[kind][dtype]
    except KeyError:
        raise ValueError(f"no tolerance for kind={kind!r}, dtype={dtype}") from None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64: how every kernel test compares with the reference."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    """Assert shapes agree and rel_err(out, ref) < tol, naming ``what`` and the error."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def lora_inputs(lead: tuple[int, ...], k: int, n: int, r: int, dtype: torch.dtype, *,
                bias: bool = True, seed: int = 0, device: str | torch.device = "cpu",
                requires_grad: bool = True):
    """Fresh random (x [*lead, K], W [N, K], b [N] or None, A [r, K], B [N, r]) at the scale of a
    real layer (never zeros: B is random, not LoRA's zero init), drawn on the CPU from ``seed``
    (the same values on every device) and placed on ``device`` in ``dtype``. W is frozen; x, b, A
    and B require grad when ``requires_grad``."""
    g = torch.Generator().manual_seed(seed)

    def on(t: torch.Tensor, grad: bool) -> torch.Tensor:
        t = t.to(device=device, dtype=dtype)
        return t.requires_grad_() if grad and requires_grad else t

    x = on(torch.randn(*lead, k, generator=g), True)
    w = on(torch.randn(n, k, generator=g) / k**0.5, False)
    b = on(torch.randn(n, generator=g), True) if bias else None
    a = on(torch.randn(r, k, generator=g) / k**0.5, True)
    bb = on(torch.randn(n, r, generator=g), True)
    return x, w, b, a, bb


def norm_lora_inputs(shape: tuple[int, ...], n: int, r: int, dtype: torch.dtype,
                     norm: str = "RMSNorm", *, bias: bool = True, seed: int = 0,
                     device: str | torch.device = "cpu") -> dict[str, torch.Tensor | None]:
    """Fresh random inputs of the norm-fused LoRA linear, by argument name: x [*shape] (offset
    by 0.5 and scaled by 2 so LayerNorm's mean and variance matter), norm_weight [K] in
    [0.5, 1.5), norm_bias [K] (LayerNorm only, else None), weight [N, K], bias [N] or None,
    lora_a [r, K], lora_b [N, r] (random, never zeros). Drawn on the CPU from ``seed`` and
    placed on ``device`` in ``dtype``; none requires grad (callers pick the leaves)."""
    k = shape[-1]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = {
        "x": rnd(*shape) * 2 + 0.5,
        "norm_weight": torch.rand(k, generator=g) + 0.5,
        "norm_bias": rnd(k) * 0.1 if norm == "LayerNorm" else None,
        "weight": rnd(n, k) / k**0.5,
        "bias": rnd(n) if bias else None,
        "lora_a": rnd(r, k) / k**0.5,
        "lora_b": rnd(n, r),
    }
    return {name: None if v is None else v.to(device=device, dtype=dtype) for name, v in t.items()}


def slotwise_lora_ref(x2d: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, slot_a,
                      slot_b, tokens, ranks, alphas, dy2d: torch.Tensor, *, p: float = 0.0,
                      pos: str = "pre", mask: torch.Tensor | None = None,
                      skip_bias_add: bool = False):
    """The multi-LoRA oracle: single LoRA (``bridge.kernels.lora_linear_ref``, fp64) slot by
    slot, slot j with its first ``ranks[j]`` factors and scale ``alphas[j] / ranks[j]`` on its
    ``tokens[j]`` rows of x2d [M, K] (dY dy2d [M, N]; ``mask`` the keep mask of those rows,
    [M, K] 'pre' or [M, N] 'post'). ``slot_a`` / ``slot_b``: [n, r_max, K] / [n, N, r_max], or
    lists of [r_max, K] / [N, r_max]. Returns fp64 (y [M, N], dx [M, K], dbias [N] or None,
    dA [n, r_max, K], dB [n, N, r_max]) with zeros in the rank padding."""
    from bridge.kernels import lora_linear_ref

    d = lambda t: t.detach().double()  # noqa: E731
    masks = [None] * len(tokens) if mask is None else list(mask.split(list(tokens)))
    b64 = None if b is None else d(b).requires_grad_()
    ys, dxs, das, dbs = [], [], [], []
    rows = zip(d(x2d).split(list(tokens)), d(dy2d).split(list(tokens)), masks, strict=True)
    for j, (xj, gj, mj) in enumerate(rows):
        r = int(ranks[j])
        xj = xj.clone().requires_grad_()
        a = d(slot_a[j])[:r].clone().requires_grad_()
        bb = d(slot_b[j])[:, :r].clone().requires_grad_()
        y = lora_linear_ref(xj, d(w), b64, a, bb, scale=alphas[j] / r, dropout=p,
                            dropout_mask=mj, dropout_position=pos, skip_bias_add=skip_bias_add)
        y.backward(gj)
        ys.append(y.detach())
        dxs.append(xj.grad)
        da, db = torch.zeros_like(d(slot_a[j])), torch.zeros_like(d(slot_b[j]))
        da[:r], db[:, :r] = a.grad, bb.grad
        das.append(da)
        dbs.append(db)
    dbias = None if b64 is None else b64.grad
    return torch.cat(ys), torch.cat(dxs), dbias, torch.stack(das), torch.stack(dbs)


def grads(*tensors):
    """The ``.grad`` of each tensor (None for None)."""
    return [None if t is None else t.grad for t in tensors]
