"""Megatron-Bridge's PEFT names and behaviours that bridge.peft provides (issue 11), each on real
megatron-core layers: peft.utils helpers, ParallelLinearAdapter's process groups, LoRAMerge,
LoRA+, VLMLoRA, router and ModelOpt LoRA, create_peft, canonical LoRA at apply time, Mamba
in_proj checkpoints, metadata pass-through and the upstream-compatible exceptions. The TP=2
cases (regather, all-to-all, LoRAMerge) are in test_dropin_tp.py."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core", reason="megatron-core not installed")

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402

from bridge.peft import (  # noqa: E402
    CanonicalLoRA,
    DoRA,
    LoRA,
    LoRALinear,
    LoRAMerge,
    LoRATopKRouter,
    ParallelLinearAdapter,
    PEFTConfigError,
    UnsupportedModuleError,
    VLMLoRA,
    create_peft,
    create_peft_hook,
    get_lora_plus_config_overrides,
)
from bridge.peft import utils as peft_utils  # noqa: E402
from bridge.peft.canonical_lora import LoRALinearSplitQKV, ModuleDict  # noqa: E402
from tests.megatron_utils import make_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("megatron_tp1")
K, N, R = 16, 24, 4


def column(cfg=None, **kw):
    return ColumnParallelLinear(K, N, config=cfg or make_config(), init_method=nn.init.normal_,
                                bias=False, gather_output=False, **kw)


# ---- peft.utils helpers --------------------------------------------------------------------------
def test_adapter_attributes_is_a_frozen_dataclass_of_six_fields():
    attrs = peft_utils.get_adapter_attributes_from_linear(column())
    assert [f.name for f in dataclasses.fields(attrs)] == [
        "input_is_parallel", "in_features", "out_features", "disable_tensor_parallel_comm",
        "disable_sequence_parallel_comm", "base_linear_is_parallel"]
    assert (attrs.in_features, attrs.out_features, attrs.disable_tensor_parallel_comm) == (K, N,
                                                                                         False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        attrs.out_features = 1


def test_init_methods():
    w = torch.empty(400, 300)
    torch.manual_seed(0)
    peft_utils.init_method_normal(0.05)(w)
    assert abs(w.std().item() / 0.05 - 1) < 0.02 and abs(w.mean().item()) < 0.002
    peft_utils.init_method_kaiming_uniform(math.sqrt(5))(w)
    bound = 1 / math.sqrt(300)
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    peft_utils.init_method_const(0.5)(w)
    assert torch.equal(w, torch.full_like(w, 0.5))


@pytest.mark.parametrize("rows, mult, pad", [(7, 4, 1), (8, 4, 0), (1, 3, 2)])
def test_pad_and_unpad_seq_to_mult(rows, mult, pad):
    x = torch.randn(rows, 2, 5)
    padded, n = peft_utils.pad_seq_to_mult(x, mult)
    assert n == pad and padded.shape == (rows + pad, 2, 5)
    assert torch.equal(padded[:rows], x) and not padded[rows:].any()
    assert torch.equal(peft_utils.unpad_seq_to_mult(padded, n), x)


def test_all2all_hp2sp_at_tp1_is_the_identity():
    x = torch.randn(4, 3, requires_grad=True)
    y = peft_utils.all2all_hp2sp(x)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_moe_rank_normalisation_helpers():
    from types import SimpleNamespace

    class Group:  # a process group as the helpers see it: its size
        def __init__(self, n):
            self.n = n

        def size(self):
            return self.n

    expert = SimpleNamespace(config=SimpleNamespace(moe_router_topk=2), tp_group=Group(4))
    kw = dict(normalize_moe_lora=True, is_expert=True)
    assert peft_utils.get_effective_lora_dim(expert, dim=32, **kw) == 16
    assert peft_utils.get_effective_lora_dim(expert, dim=32, normalize_moe_lora=True,
                                             is_expert=False) == 32
    with pytest.raises(ValueError, match="dim=5 must be divisible by moe_router_topk=2"):
        peft_utils.get_effective_lora_dim(expert, dim=5, **kw)
    with pytest.raises(ValueError, match="moe_router_topk is None"):
        peft_utils.get_effective_lora_dim(SimpleNamespace(config=SimpleNamespace(
            moe_router_topk=None)), dim=4, **kw)
    assert peft_utils.align_expert_dim_for_tp(expert, 6, input_is_parallel=False, **kw) == 8
    assert peft_utils.align_expert_dim_for_tp(expert, 6, input_is_parallel=True, **kw) == 6
    assert peft_utils.align_expert_dim_for_tp(expert, 8, input_is_parallel=False, **kw) == 8


# ---- ParallelLinearAdapter: process groups, dtype, the base's tp_group -------------------------
def test_parallel_linear_adapter_takes_a_process_group_collection():
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    group = parallel_state.get_tensor_model_parallel_group()
    pgs = ProcessGroupCollection(tp=group)
    adapter = ParallelLinearAdapter(K, N, R, "x.linear_qkv", activation="identity",
                                    model_parallel_config=make_config(), pg_collection=pgs,
                                    sequence_parallel_input_regather=True)
    assert adapter.pg_collection is pgs and adapter.tp_group is group
    assert adapter.linear_in.tp_group is group and adapter.linear_out.tp_group is group
    assert adapter.sequence_parallel_input_regather


def test_lora_passes_the_bases_tp_group_to_the_adapter_linears():
    model = nn.Module()
    model.linear_qkv, model.linear_proj = column(), RowParallelLinear(
        N, K, config=make_config(), init_method=nn.init.normal_, bias=False,
        input_is_parallel=True, skip_bias_add=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*tp_group is None.*")  # megatron's warning
        LoRA(target_modules=["linear_qkv", "linear_proj"], dim=R)(model)
    for layer in (model.linear_qkv, model.linear_proj):
        assert layer.adapter.tp_group is layer.to_wrap.tp_group
        assert layer.adapter.linear_in.tp_group is layer.to_wrap.tp_group


def test_swiglu_factory_gets_the_groups_where_megatron_takes_them(monkeypatch):
    """megatron-core 0.19's apply_swiglu_sharded_factory takes tp_group/dp_group (FSDP2)."""
    from megatron.core.transformer import mlp

    seen = {}

    def newer(original_sh_ten, sharded_offsets, singleton_local_shards=False, *, tp_group=None,
              dp_group=None):
        seen.update(tp_group=tp_group, dp_group=dp_group, singleton=singleton_local_shards)
        return original_sh_ten

    monkeypatch.setattr(mlp, "apply_swiglu_sharded_factory", newer)
    cfg = make_config(gated_linear_unit=True)
    model = nn.Module()
    model.linear_fc1 = column(cfg)
    LoRA(target_modules=["linear_fc1"], dim=R)(model)
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    model.linear_fc1.sharded_state_dict("m.", (), {"dp_cp_group": dp})
    assert seen == dict(tp_group=model.linear_fc1.adapter.tp_group, dp_group=dp, singleton=False)


# ---- LoRAMerge (TP=1; TP=2 in test_dropin_tp.py) ---------------------------------------------------
def test_lora_merge_tensor_helper():
    g = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*s, generator=g, dtype=torch.float64)
               for s in ((N, K), (R, K), (N, R)))
    merged = LoRAMerge().merge(w, b, a, alpha=8, dim=R, tp_group=None)
    torch.testing.assert_close(merged, w + 2.0 * b @ a, rtol=1e-12, atol=1e-12)
    scaled = LoRAMerge().merge(w.float(), b.float(), a.float(), 8, R, tp_group=None, scale=0.5)
    assert scaled.dtype == torch.float32
    torch.testing.assert_close(scaled.double(), w + 0.5 * b @ a, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"do not fit the base weight shard"):
        LoRAMerge().merge(w, b[:5], a, 8, R, tp_group=None)


# ---- LoRA+ -----------------------------------------------------------------------------------------
def test_lora_plus_overrides_give_b_ratio_times_a_learning_rate():
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    from tests.megatron_utils import tiny_gpt_model

    model = LoRA(dim=R)(tiny_gpt_model(num_layers=1))
    config = OptimizerConfig(lr=1e-3, min_lr=1e-5)
    groups = _get_param_groups([model], config, get_lora_plus_config_overrides(config, 16.0))
    by_param = {id(p): g for g in groups for p in g["params"]}
    checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        want = (1e-3, 1e-5) if name.endswith("linear_in.weight") else (16e-3, 16e-5)
        assert (by_param[id(p)]["max_lr"], by_param[id(p)]["min_lr"]) == pytest.approx(want), name
        checked += 1
    assert checked == 8  # A and B of four linears
    for bad in (0, -2.0):
        with pytest.raises(ValueError, match=f"lora_plus_ratio must be > 0, got {bad}"):
            get_lora_plus_config_overrides(config, bad)


# ---- VLMLoRA ---------------------------------------------------------------------------------------
class ToyVLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = nn.Sequential(nn.Linear(K, K))
        self.vision_projection = nn.Linear(K, K)
        self.language_model = nn.Module()
        self.language_model.linear_qkv = column()


@pytest.mark.parametrize("freeze_vision", [True, False])
def test_vlm_lora_freezes_the_chosen_parts(freeze_vision):
    model = VLMLoRA(target_modules=["linear_qkv"], dim=R,
                    freeze_vision_model=freeze_vision)(ToyVLM())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    adapters = ["language_model.linear_qkv.adapter.linear_in.weight",
                "language_model.linear_qkv.adapter.linear_out.weight"]
    vision = [] if freeze_vision else ["vision_model.0.bias", "vision_model.0.weight"]
    assert trainable == sorted(adapters + vision)
    assert isinstance(model.language_model.linear_qkv, LoRALinear)


# ---- LoRA on a MoE router -------------------------------------------------------------------------
def _router(monkeypatch):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16 without transformer-engine leaves this name undefined (DESIGN.md)
    monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)
    from megatron.core.transformer.moe.router import TopKRouter

    cfg = make_config(num_moe_experts=4, moe_router_topk=2,
                      moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    holder = nn.Module()
    holder.router = TopKRouter(cfg, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    return holder


def test_lora_on_a_topk_router_adds_to_the_gating_logits(monkeypatch):
    holder = _router(monkeypatch)
    attrs = peft_utils.get_adapter_attributes_from_linear(holder.router)
    assert (attrs.in_features, attrs.out_features, attrs.base_linear_is_parallel) == (64, 4,
                                                                                       False)
    LoRA(target_modules=["router"], dim=2, lora_B_init_method="normal")(holder)
    wrapper = holder.router
    assert isinstance(wrapper, LoRATopKRouter)
    assert type(wrapper.adapter.linear_in) is nn.Linear  # replicated factors
    x = torch.randn(6, 2, 64)
    probs, routing_map = wrapper(x)
    router, adapter = wrapper.to_wrap, wrapper.adapter
    a, b = adapter.linear_in.weight, adapter.linear_out.weight
    with torch.no_grad():
        logits = router.gating(x) + adapter.scale * (x @ a.t() @ b.t())
        want_probs, want_map = router.routing(logits)
    torch.testing.assert_close(probs, want_probs, rtol=1e-5, atol=1e-6)
    assert torch.equal(routing_map, want_map)
    probs.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert router.weight.grad is None  # frozen
    wrapper.disable_adapter_layers()
    with torch.no_grad():
        off_probs, _ = wrapper(x)
        base_probs, _ = router(x)
    torch.testing.assert_close(off_probs, base_probs, rtol=0, atol=0)


# ---- ModelOpt's Linear ----------------------------------------------------------------------------
def test_lora_on_a_modelopt_linear():
    from megatron.core.post_training.modelopt.layers import Linear as ModelOptLinear

    model = nn.Module()
    model.linear_proj = ModelOptLinear(K, N, config=make_config(), init_method=nn.init.normal_)
    assert peft_utils.is_modelopt_linear(model.linear_proj)
    attrs = peft_utils.get_adapter_attributes_from_linear(model.linear_proj)
    assert not attrs.base_linear_is_parallel and attrs.disable_sequence_parallel_comm
    LoRA(target_modules=["linear_proj"], dim=R, lora_B_init_method="normal",
         kernel_backend="eager")(model)
    layer = model.linear_proj
    assert type(layer.adapter) is ParallelLinearAdapter and not layer.adapter._megatron
    x = torch.randn(3, 2, K)
    out, bias = layer(x)
    a, b = layer.adapter.linear_in.weight, layer.adapter.linear_out.weight
    want = layer.to_wrap(x)[0] + layer.adapter.scale * x @ a.t() @ b.t()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert bias is None


def test_a_modelopt_class_without_modelopt_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(peft_utils, "_modelopt_linear", lambda: (None, "ImportError: no modelopt"))
    quant = type("QuantLinear", (nn.Linear,), {"__module__": "modelopt.torch.quantization.nn"})
    with pytest.raises(UnsupportedModuleError, match=r"modelopt\.torch\.quantization\.nn\."
                                                     r"QuantLinear is a ModelOpt linear.*no "
                                                     r"modelopt.*install nvidia-modelopt"):
        peft_utils.is_modelopt_linear(quant(2, 2))
    assert peft_utils.is_modelopt_linear(nn.Linear(2, 2)) is False


# ---- create_peft / create_peft_hook ---------------------------------------------------------------
def test_create_peft_from_a_config_mapping():
    peft = create_peft({"type": "dora", "rank": 4, "alpha": 16, "dtype": "bf16",
                        "trainer_only_key": 1})
    assert type(peft) is DoRA and (peft.dim, peft.alpha) == (4, 16)
    assert peft.lora_dtype is torch.bfloat16
    lora = create_peft({"dim": 8, "dropout": 0.1}, dtype=torch.float16)
    assert type(lora) is LoRA and (lora.dim, lora.dropout, lora.lora_dtype) == (8, 0.1,
                                                                                torch.float16)
    assert type(create_peft({"type": "vlm_lora", "rank": 2})) is VLMLoRA
    assert type(create_peft({"type": "canonical_lora", "rank": 2, "dtype": "torch.float32"})) \
        is CanonicalLoRA
    assert create_peft({"rank": 0}) is None and create_peft({}) is None
    with pytest.raises(ValueError, match=r"Unsupported PEFT type 'not_lora'. Supported types: "
                                         r"canonical_lora, dora, lora, vlm_lora"):
        create_peft({"type": "not_lora", "rank": 4})
    with pytest.raises(ValueError, match=r"Unknown dtype: 'not_a_dtype'"):
        create_peft({"rank": 4}, dtype="not_a_dtype")


def test_create_peft_hook_applies_the_transform_and_records_what_to_save():
    from tests.megatron_utils import tiny_gpt_model

    peft = create_peft({"rank": 2, "target_modules": ["linear_proj"]})
    chunks = [tiny_gpt_model(num_layers=1)]
    out = create_peft_hook(peft)(chunks)
    assert out is chunks and isinstance(chunks[0].decoder.layers[0].self_attention.linear_proj,
                                        LoRALinear)
    assert peft.params_to_save == {
        "decoder.layers.0.self_attention.linear_proj.adapter.linear_in.weight",
        "decoder.layers.0.self_attention.linear_proj.adapter.linear_out.weight"}


# ---- canonical LoRA --------------------------------------------------------------------------------
def test_canonical_lora_derives_its_mapping_when_applied():
    """A recipe changes target_modules after construction: the split adapters follow."""
    from tests.megatron_utils import tiny_gpt_model

    peft = CanonicalLoRA(dim=2)
    assert set(peft.canonical_mapping) >= {"linear_qkv", "linear_fc1"}
    peft.target_modules = ["linear_q", "linear_fc1_up"]
    model = peft(tiny_gpt_model(num_layers=1))
    layer = model.decoder.layers[0]
    assert peft.canonical_mapping == {"linear_qkv": {"linear_q"}, "linear_fc1": {"linear_fc1_up"}}
    assert list(layer.self_attention.linear_qkv.adapter) == ["adapter_q"]
    assert list(layer.mlp.linear_fc1.adapter) == ["adapter_up"]
    assert not isinstance(layer.self_attention.linear_proj, LoRALinear)
    peft.target_modules = ["linear_qkv"]
    with pytest.raises(AssertionError, match=r"Canonical LoRA does not support target 'linear_qkv'"):
        peft(tiny_gpt_model(num_layers=1))


def test_canonical_targets_that_match_nothing_are_logged_by_their_own_name(caplog):
    import logging

    from tests.megatron_utils import tiny_gpt_model

    peft = CanonicalLoRA(target_modules=["linear_q", "linear_fc1_up", "*.layers.9.*.linear_v"],
                         dim=2)
    with caplog.at_level(logging.WARNING, logger="bridge.peft.module_matcher"):
        peft(tiny_gpt_model(num_layers=1))
    assert [r.getMessage() for r in caplog.records if r.name == "bridge.peft.module_matcher"] == [
        "No modules matched the requested target_modules entries: *.layers.9.*.linear_v"]


def test_split_qkv_infers_its_layout_from_the_base():
    """No num_attention_heads needed: the head size from kv_channels (or hidden_size / heads),
    the groups from the k/v outputs."""
    class Cfg:
        kv_channels, num_query_groups, num_attention_heads, hidden_size = 4, None, None, None

    base = nn.Linear(4, 4)
    base.config = Cfg()
    wrapper = LoRALinearSplitQKV(base, ModuleDict({"adapter_q": nn.Identity(),
                                                   "adapter_k": nn.Identity(),
                                                   "adapter_v": nn.Identity()}))
    q = torch.arange(16.0).reshape(1, 16)  # 4 heads of 4
    k, v = 100 + torch.arange(8.0).reshape(1, 8), 200 + torch.arange(8.0).reshape(1, 8)
    out = wrapper._interleave_qkv(q, k, v)  # 2 groups: [q0 q1 k0 v0 | q2 q3 k1 v1]
    want = torch.cat([q[:, :8], k[:, :4], v[:, :4], q[:, 8:], k[:, 4:], v[:, 4:]], dim=-1)
    assert torch.equal(out, want)
    Cfg.kv_channels, Cfg.num_attention_heads, Cfg.hidden_size = None, 4, 16
    assert torch.equal(wrapper._interleave_qkv(q, k, v), want)
    Cfg.num_attention_heads = Cfg.hidden_size = None
    with pytest.raises(ValueError, match="cannot infer the head size"):
        wrapper._interleave_qkv(q, k, v)


def test_canonical_module_dict_skips_missing_parts():
    cfg = make_config()
    adapter = ParallelLinearAdapter(K, N, R, "x.linear_qkv", activation="identity",
                                    model_parallel_config=cfg)
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    parts = ModuleDict({"adapter_q": adapter, "adapter_k": None})
    sharded = parts.sharded_state_dict("p.", (), ensure_metadata_has_dp_cp_group(None))
    assert sorted(k for k in sharded if not k.endswith("_extra_state")) == [
        "p.adapter_q.linear_in.weight", "p.adapter_q.linear_out.weight"]


# ---- Mamba in_proj, metadata pass-through ---------------------------------------------------------
def test_mamba_in_proj_adapter_is_saved_block_by_block(tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    cfg = make_config(hidden_size=16, num_attention_heads=2, mamba_state_dim=4, mamba_head_dim=8,
                      mamba_num_groups=2)
    rows = 2 * 32 + 2 * 2 * 4 + 4  # [z; x; B; C; dt] of d_inner 32, 2 groups of state 4, 4 heads

    def build(seed):
        torch.manual_seed(seed)
        holder = nn.Module()
        holder.mixer = nn.Module()
        holder.mixer.in_proj = ColumnParallelLinear(16, rows, config=cfg, bias=False,
                                                    init_method=nn.init.normal_,
                                                    gather_output=False)
        return LoRA(target_modules=["in_proj"], dim=2, lora_B_init_method="normal")(holder)

    model = build(0)
    from bridge.peft.adapter_wrapper import mamba_dim_info

    assert mamba_dim_info(model.mixer.in_proj.to_wrap) == dict(
        d_inner_local_tp=32, ngroups_local_tp=2, d_state=4, nheads_local_tp=4)
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    metadata = ensure_metadata_has_dp_cp_group(None)  # as a model's sharded_state_dict passes it
    sharded = model.mixer.in_proj.sharded_state_dict("mixer.in_proj.", (), metadata)
    factory = sharded["mixer.in_proj.adapter.linear_out.weight"]
    assert isinstance(factory, ShardedTensorFactory)
    assert not isinstance(sharded["mixer.in_proj.adapter.linear_in.weight"], ShardedTensorFactory)
    dist_checkpointing.save(sharded, str(tmp_path))
    fresh = build(1)
    loaded = dist_checkpointing.load(
        fresh.mixer.in_proj.sharded_state_dict("mixer.in_proj.", (), metadata), str(tmp_path))
    fresh.load_state_dict(loaded, strict=False)
    for name in ("adapter.linear_in.weight", "adapter.linear_out.weight"):
        assert torch.equal(fresh.mixer.in_proj.state_dict()[name],
                           model.mixer.in_proj.state_dict()[name]), name


def test_sharded_state_dict_passes_the_callers_metadata_through():
    from bridge.peft.adapter_wrapper import AdapterWrapper

    seen = []

    class Recorder(nn.Linear):
        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None, **extra):
            seen.append((prefix, metadata, extra))
            return {}

    wrapper = AdapterWrapper(Recorder(2, 2), Recorder(2, 2))
    metadata = {"dp_cp_group": None, "singleton_local_shards": True, "custom": [1]}
    before = dict(metadata)
    wrapper.sharded_state_dict("w.", (), metadata)
    assert [(p, m is metadata, e) for p, m, e in seen] == [("w.", True, {}),
                                                          ("w.adapter.", True, {})]
    assert metadata == before  # nothing added or changed
    seen.clear()
    wrapper.sharded_state_dict("w.")  # None stays None (megatron's model-level call fills it)
    assert [m for _, m, _ in seen] == [None, None]


# ---- exceptions: upstream's kind and a clear message ------------------------------------------------
@pytest.mark.parametrize("build, upstream, message", [
    (lambda: DoRA(dropout_position="post"), AssertionError,
     "DoRA only supports pre-adapter dropout"),
    (lambda: CanonicalLoRA(target_modules=["linear_fc1"]), AssertionError,
     "Canonical LoRA does not support target 'linear_fc1'"),
    (lambda: LoRA(dropout_position="middle"), AssertionError, "unknown dropout_position"),
    (lambda: ParallelLinearAdapter(K, N, R, column_init_method="orthogonal"),
     NotImplementedError, "unknown init method 'orthogonal'"),
    (lambda: peft_utils.get_adapter_attributes_from_linear(nn.Conv2d(1, 1, 1)),
     NotImplementedError, "Layer type is unrecognized for LoRA"),
])
def test_errors_are_what_upstream_raises_with_our_message(build, upstream, message):
    with pytest.raises(upstream, match=message) as info:
        build()
    assert isinstance(info.value, (PEFTConfigError, UnsupportedModuleError, ValueError))
