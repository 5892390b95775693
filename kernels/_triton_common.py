"""Shared Triton helpers: the optional import, the interpreter flag, fp32-upcasting loads, dot
operands, the rank bucket, launch constexprs and the autotuner (bucketed keys, several candidate
kernels per launch, results cached on disk across processes).

Triton is optional (it is a Linux-only dependency): without it, ``triton.jit`` is a no-op stub so
the kernel modules still import, and ``kernels/backend.py`` reports "triton is not importable".
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from bridge.kernels.backend import interpreter_enabled

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _TritonStub:
        """Just enough of ``triton`` for ``@triton.jit`` definitions to import."""

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _TritonStub()
    tl = None

logger = logging.getLogger("bridge.kernels")

# Largest rank tile. Every kernel tiles the rank by BLOCK_R (a grid dimension for S, dS and dA,
# extra K-steps of the GEMMs), so any rank runs with one of the padded buckets 16/32/64: rank is a
# runtime argument and never triggers a recompile beyond these three buckets. 64 keeps the
# [BLOCK_M, BLOCK_R] fp32 accumulators small enough not to spill with 128-row tiles.
MAX_BLOCK_R = 64
# Rank step of the fused GEMM (forward, dX), where the rank is just more reduction steps: with a
# mask the first step's operands ride through the main loop in registers beside the accumulator
# (kernels/_gemm.py), so the step stays at 32 (bf16 [128, 32] + [32, 128]: 16 a thread at 8 warps).
GEMM_RANK_STEP = 32
# Autotune key bucket of M: the next power of two, capped (past 8192 rows every config has
# filled the GPU for several waves, so the ranking no longer moves).
M_BUCKET_CAP = 8192


def rank_block(rank: int) -> int:
    """Padded rank tile: the next power of two >= rank, at least 16 (tl.dot) and at most 64."""
    return min(MAX_BLOCK_R, max(16, triton_next_pow2(rank)))


def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def current_arch(device: torch.device) -> str:
    """``interpret`` under TRITON_INTERPRET=1, else ``sm90`` on Hopper-and-newer, ``sm80`` below."""
    if interpreter_enabled() or device.type != "cuda":
        return "interpret"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot for fp32 operands: TF32 only when torch allows it for
    matmuls (it does not by default), so the fused path matches torch's fp32 GEMM numerics.
    Ignored by tl.dot for bf16/fp16 operands."""
    tf32 = torch.backends.cuda.matmul.allow_tf32 and not interpreter_enabled()
    if dtype == torch.float32 and tf32:
        return "tf32"
    return "ieee"


def cfg(num_warps: int, num_stages: int, **meta: int):
    """A ``triton.Config`` of the block sizes ``meta``."""
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def launch_common(device: torch.device, dtype: torch.dtype) -> dict:
    """Constexprs every kernel takes: interpreter flag and fp32 dot precision."""
    return {"INTERPRET": current_arch(device) == "interpret", "PRECISION": dot_precision(dtype)}


def dropout_args(seed: torch.Tensor | None, p: float, like: torch.Tensor):
    """(mask on?, seed pointer (a dummy tensor when off), fp32 p, fp32 1/(1-p))."""
    on = seed is not None and p > 0.0
    if not on:
        return False, like, 0.0, 1.0
    return True, seed, float(p), float(1.0 / (1.0 - p))


# ---------------------------------------------------------------------------------------------
# Autotuning. Key: the launcher's key arguments with M bucketed to the next power of two (capped
# at M_BUCKET_CAP) and R to its rank bucket, the M bucket added whenever the kernel has an M
# argument (a tile chosen at M=8192 must not be reused at M=256), plus what makes Triton compile
# a different kernel (tensor dtypes, constexpr flags, unit/16-divisible integers) and the set of
# candidates eligible for this call. Winners persist in one JSON file per (GPU, versions) under
# kernel_cache_dir(), so a restarted job or another rank does not re-benchmark.
# ---------------------------------------------------------------------------------------------


def kernel_cache_dir() -> Path:
    """Folder of the on-disk kernel choices: ``$BRIDGE_KERNEL_CACHE`` or
    ``~/.cache/bridge-peft-kernels``."""
    return Path(os.environ.get("BRIDGE_KERNEL_CACHE") or
                Path.home() / ".cache" / "bridge-peft-kernels")


def _bucket(name: str, value):
    if name == "M":
        return min(triton_next_pow2(value), M_BUCKET_CAP)
    if name == "R":
        return max(16, triton_next_pow2(value))
    return value


def _package_version() -> str:
    try:
        from bridge._version import __version__
    except ImportError:  # pragma: no cover
        return "unknown"
    return __version__


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@functools.cache
def _cache_file(device_name: str) -> Path:
    """The JSON file holding this GPU's and these versions' autotune winners."""
    versions = (f"triton {getattr(triton, '__version__', '?')}, torch {torch.__version__}, "
                f"cuda {torch.version.cuda}, bridge {_package_version()}")
    digest = hashlib.sha1(f"{device_name}|{versions}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    return kernel_cache_dir() / f"autotune-{slug}-{digest}.json"


class _DiskCache:
    """Autotune winners by key string, one JSON file per (GPU, versions). A key missing here is
    looked up again in the file when another process has rewritten it since (a rank that
    finished tuning first), and entries are written atomically, merged with what another
    process wrote meanwhile (a lost race costs one re-benchmark, never a torn file)."""

    def __init__(self):
        self._files: dict[Path, tuple[float, dict]] = {}  # path -> (mtime read, entries)
        self._warned = False

    @staticmethod
    def _read(path: Path) -> tuple[float, dict]:
        try:
            mtime = path.stat().st_mtime
            with open(path) as f:
                data = json.load(f)
            return mtime, data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return 0.0, {}

    def get(self, path: Path, key: str) -> str | None:
        mtime, entries = self._files.get(path, (None, {}))
        if key not in entries:
            try:
                changed = mtime is None or path.stat().st_mtime != mtime
            except OSError:
                changed = False
            if changed:
                mtime, disk = self._read(path)
                entries = {**disk, **entries}
                self._files[path] = (mtime, entries)
        return entries.get(key)

    def put(self, path: Path, key: str, label: str) -> None:
        mtime, entries = self._files.get(path, (0.0, {}))
        entries[key] = label
        self._files[path] = (mtime, entries)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(path)[1], **entries}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
            self._files[path] = (path.stat().st_mtime, merged)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("bridge.kernels: cannot write the autotune cache %s (%s); "
                               "set BRIDGE_KERNEL_CACHE to a writable folder", path, exc)


DISK_CACHE = _DiskCache()


class Choice:
    """One autotune candidate: ``kernel`` launched with ``config``, as is or through ``launch``
    (which may rewrite the arguments, e.g. into TMA descriptors, and pick its own grid).
    ``eligible(args)`` says whether it can run this call (alignment, strides); candidates that
    share one rule share the function, which the tuner then evaluates once per call."""

    def __init__(self, kernel, config, family: str = "ptr",
                 launch: Callable | None = None, eligible: Callable | None = None):
        self.kernel, self.config, self.family = kernel, config, family
        self._launch, self.rule = launch, eligible
        self.meta = config.all_kwargs()
        self.label = f"{family}:{kernel.__name__}:" + ",".join(
            f"{k}={v}" for k, v in sorted(self.meta.items()))

    def eligible(self, args: dict) -> bool:
        return self.rule is None or self.rule(args)

    def run(self, grid, args: dict) -> None:
        if self._launch is not None:
            self._launch(self, grid, args)
        else:
            self.kernel[grid](**args, **self.meta)


def _bench(choice: Choice, grid, args: dict) -> float:
    """Median milliseconds of one launch of ``choice`` (CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    return do_bench(lambda: choice.run(grid, args), return_mode="median")


def _int_class(value: int) -> int:
    """How Triton specialises an integer argument: 1 (a constexpr), 16 (divisible), 0."""
    return 1 if value == 1 else 16 if value % 16 == 0 else 0


class Tuner:
    """Launches the fastest eligible ``Choice`` for each bucketed key: ``tuner[grid](*args,
    **kwargs)`` with the arguments of ``kernel`` (the first choice's kernel).

    One eligible choice (the interpreter's lists): launched, nothing benchmarked. Under CUDA
    graph capture nothing is benchmarked either (the cached winner, else the first choice).
    A call costs one tuple key and a dict lookup once its key has been tuned.
    """

    def __init__(self, name: str, kernel, choices: list[Choice], key: tuple[str, ...]):
        if not choices:
            raise ValueError(f"autotune list {name!r} is empty")
        self.name, self.choices = name, choices
        self.arg_names = list(kernel.arg_names)
        names = list(key)
        if "M" in self.arg_names and "M" not in names:
            names.insert(0, "M")
        self.key_names = tuple(names)
        self._keyed = frozenset(names)
        fn = getattr(kernel, "fn", kernel)
        self.constexprs = frozenset(n for n, prm in inspect.signature(fn).parameters.items()
                                    if "constexpr" in str(prm.annotation))
        self._rules = list(dict.fromkeys(c.rule for c in choices if c.rule is not None))
        self._best: dict[tuple, Choice] = {}
        self._labels = hashlib.sha1("|".join(c.label for c in choices).encode()).hexdigest()[:8]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, *args, **kwargs)

    def _fast_key(self, args: dict, family: str | None, passed: tuple) -> tuple:
        """The in-memory key of one call: what ``key`` spells out, as a cheap tuple."""
        key = [family, passed]
        keyed, constexprs = self._keyed, self.constexprs
        for name, value in args.items():
            if name in keyed:
                key.append(_bucket(name, value))
            elif name in constexprs:
                key.append(value)
            elif type(value) is int:
                key.append(_int_class(value))
            elif type(value) is not float:  # a tensor: its dtype (isinstance costs more)
                key.append(getattr(value, "dtype", None))
        return tuple(key)

    def key(self, args: dict, eligible: list[Choice]) -> str:
        """The cache key of one call (see the section comment), as stored on disk."""
        parts = [self.name, self._labels]
        parts += [f"{n}={_bucket(n, args[n])}" for n in self.key_names]
        for name, value in args.items():
            if name in self.key_names:
                continue
            if isinstance(value, torch.Tensor):
                parts.append(f"{name}:{str(value.dtype).removeprefix('torch.')}")
            elif name in self.constexprs:
                parts.append(f"{name}={value}")
            elif type(value) is int:  # Triton specialises it
                parts.append(f"{name}:{'1' if value == 1 else 'd16' if value % 16 == 0 else 'n'}")
        if len(eligible) != len(self.choices):
            parts.append("only=" + ",".join(str(self.choices.index(c)) for c in eligible))
        return ";".join(parts)

    def run(self, grid, *args, family: str | None = None, **kwargs) -> None:
        bound = dict(zip(self.arg_names[:len(args)], args, strict=True))
        bound.update(kwargs)
        passed = tuple(rule(bound) for rule in self._rules)
        fast = self._fast_key(bound, family, passed)
        choice = self._best.get(fast)
        if choice is None:
            ok = dict(zip(self._rules, passed, strict=True))
            eligible = [c for c in self.choices if (family is None or c.family == family)
                        and (c.rule is None or ok[c.rule])]
            if not eligible:
                raise RuntimeError(f"{self.name}: no eligible kernel"
                                   + (f" of family {family!r}" if family else "")
                                   + " for this call")
            choice = self.pick(grid, bound, eligible)
            if choice is not None:
                self._best[fast] = choice
            else:  # under graph capture: the first eligible, not remembered
                choice = eligible[0]
        choice.run(grid, bound)

    def pick(self, grid, bound: dict, eligible: list[Choice]) -> Choice | None:
        """The winner for this call's key: the only candidate, the disk cache's, or measured
        (None under CUDA graph capture, where nothing may be timed)."""
        if len(eligible) == 1:
            return eligible[0]
        key = self.key(bound, eligible)
        device = next(v.device for v in bound.values() if isinstance(v, torch.Tensor))
        path = _cache_file(_device_name(device))
        by_label = {c.label: c for c in eligible}
        label = DISK_CACHE.get(path, key)
        if label in by_label:
            return by_label[label]
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        timings = {}
        for c in eligible:
            try:
                timings[c.label] = _bench(c, grid, bound)
            except Exception as exc:  # a config that does not fit (shared memory, registers)
                logger.debug("bridge.kernels: %s: %s failed: %s", self.name, c.label, exc)
                timings[c.label] = math.inf
        best = min(eligible, key=lambda c: timings[c.label])
        if math.isinf(timings[best.label]):
            raise RuntimeError(f"{self.name}: every candidate failed to launch: {timings}")
        logger.info("bridge.kernels: autotuned %s -> %s (%.4f ms)", key, best.label,
                    timings[best.label])
        DISK_CACHE.put(path, key, best.label)
        return best


@functools.cache
def autotuned(kernel, arch: str, name: str, configs_fn: Callable[[str, str], list],
              key: tuple[str, ...]) -> Tuner:
    """The autotuned launcher of ``kernel`` over the config list ``configs_fn(arch, name)``,
    built once per (kernel, arch, name): ``autotuned(...)[grid](*args, **kwargs)``.

    Built lazily (not at import) so the config list follows the GPU the call runs on. Under the
    interpreter ``configs_fn`` returns one big-block config and nothing is benchmarked. The
    kernels write every output element (no atomics), so benchmarking reruns are harmless.
    """
    choices = [Choice(kernel, c) for c in configs_fn(arch, name)]
    return Tuner(f"{kernel.__name__}/{arch}/{name}", kernel, choices, key)


if HAS_TRITON:

    @triton.jit
    def load_f32(ptrs, mask, INTERPRET: tl.constexpr):
        """Masked load (0 outside); upcast to fp32 right away under the interpreter, whose bf16
        arithmetic works on raw bits. On a GPU the tile keeps its storage dtype for tl.dot."""
        t = tl.load(ptrs, mask=mask, other=0.0)
        if INTERPRET:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def dot_operand(t, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        """An fp32 tile as a tensor-core operand of ``dtype`` (kept fp32 under the interpreter)."""
        if INTERPRET:
            return t
        else:
            return t.to(dtype)
else:  # pragma: no cover
    load_f32 = dot_operand = None
