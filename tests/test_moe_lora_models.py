"""Tiny megatron-core MoE GPTs for the expert-LoRA tests, and their world-size-1 checks.

``moe_gpt(layout, ...)``: one decoder layer (local attention, RMSNorm), an MoE MLP with 4 experts,
top-2 routing, a shared expert and the all-gather token dispatcher (the all-to-all one needs CUDA
streams), gated (SwiGLU) experts; ``layout`` 'sequential' builds megatron's SequentialMLP
(per-expert Column/RowParallelLinear, ``is_expert=True``), 'grouped' its TEGroupedMLP over the
TE-shaped grouped-linear stand-ins (``TEColumnParallelGroupedLinear`` / ``TERowParallelGroupedLinear``,
``weight{i}`` per expert, called with ``m_splits``). The norms are a torch RMSNorm that allows
sequence parallelism (megatron's WrappedTorchNorm refuses it), its weight marked
``sequence_parallel`` as megatron marks its own norms. Routing replay (``moe_enable_routing_replay``)
lets a distributed run reuse world size 1's routing, so routing is identical by construction.

The tests here, at world size 1: the two layouts with the same weights give the same outputs and
(per-expert adapters) gradients, and LoRA's routing of each expert linear to its adapter kind.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e .[test])")

VOCAB, SEQ, BATCH, HIDDEN, EXPERTS, TOPK = 64, 8, 2, 32, 4, 2
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router"]


class SPRMSNorm(nn.RMSNorm):
    """torch's RMSNorm built as megatron builds its norms, usable with sequence parallelism."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def moe_config(*, tp: int = 1, ep: int = 1, etp: int | None = None, sp: bool = False, **kw):
    from tests.megatron_utils import make_config

    args = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=32, gated_linear_unit=True, activation_func=F.silu,
                normalization="RMSNorm", add_bias_linear=False, num_moe_experts=EXPERTS,
                moe_router_topk=TOPK, moe_ffn_hidden_size=16,
                moe_shared_expert_intermediate_size=16,
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                moe_token_dispatcher_type="allgather", moe_enable_routing_replay=True,
                hidden_dropout=0.0, attention_dropout=0.0,
                tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                expert_tensor_parallel_size=etp if etp is not None else tp, sequence_parallel=sp)
    args.update(kw)
    return make_config(**args)


def moe_layer_spec(layout: str):
    """A GPT layer spec: local attention, an MoE MLP (SequentialMLP or TE-grouped stand-ins)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    from tests.te_standins import TEColumnParallelGroupedLinear, TERowParallelGroupedLinear

    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = SPRMSNorm
    if layout == "grouped":
        # the MoE layer's submodules: a ModuleSpec's (megatron-core 0.16-0.18), or the keyword of
        # the functools.partial builder 0.19 returns instead
        moe = getattr(sub.mlp, "submodules", None) or sub.mlp.keywords["submodules"]
        moe.experts = ModuleSpec(module=TEGroupedMLP, submodules=MLPSubmodules(
            linear_fc1=TEColumnParallelGroupedLinear, linear_fc2=TERowParallelGroupedLinear))
    elif layout != "sequential":
        raise ValueError(layout)
    return spec


def moe_gpt(layout: str, config, seed: int = 0):
    """The tiny MoE GPT (model parallel state must be initialised for ``config``'s sizes)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router_replay import RouterReplay
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    # megatron-core 0.16 without transformer-engine leaves this name undefined (DESIGN.md)
    moe_utils.te_general_gemm = getattr(moe_utils, "te_general_gemm", None)
    RouterReplay.clear_global_router_replay_instances()  # one model's routers at a time
    torch.manual_seed(seed)
    try:
        model_parallel_cuda_manual_seed(seed)
    except Exception:  # the CUDA RNG tracker needs CUDA for its states; CPU init does not use them
        pass
    block = TransformerBlockSubmodules(layer_specs=[moe_layer_spec(layout)] * config.num_layers,
                                       layer_norm=SPRMSNorm)
    return GPTModel(config=config, transformer_layer_spec=block, vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope")


def tokens(batch: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [b, s], position_ids, causal attention mask) of ``batch`` sequences."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(batch, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    return ids, pos, mask


def apply_lora(model, **kw):
    """LoRA on attention, dense, shared-expert, expert linears and the router; B drawn N(0, 0.2)
    so every factor gets a gradient at the first step."""
    from bridge.peft import LoRA

    args = dict(target_modules=list(TARGETS), dim=4, alpha=8, lora_B_init_method="normal",
                kernel_backend="eager")
    args.update(kw)
    return LoRA(**args)(model)


def copy_weights(src: nn.Module, dst: nn.Module, sequential_to_grouped: bool = True) -> None:
    """Copy every tensor of a world-size-1 model into another layout's (SequentialMLP expert j's
    ``local_experts.j.linear_fcX.weight`` <-> the grouped ``linear_fcX.weight{j}``)."""
    import re

    out = dst.state_dict()
    for key, value in src.state_dict().items():
        if value is None or key.endswith("_extra_state"):
            continue
        m = re.match(r"(.*experts\.)local_experts\.(\d+)\.(linear_fc[12])\.weight$", key)
        name = f"{m.group(1)}{m.group(3)}.weight{m.group(2)}" if m else key
        if name in out:
            out[name] = value
    dst.load_state_dict(out, strict=False)


# ---- world size 1 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [False, True])
def test_sequential_and_grouped_layouts_agree(megatron_tp1, share):
    """The same base weights and adapters in SequentialMLP (one adapter per expert linear) and
    the TE-grouped layout (per-expert adapters, or one shared by every expert) give the same
    per-token loss and adapter gradients; the grouped forward sees m_splits."""
    from bridge.peft import ParallelLinearAdapter
    from bridge.peft.expert_adapters import GroupedExpertLinearAdapter
    from bridge.peft.expert_lora_layers import ExpertLoRALinear

    cfg = moe_config()
    seq = apply_lora(moe_gpt("sequential", cfg))
    grouped = apply_lora(moe_gpt("grouped", moe_config()), share_expert_adapters=share)
    copy_weights(seq, grouped)
    experts_s = seq.decoder.layers[0].mlp.experts
    experts_g = grouped.decoder.layers[0].mlp.experts
    for fc in ("linear_fc1", "linear_fc2"):
        wrapper = getattr(experts_g, fc)
        assert isinstance(wrapper, ExpertLoRALinear)
        kind = ParallelLinearAdapter if share else GroupedExpertLinearAdapter
        assert type(wrapper.adapter) is kind
        with torch.no_grad():
            for name in ("linear_in", "linear_out"):
                per = torch.stack([getattr(getattr(experts_s.local_experts[j], fc).adapter,
                                           name).weight for j in range(EXPERTS)])
                target = getattr(wrapper.adapter, name).weight
                target.copy_(per if not share else per[0])
                if share:  # one adapter for every expert: make the SequentialMLP ones equal
                    for j in range(EXPERTS):
                        getattr(getattr(experts_s.local_experts[j], fc).adapter,
                                name).weight.copy_(per[0])
    ids, pos, mask = tokens()
    losses, grads = [], []
    for model in (seq, grouped):
        loss = model(ids, pos, mask, labels=ids)
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert losses[0].std() > 0
    for n, g in grads[0].items():
        if ".experts.local_experts." in n:
            continue
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=n)
    for fc in ("linear_fc1", "linear_fc2"):
        for name in ("linear_in", "linear_out"):
            per = torch.stack([grads[0][f"decoder.layers.0.mlp.experts.local_experts.{j}.{fc}."
                                        f"adapter.{name}.weight"] for j in range(EXPERTS)])
            want = per.sum(0) if share else per  # a shared adapter sums every expert's tokens
            got = grads[1][f"decoder.layers.0.mlp.experts.{fc}.adapter.{name}.weight"]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{fc}.{name}")
            assert got.abs().sum() > 0


@pytest.mark.parametrize("layout, kw", [("sequential", {}), ("grouped", {}),
                                        ("grouped", {"share_expert_adapters": False}),
                                        ("grouped", {"experts_shared_outer_loras": True})])
@pytest.mark.parametrize("overlap", [False, True])
def test_lora_routes_each_moe_linear_to_its_wrapper(megatron_tp1, layout, kw, overlap):
    """Attention and shared-expert linears: LoRALinear (the shared experts communicate like
    dense linears) unless megatron's moe_shared_expert_overlap took their TP communication away
    (``explicit_expert_comm``, set here as megatron-core 0.16's SharedExpertMLP sets it: its
    overlap needs the all-to-all dispatcher's CUDA streams): then ExpertLoRALinear with a gathered
    factor. Expert linears: ExpertLoRALinear with the layout's adapter; the router:
    LoRATopKRouter."""
    from bridge.peft import ParallelLinearAdapter
    from bridge.peft.expert_adapters import (
        GroupedExpertLinearAdapter,
        SharedOuterGroupedExpertAdapter,
    )
    from bridge.peft.expert_lora_layers import ExpertLoRALinear
    from bridge.peft.lora_layers import LoRALinear, LoRATopKRouter

    model = moe_gpt(layout, moe_config())
    mlp = model.decoder.layers[0].mlp
    if overlap:
        for linear in (mlp.shared_experts.linear_fc1, mlp.shared_experts.linear_fc2):
            linear.explicit_expert_comm = True
    apply_lora(model, **kw)
    mlp = model.decoder.layers[0].mlp
    attn = model.decoder.layers[0].self_attention
    for wrapper in (attn.linear_qkv, attn.linear_proj):
        assert type(wrapper) is LoRALinear and not wrapper.adapter.explicit_comm
    for wrapper in (mlp.shared_experts.linear_fc1, mlp.shared_experts.linear_fc2):
        assert type(wrapper) is (ExpertLoRALinear if overlap else LoRALinear)
        assert type(wrapper.adapter) is ParallelLinearAdapter
        assert wrapper.adapter.explicit_comm == overlap and not wrapper.adapter.is_expert
    assert type(mlp.router) is LoRATopKRouter
    if layout == "sequential":
        experts = [w for e in mlp.experts.local_experts for w in (e.linear_fc1, e.linear_fc2)]
        kinds = {ParallelLinearAdapter}
    else:
        experts = [mlp.experts.linear_fc1, mlp.experts.linear_fc2]
        kinds = {SharedOuterGroupedExpertAdapter if kw.get("experts_shared_outer_loras") else
                 GroupedExpertLinearAdapter if "share_expert_adapters" in kw else
                 ParallelLinearAdapter}
    assert len(experts) == (2 * EXPERTS if layout == "sequential" else 2)
    for wrapper in experts:
        assert type(wrapper) is ExpertLoRALinear and {type(wrapper.adapter)} == kinds
        assert wrapper.adapter.is_expert
