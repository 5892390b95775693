"""ModuleMatcher: which modules of a model an adapter applies to (Megatron-Bridge's matcher, with
its alias bookkeeping: every ``target_modules`` entry should match something, and those that
match nothing are reported through this module's logger)."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from bridge.peft._lazy import megatron_linears, module_getattr
from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.errors import PEFTConfigError
from bridge.peft.utils import is_te_module, wildcard_match

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TARGETS", "ModuleMatcher"]

DEFAULT_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def __getattr__(name: str):
    # ColumnParallelLinear, RowParallelLinear, HAVE_TE, TECL, TERL (upstream's module names)
    return module_getattr(__name__, globals(), name)


def _linear_types() -> tuple[type, ...]:
    """What exclude-mode matching adapts (read at call time from this module's names)."""
    return tuple(t for t in (*megatron_linears(globals()), nn.Linear) if t is not None)


@dataclass
class ModuleMatcher:
    """Match modules by name.

    ``target_modules``: names or ``*`` patterns over full names (a module matches if its own name
    equals a pattern or its full dotted name matches it). ``exclude_modules`` (used when
    ``target_modules`` is empty): every linear except these. ``canonical_mapping``: pattern ->
    set of sub-adapter names, for canonical LoRA.

    The match bookkeeping is rebuilt from the *current* ``target_modules`` each time a transform
    is applied (``PEFT.__call__``), so a recipe may change ``target_modules`` after construction.
    """

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude_modules: list[str] = field(default_factory=list)
    canonical_mapping: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    _pattern_to_alias: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set),
                                                   init=False, repr=False)
    _alias_to_pattern: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _alias_matches: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set),
                                                init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_names()

    def _check_names(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} must be a list of module names or '*' patterns, got the "
                                f"string {value!r}; write [{value!r}]")
            for entry in value or ():
                if not isinstance(entry, str):
                    raise TypeError(
                        f"{name} entries must be module names or '*' patterns (str); got "
                        f"{entry!r} ({type(entry).__name__}) in {list(value)!r}")

    def check_targets(self) -> None:
        """The configuration checks, run when the transform is applied (and by ``match``): a
        recipe may still change ``target_modules`` / ``exclude_modules`` after construction.

        Raises:
            TypeError: a string instead of a list of names.
            PEFTConfigError: (an AssertionError, as upstream's) both ``target_modules`` (or a
                canonical mapping) and ``exclude_modules`` set.
        """
        self._check_names()
        if (self.target_modules or self.canonical_mapping) and self.exclude_modules:
            using = "canonical_mapping" if self.canonical_mapping else "target_modules"
            raise PEFTConfigError(
                f"exclude_modules should be empty when using {using}: target_modules and "
                f"exclude_modules cannot both be set (got target_modules={self.target_modules!r}, "
                f"exclude_modules={self.exclude_modules!r}); pass target_modules=[] to adapt "
                "every linear except exclude_modules")

    # ---- matching --------------------------------------------------------------------------
    def match(self, m: nn.Module, name: str | None = None, prefix: str | None = None):
        """``(pattern, full_name)`` when ``m`` matches, else None (and the match is recorded)."""
        full_name = f"{prefix}.{name}" if prefix else name
        patterns = list(self.canonical_mapping) if self.canonical_mapping \
            else list(self.target_modules or [])
        if patterns:
            if self.exclude_modules:
                self.check_targets()
            for pattern in patterns:
                if name == pattern or wildcard_match(pattern, full_name):
                    self._record_match(pattern, full_name)
                    return pattern, full_name
            return None
        excluded = name in self.exclude_modules or any(
            wildcard_match(p, full_name) for p in self.exclude_modules)
        base = m.to_wrap if isinstance(m, AdapterWrapper) else m  # an earlier application's
        if not excluded and (isinstance(base, _linear_types()) or _is_te_linear(base)):
            self._record_match(name, full_name)
            return name, full_name
        return None

    # ---- alias bookkeeping (Megatron-Bridge's names) ----------------------------------------
    def _init_target_match_state(self) -> None:
        """(Re)build the alias bookkeeping from the current ``target_modules``; each entry is its
        own alias (CanonicalLoRA maps 'linear_q' to its fused layer instead)."""
        self.check_targets()
        self._pattern_to_alias.clear()
        self._alias_to_pattern.clear()
        self._alias_matches.clear()
        for target in self.target_modules or []:
            self.register_target_alias(target, target)

    def register_target_alias(self, alias: str, pattern: str) -> None:
        """Record that the user's ``alias`` is matched through ``pattern``."""
        if alias is None or pattern is None:
            return
        previous = self._alias_to_pattern.get(alias)
        if previous:
            self._pattern_to_alias[previous].discard(alias)
        self._alias_to_pattern[alias] = pattern
        self._pattern_to_alias[pattern].add(alias)
        self._alias_matches.setdefault(alias, set())

    def _record_match(self, pattern: str, full_name: str | None) -> None:
        for alias in self._pattern_to_alias.get(pattern, ()):
            self._alias_matches.setdefault(alias, set()).add(full_name or alias)

    def _reset_target_match_state(self) -> None:
        for matches in self._alias_matches.values():
            matches.clear()

    def unmatched_targets(self) -> list[str]:
        """The ``target_modules`` entries that matched no module in the last validation walk."""
        return sorted(a for a, found in self._alias_matches.items() if not found)

    def _validate_target_matches(self) -> None:
        """Warn (through this module's logger) about targets that matched nothing."""
        unmatched = self.unmatched_targets()
        if unmatched:
            logger.warning("No modules matched the requested target_modules entries: %s",
                           ", ".join(unmatched))


def _is_te_linear(m: nn.Module) -> bool:
    return is_te_module(m) and hasattr(m, "in_features") and hasattr(m, "out_features")
