"""kernels/backend.py: the one place that picks cuda / triton / eager for a call."""

from __future__ import annotations

import logging
import uuid

import pytest
import torch
from bridge.kernels.backend import (
    ENV_VAR,
    BackendChoice,
    BackendUnavailableError,
    resolve_backend,
    validate_backend_name,
)

CPU = torch.device("cpu")
LOGGER = "bridge.kernels"


def _op() -> str:
    """A fresh op name, so the log-once cache of an earlier call cannot hide a message."""
    return f"test_op_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return monkeypatch


def _resolve(requested, op="lora_linear", dtype=torch.float32, **kw) -> BackendChoice:
    return resolve_backend(requested, op, device=CPU, dtype=dtype, **kw)


# ---- names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [(None, "auto"), ("auto", "auto"), ("EAGER", "eager"),
                                            ("Triton", "triton"), ("cuda", "cuda")])
def test_validate_backend_name_normalises(name, expected):
    assert validate_backend_name(name) == expected


@pytest.mark.parametrize("bad", ["foo", "", "gpu", 3])
def test_unknown_backend_name_is_a_value_error_naming_the_allowed_ones(bad):
    with pytest.raises(ValueError, match=rf"unknown backend {bad!r}; expected one of auto, cuda, "
                                         r"triton, eager"):
        validate_backend_name(bad)


def test_unknown_backend_argument_raises_in_resolve(clean_env):
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*auto, cuda, triton, eager"):
        _resolve("fast")


def test_unknown_backend_in_environment_names_the_variable(clean_env):
    clean_env.setenv(ENV_VAR, "turbo")
    with pytest.raises(ValueError, match=rf"unknown {ENV_VAR} value 'turbo'; expected one of"):
        _resolve("auto")


# ---- precedence: argument > environment > auto --------------------------------------------------
def test_argument_beats_environment(clean_env):
    clean_env.setenv(ENV_VAR, "triton")
    choice = _resolve("eager")
    assert choice == BackendChoice("eager", "requested by argument")


def test_environment_beats_auto(clean_env):
    clean_env.setenv(ENV_VAR, "eager")
    choice = _resolve("auto")
    assert choice == BackendChoice("eager", f"requested by {ENV_VAR}=eager")
    assert _resolve(None) == BackendChoice("eager", f"requested by {ENV_VAR}=eager")


def test_environment_request_that_cannot_run_raises_naming_the_variable(clean_env):
    clean_env.setenv(ENV_VAR, "triton")
    clean_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match=rf"requested by {ENV_VAR}=triton.*no GPU"):
        _resolve(None)


def test_auto_picks_triton_under_the_interpreter(clean_env):
    # TRITON_INTERPRET=1 makes Triton available for CPU tensors; nothing fell back.
    assert _resolve("auto") == BackendChoice("triton", "")


# ---- explicit requests that cannot run --------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_explicit_cuda_on_cpu_names_the_reason(clean_env):
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' requested by argument "
                                                      r"cannot run: .*(bridge\._C|no GPU)"):
        _resolve("cuda", cuda_op=True)


def test_explicit_cuda_for_an_op_without_a_cuda_kernel(clean_env):
    with pytest.raises(BackendUnavailableError, match=r"no CUDA C\+\+ kernel exists for my_op"):
        _resolve("cuda", op="my_op", cuda_op=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_explicit_triton_without_interpreter_on_cpu_says_no_gpu(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError,
                       match=r"backend 'triton' requested by argument cannot run: no GPU;.*"
                             r"TRITON_INTERPRET=1"):
        _resolve("triton")


def test_explicit_triton_with_float64_names_the_dtype(clean_env):
    with pytest.raises(BackendUnavailableError, match=r"cannot run: dtype float64"):
        _resolve("triton", dtype=torch.float64)


def test_explicit_request_fails_on_a_constraint_and_names_it(clean_env):
    with pytest.raises(BackendUnavailableError, match=r"cannot run: rank too large; K odd"):
        _resolve("triton", constraints=[(False, "rank too large"), (True, "unused"),
                                        (False, "K odd")])


def test_explicit_triton_with_all_constraints_met(clean_env):
    assert _resolve("triton", constraints=[(True, "never shown")]) == BackendChoice("triton")


# ---- automatic fallback: eager, with the reason logged once -------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_auto_falls_back_to_eager_and_logs_the_reason_once(clean_env, caplog):
    clean_env.setenv("TRITON_INTERPRET", "0")
    op = _op()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = _resolve("auto", op=op)
    assert first == BackendChoice("eager", "triton: no GPU")
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1
    assert records[0].getMessage() == f"bridge.kernels: {op} runs on the eager backend: triton: no GPU"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        second = _resolve("auto", op=op)
    assert second == first
    assert [r for r in caplog.records if r.name == LOGGER] == []


def test_auto_with_float64_falls_back_with_the_dtype_reason(clean_env, caplog):
    op = _op()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        choice = _resolve("auto", op=op, dtype=torch.float64)
    assert choice == BackendChoice("eager", "triton: dtype float64")
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        f"bridge.kernels: {op} runs on the eager backend: triton: dtype float64"
    ]


def test_auto_constraint_reasons_propagate_to_the_choice_and_the_log(clean_env, caplog):
    op = _op()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        choice = _resolve("auto", op=op, constraints=[(False, "base weight requires grad")])
    assert choice == BackendChoice("eager", "triton: base weight requires grad")
    assert any("base weight requires grad" in r.getMessage() for r in caplog.records)


def test_auto_with_cuda_op_tries_cuda_then_triton(clean_env):
    # On this CPU machine cuda cannot run; under the interpreter triton can, and the choice
    # carries the reason cuda was skipped.
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only fallback order")
    choice = _resolve("auto", cuda_op=True)
    assert choice.name == "triton"
    assert choice.reason.startswith("cuda: ")
    assert "bridge._C" in choice.reason or "no GPU" in choice.reason


def test_auto_fallback_reason_lists_every_backend_tried(clean_env):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only fallback order")
    clean_env.setenv("TRITON_INTERPRET", "0")
    choice = _resolve("auto", op=_op(), cuda_op=True)
    assert choice.name == "eager"
    cuda_reason, triton_reason = choice.reason.split("; ")
    assert cuda_reason.startswith("cuda: ")
    assert triton_reason == "triton: no GPU"


def test_eager_request_never_probes_constraints(clean_env):
    # An explicit eager request always runs, whatever the constraints say.
    assert _resolve("eager", constraints=[(False, "anything")]).name == "eager"


# ---- constraints of the cuda backend alone ----------------------------------------------------
@pytest.fixture
def cuda_probe_passes(clean_env):
    """Pretend bridge._C and a GPU are present, so only cuda_constraints can stop 'cuda'."""
    import bridge.kernels.backend as backend

    clean_env.setattr(backend, "probe_cuda", lambda device, dtype, op: (True, ""))
    return clean_env


def test_cuda_constraint_moves_auto_on_to_triton_with_the_reason(cuda_probe_passes):
    choice = _resolve("auto", op=_op(), cuda_op=True,
                      cuda_constraints=[(False, "hidden size 99 is not a multiple of 8")])
    assert choice == BackendChoice("triton", "cuda: hidden size 99 is not a multiple of 8")


def test_cuda_constraint_makes_an_explicit_cuda_request_raise(cuda_probe_passes):
    with pytest.raises(BackendUnavailableError, match="backend 'cuda'.*multiple of 8"):
        _resolve("cuda", cuda_op=True, cuda_constraints=[(False, "not a multiple of 8")])


def test_cuda_constraints_do_not_stop_triton(cuda_probe_passes):
    choice = _resolve("triton", cuda_op=True, cuda_constraints=[(False, "not a multiple of 8")])
    assert choice.name == "triton"


def test_met_cuda_constraints_pick_cuda(cuda_probe_passes):
    assert _resolve("auto", cuda_op=True, cuda_constraints=[(True, "")]).name == "cuda"
