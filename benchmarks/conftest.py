"""pytest plumbing of the benchmark modules: the grid, the measured machine rates, the ``bench``
fixture that measures one (case, provider, mode) through pytest-benchmark, the time budget, and
the CSV written when the session ends (to ``$BENCH_CSV``)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from benchmarks import roofline
from benchmarks.cases import BUDGET_ENV, Case, make_grid
from benchmarks.measure import Skip, environment, measure
from benchmarks.providers import PROVIDERS
from benchmarks.results import write_csv

CSV_ENV = "BENCH_CSV"
THREADS_ENV = "BENCH_THREADS"
ROWS: list[dict] = []
RATES: dict[str, object] = {}
_START: dict[str, float] = {}


def pytest_configure(config):
    """CPU grids run on one thread unless ``$BENCH_THREADS`` says otherwise: on cores shared with
    other processes, OpenMP barriers stall whenever one of two threads is descheduled (measured
    here: a 64x96x80 linear took 8 ms with 2 threads, 0.02 ms with 1; 512x1024x1024: 32 vs 14
    ms)."""
    if make_grid().cases[0].device == "cpu":
        torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))


@pytest.fixture(scope="session")
def grid():
    return make_grid()


@pytest.fixture(scope="session")
def rates(grid):
    """GEMM rate and copy bandwidth of this machine, measured once per session."""
    if not grid.timed:
        return None
    case = grid.cases[0]
    measured = roofline.measure_rates(torch.device(case.device), case.dtype)
    RATES.update(matmul_tflops=measured.matmul_flops / 1e12, copy_gbps=measured.copy_bytes / 1e9,
                 note=measured.note)
    return measured


def _row_stub(case: Case, provider: str, mode: str, note: str) -> dict:
    return {"op": case.op, "provider": provider, "mode": mode, "M": case.M, "K": case.K,
            "N": case.N, "r": case.r, "p": case.p, "dtype": case.dtype_name, "note": note,
            **environment()}


@pytest.fixture
def bench(request, grid, rates):
    """``bench(case, provider, mode)``: check, then measure and record one row (or skip)."""

    def run(case: Case, provider: str, mode: str) -> dict:
        budget = float(os.environ.get(BUDGET_ENV, "0") or 0)
        start = _START.setdefault(case.op, time.monotonic())
        if budget and time.monotonic() - start > budget:
            pytest.skip(f"time budget of {budget:.0f} s for {case.op} spent")
        ok, reason = PROVIDERS[provider].probe(case)
        if ok and provider == "compile":
            ok, reason = grid.compile_runs(case)
        if not ok:  # before the benchmark fixture is requested: pytest-benchmark warns otherwise
            ROWS.append(_row_stub(case, provider, mode, f"skipped: {reason}"))
            pytest.skip(f"{provider}: {reason}")
        timer = None
        if grid.timed:
            benchmark = request.getfixturevalue("benchmark")
            benchmark.group = f"{case.id} {mode}"

            def timer(target, setup=None, rounds=1, iterations=1, warmup=0):
                benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=iterations,
                                   warmup_rounds=warmup)
                return list(benchmark.stats.stats.data)
        try:
            row = measure(case, provider, mode, rates=rates, timer=timer)
        except Skip as exc:
            ROWS.append(_row_stub(case, provider, mode, f"skipped: {exc}"))
            pytest.skip(f"{provider}: {exc}")
        except AssertionError as exc:
            ROWS.append(_row_stub(case, provider, mode, f"FAILED check: {exc}"))
            raise
        ROWS.append(row)
        if grid.timed:
            benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
        return row

    return run


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(CSV_ENV)
    if path and ROWS:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_csv(ROWS, path)
        if RATES:
            with open(os.path.splitext(path)[0] + ".rates.json", "w") as f:
                json.dump(RATES, f, indent=1)
