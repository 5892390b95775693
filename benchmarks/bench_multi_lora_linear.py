"""Benchmark of the fused multi-adapter LoRA op (MultiLoRA: ``bridge.kernels.multi_lora_linear``).

Providers, all on the same tensors (x [M, K], W [N, K], b [N], slots stacked at rank r):

    frozen           F.linear(x, W, b): the base alone
    fused            multi_lora_linear(backend="triton", gemm=...), once per GEMM strategy
                     (``gemm`` column: fused = one GEMM over all rows with the per-slot term in its
                     accumulator, cublas = cuBLAS addmm reading our term, auto = the chooser)
    separate         one fused single-LoRA call (lora_linear, backend="triton") per slot, cat
    megatron-bridge  Megatron-Bridge's MultiLoRALinear arrangement: F.linear, the slots stacked
                     each step (torch.stack), two torch._grouped_mm, a per-token scale in bf16
    eager            multi_lora_linear(backend="eager"): fp32 grouped mms (or the slot loop)

Grids (``$BENCH_GRID``, benchmarks/cases.py):
    gpu     n in {1, 4, 8} slots, M = 8192 tokens split evenly or unevenly (in proportion to
            n, n-1, ..., 1, so slot boundaries fall inside the kernels' row tiles), K = N = 4096,
            r = 16, alpha = 32, bf16, no dropout (Megatron-Bridge's MultiLoRA refuses dropout);
            n = 1 and n = 8 first (issue 14's figure: n = 8 within 1.2x of n = 1). Every provider
            checked against the fp64 reference (values and the gradients of x, A, B), then timed
            (kernels/_timing.py: CUDA events, L2 flushed; median, p20, p80) ``forward`` and
            ``fwd+bwd``, with saved bytes and peak memory.
    cpu     the GPU cases' saved-for-backward bytes on meta tensors (nothing runs; the fused ops
            through their registered ops' fakes).
    interp  small odd shapes under TRITON_INTERPRET=1: every provider checked, saved bytes of a
            real run; not timed.
    tiny    the interp shapes, frozen and eager timed on the host clock (gpu_check.sh's dry run).

Rows follow results.COLUMNS: op ``multi_lora_linear``, variant ``n<slots>-<split>``, ``n_slots``,
``split``, ``tokens`` the rows per slot; ``x_frozen`` is the time relative to frozen.

    python -m pytest benchmarks/bench_multi_lora_linear.py            # one grid (benchmarks.run)
    python -m benchmarks.bench_multi_lora_linear [--grid G] [--csv PATH] [--budget-s S]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from bridge.kernels._timing import bench

from benchmarks.bench_grouped_lora_linear import _grouped_mm_runs
from benchmarks.cases import AUTO, BUDGET_ENV, GRID_ENV, budget_spent, grid_name, label

OP = "multi_lora_linear"
M, K, N, R, ALPHA = 8192, 4096, 4096, 16, 32.0
SLOTS = (1, 8, 4)  # run order: the n = 8 / n = 1 figure first
# (provider, gemm) in run order: the base, ours, then the baselines
PROVIDERS = (("frozen", ""), ("fused", AUTO), ("fused", "fused"), ("fused", "cublas"),
             ("separate", ""), ("megatron-bridge", ""), ("eager", ""))
MODES = ("forward", "fwd+bwd")


def split_tokens(n: int, how: str, m: int = M) -> list[int]:
    """``even``: m // n each (the remainder to the first slots); ``uneven``: in proportion to
    n, n-1, ..., 1 (rounded, the remainder to slot 0)."""
    weights = [1] * n if how == "even" else list(range(n, 0, -1))
    tokens = [m * w // sum(weights) for w in weights]
    for j in range(m - sum(tokens)):
        tokens[j % n] += 1
    return tokens


@dataclass(frozen=True)
class Case:
    slots: int
    split: str  # even | uneven
    m: int = M
    k: int = K
    n: int = N
    r: int = R
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"  # cuda | cpu | meta (shapes only: saved bytes)

    @property
    def tokens(self) -> list[int]:
        return split_tokens(self.slots, self.split, self.m)

    @property
    def variant(self) -> str:
        return f"n{self.slots}-{self.split}"

    @property
    def id(self) -> str:
        return f"{self.variant}-M{self.m}-K{self.k}-N{self.n}-r{self.r}"


def cases(grid: str | None = None) -> list[Case]:
    grid = grid_name(grid)
    if grid in ("gpu", "cpu"):
        dev = "cuda" if grid == "gpu" else "meta"
        return [Case(n, s, device=dev) for n in SLOTS for s in ("even", "uneven")
                if not (n == 1 and s == "uneven")]
    # odd sizes: 67 rows over 1 or 3 slots (tile-straddling boundaries), K, N off any block
    return [Case(n, "uneven" if n > 1 else "even", m=67, k=40, n=24, r=8, dtype=torch.float32,
                 device="cpu") for n in (1, 3)]


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


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Random inputs at the scale of a real layer (B random, not LoRA's zero init), fresh leaves;
    on ``meta`` only shapes exist."""
    dt, dev = case.dtype, case.device
    if dev == "meta":
        rnd = lambda *s, std=1.0: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    else:
        g = torch.Generator(device=dev).manual_seed(seed)
        rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g, device=dev) * std).to(dt)  # noqa: E731
    n, k, out, r = case.slots, case.k, case.n, case.r
    x, w, b = rnd(case.m, k), rnd(out, k, std=k**-0.5), rnd(out, std=0.1)
    a, bb = rnd(n, r, k, std=k**-0.5), rnd(n, out, r, std=r**-0.5)
    a_slots = [a[j].detach().clone().requires_grad_() for j in range(n)]
    b_slots = [bb[j].detach().clone().requires_grad_() for j in range(n)]
    return Inputs(x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_(), a_slots,
                  b_slots)


def probe(provider: str, case: Case) -> tuple[bool, str]:
    """Whether ``provider`` runs here, and why not."""
    if case.device == "meta":
        return True, ""
    if provider in ("fused", "separate"):
        from bridge.kernels.backend import probe_triton

        ok, why = probe_triton(torch.device(case.device), case.dtype)
        if not ok:
            return False, f"no Triton backend here ({why}); on the CPU set TRITON_INTERPRET=1"
    if provider == "megatron-bridge" and not _grouped_mm_runs(case.device, case.dtype):
        return False, f"torch._grouped_mm does not run on {case.device} {case.dtype}"
    return True, ""


def build(provider: str, case: Case, t: Inputs, gemm: str = "") -> tuple[Callable, list]:
    """(training forward, the tensors fwd+bwd differentiates: x and the provider's adapters)."""
    from bridge.kernels import lora_linear
    from bridge.kernels.multi_lora_linear import multi_lora_linear

    tokens, n = case.tokens, case.slots
    ranks, alphas = [case.r] * n, [ALPHA] * n
    if provider == "frozen":
        return (lambda: F.linear(t.x, t.w, t.b)), [t.x]
    if provider in ("fused", "eager"):
        backend = "eager" if provider == "eager" else "triton"
        # the slot table on the device, built once per micro-batch as a layer holds it (the
        # check validates the results, so validate=False: no per-call sync)
        table = [torch.tensor(v, device=t.x.device) for v in (tokens, ranks, alphas)]
        return (lambda: multi_lora_linear(t.x, t.w, t.b, t.a, t.bb, *table, backend=backend,
                                          gemm=gemm or AUTO, validate=False)), [t.x, t.a, t.bb]
    params = [t.x, *t.a_slots, *t.b_slots]
    if provider == "separate":
        def forward():
            rows = t.x.split(tokens)
            return torch.cat([lora_linear(rows[j], t.w, t.b, t.a_slots[j], t.b_slots[j],
                                          scale=ALPHA / case.r, backend="triton")
                              for j in range(n)])
        return forward, params
    if provider == "megatron-bridge":
        tokens_t = torch.tensor(tokens, device=t.x.device)
        # alpha and rank buffers in the model dtype, the ratio applied per token in it
        scaling = (torch.full((n,), ALPHA, dtype=t.x.dtype, device=t.x.device)
                   / torch.full((n,), case.r, dtype=t.x.dtype, device=t.x.device))

        def forward():
            y = F.linear(t.x, t.w, t.b)
            offsets = tokens_t.cumsum(0, dtype=torch.int32)
            stacked_a = torch.stack(t.a_slots)
            stacked_b = torch.stack(t.b_slots)
            mid = torch._grouped_mm(t.x, stacked_a.transpose(-2, -1), offsets)
            out = torch._grouped_mm(mid, stacked_b.transpose(-2, -1), offsets)
            out = out * torch.repeat_interleave(scaling, tokens_t, output_size=case.m)[:, None]
            return y + out
        return forward, params
    raise ValueError(f"unknown provider {provider!r}; expected one of "
                     f"{', '.join(dict.fromkeys(p for p, _ in PROVIDERS))}")


def _meta_forward(provider: str, gemm: str, case: Case, t: Inputs) -> Callable:
    """On meta tensors the fused ops run through their registered ops (their fakes), and eager
    through the slot loop (grouped mm's meta kernel takes bf16 only)."""
    n = case.slots
    offsets = torch.empty(n + 1, dtype=torch.int32, device="meta")
    ranks = torch.empty(n, dtype=torch.int32, device="meta")
    scales = torch.empty(n, dtype=torch.float32, device="meta")
    if provider == "fused":
        return lambda: torch.ops.bridge.multi_lora_linear_fwd(
            t.x, t.w, t.b, t.a, t.bb, offsets, ranks, scales, None, 0.0, False, gemm == "cublas",
            False)
    if provider == "separate":
        rows = t.x.split(case.tokens)
        return lambda: torch.cat([torch.ops.bridge.lora_linear_fwd(
            rows[j], t.w, t.b, t.a_slots[j], t.b_slots[j], None, ALPHA / case.r, 0.0, False)[0]
            for j in range(n)])
    if provider == "eager":
        from bridge.kernels.multi_lora_linear import multi_lora_linear

        return lambda: multi_lora_linear(t.x, t.w, t.b, t.a, t.bb, case.tokens, [case.r] * n,
                                         [ALPHA] * n, backend="eager")
    return build(provider, case, t)[0]


# ---- correctness -------------------------------------------------------------------------------


def check(provider: str, case: Case, t: Inputs, gemm: str = "") -> float:
    """Largest relative error of y and the gradients of x, A, B against the fp64 reference;
    raises AssertionError past the dtype's tolerance."""
    from bridge.kernels.multi_lora_linear import multi_lora_linear_ref

    from tests.numerics import dtype_tol, rel_err

    fwd, leaves = build(provider, case, t, gemm)
    y = fwd()
    f64 = lambda v: v.detach().double().requires_grad_()  # noqa: E731
    if provider == "frozen":
        errs = [rel_err(y, F.linear(t.x.double(), t.w.double(), t.b.double()))]
    else:
        g = torch.Generator(device=y.device).manual_seed(7)
        dy = torch.randn(y.shape, generator=g, device=y.device).to(y.dtype)
        x, a, bb = f64(t.x), f64(t.a), f64(t.bb)
        y_ref = multi_lora_linear_ref(x, t.w.double(), t.b.double(), a, bb, case.tokens,
                                      [case.r] * case.slots, [ALPHA] * case.slots)
        refs = torch.autograd.grad(y_ref, (x, a, bb), dy.double())
        grads = torch.autograd.grad(y, leaves, dy)
        if provider in ("separate", "megatron-bridge"):  # per-slot leaves: stack them
            n = case.slots
            grads = [grads[0], torch.stack(grads[1:1 + n]), torch.stack(grads[1 + n:])]
        errs = [rel_err(y, y_ref)] + [rel_err(u, v) for u, v in zip(grads, refs, strict=True)]
    # one op at benchmark sizes (fp32 on a GPU runs TF32 in Triton's dots). Megatron-Bridge's
    # arrangement rounds its low-rank term in bf16 too: 2.8e-3 at bf16 K=4096 (measured on the
    # CPU with its grouped mms as per-slot bf16 mms), inside the bound
    tol = dtype_tol(case.dtype, "bench", tf32=case.device == "cuda")
    assert max(errs) <= tol, (f"{label(provider, gemm)} differs from the fp64 reference "
                              f"(tol {tol:.0e}): y, dx, dA, dB {[f'{e:.2e}' for e in errs]}")
    return max(errs)


def goal_bytes(case: Case) -> int:
    """What the fused op saves: x, S (fp32 [M, r]) and the slot table (offsets, ranks, scales)."""
    elt = torch.finfo(case.dtype).bits // 8
    return case.m * case.k * elt + case.m * case.r * 4 + (case.slots + 1) * 4 + 2 * case.slots * 4


# ---- one case: every provider ------------------------------------------------------------------


def _row(case: Case, provider: str, gemm: str, mode: str, **values) -> dict:
    from benchmarks.measure import environment

    return {"op": OP, "provider": provider, "gemm": gemm or None, "mode": mode, "M": case.m,
            "K": case.k, "N": case.n, "r": case.r, "p": 0.0,
            "dtype": str(case.dtype).removeprefix("torch."), "variant": case.variant,
            "n_slots": case.slots, "split": case.split,
            "tokens": "/".join(map(str, case.tokens)), "note": "", **environment(), **values}


def flops(case: Case, mode: str, lora: bool = True) -> float:
    base = 2 * case.m * case.n * case.k
    low = 2 * case.m * case.r * (case.k + case.n) if lora else 0
    return {"forward": base + low, "fwd+bwd": 2 * base + 3 * low}[mode]


def measure_case(case: Case, *, timed: bool) -> list[dict]:
    """Rows of every provider of ``case``: checked (not on meta), saved bytes counted, and with
    ``timed`` each mode timed (Triton providers under the interpreter are never timed)."""
    from benchmarks.measure import budget_for, count_saved_bytes, peak_bytes, step_callables

    t = make_inputs(case)
    params = [t.w, t.b, t.a, t.bb, *t.a_slots, *t.b_slots]
    budget = budget_for(case.device, grid_name())
    rows = []
    for prov, gemm in PROVIDERS:
        ok, why = probe(prov, case)
        if not ok:
            rows.append(_row(case, prov, gemm, "forward", note=f"skipped: {why}"))
            continue
        err = None
        if case.device != "meta":
            try:
                err = check(prov, case, t, gemm)
            except Exception as exc:  # noqa: BLE001  (reported; a provider that fails is not timed)
                rows.append(_row(case, prov, gemm, "forward",
                                 note=f"FAILED check: {type(exc).__name__}: {exc}"[:400]))
                continue
        fwd, leaves = build(prov, case, t, gemm) if case.device != "meta" else (
            _meta_forward(prov, gemm, case, t), None)
        counter, _ = count_saved_bytes(fwd, params)
        common = dict(saved_bytes=counter.without_params,
                      saved_bytes_with_params=counter.with_params, check_err=err)
        interpreted = prov in ("fused", "separate") and case.device == "cpu"
        if case.device == "meta" or not timed or interpreted:
            note = ("meta tensors: saved bytes at this shape, not timed" if case.device == "meta"
                    else "interpreted: not timed" if interpreted else "not timed")
            rows.append(_row(case, prov, gemm, "forward", note=note, **common))
            continue
        dy = torch.randn(case.m, case.n, device=t.x.device, dtype=case.dtype)
        for mode in MODES:
            target, setup = step_callables(fwd, leaves, mode, dy)
            peak = peak_bytes(target, setup)
            tm = bench(target, case.device, setup=setup, budget=budget)
            rows.append(_row(case, prov, gemm, mode, median_ms=tm.median_ms, p20_ms=tm.p20_ms,
                             p80_ms=tm.p80_ms, rounds=tm.reps, peak_mem_bytes=peak,
                             tflops=flops(case, mode, prov != "frozen") / tm.median_ms / 1e9,
                             **common))
    del t
    if case.device == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---- pytest (benchmarks/ harness) and command line ---------------------------------------------

GRID = grid_name()


@pytest.mark.parametrize("case", cases(GRID), ids=lambda c: c.id)
def test_multi_lora_linear(case, record):
    """One case: every provider checked, measured and recorded; the fused op saves exactly x,
    S and the slot table, in every GEMM strategy."""
    spent = budget_spent(OP)
    if spent:
        record([_row(case, p, g, "forward", note=f"skipped: {spent}") for p, g in PROVIDERS])
        pytest.skip(spent)
    rows = measure_case(case, timed=GRID in ("gpu", "tiny"))
    record(rows)
    failed = [r["note"] for r in rows if r["note"].startswith("FAILED")]
    assert not failed, "\n".join(failed)
    for r in rows:
        if r["provider"] == "fused" and r.get("saved_bytes") is not None:
            assert r["saved_bytes"] == goal_bytes(case), (r["gemm"], r["saved_bytes"])


def main(argv: list[str] | None = None) -> int:
    from benchmarks import results

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", choices=("gpu", "cpu", "interp", "tiny"), default=None)
    ap.add_argument("--csv", help="write the rows (results.COLUMNS) here")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting cases after this")
    args = ap.parse_args(argv)
    if args.budget_s is not None:
        os.environ[BUDGET_ENV] = str(args.budget_s)
    grid = os.environ[GRID_ENV] = grid_name(args.grid)
    if not torch.cuda.is_available():  # shared cores: OpenMP barriers stall (benchmarks/conftest)
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    rows = []
    for case in cases(grid):
        if spent := budget_spent(OP):
            rows += [_row(case, p, g, "forward", note=f"skipped: {spent}") for p, g in PROVIDERS]
            continue
        rows += measure_case(case, timed=grid in ("gpu", "tiny"))
    results.add_frozen_ratios(rows)
    print(results.variant_table(rows, OP), results.saved_table(rows), *results.problems(rows),
          sep="\n")
    if args.csv:
        results.write_csv(rows, args.csv)
    return 1 if any(r["note"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
