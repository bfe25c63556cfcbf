"""softrank.jax under ``jax.jit``, on the full grid.

Passes: ``fwd`` is the jitted op; ``fwdbwd`` is one jitted function returning
the value and the vjp with the cotangent (``jax.vjp``). Each call waits for the
result (``block_until_ready``). float64 needs ``jax_enable_x64``, switched on
here for the whole benchmark process. The floors (np.argsort, torch.sort) are
in the numpy and torch suites: run the files together for the ratios.
"""
from __future__ import annotations

import pytest

from _benchutil import EPS, Case, all_params, assert_close, check_once, cotangent, data
from _benchutil import measure, reference_numpy, small_problem

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

IMPLS = {"softrank.jax": lambda cell: True}

_JITTED = {}


def _functions(op: str, reg: str):
    key = (op, reg)
    if key not in _JITTED:
        srj = pytest.importorskip("softrank.jax")
        fn = getattr(srj, op)

        def forward(x):
            return fn(x, EPS, regularization=reg)

        def forward_backward(x, cot):
            y, pullback = jax.vjp(forward, x)
            return y, pullback(cot)[0]

        _JITTED[key] = jax.jit(forward), jax.jit(forward_backward)
    return _JITTED[key]


def _check(op: str, reg: str) -> None:
    def check():
        import numpy as np

        xs, gs = small_problem()
        value, grad = reference_numpy(op, reg, xs, gs)
        y, g = _functions(op, reg)[1](jnp.asarray(xs), jnp.asarray(gs))
        assert_close("softrank.jax", f"{op} {reg} forward", np.asarray(y), value, rtol=1e-12)
        assert_close("softrank.jax", f"{op} {reg} gradient", np.asarray(g), grad, rtol=1e-12)

    check_once(("softrank.jax", op, reg), check)


@pytest.mark.parametrize("case", all_params(IMPLS))
def test_jax(benchmark, case: Case):
    cell = case.cell
    forward, forward_backward = _functions(cell.op, cell.reg)
    _check(cell.op, cell.reg)
    x = jnp.asarray(data(cell.batch, cell.n, cell.dtype))
    cot = jnp.asarray(cotangent(cell.batch, cell.n, cell.dtype))
    assert x.dtype == cell.dtype
    if cell.pass_ == "fwd":
        measure(benchmark, case, lambda: forward(x).block_until_ready())
    else:
        measure(benchmark, case, lambda: jax.block_until_ready(forward_backward(x, cot)))
