"""Host time per call of a LoRA layer (CPU, tiny shapes, where host time is all there is).

On a GPU the host must stay ahead of the kernels: a model calls each LoRA module four times per
layer and micro-batch. This measures one training-mode forward (x requires grad, so autograd
records the graph) of a LoRA layer over megatron's ``ColumnParallelLinear`` at TP=1:

    frozen            the base alone
    eager             ours, the eager module path (kernel_backend='eager')
    fused:<gemm>      ours, the fused path (kernel_backend='triton' under TRITON_INTERPRET=1)
                      per GEMM strategy (auto: the chooser's lookup, then the CPU rule: fused),
                      with the kernel time taken out: the Triton launchers are replaced by
                      stubs that only allocate their outputs (the interpreter would run the
                      kernels in Python; a GPU launches them asynchronously). torch's addmm
                      stays in for cublas (an 8-row GEMM).
    megatron-bridge   Megatron-Bridge's own LoRA on the same base, when it is installed

    python -m benchmarks.host [--out rows.json]     # run with TRITON_INTERPRET=1

The providers take turns (rounds of back-to-back calls); each figure is the least-disturbed
round, p20/p80 of the rounds say how noisy shared cores were.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

M, K, N, R = 8, 64, 64, 8  # tiny: kernels or GEMMs would otherwise dominate
PROVIDERS = ("frozen", "eager", "fused:fused", "fused:cublas", "fused:auto", "megatron-bridge")
LAUNCHERS = ("launch_shrink", "launch_fused_gemm", "launch_dx", "launch_expand", "launch_dsdb",
             "launch_da")
MODULES = ("bridge.kernels.lora_linear", "bridge.kernels.norm_lora",
           "bridge.kernels.gemm_strategy")


def _stub(name: str) -> Callable:
    """A launcher that only allocates what the real one returns (2-D in, 2-D out)."""
    def shrink(x2d, lora_a, **_):
        return torch.empty((x2d.shape[0], lora_a.shape[0]), dtype=torch.float32)

    def fused_gemm(x2d, weight, *a, **_):
        return torch.empty((x2d.shape[0], weight.shape[0]), dtype=x2d.dtype)

    def expand(l_mat, factor, alpha, *, out_dtype, transpose=False, **_):
        return torch.empty((l_mat.shape[0], factor.shape[1] if transpose else factor.shape[0]),
                           dtype=out_dtype)

    def dx(dy2d, weight, ds, lora_a, *, out_dtype=None, **_):
        return torch.empty((dy2d.shape[0], weight.shape[1]), dtype=out_dtype or dy2d.dtype)

    def dsdb(dy2d, lora_b, s_mat, scale, **_):
        return torch.empty((dy2d.shape[0], lora_b.shape[1])), torch.empty_like(lora_b)

    def da(ds, x2d, *, out_dtype=None, **_):
        return torch.empty((ds.shape[1], x2d.shape[1]), dtype=out_dtype or x2d.dtype)

    return {"launch_shrink": shrink, "launch_fused_gemm": fused_gemm, "launch_expand": expand,
            "launch_dx": dx, "launch_dsdb": dsdb, "launch_da": da}[name]


@contextlib.contextmanager
def kernels_stubbed() -> Iterator[None]:
    """Replace the Triton launchers, in the modules that call them, by allocating stubs."""
    saved = []
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in LAUNCHERS:
            if hasattr(mod, name):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, _stub(name))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _base():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from tests.megatron_utils import make_config

    torch.manual_seed(0)
    return ColumnParallelLinear(K, N, config=make_config(hidden_size=K), init_method=nn.init.normal_,
                                bias=True, gather_output=False)


def _ours(backend: str, gemm: str):
    from bridge.peft.lora import LoRA

    model = nn.Module()
    model.proj = _base()
    LoRA(target_modules=["proj"], dim=R, kernel_backend=backend)(model)
    model.proj.kernel_gemm = gemm  # what LoRA(kernel_gemm=...) sets
    return model.proj


def _megatron_bridge():
    """Megatron-Bridge's LoRA on the same base, or the reason it cannot be built here."""
    try:
        from megatron.bridge.peft.lora import LoRA as MBLoRA
    except ImportError as exc:
        return None, f"megatron-bridge is not installed ({exc}); pip install megatron-bridge"
    model = nn.Module()
    model.proj = _base()
    try:
        MBLoRA(target_modules=["proj"], dim=R)(model, training=True)
    except Exception as exc:  # noqa: BLE001  (an incompatible version: say so, do not fail)
        return None, f"Megatron-Bridge's LoRA failed on ColumnParallelLinear: {exc}"
    return model.proj, ""


def _row(provider: str) -> dict:
    return {"op": "lora_linear", "provider": provider.split(":")[0], "mode": "host", "M": M,
            "K": K, "N": N, "r": R, "p": 0.0, "dtype": "float32",
            "gemm": provider.split(":")[1] if ":" in provider else None, "host_us": None,
            "note": ""}


def _build(provider: str):
    """(layer, "") or (None, why it cannot run here)."""
    if provider == "frozen":
        return _base(), ""
    if provider == "eager":
        return _ours("eager", "auto"), ""
    if provider.startswith("fused:"):
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return None, "needs TRITON_INTERPRET=1 (the fused path on the CPU)"
        return _ours("triton", provider.split(":")[1]), ""
    return _megatron_bridge()


def measure(providers: tuple[str, ...] = PROVIDERS, rounds: int = 25,
            calls: int = 200) -> list[dict]:
    """One row per provider: host microseconds per training forward. The providers take turns,
    ``rounds`` times ``calls`` back-to-back calls each (turns cancel the drift of shared
    cores); ``host_us`` is the least-disturbed round (host time is a floor: on shared cores
    the median measures the neighbours), p20/p80 of the rounds show the spread."""
    from bridge.kernels._timing import summarize

    rows, layers = {}, {}
    for prov in providers:
        rows[prov] = _row(prov)
        layer, why = _build(prov)
        if layer is None:
            rows[prov]["note"] = f"skipped: {why}"
        else:
            layers[prov] = layer
            if prov.startswith("fused:"):
                rows[prov]["note"] = "kernel time taken out (launchers stubbed)"
    x = torch.randn(M, 1, K, requires_grad=True)
    times: dict[str, list[float]] = {prov: [] for prov in layers}
    with kernels_stubbed():
        for layer in layers.values():  # warm up: plans, autograd, the allocator
            for _ in range(20):
                layer(x)
        for _ in range(rounds):
            for prov, layer in layers.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                times[prov].append((time.perf_counter() - t0) / calls * 1e3)
    for prov, ms in times.items():
        t = summarize(ms)
        rows[prov].update(host_us=min(ms) * 1e3, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                          rounds=t.reps)
    return list(rows.values())


def run() -> list[dict]:
    """Initialise megatron at TP=1 on gloo (with the tests' CPU shims) and measure."""
    import tempfile

    from tests.conftest import install_megatron_cpu_shims
    from tests.megatron_utils import destroy_parallel, init_parallel

    install_megatron_cpu_shims()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        init_parallel(rank=0, world_size=1, tp=1, init_file=os.path.join(tmp, "dist_init"))
        try:
            return measure()
        finally:
            destroy_parallel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = run()
    for r in rows:
        fig = f"{r['host_us']:8.1f} us" if r.get("host_us") is not None else r["note"]
        label = r["provider"] + (f":{r['gemm']}" if r.get("gemm") else "")
        print(f"host_us {label:<18} {fig}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
