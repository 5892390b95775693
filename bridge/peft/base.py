"""PEFT: the base class of adapter transforms (freeze, walk, save only what was trained)."""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from bridge.peft.adapter_wrapper import AdapterWrapper, release_base
from bridge.peft.errors import PEFTConfigError
from bridge.peft.recompute import maybe_enable_recompute_inputs_grad
from bridge.peft.walk_utils import map_modules

logger = logging.getLogger(__name__)

# upstream's type variable for a model or its virtual-pipeline chunks
ModelType = TypeVar("ModelType", bound=nn.Module | list[nn.Module])

__all__ = ["PEFT", "ModelType"]

# Settings a second application of the same transform updates in place: they change how the
# adapters run, not what their trained weights mean.
_RUNTIME_SETTINGS = ("kernel_backend", "kernel_gemm")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _adapter_modules(wrapper: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path below .adapter, module) of each adapter module of a wrapper (those with a rank;
    none for a wrapper without one ``adapter``, e.g. MultiLoRA's slots)."""
    adapter = getattr(wrapper, "adapter", None)
    if not isinstance(adapter, nn.Module):
        return []
    return [(path, m) for path, m in adapter.named_modules()
            if isinstance(getattr(m, "dim", None), int) and hasattr(m, "alpha")]


def _factor_dtype(adapter: nn.Module):
    weight = getattr(getattr(adapter, "linear_in", None), "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else None


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

    Applied to a model that already has adapters: the same transform again keeps them (their
    kernel settings and dropout are updated in place); a transform of another kind (LoRA over
    DoRA), other rank, alpha or lora_dtype, or one that does not target every adapted layer is
    refused before anything changes, naming the layers, unless ``replace=True``: then the
    existing adapters are removed (their weights discarded) and the transform applies to the
    base layers. Merged layers are never replaced (unmerge_lora first).
    """

    params_to_save: set[str] = field(default_factory=set, init=False, repr=False)

    @abstractmethod
    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None):
        """Return ``module`` unchanged or its replacement (e.g. a LoRA wrapper)."""

    def __call__(self, model, training: bool = True, *, replace: bool = False):
        from bridge.peft.module_matcher import ModuleMatcher

        chunks = _chunks(model)
        wrapped = []  # (name, wrapper, match) of the adapter wrappers already in the model
        if isinstance(self, ModuleMatcher):
            # Bookkeeping from the *current* target_modules (recipes change them after
            # construction), then one walk that only matches, to report typos.
            self._init_target_match_state()

            def validate_only(module, name=None, prefix=None):
                match = self.match(module, name, prefix)
                if isinstance(module, AdapterWrapper):
                    wrapped.append((f"{prefix}.{name}" if prefix else name, module, match))
                return module

            for chunk in chunks:
                map_modules(_walk_root(chunk), validate_only)
            self._validate_target_matches()
            self._reset_target_match_state()
        if wrapped:
            self._check_wrapped(wrapped, replace)
        if wrapped and replace:
            def unwrap(module, name=None, prefix=None):
                return release_base(module) if isinstance(module, AdapterWrapper) else module

            for chunk in chunks:
                map_modules(_walk_root(chunk), unwrap)
            logger.info("%s: replaced the adapters of %s", type(self).__name__,
                        ", ".join(n for n, _, _ in wrapped))
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
        equals applying it once; its kernel settings and dropout follow this transform's."""
        if match is not None:
            for name, child in module.named_children():
                if name != "to_wrap":
                    child.requires_grad_(True)
            self._update_runtime_settings(module)
        return module

    # ---- a second application ---------------------------------------------------------------
    def wrapper_kinds(self, base: nn.Module, full_name: str, pattern: str) -> tuple[type, ...]:
        """The wrapper classes this transform makes for ``base`` (empty: not checked)."""
        return ()

    def wrapper_parts(self, pattern: str) -> set[str] | None:
        """The adapter parts this transform makes for a layer it matched by ``pattern`` (None:
        one adapter; canonical LoRA's split layers have several)."""
        return None

    def _describe(self, kind: str, parts, dim, alpha, dtype) -> str:
        fields = [f"parts={'+'.join(sorted(parts))}"] if parts else []
        fields += [f"dim={dim}", f"alpha={float(alpha):g}"]
        if dtype is not None:
            fields.append(f"dtype={_dtype_name(dtype)}")
        return f"{kind}({', '.join(fields)})"

    def wrapped_mismatch(self, wrapper: nn.Module, match) -> str | None:
        """How an existing wrapper differs from what this transform would make of its base
        (kind, parts, rank, alpha, lora_dtype when given), or None when it is the same."""
        from bridge.peft.utils import is_expert_linear

        pattern, full_name = match
        kinds = self.wrapper_kinds(wrapper.to_wrap, full_name, pattern)
        adapters = _adapter_modules(wrapper)
        if not adapters or not hasattr(self, "dim"):
            return None
        first = adapters[0][1]
        have_parts = sorted(p for p in getattr(wrapper, "present_parts", lambda: [])())
        want_parts = self.wrapper_parts(pattern) if hasattr(wrapper, "present_parts") else None
        lora_dtype = getattr(self, "lora_dtype", None)
        # an expert rank may be normalised by the router's top-k: compare it only elsewhere
        dim_free = getattr(self, "normalize_moe_lora", False) and is_expert_linear(full_name)
        want_dim = first.dim if dim_free else self.dim
        have = self._describe(type(wrapper).__name__, have_parts, first.dim, first.alpha,
                              _factor_dtype(first) if lora_dtype is not None else None)
        want = self._describe(kinds[0].__name__ if kinds else type(wrapper).__name__,
                              sorted(want_parts or ()),
                              want_dim, self.alpha, lora_dtype)
        same = (not kinds or type(wrapper) in kinds) and all(
            (dim_free or a.dim == self.dim) and float(a.alpha) == float(self.alpha)
            and (lora_dtype is None or _factor_dtype(a) == lora_dtype) for _, a in adapters)
        if want_parts is not None and set(have_parts) != set(want_parts):
            same = False
        return None if same else f"has {have}, {type(self).__name__} here makes {want}"

    def _check_wrapped(self, wrapped: list, replace: bool) -> None:
        """Refuse (before anything changes) what a second application would get wrong."""
        if replace:
            merged = [n for n, m, _ in wrapped if m.__dict__.get("_lora_merged", False)]
            if merged:
                raise PEFTConfigError(
                    f"{type(self).__name__}(...)(model, replace=True): layers {merged} are "
                    "merged (merge_lora); replacing them would leave their adapters in the base "
                    "weights: unmerge_lora them first (or merge_and_unload to keep them there)")
            return
        problems = []
        for name, wrapper, match in wrapped:
            if match is None:
                problems.append(f"{name}: has a {type(wrapper).__name__} this "
                                f"{type(self).__name__} does not target (not targeted)")
                continue
            why = self.wrapped_mismatch(wrapper, match)
            if why is not None:
                problems.append(f"{name}: {why}")
        if problems:
            raise PEFTConfigError(
                f"the model already has adapters that {type(self).__name__} would not make: "
                + "; ".join(problems) + f". Apply the transform they were made with, or pass "
                f"{type(self).__name__}(...)(model, replace=True) to discard them (their trained "
                "weights too) and adapt the base layers anew")

    def _update_runtime_settings(self, wrapper: nn.Module) -> None:
        """Kernel settings and dropout of a kept wrapper follow this transform (no weights
        involved)."""
        changed = []
        for attr in _RUNTIME_SETTINGS:
            value = getattr(self, attr, None)
            if value is not None and hasattr(wrapper, attr) and getattr(wrapper, attr) != value:
                setattr(wrapper, attr, value)
                changed.append(f"{attr}={value!r}")
        p, position = getattr(self, "dropout", None), getattr(self, "dropout_position", None)
        for _, adapter in _adapter_modules(wrapper):
            if isinstance(p, (int, float)) and hasattr(adapter, "dropout_p") \
                    and adapter.dropout_p != float(p):
                adapter.dropout_p = float(p)
                changed.append(f"dropout={float(p)}")
            if position is not None and getattr(adapter, "dropout_position", position) != position:
                adapter.dropout_position = position
                changed.append(f"dropout_position={position!r}")
        if changed:
            from bridge.peft.fused_forward import forget_fused_plan

            forget_fused_plan(wrapper)
            logger.info("%s: %s kept, now %s", type(self).__name__, type(wrapper).__name__,
                        ", ".join(sorted(set(changed))))

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
