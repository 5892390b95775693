"""Shared Triton helpers: the optional import, the interpreter flag, fp32-upcasting loads, dot
operands, the rank bucket, launch constexprs and the per-architecture autotune wrapper.

Triton is optional (it is a Linux-only dependency): without it, ``triton.jit`` is a no-op stub so
the kernel modules still import, and ``kernels/backend.py`` reports "triton is not importable".
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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

# Largest rank tile. Every kernel tiles the rank by BLOCK_R (a grid dimension for S, dS and dA,
# extra K-steps of the GEMMs), so any rank runs with one of the padded buckets 16/32/64: rank is a
# runtime argument and never triggers a recompile beyond these three buckets. 64 keeps the
# [BLOCK_M, BLOCK_R] fp32 accumulators small enough not to spill with 128-row tiles.
MAX_BLOCK_R = 64
# Rank step of the two GEMMs (forward, dX), where the rank is just more reduction steps: 32 keeps
# the fp32 S/dS tile that rides along a 128-row accumulator from spilling (64 spilled on sm_80).
GEMM_RANK_STEP = 32


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


@functools.cache
def autotuned(kernel, arch: str, name: str, configs_fn: Callable[[str, str], list],
              key: tuple[str, ...]):
    """``triton.autotune`` of ``kernel`` over the config list ``configs_fn(arch, name)``, built
    once per (kernel, arch, name).

    Built lazily (not at import) so the config list follows the GPU the call runs on. Under the
    interpreter ``configs_fn`` returns one big-block config and nothing is benchmarked. The
    kernels write every output element (no atomics), so benchmarking reruns are harmless.
    """
    return triton.autotune(configs=configs_fn(arch, name), key=list(key))(kernel)


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
