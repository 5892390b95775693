"""The C++ Philox (csrc/philox.cuh, through the CPU op bridge::philox_uniform) reproduces Triton's
``tl.rand`` bit for bit, so CUDA and Triton kernels draw the same dropout mask. Triton runs on
``KERNEL_DEVICE`` (tests/conftest.py): the interpreter here, the compiled ``tl.rand`` on a GPU."""

from __future__ import annotations

import pytest
import torch
from bridge.kernels import _ext
from bridge.kernels._triton_common import HAS_TRITON, tl, triton

from tests.conftest import KERNEL_DEVICE as DEV
from tests.conftest import requires_kernel_device

pytestmark = pytest.mark.skipif(not _ext.extension_status()[0], reason="bridge._C not built: "
                                + _ext.extension_status()[1])
triton_kernels = requires_kernel_device()

if HAS_TRITON:

    @triton.jit
    def _rand_kernel(seed_ptr, off_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """out[i] = tl.rand(seed, off[i]) with an int32 offset, as the fused kernels draw it."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        off = tl.load(off_ptr + i, mask=ok, other=0)
        tl.store(out_ptr + i, tl.rand(tl.load(seed_ptr), off), mask=ok)


def _triton_rand(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """tl.rand on ``KERNEL_DEVICE``, returned on the CPU."""
    seed, offsets = seed.to(DEV), offsets.to(DEV)
    out = torch.empty(offsets.shape, dtype=torch.float32, device=DEV)
    _rand_kernel[(triton.cdiv(offsets.numel(), 1024),)](seed, offsets, out, offsets.numel(),
                                                      BLOCK=1024)
    return out.cpu()


# Seeds: 0, small, the int32 edge, and one with a non-zero high word (key k1 != 0).
@triton_kernels
@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**40 + 12345])
def test_cpu_philox_matches_triton_bitwise(seed):
    # offsets: a dense run, and the int32 edges (negative offsets are wrapped row*K+col indices)
    offsets = torch.cat([torch.arange(0, 2000, dtype=torch.int32),
                         torch.tensor([2**31 - 1, -1, -(2**31), 123456789], dtype=torch.int32)])
    seed_t = torch.tensor([seed], dtype=torch.int64)
    ours = torch.ops.bridge.philox_uniform(seed_t, offsets)
    ref = _triton_rand(seed_t, offsets)
    assert ours.dtype == torch.float32 and ours.shape == offsets.shape
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


@triton_kernels
def test_uniform_range_and_keep_rule_match_dropout_keep_mask():
    from bridge.kernels.philox import dropout_keep_mask

    rows, cols, p = 7, 33, 0.3
    seed_t = torch.tensor([1234], dtype=torch.int64)
    offsets = torch.arange(rows * cols, dtype=torch.int32).view(rows, cols)
    u = torch.ops.bridge.philox_uniform(seed_t, offsets)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u >= p, dropout_keep_mask(seed_t, (rows, cols), p, DEV).cpu())


def test_offsets_are_truncated_to_32_bits():
    seed_t = torch.tensor([99], dtype=torch.int64)
    wide = torch.tensor([5, 2**32 + 5, -(2**32) + 5], dtype=torch.int64)
    u = torch.ops.bridge.philox_uniform(seed_t, wide)
    assert u[0] == u[1] == u[2]
