"""What gets measured: the benchmark cases (op, shape, dropout, dtype, device), the grids that fit
each machine, the providers per op and the order in which pytest runs them.

One ``Case`` is one problem; one test is (case, provider, gemm, mode), ``gemm`` being the GEMM
strategy of a fused provider (fused | cublas | auto; empty for the others). Tests are ordered case
by case (headline shape first) so that a time budget that cuts the run short leaves whole shape
groups.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import torch

OPS = ("lora_linear", "norm_lora")
MODES = ("forward", "backward", "fwd+bwd")
# Provider names, in display order. "frozen" is the base linear alone (the floor any LoRA layer
# pays); for the norm op it is the norm followed by the base linear ("norm+frozen").
PROVIDERS = {
    "lora_linear": ("frozen", "eager", "peft", "compile", "triton"),
    "norm_lora": ("frozen", "eager", "peft", "compile", "triton", "cuda"),
}
BASELINE = "frozen"
FUSED = ("triton", "cuda")
# GEMM strategies each fused provider runs with (kernels/gemm_strategy.py); "auto" is the product
AUTO = "auto"
GEMMS = ("fused", "cublas", AUTO)
ALPHA = 32.0  # LoRA alpha; scale = ALPHA / r (Megatron-Bridge's default alpha)
NORM = "RMSNorm"  # the norm in front of the norm-fused op (the grid's shapes are Llama's)
NORM_EPS = 1e-5

GRID_ENV = "BENCH_GRID"  # cpu | gpu | interp | tiny (tests, gpu_check.sh's dry run)
BUDGET_ENV = "BENCH_BUDGET_S"  # seconds per op module; later tests are skipped once it is spent
GRIDS = ("cpu", "gpu", "interp", "tiny")
_START: dict[str, float] = {}


def grid_name(name: str | None = None) -> str:
    """``name``, else ``$BENCH_GRID``, else ``gpu`` when CUDA is available and ``cpu`` otherwise:
    the grid every benchmark module (dense, grouped, multi-LoRA) builds its cases from."""
    name = name or os.environ.get(GRID_ENV) or ("gpu" if torch.cuda.is_available() else "cpu")
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; expected one of {', '.join(GRIDS)}")
    return name


def budget_spent(op: str) -> str:
    """'' while ``op``'s time budget lasts, else the skip reason. The budget
    (``$BENCH_BUDGET_S`` seconds, 0 or unset: none) runs from the first call for ``op``, so a
    run cut short keeps whole cases in priority order and says what it left out."""
    budget = float(os.environ.get(BUDGET_ENV, "0") or 0)
    start = _START.setdefault(op, time.monotonic())
    if budget and time.monotonic() - start > budget:
        return f"time budget of {budget:.0f} s for {op} spent"
    return ""


@dataclass(frozen=True)
class Case:
    """One benchmark problem: x [M, K] -> y [M, N] through a rank-r adapter with dropout p."""

    op: str
    M: int  # noqa: N815  (the usual GEMM letters)
    K: int  # noqa: N815
    N: int  # noqa: N815
    r: int
    p: float
    dtype: torch.dtype
    device: str

    @property
    def scale(self) -> float:
        return ALPHA / self.r

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def id(self) -> str:
        return f"{self.op}-M{self.M}-K{self.K}-N{self.N}-r{self.r}-p{self.p:g}-{self.dtype_name}"

    @property
    def shape_label(self) -> str:
        return f"{self.M}x{self.K}x{self.N} r{self.r} p{self.p:g}"


@dataclass(frozen=True)
class Grid:
    """A set of cases plus which providers/modes run, and whether anything is timed."""

    name: str
    cases: tuple[Case, ...]
    providers: dict[str, tuple[str, ...]]  # run order per op (display order: PROVIDERS)
    modes: tuple[str, ...] = MODES
    timed: bool = True  # False under the Triton interpreter: correctness and saved bytes only
    gemms: tuple[str, ...] = GEMMS  # strategies of the fused providers
    # untimed grids: the strategies whose saved bytes are counted at the case's shape (the others
    # are checked on the small shape only; both strategies save the same tensors)
    saved_gemms: tuple[str, ...] = GEMMS

    def compile_runs(self, case: Case) -> tuple[bool, str]:
        """torch.compile is slow to build; the grids include it at a few cases only."""
        if self.name == "cpu":
            return False, ("torch.compile on the CPU takes ~20-40 s per graph: measured on the GPU "
                           "grid only, to keep make bench within its few minutes")
        if self.name == "gpu" and (case.M, case.K, case.N, case.r) != HEADLINE:
            return False, "torch.compile measured at the headline shape only (compile time budget)"
        return True, ""


def _cases(op: str, shapes, ps, dtype: torch.dtype, device: str) -> list[Case]:
    return [Case(op, m, k, n, r, p, dtype, device)
            for (m, k, n, r), p in itertools.product(shapes, ps)]


# The GPU grid: M in {1024, 8192, 16384}, (K, N) from Llama-8B/70B projections, r in {16, 64}.
GPU_M = (1024, 8192, 16384)
GPU_KN = ((4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096), (8192, 8192))
GPU_R = (16, 64)
PS = (0.0, 0.1)
HEADLINE = (8192, 4096, 4096, 16)  # the shape the summary's targets are quoted at
CPU_SHAPE = (512, 1024, 1024, 16)


def gpu_shapes() -> list[tuple[int, int, int, int]]:
    shapes = [(m, k, n, r) for m in GPU_M for (k, n) in GPU_KN for r in GPU_R]
    shapes.sort(key=lambda s: (s != HEADLINE, s[0] != 8192, s[3], s[0], s[1], s[2]))
    return shapes


def make_grid(name: str | None = None) -> Grid:
    """The grid that fits this machine (``gpu`` when CUDA is available, else ``cpu``), or the one
    named by ``name`` / ``$BENCH_GRID``."""
    name = grid_name(name)
    if name == "gpu":
        cases = [c for op in OPS for c in _cases(op, gpu_shapes(), PS, torch.bfloat16, "cuda")]
        cases.sort(key=lambda c: (gpu_shapes().index((c.M, c.K, c.N, c.r)), c.p, c.op))
        # run order: the base, then the fused providers (the product), then the baselines, so a
        # stage cut short by its time limit still has frozen-vs-fused at the headline shape
        order = {op: tuple(sorted(provs, key=_GPU_RUN_ORDER.index))
                 for op, provs in PROVIDERS.items()}
        return Grid(name, tuple(cases), order)
    if name == "cpu":
        cases = [c for op in OPS for c in _cases(op, [CPU_SHAPE], PS, torch.float32, "cpu")]
        return Grid(name, tuple(cases), PROVIDERS)
    if name == "interp":
        # Triton kernels in the CPU interpreter: checked on a tiny shape against the reference and
        # their saved-for-backward bytes counted at the CPU grid's shape. Not timed.
        cases = [c for op in OPS for c in _cases(op, [CPU_SHAPE], PS, torch.float32, "cpu")]
        # auto is the rule there (fused): not a third strategy to check. The fused strategy's
        # GEMM at the grid shape takes about a minute in the interpreter; cublas's (torch's CPU
        # matmul) seconds, and both save the same tensors: bytes counted on cublas's forward.
        return Grid(name, tuple(cases), {"lora_linear": ("triton",), "norm_lora": FUSED},
                    modes=("forward",), timed=False, gemms=("fused", "cublas"),
                    saved_gemms=("cublas",))
    if name == "tiny":  # the harness's own tests: seconds, not minutes
        cases = [c for op in OPS for c in _cases(op, [(64, 96, 80, 8)], PS, torch.float32, "cpu")]
        return Grid(name, tuple(cases), {op: ("frozen", "eager", "peft") for op in OPS})
    raise ValueError(f"unknown grid {name!r}; expected cpu, gpu, interp or tiny")


_GPU_RUN_ORDER = ("frozen", "triton", "cuda", "eager", "peft", "compile")


def grid_params(grid: Grid, op: str) -> list[tuple[Case, str, str, str]]:
    """(case, provider, gemm, mode) of one op, in run order: case by case, then provider (each
    fused provider once per GEMM strategy of the grid; gemm "" for the others)."""
    return [(c, prov, gemm, mode) for c in grid.cases if c.op == op
            for prov in grid.providers[op]
            for gemm in (grid.gemms if prov in FUSED else ("",)) for mode in grid.modes]


def label(provider: str, gemm: str | None) -> str:
    """How tables name a provider: ``triton:auto`` for a fused one, the name for the others."""
    return f"{provider}:{gemm}" if gemm else provider


def param_id(param: tuple[Case, str, str, str]) -> str:
    case, prov, gemm, mode = param
    return f"{case.id.removeprefix(case.op + '-')}/{label(prov, gemm)}/{mode}"
