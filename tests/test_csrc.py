"""bridge._C: built wherever it can be, every op's schema registered, fakes propagating shapes,
the C++ Philox (csrc/philox.cuh, through its host ops) equal to the dropout convention bit for
bit, and (GPU only) the CUDA row pass against the Triton row pass and the fp64 reference."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from bridge.kernels import _ext
from bridge.kernels.philox import dropout_keep_mask, philox_keep_mask
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.conftest import KERNEL_DEVICE
from tests.numerics import dtype_tol
from tests.numerics import rel_err as _rel
from tests.test_philox import M32, SEEDS, philox4x32_10, reference_mask, uniform

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OPS = ("philox_uniform", "philox_keep_mask", "norm_lora_row_fwd_cuda", "norm_lora_row_bwd_cuda")
CUDA_OPS = ("norm_lora_row_fwd", "norm_lora_row_bwd")  # _ext.has_op names (without _cuda)


def _nvcc() -> str | None:
    for home in [os.environ.get("CUDA_HOME"), "/usr/local/cuda",
                 *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


BUILDABLE = torch.version.cuda is not None and _nvcc() is not None
needs_ext = pytest.mark.skipif(not _ext.extension_status()[0],
                               reason="bridge._C not loaded: " + _ext.extension_status()[1])
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_extension_imports_where_it_can_be_built():
    """A CUDA build of torch plus nvcc means setup.py built bridge._C: not loading is a failure."""
    ok, reason = _ext.extension_status()
    if not BUILDABLE:
        pytest.skip(f"cannot build here (torch.version.cuda={torch.version.cuda}, nvcc={_nvcc()})")
    assert ok, f"bridge._C should have been built and loaded: {reason}"
    for op in CUDA_OPS:
        assert _ext.has_op(op), op


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_schema_registered(op):
    schema = str(getattr(torch.ops.bridge, op).default._schema)
    assert schema.startswith(f"bridge::{op}(")


@needs_ext
def test_schemas_name_every_argument():
    fwd = str(torch.ops.bridge.norm_lora_row_fwd_cuda.default._schema)
    bwd = str(torch.ops.bridge.norm_lora_row_bwd_cuda.default._schema)
    assert "Tensor? norm_bias" in fwd and "float dropout" in fwd and "bool rms" in fwd
    assert "Tensor? dln_out" in bwd and "Tensor ds" in bwd and "Tensor seed" in bwd


def _row_args(device, m=6, k=64, r=5, dtype=torch.bfloat16, bias=True):
    x = torch.empty(m, k, device=device, dtype=dtype)
    nw = torch.empty(k, device=device, dtype=dtype)
    nb = torch.empty(k, device=device, dtype=dtype) if bias else None
    a = torch.empty(r, k, device=device, dtype=dtype)
    seed = torch.zeros(1, device=device, dtype=torch.int64)
    return x, nw, nb, a, seed


@needs_ext
@pytest.mark.parametrize("device", ["meta", "cuda"])
def test_fakes_propagate_shapes(device):
    """Meta kernels (csrc/ops.cpp) give the shapes; FakeTensorMode uses them for fake CUDA tensors
    (how torch.compile traces the ops) without a GPU."""
    m, k, r = 6, 64, 5
    with FakeTensorMode() if device == "cuda" else torch.device("meta"):
        x, nw, nb, a, seed = _row_args(device, m, k, r)
        ln, mean, rstd, s = torch.ops.bridge.norm_lora_row_fwd_cuda(x, nw, nb, a, seed, 1e-5, 0.1,
                                                                    False, False)
        dx, dnw, dnb, da = torch.ops.bridge.norm_lora_row_bwd_cuda(
            x, ln, None, nw, nb, mean, rstd, s, seed, 0.1, False, False)
        u = torch.ops.bridge.philox_uniform(seed, torch.empty(3, 4, device=device,
                                                             dtype=torch.int32))
        keep = torch.ops.bridge.philox_keep_mask(seed, 5, 7, 0.1)
    assert (ln.shape, mean.shape, rstd.shape, s.shape) == ((m, k), (m,), (m,), (m, r))
    assert ln.dtype == x.dtype and {mean.dtype, rstd.dtype, s.dtype} == {torch.float32}
    assert (dx.shape, dnw.shape, dnb.shape, da.shape) == ((m, k), (k,), (k,), (r, k))
    assert dx.dtype == x.dtype and da.dtype == torch.float32
    assert u.shape == (3, 4) and u.dtype == torch.float32
    assert keep.shape == (5, 7) and keep.dtype == torch.bool and keep.device.type == device
    assert ln.device.type == device


def _ptxas_log_of_the_install() -> str | None:
    """The install's own build output (``make`` keeps it and points BRIDGE_BUILD_LOG at it), if
    it holds the ptxas lines of the csrc kernels: reading it saves compiling them again."""
    path = os.environ.get("BRIDGE_BUILD_LOG")
    if not path or not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        log = f.read()
    return log if "Compiling entry function" in log and "norm_lora" in log else None


@pytest.mark.slow
@pytest.mark.skipif(not BUILDABLE, reason="needs a CUDA build of torch and nvcc")
def test_ptxas_reports_no_spills(tmp_path):
    """csrc/norm_lora.cu for sm_80 and sm_90 with ptxas -v: no kernel spills. Reads the
    install's build log when there is one (make test), else compiles the file here."""
    log = _ptxas_log_of_the_install()
    if log is None:
        log = _compile_with_ptxas_verbose(tmp_path)
    kernels = re.findall(r"Compiling entry function '(\S+)' for '(sm_\d+)'", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert {arch for _, arch in kernels} >= {"sm_80", "sm_90"}, log[-3000:]
    assert len(kernels) >= 14 and len(spills) == len(kernels)
    assert sum(spills) == 0, log


def _compile_with_ptxas_verbose(tmp_path) -> str:
    from torch.utils.cpp_extension import include_paths

    purelib = os.path.dirname(os.path.dirname(torch.__file__))
    incs = [*include_paths(device_type="cuda"), os.path.join(ROOT, "csrc"),
            *glob.glob(os.path.join(purelib, "nvidia", "cu1*", "include"))]
    cmd = [_nvcc(), "-c", os.path.join(ROOT, "csrc", "norm_lora.cu"), "-o", str(tmp_path / "k.o"),
           "-std=c++20", "-O3", "--use_fast_math", "-Xptxas", "-v", "--expt-relaxed-constexpr",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-Xcompiler", "-fPIC",
           f"-I{sys.base_prefix}/include/python{sys.version_info.major}.{sys.version_info.minor}",
           *[f"-I{p}" for p in incs]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return log


# ---------------------------------------------------------------------------------------------
# The C++ Philox on the host: the code the CUDA kernels run (csrc/philox.cuh is __host__
# __device__), against the independent Python Philox-4x32-10 of tests/test_philox.py


@needs_ext
@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_keep_mask_matches_the_reference(seed):
    # rows of 1, 7, 33 and 130 elements: never a multiple of 4, so each ends in a partial group
    for rows, cols in [(1, 1), (3, 7), (5, 33), (2, 130)]:
        ours = torch.ops.bridge.philox_keep_mask(torch.tensor([seed]), rows, cols, 0.3)
        assert torch.equal(ours, reference_mask(seed, rows, cols, 0.3)), (rows, cols)


@needs_ext
def test_cpp_keep_mask_matches_the_torch_mask_on_a_large_tensor():
    seed, rows, cols, p = 2**41 + 5, 300, 1021, 0.15
    ours = torch.ops.bridge.philox_keep_mask(torch.tensor([seed]), rows, cols, p)
    assert torch.equal(ours, philox_keep_mask(seed, (rows, cols), p, "cpu"))
    assert torch.ops.bridge.philox_keep_mask(torch.tensor([seed]), rows, cols, 0.0).all()


@needs_ext
def test_cpp_philox_uniform_is_the_first_word():
    # philox_uniform(seed, offsets) = uniform of word 0 of counter (offset mod 2^32, 0, 0, 0)
    seed = 2**33 + 5
    offs = torch.tensor([0, 1, 2**31 - 1, -1, -(2**31), 123456789], dtype=torch.int64)
    u = torch.ops.bridge.philox_uniform(torch.tensor([seed]), offs)
    key = (seed & M32, seed >> 32)
    ref = [uniform(philox4x32_10((int(o) & M32, 0, 0, 0), key)[0]) for o in offs]
    assert u.tolist() == ref


@needs_ext
def test_cpp_keep_mask_checks_its_arguments():
    with pytest.raises(RuntimeError, match="seed must have one element"):
        torch.ops.bridge.philox_keep_mask(torch.tensor([1, 2]), 2, 3, 0.1)
    with pytest.raises(RuntimeError, match="rows and cols must be >= 0"):
        torch.ops.bridge.philox_keep_mask(torch.tensor([1]), -1, 3, 0.1)


# ---------------------------------------------------------------------------------------------
# GPU only: the CUDA row pass against the Triton row pass and the fp64 reference



@pytest.mark.gpu
@gpu
@needs_ext
def test_cuda_philox_matches_cpu():
    seed = torch.tensor([2**33 + 5], dtype=torch.int64)
    offs = torch.arange(-1000, 100000, 7, dtype=torch.int32)
    cpu = torch.ops.bridge.philox_uniform(seed, offs)
    gpu_u = torch.ops.bridge.philox_uniform(seed.cuda(), offs.cuda()).cpu()
    assert torch.equal(cpu.view(torch.int32), gpu_u.view(torch.int32))


@pytest.mark.gpu
@gpu
@needs_ext
def test_cuda_keep_mask_matches_cpu_and_triton():
    seed, rows, cols, p = 2**40 + 1, 257, 4099, 0.2
    cpu = torch.ops.bridge.philox_keep_mask(torch.tensor([seed]), rows, cols, p)
    cuda = torch.ops.bridge.philox_keep_mask(torch.tensor([seed]).cuda(), rows, cols, p).cpu()
    assert torch.equal(cpu, cuda)
    tri = dropout_keep_mask(seed, (rows, cols), p, "cuda", backend="triton").cpu()
    assert torch.equal(cpu, tri)


@pytest.mark.gpu
@gpu
@needs_ext
@pytest.mark.skipif(torch.cuda.is_available() and KERNEL_DEVICE != "cuda",
                    reason="the Triton row pass must be compiled for the GPU: needs "
                    "BRIDGE_TEST_GPU=1 and TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms,zcg,p", [(False, False, 0.0), (False, True, 0.25),
                                       (True, False, 0.1)])
@pytest.mark.parametrize("m,k,r", [(1, 64, 3), (37, 1024, 16), (4100, 4096, 20)])
def test_cuda_row_pass_matches_triton(dtype, rms, zcg, p, m, k, r):
    from bridge.kernels.norm_lora import norm_lora_row_bwd, norm_lora_row_fwd

    torch.manual_seed(0)
    dev = "cuda"
    x = (torch.randn(m, k, device=dev) * 3 + 1).to(dtype)
    nw = (torch.rand(k, device=dev) + 0.5).to(dtype)
    nb = None if rms else (torch.randn(k, device=dev) * 0.1).to(dtype)
    a = (torch.randn(r, k, device=dev) / k**0.5).to(dtype)
    seed = torch.tensor([1234], dtype=torch.int64, device=dev)
    kw = dict(p=p, rms=rms, shift=1.0 if zcg else 0.0)
    outs = [norm_lora_row_fwd(x, nw, nb, a, seed, eps=1e-5, backend=b, **kw)
            for b in ("cuda", "triton")]
    tol = dtype_tol(dtype, "chain")
    for c, t in zip(outs[0], outs[1], strict=True):
        assert _rel(c, t) < tol
    ln, mean, rstd, s = outs[1]
    dln = torch.randn(m, k, device=dev).to(dtype)
    dlo = torch.randn(m, k, device=dev).to(dtype)
    ds = torch.randn(m, r, device=dev)
    grads = [norm_lora_row_bwd(x, dln, dlo, nw, nb, mean, rstd, ds, seed, backend=b, **kw)
             for b in ("cuda", "triton")]
    for c, t in zip(grads[0], grads[1], strict=True):
        if t.norm() > 0:
            assert _rel(c, t) < tol
