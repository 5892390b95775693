"""``make bench``: run the grid that fits this machine (pytest runs the cases, kernels/_timing.py
times them: CUDA events with the L2 flushed on a GPU), print the summary, write results/plots.
CPU: the small grid timed on eager providers, plus the fused ops under the Triton interpreter
(a subprocess with TRITON_INTERPRET=1) for correctness and saved bytes only, plus the host time
per call at a tiny shape (benchmarks/host.py). GPU: the full grid, bf16, every provider natively,
the fused ones in each GEMM strategy (fused, cublas, auto).

    python -m benchmarks.run [--grid cpu|gpu] [--out DIR] [--budget-s S] [--no-interp] [-k EXPR]

Writes DIR/results.csv (one row per measurement), DIR/summary.txt, DIR/rates.json, DIR/*.png and,
when auto chose a strategy by timing, DIR/gemm_strategy.json (a copy of the chooser's cache file).
DIR defaults to benchmarks/results/<device-slug>-<YYYYmmdd-HHMMSS>.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import cases, results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODULES = [str(HERE / "bench_lora_linear.py"), str(HERE / "bench_norm_lora.py")]
DEFAULT_BUDGET_S = {"cpu": 100.0, "gpu": 150.0}  # per op module; the rest is skipped with a reason
INTERP_TIMEOUT_S = 120.0


def device_slug() -> str:
    """``cpu`` or ``gpu-<name>`` (e.g. gpu-nvidia-h200): the results folder's prefix."""
    if not torch.cuda.is_available():
        return "cpu"
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"gpu-{name}"


def default_out_dir() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return HERE / "results" / f"{device_slug()}-{stamp}"


def _pytest_args(extra: list[str]) -> list[str]:
    return [*MODULES, "-p", "no:cacheprovider", "-q", "-rfEs", f"--rootdir={REPO}", *extra]


def _run_interpreted(out: Path, timeout_s: float) -> tuple[list[dict], dict[str, str]]:
    """The fused ops under TRITON_INTERPRET=1 (a fresh process: the variable must be set before
    triton is imported). Returns its rows and, if it could not finish, why."""
    csv_path = out / "interp.csv"
    env = {**os.environ, "TRITON_INTERPRET": "1", cases.GRID_ENV: "interp",
           "BENCH_CSV": str(csv_path)}
    cmd = [sys.executable, "-m", "pytest", *_pytest_args([])]
    print(f"\n== fused ops under the Triton interpreter (not timed; limit {timeout_s:.0f} s)",
          flush=True)
    why = {}
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout_s)
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        log = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        why = {f"{op}/triton": f"interpreter run exceeded {timeout_s:.0f} s" for op in cases.OPS}
    (out / "interp.log").write_text(log)
    print("\n".join([ln for ln in log.splitlines() if ln.strip()][-12:]))
    rows = results.read_csv(csv_path) if csv_path.exists() else []
    for row in rows:
        if (row["note"] or "").startswith("skipped"):
            why[f"{row['op']}/{row['provider']}"] = row["note"].removeprefix("skipped: ")
    if csv_path.exists():
        csv_path.unlink()
    return rows, why


def _run_host(out: Path, timeout_s: float) -> list[dict]:
    """benchmarks/host.py under TRITON_INTERPRET=1 (a fresh process): the host_us rows."""
    path = out / "host.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    print("\n== host time per call (CPU, tiny shape)", flush=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.host", "--out", str(path)],
                              env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout_s)
        print(proc.stdout.strip() or proc.stderr[-2000:])
    except subprocess.TimeoutExpired:
        print(f"  host benchmark exceeded {timeout_s:.0f} s")
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    path.unlink()
    from benchmarks.measure import environment

    return [{**environment(), **r} for r in rows]


def _copy_gemm_cache(out: Path) -> str:
    """Copy the GEMM-strategy chooser's cache file next to the results (what auto measured)."""
    from bridge.kernels.gemm_strategy import chooser

    src = chooser().cache_path()
    if not src.exists():
        return "no GEMM-strategy cache file (auto timed nothing here)"
    shutil.copyfile(src, out / src.name)
    return f"GEMM-strategy cache: {src} -> {out / src.name}"


def _paired(k: str | None) -> dict[float, tuple[float, ...]]:
    """eager / PEFT fwd+bwd on the CPU grid's lora_linear cases, from alternating pairs."""
    if k:
        return {}
    from benchmarks.measure import Skip, paired_ratio

    print("\n== eager vs PEFT, fwd+bwd, alternating pairs", flush=True)
    out = {}
    for case in cases.make_grid("cpu").cases:
        if case.op == "lora_linear":
            try:
                out[case.p] = paired_ratio(case, "eager", "peft", "fwd+bwd", rounds=21)
            except Skip as exc:
                print(f"  p={case.p:g}: skipped: {exc}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--grid", choices=("cpu", "gpu"), default=None,
                    help="default: gpu when CUDA is available, else cpu")
    ap.add_argument("--out", type=Path, default=None, help="output folder")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds per op module before the remaining tests are skipped")
    ap.add_argument("--no-interp", action="store_true", help="skip the Triton-interpreter pass")
    ap.add_argument("--interp-timeout-s", type=float, default=INTERP_TIMEOUT_S)
    ap.add_argument("-k", default=None, help="pytest -k expression (a subset of the grid)")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    grid = args.grid or ("gpu" if torch.cuda.is_available() else "cpu")
    out = (args.out or default_out_dir()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[grid]
    os.environ.update({cases.GRID_ENV: grid, cases.BUDGET_ENV: str(budget),
                       "BENCH_CSV": str(out / "main.csv")})
    print(f"== benchmark grid '{grid}' -> {out} (budget {budget:.0f} s per op)", flush=True)
    extra = ["-k", args.k] if args.k else []
    code = pytest.main(_pytest_args(extra))

    rows = results.read_csv(out / "main.csv") if (out / "main.csv").exists() else []
    why: dict[str, str] = {}
    if grid == "cpu" and not args.no_interp:
        interp_rows, why = _run_interpreted(out, args.interp_timeout_s)
        rows += interp_rows
        if not args.k:
            rows += _run_host(out, args.interp_timeout_s)
    cache_note = _copy_gemm_cache(out)
    for part in ("main.csv",):
        (out / part).unlink(missing_ok=True)
    results.write_csv(rows, out / "results.csv")
    rates_path = out / "main.rates.json"
    rates = json.loads(rates_path.read_text()) if rates_path.exists() else {}
    rates_path.unlink(missing_ok=True)
    (out / "rates.json").write_text(json.dumps(rates, indent=1))

    if grid == "gpu":
        figures = results.gpu_figures(rows)
    else:
        figures = results.cpu_figures(rows, why, _paired(args.k))
    text = "\n".join([
        results.summary_table(rows),
        results.auto_table(rows),
        results.saved_table(rows),
        results.host_table(rows),
        "",
        f"machine: {rows[0]['device'] if rows else '?'}; measured peak "
        f"{rates.get('matmul_tflops', float('nan')):.3f} TFLOP/s GEMM, "
        f"{rates.get('copy_gbps', float('nan')):.1f} GB/s copy ({rates.get('note', '')})",
        f"load average (1 min) {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
        f"on {os.cpu_count()} cores" + ("  (shared cores: CPU times are noisy; see p20/p80)"
                                        if grid == "cpu" else ""),
        f"figures ({grid}):",
        *(f.line() for f in figures),
        cache_note,
    ])
    try:
        from benchmarks import plots

        pngs = plots.plot_all(out / "results.csv", out)
        text += f"\nplots: {', '.join(p.name for p in pngs)}"
    except Exception as exc:  # noqa: BLE001  (plots are a convenience: report, do not fail)
        text += f"\nplots not written: {type(exc).__name__}: {exc}"
    text += f"\nwall time {time.monotonic() - t0:.0f} s; results in {out}"
    print(text)
    (out / "summary.txt").write_text(text + "\n")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
