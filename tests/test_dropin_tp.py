"""The TP=2 cases of the Megatron-Bridge drop-in API (two gloo processes, one spawn): LoRAMerge on
column and row shards (and LoRALinear.weight's gradient through its gather), all2all_hp2sp,
sequence_parallel_input_regather (same values and gradients, the gathered input not kept for
backward) and the a2a_experimental row adapter (same as gather + scatter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core", reason="megatron-core not installed")

S, B, K, N, R = 8, 2, 16, 12, 4  # S, K, N, R divisible by the TP size
TOL = dict(rtol=1e-10, atol=1e-10)  # fp64 throughout


def _full(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_lora_merge(rank: int, tp: int, group) -> None:
    from bridge.peft import LoRAMerge

    w, a, b = _full(1, N, K), _full(2, R, K), _full(3, N, R)
    n, k, r = (slice(rank * d // tp, (rank + 1) * d // tp) for d in (N, K, R))
    column = LoRAMerge().merge(w[n], b[n], a[r], 8, R, tp_group=group)
    torch.testing.assert_close(column, (w + 2.0 * b @ a)[n], **TOL)
    row = LoRAMerge().merge(w[:, k], b[n], a[:, k], 8, R, tp_group=group)
    torch.testing.assert_close(row, (w + 2.0 * b @ a)[:, k], **TOL)
    # differentiable: the gradient of a loss on the effective shard reaches each A shard summed
    a_k = a[r].clone().requires_grad_(True)
    b_k = b[n].clone().requires_grad_(True)
    g = _full(4, N, K)
    (LoRAMerge().merge(w[n], b_k, a_k, 8, R, tp_group=group) * g[n]).sum().backward()
    torch.testing.assert_close(a_k.grad, (2.0 * b.t() @ g)[r], **TOL)
    torch.testing.assert_close(b_k.grad, (2.0 * g @ a.t())[n], **TOL)


def _check_all2all(rank: int, tp: int, group) -> None:
    from bridge.peft.utils import all2all_hp2sp

    x, g = _full(5, S, B, K), _full(6, S, B, K)
    cols, seq = slice(rank * K // tp, (rank + 1) * K // tp), slice(rank * S // tp,
                                                                   (rank + 1) * S // tp)
    x_k = x[..., cols].clone().requires_grad_(True)
    y = all2all_hp2sp(x_k, group)
    torch.testing.assert_close(y, x[seq], **TOL)
    (y * g[seq]).sum().backward()
    torch.testing.assert_close(x_k.grad, g[..., cols], **TOL)


def _adapter(cfg, input_is_parallel: bool, **kw):
    from bridge.peft import ParallelLinearAdapter

    k, n = (N, K) if input_is_parallel else (K, N)
    torch.manual_seed(0)
    adapter = ParallelLinearAdapter(k, n, R, "decoder.layers.0.x", activation="identity",
                                    column_init_method="normal", row_init_method="normal",
                                    input_is_parallel=input_is_parallel, alpha=8.0,
                                    model_parallel_config=cfg, disable_sequence_parallel_comm=False,
                                    **kw)
    return adapter.train()


def _run(adapter, x, g):
    """Output, dx, dA, dB and the shapes of every tensor autograd saved in forward."""
    adapter.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t,
                                                  lambda t: t):
        y = adapter(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, adapter.linear_in.weight.grad, adapter.linear_out.weight.grad, saved


def _check_regather(rank: int, tp: int, cfg) -> None:
    adapter = _adapter(cfg, False, sequence_parallel_input_regather=True)
    seq = slice(rank * S // tp, (rank + 1) * S // tp)
    n = slice(rank * N // tp, (rank + 1) * N // tp)
    x, g = _full(7, S, B, K)[seq], _full(8, S, B, N)[..., n]  # SP input, N/tp output
    assert adapter._use_regather()
    got = _run(adapter, x, g)
    adapter.sequence_parallel_input_regather = False
    want = _run(adapter, x, g)
    for name, a, b in zip(("y", "dx", "dA", "dB"), got[:4], want[:4], strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    gathered = (S, B, K)
    assert gathered in want[4], want[4]  # the plain path keeps the gathered input for backward
    assert gathered not in got[4], got[4]  # regather keeps only this rank's shard
    assert (S // tp, B, K) in got[4]
    adapter.eval()
    assert not adapter._use_regather()  # nothing to save in eval: the plain path


def _check_a2a(rank: int, tp: int, cfg) -> None:
    plain, a2a = _adapter(cfg, True), _adapter(cfg, True, a2a_experimental=True)
    a2a.load_state_dict(plain.state_dict())
    assert a2a.linear_out.gather_output is False and plain.linear_out.gather_output is True
    seq = slice(rank * S // tp, (rank + 1) * S // tp)
    cols = slice(rank * N // tp, (rank + 1) * N // tp)
    x, g = _full(9, S, B, N)[..., cols], _full(10, S, B, K)[seq]  # K-split input, SP output
    for name, a, b in zip(("y", "dx", "dA", "dB"), _run(a2a, x, g)[:4], _run(plain, x, g)[:4],
                          strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=name)


def _lora_sets_up_the_regather(cfg) -> None:
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from bridge.peft import LoRA

    model = nn.Module()
    model.linear_fc1 = ColumnParallelLinear(K, N, config=cfg, init_method=nn.init.normal_,
                                            bias=False, gather_output=False)
    LoRA(target_modules=["linear_fc1"], dim=R, sequence_parallel_input_regather=True)(model)
    adapter = model.linear_fc1.adapter
    assert adapter.sequence_parallel_input_regather and not adapter.disable_sequence_parallel_comm
    assert adapter._use_regather()


def _worker(rank: int) -> None:
    from megatron.core import parallel_state

    from tests.megatron_utils import make_config

    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    cfg = make_config(params_dtype=torch.float64, sequence_parallel=True,
                      tensor_model_parallel_size=tp)
    _check_lora_merge(rank, tp, group)
    _check_all2all(rank, tp, group)
    _check_regather(rank, tp, cfg)
    _check_a2a(rank, tp, cfg)
    _lora_sets_up_the_regather(cfg)


@pytest.mark.slow
def test_drop_in_api_at_tensor_parallel_2(tmp_path):
    from tests.megatron_utils import spawn_gloo

    spawn_gloo(_worker, str(tmp_path))
