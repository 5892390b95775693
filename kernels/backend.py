"""The one place that chooses a backend (``cuda``, ``triton`` or ``eager``) for a fused op.

Order of precedence: the ``backend`` argument of the call > the environment variable
``BRIDGE_KERNEL_BACKEND`` > automatic. Every probe returns ``(ok, reason)``. An explicit request
that cannot be met raises :class:`BackendUnavailableError` naming the reason; the automatic choice
falls back (cuda -> triton -> eager) and logs the reason for the fallback once per (op, reason).
``TRITON_INTERPRET=1`` makes the Triton backend available for CPU tensors (that is how CI tests it).
Nothing here rebinds globals: callers ask, per call, and get a :class:`BackendChoice`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger("bridge.kernels")

BACKENDS = ("auto", "cuda", "triton", "eager")
ENV_VAR = "BRIDGE_KERNEL_BACKEND"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why and what to do."""


@dataclass(frozen=True)
class BackendChoice:
    """The backend a call will use, and why (the reason is empty when nothing fell back)."""

    name: str
    reason: str = ""


def validate_backend_name(name: str | None, *, what: str = "backend") -> str:
    """Normalise a backend name; raise ``ValueError`` naming the allowed values otherwise."""
    if name is None:
        return "auto"
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.lower()


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_IMPORT: list[tuple[bool, str]] = []  # filled once; a plain list traces under dynamo


def _triton_import() -> tuple[bool, str]:
    if not _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_IMPORT.append((False, f"triton is not importable ({type(exc).__name__}: {exc})"))
        else:
            _TRITON_IMPORT.append((True, ""))
    return _TRITON_IMPORT[0]


def _gpu_probe(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        if not torch.cuda.is_available():
            return False, "no GPU"
        return False, f"tensors are on {device.type}, not on a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return False, f"compute capability {major}.{minor} < 8.0"
    return True, ""


def _dtype_probe(dtype: torch.dtype) -> tuple[bool, str]:
    if dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {str(dtype).replace('torch.', '')}"
    return True, ""


def probe_triton(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Can Triton kernels run on tensors of this device and dtype?"""
    ok, reason = _triton_import()
    if not ok:
        return ok, reason
    if interpreter_enabled():
        if device.type != "cpu":
            return False, "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
    else:
        ok, reason = _gpu_probe(device)
        if not ok:
            return ok, reason
    return _dtype_probe(dtype)


def probe_cuda(device: torch.device, dtype: torch.dtype, op: str) -> tuple[bool, str]:
    """Can the compiled extension ``bridge._C`` run ``op`` on tensors of this device and dtype?"""
    from bridge.kernels import _ext

    ok, reason = _ext.extension_status()
    if not ok:
        return ok, reason
    if not _ext.has_op(op):
        return False, f"bridge._C has no CUDA kernel for {op}"
    ok, reason = _gpu_probe(device)
    if not ok:
        return ok, reason
    return _dtype_probe(dtype)


@functools.lru_cache(maxsize=256)
def _log_once_cached(op: str, reason: str) -> None:
    logger.warning("bridge.kernels: %s runs on the eager backend: %s", op, reason)


def _log_once(op: str, reason: str) -> None:
    """Log a fallback once per (op, reason); never while torch.compile traces (dynamo cannot
    trace a logger call under fullgraph=True: the reason stays visible in kernel_report)."""
    if not torch.compiler.is_compiling():
        _log_once_cached(op, reason)


_log_once.cache_clear = _log_once_cached.cache_clear  # tests reset the log-once memory


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _hints(backend: str, reasons: list[str], device: torch.device, dtype: torch.dtype) -> str:
    """What to do about each reason an explicit request failed (only the ones that apply)."""
    text = " ".join(reasons)
    hints = []
    if dtype not in SUPPORTED_DTYPES:
        hints.append(f"pass {_dtype_names(SUPPORTED_DTYPES)} tensors")
    if "requires grad" in text:
        hints.append("freeze the base weight (weight.requires_grad_(False)): the fused ops "
                     "treat it as frozen")
    if "no GPU" in text or "compute capability" in text or "not on a CUDA GPU" in text:
        gpu = "run on an Ampere-or-newer GPU (compute capability >= 8.0) with CUDA tensors"
        if backend == "triton" and not interpreter_enabled():
            gpu += ", or set TRITON_INTERPRET=1 to run Triton on the CPU (slow: for tests)"
        hints.append(gpu)
    if "CPU tensors only" in text:
        hints.append("move the tensors to the CPU, or unset TRITON_INTERPRET to compile for "
                     "the GPU")
    if "triton is not importable" in text:
        hints.append("install triton (pip install triton)")
    if "bridge._C" in text or "no CUDA C++ kernel" in text:
        hints.append("use backend='triton'")
    hints.append("use backend='eager' (or 'auto', which falls back by itself)")
    return "; ".join(hints)


def resolve_backend(
    requested: str | None,
    op: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    cuda_op: bool = False,
    constraints: Iterable[tuple[bool, str]] = (),
    cuda_constraints: Iterable[tuple[bool, str]] = (),
) -> BackendChoice:
    """Choose the backend for one call of ``op``.

    Args:
        requested: ``auto|cuda|triton|eager`` (None means auto); overrides the environment.
        op: the op's name, used in messages and for the CUDA extension's op lookup.
        device, dtype: of the call's input tensors.
        cuda_op: whether ``bridge._C`` may implement this op (otherwise ``cuda`` is never chosen
            automatically, and an explicit ``cuda`` request raises).
        constraints: extra ``(ok, reason)`` checks that any fused backend must pass (e.g. shape
            limits, "base weight requires grad").
        cuda_constraints: checks only the ``cuda`` backend must pass (e.g. the CUDA kernel's
            hidden-size limit); when one fails, ``auto`` moves on to ``triton``.

    Returns:
        The chosen backend and, when the choice fell back, the reason.

    Raises:
        ValueError: an unknown backend name (argument or environment).
        BackendUnavailableError: an explicit ``cuda``/``triton`` request that cannot be met.
    """
    name = validate_backend_name(requested)
    source = "argument"
    if name == "auto":
        env = os.environ.get(ENV_VAR)
        if env:
            name = validate_backend_name(env, what=f"{ENV_VAR} value")
            source = f"{ENV_VAR}={env}"
    failed = [reason for ok, reason in constraints if not ok]
    cuda_failed = [reason for ok, reason in cuda_constraints if not ok]

    def probe(backend: str) -> tuple[bool, str]:
        if failed:
            return False, "; ".join(failed)
        if backend == "triton":
            return probe_triton(device, dtype)
        if not cuda_op:
            return False, f"no CUDA C++ kernel exists for {op}"
        ok, reason = probe_cuda(device, dtype, op)
        if ok and cuda_failed:
            return False, "; ".join(cuda_failed)
        return ok, reason

    if name == "eager":
        return BackendChoice("eager", f"requested by {source}")
    if name in ("cuda", "triton"):
        ok, reason = probe(name)
        if not ok:
            reasons = [reason]
            if failed:  # the constraints hid the backend's own probe: report it too
                ok_backend, why = probe_triton(device, dtype) if name == "triton" else \
                    probe_cuda(device, dtype, op) if cuda_op else (True, "")
                if not ok_backend:
                    reasons.append(why)
            if dtype not in SUPPORTED_DTYPES and not any("dtype" in r for r in reasons):
                reasons.append(_dtype_probe(dtype)[1])
            raise BackendUnavailableError(
                f"{op}: backend {name!r} requested by {source} cannot run: "
                f"{'; '.join(reasons)}; to run it: {_hints(name, reasons, device, dtype)}"
            )
        return BackendChoice(name)
    reasons = []
    for backend in ("cuda", "triton") if cuda_op else ("triton",):
        ok, reason = probe(backend)
        if ok:
            return BackendChoice(backend, "; ".join(reasons))
        reasons.append(f"{backend}: {reason}")
    reason = "; ".join(reasons)
    _log_once(op, reason)
    return BackendChoice("eager", reason)
