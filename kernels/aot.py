"""Ahead-of-time compile every Triton kernel config for sm_80 and sm_90 on a machine without a GPU.

Each (kernel, variant, config, arch) is specialised by Triton's own launch path: the JIT's binder
(``create_function_from_signature``) and ``JITFunction._pack_args`` turn example arguments into
the signature, constexprs and ``tt.divisibility`` attributes a launch with them would compile, so
the AOT build is the build that runs: 16-byte aligned pointers, every integer (size, stride) that
is a multiple of 16 tagged so, an integer equal to 1 made a constexpr, floats unspecialised. The
PTX is assembled by the ptxas shipped inside the triton package (``ptxas -v``). ``@triton.jit``
under ``TRITON_INTERPRET=1`` yields an interpreted function that cannot be compiled, so run this
in a process without that variable:

    python -m bridge.kernels.aot [--arch 80 --arch 90] [--jobs 2]   # prints a JSON report

Specs come from every module of ``bridge.kernels`` that defines ``aot_specs()`` (a list of dicts):
    kernel      the ``@triton.jit`` function (an autotuner/heuristics wrapper is unwrapped)
    variant     a short label ("pre-dropout", ...)
    configs     None (one compile; tiles in ``fixed``, warps/stages in ``options``), a list of
                ``triton.Config``, or a name passed to ``configs_fn(f"sm{arch}", name)``
    sig         argument -> example: a Triton type ("*bf16", "fp32", "i32", "i64") or an int. A
                pointer type is a 16-byte aligned tensor, "i32" a size/stride that is a multiple
                of 16 (what a typical launch passes: M = 8192, K = 4096, r = 16, contiguous
                strides), "fp32" a Python float, "tensordesc<bf16[64, 64]>" a host
                TensorDescriptor of that block; an int is passed as is (1: a unit stride, which
                Triton makes a constexpr; 24: not a multiple of 16, so not tagged)
    fixed       constexprs of the variant; options: {"num_warps", "num_stages"} when configs is None
    uses_dot    the kernel is built on tl.dot (tensor cores expected)
    gemm        (optional) a GEMM-shaped kernel: its main loop must be pipelined. Default: the
                kernel is defined in kernels/_gemm.py
    archs       (optional) the compute capabilities to build for (default: all of ARCHS)
Every ``@triton.jit`` function named ``*_kernel`` in those modules must appear in some spec
(tests/test_triton_aot.py checks it).

Each JSON row: kernel, variant, arch, config, ok, registers, spill_stores/loads, shared_bytes,
tensor_cores; for kernels with a tensor-core loop, the main loop (the loop with the most
tensor-core instructions) as ``async_copy`` ("tma" | "cp.async" | "none"),
``scalar_loads_in_main_loop`` (global loads that are not 8/16-byte vectors) and, on sm_90,
``wgmma_max_pending`` (the largest N of ``wgmma.wait_group N`` in it: 0 means a drained
pipeline); ``layout_conversions`` (ttg.convert_layout ops in the TTGIR); and for kernels that
draw Philox numbers ``philox_calls_per_element`` (Philox-4x32-10 calls per masked element,
counted in the TTIR: calls over uniforms drawn, see ``_philox_calls``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from bridge.kernels._triton_common import HAS_TRITON, tl, triton

ARCHS = (80, 90)
TENSOR_CORE_OPS = {80: "mma.sync", 90: "wgmma.mma_async"}
# Example values of the non-pointer types (what the JIT's binder is handed)
_EXAMPLE_SCALARS = {"i32": 4096, "i64": 2**32 + 4096, "fp32": 0.5, "u1": True}
_PHILOX_ROUND_B = (-845247145, 3449720151)  # 0xCD9E8D57 as signed / unsigned i32
_UNIFORM_SCALE = 4.6566127342e-10  # uint_to_uniform_float's scale of a 32-bit word


def _jit_fn(kernel):
    """The JITFunction under autotuner/heuristics wrappers."""
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


@functools.cache
def _specs() -> list[dict]:
    """Every spec of every kernel module (see the module docstring), normalised."""
    import bridge.kernels as package

    specs = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name == "aot":
            continue
        try:
            module = importlib.import_module(f"bridge.kernels.{info.name}")
        except Exception as exc:  # a broken module is a failed row, not a crashed sweep
            specs.append({"kernel": None, "module": info.name, "variant": "import",
                          "error": f"{type(exc).__name__}: {exc}"})
            continue
        if callable(getattr(module, "aot_specs", None)):
            specs.extend({"module": info.name, **s} for s in module.aot_specs())
    for s in specs:
        if s["kernel"] is None:
            continue
        fn = _jit_fn(s["kernel"])
        s["kernel"] = fn
        s.setdefault("configs", None)
        s.setdefault("uses_dot", False)
        s.setdefault("gemm", fn.fn.__module__ == "bridge.kernels._gemm")
    return specs


def _configs(spec: dict, arch: int) -> list[tuple[dict, dict]]:
    """(constexprs of the config, compile options) for each config of ``spec`` on ``arch``."""
    configs = spec["configs"]
    if configs is None:
        return [({}, {"num_warps": 4, "num_stages": 3, **spec.get("options", {})})]
    if isinstance(configs, str):
        configs = spec["configs_fn"](f"sm{arch}", configs)
    return [(dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages})
            for c in configs]


def _jobs(archs: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(spec index, config index, arch) for every config of every kernel."""
    jobs = []
    for i, s in enumerate(_specs()):
        for arch in archs:
            if arch not in s.get("archs", ARCHS):
                continue
            n = 1 if s["kernel"] is None else len(_configs(s, arch))
            jobs.extend((i, j, arch) for j in range(n))
    return jobs


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _example_args(fn, spec: dict, constexprs: dict) -> dict:
    """Argument name -> the value a launch would pass (meta tensors stand in for pointers: their
    address 0 is 16-byte aligned, like a fresh torch allocation)."""
    import torch
    from triton.runtime.jit import type_canonicalisation_dict

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "fp64": torch.float64, "i8": torch.int8, "i16": torch.int16, "i32": torch.int32,
              "i64": torch.int64, "u8": torch.uint8, "u1": torch.bool}
    args = {}
    for name, param in zip(fn.arg_names, fn.params, strict=True):
        if name in constexprs:
            args[name] = constexprs[name]
            continue
        if name not in spec["sig"] and param.has_default:
            continue  # the binder applies the default, as at a launch that omits it
        value = spec["sig"][name]
        desc = re.fullmatch(r"tensordesc<(\w+)\[([\d, ]+)\]>", value) if isinstance(value, str) else None
        if desc:  # a host TensorDescriptor of that block over a large tensor
            from triton.tools.tensor_descriptor import TensorDescriptor

            block = [int(d) for d in desc.group(2).split(",")]
            ty = type_canonicalisation_dict.get(desc.group(1), desc.group(1))
            base = torch.empty([4096] * len(block), dtype=dtypes[ty], device="meta")
            args[name] = TensorDescriptor(base, list(base.shape), list(base.stride()), block)
        elif isinstance(value, str) and value.startswith("*"):
            ty = type_canonicalisation_dict.get(value[1:], value[1:])
            args[name] = torch.empty(0, dtype=dtypes[ty], device="meta")
        elif isinstance(value, str):
            args[name] = _EXAMPLE_SCALARS[value]
        else:
            args[name] = value
    return args


def _specialise(fn, target, args: dict, options: dict):
    """(signature, constexprs, attrs, options) exactly as ``fn[grid](**args, **options)`` would
    compile them: Triton's binder and _pack_args (3.6 and 3.8 share these)."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kwargs = {**options, "debug": knobs.runtime.debug}
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(**args, **kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                       opts)
    return signature, constexprs, attrs, opts


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first line, last line) of every loop of a PTX function: a label and a later branch to it."""
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"\s*(\$L\w+):", line)
        if m:
            labels[m.group(1)] = i
    spans = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L\w+)\s*;", line)
        if m and labels.get(m.group(1), i) < i:
            spans.append((labels[m.group(1)], i))
    return spans


def _main_loop_stats(ptx: str, arch: int) -> dict:
    """Pipelining of the main loop (empty if there is none): of the innermost loops holding
    tensor-core instructions (a persistent kernel's tile loop holds its K loop), the one with
    the most of them."""
    lines = ptx.splitlines()
    op = TENSOR_CORE_OPS[arch]
    tc = {span: sum(op in line for line in lines[span[0]:span[1] + 1]) for span in _loops(lines)}
    tc = {span: n for span, n in tc.items() if n}
    inner = [(a, b) for a, b in tc if not any(a <= c and d <= b and (c, d) != (a, b)
                                              for c, d in tc)]
    if not inner:
        return {}
    best = max(inner, key=lambda span: (tc[span], span[0] - span[1]))
    best_n = tc[best]
    body = lines[best[0]:best[1] + 1]
    text = "\n".join(body)
    async_copy = ("tma" if "cp.async.bulk.tensor" in text
                  else "cp.async" if re.search(r"\bcp\.async\.c[ag]\b", text) else "none")
    scalar = sum(1 for line in body if re.search(r"\bld\.global\b", line)
                 and not re.search(r"\.v[248]\.", line))
    stats = {"async_copy": async_copy, "scalar_loads_in_main_loop": scalar,
             "main_loop_mma": best_n}
    if arch >= 90:
        pending = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", text)]
        stats["wgmma_max_pending"] = max(pending) if pending else None
    return stats


def _numel(shape: str) -> int:
    return functools.reduce(lambda a, b: a * b, map(int, shape.split("x")))


def _consts(ttir: str, match) -> set[str]:
    """SSA names of the constants (scalar, dense or splat) whose value satisfies ``match``."""
    names = set()
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.]+) = (?:arith\.constant (?:dense<)?([-\d.eE+]+)|"
                     r"tt\.splat (%[\w.]+))", line)
        if m and ((m.group(2) and match(float(m.group(2)))) or m.group(3) in names):
            names.add(m.group(1))
    return names


def _tensor_ops(ttir: str, op: str, consts: set[str]) -> dict[int, int]:
    """Tensor size -> number of ``op`` ops on tensors of that size with an operand in ``consts``
    (scalar, thread-uniform ops are left out)."""
    ops: dict[int, int] = {}
    for line in ttir.splitlines():
        m = re.search(rf"{op} (%[\w.]+), (%[\w.]+) : tensor<([\dx]+)x", line)
        if m and (m.group(1) in consts or m.group(2) in consts):
            ops[_numel(m.group(3))] = ops.get(_numel(m.group(3)), 0) + 1
    return ops


def _philox_bmul_ops(ttir: str) -> dict[int, int]:
    """Tensor size -> ``tt.mulhiui`` ops by Philox's round constant B (0xCD9E8D57) on tensors of
    that size: one op per round of each call site, on a tensor of one element per call (round 1
    multiplies a zero counter word: a scalar op, left out)."""
    return _tensor_ops(ttir, r"tt\.mulhiui", _consts(ttir, lambda v: v in _PHILOX_ROUND_B))


def _uniforms_drawn(ttir: str) -> int:
    """Uniforms made from Philox words per pass (``uint_to_uniform_float``'s product by
    4.6566127342e-10): one per masked element."""
    scale = _consts(ttir, lambda v: abs(v - _UNIFORM_SCALE) < 1e-16)
    return sum(n * k for n, k in _tensor_ops(ttir, r"arith\.mulf", scale).items())


if HAS_TRITON:  # the calibration kernel is defined at module level: @triton.jit reads source

    @triton.jit
    def _philox_probe_kernel(seed_ptr, out_ptr, BLOCK: tl.constexpr):
        """out[i] = xor of the four words of one Philox call per i (counter (i, 0, 0, 0))."""
        i = tl.arange(0, BLOCK)
        c0, c1, c2, c3 = tl.randint4x(tl.load(seed_ptr), i)
        tl.store(out_ptr + i, c0 ^ c1 ^ c2 ^ c3)


@functools.cache
def _bmul_ops_per_call(arch: int) -> int:
    """Round-B ops of one Philox call with all four words used, in this triton's TTIR (9: rounds
    2-10), measured on a kernel of known calls. A call that uses only its first word (tl.rand)
    keeps one op fewer."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=_philox_probe_kernel, signature={"seed_ptr": "*i64", "out_ptr": "*i32",
                                                        "BLOCK": "constexpr"},
                    constexprs={"BLOCK": 128})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    (n_ops,) = _philox_bmul_ops(compiled.asm["ttir"]).values()
    return n_ops


def _philox_calls(ttir: str, arch: int) -> float | None:
    """Philox calls per masked element, or None when the kernel draws no Philox numbers. Both
    are counted per pass over the TTIR (which holds a loop body once): call sites per tensor
    size are its round-B ops over the ops of one call, rounded up (exact up to 8 sites per
    size, as a call that uses only its first word keeps one op fewer); masked elements are the
    uniforms drawn."""
    ops = _philox_bmul_ops(ttir)
    uniforms = _uniforms_drawn(ttir)
    if not ops or not uniforms:
        return None
    per_call = _bmul_ops_per_call(arch)
    calls = sum(numel * -(-n // per_call) for numel, n in ops.items())
    return round(calls / uniforms, 4)


def _compile_one(job: tuple[int, int, int]) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    i, j, arch = job
    s = _specs()[i]
    if s["kernel"] is None:
        return {"kernel": f"bridge.kernels.{s['module']}", "variant": s["variant"],
                "arch": f"sm_{arch}", "config": {}, "uses_dot": False, "gemm": False,
                "ok": False, "error": s["error"]}
    meta, options = _configs(s, arch)[j]
    fn = s["kernel"]
    fixed = {**s["fixed"], **meta}
    row = {"kernel": fn.__name__, "module": s["module"], "variant": s["variant"],
           "arch": f"sm_{arch}", "config": {**meta, **options}, "uses_dot": s["uses_dot"],
           "gemm": s["gemm"]}
    t0 = time.perf_counter()
    target = GPUTarget("cuda", arch, 32)
    try:
        signature, constexprs, attrs, opts = _specialise(fn, target, _example_args(fn, s, fixed),
                                                         options)
        row["divisible_16"] = sorted(fn.arg_names[k[0]] for k, v in attrs.items() if v)
        row["unit_constexprs"] = sorted(fn.arg_names[k[0]] for k, v in constexprs.items()
                                        if fn.arg_names[k[0]] not in fixed and v == 1)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=opts.__dict__)
        ptx = compiled.asm["ptx"]
    except Exception as exc:  # report, do not abort the sweep
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000],
                   seconds=round(time.perf_counter() - t0, 2))
        return row
    ptx_target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = os.path.join(tmp, "k.ptx")
        with open(ptx_file, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas_path(), "-v", f"--gpu-name={ptx_target}", ptx_file, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr

    def grab(pattern: str) -> int | None:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    row.update(
        ok=proc.returncode == 0,
        ptxas_target=ptx_target,
        registers=grab(r"Used (\d+) registers"),
        spill_stores=grab(r"(\d+) bytes spill stores"),
        spill_loads=grab(r"(\d+) bytes spill loads"),
        shared_bytes=compiled.metadata.shared,
        tensor_cores=TENSOR_CORE_OPS[arch] in ptx,
        layout_conversions=compiled.asm["ttgir"].count("ttg.convert_layout"),
        **_main_loop_stats(ptx, arch),
    )
    calls = _philox_calls(compiled.asm["ttir"], arch)
    if calls is not None:
        row["philox_calls_per_element"] = calls
    row["seconds"] = round(time.perf_counter() - t0, 2)
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
