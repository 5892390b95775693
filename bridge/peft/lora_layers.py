"""LoRA layers: ``LoRALinear`` (an AdapterWrapper over a Megatron or torch linear) and
``LinearAdapter`` (LoRA folded into a plain ``nn.Linear``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bridge.kernels.backend import resolve_backend, validate_backend_name
from bridge.peft.adapter_wrapper import AdapterSwitch, AdapterWrapper
from bridge.peft.parallel_linear_adapter import check_adapter_hparams, get_init_fn

__all__ = ["LinearAdapter", "LoRALinear", "patch_linear_module"]


class LoRALinear(AdapterWrapper):
    """base(x) + adapter(layernorm_output): LoRA beside a Megatron or torch linear.

    Returns what the base returns, less the layernorm output: ``(out, bias)`` (the bias passed
    through for Megatron's bias-dropout-add) or a bare tensor for a bare-tensor base. When the
    backend resolves to a fused kernel (``kernel_backend`` or ``BRIDGE_KERNEL_BACKEND``), the base
    GEMM and the adapter run as one op; otherwise the eager module path runs.
    """

    def __init__(self, to_wrap: nn.Module, adapter: nn.Module, kernel_backend: str = "auto"):
        super().__init__(to_wrap, adapter)
        self.kernel_backend = validate_backend_name(kernel_backend, what="kernel_backend")

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self._adapter_enabled:
            from bridge.peft.fused_forward import fused_lora_forward

            fused = fused_lora_forward(self, x, args, kwargs)
            if fused is not None:
                return fused
        linear_output, bias, layernorm_output = self.base_linear_forward(x, *args, **kwargs)
        if not self._adapter_enabled:
            return self.wrap_output(linear_output, bias)
        scatter_in, gather_out, group = _base_tp_io(self.to_wrap, self.adapter)
        adapter_input = layernorm_output.contiguous()
        if scatter_in or gather_out:
            from megatron.core.tensor_parallel import mappings
        if scatter_in:  # row base with input_is_parallel=False: it splits x on K itself
            adapter_input = mappings.scatter_to_tensor_model_parallel_region(adapter_input,
                                                                             group=group)
        adapter_output = self.adapter(adapter_input)
        if gather_out:  # column base with gather_output=True: its output is whole on N
            adapter_output = mappings.gather_from_tensor_model_parallel_region(adapter_output,
                                                                               group=group)
        adapter_output = adapter_output.reshape(linear_output.shape)
        return self.wrap_output(linear_output + adapter_output, bias)

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight W + s·B@A (this rank's shard; detached), in W's dtype."""
        w = self.to_wrap.weight
        a = self.adapter.linear_in.weight.detach().float()
        b = self.adapter.linear_out.weight.detach().float()
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
            raise RuntimeError(
                f"merged weight of a tensor-parallel LoRA needs the gathered factors: W shard "
                f"{tuple(w.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}; "
                "use bridge.peft.lora_merge for TP > 1"
            )
        return (w.detach().float() + self.adapter.scale * (b @ a)).to(w.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base bias."""
        return getattr(self.to_wrap, "bias", None)


def _base_tp_io(base: nn.Module, adapter: nn.Module) -> tuple[bool, bool, object]:
    """(scatter the adapter's input on K?, gather its output on N?, TP group) for the base's own
    communication that the adapter layout leaves out: a megatron row base with
    ``input_is_parallel=False`` takes x whole, a column base with ``gather_output=True`` returns
    y whole (both only at TP > 1)."""
    if not getattr(adapter, "_megatron", False):
        return False, False, None
    group = getattr(base, "tp_group", None)
    if group is None or torch.distributed.get_world_size(group) == 1:
        return False, False, None
    scatter_in = adapter.input_is_parallel and not getattr(base, "input_is_parallel", True)
    gather_out = not adapter.input_is_parallel and bool(getattr(base, "gather_output", False))
    return scatter_in, gather_out, group


class LinearAdapter(AdapterSwitch, nn.Linear):
    """LoRA folded into an ``nn.Linear``: y = x W^T + b + scale * B(A(dropout(x))).

    The base weight and bias are copied from ``orig_linear`` and frozen; ``lora_a`` ([r, K]) and
    ``lora_b`` ([N, r]) are the trainable factors. The fused kernel runs when ``kernel_backend``
    resolves to one; otherwise the eager path below.
    """

    def __init__(
        self,
        orig_linear: nn.Linear,
        dim: int = 8,
        alpha: float = 32,
        dropout: float = 0.0,
        dropout_position: str = "pre",
        lora_A_init_method: str = "xavier",  # noqa: N803  (Megatron-Bridge's name)
        lora_B_init_method: str = "zero",  # noqa: N803
        lora_dtype: torch.dtype | None = None,
        kernel_backend: str = "auto",
    ) -> None:
        if not isinstance(orig_linear, nn.Linear):
            raise TypeError(f"LinearAdapter wraps an nn.Linear, got {type(orig_linear).__name__}")
        check_adapter_hparams(dim, alpha, dropout, dropout_position,
                              (lora_A_init_method, lora_B_init_method))
        w = orig_linear.weight
        super().__init__(orig_linear.in_features, orig_linear.out_features,
                         bias=orig_linear.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.weight.copy_(w)
            if orig_linear.bias is not None:
                self.bias.copy_(orig_linear.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._init_adapter(dim, alpha, dropout, dropout_position, lora_A_init_method,
                           lora_B_init_method, lora_dtype)
        self.kernel_backend = validate_backend_name(kernel_backend, what="kernel_backend")
        self._adapter_enabled = True
        self._register_load_state_dict_pre_hook(self._accept_linear_in_out_keys)

    # Megatron-Bridge's newer LinearAdapter names the factors linear_in / linear_out (as
    # ParallelLinearAdapter does): both names reach the same modules, and both key spellings load.
    _FACTOR_ALIASES = {"linear_in.": "lora_a.", "linear_out.": "lora_b."}

    @property
    def linear_in(self) -> nn.Linear:
        """A ([r, K]); the same module as ``lora_a``."""
        return self.lora_a

    @property
    def linear_out(self) -> nn.Linear:
        """B ([N, r]); the same module as ``lora_b``."""
        return self.lora_b

    def _accept_linear_in_out_keys(self, state_dict, prefix, *args) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            for alias, name in self._FACTOR_ALIASES.items():
                if rest.startswith(alias):
                    state_dict[prefix + name + rest[len(alias):]] = state_dict.pop(key)

    def _init_adapter(self, dim, alpha, dropout, dropout_position, a_init, b_init, lora_dtype):
        dtype = lora_dtype or self.weight.dtype
        device = self.weight.device
        self.dim, self.alpha = dim, alpha
        self.scale = alpha / dim
        self.lora_a = nn.Linear(self.in_features, dim, bias=False, dtype=dtype, device=device)
        self.lora_b = nn.Linear(dim, self.out_features, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            get_init_fn(a_init)(self.lora_a.weight)
            get_init_fn(b_init)(self.lora_b.weight)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_position = dropout_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._adapter_enabled:
            return F.linear(x, self.weight, self.bias)
        same_dtype = self.lora_a.weight.dtype == self.weight.dtype == x.dtype \
            and not torch.is_autocast_enabled(x.device.type)
        choice = resolve_backend(
            self.kernel_backend, "lora_linear", device=x.device, dtype=x.dtype,
            constraints=[(not self.weight.requires_grad,
                          "base weight requires grad (the fused path is for a frozen base)"),
                         (same_dtype, "input, base and lora dtypes differ (or autocast is on): "
                                      "the fused path runs in one dtype")],
        )
        if choice.name != "eager":
            from bridge.kernels.lora_linear import lora_linear

            return lora_linear(x, self.weight, self.bias, self.lora_a.weight, self.lora_b.weight,
                               scale=self.scale, dropout=self.dropout_p,
                               dropout_position=self.dropout_position, training=self.training,
                               backend=choice.name)
        res = F.linear(x, self.weight, self.bias)
        if self.dropout_position == "pre":
            x = self.dropout(x)
        # The scale goes on the [..., r] intermediate, not on the [..., N] output (linear in it),
        # and the add rides in the second GEMM (addmm): two passes over the output fewer.
        s = self.lora_a(x.to(self.lora_a.weight.dtype)) * self.scale
        if self.dropout_position == "post":
            return res + self.dropout(self.lora_b(s)).to(res.dtype)
        n, r = self.lora_b.weight.shape
        out = torch.addmm(res.reshape(-1, n), s.reshape(-1, r).to(res.dtype),
                          self.lora_b.weight.t().to(res.dtype))
        return out.view(res.shape)


def patch_linear_module(orig_linear: nn.Linear, **kwargs) -> LinearAdapter:
    """Return a ``LinearAdapter`` that replaces ``orig_linear`` (Megatron-Bridge's helper name)."""
    return LinearAdapter(orig_linear, **kwargs)
