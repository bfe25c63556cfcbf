"""The README's Python examples run as written, and print what their comments say.

Every ```python block of README.md runs in a namespace of its own, except
blocks placed right after an HTML comment ``<!-- readme-test: skip ... -->``
(a signature, a fragment). A block that imports nothing continues the block
just before it (as the numpy example's "with_vjp" block does): that block
runs first, in the same namespace.
A block that imports torch, jax or tensorflow is skipped where that framework
is missing (outside CI, see frameworks.py). A line ``expression  # [values]``
or ``# name == [values]`` states a result: it is compared with the values.
A ``grad`` or ``grads`` the block computes must be finite and nonzero.
"""
from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Tuple

import numpy as np
import pytest

from frameworks import require

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
FRAMEWORKS = ("torch", "jax", "tensorflow")

_BLOCK = re.compile(r"(<!--\s*readme-test:\s*skip[^>]*-->\s*\n)?```python\n(.*?)```", re.S)
# "expr  # [..]" or "# name == [..]": a bracketed literal of numbers.
_STATED = re.compile(r"^(?P<expr>[^#]*?)\s*#\s*(?:(?P<name>\w+)\s*==\s*)?(?P<values>\[[-+\d.,\s\[\]eE]*\])")


def readme_blocks() -> List[Tuple[int, str]]:
    """(index, code) of every README python block not marked to skip."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = [(i, m.group(2)) for i, m in enumerate(_BLOCK.finditer(text)) if not m.group(1)]
    assert blocks, "no ```python block found in README.md"
    return blocks


def stated_values(code: str) -> List[Tuple[str, str, list]]:
    """(line, expression or name, values) for each line that states a result."""
    found = []
    for line in code.splitlines():
        m = _STATED.match(line)
        if not m:
            continue
        target = m.group("name") or m.group("expr").strip()
        if target:
            found.append((line, target, ast.literal_eval(m.group("values"))))
    return found


def _frameworks_of(code: str) -> List[str]:
    return [name for name in FRAMEWORKS
            if re.search(rf"^\s*(import|from)\s+{name}\b", code, re.M)]


BLOCKS = readme_blocks()


def test_readme_has_an_example_per_framework():
    imported = {name for _, code in BLOCKS for name in _frameworks_of(code)}
    assert imported == set(FRAMEWORKS)
    assert any("softrank.numpy" in code for _, code in BLOCKS)
    # (the values stated in comments are found, so that their check below runs)
    assert any(stated_values(code) for _, code in BLOCKS)


@pytest.mark.parametrize("index, code", BLOCKS, ids=[f"block{i}" for i, _ in BLOCKS])
def test_readme_example_runs_and_states_true_values(index, code):
    for name in _frameworks_of(code):
        require(name)
    # A block that imports nothing continues the block just before it (its names).
    namespace: Dict[str, object] = {}
    if not re.search(r"^\s*(import|from)\s", code, re.M):
        earlier = [c for i, c in BLOCKS if i < index]
        assert earlier, f"README block {index} imports nothing and follows no block"
        exec(compile(earlier[-1], f"README block before {index}", "exec"), namespace)
    exec(compile(code, f"README block {index}", "exec"), namespace)
    # A gradient an example computes is a real one: a loss summed off the
    # tape, or an input the loss does not reach, gives None without error.
    gradients = [name for name in namespace if re.fullmatch(r"grads?", name)]
    for name in gradients:
        value = namespace[name]
        for part in value if isinstance(value, (list, tuple)) else (value,):
            assert part is not None, f"README block {index}: {name} holds None"
            array = np.asarray(part, dtype=np.float64)
            assert np.all(np.isfinite(array)) and np.any(array != 0), (
                f"README block {index}: {name} is not a finite, nonzero gradient")
    for line, target, values in stated_values(code):
        got = namespace[target] if re.fullmatch(r"\w+", target) else eval(target, namespace)
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(values),
                                   rtol=1e-6, atol=1e-6, err_msg=f"README: {line.strip()}")
