"""`import softrank` stays light: no framework and no numba until an engine is
needed; softrank.backend() names a real engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import softrank

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
    # the child imports the same softrank as this process
    root = os.path.dirname(os.path.dirname(os.path.abspath(softrank.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if extra_env:
        env.update(extra_env)
    code = PROBE.format(imports=imports, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("imports", ["import softrank", "import softrank.numpy",
                                     "from softrank.numpy import soft_rank, soft_sort, isotonic_regression"])
def test_import_is_light(imports):
    res = _run(imports)
    assert res["loaded"] == [], f"{imports!r} imported {res['loaded']}"
    assert res["backend"] in ("native", "numba")


def test_default_backend_prefers_native():
    from softrank._engine import available_backends

    res = _run("import softrank")
    expected = "native" if "native" in available_backends() else "numba"
    assert res["backend"] == expected


def test_env_forces_numba():
    pytest.importorskip("numba")
    res = _run("import softrank", {"SOFTRANK_BACKEND": "numba"})
    assert res["backend"] == "numba"
