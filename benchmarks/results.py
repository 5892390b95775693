"""Rows in, files and figures out: the CSV schema, reading and writing, the ratios the summary
prints (to the frozen linear and to eager) and the headline figures with their targets."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from benchmarks.cases import BASELINE, FUSED, HEADLINE, MODES, PROVIDERS

# (column, type); empty cells read back as None. Times in milliseconds, bandwidth in GB/s.
COLUMNS: tuple[tuple[str, type], ...] = (
    ("op", str), ("provider", str), ("mode", str),
    ("M", int), ("K", int), ("N", int), ("r", int), ("p", float), ("dtype", str),
    ("median_ms", float), ("p20_ms", float), ("p80_ms", float), ("rounds", int),
    ("tflops", float), ("gbps", float), ("roofline_frac", float), ("floor_ms", float),
    ("saved_bytes", int), ("saved_bytes_with_params", int), ("peak_mem_bytes", int),
    ("check_err", float), ("note", str),
    ("device", str), ("torch", str), ("triton", str), ("date", str),
)
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)
SHAPE_KEY = ("op", "M", "K", "N", "r", "p", "dtype")


def write_csv(rows: Iterable[dict], path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMN_NAMES, extrasaction="raise")
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMN_NAMES})


def read_csv(path) -> list[dict]:
    types = dict(COLUMNS)
    with open(path, newline="") as f:
        return [{k: (None if v == "" else types[k](v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in SHAPE_KEY)


def _timed(rows: Iterable[dict]) -> dict[tuple, dict[str, float]]:
    """{(shape key..., mode): {provider: median_ms}} over timed rows."""
    out: dict[tuple, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row.get("median_ms") is not None:
            out[(*_key(row), row["mode"])][row["provider"]] = row["median_ms"]
    return out


def ratios(rows: Iterable[dict], numerator: str, denominator: str, *, mode: str | None = None,
           where=None) -> list[float]:
    """median(numerator) / median(denominator) per (shape, mode) where both were timed."""
    out = []
    for key, times in _timed(rows).items():
        if (mode is None or key[-1] == mode) and (where is None or where(key)):
            if numerator in times and denominator in times and times[denominator] > 0:
                out.append(times[numerator] / times[denominator])
    return out


def geomean(xs: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _fused_name(rows: list[dict], op: str) -> str | None:
    """The fused provider that ran for ``op`` (cuda preferred over triton when both did)."""
    have = {r["provider"] for r in rows if r["op"] == op and r.get("median_ms") is not None}
    return next((f for f in reversed(FUSED) if f in have), None)


# ---- the headline figures ----------------------------------------------------------------------
@dataclass(frozen=True)
class Figure:
    """One number the summary prints with its target: value None means n/a (``why`` says why)."""

    name: str
    value: float | None
    target: str  # e.g. "<= 1.0"
    why: str = ""

    @property
    def met(self) -> bool | None:
        """``<= x``, ``>= x``, or ``~ x`` (within 10% of x)."""
        if self.value is None:
            return None
        op, bound = self.target.split()
        if op == "~":
            return abs(self.value - float(bound)) <= 0.1 * float(bound)
        return self.value <= float(bound) if op == "<=" else self.value >= float(bound)

    def line(self) -> str:
        if self.value is None:
            return f"  {self.name:<58} n/a  (target {self.target}): {self.why}"
        verdict = {True: "meets", False: "MISSES"}[self.met]
        extra = f"  [{self.why}]" if self.why else ""
        return f"  {self.name:<58} {self.value:6.3f}  target {self.target}: {verdict}{extra}"


def saved_ratio(rows: list[dict], p: float = 0.1, K: int = 1024, r: int = 16,  # noqa: N803
                op: str = "lora_linear", target: str = "~ 0.5") -> Figure:
    """Fused / eager bytes saved for backward, weights aside, at (p, K, r)."""
    name = f"saved bytes fused / eager ({op}, p={p:g}, K={K}, r={r})"
    by = defaultdict(dict)
    for row in rows:
        if (row["op"], row["p"], row["K"], row["r"]) == (op, p, K, r) and \
                row.get("saved_bytes") is not None:
            by[(row["M"], row["N"], row["dtype"])][row["provider"]] = row["saved_bytes"]
    for provs in by.values():
        fused = next((provs[f] for f in reversed(FUSED) if f in provs), None)
        if fused is not None and provs.get("eager"):
            return Figure(name, fused / provs["eager"], target)
    return Figure(name, None, target, "no fused provider ran at this shape (see skips)")


def cpu_figures(rows: list[dict], skips: dict[str, str] | None = None,
                paired: dict[float, tuple[float, ...]] | None = None) -> list[Figure]:
    """The CPU run's figures. ``paired``: {p: (median, p20, p80)} of eager/PEFT fwd+bwd ratios
    from alternating pairs (``measure.paired_ratio``)."""
    skips = skips or {}
    figs = []
    for op, target in (("lora_linear", "~ 0.5"), ("norm_lora", "<= 0.5")):
        fig = saved_ratio(rows, op=op, target=target)
        if fig.value is None and skips.get(f"{op}/triton"):
            fig = Figure(fig.name, None, fig.target, skips[f"{op}/triton"])
        figs.append(fig)
    for p in (0.0, 0.1, None):
        xs = ratios(rows, "eager", "peft", mode="fwd+bwd",
                    where=lambda k, p=p: k[0] == "lora_linear" and (p is None or k[5] == p))
        label = "all p" if p is None else f"p={p:g}"
        val = statistics.median(xs) if xs else None
        figs.append(Figure(f"eager / PEFT fwd+bwd time (lora_linear, {label}, median)", val,
                           "<= 1.0", "" if xs else "eager or PEFT not timed"))
    for p, (med, lo, hi) in sorted((paired or {}).items()):
        figs.append(Figure(f"eager / PEFT fwd+bwd, alternating pairs (lora_linear, p={p:g})", med,
                           "<= 1.0", f"p20-p80 of pair ratios {lo:.3f}-{hi:.3f}"))
    return figs


def gpu_figures(rows: list[dict]) -> list[Figure]:
    figs = []
    m, k, n, r = HEADLINE
    fused = _fused_name(rows, "lora_linear")
    at = lambda key: key[1:5] == (m, k, n, r) and key[5] == 0.0 and key[0] == "lora_linear"
    xs = ratios(rows, fused, BASELINE, mode="fwd+bwd", where=at) if fused else []
    figs.append(Figure(f"fused fwd+bwd / frozen ({m}x{k}x{n}, r={r}, p=0)",
                       xs[0] if xs else None, "<= 1.12", "" if xs else "fused not timed there"))
    on = lambda key: key[0] == "lora_linear"
    for other, target in (("eager", ">= 1.3"), ("compile", ">= 1.0"), ("peft", ">= 1.3")):
        xs = ratios(rows, other, fused, mode="fwd+bwd", where=on) if fused else []
        figs.append(Figure(f"{other} / fused fwd+bwd, geomean over {len(xs)} shapes",
                           geomean(xs), target, "" if xs else f"{other} or fused not timed"))
    nfused = _fused_name(rows, "norm_lora")
    xs = ratios(rows, nfused, BASELINE, mode="forward",
                where=lambda key: key[0] == "norm_lora") if nfused else []
    figs.append(Figure(f"norm-fused ({nfused or 'none'}) fwd / (norm + frozen), geomean",
                       geomean(xs), "<= 1.08", "" if xs else "no fused norm provider timed"))
    return figs


# ---- the summary table -------------------------------------------------------------------------
def summary_table(rows: list[dict]) -> str:
    """Per op, shape and mode: each provider's median and its ratio to frozen and to eager."""
    lines = []
    for op, providers in PROVIDERS.items():
        timed = {k: v for k, v in _timed(rows).items() if k[0] == op}
        if not timed:
            continue
        present = [p for p in providers if any(p in v for v in timed.values())]
        head = f"{'shape (M x K x N, r, p)':<28}{'mode':<9}" + "".join(f"{p:>22}" for p in present)
        lines += ["", f"{op}: median ms (x frozen, x eager)", head, "-" * len(head)]
        order = sorted(timed, key=lambda k: (k[1:6], MODES.index(k[-1])))
        for key in order:
            times = timed[key]
            shape = f"{key[1]}x{key[2]}x{key[3]} r{key[4]} p{key[5]:g}"
            cells = []
            for p in present:
                if p not in times:
                    cells.append(f"{'-':>22}")
                    continue
                base, eager = times.get(BASELINE), times.get("eager")
                rb = f"{times[p] / base:.2f}" if base else "-"
                re_ = f"{times[p] / eager:.2f}" if eager else "-"
                cells.append(f"{times[p]:>9.3f} ({rb:>4},{re_:>5})")
            lines.append(f"{shape:<28}{key[-1]:<9}" + "".join(cells))
    return "\n".join(lines)


def saved_table(rows: list[dict]) -> str:
    """Bytes saved for backward per provider (weights aside / with weights), per op and shape."""
    seen = {}
    for row in rows:
        if row.get("saved_bytes") is not None:
            seen[(*_key(row), row["provider"])] = (row["saved_bytes"],
                                                   row["saved_bytes_with_params"])
    if not seen:
        return ""
    lines = ["", "bytes saved for backward (MiB, weights aside / with weights)"]
    for key in sorted({k[:-1] for k in seen}):
        cells = [f"{prov}={a / 2**20:.2f}/{b / 2**20:.2f}" for (*k, prov), (a, b) in seen.items()
                 if tuple(k) == key]
        lines.append(f"  {key[0]} {key[1]}x{key[2]}x{key[3]} r{key[4]} p{key[5]:g}: "
                     + "  ".join(cells))
    return "\n".join(lines)
