"""What a pip-installed softrank must carry: a typed package whose stub matches the
compiled module, the license, XLA FFI handlers built against a known API version,
and adapters that name their extra when the framework is missing."""
from __future__ import annotations

import ast
import os
import re

import pytest

import softrank
from softrank import _xla_ffi_version
from softrank._engine import available_backends
from child_python import run_python

PACKAGE = os.path.dirname(os.path.abspath(softrank.__file__))
ROOT = os.path.dirname(PACKAGE)
needs_native = pytest.mark.skipif("native" not in available_backends(), reason="needs softrank._C")


def test_typed_package():
    assert os.path.isfile(os.path.join(PACKAGE, "py.typed"))


@needs_native
def test_stub_lists_exactly_the_compiled_names():
    from softrank import _C

    with open(os.path.join(PACKAGE, "_C.pyi"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    stubbed = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            stubbed.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            stubbed.add(node.target.id)
    compiled = {name for name in dir(_C) if not name.startswith("__")}
    assert stubbed == compiled


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "pyproject.toml")), reason="needs the source tree")
def test_license_file_is_apache():
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0" in text


@needs_native
def test_ffi_handlers_built_against_the_vendored_headers():
    from softrank import _C

    header = os.path.join(ROOT, "csrc", "third_party", "xla_ffi", "xla", "ffi", "api", "c_api.h")
    if not os.path.isfile(header):
        pytest.skip("needs the source tree")
    with open(header, encoding="utf-8") as f:
        text = f.read()
    major = int(re.search(r"#define\s+XLA_FFI_API_MAJOR\s+(\d+)", text).group(1))
    minor = int(re.search(r"#define\s+XLA_FFI_API_MINOR\s+(\d+)", text).group(1))
    assert tuple(_C.xla_ffi_api_version) == (major, minor)
    targets = _C.xla_ffi_targets()
    assert targets and all(name.startswith("softrank_") for name in targets)


def test_ffi_version_rule():
    check = _xla_ffi_version.incompatibility
    assert check((0, 3), (0, 3)) is None
    assert check((0, 3), (0, 5)) is None  # an older handler on a newer jaxlib
    assert check((0, 3), None) is None  # unknown: XLA checks at registration
    newer = check((0, 3), (0, 2))
    assert newer is not None and "0.3" in newer and "0.2" in newer and "pure_callback" in newer
    assert check((1, 0), (0, 9)) is not None


def test_installed_jaxlib_version_is_read():
    pytest.importorskip("jax")
    version = _xla_ffi_version.jaxlib_ffi_api_version()
    assert version is not None and all(isinstance(v, int) and v >= 0 for v in version)


@pytest.mark.parametrize("module, framework, extra", [
    ("softrank.torch", "torch", "torch"),
    ("softrank.jax", "jax", "jax"),
    ("softrank.tensorflow", "tensorflow", "tensorflow"),
])
def test_missing_framework_names_the_extra(module, framework, extra):
    code = (
        f"import sys; sys.modules[{framework!r}] = None\n"
        f"try:\n    import {module}\nexcept ImportError as exc:\n    print('ImportError:', exc)\n"
    )
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ImportError:"), proc.stdout
    assert f"softrank[{extra}]" in proc.stdout, proc.stdout


@needs_native
def test_incompatible_jaxlib_falls_back_with_a_warning():
    pytest.importorskip("jax")
    code = (
        "import warnings\n"
        "import numpy as np\n"
        "from softrank import _xla_ffi_version\n"
        "_xla_ffi_version.jaxlib_ffi_api_version = lambda: (0, 0)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import softrank.jax as sj\n"
        "assert any('XLA FFI API' in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
        "assert not sj._ffi_ready()\n"
        "from softrank.numpy import soft_rank\n"
        "x = np.random.default_rng(0).normal(size=(3, 7))\n"
        "np.testing.assert_allclose(np.asarray(sj.soft_rank(x, 0.5)), soft_rank(x, 0.5), rtol=1e-6)\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env.pop("SOFTRANK_BACKEND", None)
    proc = run_python(code, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
