"""softrank.torch against torch.sort, the O(n^2) Sinkhorn baseline and the torch peers.

Passes: ``fwd`` is the op on a tensor that does not require grad; ``fwdbwd`` is
the op on a leaf that requires grad, then ``.backward(cotangent)``. The floor
(``torch.sort`` of the same tensor) is the same in both passes.

Peers, each skipped when not installed: ``torchsort`` (l2 and kl),
``torchisotonic`` (weighted l2 isotonic regression only: its soft rank / sort
are assembled in ``_peers.py``, l2 cells only), ``torchpsort``. Every peer is
first checked against softrank.numpy on a small problem (value and gradient):
a peer whose semantics differ is reported as a failure, not timed.

Sinkhorn (``sinkhorn.py``, 50 log-domain iterations, soft_rank l2 cells only)
is O(n^2) in time and memory: skipped for n > 2000 and where batch * n^2
exceeds 2^22 (forward) or 2^20 (forward+backward, autograd keeps every
iteration's (batch, n, n) temporaries).
"""
from __future__ import annotations

import numpy as np
import pytest

import _peers
from _benchutil import (
    EPS,
    SINKHORN_MAX_BWD,
    SINKHORN_MAX_FWD,
    SINKHORN_MAX_N,
    Case,
    all_params,
    assert_close,
    check_once,
    cotangent,
    data,
    measure,
    reference_numpy,
    small_problem,
)

torch = pytest.importorskip("torch")

IMPLS = {
    "softrank.torch": lambda cell: True,
    "torch.sort": lambda cell: True,
    "torchsort": lambda cell: True,
    "torchisotonic": lambda cell: cell.reg == "l2",
    "torchpsort": lambda cell: True,
    "sinkhorn": lambda cell: cell.op == "soft_rank" and cell.reg == "l2",
}


def _peer_fn(impl: str, op: str, reg: str):
    """A function tensor -> tensor for a peer, or skip when it is not installed."""
    if impl == "softrank.torch":
        srt = pytest.importorskip("softrank.torch")
        fn = getattr(srt, op)
        return lambda x: fn(x, EPS, regularization=reg)
    if impl == "torchsort":
        ts = pytest.importorskip("torchsort")
        fn = getattr(ts, op)
        return lambda x: fn(x, regularization=reg, regularization_strength=EPS)
    if impl == "torchisotonic":
        pytest.importorskip("torchisotonic")
        return _peers.torchisotonic_op(op, EPS)
    if impl == "torchpsort":
        tp = pytest.importorskip("torchpsort")
        fn = getattr(tp, op, None)
        if fn is None:
            pytest.skip(f"torchpsort has no {op}")
        return lambda x: fn(x, regularization=reg, regularization_strength=EPS)
    raise ValueError(impl)


def _check(impl: str, op: str, reg: str, fn) -> None:
    def check():
        xs, gs = small_problem()
        value, grad = reference_numpy(op, reg, xs, gs)
        x = torch.tensor(xs, requires_grad=True)
        y = fn(x)
        y.backward(torch.tensor(gs))
        assert_close(impl, f"{op} {reg} forward", y.detach().numpy(), value)
        assert_close(impl, f"{op} {reg} gradient", x.grad.numpy(), grad)

    check_once((impl, op, reg), check)


def _sinkhorn(case: Case):
    import sinkhorn

    cell = case.cell
    size = cell.batch * cell.n**2
    if cell.n > SINKHORN_MAX_N:
        pytest.skip(f"sinkhorn: n = {cell.n} > {SINKHORN_MAX_N}, an n x n plan per row "
                    "(O(n^2) memory and time) is prohibitive")
    cap = SINKHORN_MAX_FWD if cell.pass_ == "fwd" else SINKHORN_MAX_BWD
    if size > cap:
        why = "autograd keeps every iteration's" if cell.pass_ == "fwdbwd" else "a few"
        pytest.skip(f"sinkhorn: batch * n^2 = {size} > {cap} for {cell.pass_} "
                    f"(O(n^2) memory and time: {why} (batch, n, n) temporaries)")
    return sinkhorn.soft_rank


@pytest.mark.parametrize("case", all_params(IMPLS))
def test_torch(benchmark, case: Case):
    cell = case.cell
    x = torch.from_numpy(data(cell.batch, cell.n, cell.dtype))
    cot = torch.from_numpy(cotangent(cell.batch, cell.n, cell.dtype))

    if case.impl == "torch.sort":
        measure(benchmark, case, lambda: torch.sort(x, dim=-1))
        return
    if case.impl == "sinkhorn":
        fn = _sinkhorn(case)
    else:
        fn = _peer_fn(case.impl, cell.op, cell.reg)
        _check(case.impl, cell.op, cell.reg, fn)

    if cell.pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return fn(x)

        measure(benchmark, case, forward, torch_threads=torch.get_num_threads())
    else:
        def forward_backward():
            leaf = x.detach().requires_grad_(True)
            y = fn(leaf)
            y.backward(cot)
            return y, leaf.grad

        measure(benchmark, case, forward_backward, torch_threads=torch.get_num_threads())


def test_sinkhorn_is_a_soft_rank():
    """The Sinkhorn reference tends to the hard ranks (sanity, not timed)."""
    import sinkhorn

    x = torch.tensor(np.random.default_rng(0).permutation(20).astype(np.float64))[None]
    ranks = sinkhorn.soft_rank(x, iterations=500, tau=1e-3)
    np.testing.assert_allclose(ranks.numpy(), x.numpy() + 1, atol=0.25)
    np.testing.assert_allclose(float(ranks.sum()), 20 * 21 / 2, rtol=1e-9)
