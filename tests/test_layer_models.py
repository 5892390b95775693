"""benchmarks/layer_models.py's ``spec_available`` says which layer specs can be built here, and
why not, without raising where megatron-core, transformer-engine or the tests package is absent."""

from __future__ import annotations

import importlib.util

import pytest

from benchmarks import layer_models


def _without(monkeypatch, *absent: str) -> None:
    """Make ``find_spec`` behave as if the top-level packages ``absent`` were not installed: None
    for the package, ModuleNotFoundError for a submodule of it (what importlib does, since it
    imports the parent first)."""
    real = importlib.util.find_spec

    def find_spec(name, package=None):
        top = name.split(".")[0]
        if top in absent:
            if "." in name:
                raise ModuleNotFoundError(f"No module named {top!r}", name=top)
            return None
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_the_fake_find_spec_raises_as_importlib_does(monkeypatch):
    _without(monkeypatch, "megatron")
    with pytest.raises(ModuleNotFoundError):  # the crash spec_available used to pass on
        importlib.util.find_spec("megatron.core")


@pytest.mark.parametrize("spec", ["mcore-local", "mcore-te", "te-standin"])
def test_without_megatron_every_megatron_spec_says_so(monkeypatch, spec):
    _without(monkeypatch, "megatron")
    assert layer_models.spec_available(spec, "cuda") == (False, "megatron-core is not installed")
    assert layer_models.spec_available("torch", "cpu") == (True, "")


def test_without_transformer_engine_or_the_tests_package(monkeypatch):
    pytest.importorskip("megatron.core", reason="megatron-core not installed")
    _without(monkeypatch, "transformer_engine", "tests")
    assert layer_models.spec_available("mcore-te", "cuda") == (
        False, "transformer-engine is not installed")
    assert layer_models.spec_available("mcore-te", "cpu") == (
        False, "transformer-engine runs on a CUDA GPU only")
    ok, why = layer_models.spec_available("te-standin", "cpu")
    assert not ok and "tests/te_standins.py is not importable" in why
    assert layer_models.spec_available("mcore-local", "cpu") == (True, "")


def test_unknown_spec_is_named():
    ok, why = layer_models.spec_available("mcore", "cpu")
    assert not ok and "unknown spec 'mcore'" in why and "mcore-local" in why
