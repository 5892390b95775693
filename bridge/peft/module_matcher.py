"""ModuleMatcher: which modules of a model an adapter applies to."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from bridge.peft.utils import is_te_module, wildcard_match

__all__ = ["ModuleMatcher"]

DEFAULT_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        types += [ColumnParallelLinear, RowParallelLinear]
    except ImportError:
        pass
    return tuple(types)


@dataclass
class ModuleMatcher:
    """Match modules by name.

    ``target_modules``: names or ``*`` patterns over full names (a module matches if its own name
    equals a pattern or its full dotted name matches it). ``exclude_modules`` (used when
    ``target_modules`` is empty): every linear except these. ``canonical_mapping``: pattern ->
    set of sub-adapter names, for canonical LoRA.
    """

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude_modules: list[str] = field(default_factory=list)
    canonical_mapping: dict[str, set] = field(default_factory=lambda: defaultdict(set))

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} must be a list of module names or '*' patterns, got the "
                                f"string {value!r}; write [{value!r}]")
        if self.target_modules and self.exclude_modules:
            raise ValueError(
                "target_modules and exclude_modules cannot both be set (got target_modules="
                f"{self.target_modules!r}, exclude_modules={self.exclude_modules!r}); pass "
                "target_modules=[] to adapt every linear except exclude_modules"
            )

    def match(self, m: nn.Module, name: str | None = None, prefix: str | None = None):
        """``(pattern, full_name)`` when ``m`` matches, else None."""
        full_name = f"{prefix}.{name}" if prefix else name
        patterns = list(self.canonical_mapping) if self.canonical_mapping else self.target_modules
        if patterns:
            for pattern in patterns:
                if name == pattern or wildcard_match(pattern, full_name):
                    return pattern, full_name
            return None
        excluded = name in self.exclude_modules or any(
            wildcard_match(p, full_name) for p in self.exclude_modules
        )
        if not excluded and (isinstance(m, _linear_types()) or _is_te_linear(m)):
            return name, full_name
        return None


def _is_te_linear(m: nn.Module) -> bool:
    return is_te_module(m) and hasattr(m, "in_features") and hasattr(m, "out_features")
