"""The one place the GEMM strategy of the LoRA linear is chosen, and the two strategies' GEMM steps.

The big GEMMs (x W^T forward, dY W backward) run one of two ways, behind the same ops, with the
same saved tensors and the same dropout stream; only the GEMM step differs:

- ``fused``: one Triton kernel with the low-rank term in the GEMM's accumulator (kernels/_gemm.py).
- ``cublas``: a small Triton kernel writes the addend (P = s S B^T (+ b), masked for 'post';
  Q = (dS A) * m / (1 - p) for 'pre'; kernels/_lowrank.py ``launch_expand``) and cuBLAS reads it
  in its epilogue: ``P.addmm_(x, W^T)`` (beta = 1), ``Q.addmm_(dY, W)``. y is written once by
  cuBLAS, P once by our kernel.

Precedence: the ``gemm`` argument > ``BRIDGE_LORA_GEMM`` > ``auto``. ``auto`` on a CUDA GPU times
both GEMM steps (kernels/_timing.py: CUDA events, L2 flushed) on the first call of a key (GPU,
dtype, M power-of-two bucket, N, K, rank bucket, dropout variant, bias, fwd/bwd, op), keeps the
faster, logs both times once at INFO, and remembers the choice in memory and in
``$BRIDGE_KERNEL_CACHE/gemm_strategy.json`` (default ``~/.cache/bridge-peft-kernels/``), keyed
also by the torch, triton and package versions. It never times under torch.compile tracing or
CUDA-graph capture (the cached choice, else the heuristic), nor with ``BRIDGE_LORA_GEMM_TUNE=0``,
nor without CUDA (the CPU and the interpreter use the heuristic, which picks ``fused`` there).

Heuristic: ``cublas`` when N >= 3072 and K >= 3072 on sm_90 and newer, else ``fused``.

Tensor parallelism: the ranks of one group must run the same strategy (their numerics must not
differ). With a ``group`` of size > 1, group rank 0 decides (its cache file or its timing) and
broadcasts the choice once per key; the ranks of a group run the same layers in the same order,
so they reach each key's first call together. Where no collective may run (compile tracing,
graph capture) a grouped call takes the group's earlier decision or the heuristic, which is a
function of (GPU, N, K) only: never a rank's own cache file or timing.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from bridge.kernels._gemm import launch_dx, launch_fused_gemm
from bridge.kernels._lowrank import launch_expand
from bridge.kernels._timing import CHOOSER_BUDGET, bench, release_flush_buffers
from bridge.kernels._triton_common import current_arch, triton_next_pow2
from bridge.kernels.backend import interpreter_enabled

logger = logging.getLogger("bridge.kernels")

GEMMS = ("auto", "fused", "cublas")
STRATEGIES = ("fused", "cublas")
ENV_GEMM = "BRIDGE_LORA_GEMM"
ENV_TUNE = "BRIDGE_LORA_GEMM_TUNE"
ENV_CACHE = "BRIDGE_KERNEL_CACHE"
CACHE_FILE = "gemm_strategy.json"
CACHE_FORMAT = 1
HEURISTIC_MIN_NK = 3072  # on sm_90, from the compiled fused GEMMs' modelled 75-88% of cuBLAS

# A timer runs one strategy's GEMM step and returns milliseconds: timer(name, fn, device).
Timer = Callable[[str, Callable[[], object], torch.device], float]


def validate_gemm_name(name: str | None, *, what: str = "gemm") -> str:
    """Normalise a GEMM strategy name; ``ValueError`` naming the allowed values otherwise."""
    if name is None:
        return "auto"
    if not isinstance(name, str) or name.lower() not in GEMMS:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(GEMMS)}")
    return name.lower()


def requested_gemm(name: str | None) -> str:
    """The requested strategy: the argument, else ``$BRIDGE_LORA_GEMM``, else ``auto``."""
    name = validate_gemm_name(name)
    if name == "auto":
        env = os.environ.get(ENV_GEMM)
        if env:
            return validate_gemm_name(env, what=f"{ENV_GEMM} value")
    return name


def heuristic(arch: str, n: int, k: int) -> str:
    """The untimed choice: cuBLAS for large N and K on sm_90+, the fused kernel elsewhere."""
    big = n >= HEURISTIC_MIN_NK and k >= HEURISTIC_MIN_NK
    return "cublas" if arch == "sm90" and big else "fused"


def tuning_enabled() -> bool:
    return os.environ.get(ENV_TUNE, "1") not in ("0", "")


class GemmKey(NamedTuple):
    """What the choice depends on (a tuple: built on every call, so it must be cheap)."""

    op: str  # lora_linear | norm_lora
    direction: str  # fwd | bwd
    device: str  # GPU name, or "cpu"
    dtype: str
    m_bucket: int  # next power of two of M
    n: int
    k: int
    r_bucket: int  # next power of two of the rank, >= 16
    dropout: str  # none | pre | post
    bias: bool

    def describe(self) -> str:
        return (f"{self.op} {self.direction} M<={self.m_bucket} N={self.n} K={self.k} "
                f"r<={self.r_bucket} {self.dtype} dropout={self.dropout} "
                f"{'bias' if self.bias else 'no bias'} on {self.device}")


@functools.lru_cache(maxsize=64)
def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def make_key(op: str, direction: str, device: torch.device, dtype: torch.dtype, m: int, n: int,
             k: int, r: int, dropout: str, bias: bool) -> GemmKey:
    return GemmKey(op, direction, _device_name(device), _dtype_name(dtype),
                   triton_next_pow2(max(m, 1)), n, k, max(16, triton_next_pow2(r)), dropout,
                   bias)


@functools.lru_cache(maxsize=16)
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    from bridge._version import __version__

    return f"torch={torch.__version__};triton={tv};bridge={__version__}"


class Decision(NamedTuple):
    choice: str
    ms: dict | None  # {strategy: median ms} when timed (here or by the process that cached it)
    source: str  # timed | cache file | heuristic (<why>) | group rank 0


def _fastest(ms: dict[str, float]) -> str:
    return min(STRATEGIES, key=lambda s: (ms[s], STRATEGIES.index(s)))


class GemmChooser:
    """Chooses and remembers the strategy per key.

    Args:
        timer: ``timer(name, fn, device) -> ms``; None times CUDA calls with CUDA events and
            never times elsewhere. An injected timer times on any device (tests).
        cache_dir: folder of the JSON cache; None reads ``$BRIDGE_KERNEL_CACHE`` when needed.
    """

    def __init__(self, timer: Timer | None = None, cache_dir: str | os.PathLike | None = None):
        self._timer = timer
        self._cache_dir = cache_dir
        self._memory: dict[tuple, Decision] = {}
        # select()'s per-call memo of settled (fwd, bwd) pairs by raw call shape: skips building
        # two GemmKeys per call (about 10 us of host time on the CPU); cleared with _memory
        self._hot: dict[tuple, tuple[str, str]] = {}
        self._provisional: dict[tuple, str] = {}  # untimed fallbacks (tracing, capture)
        self._lock = threading.Lock()
        self._disk_warned = False

    # ---- the decision ----------------------------------------------------------------------
    def choose(self, key: GemmKey, candidates: Callable[[], dict] | None, *,
               device: torch.device, group=None, may_time: bool = True) -> str:
        """The strategy for ``key``. ``candidates()`` builds {strategy: thunk} of the GEMM step,
        called only to time. ``may_time=False`` (tracing, capture): no timing, no collective;
        the cache file (not for a group) or the heuristic, the latter kept apart as provisional
        so that a later call that may time still measures."""
        mkey = (key, group)
        hit = self._memory.get(mkey)
        if hit is not None:
            return hit.choice
        grouped = group is not None and torch.distributed.get_world_size(group) > 1
        arch = current_arch(device)
        if not may_time:
            provisional = self._provisional.get(mkey)
            if provisional is not None:
                return provisional
            cached = None if grouped else self._disk_get(key)
            if cached is None:  # remembered apart: a later call that may time still measures
                choice = self._provisional[mkey] = heuristic(arch, key.n, key.k)
                return choice
            decision = cached
        elif grouped:
            decision = self._group_decision(key, candidates, device, group, arch)
        else:
            decision = self._local_decision(key, candidates, device, arch)
        with self._lock:
            self._memory.setdefault(mkey, decision)
        self._log(key, decision)
        return decision.choice

    def _can_time(self, device: torch.device) -> tuple[bool, str]:
        if not tuning_enabled():
            return False, f"{ENV_TUNE}=0"
        if self._timer is not None:
            return True, ""
        if device.type != "cuda" or interpreter_enabled():
            return False, "no CUDA GPU to time on"
        return True, ""

    def _local_decision(self, key, candidates, device, arch) -> Decision:
        ok, why = self._can_time(device)
        if not ok:
            return Decision(heuristic(arch, key.n, key.k), None, f"heuristic ({why})")
        cached = self._disk_get(key)
        if cached is not None:
            return cached
        if candidates is None:
            return Decision(heuristic(arch, key.n, key.k), None, "heuristic (nothing to time)")
        ms = self._time(key, candidates, device)
        decision = Decision(_fastest(ms), ms, "timed")
        self._disk_put(key, decision)
        return decision

    def _group_decision(self, key, candidates, device, group, arch) -> Decision:
        dist = torch.distributed
        mine, error = None, None
        if dist.get_rank(group) == 0:
            try:
                mine = self._local_decision(key, candidates, device, arch)
            except Exception as exc:  # noqa: BLE001  (re-raised after telling the group)
                error = exc
            code = -1 if error is not None else STRATEGIES.index(mine.choice)
            choice = torch.tensor([code], dtype=torch.int64)
        else:
            choice = torch.zeros(1, dtype=torch.int64)
        on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        choice = choice.to(on)
        dist.broadcast(choice, src=dist.get_global_rank(group, 0), group=group)
        code = int(choice.item())
        if error is not None:
            raise error
        if code < 0:  # never wait in a collective rank 0 has left
            raise RuntimeError(f"{key.describe()}: tensor-parallel rank 0 could not time either "
                               "GEMM strategy (see its log); set BRIDGE_LORA_GEMM to choose one")
        return mine if mine is not None else Decision(STRATEGIES[code], None, "group rank 0")

    def _time(self, key: GemmKey, candidates: Callable[[], dict],
              device: torch.device) -> dict[str, float]:
        """Median ms per strategy. A strategy that raises (a Triton config that does not fit
        this GPU, say) is out of the race, with a warning; if both raise, the first error
        propagates."""
        thunks = candidates()
        timer = self._timer or (lambda name, fn, dev: bench(fn, dev, budget=CHOOSER_BUDGET)
                                .median_ms)
        ms, errors = {}, []
        try:
            with torch.no_grad():
                for name in STRATEGIES:
                    try:
                        ms[name] = float(timer(name, thunks[name], device))
                    except Exception as exc:  # noqa: BLE001  (the other strategy still runs)
                        errors.append(exc)
                        ms[name] = math.inf
                        logger.warning("bridge.kernels: %s: the %s GEMM step failed while "
                                       "timed (%s: %s); auto leaves it out", key.describe(),
                                       name, type(exc).__name__, exc)
        finally:
            release_flush_buffers()
        if len(errors) == len(STRATEGIES):
            raise errors[0]
        return ms

    def _log(self, key: GemmKey, d: Decision) -> None:
        if d.ms:
            times = ", ".join(f"{s} {d.ms[s]:.4f} ms" for s in STRATEGIES)
            logger.info("bridge.kernels: %s: GEMM strategy %s (%s; %s)", key.describe(),
                        d.choice, d.source, times)
        else:
            logger.info("bridge.kernels: %s: GEMM strategy %s (%s)", key.describe(), d.choice,
                        d.source)

    def remembered(self, key: GemmKey, group=None) -> str | None:
        """The choice made for ``key`` (and group) in this process, or None: no timing, no
        file, no collective (the per-call fast path)."""
        hit = self._memory.get((key, group))
        return None if hit is None else hit.choice

    # ---- what was decided (kernel reports, tests) ------------------------------------------
    def decisions(self) -> dict[GemmKey, Decision]:
        """The decisions this process remembers (grouped ones under their key too)."""
        return {k: d for (k, _g), d in list(self._memory.items())}

    def forget(self) -> None:
        """Drop the in-memory decisions (the cache file stays)."""
        with self._lock:
            self._memory.clear()
            self._hot.clear()
            self._provisional.clear()

    # ---- the cache file --------------------------------------------------------------------
    def cache_path(self) -> Path:
        folder = self._cache_dir or os.environ.get(ENV_CACHE) or \
            Path.home() / ".cache" / "bridge-peft-kernels"
        return Path(folder) / CACHE_FILE

    @staticmethod
    def file_key(key: GemmKey) -> str:
        return "|".join([_versions(), *map(str, key)])

    def _read(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self._warn_disk(f"cannot read {path} ({type(exc).__name__}: {exc}); ignoring it")
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def _disk_get(self, key: GemmKey) -> Decision | None:
        entry = self._read(self.cache_path()).get(self.file_key(key))
        if not isinstance(entry, dict) or entry.get("choice") not in STRATEGIES:
            return None
        ms = entry.get("ms")
        if isinstance(ms, dict):  # a strategy that failed when timed was written as null
            ms = {k: math.inf if v is None else v for k, v in ms.items()}
        return Decision(entry["choice"], ms if isinstance(ms, dict) else None, "cache file")

    def _disk_put(self, key: GemmKey, d: Decision) -> None:
        """Merge one entry into the file; written to a temporary file and renamed, so readers
        never see half a file (two writers at once may drop each other's new entry: it is
        timed again later, never wrong)."""
        path = self.cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            entries = self._read(path)
            entries[self.file_key(key)] = {
                "choice": d.choice,
                "ms": {k: (v if math.isfinite(v) else None) for k, v in d.ms.items()},
                "date": datetime.datetime.now().isoformat(timespec="seconds")}
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1,
                                      sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:
            self._warn_disk(f"cannot write {path} ({exc}); choices stay in memory")

    def _warn_disk(self, msg: str) -> None:
        if not self._disk_warned:
            self._disk_warned = True
            logger.warning("bridge.kernels: GEMM strategy cache: %s", msg)


_CHOOSER = [GemmChooser()]  # a list, not a rebindable global: use_chooser swaps its item


def chooser() -> GemmChooser:
    """The process's chooser."""
    return _CHOOSER[0]


@contextlib.contextmanager
def use_chooser(c: GemmChooser) -> Iterator[GemmChooser]:
    """Run the ops with chooser ``c`` (tests inject a timer and a cache folder this way)."""
    old = _CHOOSER[0]
    _CHOOSER[0] = c
    try:
        yield c
    finally:
        _CHOOSER[0] = old


# ---- the GEMM steps of both strategies (everything else is shared) ------------------------------
def gemm_forward(strategy: str, x2d: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, s_mat: torch.Tensor, lora_b: torch.Tensor,
                 scale: float, *, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    """y2d [M, N] = x W^T + s S B^T (+ b); 'post' ``seed``: the low-rank term masked."""
    if strategy == "fused":
        return launch_fused_gemm(x2d, weight, bias, s_mat, lora_b, scale, seed=seed, p=p)
    y = launch_expand(s_mat, lora_b, scale, bias=bias, seed=seed, p=p, out_dtype=x2d.dtype)
    return y.addmm_(x2d, weight.t())


def gemm_dx(strategy: str, dy2d: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor,
            lora_a: torch.Tensor, *, seed: torch.Tensor | None, p: float,
            out_dtype: torch.dtype) -> torch.Tensor:
    """dX [M, K] = dY W + (dS A) (* m / (1 - p), 'pre' ``seed``) in ``out_dtype`` (``cublas``:
    dY's dtype only, cuBLAS adds in the output's dtype)."""
    if strategy == "fused":
        return launch_dx(dy2d, weight, ds, lora_a, seed=seed, p=p, out_dtype=out_dtype)
    if out_dtype != dy2d.dtype:
        raise ValueError(f"the cublas dX step writes dY's dtype ({dy2d.dtype}), not {out_dtype}")
    q = launch_expand(ds, lora_a, 1.0, seed=seed, p=p, out_dtype=out_dtype, transpose=True)
    return q.addmm_(dy2d, weight)


# ---- what the ops call ------------------------------------------------------------------------
def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo at import time
    (about 1.6 s of ``import bridge.kernels``): the decorator only marks the function with the
    attribute dynamo reads when it traces. Once dynamo is imported, its own decorator runs.
    tests/test_gemm_strategy.py checks the marking equals torch's."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def _variant(seed: torch.Tensor | None, p: float, post: bool) -> str:
    if seed is None or p <= 0.0:
        return "none"
    return "post" if post else "pre"


@assume_constant_result
def _traced_heuristic(device: str, n: int, k: int) -> str:
    """The heuristic at trace time (a constant of the graph; GPU queries stay out of it)."""
    return heuristic(current_arch(torch.device(device)), n, k)


_HOT_MAX = 4096  # entries of GemmChooser._hot


def _tracing(t: torch.Tensor) -> bool:
    """torch.compile / export tracing: dynamo, or fake/functional tensors (make_fx)."""
    return torch.compiler.is_compiling() or type(t) not in (torch.Tensor, torch.nn.Parameter)


def select(op: str, requested: str, *, x2d: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
           seed: torch.Tensor | None, p: float, post: bool, need_bwd: bool,
           dx_dtype: dict[str, torch.dtype], group=None) -> tuple[str, str]:
    """(forward strategy, backward strategy) for one call of a fused op. While tracing this
    returns 'auto' (resolved by the op when it runs, by :func:`resolve`, never timed) or, for a
    tensor-parallel group, the heuristic (deterministic on every rank)."""
    if requested != "auto":
        return requested, requested
    n, k = weight.shape
    if _tracing(x2d):
        if group is not None:
            h = _traced_heuristic(str(x2d.device), n, k)
            return h, h
        return "auto", "auto"
    m, r, device = x2d.shape[0], lora_a.shape[0], x2d.device
    if m == 0:
        return "fused", "fused"
    variant, c = _variant(seed, p, post), chooser()
    hot_key = (op, device, x2d.dtype, m, n, k, r, variant, bias is not None, need_bwd, group)
    hot = c._hot.get(hot_key)
    if hot is not None:  # the hot path: one dict lookup
        return hot
    # the bias never enters dX: one backward key for biased and unbiased layers
    key_f = make_key(op, "fwd", device, x2d.dtype, m, n, k, r, variant, bias is not None)
    key_b = make_key(op, "bwd", device, x2d.dtype, m, n, k, r, variant, False)
    fwd, bwd = c.remembered(key_f, group), c.remembered(key_b, group) if need_bwd else "auto"
    if fwd is not None and bwd is not None:  # settled: remember the pair for this call shape
        if len(c._hot) >= _HOT_MAX:  # many distinct M (variable sequence lengths): start over
            c._hot.clear()
        c._hot[hot_key] = (fwd, bwd)
        return fwd, bwd
    may_time = not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    gen = lambda: torch.Generator(device=device).manual_seed(0)  # never the global RNG

    def fwd_candidates():  # synthetic S (the values do not matter, only the GEMM step's time)
        s = torch.randn((m, r), generator=gen(), device=device)
        pseed = seed if variant == "post" else None
        return {g: functools.partial(gemm_forward, g, x2d, weight, bias, s, lora_b, scale,
                                     seed=pseed, p=p) for g in STRATEGIES}

    def bwd_candidates():  # a synthetic dY [M, N] and dS: transient memory, once per key
        dy = torch.randn((m, n), generator=gen(), device=device).to(x2d.dtype)
        ds = torch.randn((m, r), generator=gen(), device=device)
        pseed = seed if variant == "pre" else None
        return {g: functools.partial(gemm_dx, g, dy, weight, ds, lora_a, seed=pseed, p=p,
                                     out_dtype=dx_dtype[g]) for g in STRATEGIES}

    if fwd is None:
        fwd = c.choose(key_f, fwd_candidates, device=device, group=group, may_time=may_time)
    if bwd is None:
        bwd = c.choose(key_b, bwd_candidates, device=device, group=group, may_time=may_time)
    return fwd, bwd


def resolve(strategy: str, op: str, direction: str, *, device: torch.device, dtype: torch.dtype,
            m: int, n: int, k: int, r: int, seed: torch.Tensor | None, p: float, post: bool,
            bias: bool) -> str:
    """Inside an op: a concrete strategy as is; 'auto' (the op was traced) -> the remembered or
    cached choice, else the heuristic; never timed."""
    if strategy != "auto":
        return strategy
    if m == 0:
        return "fused"
    key = make_key(op, direction, device, dtype, m, n, k, r, _variant(seed, p, post), bias)
    return chooser().choose(key, None, device=device, may_time=False)
