"""The split reductions of kernels/_lowrank.py: S over K (``launch_shrink``), dA over M
(``launch_da``) and dS over N (``launch_dsdb``), whose programs reduce disjoint ranges into fp32
partials summed on the host in a fixed order. Against the fp64 reference at sizes around the
split boundaries, with the masks regenerated, strided and stride-0 inputs, bitwise-repeatable;
the split rule fills the GPU as its docstring says."""

from __future__ import annotations

import types

import pytest
import torch

from tests.conftest import requires_kernel_device
from tests.numerics import dtype_tol, rel_err

pytestmark = requires_kernel_device()

lowrank = pytest.importorskip("bridge.kernels._lowrank")
philox = pytest.importorskip("bridge.kernels.philox")


def _reference(ds, x, seed, p):
    x64 = x.double()
    if seed is not None and p > 0:
        keep = philox.dropout_keep_mask(seed, tuple(x.shape), p, x.device)
        x64 = torch.where(keep, x64, 0.0) / (1.0 - p)
    return ds.double().t() @ x64


@pytest.mark.parametrize("m", [1, 63, 64, 65, 200, 333])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_da_matches_the_fp64_reference(m, p, dtype):
    g = torch.Generator().manual_seed(m)
    k, r = 37, 5
    x = torch.randn(k, m, generator=g).to(dtype).t()  # strided: [m, k] with stride (1, m)
    ds = torch.randn(m, r, generator=g)
    seed = philox.seed_tensor(1234 + m, x.device) if p > 0 else None
    split, rows = lowrank.da_split(m, k, r, lowrank.rank_block(r), x.device)
    assert split == max(1, -(-m // rows))
    got = lowrank.launch_da(ds, x, seed=seed, p=p, out_dtype=dtype)
    want = _reference(ds, x, seed, p)
    assert got.shape == (r, k) and got.dtype == dtype and got.is_contiguous()
    assert rel_err(got, want) < dtype_tol(dtype, "chain"), (m, split)
    again = lowrank.launch_da(ds, x, seed=seed, p=p, out_dtype=dtype)
    assert torch.equal(got, again)  # deterministic: no atomics, a fixed summation order


def test_split_rule_fills_the_gpu_and_covers_every_row(monkeypatch):
    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(lowrank.torch.cuda, "get_device_properties", lambda device: props)
    cuda = types.SimpleNamespace(type="cuda")
    split, rows = lowrank.da_split(8192, 4096, 16, lowrank.rank_block(16), cuda)
    assert (split, rows) == (5, 1664)  # 64 K-tiles x 5 splits = 320 programs on 132 SMs
    assert rows % 128 == 0 and split * rows >= 8192 > (split - 1) * rows
    assert lowrank.da_split(512, 4096, 16, lowrank.rank_block(16), cuda) == (1, 512)
    for m in (1, 511, 513, 4097, 100_000):
        split, rows = lowrank.da_split(m, 1024, 64, lowrank.rank_block(64), cuda)
        assert rows >= 512 and split * rows >= m > (split - 1) * rows, (m, split, rows)
    # the interpreter splits at test sizes, so the partials path runs in CI
    assert lowrank.da_split(200, 37, 5, lowrank.rank_block(5), torch.device("cpu"))[0] > 1


@pytest.mark.parametrize("n", [1, 64, 65, 200, 333])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_dsdb_matches_the_fp64_reference(n, p, dtype):
    g = torch.Generator().manual_seed(n)
    m, r, scale = 70, 5, 0.75
    dy = torch.randn(n, m, generator=g).to(dtype).t()  # strided [m, n]
    lora_b = torch.randn(n, r, generator=g).to(dtype)
    s_mat = torch.randn(m, r, generator=g)
    seed = philox.seed_tensor(99 + n, dy.device) if p > 0 else None
    split, _ = lowrank.fill_split(n, 2, dy.device)
    g64 = dy.double()
    if seed is not None:
        keep = philox.dropout_keep_mask(seed, (m, n), p, dy.device)
        g64 = torch.where(keep, g64, 0.0) / (1.0 - p)
    ds, db = lowrank.launch_dsdb(dy, lora_b, s_mat, scale, seed=seed, p=p)
    assert ds.shape == (m, r) and ds.dtype == torch.float32 and ds.is_contiguous()
    assert db.shape == (n, r) and db.dtype == dtype
    tol = dtype_tol(dtype, "chain")
    assert rel_err(ds, scale * g64 @ lora_b.double()) < tol, (n, split)
    # dB's operand is s S rounded to the activations' dtype, as in the forward's dot
    s_op = s_mat.to(dtype).double() if dtype != torch.float32 else s_mat.double()
    assert rel_err(db, scale * g64.t() @ s_op) < tol, (n, split)
    again = lowrank.launch_dsdb(dy, lora_b, s_mat, scale, seed=seed, p=p)
    assert torch.equal(ds, again[0]) and torch.equal(db, again[1])


def test_dsdb_with_a_stride_0_gradient_splits_too():
    """dY from y.sum().backward() is an expanded one: stride 0 on both axes."""
    m, n, r = 9, 150, 3
    dy = torch.ones(()).expand(m, n)
    lora_b = torch.randn(n, r)
    s_mat = torch.randn(m, r)
    assert lowrank.fill_split(n, 1, dy.device)[0] > 1
    ds, db = lowrank.launch_dsdb(dy, lora_b, s_mat, 2.0)
    assert rel_err(ds, 2.0 * dy.double() @ lora_b.double()) < dtype_tol(torch.float32, "chain")
    assert rel_err(db, 2.0 * dy.double().t() @ s_mat.double()) < dtype_tol(torch.float32, "chain")


@pytest.mark.parametrize("k", [1, 64, 65, 200, 333])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_shrink_matches_the_fp64_reference(k, p, dtype):
    g = torch.Generator().manual_seed(k)
    m, r = 21, 6
    x = torch.randn(k, m, generator=g).to(dtype).t()  # strided [m, k]
    lora_a = torch.randn(r, k, generator=g).to(dtype)
    seed = philox.seed_tensor(7 + k, x.device) if p > 0 else None
    assert (lowrank.fill_split(k, 1, x.device)[0] > 1) == (k > 64)
    x64 = x.double()
    if seed is not None:
        keep = philox.dropout_keep_mask(seed, (m, k), p, x.device)
        x64 = torch.where(keep, x64, 0.0) / (1.0 - p)
    s_mat = lowrank.launch_shrink(x, lora_a, seed=seed, p=p)
    assert s_mat.shape == (m, r) and s_mat.dtype == torch.float32 and s_mat.is_contiguous()
    assert rel_err(s_mat, x64 @ lora_a.double().t()) < dtype_tol(dtype, "chain"), k
    assert torch.equal(s_mat, lowrank.launch_shrink(x, lora_a, seed=seed, p=p))
