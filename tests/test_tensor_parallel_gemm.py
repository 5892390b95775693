"""Tensor parallelism with the ``cublas`` GEMM strategy, and the ranks' agreement on ``auto``.

Two spawned processes on gloo (tests/test_tensor_parallel.py's cases, oracle and assembly,
imported): column, row and layernorm-column bases with and without sequence parallelism, the
Triton path (interpreted) with ``BRIDGE_LORA_GEMM=cublas``, against the single-process TP=1
eager oracle, with every rank's expand-kernel calls counted (the strategy really ran). Then
``auto`` with an injected timer that disagrees across ranks (rank 0 finds cublas faster, rank 1
fused): both ranks must run rank 0's choice, with rank 1 never timing.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import traceback

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

from tests.test_tensor_parallel import (  # noqa: E402
    TP,
    Case,
    check_case,
    run_case,
    triton_unavailable,
)

pytestmark = pytest.mark.slow

CUBLAS_CASES = [Case(kind, sp=sp, backend="triton", skip_bias_add=sp, seq=4, batch=1)
                for kind in ("column", "row", "lncol") for sp in (False, True)]
AGREE_CASE = Case("column", sp=False, backend="triton", seq=4, batch=1)


def _count_expand(gs) -> list:
    calls = []
    real = gs.launch_expand
    gs.launch_expand = lambda *a, **k: calls.append(1) or real(*a, **k)  # this process only
    return calls


def gemm_worker(rank: int, out_dir: str) -> None:
    gs = importlib.import_module("bridge.kernels.gemm_strategy")
    calls = _count_expand(gs)
    results = {}
    os.environ[gs.ENV_GEMM] = "cublas"
    for case in CUBLAS_CASES:
        try:
            before = len(calls)
            results[case.name] = run_case(case, TP, rank)
            results[case.name]["expand_calls"] = len(calls) - before
        except Exception:
            results[case.name] = {"error": traceback.format_exc()}
    del os.environ[gs.ENV_GEMM]
    times = {0: {"fused": 2.0, "cublas": 1.0}, 1: {"fused": 1.0, "cublas": 2.0}}[rank]
    timed = []
    timer = lambda name, fn, device: timed.append(name) or times[name]  # noqa: E731
    chooser = gs.GemmChooser(timer=timer, cache_dir=os.path.join(out_dir, f"cache{rank}"))
    try:
        with gs.use_chooser(chooser):
            before = len(calls)
            res = run_case(AGREE_CASE, TP, rank)
        res["expand_calls"] = len(calls) - before
        res["timed"] = timed
        res["decisions"] = {k.direction: (d.choice, d.source)
                            for k, d in chooser.decisions().items()}
    except Exception:
        res = {"error": traceback.format_exc()}
    results["agree"] = res
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def gemm_results(tmp_path_factory):
    why = triton_unavailable()
    if why:
        pytest.skip(why)
    from tests.megatron_utils import destroy_parallel, init_parallel, spawn_gloo

    out_dir = tmp_path_factory.mktemp("tp2gemm")
    spawn_gloo(gemm_worker, str(out_dir), world_size=TP, tp=TP, args=(str(out_dir),))
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(TP)]
    init_parallel(rank=0, world_size=1, tp=1,
                  init_file=str(tmp_path_factory.mktemp("tp1gemm") / "dist_init"))
    try:
        oracle = {case.name: run_case(dataclasses.replace(case, backend="eager"), 1, 0)
                  for case in [*CUBLAS_CASES, AGREE_CASE]}
    finally:
        destroy_parallel()
    return ranks, oracle


@pytest.mark.parametrize("case", CUBLAS_CASES, ids=lambda c: c.name)
def test_tp2_cublas_equals_tp1(case, gemm_results):
    ranks, oracle = gemm_results
    for r, res in enumerate(ranks):
        assert res[case.name].get("expand_calls") == 2, (r, res[case.name].get("error"))
    check_case(case, (ranks, oracle))


def test_tp2_ranks_run_group_rank_0s_choice(gemm_results):
    ranks, oracle = gemm_results
    for r, res in enumerate(ranks):
        if "error" in res["agree"]:
            pytest.fail(f"rank {r} failed:\n{res['agree']['error']}")
    r0, r1 = ranks[0]["agree"], ranks[1]["agree"]
    assert r0["timed"] == ["fused", "cublas", "fused", "cublas"] and r1["timed"] == []
    assert r0["decisions"] == {"fwd": ("cublas", "timed"), "bwd": ("cublas", "timed")}
    assert r1["decisions"] == {"fwd": ("cublas", "group rank 0"),
                               "bwd": ("cublas", "group rank 0")}
    assert r0["expand_calls"] == r1["expand_calls"] == 2  # rank 1 ran cublas, not its 'fused'
    check_case(AGREE_CASE, ([{AGREE_CASE.name: res["agree"]} for res in ranks], oracle))
