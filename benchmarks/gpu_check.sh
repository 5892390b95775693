#!/usr/bin/env bash
# The one prepared script for a lent GPU (H100/H200): build bridge._C, run the GPU tests, run the
# GPU benchmark grids, and write every result, log and kernel cache under one folder, in under
# 8 minutes (stage limits sum to 425 s, 450 s at worst with the background build). Run it first:
#     bash benchmarks/gpu_check.sh                  # results in $OUT (default below)
#     OUT=/some/folder bash benchmarks/gpu_check.sh
# Default OUT: benchmarks/results/<gpu-slug>-<YYYYmmdd-HHMMSS> (e.g. gpu-nvidia-h200-...);
# $OUT/folder.txt names that folder for committing the results when OUT was given.
#
# Knobs (environment):
#   GPU_CHECK_STAGES="bench_layer report"   run only these stages (a rerun of what failed; the
#                                           others are listed as skipped). Stage names: see PLAN.
#   GPU_CHECK_TIME_PCT=150                  scale every stage limit (percent; default 100, the
#                                           dry run 300)
#   GPU_CHECK_PLAN=1                        print the stages (name, limit, command) and exit
#   GPU_CHECK_DRY_RUN=1                     on a CPU machine: every stage with tiny shapes under
#                                           the Triton interpreter (tests collected, not run;
#                                           install and build skipped), OUT under results/cpu-*
#   GPU_CHECK_HIDE_MEGATRON=1               run as if megatron-core were absent (default in the
#                                           dry run: the GPU image has no megatron-core)
#   GPU_CHECK_DRY_BUILD=1                   the dry run also compiles bridge._C (into build/, not
#                                           installed)
#   PYTHON=...                              the interpreter (default python3; dry run: .venv)
#
# megatron-core: the GPU image lacks it. None of the GPU tests need it (they test bridge.kernels,
# which never imports megatron). The layer benchmark uses megatron-core's local layer spec when
# it can: stage `mcore` installs a carried wheel (build/gpu-wheels/megatron_core-*-cp<py>-*.whl,
# from `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 megatron-core==0.16.1 -d build/gpu-wheels`; the device tool's
# carry list: ["build/gpu-wheels"]) into a scratch folder on PYTHONPATH for that stage only;
# without it the layer benchmark runs its plain-torch Llama blocks (--spec torch).
#
# Every stage has its own time limit (SIGINT at the limit, so pytest writes its report and the
# benchmark runners write the rows they have; SIGKILL 10 s later), logs to $OUT/logs/<stage>.log,
# and records "name rc seconds" in $OUT/status.txt; a failed stage never stops the script.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=${GPU_CHECK_DRY_RUN:-0}
PLAN=${GPU_CHECK_PLAN:-0}
HIDE=${GPU_CHECK_HIDE_MEGATRON:-$DRY}
PCT=${GPU_CHECK_TIME_PCT:-$([ "$DRY" = 1 ] && echo 300 || echo 100)}  # the dry run: 2 slow cores
ONLY=" $(echo "${GPU_CHECK_STAGES:-}" | tr ',' ' ') "
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
STAMP=$(date +%Y%m%d-%H%M%S)
if [ "$DRY" = 1 ]; then SLUG=cpu-dryrun
else
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    SLUG=gpu-$(echo "${GPU_NAME:-unknown}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
fi
FOLDER=benchmarks/results/$SLUG-$STAMP
OUT=${OUT:-$FOLDER}
[ "$PLAN" = 1 ] || mkdir -p "$OUT/logs" "$OUT/parts"
OUT=$(cd "$OUT" 2>/dev/null && pwd || echo "$OUT")
STATUS=$OUT/status.txt

if [ "$DRY" = 1 ]; then  # tiny shapes on the CPU: kernels under the interpreter, tests collected
    GRID=tiny; COLLECT=--collect-only; TEST_ENV=(TRITON_INTERPRET=1 BRIDGE_TEST_GPU=0)
    BENCH_ENV=(TRITON_INTERPRET=1); BENCH_FLAGS=(--no-interp --no-host)
else
    GRID=gpu; COLLECT=; TEST_ENV=(BRIDGE_TEST_GPU=1 TRITON_INTERPRET=0)
    BENCH_ENV=(TRITON_INTERPRET=0); BENCH_FLAGS=()
fi
export BRIDGE_KERNEL_CACHE=$OUT/kernel-cache  # the chooser's and the autotuner's JSON files
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 MPLBACKEND=Agg
[ "$HIDE" = 1 ] && export PYTHONPATH=$REPO/benchmarks/hide_megatron${PYTHONPATH:+:$PYTHONPATH}

log() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*"; }
selected() { [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $1 "* ]]; }
record() { echo "$1 rc=$2 $3s (limit $4s)$([ "$2" = 124 ] && echo ' TIMED OUT')" >> "$STATUS"; }

stage() {  # stage NAME LIMIT CMD...: run CMD within LIMIT seconds (scaled by PCT), log, record
    local name=$1 limit=$(( $2 * PCT / 100 )); shift 2
    if [ "$PLAN" = 1 ]; then printf 'stage\t%s\t%s\t' "$name" "$limit"; printf '%q ' "$@"; echo; return 0; fi
    if ! selected "$name"; then log "skip $name (not in GPU_CHECK_STAGES)"; return 0; fi
    log "start $name (limit ${limit}s): $*"
    local t0=$SECONDS rc
    timeout -s INT -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    tail -n 12 "$OUT/logs/$name.log" | sed 's/^/    | /'
    log "end $name rc=$rc after $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
    record "$name" "$rc" "$((SECONDS - t0))" "$limit"
    return $rc
}

BG_PID=; BG_NAME=; BG_T0=0; BG_LIMIT=0
stage_bg() {  # stage_bg NAME LIMIT CMD...: the same in the background; stage_wait collects it
    local name=$1 limit=$(( $2 * PCT / 100 )); shift 2
    if [ "$PLAN" = 1 ]; then printf 'background\t%s\t%s\t' "$name" "$limit"; printf '%q ' "$@"; echo; return 0; fi
    if ! selected "$name"; then log "skip $name (not in GPU_CHECK_STAGES)"; return 0; fi
    log "start $name in the background (limit ${limit}s): $*"
    BG_NAME=$name; BG_T0=$SECONDS; BG_LIMIT=$limit
    timeout -s INT -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1 &
    BG_PID=$!
}
stage_wait() {
    [ -n "$BG_PID" ] || return 0
    log "waiting for $BG_NAME"
    wait "$BG_PID"; local rc=$?
    tail -n 12 "$OUT/logs/$BG_NAME.log" | sed 's/^/    | /'
    log "end $BG_NAME rc=$rc after $((SECONDS - BG_T0))s"
    record "$BG_NAME" "$rc" "$((SECONDS - BG_T0))" "$BG_LIMIT"
    BG_PID=
}

if [ "$PLAN" != 1 ]; then
    echo "== $STAMP stages: ${GPU_CHECK_STAGES:-all}" >> "$STATUS"  # a rerun appends
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
    TEE_PID=$!
    log "gpu_check: OUT=$OUT (commit as $FOLDER); python $PY; dry run $DRY; megatron hidden $HIDE"
    echo "$FOLDER" > "$OUT/folder.txt"
fi

# ---- 0. the machine ------------------------------------------------------------------------
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
ARCH=${ARCH:-9.0}
stage env 10 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap \
--format=csv 2>&1; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", \
torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpu\", \
torch.cuda.get_device_name() if torch.cuda.is_available() else None)'; $PY -m pip list 2>/dev/null \
| grep -iE '^(torch|triton|pytest|pytest-benchmark|peft|numpy|matplotlib|setuptools|megatron-core) '"
[ "$PLAN" = 1 ] || cp "$OUT/logs/env.log" "$OUT/env.txt" 2>/dev/null

# ---- 1. install (Python only, seconds), then bridge._C built in the background --------------
# The editable install maps bridge.kernels onto kernels/; the extension is then built beside the
# sources (build_ext into build/gpu_check, moved into bridge/ in one rename) while the Triton
# tests run, so its nvcc time is off the critical path. Tests that need bridge._C run after it.
BUILD="BRIDGE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH $PY setup.py build_ext --build-lib build/gpu_check/lib \
--build-temp build/gpu_check/tmp && ls -l build/gpu_check/lib/bridge/_C*.so"
if [ "$DRY" = 1 ]; then  # the venv stays as it is; the build (opt-in) is left in build/gpu_check
    stage install 25 echo "dry run: would run: BRIDGE_BUILD_CUDA=0 $PY -m pip install --no-build-isolation --no-deps -e ."
    [ "${GPU_CHECK_DRY_BUILD:-0}" = 1 ] && stage_bg build 170 bash -c "$BUILD"
else
    stage install 25 env BRIDGE_BUILD_CUDA=0 "$PY" -m pip install --no-build-isolation --no-deps -e .
    stage_bg build 170 bash -c "$BUILD && mv build/gpu_check/lib/bridge/_C*.so bridge/"
fi

# ---- 2. megatron-core for the layer benchmark (a carried wheel), or the plain-torch blocks ----
MCORE_SITE=${TMPDIR:-/tmp}/gpu_check_mcore_site
PYTAG=$($PY -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")' 2>/dev/null)
WHEEL=$(ls build/gpu-wheels/megatron_core-*-"$PYTAG"-*.whl 2>/dev/null | head -n 1)
LAYER_SPEC=(--spec torch); LAYER_PATH=${PYTHONPATH:-}
if [ "$HIDE" = 1 ]; then
    stage mcore 10 echo "megatron-core hidden (GPU_CHECK_HIDE_MEGATRON=1): layer spec torch"
elif [ "$PLAN" != 1 ] && "$PY" -c "import megatron.core" 2>/dev/null; then
    LAYER_SPEC=(--spec mcore-local)
    stage mcore 10 "$PY" -c "import megatron.core as m; print('megatron-core', m.__version__, 'installed')"
elif [ -n "$WHEEL" ]; then
    LAYER_SPEC=(--spec mcore-local); LAYER_PATH=$MCORE_SITE${PYTHONPATH:+:$PYTHONPATH}
    stage mcore 10 "$PY" -m pip install -q --no-deps --no-index --target "$MCORE_SITE" "$WHEEL" \
        || LAYER_SPEC=(--spec torch)
else
    stage mcore 10 echo "no megatron-core and no build/gpu-wheels/megatron_core-*-$PYTAG-*.whl: layer spec torch"
fi

# ---- 3. GPU tests (kernels compiled for this GPU: BRIDGE_TEST_GPU=1 TRITON_INTERPRET=0) -------
# None needs megatron-core. The slow-marked ptxas spill check of csrc (sm_80 and sm_90 from one
# build log) stays with the CPU CI. -v keeps a per-test log even on a timeout.
PYTEST=("$PY" -m pytest -v -ra -p no:cacheprovider --maxfail=10 -m "not slow" --durations=15 $COLLECT)
stage tests_triton 85 env "${TEST_ENV[@]}" "${PYTEST[@]}" --junitxml="$OUT/tests_triton.xml" \
    tests/test_lora_linear_triton.py tests/test_gemm_kernel.py tests/test_gemm_strategy.py \
    tests/test_philox.py
stage tests_grouped_multi 50 env "${TEST_ENV[@]}" "${PYTEST[@]}" --junitxml="$OUT/tests_grouped_multi.xml" \
    tests/test_grouped_lora_linear.py tests/test_multi_lora_linear.py
stage_wait
[ "$PLAN" = 1 ] || "$PY" -c "from bridge.kernels import _ext; print('bridge._C:', _ext.extension_status())" \
    2>&1 | tee -a "$STATUS"
stage tests_csrc_norm 45 env "${TEST_ENV[@]}" "${PYTEST[@]}" --junitxml="$OUT/tests_csrc_norm.xml" \
    tests/test_csrc.py tests/test_norm_lora.py

# ---- 4. GPU benchmarks: one stage per grid (a CUDA error is sticky per process), each with an
#         inner budget below its limit so it stops between cases and writes its rows ------------
RUN=("$PY" -m benchmarks.run --grid "$GRID" --no-layer --no-plots "${BENCH_FLAGS[@]}")
stage bench_lora_linear 60 env "${BENCH_ENV[@]}" "${RUN[@]}" --ops lora_linear --budget-s 38 \
    --out "$OUT/parts/lora_linear"
# the layer step writes its CSV when it ends: one process per dropout, so a limit keeps p = 0
LAYER=(env "${BENCH_ENV[@]}" PYTHONPATH="$LAYER_PATH" "$PY" -m benchmarks.bench_layer --grid "$GRID"
       "${LAYER_SPEC[@]}")
stage bench_layer 35 "${LAYER[@]}" --p 0 --csv "$OUT/parts/layer_p0/layer.csv"
stage bench_layer_p01 20 "${LAYER[@]}" --p 0.1 --csv "$OUT/parts/layer_p0.1/layer.csv"
stage bench_norm_lora 25 env "${BENCH_ENV[@]}" "${RUN[@]}" --ops norm_lora --budget-s 12 \
    --out "$OUT/parts/norm_lora"
stage bench_grouped 20 env "${BENCH_ENV[@]}" "${RUN[@]}" --ops grouped_lora_linear --budget-s 8 \
    --out "$OUT/parts/grouped_lora_linear"
stage bench_multi 20 env "${BENCH_ENV[@]}" "${RUN[@]}" --ops multi_lora_linear --budget-s 8 \
    --out "$OUT/parts/multi_lora_linear"

# ---- 5. one results folder: results.csv, summary.txt (layer step first), table.md, plots -------
stage report 20 bash -c "$PY -m benchmarks.run --merge $OUT/parts/* --out $OUT --no-plots && \
$PY -m benchmarks.render_table $OUT/results.csv --out $OUT/table.md && \
($PY -m benchmarks.plots $OUT/results.csv || echo 'plots not drawn (is matplotlib installed?)')"

[ "$PLAN" = 1 ] && exit 0
log "done in ${SECONDS}s; results in $OUT (commit as $FOLDER)"
cat "$STATUS"
exec >&- 2>&-  # let tee write the last lines of gpu_check.log before the script returns
wait "$TEE_PID" 2>/dev/null
exit 0
