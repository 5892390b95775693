"""Loads the compiled extension ``bridge._C`` once and records why it did not load, if it did not."""

from __future__ import annotations

import functools

import torch


@functools.cache
def extension_status() -> tuple[bool, str]:
    """``(True, "")`` when ``bridge._C`` imported, else ``(False, reason)``."""
    try:
        import bridge._C  # noqa: F401  (registers the bridge::*_cuda ops)
    except ImportError as exc:
        msg = str(exc)
        if "No module named" in msg:
            return False, "bridge._C not built (no CUDA toolkit or CPU-only torch at install time)"
        return False, f"bridge._C failed to load: {msg}"
    except OSError as exc:  # a missing shared library (libcudart, ...)
        return False, f"bridge._C failed to load: {exc}"
    return True, ""


def has_op(op: str) -> bool:
    """Whether ``torch.ops.bridge`` has the CUDA twin ``<op>_cuda`` (after the extension loaded)."""
    ok, _ = extension_status()
    return ok and hasattr(torch.ops.bridge, f"{op}_cuda")
