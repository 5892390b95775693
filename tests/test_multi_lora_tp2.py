"""MultiLoRALinear at tensor-parallel size 2 (two gloo processes, one spawn, every case inside):
megatron's column and row bases with and without sequence parallelism, a duplicated base
(nn.Linear) fed its sequence-parallel shard (the slot counts narrowed to each rank's window), the
a2a row variant; the fused multi-adapter op and the module path; dropout 'pre' and 'post'.

Each rank builds the same layer from one seed (megatron's CPU initialisation draws the full
master weights and splits them), gathers the full base and slot weights, and checks its own
shards of y, dx, dA and dB against the fp64 single-LoRA-per-slot oracle of
tests/test_multi_lora_layers.py on the full micro-batch. The oracle's dropout mask is the one each
layout draws from the step's seed (kernels/philox.py): x [M, K] whole for a column base, each
rank's K slice with seed + rank for a row base ('pre'); each rank's N slice (column) or [M, N]
(row) for 'post'.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from tests.numerics import dtype_tol, rel_err, slotwise_lora_ref

pytest.importorskip("megatron.core", reason="megatron-core not installed")

TP, S, B, K, N, R_MAX = 2, 6, 2, 16, 12, 4
TOKENS = [5, 0, 7]  # 12 rows; the slot 0 / 2 boundary inside rank 0's sequence-parallel window
RANKS, ALPHAS = [3, 4, 1], [6.0, 2.0, 5.0]
TOL = dtype_tol(torch.float32, "chain")  # fp32, the base GEMM and the slot term summed over TP


@dataclass(frozen=True)
class Case:
    kind: str  # column | row | linear (duplicated: every rank the whole weight)
    sp: bool
    backend: str  # triton (the fused op) | eager (the module path)
    p: float = 0.0
    pos: str = "pre"
    a2a: bool = False


CASES = [
    Case("column", False, "triton"),
    Case("column", True, "triton", 0.3, "pre"),
    Case("column", True, "eager", 0.3, "pre"),
    Case("column", False, "eager", 0.3, "post"),
    Case("column", True, "triton", 0.3, "post"),
    Case("row", False, "triton", 0.3, "pre"),
    Case("row", True, "triton", 0.3, "post"),
    Case("row", True, "eager", 0.3, "pre"),
    Case("row", False, "eager", 0.3, "post"),
    Case("row", True, "eager", 0.3, "post", a2a=True),
    Case("linear", True, "triton", 0.3, "pre"),
    Case("linear", True, "eager"),
]


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(TP)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def _piece(t: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    return t.chunk(TP, dim)[rank]


def _check_case(case: Case, rank: int, group) -> None:
    from bridge.kernels.philox import dropout_keep_mask

    from bridge.peft.multi_lora_forward import multi_lora_plan
    from tests.megatron_utils import make_config
    from tests.test_multi_lora_layers import make_base, make_layer, run, step_seed

    cfg = make_config(tensor_model_parallel_size=TP, sequence_parallel=case.sp, hidden_size=K)
    base = make_base(case.kind, k=K, n=N, cfg=cfg)
    layer = make_layer(base, backend=case.backend, dropout=case.p, pos=case.pos, ranks=RANKS,
                       alphas=ALPHAS, r_max=R_MAX, a2a_experimental=case.a2a)
    g = torch.Generator().manual_seed(11)
    x_full = torch.randn(S, B, K, generator=g)
    dy_full = torch.randn(S, B, N, generator=g)
    row = case.kind == "row"
    seq = case.sp and case.kind != "row"  # the input is this rank's sequence shard
    x = _piece(x_full, 0, rank) if seq else (_piece(x_full, 2, rank) if row else x_full)
    if case.kind == "column":
        dy = _piece(dy_full, 2, rank)
    else:
        dy = _piece(dy_full, 0, rank) if case.sp else dy_full
    y, dx, das, dbs, _ = run(layer, x, TOKENS, dy=dy)
    plan = multi_lora_plan(layer)
    assert plan.path == ("fused" if case.backend == "triton" else "eager"), (case, plan)

    # the full weights (megatron split the same master weights on every rank)
    slots_a = [a.linear_in.weight.detach() for a in layer.adapters]
    slots_b = [a.linear_out.weight.detach() for a in layer.adapters]
    w, bias = base.weight.detach(), base.bias.detach()
    if case.kind == "column":
        w, bias = _gather(w, 0, group), _gather(bias, 0, group)
        slots_a = [_gather(a, 0, group) for a in slots_a]
        slots_b = [_gather(b, 0, group) for b in slots_b]
    elif row:
        w = _gather(w, 1, group)
        slots_a = [_gather(a, 1, group) for a in slots_a]
        slots_b = [_gather(b, 0, group) for b in slots_b]
    mask = None
    if case.p:
        seed, m = step_seed(), S * B
        if case.pos == "pre" and row:  # K split: each rank its own stream
            mask = torch.cat([dropout_keep_mask(seed + t, (m, K // TP), case.p, "cpu")
                              for t in range(TP)], 1)
        elif case.pos == "pre" and case.kind == "linear":  # each rank drops its own rows
            mask = dropout_keep_mask(seed, (m // TP, K), case.p, "cpu").repeat(TP, 1)
        elif case.pos == "pre":
            mask = dropout_keep_mask(seed, (m, K), case.p, "cpu")
        elif case.kind == "column":  # each rank masks its [M, N/tp] output shard
            mask = dropout_keep_mask(seed, (m, N // TP), case.p, "cpu").repeat(1, TP)
        elif row:
            mask = dropout_keep_mask(seed, (m, N), case.p, "cpu")
        else:
            mask = dropout_keep_mask(seed, (m // TP, N), case.p, "cpu").repeat(TP, 1)
    y_ref, dx_ref, _, da_ref, db_ref = slotwise_lora_ref(
        x_full.reshape(-1, K), w, bias, slots_a, slots_b, TOKENS, RANKS, ALPHAS,
        dy_full.reshape(-1, N), p=case.p, pos=case.pos, mask=mask)
    y_ref, dx_ref = y_ref.view(S, B, N), dx_ref.view(S, B, K)
    if case.kind == "column":
        want_y, want_dx = _piece(y_ref, 2, rank), (_piece(dx_ref, 0, rank) if case.sp else dx_ref)
    elif row:
        want_y, want_dx = (_piece(y_ref, 0, rank) if case.sp else y_ref), _piece(dx_ref, 2, rank)
    else:
        want_y, want_dx = _piece(y_ref, 0, rank), _piece(dx_ref, 0, rank)
    errs = {"y": _err(y, want_y), "dx": _err(dx, want_dx)}
    for j in range(len(RANKS)):
        da, db = das[j], dbs[j]
        if case.kind == "linear":  # each rank's rows: partial sums (megatron all-reduces them)
            dist.all_reduce(da, group=group)
            dist.all_reduce(db, group=group)
            want_a, want_b = da_ref[j], db_ref[j]
        elif case.kind == "column":
            want_a, want_b = _piece(da_ref[j], 0, rank), _piece(db_ref[j], 0, rank)
        else:
            want_a, want_b = _piece(da_ref[j], 1, rank), _piece(db_ref[j], 0, rank)
        if TOKENS[j]:
            errs[f"dA{j}"], errs[f"dB{j}"] = _err(da, want_a), _err(db, want_b)
        else:
            assert torch.count_nonzero(da) == 0 and torch.count_nonzero(db) == 0, case
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"rank {rank} {case}: relative errors above {TOL}: {bad}"


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return rel_err(got.reshape(want.shape), want)  # NaN (a padding rank read) fails


def _check_sharded_state_dict(kind: str, rank: int, group) -> None:
    """Every slot's factors in the layer's sharded_state_dict: this rank's shard of the full
    (gathered) slot weight at the offset it states, in a tensor of the full shape, so a slot
    checkpoint written at TP=2 reshards like the base's."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from tests.megatron_utils import make_config
    from tests.test_multi_lora_layers import make_base, make_layer

    cfg = make_config(tensor_model_parallel_size=TP, hidden_size=K)
    layer = make_layer(make_base(kind, k=K, n=N, cfg=cfg), backend="eager", ranks=RANKS,
                       alphas=ALPHAS, r_max=R_MAX)
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    sd = layer.sharded_state_dict("l.", (), {"dp_cp_group": dp})  # as a model passes it
    assert isinstance(sd.get("l.weight"), ShardedTensor), sorted(sd)
    a_dim = 0 if kind == "column" else 1  # A [r_max, K]: rank-split (column) or K-split (row)
    for i, slot in enumerate(layer.adapters):
        for name, dim in (("linear_in", a_dim), ("linear_out", 0)):
            key = f"l.adapters.{i}.{name}.weight"
            st = sd[key]
            local = getattr(slot, name).weight.detach()
            full = _gather(local, dim, group)
            assert isinstance(st, ShardedTensor) and tuple(st.global_shape) == tuple(full.shape), \
                (key, st)
            where = tuple(slice(o, o + n) for o, n in zip(st.global_offset, local.shape,
                                                           strict=True))
            assert torch.equal(full[where].nan_to_num(), st.data.nan_to_num()), key
            assert st.global_offset[dim] == rank * local.shape[dim], (key, st.global_offset)


def _worker(rank: int) -> None:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    for case in CASES:  # ~8 s for all of them; the spawn and imports dominate the test's time
        _check_case(case, rank, group)
    for kind in ("column", "row"):
        _check_sharded_state_dict(kind, rank, group)


@pytest.mark.slow
def test_multi_lora_at_tensor_parallel_2(tmp_path):
    from tests.conftest import KERNEL_TESTS_RUN
    from tests.megatron_utils import spawn_gloo

    if not KERNEL_TESTS_RUN:
        pytest.skip("the fused cases need the Triton interpreter (TRITON_INTERPRET=1)")
    spawn_gloo(_worker, str(tmp_path), world_size=TP, tp=TP)

