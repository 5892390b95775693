#!/usr/bin/env bash
# One command for a lent H100/H200: build csrc, run the GPU tests, run the GPU benchmark grid.
# Uses the machine's own python/torch/triton (nothing from the network) and writes every result
# and log under one folder:
#     OUT=benchmarks/results/gpu-myrun bash benchmarks/gpu_check.sh
# Time budget (under 9 minutes in all): build 120 s, tests 45 + 60 + 150 s, benchmarks 150 s. The
# kernel tests compile every Triton specialization they touch and autotune each (2-5 configs per
# kernel on sm_90), so most of their time is compilation; -v leaves a per-test log even on a
# timeout. The GEMM-strategy chooser and the autotuner keep their caches in $OUT/kernel-cache
# (BRIDGE_KERNEL_CACHE), and the chooser's file (what auto measured, both times per key) is copied
# to $OUT/gemm_strategy.json beside the results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export BRIDGE_KERNEL_CACHE="${BRIDGE_KERNEL_CACHE:-$OUT/kernel-cache}"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
STATUS="$OUT/status.txt"
: > "$STATUS"

step() {  # step NAME SECONDS CMD... : run with a time limit, log to $OUT/NAME.log, record rc
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    echo "$name rc=$rc $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$STATUS"
    return $rc
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
    "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|pytest|pytest-benchmark|peft|numpy|matplotlib) "
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. build bridge._C for sm_90 against this machine's torch (no build isolation, no downloads)
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
step build 120 "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || step build_retry 120 env PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install \
        --no-build-isolation --no-deps -e .
"$PY" -c "from bridge.kernels import _ext; print('bridge._C:', _ext.extension_status())" \
    | tee -a "$STATUS"

# 2. GPU tests: the gpu-marked tests, then the kernel tests compiled for the GPU (no interpreter;
#    tests/conftest.py then puts their tensors on "cuda"). The second step leaves out what the first
#    ran (-m gpu) and the slow ptxas spill check (a compile-only check the CPU CI runs with nvcc).
export BRIDGE_TEST_GPU=1 TRITON_INTERPRET=0
step tests_gpu_marked 45 "$PY" -m pytest -q -ra -p no:cacheprovider -m gpu tests \
    --junitxml="$OUT/tests_gpu_marked.xml"
# the GEMM-strategy chooser's other tests on the GPU (injected timers through the compiled ops;
# its gpu-marked ones, auto against both strategies and graph capture, ran in the step above)
step tests_gemm_strategy 60 "$PY" -m pytest -v -ra -p no:cacheprovider -m "not gpu" \
    tests/test_gemm_strategy.py --junitxml="$OUT/tests_gemm_strategy.xml"
KERNEL_TESTS=$(ls tests/test_lora_linear_triton.py tests/test_norm_lora.py tests/test_csrc.py \
    tests/test_philox.py 2>/dev/null)
step tests_kernels 150 "$PY" -m pytest -v -ra -p no:cacheprovider --maxfail=10 \
    -m "not gpu and not slow" --durations=15 $KERNEL_TESTS --junitxml="$OUT/tests_kernels.xml"
unset TRITON_INTERPRET

# 3. the GPU benchmark grid (headline shapes first; each op module stops after its budget)
step bench 150 "$PY" -m benchmarks.run --grid gpu --out "$OUT" --budget-s 60
cp "$BRIDGE_KERNEL_CACHE/gemm_strategy.json" "$OUT/gemm_strategy.json" 2>/dev/null \
    && echo "GEMM-strategy cache: $OUT/gemm_strategy.json" | tee -a "$STATUS"
"$PY" -m benchmarks.render_table "$OUT/results.csv" --out "$OUT/table.md" \
    && echo "table: $OUT/table.md"

echo "== done in ${SECONDS}s; results in $OUT"
cat "$STATUS"
