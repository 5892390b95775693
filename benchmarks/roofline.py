"""FLOPs and minimal bytes per op, mode and provider, and the floor time they imply.

Notation: x [M, K], W [N, K] frozen, b [N], A [r, K], B [N, r]; e = bytes per element of the
model dtype; S = x~ A^T [M, r] and the norm statistics are kept in fp32 (4 bytes).

FLOPs (a multiply-add counts 2):
    forward   LoRA   2MNK + 2Mr(K + N)            (base GEMM, shrink, expand)
              frozen 2MNK
    backward  LoRA   2MNK + 4Mr(K + N)            (dX = dY W; dS = s dY B; dB = s dY^T S;
                                                   dX += (dS A) m/(1-p); dA = dS^T x~)
              frozen 2MNK                          (dX only: W is frozen)
    norm op: + c_fwd MK forward, + c_bwd MK backward (elementwise norm work; see NORM_FLOPS)

Minimal bytes (each tensor read or written once; the dropout mask is regenerated, never stored):
    forward   LoRA   read x, W, b, A, B; write y; write S (kept for backward)
              frozen read x, W, b; write y
    backward  LoRA   read dY, W, A, B, x (to rebuild x~ for dA), S; write dX, dA, dB
              frozen read dY, W; write dX
    norm op: + read the norm weight (and bias) and write the fp32 statistics (forward);
             + read them back (backward), x being read in both passes anyway.
    fwd+bwd = forward + backward.

The floor of a measurement is max(FLOPs / matmul rate, bytes / copy bandwidth), with both rates
measured in the same run (bf16 GEMM and a device copy on a GPU; fp32 GEMM and a copy on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from bridge.kernels._timing import Budget, bench

STAT_BYTES = 4  # fp32 statistics and S
# Elementwise FLOPs per element of x for the norm, forward and backward (approximate: they are
# ~1/1000 of the GEMM at K = 4096 and only matter for tiny N).
NORM_FLOPS = {"RMSNorm": (4, 8), "LayerNorm": (7, 14)}
NORM_STATS = {"RMSNorm": 1, "LayerNorm": 2}  # fp32 values kept per row (rstd; mean and rstd)


@dataclass(frozen=True)
class Work:
    """FLOPs and minimal bytes moved by one call."""

    flops: float
    bytes: float

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class Rates:
    """Attainable rates measured on this machine: GEMM FLOP/s and copy bytes/s."""

    matmul_flops: float
    copy_bytes: float
    note: str = ""


def _forward(M, K, N, r, e, lora, norm, bias) -> Work:  # noqa: N803
    flops = 2 * M * N * K
    nbytes = e * (M * K + N * K + M * N + (N if bias else 0))
    if lora:
        flops += 2 * M * r * (K + N)
        nbytes += e * (r * K + N * r) + STAT_BYTES * M * r
    if norm:
        flops += NORM_FLOPS[norm][0] * M * K
        nbytes += e * K * (2 if norm == "LayerNorm" else 1) + STAT_BYTES * NORM_STATS[norm] * M
    return Work(flops, nbytes)


def _backward(M, K, N, r, e, lora, norm) -> Work:  # noqa: N803
    flops = 2 * M * N * K
    nbytes = e * (M * N + N * K + M * K)  # read dY, W; write dX
    if lora:
        flops += 4 * M * r * (K + N)
        # read A, B, x, S; write dA, dB
        nbytes += e * (2 * (r * K + N * r) + M * K) + STAT_BYTES * M * r
    if norm:
        flops += NORM_FLOPS[norm][1] * M * K
        nbytes += e * K * (2 if norm == "LayerNorm" else 1) + STAT_BYTES * NORM_STATS[norm] * M
        if not lora:
            nbytes += e * M * K  # x is read again to recompute the norm's backward
    return Work(flops, nbytes)


def work(op: str, mode: str, M: int, K: int, N: int, r: int, elem_bytes: int, *,  # noqa: N803
         lora: bool = True, norm: str | None = None, bias: bool = True) -> Work:
    """FLOPs and minimal bytes of ``op`` in ``mode`` (forward | backward | fwd+bwd).

    ``lora=False`` is the frozen base (no adapter); ``norm`` names the norm in front
    (``op='norm_lora'``) or is None.
    """
    if op not in ("lora_linear", "norm_lora"):
        raise ValueError(f"unknown op {op!r}")
    if op == "norm_lora" and norm is None:
        raise ValueError("norm_lora needs norm='RMSNorm' or 'LayerNorm'")
    fwd = _forward(M, K, N, r, elem_bytes, lora, norm, bias)
    bwd = _backward(M, K, N, r, elem_bytes, lora, norm)
    if mode == "forward":
        return fwd
    if mode == "backward":
        return bwd
    if mode == "fwd+bwd":
        return fwd + bwd
    raise ValueError(f"unknown mode {mode!r}")


def floor_seconds(w: Work, rates: Rates) -> float:
    """The roofline floor: the slower of compute at the GEMM rate and traffic at copy bandwidth."""
    return max(w.flops / rates.matmul_flops, w.bytes / rates.copy_bytes)


def _best_time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of the fastest rep (kernels/_timing: CUDA events on a GPU, the host clock on a
    CPU): the attainable rate, not a typical one."""
    t = bench(fn, device, budget=Budget(warmup_ms=10.0, rep_ms=200.0, min_reps=5, max_reps=20,
                                        flush=False))
    return min(t.times_ms) / 1e3


def measure_rates(device: torch.device, dtype: torch.dtype) -> Rates:
    """GEMM FLOP/s (square matmul in ``dtype``) and copy bandwidth (read + write bytes per second),
    best rep: the attainable peak in this run, against which floors are drawn."""
    if device.type == "cuda":
        n, copy_numel = 8192, 1 << 28  # 1 GiB-class buffers defeat the L2 cache
    else:
        n, copy_numel = 1024, 1 << 24  # 64 MiB fp32 copy: larger than any LLC here
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = _best_time(lambda: torch.mm(a, b), device)
    src = torch.empty(copy_numel, device=device, dtype=dtype).uniform_()
    dst = torch.empty_like(src)
    t_cp = _best_time(lambda: dst.copy_(src), device)
    note = f"{str(dtype).replace('torch.', '')} {n}^3 matmul, {src.nbytes >> 20} MiB copy"
    return Rates(2 * n**3 / t_mm, 2 * src.nbytes / t_cp, note)
