#!/usr/bin/env bash
# Builds the extension softrank._C alone (no CUDA core) in a build directory of
# its own, for the test runs against another build of it (python_asan.sh,
# python_portable.sh), and prints the path of the module:
#   csrc/tests/build_extension.sh BUILD_DIR [CMAKE_ARGS...]
# Environment: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
build="$1"
shift
cmake -S . -B "$build" -DSOFTRANK_BUILD_PYTHON=ON -DSOFTRANK_CUDA=OFF \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
  "$@" >/dev/null
cmake --build "$build" -j 2 --target _C >/dev/null
ls "$PWD/$build"/_C*.so | head -1
