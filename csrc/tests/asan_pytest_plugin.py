"""pytest plugin: run the Python suite against an AddressSanitizer/UBSan build
of the extension (csrc/tests/python_asan.sh sets SOFTRANK_ASAN_EXTENSION).

It loads that softrank._C before anything imports the package's own, so the
engine (softrank._engine) picks it up, and checks that it did.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_path = os.environ.get("SOFTRANK_ASAN_EXTENSION")
if _path:
    import softrank  # noqa: F401  (the package itself, pure Python)

    _spec = importlib.util.spec_from_file_location("softrank._C", _path)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    sys.modules["softrank._C"] = _module
    softrank._C = _module


def pytest_report_header(config):
    if not _path:
        return "softrank ASan plugin: inactive (SOFTRANK_ASAN_EXTENSION not set)"
    from softrank import _C, _engine

    assert _C.__file__ == _path, (_C.__file__, _path)
    assert _engine.engine() is _C, "the engine did not pick up the ASan build"
    return f"softrank._C: ASan/UBSan build {_path}"
