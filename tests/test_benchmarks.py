"""The benchmark harness itself (benchmarks/): roofline arithmetic, the CSV schema of a real
measurement, the saved-bytes counter, the correctness gate, and the summary's ratios (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks import roofline
from benchmarks.cases import Case, make_grid
from benchmarks.measure import Policy, check, count_saved_bytes, measure, plain_timer
from benchmarks.providers import PROVIDERS, Provider, Runner, make_tensors
from benchmarks.results import (
    COLUMN_NAMES,
    COLUMNS,
    Figure,
    cpu_figures,
    geomean,
    gpu_figures,
    ratios,
    read_csv,
    saved_ratio,
    write_csv,
)

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
@pytest.mark.parametrize("provider", ["frozen", "eager", "peft"])
def test_measure_row_schema(provider, tmp_path):
    pytest.importorskip("peft")
    policy = Policy(target_s=0.0, min_rounds=3, max_rounds=3, warmup=0, min_round_s=0.0)
    rates = roofline.Rates(1e10, 1e10)
    row = measure(TINY, provider, "fwd+bwd", rates=rates, timer=plain_timer("cpu"), policy=policy)
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
def _row(provider, mode, median, p=0.0, saved=None, op="lora_linear", shape=(8192, 4096, 4096, 16)):
    m, k, n, r = shape
    return {"op": op, "provider": provider, "mode": mode, "M": m, "K": k, "N": n, "r": r, "p": p,
            "dtype": "bfloat16", "median_ms": median, "saved_bytes": saved}


def test_summary_ratios_and_figures():
    rows = [_row("frozen", "fwd+bwd", 2.0), _row("eager", "fwd+bwd", 3.0),
            _row("triton", "fwd+bwd", 2.2), _row("compile", "fwd+bwd", 2.4),
            _row("frozen", "fwd+bwd", 1.0, shape=(1024, 4096, 4096, 16)),
            _row("eager", "fwd+bwd", 4.0, shape=(1024, 4096, 4096, 16)),
            _row("triton", "fwd+bwd", 1.0, shape=(1024, 4096, 4096, 16)),
            _row("peft", "forward", 5.0)]
    assert sorted(ratios(rows, "eager", "frozen", mode="fwd+bwd")) == [1.5, 4.0]
    assert ratios(rows, "peft", "frozen") == []  # no frozen forward to divide by
    assert geomean([1.5, 4.0]) == pytest.approx(math.sqrt(6.0))
    figs = {f.name.split(",")[0]: f for f in gpu_figures(rows)}
    head = figs["fused fwd+bwd / frozen (8192x4096x4096"]
    assert head.value == pytest.approx(1.1) and head.met
    eager = figs["eager / fused fwd+bwd"]
    assert eager.value == pytest.approx(math.sqrt(3.0 / 2.2 * 4.0)) and eager.met
    assert figs["compile / fused fwd+bwd"].value == pytest.approx(2.4 / 2.2)
    assert figs["peft / fused fwd+bwd"].value is None


def test_saved_ratio_and_cpu_figures():
    shape = (512, 1024, 1024, 16)
    rows = [_row("eager", "forward", 1.0, p=0.1, saved=4000, shape=shape),
            _row("triton", "forward", None, p=0.1, saved=2000, shape=shape),
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
    assert Figure("x", 1.2, "<= 1.12").met is False and Figure("x", 1.3, ">= 1.3").met
