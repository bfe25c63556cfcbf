"""pytest plugin: run the Python tests against another build of the extension
softrank._C, named by SOFTRANK_TEST_EXTENSION (its path) and
SOFTRANK_TEST_EXTENSION_KIND (what it is: "asan" from csrc/tests/python_asan.sh,
"portable" from csrc/tests/python_portable.sh).

It loads that softrank._C before anything imports the package's own, so the
engine (softrank._engine) picks it up, and checks that it did. Child processes
that a test starts import the package's own extension: run tests that check
it in-process only.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_path = os.environ.get("SOFTRANK_TEST_EXTENSION")
_kind = os.environ.get("SOFTRANK_TEST_EXTENSION_KIND", "other")
if _path:
    import softrank  # noqa: F401  (the package itself, pure Python)

    _spec = importlib.util.spec_from_file_location("softrank._C", _path)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    sys.modules["softrank._C"] = _module
    softrank._C = _module


def pytest_sessionstart(session):
    # (checked here, not in the report header, which -q leaves out)
    if _path:
        from softrank import _C, _engine

        assert _C.__file__ == _path, (_C.__file__, _path)
        assert _engine.engine() is _C, f"the engine did not pick up the {_kind} build"


def pytest_report_header(config):
    if not _path:
        return "softrank extension plugin: inactive (SOFTRANK_TEST_EXTENSION not set)"
    from softrank import _C

    return f"softrank._C: {_kind} build {_path} (simd level {_C.simd_level()})"
