"""merge_lora / unmerge_lora / merge_and_unload: merged weights against W + s·B@A computed here,
model outputs unchanged by merging, TP=2 merges each rank's shard correctly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bridge.peft.dora import DoRA
from bridge.peft.lora import LoRA
from bridge.peft.lora_layers import LinearAdapter, LoRALinear
from bridge.peft.lora_merge import MergeError, merge_and_unload, merge_lora, unmerge_lora
from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter

R, ALPHA = 4, 8.0
S = ALPHA / R


def randomise_adapters(model, seed=1, scale=0.1):
    """Non-zero factors (rank-dependent under TP: each rank holds other shards), and a magnitude
    that is no longer the initial norm (deterministic, so replicated magnitudes stay equal)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    g = torch.Generator().manual_seed(seed + 1000 * rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_magnitude"):
                p.mul_(1 + 0.2 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)))
            elif ".adapter." in name or name.startswith("adapter."):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


class TwoLinears(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.linear_fc1 = nn.Linear(16, 24, dtype=dtype)
        self.linear_fc2 = nn.Linear(24, 8, dtype=dtype)

    def forward(self, x):
        out = self.linear_fc1(x)
        out = out[0] if isinstance(out, tuple) else out
        out = self.linear_fc2(torch.relu(out))
        return out[0] if isinstance(out, tuple) else out


def _wrap_lora(base: nn.Linear) -> LoRALinear:
    adapter = ParallelLinearAdapter(base.in_features, base.out_features, R, activation="identity",
                                    alpha=ALPHA, dropout_position="pre",
                                    params_dtype=base.weight.dtype)
    base.requires_grad_(False)
    return LoRALinear(base, adapter, kernel_backend="eager")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_weights(dtype):
    torch.manual_seed(0)
    model = TwoLinears(dtype)
    model.linear_fc1 = _wrap_lora(model.linear_fc1)
    model.linear_fc2 = _wrap_lora(model.linear_fc2)
    randomise_adapters(model)
    originals = {n: m.to_wrap.weight.detach().clone() for n, m in model.named_children()}
    x = torch.randn(5, 16, dtype=dtype)
    before = model(x)
    merge_lora(model)
    for name, m in model.named_children():
        a, b = m.adapter.linear_in.weight.double(), m.adapter.linear_out.weight.double()
        want = (originals[name].double() + S * b @ a).to(dtype)
        ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -23
        torch.testing.assert_close(m.to_wrap.weight, want, rtol=ulp, atol=1e-6)
        assert not m.adapter_enabled
    merged = {n: m.to_wrap.weight.detach().clone() for n, m in model.named_children()}
    after = model(x)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, **tol)
    with pytest.raises(MergeError, match=r"already merged.*linear_fc1"):
        merge_lora(model)
    unmerge_lora(model)
    for name, m in model.named_children():
        assert m.adapter_enabled
        if dtype == torch.float32:
            torch.testing.assert_close(m.to_wrap.weight, originals[name], rtol=0, atol=1e-6)
        else:  # within the two bf16 roundings (half an ulp each: <= 2^-8 relative)
            w0 = originals[name].float()
            diff = (m.to_wrap.weight.float() - w0).abs()
            assert (diff <= 2 ** -8 * (w0.abs() + merged[name].float().abs()) * 1.01).all()
            assert not torch.equal(merged[name], originals[name])
    with pytest.raises(MergeError, match="not merged"):
        unmerge_lora(model)


def test_merge_and_unload_plain_linears():
    torch.manual_seed(0)
    model = LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=R, alpha=ALPHA,
                 kernel_backend="eager")(TwoLinears())
    assert isinstance(model.linear_fc1, LoRALinear)
    assert isinstance(model.linear_fc1.adapter, LinearAdapter)
    randomise_adapters(model)
    for m in (model.linear_fc1, model.linear_fc2):
        with torch.no_grad():
            m.adapter.linear_in.weight.normal_()
            m.adapter.linear_out.weight.normal_()
    x = torch.randn(5, 16)
    before = model(x)
    fc1 = model.linear_fc1
    want = fc1.to_wrap.weight.double() + S * (
        fc1.adapter.linear_out.weight.double() @ fc1.adapter.linear_in.weight.double())
    torch.testing.assert_close(fc1.weight.double(), want, rtol=1e-6, atol=1e-6)  # effective W
    w0 = fc1.to_wrap.weight.detach().clone()
    merge_lora(model)  # in place: the adapter switches off, the weight holds it
    torch.testing.assert_close(fc1.to_wrap.weight.double(), want, rtol=1e-6, atol=1e-6)
    assert fc1.weight is fc1.to_wrap.weight  # adapter off: the (merged) base weight
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeError, match=r"already merged.*linear_fc1"):
        merge_lora(model)
    unmerge_lora(model)
    torch.testing.assert_close(fc1.to_wrap.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    plain = merge_and_unload(model)
    assert type(plain.linear_fc1) is nn.Linear and type(plain.linear_fc2) is nn.Linear
    torch.testing.assert_close(plain.linear_fc1.weight.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeError, match="no LoRA/DoRA adapters"):
        merge_and_unload(plain)


def test_dora_merge_and_unmerge():
    torch.manual_seed(0)
    model = DoRA(target_modules=["linear_fc1", "linear_fc2"], dim=R, alpha=ALPHA,
                 lora_B_init_method="normal")(TwoLinears(torch.float64))
    randomise_adapters(model)
    w0 = model.linear_fc1.to_wrap.weight.detach().clone()
    a = model.linear_fc1.adapter.linear_in.weight.detach()
    b = model.linear_fc1.adapter.linear_out.weight.detach()
    m = model.linear_fc1.adapter.weight_magnitude.detach()
    x = torch.randn(3, 16, dtype=torch.float64)
    before = model(x)
    merge_lora(model)
    v = w0 + S * b @ a
    torch.testing.assert_close(model.linear_fc1.to_wrap.weight, m[:, None] * v / v.norm(dim=1,
                               keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)
    unmerge_lora(model)
    torch.testing.assert_close(model.linear_fc1.to_wrap.weight, w0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)
    plain = merge_and_unload(model)
    assert type(plain.linear_fc1) is nn.Linear
    torch.testing.assert_close(plain(x), before, rtol=1e-10, atol=1e-10)


def test_merge_rejects_mismatched_adapter():
    base = nn.Linear(16, 24)
    wrapper = _wrap_lora(base)
    wrapper.adapter = ParallelLinearAdapter(16, 12, R, activation="identity", alpha=ALPHA)
    with pytest.raises(MergeError, match=r"cannot merge : the adapter's delta has shape "
                                         r"\(12, 16\) but the base weight shard has shape "
                                         r"\(24, 16\)"):
        merge_lora(wrapper)


def test_layernorm_linear_unwrapped_returns_plain_output(megatron_tp1):
    from bridge.layers import LayerNormColumnParallelLinear
    from tests.megatron_utils import make_config

    cfg = make_config(normalization="RMSNorm")
    holder = nn.Module()
    holder.linear_qkv = LayerNormColumnParallelLinear(
        64, 48, config=cfg, init_method=nn.init.normal_, gather_output=False, bias=False,
        skip_bias_add=False)
    model = LoRA(target_modules=["linear_qkv"], dim=R, alpha=ALPHA, kernel_backend="eager")(holder)
    randomise_adapters(model)
    x = torch.randn(3, 2, 64)
    before, _ = model.linear_qkv(x)
    plain = merge_and_unload(model)
    out = plain.linear_qkv(x)
    assert isinstance(out, tuple) and isinstance(out[0], torch.Tensor) and out[1] is None
    torch.testing.assert_close(out[0], before, rtol=1e-5, atol=1e-5)


# ---- GPT models at TP=1 here and TP=2 in two gloo processes -------------------------------------
def _gpt_merge_checks(transform) -> None:
    """Merge/unmerge/unload a tiny GPT: outputs unchanged, weights restored, no wrappers left."""
    from bridge.peft.adapter_wrapper import AdapterWrapper
    from tests.megatron_utils import gpt_inputs, tiny_gpt_model

    model = transform(tiny_gpt_model(num_layers=1))
    randomise_adapters(model)
    model.eval()
    ids, pos, mask = gpt_inputs()
    with torch.no_grad():
        before = model(ids, pos, attention_mask=mask)
        originals = {n: p.detach().clone() for n, p in model.named_parameters()}
        merge_lora(model)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, originals[n])]
        assert changed and all(n.endswith(".weight") and ".adapter." not in n for n in changed)
        after = model(ids, pos, attention_mask=mask)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        unmerge_lora(model)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, originals[n], rtol=0, atol=2e-6, msg=n)
        torch.testing.assert_close(model(ids, pos, attention_mask=mask), before,
                                   rtol=1e-4, atol=1e-4)
        plain = merge_and_unload(model)
        assert not any(isinstance(m, AdapterWrapper) for m in plain.modules())
        assert not any(".adapter." in k for k in plain.state_dict())
        torch.testing.assert_close(plain(ids, pos, attention_mask=mask), before,
                                   rtol=1e-4, atol=1e-4)


def _transforms():
    from bridge.peft.canonical_lora import CanonicalLoRA

    return [
        LoRA(dim=R, alpha=ALPHA, kernel_backend="eager"),
        CanonicalLoRA(dim=R, alpha=ALPHA, kernel_backend="eager"),
        CanonicalLoRA(target_modules=["linear_k", "linear_fc1_up"], dim=R, alpha=ALPHA,
                      kernel_backend="eager"),
        DoRA(dim=R, alpha=ALPHA),
    ]


def test_gpt_merge_tp1(megatron_tp1):
    for transform in _transforms():
        _gpt_merge_checks(transform)


def _tp2_worker(rank: int) -> None:
    for transform in _transforms():
        _gpt_merge_checks(transform)
    # a merged weight shard equals this rank's rows/columns of the full W + s·B@A
    from megatron.core import parallel_state

    from tests.megatron_utils import tiny_gpt_model

    group = parallel_state.get_tensor_model_parallel_group()
    model = LoRA(dim=R, alpha=ALPHA, kernel_backend="eager")(tiny_gpt_model(num_layers=1))
    randomise_adapters(model)

    def gather(t, dim):
        parts = [torch.empty_like(t) for _ in range(2)]
        torch.distributed.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    layer = model.decoder.layers[0]
    for wrapper, split_dim in ((layer.self_attention.linear_qkv, 0), (layer.mlp.linear_fc2, 1)):
        w_full = gather(wrapper.to_wrap.weight.detach(), split_dim).double()
        a_dim = 0 if split_dim == 0 else 1  # column: A split on r; row: A split on K
        a_full = gather(wrapper.adapter.linear_in.weight.detach(), a_dim).double()
        b_full = gather(wrapper.adapter.linear_out.weight.detach(), 0).double()
        want_full = w_full + S * b_full @ a_full
        merge_lora(wrapper)
        got_full = gather(wrapper.to_wrap.weight.detach(), split_dim).double()
        torch.testing.assert_close(got_full, want_full, rtol=1e-6, atol=1e-6)
        assert not math.isclose(float((got_full - w_full).abs().max()), 0.0)

    # canonical LoRA at TP=2: each rank holds one whole query group ([q (2 heads); k; v] rows) and
    # [gate shard; up shard] of fc1; the split adapters' forward and merge follow that layout
    from bridge.peft.canonical_lora import CanonicalLoRA

    model = CanonicalLoRA(dim=R, alpha=ALPHA, kernel_backend="eager")(tiny_gpt_model(num_layers=1))
    randomise_adapters(model)
    layer = model.decoder.layers[0]
    x = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(11))
    for wrapper, parts in ((layer.self_attention.linear_qkv, ("q", "k", "v")),
                           (layer.mlp.linear_fc1, ("gate", "up"))):
        pieces = []
        for p in parts:
            adapter = wrapper.adapter[f"adapter_{p}"]
            a_full = gather(adapter.linear_in.weight.detach(), 0).double()
            pieces.append(S * adapter.linear_out.weight.detach().double() @ a_full)
        want_local = torch.cat(pieces, dim=0)
        assert want_local.shape == wrapper.to_wrap.weight.shape
        with torch.no_grad():
            out, _ = wrapper(x)
            wrapper.disable_adapter_layers()
            base, _ = wrapper(x)
            wrapper.enable_adapter_layers()
        torch.testing.assert_close((out - base).double(), x.double() @ want_local.T,
                                   rtol=1e-5, atol=1e-5)
        w0 = wrapper.to_wrap.weight.detach().double().clone()
        merge_lora(wrapper)
        torch.testing.assert_close(wrapper.to_wrap.weight.double() - w0, want_local,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gpt_merge_tp2(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core not installed")
    from tests.megatron_utils import spawn_gloo

    spawn_gloo(_tp2_worker, str(tmp_path))


def test_merging_a_switched_off_adapter_is_refused_by_name():
    torch.manual_seed(0)
    model = LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=R, alpha=ALPHA,
                 kernel_backend="eager")(TwoLinears())
    for m in (model.linear_fc1, model.linear_fc2):
        with torch.no_grad():
            m.adapter.linear_out.weight.normal_()  # a non-zero delta, so a merge would show
    w0 = model.linear_fc1.to_wrap.weight.detach().clone()
    model.linear_fc1.disable_adapter_layers()
    for merge in (merge_lora, merge_and_unload):
        with pytest.raises(MergeError, match=r"switched off.*\['linear_fc1'\]"):
            merge(model)
    assert torch.equal(model.linear_fc1.to_wrap.weight, w0)  # nothing merged, not even fc2
    assert not getattr(model.linear_fc2, "_lora_merged", False)
    model.linear_fc1.enable_adapter_layers()
    merge_lora(model)
    assert model.linear_fc1._lora_merged and model.linear_fc2._lora_merged
    assert not torch.equal(model.linear_fc1.to_wrap.weight, w0)
