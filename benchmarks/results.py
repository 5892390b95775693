"""Rows in, files and figures out: the one CSV schema of every benchmark (dense, grouped,
multi-LoRA, layer step), reading and writing, the ratios the summary prints (to the frozen base and
to eager; frozen/auto and eager/auto per shape), the host-time rows, the layer rows converted from
benchmarks/bench_layer.py's CSV, and the headline figures with their targets.

A fused provider's rows carry their GEMM strategy in ``gemm``; tables name them
``triton:fused``, ``triton:cublas``, ``triton:auto`` (cases.label). Rows of ops with sub-cases
beyond (M, K, N, r, p, dtype) name them in ``variant`` (part of the shape key)."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from benchmarks.cases import AUTO, BASELINE, FUSED, GEMMS, HEADLINE, MODES, PROVIDERS, label
from benchmarks.schema import COLUMN_DOCS, COLUMN_NAMES, COLUMNS, SHAPE_KEY, VARIANT_OPS

__all__ = ["COLUMNS", "COLUMN_DOCS", "COLUMN_NAMES", "SHAPE_KEY", "VARIANT_OPS"]  # + the rest


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
    return tuple(row.get(k) for k in SHAPE_KEY)


def add_frozen_ratios(rows: list[dict]) -> list[dict]:
    """Fill ``x_frozen`` (median / the frozen provider's median at the same shape key and mode)
    of every timed row that has none; returns ``rows``."""
    base = {(*_key(r), r["mode"]): r["median_ms"] for r in rows
            if r["provider"] == BASELINE and r.get("median_ms")}
    for r in rows:
        b = base.get((*_key(r), r["mode"]))
        if r.get("median_ms") is not None and r.get("x_frozen") is None and b:
            r["x_frozen"] = r["median_ms"] / b
    return rows


# ---- the layer step's rows (benchmarks/bench_layer.py writes its own, wider CSV) ----------------
def layer_variant(spec: str, layers, heads, seq, batch) -> str:
    return f"{spec}-L{layers}-a{heads}-s{seq}x{batch}"


def rows_from_layer_csv(path) -> list[dict]:
    """The rows of bench_layer.py's CSV (``layer_report.LAYER_COLUMNS``: one per case and
    provider) in this schema: op ``layer``, mode ``fwd+bwd``, M = tokens, K = hidden, N = ffn,
    ``variant`` from the spec and dims, ``x_frozen`` its ``time_x_frozen``. Columns of its own
    (saved bytes by component, ratios to eager, peak allowance) stay in that file."""
    types = dict(COLUMNS)

    def get(raw: dict, k: str, t: type):
        return None if raw.get(k) in (None, "") else t(raw[k])

    out = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {k: get(raw, k, types[k]) for k in (
                "provider", "M", "K", "N", "r", "p", "dtype", "spec", "median_ms", "p20_ms",
                "p80_ms", "tokens_per_s", "tflops", "saved_bytes", "peak_mem_bytes", "check_err",
                "paths", "note", "device", "torch", "triton", "date")}
            row.update(op="layer", mode="fwd+bwd", x_frozen=get(raw, "time_x_frozen", float),
                       variant=layer_variant(raw.get("spec"), raw.get("layers"), raw.get("heads"),
                                             raw.get("seq"), raw.get("batch")))
            row["note"] = row["note"] or ""
            out.append(row)
    return out


def row_label(row: dict) -> str:
    return label(row["provider"], row.get("gemm"))


def _timed(rows: Iterable[dict]) -> dict[tuple, dict[str, float]]:
    """{(shape key..., mode): {provider label: median_ms}} over timed rows."""
    out: dict[tuple, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row.get("median_ms") is not None:
            out[(*_key(row), row["mode"])][row_label(row)] = row["median_ms"]
    return out


def providers_of(op: str) -> list[str]:
    """Display order of the labels of ``op``: each fused provider once per strategy."""
    return [label(p, g) for p in PROVIDERS[op] for g in (GEMMS if p in FUSED else ("",))]


def ops_and_providers(rows: list[dict]) -> dict[str, list[str]]:
    """{op: provider labels in display order} of the ops present in ``rows`` (the layer step
    first): the dense ops' order from cases.PROVIDERS, the others in the order their rows came."""
    present = dict.fromkeys(r["op"] for r in rows)
    order = [op for op in ("layer", *PROVIDERS, *VARIANT_OPS) if op in present]  # layer first
    order += [op for op in present if op not in order]
    return {op: providers_of(op) if op in PROVIDERS else
            list(dict.fromkeys(row_label(r) for r in rows if r["op"] == op)) for op in order}


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


def _fused_name(rows: list[dict], op: str, gemm: str = AUTO) -> str | None:
    """The label of the fused provider that ran for ``op`` with ``gemm`` (cuda preferred over
    triton when both did)."""
    have = {row_label(r) for r in rows if r["op"] == op and r.get("median_ms") is not None}
    return next((label(f, gemm) for f in reversed(FUSED) if label(f, gemm) in have), None)


def _per_shape(rows: list[dict], op: str, mode: str) -> dict[tuple, dict[str, float]]:
    return {k: v for k, v in _timed(rows).items() if k[0] == op and k[-1] == mode}


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
            by[(row["M"], row["N"], row["dtype"])][row_label(row)] = row["saved_bytes"]
    for provs in by.values():
        fused = next((v for f in reversed(FUSED) for g in GEMMS if (v := provs.get(label(f, g)))
                      is not None), None)
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
        which = "all p" if p is None else f"p={p:g}"
        val = statistics.median(xs) if xs else None
        figs.append(Figure(f"eager / PEFT fwd+bwd time (lora_linear, {which}, median)", val,
                           "<= 1.0", "" if xs else "eager or PEFT not timed"))
    for p, (med, lo, hi) in sorted((paired or {}).items()):
        figs.append(Figure(f"eager / PEFT fwd+bwd, alternating pairs (lora_linear, p={p:g})", med,
                           "<= 1.0", f"p20-p80 of pair ratios {lo:.3f}-{hi:.3f}"))
    if any(r.get("mode") == "host" for r in rows):
        figs.append(host_figure(rows))
    return figs


def gpu_figures(rows: list[dict]) -> list[Figure]:
    """The GPU run's figures: auto against frozen at the headline shape (first mark 1.25, goal
    1.10), auto never slower than eager or either strategy on any shape (>= 0.98 within noise),
    and the geomeans against eager, torch.compile and PEFT."""
    figs = []
    m, k, n, r = HEADLINE
    auto = _fused_name(rows, "lora_linear")
    at = lambda key: key[1:5] == (m, k, n, r) and key[5] == 0.0 and key[0] == "lora_linear"
    xs = ratios(rows, auto, BASELINE, mode="fwd+bwd", where=at) if auto else []
    figs.append(Figure(f"auto fwd+bwd / frozen ({m}x{k}x{n}, r={r}, p=0)",
                       xs[0] if xs else None, "<= 1.25",
                       "first mark; the goal is 1.10" if xs else "auto not timed there"))
    for op in ("lora_linear", "norm_lora"):
        auto = _fused_name(rows, op)
        if auto is None:
            continue
        for other in ("eager", *(label(auto.split(":")[0], g) for g in GEMMS if g != AUTO)):
            worst = [t[other] / t[auto] for t in _per_shape(rows, op, "fwd+bwd").values()
                     if other in t and auto in t]
            figs.append(Figure(f"{other} / {auto} fwd+bwd ({op}), worst of {len(worst)} shapes",
                               min(worst) if worst else None, ">= 0.98",
                               "" if worst else f"{other} not timed beside {auto}"))
    auto = _fused_name(rows, "lora_linear")
    on = lambda key: key[0] == "lora_linear"
    for other, target in (("eager", ">= 1.3"), ("compile", ">= 1.0"), ("peft", ">= 1.3")):
        xs = ratios(rows, other, auto, mode="fwd+bwd", where=on) if auto else []
        figs.append(Figure(f"{other} / auto fwd+bwd, geomean over {len(xs)} shapes",
                           geomean(xs), target, "" if xs else f"{other} or auto not timed"))
    nauto = _fused_name(rows, "norm_lora")
    xs = ratios(rows, nauto, BASELINE, mode="forward",
                where=lambda key: key[0] == "norm_lora") if nauto else []
    figs.append(Figure(f"norm-fused ({nauto or 'none'}) fwd / (norm + frozen), geomean",
                       geomean(xs), "<= 1.08", "" if xs else "no fused norm provider timed"))
    return figs


# ---- grouped, multi-LoRA and layer-step figures ------------------------------------------------
_ELT = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _x_plus_s(row: dict) -> int:
    """The fused op's goal for saved bytes: x [M, K] in its dtype and S [M, r] in fp32."""
    return row["M"] * row["K"] * _ELT[row["dtype"]] + row["M"] * row["r"] * 4


def _median_of(rows, op, prov, mode="fwd+bwd", **match) -> dict[str, float]:
    """{variant: median_ms} of ``op``'s provider label ``prov`` whose columns equal ``match``."""
    return {r["variant"]: r["median_ms"] for r in rows
            if r["op"] == op and row_label(r) == prov and r["mode"] == mode
            and r.get("median_ms") is not None and all(r.get(k) == v for k, v in match.items())}


def variant_figures(rows: list[dict], gpu: bool) -> list[Figure]:
    """Issue 12/13/14's figures: on a GPU grouped fused / eager (worst case), multi-LoRA n=8 / n=1
    (goal 1.2) and the layer step fused / frozen at p=0 (<= 1.15); on the CPU the fused ops'
    saved bytes against x + S (no mask, no x~) and the layer's fused / eager at p=0.1 (<= 0.6)."""
    figs = []
    have = {r["op"] for r in rows}
    if gpu:
        if "grouped_lora_linear" in have:
            fused = _median_of(rows, "grouped_lora_linear", "fused")
            eager = _median_of(rows, "grouped_lora_linear", "eager")
            xs = {v: fused[v] / eager[v] for v in fused if v in eager}
            worst = max(xs, key=xs.get) if xs else None
            figs.append(Figure(f"grouped fused / eager fwd+bwd, worst of {len(xs)} cases",
                               xs.get(worst), "<= 1.0", worst or "fused or eager not timed"))
        if "multi_lora_linear" in have:
            prov = label("fused", AUTO)
            for split in ("even", "uneven"):
                one = _median_of(rows, "multi_lora_linear", prov, n_slots=1)
                eight = _median_of(rows, "multi_lora_linear", prov, n_slots=8, split=split)
                val = max(eight.values()) / min(one.values()) if one and eight else None
                figs.append(Figure(f"multi-LoRA {prov} fwd+bwd n=8 ({split}) / n=1", val,
                                   "<= 1.2", "" if val else "n=1 or n=8 not timed"))
    else:
        for op in ("grouped_lora_linear", "multi_lora_linear"):
            fused = [r for r in rows if r["op"] == op and r["provider"] == "fused"
                     and r.get("saved_bytes") is not None]
            if not fused:
                continue
            m = max(r["M"] for r in fused)
            worst = max((r for r in fused if r["M"] == m), key=lambda r: r["saved_bytes"]
                        / _x_plus_s(r))
            figs.append(Figure(f"saved bytes fused / (x + S) ({op}, M={m}, worst case)",
                               worst["saved_bytes"] / _x_plus_s(worst), "<= 1.01",
                               worst.get("variant") or ""))
    for r in rows:
        if r["op"] != "layer" or r["provider"] != "fused":
            continue
        frozen = next((f for f in rows if f["op"] == "layer" and f["provider"] == BASELINE
                       and _key(f) == _key(r)), {})
        eager = next((f for f in rows if f["op"] == "layer" and f["provider"] == "eager"
                      and _key(f) == _key(r)), {})
        if gpu and r["p"] == 0.0:
            figs.append(Figure(f"layer step fused / frozen ({r['variant']}, p=0)",
                               r.get("x_frozen"), "<= 1.15", "" if r.get("x_frozen") else
                               (r.get("note") or "not timed")))
        if r["p"] > 0 and r.get("saved_bytes") and eager.get("saved_bytes"):
            figs.append(Figure(f"layer saved bytes fused / eager ({r['variant']}, p={r['p']:g})",
                               r["saved_bytes"] / eager["saved_bytes"], "<= 0.6",
                               f"frozen saves {frozen.get('saved_bytes', 0) / 2**20:.2f} MiB itself"))
    return figs


def variant_table(rows: list[dict], op: str) -> str:
    """Per variant, shape and mode of ``op`` (grouped, multi-LoRA, layer): each provider's median
    ms and its ratio to frozen, cases in the order they ran."""
    timed = [r for r in rows if r["op"] == op and r.get("median_ms") is not None]
    if not timed:
        return ""
    present = list(dict.fromkeys(row_label(r) for r in timed))
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in timed:
        groups[(r.get("variant") or "", r["M"], r["K"], r["N"], r["r"], r["p"], r["mode"])][
            row_label(r)] = r
    head = (f"{'variant':<30}{'M x K x N r p':<26}{'mode':<9}"
            + "".join(f"{p:>20}" for p in present))
    lines = ["", f"{op}: median ms (x frozen)", head, "-" * len(head)]
    for (variant, m, k, n, r, p, mode), by in groups.items():
        cells = []
        for prov in present:
            row = by.get(prov)
            if row is None:
                cells.append(f"{'-':>20}")
                continue
            x = "-" if row.get("x_frozen") is None else f"{row['x_frozen']:.2f}"
            cells.append(f"{row['median_ms']:>12.3f} ({x:>5})")
        lines.append(f"{variant:<30}{f'{m}x{k}x{n} r{r} p{p:g}':<26}{mode:<9}" + "".join(cells))
    return "\n".join(lines)


def problems(rows: list[dict]) -> list[str]:
    """One line per FAILED check and per skipped provider (deduplicated over modes), leaving out
    skips of a provider that another pass checked (the CPU's fused ops: the interpreter pass)."""
    ran = {(r["op"], row_label(r)) for r in rows if r.get("check_err") is not None}
    seen = {}
    for r in rows:
        note = r.get("note") or ""
        if note.startswith("skipped") and (r["op"], row_label(r)) in ran:
            continue
        if note.startswith(("FAILED", "skipped")):
            seen.setdefault((r["op"], row_label(r), r.get("variant") or "", note[:160]), None)
    return [f"  {op} {v + ' ' if v else ''}{prov}: {note}" for op, prov, v, note in seen]


def host_figure(rows: list[dict]) -> Figure:
    """Ours (fused path, kernel time out) against Megatron-Bridge's LoRA, host us per call."""
    host = {row_label(r): r for r in rows if r.get("mode") == "host"}
    ours, mb = host.get("fused:fused", {}).get("host_us"), host.get("megatron-bridge", {})
    name = "host us per forward, ours fused / Megatron-Bridge (CPU, tiny shape)"
    if ours is None:
        return Figure(name, None, "<= 1.0", "no host_us row of ours")
    if mb.get("host_us") is None:
        return Figure(name, None, "<= 1.0", (mb.get("note") or "no Megatron-Bridge row")
                      .removeprefix("skipped: "))
    return Figure(name, ours / mb["host_us"], "<= 1.0")


def host_table(rows: list[dict]) -> str:
    """The host-time rows: us per training forward and the ratio to the frozen base."""
    host = [r for r in rows if r.get("mode") == "host"]
    if not host:
        return ""
    base = next((r["host_us"] for r in host if r["provider"] == BASELINE and r.get("host_us")),
                None)
    r0 = host[0]
    lines = ["", f"host_us: us per training forward at {r0['M']}x{r0['K']}x{r0['N']} r{r0['r']} "
                 "(least-disturbed round; p20-p80 of rounds)"]
    for r in host:
        if r.get("host_us") is None:
            lines.append(f"  {row_label(r):<18} {r['note']}")
            continue
        rel = f" ({r['host_us'] / base:.2f} x frozen)" if base else ""
        lines.append(f"  {row_label(r):<18} {r['host_us']:7.1f} us{rel}  "
                     f"[{r['p20_ms'] * 1e3:.1f}-{r['p80_ms'] * 1e3:.1f}]"
                     + (f"  {r['note']}" if r["note"] else ""))
    return "\n".join(lines)


# ---- the summary table -------------------------------------------------------------------------
def summary_table(rows: list[dict]) -> str:
    """Per op, shape and mode: each provider's median and its ratio to frozen and to eager."""
    lines = []
    for op in PROVIDERS:
        timed = {k: v for k, v in _timed(rows).items() if k[0] == op}
        if not timed:
            continue
        present = [p for p in providers_of(op) if any(p in v for v in timed.values())]
        head = f"{'shape (M x K x N, r, p)':<28}{'mode':<9}" + "".join(f"{p:>24}" for p in present)
        lines += ["", f"{op}: median ms (x frozen, x eager)", head, "-" * len(head)]
        order = sorted(timed, key=lambda k: (k[1:6], MODES.index(k[-1])))
        for key in order:
            times = timed[key]
            shape = f"{key[1]}x{key[2]}x{key[3]} r{key[4]} p{key[5]:g}"
            cells = []
            for p in present:
                if p not in times:
                    cells.append(f"{'-':>24}")
                    continue
                base, eager = times.get(BASELINE), times.get("eager")
                rb = f"{times[p] / base:.2f}" if base else "-"
                re_ = f"{times[p] / eager:.2f}" if eager else "-"
                cells.append(f"{times[p]:>11.3f} ({rb:>4},{re_:>5})")
            lines.append(f"{shape:<28}{key[-1]:<9}" + "".join(cells))
    return "\n".join(lines)


def auto_table(rows: list[dict]) -> str:
    """Per op, shape and mode: frozen / auto, eager / auto and each strategy / auto (> 1: auto
    is faster; every cell should be >= 0.98)."""
    lines = []
    for op in PROVIDERS:
        auto = _fused_name(rows, op)
        if auto is None:
            continue
        fused = auto.split(":")[0]
        others = [BASELINE, "eager", *(label(fused, g) for g in GEMMS if g != AUTO)]
        timed = {k: v for k, v in _timed(rows).items() if k[0] == op and auto in v}
        head = f"{'shape (M x K x N, r, p)':<28}{'mode':<9}" + "".join(
            f"{o.split(':')[-1] + '/auto':>14}" for o in others)
        lines += ["", f"{op}: time / {auto} time (frozen/auto < 1: the adapter's cost)", head,
                  "-" * len(head)]
        for key in sorted(timed, key=lambda k: (k[1:6], MODES.index(k[-1]))):
            t = timed[key]
            cells = [f"{t[o] / t[auto]:>14.3f}" if o in t else f"{'-':>14}" for o in others]
            lines.append(f"{key[1]}x{key[2]}x{key[3]} r{key[4]} p{key[5]:g}".ljust(28)
                         + f"{key[-1]:<9}" + "".join(cells))
    return "\n".join(lines)


def saved_table(rows: list[dict]) -> str:
    """Bytes saved for backward per provider (weights aside / with weights), per op and shape."""
    seen = {}
    for row in rows:
        if row.get("saved_bytes") is not None:
            seen[(*_key(row), row_label(row))] = (row["saved_bytes"],
                                                   row.get("saved_bytes_with_params"))
    if not seen:
        return ""
    lines = ["", "bytes saved for backward (MiB, weights aside / with weights)"]
    for key in sorted({k[:-1] for k in seen}, key=lambda k: tuple("" if v is None else v
                                                                 for v in k)):
        cells = [f"{prov}={a / 2**20:.2f}/" + ("?" if b is None else f"{b / 2**20:.2f}")
                 for (*k, prov), (a, b) in seen.items() if tuple(k) == key]
        variant = f" {key[7]}" if key[7] else ""
        lines.append(f"  {key[0]} {key[1]}x{key[2]}x{key[3]} r{key[4]} p{key[5]:g}{variant}: "
                     + "  ".join(cells))
    return "\n".join(lines)
