"""`import softrank` stays light: no framework and no numba until an engine is
needed; softrank.backend() names a real engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import softrank
from softrank._engine import available_backends

from child_python import import_errors_without, run_python

HEAVY = ("torch", "jax", "tensorflow", "numba")

PROBE = r"""
import json, sys
{imports}
loaded = [m for m in {heavy!r} if m in sys.modules]
import softrank
print(json.dumps({{"loaded": loaded, "backend": softrank.backend()}}))
"""


def _run(imports, extra_env=None):
    env = dict(os.environ)
    env.pop("SOFTRANK_BACKEND", None)
    if extra_env:
        env.update(extra_env)
    proc = run_python(PROBE.format(imports=imports, heavy=HEAVY), env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("imports", ["import softrank", "import softrank.numpy",
                                     "from softrank.numpy import soft_rank, soft_sort, isotonic_regression"])
def test_import_is_light(imports):
    res = _run(imports)
    assert res["loaded"] == [], f"{imports!r} imported {res['loaded']}"
    assert res["backend"] in ("native", "numba")


def test_default_backend_prefers_native():
    res = _run("import softrank")
    expected = "native" if "native" in available_backends() else "numba"
    assert res["backend"] == expected


def test_env_forces_numba():
    pytest.importorskip("numba")
    res = _run("import softrank", {"SOFTRANK_BACKEND": "numba"})
    assert res["backend"] == "numba"


def test_env_forcing_numba_without_numba_names_the_variable():
    # The message said "no compiled core here ... reinstall with a C++
    # compiler", though the core was there and only numba was missing.
    env = dict(os.environ)
    env["SOFTRANK_BACKEND"] = "numba"
    proc = run_python("import sys; sys.modules['numba'] = None\n"
                      "import softrank\n"
                      "try:\n"
                      "    softrank.backend()\n"
                      "except ImportError as exc:\n"
                      "    print('ImportError:', exc)\n", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "SOFTRANK_BACKEND=numba" in proc.stdout and "pip install numba" in proc.stdout, proc.stdout
    assert "no compiled core" not in proc.stdout


def _shadowing_trees(tmp_path):
    """Two copies of the package: ``source/softrank`` without its compiled core (what
    a source checkout's root holds) and ``installed/softrank`` with it."""
    import shutil

    from softrank import _C

    pkg = os.path.dirname(os.path.abspath(softrank.__file__))
    ignore = shutil.ignore_patterns("_C.*.so", "_C.*.pyd", "__pycache__")  # the stub _C.pyi stays
    shutil.copytree(pkg, tmp_path / "source" / "softrank", ignore=ignore)
    shutil.copytree(pkg, tmp_path / "installed" / "softrank", ignore=ignore)
    shutil.copy(_C.__file__, tmp_path / "installed" / "softrank")
    return str(tmp_path / "source"), str(tmp_path / "installed")


# An editable install's import hook would find the real package first: the child
# drops such hooks so that sys.path alone decides, as for a regular install.
_PATH_ONLY = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if f.__module__.split('.')[0] in "
    "('_frozen_importlib', '_frozen_importlib_external', 'importlib', 'six', '_distutils_hack')]\n"
)


@pytest.mark.skipif("native" not in available_backends(), reason="needs softrank._C")
@pytest.mark.parametrize("with_numba", [True, False])
def test_shadowing_source_tree_is_named(tmp_path, with_numba):
    if with_numba:
        pytest.importorskip("numba")
    source_root, installed_root = _shadowing_trees(tmp_path)
    block = "" if with_numba else "sys.modules['numba'] = None\n"
    code = _PATH_ONLY + block + (
        "import warnings, softrank\n"
        "assert softrank.__file__.startswith(sys.argv[1]), softrank.__file__\n"
        "try:\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        print('backend', softrank.backend())\n"
        "    print('warned', any('shadows the installed softrank' in str(w.message) for w in caught))\n"
        "except ImportError as exc:\n"
        "    print('error', exc)\n"
    )
    env = dict(os.environ)
    env.pop("SOFTRANK_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join([source_root, installed_root])
    proc = subprocess.run([sys.executable, "-c", code, source_root], capture_output=True, text=True,
                          env=env, timeout=300, cwd=source_root)
    assert proc.returncode == 0, proc.stderr
    if with_numba:
        assert "backend numba" in proc.stdout and "warned True" in proc.stdout, proc.stdout
    else:
        assert "error softrank was imported from" in proc.stdout, proc.stdout
        assert f"shadows the installed softrank in {installed_root}" in proc.stdout
        assert "pip install -e ." in proc.stdout


def test_pretext_modules_without_torch_name_the_extra():
    """softrank.pretext itself imports without torch; its torch modules raised
    a bare ModuleNotFoundError, not the extra to install."""
    names = [f"softrank.pretext.{name}" for name in ("losses", "models", "permutations", "demo")]
    errors = import_errors_without("torch", ["softrank.pretext", *names])
    assert "softrank.pretext" not in errors
    for name in names:
        assert errors.get(name) == "softrank.pretext needs PyTorch: pip install 'softrank[pretext]'"
