"""Activation recompute with adapters only trainable (Megatron-Bridge's ``peft.recompute``).

Why it is needed: megatron's activation checkpoint (``tensor_parallel.checkpoint``) runs its
function without autograd and re-runs it in backward, and autograd calls that backward only when
one of the checkpoint's *inputs* needs a gradient. With a frozen base on the first pipeline stage
the embeddings need none, so the hidden states entering the first checkpointed layer need none:
under ``recompute_granularity='full'`` the loss needs no gradient at all ("element 0 of tensors
does not require grad"); under 'selective' with a recomputed module in front of the first
adapter (e.g. ``recompute_modules=['mlp']`` and LoRA in the first MLP) that adapter silently gets
no gradient.

The fix: a forward pre-hook on every ``TransformerBlock`` hands the block ``hidden_states`` that
require grad (a detached leaf, so nothing is unfrozen, and only when they need none: a graph
that does lead somewhere trainable is kept). Hooks, not a patched ``forward``: nothing on the
class or the instance's methods changes, and applying twice hooks once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["PEFT_RECOMPUTE_PATCHED", "maybe_enable_recompute_inputs_grad", "uses_recompute"]

# ids of the model chunks whose blocks carry the hook (Megatron-Bridge's registry name).
PEFT_RECOMPUTE_PATCHED: set[int] = set()
_HOOK_ATTR = "_bridge_peft_recompute_hook"


def uses_recompute(config) -> bool:
    """Whether a megatron config recomputes activations (full or selective)."""
    return config is not None and (
        getattr(config, "recompute_granularity", None) in ("full", "selective")
        or getattr(config, "recompute_method", None) is not None)


def _inputs_need_grad(module, args, kwargs):
    """Forward pre-hook: ``hidden_states`` (first positional or keyword) as a leaf that requires
    grad when it requires none and autograd is on."""
    if not torch.is_grad_enabled():
        return None
    if args:
        hs = args[0]
        if torch.is_tensor(hs) and hs.is_floating_point() and not hs.requires_grad:
            return (hs.detach().requires_grad_(True), *args[1:]), kwargs
        return None
    hs = kwargs.get("hidden_states")
    if torch.is_tensor(hs) and hs.is_floating_point() and not hs.requires_grad:
        return args, {**kwargs, "hidden_states": hs.detach().requires_grad_(True)}
    return None


def _unwrapped(model) -> list[nn.Module]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    out = []
    for chunk in chunks:
        try:
            from megatron.core.utils import unwrap_model

            chunk = unwrap_model(chunk)
        except Exception:  # megatron absent, or a wrapper it does not know
            chunk = getattr(chunk, "module", chunk)
        if chunk is not None:
            out.append(chunk)
    return out


def maybe_enable_recompute_inputs_grad(model, peft_recompute_patched: set[int] | None = None
                                       ) -> set[int]:
    """Make activation recompute train the adapters (see the module docstring).

    For each model chunk whose config recomputes activations and that trains something, hook
    its ``TransformerBlock``s once. (Upstream hooks only when adapters alone train; the hook is
    harmless otherwise: inputs that need no grad lead to nothing trainable.)

    Args:
        model: a module or a list of model chunks (DDP/Float16 wrappers are unwrapped).
        peft_recompute_patched: the registry of hooked chunk ids (default: the module's).

    Returns:
        The registry, with the ids of the chunks hooked.
    """
    registry = PEFT_RECOMPUTE_PATCHED if peft_recompute_patched is None else peft_recompute_patched
    try:
        from megatron.core.transformer.transformer_block import TransformerBlock
    except ImportError:
        return registry
    for chunk in _unwrapped(model):
        if not uses_recompute(getattr(chunk, "config", None)) or not any(
                p.requires_grad for p in chunk.parameters()):
            continue
        hooked = False
        for module in chunk.modules():
            if isinstance(module, TransformerBlock):
                if getattr(module, _HOOK_ATTR, None) is None:
                    handle = module.register_forward_pre_hook(_inputs_need_grad, with_kwargs=True)
                    object.__setattr__(module, _HOOK_ATTR, handle)
                hooked = True
        if hooked:
            registry.add(id(chunk))
            logger.info("PEFT + activation recompute: TransformerBlock inputs made to require "
                        "grad, so the checkpointed layers' backward trains the adapters")
    return registry
