"""The Examples sections of the public modules' docstrings run and print what they show.

A user copies these first; nothing else runs them. Each module is skipped
where its framework is missing (outside CI, see frameworks.py).
"""
from __future__ import annotations

import doctest
import importlib

import pytest

from frameworks import require

MODULES = {
    "softrank": None,
    "softrank.numpy": None,
    "softrank.torch": "torch",
    "softrank.jax": "jax",
    "softrank.tensorflow": "tensorflow",
    "softrank.pretext.patches": "torch",
    "softrank.pretext.permutations": None,
    "softrank.pretext.losses": "torch",
    "softrank.pretext.models": "torch",
    "softrank.pretext.datasets": None,
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_docstring_examples(name):
    if MODULES[name]:
        require(MODULES[name])
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = [t for t in finder.find(module) if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
    if name in ("softrank.numpy", "softrank.torch", "softrank.jax", "softrank.tensorflow"):
        assert result.attempted >= 10, f"{name}: only {result.attempted} examples found"
