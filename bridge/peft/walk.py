"""Alias of :mod:`bridge.peft.walk_utils` (this package's earlier module name)."""

from bridge.peft.walk_utils import HasBool, forall, map, map_modules, walk  # noqa: A004

__all__ = ["HasBool", "forall", "map", "map_modules", "walk"]
