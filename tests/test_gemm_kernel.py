"""Kernel-level tests of the fused GEMM (kernels/_gemm.py) and the autotuner (_triton_common).

The one GEMM kernel computes the forward y = x W^T + s S B^T (+ b) and the backward
dX = dY W + dS A; both are checked against fp64 torch for every variant (bias, 'post'/'pre'
mask, output dtype, epilogue split, rank steps), both kernels (pointer/cp.async and the
persistent TMA kernel, which the 3.8 interpreter runs), odd shapes (M = 1, sizes that are not
multiples of the 64-wide interpreter tiles), strided and stride-0 operands, and the host rule
that sends a call TMA cannot take to the pointer kernel.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import KERNEL_DEVICE, requires_kernel_device
from tests.numerics import assert_close_rel, dtype_tol

triton = pytest.importorskip("triton", reason="triton is not installed")
tl = triton.language
_gemm = pytest.importorskip("bridge.kernels._gemm")
common = pytest.importorskip("bridge.kernels._triton_common")
from bridge.kernels.philox import dropout_keep_mask, seed_tensor  # noqa: E402

pytestmark = requires_kernel_device()
DEV = KERNEL_DEVICE
DTYPES = (torch.float32, torch.bfloat16)
# the TMA kernel: the 3.8 interpreter runs it on the CPU; on a GPU it needs sm_90
HAS_TMA = _gemm.TensorDescriptor is not None and (
    DEV == "cpu" or torch.cuda.get_device_capability()[0] >= 9)


def _rand(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def _fwd_ref(x, w, b, s_mat, lora_b, scale, mask=None, p=0.0):
    low = s_mat.double() @ lora_b.double().t()
    if mask is not None:
        low = low * mask.double() / (1.0 - p)
    y = x.double() @ w.double().t() + scale * low
    return y + b.double() if b is not None else y


def _dx_ref(dy, w, ds, lora_a, mask=None, p=0.0):
    low = ds.double() @ lora_a.double()
    if mask is not None:
        low = low * mask.double() / (1.0 - p)
    return dy.double() @ w.double() + low


def _forward(x, w, b, s_mat, lora_b, scale, seed=None, p=0.0, **how):
    """The forward through _gemm._launch, optionally with one family or one choice."""
    y = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    _gemm._launch("fwd", x, w, (w.stride(0), w.stride(1)), b, s_mat, lora_b,
                  (lora_b.stride(0), lora_b.stride(1)), y, scale, seed, p, **how)
    return y


def _dx(dy, w, ds, lora_a, seed=None, p=0.0, out_dtype=None, **how):
    out = torch.empty((dy.shape[0], w.shape[1]), dtype=out_dtype or dy.dtype, device=dy.device)
    _gemm._launch("dx", dy, w, (w.stride(1), w.stride(0)), None, ds, lora_a,
                  (lora_a.stride(1), lora_a.stride(0)), out, 1.0, seed, p, **how)
    return out


# Shapes at the edges of the 64-wide interpreter tiles: one row; sizes just past a tile; a rank
# that is not a power of two; a rank above the 32-wide rank step (two steps, the second ragged).
SHAPES = [(1, 72, 40, 8), (70, 136, 72, 5), (33, 64, 136, 40)]  # (M, K, N, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_fp64(m, k, n, r, dtype, bias):
    x, w = _rand(m, k, dtype=dtype, seed=1), _rand(n, k, dtype=dtype, scale=k ** -0.5, seed=2)
    b = _rand(n, dtype=dtype, seed=3) if bias else None
    s_mat, lora_b = _rand(m, r, dtype=torch.float32, seed=4), _rand(n, r, dtype=dtype, seed=5)
    y = _gemm.launch_fused_gemm(x, w, b, s_mat, lora_b, 0.75)
    assert y.dtype == dtype and y.is_contiguous()
    assert_close_rel(y, _fwd_ref(x, w, b, s_mat, lora_b, 0.75), dtype_tol(dtype), "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,r", SHAPES[1:])
def test_forward_post_mask_matches_fp64(m, k, n, r, dtype):
    x, w = _rand(m, k, dtype=dtype, seed=1), _rand(n, k, dtype=dtype, scale=k ** -0.5, seed=2)
    b = _rand(n, dtype=dtype, seed=3)
    s_mat, lora_b = _rand(m, r, dtype=torch.float32, seed=4), _rand(n, r, dtype=dtype, seed=5)
    p, seed = 0.3, seed_tensor(1234, torch.device(DEV))
    mask = dropout_keep_mask(seed, (m, n), p, DEV)
    y = _gemm.launch_fused_gemm(x, w, b, s_mat, lora_b, 2.0, seed=seed, p=p)
    ref = _fwd_ref(x, w, b, s_mat, lora_b, 2.0, mask, p)
    assert_close_rel(y, ref, dtype_tol(dtype), "y (post mask)")
    # the mask is really applied: without it the result is far off
    assert (y.double() - _fwd_ref(x, w, b, s_mat, lora_b, 2.0)).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_dx_matches_fp64(m, k, n, r, dtype):
    dy, w = _rand(m, n, dtype=dtype, seed=6), _rand(n, k, dtype=dtype, scale=k ** -0.5, seed=2)
    ds, lora_a = _rand(m, r, dtype=torch.float32, seed=7), _rand(r, k, dtype=dtype, seed=8)
    dx = _gemm.launch_dx(dy, w, ds, lora_a)
    assert dx.dtype == dtype and dx.is_contiguous()
    assert_close_rel(dx, _dx_ref(dy, w, ds, lora_a), dtype_tol(dtype), "dx")


@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_dx_pre_mask_and_fp32_output(out_dtype):
    m, k, n, r = 70, 136, 72, 5
    dtype = torch.bfloat16
    dy, w = _rand(m, n, dtype=dtype, seed=6), _rand(n, k, dtype=dtype, scale=k ** -0.5, seed=2)
    ds, lora_a = _rand(m, r, dtype=torch.float32, seed=7), _rand(r, k, dtype=dtype, seed=8)
    p, seed = 0.25, seed_tensor(99, torch.device(DEV))
    mask = dropout_keep_mask(seed, (m, k), p, DEV)
    dx = _gemm.launch_dx(dy, w, ds, lora_a, seed=seed, p=p, out_dtype=out_dtype)
    assert dx.dtype == (out_dtype or dtype)
    assert_close_rel(dx, _dx_ref(dy, w, ds, lora_a, mask, p), dtype_tol(dtype), "dx (pre mask)")


def test_stride0_and_strided_operands():
    """dY from y.sum().backward() (stride 0), a column slice of a wider x, a transposed weight
    and a strided lora_b: every stride is honoured."""
    m, k, n, r = 37, 72, 40, 6
    dtype = torch.float32
    dy = torch.ones(1, 1, dtype=dtype, device=DEV).expand(m, n)
    w_t = _rand(k, n, dtype=dtype, scale=k ** -0.5, seed=2)
    w = w_t.t()  # [N, K] with stride (1, N)
    ds, lora_a = _rand(m, r, dtype=torch.float32, seed=7), _rand(r, k, dtype=dtype, seed=8)
    assert_close_rel(_gemm.launch_dx(dy, w, ds, lora_a), _dx_ref(dy, w, ds, lora_a),
                     dtype_tol(dtype), "dx, stride-0 dY, transposed W")
    x = _rand(m, k + 24, dtype=dtype, seed=1)[:, 8:8 + k]
    lora_b = _rand(r, n, dtype=dtype, seed=5).t()  # [N, r] with stride (1, N)
    s_mat, b = _rand(m, r, dtype=torch.float32, seed=4), _rand(n, dtype=dtype, seed=3)
    y = _gemm.launch_fused_gemm(x, w, b, s_mat, lora_b, 0.5)
    assert_close_rel(y, _fwd_ref(x, w, b, s_mat, lora_b, 0.5), dtype_tol(dtype),
                     "y, sliced x, transposed W and B")


def test_empty_batch():
    w = _rand(40, 72, dtype=torch.float32, seed=2)
    y = _gemm.launch_fused_gemm(torch.empty(0, 72, device=DEV), w, None,
                                torch.empty(0, 4, device=DEV), _rand(40, 4, dtype=torch.float32),
                                1.0)
    assert y.shape == (0, 40)


FAMILIES = ["ptr"] + (["tma"] if HAS_TMA else [])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("mask", [False, True])
def test_every_epilogue_split_of_both_kernels(family, split, mask):
    """One explicit config per (kernel, EPI_SPLIT, mask): the forward with bias and the dX with
    an fp32 output, on sizes that leave ragged last tiles."""
    config = common.cfg(4, 1, BLOCK_M=32, BLOCK_J=64, BLOCK_L=32, GROUP_M=2, EPI_SPLIT=split)
    choice = _gemm.make_choice(family, config)
    m, k, n, r = 45, 72, 88, 5
    dtype = torch.bfloat16
    p, seed = (0.2, seed_tensor(7, torch.device(DEV))) if mask else (0.0, None)
    x, w = _rand(m, k, dtype=dtype, seed=1), _rand(n, k, dtype=dtype, scale=k ** -0.5, seed=2)
    b = _rand(n, dtype=dtype, seed=3)
    s_mat, lora_b = _rand(m, r, dtype=torch.float32, seed=4), _rand(n, r, dtype=dtype, seed=5)
    fmask = dropout_keep_mask(seed, (m, n), p, DEV) if mask else None
    y = _forward(x, w, b, s_mat, lora_b, 0.5, seed, p, choice=choice)
    assert_close_rel(y, _fwd_ref(x, w, b, s_mat, lora_b, 0.5, fmask, p), dtype_tol(dtype),
                     f"y [{family}, split {split}]")
    dy = _rand(m, n, dtype=dtype, seed=6)
    ds, lora_a = _rand(m, r, dtype=torch.float32, seed=7), _rand(r, k, dtype=dtype, seed=8)
    xmask = dropout_keep_mask(seed, (m, k), p, DEV) if mask else None
    dx = _dx(dy, w, ds, lora_a, seed, p, torch.float32, choice=choice)
    assert_close_rel(dx, _dx_ref(dy, w, ds, lora_a, xmask, p), dtype_tol(dtype),
                     f"dx [{family}, split {split}]")


@pytest.mark.skipif(not HAS_TMA, reason="triton has no triton.tools.tensor_descriptor")
def test_tma_kernel_walks_several_tiles_per_program():
    """The persistent grid is smaller than the tile count (3 programs under the interpreter,
    one per SM on a GPU), so each program runs several tiles through one flattened loop; ranks
    above the rank step."""
    programs = _gemm._num_programs(torch.device(DEV))
    # more tiles than programs even with the largest tile (128 x 256)
    m, k, n, r = 128 * (programs // 2) + 2, 72, 520, 40
    x, w = _rand(m, k, dtype=torch.float32, seed=1), _rand(n, k, dtype=torch.float32, seed=2)
    s_mat, lora_b = _rand(m, r, dtype=torch.float32, seed=4), _rand(n, r, dtype=torch.float32)
    assert triton.cdiv(m, 128) * triton.cdiv(n, 256) > programs
    y = _forward(x, w, None, s_mat, lora_b, 0.5, family="tma")
    assert_close_rel(y, _fwd_ref(x, w, None, s_mat, lora_b, 0.5), dtype_tol(torch.float32), "y")


def _args(a, w, w_strides, out):
    return {"a_ptr": a, "w_ptr": w, "out_ptr": out, "M": a.shape[0], "J": out.shape[1],
            "L": a.shape[1], "stride_am": a.stride(0), "stride_al": a.stride(1),
            "stride_wj": w_strides[0], "stride_wl": w_strides[1]}


@pytest.mark.skipif(not HAS_TMA, reason="triton has no triton.tools.tensor_descriptor")
def test_tma_eligibility_is_decided_on_the_host():
    """TMA needs 16-byte aligned bases and row strides and unit inner strides; everything else
    takes the pointer kernel (a forced "tma" refuses, naming the rule)."""
    bf = torch.bfloat16
    x, w = torch.zeros(16, 64, dtype=bf), torch.zeros(32, 64, dtype=bf)
    y = torch.zeros(16, 32, dtype=bf)
    fwd = lambda a, ww, out: _gemm._tma_ok(_args(a, ww, (ww.stride(0), ww.stride(1)), out))
    dxk = lambda a, ww, out: _gemm._tma_ok(_args(a, ww, (ww.stride(1), ww.stride(0)), out))
    assert fwd(x, w, y)
    assert dxk(torch.zeros(16, 32, dtype=bf), w, torch.zeros(16, 64, dtype=bf))  # [L, J] weight
    assert dxk(torch.zeros(16, 32, dtype=bf), w, torch.zeros(16, 64))  # fp32 output
    assert fwd(x, torch.zeros(64, 32, dtype=bf).t(), y)  # transposed weight
    assert not fwd(torch.zeros(16, 1, dtype=bf).expand(16, 64), w, y)  # stride-0 rows
    assert not fwd(torch.zeros(16, 65, dtype=bf)[:, 1:], w, y)  # base 2 bytes off
    assert fwd(torch.zeros(16, 72, dtype=bf)[:, :60], w[:, :60], y)  # K = 60 in 144-byte rows
    assert not fwd(torch.zeros(16, 60, dtype=bf), torch.zeros(32, 60, dtype=bf), y)  # 120 bytes
    assert not fwd(x.t().contiguous().t(), w, y)  # column-major x
    assert not fwd(x, w, torch.zeros(16, 36, dtype=bf)[:, :30])  # 60-byte output rows
    dy = torch.ones(1, 1, device=DEV).expand(5, 40)
    w40 = _rand(40, 24, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="no eligible kernel of family 'tma'"):
        _dx(dy, w40, _rand(5, 3, dtype=torch.float32), _rand(3, 24, dtype=torch.float32),
            family="tma")
    with pytest.raises(ValueError, match="TMA needs 16-byte aligned"):
        _dx(dy, w40, _rand(5, 3, dtype=torch.float32), _rand(3, 24, dtype=torch.float32),
            choice=_gemm.make_choice("tma", common.cfg(4, 1, BLOCK_M=32, BLOCK_J=32,
                                                       BLOCK_L=32, GROUP_M=1, EPI_SPLIT=1)))


def test_autotune_lists_per_architecture():
    """sm_90 tunes the pointer and the TMA kernel side by side, sm_80 the pointer kernel only;
    every list entry has the constexprs the kernels take."""
    for mask in (False, True):
        families = {c.family for c in _gemm._tuner("sm90", "fwd", mask).choices}
        assert families == ({"ptr", "tma"} if HAS_TMA else {"ptr"})
        assert {c.family for c in _gemm._tuner("sm80", "dx", mask).choices} == {"ptr"}
    for arch in ("sm80", "sm90", "interpret"):
        for name in ("gemm", "gemm_mask", "gemm_tma", "gemm_tma_mask"):
            for c in _gemm.configs(arch, name):
                assert set(c.kwargs) == {"BLOCK_M", "BLOCK_J", "BLOCK_L", "GROUP_M", "EPI_SPLIT"}
    assert len(_gemm.configs("interpret", "gemm")) == 1


# ---------------------------------------------------------------------------------------------
# The autotuner: bucketed keys, several candidates, winners cached on disk across processes.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _scale_kernel(x_ptr, y_ptr, M, K, R, factor, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    """y = x * factor (* 2 if FLAG): a stand-in kernel for the tuner tests."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < M * K)
    if FLAG:
        x = x * 2.0
    tl.store(y_ptr + i, x * factor, mask=i < M * K)


def _tuner(name="t"):
    choices = [common.Choice(_scale_kernel, common.cfg(4, 1, BLOCK=b)) for b in (64, 128)]
    return common.Tuner(name, _scale_kernel, choices, ("K", "R"))


def _call(tuner, m, k=8, r=16, dtype=torch.float32, flag=False):
    x = torch.ones(m * k, dtype=dtype, device=DEV)
    y = torch.empty_like(x)
    tuner[lambda meta: (triton.cdiv(m * k, meta["BLOCK"]),)](x, y, m, k, r, 3.0, FLAG=flag)
    return y


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_KERNEL_CACHE", str(tmp_path))
    common._cache_file.cache_clear()
    monkeypatch.setattr(common, "DISK_CACHE", common._DiskCache())
    yield tmp_path
    common._cache_file.cache_clear()


def test_tuner_keys_bucket_m_and_rank_and_follow_dtype_and_variant(cache_dir, monkeypatch):
    timed = []

    def fake_bench(choice, grid, args):
        timed.append((args["M"], choice.config.kwargs["BLOCK"]))
        return 1.0 if choice.config.kwargs["BLOCK"] == 128 else 2.0

    monkeypatch.setattr(common, "_bench", fake_bench)
    tuner = _tuner()
    assert tuner.key_names == ("M", "K", "R")  # M is added: the tile must follow the batch
    y = _call(tuner, 300)
    assert torch.equal(y, torch.full_like(y, 3.0))  # the winner ran
    assert timed == [(300, 64), (300, 128)]
    for m in (257, 512):  # same M bucket (512), rank 12 in bucket 16: no re-benchmark
        _call(tuner, m, r=12)
    assert len(timed) == 2
    _call(tuner, 9000)
    _call(tuner, 20000)  # both capped at 8192
    assert len(timed) == 4
    _call(tuner, 300, r=17)  # rank bucket 32
    _call(tuner, 300, dtype=torch.float64)  # another dtype
    _call(tuner, 300, flag=True)  # another constexpr variant
    _call(tuner, 300, k=9)  # another K
    assert len(timed) == 12
    assert [b for _, b in timed] == [64, 128] * 6


def test_tuner_winners_persist_across_processes(cache_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(common, "_bench", lambda c, g, a: calls.append(1) or
                        (1.0 if c.config.kwargs["BLOCK"] == 64 else 2.0))
    _call(_tuner(), 100)
    assert len(calls) == 2
    files = list(cache_dir.glob("autotune-*.json"))
    assert len(files) == 1
    entries = json.loads(files[0].read_text())
    assert list(entries.values()) == [_tuner().choices[0].label]
    # a new process: fresh tuner and fresh in-memory cache read the winner, benchmark nothing
    monkeypatch.setattr(common, "DISK_CACHE", common._DiskCache())
    picked = []
    tuner = _tuner()
    original = common.Choice.run
    monkeypatch.setattr(common.Choice, "run",
                        lambda self, grid, args: picked.append(self.label) or
                        original(self, grid, args))
    y = _call(tuner, 120)  # same M bucket (128)
    assert torch.equal(y, torch.full_like(y, 3.0))
    assert len(calls) == 2 and picked == [tuner.choices[0].label]


def test_tuner_with_one_candidate_benchmarks_nothing(cache_dir, monkeypatch):
    monkeypatch.setattr(common, "_bench", lambda *a: pytest.fail("benchmarked"))
    tuner = common.autotuned(_scale_kernel, "interpret", "one",
                             lambda arch, name: [common.cfg(4, 1, BLOCK=64)], ("K",))
    y = _call(tuner, 10)
    assert torch.equal(y, torch.full_like(y, 3.0))
    assert not list(cache_dir.glob("*.json"))


def test_tuner_cache_folder_default_and_unwritable(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("BRIDGE_KERNEL_CACHE", raising=False)
    assert common.kernel_cache_dir().parts[-2:] == (".cache", "bridge-peft-kernels")
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = common._DiskCache()
    cache.put(blocker / "sub" / "autotune.json", "k", "label")  # cannot create the folder
    assert cache.get(blocker / "sub" / "autotune.json", "k") == "label"  # kept in memory
    assert "BRIDGE_KERNEL_CACHE" in caplog.text


def test_disk_cache_sees_what_another_process_wrote_after_it_looked(tmp_path):
    path = tmp_path / "autotune-x.json"
    mine, theirs = common._DiskCache(), common._DiskCache()  # two processes
    assert mine.get(path, "k1") is None  # nothing tuned yet (no file)
    theirs.put(path, "k1", "winner")
    assert mine.get(path, "k1") == "winner"  # re-read: the file changed since
    mine.put(path, "k2", "other")
    merged = json.loads(path.read_text())
    assert merged == {"k1": "winner", "k2": "other"}  # merged, not overwritten
    path.write_text("{not json")
    assert common._DiskCache().get(path, "k1") is None  # a torn file is ignored
