"""The MultiLoRA transform and the model-level slot lifecycle on a tiny megatron-core GPT (CPU,
TP=1): configuration and the options upstream refuses, matching, idempotence, key filtering;
init / clear / load / expose / hide round trips; one slot exported as a regular LoRA adapter
(``adapter_state_dict`` and the Hugging Face export) loaded into a LoRA model gives the same
outputs; every slot through a distributed adapter checkpoint; the kernel report's rows.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

from bridge.peft import LoRA, adapter_state_dict, load_adapter_state_dict
from bridge.peft.errors import PEFTConfigError, UnsupportedOptionError
from bridge.peft.multi_lora import MultiLoRA
from bridge.peft.multi_lora_layers import (
    AdapterSlotLoadError,
    MultiLoRALinear,
    clear_adapter_slot,
    expose_adapter_slot,
    hide_adapters,
    init_adapter_slot,
    load_adapter,
    set_tokens_per_adapter_slot,
)
from tests.numerics import rel_err

pytest.importorskip("megatron.core", reason="megatron-core not installed")
pytestmark = pytest.mark.usefixtures("megatron_tp1")

R_MAX, SLOTS = 8, 3
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)  # outputs comparable across runs


def gpt_with_slots(backend="eager", seed=0, num_layers=2, **kw):
    """Tiny GPT (``num_layers`` layers) with MultiLoRA on the four linears; slot 0 rank 4 alpha 8, slot 1
    rank 8 alpha 12, slot 2 rank 3 alpha 5; B random (LoRA's zero init would hide B)."""
    from tests.megatron_utils import tiny_gpt_model

    model = tiny_gpt_model(seed=seed, num_layers=num_layers, **NO_DROPOUT)
    torch.manual_seed(seed + 1)
    peft = MultiLoRA(n_adapters=SLOTS, dim=R_MAX, alpha=16, lora_B_init_method="normal",
                     kernel_backend=backend, **kw)
    model = peft(model, training=True)
    for idx, (rank, alpha) in enumerate([(4, 8.0), (8, 12.0), (3, 5.0)]):
        init_adapter_slot(model, idx, rank, alpha)
    return model, peft


def logits(model, tokens_per_slot, seed=0):
    from tests.megatron_utils import gpt_inputs

    ids, pos, mask = gpt_inputs(batch=2, seq=8, seed=seed)
    if tokens_per_slot is not None:
        set_tokens_per_adapter_slot(model, torch.tensor(tokens_per_slot))
    return model(ids, pos, mask)


def multi_layers(model):
    return [m for m in model.modules() if isinstance(m, MultiLoRALinear)]


# ---- the transform -----------------------------------------------------------------------------
def test_configuration_defaults_and_checks():
    peft = MultiLoRA()
    assert peft.target_modules == TARGETS
    assert (peft.n_adapters, peft.dim, peft.alpha, peft.dropout, peft.dropout_position) == \
        (2, 32, 32, 0.0, "pre")
    assert (peft.lora_A_init_method, peft.lora_B_init_method, peft.a2a_experimental,
            peft.lora_dtype, peft.kernel_backend, peft.kernel_gemm) == \
        ("xavier", "zero", False, None, "auto", "auto")
    with pytest.raises(PEFTConfigError, match="n_adapters must be a positive int"):
        MultiLoRA(n_adapters=0)
    with pytest.raises(PEFTConfigError, match="dropout must be in"):
        MultiLoRA(dropout=1.5)
    with pytest.raises(ValueError, match="unknown kernel_gemm"):
        MultiLoRA(kernel_gemm="cutlass")


@pytest.mark.parametrize("flag", ["normalize_moe_lora", "share_expert_adapters",
                                  "experts_shared_outer_loras"])
def test_moe_options_upstream_refuses_are_refused(flag):
    with pytest.raises(NotImplementedError, match=f"MultiLoRA does not support {flag}=True") as e:
        MultiLoRA(**{flag: True})(nn.Linear(4, 4))
    assert isinstance(e.value, UnsupportedOptionError)


def test_transform_wraps_the_targets_once_and_trains_only_the_slots():
    model, peft = gpt_with_slots()
    layers = multi_layers(model)
    assert len(layers) == 8 and all(m.n_adapters == SLOTS for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    assert len(trainable) == 8 * SLOTS * 2
    again = peft(model, training=True)  # idempotent: the same layers, still trainable
    assert multi_layers(again) == layers
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trainable
    assert peft.adapter_key_filter("decoder.layers.0.linear_qkv.adapters.0.linear_in.weight")
    assert peft.adapter_key_filter("decoder.layers.0.linear_qkv.weight_A.0")
    assert not peft.adapter_key_filter("decoder.layers.0.linear_qkv.weight")
    frozen = nn.Parameter(torch.zeros(1), requires_grad=False)
    assert peft.adapter_key_filter(("x", nn.Parameter(torch.zeros(1))))
    assert not peft.adapter_key_filter(("to_wrap.weight", frozen))


def test_sequential_expert_linears_are_skipped_with_one_warning(caplog):
    from bridge.peft import multi_lora as module

    module._EXPERT_SKIP_WARNED = False
    root = nn.Module()
    root.decoder = nn.Module()
    experts = nn.ModuleList([nn.Module(), nn.Module()])
    for e in experts:
        e.linear_fc1 = nn.Linear(4, 4)
    root.decoder.layers = nn.ModuleList([nn.Module()])
    root.decoder.layers[0].mlp = nn.Module()
    root.decoder.layers[0].mlp.experts = nn.Module()
    root.decoder.layers[0].mlp.experts.local_experts = experts
    root.decoder.layers[0].mlp.linear_fc1 = nn.Linear(4, 4)  # dense: wrapped
    with caplog.at_level(logging.WARNING, logger="bridge.peft.multi_lora"):
        MultiLoRA(target_modules=["linear_fc1"], dim=2)(root)
    assert all(isinstance(e.linear_fc1, nn.Linear) for e in experts)
    assert isinstance(root.decoder.layers[0].mlp.linear_fc1, MultiLoRALinear)
    assert sum("sequential MoE expert linears" in r.getMessage() for r in caplog.records) == 1


# ---- the lifecycle on a model --------------------------------------------------------------------
def test_init_and_clear_across_the_model():
    model, peft = gpt_with_slots()
    init_adapter_slot(model, 2, 6, 3.0)
    assert all((m._slot_rank[2], m._slot_alpha[2]) == (6, 3.0) for m in multi_layers(model))
    clear_adapter_slot(model, 2)
    assert all((m._slot_rank[2], m._slot_alpha[2]) == (R_MAX, 0.0) for m in multi_layers(model))
    # a cleared slot is silent: its tokens see the base model alone
    base = logits(model, [0, 0, 16]).detach()
    with peft.disable_adapter(model):
        torch.testing.assert_close(logits(model, [0, 0, 16]), base)


def test_expose_shows_one_regular_lora_and_restores_even_on_error():
    model, _ = gpt_with_slots()
    layer = multi_layers(model)[0]
    slots = layer.adapters
    with expose_adapter_slot(model, 0):
        assert "adapters" not in layer._modules and layer.adapter is slots[0]
        assert layer.adapter.dim == R_MAX and layer.adapter.alpha == pytest.approx(8 * R_MAX / 4)
        keys = set(adapter_state_dict(model))
        assert keys and all(".adapter." in k and ".adapters." not in k for k in keys)
    assert layer.adapters is slots and "adapter" not in layer._modules
    assert slots[0].alpha == 16  # the construction alpha is back
    with pytest.raises(RuntimeError, match="boom"):
        with expose_adapter_slot(model, 1):
            raise RuntimeError("boom")
    assert layer.adapters is slots and "adapter" not in layer._modules
    with hide_adapters(model):
        assert not [n for n, _ in model.named_parameters() if "adapter" in n]
        with pytest.raises(RuntimeError, match="detached"):
            logits(model, [16, 0, 0])
    assert layer.adapters is slots
    with pytest.raises(NotImplementedError, match="expose_adapter_slot"):
        layer.delta_weight()


def test_load_adapter_copies_a_saved_slot_into_another_and_checks_names():
    model, _ = gpt_with_slots()
    with expose_adapter_slot(model, 1):
        saved = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}
    before0 = {i: [p.detach().clone() for p in m.adapters[0].parameters()]
               for i, m in enumerate(multi_layers(model))}
    init_adapter_slot(model, 2, 8, 12.0)  # slot 1's rank and alpha (they are not in the file)
    assert load_adapter(model, 2, saved) == len(saved) == 16
    assert rel_err(logits(model, [0, 0, 16]), logits(model, [0, 16, 0])) < 1e-6
    with expose_adapter_slot(model, 2):
        for n, p in model.named_parameters():
            if ".adapter." in n:
                assert torch.equal(p, saved[n])
    for i, m in enumerate(multi_layers(model)):  # slot 0 untouched
        assert all(torch.equal(a, b) for a, b in zip(m.adapters[0].parameters(), before0[i],
                                                      strict=True))
    partial = dict(list(saved.items())[1:])
    with pytest.raises(KeyError, match="absent from the checkpoint") as e:
        load_adapter(model, 0, partial)
    assert isinstance(e.value, AdapterSlotLoadError)
    with pytest.raises(KeyError, match="matched no adapter parameter"):
        load_adapter(model, 0, {**saved, "decoder.layers.9.mlp.adapter.linear_in.weight":
                                torch.zeros(1)})
    bad = {k: v[:1] if i == 0 else v for i, (k, v) in enumerate(saved.items())}
    with pytest.raises(AdapterSlotLoadError, match="shape mismatch"):
        load_adapter(model, 0, bad)


def test_slot_round_trips_save_clear_load_and_hf_export_import(tmp_path):
    """A slot saved (adapter_state_dict under expose), cleared and loaded back, and a slot
    exported to Hugging Face and imported into another slot, give that slot's outputs again;
    the other slots never move."""
    from bridge.peft import export_hf_adapter, import_hf_adapter

    model, _ = gpt_with_slots(num_layers=1)
    want = {i: logits(model, [16 if j == i else 0 for j in range(SLOTS)]).detach()
            for i in range(SLOTS)}
    others = [[p.detach().clone() for p in m.adapters[0].parameters()]
              for m in multi_layers(model)]
    with expose_adapter_slot(model, 1):  # a state dict aliases the parameters, as torch's does
        saved = {k: v.clone() for k, v in adapter_state_dict(model).items()}
        export_hf_adapter(model, tmp_path / "hf1")
    clear_adapter_slot(model, 1)
    assert rel_err(logits(model, [0, 16, 0]), want[1]) > 1e-2  # cleared: the base alone
    init_adapter_slot(model, 1, 8, 12.0)  # rank and alpha are the caller's (not in the file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the settings records match slot 1's: no warning
        assert load_adapter(model, 1, saved) == 8  # 4 linears x 2 factors (+ 4 records)
    assert rel_err(logits(model, [0, 16, 0]), want[1]) < 1e-6
    with pytest.warns(UserWarning, match=r"linear_qkv: alpha 12.0 in the checkpoint, 13.3"):
        load_adapter(model, 2, saved)  # slot 2 is rank 3 alpha 5: exposed alpha 5 * 8 / 3
    clear_adapter_slot(model, 2)
    init_adapter_slot(model, 2, 8, 12.0)
    with expose_adapter_slot(model, 2):
        import_hf_adapter(model, tmp_path / "hf1")
    assert rel_err(logits(model, [0, 0, 16]), want[1]) < 1e-6
    assert rel_err(logits(model, [16, 0, 0]), want[0]) < 1e-6
    for m, before in zip(multi_layers(model), others, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(m.adapters[0].parameters(), before,
                                                      strict=True))


def _lora_twin(alpha: float, backend="eager"):
    from tests.megatron_utils import tiny_gpt_model

    return LoRA(dim=R_MAX, alpha=alpha, kernel_backend=backend)(tiny_gpt_model(seed=0,
                                                                            **NO_DROPOUT))


def test_one_slot_exported_as_a_regular_lora_adapter_gives_the_same_outputs(tmp_path):
    from bridge.peft import export_hf_adapter, import_hf_adapter

    model, _ = gpt_with_slots()
    want = logits(model, [0, 16, 0]).detach()  # every token on slot 1 (rank 8, alpha 12)
    with expose_adapter_slot(model, 1):
        state = adapter_state_dict(model)
        export_hf_adapter(model, tmp_path / "hf")
    twin = _lora_twin(12.0)  # exported at the max rank: alpha * dim / rank = 12 * 8 / 8
    load_adapter_state_dict(twin, state)
    assert rel_err(logits(twin, None), want) < 1e-6
    model2, _ = gpt_with_slots()
    want0 = logits(model2, [16, 0, 0]).detach()  # slot 0: rank 4, alpha 8 -> exported alpha 16
    with expose_adapter_slot(model2, 0):
        state0 = adapter_state_dict(model2)
        export_hf_adapter(model2, tmp_path / "hf0")
    twin0 = _lora_twin(16.0)
    load_adapter_state_dict(twin0, state0)
    assert rel_err(logits(twin0, None), want0) < 1e-6
    hf_twin = _lora_twin(16.0)
    import_hf_adapter(hf_twin, tmp_path / "hf0")
    assert rel_err(logits(hf_twin, None), want0) < 1e-6
    with pytest.raises(NotImplementedError, match="expose_adapter_slot"):
        export_hf_adapter(model2, tmp_path / "all")  # several slots: not one PEFT adapter


def test_every_slot_through_a_distributed_adapter_checkpoint(tmp_path):
    from bridge.peft import load_peft_adapter_checkpoint, save_peft_adapter_checkpoint

    model, peft = gpt_with_slots(seed=0, num_layers=1)
    save_peft_adapter_checkpoint(model, tmp_path / "ckpt", peft)
    fresh, fresh_peft = gpt_with_slots(seed=5, num_layers=1)  # other base and slot weights
    load_peft_adapter_checkpoint(fresh, tmp_path / "ckpt", fresh_peft)
    for a, b in zip(multi_layers(model), multi_layers(fresh), strict=True):
        for i in range(SLOTS):
            for f in ("linear_in", "linear_out"):
                assert torch.equal(getattr(a.adapters[i], f).weight,
                                   getattr(b.adapters[i], f).weight)
        assert b.stacked_factors()[2] == ""  # loaded in place: still one stack per factor
    keys = peft.adapter_key_filter
    assert all(keys(k) for k in fresh.sharded_state_dict() if ".adapters." in k)


def test_fused_gpt_equals_eager_gpt_and_the_report_says_which_ran():
    from bridge.peft.kernel_report import kernel_report
    from tests.conftest import KERNEL_TESTS_RUN

    if not KERNEL_TESTS_RUN:
        pytest.skip("needs the Triton interpreter or a GPU")
    eager, _ = gpt_with_slots("eager", num_layers=1)
    fused, _ = gpt_with_slots("triton", num_layers=1)
    tokens = [5, 0, 11]
    y_e, y_f = logits(eager, tokens), logits(fused, tokens)
    assert rel_err(y_f, y_e) < 1e-5
    y_e.sum().backward()
    y_f.sum().backward()
    for a, b in zip(multi_layers(eager), multi_layers(fused), strict=True):
        for i in (0, 2):
            assert rel_err(b.adapters[i].linear_in.weight.grad,
                           a.adapters[i].linear_in.weight.grad) < 1e-4
        assert torch.count_nonzero(b.adapters[1].linear_out.weight.grad) == 0  # no tokens
    rows = {r.name: r for r in kernel_report(fused)}
    qkv = rows["decoder.layers.0.self_attention.linear_qkv"]
    assert (qkv.path, qkv.backend, qkv.layout) == ("fused", "triton", "column")
    assert rows["decoder.layers.0.mlp.linear_fc2"].layout == "row"
    eager_row = {r.name: r for r in kernel_report(eager)}["decoder.layers.0.mlp.linear_fc1"]
    assert (eager_row.path, eager_row.reason) == ("eager", "requested by argument")


def test_a_second_application_keeps_the_slots_or_refuses_by_name():
    model, _ = gpt_with_slots()
    layers = multi_layers(model)
    MultiLoRA(n_adapters=SLOTS, dim=R_MAX, alpha=16, kernel_backend="triton", dropout=0.1)(model)
    assert multi_layers(model) == layers  # kept: kernel settings and dropout follow
    assert all(m.kernel_backend == "triton" and m.adapters[2].dropout_p == 0.1 for m in layers)
    with pytest.raises(PEFTConfigError, match=r"has MultiLoRALinear\(n_adapters=3, dim=8, "
                                              r"alpha=16.*makes MultiLoRALinear\(n_adapters=2"):
        MultiLoRA(n_adapters=2, dim=R_MAX, alpha=16)(model)
    MultiLoRA(n_adapters=2, dim=4, alpha=16)(model, replace=True)
    assert all((m.n_adapters, m.max_rank) == (2, 4) for m in multi_layers(model))
    assert not set(layers) & set(multi_layers(model))
