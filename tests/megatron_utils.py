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
