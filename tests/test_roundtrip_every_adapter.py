"""Adapter round trips for every adapter kind (issue 15): ``adapter_state_dict`` of a trained
model, loaded with ``load_adapter_state_dict`` into a fresh model of the same base, gives every
adapter tensor bit for bit and the same outputs; the keys are upstream's (Megatron-Bridge:
``<layer>.adapter.linear_in/linear_out.weight``, DoRA's ``adapter.weight_magnitude``, canonical
LoRA's ``adapter.adapter_<part>.``, MultiLoRA's ``adapters.<i>.``) and cover every trainable
tensor. Kinds: LoRA over megatron's Column/Row linears, bridge's LayerNormColumnParallelLinear,
plain nn.Linear and the TE stand-ins (megatron's TE wrappers, and TE's own layers unwrapped);
DoRA; canonical LoRA; LoRATopKRouter and the expert adapters of the tiny MoE (SequentialMLP;
TE-grouped shared, per-expert and shared-outer); MultiLoRA slots."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from bridge.peft import (
    CanonicalLoRA,
    DoRA,
    LoRA,
    adapter_state_dict,
    load_adapter_state_dict,
)

pytest.importorskip("megatron.core", reason="megatron-core not installed")
pytestmark = pytest.mark.usefixtures("megatron_tp1")

R, ALPHA = 4, 8
# upstream's adapter tensor names, below the adapted layer
LORA_KEYS = r"adapter\.linear_(in|out)\.weight"
DORA_KEYS = r"adapter\.(linear_(in|out)\.weight|weight_magnitude)"
CANONICAL_KEYS = r"adapter\.(adapter_(q|k|v|up|gate)\.)?linear_(in|out)\.weight"
MULTI_KEYS = r"adapters\.\d+\.linear_(in|out)\.weight"


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_proj = nn.Linear(16, 24)
        self.linear_fc2 = nn.Linear(24, 8)

    def forward(self, x):
        return self.linear_fc2(torch.relu(self.linear_proj(x)))


def _toy(transform):
    def build(seed):
        torch.manual_seed(seed)
        return transform(Toy())

    def run(model):
        return model(torch.randn(5, 16, generator=torch.Generator().manual_seed(9)))
    return build, run


class RawTE(nn.Module):
    """transformer-engine's own layers, unwrapped: LayerNormLinear (returns (out, ln_out) under
    LoRA) and Linear."""

    def __init__(self) -> None:
        super().__init__()
        from tests.te_standins import LayerNormLinear, Linear

        self.linear_qkv = LayerNormLinear(16, 24, params_dtype=torch.float32, device="cpu")
        self.linear_proj = Linear(24, 8, params_dtype=torch.float32, device="cpu")

    def forward(self, x):
        return self.linear_proj(torch.relu(self.linear_qkv(x)))


def _raw_te():
    def build(seed):
        torch.manual_seed(seed)
        return LoRA(target_modules=["linear_qkv", "linear_proj"], dim=R, alpha=ALPHA)(RawTE())

    def run(model):
        return model(torch.randn(5, 16, generator=torch.Generator().manual_seed(9)))
    return build, run


def _gpt(transform, spec=None, **kw):
    def build(seed):
        from tests.megatron_utils import tiny_gpt_model

        layer_spec = spec() if spec is not None else None
        model = tiny_gpt_model(seed=seed, num_layers=1, layer_spec=layer_spec,
                               hidden_dropout=0.0, attention_dropout=0.0, **kw)
        torch.manual_seed(seed + 1)
        return transform()(model)

    def run(model):
        from tests.megatron_utils import gpt_inputs

        return model(*gpt_inputs(batch=2, seq=8, seed=3))
    return build, run


def _moe(layout, **lora_kw):
    def build(seed):
        from tests.test_moe_lora_models import apply_lora, moe_config, moe_gpt

        model = moe_gpt(layout, moe_config(), seed=seed)
        torch.manual_seed(seed + 1)
        return apply_lora(model, **lora_kw)

    def run(model):
        from tests.test_moe_lora_models import tokens

        return model(*tokens())
    return build, run


def _multi():
    def build(seed):
        from bridge.peft.multi_lora import MultiLoRA
        from bridge.peft.multi_lora_layers import init_adapter_slot
        from tests.megatron_utils import tiny_gpt_model

        model = tiny_gpt_model(seed=seed, num_layers=1, hidden_dropout=0.0,
                               attention_dropout=0.0)
        torch.manual_seed(seed + 1)
        model = MultiLoRA(n_adapters=2, dim=R, alpha=ALPHA, kernel_backend="eager")(model)
        for idx, (rank, alpha) in enumerate([(R, 8.0), (2, 5.0)]):
            init_adapter_slot(model, idx, rank, alpha)
        return model

    def run(model):
        from bridge.peft.multi_lora_layers import set_tokens_per_adapter_slot
        from tests.megatron_utils import gpt_inputs

        set_tokens_per_adapter_slot(model, torch.tensor([8, 8]))
        return model(*gpt_inputs(batch=2, seq=8, seed=3))
    return build, run


def _layernorm_spec():
    from bridge.layers import get_gpt_layer_norm_linear_spec

    return get_gpt_layer_norm_linear_spec(normalization="RMSNorm")


def _te_spec():
    from tests.te_standins import te_gpt_layer_spec

    return te_gpt_layer_spec()


def _lora(**kw):
    return lambda: LoRA(dim=R, alpha=ALPHA, kernel_backend="eager", **kw)


CANONICAL_TARGETS = ["linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1_up",
                     "linear_fc1_gate", "linear_fc2"]

# kind -> (build/run factory, key pattern, wrapper classes that must appear)
CASES = {
    "lora-megatron-column-row": (_gpt(_lora()), LORA_KEYS, {"LoRALinear"}),
    "lora-layernorm-column": (_gpt(_lora(), spec=_layernorm_spec), LORA_KEYS, {"LoRALinear"}),
    "lora-nn-linear": (_toy(LoRA(target_modules=["linear_proj", "linear_fc2"], dim=R,
                                 alpha=ALPHA)), LORA_KEYS, {"LoRALinear"}),
    "lora-te-standins": (_gpt(_lora(), spec=_te_spec), LORA_KEYS, {"LoRALinear"}),
    "lora-te-unwrapped": (_raw_te(), LORA_KEYS, {"LoRALinear"}),
    "dora-megatron": (_gpt(lambda: DoRA(dim=R, alpha=ALPHA)), DORA_KEYS, {"DoRALinear"}),
    "dora-nn-linear": (_toy(DoRA(target_modules=["linear_proj", "linear_fc2"], dim=R,
                                 alpha=ALPHA)), DORA_KEYS, {"DoRALinear"}),
    "canonical-megatron": (_gpt(lambda: CanonicalLoRA(target_modules=CANONICAL_TARGETS, dim=R,
                                                      alpha=ALPHA, kernel_backend="eager")),
                           CANONICAL_KEYS, {"LoRALinearSplitQKV", "LoRALinearSplitFC1UpGate"}),
    "moe-sequential-and-router": (_moe("sequential"), LORA_KEYS,
                                  {"LoRATopKRouter", "ExpertLoRALinear"}),
    "moe-grouped-shared": (_moe("grouped"), LORA_KEYS, {"ExpertLoRALinear"}),
    "moe-grouped-per-expert": (_moe("grouped", share_expert_adapters=False), LORA_KEYS,
                               {"ExpertLoRALinear"}),
    "moe-grouped-shared-outer": (_moe("grouped", experts_shared_outer_loras=True),
                                 LORA_KEYS, {"ExpertLoRALinear"}),
    "multi-lora-slots": (_multi(), MULTI_KEYS, {"MultiLoRALinear"}),
}


def train_adapters(model, seed: int) -> None:
    """Every trainable tensor to random values (B away from its zero init; DoRA magnitudes
    positive), as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
                p.copy_(p.abs() * (1 + 0.1 * noise) if name.endswith("weight_magnitude")
                        else 0.2 * noise)


def _outputs(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("kind", list(CASES))
def test_every_adapter_kind_round_trips_bit_for_bit(kind):
    (build, run), pattern, wrappers = CASES[kind]
    trained = build(0)
    assert wrappers <= {type(m).__name__ for m in trained.modules()}, kind
    train_adapters(trained, seed=11)
    trained.eval()
    sd = adapter_state_dict(trained)
    tensors = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}

    # every trainable tensor is in the checkpoint, under upstream's names, and nothing else
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(tensors), (trainable ^ set(tensors))
    odd = [k for k in tensors if not re.search(rf"\.{pattern}$", k)]
    assert not odd, odd

    fresh = build(0)  # same base weights, freshly initialised adapters
    fresh.eval()
    with torch.no_grad():
        want = _outputs(run(trained))
        before = _outputs(run(fresh))
    assert any(not torch.equal(a, b) for a, b in zip(before, want, strict=True)), "the adapters do nothing"
    load_adapter_state_dict(fresh, sd, strict=True)
    got_sd = adapter_state_dict(fresh)
    assert set(got_sd) == set(sd)
    different = [k for k in tensors if not torch.equal(got_sd[k], tensors[k])
                 or got_sd[k].dtype != tensors[k].dtype]
    assert not different, different
    with torch.no_grad():
        got = _outputs(run(fresh))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_multi_lora_slot_ranks_and_alphas_are_recorded_and_checked():
    """A slot's rank and alpha are the layer's (init_adapter_slot), not in its tensors' state:
    the settings entry records them, so a load into slots set up otherwise is named."""
    from bridge.peft import AdapterLoadError
    from bridge.peft.multi_lora_layers import init_adapter_slot

    (build, _), _, _ = CASES["multi-lora-slots"]
    sd = adapter_state_dict(build(0))
    assert "decoder.layers.0.mlp.linear_fc1.adapter._extra_state" in sd
    other = build(0)
    init_adapter_slot(other, 1, 2, 6.0)
    with pytest.warns(UserWarning, match=r"linear_fc1\.adapters\.1: alpha 5\.0 in the "
                                         r"checkpoint, 6\.0 in the model"):
        load_adapter_state_dict(other, sd)
    init_adapter_slot(other, 0, 3, 8.0)
    with pytest.raises(AdapterLoadError, match=r"linear_qkv\.adapters\.0: dim 4 in the "
                                               r"checkpoint, 3 in the model"):
        load_adapter_state_dict(other, sd, strict=True)
