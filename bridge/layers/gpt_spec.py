"""A GPT layer spec with the norms inside the linears, as transformer-engine's spec has them.

megatron-core's local spec (``get_gpt_layer_local_spec``) puts a separate norm module in front of
``linear_qkv`` and ``linear_fc1``; its transformer-engine spec fuses each norm into the linear
(``TELayerNormColumnParallelLinear``) and leaves ``IdentityOp`` where the norm was. This builds
the second layout from the first with ``LayerNormColumnParallelLinear``, so a model without
transformer-engine gets the norm-fused LoRA kernels. Checkpoints interchange with both: the
local spec already maps its norm keys to ``...linear_qkv.layer_norm_*`` / ``...linear_fc1.
layer_norm_*``, the names this layer uses.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from bridge.layers.layernorm_linear import LayerNormColumnParallelLinear

__all__ = ["get_gpt_layer_norm_linear_spec"]


def get_gpt_layer_norm_linear_spec(*, qkv: bool = True, fc1: bool = True, **local_spec_kwargs: Any):
    """megatron-core's local GPT layer spec with ``LayerNormColumnParallelLinear`` as
    ``linear_qkv`` (``qkv=True``) and/or the dense MLP's ``linear_fc1`` (``fc1=True``), and
    ``IdentityOp`` for the norm each one absorbs.

    Args:
        qkv: fuse ``input_layernorm`` into ``self_attention.linear_qkv``.
        fc1: fuse ``pre_mlp_layernorm`` into ``mlp.linear_fc1``.
        **local_spec_kwargs: passed to ``get_gpt_layer_local_spec`` (``normalization``,
            ``qk_layernorm``, ...). The norm kind of the fused linears comes from
            ``config.normalization``, as with transformer-engine.

    Returns:
        A ``ModuleSpec`` of a ``TransformerLayer`` for ``GPTModel(transformer_layer_spec=...)``.

    Raises:
        ValueError: ``qkv`` with an attention that has no ``linear_qkv`` (multi-latent
            attention), or ``fc1`` with an MLP that is not megatron's dense ``MLP`` (MoE: the router
            reads the normed input too, so the norm cannot move into the experts' fc1).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = get_gpt_layer_local_spec(**local_spec_kwargs)
    sub = spec.submodules
    # The keys map renames the local norms' checkpoint keys to the fused names; a norm replaced by
    # IdentityOp has no keys left to rename, so its entry goes.
    keys_map = dict(sub.sharded_state_dict_keys_map or {})
    if qkv:
        attn = sub.self_attention
        if not (isinstance(attn, ModuleSpec) and hasattr(attn.submodules, "linear_qkv")):
            raise ValueError(
                f"qkv=True needs an attention with a linear_qkv; {getattr(attn, 'module', attn)!r} "
                "has none (multi-latent attention?): pass qkv=False"
            )
        attn = replace(attn, submodules=replace(attn.submodules,
                                                linear_qkv=LayerNormColumnParallelLinear))
        sub = replace(sub, input_layernorm=IdentityOp, self_attention=attn)
        keys_map.pop("input_layernorm.", None)
    if fc1:
        mlp = _with_fc1(sub.mlp, MLP, ModuleSpec)
        sub = replace(sub, pre_mlp_layernorm=IdentityOp, mlp=mlp)
        keys_map.pop("pre_mlp_layernorm.", None)
    return replace(spec, submodules=replace(sub, sharded_state_dict_keys_map=keys_map))


def _with_fc1(mlp, mlp_cls: type, module_spec: type):
    """The dense-MLP entry of a layer spec with ``LayerNormColumnParallelLinear`` as its fc1.

    megatron-core up to 0.17 writes it as ``ModuleSpec(module=MLP, submodules=MLPSubmodules(...))``,
    0.18 and newer as ``functools.partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(...))``.
    """
    if isinstance(mlp, module_spec) and mlp.module is mlp_cls:
        return replace(mlp, submodules=replace(mlp.submodules,
                                               linear_fc1=LayerNormColumnParallelLinear))
    if (isinstance(mlp, functools.partial) and getattr(mlp.func, "__self__", None) is mlp_cls
            and "submodules" in mlp.keywords):
        submodules = replace(mlp.keywords["submodules"], linear_fc1=LayerNormColumnParallelLinear)
        return functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": submodules})
    what = getattr(mlp, "module", None) or getattr(mlp, "func", None) or mlp
    raise ValueError(
        f"fc1=True needs megatron's dense MLP, got {what!r}: an MoE layer's router reads the "
        "normed input too, so keep pre_mlp_layernorm (fc1=False)"
    )
