"""Host-side entry points shared by the framework adapters.

The torch, jax and tensorflow adapters move the operator's axis last and hand
these functions numpy arrays of shape ``(..., n)`` in float32 or float64; the
functions fold the leading dimensions into the ``(rows, n)`` layout of the
engine contract (see :mod:`softrank._engine`) and unfold the results. Nothing
here validates user input: the adapters have done that already.

:func:`hvp` is the second derivative that double backward needs (the
engine's ``soft_hvp``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import numpy as np

from softrank import _derivatives, _engine

__all__ = ["forward", "forward_value", "vjp", "jvp", "hvp", "projection", "isotonic",
           "ProjectionState", "NumpyOps", "NUMPY_OPS"]


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


def forward_value(x: np.ndarray, op: int, reg: int, descending: bool, eps: float) -> np.ndarray:
    """``out`` of :func:`forward` alone (no state for a backward pass)."""
    return _engine.engine().soft_forward_value(_rows(x), op, reg, descending, eps).reshape(x.shape)


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

    What differentiating a vjp (w.r.t. ``x``, cotangent fixed) or a jvp
    (w.r.t. ``x``, tangent fixed) needs; computed by the engine's
    ``soft_hvp`` in O(n) per row (zero for l2, whose Jacobian is locally
    constant). All arrays have shape ``(..., n)``; the result has the dtype
    of ``x``.
    """
    grad = _engine.engine().soft_hvp(
        _rows(x), _rows(out), _rows(perm), _rows(block_start),
        _rows(cotangent.astype(x.dtype, copy=False)),
        _rows(tangent.astype(x.dtype, copy=False)), op, reg, descending, eps,
    )
    return grad.reshape(x.shape)


class ProjectionState(NamedTuple):
    """The integer structure of a projection, for :mod:`softrank._derivatives`.

    Every field has the shape of ``z`` (``(..., n)``) and dtype int64:
    ``perm_z[..., i]`` is the position of z at decreasing sorted position i,
    ``inv_z`` its inverse (``inv_z[perm_z[i]] = i``), likewise ``perm_w`` and
    ``inv_w`` for w, and ``block_start[..., i]`` is the sorted position where
    the PAV block of sorted position i starts.
    """

    perm_z: np.ndarray
    inv_z: np.ndarray
    perm_w: np.ndarray
    inv_w: np.ndarray
    block_start: np.ndarray


def projection(
    z: np.ndarray, w: np.ndarray, eps: float, reg: int
) -> Tuple[np.ndarray, ProjectionState]:
    """``P(z / eps, w)`` (reg 0, l2) or ``P_E(z / eps, w)`` (reg 1, kl) and its state.

    ``z`` and ``w`` have the same shape ``(..., n)`` and float dtype; the
    projection acts along the last axis.
    """
    shape = z.shape
    eng = _engine.engine()
    out, perm_z, perm_w, block_start = eng.projection_forward(
        _rows(z), _rows(w.astype(z.dtype, copy=False)), eps, reg
    )
    inv_z = eng.inverse_permutations(perm_z)
    inv_w = eng.inverse_permutations(perm_w)
    state = ProjectionState(*(a.astype(np.int64).reshape(shape)
                              for a in (perm_z, inv_z, perm_w, inv_w, block_start)))
    return out.reshape(shape), state


def isotonic(
    y: np.ndarray, weights: Optional[np.ndarray], increasing: bool, reg: int
) -> Tuple[np.ndarray, np.ndarray]:
    """``(solution, block_start)`` of the isotonic regression of ``y`` along its last axis.

    ``block_start`` (int64, shape of ``y``) is a valid position everywhere: a
    NaN row (the engine marks it -1) is one block, so that the derivative
    formulas can index it (they return NaN there).
    """
    shape = y.shape
    solution, block_start = _engine.engine().isotonic_forward(
        _rows(y), None if weights is None else _rows(weights.astype(y.dtype, copy=False)),
        bool(increasing), reg,
    )
    block_start = np.maximum(block_start, 0).astype(np.int64).reshape(shape)
    return solution.reshape(shape), block_start


class NumpyOps:
    """The array namespace of :mod:`softrank._derivatives` and :mod:`softrank._operators`."""

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    sqrt = staticmethod(np.sqrt)
    ones_like = staticmethod(np.ones_like)

    @staticmethod
    def take(a, index):
        return np.take_along_axis(a, index, axis=-1)

    @staticmethod
    def block_sum(v, block_start):
        # Blocks are contiguous runs of positions: one reduceat over the
        # flattened rows, each block named by its first position.
        if v.size == 0:
            return v.copy()
        heads = (block_start == np.arange(v.shape[-1])).reshape(-1)
        sums = np.add.reduceat(np.ascontiguousarray(v).reshape(-1), np.flatnonzero(heads))
        return sums[np.cumsum(heads) - 1].reshape(v.shape)

    @staticmethod
    def stop_gradient(a):
        return a

    @staticmethod
    def nan_of(a):
        return np.where(np.isnan(a), a, np.zeros((), a.dtype))

    @staticmethod
    def take_columns(a, index):
        return a[..., index]

    @staticmethod
    def sum_last(a):
        return a.sum(axis=-1)

    @staticmethod
    def constant(values, like):
        return np.asarray(values, dtype=like.dtype)

    @staticmethod
    def move_last_to_first(a):
        return np.moveaxis(a, -1, 0)

    @staticmethod
    def row_scale(a):
        # None where no row needs scaling (concrete values: skip the divisions)
        largest = a.max(axis=-1, keepdims=True, initial=0.0)
        if not (largest * _derivatives.ROW_SCALE_FACTOR > 1.0).any():
            return None
        return np.maximum(largest * _derivatives.ROW_SCALE_FACTOR, np.ones((), a.dtype))

    @staticmethod
    def times_factors(value, before, after):
        return value * before * after  # (numpy folds nothing)

    @staticmethod
    def stop_gradient_where_neg_inf(a):
        return a


NUMPY_OPS = NumpyOps()
