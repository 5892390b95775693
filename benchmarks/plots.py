"""Plots from a results CSV (Liger-style: the harness writes rows, this draws them).

    python -m benchmarks.plots benchmarks/results/<run>/results.csv [--out DIR]

Per op (dense, grouped, multi-LoRA, layer step) and mode: time relative to the frozen base per
shape (and variant) and provider. Per op: bytes saved for backward per shape and provider (weights
aside, and with weights).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.cases import BASELINE, MODES  # noqa: E402
from benchmarks.results import ops_and_providers, read_csv, row_label  # noqa: E402


def _shape(row: dict) -> str:
    variant = f"\n{row['variant']}" if row.get("variant") else ""
    return f"{row['M']}x{row['K']}x{row['N']}\nr{row['r']} p{row['p']:g}{variant}"


def _bars(ax, table: dict[str, dict[str, float]], providers: list[str],
          err: dict[str, dict[str, tuple[float, float]]] | None = None) -> None:
    """Grouped bars: one group per shape, one bar per provider; ``err`` = (low, high) whiskers."""
    shapes = list(table)
    width = 0.8 / max(len(providers), 1)
    nan = float("nan")
    for i, prov in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(shapes))]
        ys = [table[s].get(prov, nan) for s in shapes]
        yerr = None
        if err:
            lo = [y - err[s].get(prov, (nan, nan))[0] for s, y in zip(shapes, ys, strict=True)]
            hi = [err[s].get(prov, (nan, nan))[1] - y for s, y in zip(shapes, ys, strict=True)]
            yerr = [lo, hi]
        ax.bar(xs, ys, width, label=prov, yerr=yerr, capsize=2)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, fontsize=7, rotation=90 if len(shapes) > 12 else 0)
    ax.legend(fontsize=8)


def plot_all(csv_path, out_dir) -> list[Path]:
    rows = read_csv(csv_path)
    out_dir = Path(out_dir)
    written = []
    device = rows[0]["device"] if rows else ""
    for op, providers in ops_and_providers(rows).items():
        for mode in MODES:
            times: dict[str, dict[str, float]] = defaultdict(dict)
            spread: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
            for row in rows:
                if row["op"] == op and row["mode"] == mode and row["median_ms"] is not None:
                    times[_shape(row)][row_label(row)] = row["median_ms"]
                    spread[_shape(row)][row_label(row)] = (row["p20_ms"], row["p80_ms"])
            rel = {s: {p: t / v[BASELINE] for p, t in v.items()} for s, v in times.items()
                   if v.get(BASELINE)}
            err = {s: {p: (lo / times[s][BASELINE], hi / times[s][BASELINE])
                       for p, (lo, hi) in spread[s].items()} for s in rel}
            if not rel:
                continue
            present = [p for p in providers if any(p in v for v in rel.values())]
            fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rel) * len(present)), 4))
            _bars(ax, rel, present, err)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_ylabel(f"time / {BASELINE} median (p20-p80 whiskers)")
            ax.set_title(f"{op} {mode} — {device}", fontsize=9)
            fig.tight_layout()
            path = out_dir / f"time_{op}_{mode.replace('+', '_')}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        saved: dict[str, dict[str, dict[str, float]]] = {"weights aside": defaultdict(dict),
                                                         "with weights": defaultdict(dict)}
        for row in rows:
            if row["op"] == op and row["saved_bytes"] is not None:
                saved["weights aside"][_shape(row)][row_label(row)] = row["saved_bytes"] / 2**20
                with_w = row.get("saved_bytes_with_params")  # the layer rows leave it out
                saved["with weights"][_shape(row)][row_label(row)] = \
                    float("nan") if with_w is None else with_w / 2**20
        if not saved["weights aside"]:
            continue
        present = [p for p in providers if any(p in v for v in saved["weights aside"].values())]
        fig, axes = plt.subplots(1, 2, figsize=(max(8, len(saved["weights aside"]) * 1.5), 4))
        for ax, (label, table) in zip(axes, saved.items(), strict=True):
            _bars(ax, table, present)
            ax.set_ylabel(f"MiB saved for backward ({label})")
        fig.suptitle(f"{op}: bytes saved for backward — {device}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"saved_bytes_{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: the CSV's folder")
    args = ap.parse_args()
    for path in plot_all(args.csv, args.out or args.csv.parent):
        print(path)


if __name__ == "__main__":
    main()
