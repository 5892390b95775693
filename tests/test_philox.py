"""The dropout mask convention (kernels/philox.py) on every backend, against an independent host
Philox-4x32-10 written here in plain Python integers.

Element (row, col) of a [rows, C] tensor is kept when word ``col % 4`` of
philox4x32_10(counter=(row * ceil(C / 4) + col // 4 mod 2^32, 0, 0, 0), key=(lo, hi)) maps to a
uniform >= p. Checked: the torch implementation (``philox_keep_mask``), the Triton ``keep_mask``
(through ``dropout_keep_mask(backend="triton")`` on ``KERNEL_DEVICE``: the interpreter here, the
compiled kernel on a GPU), over rows whose length is not a multiple of 4; keep-rate statistics;
seeds and p validated. The C++ twin (csrc/philox.cuh, through the host op
``bridge::philox_keep_mask``) is checked against the same reference in tests/test_csrc.py.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch
from bridge.kernels._triton_common import HAS_TRITON, tl, triton
from bridge.kernels.philox import dropout_keep_mask, keep_mask, philox_keep_mask, seed_tensor

from tests.conftest import KERNEL_DEVICE as DEV
from tests.conftest import requires_kernel_device

triton_kernels = requires_kernel_device()
M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# An independent reference: Philox-4x32-10 (Salmon et al., SC'11) on Python ints, and the
# convention spelled out element by element.

def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> list[int]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, \
            p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return [c0, c1, c2, c3]


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def uniform(word: int) -> float:
    v = word - 2**32 if word >= 2**31 else word  # read as int32
    v = ~v if v < 0 else v
    return _f32(_f32(float(v)) * _f32(4.6566127342e-10))  # int -> fp32, product in fp32


def reference_mask(seed: int, rows: int, cols: int, p: float) -> torch.Tensor:
    key = (seed & M32, (seed >> 32) & M32)
    groups = -(-cols // 4)
    p32 = _f32(p)
    out = torch.empty(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for q in range(groups):
            words = philox4x32_10(((r * groups + q) & M32, 0, 0, 0), key)
            for j in range(min(4, cols - 4 * q)):
                out[r, 4 * q + j] = uniform(words[j]) >= p32
    return out


def test_reference_philox_matches_the_published_known_answers():
    # Random123's kat_vectors for philox4x32_10 (counter, key -> output)
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                    0x9B00DBD8]
    assert philox4x32_10((M32, M32, M32, M32), (M32, M32)) == [0x408F276D, 0x41C83B0E,
                                                                0xA20BC7C6, 0x6D5451FD]
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
                         (0xA4093822, 0x299F31D0)) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420,
                                                       0x24126EA1]


# Seeds: 0, small, the int32 edge, a non-zero high key word, and a negative int64 seed.
SEEDS = [0, 7, 2**31 - 1, 2**40 + 12345, -3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (5, 33), (2, 130)])
def test_torch_mask_matches_the_reference(seed, rows, cols):
    # row lengths 1, 7, 33, 130: none a multiple of 4, so every row ends in a partial group
    p = 0.3
    ref = reference_mask(seed, rows, cols, p)
    assert torch.equal(philox_keep_mask(seed, (rows, cols), p, "cpu"), ref)
    assert torch.equal(philox_keep_mask(torch.tensor([seed]), (rows, cols), p, "cpu"), ref)


@triton_kernels
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rows,cols", [(3, 7), (17, 130), (2, 260)])
def test_triton_mask_matches_the_reference(seed, rows, cols):
    # 130 and 260 columns span several 128-column programs, the last one partial
    p = 0.3
    ours = dropout_keep_mask(seed, (rows, cols), p, DEV, backend="triton").cpu()
    assert torch.equal(ours, reference_mask(seed, rows, cols, p))


@triton_kernels
def test_triton_and_torch_masks_are_identical_on_a_large_tensor():
    seed, shape, p = 2**33 + 99, (3, 70, 517), 0.1
    tri = dropout_keep_mask(seed, shape, p, DEV, backend="triton").cpu()
    tor = dropout_keep_mask(seed, shape, p, "cpu", backend="torch")
    assert tri.shape == shape and torch.equal(tri, tor)


def test_leading_dims_flatten_into_rows():
    seed, p = 11, 0.25
    flat = philox_keep_mask(seed, (6, 9), p, "cpu")
    assert torch.equal(philox_keep_mask(seed, (2, 3, 9), p, "cpu").reshape(6, 9), flat)
    assert torch.equal(dropout_keep_mask(seed, (6, 9), p, "cpu"), flat)


def test_torch_philox_matches_the_reference_over_the_whole_counter_range():
    # counters and keys with the top bit set (read as negative int32 by the kernels)
    from bridge.kernels import philox

    gen = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (64,), generator=gen, dtype=torch.int64)
    counters[:3] = torch.tensor([0, 2**31, M32])
    for k0, k1 in [(0, 0), (M32, 1), (0x89ABCDEF, 0xFEDCBA98)]:
        words = torch.stack(philox._philox4x32_10(counters, k0, k1), dim=-1)
        ref = [philox4x32_10((int(c), 0, 0, 0), (k0, k1)) for c in counters]
        assert words.tolist() == ref


if HAS_TRITON:

    @triton.jit
    def _rows_from_kernel(seed_ptr, out_ptr, row0, n_cols, p, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr):
        """out[i, j] = keep_mask of element (row0 + i, j): rows far down a huge tensor."""
        r = tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        keep = keep_mask(tl.load(seed_ptr), row0 + r, c, n_cols, p)
        tl.store(out_ptr + r[:, None] * BLOCK_C + c[None, :], keep.to(tl.int8))


@triton_kernels
@pytest.mark.parametrize("row0", [2**29 - 3, 2**30 + 7, 2**33 + 1])
def test_triton_counter_wraps_modulo_2_32(row0):
    # 16 columns = 4 groups per row: rows from 2^29 reach counters 2^31 (negative as int32),
    # from 2^30 past 2^32 (wrapped), from 2^33 far past it (the int64 product truncated)
    seed, p, rows, cols = 2**40 + 3, 0.5, 4, 16
    out = torch.empty(rows, cols, dtype=torch.int8, device=DEV)
    _rows_from_kernel[(1,)](seed_tensor(seed, DEV), out, row0, cols, p, BLOCK_R=rows,
                            BLOCK_C=cols)
    key = (seed & M32, seed >> 32)
    ref = [[uniform(philox4x32_10((((row0 + i) * 4 + j // 4) & M32, 0, 0, 0), key)[j % 4])
            >= p for j in range(cols)] for i in range(rows)]
    assert out.cpu().bool().tolist() == ref


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    keep = philox_keep_mask(1234, (128, 1003), p, "cpu").double()
    n = keep.numel()
    rate = float(keep.mean())
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), rate
    # the four words of one call, neighbouring groups and rows are uncorrelated
    cols = keep[:, :1000].reshape(128, 250, 4)
    for a, b in [(cols[..., 0], cols[..., 1]), (cols[..., 1], cols[..., 3]),
                 (keep[:, :-4], keep[:, 4:]), (keep[:-1], keep[1:])]:
        corr = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
        assert abs(corr) < 5 / math.sqrt(a.numel()), corr
    # another seed gives another mask
    other = philox_keep_mask(1235, (128, 1003), p, "cpu").double()
    assert 0.5 * (2 * p * (1 - p)) < float((keep != other).double().mean()) < 1.5 * (
        2 * p * (1 - p))


def test_p_edges():
    assert bool(philox_keep_mask(3, (5, 6), 0.0, "cpu").all())
    assert not bool(philox_keep_mask(3, (5, 6), 1.0, "cpu").any())
    assert philox_keep_mask(3, (0, 6), 0.5, "cpu").shape == (0, 6)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.1", None])
def test_bad_p_is_refused(bad):
    with pytest.raises(ValueError, match="dropout probability p must be a float in"):
        dropout_keep_mask(1, (2, 3), bad, "cpu")


def test_bad_seeds_are_refused():
    with pytest.raises(ValueError, match="seed must fit in int64"):
        seed_tensor(2**63, "cpu")
    with pytest.raises(TypeError, match="seed must be an int"):
        seed_tensor(1.5, "cpu")
    with pytest.raises(TypeError, match="integer dtype"):
        seed_tensor(torch.tensor([1.0]), "cpu")
    with pytest.raises(ValueError, match="one element"):
        philox_keep_mask(torch.tensor([1, 2]), (2, 3), 0.1, "cpu")
    with pytest.raises(ValueError, match="backend must be"):
        dropout_keep_mask(1, (2, 3), 0.1, "cpu", backend="cuda")


def test_a_device_seed_needs_no_host_copy():
    # a seed tensor feeds the key as a 0-d tensor: the mask is the same as for the int
    seed = torch.tensor([2**35 + 17])
    assert torch.equal(philox_keep_mask(seed, (4, 9), 0.4, "cpu"),
                       philox_keep_mask(2**35 + 17, (4, 9), 0.4, "cpu"))


def test_torch_mask_traces_under_torch_compile_fullgraph():
    # the eager backends draw it inside modules that users compile: no graph break, same bits
    def dropped(x, seed):
        return x * philox_keep_mask(seed, x.shape, 0.25, x.device) / 0.75

    x, seed = torch.randn(5, 9), torch.tensor([1234])
    compiled = torch.compile(dropped, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, seed), dropped(x, seed))
    compiled_int = torch.compile(lambda t: dropped(t, 1234), fullgraph=True, backend="eager")
    assert torch.equal(compiled_int(x), dropped(x, seed))
