"""Every config of every Triton kernel compiles ahead of time for sm_80 and sm_90, on the CPU, as
a launch would build it, and the build is one worth running.

One subprocess (``python -m bridge.kernels.aot``, without TRITON_INTERPRET: interpreted
``@triton.jit`` functions cannot be compiled) builds PTX for each (kernel, variant, config, arch)
through Triton's own launch specialisation, runs the ptxas shipped with triton with ``-v`` and
prints a JSON report; the tests read it. About 5 minutes on 2 idle cores (~550 compile-seconds
for ~175 rows); Triton's cache (~/.triton/cache) makes a rerun of unchanged kernels faster.

The GPU image runs triton 3.6; this venv has 3.8. To check 3.6 on the CPU, make a scratch venv
outside the repo that sees this venv's packages but its own triton and numpy:

    python3.11 -m venv /tmp/venv36
    SP=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
    echo "import site; site.addsitedir('$SP')" > /tmp/venv36/lib/python3.11/site-packages/zz.pth
    /tmp/venv36/bin/pip install triton==3.6.0 "numpy<2.4"
    BRIDGE_AOT_PYTHON=/tmp/venv36/bin/python .venv/bin/python -m pytest -q tests/test_triton_aot.py

(``BRIDGE_AOT_PYTHON`` names the interpreter that runs the AOT sweep. The .pth file adds this
venv's site-packages, with its own .pth files such as the editable install of this package,
after the scratch venv's own: its triton 3.6 and numpy win, torch and the rest are shared.)
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
aot = importlib.import_module("bridge.kernels.aot")
AOT_PYTHON = os.environ.get("BRIDGE_AOT_PYTHON", sys.executable)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(aot.ptxas_path(), os.X_OK),
                       reason=f"no ptxas in the triton package ({aot.ptxas_path()})"),
]


def _no_interpret_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def report() -> list[dict]:
    proc = subprocess.run([AOT_PYTHON, "-m", "bridge.kernels.aot", "--jobs", "2"],
                          capture_output=True, text=True, env=_no_interpret_env(), timeout=900)
    assert proc.stdout.strip(), f"no report; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def _show(rows: list[dict]) -> str:
    return "\n".join(f"{r['arch']} {r['kernel']} [{r['variant']}] {r['config']}: "
                     f"{r.get('error') or r}" for r in rows)


def test_every_config_of_every_kernel_is_in_the_report(report):
    assert len(report) == len(aot._jobs(aot.ARCHS))
    names = {s["kernel"].__name__ for s in aot._specs() if s["kernel"] is not None}
    assert names <= {r["kernel"] for r in report}
    # the kernels of every fused op are swept (whatever the GEMM kernels are called)
    assert {"_norm_lora_fwd_kernel", "_norm_bwd_dx_kernel", "_norm_lora_bwd_col_kernel",
            "_dropout_keep_mask_kernel"} <= names
    assert {r["module"] for r in report} >= {"_gemm", "_lowrank", "norm_lora", "philox"}
    assert {r["arch"] for r in report} == {"sm_80", "sm_90"}


def test_every_kernel_of_every_module_has_a_spec():
    """No launched kernel escapes the sweep: each ``*_kernel`` JIT function of bridge.kernels is
    the kernel of some spec (helpers called from kernels are named otherwise)."""
    import pkgutil

    import bridge.kernels as package
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    swept = {id(s["kernel"]) for s in aot._specs() if s["kernel"] is not None}
    kernels, missing = 0, []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "aot":
            continue
        module = importlib.import_module(f"bridge.kernels.{info.name}")
        for name, obj in vars(module).items():
            # this process runs the interpreter: @triton.jit gives InterpretedFunction here
            if (isinstance(obj, (JITFunction, InterpretedFunction)) and name.endswith("_kernel")
                    and obj.fn.__module__ == module.__name__):
                kernels += 1
                if id(obj) not in swept:
                    missing.append(f"{info.name}.{name}")
    assert not missing, f"kernels without an aot_specs() entry: {missing}"
    assert kernels >= 10
    assert not [s for s in aot._specs() if s["kernel"] is None], "a kernel module fails to import"


def test_everything_compiles(report):
    failed = [r for r in report if not r["ok"]]
    assert not failed, _show(failed)


def test_no_register_spills(report):
    spilled = [r for r in report if r.get("spill_stores") != 0 or r.get("spill_loads") != 0]
    assert not spilled, _show(spilled)
    assert all(0 < r["registers"] <= 255 for r in report)


def test_dots_use_tensor_cores(report):
    # mma.sync on sm_80, wgmma on sm_90 (for the kernels built on tl.dot)
    missing = [r for r in report if r["uses_dot"] and not r.get("tensor_cores")]
    assert not missing, _show(missing)
    assert any(r["uses_dot"] for r in report)


def test_gemm_main_loops_are_pipelined(report):
    """Forward and dX GEMMs (every kernel of kernels/_gemm.py, and any spec marked ``gemm``):
    the main loop streams its tiles asynchronously (cp.async or TMA), issues no scalar global
    loads, and on sm_90 keeps at least one wgmma group in flight."""
    gemm = [r for r in report if r["gemm"]]
    assert {r["arch"] for r in gemm} == {"sm_80", "sm_90"}, "no GEMM kernel in the sweep"
    bad = [r for r in gemm if r.get("async_copy") in (None, "none")
           or r.get("scalar_loads_in_main_loop") != 0
           or (r["arch"] == "sm_90" and not (r.get("wgmma_max_pending") or 0) >= 1)]
    assert not bad, _show(bad)
    assert all(r["uses_dot"] and r["tensor_cores"] for r in gemm), _show(gemm)


def test_launch_specialisation_of_the_sweep(report):
    """Sizes and leading strides given as "i32" are tagged divisible by 16, unit strides become
    constexprs (and only they), and no constexpr carries a divisibility tag."""
    specs = {(s["module"], s["kernel"].__name__, s["variant"]): s for s in aot._specs()
             if s["kernel"] is not None}
    for r in report:
        sig = specs[r["module"], r["kernel"], r["variant"]]["sig"]
        sizes = {n for n, t in sig.items() if t in ("i32", "i64") or str(t).startswith("*")
                 or (type(t) is int and t != 1 and t % 16 == 0)}
        units = {n for n, t in sig.items() if type(t) is int and t == 1}
        assert set(r["divisible_16"]) == sizes, r["kernel"]
        assert set(r["unit_constexprs"]) == units, r["kernel"]


def test_dropout_draws_one_philox_call_per_four_elements(report):
    rows = [r for r in report if "philox_calls_per_element" in r]
    # every dropout variant of the sweep draws Philox numbers (and only they)
    assert {r["kernel"] for r in rows} >= {"_dropout_keep_mask_kernel",
                                           "_norm_lora_fwd_kernel", "_norm_lora_bwd_col_kernel"}
    heavy = [r for r in rows if r["philox_calls_per_element"] > 0.25]
    assert not heavy, _show(heavy)
    assert all(r["philox_calls_per_element"] > 0 for r in rows)


_PROBE = '''
import triton, triton.language as tl

@triton.jit
def probe(x_ptr, y_ptr, n, stride_xk, m, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i * stride_xk, mask=i < n) + m)
'''


def test_specialisation_tags_the_argument_it_describes(tmp_path):
    """A unit stride becomes a constexpr and the divisibility tags land on the arguments they
    describe (not on the argument after a constexpr): n = 17 untagged, m = 32 tagged."""
    (tmp_path / "aot_probe.py").write_text(_PROBE)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import aot_probe, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from bridge.kernels import aot\n"
        "fn = aot_probe.probe\n"
        "spec = {'sig': {'x_ptr': '*bf16', 'y_ptr': '*bf16', 'n': 17, 'stride_xk': 1, 'm': 32}}\n"
        "t = GPUTarget('cuda', 90, 32)\n"
        "sig, cx, attrs, opts = aot._specialise(fn, t, aot._example_args(fn, spec, "
        "{'BLOCK': 64}), {'num_warps': 4, 'num_stages': 3})\n"
        "c = triton.compile(ASTSource(fn, sig, cx, attrs), target=t, options=opts.__dict__)\n"
        "head = [ln for ln in c.asm['ttir'].splitlines() if 'tt.func' in ln][0]\n"
        "print(sig); print(head)\n"
    )
    proc = subprocess.run([AOT_PYTHON, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, env=_no_interpret_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sig_line, head = proc.stdout.strip().splitlines()[-2:]
    assert "'stride_xk': 'constexpr'" in sig_line and "'n': 'i32'" in sig_line
    # "%name: type {attrs} loc(...)" per argument that is not a constexpr
    args = dict(a.split(":", 1) for a in head[head.index("(") + 1:].split("%")[1:])
    assert set(args) == {"x_ptr", "y_ptr", "n", "m"}, head
    tagged = {name for name, text in args.items() if "tt.divisibility = 16" in text}
    assert tagged == {"x_ptr", "y_ptr", "m"}, head
