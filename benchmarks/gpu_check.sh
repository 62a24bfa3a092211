#!/usr/bin/env bash
# The GPU check of fused_attn_at, in one command, on a machine with an NVIDIA GPU where a CUDA build of torch is
# already installed (e.g. the H200 lent by the device tool: torch 2.11+cu130, triton 3.6, nvcc 13.0, no network):
#
#   1. builds and installs the package against that torch: pip install --no-build-isolation --no-deps --no-index .
#      (the CPU and CUDA kernels; if that fails, installs it without the compiled extension and goes on);
#   2. runs the GPU tests (tests/test_gpu.py) against the installed package;
#   3. runs the GPU benchmark (benchmarks/gpu_check.py: fused CUDA, fused Triton, eager reference,
#      torch.compile(reference); fwd, bwd, fwd+bwd; B=64, T in 64..8192, H 256/512; GB/s and % of the device
#      copy bandwidth measured in the same run; then the self-attention rows, a quarter of the budget kept for
#      them: perturbed_attention backend='triton' (no perturbation, and AT with a dense G) vs torch SDPA, fwd and
#      fwd+bwd, T in 1024..16384, B=4..1, nh=8, d=64, bfloat16, after a numerical check at T=1024 that fails the
#      run on a mismatch) with the time that is left,
# and writes OUT_DIR/gpu_check.json, OUT_DIR/gpu_check.md (printed last) and build.log, tests.log, tests.xml,
# bench.log beside them. Everything fits in GPU_CHECK_BUDGET_S seconds (default 470, under 8 minutes).
#
#   benchmarks/gpu_check.sh [OUT_DIR]          OUT_DIR defaults to $OUT, else ./gpu_check_out
#
# Environment: PYTHON (default python3), CUDA_HOME (default: the first toolkit root with bin/nvcc and libcudart),
# TORCH_CUDA_ARCH_LIST (default: the GPU's compute capability), MAX_JOBS (default: all cores),
# GPU_CHECK_BUDGET_S, GPU_CHECK_BENCH_ARGS (more arguments for gpu_check.py, e.g. "--no-extras"),
# GPU_CHECK_PYTEST_ARGS (more arguments for pytest), GPU_CHECK_SKIP_BUILD=1 (use the package as installed:
# tests/test_gpu.py runs this script that way on a CPU, with GPU_CHECK_BENCH_ARGS="--device cpu ...").
# Exit status: 0 when the build, the tests and the benchmark all succeeded, 1 otherwise (the files are written
# either way).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$PWD/gpu_check_out}}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
START=$(date +%s)
STATUS=0
export PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check.sh $(elapsed)s] $*"; }

# --- the toolkit torch builds with: a root holding bin/nvcc and the CUDA runtime library ------------------
toolkit_ok() { [ -x "$1/bin/nvcc" ] && ls "$1"/lib64/libcudart* "$1"/lib/libcudart* \
  "$1"/targets/*/lib/libcudart* >/dev/null 2>&1; }
if [ -z "${CUDA_HOME:-}" ] || ! toolkit_ok "$CUDA_HOME"; then
  candidates=(/usr/local/cuda /usr/local/cuda-*)
  if command -v nvcc >/dev/null 2>&1; then
    candidates+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")")
  fi
  for root in "${candidates[@]}"; do
    if toolkit_ok "$root"; then export CUDA_HOME="$root"; break; fi
  done
fi
say "CUDA_HOME=${CUDA_HOME:-<none found>}"
if [ -n "${CUDA_HOME:-}" ]; then export PATH="$CUDA_HOME/bin:$PATH"; fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "python", sys.version.split()[0])' \
  2>&1 | sed 's/^/[gpu_check.sh] /'
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null \
  | sed 's/^/[gpu_check.sh] nvidia-smi: /'

# --- 1. build and install ---------------------------------------------------------------------------------
build() {
  say "building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS) -> $OUT_DIR/build.log"
  if (cd "$REPO" && timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v .) \
      >"$OUT_DIR/build.log" 2>&1; then
    BUILD_STATUS="ok"
    return
  fi
  BUILD_STATUS="FAILED (build.log); installed without the compiled extension"
  STATUS=1
  say "build failed: tail of build.log:"
  tail -n 30 "$OUT_DIR/build.log"
  (cd "$REPO" && FUSED_ATTN_AT_NO_EXT=1 timeout 120 "$PY" -m pip install --no-build-isolation --no-deps \
    --no-index .) >>"$OUT_DIR/build.log" 2>&1
}
BUILD_START=$(date +%s)
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ]; then
  BUILD_STATUS="skipped (GPU_CHECK_SKIP_BUILD=1)"
else
  build
fi
BUILD_SECONDS=$(( $(date +%s) - BUILD_START ))
# Import from outside the checkout, so the installed package (with its compiled module) is the one found.
(cd "$OUT_DIR" && "$PY" -c 'import fused_attn_at, torch
from fused_attn_at.ops import cpp, triton_attention_pool as tri
print("backends on cuda:", fused_attn_at.available_backends("cuda"), "| cuda kernels:", cpp.CUDA_AVAILABLE,
      cpp.UNAVAILABLE_REASON or "", "| triton:", tri.AVAILABLE, tri.UNAVAILABLE_REASON or "")') 2>&1 \
  | sed 's/^/[gpu_check.sh] /'
say "build: $BUILD_STATUS (${BUILD_SECONDS}s)"

# --- 2. GPU tests -----------------------------------------------------------------------------------------
# shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS and GPU_CHECK_BENCH_ARGS are lists of words on purpose
# A fresh machine JIT-compiles every Triton variant the tests touch and runs torch.compile: most of this limit.
TEST_LIMIT=$(( BUDGET * 7 / 15 ))
say "GPU tests (limit ${TEST_LIMIT}s) -> $OUT_DIR/tests.log"
# From OUT_DIR (not the checkout), so `import fused_attn_at` finds the installed package.
# SIGINT first: pytest then stops like on Ctrl-C and still writes its summary and tests.xml.
(cd "$OUT_DIR" && timeout -s INT -k 20 "$TEST_LIMIT" "$PY" -m pytest "$REPO/tests/test_gpu.py" -q -ra \
  -p no:cacheprovider -p no:benchmark \
  --junitxml="$OUT_DIR/tests.xml" ${GPU_CHECK_PYTEST_ARGS:-}) >"$OUT_DIR/tests.log" 2>&1
TEST_RC=$?
tail -n 25 "$OUT_DIR/tests.log"
TESTS_STATUS="exit status $TEST_RC"
if [ "$TEST_RC" -eq 124 ] || [ "$TEST_RC" -eq 137 ] || [ "$TEST_RC" -eq 2 ]; then
  TESTS_STATUS="stopped after ${TEST_LIMIT}s or interrupted (exit status $TEST_RC, tests.log)"
fi
if [ "$TEST_RC" -ne 0 ]; then STATUS=1; say "GPU tests: $TESTS_STATUS"; fi

# --- 3. benchmark with the time left ------------------------------------------------------------------------
BENCH_BUDGET=$(( BUDGET - $(elapsed) - 30 ))
if [ "$BENCH_BUDGET" -lt 60 ]; then BENCH_BUDGET=60; fi
say "benchmark (budget ${BENCH_BUDGET}s) -> $OUT_DIR/bench.log"
(cd "$OUT_DIR" && timeout $(( BENCH_BUDGET + 120 )) "$PY" "$REPO/benchmarks/gpu_check.py" --out "$OUT_DIR" \
  --budget-s "$BENCH_BUDGET" --junit "$OUT_DIR/tests.xml" --tests-status "$TESTS_STATUS" \
  --build-status "$BUILD_STATUS" \
  --build-seconds "$BUILD_SECONDS" ${GPU_CHECK_BENCH_ARGS:-}) 2>&1 | tee "$OUT_DIR/bench.log"
BENCH_RC=${PIPESTATUS[0]}
if [ "$BENCH_RC" -ne 0 ]; then STATUS=1; say "benchmark exit status $BENCH_RC"; fi
say "done, exit status $STATUS; files in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
exit "$STATUS"
