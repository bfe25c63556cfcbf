#!/usr/bin/env bash
# Builds the libFuzzer target of the softrank core with AddressSanitizer and
# UndefinedBehaviorSanitizer:  fuzz/build.sh [out_dir]   (default build/fuzz)
# Needs clang with libFuzzer (Debian: apt-get install clang libclang-rt-dev,
# or the versioned clang-14 / libclang-rt-14-dev). CXX overrides the compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-build/fuzz}"
mkdir -p "$out"
cxx="${CXX:-}"
if [ -z "$cxx" ]; then
  for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
    if command -v "$c" >/dev/null 2>&1; then cxx="$c"; break; fi
  done
fi
if [ -z "$cxx" ]; then
  echo "fuzz/build.sh: no clang++ found (apt-get install clang libclang-rt-dev)" >&2
  exit 2
fi
flags=(-std=c++17 -g -O1 -fno-omit-frame-pointer
       -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -fsanitize-coverage-ignorelist=fuzz/coverage_ignore.txt -Icsrc)
# Every core source (csrc/*.cpp: threading, dispatch, vector math), objects
# compiled in parallel (2 jobs: the machines are shared).
objs=()
pids=()
for src in csrc/*.cpp fuzz/fuzz_core.cpp; do
  obj="$out/$(basename "${src%.cpp}").o"
  objs+=("$obj")
  extra=()
  # The vendored AVX2 quicksort: its one file compiled for AVX2, as
  # CMakeLists.txt does (entered only where the CPU has it).
  if [ "$src" = csrc/simd_sort.cpp ] && [ "$(uname -m)" = x86_64 ]; then
    extra=(-mavx2 -mfma -mpopcnt -Icsrc/third_party/x86-simd-sort)
  fi
  "$cxx" "${flags[@]}" ${extra[@]+"${extra[@]}"} -c "$src" -o "$obj" &
  pids+=($!)
  if [ "${#pids[@]}" -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
"$cxx" "${flags[@]}" "${objs[@]}" -pthread -o "$out/fuzz_core"
echo "$out/fuzz_core"
