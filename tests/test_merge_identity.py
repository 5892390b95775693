"""Merge / unmerge is the identity on the base weights under training and loading (issue 15,
property test): for random adapters, every adapter kind and keep_base setting, a merge followed
by an optimizer step on the adapters, attempted loads (adapter-only and full state dicts, both
refused while merged) and an unmerge leaves every base weight bit for bit as it was, keeps the
step, and computes base + stepped adapter; with ``keep_base=None`` the unmerge after the step is
refused (nothing changed), and without a step it is within one ulp of the merged weight. After
the unmerge a load is accepted, and a second merge / unmerge cycle is exact again."""

from __future__ import annotations

import pytest
import torch

from bridge.peft import (
    AdapterLoadError,
    AdapterWrapper,
    MergeError,
    adapter_state_dict,
    load_adapter_state_dict,
    merge_lora,
    unmerge_lora,
)
from tests import test_nothing_lost as nothing_lost
from tests.numerics import assert_close_rel, dtype_tol
from tests.test_nothing_lost import TRANSFORMS


def toy(kind: str, dtype, seed: int = 0):
    """test_nothing_lost's two-linear toy model under ``kind`` (dim 4, alpha 8)."""
    return nothing_lost.toy(kind, seed=seed, dtype=dtype)


def gpt(kind: str, seed: int = 0):
    from tests.megatron_utils import tiny_gpt_model

    kw = {"dim": 4, "alpha": 8}
    if kind == "canonical":
        kw["target_modules"] = ["linear_q", "linear_v", "linear_proj", "linear_fc1_up",
                                "linear_fc1_gate", "linear_fc2"]
    model = tiny_gpt_model(seed=seed, num_layers=1, hidden_dropout=0.0, attention_dropout=0.0)
    return TRANSFORMS[kind](**kw)(model)


def adapter_params(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def randomise(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g).to(p.dtype)
                p.copy_(p.abs() * (1 + 0.2 * noise) if name.endswith("weight_magnitude")
                        else 0.5 * noise)


def bases(model) -> dict[str, torch.Tensor]:
    return {n: m.to_wrap.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, AdapterWrapper)}


def assert_bitwise(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    different = [n for n in want if not torch.equal(got[n], want[n])]
    assert not different, f"{what}: {different}"


def step(model, seed: int) -> dict[str, torch.Tensor]:
    """One Adam step on the adapters with random gradients; returns the stepped values."""
    params = adapter_params(model)
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    torch.optim.Adam(params, lr=0.05).step()
    for p in params:
        p.grad = None
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of |x| in ``dtype`` (fp32 result)."""
    _, exp = torch.frexp(x.float().abs().clamp_min(torch.finfo(dtype).tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exp - 1) * torch.finfo(dtype).eps


def check_cycle(model, run, keep_base, seed: int) -> None:
    randomise(model, seed)
    w0 = bases(model)
    with torch.no_grad():  # base + delta before any scaling (DoRA rescales it by m / ||.||)
        summed = {n: w0[n].float() + m.delta_weight().float() for n, m in model.named_modules()
                  if isinstance(m, AdapterWrapper)}
    merge_lora(model, keep_base=keep_base)
    merged = bases(model)
    assert any(not torch.equal(merged[n], w0[n]) for n in w0), "the merge changed nothing"
    at_merge = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    stepped = step(model, seed + 100)
    assert any(not torch.equal(stepped[n], at_merge[n]) for n in stepped)

    # loads into the merged model are refused and copy nothing
    other = adapter_state_dict(model)
    other = {k: (torch.randn_like(v) if v.is_floating_point() and not k.endswith("_extra_state")
                 else v) for k, v in other.items()}
    with pytest.raises(AdapterLoadError, match=r"merged layers.*unmerge_lora"):
        load_adapter_state_dict(model, other)
    full = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    full.pop(next(k for k in full if k.endswith("lora_merged")))
    with pytest.raises(RuntimeError, match=r"merged.*unmerge_lora"):
        model.load_state_dict(full, strict=False)
    assert_bitwise(bases(model), merged, "a refused load changed a merged base")

    if keep_base is None:  # nothing kept: the changed adapter is refused, nothing undone
        with pytest.raises(MergeError, match=r"changed since merge_lora.*keep_base"):
            unmerge_lora(model)
        assert_bitwise(bases(model), merged, "a refused unmerge changed a base")
        with torch.no_grad():  # back to the merged adapter: recomputed, within one ulp
            for n, p in model.named_parameters():
                if n in at_merge:
                    p.copy_(at_merge[n])
        unmerge_lora(model)
        for n, w in bases(model).items():
            # the merged weight's rounding, carried back: one ulp of the larger of the base,
            # the merged weight and base + delta
            big = torch.maximum(torch.maximum(w0[n].float().abs(), merged[n].float().abs()),
                                summed[n].abs())
            err = (w.float() - w0[n].float()).abs() / ulp(big, w.dtype)
            assert (err <= 1).all(), (n, float(err.max()))
        return

    unmerge_lora(model)
    assert_bitwise(bases(model), w0, "unmerge after a step and refused loads")
    now = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert_bitwise(now, stepped, "the step was lost")
    # unmerged, the load refused before is accepted; a second cycle with the loaded adapters
    # is exact again, and the model computes what it computed before it
    load_adapter_state_dict(model, other)
    loaded = adapter_state_dict(model)
    assert all(torch.equal(loaded[k], v) for k, v in other.items() if k in loaded)
    want = run(model)
    merge_lora(model, keep_base=keep_base)
    tol = dtype_tol(w0[next(iter(w0))].dtype, "layer")
    assert_close_rel(run(model), want, tol, "merged outputs")
    unmerge_lora(model)
    assert_bitwise(bases(model), w0, "second cycle")
    torch.testing.assert_close(run(model), want, rtol=0, atol=0)


@pytest.mark.parametrize("keep_base", ["cpu", "device", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_merge_step_load_unmerge_is_the_identity_on_plain_linears(kind, dtype, keep_base):
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(7)).to(dtype)
    for seed in (1, 2):
        model = toy(kind, dtype, seed=seed)
        check_cycle(model, lambda m: m(x), keep_base, seed)


@pytest.mark.parametrize("keep_base", ["cpu", None])
@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_merge_step_load_unmerge_is_the_identity_on_a_gpt(megatron_tp1, kind, keep_base):
    from tests.megatron_utils import gpt_inputs

    inputs = gpt_inputs(batch=1, seq=8, seed=3)
    check_cycle(gpt(kind), lambda m: m(*inputs), keep_base, seed=5)
