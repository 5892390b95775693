"""Benchmark of the fused multi-adapter LoRA op (MultiLoRA: ``bridge.kernels.multi_lora_linear``).

Cases: n in {1, 4, 8} adapter slots, M = 8192 tokens split evenly or unevenly (in proportion to
n, n-1, ..., 1, so slot boundaries fall inside the kernels' row tiles), K = N = 4096, r = 16,
alpha = 32, bf16, no dropout (Megatron-Bridge's MultiLoRA refuses dropout). Providers, all on the
same tensors:

    frozen           F.linear(x, W, b): the base alone
    fused            multi_lora_linear(backend="triton", gemm="fused"): one GEMM over all rows
    fused-cublas     multi_lora_linear(backend="triton", gemm="cublas"): cuBLAS addmm + our term
    separate         one fused single-LoRA call (lora_linear, backend="triton") per slot, cat
    megatron-bridge  Megatron-Bridge's MultiLoRALinear arrangement: F.linear, the slots stacked
                     each step (torch.stack), two torch._grouped_mm, a per-token scale in bf16
    eager            multi_lora_linear(backend="eager"): fp32 grouped mms (or the slot loop)

GPU: every provider is checked once against ``multi_lora_linear_ref`` (fp32, values and the
gradients of x, A, B) at the timed shape, then timed with ``triton.testing.do_bench`` (CUDA
events, L2 flushed; median, p20, p80) in two modes: ``forward`` (training forward) and
``fwd+bwd`` (forward, then autograd.grad of x and the adapters). Each time is also given
relative to ``frozen`` in the same mode. CPU (and GPU): the bytes autograd saves for backward
in one training forward at the GPU shape, counted on meta tensors (shapes only, nothing runs),
each storage once, with and without the parameters.

    python -m benchmarks.bench_multi_lora_linear [--out DIR]   # table + DIR/multi_lora_linear.csv
    python -m pytest benchmarks/bench_multi_lora_linear.py     # saved bytes; timing on a GPU

Self-contained (own timer and CSV) while benchmarks/measure.py's timer is being reworked.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bridge.kernels import lora_linear
from bridge.kernels.multi_lora_linear import multi_lora_linear, multi_lora_linear_ref

M, K, N, R, ALPHA = 8192, 4096, 4096, 16, 32.0
SLOTS = (1, 4, 8)
PROVIDERS = ("frozen", "fused", "fused-cublas", "separate", "megatron-bridge", "eager")
MODES = ("forward", "fwd+bwd")
CHECK_TOL = 2e-2  # relative error vs the fp32 reference: bf16 inputs, a few roundings
COLUMNS = ("op", "provider", "mode", "n_slots", "split", "tokens", "M", "K", "N", "r", "dtype",
           "median_ms", "p20_ms", "p80_ms", "vs_frozen", "saved_bytes",
           "saved_bytes_with_params", "check_err", "note", "device", "torch", "triton", "date")


def split_tokens(n: int, how: str, m: int | None = None) -> list[int]:
    """``even``: m // n each (the remainder to the first slots); ``uneven``: in proportion to
    n, n-1, ..., 1 (rounded, the remainder to slot 0)."""
    m = M if m is None else m
    weights = [1] * n if how == "even" else list(range(n, 0, -1))
    tokens = [m * w // sum(weights) for w in weights]
    for j in range(m - sum(tokens)):
        tokens[j % n] += 1
    return tokens


@dataclass(frozen=True)
class Case:
    n: int
    split: str  # even | uneven

    @property
    def tokens(self) -> list[int]:
        return split_tokens(self.n, self.split)

    @property
    def label(self) -> str:
        return f"n{self.n}-{self.split}"


CASES = tuple(Case(n, s) for n in SLOTS for s in ("even", "uneven") if not (n == 1 and s == "uneven"))


@dataclass
class Inputs:
    """x [M, K], W [N, K] (frozen), b [N], stacked A [n, r, K] / B [n, N, r] and the same
    adapters as per-slot leaves (A_j [r, K], B_j [N, r]) for the per-slot providers."""

    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    a: torch.Tensor
    bb: torch.Tensor
    a_slots: list[torch.Tensor]
    b_slots: list[torch.Tensor]


def make_inputs(n: int, device: str, dtype=torch.bfloat16, seed: int = 0) -> Inputs:
    """Random inputs at the scale of a real layer (B random, not LoRA's zero init); on ``meta``
    only shapes exist."""
    if device == "meta":
        rnd = lambda *s, std=1.0: torch.empty(*s, dtype=dtype, device="meta")
    else:
        g = torch.Generator(device=device).manual_seed(seed)
        rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g, device=device) * std).to(dtype)
    x, w, b = rnd(M, K), rnd(N, K, std=K**-0.5), rnd(N, std=0.1)
    a, bb = rnd(n, R, K, std=K**-0.5), rnd(n, N, R, std=R**-0.5)
    a_slots = [a[j].detach().clone().requires_grad_() for j in range(n)]
    b_slots = [bb[j].detach().clone().requires_grad_() for j in range(n)]
    return Inputs(x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_(), a_slots,
                  b_slots)


def build(provider: str, case: Case, t: Inputs) -> tuple[Callable[[], torch.Tensor], list]:
    """(training forward, the tensors fwd+bwd differentiates: x and the provider's adapters)."""
    tokens, n = case.tokens, case.n
    ranks, alphas = [R] * n, [ALPHA] * n
    if provider == "frozen":
        return (lambda: F.linear(t.x, t.w, t.b)), [t.x]
    if provider in ("fused", "fused-cublas", "eager"):
        backend = "eager" if provider == "eager" else "triton"
        gemm = "cublas" if provider == "fused-cublas" else "fused"
        # the slot table on the device, built once per micro-batch as a layer holds it (checked
        # by check() against the reference, so validate=False: no per-call sync)
        table = [torch.tensor(v, device=t.x.device) for v in (tokens, ranks, alphas)]
        return (lambda: multi_lora_linear(t.x, t.w, t.b, t.a, t.bb, *table, backend=backend,
                                          gemm=gemm, validate=False)), [t.x, t.a, t.bb]
    params = [t.x, *t.a_slots, *t.b_slots]
    if provider == "separate":
        def forward():
            rows = t.x.split(tokens)
            return torch.cat([lora_linear(rows[j], t.w, t.b, t.a_slots[j], t.b_slots[j],
                                          scale=ALPHA / R, backend="triton") for j in range(n)])
        return forward, params
    if provider == "megatron-bridge":
        tokens_t = torch.tensor(tokens, device=t.x.device)
        # alpha and rank buffers in the model dtype, the ratio applied per token in it
        scaling = (torch.full((n,), ALPHA, dtype=t.x.dtype, device=t.x.device)
                   / torch.full((n,), R, dtype=t.x.dtype, device=t.x.device))

        def forward():
            y = F.linear(t.x, t.w, t.b)
            offsets = tokens_t.cumsum(0, dtype=torch.int32)
            stacked_a = torch.stack(t.a_slots)
            stacked_b = torch.stack(t.b_slots)
            mid = torch._grouped_mm(t.x, stacked_a.transpose(-2, -1), offsets)
            out = torch._grouped_mm(mid, stacked_b.transpose(-2, -1), offsets)
            out = out * torch.repeat_interleave(scaling, tokens_t, output_size=M).unsqueeze(-1)
            return y + out
        return forward, params
    raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")


# ---- saved bytes (any machine: meta tensors) ---------------------------------------------------


def saved_bytes(provider: str, case: Case) -> tuple[int, int]:
    """(bytes autograd saves in one training forward without the parameters, with them), at the
    GPU shape, on meta tensors. The fused ops are called through their registered ops (their
    fakes run on meta), the rest as written in ``build``."""
    t = make_inputs(case.n, "meta")
    params = {s.untyped_storage()._cdata for s in (t.w, t.b, t.a, t.bb, *t.a_slots, *t.b_slots)}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(x):
        st = x.untyped_storage()
        seen.setdefault(st._cdata, (st.nbytes(), st._cdata in params))
        return x

    n, tokens = case.n, case.tokens
    offsets = torch.empty(n + 1, dtype=torch.int32, device="meta")
    ranks = torch.empty(n, dtype=torch.int32, device="meta")
    scales = torch.empty(n, dtype=torch.float32, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        if provider in ("fused", "fused-cublas"):
            torch.ops.bridge.multi_lora_linear_fwd(t.x, t.w, t.b, t.a, t.bb, offsets, ranks,
                                                   scales, None, 0.0, False,
                                                   provider == "fused-cublas", False)
        elif provider == "separate":
            rows = t.x.split(tokens)
            torch.cat([torch.ops.bridge.lora_linear_fwd(rows[j], t.w, t.b, t.a_slots[j],
                                                        t.b_slots[j], None, ALPHA / R, 0.0,
                                                        False)[0] for j in range(n)])
        elif provider == "eager":  # on meta: the slot loop (grouped mm's meta kernel is bf16)
            multi_lora_linear(t.x, t.w, t.b, t.a, t.bb, tokens, [R] * n, [ALPHA] * n,
                              backend="eager")
        else:
            build(provider, case, t)[0]()
    without = sum(b for b, is_param in seen.values() if not is_param)
    return without, sum(b for b, _ in seen.values())


# ---- timing (GPU) --------------------------------------------------------------------------------


def check(provider: str, case: Case, t: Inputs) -> float:
    """Largest relative error of y and the gradients of x, A, B against the fp32 reference."""
    fwd, leaves = build(provider, case, t)
    y = fwd()
    rel = lambda u, v: ((u.double() - v.double()).norm() / v.double().norm()).item()
    if provider == "frozen":
        return rel(y, F.linear(t.x.float(), t.w.float(), t.b.float()))
    g = torch.Generator(device=y.device).manual_seed(7)
    dy = torch.randn(y.shape, generator=g, device=y.device).to(y.dtype)
    f32 = lambda v: v.detach().float().requires_grad_()
    x, a, bb = f32(t.x), f32(t.a), f32(t.bb)
    y_ref = multi_lora_linear_ref(x, t.w.float(), t.b.float(), a, bb, case.tokens,
                                  [R] * case.n, [ALPHA] * case.n)
    refs = torch.autograd.grad(y_ref, (x, a, bb), dy.float())
    grads = torch.autograd.grad(y, leaves, dy)
    if provider in ("separate", "megatron-bridge"):  # per-slot leaves: stack them
        grads = [grads[0], torch.stack(grads[1:1 + case.n]), torch.stack(grads[1 + case.n:])]
    return max([rel(y, y_ref)] + [rel(u, v) for u, v in zip(grads, refs, strict=True)])


def time_ms(fn: Callable[[], object]) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds: triton.testing.do_bench (CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def _environment() -> dict:
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _row(provider, case, mode, **values) -> dict:
    return {"op": "multi_lora_linear", "provider": provider, "mode": mode, "n_slots": case.n,
            "split": case.split, "tokens": "/".join(map(str, case.tokens)), "M": M, "K": K,
            "N": N, "r": R, "dtype": "bfloat16", **values}


def run_saved_bytes() -> list[dict]:
    rows = []
    for case in CASES:
        for provider in PROVIDERS:
            without, with_params = saved_bytes(provider, case)
            rows.append(_row(provider, case, "saved", saved_bytes=without,
                             saved_bytes_with_params=with_params))
    return rows


def run_timing(providers=PROVIDERS, cases=CASES, device: str = "cuda", timer=None) -> list[dict]:
    """Check, then time every (case, provider, mode) on the GPU; a failed check is not timed."""
    timer = timer or time_ms
    rows = []
    for case in cases:
        t = make_inputs(case.n, device)
        dy = torch.randn(M, N, device=device, dtype=t.x.dtype)
        base = {}
        for provider in providers:
            try:
                err = check(provider, case, t)
            except Exception as exc:  # noqa: BLE001  (record, go on with the other providers)
                rows.append(_row(provider, case, "check", note=f"skipped: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}"))
                continue
            if not err <= CHECK_TOL:
                rows.append(_row(provider, case, "check", check_err=err,
                                 note=f"FAILED check: {err:.2e} > {CHECK_TOL}"))
                continue
            fwd, leaves = build(provider, case, t)
            steps = {"forward": fwd,
                     "fwd+bwd": lambda fwd=fwd, leaves=leaves, dy=dy: torch.autograd.grad(
                         fwd(), leaves, dy)}
            for mode in MODES:
                med, p20, p80 = timer(steps[mode])
                if provider == "frozen":
                    base[mode] = med
                rows.append(_row(provider, case, mode, median_ms=med, p20_ms=p20, p80_ms=p80,
                                 vs_frozen=med / base[mode] if mode in base else None,
                                 check_err=err))
        del t
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    env = _environment()
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="raise")
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row.get(k, env.get(k)) is None else row.get(k, env.get(k))
                        for k in COLUMNS})


def summary(rows: list[dict]) -> str:
    """The tables: time per step (and / frozen) per case, n=8 / n=1 per provider, saved bytes."""
    lines = []
    timed = [r for r in rows if r.get("median_ms") is not None]
    for mode in MODES:
        lines.append(f"\n{mode}: median ms (x frozen)")
        lines.append(f"{'case':<12}" + "".join(f"{p:>22}" for p in PROVIDERS))
        for case in CASES:
            cells = []
            for p in PROVIDERS:
                r = next((r for r in timed if r["provider"] == p and r["mode"] == mode
                          and r["n_slots"] == case.n and r["split"] == case.split), None)
                cells.append("-" if r is None else
                             f"{r['median_ms']:.3f} ({r['vs_frozen'] or math.nan:.2f}x)")
            lines.append(f"{case.label:<12}" + "".join(f"{c:>22}" for c in cells))
        for p in PROVIDERS:
            one = [r["median_ms"] for r in timed if r["provider"] == p and r["mode"] == mode
                   and r["n_slots"] == 1]
            eight = [r["median_ms"] for r in timed if r["provider"] == p and r["mode"] == mode
                     and r["n_slots"] == 8]
            if one and eight:
                lines.append(f"  {p}: n=8 / n=1 = {max(eight) / one[0]:.3f} (worst split; goal "
                             "1.2 for fused)")
    failed = [r for r in rows if (r.get("note") or "").startswith(("FAILED", "skipped"))]
    lines += [f"  {r['provider']} {r['n_slots']}-{r['split']}: {r['note']}" for r in failed]
    saved = [r for r in rows if r["mode"] == "saved"]
    if saved:
        lines.append("\nsaved for backward, MiB without parameters (with)")
        lines.append(f"{'case':<12}" + "".join(f"{p:>22}" for p in PROVIDERS))
        for case in CASES:
            cells = [next((f"{r['saved_bytes'] / 2**20:.2f} ({r['saved_bytes_with_params'] / 2**20:.1f})"
                           for r in saved if r["provider"] == p and r["n_slots"] == case.n
                           and r["split"] == case.split), "-") for p in PROVIDERS]
            lines.append(f"{case.label:<12}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for multi_lora_linear.csv")
    args = ap.parse_args(argv)
    rows = run_saved_bytes()
    if torch.cuda.is_available():
        rows += run_timing()
    else:
        print("no CUDA GPU: saved bytes only (timing needs a GPU)")
    text = summary(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, args.out / "multi_lora_linear.csv")
        (args.out / "multi_lora_linear.txt").write_text(text + "\n")
    return 0 if not any((r.get("note") or "").startswith("FAILED") for r in rows) else 1


# ---- pytest entry points ------------------------------------------------------------------------


def test_saved_bytes():
    """The fused op saves x, S (fp32 [M, r]) and the slot table, nothing else, at every case."""
    rows = run_saved_bytes()
    print(summary(rows))
    for case in CASES:
        fused = next(r for r in rows if r["provider"] == "fused" and r["n_slots"] == case.n
                     and r["split"] == case.split)
        table = (case.n + 1) * 4 + 2 * case.n * 4
        assert fused["saved_bytes"] == M * K * 2 + M * R * 4 + table, fused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="timing needs a CUDA GPU")
def test_timing():
    out = Path(os.environ.get("BENCH_OUT", "benchmarks/results"))
    rows = run_timing()
    print(summary(rows))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "multi_lora_linear.csv")
    failed = [r for r in rows if (r.get("note") or "").startswith("FAILED")]
    assert not failed, failed


if __name__ == "__main__":
    sys.exit(main())
