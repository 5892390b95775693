"""The benchmark harness itself (benchmarks/): roofline arithmetic, the shared timer's statistics,
the CSV schema of a real measurement (with its GEMM strategy column), the saved-bytes counter,
the correctness gate, the summary's ratios (auto against frozen, eager and both strategies), and
the host-time rows (CPU, fast)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from bridge.kernels._timing import Budget, bench_host, summarize

from benchmarks import roofline
from benchmarks.cases import HEADLINE, Case, grid_params, make_grid, param_id
from benchmarks.measure import check, count_saved_bytes, measure
from benchmarks.providers import PROVIDERS, Provider, Runner, make_tensors, provider
from benchmarks.results import (
    COLUMN_NAMES,
    COLUMNS,
    Figure,
    auto_table,
    cpu_figures,
    geomean,
    gpu_figures,
    host_figure,
    host_table,
    ratios,
    read_csv,
    saved_ratio,
    write_csv,
)
from tests.conftest import requires_kernel_device

TINY = Case("lora_linear", 16, 24, 20, 4, 0.0, torch.float32, "cpu")


# ---- roofline ----------------------------------------------------------------------------------
def test_roofline_by_hand():
    # M=2, K=3, N=4, r=1, bf16 (e=2), with bias. Hand counts:
    #   forward FLOPs 2MNK + 2Mr(K+N) = 48 + 28; bytes e(x 6 + W 12 + y 8 + b 4 + A 3 + B 4) + S 4*2
    #   backward FLOPs 2MNK + 4Mr(K+N) = 48 + 56;
    #            bytes e(dY 8 + W 12 + dX 6) + e(A, B read + dA, dB written 14 + x 6) + S 8
    fwd = roofline.work("lora_linear", "forward", 2, 3, 4, 1, 2)
    bwd = roofline.work("lora_linear", "backward", 2, 3, 4, 1, 2)
    assert (fwd.flops, fwd.bytes) == (76, 82)
    assert (bwd.flops, bwd.bytes) == (104, 100)
    both = roofline.work("lora_linear", "fwd+bwd", 2, 3, 4, 1, 2)
    assert (both.flops, both.bytes) == (180, 182)
    frozen = roofline.work("lora_linear", "fwd+bwd", 2, 3, 4, 1, 2, lora=False)
    assert (frozen.flops, frozen.bytes) == (48 + 48, 60 + 52)
    # RMSNorm in front: + 4MK FLOPs, + e K (weight) + 4 M (rstd) bytes, forward
    norm = roofline.work("norm_lora", "forward", 2, 3, 4, 1, 2, norm="RMSNorm")
    assert (norm.flops, norm.bytes) == (76 + 24, 82 + 6 + 8)
    # the floor is the slower of compute and traffic
    assert roofline.floor_seconds(fwd, roofline.Rates(76.0, 1.0)) == 82.0
    assert roofline.floor_seconds(fwd, roofline.Rates(1.0, 1e9)) == 76.0
    with pytest.raises(ValueError, match="mode"):
        roofline.work("lora_linear", "sideways", 2, 3, 4, 1, 2)


# ---- saved bytes -------------------------------------------------------------------------------
def test_saved_bytes_counts_each_storage_once_and_sets_weights_apart():
    x = torch.randn(4, 8, requires_grad=True)  # 128 bytes
    w = torch.randn(3, 8, requires_grad=True)  # 96 bytes, a weight

    def forward():
        e = x.exp()  # saves its output e: 128
        z = e * x  # saves e (seen) and x: 128
        s = torch.sin(x[:, :4])  # saves a view of x: same storage, not counted again
        return F.linear(z, w).sum() + s.sum()  # saves z (128) and w (the weight, 96)

    counter, _ = count_saved_bytes(forward, [w])
    assert counter.without_params == 3 * 128
    assert counter.with_params == 3 * 128 + 96


# ---- one measurement and the CSV schema --------------------------------------------------------
# ---- the shared timer (kernels/_timing.py) ------------------------------------------------------
def test_timer_quantiles_by_hand():
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0])  # sorted 1..5: median 3, p20 1.8, p80 4.2
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.reps) == (3.0, pytest.approx(1.8),
                                                        pytest.approx(4.2), 5)
    with pytest.raises(ValueError, match="no times"):
        summarize([])


def test_host_timer_runs_setup_outside_the_clock_and_honours_the_rep_bounds():
    calls = {"setup": 0, "fn": 0}

    def setup():
        calls["setup"] += 1
        return (calls["setup"],)

    t = bench_host(lambda i: calls.__setitem__("fn", calls["fn"] + 1), setup=setup,
                   budget=Budget(warmup_ms=0.0, rep_ms=0.0, min_reps=4, max_reps=4))
    assert t.reps == 4 and len(t.times_ms) == 4 and t.p20_ms <= t.median_ms <= t.p80_ms
    assert calls["fn"] == calls["setup"] == 1 + 1 + 4  # first call, one warm-up, four reps


@pytest.mark.parametrize("mode", ["fwd+bwd", "backward"])  # backward: the forward is the setup
@pytest.mark.parametrize("provider", ["frozen", "eager", "peft"])
def test_measure_row_schema(provider, mode, tmp_path):
    pytest.importorskip("peft")
    budget = Budget(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3)
    rates = roofline.Rates(1e10, 1e10)
    row = measure(TINY, provider, mode, rates=rates, budget=budget)
    assert set(row) <= set(COLUMN_NAMES)
    for col in ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "roofline_frac", "floor_ms",
                "check_err"):
        assert isinstance(row[col], float) and math.isfinite(row[col]) and row[col] >= 0, col
    assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert row["rounds"] == 3 and row["check_err"] < 1e-4
    assert isinstance(row["saved_bytes"], int)
    assert row["saved_bytes"] <= row["saved_bytes_with_params"]
    assert (row["saved_bytes"] == 0) == (provider == "frozen")  # frozen W: only W is saved
    path = tmp_path / "r.csv"
    write_csv([row], path)
    (back,) = read_csv(path)
    assert list(back) == list(COLUMN_NAMES)
    types = dict(COLUMNS)
    for col, value in back.items():
        assert value is None or isinstance(value, types[col]), col
    assert (back["provider"], back["M"], back["median_ms"]) == (provider, 16, row["median_ms"])
    assert back["gemm"] is None  # only fused providers have a GEMM strategy


@requires_kernel_device()
@pytest.mark.parametrize("gemm", ["fused", "cublas"])
def test_fused_provider_rows_carry_their_gemm_strategy(gemm):
    """Under the interpreter (not timed): the fused provider in each strategy is checked against
    the fp64 reference and saves the same bytes."""
    case = Case("lora_linear", 16, 24, 20, 4, 0.1, torch.float32, "cpu")
    row = measure(case, "triton", "forward", rates=None, timed=False, gemm=gemm)
    assert (row["provider"], row["gemm"], row["note"]) == ("triton", gemm, "interpreted: not timed")
    assert row["check_err"] < 1e-5
    other = measure(case, "triton", "forward", rates=None, timed=False,
                    gemm="cublas" if gemm == "fused" else "fused")
    assert row["saved_bytes"] == other["saved_bytes"]
    assert provider("triton", gemm).name == f"triton:{gemm}"


def test_gpu_grid_runs_frozen_then_each_fused_strategy_first():
    """A stage cut short by its time limit keeps frozen vs fused at the headline shape."""
    grid = make_grid("gpu")
    params = grid_params(grid, "lora_linear")
    first = [p for p in params if p[0] == grid.cases[0]]
    assert (first[0][0].M, first[0][0].K, first[0][0].N, first[0][0].r) == HEADLINE
    order = list(dict.fromkeys(param_id(p).split("/")[1] for p in first))
    assert order[:4] == ["frozen", "triton:fused", "triton:cublas", "triton:auto"]
    assert set(order[4:]) == {"eager", "peft", "compile"}
    interp = make_grid("interp")  # the fused strategy's interpreted GEMM is checked, not counted
    assert (interp.gemms, interp.saved_gemms) == (("fused", "cublas"), ("cublas",))


# ---- the correctness gate ----------------------------------------------------------------------
def _mask_blind_build(case: Case, t) -> Runner:
    """A wrong provider: dropout in the forward, but dX of the adapter ignores the mask (the bug of
    a fused LoRA derived from Unsloth's, fms-acceleration #97)."""
    runner = PROVIDERS["peft"].build(case, t)
    layer = runner.keep[0].linear
    x = runner.slots["x"]

    def forward():
        xd = layer.lora_dropout["default"](x.detach()) + (x - x.detach())
        lora = layer.lora_B["default"](layer.lora_A["default"](xd)) * layer.scaling["default"]
        return layer.base_layer(x) + lora
    return Runner(forward, runner.slots, keep=runner.keep)


def test_check_rejects_a_provider_whose_dx_ignores_the_mask():
    pytest.importorskip("peft")
    case = Case("lora_linear", 16, 24, 20, 4, 0.1, torch.float32, "cpu")
    t = make_tensors(case.op, 16, 24, 20, 4, case.scale, case.dtype, "cpu")
    good = PROVIDERS["peft"]
    assert check(case, good, good.build(case, t), t) < 1e-6
    bad = Provider("mask-blind", True, good.probe, _mask_blind_build)
    with pytest.raises(AssertionError, match="dx"):
        check(case, bad, bad.build(case, t), t)


def test_tiny_grid_orders_case_by_case():
    grid = make_grid("tiny")
    assert {c.op for c in grid.cases} == {"lora_linear", "norm_lora"}
    assert all(c.device == "cpu" for c in grid.cases)


# ---- summary ratios ----------------------------------------------------------------------------
def _row(provider, mode, median, p=0.0, saved=None, op="lora_linear", shape=(8192, 4096, 4096, 16),
         gemm=None):
    m, k, n, r = shape
    return {"op": op, "provider": provider, "gemm": gemm, "mode": mode, "M": m, "K": k, "N": n,
            "r": r, "p": p, "dtype": "bfloat16", "median_ms": median, "saved_bytes": saved}


def test_summary_ratios_and_figures():
    small = (1024, 4096, 4096, 16)
    rows = [_row("frozen", "fwd+bwd", 2.0), _row("eager", "fwd+bwd", 3.0),
            _row("triton", "fwd+bwd", 2.2, gemm="auto"),
            _row("triton", "fwd+bwd", 2.2, gemm="cublas"),
            _row("triton", "fwd+bwd", 2.6, gemm="fused"), _row("compile", "fwd+bwd", 2.4),
            _row("frozen", "fwd+bwd", 1.0, shape=small),
            _row("eager", "fwd+bwd", 4.0, shape=small),
            _row("triton", "fwd+bwd", 1.0, shape=small, gemm="auto"),
            _row("triton", "fwd+bwd", 0.99, shape=small, gemm="fused"),
            _row("peft", "forward", 5.0)]
    assert sorted(ratios(rows, "eager", "frozen", mode="fwd+bwd")) == [1.5, 4.0]
    assert ratios(rows, "peft", "frozen") == []  # no frozen forward to divide by
    assert ratios(rows, "triton:fused", "triton:auto") == [pytest.approx(2.6 / 2.2), 0.99]
    assert geomean([1.5, 4.0]) == pytest.approx(math.sqrt(6.0))
    figs = {f.name.split(",")[0]: f for f in gpu_figures(rows)}
    head = figs["auto fwd+bwd / frozen (8192x4096x4096"]
    assert head.value == pytest.approx(1.1) and head.met
    worst = figs["triton:fused / triton:auto fwd+bwd (lora_linear)"]
    assert worst.value == pytest.approx(0.99) and worst.met  # 1% slower: within the noise bound
    assert figs["triton:cublas / triton:auto fwd+bwd (lora_linear)"].value == 1.0
    assert figs["eager / triton:auto fwd+bwd (lora_linear)"].value == pytest.approx(3.0 / 2.2)
    eager = figs["eager / auto fwd+bwd"]
    assert eager.value == pytest.approx(math.sqrt(3.0 / 2.2 * 4.0)) and eager.met
    assert figs["compile / auto fwd+bwd"].value == pytest.approx(2.4 / 2.2)
    assert figs["peft / auto fwd+bwd"].value is None
    table = auto_table(rows)
    assert "frozen/auto" in table and "eager/auto" in table and "cublas/auto" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("8192x4096x4096 r16 p0"))
    assert line.split()[-4:] == ["0.909", "1.364", "1.182", "1.000"]


def test_host_rows_table_and_figure():
    rows = [{"op": "lora_linear", "provider": "frozen", "gemm": None, "mode": "host", "M": 8,
             "K": 64, "N": 64, "r": 8, "host_us": 20.0, "p20_ms": 0.021, "p80_ms": 0.025,
             "note": ""},
            {"op": "lora_linear", "provider": "fused", "gemm": "fused", "mode": "host", "M": 8,
             "K": 64, "N": 64, "r": 8, "host_us": 50.0, "p20_ms": 0.052, "p80_ms": 0.06,
             "note": "kernel time taken out (launchers stubbed)"},
            {"op": "lora_linear", "provider": "megatron-bridge", "gemm": None, "mode": "host",
             "M": 8, "K": 64, "N": 64, "r": 8, "host_us": None,
             "note": "skipped: megatron-bridge is not installed"}]
    text = host_table(rows)
    assert "fused:fused" in text and "2.50 x frozen" in text and "not installed" in text
    fig = host_figure(rows)
    assert fig.value is None and "not installed" in fig.line()
    rows[2].update(host_us=62.5, note="")
    assert host_figure(rows).value == pytest.approx(0.8) and host_figure(rows).met


@requires_kernel_device()
@pytest.mark.usefixtures("megatron_tp1")
def test_host_benchmark_measures_with_the_kernels_stubbed_and_restores_them():
    import importlib

    host = importlib.import_module("benchmarks.host")
    gs = importlib.import_module("bridge.kernels.gemm_strategy")
    real = gs.launch_expand
    rows = host.measure(("frozen", "fused:cublas", "megatron-bridge"), rounds=2, calls=2)
    assert gs.launch_expand is real
    by = {(r["provider"], r["gemm"]): r for r in rows}
    assert by[("frozen", None)]["host_us"] > 0 and by[("fused", "cublas")]["host_us"] > 0
    assert "stubbed" in by[("fused", "cublas")]["note"]
    mb = by[("megatron-bridge", None)]
    assert mb["host_us"] is not None or mb["note"].startswith("skipped: ")
    assert set(rows[0]) <= set(COLUMN_NAMES)


def test_saved_ratio_and_cpu_figures():
    shape = (512, 1024, 1024, 16)
    rows = [_row("eager", "forward", 1.0, p=0.1, saved=4000, shape=shape),
            _row("triton", "forward", None, p=0.1, saved=2000, shape=shape, gemm="fused"),
            _row("eager", "fwd+bwd", 0.9, p=0.1, shape=shape),
            _row("peft", "fwd+bwd", 1.0, p=0.1, shape=shape)]
    assert saved_ratio(rows).value == pytest.approx(0.5)
    figs = cpu_figures(rows, {"norm_lora/triton": "not implemented yet"},
                       paired={0.1: (0.95, 0.9, 1.0)})
    assert figs[0].value == pytest.approx(0.5) and figs[0].met
    assert figs[1].value is None and "not implemented" in figs[1].line()
    assert [f.value for f in figs if "median" in f.name] == [None, pytest.approx(0.9),
                                                             pytest.approx(0.9)]
    assert figs[-1].value == 0.95 and figs[-1].met
    assert Figure("x", 1.3, "<= 1.25").met is False and Figure("x", 1.3, ">= 1.3").met


# ---- the grouped and multi-LoRA modules, the merged schema ----------------------------------------
@requires_kernel_device()
def test_grouped_check_uses_the_kernels_own_mask(monkeypatch):
    """The fused provider is compared under the mask its seed regenerates: any other mask fails."""
    from bridge.kernels import philox

    from benchmarks import bench_grouped_lora_linear as bg

    case = next(c for c in bg.cases("tiny") if c.p > 0 and c.layout == "per_expert")
    t = bg.make_inputs(case)
    assert bg.check("fused", case, t) < 1e-5
    monkeypatch.setattr(philox, "dropout_keep_mask", lambda seed, shape, p, device: torch.ones(
        shape, dtype=torch.bool, device=device))
    with pytest.raises(AssertionError, match="fused differs from the fp64 reference"):
        bg.check("fused", case, t)


@requires_kernel_device()
def test_multi_lora_rows_a_wrong_provider_is_never_timed(monkeypatch):
    from benchmarks import bench_multi_lora_linear as bm

    monkeypatch.setenv("BENCH_GRID", "tiny")
    real = bm.build

    def build(provider, case, t, gemm=""):  # eager's output 1% off: its check must fail
        fwd, leaves = real(provider, case, t, gemm)
        return ((lambda: fwd() * 1.01) if provider == "eager" else fwd), leaves

    monkeypatch.setattr(bm, "build", build)
    case = bm.cases("tiny")[1]  # 3 slots, uneven
    rows = {(r["provider"], r["gemm"], r["mode"]): r for r in bm.measure_case(case, timed=True)}
    bad = rows[("eager", None, "forward")]
    assert bad["note"].startswith("FAILED check") and bad.get("median_ms") is None
    assert ("eager", None, "fwd+bwd") not in rows
    assert rows[("frozen", None, "fwd+bwd")]["median_ms"] > 0  # host-timed on the tiny grid
    fused = rows[("fused", "auto", "forward")]
    assert fused["note"] == "interpreted: not timed" and fused["check_err"] < 1e-5
    assert fused["saved_bytes"] == bm.goal_bytes(case)
    assert (fused["variant"], fused["n_slots"], fused["tokens"]) == ("n3-uneven", 3, "34/22/11")
    assert set(fused) <= set(COLUMN_NAMES)


def test_schema_is_documented_and_the_readme_lists_it():
    from pathlib import Path

    from benchmarks.schema import COLUMN_DOCS

    assert list(COLUMN_DOCS) == list(COLUMN_NAMES)
    readme = (Path(__file__).parents[1] / "benchmarks" / "README.md").read_text()
    missing = [c for c in COLUMN_NAMES if f"`{c}`" not in readme]
    assert not missing, f"benchmarks/README.md does not list columns {missing}"


def _variant_rows():
    base = dict(K=2048, N=2048, r=16, p=0.0, dtype="bfloat16", mode="fwd+bwd")
    rows = []
    for v, med in (("E8-top2-shared", (1.0, 2.0, 1.2)), ("E64-top8-shared", (4.0, 6.0, 6.6))):
        for prov, ms in zip(("frozen", "eager", "fused"), med, strict=True):
            rows.append({**base, "op": "grouped_lora_linear", "provider": prov, "gemm": None,
                         "M": 16384, "variant": v, "median_ms": ms})
    for n, split, ms in ((1, "even", 2.0), (8, "even", 2.2), (8, "uneven", 2.6)):
        rows.append({**base, "op": "multi_lora_linear", "provider": "fused", "gemm": "auto",
                     "M": 8192, "variant": f"n{n}-{split}", "n_slots": n, "split": split,
                     "median_ms": ms})
    return rows


def test_variant_tables_ratios_and_figures():
    from benchmarks.results import add_frozen_ratios, variant_figures, variant_table

    rows = add_frozen_ratios(_variant_rows())
    assert [r["x_frozen"] for r in rows[:3]] == [1.0, 2.0, 1.2]
    figs = {f.name: f for f in variant_figures(rows, gpu=True)}
    worst = figs["grouped fused / eager fwd+bwd, worst of 2 cases"]
    assert worst.value == pytest.approx(1.1) and worst.why == "E64-top8-shared" and not worst.met
    assert figs["multi-LoRA fused:auto fwd+bwd n=8 (even) / n=1"].value == pytest.approx(1.1)
    assert figs["multi-LoRA fused:auto fwd+bwd n=8 (uneven) / n=1"].met is False  # 1.3 > 1.2
    table = variant_table(rows, "grouped_lora_linear")
    line = next(ln for ln in table.splitlines() if ln.startswith("E64-top8-shared"))
    assert "4.000 ( 1.00)" in line and "6.000 ( 1.50)" in line and "6.600 ( 1.65)" in line


def _layer_csv(tmp_path, p=0.1):
    """bench_layer's own CSV for one tiny case, written by its own code (no model is run)."""
    from benchmarks import layer_report
    from benchmarks.bench_layer import make_cases

    case = next(c for c in make_cases("tiny", ["torch"]) if c.p == p)
    res = {"frozen": {"times": [0.010, 0.011, 0.012], "saved": 1000, "saved_with": 3000,
                      "by": {"layer": 1000}, "check_err": 1e-7, "note": ""},
           "eager": {"times": [0.013, 0.014, 0.015], "saved": 2000, "saved_with": 4000,
                     "by": {"layer": 1000, "linear_fc2.adapter": 1000}, "check_err": 2e-7,
                     "paths": {"layers.0.linear_qkv": "eager (requested by argument)"},
                     "note": "", "adapter_bytes": 64},
           "megatron-bridge": {"note": "skipped: Megatron-Bridge is not installed"},
           "fused": {"saved": 1500, "saved_with": 3500, "by": {"layer": 1000},
                     "check_err": 3e-7, "note": "interpreted: not timed",
                     "paths": {"layers.0.linear_qkv": "fused (triton)"}, "adapter_bytes": 64}}
    _, layer_rows = layer_report.case_rows(case, res, 1e9)
    path = tmp_path / "layer.csv"
    layer_report.write_layer_csv(layer_rows, str(path))
    return case, path


def test_layer_rows_join_the_schema(tmp_path):
    from benchmarks.results import rows_from_layer_csv

    case, path = _layer_csv(tmp_path)
    rows = rows_from_layer_csv(path)
    assert [r["provider"] for r in rows] == ["frozen", "eager", "megatron-bridge", "fused"]
    eager = rows[1]
    assert (eager["op"], eager["mode"], eager["M"], eager["K"], eager["N"], eager["p"]) == (
        "layer", "fwd+bwd", case.tokens, case.hidden, case.ffn, case.p)
    assert eager["variant"] == f"torch-L{case.layers}-a4/2-s{case.seq}x{case.batch}"
    assert eager["x_frozen"] == pytest.approx(14 / 11) and eager["spec"] == "torch"
    assert eager["paths"] == "layers.0.linear_qkv: eager (requested by argument)"
    assert rows[2]["note"].startswith("skipped") and rows[3]["median_ms"] is None
    write_csv(rows, tmp_path / "r.csv")
    assert [r["variant"] for r in read_csv(tmp_path / "r.csv")] == [eager["variant"]] * 4


def test_merge_puts_the_layer_step_first(tmp_path):
    from benchmarks import run

    _, layer = _layer_csv(tmp_path / "parts" / "layer_p0.1")
    (tmp_path / "parts" / "layer_p0.1" / "layer.summary.txt").write_text("layer step torch-h32\n")
    ops = tmp_path / "parts" / "multi"
    ops.mkdir()
    write_csv([{**r, "note": ""} for r in _variant_rows()], ops / "results.csv")
    (tmp_path / "parts" / "empty").mkdir()
    out = tmp_path / "out"
    assert run.merge(sorted((tmp_path / "parts").iterdir()), out, plot=False) == 0
    rows = read_csv(out / "results.csv")
    assert rows[0]["op"] == "layer" and len(rows) == 4 + len(_variant_rows())
    text = (out / "summary.txt").read_text()
    assert text.startswith("== layer step") and "layer step torch-h32" in text
    assert text.index("layer step torch-h32") < text.index("multi_lora_linear: median ms")
    assert "part empty: no results" in text
    assert (out / "layer.csv").read_text() == layer.read_text()


# ---- benchmarks/gpu_check.sh ---------------------------------------------------------------------
GPU_TESTS = ("test_lora_linear_triton.py", "test_norm_lora.py", "test_gemm_kernel.py",
             "test_gemm_strategy.py", "test_grouped_lora_linear.py", "test_multi_lora_linear.py",
             "test_csrc.py", "test_philox.py")


def _gpu_check(env: dict, tmp_path, timeout: float = 300):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).parents[1]
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full.update(PYTHON=sys.executable, OUT=str(tmp_path / "out"), **env)
    return subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh")], env=full, cwd=repo,
                          capture_output=True, text=True, timeout=timeout)


def _plan(tmp_path, **env):
    import shlex

    proc = _gpu_check({"GPU_CHECK_PLAN": "1", **env}, tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [(kind, name, int(limit), shlex.split(cmd))
            for kind, name, limit, cmd in (ln.split("\t") for ln in proc.stdout.splitlines())]


def _argv(cmd: list[str]) -> list[str]:
    """The command after ``env VAR=...`` prefixes."""
    if cmd[0] == "env":
        cmd = cmd[1:]
        while "=" in cmd[0]:
            cmd = cmd[1:]
    return cmd


def test_gpu_check_plan_fits_eight_minutes_and_names_what_exists(tmp_path, capsys):
    import importlib.util
    import subprocess
    from pathlib import Path

    from benchmarks import run

    repo = Path(__file__).parents[1]
    script = repo / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    plan = _plan(tmp_path)
    names = [name for _, name, _, _ in plan]
    assert len(names) == len(set(names))
    fg = [limit for kind, _, limit, _ in plan if kind == "stage"]
    limits = {name: limit for _, name, limit, _ in plan}
    # the background build overlaps the stages up to the tests that need bridge._C
    overlap = limits["mcore"] + limits["tests_triton"] + limits["tests_grouped_multi"]
    worst = sum(fg) + max(0, limits["build"] - overlap)
    assert worst <= 450, f"worst case {worst} s: no margin under 8 minutes"
    named_tests = set()
    for _, name, limit, cmd in plan:
        text = " ".join(cmd)
        for mod in re.findall(r"-m ([a-z_][\w.]*)", text):
            if mod not in ("not", "gpu"):  # pytest's -m marker expressions
                assert importlib.util.find_spec(mod) is not None, (name, mod)
        for path in re.findall(r"tests/\S+\.py", text):
            assert (repo / path).exists(), (name, path)
            named_tests.add(Path(path).name)
        argv = _argv(cmd)
        if argv[1:3] == ["-m", "benchmarks.run"]:
            args = run.parser().parse_args(argv[3:])  # exits (fails the test) on a bad option
            assert args.grid == "gpu" and args.no_layer and 0 < args.budget_s < limit, name
        if argv[1:3] == ["-m", "benchmarks.bench_layer"]:
            from benchmarks import bench_layer

            with pytest.raises(SystemExit):
                bench_layer.main(["--help"])
            flags = {a for a in argv[3:] if a.startswith("--")}
            assert flags <= set(re.findall(r"--[a-z-]+", capsys.readouterr().out))
        if argv[1:3] == ["-m", "pytest"]:
            assert "-m" in argv and argv[argv.index("-m", 3) + 1] == "not slow"
    assert named_tests >= set(GPU_TESTS)
    for test in GPU_TESTS:  # none needs megatron-core (the GPU image has none)
        src = (repo / "tests" / test).read_text()
        assert "\nimport megatron" not in src and "\nfrom megatron" not in src, test
    dry = {name: (limit, cmd) for _, name, limit, cmd in _plan(tmp_path, GPU_CHECK_DRY_RUN="1")}
    assert "--collect-only" in dry["tests_triton"][1] and dry["tests_triton"][0] == 3 * 85
    grouped = _argv(dry["bench_grouped"][1])
    assert grouped[grouped.index("--ops") + 1] == "grouped_lora_linear"
    assert grouped[grouped.index("--grid") + 1] == "tiny"
    assert "tiny" in dry["bench_layer"][1] and "torch" in dry["bench_layer"][1]  # megatron hidden


@pytest.mark.slow
def test_gpu_check_dry_run_of_a_stage_and_a_failing_one(tmp_path):
    """Two stages in the dry run (tiny shapes, the interpreter, megatron-core hidden): their rows
    reach one results folder; then every stage of a run whose limits are too short is recorded
    as timed out and the script still finishes."""
    proc = _gpu_check({"GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_STAGES": "bench_grouped,report"},
                      tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = tmp_path / "out"
    status = (out / "status.txt").read_text()
    assert "bench_grouped rc=0" in status and "report rc=0" in status, status
    assert "tests_triton" not in status  # not selected
    rows = read_csv(out / "results.csv")
    fused = [r for r in rows if r["op"] == "grouped_lora_linear" and r["provider"] == "fused"]
    assert len(fused) == 4 and all(r["check_err"] < 1e-5 for r in fused)
    assert (out / "summary.txt").read_text().startswith("== layer step")
    assert (out / "table.md").exists() and (out / "folder.txt").read_text().startswith(
        "benchmarks/results/cpu-dryrun-")
    log = (out / "gpu_check.log").read_text()
    assert re.search(r"\[\d\d:\d\d:\d\d \+\d+s\] start bench_grouped", log)
    proc = _gpu_check({"GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_TIME_PCT": "5",
                       "GPU_CHECK_STAGES": "bench_grouped report"}, tmp_path / "short")
    assert proc.returncode == 0
    status = (tmp_path / "short" / "out" / "status.txt").read_text()
    assert "bench_grouped rc=124" in status and "TIMED OUT" in status and "report rc=" in status
