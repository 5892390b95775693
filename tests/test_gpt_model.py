"""LoRA on a tiny megatron-core GPTModel (local spec, CPU, world size 1): the right linears are
wrapped, a few Adam steps on a fixed batch lower the loss, and only adapter parameters move."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402

from bridge.peft import LoRA, LoRALinear  # noqa: E402
from tests.megatron_utils import make_config  # noqa: E402

VOCAB, SEQ, BATCH, LAYERS = 128, 16, 2, 2
STEPS = 8


def build_gpt():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = make_config(num_layers=LAYERS, hidden_size=64, num_attention_heads=4,
                         hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                    vocab_size=VOCAB, max_sequence_length=SEQ)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    return ids, pos, mask, labels


def test_lora_trains_a_tiny_gpt_and_leaves_the_base_untouched(megatron_tp1):
    model = build_gpt()
    # scale 1: the frozen final norm and output layer bound the logits, and a milder scale than
    # the default 4 keeps Adam at lr 1e-2 from oscillating on this tiny model
    LoRA(dim=8, alpha=8, kernel_backend="eager")(model)

    expected = {"self_attention.linear_qkv": ColumnParallelLinear,
                "self_attention.linear_proj": RowParallelLinear,
                "mlp.linear_fc1": ColumnParallelLinear, "mlp.linear_fc2": RowParallelLinear}
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"decoder.layers.{i}.{name}" for i in range(LAYERS) for name in expected}
    for i in range(LAYERS):
        for name, base_type in expected.items():
            w = model.get_submodule(f"decoder.layers.{i}.{name}")
            assert type(w.to_wrap) is base_type, name
            assert w.adapter.input_is_parallel is (base_type is RowParallelLinear)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.adapter.linear_{io}.weight" for m in wrapped for io in ("in", "out")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    ids, pos, mask, labels = batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(ids, pos, mask, labels=labels).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = model(ids, pos, mask, labels=labels).float().mean().item()

    assert losses[0] > 4.0  # ~ln(128) for an untrained model: the check below is meaningful
    assert final < losses[0] - 0.5, losses + [final]
    assert all(b < a for a, b in zip(losses[3:], losses[4:], strict=False)), losses  # settled into descent
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"adapter parameter {name} did not move"
        else:
            assert torch.equal(p, before[name]), f"base parameter {name} changed"
