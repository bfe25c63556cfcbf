"""SOFTRANK_DISABLE_AVX512=1 forces the native core's portable paths on any CPU,
and both paths compute the same operators.

The switch is read once, when the core loads, so every check runs in a child
process. The results of the two paths are compared against each other (the
network sort and the counting/radix sorts order rows identically, so the
outputs agree bit for bit) and, independently, against the brute-force
reference of tests/reference.py.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from softrank._engine import available_backends

from child_python import run_python

pytestmark = pytest.mark.skipif("native" not in available_backends(), reason="needs softrank._C")

PROBE = r"""
import json, sys
import numpy as np
import softrank
from softrank import _engine
from softrank.numpy import soft_rank, soft_sort
rng = np.random.default_rng(7)
out = {"level": softrank.simd_level(), "results": [],
       "variants": _engine.engine().simd_variants_compiled()}
for n in (1, 7, 64, 100, 128, 129, 300):
    for dtype in (np.float32, np.float64):
        x = rng.normal(size=(5, n)).astype(dtype)
        x[1, : n // 2] = x[1, 0]  # ties
        for op in (soft_rank, soft_sort):
            for reg in ("l2", "kl"):
                r = op(x, eps=0.3, regularization=reg)
                out["results"].append({"reg": reg, "dtype": np.dtype(dtype).name,
                                       "values": r.astype(np.float64).ravel().tolist()})
print(json.dumps(out))
"""


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _run(disable: str | None) -> dict:
    env = dict(os.environ)
    env.pop("SOFTRANK_BACKEND", None)
    env.pop("SOFTRANK_DISABLE_AVX512", None)
    if disable is not None:
        env["SOFTRANK_DISABLE_AVX512"] = disable
    proc = run_python(PROBE, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_level_follows_cpu_and_switch():
    flags = _cpu_flags()
    best = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "baseline"
    default = _run(None)
    if not default["variants"]:  # arm64, or built with SOFTRANK_PORTABLE_ONLY=ON
        best = "baseline"
    assert default["level"] == best
    capped = "avx2" if best == "avx512" else best
    assert _run("1")["level"] == capped
    assert _run("0")["level"] == best  # "0" does not disable
    # whitespace around the value is ignored, as for SOFTRANK_DISABLE_CUDA
    assert _run(" 0 ")["level"] == best
    assert _run("  ")["level"] == best
    assert _run(" 1\n")["level"] == capped


def test_portable_path_matches_default_path():
    default, portable = _run(None), _run("1")
    assert len(default["results"]) == len(portable["results"]) > 0
    for a, b in zip(default["results"], portable["results"]):
        assert (a["reg"], a["dtype"]) == (b["reg"], b["dtype"])
        if a["reg"] == "l2":
            assert a["values"] == b["values"]
        else:
            rtol = 1e-13 if a["dtype"] == "float64" else 1e-6
            scale = max(abs(v) for v in a["values"])
            np.testing.assert_allclose(a["values"], b["values"], rtol=rtol, atol=rtol * scale)


def test_portable_path_matches_reference():
    """The portable path against the brute-force reference (small rows, l2 and kl)."""
    code = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import reference
from softrank.numpy import soft_rank, soft_sort
rng = np.random.default_rng(3)
worst = 0.0
for n in (2, 5, 40):
    x = rng.normal(size=n)
    for reg in ("l2", "kl"):
        for eps in (0.1, 1.0):
            for op, ref in ((soft_rank, reference.soft_rank_ref), (soft_sort, reference.soft_sort_ref)):
                got = op(x, eps=eps, regularization=reg)
                want = ref(x, eps, reg)
                worst = max(worst, float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want)))))
print(json.dumps(worst))
"""
    env = dict(os.environ, SOFTRANK_DISABLE_AVX512="1")
    env.pop("SOFTRANK_BACKEND", None)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = run_python(code, tests_dir, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) < 1e-9
