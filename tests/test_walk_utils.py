"""bridge.peft.walk_utils: Megatron-Bridge's map / walk / forall semantics (what func is applied
to, with which keyword arguments, how containers and shared modules are handled), and
map_modules, the in-place walk of the PEFT transforms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bridge.peft import walk, walk_utils


class Pair(nn.Module):
    def __init__(self, first: nn.Module | None = None, second: nn.Module | None = None):
        super().__init__()
        self.first = first if first is not None else nn.Linear(3, 3)
        self.second = second if second is not None else nn.Linear(3, 3)


def record(calls):
    def func(module, name=None, prefix=None, i=None):
        calls.append((type(module).__name__, name, prefix, i))
        return module
    return func


def test_walk_visits_the_root_then_each_child_with_its_name_prefix_and_index():
    model = nn.Sequential()
    model.add_module("block", Pair())
    calls = []
    walk_utils.walk(Pair(first=model), record(calls))
    assert calls == [("Pair", None, None, None),
                     ("Sequential", "first", "", 0),
                     ("Pair", "0", "first", 0),  # a Sequential's items are named by index
                     ("Linear", "first", "first.0", 0),
                     ("Linear", "second", "first.0", 1),
                     ("Linear", "second", "", 1)]


def test_map_and_walk_both_reach_every_module_and_pass_extra_kwargs():
    """Upstream's map descends like walk (its recurse flag changes nothing)."""
    calls = []

    def func(module, tag=None):
        calls.append((type(module).__name__, tag))
        return module

    model = Pair()
    assert walk_utils.map(model, func, tag=7) is model
    assert calls == [("Pair", 7), ("Linear", 7), ("Linear", 7)]
    walk_utils.walk(model, func, tag=8)
    assert calls[3:] == [("Pair", 8), ("Linear", 8), ("Linear", 8)]


def test_a_catch_all_kwargs_func_gets_none_of_the_position_kwargs():
    seen = []
    walk_utils.walk(Pair(), lambda m, **kw: seen.append(kw) or m)
    assert seen == [{}, {}, {}]


def test_replaced_children_are_set_and_not_walked_into_in_that_pass():
    calls = []

    def wrap(module, name=None):
        calls.append(name)
        if isinstance(module, nn.Linear):
            return nn.Sequential(module, nn.ReLU())
        return module

    model = walk_utils.walk(Pair(), wrap)
    assert isinstance(model.first, nn.Sequential) and isinstance(model.first[0], nn.Linear)
    assert calls == [None, "first", "second"]  # the new Sequentials' items were not visited


def test_shared_modules_are_transformed_once():
    shared = nn.Linear(3, 3)
    model = Pair(shared, shared)
    count = []

    def double(module):
        if isinstance(module, nn.Linear):
            count.append(1)
            with torch.no_grad():
                module.weight.mul_(2)
        return module

    before = shared.weight.detach().clone()
    walk_utils.walk(model, double)
    assert len(count) == 1 and torch.equal(shared.weight, 2 * before)
    assert model.first is model.second


@pytest.mark.parametrize("container", [nn.ModuleList, nn.Sequential])
def test_list_containers_are_rebuilt_with_their_type(container):
    items = [nn.Linear(3, 3), nn.Linear(3, 3)]
    module = container(items) if container is nn.ModuleList else nn.Sequential(*items)
    out = walk_utils.walk(module, lambda m: nn.Identity() if isinstance(m, nn.Linear) else m)
    assert type(out) is container and len(out) == 2
    assert all(isinstance(m, nn.Identity) for m in out)


def test_module_dicts_are_rebuilt_and_walked_by_key():
    module = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.ReLU()})
    names = []
    out = walk_utils.walk(module, lambda m, name=None: names.append(name) or m)
    assert type(out) is nn.ModuleDict and list(out) == ["a", "b"]
    assert names == [None, "a", "b"]


def test_leaf_only_reaches_modules_with_their_own_parameters():
    seen = []
    walk_utils.walk(nn.Sequential(Pair(), nn.ReLU()), lambda m: seen.append(type(m)) or m,
                    leaf_only=True)
    assert seen == [nn.Linear, nn.Linear]


def test_a_module_with_its_own_map_handles_the_call():
    class Mapped(nn.Module):
        def map(self, func, leaf_only=False, **kwargs):
            return "handled"

    assert walk_utils.map(Mapped(), lambda m: m) == "handled"


def test_forall():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert walk_utils.forall(model, lambda m: isinstance(m, nn.Sequential))
    assert not walk_utils.forall(model, lambda m: isinstance(m, nn.Sequential), recurse=True)
    assert walk_utils.forall(model, lambda m: isinstance(m, (nn.Sequential, nn.Linear, nn.ReLU)),
                             recurse=True)


def test_map_modules_replaces_in_place_and_skips_adapter_wrappers():
    from bridge.peft import LinearAdapter, LoRALinear

    model = nn.Sequential(nn.Linear(3, 3), nn.ModuleList([nn.Linear(3, 3)]))
    layers = model[1]
    calls = []

    def wrap(child, name, prefix):
        calls.append(f"{prefix}.{name}" if prefix else name)
        if type(child) is nn.Linear:
            return LoRALinear(child, LinearAdapter(child, dim=2))
        return child

    assert walk_utils.map_modules(model, wrap) is model and model[1] is layers  # kept
    assert isinstance(model[0], LoRALinear) and isinstance(model[1][0], LoRALinear)
    calls.clear()
    walk_utils.map_modules(model, wrap)  # a second pass does not enter the wrappers
    assert calls == ["0", "1", "1.0"]


def test_walk_is_an_alias_of_walk_utils():
    for name in ("map", "walk", "forall", "map_modules"):
        assert getattr(walk, name) is getattr(walk_utils, name)
