"""End to end: one LoRA training step (forward + backward of one micro-batch) through a stack of
GPT decoder layers, every provider side by side in one run.

    spec     megatron-core's local layer spec (linear_qkv/fc1 ColumnParallelLinear, proj/fc2
             RowParallelLinear, separate RMSNorms); megatron's TE spec when transformer-engine is
             installed on a GPU; the TE-shaped stand-ins of tests/te_standins.py on request
             ("te-standin"); a plain-torch Llama block without megatron-core. Core attention is
             torch's SDPA (flash on a GPU) except in the real TE spec (TE's fused attention):
             megatron's local DotProductAttention materialises the [s, s] scores (1 GiB per layer
             at seq 4096), which is not what a user trains with.
    providers  frozen (no adapters), eager (ours, kernel_backend="eager"), megatron-bridge (its
             LoRA, when installed), fused (ours, kernel_backend="auto").
    LoRA     r=16, alpha=32 on linear_qkv, linear_proj, linear_fc1, linear_fc2; dropout p (pre).

Figures per provider: step time (median, p20, p80; rounds interleaved across providers so load
drift hits all alike), tokens/s, bytes saved for backward (saved_tensors_hooks, each storage once,
weights aside) and peak GPU memory, each also as a ratio to frozen; the path each LoRA layer took, from
``bridge.peft.kernel_report`` (fused backend and GEMM strategy, or eager and why), checked against
what ran. The stack's input requires grad for every provider, so frozen
runs the backward (dX) a LoRA step needs below its first adapter.

Correctness first: every provider's loss, dX and adapter gradients are compared with our eager
LoRA in fp64 with the same weights and the provider's own dropout masks (an eager provider's are
read off its dropout modules; a fused layer's are regenerated from its seed: the torch RNG state
before the layer is replayed through ``draw_seed`` and the mask through ``dropout_keep_mask``).
On a GPU this runs at the check dims, in the timed dtype.

    python -m benchmarks.bench_layer [--grid cpu|gpu|tiny] [--csv PATH] [--spec ...]

Under pytest (``benchmarks/``), ``test_layer_step`` runs the grid's cases and adds schema rows
(``results.COLUMNS``) to the session CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, replace

import torch

# On the CPU the fused provider runs in Triton's interpreter, which must be on before triton is
# imported (kernels are decorated as interpreted or compiled at import).
_INTERP_LATE = ""
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        _INTERP_LATE = "triton was imported before TRITON_INTERPRET=1 could be set"
    else:
        os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.layer_models import TARGETS, build_stack, lora_sites, spec_available  # noqa: E402
from benchmarks.layer_report import PROVIDERS, case_rows, summary, write_layer_csv  # noqa: E402
from tests.numerics import dtype_tol, rel_err  # noqa: E402

ALPHA = 32.0
SEED = 1234


@dataclass(frozen=True)
class LayerCase:
    """A stack of ``layers`` Llama-style decoder layers on [seq, batch, hidden] inputs."""

    grid: str
    spec: str  # mcore-local | mcore-te | te-standin | torch
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    seq: int
    batch: int
    layers: int
    r: int
    p: float
    dtype: torch.dtype
    device: str

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (f"{self.spec}-h{self.hidden}-f{self.ffn}-a{self.heads}/{self.kv_heads}-"
                f"s{self.seq}x{self.batch}-L{self.layers}-r{self.r}-p{self.p:g}-{dt}")

    def check_case(self) -> LayerCase:
        """Where correctness is checked: these dims on the CPU, tiny ones (same spec, dtype,
        device, p) on a GPU."""
        if self.device == "cpu":
            return self
        return replace(self, hidden=64, ffn=160, heads=4, kv_heads=2, seq=32, batch=2)


def make_cases(grid: str | None = None, specs: list[str] | None = None) -> list[LayerCase]:
    """``gpu``: Llama-3-8B dims (hidden 4096, ffn 14336, 32/8 heads, seq 4096, 2 layers), bf16.
    ``cpu``: small dims, fp32. ``tiny``: the test's dims (seconds under the interpreter)."""
    grid = grid or ("gpu" if torch.cuda.is_available() else "cpu")
    dims = {"gpu": (4096, 14336, 32, 8, 4096, 1, 2, torch.bfloat16, "cuda"),
            "cpu": (256, 688, 4, 2, 128, 2, 2, torch.float32, "cpu"),
            "tiny": (32, 64, 4, 2, 8, 2, 2, torch.float32, "cpu")}
    if grid not in dims:
        raise ValueError(f"unknown grid {grid!r}; expected gpu, cpu or tiny")
    h, f, a, kv, s, b, n, dt, dev = dims[grid]
    if specs is None:
        specs = [sp for sp in ("mcore-te", "mcore-local", "torch") if spec_available(sp, dev)[0]]
        specs = [sp for sp in specs if sp != "torch" or len(specs) == 1]  # torch: fallback only
    return [LayerCase(grid, sp, h, f, a, kv, s, b, n, 16, p, dt, dev)
            for sp in specs for p in (0.0, 0.1)]


# ---- providers -----------------------------------------------------------------------------------
def _set_adapter_weights(model: torch.nn.Module) -> None:
    """Every provider's adapters get the same A, B per layer name (B random: a zero B hides the
    adapter from y and dX), drawn on the CPU from the name."""
    for name, site in lora_sites(model).items():
        a, b = _factors(site)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        with torch.no_grad():
            a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=g) * 0.05 / b.shape[1] ** 0.5)


def _factors(site):
    adapter = getattr(site, "adapter", None)
    if adapter is not None:
        return adapter.linear_in.weight, adapter.linear_out.weight
    return site.lora_a.weight, site.lora_b.weight


def probe(provider: str, case: LayerCase) -> tuple[bool, str]:
    """Whether ``provider`` can run ``case`` here, and why not."""
    if provider == "megatron-bridge":
        try:
            import megatron.bridge.peft.lora  # noqa: F401
        except ImportError as exc:
            return False, f"Megatron-Bridge is not installed ({exc}); pip install megatron-bridge"
        if case.spec == "torch":
            return False, "Megatron-Bridge's LoRA needs megatron-core layers"
    if provider == "fused":
        from bridge.kernels.backend import probe_triton

        ok, why = probe_triton(torch.device(case.device), case.dtype)
        if ok and case.device == "cpu" and _INTERP_LATE:
            ok, why = False, _INTERP_LATE
        if not ok:
            return False, f"no fused backend here ({why}); on the CPU set TRITON_INTERPRET=1 " \
                          "before triton is imported"
    return True, ""


def build(provider: str, case: LayerCase, reference: torch.nn.Module | None = None,
          dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The stack for ``provider``: the frozen weights of ``reference`` (or from SEED), LoRA."""
    model = build_stack(case, SEED, dtype=dtype or case.dtype)
    if reference is not None:
        model.load_state_dict(reference.state_dict(), strict=True)
    model.requires_grad_(False)
    if provider == "frozen":
        return model.train()
    kw = dict(target_modules=list(TARGETS), dim=case.r, alpha=ALPHA, dropout=case.p)
    if provider == "megatron-bridge":
        from megatron.bridge.peft.lora import LoRA as BridgeLoRA

        model = BridgeLoRA(**kw)(model, training=True)
    else:
        from bridge.peft import LoRA

        backend = "eager" if provider == "eager" else "auto"
        model = LoRA(kernel_backend=backend, **kw)(model, training=True)
    _set_adapter_weights(model)
    return model.train()


# ---- one step, and what it saves ----------------------------------------------------------------
def inputs(case: LayerCase, dtype=None):
    """(x [seq, batch, hidden] requiring grad, dY), fixed for every provider."""
    g = torch.Generator().manual_seed(SEED + 7)
    shape = (case.seq, case.batch, case.hidden)
    x = torch.randn(shape, generator=g).to(case.device, dtype or case.dtype)
    dy = torch.randn(shape, generator=g).to(case.device, dtype or case.dtype)
    return x.requires_grad_(True), dy


def step(model, x, dy, loss: bool = False) -> torch.Tensor | None:
    """One training step's forward + backward (grads reset first, as zero_grad(set_to_none));
    with ``loss``, returns <y, dY> in fp64."""
    for p in model.parameters():
        p.grad = None
    x.grad = None
    y = model(x)
    y.backward(dy)
    return (y.detach().double() * dy.double()).sum() if loss else None


class _Tracker:
    """Forward hooks on every module: the innermost running module's name, which LoRA layers ran
    their adapter module (the eager path), their dropout masks and the RNG state before each."""

    def __init__(self, model) -> None:
        self.stack, self.eager, self.masks, self.rng, self.shapes = [], set(), {}, {}, {}
        self.sites = lora_sites(model)
        self.handles = []
        site_of = {id(m): n for n, m in self.sites.items()}
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._enter(name, site_of)))
            self.handles.append(mod.register_forward_hook(self._leave()))
            if isinstance(mod, torch.nn.Dropout):
                owner = next((n for n in self.sites if name.startswith(n + ".")), None)
                if owner is not None:
                    self.handles.append(mod.register_forward_hook(self._mask(owner)))
        for name, site in self.sites.items():
            adapter = getattr(site, "adapter", None) or site.lora_a
            self.handles.append(adapter.register_forward_hook(
                lambda *_, n=name: self.eager.add(n)))

    def _enter(self, name, site_of):
        def hook(mod, args):
            self.stack.append(name)
            if id(mod) in site_of and args:
                site = site_of[id(mod)]
                self.shapes[site] = tuple(args[0].shape)
                dev = args[0].device
                self.rng[site] = (torch.cuda.get_rng_state(dev) if dev.type == "cuda"
                                  else torch.get_rng_state())
        return hook

    def _leave(self):
        def hook(mod, args, out):
            self.stack.pop()
        return hook

    def _mask(self, owner):
        def hook(mod, args, out):
            self.masks[owner] = (out != 0) | (args[0] == 0)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def fused_mask(self, site: str, p: float, device: torch.device) -> torch.Tensor:
        """The keep mask a fused layer drew: its seed replayed from the RNG state before it."""
        from bridge.kernels.philox import draw_seed, dropout_keep_mask

        cuda = device.type == "cuda"
        now = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
        (torch.cuda.set_rng_state if cuda else torch.set_rng_state)(self.rng[site])
        seed = draw_seed(device)
        (torch.cuda.set_rng_state if cuda else torch.set_rng_state)(now)
        return dropout_keep_mask(seed, self.shapes[site], p, device)


def saved_bytes(model, x, params) -> tuple[int, int, dict[str, int]]:
    """Bytes autograd saves in one forward: (weights aside, with weights, by component)."""
    tracker = _Tracker(model)
    weights = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return t
        where = tracker.stack[-1] if tracker.stack else "input"
        seen.setdefault(st.data_ptr(), (st.nbytes(), _component(where)))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
    finally:
        tracker.remove()
    del y
    by: dict[str, int] = {}
    for ptr, (n, comp) in seen.items():
        if ptr not in weights:
            by[comp] = by.get(comp, 0) + n
    return sum(by.values()), sum(n for n, _ in seen.values()), by


def _component(module_name: str) -> str:
    """Where a saved tensor was saved: 'layers.1.self_attention.linear_qkv.to_wrap' ->
    'self_attention.linear_qkv'; the layer's own ops (residual, bias-dropout-add) -> 'layer'."""
    parts = module_name.split(".")
    if "layers" in parts:
        parts = parts[parts.index("layers") + 2:]
    parts = [q for q in parts if q != "to_wrap"]
    return ".".join(parts[:3]) or "layer"


# ---- correctness ---------------------------------------------------------------------------------
class _FixedMask(torch.nn.Module):
    """Dropout with a given keep mask (the oracle replays each provider's own masks)."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, t):
        return t * self.mask.to(t.dtype) / (1 - self.p)


def check(case: LayerCase, provider: str) -> tuple[float, dict[str, str]]:
    """Compare ``provider`` at ``case.check_case()`` with eager LoRA in fp64 under the same
    masks; returns (largest relative error, {layer: path}). Raises AssertionError when off."""
    c = case.check_case()
    frozen = build("frozen", c)
    model = build(provider, c, reference=frozen)
    x, dy = inputs(c)
    tracker = _Tracker(model)
    torch.manual_seed(SEED)
    try:
        loss = step(model, x, dy, loss=True)
    finally:
        tracker.remove()
    # fp64, except under transformer-engine (no fp64 kernels): fp32 there
    oracle_dtype = torch.float32 if c.spec == "mcore-te" else torch.float64
    oracle = build("frozen" if provider == "frozen" else "eager", c, reference=frozen,
                   dtype=oracle_dtype)
    sites, sites64 = lora_sites(model), lora_sites(oracle)
    with torch.no_grad():  # the provider's adapter weights as they are (rounded to its dtype)
        for name, site in sites.items():
            for got, want in zip(_factors(site), _factors(sites64[name]), strict=True):
                want.copy_(got)
    masks = {}
    if c.p > 0 and provider != "frozen":
        for name in lora_sites(model):
            masks[name] = tracker.masks[name] if name in tracker.eager else \
                tracker.fused_mask(name, c.p, x.device)
        for name, site in lora_sites(oracle).items():
            owner = getattr(site, "adapter", site)
            owner.dropout = _FixedMask(masks[name], c.p)
    x64 = x.detach().to(oracle_dtype).requires_grad_(True)
    loss64 = step(oracle, x64, dy.to(oracle_dtype), loss=True)
    errs = {"loss": abs(float(loss) - float(loss64)) / abs(float(loss64)),
            "dx": rel_err(x.grad, x64.grad)}
    for name, site in sites.items():
        for tag, got, want in zip(("dA", "dB"), _factors(site), _factors(sites64[name]),
                                  strict=True):
            errs[f"{name} {tag}"] = rel_err(got.grad, want.grad)
    tol = dtype_tol(c.dtype, "layer")  # vs the fp64 oracle
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        worst = ", ".join(f"{k} {v:.2e}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:4])
        hint = " (fused dropout masks are replayed from the RNG state)" if masks else ""
        raise AssertionError(f"{provider} differs from fp64 eager (tol {tol:.0e}): {worst}{hint}")
    return max(errs.values()), paths(model, tracker)


def paths(model, tracker: _Tracker) -> dict[str, str]:
    """{LoRA layer: 'fused (<backend>, GEMM <strategy>)' | 'eager (<why>)'} from
    ``bridge.peft.kernel_report`` after the checked step (layers of another package's LoRA:
    'eager (<its class>)'). The report must agree with what ran: an adapter module that ran
    means the eager path (AssertionError otherwise)."""
    from bridge.peft import kernel_report

    rows = {r.name: r for r in kernel_report(model)}
    out = {}
    for name, site in tracker.sites.items():
        row = rows.get(name)
        if row is None:
            out[name] = f"eager ({type(site).__module__}.{type(site).__name__})"
            continue
        if (row.path == "fused") is (name in tracker.eager):
            raise AssertionError(f"{name}: kernel_report says {row.path!r}, but the adapter "
                                 f"module {'ran' if name in tracker.eager else 'did not run'}")
        out[name] = f"fused ({row.backend}, GEMM {row.gemm})" if row.path == "fused" else \
            f"{row.path} ({row.reason})"
    return out


# ---- timing ----------------------------------------------------------------------------------------
def time_interleaved(runs: dict[str, tuple], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step for each provider, one step of each per round in rotating order."""
    cuda = torch.cuda.is_available()
    names = list(runs)
    times = {n: [] for n in names}
    for i in range(warmup + rounds):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            model, x, dy = runs[n]
            if cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(model, x, dy)
                end.record()
                torch.cuda.synchronize()
                dt = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                step(model, x, dy)
                dt = time.perf_counter() - t0
            if i >= warmup:
                times[n].append(dt)
    return times


def peak_bytes(model, x, dy) -> int | None:
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(model, x, dy)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def frozen_flops(case: LayerCase) -> float:
    """FLOPs of the frozen step (linears forward + dX, causal attention forward + backward):
    the same numerator for every provider."""
    d = case.hidden // case.heads
    linear = 2 * case.tokens * case.hidden * ((case.heads + 2 * case.kv_heads) * d
                                              + case.heads * d + 3 * case.ffn)
    attn = 2 * case.batch * case.heads * case.seq ** 2 * d  # QK^T and PV, causal half
    return case.layers * (2 * linear + 3.5 * attn)


# ---- one case: every provider --------------------------------------------------------------------
def measure_case(case: LayerCase, rounds: int | None = None, warmup: int | None = None):
    """(schema rows, layer rows) for every provider of ``case``."""
    cuda = case.device == "cuda"
    rounds = rounds or (20 if cuda else 7)
    warmup = warmup if warmup is not None else (3 if cuda else 1)
    interpreted = not cuda
    frozen = build("frozen", case)
    x, dy = inputs(case)
    results, runs = {}, {}
    for prov in PROVIDERS:
        ok, why = probe(prov, case)
        res = results[prov] = {"note": "" if ok else f"skipped: {why}"}
        if not ok:
            continue
        try:
            res["check_err"], res["paths"] = check(case, prov)
        except Exception as exc:  # noqa: BLE001  (a provider that fails is reported, never timed)
            res["note"] = f"FAILED check: {type(exc).__name__}: {exc}"
            continue
        model = frozen if prov == "frozen" else build(prov, case, reference=frozen)
        torch.manual_seed(SEED)
        params = list(model.parameters())
        res["saved"], res["saved_with"], res["by"] = saved_bytes(model, x, params)
        res["adapter_bytes"] = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        if prov == "fused" and interpreted:
            res["note"] = "interpreted: not timed"
            continue
        step(model, x, dy)  # first backward (autotuning, workspaces) outside the peak
        res["peak"] = peak_bytes(model, x, dy)
        runs[prov] = (model, x, dy)
    for prov, ts in time_interleaved(runs, rounds, warmup).items():
        results[prov]["times"] = ts
    return case_rows(case, results, frozen_flops(case))


# ---- pytest (benchmarks/ harness) and command line ----------------------------------------------
LAYER_ROWS: list[dict] = []


def _cases_for_pytest() -> list[LayerCase]:
    grid = os.environ.get("BENCH_LAYER_GRID") or os.environ.get("BENCH_GRID")
    return make_cases(grid if grid in ("gpu", "cpu", "tiny") else None)


try:
    import pytest

    @pytest.mark.parametrize("case", _cases_for_pytest(), ids=lambda c: c.id)
    def test_layer_step(case):
        """Every provider of one case, checked, measured and recorded (schema rows go to the
        session CSV through benchmarks/conftest.py's ROWS when it has them)."""
        rows, layer_rows = measure_case(case)
        LAYER_ROWS.extend(layer_rows)
        with contextlib.suppress(ImportError, AttributeError):
            from benchmarks import conftest

            conftest.ROWS.extend(rows)
        failed = [r["note"] for r in layer_rows if r["note"].startswith("FAILED")]
        assert not failed, "\n".join(failed)
except ImportError:  # pragma: no cover  (pytest is only needed to run it as a test)
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--grid", choices=("gpu", "cpu", "tiny"), default=None)
    ap.add_argument("--spec", action="append", default=None,
                    help="mcore-local | mcore-te | te-standin | torch (repeatable)")
    ap.add_argument("--p", type=float, action="append", default=None, help="dropout(s) to run")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--csv", default=None, help="write the layer rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")) if not
                          torch.cuda.is_available() else torch.get_num_threads())
    t0 = time.monotonic()
    all_rows = []
    for case in make_cases(args.grid, args.spec):
        if args.p is not None and not any(math.isclose(case.p, p) for p in args.p):
            continue
        print(f"== {case.id}", flush=True)
        _, layer_rows = measure_case(case, rounds=args.rounds)
        all_rows += layer_rows
    if torch.distributed.is_initialized():  # the world-size-1 group megatron's layers needed
        torch.distributed.destroy_process_group()
    text = summary(all_rows) + f"\nwall time {time.monotonic() - t0:.0f} s"
    print(text)
    if args.csv:
        write_layer_csv(all_rows, args.csv)
        with open(os.path.splitext(args.csv)[0] + ".summary.txt", "w") as f:
            f.write(text + "\n")
    return 1 if any(r["note"].startswith("FAILED") for r in all_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
