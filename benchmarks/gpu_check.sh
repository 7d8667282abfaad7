#!/usr/bin/env bash
# One prepared GPU check for jaxkv: correctness on the GPU, then the decode and mixed-cache benchmarks
# with HBM-bandwidth fractions. Run from the repository root on a machine with an NVIDIA GPU:
#
#     bash benchmarks/gpu_check.sh                 # PEAK_GBS=3350 (H100 SXM HBM3) by default
#     PEAK_GBS=4800 bash benchmarks/gpu_check.sh   # H200
#
# It installs what is missing from the package registry (JAX with CUDA 12, the project and its test
# dependencies; wheels under .whl/ are used first, for machines without a network), then runs:
#   1. the correctness tests that matter on the GPU: split-K vs standard and the rest of
#      tests/test_attention.py, formats bit-exactness (tests/test_formats.py), the shared ggml traces in
#      the f64 and ggml-cpu modes (tests/test_ggml_cpu.py, tests/test_verify.py);
#   2. benchmarks/bench_decode.py and benchmarks/bench_mixed.py with --peak-gbs.
# Everything goes to stdout and to $OUT/gpu_check.log (OUT defaults to the current directory).
# The shared traces are looked up as JAXKV_SHARED or ../shared (see tests/conftest.py).
# Exit status: 0 when every step passed, else the number of failed steps.
# GPU_CHECK_ON_CPU=1 runs the same steps on the CPU backend (no install of jax[cuda12], no GPU assertion):
# a dry run that checks the script itself on a machine without a GPU.
set -u
PEAK_GBS=${PEAK_GBS:-3350}
OUT=${OUT:-.}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }
step() {  # step NAME CMD...: run, log, count failures
    local name=$1; shift
    say ""; say "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "=== $name: exit $rc, $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}
FAILED=0
PY=${PYTHON:-python3}

say "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"

# --- set-up: GPU JAX, the project, test dependencies ---------------------------------------------
FIND=()
[ -d .whl ] && FIND=(--find-links .whl)
ON_CPU=${GPU_CHECK_ON_CPU:-0}
if [ "$ON_CPU" != 1 ] && ! $PY -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
    step "install jax[cuda12]" $PY -m pip install -q "${FIND[@]}" -U "jax[cuda12]"
fi
for mod in gguf hypothesis pytest; do
    $PY -c "import $mod" 2>/dev/null || step "install $mod" $PY -m pip install -q "${FIND[@]}" "$mod"
done
$PY -c 'import jaxkv' 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step "backend" $PY -c "import jax; d = jax.devices()[0]; print(jax.__version__, jax.default_backend(), d.device_kind); assert $ON_CPU == 1 or jax.default_backend() == 'gpu', 'no GPU backend'"

# --- correctness on the GPU ------------------------------------------------------------------------
step "attention (split-K vs standard, online, GQA, masks, gradients)" $PY -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_cache.py
step "formats bit-exactness" $PY -m pytest -q -p no:cacheprovider tests/test_formats.py
step "shared ggml traces, f64 and ggml-cpu modes" $PY -m pytest -q -p no:cacheprovider tests/test_ggml_cpu.py tests/test_verify.py

# --- benchmarks ------------------------------------------------------------------------------------
step "bench_decode" $PY benchmarks/bench_decode.py --markdown --peak-gbs "$PEAK_GBS" --chunk 1024,4096,32768 --emitted
step "bench_mixed" $PY benchmarks/bench_mixed.py --markdown --dequant
step "bench_mixed (one chunk)" $PY benchmarks/bench_mixed.py --markdown --chunk 32768

say ""; say "gpu_check: $FAILED failed step(s); log in $LOG"
exit "$FAILED"
