"""The benchmark harness itself (benchmarks/): roofline arithmetic, the shared timer's statistics,
the CSV schema of a real measurement (with its GEMM strategy column), the saved-bytes counter,
the correctness gate, the summary's ratios (auto against frozen, eager and both strategies), and
the host-time rows (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from bridge.kernels._timing import Budget, bench_host, summarize

from benchmarks import roofline
from benchmarks.cases import Case, grid_params, make_grid, param_id
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


def test_grid_runs_each_fused_provider_per_gemm_strategy():
    grid = make_grid("gpu")
    params = grid_params(grid, "lora_linear")
    first = [p for p in params if p[0] == grid.cases[0]]
    assert {(prov, gemm) for _, prov, gemm, _ in first} >= {
        ("frozen", ""), ("eager", ""), ("triton", "fused"), ("triton", "cublas"),
        ("triton", "auto")}
    assert param_id(first[-1]).endswith("/triton:auto/fwd+bwd")
    assert make_grid("interp").gemms == ("fused", "cublas")


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
