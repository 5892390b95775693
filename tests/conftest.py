"""Test setup: the device the kernel tests run on, Triton's CPU interpreter, and the three
CPU-only shims megatron-core needs.

Kernel tests (tests/test_lora_linear_triton.py, test_norm_lora.py, test_philox.py) create their
tensors on ``KERNEL_DEVICE`` (also the fixture ``kernel_device``): ``"cuda"`` when
``BRIDGE_TEST_GPU=1``, a CUDA GPU is visible and ``TRITON_INTERPRET`` is off (the kernels are
compiled for the GPU, as benchmarks/gpu_check.sh runs them), else ``"cpu"``, where they need the
interpreter (``TRITON_INTERPRET=1``, the default here without ``BRIDGE_TEST_GPU``). Mark them
with ``requires_kernel_device()``; it skips them, saying why, where neither holds.

The shims live here and nowhere else (DESIGN.md): megatron's mappings and buffers allocate on
``torch.cuda.current_device()``, its attention forks the CUDA RNG tracker, and
``dist_checkpointing.save`` calls ``torch.cuda.synchronize()``. On a machine with a GPU nothing is
patched.
"""

from __future__ import annotations

import contextlib
import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


# Triton kernels run on CPU tensors through the interpreter unless a GPU is present. This must be
# set before triton is imported anywhere in the test process.
os.environ.setdefault("TRITON_INTERPRET", "0" if _flag("BRIDGE_TEST_GPU") else "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.numerics import rel_err  # noqa: E402,F401  (re-exported: older tests import it here)

KERNEL_SKIP_REASON = "needs TRITON_INTERPRET=1 on the CPU or BRIDGE_TEST_GPU=1 with a CUDA GPU"


def _kernel_device() -> tuple[str, str]:
    """(device, why not runnable): the kernel test device and, when the kernel tests cannot run
    there, the skip reason (empty when they can)."""
    state = (f"BRIDGE_TEST_GPU={os.environ.get('BRIDGE_TEST_GPU', '')!r}, "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}, "
             f"torch.cuda.is_available()={torch.cuda.is_available()}")
    if importlib.util.find_spec("triton") is None:
        return "cpu", f"{KERNEL_SKIP_REASON}; triton is not installed"
    if _flag("BRIDGE_TEST_GPU") and torch.cuda.is_available() and not _flag("TRITON_INTERPRET"):
        return "cuda", ""
    if _flag("TRITON_INTERPRET"):
        return "cpu", ""
    return "cpu", f"{KERNEL_SKIP_REASON} (here: {state})"


# Where the kernel tests put their tensors ("cuda" or "cpu"), and why they skip ("" if they run).
KERNEL_DEVICE, KERNEL_SKIP_WHY = _kernel_device()
KERNEL_TESTS_RUN = not KERNEL_SKIP_WHY


def requires_kernel_device() -> pytest.MarkDecorator:
    """Skip marker for tests that run Triton kernels on ``KERNEL_DEVICE``."""
    return pytest.mark.skipif(not KERNEL_TESTS_RUN, reason=KERNEL_SKIP_WHY or KERNEL_SKIP_REASON)


def cpu_kernel_device_only(why: str) -> pytest.MarkDecorator:
    """Skip marker for kernel tests that only make sense with the interpreter on the CPU."""
    return pytest.mark.skipif(KERNEL_DEVICE != "cpu",
                              reason=f"CPU/interpreter-only check ({why}); kernels run on CUDA here")


class _CPUStream:
    """torch.cuda.current_stream() on a machine without CUDA: waits are no-ops."""

    def wait_event(self, event) -> None:
        del event

    def wait_stream(self, stream) -> None:
        del stream


_CPU_STREAM = _CPUStream()


def install_megatron_cpu_shims() -> None:
    """Make megatron-core's tensor-parallel code run on the CPU (no-op when CUDA is available)."""
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    # megatron-core 0.19's DDP asks for the current stream before each gradient reduction (to
    # wait on CUDA-graph replays); on the CPU there is one stream and nothing to wait for
    torch.cuda.current_stream = lambda *a, **k: _CPU_STREAM
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


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """The device kernel tests create their tensors on: ``KERNEL_DEVICE`` ("cuda" or "cpu")."""
    return KERNEL_DEVICE
