"""Canonical LoRA: split q/k/v and gate/up adapters equal one LoRA whose B holds the pieces in
megatron's interleaved rows; any subset of the parts works."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed")

from bridge.peft.canonical_lora import (  # noqa: E402
    CanonicalLoRA,
    LoRALinearSplitFC1UpGate,
    LoRALinearSplitQKV,
)
from bridge.peft.lora_layers import LoRALinear  # noqa: E402
from tests.megatron_utils import gpt_inputs, tiny_gpt_model  # noqa: E402
from tests.megatron_utils import qkv_row_indices as _qkv_row_indices  # noqa: E402

R, ALPHA = 4, 8.0
S = ALPHA / R
HEADS, GROUPS, HEAD_DIM, HIDDEN, FFN = 4, 2, 16, 64, 96


def qkv_row_indices():
    return _qkv_row_indices(HEADS, GROUPS, HEAD_DIM)


def fc1_row_indices():
    return {"gate": list(range(FFN)), "up": list(range(FFN, 2 * FFN))}


def _randomise(model, seed=1):
    """Non-zero B everywhere, so every part contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def equivalent_factors(wrapper, rows: dict[str, list[int]], n_out: int):
    """A_cat [parts·r, K] and a single B [N, parts·r] with each part's B in its own rows and
    columns: a plain LoRA with this (A, B) is what the split adapters compute."""
    names = [n for n in rows if f"adapter_{n}" in wrapper.adapter]
    a_cat = torch.cat([wrapper.adapter[f"adapter_{n}"].linear_in.weight.detach() for n in names])
    b_big = torch.zeros(n_out, R * len(names))
    for j, n in enumerate(names):
        b_big[rows[n], j * R:(j + 1) * R] = wrapper.adapter[f"adapter_{n}"].linear_out.weight.detach()
    return a_cat, b_big


def _check_layer(wrapper, rows, n_out, k_in):
    x = torch.randn(5, 2, k_in)
    out, _ = wrapper(x)
    with torch.no_grad():
        wrapper.disable_adapter_layers()
        base, _ = wrapper(x)
        wrapper.enable_adapter_layers()
    a_cat, b_big = equivalent_factors(wrapper, rows, n_out)
    want = base + S * (x @ a_cat.T) @ b_big.T
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # merge arithmetic agrees with the forward's
    torch.testing.assert_close(wrapper.delta_weight(), S * b_big @ a_cat, rtol=1e-5, atol=1e-6)
    # gradients of each part's factors against the equivalent single LoRA
    g = torch.randn_like(out)
    (out * g).sum().backward()
    a_ref, b_ref = a_cat.clone().requires_grad_(True), b_big.clone().requires_grad_(True)
    (((base + S * (x @ a_ref.T) @ b_ref.T)) * g).sum().backward()
    names = [n for n in rows if f"adapter_{n}" in wrapper.adapter]
    for j, n in enumerate(names):
        ad = wrapper.adapter[f"adapter_{n}"]
        torch.testing.assert_close(ad.linear_in.weight.grad, a_ref.grad[j * R:(j + 1) * R],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ad.linear_out.weight.grad,
                                   b_ref.grad[rows[n], j * R:(j + 1) * R], rtol=1e-5, atol=1e-5)
    return out, base


def test_full_canonical_equals_unsplit_lora(megatron_tp1):
    model = CanonicalLoRA(dim=R, alpha=ALPHA, kernel_backend="eager")(tiny_gpt_model(num_layers=1))
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attention.linear_qkv, LoRALinearSplitQKV)
    assert isinstance(layer.mlp.linear_fc1, LoRALinearSplitFC1UpGate)
    assert isinstance(layer.self_attention.linear_proj, LoRALinear)
    assert isinstance(layer.mlp.linear_fc2, LoRALinear)
    _randomise(model)
    n_qkv = (HEADS + 2 * GROUPS) * HEAD_DIM
    _check_layer(layer.self_attention.linear_qkv, qkv_row_indices(), n_qkv, HIDDEN)
    _check_layer(layer.mlp.linear_fc1, fc1_row_indices(), 2 * FFN, HIDDEN)
    keys = [k for k in model.state_dict() if "linear_qkv.adapter" in k and k.endswith("weight")]
    assert sorted(keys) == sorted(
        f"decoder.layers.0.self_attention.linear_qkv.adapter.adapter_{p}.linear_{io}.weight"
        for p in "qkv" for io in ("in", "out"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)


@pytest.mark.parametrize("targets, zero_rows", [
    (["linear_q"], ("k", "v")),
    (["linear_k", "linear_v"], ("q",)),
    (["linear_fc1_up"], ("gate",)),
    (["linear_fc1_gate", "linear_v"], ("up", "q", "k")),
])
def test_partial_selection(megatron_tp1, targets, zero_rows):
    model = CanonicalLoRA(target_modules=targets, dim=R, alpha=ALPHA,
                          kernel_backend="eager")(tiny_gpt_model(num_layers=1))
    _randomise(model)
    layer = model.decoder.layers[0]
    qkv, fc1 = layer.self_attention.linear_qkv, layer.mlp.linear_fc1
    n_qkv = (HEADS + 2 * GROUPS) * HEAD_DIM
    for wrapper, rows, n_out in ((qkv, qkv_row_indices(), n_qkv),
                                 (fc1, fc1_row_indices(), 2 * FFN)):
        if not hasattr(wrapper, "delta_weight"):
            continue
        out, base = _check_layer(wrapper, rows, n_out, HIDDEN)
        for part in zero_rows:
            if part in rows:  # parts without an adapter contribute exactly zero
                assert torch.equal(out[..., rows[part]], base[..., rows[part]])
        present = [p for p in rows if p not in zero_rows]
        assert all(not torch.equal(out[..., rows[p]], base[..., rows[p]]) for p in present)
    # the whole model runs forward and backward (Megatron-Bridge crashes on partial selections)
    ids, pos, mask = gpt_inputs()
    model(ids, pos, attention_mask=mask).float().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_bad_targets():
    with pytest.raises(ValueError,
                       match="does not support target 'linear_qkv'.*linear_q, linear_k, linear_v"):
        CanonicalLoRA(target_modules=["linear_qkv"])
    with pytest.raises(ValueError, match="does not support target '.*linear_fc1'.*linear_fc1_up"):
        CanonicalLoRA(target_modules=["*.linear_fc1"])
    lora = CanonicalLoRA(target_modules=["*.linear_q", "linear_fc1_up", "linear_proj"])
    assert lora.canonical_mapping == {"*.linear_qkv": {"linear_q"}, "linear_fc1": {"linear_fc1_up"},
                                      "linear_proj": {"linear_proj"}}
