"""Build script: compiles csrc/ into the extension ``bridge._C`` when it can.

The extension is built when torch is a CUDA build, nvcc is found and csrc/ holds sources.
``BRIDGE_BUILD_CUDA=1`` forces the build (and fails loudly if it cannot happen);
``BRIDGE_BUILD_CUDA=0`` skips it. Otherwise the package installs as pure Python and this
script says why. ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0" (A100 and H100).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[bridge setup] {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """CUDA_HOME from the environment, else the toolkit folder behind nvcc.

    torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a wrapper script,
    so look for the real toolkit folder first.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and os.path.exists(os.path.join(env, "bin", "nvcc")):
        return env
    for cand in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _extra_include_dirs() -> list[str]:
    """nvidia/cu13 (or cu12) headers from site-packages: cuBLAS/cuSPARSE headers live there."""
    dirs = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "cu1*", "include")))
    return dirs


def _cuda_extension():
    """Return (ext_modules, cmdclass) for bridge._C, or ([], {}) with a stated reason."""
    force = os.environ.get("BRIDGE_BUILD_CUDA")
    if force == "0":
        _say("BRIDGE_BUILD_CUDA=0: skipping the CUDA extension, installing pure Python")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)) + sorted(
        glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
    )
    reason = None
    cuda_home = _find_cuda_home()
    if not sources:
        reason = "csrc/ holds no sources yet"
    elif cuda_home is None:
        reason = "nvcc not found (set CUDA_HOME to the CUDA toolkit folder)"
    else:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
        try:
            import torch
        except ImportError:
            torch = None
            reason = "torch is not installed in the build environment (use --no-build-isolation)"
        if torch is not None and torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
    if reason is not None:
        if force == "1":
            raise RuntimeError(f"BRIDGE_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"not building bridge._C: {reason}; installing pure Python")
        return [], {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    _say(f"building bridge._C with CUDA_HOME={cuda_home} for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension(
        name="bridge._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc"), *_extra_include_dirs()],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-Xptxas", "-v", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
