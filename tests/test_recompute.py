"""LoRA under activation recompute (bridge.peft.recompute): a tiny megatron-core GPT trains its
adapters under recompute_granularity='full' and 'selective' with the same gradients as without
recompute; without the fix 'full' fails in backward and selective MLP recompute trains nothing.

Full recompute re-runs layers in backward through megatron's CheckpointFunction, which saves and
restores the CUDA RNG states: the two CPU-only shims that make it run here (DESIGN.md "Real
components") live in the ``recompute_shims`` fixture below, not in conftest.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed")

from bridge.peft import LoRA, maybe_enable_recompute_inputs_grad  # noqa: E402
from bridge.peft import recompute as recompute_module  # noqa: E402
from tests.megatron_utils import gpt_inputs, tiny_gpt_model  # noqa: E402

NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)  # identical passes to compare
RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective_mlp": dict(recompute_granularity="selective", recompute_modules=["mlp"]),
    "selective_attn": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
}


@pytest.fixture
def recompute_shims(monkeypatch):
    """No CUDA RNG states to save and restore on the CPU."""
    from megatron.core.tensor_parallel import random as mrandom

    monkeypatch.setattr(mrandom, "_get_cuda_rng_state", lambda *a, **k: None)
    monkeypatch.setattr(mrandom, "_set_cuda_rng_state", lambda *a, **k: None)
    tracker = mrandom.get_cuda_rng_tracker()
    monkeypatch.setattr(tracker, "get_states", lambda: {})
    monkeypatch.setattr(tracker, "set_states", lambda states: None)


def _adapted(recompute: str, targets, seed: int = 0):
    model = tiny_gpt_model(seed=seed, num_layers=2, **NO_DROPOUT, **RECOMPUTE[recompute])
    LoRA(target_modules=list(targets), dim=4, alpha=8, lora_B_init_method="normal",
         kernel_backend="eager")(model)
    return model


def _loss(model) -> torch.Tensor:
    ids, pos, mask = gpt_inputs(batch=2, seq=8)
    labels = torch.roll(ids, -1, dims=1)
    return model(ids, pos, attention_mask=mask, labels=labels).float().mean()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def _train_step(model) -> dict[str, torch.Tensor]:
    _loss(model).backward()
    return _grads(model)


@pytest.mark.parametrize("recompute, targets", [
    ("full", ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")),
    ("selective_mlp", ("linear_fc1", "linear_fc2")),
    ("selective_attn", ("linear_qkv", "linear_proj")),
])
def test_adapters_get_the_gradients_of_training_without_recompute(megatron_tp1, recompute_shims,
                                                                  recompute, targets):
    want = _train_step(_adapted("none", targets))
    model = _adapted(recompute, targets)
    assert model.config.recompute_granularity == RECOMPUTE[recompute]["recompute_granularity"]
    got = _train_step(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(got) == trainable == set(want)  # every adapter got a gradient
    assert all(".adapter." in n for n in trainable)
    for name in want:
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_without_the_fix_full_recompute_cannot_train(megatron_tp1, recompute_shims, monkeypatch):
    """The failure the fix removes: the checkpointed layers' inputs need no grad, so the loss
    needs none ("element 0 of tensors does not require grad")."""
    monkeypatch.setattr("bridge.peft.base.maybe_enable_recompute_inputs_grad",
                        lambda model, *a, **k: set())
    model = _adapted("full", ("linear_qkv", "linear_fc2"))
    with pytest.raises(RuntimeError, match="does not require grad"):
        _loss(model).backward()
    maybe_enable_recompute_inputs_grad(model)  # applied afterwards, it fixes the same model
    assert _train_step(model)


def test_without_the_fix_selective_mlp_recompute_trains_no_mlp_adapter(megatron_tp1,
                                                                       recompute_shims,
                                                                       monkeypatch):
    """LoRA on the MLP only, MLP recomputed: nothing in front of the first checkpoint needs a
    gradient, so no adapter would get one."""
    monkeypatch.setattr("bridge.peft.base.maybe_enable_recompute_inputs_grad",
                        lambda model, *a, **k: set())
    model = _adapted("selective_mlp", ("linear_fc1", "linear_fc2"))
    loss = _loss(model)
    assert not loss.requires_grad
    maybe_enable_recompute_inputs_grad(model)
    assert len(_train_step(model)) == 8  # 2 layers x 2 linears x (A, B)


def test_trainable_embeddings_keep_their_gradient_under_recompute(megatron_tp1, recompute_shims):
    """The hook replaces only inputs that need no grad: with the embeddings trainable too, their
    gradient still flows (nothing is detached from a graph that leads somewhere)."""
    grads = {}
    for recompute in ("none", "full"):
        model = _adapted(recompute, ("linear_qkv",))
        model.embedding.word_embeddings.weight.requires_grad_(True)
        maybe_enable_recompute_inputs_grad(model)
        grads[recompute] = _train_step(model)
    name = "embedding.word_embeddings.weight"
    assert name in grads["full"] and grads["full"][name].abs().sum() > 0
    for key, want in grads["none"].items():
        torch.testing.assert_close(grads["full"][key], want, rtol=1e-5, atol=1e-7, msg=key)


def test_hook_is_registered_once_and_only_where_recompute_is_on(megatron_tp1):
    from megatron.core.transformer.transformer_block import TransformerBlock

    registry: set[int] = set()
    plain = _adapted("none", ("linear_qkv",))
    assert maybe_enable_recompute_inputs_grad(plain, registry) == set()
    assert not plain.decoder._forward_pre_hooks
    model = _adapted("full", ("linear_qkv",))  # PEFT.__call__ hooked it (module registry)
    assert id(model) in recompute_module.PEFT_RECOMPUTE_PATCHED
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    assert len(blocks) == 1 and len(blocks[0]._forward_pre_hooks) == 1
    assert maybe_enable_recompute_inputs_grad([model], registry) == {id(model)}
    LoRA(target_modules=["linear_qkv"], dim=4, alpha=8)(model)  # again: no second hook
    assert len(blocks[0]._forward_pre_hooks) == 1
    frozen = tiny_gpt_model(num_layers=1, **RECOMPUTE["full"])
    frozen.requires_grad_(False)  # nothing trains: nothing to hook
    assert maybe_enable_recompute_inputs_grad(frozen, set()) == set()
