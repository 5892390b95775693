"""Walk a module tree and apply a function to its modules (Megatron-Bridge's ``walk_utils``:
``map``, ``walk``, ``forall``), plus ``map_modules``, the walk the PEFT transforms use.

Semantics of ``map`` / ``walk`` (as upstream): ``func(module, **kwargs)`` is applied to the module
itself and to every descendant (upstream's ``map`` descends too: its ``recurse`` flag changes
nothing, and ``walk`` is ``map(recurse=True)``); each child is replaced by what the walk returns
for it. A child is visited with the keyword arguments its signature names among ``name`` (its
attribute name), ``prefix`` (the dotted path of its parent), ``i`` (its index among its
siblings) and any extra ``**kwargs`` given to the walk; the root gets only the extra kwargs.
Containers (``nn.ModuleList``, ``nn.Sequential``, ``nn.ModuleDict``) are rebuilt, of the same
type, from their walked items. A module reached twice (shared) is transformed once.
``leaf_only=True`` applies ``func`` only to modules that hold parameters themselves.

The children visited are the *original* module's, set on what ``func`` returned: a wrapper that
``func`` returns for a linear is not walked into in that pass.
"""

from __future__ import annotations

import builtins
import inspect
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar, runtime_checkable

from torch import nn

__all__ = ["HasBool", "forall", "map", "map_modules", "walk"]

_TModule = TypeVar("_TModule", bound=nn.Module)
ModuleFunc = Callable[..., nn.Module]


@runtime_checkable
class HasBool(Protocol):
    """Anything ``bool()`` accepts (the result type of a ``forall`` predicate)."""

    def __bool__(self) -> bool: ...


ModulePredicate = Callable[[nn.Module], "bool | HasBool"]
_POSITION_KWARGS = ("i", "name", "prefix")


def map(module: _TModule, func: ModuleFunc, leaf_only: bool = False, **kwargs) -> _TModule:  # noqa: A001
    """Apply ``func`` to ``module`` and its descendants (see the module docstring).

    A module with its own ``map`` method handles the call itself; containers are mapped item by
    item and rebuilt. See the module docstring for the keyword arguments ``func`` receives.

    Returns:
        What ``func`` returned for ``module`` (or the rebuilt container).
    """
    if not kwargs.pop("_skip_map", False) and hasattr(module, "map") \
            and callable(module.map):
        return module.map(func, leaf_only=leaf_only, **kwargs)
    if isinstance(module, Iterable):  # ModuleList, Sequential, ModuleDict and the like
        dict_like = all(hasattr(module, a) for a in ("items", "values", "keys"))
        return _map_container(module, func, leaf_only, dict_like=dict_like, **kwargs)
    return _map_module(module, func, leaf_only=leaf_only, **kwargs)


def walk(module: _TModule, func: ModuleFunc, leaf_only: bool = False, **kwargs) -> _TModule:
    """``map`` applied recursively: ``func`` reaches ``module`` and every descendant."""
    return map(module, func, recurse=True, leaf_only=leaf_only, **kwargs)


def forall(module: nn.Module, func: ModulePredicate, recurse: bool = False) -> bool:
    """Whether ``func`` holds (is truthy) for ``module``, or with ``recurse`` for every module
    in ``module.modules()``."""
    modules = module.modules() if recurse else [module]
    return all(bool(func(m)) for m in modules)


def _func_kwargs(func: Callable, kwargs: dict) -> dict:
    """The kwargs ``func`` names in its signature (as upstream: a ``**kwargs`` catch-all gets
    none of them)."""
    params = inspect.signature(func).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _child_prefix(kwargs: dict) -> str:
    name, prefix = kwargs.get("name", ""), kwargs.get("prefix", "")
    return f"{prefix}.{name}" if prefix else (name or "")


def _rest(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in _POSITION_KWARGS}


def _map_module(module: nn.Module, func: ModuleFunc, recurse: bool = False,
                leaf_only: bool = False, transformed_modules: set | None = None,
                **kwargs) -> nn.Module:
    seen = set() if transformed_modules is None else transformed_modules
    if id(module) in seen:
        return module
    new_module = module
    if not leaf_only or builtins.any(True for _ in module.parameters(recurse=False)):
        new_module = func(module, **_func_kwargs(func, kwargs))
    prefix, rest = _child_prefix(kwargs), _rest(kwargs)
    for i, (name, child) in enumerate(list(module.named_children())):  # recurse or not (upstream)
        setattr(new_module, name, map(child, func, recurse=recurse, leaf_only=leaf_only,
                                      transformed_modules=seen, i=i, name=name, prefix=prefix,
                                      **rest))
    seen.add(id(new_module))
    return new_module


def _map_container(container, func: ModuleFunc, leaf_only: bool, *, dict_like: bool,
                   recurse: bool = False, transformed_modules: set | None = None, **kwargs):
    seen = set() if transformed_modules is None else transformed_modules
    if not leaf_only:
        container = func(container, **_func_kwargs(func, kwargs))
    prefix, rest = _child_prefix(kwargs), _rest(kwargs)
    items = container.items() if dict_like else ((str(i), m) for i, m in enumerate(container))
    mapped = {name: map(m, func, recurse=recurse, leaf_only=leaf_only, transformed_modules=seen,
                        i=i, name=name, prefix=prefix, **rest)
              for i, (name, m) in enumerate(list(items))}
    if dict_like:
        return type(container)(mapped)
    params = inspect.signature(type(container).__init__).parameters
    if "args" in params:  # nn.Sequential(*modules)
        return type(container)(*mapped.values())
    return type(container)(list(mapped.values()))


# ---- the walk of the PEFT transforms -----------------------------------------------------------
def map_modules(module: nn.Module, fn: ModuleFunc, prefix: str = "") -> nn.Module:
    """Apply ``fn(child, name=name, prefix=prefix)`` to every module below ``module``, depth first,
    replacing each child by the result, in place (containers are kept, not rebuilt).

    A replaced child is not descended into (its base linear must not be wrapped twice), nor is an
    adapter wrapper met again: applying a transform twice wraps once. (Upstream's ``walk`` walks
    into an existing wrapper's ``to_wrap`` on a second application, where a transform matching
    every linear would wrap the base again.)
    """
    from bridge.peft.adapter_wrapper import AdapterWrapper

    for name, child in list(module.named_children()):
        new = fn(child, name=name, prefix=prefix)
        if new is not child:
            setattr(module, name, new)
            continue
        if isinstance(child, AdapterWrapper):
            continue
        map_modules(child, fn, f"{prefix}.{name}" if prefix else name)
    return module
