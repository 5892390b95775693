"""Test setup: Triton's CPU interpreter, and the three CPU-only shims megatron-core needs.

The shims live here and nowhere else (DESIGN.md): megatron's mappings and buffers allocate on
``torch.cuda.current_device()``, its attention forks the CUDA RNG tracker, and
``dist_checkpointing.save`` calls ``torch.cuda.synchronize()``. On a machine with a GPU nothing is
patched.
"""

from __future__ import annotations

import contextlib
import os

# Triton kernels run on CPU tensors through the interpreter unless a GPU is present. This must be
# set before triton is imported anywhere in the test process.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("BRIDGE_TEST_GPU") else "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def install_megatron_cpu_shims() -> None:
    """Make megatron-core's tensor-parallel code run on the CPU (no-op when CUDA is available)."""
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:
        return
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.fork = lambda *a, **k: contextlib.nullcontext()


install_megatron_cpu_shims()


@pytest.fixture
def megatron_tp1(tmp_path):
    """megatron-core model parallel state at world size 1 on gloo; torn down afterwards."""
    pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")
    from tests.megatron_utils import destroy_parallel, init_parallel

    init_parallel(rank=0, world_size=1, tp=1, init_file=str(tmp_path / "dist_init"))
    yield
    destroy_parallel()
