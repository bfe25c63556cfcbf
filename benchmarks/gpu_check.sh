#!/usr/bin/env bash
# The GPU check of softrank's CUDA core, in one go (well under 8 minutes):
#   1. build softrank in place with SOFTRANK_CUDA=ON (CMake, no network, no pip);
#   2. pytest -m cuda tests/test_cuda_core.py (the CUDA core against the CPU
#      engine); the summary counts its skips;
#   3. torchsort from a local source, where one is found (optional);
#   4. the GPU benchmark table (benchmarks/test_bench_cuda.py), then (4b)
#      pytest -m cuda tests/test_cuda.py (the torch and jax paths), a stage of
#      its own so that a timeout in one keeps the other's counts;
#   5. compute-sanitizer memcheck over forward + backward (float32/float64, l2/kl,
#      rank/sort, short and long rows), in what is left of the budget: last, so
#      that a slow sanitizer never costs the table;
#   6. where 100 s or more are left, benchmarks/gpu_tune.py (optional: reported,
#      not counted; the whole table is $logs/tune.log): many short rows under
#      each sort method (SOFTRANK_CUDA_SORT), the measurement that sort_method
#      (soft_ops.cu) waits for, then the long-row cells under other bounds on a
#      team's chunk count, the one that kMaxTeamJoin (team_ranges.h) waits for.
# Every stage has a timeout, cut to what is left of the total budget, so one hang
# does not eat the rest; a compact summary ends the output. Logs go to $OUT (set on
# the GPU machine) or a temporary directory.
#
# Run from anywhere: bash benchmarks/gpu_check.sh
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 470),
# TORCHSORT_SRC (a torchsort source tree; the device tool carries an ignored
# folder of the checkout, e.g. peers/torchsort, where one was unpacked),
# CMAKE_CUDA_ARCHITECTURES (default: the GPU's own compute capability).
# Exit status: 0 when every stage that ran passed, 1 when one failed or timed
# out, 2 when this machine cannot run the check (no GPU, a tool missing).
set -u

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# softrank is built in place (softrank/_C*.so), never installed: every Python
# process of the check imports it from here.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
# jax would take 75% of the GPU's memory at its first use, next to torch in the
# same test process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
budget=${GPU_CHECK_BUDGET_S:-470}
start=$(date +%s)
logs=${OUT:-$(mktemp -d -t softrank-gpu-check.XXXXXX)}
mkdir -p "$logs"
summary=()
failed=0

remaining() { echo $((budget - ($(date +%s) - start))); }

# stage NAME CAP_S COMMAND...: run with a timeout of min(CAP_S, what is left),
# log to $logs/NAME.log and show its tail; record the outcome for the summary.
stage() {
  local name=$1 cap=$2
  shift 2
  local left
  left=$(remaining)
  if ((left < 15)); then
    summary+=("$name: SKIPPED (budget spent)")
    failed=1
    return 1
  fi
  ((cap > left)) && cap=$left
  echo "=== $name (timeout ${cap}s)"
  local began rc
  began=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" >"$logs/$name.log" 2>&1
  rc=$?
  tail -n 25 "$logs/$name.log"
  local took=$(($(date +%s) - began))
  if ((rc == 0)); then
    summary+=("$name: ok (${took}s)")
  elif ((rc == 124 || rc == 137)); then
    summary+=("$name: TIMEOUT after ${took}s (log: $logs/$name.log)")
    failed=1
  else
    summary+=("$name: FAILED rc=$rc (${took}s, log: $logs/$name.log)")
    failed=1
  fi
  return $rc
}

finish() {
  echo
  echo "=== summary (total $(($(date +%s) - start))s, logs in $logs)"
  printf '  %s\n' "${summary[@]}"
  if [[ -f "$logs/benchmark.log" ]]; then
    sed -n '/^goals:/,$p' "$logs/benchmark.log"
  fi
  exit "$failed"
}

unavailable() {
  echo "gpu_check: cannot run here: $1" >&2
  exit 2
}

# --- 0. what this machine has --------------------------------------------------------
command -v "$py" >/dev/null || unavailable "no $py"
command -v cmake >/dev/null || unavailable "no cmake"
nvcc=$(command -v nvcc || ls "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" 2>/dev/null) ||
  unavailable "no nvcc (put the CUDA toolkit's bin on PATH or set CUDA_HOME)"
for module in torch pybind11 pytest numpy; do
  "$py" -c "import $module" 2>/dev/null || unavailable "Python module $module is missing"
done
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  unavailable "no NVIDIA GPU (nvidia-smi finds none): the build, the cuda tests and the benchmarks need one"
fi
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  unavailable "torch sees no CUDA device (a CPU-only torch, or no driver)"
echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader | head -n 1)"
echo "nvcc: $("$nvcc" --version | tail -n 1); $("$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
echo "jax: $(timeout 60 "$py" -c 'import jax, jaxlib; print(jax.__version__, "jaxlib", jaxlib.__version__, "devices", jax.devices())' 2>&1 | tail -n 1)"
echo "logs: $logs"

# --- 1. build -----------------------------------------------------------------------
archs=${CMAKE_CUDA_ARCHITECTURES:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader |
  head -n 1 | tr -d ' .')}
generator=""
command -v ninja >/dev/null && generator="-GNinja"
export py nvcc archs generator
# (A function run by timeout through bash -c: it sees only exported names.)
build() {
  set -e
  cmake -S . -B build/gpu $generator -DSOFTRANK_BUILD_PYTHON=ON -DSOFTRANK_CUDA=ON \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES="$archs" \
    -DPython_EXECUTABLE="$(command -v "$py")" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)"
  cmake --build build/gpu --target _C -j "$(nproc)"
  local built
  built=$(ls build/gpu/_C*.so | head -n 1)
  cp "$built" "softrank/.$(basename "$built").tmp"
  mv "softrank/.$(basename "$built").tmp" "softrank/$(basename "$built")"
  # The core must see the GPU that torch sees: a driver older than the toolkit
  # (the CUDA runtime is linked statically) gives a device count of 0, and
  # every cuda test would skip.
  "$py" - <<'PYEOF'
from softrank import _C
assert _C.cuda_compiled(), "built without the CUDA core"
count = _C.cuda_device_count()
print("cuda_device_count", count)
assert count > 0, ("the CUDA core sees no device (a driver older than the toolkit?): "
                   "check nvidia-smi's CUDA version against nvcc's")
print("XLA FFI CUDA handlers:", sorted(_C.xla_ffi_cuda_targets()))
try:
    import softrank.jax as srj
    print("softrank.jax CUDA targets registered:", sorted(srj._CUDA_FFI_TARGETS))
except Exception as exc:  # jax absent or broken: its tests skip and say so
    print("softrank.jax does not import:", type(exc).__name__, exc)
PYEOF
}
export -f build
stage build 240 bash -c build || finish

# --- 2. the cuda tests ------------------------------------------------------------------
pytest_args=(-q -p no:cacheprovider -m cuda -rs)
if ! "$py" -c "import hypothesis" 2>/dev/null; then
  # tests/conftest.py needs hypothesis; the cuda tests do not.
  pytest_args+=(--noconftest -o "markers=cuda: needs a CUDA GPU")
fi
# pytest's last line ("N passed, M skipped in T s") on the summary: a skipped
# cuda test on a GPU machine is coverage missing (the -rs list in the log says why).
# Two stages: a timeout kills pytest before its summary, and the core's tests
# (kernels against the CPU engine) should not be lost to the adapters' (cold
# torch.compile and jax jit compiles).
cuda_tests() {
  local name=$1 cap=$2 file=$3
  stage "$name" "$cap" "$py" -m pytest "${pytest_args[@]}" --durations=10 "$file"
  local counts
  counts=$(grep -E '[0-9]+ (passed|failed|error)' "$logs/$name.log" 2>/dev/null | tail -n 1 | tr -d '=')
  [[ -n "$counts" ]] && summary[${#summary[@]} - 1]+=" [${counts# }]"
  return 0
}
cuda_tests tests_core 150 tests/test_cuda_core.py
# (tests/test_cuda.py runs after the benchmark table: see stage 4b.)

# --- 3. torchsort (optional) --------------------------------------------------------------
torchsort_src=""
for candidate in "${TORCHSORT_SRC:-}" "$root/../peers/torchsort" "$root/peers/torchsort" \
  /work/peers/torchsort; do
  if [[ -n "$candidate" && -f "$candidate/setup.py" ]]; then
    torchsort_src=$candidate
    break
  fi
done
if "$py" -c "import torchsort" 2>/dev/null; then
  summary+=("torchsort: already importable")
elif [[ -z "$torchsort_src" ]]; then
  summary+=("torchsort: SKIPPED (no local source: set TORCHSORT_SRC to a torchsort checkout)")
elif (($(remaining) < 200)); then
  summary+=("torchsort: SKIPPED (under 200 s left for it and the benchmarks)")
else
  # (Installed beside the logs, not under them: $OUT comes back to the caller.)
  torchsort_site=$(mktemp -d -t softrank-torchsort.XXXXXX)
  failed_before=$failed
  if stage torchsort 150 "$py" -m pip install --no-build-isolation --no-deps --no-index \
    --target "$torchsort_site" "$torchsort_src"; then
    export PYTHONPATH="$torchsort_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    # Optional: its failure is reported, not counted.
    summary[${#summary[@]} - 1]+=" (optional: benchmarks run without it)"
    failed=$failed_before
  fi
fi

# --- 4. the benchmark table -----------------------------------------------------------------
stage benchmark 240 "$py" benchmarks/test_bench_cuda.py

# --- 4b. the torch and jax paths on the GPU -------------------------------------------------
# After the table: their cold torch.compile and jax compiles are the slowest
# tests, and the table is what the check exists to show.
cuda_tests tests_adapters 150 tests/test_cuda.py

# --- 5. compute-sanitizer -----------------------------------------------------------------
# (nvcc on PATH may be a wrapper script: the toolkit's own bin is looked in too.)
sanitizer=""
for candidate in "$(command -v compute-sanitizer)" "$(dirname "$nvcc")/compute-sanitizer" \
  "$(dirname "$(readlink -f "$nvcc")")/compute-sanitizer" \
  "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
  "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
  if [[ -n "$candidate" && -x "$candidate" && ! -d "$candidate" ]]; then
    sanitizer=$candidate
    break
  fi
done
if [[ -n "$sanitizer" ]]; then
  cat >"$logs/sanitize.py" <<'EOF'
# Forward and backward through softrank's CUDA kernels, for compute-sanitizer.
import torch

import softrank.torch as srt

torch.manual_seed(0)
both = (torch.float32, torch.float64)
# A thread per row, a block per row, rows sorted whole (few rows of >= 4096),
# every operator, regularization and product; then the grid (a cooperative
# launch) on one row of 2^20 + 3 items, two of the four operators (rank l2 and
# sort kl, forward and backward): memcheck is slow there, and the grid runs
# the same team routines for all four.
cases = [(n, rows, dtype, fn, reg, True)
         for n, rows in ((1, 3), (7, 5), (1000, 16), (5000, 4)) for dtype in both
         for fn in (srt.soft_rank, srt.soft_sort) for reg in ("l2", "kl")]
cases += [(2**20 + 3, 1, torch.float32, srt.soft_rank, "l2", False),
          (2**20 + 3, 1, torch.float32, srt.soft_sort, "kl", False)]
for n, rows, dtype, fn, reg, with_jvp in cases:
    x = torch.randn(rows, n, dtype=dtype, device="cuda")
    if rows > 1:
        x[0, n // 2] = float("nan")  # a non-finite row
    leaf = x.clone().requires_grad_()
    y = fn(leaf, 0.5, regularization=reg, direction="descending" if n == 7 else "ascending")
    y.backward(torch.randn_like(y))
    if with_jvp:
        _ = torch.func.jvp(lambda v: fn(v, 0.5, regularization=reg), (x,), (x,))
# A forged state handed to the ops directly: perm entries outside [0, n) must
# read clamped (soft_row.h, ClampedPositions), on a thread per row and a team.
for n, rows in ((7, 5), (5000, 2)):
    x = torch.randn(rows, n, device="cuda")
    for op, reg in ((0, 0), (1, 1)):
        params = (op, reg, False, 0.5)
        out, perm, block_start = torch.ops.softrank.soft_forward(x, *params)
        for forged in (-1, n, 2**31 - 1):
            bad = perm.clone()
            bad[:, ::3] = forged
            for name in ("soft_vjp", "soft_jvp"):
                getattr(torch.ops.softrank, name)(x, out, bad, block_start, torch.randn_like(x),
                                                  *params)
torch.cuda.synchronize()
print("sanitizer script done")
EOF
  # Without the caching allocator every tensor is its own allocation, so memcheck
  # sees an access past an output or the workspace. API errors are not counted:
  # the core checks every call it makes (and throws), and a cooperative launch
  # that the instrumented device refuses is an expected, handled error.
  stage sanitizer 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$sanitizer" --tool memcheck --report-api-errors no --error-exitcode 1 --print-limit 20 \
    "$py" "$logs/sanitize.py"
else
  summary+=("sanitizer: SKIPPED (no compute-sanitizer on PATH, next to $nvcc or in ${CUDA_HOME:-/usr/local/cuda})")
fi

# --- 6. the sort and team cut sweeps (optional) -----------------------------------------------------------
if (($(remaining) >= 100)); then
  failed_before=$failed
  # (Its whole table is $logs/tune.log; the stage shows its last 25 lines.)
  if ! stage tune $(($(remaining) - 10)) "$py" benchmarks/gpu_tune.py; then
    summary[${#summary[@]} - 1]+=" (optional)"
    failed=$failed_before
  fi
else
  summary+=("tune: SKIPPED (under 100 s left)")
fi

finish
