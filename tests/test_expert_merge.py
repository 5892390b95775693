"""Merging expert adapters (world size 1, the tiny MoE GPT of test_moe_lora_models): SequentialMLP's
per-expert adapters, and a grouped expert linear's shared, per-expert and shared-outer adapters.

For each layout: the merged model computes what the unmerged one does; every expert weight (each
``weight{i}`` of a grouped base) holds W_e + s·B_e A_e, checked against fp64; ``unmerge_lora``
restores every base weight bit for bit (the kept bases, ``keep_base='cpu'|'device'``) or within
rounding (``keep_base=None``); ``merge_and_unload`` leaves no wrapper and the same outputs.
"""

from __future__ import annotations

import pytest
import torch

from tests.numerics import assert_close_rel, dtype_tol
from tests.test_moe_lora_models import apply_lora, moe_config, moe_gpt, tokens

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

pytestmark = pytest.mark.usefixtures("megatron_tp1")
LAYOUTS = {"sequential": ("sequential", {}), "grouped-shared": ("grouped", {}),
           "grouped-per-expert": ("grouped", {"share_expert_adapters": False}),
           "grouped-shared-outer": ("grouped", {"experts_shared_outer_loras": True})}
TOL = dtype_tol(torch.float32, "chain")  # a merged weight is rounded once more than W


def _model(layout: str):
    kind, kw = LAYOUTS[layout]
    model = apply_lora(moe_gpt(kind, moe_config()), **kw)
    with torch.no_grad():  # A and B random (B is N(0, 0.2) already): every delta is nonzero
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _logits(model) -> torch.Tensor:
    ids, pos, mask = tokens()
    with torch.no_grad():
        return model(ids, pos, mask)


def _expert_wrappers(model):
    from bridge.peft.expert_lora_layers import ExpertLoRALinear

    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertLoRALinear)}


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." not in n}


def _expected_expert_weights(wrapper) -> list[torch.Tensor]:
    """W_e + s·B_e A_e in fp64, from the adapter's factors as the forward uses them."""
    from bridge.peft.expert_lora_layers import _weights

    adapter = wrapper.adapter
    if hasattr(adapter, "grouped_factors"):
        a, b = (t.double() for t in adapter.grouped_factors())
    else:
        a, b = adapter.linear_in.weight.double(), adapter.linear_out.weight.double()
    ws = _weights(wrapper.to_wrap)
    a = a.expand(len(ws), *a.shape) if a.dim() == 2 else a
    b = b.expand(len(ws), *b.shape) if b.dim() == 2 else b
    return [w.double() + adapter.scale * b[e] @ a[e] for e, w in enumerate(ws)]


@pytest.mark.parametrize("keep_base", ["cpu", "device", None])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merge_equals_unmerged_and_unmerge_restores_the_bases(layout, keep_base):
    from bridge.peft import merge_lora, unmerge_lora
    from bridge.peft.expert_lora_layers import _weights

    model = _model(layout)
    ref, before = _logits(model), _base_weights(model)
    wrappers = _expert_wrappers(model)
    assert len(wrappers) == (2 * 4 if layout == "sequential" else 2)
    expected = {n: _expected_expert_weights(w) for n, w in wrappers.items()}
    originals = {n: [w.detach().clone() for w in _weights(m.to_wrap)] for n, m in wrappers.items()}
    merge_lora(model, keep_base=keep_base)
    for name, wrapper in wrappers.items():
        ws = _weights(wrapper.to_wrap)
        assert len(ws) == (1 if layout == "sequential" else 4)
        for e, (w, want, old) in enumerate(zip(ws, expected[name], originals[name], strict=True)):
            assert_close_rel(w, want, TOL, f"{name} expert weight {e}")
            assert not torch.equal(w, old), f"{name} expert weight {e} not merged"
    assert_close_rel(_logits(model), ref, TOL, f"{layout}: merged logits")
    unmerge_lora(model)
    after = _base_weights(model)
    if keep_base is None:  # the delta subtracted again: W within the merged weight's rounding
        for n, p in after.items():
            assert_close_rel(p, before[n], TOL, n)
    else:
        bad = [n for n, p in after.items() if not torch.equal(p, before[n])]
        assert not bad, bad
        torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merge_and_unload_leaves_plain_expert_linears(layout):
    from bridge.peft import AdapterWrapper, merge_and_unload

    model = _model(layout)
    ref = _logits(model)
    model = merge_and_unload(model)
    assert not [n for n, m in model.named_modules() if isinstance(m, AdapterWrapper)]
    assert not [n for n, _ in model.named_parameters() if ".adapter." in n]
    assert_close_rel(_logits(model), ref, TOL, f"{layout}: unloaded logits")


def test_unmerge_refuses_a_grouped_expert_weight_changed_after_the_merge():
    """Any one expert weight (weight{i}) changed in place is seen, and named."""
    from bridge.peft import MergeError, merge_lora, unmerge_lora

    model = _model("grouped-per-expert")
    merge_lora(model)
    fc2 = model.decoder.layers[0].mlp.experts.linear_fc2
    with torch.no_grad():
        fc2.to_wrap.weight3.mul_(2)
    with pytest.raises(MergeError, match=r"experts\.linear_fc2.*changed in place"):
        unmerge_lora(model)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_merged_state_dict_loads_into_an_unmerged_model_unmerged(layout):
    """A merged model's state_dict (marked lora_merged) loaded strictly into an unmerged model
    of the same layout: every expert weight gets the adapter subtracted (grouped bases weight by
    weight), so the model computes what the merged one did, with its adapters on."""
    import warnings

    from bridge.peft import merge_lora

    merged = _model(layout)
    ref, before = _logits(merged), _base_weights(merged)
    merge_lora(merged, keep_base=None)
    state = merged.state_dict()
    fresh = _model(layout)  # other base weights and adapters until the load
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict(state, strict=True)
    said = [str(w.message) for w in caught if "saved merged" in str(w.message)]
    assert said, "no warning that the state dict was saved merged"
    after = _base_weights(fresh)
    for n, p in after.items():
        if n.endswith("_extra_state") or not torch.is_floating_point(p):
            continue
        assert_close_rel(p, before[n], TOL, n)  # the base, within the merged weight's rounding
    assert not any(getattr(m, "_lora_merged", False) for m in _expert_wrappers(fresh).values())
    assert_close_rel(_logits(fresh), ref, TOL, f"{layout}: loaded-unmerged logits")
