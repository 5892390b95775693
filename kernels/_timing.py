"""One timer for the GEMM-strategy chooser and benchmarks/: CUDA events with the L2 cache flushed
before every rep on a GPU (as ``triton.testing.do_bench`` does), the host clock on a CPU.

GPU protocol per measurement: one untimed call (compilation, autotuning, cuBLAS heuristics), an
estimate from a few reps, then ``warmup_ms`` of untimed reps and ``rep_ms`` of timed reps (clamped
to [min_reps, max_reps]). Each timed rep zeroes a 256 MB buffer (wider than any L2: H100 50 MB),
records a start event, runs ``fn`` and records an end event; all reps are read after one
synchronize. The flush kernel keeps the GPU busy while the host enqueues ``fn``, so the first
kernel's launch latency is not in the time. Results are quantiles 0.5 / 0.2 / 0.8 in ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

FLUSH_BYTES = 256 << 20
QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    """Per-rep times of one measurement: median and p20/p80 in milliseconds, and the reps."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    times_ms: tuple[float, ...] = ()


@dataclass(frozen=True)
class Budget:
    """How long to measure: untimed warm-up and timed reps, in ms of the estimated rep time."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 1000
    flush: bool = True  # flush L2 before every rep (GPU only)


CHOOSER_BUDGET = Budget(warmup_ms=10.0, rep_ms=40.0, min_reps=5, max_reps=200)

_FLUSH: dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    buf = _FLUSH.get(device)
    if buf is None:
        buf = _FLUSH[device] = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
    return buf


def release_flush_buffers() -> None:
    """Free the L2 flush buffers (256 MB per GPU) once nothing more is timed."""
    _FLUSH.clear()


def _quantile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default method)."""
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> Timing:
    """Median and p20/p80 of per-rep times (ms)."""
    if not times_ms:
        raise ValueError("no times to summarize")
    s = sorted(times_ms)
    med, p20, p80 = (_quantile(s, q) for q in QUANTILES)
    return Timing(med, p20, p80, len(s), tuple(times_ms))


def _reps(estimate_ms: float, budget: Budget) -> tuple[int, int]:
    est = max(estimate_ms, 1e-4)
    warm = max(1, int(budget.warmup_ms / est))
    reps = int(min(budget.max_reps, max(budget.min_reps, budget.rep_ms / est)))
    return warm, reps


def bench_cuda(fn: Callable[..., object], *, setup: Callable[[], tuple] | None = None,
               budget: Budget = Budget(), device: torch.device | None = None) -> Timing:
    """Time ``fn(*setup())`` on the current CUDA stream with events (``setup`` untimed)."""
    device = torch.device(device if device is not None else "cuda")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cache = _flush_buffer(device) if budget.flush else None

    def run(n: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            args = setup() if setup else ()
            if cache is not None:
                cache.zero_()
            starts[i].record()
            fn(*args)
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]

    run(1)  # compile, autotune, cuBLAS heuristics: never timed
    warm, reps = _reps(min(run(3)), budget)
    run(min(warm, budget.max_reps))
    return summarize(run(reps))


def bench_host(fn: Callable[..., object], *, setup: Callable[[], tuple] | None = None,
               budget: Budget = Budget(), iterations: int | None = None) -> Timing:
    """Time ``fn(*setup())`` with the host clock (CPU tensors; no cache flush). ``iterations``
    calls per rep (default: as many as make a rep last >= 1 ms without ``setup``), so that
    microsecond calls are not swamped by the clock's resolution."""

    def once(n: int) -> float:
        args = setup() if setup else ()
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args)
        return (time.perf_counter() - t0) * 1e3 / n

    first = once(1)
    n = iterations or (1 if setup else max(1, int(1.0 / max(first, 1e-4))))
    warm, reps = _reps(first, budget)
    for _ in range(min(warm, budget.max_reps)):
        once(1)
    return summarize([once(n) for _ in range(reps)])


def bench(fn: Callable[..., object], device: torch.device | str, *,
          setup: Callable[[], tuple] | None = None, budget: Budget = Budget()) -> Timing:
    """CUDA events (L2 flushed) for a CUDA ``device``, the host clock otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return bench_cuda(fn, setup=setup, budget=budget, device=device)
    return bench_host(fn, setup=setup, budget=budget)
