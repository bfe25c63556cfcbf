"""Run Python code in a child process that imports the same softrank as the tests.

``python -c`` puts the working directory first on ``sys.path``. Run from the
root of a source tree or an unpacked sdist whose package was installed
elsewhere (``pip install .``, then ``pytest`` there), a child would import
the source copy, which has no compiled core, and report the numba engine
where the tests' own process has the native one. So the child runs in the
directory that holds the imported package, and that directory also leads its
``PYTHONPATH`` (for the child's own children).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Mapping, Optional

import softrank

SOFTRANK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(softrank.__file__)))


def import_errors_without(blocked: str, modules: list) -> dict:
    """``{module: its ImportError message}`` for each of ``modules`` imported in a
    child process where ``blocked`` (a framework) cannot be imported (its
    ``sys.modules`` entry is None); a module that imports gets no entry."""
    code = (
        "import json, sys\n"
        f"sys.modules[{blocked!r}] = None\n"
        "errors = {}\n"
        f"for name in {list(modules)!r}:\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError as exc:\n"
        "        errors[name] = str(exc)\n"
        "print(json.dumps(errors))\n"
    )
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_python(code: str, *args: str, env: Optional[Mapping[str, str]] = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c code *args`` with this process's softrank; output captured as text.

    ``env`` defaults to this process's environment; its ``PYTHONPATH`` is kept
    after ``SOFTRANK_ROOT``.
    """
    child_env = dict(os.environ if env is None else env)
    rest = [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    child_env["PYTHONPATH"] = os.pathsep.join([SOFTRANK_ROOT] + rest)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=child_env, timeout=timeout, cwd=SOFTRANK_ROOT)
