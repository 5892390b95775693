"""bridge.peft.kernel_report: the path each adapter-wrapped module's next training forward takes.

A GPT built with the transformer-engine stand-ins (norms fused into linear_qkv / linear_fc1, TE
row linears for linear_proj / linear_fc2) shows all four targets fused under the interpreter,
before any forward ran and after one (then from the plans the forward made, the GEMM strategy
from the chooser's decisions), and the report matches what the forward really did; with fp8 on
(megatron's config, or TE's fp8_autocast) every row is eager with the reason. LoRA(...)(model)
logs the one-line summary. Other wrappers (DoRA, a switched-off or merged adapter, a request
that would raise) are reported as such.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from torch import nn

from bridge.peft import AdapterWrapper
from tests.conftest import requires_kernel_device

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

pytestmark = [requires_kernel_device(), pytest.mark.usefixtures("megatron_tp1")]
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
LAYOUT = {"linear_qkv": ("TELayerNormColumnParallelLinear", "norm"),
          "linear_proj": ("TERowParallelLinear", "row"),
          "linear_fc1": ("TELayerNormColumnParallelLinear", "norm"),
          "linear_fc2": ("TERowParallelLinear", "row")}


def _te_gpt(**overrides):
    from tests import te_standins as te
    from tests.megatron_utils import tiny_gpt_model

    return tiny_gpt_model(seed=0, layer_spec=te.te_gpt_layer_spec(), hidden_dropout=0.0,
                          attention_dropout=0.0, **overrides)


def _lora(model, **kw):
    from bridge.peft import LoRA

    return LoRA(target_modules=TARGETS, dim=4, alpha=8, lora_B_init_method="normal", **kw)(model)


def _check_all_fused(report, source: str) -> None:
    from bridge.peft import KernelReportRow

    assert len(report) == 8 and all(isinstance(r, KernelReportRow) for r in report)
    assert sorted(r.name for r in report) == sorted(
        f"decoder.layers.{i}.{'self_attention' if t in ('linear_qkv', 'linear_proj') else 'mlp'}"
        f".{t}" for i in range(2) for t in TARGETS)
    for r in report:
        base, layout = LAYOUT[r.name.rsplit(".", 1)[1]]
        assert (r.base, r.adapter, r.path, r.backend, r.layout, r.gemm, r.source) == (
            base, "LoRA", "fused", "triton", layout, "auto -> fused", source), r


def test_te_gpt_all_four_targets_fused_before_and_after_a_forward(caplog):
    from bridge.peft import kernel_report, kernel_summary
    from bridge.peft.fused_forward import fused_plan
    from tests.megatron_utils import gpt_inputs

    model = _te_gpt()
    with caplog.at_level(logging.INFO, logger="bridge.peft.base"):
        _lora(model)
    summary = "LoRA: 8 modules, 8 fused (triton), 0 eager"
    assert summary in caplog.messages
    report = kernel_report(model)
    _check_all_fused(report, "planned")
    assert report.summary() == kernel_summary(model) == kernel_summary(report) == summary
    table = str(report)
    assert table.splitlines()[0].split() == ["name", "base", "adapter", "path", "backend", "gemm",
                                             "reason"]
    line = next(ln for ln in table.splitlines() if ln.startswith("decoder.layers.1.mlp.linear_fc2"))
    assert line.split() == ["decoder.layers.1.mlp.linear_fc2", "TERowParallelLinear", "LoRA",
                            "fused", "triton", "auto", "->", "fused"]
    assert table.endswith(summary)
    ids, pos, mask = gpt_inputs(batch=2, seq=8)
    model(ids, pos, mask).float().pow(2).mean().backward()
    # what the forward did: every wrapper's plan is the fused one the report announced
    wrappers = dict(model.named_modules())
    for r in report:
        plan = fused_plan(wrappers[r.name])
        assert (plan.backend, plan.kind) == (r.backend, r.layout), r.name
    _check_all_fused(kernel_report(model), "last forward")


@pytest.mark.parametrize("how", ["config", "fp8_autocast"])
def test_with_fp8_on_every_row_is_eager_with_the_reason(how):
    from bridge.peft import kernel_report, kernel_summary
    from tests import te_standins as te

    model = _te_gpt()
    why = "fp8 training (config.fp8='hybrid')" if how == "config" else \
        "transformer-engine fp8_autocast is active (the base's GEMM runs in fp8)"
    if how == "config":
        model.config.fp8 = "hybrid"  # every layer shares the model's config
    _lora(model)
    with te.fp8_autocast(enabled=how == "fp8_autocast"):
        report = kernel_report(model)
        summary = kernel_summary(model)
    assert len(report) == 8
    for r in report:
        assert (r.path, r.backend, r.gemm, r.reason) == ("eager", "eager", "", why), r
    assert summary == f"LoRA: 8 modules, 0 fused, 8 eager ({why})"
    if how == "fp8_autocast":  # out of it again, the same model reports fused
        _check_all_fused(kernel_report(model), "planned")


class _SelfPlanning(AdapterWrapper):
    """A wrapper with its own plan (the protocol kernel_report reads)."""

    def training_plan(self):
        return SimpleNamespace(backend="cuda", kind="column", gemm="fused",
                               reason="cuda, naturally"), "planned"


def test_other_wrappers_switched_off_merged_and_failing_requests():
    from bridge.peft import DoRA, LinearAdapter, LoRA, LoRALinear, kernel_report, merge_lora
    from bridge.peft.fused_forward import training_plan
    from tests import te_standins as te
    from tests.megatron_utils import make_config

    cfg = make_config(hidden_size=16)

    def row():
        return te.TERowParallelLinear(24, 16, config=cfg, init_method=nn.init.normal_, bias=False,
                                      input_is_parallel=True, skip_bias_add=False,
                                      is_expert=False)

    model, dmodel = nn.Module(), nn.Module()
    model.off, model.merged, model.req, dmodel.dora = row(), row(), row(), row()
    model.dup = te.TELinear(16, 8, parallel_mode="duplicated", config=cfg,
                            init_method=nn.init.normal_, bias=False, skip_bias_add=False,
                            skip_weight_param_allocation=False)
    DoRA(target_modules=["dora"], dim=2)(dmodel)
    LoRA(target_modules=["off", "merged", "req", "dup"], dim=2)(model)
    model.req.kernel_backend = "triton"
    lin = nn.Linear(8, 4).requires_grad_(False)
    model.lin = LoRALinear(lin, LinearAdapter(lin, dim=2), kernel_gemm="cublas")
    model.own = _SelfPlanning(nn.Linear(8, 4), nn.Identity())
    model.off.disable_adapter_layers()
    merge_lora(model.merged)
    chunks = [model, dmodel]
    with te.fp8_autocast():
        rows = {r.name: r for r in kernel_report(chunks)}
        dup_plan = training_plan(model.dup)  # a duplicated TE base is a LoRALinear
    assert set(rows) == {f"chunk0.{n}" for n in ("off", "merged", "req", "lin", "own", "dup")} | {
        "chunk1.dora"}
    r, (plan, source) = rows["chunk0.dup"], dup_plan
    assert (r.adapter, r.path, r.reason, r.source) == ("LoRA", "eager", plan.reason, source), r
    assert "fp8_autocast is active" in r.reason
    r = rows["chunk0.own"]  # a wrapper that plans itself (training_plan), as MultiLoRA does
    assert (r.adapter, r.path, r.backend, r.gemm, r.layout, r.reason, r.source) == (
        "_SelfPlanning", "fused", "cuda", "fused", "column", "cuda, naturally", "planned")
    r = rows["chunk1.dora"]
    assert (r.adapter, r.path) == ("DoRA", "eager") and "DoRA has no fused kernel" in r.reason
    assert (rows["chunk0.off"].path, rows["chunk0.merged"].path) == ("off", "off")
    assert "disable_adapter_layers" in rows["chunk0.off"].reason
    assert "merged into the base weight" in rows["chunk0.merged"].reason
    r = rows["chunk0.req"]  # an explicit triton request under fp8: the next forward raises
    assert r.path == "error" and "BackendUnavailableError" in r.reason and \
        "fp8_autocast is active" in r.reason
    r = rows["chunk0.lin"]  # a plain nn.Linear, the requested strategy as asked
    assert (r.base, r.path, r.backend, r.gemm, r.layout) == ("Linear", "fused", "triton",
                                                              "cublas", "linear")
    summary = kernel_report(chunks).summary()
    assert summary.startswith("LoRA: 7 modules, 4 fused (3 triton, 1 cuda), 1 eager (DoRA has no"
                              ), summary
    assert summary.endswith(", 2 off")
    with pytest.raises(TypeError, match="nn.Module or a list of model chunks"):
        kernel_report("model")


def test_report_does_not_run_kernels_or_keep_plans(monkeypatch):
    """Before any forward: no kernel launch, no GEMM timing, no plan stored on the wrapper."""
    import importlib

    from bridge.peft import kernel_report
    from bridge.peft.fused_forward import fused_plan

    model = _te_gpt()
    _lora(model)
    for mod_name in ("bridge.kernels.lora_linear", "bridge.kernels.norm_lora"):
        mod = importlib.import_module(mod_name)
        for name in ("lora_linear_fused", "norm_lora_linear_fused"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("a kernel ran"))
    monkeypatch.setattr("bridge.kernels.gemm_strategy.GemmChooser.choose",
                        lambda *a, **k: pytest.fail("the chooser was asked"))
    report = kernel_report(model)
    assert all(r.path == "fused" for r in report)
    wrappers = dict(model.named_modules())
    assert all(fused_plan(wrappers[r.name]) is None for r in report)
