#!/usr/bin/env bash
# Python tests against a build of the extension softrank._C with the portable
# code only (-DSOFTRANK_PORTABLE_ONLY=ON: no AVX2 / AVX-512 variants, no
# x86-simd-sort), the code that arm64 builds (Linux aarch64, macOS arm64 wheels)
# run; on x86-64 nothing else exercises it (SOFTRANK_DISABLE_AVX512=1 stops at AVX2):
#   csrc/tests/python_portable.sh [pytest args]
# (default: the engine-level tests, which compare the engine with the numba
# engine and the independent references, in-process). Builds
# build/portable-python (build_extension.sh); the editable install is left
# alone: a pytest plugin (extension_pytest_plugin.py) loads this softrank._C in
# its place. Tests that check the engine in a child process (test_simd_paths.py,
# ...) would import the package's own extension: pass in-process tests only.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
SOFTRANK_TEST_EXTENSION="$(csrc/tests/build_extension.sh \
  "${SOFTRANK_PORTABLE_BUILD:-build/portable-python}" -DSOFTRANK_PORTABLE_ONLY=ON \
  -DCMAKE_BUILD_TYPE=Release)"
export SOFTRANK_TEST_EXTENSION
export SOFTRANK_TEST_EXTENSION_KIND=portable
"$PY" -c "
import importlib.util, sys
spec = importlib.util.spec_from_file_location('softrank._C', sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert not module.simd_variants_compiled(), 'built with the x86 variants'
" "$SOFTRANK_TEST_EXTENSION"
export PYTHONPATH="$PWD/csrc/tests${PYTHONPATH:+:$PYTHONPATH}"
if (($# == 0)); then
  set -- -q tests/test_engine_contract.py tests/test_reliability_engine.py \
    tests/test_numpy_reference.py tests/test_numpy_gradients.py \
    tests/test_numpy_limits_invariants.py tests/test_isotonic.py tests/test_operators_engine.py \
    tests/test_reliability_threads.py
fi
exec "$PY" -m pytest -p extension_pytest_plugin -p no:cacheprovider "$@"
