"""Tensor parallelism: LoRA at TP=2 (two spawned processes on gloo) equals a single-process TP=1
oracle built from the same seed, for outputs and the gradients of x, A, B (and the norm), with
column, row and layernorm-column bases, with and without sequence parallelism; and the sharded
state dict at TP=2 describes every tensor exactly once.

megatron's CPU initialisation draws the full master weight and splits it, so the same seed gives
the same full weights at TP=1 and TP=2 (asserted, bitwise, before anything else is compared).
All TP=2 cases run inside one pair of processes (each start imports megatron, ~7 s); the ranks
write their local tensors to files and the tests here assemble and compare them.
"""

from __future__ import annotations

import math
import os
import traceback
from dataclasses import dataclass

import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

TP = 2
ALPHA = 8.0
SEED = 1234
TOL = dict(rtol=1e-5, atol=1e-5)

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    kind: str  # 'column' | 'row' | 'lncol' (bridge.layers.LayerNormColumnParallelLinear)
    sp: bool  # sequence parallelism (at TP=2)
    backend: str = "eager"
    skip_bias_add: bool = False
    normalization: str = "LayerNorm"
    seq: int = 8
    batch: int = 2
    hidden: int = 32
    ffn: int = 48
    r: int = 4

    @property
    def name(self) -> str:
        norm = f"-{self.normalization}" if self.kind == "lncol" else ""
        return (f"{self.kind}{norm}-{'sp' if self.sp else 'nosp'}-"
                f"{'skipbias' if self.skip_bias_add else 'bias'}-{self.backend}")

    @property
    def k(self) -> int:  # the base's input features: the row base maps ffn -> hidden
        return self.ffn if self.kind == "row" else self.hidden

    @property
    def n(self) -> int:
        return self.hidden if self.kind == "row" else self.ffn


EAGER_CASES = [
    Case("column", sp=False),
    Case("column", sp=True, skip_bias_add=True),
    Case("row", sp=False),
    Case("row", sp=True, skip_bias_add=True),
    Case("lncol", sp=False),
    Case("lncol", sp=True, skip_bias_add=True),
    Case("lncol", sp=True, normalization="RMSNorm"),
]
# The Triton path runs in the CPU interpreter: the tiniest shapes only.
TRITON_CASES = [Case(kind, sp=sp, backend="triton", skip_bias_add=sp, seq=4, batch=1)
                for kind in ("column", "row", "lncol") for sp in (False, True)]


# ---- one case, at any TP size (shared by the TP=2 ranks and the TP=1 oracle) --------------------
def _shard(t: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    return t.chunk(tp, dim)[rank].contiguous()


def run_case(case: Case, tp: int, rank: int) -> dict:
    """Build base + LoRA from SEED, run forward and backward on this rank's part of a fixed input,
    and return this rank's tensors."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from bridge.layers import LayerNormColumnParallelLinear
    from bridge.peft import LoRA
    from tests.megatron_utils import make_config

    sp = case.sp and tp > 1
    cfg = make_config(sequence_parallel=sp, tensor_model_parallel_size=tp,
                      normalization=case.normalization, layernorm_epsilon=1e-5)
    column_like = case.kind != "row"
    torch.manual_seed(SEED)
    init = lambda w: nn.init.normal_(w, std=0.3)  # noqa: E731
    common = dict(config=cfg, init_method=init, bias=True, skip_bias_add=case.skip_bias_add)
    if case.kind == "column":
        base = ColumnParallelLinear(case.k, case.n, gather_output=False, **common)
    elif case.kind == "row":
        base = RowParallelLinear(case.k, case.n, input_is_parallel=True, **common)
    else:
        base = LayerNormColumnParallelLinear(case.k, case.n, gather_output=False, **common)

    g = torch.Generator().manual_seed(SEED + 1)
    bias = torch.randn(case.n, generator=g)
    norm_w = 1 + 0.5 * torch.randn(case.k, generator=g)
    norm_b = 0.5 * torch.randn(case.k, generator=g)
    x_full = torch.randn(case.seq, case.batch, case.k, generator=g)
    g_full = torch.randn(case.seq, case.batch, case.n, generator=g)
    with torch.no_grad():
        base.bias.copy_(_shard(bias, 0, rank, tp) if column_like else bias)
        if case.kind == "lncol":
            base.layer_norm_weight.copy_(norm_w)
            if base.layer_norm_bias is not None:
                base.layer_norm_bias.copy_(norm_b)

    model = nn.Module()
    model.proj = base
    LoRA(target_modules=["proj"], dim=case.r, alpha=ALPHA, lora_B_init_method="normal",
         kernel_backend=case.backend)(model)
    wrapper = model.proj
    norm_params = {}
    if case.kind == "lncol":
        norm_params = {"ln_w": base.layer_norm_weight}
        if base.layer_norm_bias is not None:
            norm_params["ln_b"] = base.layer_norm_bias
        for p in norm_params.values():
            p.requires_grad_(True)

    if column_like:
        x = _shard(x_full, 0, rank, tp) if sp else x_full.clone()
        grad = _shard(g_full, -1, rank, tp)
    else:
        x = _shard(x_full, -1, rank, tp)
        grad = _shard(g_full, 0, rank, tp) if sp else g_full
    x.requires_grad_(True)
    if case.backend != "eager":  # the fused path really runs (an explicit request raises if not)
        from bridge.kernels.backend import resolve_backend

        from bridge.peft.fused_forward import fused_constraints

        choice = resolve_backend(case.backend, "lora_linear", device=x.device, dtype=x.dtype,
                                 constraints=fused_constraints(wrapper, (), {}))
        assert choice.name == case.backend, choice
    y, bias_out = wrapper(x)
    (y * grad).sum().backward()

    a, b = wrapper.adapter.linear_in.weight, wrapper.adapter.linear_out.weight
    out = {"y": y.detach(), "dx": x.grad, "W": base.weight.detach(), "A": a.detach(),
           "B": b.detach(), "dA": a.grad, "dB": b.grad,
           "bias_out": bias_out.detach() if bias_out is not None else None}
    for name, p in norm_params.items():
        out[f"d{name}"] = p.grad
    return out


def layouts(case: Case) -> dict:
    """How each rank-local result assembles into the TP=1 one: a dim to concatenate on,
    'same' (replicated: equal on every rank) or 'sum' (partial sums)."""
    sp = case.sp
    if case.kind == "row":
        lay = {"W": 1, "A": 1, "dA": 1, "B": 0, "dB": 0, "dx": -1,
               "y": 0 if sp else "same", "bias_out": "same"}
    else:
        lay = {"W": 0, "A": 0, "dA": 0, "B": 0, "dB": 0, "y": -1, "dx": 0 if sp else "same",
               "bias_out": 0}
        if case.kind == "lncol":
            # norm parameters are replicated; with SP each rank holds the grad of its sequence
            # chunk (megatron all-reduces grads of parameters marked sequence_parallel).
            lay.update({"dln_w": "sum" if sp else "same", "dln_b": "sum" if sp else "same"})
    return lay


# ---- the TP=2 ranks ------------------------------------------------------------------------------
def sharded_layout(rank: int) -> dict:
    """Metadata of the sharded state dict of LoRA on a column, a row and an nn.Linear base."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    from bridge.peft import LoRA, LoRALinear, ParallelLinearAdapter
    from tests.megatron_utils import make_config

    torch.manual_seed(SEED)
    cfg = make_config(tensor_model_parallel_size=TP)
    model = nn.Module()
    model.col = ColumnParallelLinear(16, 24, config=cfg, init_method=nn.init.normal_, bias=True,
                                     gather_output=False)
    model.row = RowParallelLinear(24, 16, config=cfg, init_method=nn.init.normal_, bias=True,
                                  input_is_parallel=True, skip_bias_add=False)
    LoRA(target_modules=["col", "row"], dim=4, kernel_backend="eager")(model)
    model.lin = LoRALinear(nn.Linear(16, 8), ParallelLinearAdapter(16, 8, 4, activation="identity"),
                           kernel_backend="eager")
    sharded = {}
    metadata = ensure_metadata_has_dp_cp_group(None)  # as a model's sharded_state_dict passes it
    for name in ("col", "row", "lin"):
        sharded.update(getattr(model, name).sharded_state_dict(prefix=f"{name}.",
                                                               metadata=metadata))
    meta = {}
    for key, sh in sharded.items():
        assert isinstance(sh, (ShardedTensor, ShardedObject)), (key, type(sh))
        meta[key] = {"type": type(sh).__name__, "key": sh.key, "replica_id": tuple(sh.replica_id),
                     "global_shape": tuple(sh.global_shape),
                     "global_offset": tuple(sh.global_offset),
                     "local_shape": tuple(getattr(sh, "local_shape", (1,)))}
    return meta


def tp_worker(rank: int, out_dir: str, cases: list) -> None:
    results = {}
    for case in cases:
        try:
            results[case.name] = run_case(case, TP, rank)
        except Exception:  # recorded: the test of this case fails with the traceback
            results[case.name] = {"error": traceback.format_exc()}
    try:
        results["_sharded"] = sharded_layout(rank)
    except Exception:
        results["_sharded"] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


# ---- fixtures: one spawn for every case, one TP=1 pass for every oracle --------------------------
def triton_unavailable() -> str | None:
    """Why the Triton LoRA path cannot run here (None when it can)."""
    from bridge.kernels.backend import BackendUnavailableError
    from bridge.kernels.lora_linear import lora_linear

    t = torch.ones(2, 4)
    try:
        lora_linear(t, torch.ones(3, 4), None, torch.ones(2, 4), torch.ones(3, 2), scale=1.0,
                    backend="triton")
    except NotImplementedError as exc:
        return f"bridge.kernels.lora_linear has no triton implementation yet ({exc})"
    except BackendUnavailableError as exc:
        return f"triton backend unavailable: {exc}"
    return None


@pytest.fixture(scope="module")
def triton_skip_reason():
    return triton_unavailable()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory, triton_skip_reason):
    from tests.megatron_utils import destroy_parallel, init_parallel, spawn_gloo

    cases = EAGER_CASES + ([] if triton_skip_reason else TRITON_CASES)
    out_dir = tmp_path_factory.mktemp("tp2")
    spawn_gloo(tp_worker, str(out_dir), world_size=TP, tp=TP, args=(str(out_dir), cases))
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(TP)]

    init_parallel(rank=0, world_size=1, tp=1,
                  init_file=str(tmp_path_factory.mktemp("tp1") / "dist_init"))
    try:
        oracle = {}
        for case in cases:
            oracle_case = Case(**{**case.__dict__, "backend": "eager"})
            oracle[case.name] = run_case(oracle_case, 1, 0)
    finally:
        destroy_parallel()
    return ranks, oracle


def assemble(parts: list, how, key: str):
    if parts[0] is None:
        assert all(p is None for p in parts), key
        return None
    if how == "same":
        for r, p in enumerate(parts[1:], 1):
            torch.testing.assert_close(p, parts[0], **TOL, msg=f"{key}: rank {r} differs")
        return parts[0]
    if how == "sum":
        return sum(parts)
    return torch.cat(parts, dim=how)


def check_case(case: Case, tp_results) -> None:
    ranks, oracle = tp_results
    for r, res in enumerate(ranks):
        if "error" in res[case.name]:
            pytest.fail(f"rank {r} failed:\n{res[case.name]['error']}")
    ref = oracle[case.name]
    lay = layouts(case)
    assert set(lay) | {"y", "dx"} >= set(ref), sorted(set(ref) - set(lay))
    # same seed, same full weights: the premise of the comparison, bitwise
    for key in ("W", "A", "B"):
        full = assemble([res[case.name][key] for res in ranks], lay[key], key)
        assert torch.equal(full, ref[key]), f"{key}: TP=2 shards do not assemble into TP=1"
    for key in ("y", "dx", "dA", "dB", "bias_out", "dln_w", "dln_b"):
        if key not in ref:
            continue
        full = assemble([res[case.name][key] for res in ranks], lay[key], key)
        if ref[key] is None:
            assert full is None, key
            continue
        torch.testing.assert_close(full, ref[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")


# ---- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", EAGER_CASES, ids=lambda c: c.name)
def test_tp2_equals_tp1_eager(case, tp_results):
    check_case(case, tp_results)


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
def test_tp2_equals_tp1_triton(case, triton_skip_reason, tp_results):
    if triton_skip_reason:
        pytest.skip(triton_skip_reason)
    check_case(case, tp_results)


def test_oracle_matches_an_independent_fp64_computation(tp_results):
    """The TP=1 oracle itself is right: y = x W^T + b + s B A x for the column case."""
    _, oracle = tp_results
    case = EAGER_CASES[0]
    ref = oracle[case.name]
    g = torch.Generator().manual_seed(SEED + 1)
    bias = torch.randn(case.n, generator=g).double()
    for _ in range(2):  # norm_w, norm_b drawn before x
        torch.randn(case.k, generator=g)
    x = torch.randn(case.seq, case.batch, case.k, generator=g).double()
    w, a, b = (ref[k].double() for k in ("W", "A", "B"))
    expect = x @ w.t() + bias + (ALPHA / case.r) * (x @ a.t()) @ b.t()
    torch.testing.assert_close(ref["y"], expect.float(), **TOL)


def test_sharded_state_dict_at_tp2_describes_each_tensor_once(tp_results):
    ranks, _ = tp_results
    metas = [res["_sharded"] for res in ranks]
    for r, meta in enumerate(metas):
        if "error" in meta:
            pytest.fail(f"rank {r} failed:\n{meta['error']}")
    assert set(metas[0]) == set(metas[1])
    expected_keys = {f"{m}.{k}" for m in ("col", "row") for k in
                     ("weight", "bias", "_extra_state", "adapter.linear_in.weight",
                      "adapter.linear_in._extra_state", "adapter.linear_out.weight",
                      "adapter.linear_out._extra_state")}
    expected_keys |= {"lin.weight", "lin.bias", "lin.adapter.linear_in.weight",
                      "lin.adapter.linear_out.weight"}
    assert set(metas[0]) == expected_keys
    # TP-sharded on the axis the layer splits; everything else replicated across the TP ranks.
    tp_axis = {"col.weight": 0, "col.bias": 0, "col.adapter.linear_in.weight": 0,
               "col.adapter.linear_out.weight": 0, "row.weight": 1,
               "row.adapter.linear_in.weight": 1, "row.adapter.linear_out.weight": 0}
    global_shapes = {"col.weight": (24, 16), "col.bias": (24,),
                     "col.adapter.linear_in.weight": (4, 16),
                     "col.adapter.linear_out.weight": (24, 4), "row.weight": (16, 24),
                     "row.bias": (16,), "row.adapter.linear_in.weight": (4, 24),
                     "row.adapter.linear_out.weight": (16, 4), "lin.weight": (8, 16),
                     "lin.bias": (8,), "lin.adapter.linear_in.weight": (4, 16),
                     "lin.adapter.linear_out.weight": (8, 4)}
    for key in sorted(expected_keys):
        shards = [meta[key] for meta in metas]
        assert all(s["key"] == key for s in shards)
        if key.endswith("_extra_state"):
            assert all(s["type"] == "ShardedObject" for s in shards), key
        else:
            assert all(s["type"] == "ShardedTensor" for s in shards), key
            assert all(s["global_shape"] == global_shapes[key] for s in shards), key
        mains = [s for s in shards if not any(s["replica_id"])]
        if key in tp_axis:
            axis = tp_axis[key]
            for r, s in enumerate(shards):
                offset = [0] * len(s["global_shape"])
                offset[axis] = r * s["global_shape"][axis] // TP
                assert s["global_offset"] == tuple(offset), (key, r, s)
                assert s["local_shape"][axis] == s["global_shape"][axis] // TP, (key, r, s)
            assert len(mains) == TP, (key, shards)  # every rank owns its distinct shard
        else:
            assert all(s["global_offset"] == (0,) * len(s["global_shape"]) for s in shards), key
            # a replicated tensor has exactly one main replica, or a checkpoint writes it twice
            assert len(mains) == 1, (key, [s["replica_id"] for s in shards])
        if not key.endswith("_extra_state"):
            covered = sum(math.prod(s["local_shape"]) for s in mains)
            assert covered == math.prod(global_shapes[key]), key


# ---- bases that do their own scatter/gather: row input_is_parallel=False, column gather_output ---
def _whole_io_worker(rank: int, out_dir: str) -> None:
    """LoRA (eager) at TP=2 on a column base with gather_output=True and a row base with
    input_is_parallel=False, checked against fp64 from the gathered full weights."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from bridge.peft import LoRA
    from tests.megatron_utils import make_config

    def gather(t, dim):
        parts = [torch.empty_like(t) for _ in range(TP)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim)

    errors = []
    cfg = make_config(tensor_model_parallel_size=TP)
    for kind in ("column_gather_output", "row_input_not_parallel"):
        try:
            torch.manual_seed(SEED)
            init = lambda w: nn.init.normal_(w, std=0.3)  # noqa: E731
            if kind == "column_gather_output":
                base = ColumnParallelLinear(16, 12, config=cfg, init_method=init, bias=True,
                                            gather_output=True, skip_bias_add=False)
            else:
                base = RowParallelLinear(16, 12, config=cfg, init_method=init, bias=True,
                                         input_is_parallel=False, skip_bias_add=False)
            model = nn.Module()
            model.proj = base
            LoRA(target_modules=["proj"], dim=4, alpha=ALPHA, lora_B_init_method="normal",
                 kernel_backend="eager")(model)
            wrapper = model.proj
            g = torch.Generator().manual_seed(SEED + 1)
            x = torch.randn(3, 2, 16, generator=g, requires_grad=True)
            gy = torch.randn(3, 2, 12, generator=g)
            y, _ = wrapper(x)
            (y * gy).sum().backward()
            a, b = wrapper.adapter.linear_in.weight, wrapper.adapter.linear_out.weight
            a_dim = 0 if kind == "column_gather_output" else 1  # A split on r, or on K
            w_full = gather(base.weight.detach(), a_dim).double()
            bias = (gather(base.bias.detach(), 0) if a_dim == 0 else base.bias.detach()).double()
            a_ref = gather(a.detach(), a_dim).double().requires_grad_(True)
            b_ref = gather(b.detach(), 0).double().requires_grad_(True)
            x_ref = x.detach().double().requires_grad_(True)
            y_ref = x_ref @ w_full.t() + bias + (ALPHA / 4) * (x_ref @ a_ref.t()) @ b_ref.t()
            (y_ref * gy.double()).sum().backward()
            for name, got, want in (("y", y, y_ref), ("dx", x.grad, x_ref.grad),
                                    ("dA", a.grad, a_ref.grad.chunk(TP, a_dim)[rank]),
                                    ("dB", b.grad, b_ref.grad.chunk(TP, 0)[rank])):
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, k=f"{kind} {name}": f"{k}: {m}")
        except Exception:
            errors.append(f"{kind}:\n{traceback.format_exc()}")
    torch.save(errors, os.path.join(out_dir, f"whole_io_rank{rank}.pt"))


def test_tp2_bases_with_whole_input_or_output(tmp_path):
    """A row base with input_is_parallel=False splits x itself and a column base with
    gather_output=True gathers y itself: the eager adapter must follow (it crashed on shapes)."""
    from tests.megatron_utils import spawn_gloo

    spawn_gloo(_whole_io_worker, str(tmp_path), world_size=TP, tp=TP, args=(str(tmp_path),))
    for r in range(TP):
        errors = torch.load(tmp_path / f"whole_io_rank{r}.pt", weights_only=False)
        assert not errors, f"rank {r}:\n" + "\n".join(errors)
