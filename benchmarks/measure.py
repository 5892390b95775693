"""The measurement of one (case, provider, mode): correctness check first, then saved bytes,
peak memory and time, returned as one CSV row (see ``results.COLUMNS``).

A provider is checked against the fp64 reference (values and every gradient) once, before it is
timed; a provider that fails is never timed. At p = 0 the check runs at the timed shape. At p > 0
each provider draws its own mask, so the check runs on a small shape whose adapter is the identity
(r = K, A = I, B = [I; 0], W = 0): the output then *is* s * x~, which reveals the mask the provider
drew; the same seed, with random weights loaded, is compared with the reference under that mask.
"""

from __future__ import annotations

import datetime
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from bridge.kernels import lora_linear_ref, norm_lora_linear_ref
from bridge.kernels._timing import Budget, bench

from benchmarks import roofline
from benchmarks.cases import NORM, NORM_EPS, Case
from benchmarks.providers import Provider, Runner, Tensors, make_tensors, provider
from tests.numerics import dtype_tol, rel_err

SEED = 1234
CHECK_SHAPE = (67, 32, 80)  # M, K = r, N of the dropout check: M and K odd w.r.t. any block


class Skip(Exception):  # noqa: N818  (a control-flow signal, not an error)
    """This provider cannot run here; the message is the reason."""


def tolerance(dtype: torch.dtype, device: str) -> float:
    """Relative-error tolerance of a benchmark case against fp64 (tests/numerics.py's "bench"
    row; fp32 on a GPU allows TF32 GEMMs, Triton's fp32 tl.dot default)."""
    return dtype_tol(dtype, "bench", tf32=device != "cpu")


# ---- reference and check -----------------------------------------------------------------------
def reference(op: str, t: Tensors, p: float, mask: torch.Tensor | None, lora: bool) -> torch.Tensor:
    """The op's own reference (bridge.kernels); ``lora=False`` is the frozen base (B = 0)."""
    b = t.lora_b if lora else torch.zeros_like(t.lora_b)
    if op == "lora_linear":
        return lora_linear_ref(t.x, t.weight, t.bias, t.lora_a, b, scale=t.scale, dropout=p,
                               dropout_mask=mask)
    y, _ = norm_lora_linear_ref(t.x, t.norm_weight, None, t.weight, t.bias, t.lora_a, b,
                                normalization=NORM, eps=NORM_EPS, scale=t.scale, dropout=p,
                                dropout_mask=mask)
    return y


def _run_with_grads(runner: Runner, dy_seed: int = 7):
    torch.manual_seed(SEED)
    y = runner.forward()
    g = torch.Generator(device=y.device).manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=g, device=y.device).to(y.dtype)
    grads = torch.autograd.grad(y, runner.grad_inputs, dy)
    return y.detach(), dy, [gr.detach() for gr in grads]


def _compare(op: str, runner: Runner, t: Tensors, p: float, mask, tol: float) -> float:
    y, dy, grads = _run_with_grads(runner)
    t64 = t.to(torch.float64)
    leaves = [t64.x, t64.lora_a, t64.lora_b] if runner.lora else [t64.x]
    for leaf in leaves:
        leaf.requires_grad_(True)
    y_ref = reference(op, t64, p, None if mask is None else mask.to(t64.x.device), runner.lora)
    refs = torch.autograd.grad(y_ref, leaves, dy.double())
    errs = {"y": rel_err(y, y_ref)}
    for name, gr, ref in zip(("dx", "dA", "dB")[: len(grads)], grads, refs, strict=True):
        errs[name] = rel_err(gr, ref)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        listed = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
        raise AssertionError(f"does not match the reference (tolerance {tol:.1e}): {listed}")
    return max(errs.values())


def _identity_adapter(op: str, m: int, k: int, n: int, dtype, device) -> Tensors:
    """W = 0, b = 0, A = I_k, B = [I_k; 0], s = 1: y[:, :k] = x~ (or ln~), exposing the mask."""
    t = make_tensors(op, m, k, n, k, 1.0, dtype, device, seed=SEED + 1)
    t.weight.zero_()
    t.bias.zero_()
    t.lora_a.copy_(torch.eye(k))
    t.lora_b.zero_()
    t.lora_b[:k].copy_(torch.eye(k))
    return t


def check(case: Case, provider: Provider, runner: Runner, t: Tensors, *,
          small: bool = False) -> float:
    """Check ``runner`` (built for ``case``) against the reference; return the largest relative
    error over y and the gradients. Raise ``AssertionError`` when anything is off.

    ``small=True`` checks on the small shape even at p = 0 (the Triton interpreter: seconds per
    GEMM at the timed shape).
    """
    tol = tolerance(case.dtype, case.device)
    dropout = case.p > 0.0 and provider.lora
    if not dropout and not small:
        return _compare(case.op, runner, t, 0.0, None, tol)
    m, k, n = CHECK_SHAPE
    p = case.p if dropout else 0.0
    small_case = Case(case.op, m, k, n, k, p, case.dtype, case.device)
    t_small = make_tensors(case.op, m, k, n, k, 1.0, case.dtype, case.device, seed=SEED + 2)
    if not dropout:
        return _compare(case.op, provider.build(small_case, t_small), t_small, 0.0, None, tol)
    tiny = provider.build(small_case, _identity_adapter(case.op, m, k, n, case.dtype, case.device))
    torch.manual_seed(SEED)
    with torch.no_grad():
        mask = tiny.forward()[:, :k] != 0
    dropped = 1.0 - mask.float().mean().item()
    if abs(dropped - case.p) > 0.05:
        raise AssertionError(f"dropout drops {dropped:.3f} of x's elements, expected ~{case.p}")
    tiny.load(t_small)
    return _compare(case.op, tiny, t_small, case.p, mask, tol)


# ---- memory ------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor):
    """(identity of ``t``'s storage, its bytes): the StorageImpl's address, which also tells
    meta storages apart (their data pointers are all 0)."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None, 0
    return st._cdata, st.nbytes()


@dataclass
class SavedBytes:
    """Counts the bytes autograd keeps for backward (``saved_tensors_hooks``): each distinct
    storage once, whole storage (a saved view keeps all of it alive); weights counted apart."""

    params: list[torch.Tensor] = field(default_factory=list)
    seen: dict = field(default_factory=dict)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key is not None:
            self.seen.setdefault(key, nbytes)
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def with_params(self) -> int:
        return sum(self.seen.values())

    @property
    def without_params(self) -> int:
        weights = {_storage_key(p)[0] for p in self.params}
        return sum(n for k, n in self.seen.items() if k not in weights)


def count_saved_bytes(fn: Callable[[], object], params: list[torch.Tensor]):
    """Run ``fn`` (a forward) and count what it saves for backward; returns (counter, output).
    Works on every device, meta tensors included (shapes only: nothing is computed)."""
    counter = SavedBytes(params=list(params))
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        out = fn()
    return counter, out


def peak_bytes(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> int | None:
    """Peak GPU memory ``fn`` allocates above what was allocated when it started (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    args = setup() if setup else ()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*args)
    torch.cuda.synchronize()
    del out, args
    return torch.cuda.max_memory_allocated() - base


# ---- timing ------------------------------------------------------------------------------------
# One timer for the benchmarks and the GEMM-strategy chooser (kernels/_timing.py): CUDA events
# with the L2 flushed before every rep on a GPU, the host clock on a CPU; median, p20, p80.


def budget_for(device: str, grid: str = "") -> Budget:
    """How long each measurement runs: do_bench's 25 ms warm-up and 100 ms of reps on a GPU; on
    a CPU half a second of reps (each rep a loop of calls lasting >= 1 ms) on shared, noisy
    cores (the alternating-pairs ratio, ``paired_ratio``, is the robust CPU comparison). The
    ``tiny`` grid (harness tests, gpu_check.sh's dry run) proves the path, not a figure: 3 reps."""
    if grid == "tiny":
        return Budget(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3, flush=False)
    if device == "cpu":
        return Budget(warmup_ms=0.0, rep_ms=500.0, min_reps=5, max_reps=20, flush=False)
    return Budget(warmup_ms=25.0, rep_ms=100.0, min_reps=10, max_reps=200)


def step_callables(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], mode: str,
                   dy: torch.Tensor):
    """(target, setup) timing one ``mode`` of ``forward``: ``forward`` (a training forward),
    ``backward`` (autograd.grad of ``inputs``; the forward is the untimed setup of each rep) or
    ``fwd+bwd``. Every benchmark module times its modes through this."""
    if mode == "forward":
        return forward, None
    if mode == "fwd+bwd":
        return (lambda: torch.autograd.grad(forward(), inputs, dy)), None
    if mode == "backward":
        return (lambda y: torch.autograd.grad(y, inputs, dy)), (lambda: (forward(),))
    raise ValueError(f"unknown mode {mode!r}")


def mode_callables(runner: Runner, mode: str, dy: torch.Tensor):
    """(target, setup) for a mode of a dense-op provider (``step_callables``)."""
    return step_callables(runner.forward, runner.grad_inputs, mode, dy)


# ---- one measurement ---------------------------------------------------------------------------
@dataclass
class _State:
    """What one (case, provider) shares across its modes: built once, checked once."""

    runner: Runner | None = None
    error: BaseException | None = None
    check_err: float | None = None
    saved: SavedBytes | None = None
    dy: torch.Tensor | None = None


_STATE: dict[tuple[Case, str], _State] = {}


def _prepare(case: Case, prov: Provider, small_check: bool, count_saved: bool = True) -> _State:
    key = (case, prov.name)
    if key in _STATE:
        return _STATE[key]
    _STATE.clear()  # tests run case by case: keep one provider's tensors alive at a time
    st = _STATE[key] = _State()
    ok, reason = prov.probe(case)
    if not ok:
        st.error = Skip(reason)
        return st
    try:
        t = make_tensors(case.op, case.M, case.K, case.N, case.r, case.scale, case.dtype,
                         case.device, seed=SEED)
        runner = prov.build(case, t)
        st.check_err = check(case, prov, runner, t, small=small_check)
        if count_saved:
            torch.manual_seed(SEED)
            st.saved, y = count_saved_bytes(runner.forward, runner.params)
            st.dy = torch.randn_like(y)
            del y
        st.runner = runner
    except Exception as exc:  # noqa: BLE001  (kept: every mode of this provider reports it)
        st.error = exc
    return st


def environment() -> dict[str, str]:
    """device, torch and triton versions, date: the columns every row repeats."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.machine()} cpu, {torch.get_num_threads()} thread(s)"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
            device = f"{model} (cpu), {torch.get_num_threads()} thread(s)"
        except (OSError, StopIteration):
            pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def measure(case: Case, provider_name: str, mode: str, *, rates: roofline.Rates | None,
            timed: bool = True, gemm: str = "", budget: Budget | None = None,
            count_saved: bool = True) -> dict:
    """One CSV row. ``timed=False`` measures everything but time (the interpreter's rows);
    ``gemm``: the GEMM strategy of a fused provider; ``count_saved=False`` (untimed rows only)
    leaves out the forward at the case's shape that counts the saved bytes (the row is then the
    small-shape check alone).

    Raises ``Skip`` (cannot run here, with the reason) or the check's ``AssertionError``.
    """
    prov = provider(provider_name, gemm)
    st = _prepare(case, prov, small_check=not timed, count_saved=count_saved or timed)
    if st.error is not None:
        raise st.error
    runner = st.runner
    row = {
        "op": case.op, "provider": provider_name, "gemm": gemm or None, "mode": mode,
        "M": case.M, "K": case.K, "N": case.N, "r": case.r, "p": case.p,
        "dtype": case.dtype_name, "check_err": st.check_err, "note": "", **environment(),
    }
    if st.saved is not None:
        row.update(saved_bytes=st.saved.without_params,
                   saved_bytes_with_params=st.saved.with_params)
    if not timed:
        row["note"] = "interpreted: not timed" + ("" if st.saved is not None else (
            f"; checked at {'x'.join(map(str, CHECK_SHAPE))} only (saved bytes: see the other "
            "GEMM strategy's row, the same saves by construction)"))
        return row
    target, setup = mode_callables(runner, mode, st.dy)
    row["peak_mem_bytes"] = peak_bytes(target, setup)
    t = bench(target, case.device, setup=setup, budget=budget or budget_for(case.device))
    median = t.median_ms / 1e3
    row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, rounds=t.reps)
    norm = NORM if case.op == "norm_lora" else None
    w = roofline.work(case.op, mode, case.M, case.K, case.N, case.r, case.dtype.itemsize,
                      lora=prov.lora, norm=norm)
    row.update(tflops=w.flops / median / 1e12, gbps=w.bytes / median / 1e9)
    if rates is not None:
        floor = roofline.floor_seconds(w, rates)
        row.update(floor_ms=floor * 1e3, roofline_frac=floor / median)
    return row


def paired_ratio(case: Case, a: str, b: str, mode: str, rounds: int = 15) -> tuple[float, ...]:
    """time(a) / time(b) from ``rounds`` back-to-back pairs in alternating order: robust to the
    load drifting on shared cores, which shifts whole tests against each other. Both providers
    are checked first. Returns (median, p20, p80) of the per-pair ratios."""
    t = make_tensors(case.op, case.M, case.K, case.N, case.r, case.scale, case.dtype,
                     case.device, seed=SEED)
    calls = []
    for name in (a, b):
        prov = provider(name)
        ok, reason = prov.probe(case)
        if not ok:
            raise Skip(reason)
        runner = prov.build(case, t)
        check(case, prov, runner, t)
        y = runner.forward()
        target, setup = mode_callables(runner, mode, torch.randn_like(y))
        del y
        calls.append((target, setup))
    one = Budget(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1, flush=True)
    clock = lambda j: bench(calls[j][0], case.device, setup=calls[j][1], budget=one).median_ms
    ratios = []
    for i in range(rounds):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        times = {j: clock(j) for j in order}
        ratios.append(times[0] / times[1])
    arr = np.asarray(ratios)
    return float(np.median(arr)), float(np.percentile(arr, 20)), float(np.percentile(arr, 80))
