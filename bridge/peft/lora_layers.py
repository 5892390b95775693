"""LoRA layers (Megatron-Bridge's ``lora_layers``): ``LoRALinear`` (base + adapter, for any
linear), ``LinearAdapter`` (the scaled low-rank delta for a plain ``nn.Linear``) and
``LoRATopKRouter`` (LoRA on a MoE router's gating logits).

LoRA over a plain ``nn.Linear`` is ``LoRALinear(to_wrap=linear, adapter=LinearAdapter(linear))``:
the base keeps its ``weight`` / ``bias`` keys, the factors are ``adapter.linear_in.weight`` (A)
and ``adapter.linear_out.weight`` (B). State dicts of the earlier folded layout (one module with
``weight``, ``bias``, ``lora_a.weight``, ``lora_b.weight``) load into it, with one deprecation
warning per process.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from bridge.kernels.backend import validate_backend_name
from bridge.peft.adapter_init import check_adapter_hparams, check_lora_dtype, get_init_fn
from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.dropout import adapter_dropout, dropout_p_property
from bridge.peft.errors import PEFTConfigError
from bridge.peft.lora_merge import LoRAMerge
from bridge.peft.tp import acc, base_tp_io

__all__ = ["GEMM_STRATEGIES", "LinearAdapter", "LoRALinear", "LoRATopKRouter",
           "TEFusedLoRALinear", "patch_linear_module", "validate_gemm_strategy"]

# How the fused path runs the big GEMMs: 'fused' (one Triton kernel, low-rank term in its
# accumulator), 'cublas' (cuBLAS GEMM reading the low-rank term in its epilogue), 'auto' (measured).
GEMM_STRATEGIES = ("auto", "fused", "cublas")

_LEGACY_KEYS = {"lora_a.": "adapter.linear_in.", "lora_b.": "adapter.linear_out.",
                "linear_in.": "adapter.linear_in.", "linear_out.": "adapter.linear_out."}
_legacy_warned = False


def validate_gemm_strategy(value: str | None, *, what: str = "kernel_gemm") -> str:
    """Normalise a GEMM strategy name ('auto' for None).

    Raises:
        ValueError: not one of 'auto', 'fused', 'cublas'.
    """
    if value is None:
        return "auto"
    if not isinstance(value, str) or value.lower() not in GEMM_STRATEGIES:
        raise ValueError(f"unknown {what} {value!r}; expected one of "
                         f"{', '.join(repr(s) for s in GEMM_STRATEGIES)}")
    return value.lower()


def _warn_legacy_layout(where: str) -> None:
    global _legacy_warned
    if not _legacy_warned:
        _legacy_warned = True
        warnings.warn(
            f"{where}: loading LoRA weights saved in the deprecated folded LinearAdapter layout "
            "(lora_a.weight / lora_b.weight beside the base weight); they now load as "
            "adapter.linear_in.weight / adapter.linear_out.weight. Save again to write the "
            "current layout (this warning is shown once).", FutureWarning, stacklevel=3)


def upgrade_legacy_key(rest: str, where: str = "LoRALinear") -> str | None:
    """The current name (relative to a LoRALinear over an ``nn.Linear``) of a key of the folded
    layout, e.g. 'lora_a.weight' -> 'adapter.linear_in.weight'; None for any other key."""
    for old, new in _LEGACY_KEYS.items():
        if rest.startswith(old):
            _warn_legacy_layout(where)
            return new + rest[len(old):]
    return None


class LoRALinear(AdapterWrapper):
    """base(x) + adapter(layernorm_output): LoRA beside a Megatron or torch linear.

    Returns what the base returns, less the layernorm output: ``(out, bias)`` (the bias passed
    through for Megatron's bias-dropout-add) or a bare tensor for a bare-tensor base. When the
    backend resolves to a fused kernel (``kernel_backend`` or ``BRIDGE_KERNEL_BACKEND``), the base
    GEMM and the adapter run as one op (its big GEMMs as ``kernel_gemm`` says); otherwise the
    eager module path runs.

    Args:
        to_wrap: the base linear. adapter: a module computing only the adapter's term
            (``ParallelLinearAdapter``, ``LinearAdapter``, or any module of the base's input).
        kernel_backend: 'auto' | 'triton' | 'cuda' | 'eager'.
        kernel_gemm: 'auto' | 'fused' | 'cublas'.

    Raises:
        PEFTConfigError: the adapter shares parameters with the base (its output would hold the
            base's output, added twice), or its in/out features differ from the base's.
    """

    def __init__(self, to_wrap: nn.Module, adapter: nn.Module, kernel_backend: str = "auto",
                 kernel_gemm: str = "auto") -> None:
        super().__init__(to_wrap, adapter)
        shared = {id(p) for p in to_wrap.parameters()} & {id(p) for p in adapter.parameters()}
        if shared:
            raise PEFTConfigError(
                f"the adapter ({type(adapter).__name__}) holds parameters of the base "
                f"({type(to_wrap).__name__}): LoRALinear adds the adapter's output to the base's, "
                "so the adapter must compute only the low-rank term (e.g. "
                "LoRALinear(linear, LinearAdapter(linear)))")
        _check_adapter_sizes(to_wrap, adapter)
        self.kernel_backend = validate_backend_name(kernel_backend, what="kernel_backend")
        self.kernel_gemm = validate_gemm_strategy(kernel_gemm)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        # meta tensors (shape inference, deferred init) take the module path: no kernel runs there
        if self._adapter_enabled and x.device.type != "meta":
            from bridge.peft.fused_forward import fused_lora_forward

            fused = fused_lora_forward(self, x, args, kwargs)
            if fused is not None:
                return fused
        linear_output, bias, layernorm_output = self.base_linear_forward(x, *args, **kwargs)
        if not self._adapter_enabled:
            return self.wrap_output(linear_output, bias)
        scatter_in, gather_out, group = base_tp_io(self.to_wrap, self.adapter)
        adapter_input = layernorm_output.contiguous()
        if scatter_in or gather_out:
            from megatron.core.tensor_parallel import mappings
        if scatter_in:  # row base with input_is_parallel=False: it splits x on K itself
            adapter_input = mappings.scatter_to_tensor_model_parallel_region(adapter_input,
                                                                             group=group)
        adapter_output = self.adapter_forward(self.adapter, adapter_input, *args, **kwargs)
        if gather_out:  # column base with gather_output=True: its output is whole on N
            adapter_output = mappings.gather_from_tensor_model_parallel_region(adapter_output,
                                                                               group=group)
        adapter_output = adapter_output.reshape(linear_output.shape)
        if adapter_output.dtype == linear_output.dtype:
            return self.wrap_output(linear_output + adapter_output, bias)
        # lora_dtype differs: add at the wider precision, return in the base's dtype.
        return self.wrap_output(torch.add(linear_output, adapter_output).to(linear_output.dtype),
                                bias)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight: W + s·B@A (this rank's shard, differentiable in A and B, in W's
        dtype), or the base weight itself while the adapter is switched off."""
        base_weight = self.to_wrap.weight
        if not self._adapter_enabled:
            return base_weight
        adapter = self.adapter
        if getattr(adapter, "activation_name", "identity") != "identity":
            raise NotImplementedError(f"{type(adapter).__name__} with activation "
                                      f"{adapter.activation_name!r} has no effective weight")
        tp_group = getattr(adapter, "tp_group", None) if getattr(adapter, "_megatron", False) \
            else None
        return LoRAMerge().merge(base_weight, adapter.linear_out.weight, adapter.linear_in.weight,
                                 adapter.alpha, adapter.dim, tp_group=tp_group,
                                 scale=getattr(adapter, "scale", None))

    @property
    def bias(self) -> torch.Tensor | None:
        """The base bias."""
        return getattr(self.to_wrap, "bias", None)

    def _upgrade_key(self, rest: str) -> str | None:
        if isinstance(self.adapter, LinearAdapter):
            return upgrade_legacy_key(rest)
        return None


def _base_sizes(base: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a base whose full sizes are certain: nn.Linear, megatron-core's
    Column/RowParallelLinear and bridge's LayerNormColumnParallelLinear (input_size /
    output_size are whole, whatever the TP size); None for anything else."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    names = {c.__name__ for c in type(base).__mro__}
    if names & {"ColumnParallelLinear", "RowParallelLinear", "LayerNormColumnParallelLinear"} \
            and isinstance(getattr(base, "input_size", None), int) \
            and isinstance(getattr(base, "output_size", None), int):
        return base.input_size, base.output_size
    return None


def _check_adapter_sizes(base: nn.Module, adapter: nn.Module) -> None:
    """An adapter that states its sizes (``in_features`` / ``out_features``, as LinearAdapter
    and ParallelLinearAdapter do) must map the base's: else it fails later, in forward, with a
    reshape error."""
    sizes = _base_sizes(base)
    k, n = getattr(adapter, "in_features", None), getattr(adapter, "out_features", None)
    if sizes is None or not isinstance(k, int) or not isinstance(n, int) or (k, n) == sizes:
        return
    raise PEFTConfigError(
        f"the adapter ({type(adapter).__name__}) maps {k} -> {n} features but the base "
        f"({type(base).__name__}) maps {sizes[0]} -> {sizes[1]}: build the adapter from this "
        "base, e.g. LoRALinear(linear, LinearAdapter(linear))")


class TEFusedLoRALinear(LoRALinear):
    """Upstream's LoRA wrapper for ``config.use_transformer_engine_op_fuser`` (TP=1), where TE's
    operation fuser runs the base GEMM and adds the LoRA branch into its output (beta=1).

    Here it is a ``LoRALinear``: this package's fused path already does that fusion (and the
    dropout and norm fusions TE's fuser does not), at every TP size, so ``LoRA`` gives this class
    where upstream does (same ``(to_wrap, adapter)`` constructor, same state dict and
    ``isinstance`` checks) and runs the same kernels as ``LoRALinear``.
    """


class LinearAdapter(nn.Module):
    """The LoRA term for a plain ``nn.Linear``: scale * B(A(dropout(x))), nothing of the base.

    Wrap it with its base: ``LoRALinear(linear, LinearAdapter(linear))``. It exposes what
    ``ParallelLinearAdapter`` does (``linear_in``, ``linear_out``, ``scale``, ``dim``, ``alpha``,
    ``dropout`` / ``dropout_p``, ``dropout_position``, ``activation_name``), so the wrapper's fused
    path takes it.

    Args:
        orig_linear: the base; only its sizes, device and dtype are read (its weights are not
            copied). dim: rank r. alpha: scale numerator (s = alpha / dim).
        dropout, dropout_position: 'pre' (on x) or 'post' (on the LoRA term).
        lora_A_init_method: 'xavier' (Xavier-uniform), 'uniform' / 'kaiming' (Kaiming-uniform,
            a = sqrt 5), 'normal' or 'zero'.
        lora_dtype: dtype of A and B (default: the base weight's).
        lora_B_init_method: init of B (default 'zero', so the model starts as the base).
    """

    activation_name = "identity"
    input_is_parallel = False
    _megatron = False
    dropout_p = dropout_p_property()

    def __init__(self, orig_linear: nn.Linear, dim: int = 8, alpha: float = 32,
                 dropout: float = 0.0, dropout_position: str = "pre",
                 lora_A_init_method: str = "xavier",  # noqa: N803  (Megatron-Bridge's name)
                 lora_dtype: torch.dtype | None = None, *,
                 lora_B_init_method: str = "zero",  # noqa: N803
                 kernel_backend: str | None = None) -> None:
        super().__init__()
        if not isinstance(orig_linear, nn.Linear):
            raise TypeError(f"LinearAdapter wraps an nn.Linear, got {type(orig_linear).__name__}")
        if kernel_backend is not None:
            raise TypeError("LinearAdapter computes only the LoRA term; pass kernel_backend to "
                            "its wrapper: LoRALinear(linear, LinearAdapter(linear), "
                            f"kernel_backend={kernel_backend!r})")
        check_adapter_hparams(dim, alpha, dropout, dropout_position,
                              (lora_A_init_method, lora_B_init_method))
        check_lora_dtype(lora_dtype)
        self.in_features, self.out_features = orig_linear.in_features, orig_linear.out_features
        self.base_linear_name = ""
        w = orig_linear.weight
        self._init_adapter(dim, alpha, dropout, dropout_position, lora_A_init_method,
                           lora_B_init_method, lora_dtype or w.dtype, w.device)
        self._register_load_state_dict_pre_hook(self._accept_folded_names)

    @torch.no_grad()
    def _init_adapter(self, dim, alpha, dropout, dropout_position, a_init, b_init, dtype,
                      device) -> None:
        self.dim, self.alpha = dim, alpha
        self.scale = alpha / dim
        self.linear_in = nn.Linear(self.in_features, dim, bias=False, dtype=dtype, device=device)
        self.linear_out = nn.Linear(dim, self.out_features, bias=False, dtype=dtype,
                                    device=device)
        if a_init == "xavier":  # LinearAdapter's xavier is the uniform one (as upstream's)
            nn.init.xavier_uniform_(self.linear_in.weight)
        elif a_init == "uniform":
            nn.init.kaiming_uniform_(self.linear_in.weight, a=math.sqrt(5))
        else:
            get_init_fn(a_init)(self.linear_in.weight)
        get_init_fn(b_init)(self.linear_out.weight)
        self.dropout = adapter_dropout(dropout)  # dropout_p reads its p (bridge.peft.dropout)
        self.dropout_position = dropout_position

    def _accept_folded_names(self, state_dict, prefix, *args) -> None:
        """Factor keys of the folded layout (lora_a / lora_b) load as linear_in / linear_out."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            for old, new in (("lora_a.", "linear_in."), ("lora_b.", "linear_out.")):
                if rest.startswith(old):
                    _warn_legacy_layout("LinearAdapter")
                    state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The scaled LoRA term [..., N] (in the adapter's dtype) of x [..., K]; extra arguments
        (the base's call arguments) are ignored."""
        del args, kwargs
        if self.dropout_position == "pre":
            x = self.dropout(x)
        # The scale goes on the [..., r] intermediate, not the [..., N] output (linear in it).
        out = self.linear_out(self.linear_in(x.to(self.linear_in.weight.dtype)) * self.scale)
        if self.dropout_position == "post":
            out = self.dropout(out)
        return out

    def delta_weight(self) -> torch.Tensor:
        """s · B @ A [N, K] in fp32 (fp64 for fp64 factors), detached."""
        with torch.no_grad():
            return LoRAMerge.delta(acc(self.linear_out.weight), acc(self.linear_in.weight),
                                   self.scale)


class LoRATopKRouter(AdapterWrapper):
    """LoRA on a megatron-core MoE ``TopKRouter``: logits = gating(x) + s·B(A(x)), then the
    router's own routing (so its jitter, load balancing and score function are unchanged)."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        router = self.to_wrap
        router._maintain_float32_expert_bias()
        jittered = router.apply_input_jitter(x)
        logits = router.gating(jittered)
        if self._adapter_enabled:
            logits = logits + self.adapter(jittered.contiguous()).to(logits.dtype)
        if router.config.moe_router_force_load_balancing:
            from megatron.core.transformer.moe.moe_utils import apply_random_logits

            logits = apply_random_logits(logits)
        return router.routing(logits, *args, **kwargs)


def patch_linear_module(orig_linear: nn.Linear, **kwargs) -> LoRALinear:
    """LoRA on ``orig_linear``: ``LoRALinear(orig_linear, LinearAdapter(orig_linear, **kwargs))``
    (``kernel_backend`` / ``kernel_gemm`` go to the wrapper)."""
    wrapper_kwargs = {k: kwargs.pop(k) for k in ("kernel_backend", "kernel_gemm") if k in kwargs}
    return LoRALinear(orig_linear, LinearAdapter(orig_linear, **kwargs), **wrapper_kwargs)
