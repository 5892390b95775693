"""Every config of every Triton kernel compiles ahead of time for sm_80 and sm_90, on the CPU.

One subprocess (``python -m bridge.kernels.aot``, without TRITON_INTERPRET: interpreted
``@triton.jit`` functions cannot be compiled) builds PTX for each (kernel, variant, config, arch),
runs the ptxas shipped with triton with ``-v`` and prints a JSON report; the tests read it. It
takes about 2-3 minutes on 2 cores.
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

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(aot.ptxas_path(), os.X_OK),
                       reason=f"no ptxas in the triton package ({aot.ptxas_path()})"),
]


@pytest.fixture(scope="module")
def report() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bridge.kernels.aot", "--jobs", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.stdout.strip(), f"no report; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def _show(rows: list[dict]) -> str:
    return "\n".join(f"{r['arch']} {r['kernel']} [{r['variant']}] {r['config']}: "
                     f"{r.get('error') or r}" for r in rows)


def test_every_config_of_every_kernel_is_in_the_report(report):
    expected = 0
    for spec in aot._specs():
        for arch in aot.ARCHS:
            expected += len(spec["configs_fn"](f"sm{arch}", spec["configs"])) if spec["configs"] else 1
    assert len(report) == expected
    kernels = {r["kernel"] for r in report}
    assert {"_lora_linear_shrink_kernel", "_lora_linear_fwd_kernel",
            "_lora_linear_bwd_dsdb_kernel", "_lora_linear_bwd_dx_kernel",
            "_lora_linear_bwd_da_kernel", "_dropout_keep_mask_kernel", "_norm_lora_fwd_kernel",
            "_norm_bwd_dx_kernel", "_norm_lora_bwd_col_kernel"} <= kernels
    assert {r["arch"] for r in report} == {"sm_80", "sm_90"}


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
