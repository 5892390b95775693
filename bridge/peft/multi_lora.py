"""The multi-adapter LoRA transform (Megatron-Bridge's ``MultiLoRA``): ``n_adapters`` LoRA slots on
each matched linear, trained in one batch; the slots' state (rank, alpha, weights, routing) lives
on the layers and is managed by the functions of bridge/peft/multi_lora_layers.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from bridge.kernels.backend import validate_backend_name
from bridge.peft.adapter_init import check_adapter_hparams, check_lora_dtype
from bridge.peft.base import PEFT
from bridge.peft.errors import PEFTConfigError, UnsupportedOptionError
from bridge.peft.lora_layers import validate_gemm_strategy
from bridge.peft.module_matcher import DEFAULT_TARGETS, ModuleMatcher
from bridge.peft.multi_lora_layers import (
    MultiLoRAGroupedExpertLinear,
    MultiLoRALinear,
    install_moe_slot_routing,
)
from bridge.peft.utils import is_expert_linear, is_grouped_expert_linear, is_linear_like

logger = logging.getLogger(__name__)

__all__ = ["MultiLoRA"]

# The "sequential expert linears are skipped" warning fires once per process (upstream's flag).
_EXPERT_SKIP_WARNED = False
_UNSUPPORTED_MOE = ("normalize_moe_lora", "share_expert_adapters", "experts_shared_outer_loras")


def _topk_router() -> type | None:
    """megatron-core's TopKRouter (None without megatron), imported on first use and kept as
    this module's name ``TopKRouter`` (upstream's), so importing bridge.peft stays light."""
    g = globals()
    if "TopKRouter" not in g:
        try:
            from megatron.core.transformer.moe.router import TopKRouter
        except ImportError:  # megatron-core is optional
            TopKRouter = None  # noqa: N806
        g.setdefault("TopKRouter", TopKRouter)
    return g["TopKRouter"]


def __getattr__(name: str):
    if name == "TopKRouter":
        return _topk_router()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class MultiLoRA(PEFT, ModuleMatcher):
    """Multi-adapter LoRA: every matched linear gets ``n_adapters`` LoRA slots at rank ``dim``.

    Args:
        target_modules: names or ``*`` patterns (default: the four transformer linears).
        n_adapters: slots per layer. dim: the max rank (each slot's rank is set, <= dim, by
            ``init_adapter_slot``). alpha: the adapters' construction alpha.
        dropout, dropout_position: adapter dropout, 'pre' | 'post' (applied: upstream refuses
            dropout > 0; here both paths apply kernels/philox.py's mask).
        lora_A_init_method, lora_B_init_method: init of A and B.
        a2a_experimental: row bases under sequence parallelism use one all-to-all.
        lora_dtype: dtype of the slots (default: the base's params dtype).
        normalize_moe_lora, share_expert_adapters, experts_shared_outer_loras: accepted so a
            LoRA config carries over, refused when true (every slot shares one max-rank buffer
            and a per-expert layout; upstream refuses them too).
        kernel_backend: 'auto' | 'triton' | 'eager' (bridge.kernels.backend; the fused
            multi-adapter op is Triton). kernel_gemm: 'auto' | 'fused' | 'cublas'.

    Sequential MoE expert linears (``...experts.local_experts.<e>.linear_fc*``) are skipped with
    one warning; grouped expert linears get ``MultiLoRAGroupedExpertLinear``; routers are left
    alone.
    """

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    n_adapters: int = 2
    dim: int = 32
    alpha: int = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    a2a_experimental: bool = False
    lora_dtype: torch.dtype | None = None
    normalize_moe_lora: bool = False
    share_expert_adapters: bool = False
    experts_shared_outer_loras: bool = False
    kernel_backend: str = "auto"
    kernel_gemm: str = "auto"

    def __post_init__(self) -> None:
        ModuleMatcher.__post_init__(self)
        if isinstance(self.n_adapters, bool) or not isinstance(self.n_adapters, int) \
                or self.n_adapters < 1:
            raise PEFTConfigError(f"n_adapters must be a positive int, got {self.n_adapters!r}")
        check_adapter_hparams(self.dim, self.alpha, self.dropout, self.dropout_position,
                              (self.lora_A_init_method, self.lora_B_init_method))
        check_lora_dtype(self.lora_dtype)
        self.kernel_backend = validate_backend_name(self.kernel_backend, what="kernel_backend")
        self.kernel_gemm = validate_gemm_strategy(self.kernel_gemm)

    def __call__(self, model, training: bool = True, *, replace: bool = False):
        """Apply the slots, then install the MoE slot routing of wrapped grouped experts
        (``replace``: as ``PEFT.__call__``).

        Raises:
            UnsupportedOptionError: (a NotImplementedError and ValueError) an MoE expert option
                that changes the adapter layout is on.
        """
        for name in _UNSUPPORTED_MOE:
            if getattr(self, name):
                raise UnsupportedOptionError(
                    f"MultiLoRA does not support {name}=True: every adapter slot shares one "
                    "max-rank buffer with the per-expert layout (an expert-specific rank or a "
                    f"shared expert adapter would break it); set {name}=False")
        model = super().__call__(model, training=training, replace=replace)
        hooked = install_moe_slot_routing(model)
        if hooked:
            logger.info("Installed multi-LoRA MoE slot routing on %d MoE layer(s)", hooked)
        return model

    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None):
        """Wrap a matched linear in ``MultiLoRALinear`` (idempotent: a wrapped one stays)."""
        if isinstance(module, MultiLoRALinear):
            return self.keep_wrapped(module, self.match(module, name, prefix))
        ans = self.match(module, name, prefix)
        if ans is None:
            return module
        pattern, full_name = ans
        if "*" in pattern and name != pattern and not is_linear_like(module):
            return module  # a wildcard also matches containers: those are walked into
        common = dict(n_adapters=self.n_adapters, dim=self.dim, alpha=self.alpha,
                      full_name=full_name, column_init_method=self.lora_A_init_method,
                      row_init_method=self.lora_B_init_method, dropout=self.dropout,
                      dropout_position=self.dropout_position)
        if is_expert_linear(full_name):
            if not is_grouped_expert_linear(full_name):
                # SequentialMLP's per-expert linears see their routed rows in dispatcher order,
                # which neither the dense per-slot spans nor the grouped routing segment.
                global _EXPERT_SKIP_WARNED
                if not _EXPERT_SKIP_WARNED:
                    logger.warning(
                        "MultiLoRA does not support sequential MoE expert linears; skipping them "
                        "(e.g. %s). Use grouped experts (moe_grouped_gemm=True) to put adapter "
                        "slots on experts.", full_name)
                    _EXPERT_SKIP_WARNED = True
                return module
            logger.info("Adding multi-LoRA (%d adapters) to expert %s", self.n_adapters,
                        full_name)
            return MultiLoRAGroupedExpertLinear(to_wrap=module, num_local_experts=module.num_gemms,
                                                **common)
        router = _topk_router()
        if router is not None and isinstance(module, router):
            return module
        logger.info("Adding multi-LoRA (%d adapters) to %s", self.n_adapters, full_name)
        return MultiLoRALinear(to_wrap=module, a2a_experimental=self.a2a_experimental,
                               kernel_backend=self.kernel_backend, kernel_gemm=self.kernel_gemm,
                               lora_dtype=self.lora_dtype, **common)

    def adapter_key_filter(self, key) -> bool:
        """Whether a state-dict key (or a ``(name, tensor)`` pair) belongs to the adapter
        checkpoint: every slot (``.adapters.``), an exposed one (``.adapter.``), upstream's
        stacked names (``.weight_A.`` / ``.weight_B.``), trainable tensors."""
        if isinstance(key, tuple):
            return super().adapter_key_filter(key)
        key = str(key)
        return ".adapters." in key or ".weight_A." in key or ".weight_B." in key \
            or super().adapter_key_filter(key)

    # ---- a second application (bridge/peft/base.py's protocol, for multi-slot layers) ---------
    def wrapped_mismatch(self, wrapper: nn.Module, match) -> str | None:
        """How an existing wrapper differs from the MultiLoRALinear this transform would make
        (kind, slots, max rank, alpha, lora_dtype when given), or None when it is the same."""
        if not isinstance(wrapper, MultiLoRALinear):
            return (f"has {type(wrapper).__name__}, {type(self).__name__} here makes "
                    "MultiLoRALinear")
        slot = wrapper._slot_modules()[0]
        dtype = slot.linear_in.weight.dtype
        have = (f"{type(wrapper).__name__}(n_adapters={wrapper.n_adapters}, "
                f"dim={wrapper.max_rank}, alpha={float(slot.alpha):g}, dtype={dtype})")
        want = (f"MultiLoRALinear(n_adapters={self.n_adapters}, dim={self.dim}, "
                f"alpha={float(self.alpha):g}"
                + (f", dtype={self.lora_dtype})" if self.lora_dtype is not None else ")"))
        same = (wrapper.n_adapters, wrapper.max_rank, float(slot.alpha)) == \
            (self.n_adapters, self.dim, float(self.alpha)) and \
            (self.lora_dtype is None or dtype == self.lora_dtype)
        return None if same else f"has {have}, {type(self).__name__} here makes {want}"

    def _update_runtime_settings(self, wrapper: nn.Module) -> None:
        """A kept MultiLoRALinear's kernel settings and its slots' dropout follow this
        transform (no weights involved)."""
        if not isinstance(wrapper, MultiLoRALinear) or "adapters" not in wrapper._modules:
            return
        from bridge.peft.multi_lora_forward import forget_multi_lora_plan
        from bridge.peft.multi_lora_moe import MultiLoRAGroupedExpertLinear as Grouped

        changed = []
        if not isinstance(wrapper, Grouped):  # the grouped layer always runs eager
            for attr in ("kernel_backend", "kernel_gemm"):
                if getattr(wrapper, attr) != getattr(self, attr):
                    setattr(wrapper, attr, getattr(self, attr))
                    changed.append(f"{attr}={getattr(self, attr)!r}")
        for slot in wrapper.adapters:
            if slot.dropout_p != float(self.dropout):
                slot.dropout_p = float(self.dropout)
                changed.append(f"dropout={float(self.dropout)}")
            if slot.dropout_position != self.dropout_position:
                slot.dropout_position = self.dropout_position
                changed.append(f"dropout_position={self.dropout_position!r}")
        if changed:
            forget_multi_lora_plan(wrapper)
            logger.info("%s: %s kept, now %s", type(self).__name__, type(wrapper).__name__,
                        ", ".join(sorted(set(changed))))
