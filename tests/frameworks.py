"""Import a framework, or the reference peer, for the tests.

In CI (the environment variable ``CI`` is set) every framework is required, so
a missing one fails the run; elsewhere its tests are skipped. The authors'
fast-soft-sort is not on PyPI: its agreement tests run where
``SOFTRANK_FAST_SOFT_SORT`` names a directory holding its package.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings

import pytest


def require(module_name: str):
    """Return the imported module, or skip (outside CI) when it is missing."""
    if os.environ.get("CI"):
        return importlib.import_module(module_name)
    return pytest.importorskip(module_name)


FAST_SOFT_SORT_DIR = os.environ.get("SOFTRANK_FAST_SOFT_SORT", "")
needs_fast_soft_sort = pytest.mark.skipif(
    not FAST_SOFT_SORT_DIR,
    reason="SOFTRANK_FAST_SOFT_SORT is unset: point it at a directory containing the "
    "fast_soft_sort package (google-research/fast-soft-sort) to run the agreement tests",
)


def fast_soft_sort():
    """fast-soft-sort's ``numpy_ops`` from ``SOFTRANK_FAST_SOFT_SORT`` (fails if absent there)."""
    if not os.path.isdir(os.path.join(FAST_SOFT_SORT_DIR, "fast_soft_sort")):
        pytest.fail(f"SOFTRANK_FAST_SOFT_SORT={FAST_SOFT_SORT_DIR!r} has no fast_soft_sort/ "
                    "package")
    sys.path.insert(0, FAST_SOFT_SORT_DIR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "numba could not be imported"
            return importlib.import_module("fast_soft_sort.numpy_ops")
    finally:
        sys.path.remove(FAST_SOFT_SORT_DIR)


@contextlib.contextmanager
def jax_x64(enabled: bool = True):
    """JAX's float64 switch, set process-wide for the block and restored after.

    Not the ``jax.enable_x64`` context: it is thread-local, and XLA may run a
    ``pure_callback`` (softrank's host path: the numba engine, or an op with no
    XLA handler) on another thread, where it does not hold, and jax then
    canonicalises the callback's float64 results to float32 and fails.
    """
    jax = importlib.import_module("jax")
    saved = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", saved)
