"""The models of the layer benchmark (benchmarks/bench_layer.py): a stack of Llama-style decoder
layers (RMSNorm, GQA attention with RoPE, SwiGLU MLP, no linear biases) on [seq, batch, hidden]
inputs, built from megatron-core's layer specs or in plain torch, with the four LoRA targets named
as megatron names them (linear_qkv, linear_proj, linear_fc1, linear_fc2).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
SPECS = ("mcore-local", "mcore-te", "te-standin", "torch")


def _importable(name: str) -> bool:
    """Whether module ``name`` can be imported, without importing it. ``find_spec("a.b")``
    imports ``a`` and raises ModuleNotFoundError when ``a`` itself is absent, so each parent is
    looked up first."""
    parts = name.split(".")
    try:
        return all(importlib.util.find_spec(".".join(parts[:i])) is not None
                   for i in range(1, len(parts) + 1))
    except (ImportError, ValueError):  # a parent that fails to import, or has no __spec__
        return False


def spec_available(spec: str, device: str) -> tuple[bool, str]:
    """Whether the layer ``spec`` can be built here, and why not."""
    if spec not in SPECS:
        return False, f"unknown spec {spec!r}; expected one of {', '.join(SPECS)}"
    if spec == "torch":
        return True, ""
    if not _importable("megatron.core"):
        return False, "megatron-core is not installed"
    if spec == "mcore-te":
        if device != "cuda":
            return False, "transformer-engine runs on a CUDA GPU only"
        if not _importable("transformer_engine"):
            return False, "transformer-engine is not installed"
    if spec == "te-standin" and not _importable("tests.te_standins"):
        return False, "tests/te_standins.py is not importable (run from the repository root)"
    return True, ""


def lora_sites(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the LoRA-wrapped target layers (any wrapper with an ``adapter`` holding
    linear_in/linear_out, or a LinearAdapter with lora_a/lora_b)."""
    out = {}
    for name, mod in model.named_modules():
        adapter = getattr(mod, "adapter", None)
        if adapter is not None and hasattr(adapter, "linear_in") or hasattr(mod, "lora_a"):
            out[name] = mod
    return out


# ---- plain torch -------------------------------------------------------------------------------
def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rot * sin


class TorchLlamaLayer(nn.Module):
    """One decoder layer in plain torch, the reference block when megatron-core is absent."""

    def __init__(self, case, dtype, device) -> None:
        super().__init__()
        h, d = case.hidden, case.hidden // case.heads
        self.heads, self.kv, self.d = case.heads, case.kv_heads, d
        kw = dict(bias=False, dtype=dtype, device=device)
        self.input_layernorm = nn.RMSNorm(h, eps=1e-5, dtype=dtype, device=device)
        self.linear_qkv = nn.Linear(h, (case.heads + 2 * case.kv_heads) * d, **kw)
        self.linear_proj = nn.Linear(case.heads * d, h, **kw)
        self.pre_mlp_layernorm = nn.RMSNorm(h, eps=1e-5, dtype=dtype, device=device)
        self.linear_fc1 = nn.Linear(h, 2 * case.ffn, **kw)
        self.linear_fc2 = nn.Linear(case.ffn, h, **kw)

    def forward(self, x, cos, sin):
        s, b, _ = x.shape
        qkv = self.linear_qkv(self.input_layernorm(x))
        qkv = qkv.view(s, b, self.kv, self.heads // self.kv + 2, self.d)
        q = qkv[..., :-2, :].reshape(s, b, self.heads, self.d)
        k, v = qkv[..., -2, :], qkv[..., -1, :]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (_rope(q, cos, sin), _rope(k, cos, sin), v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.linear_proj(att.permute(2, 0, 1, 3).reshape(s, b, -1))
        gate, up = self.linear_fc1(self.pre_mlp_layernorm(x)).chunk(2, dim=-1)
        return x + self.linear_fc2(F.silu(gate) * up)


class TorchStack(nn.Module):
    def __init__(self, case, dtype, device) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TorchLlamaLayer(case, dtype, device)
                                    for _ in range(case.layers))
        d = case.hidden // case.heads
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.outer(torch.arange(case.seq, dtype=torch.float64), inv)
        ang = torch.cat((ang, ang), dim=-1)[:, None, None, :]  # [s, 1, 1, d]
        self.register_buffer("cos", ang.cos().to(device, dtype), persistent=False)
        self.register_buffer("sin", ang.sin().to(device, dtype), persistent=False)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return x


# ---- megatron-core -----------------------------------------------------------------------------
class SDPACoreAttention(nn.Module):
    """Causal GQA core attention through torch's scaled_dot_product_attention, behind megatron's
    core-attention interface ([s, b, heads, d] in, [s, b, heads * d] out)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None) -> None:
        super().__init__()
        self.config, self.softmax_scale = config, softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class McoreStack(nn.Module):
    def __init__(self, layers, rope, seq: int) -> None:
        super().__init__()
        self.layers, self.rope, self.seq = nn.ModuleList(layers), rope, seq

    def forward(self, x):
        emb = self.rope(x.shape[0])
        for layer in self.layers:
            x, _ = layer(x, attention_mask=None, rotary_pos_emb=emb)
        return x


def _ensure_parallel_state(device: str) -> None:
    """megatron's model-parallel state at world size 1 (a file store in a temp dir), once; on
    the CPU also the tests' CPU shims (megatron allocates on torch.cuda.current_device())."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if device == "cpu":
        from tests.conftest import install_megatron_cpu_shims

        install_megatron_cpu_shims()
    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="bench_layer_"), "dist_init")
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                init_method=f"file://{store}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)


def _layer_spec(spec: str):
    from megatron.core.models.gpt import gpt_layer_specs

    if spec == "mcore-te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    if spec == "te-standin":
        from tests.te_standins import te_gpt_layer_spec

        layer = te_gpt_layer_spec()
    else:
        layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return layer


def _mcore_stack(case, seed: int, dtype: torch.dtype) -> nn.Module:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    _ensure_parallel_state(case.device)
    cpu = case.device == "cpu"
    torch.manual_seed(seed)
    with contextlib.suppress(Exception):  # the CUDA RNG tracker needs CUDA; CPU init skips it
        model_parallel_cuda_manual_seed(seed)
    config = TransformerConfig(
        num_layers=case.layers, hidden_size=case.hidden, ffn_hidden_size=case.ffn,
        num_attention_heads=case.heads, num_query_groups=case.kv_heads, gated_linear_unit=True,
        activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-5,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, use_cpu_initialization=cpu, perform_initialization=True,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False)
    spec = _layer_spec(case.spec)
    layers = [build_module(spec, config=config, layer_number=i + 1) for i in range(case.layers)]
    rope = RotaryEmbedding(kv_channels=case.hidden // case.heads, rotary_percent=1.0,
                           use_cpu_initialization=cpu)
    return McoreStack(layers, rope, case.seq).to(case.device)


def build_stack(case, seed: int, dtype: torch.dtype | None = None) -> nn.Module:
    """The frozen stack of ``case`` (weights from ``seed``), in ``dtype`` (default the case's)."""
    ok, why = spec_available(case.spec, case.device)
    if not ok:
        raise RuntimeError(f"layer spec {case.spec!r} unavailable: {why}")
    dtype = dtype or case.dtype
    if case.spec == "torch":
        torch.manual_seed(seed)
        return TorchStack(case, dtype, case.device)
    return _mcore_stack(case, seed, dtype)
