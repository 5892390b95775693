"""Benchmarks of the fused LoRA linear (y = x W^T + b + s B(A(dropout(x)))) against the frozen
base, our eager path, Hugging Face PEFT, torch.compile and the fused Triton op in each GEMM
strategy (fused, cublas, auto)."""

import pytest

from benchmarks.cases import grid_params, make_grid, param_id

PARAMS = grid_params(make_grid(), "lora_linear")


@pytest.mark.parametrize("param", PARAMS, ids=[param_id(p) for p in PARAMS])
def test_lora_linear(param, bench):
    bench(*param)
