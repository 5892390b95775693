"""Benchmark of the grouped (MoE expert) LoRA linear y_e = x_e W_e^T + s B_e(A_e(dropout(x_e))).

Providers, on the same tensors:
    frozen   the base grouped GEMM alone (torch's grouped_mm where it runs, else one GEMM per
             expert, as SequentialMLP does): the floor any expert LoRA pays
    eager    Megatron-Bridge's arrangement: the base grouped GEMM, and the adapter beside the
             experts (shared adapter: one dense LoRA over all routed tokens, ParallelLinearAdapter;
             per-expert: two grouped GEMMs, GroupedExpertLinearAdapter), added to the base output
    fused    bridge.kernels.grouped_lora_linear (backend='triton')

Grids (``$BENCH_GRID``, benchmarks/cases.py):
    gpu     E in {8, 16, 32, 64} experts, top-k routing of 8192 tokens (M = 8192 k rows),
            K = N = 2048, r = 16, bf16, p in {0, 0.1}, shared and per-expert adapters (p = 0
            first): every provider checked against the fp64 reference, then timed forward,
            backward and fwd+bwd with the shared timer (kernels/_timing.py: CUDA events, L2
            flushed; median, p20, p80), with saved bytes and peak memory.
    cpu     the GPU cases' saved-for-backward bytes, counted on meta tensors (nothing runs: the
            registered op's fake and torch's meta kernels give the saved tensors' shapes).
    interp  small odd shapes under TRITON_INTERPRET=1: every provider checked, saved bytes of a
            real run; not timed.
    tiny    the interp shapes, frozen and eager timed on the host clock (gpu_check.sh's dry run).

A provider is checked before it is timed (one that fails is never timed): fused at the case's p
against the reference under the kernel's own mask (regenerated from the seed), eager and frozen
at p = 0 (eager's mask is torch's own). Rows follow results.COLUMNS: op ``grouped_lora_linear``,
variant ``E<experts>-top<k>-<layout>``, ``tokens`` the rows per expert.

    python -m pytest benchmarks/bench_grouped_lora_linear.py          # one grid (benchmarks.run)
    python -m benchmarks.bench_grouped_lora_linear [--grid G] [--csv PATH] [--budget-s S]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from bridge.kernels._timing import Budget, bench

from benchmarks.cases import BUDGET_ENV, GRID_ENV, budget_spent, grid_name

OP = "grouped_lora_linear"
TOKENS, K, N, R, ALPHA = 8192, 2048, 2048, 16, 32.0
EXPERTS_TOPK = ((8, 2), (16, 4), (32, 8), (64, 8))
LAYOUTS = ("shared", "per_expert")
PS = (0.0, 0.1)
PROVIDERS = ("frozen", "eager", "fused")
MODES = ("forward", "backward", "fwd+bwd")
SEED = 7  # dropout seed of the fused provider's check


@dataclass(frozen=True)
class Case:
    """One problem: top-``topk`` routing of ``tokens`` over ``experts`` experts."""

    experts: int
    topk: int
    layout: str  # "shared" (Megatron-Bridge's default) | "per_expert"
    p: float
    tokens: int = TOKENS
    k: int = K
    n: int = N
    r: int = R
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"  # cuda | cpu | meta (shapes only: saved bytes)

    @property
    def m(self) -> int:
        return self.tokens * self.topk

    @property
    def scale(self) -> float:
        return ALPHA / self.r

    @property
    def variant(self) -> str:
        return f"E{self.experts}-top{self.topk}-{self.layout}"

    @property
    def id(self) -> str:
        return f"{self.variant}-M{self.m}-K{self.k}-N{self.n}-r{self.r}-p{self.p:g}"


def cases(grid: str | None = None) -> list[Case]:
    """The cases of ``grid`` in run order (p = 0 first: the time figures' cases)."""
    grid = grid_name(grid)
    if grid in ("gpu", "cpu"):
        dev = "cuda" if grid == "gpu" else "meta"
        return [Case(e, k, layout, p, device=dev)
                for p in PS for layout in LAYOUTS for e, k in EXPERTS_TOPK]
    # 5 experts, top-2 of 37 tokens: uneven counts, K and N not multiples of any block
    return [Case(5, 2, layout, p, tokens=37, k=40, n=24, r=8, dtype=torch.float32, device="cpu")
            for p in PS for layout in LAYOUTS]


def route(tokens: int, experts: int, topk: int, seed: int = 0) -> list[int]:
    """Tokens per expert of a top-k router over random logits (uneven, as real routing is)."""
    g = torch.Generator().manual_seed(seed)
    top = torch.randn(tokens, experts, generator=g).topk(topk, dim=1).indices
    return torch.bincount(top.flatten(), minlength=experts).tolist()


@dataclass
class Inputs:
    x: torch.Tensor  # [M, K] tokens sorted by expert
    weight: torch.Tensor  # [E, N, K] frozen
    lora_a: torch.Tensor  # [r, K] shared or [E, r, K]
    lora_b: torch.Tensor  # [N, r] shared or [E, N, r]
    counts: list[int]


def make_inputs(case: Case, device: str | torch.device | None = None, seed: int = 0) -> Inputs:
    """Random inputs at a real layer's scale (never zeros: B is random), drawn on the device;
    on "meta" only shapes exist."""
    device = case.device if device is None else device
    counts = route(case.tokens, case.experts, case.topk, seed)
    e_dim = (case.experts,) if case.layout == "per_expert" else ()
    g = None if str(device) == "meta" else torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0):
        if g is None:
            return torch.empty(shape, device=device, dtype=case.dtype)
        return (torch.randn(shape, generator=g, device=device) * std).to(case.dtype)

    return Inputs(rnd(case.m, case.k), rnd(case.experts, case.n, case.k, std=case.k**-0.5),
                  rnd(*e_dim, case.r, case.k, std=case.k**-0.5),
                  rnd(*e_dim, case.n, case.r, std=case.r**-0.5), counts)


# ---- providers ---------------------------------------------------------------------------------


@functools.cache
def _grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs here (it needs a recent GPU; meta always has it)."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None or device_type not in ("cuda", "meta"):
        return False
    try:
        a = torch.zeros(32, 16, device=device_type, dtype=dtype)
        b = torch.zeros(2, 16, 16, device=device_type, dtype=dtype)
        fn(a, b, offs=torch.tensor([16, 32], device=device_type, dtype=torch.int32))
    except Exception:  # noqa: BLE001  (unsupported GPU or dtype: the per-expert loop runs)
        return False
    return True


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int],
               offs: torch.Tensor | None) -> torch.Tensor:
    """y_e = x_e w_e^T for w [E, out, in]: torch's grouped GEMM where it runs, else per expert."""
    if offs is not None and _grouped_mm_runs(x.device.type, x.dtype):
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    return torch.cat([xe @ w[i].t() for i, xe in enumerate(torch.split(x, counts))])


def probe(provider: str, case: Case) -> tuple[bool, str]:
    """Whether ``provider`` runs here, and why not (the fused one needs a Triton backend, or meta
    tensors, where its registered op's fake runs)."""
    if provider != "fused" or case.device == "meta":
        return True, ""
    from bridge.kernels.backend import probe_triton

    ok, why = probe_triton(torch.device(case.device), case.dtype)
    return ok, "" if ok else f"no Triton backend here ({why}); on the CPU set TRITON_INTERPRET=1"


def build(provider: str, case: Case, t: Inputs, seed: int | None = None
          ) -> tuple[Callable[[], torch.Tensor], list]:
    """(training forward, tensors the gradient is taken for) of one provider, on fresh leaves;
    ``seed`` fixes the fused provider's dropout mask (None: drawn per call, as in training)."""
    x = t.x.detach().clone().requires_grad_()
    w = t.weight
    a = t.lora_a.detach().clone().requires_grad_()
    b = t.lora_b.detach().clone().requires_grad_()
    counts = t.counts
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device)
    if provider == "frozen":
        return (lambda: grouped_mm(x, w, counts, offs)), [x]
    if provider == "eager":
        def eager():
            base = grouped_mm(x, w, counts, offs)
            # nn.Dropout's CUDA path (native_dropout: a bool mask), on every device, so the
            # CPU/meta count is what a GPU saves (F.dropout on the CPU keeps x-dtype noise)
            xd = torch.native_dropout(x, case.p, True)[0] if case.p > 0 else x
            if case.layout == "shared":  # ParallelLinearAdapter over every routed token
                low = (xd @ a.t()) @ b.t()
            else:  # GroupedExpertLinearAdapter: linear_in, then linear_out, grouped
                low = grouped_mm(grouped_mm(xd, a, counts, offs), b, counts, offs)
            return base + low * case.scale
        return eager, [x, a, b]
    if provider == "fused":
        from bridge.kernels.grouped_lora_linear import grouped_lora_linear

        tpe = torch.tensor(counts, dtype=torch.int32, device=x.device)
        if x.device.type == "meta":  # the registered op itself (what backend='triton' calls)
            seed_t = torch.empty(1, dtype=torch.int64, device="meta") if case.p > 0 else None
            return (lambda: torch.ops.bridge.grouped_lora_linear_fwd(
                x, [w], None, a, b, tpe, seed_t, case.scale, case.p, False)[0]), [x, a, b]
        return (lambda: grouped_lora_linear(x, w, None, a, b, tpe, scale=case.scale,
                                            dropout=case.p, seed=seed, backend="triton")), [x, a, b]
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


# ---- correctness and saved bytes ---------------------------------------------------------------


def check(provider: str, case: Case, t: Inputs) -> float:
    """Largest relative error of y and every gradient against the fp64 reference; raises
    AssertionError past twice the dtype's tolerance (K-long reductions of rounded operands).
    The fused provider runs at the case's p under its own mask (regenerated from its seed);
    eager and frozen at p = 0 (eager's mask is torch's own)."""
    from bridge.kernels.grouped_lora_linear import grouped_lora_linear_ref
    from bridge.kernels.philox import dropout_keep_mask

    from tests.numerics import dtype_tol, rel_err

    p = case.p if provider == "fused" else 0.0
    fwd, leaves = build(provider, replace(case, p=p), t, seed=SEED)
    y = fwd()
    g = torch.Generator(device=y.device).manual_seed(1)
    dy = torch.randn(y.shape, device=y.device, generator=g).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    mask = dropout_keep_mask(SEED, t.x.shape, p, t.x.device) if p > 0 else None
    ref_leaves = [v.detach().double().requires_grad_() for v in leaves]
    a64, b64 = ref_leaves[1:] if provider != "frozen" else (
        t.lora_a.double(), torch.zeros_like(t.lora_b, dtype=torch.float64))  # frozen: B = 0
    y_ref = grouped_lora_linear_ref(ref_leaves[0], t.weight.double(), None, a64, b64, t.counts,
                                    scale=case.scale, dropout=p, dropout_mask=mask)
    refs = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    names = ("y", "dx", "dA", "dB")
    errs = dict(zip(names, [rel_err(y, y_ref)] + [rel_err(gr, rf) for gr, rf in
                                                  zip(grads, refs, strict=True)], strict=False))
    tol = 2 * dtype_tol(case.dtype)
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, (f"{provider} differs from the fp64 reference (tol {tol:.1e}): "
                     + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    return max(errs.values())


def saved_bytes(fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> tuple[int, int]:
    """(bytes autograd saves during ``fn()`` with ``params`` set aside, with them): each storage
    once, on any device, meta included (benchmarks/measure.py's counter)."""
    from benchmarks.measure import count_saved_bytes

    counter, _ = count_saved_bytes(fn, params)
    return counter.without_params, counter.with_params


def goal_bytes(case: Case) -> int:
    """What the fused op should save: x in its dtype and S [M, r] in fp32 (no mask, no x~)."""
    return case.m * case.k * (torch.finfo(case.dtype).bits // 8) + case.m * case.r * 4


def flops(case: Case, mode: str, lora: bool = True) -> float:
    """FLOPs in ``mode``: base 2MNK (forward, and dX backward); adapter 2Mr(K+N) forward,
    4Mr(K+N) backward (dS/dX term, dA, dB)."""
    base = 2 * case.m * case.n * case.k
    low = 2 * case.m * case.r * (case.k + case.n) if lora else 0
    fwd, bwd = base + low, base + 2 * low
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]


# ---- one case: every provider ------------------------------------------------------------------


def _row(case: Case, provider: str, mode: str, counts: list[int], **values) -> dict:
    from benchmarks.measure import environment

    return {"op": OP, "provider": provider, "gemm": None, "mode": mode, "M": case.m, "K": case.k,
            "N": case.n, "r": case.r, "p": case.p, "dtype": str(case.dtype).removeprefix("torch."),
            "variant": case.variant, "experts": case.experts, "topk": case.topk,
            "layout": case.layout, "tokens": "/".join(map(str, counts)), "note": "",
            **environment(), **values}


def measure_case(case: Case, *, timed: bool, budget: Budget | None = None) -> list[dict]:
    """Rows of every provider of ``case``: checked (not on meta), saved bytes counted, and with
    ``timed`` each mode timed (the fused provider under the interpreter is never timed)."""
    from benchmarks.measure import budget_for, peak_bytes, step_callables

    t = make_inputs(case)
    rows = []
    for prov in PROVIDERS:
        ok, why = probe(prov, case)
        if not ok:
            rows.append(_row(case, prov, "forward", t.counts, note=f"skipped: {why}"))
            continue
        err = None
        if case.device != "meta":
            try:
                err = check(prov, case, t)
            except Exception as exc:  # noqa: BLE001  (reported; a provider that fails is not timed)
                rows.append(_row(case, prov, "forward", t.counts,
                                 note=f"FAILED check: {type(exc).__name__}: {exc}"[:400]))
                continue
        fwd, leaves = build(prov, case, t)
        without, with_params = saved_bytes(fwd, [t.weight, *leaves[1:]])
        common = dict(saved_bytes=without, saved_bytes_with_params=with_params, check_err=err)
        interpreted = prov == "fused" and case.device == "cpu"
        if case.device == "meta" or not timed or interpreted:
            note = ("meta tensors: saved bytes at this shape, not timed" if case.device == "meta"
                    else "interpreted: not timed" if interpreted else "not timed")
            rows.append(_row(case, prov, "forward", t.counts, note=note, **common))
            continue
        dy = torch.randn(case.m, case.n, device=t.x.device, dtype=case.dtype)
        for mode in MODES:
            target, setup = step_callables(fwd, leaves, mode, dy)
            peak = peak_bytes(target, setup)
            tm = bench(target, case.device, setup=setup,
                       budget=budget or budget_for(case.device, grid_name()))
            rows.append(_row(case, prov, mode, t.counts, median_ms=tm.median_ms, p20_ms=tm.p20_ms,
                             p80_ms=tm.p80_ms, rounds=tm.reps, peak_mem_bytes=peak,
                             tflops=flops(case, mode, prov != "frozen") / tm.median_ms / 1e9,
                             **common))
        del dy
    if case.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def assert_saved_goal(case: Case, rows: list[dict]) -> None:
    """The memory claim: fused saves x + S, the seed and the int32 counts (never the mask nor
    x~); at p > 0 eager keeps x~ and the bool mask too, so fused saves less."""
    by = {r["provider"]: r["saved_bytes"] for r in rows if r.get("saved_bytes") is not None}
    if "fused" not in by:
        return
    goal = goal_bytes(case)
    assert goal <= by["fused"] <= goal + 8 + 4 * case.experts + 64, (case.id, by, goal)
    if case.p > 0 and "eager" in by:
        elt = torch.finfo(case.dtype).bits // 8
        assert by["eager"] >= case.m * case.k * (elt + 1), (case.id, by)
        assert by["fused"] < by["eager"], (case.id, by)


# ---- pytest (benchmarks/ harness) and command line ---------------------------------------------

GRID = grid_name()


@pytest.mark.parametrize("case", cases(GRID), ids=lambda c: c.id)
def test_grouped_lora_linear(case, record):
    """One case: every provider checked, measured and recorded in the session CSV."""
    spent = budget_spent(OP)
    if spent:
        record([_row(case, prov, "forward", [], note=f"skipped: {spent}") for prov in PROVIDERS])
        pytest.skip(spent)
    rows = measure_case(case, timed=GRID in ("gpu", "tiny"))
    record(rows)
    failed = [r["note"] for r in rows if r["note"].startswith("FAILED")]
    assert not failed, "\n".join(failed)
    assert_saved_goal(case, rows)


def test_meta_count_matches_a_real_run():
    # the meta count is what a real run saves (eager providers on the CPU, small shape)
    case = Case(4, 2, "per_expert", 0.1, tokens=24, k=40, n=24, r=8, dtype=torch.float32)
    meta, real = make_inputs(case, "meta"), make_inputs(case, "cpu")
    for prov in ("frozen", "eager"):
        got = [saved_bytes(f, [t.weight, *lv[1:]]) for t in (meta, real)
               for f, lv in [build(prov, case, t)]]
        assert got[0] == got[1], (prov, got)


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
            rows += [_row(case, prov, "forward", [], note=f"skipped: {spent}") for prov in PROVIDERS]
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
