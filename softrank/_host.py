"""Host-side entry points shared by the framework adapters.

The torch, jax and tensorflow adapters move the operator's axis last and hand
these functions numpy arrays of shape ``(..., n)`` in float32 or float64; the
functions fold the leading dimensions into the ``(rows, n)`` layout of the
engine contract (see :mod:`softrank._engine`) and unfold the results. Nothing
here validates user input: the adapters have done that already.

:func:`hvp` is the one piece of arithmetic outside the engines: the second
derivative that double backward needs, composed from the engine's ``soft_vjp``
and ``soft_jvp`` (see its docstring for the derivation).
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from softrank import _engine

__all__ = ["forward", "vjp", "jvp", "hvp"]


def _rows(array: np.ndarray) -> np.ndarray:
    """``array`` as a C-contiguous ``(rows, n)`` array (a view when possible)."""
    if array.ndim == 2:
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array).reshape(math.prod(array.shape[:-1]), array.shape[-1])


def forward(
    x: np.ndarray, op: int, reg: int, descending: bool, eps: float
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(out, perm, block_start)`` of ``x`` (shape ``(..., n)``), each shaped like ``x``."""
    shape = x.shape
    out, perm, block_start = _engine.engine().soft_forward(
        _rows(x), op, reg, descending, eps
    )
    return out.reshape(shape), perm.reshape(shape), block_start.reshape(shape)


def vjp(x, out, perm, block_start, cotangent, op, reg, descending, eps) -> np.ndarray:
    """Gradient of ``sum(cotangent * op(x))`` from the stored forward state."""
    grad = _engine.engine().soft_vjp(
        _rows(x), _rows(out), _rows(perm), _rows(block_start),
        _rows(cotangent.astype(x.dtype, copy=False)), op, reg, descending, eps,
    )
    return grad.reshape(x.shape)


def jvp(x, out, perm, block_start, tangent, op, reg, descending, eps) -> np.ndarray:
    """Jacobian-vector product ``J(x) tangent`` from the stored forward state."""
    tangent_out = _engine.engine().soft_jvp(
        _rows(x), _rows(out), _rows(perm), _rows(block_start),
        _rows(tangent.astype(x.dtype, copy=False)), op, reg, descending, eps,
    )
    return tangent_out.reshape(x.shape)


def hvp(
    x, out, perm, block_start, cotangent, tangent, op, reg, descending, eps
) -> np.ndarray:
    """Second derivative: the gradient of ``<cotangent, J(x) tangent>`` w.r.t. ``x``.

    This is what differentiating a vjp (w.r.t. ``x``, with the cotangent
    fixed) or a jvp (w.r.t. ``x``, with the tangent fixed) needs. The PAV
    blocks and the permutation are locally constant, so (almost everywhere):

    - l2, rank and sort: the Jacobian is locally constant, the result is 0.
    - kl rank: in block ``B`` the rank is ``r = R_B softmax(s x_B)`` with
      ``s = +-1/eps`` (``+`` ascending), so ``J = s A`` with
      ``A c = r * (c - cbar)``, ``cbar = sum_B(r c) / R_B``. Differentiating
      ``<c, A t>`` gives ``s^2 A q`` with ``q = (c - cbar) * (t - tbar)``;
      since ``vjp(c) = s r (c - cbar)`` this is
      ``vjp(vjp(c) * vjp(t) / r^2) / s`` (``r`` is a softmax times
      ``R_B >= 1``; where it underflows to 0 its terms vanish with it).
      ``eps = 0`` and ``eps = inf`` give 0.
    - kl sort: ``J[i, k] = p_k`` for ``k`` in the block of sorted position
      ``i``, with ``p`` the block softmax of ``x' = sgn x`` (``sgn = +1``
      descending, ``-1`` ascending); differentiating ``p`` gives
      ``sgn * vjp(c) * (t - tbar)``, where ``tbar = sum_B p t`` is the jvp of
      ``t`` carried from sorted positions back to the columns of ``x`` by
      ``perm``.

    All arrays have shape ``(..., n)``; the result has the dtype of ``x``.
    """
    if reg == _engine.REG_L2:
        return np.zeros_like(x)
    if op == _engine.OP_RANK:
        if eps == 0.0 or math.isinf(eps):
            return np.zeros_like(x)
        grad_c = vjp(x, out, perm, block_start, cotangent, op, reg, descending, eps)
        grad_t = vjp(x, out, perm, block_start, tangent, op, reg, descending, eps)
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = (grad_c / out) * (grad_t / out)
        # A rank that underflowed to 0 carries a factor r = 0 in every term.
        weight = np.where(out == 0, 0, weight).astype(x.dtype, copy=False)
        inverse_scale = -eps if descending else eps
        return vjp(x, out, perm, block_start, weight, op, reg, descending, eps) * x.dtype.type(
            inverse_scale
        )
    grad_c = vjp(x, out, perm, block_start, cotangent, op, reg, descending, eps)
    block_mean_sorted = jvp(x, out, perm, block_start, tangent, op, reg, descending, eps)
    # A row holding NaN/inf has no valid perm (its block_start is -1); its
    # result is NaN through grad_c whatever the scatter does.
    unsorted = block_start[..., :1] < 0
    index = np.where(unsorted, np.arange(x.shape[-1]), perm)
    block_mean = np.empty_like(block_mean_sorted)
    np.put_along_axis(block_mean, index, block_mean_sorted, axis=-1)
    sign = 1.0 if descending else -1.0
    return (grad_c * (tangent.astype(x.dtype, copy=False) - block_mean)) * x.dtype.type(sign)
