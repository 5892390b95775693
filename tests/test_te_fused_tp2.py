"""LoRA over the transformer-engine stand-ins at TP=2 (two spawned processes on gloo), with and
without sequence parallelism, eager and fused (Triton, interpreted): every case equals a
single-process TP=1 eager oracle built from the same seed, for y, the returned bias and the
gradients of x, A, B (and the norm weights). So fused equals eager equals TP=1 for
TERowParallelLinear (all-reduce / reduce-scatter), TEColumnParallelLinear (input copied /
all-gathered), TELayerNormColumnParallelLinear and a duplicated TELinear (under a LoRALinear
built directly with a whole-weight adapter, as LoRA() builds it).

The eager LayerNorm-linear cases under SP are the check of TE's dropped gradient: LoRA must not
ask the layer for its gathered layernorm output (TE 2.11 drops that output's gradient, and with it
the adapter's share of dX; the stand-in does the same by default).

All TP=2 cases run inside one pair of processes; each rank writes its tensors, the tests here
assemble them (tests/test_tensor_parallel.py's layouts) and compare.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

from tests.conftest import KERNEL_SKIP_WHY  # noqa: E402
from tests.test_tensor_parallel import _shard, assemble  # noqa: E402

pytestmark = pytest.mark.slow
TP, SEED, ALPHA = 2, 4321, 8.0
TOL = dict(rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class Case:
    kind: str  # column | row | lncol | dup (TELinear parallel_mode='duplicated')
    sp: bool
    backend: str = "eager"
    skip_bias_add: bool = False
    seq: int = 4
    batch: int = 1
    hidden: int = 32
    ffn: int = 48
    r: int = 4

    @property
    def name(self) -> str:
        return (f"te-{self.kind}-{'sp' if self.sp else 'nosp'}-"
                f"{'skipbias' if self.skip_bias_add else 'bias'}-{self.backend}")

    @property
    def k(self) -> int:
        return self.ffn if self.kind == "row" else self.hidden

    @property
    def n(self) -> int:
        return self.hidden if self.kind == "row" else self.ffn


KINDS = ("column", "row", "lncol", "dup")
CASES = [Case(kind, sp, backend, skip_bias_add=sp and kind != "dup")
         for backend in ("eager", "triton") for kind in KINDS for sp in (False, True)]
EXPECT_KIND = {"column": "column", "row": "row", "lncol": "norm", "dup": "duplicated"}


def _build(case: Case, cfg):
    from tests import te_standins as te

    init = lambda w: nn.init.normal_(w, std=0.3)  # noqa: E731
    common = dict(config=cfg, init_method=init, bias=True, skip_bias_add=case.skip_bias_add)
    if case.kind == "column":
        return te.TEColumnParallelLinear(case.k, case.n, gather_output=False, is_expert=False,
                                         **common)
    if case.kind == "row":
        return te.TERowParallelLinear(case.k, case.n, input_is_parallel=True, is_expert=False,
                                      **common)
    if case.kind == "lncol":
        return te.TELayerNormColumnParallelLinear(case.k, case.n, gather_output=False,
                                                  is_expert=False, **common)
    return te.TELinear(case.k, case.n, parallel_mode="duplicated",
                       skip_weight_param_allocation=False, **common)


def run_case(case: Case, tp: int, rank: int) -> dict:
    """Base + LoRA from SEED at this TP size; forward and backward on this rank's part of a fixed
    input; this rank's tensors."""
    from bridge.peft import LoRA, LoRALinear, ParallelLinearAdapter
    from bridge.peft.fused_forward import fused_plan
    from tests.megatron_utils import make_config

    sp = case.sp and tp > 1
    cfg = make_config(sequence_parallel=sp, tensor_model_parallel_size=tp, hidden_size=case.hidden,
                      layernorm_epsilon=1e-5)
    torch.manual_seed(SEED)
    base = _build(case, cfg)
    g = torch.Generator().manual_seed(SEED + 1)
    bias, norm_w, norm_b = (torch.randn(case.n, generator=g), 1 + 0.5 * torch.randn(
        case.k, generator=g), 0.5 * torch.randn(case.k, generator=g))
    x_full = torch.randn(case.seq, case.batch, case.k, generator=g)
    g_full = torch.randn(case.seq, case.batch, case.n, generator=g)
    column_like = case.kind in ("column", "lncol")
    with torch.no_grad():
        base.bias.copy_(_shard(bias, 0, rank, tp) if column_like else bias)
        if case.kind == "lncol":
            base.layer_norm_weight.copy_(norm_w)
            base.layer_norm_bias.copy_(norm_b)
    if case.kind == "dup":  # a LoRALinear with a whole-weight adapter, as LoRA() builds it
        wrapper = LoRALinear(base, ParallelLinearAdapter(
            case.k, case.n, case.r, activation="identity", alpha=ALPHA, row_init_method="normal",
            model_parallel_config=cfg, base_linear_is_parallel=False),
            kernel_backend=case.backend)
        base.requires_grad_(False)
    else:
        model = nn.Module()
        model.proj = base
        LoRA(target_modules=["proj"], dim=case.r, alpha=ALPHA, lora_B_init_method="normal",
             kernel_backend=case.backend)(model)
        wrapper = model.proj
    assert type(wrapper) is LoRALinear
    norm = {}
    if case.kind == "lncol":
        # the fix: TE would drop the gradient of a gathered layernorm output (the adapter's dX)
        assert base.return_layernorm_output and not base.return_layernorm_output_gathered
        norm = {"ln_w": base.layer_norm_weight, "ln_b": base.layer_norm_bias}
        for p in norm.values():
            p.requires_grad_(True)
    if case.kind == "row":
        x, grad = _shard(x_full, -1, rank, tp), (_shard(g_full, 0, rank, tp) if sp else g_full)
    else:
        x = _shard(x_full, 0, rank, tp) if sp else x_full.clone()
        grad = _shard(g_full, -1, rank, tp) if column_like else (
            _shard(g_full, 0, rank, tp) if sp else g_full)
    x.requires_grad_(True)
    y, bias_out = wrapper(x)
    (y * grad).sum().backward()
    plan = fused_plan(wrapper)
    if case.backend == "eager":
        assert plan.backend == "eager", plan
    else:  # the fused path ran, with TE's layout
        assert (plan.backend, plan.kind, plan.sequence_parallel) == (
            case.backend, EXPECT_KIND[case.kind], sp and case.kind != "dup"), plan
    a, b = wrapper.adapter.linear_in.weight, wrapper.adapter.linear_out.weight
    out = {"y": y.detach(), "dx": x.grad, "W": base.weight.detach(), "A": a.detach(),
           "B": b.detach(), "dA": a.grad, "dB": b.grad,
           "bias_out": None if bias_out is None else bias_out.detach()}
    out.update({f"d{k}": p.grad for k, p in norm.items()})
    return out


def layouts(case: Case) -> dict:
    """How each rank's result assembles into the TP=1 one: a dim to concatenate on, 'same'
    (replicated) or 'sum' (partial sums megatron all-reduces)."""
    sp = case.sp
    if case.kind == "row":
        return {"W": 1, "A": 1, "dA": 1, "B": 0, "dB": 0, "dx": -1, "y": 0 if sp else "same",
                "bias_out": "same"}
    if case.kind == "dup":  # replicated weights and factors, rows split only under SP
        part = "sum" if sp else "same"
        return {"W": "same", "A": "same", "B": "same", "dA": part, "dB": part,
                "y": 0 if sp else "same", "dx": 0 if sp else "same", "bias_out": "same"}
    lay = {"W": 0, "A": 0, "dA": 0, "B": 0, "dB": 0, "y": -1, "dx": 0 if sp else "same",
           "bias_out": 0}
    if case.kind == "lncol":
        lay.update({"dln_w": "sum" if sp else "same", "dln_b": "sum" if sp else "same"})
    return lay


def ub_overlap_case(rank: int) -> str:
    """At TP=2 with SP and tp_comm_overlap the TE row linear sets its userbuffers flags: LoRA
    stays eager and says why."""
    from bridge.peft import LoRA
    from bridge.peft.fused_forward import fused_plan
    from tests import te_standins as te
    from tests.megatron_utils import make_config

    cfg = make_config(sequence_parallel=True, tensor_model_parallel_size=TP, hidden_size=32,
                      tp_comm_overlap=True)
    model = nn.Module()
    model.proj = te.TERowParallelLinear(48, 32, config=cfg, init_method=nn.init.normal_,
                                        bias=False, input_is_parallel=True, skip_bias_add=False,
                                        is_expert=False, tp_comm_buffer_name="proj")
    assert model.proj.ub_overlap_rs_fprop
    LoRA(target_modules=["proj"], dim=4, kernel_backend="auto")(model)
    y, _ = model.proj(torch.randn(4, 1, 24))
    assert tuple(y.shape) == (2, 1, 32)
    return fused_plan(model.proj).reason


def tp_worker(rank: int, out_dir: str, cases: list) -> None:
    results = {}
    for case in cases:
        try:
            results[case.name] = run_case(case, TP, rank)
        except Exception:  # recorded: the test of this case fails with the traceback
            results[case.name] = {"error": traceback.format_exc()}
    try:
        results["_ub"] = {"reason": ub_overlap_case(rank)}
    except Exception:
        results["_ub"] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    from tests.megatron_utils import destroy_parallel, init_parallel, spawn_gloo

    cases = [c for c in CASES if c.backend == "eager" or not KERNEL_SKIP_WHY]
    out_dir = tmp_path_factory.mktemp("te_fused_tp2")
    spawn_gloo(tp_worker, str(out_dir), world_size=TP, tp=TP, args=(str(out_dir), cases))
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(TP)]
    init_parallel(rank=0, world_size=1, tp=1,
                  init_file=str(tmp_path_factory.mktemp("te_tp1") / "dist_init"))
    try:
        oracle = {c.name: run_case(Case(**{**c.__dict__, "backend": "eager"}), 1, 0)
                  for c in cases}
    finally:
        destroy_parallel()
    return ranks, oracle


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tp2_equals_tp1(case, tp_results):
    if case.backend != "eager" and KERNEL_SKIP_WHY:
        pytest.skip(KERNEL_SKIP_WHY)
    ranks, oracle = tp_results
    for r, res in enumerate(ranks):
        if "error" in res[case.name]:
            pytest.fail(f"rank {r} failed:\n{res[case.name]['error']}")
    ref, lay = oracle[case.name], layouts(case)
    assert set(lay) >= set(ref), sorted(set(ref) - set(lay))
    for key in ("W", "A", "B"):  # same seed, same full weights: the premise, bitwise
        full = assemble([res[case.name][key] for res in ranks], lay[key], key)
        assert torch.equal(full, ref[key]), f"{key}: TP=2 shards do not assemble into TP=1"
    for key in sorted(set(ref) - {"W", "A", "B"}):
        full = assemble([res[case.name][key] for res in ranks], lay[key], key)
        if ref[key] is None:
            assert full is None, key
            continue
        torch.testing.assert_close(full, ref[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")
    assert (ref["bias_out"] is not None) == case.skip_bias_add


def test_userbuffers_overlap_at_tp2_stays_eager_and_says_why(tp_results):
    ranks, _ = tp_results
    for r, res in enumerate(ranks):
        assert "error" not in res["_ub"], f"rank {r}:\n{res['_ub'].get('error')}"
        assert "userbuffers communication overlap is on (ub_overlap_rs_fprop, " \
               "ub_overlap_ag_dgrad)" in res["_ub"]["reason"]
        assert "tp_comm_overlap is on" in res["_ub"]["reason"]
