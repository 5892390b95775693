"""Ahead-of-time compile every Triton kernel config for sm_80 and sm_90 on a machine without a GPU.

For each (kernel, variant, config, arch) this compiles to PTX with ``triton.compile``, assembles
the PTX with the ptxas shipped inside the triton package (``ptxas -v``), and records registers,
spill stores/loads and whether the PTX uses tensor cores (``mma.sync`` on sm_80, ``wgmma`` on
sm_90). ``@triton.jit`` under ``TRITON_INTERPRET=1`` yields an interpreted function that cannot
be compiled, so run this in a process without that variable:

    python -m bridge.kernels.aot [--arch 80 --arch 90] [--jobs 2]   # prints a JSON report

The specialisations mirror a typical launch: bf16 tensors, 16-byte aligned pointers and leading
strides, unit inner strides (Triton specialises a stride of 1 to a constant), the largest rank
tiles (64 where the rank is an output dimension, the 32-wide rank step in the GEMMs: the most
registers), dropout on (the variant with the most work).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 90)
TENSOR_CORE_OPS = {80: "mma.sync", 90: "wgmma"}


def _specs() -> list[dict]:
    """(kernel, variant, config list name, signature, fixed constexprs, whether it uses tl.dot)."""
    from bridge.kernels import _gemm, _lowrank, philox

    dt = "*bf16"
    f32, i32, i64p, f32p = "fp32", "i32", "*i64", "*fp32"
    common = {"INTERPRET": False, "PRECISION": "ieee", "BLOCK_R": 64}

    def spec(kernel, variant, configs, sig, fixed, uses_dot=True):
        module = _gemm if configs in ("fwd", "fwd_two_acc", "dx", "dx_two_acc") else _lowrank
        return {"kernel": kernel, "variant": variant, "configs": configs, "sig": sig,
                "fixed": fixed, "uses_dot": uses_dot,
                "configs_fn": module.configs if configs else None}

    shrink_sig = {"x_ptr": dt, "a_ptr": dt, "s_ptr": f32p, "seed_ptr": i64p, "M": i32, "K": i32,
                  "R": i32, "stride_xm": i32, "stride_xk": 1, "stride_ar": i32, "stride_ak": 1,
                  "p": f32, "keep_scale": f32}
    fwd_sig = {"x_ptr": dt, "w_ptr": dt, "bias_ptr": dt, "s_ptr": f32p, "b_ptr": dt, "y_ptr": dt,
               "seed_ptr": i64p, "M": i32, "N": i32, "K": i32, "R": i32, "stride_xm": i32,
               "stride_xk": 1, "stride_wn": i32, "stride_wk": 1, "stride_bn": i32,
               "stride_br": 1, "scale": f32, "p": f32, "keep_scale": f32}
    dsdb_sig = {"dy_ptr": dt, "b_ptr": dt, "s_ptr": f32p, "ds_ptr": f32p, "dbp_ptr": f32p,
                "seed_ptr": i64p, "M": i32, "N": i32, "R": i32, "stride_dym": i32,
                "stride_dyn": 1, "stride_bn": i32, "stride_br": 1, "scale": f32, "p": f32,
                "keep_scale": f32}
    dx_sig = {"dy_ptr": dt, "w_ptr": dt, "ds_ptr": f32p, "a_ptr": dt, "dx_ptr": dt,
              "seed_ptr": i64p, "M": i32, "N": i32, "K": i32, "R": i32, "stride_dym": i32,
              "stride_dyn": 1, "stride_wn": i32, "stride_wk": 1, "stride_ar": i32,
              "stride_ak": 1, "p": f32, "keep_scale": f32}
    da_sig = {"ds_ptr": f32p, "x_ptr": dt, "da_ptr": dt, "seed_ptr": i64p, "M": i32, "K": i32,
              "R": i32, "stride_xm": i32, "stride_xk": 1, "p": f32, "keep_scale": f32}
    mask_sig = {"seed_ptr": i64p, "mask_ptr": "*i8", "rows": i32, "n_cols": i32, "p": f32}
    dsdb_fixed = {**common, "BLOCK_M": _lowrank.DSDB_BLOCK_M["sm80"]}
    gemm = {**common, "BLOCK_R": _gemm.GEMM_RANK_STEP}
    return [
        spec(_lowrank._lora_linear_shrink_kernel, "pre-dropout", "shrink", shrink_sig,
             {**common, "HAS_DROPOUT": True}),
        spec(_gemm._lora_linear_fwd_kernel, "bias", "fwd", fwd_sig,
             {**gemm, "HAS_BIAS": True, "POST_DROPOUT": False}),
        spec(_gemm._lora_linear_fwd_kernel, "bias+post-dropout", "fwd_two_acc", fwd_sig,
             {**gemm, "HAS_BIAS": True, "POST_DROPOUT": True}),
        spec(_lowrank._lora_linear_bwd_dsdb_kernel, "post-dropout", "dsdb", dsdb_sig,
             {**dsdb_fixed, "POST_DROPOUT": True, "WRITE_DB": True}),
        spec(_lowrank._lora_linear_bwd_dsdb_kernel, "no-mask, dB as its own GEMM", "dsdb", dsdb_sig,
             {**dsdb_fixed, "POST_DROPOUT": False, "WRITE_DB": False}),
        spec(_gemm._lora_linear_bwd_dx_kernel, "no-mask", "dx", dx_sig,
             {**gemm, "PRE_DROPOUT": False}),
        spec(_gemm._lora_linear_bwd_dx_kernel, "pre-dropout", "dx_two_acc", dx_sig,
             {**gemm, "PRE_DROPOUT": True}),
        spec(_lowrank._lora_linear_bwd_da_kernel, "pre-dropout", "da", da_sig,
             {**common, "PRE_DROPOUT": True}),
        spec(philox._dropout_keep_mask_kernel, "", None, mask_sig,
             {"BLOCK_R": 16, "BLOCK_C": 128}, uses_dot=False),
    ] + importlib.import_module("bridge.kernels.norm_lora").aot_specs()


def _jobs(archs: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(spec index, config index, arch) for every config of every kernel."""
    jobs = []
    for i, s in enumerate(_specs()):
        for arch in archs:
            n = len(s["configs_fn"](f"sm{arch}", s["configs"])) if s["configs"] else 1
            jobs.extend((i, j, arch) for j in range(n))
    return jobs


def ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _compile_one(job: tuple[int, int, int]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    i, j, arch = job
    s = _specs()[i]
    if s["configs"]:
        cfg = s["configs_fn"](f"sm{arch}", s["configs"])[j]
        meta, options = dict(cfg.kwargs), {"num_warps": cfg.num_warps,
                                          "num_stages": cfg.num_stages}
    else:
        meta, options = {}, {"num_warps": 4, "num_stages": 3}
    fn = s["kernel"]
    constexprs = {**s["fixed"], **meta}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(s["sig"][name], int):  # a unit stride: Triton specialises it to 1
            signature[name] = "constexpr"
            constexprs[name] = s["sig"][name]
        else:
            signature[name] = s["sig"][name]
    # 16-byte aligned pointers and leading strides divisible by 16, as at a typical launch
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n.startswith("stride_")}
    row = {"kernel": fn.__name__, "variant": s["variant"], "arch": f"sm_{arch}",
           "config": {**meta, **options}, "uses_dot": s["uses_dot"]}
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
    except Exception as exc:  # report, do not abort the sweep
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000],
                   seconds=round(time.perf_counter() - t0, 2))
        return row
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = os.path.join(tmp, "k.ptx")
        with open(ptx_file, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas_path(), "-v", f"--gpu-name={target}", ptx_file, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr

    def grab(pattern: str) -> int | None:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    row.update(
        ok=proc.returncode == 0,
        ptxas_target=target,
        registers=grab(r"Used (\d+) registers"),
        spill_stores=grab(r"(\d+) bytes spill stores"),
        spill_loads=grab(r"(\d+) bytes spill loads"),
        shared_bytes=compiled.metadata.shared,
        tensor_cores=TENSOR_CORE_OPS[arch] in ptx,
        seconds=round(time.perf_counter() - t0, 2),
    )
    if proc.returncode != 0:
        row["error"] = log[-2000:]
    return row


def run(archs: tuple[int, ...] = ARCHS, jobs: int = 1) -> list[dict]:
    """Compile every config of every kernel for ``archs``; one report row per compile."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted @triton.jit functions cannot "
                           "be compiled ahead of time")
    work = _jobs(archs)
    if jobs <= 1:
        return [_compile_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compute capability (repeatable; default: 80 and 90)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    args = parser.parse_args(argv)
    rows = run(tuple(args.arch or ARCHS), args.jobs)
    json.dump(rows, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
