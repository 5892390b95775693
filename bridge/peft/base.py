"""PEFT: the base class of adapter transforms (freeze, walk, save only what was trained)."""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from bridge.peft.recompute import maybe_enable_recompute_inputs_grad
from bridge.peft.walk_utils import map_modules

logger = logging.getLogger(__name__)

__all__ = ["PEFT"]


def _chunks(model) -> list[nn.Module]:
    if isinstance(model, nn.Module):
        return [model]
    if isinstance(model, (list, tuple)) and all(isinstance(m, nn.Module) for m in model):
        return list(model)
    raise TypeError(f"expected an nn.Module or a list of model chunks, got {type(model).__name__}")


def _walk_root(chunk: nn.Module) -> nn.Module:
    """The module a transform walks: a DDP wrapper's (megatron's or torch's) inner module."""
    inner = getattr(chunk, "module", None)
    if isinstance(inner, nn.Module) and (hasattr(chunk, "ddp_config") or isinstance(
            chunk, torch.nn.parallel.DistributedDataParallel)):
        return inner
    return chunk


@dataclass
class PEFT(ABC):
    """Apply ``transform`` to every module of a model (or list of model chunks).

    Call the instance on a model: it checks that every target matches something (those that
    match nothing are logged by ``bridge.peft.module_matcher``), freezes the base, walks the
    modules, makes activation recompute train the adapters (``bridge.peft.recompute``), and
    returns the model. With ``training=False`` the adapters are frozen too (inference).
    """

    params_to_save: set[str] = field(default_factory=set, init=False, repr=False)

    @abstractmethod
    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None):
        """Return ``module`` unchanged or its replacement (e.g. a LoRA wrapper)."""

    def __call__(self, model, training: bool = True):
        from bridge.peft.module_matcher import ModuleMatcher

        chunks = _chunks(model)
        if isinstance(self, ModuleMatcher):
            # Bookkeeping from the *current* target_modules (recipes change them after
            # construction), then one walk that only matches, to report typos.
            self._init_target_match_state()

            def validate_only(module, name=None, prefix=None):
                self.match(module, name, prefix)
                return module

            for chunk in chunks:
                map_modules(_walk_root(chunk), validate_only)
            self._validate_target_matches()
            self._reset_target_match_state()
        self.freeze_model(model, training=training)
        for chunk in chunks:
            map_modules(_walk_root(chunk), self.transform)
        if training:
            maybe_enable_recompute_inputs_grad(model)
        else:
            self.freeze_model(model, training=training)
        for chunk in chunks:
            chunk.train(training)
        if logger.isEnabledFor(logging.INFO):  # e.g. "LoRA: 96 modules, 96 fused (triton), 0 eager"
            from bridge.peft.kernel_report import kernel_summary

            logger.info("%s", kernel_summary(chunks, label=type(self).__name__))
        return model

    def keep_wrapped(self, module: nn.Module, match) -> nn.Module:
        """A module this (or an earlier) application already wrapped: keep its adapter
        trainable (``__call__`` froze every parameter first), so applying a transform twice
        equals applying it once."""
        if match is not None:
            for name, child in module.named_children():
                if name != "to_wrap":
                    child.requires_grad_(True)
        return module

    def freeze_model(self, model, training: bool = True) -> None:
        """requires_grad False on every parameter; train() or eval() per ``training``."""
        for chunk in _chunks(model):
            for p in chunk.parameters():
                p.requires_grad_(False)
            chunk.train(training)

    def set_params_to_save(self, model) -> None:
        """Record the trainable parameters' names (and adapter buffers) for adapter-only saves."""
        names: set[str] = set()
        for chunk in _chunks(model):
            names |= {n for n, p in chunk.named_parameters() if p.requires_grad}
            names |= {n for n, _ in chunk.named_buffers() if ".adapter." in n or n.startswith("adapter.")}
            for module_name, module in chunk.named_modules():  # e.g. batch-norm running stats
                if hasattr(module, "track_running_stats"):
                    names |= {f"{module_name}.{b}" if module_name else b
                              for b, t in module.named_buffers() if t is not None}
        self.params_to_save = names

    def adapter_key_filter(self, key) -> bool:
        """Whether a state-dict key belongs to the adapter checkpoint."""
        if isinstance(key, tuple):  # (name, parameter): trainable parameters are the adapter's
            value = key[1] if len(key) > 1 else None
            if isinstance(value, torch.Tensor):
                return bool(value.requires_grad)
            data = getattr(value, "data", None)  # a ShardedTensor (factory) holds the parameter
            if isinstance(data, torch.Tensor):
                return bool(data.requires_grad)
            key = key[0]  # anything else (ShardedObject, None): by its name
        key = str(key)
        return key in self.params_to_save or ".adapter." in key or key.startswith("adapter.") \
            or key.endswith(".adapters")

    # ---- switching adapters ----------------------------------------------------------------
    @staticmethod
    def _adapter_modules(model) -> Iterator[nn.Module]:
        for chunk in _chunks(model):
            for m in chunk.modules():
                if hasattr(m, "enable_adapter_layers") and hasattr(m, "disable_adapter_layers"):
                    yield m

    def enable_adapter_layers(self, model) -> None:
        for m in self._adapter_modules(model):
            m.enable_adapter_layers()

    def disable_adapter_layers(self, model) -> None:
        for m in self._adapter_modules(model):
            m.disable_adapter_layers()

    @contextlib.contextmanager
    def disable_adapter(self, model):
        """Run the base model alone inside the block; each adapter's state is restored after,
        also when the block raises."""
        modules = list(self._adapter_modules(model))
        states = [getattr(m, "_adapter_enabled", True) for m in modules]
        for m in modules:
            m.disable_adapter_layers()
        try:
            yield model
        finally:
            for m, on in zip(modules, states, strict=True):
                (m.enable_adapter_layers if on else m.disable_adapter_layers)()
