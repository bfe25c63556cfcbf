"""Import a framework for its adapter tests.

In CI (the environment variable ``CI`` is set) every framework is required, so
a missing one fails the run; elsewhere its tests are skipped.
"""
from __future__ import annotations

import importlib
import os

import pytest


def require(module_name: str):
    """Return the imported module, or skip (outside CI) when it is missing."""
    if os.environ.get("CI"):
        return importlib.import_module(module_name)
    return pytest.importorskip(module_name)
