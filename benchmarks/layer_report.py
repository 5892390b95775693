"""Rows and summary of the layer benchmark (benchmarks/bench_layer.py): the CSV schema rows of
``benchmarks/results.py`` (``op="layer"``, ``mode="fwd+bwd"``, M = tokens, K = hidden,
N = ffn), the layer rows with their extra columns (tokens/s, ratios to frozen and eager, the path
each LoRA layer took, where the saved bytes are), the side-by-side table and the figures with
issue 13's targets.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics

import torch

PROVIDERS = ("frozen", "eager", "megatron-bridge", "fused")


def _environment() -> dict[str, str]:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"{platform.machine()} cpu, {torch.get_num_threads()} thread(s)"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = ""
    return {"device": device, "torch": torch.__version__, "triton": tv,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _ratio(a, b):
    return None if a is None or not b else a / b


def case_rows(case, results: dict, flops: float) -> tuple[list[dict], list[dict]]:
    """(schema rows, layer rows) of one case from ``results`` {provider: {times, saved, saved_with,
    by, peak, check_err, paths, note}}; ``flops`` is the frozen step's work (for TFLOP/s)."""
    env = _environment()
    base = results.get("frozen", {})
    eager = results.get("eager", {})
    base_t = statistics.median(base["times"]) if base.get("times") else None
    rows, layer_rows = [], []
    for prov in PROVIDERS:
        res = results[prov]
        ts = res.get("times")
        med = statistics.median(ts) if ts else None
        q = statistics.quantiles(ts, n=5) if ts and len(ts) > 1 else [med] * 4
        row = {"op": "layer", "provider": prov, "mode": "fwd+bwd", "M": case.tokens,
               "K": case.hidden, "N": case.ffn, "r": case.r, "p": case.p,
               "dtype": str(case.dtype).removeprefix("torch."),
               "median_ms": None if med is None else med * 1e3,
               "p20_ms": None if med is None else q[0] * 1e3,
               "p80_ms": None if med is None else q[3] * 1e3,
               "rounds": len(ts) if ts else None,
               "tflops": None if med is None else flops / med / 1e12,
               "saved_bytes": res.get("saved"), "saved_bytes_with_params": res.get("saved_with"),
               "peak_mem_bytes": res.get("peak"), "check_err": res.get("check_err"), **env}
        extra = {"case": case.id, "spec": case.spec, "layers": case.layers,
                 "heads": f"{case.heads}/{case.kv_heads}", "seq": case.seq, "batch": case.batch,
                 "tokens_per_s": None if med is None else case.tokens / med,
                 "time_x_frozen": _ratio(med, base_t),
                 "saved_x_frozen": _ratio(res.get("saved"), base.get("saved")),
                 "saved_x_eager": _ratio(res.get("saved"), eager.get("saved")),
                 "peak_x_frozen": _ratio(res.get("peak"), base.get("peak")),
                 # issue 13's peak target is frozen + adapters + S; peaks here are measured
                 # above the resident weights (adapters included), so what the step may add over
                 # frozen's is the adapter grads and S ([tokens, r] fp32) of each LoRA layer
                 "peak_allowance": (res["adapter_bytes"] + 4 * case.layers * case.tokens
                                    * case.r * 4) if res.get("adapter_bytes") else None,
                 "paths": "; ".join(f"{k}: {v}" for k, v in res.get("paths", {}).items()),
                 "saved_by": "; ".join(f"{k}={v}" for k, v in sorted(
                     res.get("by", {}).items(), key=lambda kv: -kv[1]))}
        note = [res["note"]] if res["note"] else []
        note.append(f"spec={case.spec} layers={case.layers} heads={extra['heads']} "
                    f"seq={case.seq}x{case.batch}")
        for key in ("tokens_per_s", "time_x_frozen", "saved_x_frozen", "peak_x_frozen"):
            if extra[key] is not None:
                note.append(f"{key}={extra[key]:.4g}")
        row["note"] = "; ".join(note)
        rows.append(row)
        layer_rows.append({**row, **extra, "note": res["note"]})
    return rows, layer_rows


# ---- summary -------------------------------------------------------------------------------------
LAYER_COLUMNS = ("case", "provider", "median_ms", "p20_ms", "p80_ms", "tokens_per_s",
                 "time_x_frozen", "saved_bytes", "saved_x_frozen", "saved_x_eager",
                 "peak_mem_bytes", "peak_x_frozen", "peak_allowance", "tflops", "check_err",
                 "note", "paths", "saved_by", "spec", "layers", "heads", "seq", "batch", "M",
                 "K", "N", "r", "p", "dtype", "device", "torch", "triton", "date")


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def summary(layer_rows: list[dict]) -> str:
    """Per case: every provider's step time, tokens/s, saved bytes and peak memory, with their
    ratios to frozen; then the layer-step figures with their targets and what dominates."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in layer_rows):
        rows = [r for r in layer_rows if r["case"] == case]
        lines += ["", f"layer step {case}", f"{'provider':<16}{'ms (x frozen)':>18}"
                  f"{'tokens/s':>11}{'saved MiB (x frozen, x eager)':>32}{'peak MiB (x fr)':>18}"
                  f"{'check':>9}  note", "-" * 110]
        for r in rows:
            mib = lambda b: None if b is None else b / 2**20  # noqa: E731
            lines.append(
                f"{r['provider']:<16}{_fmt(r['median_ms'], '.2f'):>10} ({_fmt(r['time_x_frozen']):>5})"
                f"{_fmt(r['tokens_per_s'], '.4g'):>11}{_fmt(mib(r['saved_bytes']), '.2f'):>14} "
                f"({_fmt(r['saved_x_frozen']):>5}, {_fmt(r['saved_x_eager']):>5})"
                f"{_fmt(mib(r['peak_mem_bytes']), '.0f'):>10} ({_fmt(r['peak_x_frozen']):>5})"
                f"{_fmt(r['check_err'], '.1e'):>9}  {r['note']}")
        for r in rows:
            if r["paths"]:
                lines.append(f"  paths ({r['provider']}): {r['paths']}")
    lines += ["", "layer-step figures:", *figures(layer_rows)]
    return "\n".join(lines)


def figures(layer_rows: list[dict]) -> list[str]:
    """Issue 13's targets: fused/frozen step time at p=0, fused/eager saved bytes at p=0.1."""
    out = []
    by = {(r["case"], r["provider"]): r for r in layer_rows}
    for case in dict.fromkeys(r["case"] for r in layer_rows):
        fused, eager = by.get((case, "fused"), {}), by.get((case, "eager"), {})
        p = fused.get("p")
        if p == 0.0:
            v = fused.get("time_x_frozen")
            out.append(f"  {case}: step fused / frozen {_fmt(v)} (target <= 1.15)"
                       + ("" if v is not None else f": {fused.get('note') or 'not timed'}"))
        frozen_peak = by.get((case, "frozen"), {}).get("peak_mem_bytes")
        if fused.get("peak_mem_bytes") is not None and frozen_peak is not None:
            over, allow = fused["peak_mem_bytes"] - frozen_peak, fused["peak_allowance"]
            out.append(f"  {case}: peak fused - frozen {over / 2**20:.1f} MiB (target <= adapters"
                       f" + S = {allow / 2**20:.1f} MiB): {'meets' if over <= allow else 'MISSES'}")
        if p and p > 0 and fused.get("saved_x_eager") is not None:
            v = fused["saved_x_eager"]
            out.append(f"  {case}: saved bytes fused / eager {v:.3f} (target <= 0.6): "
                       f"{'meets' if v <= 0.6 else 'MISSES'}")
            base = by.get((case, "frozen"), {}).get("saved_bytes")
            if base is not None and eager.get("saved_bytes", 0) > base:
                added = (fused["saved_bytes"] - base) / (eager["saved_bytes"] - base)
                out.append(f"    over what the frozen layer saves itself ({base / 2**20:.2f} MiB, "
                           f"the same for every provider): fused / eager {added:.3f}")
            for r in (eager, fused):
                top = (r.get("saved_by") or "").split("; ")[:4]
                out.append(f"    {r.get('provider')} saves most in: {', '.join(top)}")
    return out


def write_layer_csv(layer_rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LAYER_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in layer_rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in LAYER_COLUMNS})
