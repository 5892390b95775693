"""Benchmark of the grouped (MoE expert) LoRA linear y_e = x_e W_e^T + s B_e(A_e(dropout(x_e))).

Providers, on the same tensors:
    frozen   the base grouped GEMM alone (torch's grouped_mm where it runs, else one GEMM per
             expert, as SequentialMLP does): the floor any expert LoRA pays
    eager    Megatron-Bridge's arrangement: the base grouped GEMM, and the adapter beside the
             experts (shared adapter: one dense LoRA over all routed tokens, ParallelLinearAdapter;
             per-expert: two grouped GEMMs, GroupedExpertLinearAdapter), added to the base output
    fused    bridge.kernels.grouped_lora_linear (backend='triton')

Cases: E in {8, 16, 32, 64} experts, top-k routing of 8192 tokens (M = 8192 k rows), K = N = 2048,
r = 16, bf16, dropout p in {0, 0.1}, shared and per-expert adapters. Saved-for-backward bytes are
counted on the CPU at the full shape on meta tensors (nothing is computed; the registered op's
fake and torch's meta kernels give the saved tensors' shapes) and checked against a real run on a
small shape; times (CUDA events, L2 flushed: triton.testing.do_bench) only on a GPU, after the
fused provider is checked against the fp64 reference (values and every gradient).

    python -m pytest benchmarks/bench_grouped_lora_linear.py      # checks + figures (-s prints)
    python -m benchmarks.bench_grouped_lora_linear [--csv PATH]   # the table
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

TOKENS, K, N, R, ALPHA = 8192, 2048, 2048, 16, 32.0
EXPERTS_TOPK = ((8, 2), (16, 4), (32, 8), (64, 8))
LAYOUTS = ("shared", "per_expert")
PS = (0.0, 0.1)
PROVIDERS = ("frozen", "eager", "fused")
MODES = ("forward", "backward", "fwd+bwd")


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

    @property
    def m(self) -> int:
        return self.tokens * self.topk

    @property
    def scale(self) -> float:
        return ALPHA / self.r

    @property
    def id(self) -> str:
        return (f"E{self.experts}-top{self.topk}-M{self.m}-K{self.k}-N{self.n}-r{self.r}-"
                f"{self.layout}-p{self.p:g}")


def cases() -> list[Case]:
    return [Case(e, k, layout, p) for e, k in EXPERTS_TOPK for layout in LAYOUTS for p in PS]


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


def make_inputs(case: Case, device: str | torch.device, seed: int = 0) -> Inputs:
    """Random inputs at a real layer's scale (never zeros: B is random), drawn on the device;
    on "meta" only shapes exist."""
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


def build(provider: str, case: Case, t: Inputs) -> tuple[Callable[[], torch.Tensor], list]:
    """(forward closure, tensors the gradient is taken for) of one provider; fresh leaves."""
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
            seed = torch.empty(1, dtype=torch.int64, device="meta") if case.p > 0 else None
            return (lambda: torch.ops.bridge.grouped_lora_linear_fwd(
                x, [w], None, a, b, tpe, seed, case.scale, case.p, False)[0]), [x, a, b]
        return (lambda: grouped_lora_linear(x, w, None, a, b, tpe, scale=case.scale,
                                            dropout=case.p, backend="triton")), [x, a, b]
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


# ---- saved bytes -------------------------------------------------------------------------------


def saved_bytes(fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves during ``fn()`` (``params`` excluded), on any
    device, meta included (storages told apart by identity, not address)."""
    skip = {p.untyped_storage()._cdata for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in skip:
            seen.setdefault(st._cdata, st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def saved_row(case: Case, device: str = "meta") -> dict:
    """Saved bytes of each provider for ``case`` (weights and adapter factors excluded), with the
    goal x + S of the fused op."""
    t = make_inputs(case, device)
    row = {"case": case.id}
    for prov in PROVIDERS:
        fn, leaves = build(prov, case, t)
        row[prov] = saved_bytes(fn, [t.weight, *leaves[1:]])
    elt = torch.finfo(case.dtype).bits // 8
    row["x+S"] = case.m * case.k * elt + case.m * case.r * 4
    return row


# ---- timing (GPU) ------------------------------------------------------------------------------


def _check_fused(case: Case, t: Inputs) -> float:
    """Largest relative error of the fused provider (y, dx, dA, dB) against the fp64 reference
    under the kernels' own mask; raises AssertionError past the bf16 tolerance."""
    from bridge.kernels.grouped_lora_linear import grouped_lora_linear, grouped_lora_linear_ref
    from bridge.kernels.philox import dropout_keep_mask

    from tests.numerics import dtype_tol, rel_err

    leaves = [v.detach().clone().requires_grad_() for v in (t.x, t.lora_a, t.lora_b)]
    y = grouped_lora_linear(leaves[0], t.weight, None, *leaves[1:], t.counts, scale=case.scale,
                            dropout=case.p, seed=7, backend="triton")
    dy = torch.randn(y.shape, device=y.device, generator=torch.Generator(y.device).manual_seed(1))
    dy = dy.to(y.dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    mask = dropout_keep_mask(7, t.x.shape, case.p, t.x.device) if case.p > 0 else None
    ref_leaves = [v.detach().double().requires_grad_() for v in leaves]
    y_ref = grouped_lora_linear_ref(ref_leaves[0], t.weight.double(), None, *ref_leaves[1:],
                                    t.counts, scale=case.scale, dropout=case.p, dropout_mask=mask)
    refs = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    errs = [rel_err(y, y_ref)] + [rel_err(g, r) for g, r in zip(grads, refs, strict=True)]
    tol = 2 * dtype_tol(case.dtype)  # K = 2048 reductions in bf16 tensor-core operands
    assert max(errs) < tol, f"{case.id}: fused differs from the reference: {errs} (tol {tol})"
    return max(errs)


def time_ms(case: Case, provider: str, mode: str, t: Inputs) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of one provider and mode (do_bench: CUDA events, L2
    flushed between runs)."""
    from triton.testing import do_bench

    fwd, leaves = build(provider, case, t)
    dy = torch.randn(case.m, case.n, device=t.x.device, dtype=case.dtype)
    if mode == "forward":
        fn = fwd
    elif mode == "backward":
        y = fwd()
        fn = lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(fwd(), leaves, dy)  # noqa: E731
    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def flops(case: Case, mode: str) -> float:
    """FLOPs of the LoRA linear in ``mode`` (base 2MNK; adapter 2Mr(K+N); backward: dX, dA, dB)."""
    fwd = 2 * case.m * case.n * case.k + 2 * case.m * case.r * (case.k + case.n)
    bwd = 2 * case.m * case.n * case.k + 4 * case.m * case.r * (case.k + case.n)
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]


# ---- pytest ------------------------------------------------------------------------------------

ON_GPU = torch.cuda.is_available()
_SHARED_AND_EXPERT = [c for c in cases() if c.p == 0.1]


@pytest.mark.parametrize("case", _SHARED_AND_EXPERT, ids=lambda c: c.id)
def test_saved_bytes_at_full_shape(case):
    row = saved_row(case)
    # the fused op keeps x, S (fp32), the seed and the int32 counts: never the mask nor x~
    assert row["x+S"] <= row["fused"] <= row["x+S"] + 8 + 4 * case.experts + 64, row
    elt = torch.finfo(case.dtype).bits // 8
    assert row["eager"] >= case.m * case.k * (elt + 1), row  # eager keeps x~ and the bool mask
    assert row["fused"] < row["eager"], row
    print(f"\n{case.id}: saved MiB frozen {row['frozen'] / 2**20:.1f}, eager "
          f"{row['eager'] / 2**20:.1f}, fused {row['fused'] / 2**20:.1f} (x+S "
          f"{row['x+S'] / 2**20:.1f})")


def test_meta_count_matches_a_real_run():
    # the meta count is what a real run saves (eager providers on the CPU, small shape)
    case = Case(4, 2, "per_expert", 0.1, tokens=24, k=40, n=24, r=8, dtype=torch.float32)
    meta, real = make_inputs(case, "meta"), make_inputs(case, "cpu")
    for prov in ("frozen", "eager"):
        got = [saved_bytes(f, [t.weight, *lv[1:]]) for t in (meta, real)
               for f, lv in [build(prov, case, t)]]
        assert got[0] == got[1], (prov, got)


@pytest.mark.skipif(not ON_GPU, reason="times only on a CUDA GPU (none here); saved bytes are "
                    "measured on the CPU by test_saved_bytes_at_full_shape")
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_times(case):
    t = make_inputs(case, "cuda")
    err = _check_fused(case, t)
    for prov in PROVIDERS:
        for mode in MODES:
            med, p20, p80 = time_ms(case, prov, mode, t)
            print(f"\n{case.id} {prov:6s} {mode:8s} {med:8.3f} ms [{p20:.3f}, {p80:.3f}] "
                  f"{flops(case, mode) / med / 1e9:7.1f} TFLOP/s (fused max rel err {err:.1e})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", help="write one row per (case, provider, mode) here")
    args = ap.parse_args(argv)
    rows = []
    for case in cases():
        saved = saved_row(case)
        t = make_inputs(case, "cuda") if ON_GPU else None
        err = _check_fused(case, t) if ON_GPU else None
        for prov in PROVIDERS:
            for mode in MODES:
                med = p20 = p80 = None
                if ON_GPU:
                    med, p20, p80 = time_ms(case, prov, mode, t)
                rows.append({"case": case.id, "experts": case.experts, "topk": case.topk,
                             "M": case.m, "K": case.k, "N": case.n, "r": case.r,
                             "layout": case.layout, "p": case.p, "provider": prov, "mode": mode,
                             "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                             "saved_bytes": saved[prov], "goal_x_plus_s": saved["x+S"],
                             "fused_max_rel_err": err,
                             "device": torch.cuda.get_device_name() if ON_GPU else "cpu (meta)"})
                ms = "not timed (no GPU)" if med is None else f"{med:8.3f} ms"
                print(f"{case.id:44s} {prov:6s} {mode:8s} {ms}  saved "
                      f"{saved[prov] / 2**20:8.1f} MiB")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
