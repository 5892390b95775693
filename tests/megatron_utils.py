"""Helpers for tests on real megatron-core layers: process groups on gloo, configs, spawning."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_parallel(rank: int, world_size: int, tp: int, init_file: str, seed: int = 1234) -> None:
    """Initialise torch.distributed (gloo, file store) and megatron's model-parallel groups."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(seed)
    try:
        model_parallel_cuda_manual_seed(seed)
    except Exception:  # the CUDA RNG tracker needs CUDA for its states; CPU tests don't use it
        pass


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def make_config(**overrides):
    """A small TransformerConfig for CPU tests (fp32, CPU initialisation)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def free_port_file(tmp_dir: str) -> str:
    return os.path.join(tmp_dir, "dist_init")


# ---- helpers for the DoRA / canonical LoRA / merge / exchange / checkpoint tests ----------------
def tiny_gpt_model(seed: int = 0, num_layers: int = 2, layer_spec=None, **overrides):
    """A tiny Llama-style GPTModel (local spec, SwiGLU, RMSNorm, GQA: 4 heads in 2 groups, ffn 96,
    vocab 128, no linear biases) on the CPU; model parallel state must be initialised.
    ``layer_spec`` replaces the local RMSNorm spec; ``overrides`` go to the config."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    try:
        model_parallel_cuda_manual_seed(seed)
    except Exception:  # needs CUDA for its states; CPU initialisation does not use them
        pass
    kw = dict(num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
              ffn_hidden_size=96, gated_linear_unit=True,
              activation_func=torch.nn.functional.silu, normalization="RMSNorm",
              add_bias_linear=False)
    kw.update(overrides)
    config = make_config(**kw)
    if layer_spec is None:
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return GPTModel(config=config, transformer_layer_spec=layer_spec,
                    vocab_size=128, max_sequence_length=32, position_embedding_type="rope")


def gpt_inputs(batch: int = 2, seq: int = 8, seed: int = 0):
    """(input_ids, position_ids, causal attention_mask) for ``tiny_gpt_model`` (True = masked)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    pos = torch.arange(seq).expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    return ids, pos, mask


def _gloo_entry(rank: int, fn, world_size: int, tp: int, init_file: str, args: tuple) -> None:
    from tests.conftest import install_megatron_cpu_shims

    install_megatron_cpu_shims()
    torch.set_num_threads(1)
    init_parallel(rank=rank, world_size=world_size, tp=tp, init_file=init_file)
    try:
        fn(rank, *args)
    finally:
        destroy_parallel()


def spawn_gloo(fn, tmp_dir: str, world_size: int = 2, tp: int = 2, args: tuple = ()) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` spawned processes with megatron's parallel state
    at tensor-parallel size ``tp`` on gloo; a failure in any rank fails the caller with its
    traceback. ``fn`` must be a module-level function (it is pickled)."""
    import torch.multiprocessing as mp

    init_file = os.path.join(str(tmp_dir), "dist_init_spawn")
    mp.spawn(_gloo_entry, args=(fn, world_size, tp, init_file, args), nprocs=world_size,
             join=True)


def qkv_row_indices(heads: int, groups: int, head_dim: int) -> dict[str, list[int]]:
    """Rows of q, k and v in megatron's fused qkv output, written out group by group: each
    query group holds its heads/groups q heads, then one k head, then one v head."""
    q, k, v = [], [], []
    qpg = heads // groups
    for g in range(groups):
        start = g * (qpg + 2) * head_dim
        q += range(start, start + qpg * head_dim)
        k += range(start + qpg * head_dim, start + (qpg + 1) * head_dim)
        v += range(start + (qpg + 1) * head_dim, start + (qpg + 2) * head_dim)
    return {"q": q, "k": k, "v": v}
