"""The layer benchmark's CPU part (benchmarks/bench_layer.py) at tiny dims: every provider's loss,
dX and adapter gradients match fp64 eager LoRA under the provider's own dropout masks, a wrong
mask fails that check, saved bytes are counted and ordered as they should be, the rows fit the
harness's CSV schema, and the path each LoRA layer took is reported by kernel_report and checked
against what ran (fused under the Triton interpreter, the TE stand-ins' layers included)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import requires_kernel_device
from tests.numerics import dtype_tol

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

bl = pytest.importorskip("benchmarks.bench_layer")

pytestmark = requires_kernel_device()  # the fused provider: Triton (interpreted on the CPU)
LOCAL = {c.p: c for c in bl.make_cases("tiny", ["mcore-local"])}
FUSED = "fused (triton, GEMM auto -> fused)"  # what kernel_report says of each layer here


@pytest.fixture(autouse=True, scope="module")
def _parallel_state_torn_down():
    """The benchmark sets up megatron's world-size-1 state itself; later tests set up their own."""
    yield
    from tests.megatron_utils import destroy_parallel

    if torch.distributed.is_initialized():
        destroy_parallel()


def test_every_provider_checked_measured_and_reported():
    from benchmarks.results import COLUMN_NAMES

    case = LOCAL[0.1]
    rows, layer_rows = bl.measure_case(case, rounds=2, warmup=0)
    assert [r["provider"] for r in rows] == list(bl.PROVIDERS)
    for row in rows:
        assert set(row) <= set(COLUMN_NAMES), set(row) - set(COLUMN_NAMES)
        assert (row["op"], row["mode"], row["M"], row["K"], row["N"]) == (
            "layer", "fwd+bwd", case.tokens, case.hidden, case.ffn)
    by = {r["provider"]: r for r in layer_rows}
    for prov in ("frozen", "eager", "fused"):
        assert not by[prov]["note"].startswith(("FAILED", "skipped")), by[prov]["note"]
        assert by[prov]["check_err"] < dtype_tol(torch.float32, "layer"), prov
    mb = by["megatron-bridge"]
    if mb["note"].startswith("skipped"):
        assert "Megatron-Bridge is not installed" in mb["note"] and mb["median_ms"] is None
    for prov in ("frozen", "eager"):  # timed; the interpreted fused provider is not
        r = by[prov]
        assert r["median_ms"] > 0 and r["rounds"] == 2
        assert r["tokens_per_s"] == pytest.approx(case.tokens / (r["median_ms"] / 1e3))
    assert by["frozen"]["time_x_frozen"] == 1.0
    assert by["fused"]["median_ms"] is None and by["fused"]["note"] == "interpreted: not timed"
    # the memory win: at p > 0 eager keeps the dropped input and the mask, fused neither
    saved = {p: by[p]["saved_bytes"] for p in ("frozen", "eager", "fused")}
    assert saved["frozen"] < saved["fused"] < saved["eager"], saved
    assert by["fused"]["saved_x_eager"] == pytest.approx(saved["fused"] / saved["eager"])
    assert "linear_fc2.adapter" in by["eager"]["saved_by"]
    sites = [p.split(": ", 1) for p in by["fused"]["paths"].split("; ")]
    assert len(sites) == 4 * case.layers and all(path == FUSED for _, path in sites)
    assert all(p.split(": ", 1)[1].startswith("eager (requested")
               for p in by["eager"]["paths"].split("; "))
    text = bl.summary(layer_rows)
    assert "saved bytes fused / eager" in text and case.id in text


@pytest.mark.parametrize("spec", ["mcore-local", "te-standin"])
def test_fused_equals_fp64_eager_without_dropout(spec):
    """Every LoRA layer fused, the TE stand-ins' row linears (linear_proj, linear_fc2) too, as
    kernel_report says and the step confirms (no adapter module ran)."""
    err, paths = bl.check(bl.make_cases("tiny", [spec])[0], "fused")
    assert err < dtype_tol(torch.float32, "layer")
    assert len(paths) == 8 and set(paths.values()) == {FUSED}, paths


def test_reported_path_must_match_what_ran(monkeypatch):
    """A report that says fused for a layer whose adapter module ran fails the check."""
    from bridge.peft import kernel_report as real

    def lying(model):
        return [r.__class__(**{**r.__dict__, "path": "fused"}) for r in real(model)]

    monkeypatch.setattr("bridge.peft.kernel_report", lying)
    with pytest.raises(AssertionError, match="kernel_report says 'fused', but the adapter module ran"):
        bl.check(LOCAL[0.0], "eager")


def test_a_wrong_dropout_mask_fails_the_check(monkeypatch):
    """The p > 0 check reads the mask each fused layer drew; an oracle under any other mask
    (here: none dropped) must disagree."""
    monkeypatch.setattr(bl._Tracker, "fused_mask", lambda self, site, p, device: torch.ones(
        self.shapes[site], dtype=torch.bool, device=device))
    with pytest.raises(AssertionError, match="fused differs from fp64 eager"):
        bl.check(LOCAL[0.1], "fused")


def test_plain_torch_stack_with_dropout():
    case = bl.make_cases("tiny", ["torch"])[1]
    assert case.p == 0.1
    for prov in ("eager", "fused"):
        err, paths = bl.check(case, prov)
        assert err < dtype_tol(torch.float32, "layer"), prov
    assert len(paths) == 4 * case.layers


def test_saved_bytes_counts_each_storage_once_weights_apart():
    w = torch.nn.Parameter(torch.randn(3, 8))  # 96 bytes, a weight

    class M(torch.nn.Module):
        def forward(self, x):
            e = x.exp()  # saves e: 128
            return torch.nn.functional.linear(e * x, w).sum() + x[:, :4].sin().sum()
            # e * x saves e (seen) and x: 128; linear saves z = e * x (128) and w; sin a view of x

    x = torch.randn(4, 8, requires_grad=True)
    without, with_w, by = bl.saved_bytes(M(), x, [w])
    assert without == 3 * 128 and with_w == 3 * 128 + 96
    assert sum(by.values()) == without
