"""DoRA layers: ``ParallelLinearDoRAAdapter`` (LoRA factors + a magnitude vector) and
``DoRALinear`` (the wrapper that rescales base + adapter row by row).

With W0 the frozen base weight, s = alpha / r and n = ||W0 + s·B@A|| the row norms (over the whole
row, all TP shards; detached, as in HF PEFT), HF PEFT's DoRA is

    y = W0 x + b + (m/n - 1) · W0 x~ + (m/n) · s·B A x~        x~ = dropout(x)

which is (m/n) · (W0 x + s·B A x) + b when dropout is off (eval, or p = 0). The bias is never
scaled and never enters the norm.

Tensor parallelism (Megatron-Bridge's adapter layout):

- column-parallel base, W0 [N/tp, K]: the rows are local; B is split on N like W0, A is gathered
  (it is split on r), so n is computed locally and m is split on N ([N/tp], sharded on axis 0).
- row-parallel base, W0 [N, K/tp]: each rank holds a K-slice of every row; B is gathered, and the
  squared row norms of W0_k + s·B@A_k are all-reduced over TP. m is [N], replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bridge.peft.adapter_wrapper import AdapterWrapper
from bridge.peft.errors import PEFTConfigError
from bridge.peft.parallel_linear_adapter import ParallelLinearAdapter
from bridge.peft.tp import acc, tp_group_and_size

__all__ = ["DoRALinear", "ParallelLinearDoRAAdapter"]


class ParallelLinearDoRAAdapter(ParallelLinearAdapter):
    """A ParallelLinearAdapter with DoRA's ``weight_magnitude`` m ([N/tp] for a column-parallel
    base, [N] otherwise), in the adapter's params dtype. Dropout is 'pre' only."""

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("dropout_position", "pre") != "pre":
            raise PEFTConfigError(
                "DoRA only supports pre-adapter dropout at this time: got dropout_position="
                f"{kwargs['dropout_position']!r}; pass dropout_position='pre'"
            )
        kwargs["dropout_position"] = "pre"
        super().__init__(*args, **kwargs)
        _, tp = tp_group_and_size(self)
        rows = self.out_features if self.input_is_parallel else self.out_features // tp
        dtype = self.linear_out.weight.dtype
        self.weight_magnitude = nn.Parameter(
            torch.ones(rows, dtype=dtype, device=self.linear_out.weight.device)
        )
        if (self._megatron and self.sequence_parallel and self.input_is_parallel) \
                or getattr(self.linear_in.weight, "sequence_parallel", False):  # duplicated base
            # Replicated, but each rank sees only its sequence shard of the output: megatron's
            # grad finalisation all-reduces parameters marked like this over TP.
            self.weight_magnitude.sequence_parallel = True

    def init_weight_magnitude(self, value: torch.Tensor) -> None:
        """Set m (e.g. to the initial row norms ||W0 + s·B@A||)."""
        if value.shape != self.weight_magnitude.shape:
            raise ValueError(
                f"weight_magnitude of {self.base_linear_name!r} has shape "
                f"{tuple(self.weight_magnitude.shape)}, got a value of shape {tuple(value.shape)}"
            )
        with torch.no_grad():
            self.weight_magnitude.copy_(value)

    def get_weight_magnitude(self) -> torch.Tensor:
        return self.weight_magnitude

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The LoRA term alone (with dropout); DoRALinear composes the DoRA output."""
        return self.lora_output(self.dropout(x))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None,
                           mamba_dim_info: dict | None = None) -> dict:
        """The factors' sharded tensors plus m (sharded on axis 0 for a column-parallel base)."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata, mamba_dim_info)
        if not self._megatron:
            from bridge.peft.adapter_wrapper import _module_sharded_state_dict

            holder = nn.Module()
            holder.weight_magnitude = self.weight_magnitude
            out.update(_module_sharded_state_dict(holder, prefix, sharded_offsets, metadata))
            return out
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        from bridge.peft.parallel_linear_adapter import swiglu_factory

        dp_cp_group = (metadata or {}).get("dp_cp_group")
        if dp_cp_group is None:  # looked up here, not written into the caller's metadata
            dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        axis = {} if self.input_is_parallel else {"weight_magnitude": 0}
        out.update(make_sharded_tensors_for_checkpoint(
            {"weight_magnitude": self.weight_magnitude}, prefix, axis, sharded_offsets,
            tp_group=self.linear_out.tp_group, dp_cp_group=dp_cp_group,
        ))
        if getattr(self, "swiglu_output", False):  # m has fc1's [gate; up] rows, like B
            key = f"{prefix}weight_magnitude"
            out[key] = swiglu_factory(out[key], sharded_offsets, metadata, self.tp_group)
        return out


class DoRALinear(AdapterWrapper):
    """DoRA beside a Megatron or torch linear (eager path).

    Initialises m to the row norms of W0 + s·B@A. Returns what the base returns, less the
    layernorm output.
    """

    def __init__(self, to_wrap: nn.Module, adapter: ParallelLinearDoRAAdapter) -> None:
        if not isinstance(adapter, ParallelLinearDoRAAdapter):
            raise TypeError("DoRALinear needs a ParallelLinearDoRAAdapter, got "
                            f"{type(adapter).__name__}")
        super().__init__(to_wrap, adapter)
        self.scaling = adapter.scale
        self.adapter.init_weight_magnitude(self.weight_norm().to(adapter.weight_magnitude.dtype))

    # ---- the norm --------------------------------------------------------------------------
    def weight_norm(self) -> torch.Tensor:
        """n = ||W0 + s·B@A|| per output row (whole rows under TP), fp32, detached: [N/tp]
        for a column-parallel base, [N] otherwise."""
        w = acc(self.to_wrap.weight)
        delta = self.adapter.delta_weight()
        if delta.shape != w.shape:
            raise ValueError(
                f"DoRA on {self.adapter.base_linear_name!r}: the adapter's delta has shape "
                f"{tuple(delta.shape)} but the base weight shard has shape {tuple(w.shape)}"
            )
        sq = (w + delta.to(w.dtype)).square().sum(dim=1)
        group, tp = tp_group_and_size(self.adapter)
        if self.adapter.input_is_parallel and tp > 1:
            dist.all_reduce(sq, group=group)
        return sq.sqrt()

    _get_weight_norm = weight_norm  # Megatron-Bridge's name

    def merged_weight(self) -> torch.Tensor:
        """m · (W0 + s·B@A) / n in fp32: this rank's shard of the merged weight. The norm n is
        remembered (``_dora_merge_norm``) for :meth:`unmerged_weight`: the merged rows have
        norm |m|, so n cannot be recovered from them."""
        with torch.no_grad():
            w = acc(self.to_wrap.weight)
            # fp64 for the rescaling (here and in unmerged_weight): the merged weight is then
            # rounded once, and keep_base=None's unmerge is within one ulp (fp32 products and
            # quotients here and back were 2.5 ulps)
            summed = w.double() + self.adapter.delta_weight().to(w.dtype).double()
            norm = self.weight_norm()
            m = acc(self.adapter.weight_magnitude).double()
            self._dora_merge_norm = norm
            return (summed * (m / norm.double()).unsqueeze(1)).to(w.dtype)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`merged_weight` with the norm it used: W0 = W' · n / m - s·B@A."""
        norm = self.__dict__.pop("_dora_merge_norm", None)
        if norm is None:
            raise RuntimeError(f"{type(self).__name__}: unmerged_weight() needs the norm of the "
                               "merge it inverts; call merged_weight() (merge_lora) first")
        with torch.no_grad():
            merged = acc(merged)
            m = acc(self.adapter.weight_magnitude).double()
            delta = self.adapter.delta_weight().to(merged.dtype).double()
            return (merged.double() * (norm.double() / m).unsqueeze(1) - delta).to(merged.dtype)

    def unmerge_on_load_problem(self) -> str | None:
        """A merged DoRA layer's rows were rescaled by m / n with n = ||W0 + s·B@A|| of the
        weights before the merge; its state dict does not hold n, so W0 cannot be recovered."""
        return ("a merged DoRA state dict cannot be unmerged on load (the row norms it was "
                "merged with are not saved); save DoRA models unmerged, or after "
                "merge_and_unload for the merged weights alone")

    # ---- forward ---------------------------------------------------------------------------
    def _bias_in_output(self, returned_bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias the base already added to its output (None if it returned it separately)."""
        if self._return_bare_tensor:
            return returned_bias
        bias = getattr(self.to_wrap, "bias", None)
        if returned_bias is None and isinstance(bias, torch.Tensor) and bias.numel() > 0 \
                and not getattr(self.to_wrap, "skip_bias_add", False):
            return bias
        return None

    def _base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x for an input laid out like the adapter's input (TP-aware, differentiable in x)."""
        a = self.adapter
        w = self.to_wrap.weight
        if not a._megatron:
            return F.linear(x, w)
        from megatron.core.tensor_parallel import mappings

        _, tp = tp_group_and_size(a)
        if not a.input_is_parallel:
            if not a.disable_sequence_parallel_comm:
                x = mappings.gather_from_sequence_parallel_region(x)
            elif tp > 1 and not a.sequence_parallel:
                # Without sequence parallelism dx sums over the TP ranks here; with it, the
                # base's own gather of its norm output reduce-scatters dx (as for linear_in).
                x = mappings.copy_to_tensor_model_parallel_region(x)
            return F.linear(x, w)
        y = F.linear(x, w)
        if a.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(y)
        return mappings.reduce_from_tensor_model_parallel_region(y) if tp > 1 else y

    def forward(self, x: torch.Tensor, *args, **kwargs):
        linear_output, bias, layernorm_output = self.base_linear_forward(x, *args, **kwargs)
        if not self._adapter_enabled:
            return self.wrap_output(linear_output, bias)
        adapter = self.adapter
        added_bias = self._bias_in_output(bias)
        base = linear_output - added_bias if added_bias is not None else linear_output
        scale = (adapter.weight_magnitude / self.weight_norm().to(adapter.weight_magnitude.dtype))
        scale = scale.to(base.dtype)
        x_in = layernorm_output.contiguous()
        if self.training and adapter.dropout_p > 0:
            x_drop = adapter.dropout(x_in)
            lora = adapter.lora_output(x_drop).reshape(base.shape).to(base.dtype)
            out = base + (scale - 1) * self._base_without_bias(x_drop).reshape(base.shape) \
                + scale * lora
        else:
            lora = adapter.lora_output(x_in).reshape(base.shape).to(base.dtype)
            out = scale * (base + lora)
        if added_bias is not None:
            out = out + added_bias
        return self.wrap_output(out, bias)
