"""Render a results CSV (by default the latest GPU run) as Markdown for the README.

    python -m benchmarks.render_table [benchmarks/results/gpu-.../results.csv] [--out FILE]

The headline figures with their targets first (the layer step's among them), then per op (the
layer step, the dense ops, grouped, multi-LoRA) and mode: one row per shape (and variant), one
column per provider (the fused ones per GEMM strategy: ``triton:fused``, ``triton:cublas``,
``triton:auto``), "median ms (x frozen)", and auto's fraction of the roofline floor where known;
then saved-for-backward bytes and peak memory per provider.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.cases import AUTO, BASELINE, FUSED, MODES, label
from benchmarks.results import (
    cpu_figures,
    gpu_figures,
    ops_and_providers,
    read_csv,
    row_label,
    variant_figures,
)

RESULTS = Path(__file__).resolve().parent / "results"


def latest_csv(prefix: str = "gpu-") -> Path:
    found = sorted(RESULTS.glob(f"{prefix}*/results.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {RESULTS}/{prefix}*/results.csv; run benchmarks/gpu_check.sh")
    return found[-1]


def _shape(row: dict) -> str:
    variant = f" {row['variant']}" if row.get("variant") else ""
    return f"{row['M']}x{row['K']}x{row['N']} r{row['r']} p{row['p']:g}{variant}"


def _mib(x) -> str:
    return "" if x is None else f"{x / 2**20:.1f}"


def render(rows: list[dict], rates: dict | None = None) -> str:
    if not rows:
        return "_no rows_\n"
    first = rows[0]
    lines = [f"Device: {first['device']}; torch {first['torch']}; triton {first['triton']}; "
             f"{first['date']}; dtype {first['dtype']}."]
    if rates:
        lines.append(f"Measured peaks in the same run: {rates['matmul_tflops']:.3g} TFLOP/s GEMM, "
                     f"{rates['copy_gbps']:.0f} GB/s copy ({rates.get('note', '')}).")
    gpu = any(r["device"] and "cpu" not in r["device"].lower() for r in rows)
    figs = variant_figures(rows, gpu) + (gpu_figures(rows) if gpu else cpu_figures(rows))
    lines += ["", "| figure | value | target | |", "|---|---|---|---|"]
    for f in figs:
        value = "n/a" if f.value is None else f"{f.value:.3f}"
        verdict = {True: "meets", False: "misses", None: f.why}[f.met]
        lines.append(f"| {f.name} | {value} | {f.target} | {verdict} |")
    for op, providers in ops_and_providers(rows).items():
        for mode in MODES:
            table: dict[str, dict[str, dict]] = defaultdict(dict)
            for r in rows:
                if r["op"] == op and r["mode"] == mode and r["median_ms"] is not None:
                    table[_shape(r)][row_label(r)] = r
            if not table:
                continue
            present = [p for p in providers if any(p in v for v in table.values())]
            fused = next((label(f, AUTO) for f in reversed(FUSED) if label(f, AUTO) in present),
                         None)
            head = ("| shape | " + " | ".join(present)
                    + (f" | {fused} % of roofline |" if fused else " |"))
            lines += ["", f"**{op}, {mode}**: median ms (x {BASELINE})", "", head,
                      "|" + "---|" * (len(present) + 1 + bool(fused))]
            for shape, provs in table.items():
                base = provs.get(BASELINE, {}).get("median_ms")
                cells = []
                for p in present:
                    if p not in provs:
                        cells.append("-")
                        continue
                    ms = provs[p]["median_ms"]
                    cells.append(f"{ms:.3f} ({ms / base:.2f})" if base else f"{ms:.3f}")
                if fused:
                    frac = provs.get(fused, {}).get("roofline_frac")
                    cells.append("-" if frac is None else f"{100 * frac:.0f}%")
                lines.append(f"| {shape} | " + " | ".join(cells) + " |")
        mem: dict[str, dict[str, dict]] = defaultdict(dict)
        for r in rows:
            if r["op"] == op and r["saved_bytes"] is not None and r["mode"] != "backward":
                if r["mode"] == "fwd+bwd" or row_label(r) not in mem[_shape(r)]:
                    mem[_shape(r)][row_label(r)] = r
        if mem:
            present = [p for p in providers if any(p in v for v in mem.values())]
            lines += ["", f"**{op}**: MiB saved for backward (weights aside) / peak MiB, fwd+bwd",
                      "",
                      "| shape | " + " | ".join(present) + " |", "|" + "---|" * (len(present) + 1)]
            for shape, provs in mem.items():
                cells = [f"{_mib(provs[p]['saved_bytes'])} / {_mib(provs[p].get('peak_mem_bytes'))}"
                         if p in provs else "-" for p in present]
                lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    host = [r for r in rows if r["mode"] == "host"]
    if host:
        lines += ["", "**host time per training forward** (CPU, tiny shape, kernel time out)", "",
                  "| provider | us | note |", "|---|---|---|"]
        lines += [f"| {row_label(r)} | "
                  f"{'' if r['host_us'] is None else format(r['host_us'], '.1f')} | "
                  f"{r['note'] or ''} |" for r in host]
    skipped = sorted({(r["op"], row_label(r), r["note"]) for r in rows
                      if (r["note"] or "").startswith(("skipped", "FAILED"))})
    if skipped:
        lines += ["", "Skipped or failed:"] + [f"- {op} / {prov}: {note}"
                                                for op, prov, note in skipped]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv", type=Path, nargs="?", default=None, help="default: the latest GPU run")
    ap.add_argument("--out", type=Path, default=None, help="write here instead of stdout")
    args = ap.parse_args()
    path = args.csv or latest_csv()
    rates_path = path.parent / "rates.json"
    rates = json.loads(rates_path.read_text()) if rates_path.exists() else None
    text = render(read_csv(path), rates)
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
