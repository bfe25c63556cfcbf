#!/usr/bin/env bash
# The core tests under valgrind memcheck (leaks and invalid accesses):
#   csrc/tests/run_valgrind.sh [build_dir] [group ...]
# build_dir: a CMake build with -DSOFTRANK_BUILD_TESTS=ON (default
# build/cpp-tests, configured and built here if absent). About 4 minutes for
# every group on 2 cores. Exit status non-zero on any memcheck error or leak.
set -euo pipefail
cd "$(dirname "$0")/../.."
build="${1:-build/cpp-tests}"
shift || true
if [ ! -x "$build/csrc/tests/softrank_core_tests" ]; then
  cmake -S . -B "$build" -DSOFTRANK_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$build" -j 2 >/dev/null
fi
exec valgrind --error-exitcode=3 --leak-check=full --show-leak-kinds=definite,indirect,possible \
  --errors-for-leak-kinds=definite,indirect,possible \
  --suppressions=csrc/tests/valgrind.supp \
  "$build/csrc/tests/softrank_core_tests" "$@"
