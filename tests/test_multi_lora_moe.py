"""MultiLoRA on grouped MoE experts: a tiny megatron-core MoE layer (``MoELayer`` with the
alltoall token dispatcher and ``TEGroupedMLP`` over tests/te_standins.py's grouped linears; 4
experts, top-2; TP = EP = 1 on the CPU) with slots on ``experts.linear_fc1/fc2``, routed through
``install_moe_slot_routing``'s hook, equals per-slot single LoRA on each expert: an fp64 oracle
that merges slot s's expert-e adapter into expert e's weights (W + s·B A) and sums the top-k
experts weighted by the router's probabilities, for the outputs, dx and every slot's per-expert
dA / dB (slots with different ranks and alphas, an empty slot). Also the options upstream
refuses, a forward without routing, and the per-expert checkpoint layout.

CPU shims local to this module (megatron-core's alltoall dispatcher moves its split sizes to the
host on a CUDA side stream): a stand-in stream, ``torch.cuda.current_stream`` / ``stream`` as
no-ops, and ``moe_utils.te_general_gemm = None`` (DESIGN.md's MoE shim).
"""

from __future__ import annotations

import contextlib
import copy
import types

import pytest
import torch
from torch import nn

from bridge.peft.errors import UnsupportedOptionError
from bridge.peft.multi_lora import MultiLoRA
from bridge.peft.multi_lora_layers import (
    MultiLoRAGroupedExpertLinear,
    init_adapter_slot,
    install_moe_slot_routing,
    set_tokens_per_adapter_slot,
)
from tests.numerics import dtype_tol, rel_err

pytest.importorskip("megatron.core", reason="megatron-core not installed")
pytestmark = pytest.mark.usefixtures("megatron_tp1", "moe_cpu_shims")

H, FFN, EXPERTS, R_MAX = 32, 24, 4, 8
SLOTS = [(4, 8.0), (8, 3.0), (2, 5.0)]  # (rank, alpha) per slot
TOL = dtype_tol(torch.float32)  # fp32 against the fp64 oracle


class _HostStream:
    def wait_stream(self, other) -> None:
        pass

    def record_event(self):
        return types.SimpleNamespace(synchronize=lambda: None)


@pytest.fixture
def moe_cpu_shims(monkeypatch):
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)
    monkeypatch.setattr(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", _HostStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


def moe_config(**overrides):
    from tests.megatron_utils import make_config

    kw = dict(hidden_size=H, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
              num_moe_experts=EXPERTS, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
              moe_grouped_gemm=True, add_bias_linear=False, moe_router_load_balancing_type="none",
              moe_aux_loss_coeff=0.0)
    kw.update(overrides)
    return make_config(**kw)


def moe_model(**overrides):
    """``decoder.layers.0.mlp`` = a MoE layer with grouped experts, MultiLoRA on its experts."""
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from tests import te_standins as te

    torch.manual_seed(0)
    experts = ModuleSpec(module=TEGroupedMLP, submodules=MLPSubmodules(
        linear_fc1=te.TEColumnParallelGroupedLinear, linear_fc2=te.TERowParallelGroupedLinear))
    root = nn.Module()
    root.decoder = nn.Module()
    root.decoder.layers = nn.ModuleList([nn.Module()])
    root.decoder.layers[0].mlp = MoELayer(moe_config(**overrides),
                                          submodules=MoESubmodules(experts=experts))
    torch.manual_seed(1)
    MultiLoRA(target_modules=["linear_fc1", "linear_fc2"], n_adapters=len(SLOTS), dim=R_MAX,
              alpha=16, lora_B_init_method="normal")(root)
    for i, (rank, alpha) in enumerate(SLOTS):
        init_adapter_slot(root, i, rank, alpha)
    return root


def oracle(moe, x, tokens):
    """fp64 y and the gradients of sum(y * g): each token's top-k experts, expert e of slot s
    with W1_e + s1 B1 A1 and W2_e + s2 B2 A2 (the slot's first ``rank`` ranks)."""
    fc1, fc2 = moe.experts.linear_fc1, moe.experts.linear_fc2
    x_leaf = x.detach().clone().requires_grad_(True)
    probs, routing = moe.router(x_leaf.reshape(-1, H))
    x64, probs = x_leaf.reshape(-1, H).double(), probs.double()
    leaves = {}

    def merged(layer, s, e):
        rank, alpha = SLOTS[s]
        a = layer.adapters[s].linear_in.weight[e, :rank].detach().double().requires_grad_(True)
        b = layer.adapters[s].linear_out.weight[e, :, :rank].detach().double().requires_grad_(True)
        leaves[(id(layer), s, e)] = (a, b)
        return getattr(layer.to_wrap, f"weight{e}").double() + (alpha / rank) * b @ a

    slot_of = torch.repeat_interleave(torch.arange(len(SLOTS)), torch.tensor(tokens))
    y = torch.zeros(x64.shape[0], H, dtype=torch.float64)
    for s in range(len(SLOTS)):
        for e in range(EXPERTS):
            rows = ((slot_of == s) & routing[:, e]).nonzero().flatten()
            if rows.numel():
                h = moe.config.activation_func(x64[rows] @ merged(fc1, s, e).t())
                y = y.index_add(0, rows, (h * probs[rows, e:e + 1]) @ merged(fc2, s, e).t())
            else:
                merged(fc1, s, e), merged(fc2, s, e)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (y * g).sum().backward()
    return y, x_leaf.grad, leaves, g


def test_each_slot_on_each_expert_equals_its_single_lora():
    root = moe_model()
    moe = root.decoder.layers[0].mlp
    fc1, fc2 = moe.experts.linear_fc1, moe.experts.linear_fc2
    assert isinstance(fc1, MultiLoRAGroupedExpertLinear) and fc1.num_local_experts == EXPERTS
    assert install_moe_slot_routing(root) == 0  # MultiLoRA installed it already: idempotent
    tokens = [7, 0, 13]  # 20 tokens = x [10, 2, H]; slot 1 empty
    x = torch.randn(10, 2, H, generator=torch.Generator().manual_seed(3))
    set_tokens_per_adapter_slot(root, torch.tensor(tokens))
    x_in = x.clone().requires_grad_(True)
    y, _ = moe(x_in)
    y_ref, dx_ref, leaves, g = oracle(moe, x, tokens)
    (y.reshape(-1, H).double() * g).sum().backward()
    assert rel_err(y.reshape(-1, H), y_ref) < TOL
    assert rel_err(x_in.grad, dx_ref.reshape(x.shape)) < TOL
    routing = fc1.expert_slot_routing
    assert fc2.expert_slot_routing is routing and routing.num_tokens == 40  # 20 tokens x top-2
    assert routing.slot_token_counts.tolist() == [14, 0, 26]
    for layer in (fc1, fc2):
        for s, (rank, _) in enumerate(SLOTS):
            da = layer.adapters[s].linear_in.weight.grad
            db = layer.adapters[s].linear_out.weight.grad
            assert torch.count_nonzero(da[:, rank:]) == 0 and torch.count_nonzero(db[..., rank:]) == 0
            for e in range(EXPERTS):
                a, b = leaves[(id(layer), s, e)]
                if a.grad is None or not torch.count_nonzero(a.grad):  # expert e got no slot-s row
                    assert torch.count_nonzero(da[e]) == 0
                    continue
                assert rel_err(da[e, :rank], a.grad) < TOL, (layer.base_linear_name, s, e)
                assert rel_err(db[e, :, :rank], b.grad) < TOL, (layer.base_linear_name, s, e)


@pytest.mark.parametrize("option,value,match", [
    ("moe_token_dispatcher_type", "allgather", "moe_token_dispatcher_type='allgather'"),
    ("moe_permute_fusion", True, "moe_permute_fusion=True"),
    ("moe_pad_expert_input_to_capacity", True, "moe_pad_expert_input_to_capacity=True"),
    ("fp8", "hybrid", "fp8/fp4 experts"),
    ("expert_tensor_parallel_size", 2, "expert_tensor_parallel_size=2")])
def test_moe_options_upstream_refuses(option, value, match):
    from tests import te_standins as te

    cfg = moe_config()
    base = te.TEColumnParallelGroupedLinear(EXPERTS, H, FFN, config=cfg, init_method=nn.init.normal_,
                                            bias=False, skip_bias_add=False, is_expert=True)
    base.config = copy.copy(cfg)
    setattr(base.config, option, value)
    with pytest.raises(NotImplementedError, match=match) as e:
        MultiLoRAGroupedExpertLinear(base, 2, 4, 8, "decoder.layers.0.mlp.experts.linear_fc1",
                                     num_local_experts=EXPERTS)
    assert isinstance(e.value, UnsupportedOptionError)


def test_forward_without_routing_says_what_to_call():
    from tests import te_standins as te

    base = te.TEColumnParallelGroupedLinear(EXPERTS, H, FFN, config=moe_config(),
                                            init_method=nn.init.normal_, bias=False,
                                            skip_bias_add=False, is_expert=True)
    layer = MultiLoRAGroupedExpertLinear(base, 2, 4, 8, "decoder.layers.0.mlp.experts.linear_fc1",
                                         num_local_experts=EXPERTS)
    with pytest.raises(RuntimeError, match="install_moe_slot_routing"):
        layer(torch.randn(6, H), [2, 1, 3, 0])
    assert layer.training_plan()[0].path == "eager"


def test_expert_slots_keep_the_packed_per_expert_layout_in_checkpoints():
    root = moe_model()
    fc1 = root.decoder.layers[0].mlp.experts.linear_fc1
    assert fc1.adapters[0].linear_in.weight.shape == (EXPERTS, R_MAX, H)
    assert fc1.adapters[0].linear_out.weight.shape == (EXPERTS, FFN, R_MAX)
    assert fc1.stacked_factors()[2] == ""  # views of one [n, E, r, K] stack
    sharded = fc1.adapters[1].sharded_state_dict("p.")
    sh = sharded["p.linear_in.weight"]
    assert sh.global_shape == (EXPERTS, R_MAX, H) and sh.global_offset == (0, 0, 0)
    keys = set(fc1.state_dict())
    assert {f"adapters.{i}.linear_{f}.weight" for i in range(3) for f in ("in", "out")} <= keys
    # the rank mask covers every expert; clear re-draws each expert's matrices in place
    a0 = fc1.adapters[2].linear_in.weight
    assert torch.count_nonzero(a0[:, 2:]) == 0 and torch.count_nonzero(a0[:, :2]) > 0
    before = a0.detach().clone()
    fc1.clear_adapter_slot(2)
    assert fc1._slot_alpha[2] == 0.0 and torch.count_nonzero(a0[:, 2:]) > 0
    assert not torch.equal(a0, before) and fc1.stacked_factors()[2] == ""
