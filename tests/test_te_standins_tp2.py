"""The transformer-engine stand-ins at TP=2 (two spawned processes on gloo), with and without
sequence parallelism: on each rank a stand-in equals megatron-core's local layer of the same kind
built from the same seed (values, returned tuples and shapes, dX, norm-weight grads, sharded
state dict axes), TE's gathered-layernorm-output gradient rule holds, the userbuffer flags take
TE's values, and duplicated / grouped (expert) linears do no TP communication. All cases run in
one pair of processes (each start imports megatron); ranks record failures, the tests read them.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.nn.functional as F

from tests.numerics import rel_err

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

from tests.test_te_standins import TOL, B, K, N, S, _cfg, _init, _rand, build  # noqa: E402

pytestmark = pytest.mark.slow

# ---- TP=2: one spawn for every case --------------------------------------------------------------
TP = 2
TP2_CASES = ["column", "column-sp", "row", "row-sp", "lncol-LayerNorm", "lncol-LayerNorm-sp",
             "lncol-RMSNorm-sp", "lncol-gathered-sp", "lncol-gathered-full-grad-sp",
             "ub-flags-sp", "duplicated-sp", "grouped-explicit-comm", "bridge-utils-ub-overlap-sp"]


def _norm32(x, w, b, normalization, eps=1e-5):
    if normalization == "RMSNorm":
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _tp2_case(name: str, rank: int) -> None:
    """Run one TP=2 case on this rank; raise AssertionError on any mismatch."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    from tests import te_standins as te

    sp = name.endswith("-sp")
    group = parallel_state.get_tensor_model_parallel_group()
    cfg = _cfg(tensor_model_parallel_size=TP, sequence_parallel=sp,
               normalization="RMSNorm" if "RMSNorm" in name else "LayerNorm")
    s_local = S // TP if sp else S
    if name.startswith(("column", "row")):
        kind = name.split("-")[0]
        te_layer, local = build(kind, cfg), build(kind, cfg, local=True)
        assert torch.equal(te_layer.weight, local.weight), "same seed, same shard"
        assert te_layer.sequence_parallel is sp and te_layer.tp_size == TP
        if kind == "column":  # replicated (or this rank's sequence chunk with SP)
            x = _rand(S, B, K, seed=1).chunk(TP if sp else 1)[rank if sp else 0]
        else:  # split on K, the whole sequence
            x = _rand(S, B, N // TP, seed=1 + rank)
        res = []
        for layer in (te_layer, local):
            with torch.no_grad():
                layer.bias.copy_(_rand(layer.bias.shape[0], seed=2 + rank))
            xi = x.clone().requires_grad_(True)
            y, b = layer(xi)
            (y * _rand(*y.shape, seed=3 + rank)).sum().backward()
            res.append((y, xi.grad))
        y_shape = (S, B, N // TP) if kind == "column" else (s_local, B, K)
        assert tuple(res[0][0].shape) == y_shape, res[0][0].shape
        sharded = te_layer.sharded_state_dict(prefix="l.")["l.weight"]  # megatron's axes
        axis = 0 if kind == "column" else 1
        full = (N, K) if kind == "column" else (K, N)
        assert tuple(sharded.global_shape) == full
        assert sharded.global_offset[axis] == rank * full[axis] // TP
        for a, b_ in zip(res[0], res[1], strict=True):
            torch.testing.assert_close(a, b_, **TOL)
    elif name.startswith("lncol"):
        m = build("lncol", cfg, bias=False)
        local = build("column", cfg, bias=False, local=True)
        assert torch.equal(m.weight, local.weight)
        gathered = "gathered" in name
        m.return_layernorm_output = True
        m.return_layernorm_output_gathered = gathered
        m.drop_gathered_ln_out_grad = "full-grad" not in name
        params = [m.layer_norm_weight] + ([m.layer_norm_bias] if m.layer_norm_bias is not None
                                          else [])
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(_rand(K, seed=20 + i) * 0.3 + (1 - i))  # equal on every rank
        assert all(p.sequence_parallel is sp for p in params)
        x = _rand(S, B, K, seed=5).chunk(TP if sp else 1)[rank if sp else 0]
        x = x.contiguous().requires_grad_(True)
        (y, ln), _ = m(x)
        assert tuple(ln.shape) == ((S if gathered else s_local), B, K)
        gy = _rand(*y.shape, seed=6 + rank)
        gl = _rand(*ln.shape, seed=7 + rank)
        grads = torch.autograd.grad((y * gy).sum() + (ln * gl).sum(), [x, *params])
        x2 = x.detach().clone().requires_grad_(True)
        ref = [p.detach().clone().requires_grad_(True) for p in params]
        # the oracle: the norm on this rank's rows, then megatron's column linear (which gathers
        # the sequence itself under SP)
        ln2 = _norm32(x2, ref[0], ref[1] if len(ref) > 1 else None, cfg.normalization)
        y2, _ = local(ln2)
        ln_back = ln2
        if gathered:
            ln_back = mappings.gather_from_sequence_parallel_region(
                ln2, tensor_parallel_output_grad=True, group=group)
        loss2 = (y2 * gy).sum()
        if not (gathered and m.drop_gathered_ln_out_grad):
            loss2 = loss2 + (ln_back * gl).sum()
        grads2 = torch.autograd.grad(loss2, [x2, *ref])
        torch.testing.assert_close(y, y2, **TOL)
        torch.testing.assert_close(ln, ln_back, **TOL)
        for g, g2 in zip(grads, grads2, strict=True):
            torch.testing.assert_close(g, g2, **TOL)
    elif name == "ub-flags-sp":
        on = _cfg(tensor_model_parallel_size=TP, sequence_parallel=True, tp_comm_overlap=True)
        ln = build("lncol", on, tp_comm_buffer_name="qkv")
        assert (ln.ub_overlap_ag_fprop, ln.ub_overlap_rs_dgrad, ln.ub_bulk_wgrad,
                ln.ub_bulk_dgrad, ln.ub_overlap_rs_fprop) == (True, False, True, True, False)
        assert not hasattr(ln, "ub_overlap_ag")  # TE's LayerNormLinear has only the *_fprop flag
        col = build("column", on, tp_comm_buffer_name="fc1")
        assert (col.ub_overlap_ag_fprop, col.ub_overlap_rs_fprop) == (True, False)
        row = build("row", on, tp_comm_buffer_name="proj")
        assert (row.ub_overlap_rs_fprop, row.ub_overlap_ag_dgrad, row.ub_overlap_ag_fprop) == \
            (True, True, False)
        on.tp_comm_overlap_disable_qkv = True
        assert build("lncol", on, tp_comm_buffer_name="qkv").ub_overlap_ag_fprop is False
        off = build("lncol", cfg, tp_comm_buffer_name="qkv")  # SP on, overlap off
        assert not any(getattr(off, f) for f in ("ub_overlap_ag_fprop", "ub_bulk_wgrad"))
    elif name == "duplicated-sp":
        dup = te.TELinear(K, N, parallel_mode="duplicated", config=cfg, init_method=_init,
                          bias=True, skip_bias_add=False, skip_weight_param_allocation=False)
        assert (dup.tp_size, dup.tp_group, dup.parallel_mode, dup.sequence_parallel) == \
            (1, None, None, False)
        assert dup._tp_group is group
        assert dup.weight.sequence_parallel is True and dup.bias.sequence_parallel is True
        x = _rand(s_local, B, K, seed=1 + rank)  # this rank's sequence chunk: no communication
        y, _ = dup(x)
        assert rel_err(y, x.double() @ dup.weight.double().t() + dup.bias.double()) < 1e-6
    elif name == "grouped-explicit-comm":
        col = te.TEColumnParallelGroupedLinear(2, K, N, config=cfg, init_method=_init, bias=True,
                                               skip_bias_add=False, is_expert=True)
        row = te.TERowParallelGroupedLinear(2, N, K, config=cfg, init_method=_init, bias=False,
                                            skip_bias_add=False, is_expert=True)
        for m, shape in ((col, (N // TP, K)), (row, (K, N // TP))):
            assert m.explicit_expert_comm and m.parallel_mode is None and m.tp_size == 1
            assert tuple(m.weight0.shape) == shape and m.tp_group is None
        x = _rand(5, K, seed=1 + rank)
        y, _ = col(x, [3, 2])
        ref = torch.cat([x[:3].double() @ col.weight0.double().t() + col.bias0.double(),
                         x[3:].double() @ col.weight1.double().t() + col.bias1.double()])
        assert rel_err(y, ref) < 1e-6
        z, _ = row(y.detach(), [3, 2])
        assert tuple(z.shape) == (5, K)
    elif name == "bridge-utils-ub-overlap-sp":
        from bridge.peft.utils import get_adapter_attributes_from_linear

        on = _cfg(tensor_model_parallel_size=TP, sequence_parallel=True, tp_comm_overlap=True)
        ln = build("lncol", on, tp_comm_buffer_name="qkv")
        assert ln.ub_overlap_ag_fprop
        attrs = get_adapter_attributes_from_linear(ln)
        # with the all-gather overlapped in userbuffers the layer cannot return its gathered
        # layernorm output, so the adapter must gather itself
        assert not ln.return_layernorm_output_gathered, "gathered output asked under ub overlap"
        assert not attrs.disable_sequence_parallel_comm, "the adapter's own gather was disabled"
    else:
        raise ValueError(name)


def tp2_worker(rank: int, out_dir: str) -> None:
    results = {}
    for name in TP2_CASES:
        try:
            _tp2_case(name, rank)
            results[name] = ""
        except Exception:  # recorded: the test of this case fails with the traceback
            results[name] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    from tests.megatron_utils import spawn_gloo

    out = tmp_path_factory.mktemp("te_tp2")
    spawn_gloo(tp2_worker, str(out), world_size=TP, tp=TP, args=(str(out),))
    return [torch.load(out / f"rank{r}.pt") for r in range(TP)]


@pytest.mark.parametrize("name", TP2_CASES)
def test_tp2(name, tp2_results):
    for rank, res in enumerate(tp2_results):
        assert not res[name], f"rank {rank}:\n{res[name]}"
