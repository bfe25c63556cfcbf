"""Thread scaling of the engine: softrank.numpy soft_rank (l2 and kl, float32) at
(1, 10^6) and (256, 1000) with 1 and 2 threads (``softrank.set_num_threads``),
forward and forward+vjp (``*_with_vjp`` and its pullback). Groups:
``threads-<cell>``; the report prints the 1-thread / 2-thread ratio. The thread
count is restored after each case.
"""
from __future__ import annotations

import os

import pytest

import softrank
from _benchutil import EPS, IMPLS, cotangent, data

SHAPES = ((1, 10**6), (256, 1000))
THREADS = (1, 2)

CASES = [
    pytest.param(op, reg, batch, n, pass_, k, id=f"{op}-{reg}-float32-b{batch}-n{n}-{pass_}-t{k}")
    for op in ("soft_rank",)
    for reg in ("l2", "kl")
    for batch, n in SHAPES
    for pass_ in ("fwd", "fwdbwd")
    for k in THREADS
]


@pytest.fixture
def restore_threads():
    before = softrank.get_num_threads()
    yield
    softrank.set_num_threads(before)


@pytest.mark.threads
@pytest.mark.parametrize("op, reg, batch, n, pass_, threads", CASES)
def test_threads(benchmark, restore_threads, op, reg, batch, n, pass_, threads):
    import softrank.numpy as srn

    if threads > (os.cpu_count() or 1):
        pytest.skip(f"{threads} threads > {os.cpu_count()} cores")
    softrank.set_num_threads(threads)
    assert softrank.get_num_threads() == threads
    x = data(batch, n, "float32")
    cot = cotangent(batch, n, "float32")
    fn = getattr(srn, op)
    with_vjp = getattr(srn, op + "_with_vjp")
    if pass_ == "fwd":
        def run():
            return fn(x, EPS, regularization=reg)
    else:
        # As the numpy suite's fwdbwd: the value and its pullback from one
        # forward pass.
        def run():
            value, pullback = with_vjp(x, EPS, regularization=reg)
            return value, pullback(cot)

    benchmark.group = f"threads-{op}-{reg}-float32-b{batch}-n{n}-{pass_}"
    benchmark.extra_info.update(
        impl=f"softrank.numpy[{threads} thread{'s' if threads > 1 else ''}]",
        kind="threads", op=op, reg=reg, dtype="float32", batch=batch, n=n,
        threads=threads, eps=EPS, **{"pass": pass_},
    )
    assert "softrank.numpy" in IMPLS
    run()  # warm-up
    benchmark(run)
