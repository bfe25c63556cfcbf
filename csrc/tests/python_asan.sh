#!/usr/bin/env bash
# The Python test suite against an AddressSanitizer + UndefinedBehaviorSanitizer
# build of the extension softrank._C:
#   csrc/tests/python_asan.sh [pytest args]     (default: the whole suite)
# Builds build/asan-python (-DSOFTRANK_SANITIZE=ON -DSOFTRANK_BUILD_PYTHON=ON),
# then runs pytest with libasan preloaded (the interpreter itself is not
# instrumented) and leak detection off (CPython and the frameworks keep
# memory until exit by design); UBSan findings abort. The editable install is
# left alone: a pytest plugin (extension_pytest_plugin.py) loads the ASan
# softrank._C in its place. The CUDA core is left out (SOFTRANK_CUDA=OFF, by
# build_extension.sh): these tests run the CPU engine, and the main build
# compiles the kernels.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
ext="$(csrc/tests/build_extension.sh "${SOFTRANK_ASAN_BUILD:-build/asan-python}" \
  -DSOFTRANK_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo)"
libasan="$(${CXX:-c++} -print-file-name=libasan.so)"
# libstdc++ preloaded too: python itself does not link it, and ASan's
# __cxa_throw interceptor aborts ("real___cxa_throw != 0") on the first C++
# exception (every bad-input error of the bindings) unless it is there at start.
libstdcxx="$(${CXX:-c++} -print-file-name=libstdc++.so.6)"
export SOFTRANK_TEST_EXTENSION="$ext" SOFTRANK_TEST_EXTENSION_KIND=asan
export LD_PRELOAD="$libasan:$libstdcxx${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allow_user_segv_handler=1:handle_segv=1:detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$PWD/csrc/tests${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m pytest -p extension_pytest_plugin -p no:cacheprovider "${@:--q}"
