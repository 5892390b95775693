"""Expert LoRA under expert / tensor / sequence parallelism equals world size 1.

A tiny megatron-core MoE GPT (tests/test_moe_lora_models.py: 4 experts, top-2, a shared expert,
the all-gather dispatcher) with LoRA on attention, shared-expert, expert linears and the router,
in four adapter layouts: SequentialMLP (one adapter per expert linear), and over TE-shaped grouped
linears one adapter shared by every expert, per-expert adapters, and the shared-outer layout.

World size 1 (this process) builds each model, saves it with ``dist_checkpointing`` and runs the
oracle on a global batch of 4 sequences, recording the routing. Spawned ranks (two processes,
then four) load that checkpoint into their own parallel layout (so the weights are the same by
construction, and the load is resharding), replay the routing (identical by construction), wrap
the model in megatron's DDP, run forward and backward on their data-parallel share of the batch,
finalise the gradients as megatron does (``finalize_model_grads``), and write (a) their per-token
losses, (b) the reduced adapter gradients, saved through the adapters' own sharded state dicts
into one checkpoint (so every layout, shard and replica id is assembled by dist_checkpointing
itself, and a replica that misses a reduction is what gets written or compared), (c) the loaded
adapters saved again, which this process loads back at world size 1 and compares bitwise.

Layouts (all with the expert adapters' reductions in play):

    world 2   ep2       EP=2 (dense DP=2, expert DP=1): shared adapter summed over EP, dense
                        adapters averaged over DP, expert ones not reduced over DP
              etp2      expert TP=2 at TP=1 (no sequence parallelism): gathered factors'
                        reduce-scatter, experts seeing both data-parallel ranks' tokens
              tp2-sp    TP=2 = expert TP, sequence parallel (the router adapter's partial
                        gradients all-reduced over TP by finalize_model_grads)
              ep2-tp2   TP=2 with expert TP=1, EP=2 (experts split across the TP ranks), SP
    world 4   ep2-tp2x  EP=2 x TP=2 (expert TP 2), SP, dense DP=2
              ep2-edp2  EP=2, expert DP=2 (dense DP=4): per-expert adapters reduced over the
                        expert-DP group, not the dense one

megatron-core 0.16 refuses MoE training at TP > 1 without sequence parallelism, so TP > 1 runs
with it; expert TP without SP is the etp2 layout, and a TP=2 forward without SP (eval) is checked
too. One spawn per world size runs every layout (megatron's parallel state re-initialised in
between) and every adapter layout: each start imports megatron-core (seconds per process).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

from tests.test_moe_lora_models import (  # noqa: E402
    SEQ,
    apply_lora,
    moe_config,
    moe_gpt,
    tokens,
)

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 4
TOL = dict(rtol=2e-5, atol=2e-6)
CASES = {  # adapter layout -> (model layout, LoRA options)
    "sequential": ("sequential", {}),
    "shared": ("grouped", {}),
    "per_expert": ("grouped", {"share_expert_adapters": False}),
    "shared_outer": ("grouped", {"experts_shared_outer_loras": True}),
}


@dataclass(frozen=True)
class Layout:
    name: str
    world: int
    tp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    eval_only: bool = False

    @property
    def dp(self) -> int:
        return self.world // self.tp


LAYOUTS = [Layout("ep2", 2, ep=2), Layout("etp2", 2, etp=2),
           Layout("tp2-sp", 2, tp=2, etp=2, sp=True), Layout("ep2-tp2", 2, tp=2, ep=2, sp=True),
           Layout("tp2-eval", 2, tp=2, etp=2, eval_only=True),
           Layout("ep2-tp2x", 4, tp=2, ep=2, etp=2, sp=True), Layout("ep2-edp2", 4, ep=2)]
TRAIN = {"ep2", "ep2-tp2x"}  # layouts that also run a short training
LEGACY = "ep2"  # where a legacy (2-D) shared-adapter checkpoint is loaded
EVAL_CASES = ("sequential", "shared")  # the eval-only layout's adapter layouts


def adapter_keys(sharded: dict) -> dict:
    return {k: v for k, v in sharded.items() if ".adapter." in k}


def build(case: str, layout: Layout | None, seed: int = 0):
    model_layout, lora = CASES[case]
    kw = {} if layout is None else dict(tp=layout.tp, ep=layout.ep, etp=layout.etp,
                                        sp=layout.sp)
    return apply_lora(moe_gpt(model_layout, moe_config(**kw), seed=seed), **lora)


def _init(world: int, rank: int, init_file: str, layout: Layout | None) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if layout is None:
        ps.initialize_model_parallel()
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                     expert_model_parallel_size=layout.ep,
                                     expert_tensor_parallel_size=layout.etp)


def _save(sharded: dict, directory: str) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded, directory)
    dist.barrier()


def _load_into(model, directory: str, only_adapters: bool = False) -> None:
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    if only_adapters:
        sharded = adapter_keys(sharded)
    model.load_state_dict(dist_checkpointing.load(sharded, directory), strict=not only_adapters)


def _replay(indices: list[torch.Tensor] | None) -> None:
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    if indices is None:
        RouterReplay.clear_global_router_replay_action()
        return
    RouterReplay.set_replay_data(indices)
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def _local_slice(layout: Layout) -> tuple[slice, slice]:
    """(batch rows, sequence positions) of this rank's router tokens."""
    from megatron.core import parallel_state as ps

    per = GLOBAL_BATCH // layout.dp
    d = ps.get_data_parallel_rank()
    rows = slice(d * per, (d + 1) * per)
    if not layout.sp:
        return rows, slice(0, SEQ)
    t, chunk = ps.get_tensor_model_parallel_rank(), SEQ // layout.tp
    return rows, slice(t * chunk, (t + 1) * chunk)


# ---- one layout on the spawned ranks ------------------------------------------------------------
def run_layout(layout: Layout, root: str) -> dict:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    out = {}
    rows, positions = _local_slice(layout)
    ids, pos, mask = tokens(GLOBAL_BATCH)
    ids, pos = ids[rows], pos[rows]
    for case in CASES:
        base = os.path.join(root, case)
        model = build(case, layout, seed=1)  # other values: everything comes from the load
        _load_into(model, os.path.join(base, "ws1"))
        _save(adapter_keys(model.sharded_state_dict()),
              os.path.join(base, layout.name, "reloaded"))
        recorded = torch.load(os.path.join(base, "routing.pt"))
        _replay([r.view(SEQ, GLOBAL_BATCH, -1)[positions, rows].reshape(-1, r.shape[-1])
                 for r in recorded])
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        loss = ddp(ids, pos, mask, labels=ids)
        loss.mean().backward()
        _replay(None)
        finalize_model_grads([ddp])
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(p.main_grad)
        _save(adapter_keys(model.sharded_state_dict()), os.path.join(base, layout.name, "grads"))
        res = {"loss": loss.detach(), "rows": rows}
        if layout.name in TRAIN and case in ("sequential", "shared"):
            res["train"] = _train(case, layout, base, ids, pos, mask)
        if layout.name == LEGACY and case == "shared":
            res["legacy"] = _load_legacy(layout, base)
        out[case] = res
    return out


def _train(case, layout, base, ids, pos, mask, steps: int = 8, lr: float = 0.2) -> dict:
    """SGD on the adapters (megatron DDP gradients), normal routing: the loss falls, the base
    stays bitwise, every adapter factor moves."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    model = build(case, layout, seed=1)
    _load_into(model, os.path.join(base, "ws1"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    losses = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        loss = ddp(ids, pos, mask, labels=ids).mean()
        loss.backward()
        finalize_model_grads([ddp])
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.sub_(lr * p.main_grad)
        losses.append(float(loss))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    after = dict(model.named_parameters())
    return {"losses": losses,
            "base_changed": [n for n in before if n not in trainable
                             and not torch.equal(before[n], after[n])],
            "adapters_unchanged": [n for n in trainable if torch.equal(before[n], after[n])],
            "non_adapter_trainable": sorted(n for n in trainable if ".adapter." not in n)}


def _load_legacy(layout, base) -> dict:
    """A shared adapter saved in the 2-D layout loads at EP=2 once switched."""
    from megatron.core import dist_checkpointing

    from bridge.peft.utils import enable_legacy_shared_expert_adapter_loading

    model = build("shared", layout, seed=1)
    directory = os.path.join(base, "legacy")
    sharded = adapter_keys(model.sharded_state_dict())
    try:
        dist_checkpointing.load(sharded, directory)
        refused = ""
    except BaseException as exc:  # noqa: BLE001  (torch's CheckpointException is one)
        if isinstance(exc, KeyboardInterrupt):
            raise
        refused = f"{type(exc).__name__}: {exc}"  # the expert-axis layout cannot read 2-D ones
    switched = enable_legacy_shared_expert_adapter_loading(model, sharded, directory)
    _load_into(model, directory, only_adapters=True)
    return {"refused": refused, "switched": switched,
            "values": {n: p.detach().clone() for n, p in model.named_parameters()
                       if ".mlp.experts." in n and ".adapter." in n}}


def run_eval(layout: Layout, root: str) -> dict:
    """TP=2 (expert TP 2) without sequence parallelism: an eval forward of the full batch on both
    ranks (megatron 0.16 refuses MoE training there)."""
    out = {}
    ids, pos, mask = tokens(GLOBAL_BATCH)
    for case in EVAL_CASES:
        base = os.path.join(root, case)
        model = build(case, layout, seed=1)
        _load_into(model, os.path.join(base, "ws1"))
        _replay(list(torch.load(os.path.join(base, "routing.pt"))))
        model.eval()
        with torch.no_grad():
            out[case] = {"loss": model(ids, pos, mask, labels=ids), "rows": slice(0, GLOBAL_BATCH)}
        _replay(None)
    return out


def worker(rank: int, world: int, root: str, layouts: list) -> None:
    from tests.conftest import install_megatron_cpu_shims

    install_megatron_cpu_shims()
    torch.set_num_threads(1)
    init_file = os.path.join(root, f"dist_init_{world}")
    results = {}
    for layout in layouts:
        try:
            _init(world, rank, init_file, layout)
            results[layout.name] = (run_eval if layout.eval_only else run_layout)(layout, root)
        except Exception:  # recorded: this layout's tests fail with the traceback
            results[layout.name] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(root, f"w{world}_rank{rank}.pt"))
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.destroy_process_group()


# ---- world size 1: the oracle, and reading back what the ranks saved ------------------------------
def _oracle(case: str, root: str) -> dict:
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    base = os.path.join(root, case)
    model = build(case, None, seed=0)
    _save(model.sharded_state_dict(), os.path.join(base, "ws1"))
    if case == "shared":  # the same adapters in the earlier 2-D layout
        for m in model.modules():
            if hasattr(m, "use_legacy_shared_expert_adapter_checkpoint"):
                m.use_legacy_shared_expert_adapter_checkpoint = m._uses_grouped_expert_sharding()
        _save(adapter_keys(model.sharded_state_dict()), os.path.join(base, "legacy"))
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    ids, pos, mask = tokens(GLOBAL_BATCH)
    loss = model(ids, pos, mask, labels=ids)
    torch.save([r.get_recorded_indices() for r in RouterReplay.global_router_replay_instances],
               os.path.join(base, "routing.pt"))
    RouterReplay.clear_global_router_replay_action()
    loss.mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable), sorted(trainable)
    return {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in trainable.items()},
            "adapters": {n: p.detach().clone() for n, p in trainable.items()}}


def _read_back(case: str, directory: str) -> dict:
    model = build(case, None, seed=2)
    _load_into(model, directory, only_adapters=True)
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}


def _at_world_size_1(root: str, name: str, fn):
    from tests.megatron_utils import destroy_parallel, init_parallel

    init_parallel(rank=0, world_size=1, tp=1, init_file=os.path.join(root, f"ws1_{name}"))
    try:
        return fn()
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    import torch.multiprocessing as mp

    root = str(tmp_path_factory.mktemp("moe_parallel"))
    oracle = _at_world_size_1(root, "oracle", lambda: {c: _oracle(c, root) for c in CASES})
    ranks = {}
    for world in (2, 4):
        layouts = [lay for lay in LAYOUTS if lay.world == world]
        mp.spawn(worker, args=(world, root, layouts), nprocs=world, join=True)
        ranks[world] = [torch.load(os.path.join(root, f"w{world}_rank{r}.pt"), weights_only=False)
                        for r in range(world)]

    def read_all():
        back = {}
        for lay in LAYOUTS:
            if lay.eval_only or "error" in ranks[lay.world][0][lay.name]:
                continue
            for case in CASES:
                base = os.path.join(root, case, lay.name)
                back[(lay.name, case)] = {what: _read_back(case, os.path.join(base, what))
                                          for what in ("grads", "reloaded")}
        return back

    return oracle, ranks, _at_world_size_1(root, "read", read_all)


def _results(moe_runs, layout: Layout, case: str) -> list[dict]:
    _, ranks, _ = moe_runs
    out = []
    for r, res in enumerate(ranks[layout.world]):
        got = res[layout.name]
        if "error" in got:
            pytest.fail(f"{layout.name} rank {r} failed:\n{got['error']}")
        assert case in got, f"{layout.name} rank {r} ran {sorted(got)}, not {case}"
        out.append(got[case])
    return out


RUN_LAYOUTS = [lay for lay in LAYOUTS if not lay.eval_only]


# ---- the tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("layout", "case"), [
    pytest.param(lay, case, id=f"{lay.name}-{case}") for lay in LAYOUTS for case in CASES
    if not lay.eval_only or case in EVAL_CASES])
def test_loss_matches_world_size_1(moe_runs, layout, case):
    oracle = moe_runs[0][case]
    for r, res in enumerate(_results(moe_runs, layout, case)):
        torch.testing.assert_close(res["loss"], oracle["loss"][res["rows"]], **TOL,
                                   msg=lambda m, r=r: f"rank {r}: {m}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", RUN_LAYOUTS, ids=lambda lay: lay.name)
def test_every_adapter_gradient_matches_world_size_1(moe_runs, layout, case):
    _results(moe_runs, layout, case)  # fails with a rank's traceback
    oracle, grads = moe_runs[0][case]["grads"], moe_runs[2][(layout.name, case)]["grads"]
    assert set(grads) == set(oracle)
    for name, want in oracle.items():
        assert want.abs().sum() > 0, name  # every factor is trained at this step
        torch.testing.assert_close(grads[name], want, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", RUN_LAYOUTS, ids=lambda lay: lay.name)
def test_checkpoint_reshards_bitwise(moe_runs, layout, case):
    """Saved at world size 1, loaded in the layout, saved there, loaded at world size 1 again:
    every adapter tensor bitwise what world size 1 saved."""
    _results(moe_runs, layout, case)
    saved, back = moe_runs[0][case]["adapters"], moe_runs[2][(layout.name, case)]["reloaded"]
    assert set(back) == set(saved)
    for name, want in saved.items():
        assert torch.equal(back[name], want), name


@pytest.mark.parametrize("case", ["sequential", "shared"])
@pytest.mark.parametrize("layout", sorted(TRAIN))
def test_training_lowers_the_loss_and_changes_only_adapters(moe_runs, layout, case):
    lay = next(x for x in LAYOUTS if x.name == layout)
    for r, res in enumerate(_results(moe_runs, lay, case)):
        train = res["train"]
        losses = train["losses"]
        # every step lowers it (the tiny model learns slowly at this step size: ~0.15 in 8)
        assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), (r, losses)
        assert losses[-1] < losses[0] - 0.1, (r, losses)
        assert not train["base_changed"], (r, train["base_changed"])
        assert not train["adapters_unchanged"], (r, train["adapters_unchanged"])
        assert not train["non_adapter_trainable"], r


def test_legacy_shared_expert_checkpoint_loads_at_ep2(moe_runs):
    lay = next(x for x in LAYOUTS if x.name == LEGACY)
    oracle = moe_runs[0]["shared"]["adapters"]
    for r, res in enumerate(_results(moe_runs, lay, "shared")):
        legacy = res["legacy"]
        assert legacy["refused"], r  # the expert-axis layout does not read the 2-D tensors
        assert legacy["switched"], r
        assert legacy["values"]
        for name, value in legacy["values"].items():
            assert torch.equal(value, oracle[name]), (r, name)  # experts.linear_fcX: one adapter
