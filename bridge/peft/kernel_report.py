"""Which path each adapter-wrapped module's next training forward takes, and why.

``kernel_report(model)`` lists every adapter wrapper (``LoRALinear``, ``DoRALinear``, canonical
LoRA's split wrappers, ``LoRATopKRouter``, ...) with its base class, the adapter kind, the path
(``fused`` with its backend and GEMM strategy, or ``eager``) and the reason for any fallback; a
wrapper with a ``training_plan()`` method (``(plan, source)``, the plan with ``backend``, ``kind``,
``gemm``, ``reason``) describes itself. It works before any forward ran: a LoRA wrapper's plan
(bridge.peft.fused_forward) is the one its last training call made, when nothing it depends on has
changed since, else one made now for a representative input (a row of the base weight's dtype and
device), without running a kernel, timing a GEMM or communicating. The GEMM strategy of ``auto`` is
read from what the chooser (bridge.kernels.gemm_strategy) decided for the module's shapes; before
that, the rule it will apply.

    >>> print(kernel_report(model))          # a table
    >>> kernel_summary(model)                 # 'LoRA: 96 modules, 96 fused (triton), 0 eager'
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["KernelReport", "KernelReportRow", "kernel_report", "kernel_summary"]

_ADAPTER_KINDS = {"LoRALinear": "LoRA", "DoRALinear": "DoRA", "LoRATopKRouter": "LoRA (router)",
                  "MultiLoRALinear": "MultiLoRA", "ExpertLoRALinear": "LoRA (expert)",
                  "LoRALinearSplitQKV": "canonical LoRA (q, k, v)",
                  "LoRALinearSplitFC1UpGate": "canonical LoRA (up, gate)"}
_NO_FUSED_PATH = {
    "DoRALinear": "DoRA has no fused kernel (its weight-norm rescaling runs eager)",
    "LoRATopKRouter": "router LoRA runs eager (the router's own gating and routing)",
    "LoRALinearSplitQKV": "canonical LoRA's separate q/k/v adapters run eager",
    "LoRALinearSplitFC1UpGate": "canonical LoRA's separate up/gate adapters run eager",
}


@dataclass(frozen=True)
class KernelReportRow:
    """One adapter-wrapped module.

    Attributes:
        name: the module's name in the model (``chunk<i>.`` in front for a list of chunks).
        base: the wrapped base's class name (e.g. ``TERowParallelLinear``).
        adapter: the adapter kind (``LoRA``, ``DoRA``, ``canonical LoRA (q, k, v)``, ...).
        path: ``fused`` | ``eager`` | ``off`` (adapter switched off or merged: the base alone)
            | ``error`` (the next training forward raises; ``reason`` says what).
        backend: ``cuda`` | ``triton`` for a fused path, ``eager`` otherwise.
        gemm: the big GEMMs' strategy on the fused path: ``fused`` | ``cublas``, ``auto -> x``
            for what auto chose (or will), ``""`` off the fused path.
        layout: how the fused op is called: ``column`` | ``row`` | ``norm`` | ``linear`` |
            ``duplicated`` (``""`` off it).
        reason: why the path is eager (or what fell back on the way), ``""`` when nothing did.
        source: ``last forward`` (the plan its last training call made) or ``planned``.
    """

    name: str
    base: str
    adapter: str
    path: str
    backend: str
    gemm: str
    layout: str
    reason: str
    source: str


class KernelReport(list):
    """A list of :class:`KernelReportRow`; ``str()`` is a table, :meth:`summary` one line."""

    def __init__(self, rows=(), label: str = "LoRA") -> None:
        super().__init__(rows)
        self.label = label

    def table(self, width: int = 72) -> str:
        """The rows as an aligned text table (reasons cut at ``width`` characters)."""
        cols = ("name", "base", "adapter", "path", "backend", "gemm", "reason")
        cells = [[_cut(str(getattr(r, c)), width if c == "reason" else 200) for c in cols]
                 for r in self]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True))  # noqa: E731
        return "\n".join([line(cols), line("-" * w for w in widths)] +
                         [line(row).rstrip() for row in cells])

    def summary(self) -> str:
        """``'<label>: N modules, F fused (backends), E eager (reasons)'``."""
        return _summary(self, self.label)

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _chunks(model) -> list[nn.Module]:
    if isinstance(model, nn.Module):
        return [model]
    if isinstance(model, (list, tuple)) and all(isinstance(m, nn.Module) for m in model):
        return list(model)
    raise TypeError(f"kernel_report takes an nn.Module or a list of model chunks, got "
                    f"{type(model).__name__}")


def kernel_report(model, label: str = "LoRA") -> KernelReport:
    """The path of every adapter-wrapped module's next training forward (see the module doc).

    Args:
        model: an ``nn.Module`` or a list of model chunks (pipeline stages, virtual chunks).
        label: the name the summary line starts with (``LoRA``, ``DoRA``, ...).

    Returns:
        A :class:`KernelReport` (a list of :class:`KernelReportRow`, in module order).
    """
    from bridge.peft.adapter_wrapper import AdapterWrapper

    chunks = _chunks(model)
    rows = []
    for i, chunk in enumerate(chunks):
        prefix = f"chunk{i}." if len(chunks) > 1 else ""
        for name, module in chunk.named_modules():
            if isinstance(module, AdapterWrapper):
                rows.append(_row(prefix + name, module))
    return KernelReport(rows, label)


def kernel_summary(model, label: str = "LoRA") -> str:
    """One line for logs, e.g. ``'LoRA: 96 modules, 96 fused (triton), 0 eager'``; ``model``
    may also be a :class:`KernelReport` already made."""
    report = model if isinstance(model, KernelReport) else kernel_report(model, label)
    return _summary(report, label)


def _summary(rows, label: str) -> str:
    paths = Counter(r.path for r in rows)
    fused = Counter(r.backend for r in rows if r.path == "fused")
    eager = Counter(r.reason for r in rows if r.path == "eager")
    text = f"{label}: {len(rows)} modules, {paths['fused']} fused"
    if fused:
        text += " (" + ", ".join(b if len(fused) == 1 else f"{n} {b}"
                                 for b, n in fused.most_common()) + ")"
    text += f", {paths['eager']} eager"
    if eager:
        shown = [f"{n}: {_cut(why, 60)}" if len(eager) > 1 else _cut(why, 80)
                 for why, n in eager.most_common(2)]
        more = f"; {len(eager) - 2} more reasons" if len(eager) > 2 else ""
        text += " (" + "; ".join(shown) + more + ")"
    for path in ("off", "error"):
        if paths[path]:
            text += f", {paths[path]} {path}"
    return text


def _row(name: str, wrapper: nn.Module) -> KernelReportRow:
    kind = type(wrapper).__name__
    base = wrapper.to_wrap
    adapter = _ADAPTER_KINDS.get(kind, kind)
    common = dict(name=name, base=type(base).__name__, adapter=adapter)
    if not getattr(wrapper, "_adapter_enabled", True):
        why = "merged into the base weight (merge_lora)" if getattr(wrapper, "_lora_merged",
                                                                    False) else \
            "adapter switched off (disable_adapter_layers): the base runs alone"
        return KernelReportRow(**common, path="off", backend="eager", gemm="", layout="",
                               reason=why, source="")
    from bridge.peft.lora_layers import LoRALinear

    planner = getattr(wrapper, "training_plan", None)  # wrappers may plan themselves
    lora = not callable(planner) and isinstance(wrapper, LoRALinear) and kind not in _NO_FUSED_PATH
    if not lora and not callable(planner):
        why = _NO_FUSED_PATH.get(kind, f"{kind} has no fused path")
        return KernelReportRow(**common, path="eager", backend="eager", gemm="", layout="",
                               reason=why, source="")
    if lora:
        from bridge.peft.fused_forward import training_plan

        planner = functools.partial(training_plan, wrapper)
    try:
        plan, source = planner()
    except Exception as exc:  # noqa: BLE001  (the next training forward raises this: say so)
        return KernelReportRow(**common, path="error", backend="", gemm="", layout="",
                               reason=f"{type(exc).__name__}: {exc}", source="planned")
    if getattr(plan, "path", None) == "eager" or plan.backend == "eager":
        return KernelReportRow(**common, path="eager", backend="eager", gemm="", layout="",
                               reason=plan.reason, source=source)
    gemm = _gemm(wrapper, plan) if lora else plan.gemm
    return KernelReportRow(**common, path="fused", backend=plan.backend, gemm=gemm,
                           layout=plan.kind or "", reason=plan.reason, source=source)


def _gemm(wrapper: nn.Module, plan) -> str:
    """The strategy: as requested, or for ``auto`` what the chooser decided for this module's
    GEMM shapes (every M bucket seen), else the rule it applies before timing."""
    if plan.gemm != "auto":
        return plan.gemm
    from bridge.kernels import gemm_strategy
    from bridge.kernels._triton_common import current_arch

    weight, adapter = wrapper.to_wrap.weight, wrapper.adapter
    n, k = weight.shape
    r = int(getattr(adapter, "dim", 0) or adapter.linear_in.weight.shape[0])
    op = "norm_lora" if plan.kind == "norm" else "lora_linear"
    probe = gemm_strategy.make_key(op, "fwd", weight.device, weight.dtype, 1, n, k, r, "none",
                                   False)
    same = lambda key: (key.op, key.device, key.dtype, key.n, key.k, key.r_bucket) == (  # noqa: E731
        probe.op, probe.device, probe.dtype, probe.n, probe.k, probe.r_bucket)
    chosen = sorted({d.choice for key, d in gemm_strategy.chooser().decisions().items()
                     if same(key)})
    if chosen:
        return "auto -> " + "/".join(chosen)
    rule = gemm_strategy.heuristic(current_arch(weight.device), n, k)
    can_time = weight.device.type == "cuda" and gemm_strategy.tuning_enabled() and \
        torch.cuda.is_available()
    return f"auto -> timed at the first call (untimed rule: {rule})" if can_time else \
        f"auto -> {rule}"
