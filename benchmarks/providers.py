"""The providers compared on each op, each built from one set of input tensors.

    frozen   the base alone: F.linear (lora_linear) or the norm then F.linear (norm_lora)
    eager    ours, eager: bridge.peft's LoRALinear over LinearAdapter (kernel_backend='eager')
             for lora_linear,
             bridge.kernels.norm_lora_linear(backend='eager') for norm_lora
    peft     Hugging Face PEFT's lora.Linear (injected into a one-layer module), after the norm
    compile  torch.compile of the eager provider
    triton   the fused Triton op (bridge.kernels, backend='triton')
    cuda     the fused CUDA op from bridge._C (norm_lora only)

The fused providers run once per GEMM strategy (``gemm``: fused | cublas | auto, passed to the
op); ``provider(name, gemm)`` returns the provider for one, named ``triton:cublas`` and so on.

A provider's ``probe`` says whether it can run here (and why not); ``build`` returns a ``Runner``
whose ``forward()`` is the training-mode forward. Every provider gets copies of the same tensors,
so outputs are comparable with the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from bridge.kernels import backend as kbackend
from torch import nn

from benchmarks.cases import FUSED, NORM, NORM_EPS, Case, label


@dataclass
class Tensors:
    """Inputs of one case: x [M, K], base weight [N, K] and bias [N], A [r, K], B [N, r], and the
    norm weight [K] (the norm op only)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    norm_weight: torch.Tensor | None
    scale: float

    def to(self, dtype: torch.dtype) -> Tensors:
        cast = lambda t: None if t is None else t.detach().to(dtype)
        return Tensors(cast(self.x), cast(self.weight), cast(self.bias), cast(self.lora_a),
                       cast(self.lora_b), cast(self.norm_weight), self.scale)


def make_tensors(op: str, M: int, K: int, N: int, r: int, scale: float,  # noqa: N803
                 dtype: torch.dtype, device: str, seed: int = 0) -> Tensors:
    """Fresh random inputs (never zeros: a zero B would hide the adapter's contribution), drawn
    on the device (a CPU draw of a 16384x14336 x takes seconds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g, device=device) * std).to(dtype)
    return Tensors(
        x=rnd(M, K), weight=rnd(N, K, std=K**-0.5), bias=rnd(N, std=0.1),
        lora_a=rnd(r, K, std=K**-0.5), lora_b=rnd(N, r, std=r**-0.5),
        norm_weight=(1.0 + rnd(K, std=0.1)) if op == "norm_lora" else None, scale=scale,
    )


@dataclass
class Runner:
    """One provider ready to run: ``forward()`` is the training-mode forward.

    ``slots`` maps the names of ``Tensors`` fields (x, weight, bias, lora_a, lora_b, norm_weight)
    to the tensors the provider actually reads, so ``load`` can swap in new values without a
    rebuild (a rebuild would recompile torch.compile). Gradients are taken w.r.t. x and, for a
    LoRA provider, A and B; every slot but x is a weight (set aside when counting saved bytes).
    """

    forward: Callable[[], torch.Tensor]
    slots: dict[str, torch.Tensor]
    lora: bool = True
    keep: list[object] = field(default_factory=list)  # modules the closures need alive

    @property
    def grad_inputs(self) -> list[torch.Tensor]:
        names = ("x", "lora_a", "lora_b") if self.lora else ("x",)
        return [self.slots[n] for n in names]

    @property
    def params(self) -> list[torch.Tensor]:
        return [t for n, t in self.slots.items() if n != "x"]

    def load(self, t: Tensors) -> None:
        """Copy the values of ``t`` into the provider's tensors (same shapes)."""
        with torch.no_grad():
            for name, dst in self.slots.items():
                dst.copy_(getattr(t, name))


@dataclass(frozen=True)
class Provider:
    name: str
    lora: bool  # False for the frozen base (no adapter: compared with the reference at B = 0)
    probe: Callable[[Case], tuple[bool, str]]
    build: Callable[[Case, Tensors], Runner]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _frozen_linear(t: Tensors) -> nn.Linear:
    m = nn.Linear(t.weight.shape[1], t.weight.shape[0], bias=t.bias is not None,
                  device=t.weight.device, dtype=t.weight.dtype)
    with torch.no_grad():
        m.weight.copy_(t.weight)
        if t.bias is not None:
            m.bias.copy_(t.bias)
    m.requires_grad_(False)
    return m


def _norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if NORM == "RMSNorm":
        return F.rms_norm(x, (x.shape[-1],), w, NORM_EPS)
    return F.layer_norm(x, (x.shape[-1],), w, None, NORM_EPS)


def _always(case: Case) -> tuple[bool, str]:
    return True, ""


# ---- frozen ------------------------------------------------------------------------------------
def _build_frozen(case: Case, t: Tensors) -> Runner:
    slots = _copies(t, ("weight", "bias", "norm_weight"))
    x, w, b, nw = _leaf(t.x), slots["weight"], slots.get("bias"), slots.get("norm_weight")
    if case.op == "norm_lora":
        fwd = lambda: F.linear(_norm(x, nw), w, b)
    else:
        fwd = lambda: F.linear(x, w, b)
    return Runner(fwd, {"x": x, **slots}, lora=False)


def _copies(t: Tensors, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {n: getattr(t, n).detach().clone() for n in names if getattr(t, n) is not None}


# ---- eager (ours) ------------------------------------------------------------------------------
def _build_eager(case: Case, t: Tensors) -> Runner:
    if case.op != "lora_linear":
        return _build_functional(case, t, "eager")
    from bridge.peft.lora_layers import LinearAdapter, LoRALinear

    base = _frozen_linear(t)
    m = LoRALinear(base, LinearAdapter(base, dim=case.r, alpha=t.scale * case.r, dropout=case.p),
                   kernel_backend="eager")
    m.train()
    x = _leaf(t.x)
    slots = {"x": x, "weight": base.weight, "bias": base.bias,
             "lora_a": m.adapter.linear_in.weight, "lora_b": m.adapter.linear_out.weight}
    runner = Runner(lambda: m(x), {k: v for k, v in slots.items() if v is not None}, keep=[m])
    runner.load(t)
    return runner


# ---- fused (and the functional eager of the norm op) -------------------------------------------
def _build_functional(case: Case, t: Tensors, backend: str, gemm: str = "auto") -> Runner:
    from bridge.kernels import lora_linear, norm_lora_linear

    slots = _copies(t, ("weight", "bias", "norm_weight"))
    x, a, bb = _leaf(t.x), _leaf(t.lora_a), _leaf(t.lora_b)
    w, bias, nw = slots["weight"], slots.get("bias"), slots.get("norm_weight")
    if case.op == "lora_linear":
        fwd = lambda: lora_linear(x, w, bias, a, bb, scale=t.scale, dropout=case.p, training=True,
                                  backend=backend, gemm=gemm)
    else:
        fwd = lambda: norm_lora_linear(x, nw, None, w, bias, a, bb, normalization=NORM,
                                       eps=NORM_EPS, scale=t.scale, dropout=case.p, training=True,
                                       backend=backend, gemm=gemm)
    return Runner(fwd, {"x": x, "lora_a": a, "lora_b": bb, **slots})


_OP_NAME = {"lora_linear": "lora_linear", "norm_lora": "norm_lora_row_fwd"}


@functools.cache
def _fused_probe(op: str, backend: str, gemm: str, device: str,
                 dtype: torch.dtype) -> tuple[bool, str]:
    """The backend's own probe, then a smoke call on a tiny shape (a backend still being written
    raises NotImplementedError; one that crashes is reported, not timed)."""
    dev = torch.device(device)
    if backend == "triton":
        ok, reason = kbackend.probe_triton(dev, dtype)
    else:
        ok, reason = kbackend.probe_cuda(dev, dtype, _OP_NAME[op])
    if not ok:
        return False, reason
    case = Case(op, 4, 32, 16, 4, 0.0, dtype, device)
    try:
        y = _build_functional(case, make_tensors(op, 4, 32, 16, 4, 1.0, dtype, device), backend,
                              gemm)
        y.forward()
    except NotImplementedError as exc:
        return False, f"not implemented yet ({exc})"
    except Exception as exc:  # noqa: BLE001  (report any failure as the reason it was not timed)
        return False, f"smoke call failed: {type(exc).__name__}: {exc}"
    return True, ""


def _probe_fused(backend: str, gemm: str = "auto") -> Callable[[Case], tuple[bool, str]]:
    def probe(case: Case) -> tuple[bool, str]:
        if backend == "cuda" and case.op == "lora_linear":
            return False, "no CUDA C++ kernel for lora_linear (Triton only)"
        ok, reason = _fused_probe(case.op, backend, gemm, case.device, case.dtype)
        if not ok and backend == "triton" and reason == "no GPU":
            reason = ("no GPU: Triton runs only under TRITON_INTERPRET=1 here, for correctness "
                      "and saved bytes (rows marked 'interpreted: not timed')")
        return ok, reason
    return probe


# ---- Hugging Face PEFT -------------------------------------------------------------------------
def _probe_peft(case: Case) -> tuple[bool, str]:
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        return False, f"peft is not installed ({exc})"
    return True, ""


class _OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _build_peft(case: Case, t: Tensors) -> Runner:
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=case.r, lora_alpha=t.scale * case.r, lora_dropout=case.p,
                     target_modules=["linear"], bias="none")
    model = inject_adapter_in_model(cfg, _OneLinear(_frozen_linear(t)))
    layer = model.linear
    # PEFT may keep adapters in fp32 for a bf16 base; compare like with like: the model dtype.
    la, lb = layer.lora_A["default"], layer.lora_B["default"]
    la.to(t.weight.dtype)
    lb.to(t.weight.dtype)
    if abs(layer.scaling["default"] - t.scale) > 1e-12:
        raise AssertionError(f"PEFT scaling {layer.scaling['default']} != {t.scale}")
    model.train()
    x = _leaf(t.x)
    slots = {"x": x, "weight": layer.base_layer.weight, "bias": layer.base_layer.bias,
             "lora_a": la.weight, "lora_b": lb.weight}
    if case.op == "norm_lora":
        nw = slots["norm_weight"] = t.norm_weight.detach().clone()
        fwd = lambda: model(_norm(x, nw))
    else:
        fwd = lambda: model(x)
    runner = Runner(fwd, {k: v for k, v in slots.items() if v is not None}, keep=[model])
    runner.load(t)
    return runner


# ---- torch.compile of the eager provider -------------------------------------------------------
def _build_compile(case: Case, t: Tensors) -> Runner:
    torch._dynamo.reset()  # a fresh cache per case: no silent eager fallback at the recompile limit
    eager = _build_eager(case, t)
    compiled = torch.compile(eager.forward, dynamic=False)
    return Runner(compiled, eager.slots, keep=eager.keep + [compiled])


def _probe_compile(case: Case) -> tuple[bool, str]:
    if case.device == "cpu":
        import shutil

        if shutil.which("g++") is None and shutil.which("c++") is None:
            return False, "torch.compile on the CPU needs a C++ compiler (none found)"
    return True, ""


PROVIDERS: dict[str, Provider] = {
    "frozen": Provider("frozen", False, _always, _build_frozen),
    "eager": Provider("eager", True, _always, _build_eager),
    "peft": Provider("peft", True, _probe_peft, _build_peft),
    "compile": Provider("compile", True, _probe_compile, _build_compile),
    "triton": Provider("triton", True, _probe_fused("triton"),
                       lambda c, t: _build_functional(c, t, "triton")),
    "cuda": Provider("cuda", True, _probe_fused("cuda"),
                     lambda c, t: _build_functional(c, t, "cuda")),
}


def provider(name: str, gemm: str = "") -> Provider:
    """The provider ``name``; a fused one with GEMM strategy ``gemm`` (named ``name:gemm``)."""
    if name not in FUSED or not gemm:
        return PROVIDERS[name]
    return Provider(label(name, gemm), True, _probe_fused(name, gemm),
                    lambda c, t: _build_functional(c, t, name, gemm))
