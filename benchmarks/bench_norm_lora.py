"""Benchmarks of the norm-fused LoRA linear (ln = RMSNorm(x); y = ln W^T + b + s B(A(dropout(ln))))
against the norm followed by the frozen base, our eager path, the norm followed by Hugging Face
PEFT, torch.compile, and the fused Triton and CUDA ops in each GEMM strategy (fused, cublas,
auto)."""

import pytest

from benchmarks.cases import grid_params, make_grid, param_id

PARAMS = grid_params(make_grid(), "norm_lora")


@pytest.mark.parametrize("param", PARAMS, ids=[param_id(p) for p in PARAMS])
def test_norm_lora(param, bench):
    bench(*param)
