"""``make bench``: run the benchmarks that fit this machine, print the summary (the layer step's
ratios first), write one results CSV (``results.COLUMNS``), plots and the kernel caches.

Steps (each with its own time limit; one that fails or runs out of time is reported, the others
still run):
    1. pytest over the op modules (``--ops``: lora_linear, norm_lora, grouped_lora_linear,
       multi_lora_linear), timed with kernels/_timing.py (CUDA events with the L2 flushed on a
       GPU). CPU: the eager providers timed on the small grid; the grouped and multi-LoRA
       modules' saved bytes at their GPU shapes on meta tensors.
    2. CPU only, in parallel (neither is a timed comparison): the fused ops under the Triton
       interpreter (a subprocess with TRITON_INTERPRET=1: correctness on small odd shapes,
       saved bytes; not timed), and the layer step ``python -m benchmarks.bench_layer`` (its
       own process: TRITON_INTERPRET must be set before triton is imported).
       GPU: the layer step after step 1.
    3. CPU only: host time per call (benchmarks/host.py) and eager/PEFT alternating pairs.

    python -m benchmarks.run [--grid cpu|gpu|tiny] [--ops a,b] [--out DIR] [--budget-s S]
                             [--no-interp] [--no-host] [--no-layer] [--no-plots] [-k EXPR]
    python -m benchmarks.run --merge DIR [DIR ...] --out DIR     # combine parts (gpu_check.sh)

Writes DIR/results.csv, DIR/summary.txt, DIR/rates.json, DIR/layer.csv (+ layer.summary.txt,
bench_layer's own columns), DIR/*.png, DIR/kernel-cache/ (the GEMM-strategy chooser's and the
autotuner's JSON files, what auto and the autotuner chose here). DIR defaults to
benchmarks/results/<device-slug>-<YYYYmmdd-HHMMSS>.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import cases, results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODULES = {"lora_linear": "bench_lora_linear.py", "norm_lora": "bench_norm_lora.py",
           "grouped_lora_linear": "bench_grouped_lora_linear.py",
           "multi_lora_linear": "bench_multi_lora_linear.py"}
DEFAULT_BUDGET_S = {"cpu": 45.0, "gpu": 150.0, "tiny": 30.0}  # per op module, then skipped
TIMEOUT_S = {"interp": 150.0, "layer": 170.0, "host": 90.0}  # per subprocess step
GRACE_S = 10.0  # after SIGINT (pytest then writes what it measured), before SIGKILL


def device_slug() -> str:
    """``cpu`` or ``gpu-<name>`` (e.g. gpu-nvidia-h200): the results folder's prefix."""
    if not torch.cuda.is_available():
        return "cpu"
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"gpu-{name}"


def default_out_dir() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return HERE / "results" / f"{device_slug()}-{stamp}"


def _log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def _pytest_args(ops: list[str], extra: list[str]) -> list[str]:
    return [*(str(HERE / MODULES[op]) for op in ops), "-p", "no:cacheprovider", "-q", "-rfEs",
            f"--rootdir={REPO}", *extra]


# ---- subprocess steps --------------------------------------------------------------------------
class Job:
    """A subprocess step with a wall-clock limit; its output goes to ``log``."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path, timeout_s: float):
        self.name, self.log, self.timeout_s = name, log, timeout_s
        self.t0 = time.monotonic()
        _log(f"start {name} (limit {timeout_s:.0f} s): {' '.join(cmd[1:])}")
        self._file = open(log, "w")  # noqa: SIM115  (closed in wait)
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self._file,
                                     stderr=subprocess.STDOUT, text=True)

    def wait(self) -> str:
        """Wait within the limit (SIGINT at the limit, SIGKILL after GRACE_S); returns '' or
        why the step did not finish cleanly."""
        why = ""
        try:
            rc = self.proc.wait(timeout=max(0.0, self.t0 + self.timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            rc, why = None, f"{self.name} exceeded its {self.timeout_s:.0f} s limit"
        self._file.close()
        if rc:
            why = f"{self.name} exited with {rc} (see {self.log.name})"
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        _log(f"end {self.name} after {time.monotonic() - self.t0:.0f} s"
             + (f": {why}" if why else "") + "\n  " + "\n  ".join(lines[-8:]))
        return why


def _interp_job(out: Path, ops: list[str], timeout_s: float) -> Job:
    env = {**os.environ, "TRITON_INTERPRET": "1", cases.GRID_ENV: "interp",
           "BENCH_CSV": str(out / "interp.csv")}
    return Job("interpreter", [sys.executable, "-m", "pytest", *_pytest_args(ops, [])], env,
               out / "interp.log", timeout_s)


def _interp_rows(out: Path, why: str) -> tuple[list[dict], dict[str, str]]:
    csv_path = out / "interp.csv"
    rows = results.read_csv(csv_path) if csv_path.exists() else []
    csv_path.unlink(missing_ok=True)
    skips = {f"{op}/triton": why for op in cases.OPS} if why else {}
    for row in rows:
        if (row["note"] or "").startswith("skipped"):
            skips[f"{row['op']}/{row['provider']}"] = row["note"].removeprefix("skipped: ")
    return rows, skips


def _layer_job(out: Path, grid: str, timeout_s: float, specs: list[str]) -> Job:
    env = {**os.environ, "BENCH_THREADS": os.environ.get("BENCH_THREADS", "1")}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # bench_layer's fused provider: the interpreter
    cmd = [sys.executable, "-m", "benchmarks.bench_layer", "--grid", grid,
           "--csv", str(out / "layer.csv"), *(a for s in specs for a in ("--spec", s))]
    return Job("layer step", cmd, env, out / "layer.log", timeout_s)


def _host_rows(out: Path, timeout_s: float) -> list[dict]:
    """benchmarks/host.py under TRITON_INTERPRET=1 (a fresh process): the host_us rows."""
    path = out / "host.json"
    job = Job("host time per call", [sys.executable, "-m", "benchmarks.host", "--out", str(path)],
              {**os.environ, "TRITON_INTERPRET": "1"}, out / "host.log", timeout_s)
    job.wait()
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    path.unlink()
    from benchmarks.measure import environment

    return [{**environment(), **r} for r in rows]


def _paired(k: str | None) -> dict[float, tuple[float, ...]]:
    """eager / PEFT fwd+bwd on the CPU grid's lora_linear cases, from alternating pairs."""
    if k:
        return {}
    from benchmarks.measure import Skip, paired_ratio

    _log("eager vs PEFT, fwd+bwd, alternating pairs")
    out = {}
    for case in cases.make_grid("cpu").cases:
        if case.op == "lora_linear":
            try:
                out[case.p] = paired_ratio(case, "eager", "peft", "fwd+bwd", rounds=21)
            except Skip as exc:
                print(f"  p={case.p:g}: skipped: {exc}")
    return out


def _copy_kernel_cache(out: Path) -> str:
    """The GEMM-strategy chooser's and the autotuner's JSON files next to the results (what auto
    and the autotuner chose), unless ``$BRIDGE_KERNEL_CACHE`` says where they are kept (as
    gpu_check.sh does: $OUT/kernel-cache)."""
    from bridge.kernels._triton_common import kernel_cache_dir

    src = kernel_cache_dir().resolve()
    files = sorted(src.glob("*.json")) if src.is_dir() else []
    if not files:
        return f"no kernel cache files in {src} (auto and the autotuner timed nothing here)"
    if src.is_relative_to(out) or os.environ.get("BRIDGE_KERNEL_CACHE"):  # kept where chosen
        return f"kernel cache: {', '.join(f.name for f in files)} in {src}"
    dst = out / "kernel-cache"
    dst.mkdir(exist_ok=True)
    for f in files:
        shutil.copyfile(f, dst / f.name)
    return f"kernel cache: {', '.join(f.name for f in files)} copied from {src} to {dst}"


# ---- the summary -------------------------------------------------------------------------------
def summarize(out: Path, rows: list[dict], *, gpu: bool, layer_text: str, skips=None,
              paired=None, notes: list[str] = (), plot: bool = True) -> str:
    """Write results.csv, summary.txt and (``plot``) the plots, in that order (a run stopped
    while plotting keeps the first two); return the summary text: the layer step first, then
    each op's tables, saved bytes, host time, figures."""
    results.add_frozen_ratios(rows)
    results.write_csv(rows, out / "results.csv")
    rates_path = out / "rates.json"
    rates = json.loads(rates_path.read_text()) if rates_path.exists() else {}
    figures = results.variant_figures(rows, gpu)
    if any(r["op"] in cases.OPS for r in rows):
        figures = (results.gpu_figures(rows) if gpu else
                   results.cpu_figures(rows, skips, paired)) + figures
    problems = results.problems(rows)
    machine = f"machine: {rows[0]['device'] if rows else '?'}"
    if rates:
        machine += (f"; measured peak {rates['matmul_tflops']:.3f} TFLOP/s GEMM, "
                    f"{rates['copy_gbps']:.1f} GB/s copy ({rates.get('note', '')})")
    tables = [results.summary_table(rows), results.auto_table(rows),
              *(results.variant_table(rows, op) for op in ("grouped_lora_linear",
                                                           "multi_lora_linear")),
              results.saved_table(rows), results.host_table(rows)]
    text = "\n".join([
        "== layer step (benchmarks/bench_layer.py: a LoRA training step of decoder layers)",
        layer_text.strip() or "  not run",
        "", "== ops", *(t for t in tables if t), "", machine,
        f"figures ({'gpu' if gpu else 'cpu'}):", *(f.line() for f in figures),
        *(["skipped or failed:", *problems] if problems else []), *notes,
    ])
    (out / "summary.txt").write_text(text + "\n")
    if not plot:
        return text
    try:
        from benchmarks import plots

        pngs = plots.plot_all(out / "results.csv", out)
        line = f"plots: {', '.join(p.name for p in pngs)}"
    except Exception as exc:  # noqa: BLE001  (plots are a convenience: report, do not fail)
        line = f"plots not written: {type(exc).__name__}: {exc}"
    with open(out / "summary.txt", "a") as f:
        f.write(line + "\n")
    return text + "\n" + line


def _layer_part(out: Path, why: str) -> tuple[list[dict], str]:
    """The layer step's rows (converted to results.COLUMNS) and its own summary text."""
    csv_path, txt = out / "layer.csv", out / "layer.summary.txt"
    rows = results.rows_from_layer_csv(csv_path) if csv_path.exists() else []
    text = txt.read_text() if txt.exists() else ""
    if why:
        text = f"  {why}\n{text}"
    return rows, text


def _concat_csv(paths: list[Path], dst: Path) -> None:
    """Rows of CSV files with one header (bench_layer's, one file per process) into one file."""
    import csv

    rows, fields = [], None
    for p in paths:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            fields = fields or reader.fieldnames
            rows += list(reader)
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or [], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def merge(dirs: list[Path], out: Path, plot: bool = True) -> int:
    """Combine the parts gpu_check.sh writes (one folder per stage) into one results folder."""
    rows, layer_text, layer_csvs, notes = [], "", [], []
    out.mkdir(parents=True, exist_ok=True)
    for d in dirs:
        if (d / "results.csv").exists():
            rows += results.read_csv(d / "results.csv")
        elif (d / "layer.csv").exists():
            part, text = _layer_part(d, "")
            rows = part + rows  # the layer step first
            layer_text += text
            layer_csvs.append(d / "layer.csv")
        else:
            notes.append(f"part {d.name}: no results (see logs/ for its stage)")
        if (d / "rates.json").exists() and not (out / "rates.json").exists():
            shutil.copyfile(d / "rates.json", out / "rates.json")
    if layer_csvs:
        _concat_csv(layer_csvs, out / "layer.csv")
        (out / "layer.summary.txt").write_text(layer_text)
    gpu = any("cpu" not in (r.get("device") or "cpu").lower() for r in rows)
    notes.append(_copy_kernel_cache(out.resolve()))
    print(summarize(out, rows, gpu=gpu, layer_text=layer_text, notes=notes, plot=plot))
    return 0 if rows else 1


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--grid", choices=("cpu", "gpu", "tiny"), default=None,
                    help="default: gpu when CUDA is available, else cpu")
    ap.add_argument("--ops", default=",".join(MODULES), help="comma-separated op modules")
    ap.add_argument("--out", type=Path, default=None, help="output folder")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds per op module before its remaining cases are skipped")
    ap.add_argument("--no-interp", action="store_true", help="skip the Triton-interpreter pass")
    ap.add_argument("--no-host", action="store_true", help="skip host time and alternating pairs")
    ap.add_argument("--no-layer", action="store_true", help="skip the layer step")
    ap.add_argument("--no-plots", action="store_true", help="write no plots (benchmarks.plots "
                    "draws them from results.csv later)")
    ap.add_argument("--layer-grid", choices=("cpu", "gpu", "tiny"), default=None,
                    help="bench_layer's grid (default: the run's grid)")
    ap.add_argument("--layer-spec", action="append", default=[], help="bench_layer --spec")
    for step, limit in TIMEOUT_S.items():
        ap.add_argument(f"--{step}-timeout-s", type=float, default=limit)
    ap.add_argument("-k", default=None, help="pytest -k expression (a subset of the cases)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="only combine these part folders into --out")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, (args.out or default_out_dir()).resolve(), not args.no_plots)

    import pytest

    t0, load0 = time.monotonic(), os.getloadavg()[0]
    grid = args.grid or ("gpu" if torch.cuda.is_available() else "cpu")
    ops = [op for op in args.ops.split(",") if op]
    unknown = sorted(set(ops) - set(MODULES))
    if unknown:
        ap.error(f"unknown op(s) {unknown}; expected some of {', '.join(MODULES)}")
    out = (args.out or default_out_dir()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[grid]
    os.environ.update({cases.GRID_ENV: grid, cases.BUDGET_ENV: str(budget),
                       "BENCH_CSV": str(out / "main.csv")})
    _log(f"benchmark grid '{grid}', ops {', '.join(ops)} -> {out} (budget {budget:.0f} s per op)")
    code = pytest.main(_pytest_args(ops, ["-k", args.k] if args.k else []))
    rows = results.read_csv(out / "main.csv") if (out / "main.csv").exists() else []
    (out / "main.csv").unlink(missing_ok=True)
    rates_path = out / "main.rates.json"
    if rates_path.exists():
        rates_path.replace(out / "rates.json")
    _log(f"pytest over {', '.join(ops)}: exit {int(code)}, {len(rows)} rows")

    cpu = grid != "gpu"
    interp = _interp_job(out, ops, args.interp_timeout_s) if cpu and not args.no_interp else None
    layer = None if args.no_layer else _layer_job(out, args.layer_grid or grid,
                                                  args.layer_timeout_s, args.layer_spec)
    skips: dict[str, str] = {}
    if interp is not None:
        interp_rows, skips = _interp_rows(out, interp.wait())
        rows += interp_rows
    layer_rows, layer_text = _layer_part(out, layer.wait()) if layer else ([], "")
    rows = layer_rows + rows
    paired = {}
    if grid == "cpu" and not args.no_host and not args.k:
        rows += _host_rows(out, args.host_timeout_s)
        if "lora_linear" in ops:
            paired = _paired(args.k)
    notes = [
        f"load average (1 min) {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
        f"{os.cpu_count()} cores" + ("  (shared cores: CPU times are noisy; see p20/p80)"
                                     if cpu else ""),
        _copy_kernel_cache(out),
        f"wall time {time.monotonic() - t0:.0f} s; results in {out}",
    ]
    print(summarize(out, rows, gpu=not cpu, layer_text=layer_text, skips=skips, paired=paired,
                    notes=notes, plot=not args.no_plots))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
