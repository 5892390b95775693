"""Transformer-engine's own layers, as CPU stand-ins (the TE half of ``tests/te_standins.py``;
import them from there).

Mirrors transformer-engine 2.11.0 (``transformer_engine/pytorch/module/{base,linear,
layernorm_linear,grouped_linear}.py``, ``quantization.py``, ``quantized_tensor.py``,
``tensor/float8_tensor.py``, ``common/recipe``): constructor arguments, attribute names and the
values TE gives them, parameter names (``weight``, ``bias``, ``layer_norm_weight``,
``layer_norm_bias``, ``weight{i}``/``bias{i}``), the empty-tensor bias of ``bias=False``, return
values, ``_extra_state``, and TE's column / row communication (through megatron-core's
tensor_parallel mappings, which do the same collectives). See ``tests/te_standins.py`` for what is
emulated rather than run, and for the behaviour kept on purpose.
"""

from __future__ import annotations

import contextlib
import pickle

import torch
import torch.nn.functional as F
from torch import nn

TE_VERSION = "2.11.0"
DROP_GATHERED_LN_OUT_GRAD = True


def _located(module: str):
    """Give a stand-in class the real class's module path."""
    def deco(cls):
        cls.__module__ = module
        return cls
    return deco


# ---- fp8: recipes, global state, quantised weights --------------------------------------------
@_located("transformer_engine.common.recipe")
class Recipe:
    """Base of TE's fp8 recipes (what the layers and the tests read)."""

    fp8_format = "HYBRID"

    def delayed(self) -> bool:
        return isinstance(self, DelayedScaling)

    def float8_current_scaling(self) -> bool:
        return isinstance(self, Float8CurrentScaling)


@_located("transformer_engine.common.recipe")
class DelayedScaling(Recipe):
    def __init__(self, amax_history_len: int = 1024, reduce_amax: bool = True) -> None:
        self.amax_history_len, self.reduce_amax = amax_history_len, reduce_amax


@_located("transformer_engine.common.recipe")
class Float8CurrentScaling(Recipe):
    pass


@_located("transformer_engine.pytorch.quantization")
class FP8GlobalStateManager:
    """TE's process-wide fp8 state: set by ``fp8_autocast`` / ``fp8_model_init``."""

    FP8_ENABLED = False
    FP8_RECIPE: Recipe | None = None
    FP8_PARAMETERS = False

    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return cls.FP8_ENABLED

    @classmethod
    def get_fp8_recipe(cls) -> Recipe:
        return cls.FP8_RECIPE if cls.FP8_RECIPE is not None else DelayedScaling()

    @classmethod
    def with_fp8_parameters(cls) -> bool:
        return cls.FP8_PARAMETERS


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True, fp8_recipe: Recipe | None = None):
    """TE's ``fp8_autocast``: layers run their GEMMs in fp8 inside it."""
    saved = FP8GlobalStateManager.FP8_ENABLED, FP8GlobalStateManager.FP8_RECIPE
    FP8GlobalStateManager.FP8_ENABLED = enabled
    FP8GlobalStateManager.FP8_RECIPE = fp8_recipe or DelayedScaling()
    try:
        yield
    finally:
        FP8GlobalStateManager.FP8_ENABLED, FP8GlobalStateManager.FP8_RECIPE = saved


@contextlib.contextmanager
def fp8_model_init(enabled: bool = True):
    """TE's ``fp8_model_init``: layers built inside it hold fp8 primary weights."""
    saved = FP8GlobalStateManager.FP8_PARAMETERS
    FP8GlobalStateManager.FP8_PARAMETERS = enabled
    try:
        yield
    finally:
        FP8GlobalStateManager.FP8_PARAMETERS = saved


_FP8_ATTRS = ("_data", "_scale_inv", "_fp8_dtype")


@_located("transformer_engine.pytorch.quantized_tensor")
class QuantizedTensor(torch.Tensor):
    """A tensor held quantised. Ops read its dequantised values and return plain tensors (TE
    dequantises for every op it has no quantised kernel for); ``detach`` keeps the type."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        src = args[0] if args else None
        if func is torch.Tensor.detach and isinstance(src, cls):
            out = torch.Tensor._make_subclass(type(src), out, False)
            for name in _FP8_ATTRS:
                setattr(out, name, getattr(src, name))
        return out


@_located("transformer_engine.pytorch.tensor.float8_tensor")
class Float8Tensor(QuantizedTensor):
    """Per-tensor scaled fp8: ``_data`` the fp8 bytes (uint8), ``_scale_inv`` the dequantisation
    scale, ``_fp8_dtype``; ``dtype`` is the nominal (high-precision) dtype, as in TE."""

    @staticmethod
    def quantize(t: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> Float8Tensor:
        src = t.detach().as_subclass(torch.Tensor).float()
        scale = torch.finfo(fp8_dtype).max / src.abs().amax().clamp_min(1e-12)
        data, scale_inv = (src * scale).to(fp8_dtype), 1.0 / scale
        out = torch.Tensor._make_subclass(Float8Tensor, (data.float() * scale_inv).to(t.dtype),
                                          False)
        out._data, out._scale_inv, out._fp8_dtype = data.view(torch.uint8), scale_inv, fp8_dtype
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        values = self._data.view(self._fp8_dtype).float() * self._scale_inv
        return values.to(dtype or self.dtype)


def _fp8_qdq(t: torch.Tensor) -> torch.Tensor:
    """Per-tensor e4m3 quantise-dequantise with a straight-through gradient (TE's fp8 GEMM)."""
    if t.numel() == 0:  # an expert with no tokens: nothing to quantise (amax of nothing fails)
        return t
    src = t.detach().float()
    scale = torch.finfo(torch.float8_e4m3fn).max / src.abs().amax().clamp_min(1e-12)
    q = ((src * scale).to(torch.float8_e4m3fn).float() / scale).to(t.dtype)
    return t + (q - t).detach() if t.requires_grad else q


# ---- TE's base module ---------------------------------------------------------------------------
@_located("transformer_engine.pytorch.module.base")
class WeightGradStore:
    """Holds (input, dY, weight) of each GEMM whose weight gradient is delayed."""

    def __init__(self, delay_wgrad_compute: bool = False, ub_bulk_wgrad: bool = False) -> None:
        self._delay, self._queue = delay_wgrad_compute, []

    def delay_wgrad_compute(self) -> bool:
        return self._delay

    def put(self, item) -> None:
        self._queue.append(item)

    def pop(self):
        return self._queue.pop(0)


class _DelayedWgradGemm(torch.autograd.Function):
    """y = x W^T; backward returns dX now and queues (x, dY, W) for ``backward_dw``."""

    @staticmethod
    def forward(ctx, x, weight, param, store):
        ctx.save_for_backward(x, weight)
        ctx.param, ctx.store = param, store
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        ctx.store.put((x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), ctx.param))
        return dy @ weight, None, None, None


class _DropGrad(torch.autograd.Function):
    """Identity whose backward drops the gradient (TE's returned gathered layernorm output)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return None


def _device(device) -> torch.device:
    """TE allocates on ``device`` (default "cuda"); without CUDA the stand-ins use the CPU."""
    return torch.device(device) if torch.cuda.is_available() else torch.device("cpu")


def _divide(n: int, d: int) -> int:
    if n % d:
        raise AssertionError(f"{n} is not divisible by {d}")
    return n // d


def _tp_attrs(t: torch.Tensor, is_parallel: bool, dim: int, stride: int) -> None:
    t.tensor_model_parallel, t.partition_dim, t.partition_stride = is_parallel, dim, stride


@_located("transformer_engine.pytorch.module.base")
class TransformerEngineBaseModule(nn.Module):
    """TE's base: fp8 state, TP group, dtype checks, extra state, delayed weight gradients."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.fp8_initialized = self.fp8 = self.fp8_calibration = self.fp8_parameters = False
        self.fp8_meta = {"fp8_checkpoint": False, "fp8_group": None}
        self.tp_group, self.tp_size, self.sequence_parallel = None, 1, False
        self.tp_group_initialized = False
        self.primary_weights_in_fp8 = FP8GlobalStateManager.with_fp8_parameters()
        self.fsdp_wrapped, self.fsdp_group = False, None
        self.activation_dtype = None
        self.wgrad_store = None
        self.weight_names, self.bias_names = ["weight"], ["bias"]

    def set_tensor_parallel_group(self, tp_group) -> None:
        self.tp_group, self.tp_group_initialized = tp_group, True

    def _set_tp(self, tp_group, tp_size: int) -> None:
        if tp_group is None:
            self.tp_size = tp_size
            if tp_size == 1:
                self.set_tensor_parallel_group(None)
        else:
            self.tp_size = torch.distributed.get_world_size(tp_group)
            self.set_tensor_parallel_group(tp_group)

    def _new_param(self, name, shape, device, dtype, init_fn, rng_tracker=None) -> None:
        p = nn.Parameter(torch.empty(*shape, device=_device(device), dtype=dtype))
        self.register_parameter(name, p)
        with torch.no_grad():
            if rng_tracker is None:
                init_fn(p)
            else:
                with rng_tracker().fork():
                    init_fn(p)

    def _new_linear_params(self, weight_name, bias_name, shape, bias, device, dtype, init_method,
                           rng_tracker) -> None:
        """The weight (init_method; TE's default N(0, 0.023)) and the bias (zeros), or TE's
        empty-tensor bias, a plain attribute, when ``bias`` is False."""
        init = init_method or (lambda w: nn.init.normal_(w, 0.0, 0.023))
        self._new_param(weight_name, shape, device, dtype, init, rng_tracker)
        if bias:
            self._new_param(bias_name, shape[:1], device, dtype, nn.init.zeros_)
        else:
            setattr(self, bias_name, torch.Tensor().to(dtype=dtype, device=_device(device)))

    def _finish_params(self) -> None:
        """TE's reset_parameters attributes, delayed-wgrad marks, fp8 primary weights."""
        row = self.parallel_mode == "row"
        for name in self.weight_names:
            _tp_attrs(getattr(self, name), True, 1 if row else 0, 1)
        if self.use_bias:
            for name in self.bias_names:
                if row:
                    getattr(self, name).sequence_parallel = self.sequence_parallel
                elif self.parallel_mode == "column":
                    _tp_attrs(getattr(self, name), True, 0, 1)
        if self.wgrad_store.delay_wgrad_compute():
            for name in self.weight_names + self.bias_names:
                if isinstance(getattr(self, name), nn.Parameter):
                    getattr(self, name).skip_backward_post_hook = True
        self._quantize_primary_weights()

    def _quantize_primary_weights(self) -> None:
        """Under ``fp8_model_init``, each weight becomes a ``Float8Tensor`` parameter (of its
        current values, so a later re-initialisation is re-quantised), attributes kept."""
        if not self.primary_weights_in_fp8:
            return
        for name in self.weight_names:
            old = getattr(self, name)
            new = nn.Parameter(Float8Tensor.quantize(old), requires_grad=old.requires_grad)
            for attr, value in vars(old).items():
                if not attr.startswith("_"):
                    setattr(new, attr, value)
            setattr(self, name, new)

    def get_extra_state(self) -> torch.Tensor:
        """Empty uint8 tensor unless fp8 ran (then the pickled recipe), as TE stores it."""
        if not (self.fp8_meta["fp8_checkpoint"] or self.fp8):
            return torch.empty(0, dtype=torch.uint8)
        state = {"recipe": type(self.fp8_meta.get("recipe")).__name__}
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor) and state.numel():
            self.fp8_meta["fp8_checkpoint"] = True

    def prepare_forward(self, inp: torch.Tensor) -> torch.Tensor:
        """TE's checks and fp8 set-up before a forward (it also requires CUDA; this does not)."""
        if torch.is_autocast_enabled(inp.device.type):
            self.activation_dtype = torch.get_autocast_dtype(inp.device.type)
        else:
            for name, param in self.named_parameters():
                if param.dtype != inp.dtype:
                    raise TypeError(
                        "Data types for parameters must match when outside of autocasted "
                        f"region. Found input dtype: {inp.dtype} and {name!r} dtype: {param.dtype}")
            self.activation_dtype = inp.dtype
        if self.tp_size > 1 and not self.tp_group_initialized:
            raise RuntimeError("Tensor parallel group not initialized. Call "
                               "set_tensor_parallel_group() before forward pass when tp_size > 1.")
        self.fp8 = FP8GlobalStateManager.is_fp8_enabled()
        self.fp8_parameters = FP8GlobalStateManager.with_fp8_parameters()
        self.fp8_meta["fp8_checkpoint"] = self.fp8
        if self.fp8:
            self.fp8_meta["recipe"] = FP8GlobalStateManager.get_fp8_recipe()
            self.fp8_initialized = True
        return inp.contiguous()

    def _gemm(self, x: torch.Tensor, weight_name: str, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ bias), in the activation dtype, in fp8 when it is on, dW delayed if asked."""
        param = getattr(self, weight_name)
        dt = self.activation_dtype
        w = param.to(dt) if param.dtype != dt else param
        x = x.to(dt)
        if self.fp8:
            x = _fp8_qdq(x)
            if not isinstance(param, QuantizedTensor):
                w = _fp8_qdq(w)
        if self.wgrad_store.delay_wgrad_compute() and param.requires_grad:
            out = _DelayedWgradGemm.apply(x, w, param, self.wgrad_store)
            return out if bias is None else out + bias.to(dt)
        return F.linear(x, w, None if bias is None else bias.to(dt))

    def need_backward_dw(self) -> bool:
        return self.wgrad_store is not None and self.wgrad_store.delay_wgrad_compute()

    def backward_dw(self) -> None:
        """The delayed weight gradients: ``param.grad = dY^T x`` for each queued GEMM."""
        if not self.need_backward_dw():
            return
        while self.wgrad_store._queue:
            x, dy, param = self.wgrad_store.pop()
            param.grad = (dy.t().float() @ x.float()).to(param.dtype)

    def _set_ub_flags(self, ag, rs, rs_dgrad, bulk_dgrad, bulk_wgrad, ub_name) -> None:
        """Userbuffers flags, exactly as TE's Linear / LayerNormLinear set them."""
        col = self.parallel_mode == "column" and self.sequence_parallel
        row = self.parallel_mode == "row" and self.sequence_parallel
        self.ub_overlap_ag_fprop, self.ub_overlap_rs_dgrad = col and ag, col and rs_dgrad
        self.ub_bulk_dgrad = col and bulk_dgrad and not self.ub_overlap_rs_dgrad
        self.ub_bulk_wgrad = col and bulk_wgrad and not self.ub_overlap_rs_dgrad
        self.ub_overlap_rs_fprop, self.ub_overlap_ag_dgrad = row and rs, row and ag
        self.ub_name = ub_name

    def _column_input(self, x: torch.Tensor) -> torch.Tensor:
        """The column GEMM's input: gathered over the sequence (SP) or copied (dX all-reduced)."""
        if self.parallel_mode != "column" or self.tp_size == 1:
            return x
        from megatron.core.tensor_parallel import mappings

        if self.sequence_parallel:
            return mappings.gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=True, group=self.tp_group)
        return mappings.copy_to_tensor_model_parallel_region(x, group=self.tp_group)


def _init_common(m, in_features, out_features, bias, return_bias, delay, ub_bulk_wgrad, **attrs):
    m.in_features, m.out_features = in_features, out_features
    m.use_bias, m.return_bias, m.apply_bias = bias, return_bias, bias and not return_bias
    m.wgrad_store = WeightGradStore(delay, ub_bulk_wgrad)
    for k, v in attrs.items():
        setattr(m, k, v)


def _set_parallel_mode(m, parallel_mode, sequence_parallel) -> None:
    if parallel_mode not in (None, "column", "row"):
        raise AssertionError(f"parallel_mode {parallel_mode} not supported")
    m.parallel_mode = parallel_mode
    if parallel_mode == "column":
        m.out_features = _divide(m.out_features, m.tp_size)
    elif parallel_mode == "row":
        m.in_features = _divide(m.in_features, m.tp_size)
    m.sequence_parallel = m.tp_size > 1 and sequence_parallel


# ---- TE layers --------------------------------------------------------------------------------
@_located("transformer_engine.pytorch.module.linear")
class Linear(TransformerEngineBaseModule):
    """TE's ``Linear``: y = x W^T + b, with TE's column / row communication."""

    def __init__(self, in_features, out_features, sequence_parallel=False,
                 fuse_wgrad_accumulation=False, tp_group=None, tp_size=1,
                 get_rng_state_tracker=None, rng_tracker_name=None, init_method=None, bias=True,
                 return_bias=False, params_dtype=None, parallel_mode=None, parameters_split=None,
                 device="cuda", ub_overlap_ag=False, ub_overlap_rs=False,
                 ub_overlap_rs_dgrad=False, ub_bulk_dgrad=False, ub_bulk_wgrad=False,
                 ub_name=None, delay_wgrad_compute=False, symmetric_ar_type=None,
                 save_original_input=False, name=None) -> None:
        super().__init__(name)
        if parameters_split is not None:
            raise NotImplementedError("the TE stand-in does not split parameters")
        dtype = params_dtype or torch.get_default_dtype()
        _init_common(self, in_features, out_features, bias, return_bias, delay_wgrad_compute,
                     ub_bulk_wgrad, fuse_wgrad_accumulation=fuse_wgrad_accumulation,
                     get_rng_state_tracker=get_rng_state_tracker,
                     rng_tracker_name=rng_tracker_name, symmetric_ar_type=symmetric_ar_type,
                     save_original_input=save_original_input)
        self._set_tp(tp_group, tp_size)
        _set_parallel_mode(self, parallel_mode, sequence_parallel)
        self._set_ub_flags(ub_overlap_ag, ub_overlap_rs, ub_overlap_rs_dgrad, ub_bulk_dgrad,
                           ub_bulk_wgrad, ub_name)
        self._new_linear_params("weight", "bias", (self.out_features, self.in_features), bias,
                                device, dtype, init_method, get_rng_state_tracker)
        # row parallel: the bias is added after the reduction, not in the GEMM
        self.gemm_bias_unfused_add = self.parallel_mode == "row" and self.apply_bias
        self._finish_params()

    def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        inp = self.prepare_forward(inp)
        bias = self.bias if self.use_bias else None
        out = self._gemm(self._column_input(inp), "weight",
                         bias if self.apply_bias and not self.gemm_bias_unfused_add else None)
        if self.parallel_mode == "row" and self.tp_size > 1:
            from megatron.core.tensor_parallel import mappings

            if self.sequence_parallel:
                out = mappings.reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
            else:
                out = mappings.reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        if self.gemm_bias_unfused_add:
            out = out + bias.to(out.dtype)
        if self.return_bias:
            return out, None if bias is None else bias.to(self.activation_dtype)
        return out


def _norm(x, weight, bias, normalization, eps, zero_centered_gamma):
    """LayerNorm / RMSNorm with fp32 statistics, output in x's dtype (as TE's norm kernels)."""
    w = weight.float() + (1.0 if zero_centered_gamma else 0.0)
    if normalization == "RMSNorm":
        return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(x.dtype)
    return F.layer_norm(x.float(), (x.shape[-1],), w, bias.float(), eps).to(x.dtype)


@_located("transformer_engine.pytorch.module.layernorm_linear")
class LayerNormLinear(TransformerEngineBaseModule):
    """TE's ``LayerNormLinear``: ln = norm(x); y = ln W^T + b; optionally returns ln."""

    def __init__(self, in_features, out_features, eps=1e-5, sequence_parallel=False,
                 fuse_wgrad_accumulation=False, tp_group=None, tp_size=1,
                 get_rng_state_tracker=None, init_method=None, bias=True,
                 normalization="LayerNorm", return_bias=False, params_dtype=None,
                 parallel_mode=None, return_layernorm_output=False,
                 return_layernorm_output_gathered=False, parameters_split=None,
                 zero_centered_gamma=False, device="cuda", ub_overlap_ag=False,
                 ub_overlap_rs=False, ub_overlap_rs_dgrad=False, ub_bulk_wgrad=False,
                 ub_bulk_dgrad=False, ub_name=None, delay_wgrad_compute=False,
                 symmetric_ar_type=None, name=None) -> None:
        super().__init__(name)
        if parameters_split is not None:
            raise NotImplementedError("the TE stand-in does not split parameters")
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise AssertionError("Unsupported normalization type!")
        dtype = params_dtype or torch.get_default_dtype()
        _init_common(self, in_features, out_features, bias, return_bias, delay_wgrad_compute,
                     ub_bulk_wgrad, fuse_wgrad_accumulation=fuse_wgrad_accumulation,
                     normalization=normalization, eps=eps,
                     return_layernorm_output=return_layernorm_output,
                     return_layernorm_output_gathered=(return_layernorm_output_gathered
                                                       if return_layernorm_output else False),
                     zero_centered_gamma=zero_centered_gamma, symmetric_ar_type=symmetric_ar_type,
                     drop_gathered_ln_out_grad=DROP_GATHERED_LN_OUT_GRAD)
        self._set_tp(tp_group, tp_size)
        if parallel_mode == "row":
            raise NotImplementedError("Normalization does not support tensor-parallel distribution.")
        _set_parallel_mode(self, parallel_mode, sequence_parallel)
        self._set_ub_flags(ub_overlap_ag, ub_overlap_rs, ub_overlap_rs_dgrad, ub_bulk_dgrad,
                           ub_bulk_wgrad, ub_name)
        k = self.in_features
        self._new_param("layer_norm_weight", (k,), device, dtype,
                        nn.init.zeros_ if zero_centered_gamma else nn.init.ones_)
        if normalization != "RMSNorm":
            self._new_param("layer_norm_bias", (k,), device, dtype, nn.init.zeros_)
        else:
            self.layer_norm_bias = None
        self._new_linear_params("weight", "bias", (self.out_features, k), bias, device, dtype,
                                init_method, get_rng_state_tracker)
        self.gemm_bias_unfused_add = False
        self._finish_params()
        self.layer_norm_weight.sequence_parallel = self.sequence_parallel
        if self.layer_norm_bias is not None:
            self.layer_norm_bias.sequence_parallel = self.sequence_parallel

    def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        inp = self.prepare_forward(inp)
        ln = _norm(inp.to(self.activation_dtype), self.layer_norm_weight, self.layer_norm_bias,
                   self.normalization, self.eps, self.zero_centered_gamma)
        ln_total = self._column_input(ln)
        bias = self.bias if self.use_bias else None
        out = self._gemm(ln_total, "weight", bias if self.apply_bias else None)
        ln_out = None
        if self.return_layernorm_output:
            ln_out = ln
            if self.return_layernorm_output_gathered:
                gathered = self.parallel_mode == "column" and self.sequence_parallel
                ln_out = ln_total if gathered else ln
                if self.drop_gathered_ln_out_grad:
                    ln_out = _DropGrad.apply(ln_out)
        if self.return_bias:  # without a bias TE's LayerNormLinear returns its empty one
            b = (self.bias if bias is None else bias).to(self.activation_dtype)
            return (out, b, ln_out) if self.return_layernorm_output else (out, b)
        return (out, ln_out) if self.return_layernorm_output else out


@_located("transformer_engine.pytorch.module.grouped_linear")
class GroupedLinear(TransformerEngineBaseModule):
    """TE's ``GroupedLinear``: rows of x split by ``m_splits``, y_i = x_i W_i^T + b_i; no
    communication (megatron's MoE token dispatcher does it)."""

    def __init__(self, num_gemms, in_features, out_features, sequence_parallel=False,
                 fuse_wgrad_accumulation=False, tp_group=None, tp_size=1,
                 get_rng_state_tracker=None, rng_tracker_name=None, init_method=None, bias=True,
                 return_bias=False, params_dtype=None, parallel_mode=None, device="cuda",
                 ub_overlap_rs=False, ub_overlap_ag=False, ub_name=None,
                 delay_wgrad_compute=False, save_original_input=False, name=None) -> None:
        super().__init__(name)
        if ub_overlap_rs or ub_overlap_ag:
            raise AssertionError("GroupedLinear doesn't support Userbuffer overlap.")
        dtype = params_dtype or torch.get_default_dtype()
        _init_common(self, in_features, out_features, bias, return_bias, delay_wgrad_compute,
                     False, num_gemms=num_gemms, fuse_wgrad_accumulation=fuse_wgrad_accumulation,
                     ub_overlap_rs=ub_overlap_rs, ub_overlap_ag=ub_overlap_ag, ub_name=ub_name,
                     save_original_input=save_original_input, rng_tracker_name=rng_tracker_name)
        self._set_tp(tp_group, tp_size)
        if self.tp_size > 1 and bias:
            raise ValueError("GroupedLinear doesn't support bias when TP > 1. "
                             "Because the TP communication is handled outside of this module.")
        _set_parallel_mode(self, parallel_mode, sequence_parallel)
        self.weight_names = [f"weight{i}" for i in range(num_gemms)]
        self.bias_names = [f"bias{i}" for i in range(num_gemms)]
        for w, b in zip(self.weight_names, self.bias_names, strict=True):
            self._new_linear_params(w, b, (self.out_features, self.in_features), bias, device,
                                    dtype, init_method, get_rng_state_tracker)
        self._finish_params()

    def forward(self, inp, m_splits, is_first_microbatch=None):
        if len(m_splits) != self.num_gemms:
            raise AssertionError("Number of splits should match number of GEMMs.")
        inp = self.prepare_forward(inp)
        chunks = torch.split(inp.reshape(-1, self.in_features), list(m_splits))
        biases = [getattr(self, b) for b in self.bias_names]
        outs = [self._gemm(c, w, b if self.apply_bias else None)
                for c, w, b in zip(chunks, self.weight_names, biases, strict=True)]
        out = torch.cat(outs).view(*inp.shape[:-1], self.out_features)
        if self.return_bias:
            return out, [b.to(self.activation_dtype) for b in biases]
        return out
