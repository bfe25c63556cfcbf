"""Loaders for the optional peers: fast-soft-sort (numpy), the torch peers, ott-jax.

Nothing of the peers' code lives here: fast-soft-sort is imported from the
directory named by ``SOFTRANK_FAST_SOFT_SORT`` (it is not on PyPI), the torch
peers from their installed packages. ``torchisotonic`` only solves isotonic
regression (weighted l2), so its soft rank / soft sort are assembled here the
way a user of it would: ``torch.sort``, the isotonic fit, the un-permutation.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

FSS_ENV = "SOFTRANK_FAST_SOFT_SORT"


def fast_soft_sort():
    """fast-soft-sort's ``numpy_ops`` module, or skip with the reason."""
    root = os.environ.get(FSS_ENV)
    if not root:
        pytest.skip(
            f"{FSS_ENV} is unset: point it at a checkout of google-research/fast-soft-sort "
            "(the directory holding fast_soft_sort/) to benchmark it"
        )
    path = Path(root).expanduser().resolve()
    if (path / "fast_soft_sort" / "__init__.py").is_file():
        parent = path
    elif path.name == "fast_soft_sort" and (path / "numpy_ops.py").is_file():
        parent = path.parent
    else:
        pytest.skip(f"{FSS_ENV}={root} holds no fast_soft_sort/ package")
    if str(parent) not in sys.path:
        sys.path.insert(0, str(parent))
    try:
        return importlib.import_module("fast_soft_sort.numpy_ops")
    except ImportError as exc:  # it needs scipy and numba
        pytest.skip(f"fast-soft-sort from {parent} does not import: {exc}")


# --- fast-soft-sort, one row at a time as its API takes 1-D arrays -----------------

_FSS_CLASS = {"soft_rank": "SoftRank", "soft_sort": "SoftSort"}


def fss_forward(fss, op, reg, eps, x):
    import numpy as np

    fn = getattr(fss, op)
    return np.stack([fn(row, regularization_strength=eps, regularization=reg) for row in x])


def fss_forward_backward(fss, op, reg, eps, x, cot):
    """Value and vjp per row: ``compute()`` then ``vjp(cotangent)`` on the same object."""
    import numpy as np

    cls = getattr(fss, _FSS_CLASS[op])
    values, grads = [], []
    for row, g in zip(x, cot):
        obj = cls(row, regularization_strength=eps, regularization=reg)
        values.append(obj.compute())
        grads.append(obj.vjp(g))
    return np.stack(values), np.stack(grads)


# --- torchisotonic: soft rank / soft sort (l2) on top of its isotonic regression ----


def torchisotonic_op(op: str, eps: float):
    """Ascending l2 soft rank / soft sort of the rows of a 2-D tensor via torchisotonic."""
    import torch
    import torchisotonic

    def soft_rank(x):
        n = x.shape[-1]
        w = torch.arange(n, 0, -1, dtype=x.dtype, device=x.device)  # rho = (n, ..., 1)
        s, perm = torch.sort(x / eps, dim=-1, descending=True)
        dual = torchisotonic.isotonic(s - w, increasing=False)
        primal = s - dual
        return torch.empty_like(primal).scatter(-1, perm, primal)

    def soft_sort(x):
        n = x.shape[-1]
        w = torch.arange(n, 0, -1, dtype=x.dtype, device=x.device) / eps
        s, _ = torch.sort(x, dim=-1)
        # the ascending soft sort is iso_decreasing(w + s) - w, s the ascending sort of x
        return torchisotonic.isotonic(w + s, increasing=False) - w

    return {"soft_rank": soft_rank, "soft_sort": soft_sort}[op]


# --- the operators on the permutahedron (test_bench_operators.py) -------------------


def ott_soft_sort():
    """``ott.tools.soft_sort`` (ott-jax), or skip with the reason."""
    try:
        return importlib.import_module("ott.tools.soft_sort")
    except ImportError as exc:
        pytest.skip(f"ott-jax does not import: {exc}")


def fss_projection(fss, reg, z, w, cot=None):
    """fast-soft-sort's projection of each row of z onto P(w) (w shared, any order), and
    with ``cot`` its vjp with respect to z. Its ``Projection`` takes w sorted
    decreasingly, so w is sorted first (P(w) does not depend on w's order)."""
    import numpy as np

    w_sorted = np.sort(w)[::-1]
    return _fss_rows([fss.Projection(row, w_sorted, regularization=reg) for row in z], cot)


def fss_isotonic_kl(fss, y, log_w, cot=None):
    """fast-soft-sort's kl isotonic regression (non-increasing; ``log_w`` the log of the
    weights) of each row of y, and with ``cot`` its vjp with respect to y."""
    return _fss_rows([fss.Isotonic(row, w, regularization="kl") for row, w in zip(y, log_w)],
                     cot)


def _fss_rows(objects, cot=None):
    """The stacked values of fast-soft-sort objects (one per row) and, with ``cot``, their vjps."""
    import numpy as np

    values = np.stack([obj.compute() for obj in objects])
    if cot is None:
        return values
    return values, np.stack([obj.vjp(c) for obj, c in zip(objects, cot)])


def torchsort_spearman(reg: str, eps: float):
    """The Spearman correlation of torchsort's README, row by row along the last dim:
    soft ranks of prediction and target, centred, normalised, their inner product."""
    import torchsort

    def spearman(pred, target):
        pred = torchsort.soft_rank(pred, regularization=reg, regularization_strength=eps)
        target = torchsort.soft_rank(target, regularization=reg, regularization_strength=eps)
        pred = pred - pred.mean(dim=-1, keepdim=True)
        pred = pred / pred.norm(dim=-1, keepdim=True)
        target = target - target.mean(dim=-1, keepdim=True)
        target = target / target.norm(dim=-1, keepdim=True)
        return (pred * target).sum(dim=-1)

    return spearman
