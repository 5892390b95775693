"""AdapterWrapper: a linear module and its adapter, behind Megatron-Bridge's interface."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from bridge.peft.errors import BaseOutputError, MergeError
from bridge.peft.tp import acc

__all__ = ["MERGED_KEY", "AdapterSwitch", "AdapterWrapper", "mamba_dim_info", "release_base"]

# State-dict key (beside the base's keys) present only while the layer is merged: the base
# weights it is saved with hold the adapter, which a load must not add a second time.
MERGED_KEY = "lora_merged"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) for v in value)
        return f"{type(value).__name__}({inner})"
    return type(value).__name__ if value is not None else "None"


class AdapterSwitch:
    """The on/off switch of an adapter (``PEFT.enable/disable_adapter_layers`` and
    ``PEFT.disable_adapter`` use it); the module's forward reads ``_adapter_enabled``."""

    _adapter_enabled: bool = True

    def enable_adapter_layers(self) -> None:
        """Apply the adapter in forward (the default)."""
        self._adapter_enabled = True

    def disable_adapter_layers(self) -> None:
        """Skip the adapter in forward: the module behaves as the base linear alone."""
        self._adapter_enabled = False

    @property
    def adapter_enabled(self) -> bool:
        return self._adapter_enabled


class AdapterWrapper(AdapterSwitch, nn.Module):
    """Wraps a linear module ``to_wrap`` and an ``adapter`` applied beside it.

    Subclasses (``LoRALinear``, ``DoRALinear``) implement ``forward`` on top of
    :meth:`base_linear_forward`, which normalises the five things a base linear can return.
    The state dict keeps the base's keys where they were (no ``to_wrap.`` segment) and puts the
    adapter's under ``adapter.``, so a checkpoint of the unwrapped model stays loadable. A merged
    layer (``bridge.peft.lora_merge``) adds ``lora_merged`` (a bool tensor) beside them: loaded
    into an unmerged layer, the adapter is subtracted from the loaded base weight (a warning says
    so); a load into a merged layer is refused (unmerge it first), and so is a distributed
    checkpoint of a merged layer (``sharded_state_dict``).
    """

    def __init__(self, to_wrap: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        if not isinstance(to_wrap, nn.Module) or not isinstance(adapter, nn.Module):
            raise TypeError(
                "AdapterWrapper(to_wrap, adapter) takes two nn.Modules; got "
                f"{type(to_wrap).__name__} and {type(adapter).__name__}"
            )
        self.to_wrap = to_wrap
        self.adapter = adapter
        self._adapter_enabled = True
        self._return_bare_tensor = False
        self._register_load_state_dict_pre_hook(self._remap_base_keys)
        self.register_load_state_dict_post_hook(_unmerge_after_load)

    # ---- forward helpers -------------------------------------------------------------------
    def base_linear_forward(
        self, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Run the base linear and normalise what it returns.

        Megatron linears return ``(out, None)``, ``(out, bias)``, ``((out, ln_out), None)`` or
        ``(out, bias, ln_out)``; ``nn.Linear`` returns a bare tensor (its bias is already in ``out``;
        it is reported from ``to_wrap.bias`` for information, and this wrapper remembers to return
        a bare tensor too). transformer-engine's own ``LayerNormLinear`` (unwrapped) returns
        ``(out, ln_out)`` with ``return_layernorm_output`` and ``return_bias=False`` (read as
        the bare-tensor case: bias in ``out``, ln_out beside it), ``(out, bias, ln_out)`` with
        both, and ``(out, bias)`` / a bare tensor without ``return_layernorm_output``.

        Returns:
            ``(linear_output, bias, layernorm_output)``; ``layernorm_output`` is ``x`` when the
            base returns none.

        Raises:
            BaseOutputError: (a TypeError and AssertionError) the base returned anything else
                (the message names what it returned).
        """
        result = self.to_wrap(x, *args, **kwargs)
        linear_output, bias, layernorm_output = self.split_base_output(result, x)
        return linear_output, bias, layernorm_output

    def split_base_output(
        self, result: Any, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Normalise one base output (see :meth:`base_linear_forward`)."""
        if isinstance(result, torch.Tensor):
            self._return_bare_tensor = True
            return result, getattr(self.to_wrap, "bias", None), x
        self._return_bare_tensor = False
        if isinstance(result, tuple) and len(result) == 2:
            out, bias = result
            if isinstance(out, torch.Tensor) and isinstance(bias, torch.Tensor) \
                    and getattr(self.to_wrap, "return_layernorm_output", False) is True:
                # transformer-engine's own LayerNormLinear (not megatron's wrapper, whose
                # ln output comes nested or third) with return_bias=False: (out, ln_out), its
                # bias already in out. Without the ln output it returns a bare tensor: so does
                # this wrapper.
                self._return_bare_tensor = True
                own = getattr(self.to_wrap, "bias", None)
                own = own if isinstance(own, torch.Tensor) and own.numel() else None
                return out, own, bias
            if isinstance(out, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor)):
                return out, bias, x
            if (
                isinstance(out, tuple)
                and len(out) == 2
                and all(isinstance(t, torch.Tensor) for t in out)
                and (bias is None or isinstance(bias, torch.Tensor))
            ):
                return out[0], bias, out[1]
        if isinstance(result, tuple) and len(result) == 3:
            out, bias, ln_out = result
            if (
                isinstance(out, torch.Tensor)
                and isinstance(ln_out, torch.Tensor)
                and (bias is None or isinstance(bias, torch.Tensor))
            ):
                return out, bias, ln_out
        raise BaseOutputError(
            f"{type(self.to_wrap).__name__} returned {_describe(result)}; AdapterWrapper expects "
            "a Tensor, (out, None), (out, bias), ((out, ln_out), None), (out, bias, ln_out) or, "
            "from a base with return_layernorm_output=True, (out, ln_out)"
        )

    def wrap_output(self, out: torch.Tensor, bias: torch.Tensor | None):
        """Return in the base's style: a bare tensor for a bare-tensor base, else (out, bias)."""
        return out if self._return_bare_tensor else (out, bias)

    @property
    def _base_returns_tuple(self) -> bool:
        """Megatron-Bridge's name: whether the base returned a tuple (not a bare tensor)."""
        return not self._return_bare_tensor

    @_base_returns_tuple.setter
    def _base_returns_tuple(self, value: bool) -> None:
        self._return_bare_tensor = not value

    def adapter_forward(self, adapter: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any):
        """Run ``adapter`` on ``x`` (with the base's extra call arguments, when there are any)."""
        return adapter(x, *args, **kwargs) if args or kwargs else adapter(x)

    # ---- merging (bridge.peft.lora_merge calls these; no type switch there) --------------------
    def delta_weight(self) -> torch.Tensor:
        """This rank's shard of the adapter's weight delta, in the accumulation dtype (fp32):
        the adapter's ``delta_weight()`` for an adapter that has one."""
        delta = getattr(self.adapter, "delta_weight", None)
        if not callable(delta):
            raise NotImplementedError(
                f"{type(self).__name__} over {type(self.to_wrap).__name__}: its adapter "
                f"{type(self.adapter).__name__} has no delta_weight(), so it cannot be merged")
        return delta()

    def merge_targets(self) -> list[torch.Tensor]:
        """The base weights a merge overwrites: ``[to_wrap.weight]`` (a grouped expert base
        overrides this with its ``weight0 .. weight{E-1}``). ``merged_weight()`` and
        ``unmerged_weight()`` work on them stacked when there are several."""
        return [self.to_wrap.weight]

    def merged_weight(self) -> torch.Tensor:
        """This rank's base weight shard with the adapter folded in (fp32, detached)."""
        w = acc(self.to_wrap.weight)
        delta = self._checked_delta(w)
        return w + delta.to(w.dtype)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merged_weight` (up to rounding): the base weight from a merged one."""
        merged = acc(merged)
        return merged - self._checked_delta(merged).to(merged.dtype)

    def _checked_delta(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            delta = self.delta_weight()
        if delta.shape != w.shape:
            raise ValueError(f"the adapter's delta has shape {tuple(delta.shape)} but the base "
                             f"weight shard has shape {tuple(w.shape)}")
        return delta

    # ---- state dicts ----------------------------------------------------------------------
    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        """Base keys at ``prefix`` (no ``to_wrap.``), adapter keys under ``prefix + 'adapter.'``;
        ``prefix + 'lora_merged'`` too while merged."""
        if destination is None:
            destination = {}
        self.to_wrap.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        self.adapter.state_dict(
            destination=destination, prefix=f"{prefix}adapter.", keep_vars=keep_vars
        )
        if self.__dict__.get("_lora_merged", False):
            destination[prefix + MERGED_KEY] = torch.tensor(True)
        return destination

    def unmerge_on_load_problem(self) -> str | None:
        """Why a state dict saved merged cannot be unmerged into this layer on load (None: it
        can: the adapter's delta is recomputed from the loaded adapter and subtracted)."""
        return None

    def _merge_target_names(self) -> list[str]:
        """The names, in the base, of the weights merge_targets() returns."""
        targets = [id(t) for t in self.merge_targets()]
        return [n for n, p in self.to_wrap.named_parameters() if id(p) in targets]

    def _remap_base_keys(self, state_dict, prefix, local_metadata=None, strict=True,
                         missing_keys=None, unexpected_keys=None, error_msgs=None) -> None:
        """Load-time inverse of :meth:`state_dict`: base keys move under ``to_wrap.``; a merged
        state dict is marked for unmerging after the load (``_unmerge_after_load``); nothing
        is copied into a merged layer (the refusal goes to ``error_msgs``, so load_state_dict
        raises it, naming every merged layer)."""
        name = prefix[:-1] or type(self).__name__
        saved_merged = state_dict.pop(prefix + MERGED_KEY, None)
        mine = [k for k in state_dict if k.startswith(prefix)]
        problem = None
        if self.__dict__.get("_lora_merged", False) and mine:
            problem = (f"{name} is merged (merge_lora): loading into it would leave its base "
                       "weight holding the old adapter; unmerge_lora it first, or load before "
                       "merging")
        elif saved_merged is not None and bool(saved_merged):
            problem = self.unmerge_on_load_problem()
            weights = self._merge_target_names()
            has_base = any(f"{prefix}{n}" in mine or f"{prefix}to_wrap.{n}" in mine
                           for n in weights)
            if problem is None and not (has_base and any(".adapter." in f".{k}" for k in mine)):
                problem = ("saved merged, but the state dict lacks its base weight or its "
                           "adapter, so the adapter cannot be subtracted from the base")
            if problem is None:
                self.__dict__["_unmerge_after_load"] = name
            else:
                problem = f"{name}: {problem}"
        if problem is not None:
            for key in mine:
                del state_dict[key]
            if error_msgs is None:
                raise MergeError(problem)
            error_msgs.append(problem)
            return
        for key in mine:
            rest = key[len(prefix):]
            upgraded = self._upgrade_key(rest)
            if upgraded is not None:
                state_dict[prefix + upgraded] = state_dict.pop(key)
                continue
            if rest.startswith("adapter.") or rest.startswith("to_wrap."):
                continue
            state_dict[f"{prefix}to_wrap.{rest}"] = state_dict.pop(key)

    def _upgrade_key(self, rest: str) -> str | None:
        """The current name of a key (relative to this module) written by an older layout, or
        None when ``rest`` is current; subclasses with a legacy layout override it."""
        return None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """The base's and the adapter's sharded state dicts (adapter under ``prefix + 'adapter.'``).

        Refused while the layer is merged (MergeError): a distributed checkpoint holds no merged
        state, so its merged base weights would load as plain ones and count the adapter twice.

        ``metadata`` reaches both exactly as the caller passed it (the same object, or None;
        never modified: megatron's model-level ``sharded_state_dict`` fills in its
        ``dp_cp_group``; this package's adapters look it up themselves when it is absent). A
        module without ``sharded_state_dict`` (e.g. ``nn.Linear``, a ``LinearAdapter``) contributes
        replicated ``ShardedTensor``s of its state dict. An
        adapter of a Mamba ``mixer.in_proj`` also gets ``mamba_dim_info`` (the local sizes of
        in_proj's z, x, B, C, dt blocks), so its B is saved block by block like in_proj itself.
        """
        if self.__dict__.get("_lora_merged", False):
            raise MergeError(
                f"{prefix.rstrip('.') or type(self).__name__} is merged (merge_lora): a "
                "distributed checkpoint of it would hold the adapter twice (in the base weight "
                "and beside it); unmerge_lora before saving or loading, or merge_and_unload to "
                "save the merged model without adapters")
        out = {}
        out.update(_module_sharded_state_dict(self.to_wrap, prefix, sharded_offsets, metadata))
        extra = {}
        if "mixer.in_proj" in str(getattr(self.adapter, "base_linear_name", "")) \
                and hasattr(self.adapter, "sharded_state_dict"):
            extra["mamba_dim_info"] = mamba_dim_info(self.to_wrap)
        out.update(_module_sharded_state_dict(self.adapter, f"{prefix}adapter.", sharded_offsets,
                                              metadata, **extra))
        return out


def _unmerge_after_load(module: AdapterWrapper, incompatible_keys) -> None:
    """Post-load hook: subtract the (loaded) adapter from a base weight loaded merged."""
    name = module.__dict__.pop("_unmerge_after_load", None)
    if name is None:
        return
    targets = module.merge_targets()
    with torch.no_grad():
        merged = targets[0] if len(targets) == 1 else torch.stack(targets)
        base = module.unmerged_weight(merged)
        for weight, part in zip(targets, [base] if len(targets) == 1 else base.unbind(0),
                                strict=True):
            weight.copy_(part)
    warnings.warn(
        f"{name}: the state dict was saved merged (merge_lora); the adapter was subtracted from "
        "its base weight on load (this layer is unmerged, adapter on; the base is exact within "
        "the merged weight's rounding). To keep merged weights bit for bit, save after "
        "merge_and_unload.", UserWarning, stacklevel=2)


def release_base(wrapper: AdapterWrapper) -> nn.Module:
    """The wrapper's base, as it is without the adapter: a norm-fused base that LoRA asked for
    its norm output returns what its model expects again."""
    base = wrapper.to_wrap
    for attr in ("return_layernorm_output", "return_layernorm_output_gathered"):
        if hasattr(base, attr):
            setattr(base, attr, False)
    return base


def mamba_dim_info(in_proj: nn.Module) -> dict[str, int]:
    """Local (this TP rank's) sizes of a Mamba in_proj's output blocks, from its config as
    megatron's MambaMixer derives them: ``d_inner_local_tp``, ``ngroups_local_tp``, ``d_state``,
    ``nheads_local_tp`` (in_proj's rows are [z; x; B; C; dt] = [d, d, g·s, g·s, h] per rank)."""
    from bridge.peft.tp import group_size

    config = in_proj.config
    d_state, headdim, ngroups = (config.mamba_state_dim, config.mamba_head_dim,
                                 config.mamba_num_groups)
    if getattr(config, "mamba_num_heads", None):
        nheads = config.mamba_num_heads
        d_inner = nheads * headdim
    elif getattr(in_proj, "d_inner", None):
        d_inner = in_proj.d_inner
        nheads = d_inner // headdim
    else:  # full rows N = 2 d + 2 g s + d / headdim, solved for d
        tp_out = getattr(in_proj, "output_size", None) or in_proj.weight.shape[0] * max(
            1, group_size(getattr(in_proj, "tp_group", None)))
        d_inner = headdim * (tp_out - 2 * ngroups * d_state) // (2 * headdim + 1)
        nheads = d_inner // headdim
    tp = group_size(getattr(in_proj, "tp_group", None))
    if tp == 1:
        tp = int(getattr(in_proj, "tp_size", 1) or 1)
    return {"d_inner_local_tp": d_inner // tp, "ngroups_local_tp": ngroups // tp,
            "d_state": d_state, "nheads_local_tp": nheads // tp}


_compute_mamba_dim_info = mamba_dim_info  # Megatron-Bridge's name


def _module_sharded_state_dict(module: nn.Module, prefix: str, sharded_offsets, metadata,
                               **extra) -> dict:
    """``module.sharded_state_dict`` if it has one (``metadata`` passed on as given), else
    replicated ShardedTensors of its state dict."""
    if hasattr(module, "sharded_state_dict"):
        return module.sharded_state_dict(prefix, sharded_offsets, metadata, **extra)
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    dp_cp_group = (metadata or {}).get("dp_cp_group")
    if dp_cp_group is None:  # looked up here, not written into the caller's metadata
        dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    state = module.state_dict(prefix="", keep_vars=True)
    # The TP group must be passed: without it every TP rank claims the main replica (replica id
    # (0, 0, dp)) of these replicated tensors, and a distributed checkpoint save rejects them.
    tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    return make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets,
                                               tp_group=tp_group, dp_cp_group=dp_cp_group)
