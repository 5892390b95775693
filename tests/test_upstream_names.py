"""Every public name of Megatron-Bridge's ``megatron.bridge.peft`` modules (its main branch,
2026-08) exists under the same module path in ``bridge.peft``, so a script that swaps the import
prefix finds each of them; classes stay classes, functions callables, and the subclass relations
user code checks with ``isinstance`` hold. The README's compatibility table lists the same names.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

UPSTREAM = {  # module (under bridge.peft) -> upstream's public names in it
    "adapter_wrapper": ["AdapterWrapper"],
    "base": ["ModelType", "PEFT"],
    "canonical_lora": ["ModuleDict", "LoRALinearSplitQKV", "LoRALinearSplitFC1UpGate",
                       "CanonicalLoRA"],
    "dora": ["DoRA"],
    "dora_layers": ["ParallelLinearDoRAAdapter", "DoRALinear"],
    "lora": ["get_lora_plus_config_overrides", "LoRA", "VLMLoRA"],
    "lora_layers": ["LoRALinear", "LoRATopKRouter", "TEFusedLoRALinear", "LinearAdapter"],
    "lora_merge": ["LoRAMerge"],
    "module_matcher": ["HAVE_TE", "ModuleMatcher"],
    "multi_lora": ["MultiLoRA"],
    "multi_lora_layers": ["MultiLoRALinear", "ExpertSlotRouting", "MultiLoRAGroupedExpertLinear",
                          "set_tokens_per_adapter_slot", "install_moe_slot_routing",
                          "init_adapter_slot", "clear_adapter_slot", "load_adapter",
                          "expose_adapter_slot", "hide_adapters"],
    "recompute": ["maybe_enable_recompute_inputs_grad"],
    "utils": ["ModelList", "ModelHook", "CheckpointPath", "HAVE_TE",
              "enable_legacy_shared_expert_adapter_loading", "TECL", "TERL", "create_peft",
              "create_peft_hook", "load_peft_adapter_checkpoint", "is_modelopt_linear",
              "AdapterAttributes", "get_adapter_attributes_from_linear", "is_expert_linear",
              "is_grouped_expert_linear", "get_effective_lora_dim", "align_expert_dim_for_tp",
              "wildcard_match", "init_method_normal", "init_method_kaiming_uniform",
              "init_method_const", "pad_seq_to_mult", "unpad_seq_to_mult", "all2all_hp2sp",
              "ParallelLinearAdapter", "GroupedExpertLinearAdapter", "PackedPerExpertLinear",
              "SharedOuterGroupedExpertAdapter"],
    "walk_utils": ["HasBool", "ModuleFunc", "ModulePredicate", "map", "walk", "forall"],
}
CONSTANTS = {"HAVE_TE", "TECL", "TERL", "ModelList", "ModelHook", "CheckpointPath", "ModelType",
             "HasBool", "ModuleFunc", "ModulePredicate"}


@pytest.mark.parametrize("module", sorted(UPSTREAM))
def test_every_upstream_name_is_here(module):
    mod = importlib.import_module(f"bridge.peft.{module}")
    missing = [n for n in UPSTREAM[module] if not hasattr(mod, n)]
    assert not missing, f"bridge.peft.{module} lacks {missing}"
    for name in UPSTREAM[module]:
        value = getattr(mod, name)
        if name in CONSTANTS:
            continue
        if name[0].isupper():
            assert inspect.isclass(value), f"{module}.{name} is {type(value)}, not a class"
        else:
            assert callable(value), f"{module}.{name} is not callable"


def test_classes_keep_upstreams_hierarchy():
    from bridge.peft.adapter_wrapper import AdapterWrapper
    from bridge.peft.base import PEFT
    from bridge.peft.canonical_lora import CanonicalLoRA, LoRALinearSplitQKV
    from bridge.peft.dora import DoRA
    from bridge.peft.dora_layers import DoRALinear
    from bridge.peft.lora import LoRA, VLMLoRA
    from bridge.peft.lora_layers import LoRALinear, LoRATopKRouter, TEFusedLoRALinear
    from bridge.peft.multi_lora import MultiLoRA

    assert issubclass(TEFusedLoRALinear, LoRALinear) and issubclass(LoRALinear, AdapterWrapper)
    assert issubclass(LoRATopKRouter, AdapterWrapper) and issubclass(DoRALinear, AdapterWrapper)
    assert issubclass(LoRALinearSplitQKV, AdapterWrapper)
    assert issubclass(VLMLoRA, LoRA)
    for transform in (LoRA, DoRA, CanonicalLoRA, MultiLoRA):
        assert issubclass(transform, PEFT), transform


def test_te_flags_mean_what_upstreams_mean():
    """HAVE_TE is True only with transformer-engine's classes (here: none, so TECL/TERL empty);
    both modules agree; unknown names are still AttributeErrors."""
    import importlib.util

    from bridge.peft import module_matcher, utils

    have = importlib.util.find_spec("transformer_engine") is not None
    assert utils.HAVE_TE is module_matcher.HAVE_TE
    if not have:
        assert utils.HAVE_TE is False and utils.TECL == () and utils.TERL == ()
    else:
        assert all(inspect.isclass(c) for c in (*utils.TECL, *utils.TERL))
    with pytest.raises(AttributeError, match="no attribute 'TEXL'"):
        utils.TEXL  # noqa: B018


def test_lora_gives_te_fused_lora_linear_where_upstream_does(megatron_tp1):
    """``config.use_transformer_engine_op_fuser`` at TP=1: upstream's TEFusedLoRALinear, which here
    is a LoRALinear with the same outputs and adapter gradients as the plain one."""
    import torch
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from torch import nn

    from bridge.peft import LoRA
    from bridge.peft.lora_layers import LoRALinear, TEFusedLoRALinear
    from tests.megatron_utils import make_config

    outs = {}
    for fuser in (False, True):
        torch.manual_seed(0)
        config = make_config(hidden_size=16)
        config.use_transformer_engine_op_fuser = fuser
        model = nn.Module()
        model.proj = ColumnParallelLinear(16, 24, config=config, init_method=nn.init.normal_,
                                          bias=False, gather_output=False)
        LoRA(target_modules=["proj"], dim=4, lora_B_init_method="xavier",
             kernel_backend="eager")(model)
        assert type(model.proj) is (TEFusedLoRALinear if fuser else LoRALinear)
        x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(1))
        y, _ = model.proj(x)
        y.square().sum().backward()
        outs[fuser] = (y.detach(), model.proj.adapter.linear_in.weight.grad)
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[True][1], outs[False][1], rtol=0, atol=0)
