"""AdapterWrapper: a linear module and its adapter, behind Megatron-Bridge's interface."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["AdapterSwitch", "AdapterWrapper"]


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
    adapter's under ``adapter.``, so a checkpoint of the unwrapped model stays loadable.
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

    # ---- forward helpers -------------------------------------------------------------------
    def base_linear_forward(
        self, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Run the base linear and normalise what it returns.

        Megatron linears return ``(out, None)``, ``(out, bias)``, ``((out, ln_out), None)`` or
        ``(out, bias, ln_out)``; ``nn.Linear`` returns a bare tensor (its bias is already in ``out``;
        it is reported from ``to_wrap.bias`` for information, and this wrapper remembers to return
        a bare tensor too).

        Returns:
            ``(linear_output, bias, layernorm_output)``; ``layernorm_output`` is ``x`` when the
            base returns none.

        Raises:
            TypeError: the base returned anything else (the message names what it returned).
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
        raise TypeError(
            f"{type(self.to_wrap).__name__} returned {_describe(result)}; AdapterWrapper expects "
            "a Tensor, (out, None), (out, bias), ((out, ln_out), None) or (out, bias, ln_out)"
        )

    def wrap_output(self, out: torch.Tensor, bias: torch.Tensor | None):
        """Return in the base's style: a bare tensor for a bare-tensor base, else (out, bias)."""
        return out if self._return_bare_tensor else (out, bias)

    # ---- state dicts ----------------------------------------------------------------------
    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        """Base keys at ``prefix`` (no ``to_wrap.``), adapter keys under ``prefix + 'adapter.'``."""
        if destination is None:
            destination = {}
        self.to_wrap.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        self.adapter.state_dict(
            destination=destination, prefix=f"{prefix}adapter.", keep_vars=keep_vars
        )
        return destination

    def _remap_base_keys(self, state_dict, prefix, *args) -> None:
        """Load-time inverse of :meth:`state_dict`: base keys move under ``to_wrap.``."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest.startswith("adapter.") or rest.startswith("to_wrap."):
                continue
            state_dict[f"{prefix}to_wrap.{rest}"] = state_dict.pop(key)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """The base's and the adapter's sharded state dicts (adapter under ``prefix + 'adapter.'``).

        A module without ``sharded_state_dict`` (e.g. ``nn.Linear``) contributes replicated
        ``ShardedTensor``s of its state dict.
        """
        out = {}
        out.update(_module_sharded_state_dict(self.to_wrap, prefix, sharded_offsets, metadata))
        out.update(
            _module_sharded_state_dict(self.adapter, f"{prefix}adapter.", sharded_offsets, metadata)
        )
        return out


def _module_sharded_state_dict(module: nn.Module, prefix: str, sharded_offsets, metadata) -> dict:
    """``module.sharded_state_dict`` if it has one, else replicated ShardedTensors of its state."""
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import (
        ensure_metadata_has_dp_cp_group,
        make_sharded_tensors_for_checkpoint,
    )

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    if hasattr(module, "sharded_state_dict"):
        return module.sharded_state_dict(prefix, sharded_offsets, metadata)

    state = module.state_dict(prefix="", keep_vars=True)
    # The TP group must be passed: without it every TP rank claims the main replica (replica id
    # (0, 0, dp)) of these replicated tensors, and a distributed checkpoint save rejects them.
    tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    return make_sharded_tensors_for_checkpoint(
        state, prefix, {}, sharded_offsets, tp_group=tp_group,
        dp_cp_group=metadata.get("dp_cp_group"),
    )
