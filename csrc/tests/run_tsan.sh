#!/usr/bin/env bash
# The core's thread tests under ThreadSanitizer (clang; GCC's TSan runtime
# does not start on this kernel's memory layout):
#   csrc/tests/run_tsan.sh [group ...]     (default: threads)
set -euo pipefail
cd "$(dirname "$0")/../.."
cxx="${CXX:-$(command -v clang++ || command -v clang++-14)}"
out="${SOFTRANK_TSAN_BUILD:-build/tsan}"
mkdir -p "$out"
objs=()
for src in csrc/*.cpp csrc/tests/*.cpp; do
  obj="$out/$(basename "${src%.cpp}").o"
  "$cxx" -std=c++17 -O1 -g -fsanitize=thread -Icsrc -c "$src" -o "$obj"
  objs+=("$obj")
done
"$cxx" -fsanitize=thread "${objs[@]}" -pthread -o "$out/softrank_core_tests"
TSAN_OPTIONS="halt_on_error=1${TSAN_OPTIONS:+:$TSAN_OPTIONS}" "$out/softrank_core_tests" "${@:-threads}"
