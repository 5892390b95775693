"""The GEMM-strategy chooser (kernels/gemm_strategy.py) with an injected timer, on the CPU: it picks
the faster strategy, writes and re-reads its cache file (keyed by versions), respects
BRIDGE_LORA_GEMM / BRIDGE_LORA_GEMM_TUNE / BRIDGE_KERNEL_CACHE, logs each key once with both
times, never times inside torch.compile, and uses the stated rule without CUDA. The GPU tests
(marked ``gpu``) check on a real GPU that auto is never slower than the slower strategy beyond
noise and that CUDA-graph capture never times."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch
from bridge.kernels import lora_linear

from tests.conftest import KERNEL_DEVICE as DEV
from tests.conftest import requires_kernel_device
from tests.numerics import lora_inputs

gs = importlib.import_module("bridge.kernels.gemm_strategy")
GemmChooser, use_chooser = gs.GemmChooser, gs.use_chooser
CPU = torch.device("cpu")
KEY = gs.make_key("lora_linear", "fwd", CPU, torch.bfloat16, 3000, 4096, 4096, 16, "none", True)


class FakeTimer:
    """Returns fixed ms per strategy and records what it was asked to time (running each
    candidate once, so a broken GEMM step fails the test)."""

    def __init__(self, ms: dict[str, float], run: bool = False):
        self.ms, self.run, self.calls = ms, run, []

    def __call__(self, name, fn, device):
        self.calls.append(name)
        if self.run:
            fn()
        return self.ms[name]


def _never(name, fn, device):
    raise AssertionError(f"timed {name} where nothing may be timed")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in (gs.ENV_GEMM, gs.ENV_TUNE):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(gs.ENV_CACHE, str(tmp_path / "env-cache"))
    return tmp_path


# ---- names and precedence ------------------------------------------------------------------
def test_requested_gemm_precedence_and_errors(clean_env, monkeypatch):
    assert gs.requested_gemm(None) == "auto" and gs.requested_gemm("CUBLAS") == "cublas"
    monkeypatch.setenv(gs.ENV_GEMM, "cublas")
    assert gs.requested_gemm("auto") == "cublas"  # environment > auto
    assert gs.requested_gemm("fused") == "fused"  # argument > environment
    with pytest.raises(ValueError, match="unknown gemm 'mkl'; expected one of auto, fused, cublas"):
        gs.requested_gemm("mkl")
    monkeypatch.setenv(gs.ENV_GEMM, "tma")
    with pytest.raises(ValueError, match="unknown BRIDGE_LORA_GEMM value 'tma'"):
        gs.requested_gemm("auto")


def test_heuristic_rule():
    assert gs.heuristic("sm90", 4096, 4096) == "cublas"
    assert gs.heuristic("sm90", 4096, 2048) == "fused"  # K below 3072
    assert gs.heuristic("sm80", 8192, 8192) == "fused"
    assert gs.heuristic("interpret", 8192, 8192) == "fused"


def test_key_buckets_m_and_rank():
    k1 = gs.make_key("lora_linear", "fwd", CPU, torch.bfloat16, 3000, 64, 32, 9, "pre", False)
    k2 = gs.make_key("lora_linear", "fwd", CPU, torch.bfloat16, 4096, 64, 32, 16, "pre", False)
    assert k1 == k2 and (k1.m_bucket, k1.r_bucket, k1.device) == (4096, 16, "cpu")
    assert gs.make_key("lora_linear", "fwd", CPU, torch.bfloat16, 4097, 64, 32, 9, "pre",
                       False).m_bucket == 8192


# ---- the choice with an injected timer -----------------------------------------------------
@pytest.mark.parametrize("ms, expected", [({"fused": 2.0, "cublas": 1.0}, "cublas"),
                                          ({"fused": 1.0, "cublas": 1.5}, "fused")])
def test_picks_the_faster_and_remembers(clean_env, ms, expected):
    timer = FakeTimer(ms)
    c = GemmChooser(timer=timer, cache_dir=clean_env)
    candidates = lambda: {"fused": lambda: None, "cublas": lambda: None}
    assert c.choose(KEY, candidates, device=CPU) == expected
    assert sorted(timer.calls) == ["cublas", "fused"]
    assert c.choose(KEY, candidates, device=CPU) == expected
    assert len(timer.calls) == 2  # remembered in memory: timed once per key
    d = c.decisions()[KEY]
    assert d.source == "timed" and d.ms == ms


def test_cache_file_written_and_reread_by_a_new_process(clean_env):
    c1 = GemmChooser(timer=FakeTimer({"fused": 3.0, "cublas": 1.0}), cache_dir=clean_env)
    c1.choose(KEY, lambda: {"fused": None, "cublas": None}, device=CPU)
    path = clean_env / gs.CACHE_FILE
    data = json.loads(path.read_text())
    assert data["format"] == gs.CACHE_FORMAT
    (fkey, entry), = data["entries"].items()
    assert fkey.startswith(f"torch={torch.__version__};triton=") and ";bridge=" in fkey
    assert fkey.endswith("|lora_linear|fwd|cpu|bfloat16|4096|4096|4096|16|none|True")
    assert entry["choice"] == "cublas" and entry["ms"] == {"fused": 3.0, "cublas": 1.0}
    c2 = GemmChooser(timer=_never, cache_dir=clean_env)  # a later process: reads, never times
    assert c2.choose(KEY, lambda: {}, device=CPU) == "cublas"
    assert c2.decisions()[KEY].source == "cache file"


def test_entries_of_other_versions_are_not_reused(clean_env):
    path = clean_env / gs.CACHE_FILE
    other = GemmChooser.file_key(KEY).replace(f"torch={torch.__version__}", "torch=0.0.1")
    path.write_text(json.dumps({"format": gs.CACHE_FORMAT,
                                "entries": {other: {"choice": "cublas", "ms": None}}}))
    timer = FakeTimer({"fused": 1.0, "cublas": 2.0})
    c = GemmChooser(timer=timer, cache_dir=clean_env)
    assert c.choose(KEY, lambda: {"fused": None, "cublas": None}, device=CPU) == "fused"
    assert timer.calls  # timed: the entry of another torch was not taken
    assert len(json.loads(path.read_text())["entries"]) == 2  # merged, the other one kept


def test_corrupt_cache_file_is_ignored_with_a_warning(clean_env, caplog):
    (clean_env / gs.CACHE_FILE).write_text("{not json")
    c = GemmChooser(timer=FakeTimer({"fused": 1.0, "cublas": 2.0}), cache_dir=clean_env)
    with caplog.at_level(logging.WARNING, logger="bridge.kernels"):
        assert c.choose(KEY, lambda: {"fused": None, "cublas": None}, device=CPU) == "fused"
    assert any("cannot read" in r.getMessage() for r in caplog.records)
    assert json.loads((clean_env / gs.CACHE_FILE).read_text())["entries"]  # rewritten whole


def test_a_strategy_that_fails_when_timed_is_left_out(clean_env, caplog):
    def timer(name, fn, device):
        if name == "fused":
            raise RuntimeError("out of shared memory")
        return 3.0

    c = GemmChooser(timer=timer, cache_dir=clean_env)
    with caplog.at_level(logging.WARNING, logger="bridge.kernels"):
        assert c.choose(KEY, lambda: {"fused": None, "cublas": None}, device=CPU) == "cublas"
    assert any("fused GEMM step failed" in r.getMessage() and "out of shared memory" in
               r.getMessage() for r in caplog.records)
    (entry,) = json.loads((clean_env / gs.CACHE_FILE).read_text())["entries"].values()
    assert entry["ms"] == {"fused": None, "cublas": 3.0}  # strict JSON: no Infinity
    assert GemmChooser(timer=_never, cache_dir=clean_env).choose(KEY, None, device=CPU) == "cublas"
    broken = GemmChooser(timer=lambda *a: 1 / 0, cache_dir=clean_env / "other")
    with pytest.raises(ZeroDivisionError):
        broken.choose(KEY, lambda: {"fused": None, "cublas": None}, device=CPU)


def test_cache_folder_from_the_environment(clean_env):
    c = GemmChooser(timer=FakeTimer({"fused": 1.0, "cublas": 2.0}))
    c.choose(KEY, lambda: {"fused": None, "cublas": None}, device=CPU)
    assert (clean_env / "env-cache" / gs.CACHE_FILE).is_file()


def test_tune_off_uses_the_heuristic_without_timing(clean_env, monkeypatch):
    monkeypatch.setenv(gs.ENV_TUNE, "0")
    c = GemmChooser(timer=_never, cache_dir=clean_env)
    assert c.choose(KEY, lambda: {}, device=CPU) == "fused"  # CPU: not sm_90
    assert c.decisions()[KEY].source == f"heuristic ({gs.ENV_TUNE}=0)"
    assert not (clean_env / gs.CACHE_FILE).exists()


def test_no_cuda_means_the_rule_never_a_timing(clean_env):
    """The process's default chooser (no injected timer) never times CPU calls: the rule."""
    c = GemmChooser(cache_dir=clean_env)
    assert c.choose(KEY, lambda: pytest.fail("built candidates"), device=CPU) == "fused"
    assert c.decisions()[KEY].source == "heuristic (no CUDA GPU to time on)"


def test_logs_once_per_key_at_info_with_both_times(clean_env, caplog):
    c = GemmChooser(timer=FakeTimer({"fused": 1.25, "cublas": 0.5}), cache_dir=clean_env)
    with caplog.at_level(logging.INFO, logger="bridge.kernels"):
        for _ in range(3):
            c.choose(KEY, lambda: {"fused": None, "cublas": None}, device=CPU)
    logged = [r for r in caplog.records if "GEMM strategy" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO
    msg = logged[0].getMessage()
    assert "strategy cublas" in msg and "fused 1.2500 ms" in msg and "cublas 0.5000 ms" in msg
    assert "N=4096 K=4096" in msg and "M<=4096" in msg


def test_untimed_fallback_is_not_remembered(clean_env):
    """may_time=False (tracing, graph capture) answers from the cache or the rule and keeps
    that apart: a later call that may time still measures."""
    timer = FakeTimer({"fused": 2.0, "cublas": 1.0})
    c = GemmChooser(timer=timer, cache_dir=clean_env)
    assert c.choose(KEY, None, device=CPU, may_time=False) == "fused"
    assert not timer.calls and KEY not in c.decisions()
    assert c.choose(KEY, lambda: {"fused": None, "cublas": None}, device=CPU) == "cublas"
    assert c.choose(KEY, None, device=CPU, may_time=False) == "cublas"  # now remembered


# ---- through the ops -----------------------------------------------------------------------
pytestmark_kernels = requires_kernel_device()


def _spy_expand(monkeypatch) -> list:
    calls = []
    real = gs.launch_expand
    monkeypatch.setattr(gs, "launch_expand", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytestmark_kernels
def test_auto_times_forward_and_backward_steps_and_runs_the_winner(clean_env, monkeypatch):
    calls = _spy_expand(monkeypatch)
    timer = FakeTimer({"fused": 2.0, "cublas": 1.0}, run=True)  # runs each candidate once
    x, w, b, a, bb = lora_inputs((3, 5), 40, 24, 8, torch.float32, device=DEV)
    rng = torch.get_rng_state()
    with use_chooser(GemmChooser(timer=timer, cache_dir=clean_env)) as c:
        y = lora_linear(x, w, b, a, bb, scale=0.5, dropout=0.1, seed=3, backend="triton")
        assert torch.equal(torch.get_rng_state(), rng)  # timing never draws from torch's RNG
        timed = len(calls)
        y.sum().backward()
        lora_linear(x, w, b, a, bb, scale=0.5, dropout=0.1, seed=3, backend="triton")
    assert timer.calls == ["fused", "cublas", "fused", "cublas"]  # fwd key, then bwd key
    assert timed == 2 + 1  # the two cublas candidates, then P of the call itself
    assert len(calls) == timed + 1 + 1  # Q of its backward, P of the second call
    assert {(k.direction, d.choice) for k, d in c.decisions().items()} == \
        {("fwd", "cublas"), ("bwd", "cublas")}


def test_settled_choices_are_looked_up_once_per_call_shape(clean_env, monkeypatch):
    """select()'s hot path: a settled (fwd, bwd) pair is found by the call's raw shape without
    building keys; another shape, dropout variant or chooser asks again, and forget() (a new
    decision may follow) clears the memo."""
    timer = FakeTimer({"fused": 1.0, "cublas": 2.0})
    x, w, b, a, bb = lora_inputs((6,), 40, 24, 8, torch.float32)
    args = dict(x2d=x, weight=w, bias=b, lora_a=a, lora_b=bb, scale=0.5, seed=None, p=0.0,
                post=False, need_bwd=True, dx_dtype={"fused": x.dtype, "cublas": x.dtype})
    keys = []
    real = gs.make_key
    monkeypatch.setattr(gs, "make_key", lambda *k: keys.append(k) or real(*k))
    with use_chooser(GemmChooser(timer=timer, cache_dir=clean_env)) as c:
        for strategy in ("fused", "cublas"):  # what each direction settles on
            c._memory[(real("lora_linear", "fwd", CPU, x.dtype, 6, 24, 40, 8, "none", True),
                       None)] = gs.Decision(strategy, None, "test")
            c._memory[(real("lora_linear", "bwd", CPU, x.dtype, 6, 24, 40, 8, "none", False),
                       None)] = gs.Decision(strategy, None, "test")
            assert gs.select("lora_linear", "auto", **args) == (strategy, strategy)
            assert len(keys) == 2
            assert gs.select("lora_linear", "auto", **args) == (strategy, strategy)
            assert len(keys) == 2  # the memo: no key built
            c.forget()
            keys.clear()
    assert not timer.calls  # every choice above was settled: nothing timed
    with use_chooser(GemmChooser(timer=timer, cache_dir=clean_env / "other")):
        # another chooser makes its own decisions (the injected timer: fused is faster)
        assert gs.select("lora_linear", "auto", **args) == ("fused", "fused")
        assert len(keys) == 2 and timer.calls == ["fused", "cublas"] * 2
        assert gs.select("lora_linear", "auto", **{**args, "p": 0.1,
                                                   "seed": torch.tensor([1])})[0] == "fused"
        assert len(keys) == 4  # another dropout variant is another call shape


@pytestmark_kernels
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_never_times_inside_torch_compile(clean_env, monkeypatch):
    """Compiled with gemm='auto', the op gets 'auto' and resolves it when it runs: the
    remembered choice (cublas, from an eager call) or the rule, never a timing."""
    torch._dynamo.reset()
    calls = _spy_expand(monkeypatch)
    x, w, b, a, bb = lora_inputs((2, 5), 40, 24, 8, torch.float32, device=DEV)
    f = lambda x, w, b, a, bb: lora_linear(x, w, b, a, bb, scale=0.5, backend="triton")
    with use_chooser(GemmChooser(timer=_never, cache_dir=clean_env)):
        y = torch.compile(f, fullgraph=True)(x, w, b, a, bb)
        y.sum().backward()
        assert not calls  # the rule: fused on the CPU
    torch.testing.assert_close(y, f(x, w, b, a, bb), rtol=1e-6, atol=1e-6)
    timer = FakeTimer({"fused": 2.0, "cublas": 1.0})
    with use_chooser(GemmChooser(timer=timer, cache_dir=clean_env)):
        f(x, w, b, a, bb).sum().backward()  # eager: times, remembers cublas
        n = len(timer.calls)
        torch._dynamo.reset()
        torch.compile(f, fullgraph=True)(x, w, b, a, bb).sum().backward()
    assert n == 4 and len(timer.calls) == n  # nothing timed while compiled
    assert len(calls) == 4  # P and Q eagerly, then P and Q from the remembered choice


# ---- on a GPU --------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or DEV != "cuda",
                                reason="needs a CUDA GPU and BRIDGE_TEST_GPU=1 "
                                       "TRITON_INTERPRET=0 (the kernels compiled for it)")


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(4096, 4096, 4096, 16), (2048, 1024, 1024, 16)])
def test_auto_is_never_slower_than_the_slower_strategy(shape, clean_env):
    """On the GPU: auto's forward+backward is within noise (5%) of the faster strategy and
    never slower than the slower one; the cache file it wrote holds both times."""
    from bridge.kernels._timing import bench

    m, k, n, r = shape
    x, w, b, a, bb = lora_inputs((m,), k, n, r, torch.bfloat16, device="cuda")
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def step(gemm):
        return lambda: torch.autograd.grad(
            lora_linear(x, w, b, a, bb, scale=2.0, backend="triton", gemm=gemm), (x, a, bb), dy)

    with use_chooser(GemmChooser(cache_dir=clean_env)) as c:
        step("auto")()
        t = {g: bench(step(g), "cuda").median_ms for g in ("fused", "cublas", "auto")}
    assert t["auto"] <= max(t["fused"], t["cublas"]) * 1.02, t
    assert t["auto"] <= min(t["fused"], t["cublas"]) * 1.05, t
    assert all(d.source == "timed" for d in c.decisions().values())
    entries = json.loads((clean_env / gs.CACHE_FILE).read_text())["entries"]
    assert len(entries) == 2 and all(set(e["ms"]) == {"fused", "cublas"} for e in entries.values())


@gpu
@needs_cuda
def test_cuda_graph_capture_never_times(clean_env):
    x, w, b, a, bb = lora_inputs((256,), 512, 512, 16, torch.bfloat16, device="cuda",
                                 requires_grad=False)
    with use_chooser(GemmChooser(timer=_never, cache_dir=clean_env)):
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            graph = torch.cuda.CUDAGraph()
            lora_linear(x, w, b, a, bb, scale=1.0, backend="triton", gemm="fused")  # compile
            with torch.cuda.graph(graph):
                y = lora_linear(x, w, b, a, bb, scale=1.0, backend="triton")
        graph.replay()
    torch.testing.assert_close(y, lora_linear(x, w, b, a, bb, scale=1.0, backend="eager"),
                               rtol=2e-2, atol=2e-2)


def test_assume_constant_result_marks_as_torch_does():
    """Our import-time-cheap decorator leaves the function marked exactly as torch.compiler's,
    so dynamo treats the heuristic as a graph constant."""

    def ours():
        return 1

    def theirs():
        return 1

    gs.assume_constant_result(ours)
    torch.compiler.assume_constant_result(theirs)
    assert vars(ours) == vars(theirs) and vars(theirs), vars(theirs)


def test_import_bridge_kernels_does_not_import_dynamo():
    """``import bridge.kernels`` (every op module) stays free of torch._dynamo (~1.6 s of import):
    no module may call torch.compiler.assume_constant_result at import time."""
    import os
    import subprocess
    import sys

    code = ("import sys, bridge.kernels, bridge.kernels.multi_lora_linear, "
            "bridge.kernels.grouped_lora_linear, bridge.kernels.norm_lora; "
            "print('torch._dynamo' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
