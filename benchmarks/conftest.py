"""pytest plumbing of the benchmark modules: the grid, the measured machine rates, the ``bench``
fixture that checks and measures one (case, provider, gemm, mode) of the dense ops with the shared
timer (kernels/_timing.py: CUDA events and an L2 flush on a GPU), the ``record`` fixture through
which the grouped and multi-LoRA modules add their rows, the time budget per op, and the one CSV
(``results.COLUMNS``) written when the session ends (to ``$BENCH_CSV``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import roofline
from benchmarks.cases import Case, budget_spent, make_grid
from benchmarks.measure import Skip, environment, measure
from benchmarks.providers import provider as get_provider
from benchmarks.results import write_csv

CSV_ENV = "BENCH_CSV"
THREADS_ENV = "BENCH_THREADS"
ROWS: list[dict] = []
RATES: dict[str, object] = {}


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


def _row_stub(case: Case, provider: str, gemm: str, mode: str, note: str) -> dict:
    return {"op": case.op, "provider": provider, "gemm": gemm or None, "mode": mode, "M": case.M,
            "K": case.K, "N": case.N, "r": case.r, "p": case.p, "dtype": case.dtype_name,
            "note": note, **environment()}


@pytest.fixture
def bench(grid, rates):
    """``bench(case, provider, gemm, mode)``: check, then measure and record one row (or
    skip)."""

    def run(case: Case, provider: str, gemm: str, mode: str) -> dict:
        name = f"{provider}:{gemm}" if gemm else provider
        spent = budget_spent(case.op)
        if spent:
            pytest.skip(spent)
        ok, reason = get_provider(provider, gemm).probe(case)
        if ok and provider == "compile":
            ok, reason = grid.compile_runs(case)
        if not ok:
            ROWS.append(_row_stub(case, provider, gemm, mode, f"skipped: {reason}"))
            pytest.skip(f"{name}: {reason}")
        try:
            row = measure(case, provider, mode, rates=rates, timed=grid.timed, gemm=gemm,
                          count_saved=not gemm or gemm in grid.saved_gemms)
        except Skip as exc:
            ROWS.append(_row_stub(case, provider, gemm, mode, f"skipped: {exc}"))
            pytest.skip(f"{name}: {exc}")
        except AssertionError as exc:
            ROWS.append(_row_stub(case, provider, gemm, mode, f"FAILED check: {exc}"))
            raise
        ROWS.append(row)
        return row

    return run


@pytest.fixture
def record():
    """``record(rows)``: add schema rows (``results.COLUMNS``) to the session CSV."""
    return ROWS.extend


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(CSV_ENV)
    if path and ROWS:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_csv(ROWS, path)
        if RATES:
            with open(os.path.splitext(path)[0] + ".rates.json", "w") as f:
                json.dump(RATES, f, indent=1)
