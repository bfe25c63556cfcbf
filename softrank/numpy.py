"""softrank for numpy arrays: soft rank, soft sort, their vjp/jvp, isotonic regression.

Every function acts along one ``axis`` of an array of any shape, independently
for every other index, and returns an array of the input's shape and dtype.
Integers, booleans and lists are cast to float64; float16 and bfloat16 are
computed in float32 and returned in their own dtype.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Tuple

import numpy as np
from numpy.typing import ArrayLike

from softrank import _engine
from softrank._types import Direction, Regularization
from softrank._validate import (
    check_axis,
    check_direction,
    check_eps,
    check_float_dtype_kind,
    check_regularization,
)

__all__ = [
    "soft_rank",
    "soft_sort",
    "soft_rank_vjp",
    "soft_sort_vjp",
    "soft_rank_with_vjp",
    "soft_sort_with_vjp",
    "soft_rank_jvp",
    "soft_sort_jvp",
    "isotonic_regression",
    "isotonic_regression_vjp",
]


_COMPUTE_DTYPE: dict = {}


def _compute_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """float64 stays float64; every narrower float (and bfloat16) runs in float32."""
    cached = _COMPUTE_DTYPE.get(dtype)
    if cached is not None:
        return cached
    if dtype.name == "bfloat16":  # ml_dtypes' bfloat16 has kind 'V'
        result = np.dtype(np.float32)
    else:
        check_float_dtype_kind(dtype.kind, str(dtype), allow_int=True, name=name)
        if dtype.kind in "iub" or dtype.itemsize >= 8:
            # ints, float64 and longdouble: the core computes in double.
            result = np.dtype(np.float64)
        else:
            result = np.dtype(np.float32)
    _COMPUTE_DTYPE[dtype] = result
    return result


def _to_rows(
    x: np.ndarray, axis: int, dtype: np.dtype
) -> Tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """View ``x`` as C-contiguous ``(rows, n)`` with ``axis`` last.

    Returns the rows and a function that maps a ``(rows, n)`` result back to
    the layout of ``x`` (axis restored, original dtype). The common case, the
    last axis of a contiguous array of the compute dtype, costs no copy.
    """
    last = axis == x.ndim - 1
    moved = x if last else np.moveaxis(x, axis, -1)
    moved_shape = moved.shape
    n = moved_shape[-1]
    flat = np.ascontiguousarray(moved, dtype=dtype).reshape(math.prod(moved_shape[:-1]), n)
    out_dtype = x.dtype if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else dtype

    def restore(result: np.ndarray) -> np.ndarray:
        back = result.reshape(moved_shape)
        if not last:
            back = np.moveaxis(back, -1, axis)
        return back if back.dtype == out_dtype else back.astype(out_dtype)

    return flat, restore


def _prepare(x: Any, axis: Any, name: str = "x"):
    array = x if type(x) is np.ndarray else np.asarray(x)
    dtype = _compute_dtype(array.dtype, name)
    ax = check_axis(axis, array.ndim, array_name=name)
    rows, restore = _to_rows(array, ax, dtype)
    return array, ax, rows, restore


def _prepare_like(
    shape: Tuple[int, ...], other: Any, axis: int, dtype: np.dtype, name: str
) -> np.ndarray:
    """Bring a cotangent/tangent to the row layout of an array of ``shape``; shapes must match."""
    other = np.asarray(other)
    check_float_dtype_kind(other.dtype.kind, str(other.dtype), allow_int=True, name=name)
    if other.shape != shape:
        raise ValueError(
            f"{name} must have the shape of x {shape}, got {other.shape}"
        )
    rows, _ = _to_rows(other, axis, dtype)
    return rows


def _soft_forward(x, eps, regularization, direction, axis, op):
    eps = check_eps(eps)
    reg = check_regularization(regularization)
    descending = check_direction(direction)
    array, ax, rows, restore = _prepare(x, axis)
    out, perm, blocks = _engine.engine().soft_forward(rows, op, reg, descending, eps)
    return array, ax, rows, restore, (out, perm, blocks), (op, reg, descending, eps)


def _soft_value(x, eps, regularization, direction, axis, op):
    """The operator's value alone: the engine keeps no state for a backward pass."""
    eps = check_eps(eps)
    reg = check_regularization(regularization)
    descending = check_direction(direction)
    _, _, rows, restore = _prepare(x, axis)
    return restore(_engine.engine().soft_forward_value(rows, op, reg, descending, eps))


def soft_rank(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> np.ndarray:
    """Soft (differentiable) ranks of ``x`` along ``axis``.

    ``soft_rank(x) = P(x / eps, rho)``: the projection of ``x / eps`` onto the
    permutahedron of ``rho = (n, ..., 1)`` (Blondel et al. 2020), exact, in
    O(n log n) per row.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Values to rank. Any real dtype; ints and lists become float64.
    eps : float, default 1.0
        Regularization strength, >= 0. ``eps -> 0`` gives the hard ranks
        (``eps = 0`` is the hard operator, ties get their mean rank);
        ``eps = inf`` gives ``(n + 1) / 2`` everywhere.
    regularization : {"l2", "kl"}
        Quadratic or entropic regularization.
    direction : {"ascending", "descending"}
        "ascending": rank 1 is the smallest value.
    axis : int, default -1
        The axis to rank along.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``x``. Every row sums to ``n (n + 1) / 2``.
        A row holding NaN or inf is NaN.

    Notes
    -----
    Gradient: see :func:`soft_rank_vjp`; block-diagonal in sorted order, O(n).

    Examples
    --------
    >>> import numpy as np
    >>> from softrank.numpy import soft_rank
    >>> soft_rank(np.array([3.0, 1.0, 2.0]), eps=0.1)
    array([3., 1., 2.])
    """
    return _soft_value(x, eps, regularization, direction, axis, _engine.OP_RANK)


def soft_sort(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> np.ndarray:
    """Soft (differentiable) sort of ``x`` along ``axis``.

    ``soft_sort(x) = P(rho / eps, x)``: the projection of ``rho / eps`` onto
    the permutahedron of ``x`` (Blondel et al. 2020), exact, O(n log n).

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
    eps : float, default 1.0
        Regularization strength, >= 0. ``eps = 0`` returns the sorted values;
        ``eps = inf`` the mean (l2) or log-mean-exp (kl) of each row.
    regularization : {"l2", "kl"}
    direction : {"ascending", "descending"}
    axis : int, default -1

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``x``; l2 preserves every row's sum.

    Examples
    --------
    >>> import numpy as np
    >>> from softrank.numpy import soft_sort
    >>> soft_sort(np.array([3.0, 1.0, 2.0]), eps=0.1)
    array([1., 2., 3.])
    """
    return _soft_value(x, eps, regularization, direction, axis, _engine.OP_SORT)


def _soft_product(shape, ax, rows, restore, state, args, vector, jvp):
    """vjp (or jvp) of the forward pass whose results are ``rows, restore, state, args``.

    ``shape`` is the shape of ``x``; ``vector`` the caller's cotangent (tangent),
    validated and brought to the ``(rows, n)`` layout here. O(n) per row.
    """
    name = "tangent" if jvp else "cotangent"
    vec = _prepare_like(shape, vector, ax, rows.dtype, name)
    fn = _engine.engine().soft_jvp if jvp else _engine.engine().soft_vjp
    return restore(fn(rows, *state, vec, *args))


def _soft_vjp(x, cotangent, eps, regularization, direction, axis, op, jvp=False):
    array, ax, rows, restore, state, args = _soft_forward(
        x, eps, regularization, direction, axis, op
    )
    return _soft_product(array.shape, ax, rows, restore, state, args, cotangent, jvp)


def _caller_may_write(buffer: np.ndarray, array: np.ndarray, source: Any) -> bool:
    """Whether ``buffer``, made from ``array = np.asarray(source)``, is memory the caller holds.

    ``buffer`` is either a view of ``array`` or a fresh conversion, and a fresh
    allocation cannot overlap the live ``array``: the bounds check of
    ``np.may_share_memory`` is exact here (and O(1), unlike ``np.shares_memory``
    on strided input). An ``array`` that ``np.asarray`` built from a list owns
    its data and nobody else holds it.
    """
    if not np.may_share_memory(buffer, array):
        return False
    return array is source or not array.flags.owndata


def _soft_with_vjp(x, eps, regularization, direction, axis, op, name):
    array, ax, rows, restore, state, args = _soft_forward(
        x, eps, regularization, direction, axis, op
    )
    out = state[0]
    value = restore(out)
    # The pullback must not see later in-place changes to x or to the value
    # returned: copy what aliases the caller's memory and is read by the
    # engine's vjp. Per ALGORITHM.md ("Backward"), the Jacobian depends on
    # perm and the blocks only, plus the output for the kl rank and x for
    # the kl sort; perm and block_start are the forward's own.
    kl = args[1] == _engine.REG_KL
    if kl and op == _engine.OP_SORT and _caller_may_write(rows, array, x):
        rows = rows.copy()
    if kl and op == _engine.OP_RANK and np.may_share_memory(value, out):
        state = (out.copy(),) + tuple(state[1:])
    shape = array.shape

    def vjp(cotangent: ArrayLike) -> np.ndarray:
        return _soft_product(shape, ax, rows, restore, state, args, cotangent, False)

    vjp.__name__ = vjp.__qualname__ = name + "_vjp"
    vjp.__doc__ = (
        f"Gradient of ``sum(cotangent * {name}(x))`` with respect to ``x``, from the "
        f"stored forward state, O(n) per row. ``cotangent`` must have the shape of "
        f"``x`` {shape}; the result has the shape and dtype of ``x``."
    )
    return value, vjp


def soft_rank_vjp(
    x: Any,
    cotangent: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> np.ndarray:
    """Gradient of ``sum(cotangent * soft_rank(x))`` with respect to ``x``.

    The Jacobian of the l2 soft rank is ``(I - B) / eps`` in sorted order,
    with ``B`` the block-averaging matrix of the PAV blocks; for kl it is
    ``(diag(r) - r r^T / R_B) / eps`` per block. Cost O(n) per row after the
    forward pass. Zero for ``eps = 0`` and ``eps = inf``.

    Parameters
    ----------
    x, eps, regularization, direction, axis : as in :func:`soft_rank`
    cotangent : array_like, shape of ``x``

    Returns
    -------
    numpy.ndarray
        Shape and dtype of ``x``.
    """
    return _soft_vjp(x, cotangent, eps, regularization, direction, axis, _engine.OP_RANK)


def soft_sort_vjp(
    x: Any,
    cotangent: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> np.ndarray:
    """Gradient of ``sum(cotangent * soft_sort(x))`` with respect to ``x``.

    l2: the block mean of the cotangent, sent back through the sorting
    permutation; kl: the block softmax of the sorted values times the block
    sum of the cotangent. ``eps = 0`` gives the permutation. O(n) per row.

    Parameters
    ----------
    x, eps, regularization, direction, axis : as in :func:`soft_sort`
    cotangent : array_like, shape of ``x``

    Returns
    -------
    numpy.ndarray
        Shape and dtype of ``x``.
    """
    return _soft_vjp(x, cotangent, eps, regularization, direction, axis, _engine.OP_SORT)


def soft_rank_with_vjp(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> Tuple[np.ndarray, Callable[[ArrayLike], np.ndarray]]:
    """Soft ranks of ``x`` and their pullback, from one forward pass (like ``jax.vjp``).

    ``soft_rank(x, ...)`` followed by ``soft_rank_vjp(x, cotangent, ...)``
    sorts ``x`` twice; this sorts it once and keeps the forward state (the
    sorting permutation and the PAV blocks), from which every vjp costs O(n)
    per row.

    Parameters
    ----------
    x, eps, regularization, direction, axis : as in :func:`soft_rank`
        Checked here: bad arguments raise at this call, as in :func:`soft_rank`.

    Returns
    -------
    value : numpy.ndarray
        ``soft_rank(x, eps, ...)``, bitwise: same shape and dtype as ``x``
        (float64 for ints, booleans and lists).
    vjp : callable
        ``vjp(cotangent) -> numpy.ndarray``: the gradient of
        ``sum(cotangent * value)`` with respect to ``x``, equal bitwise to
        ``soft_rank_vjp(x, cotangent, eps, ...)``. ``cotangent`` is
        array_like with the shape of ``x`` (else ``ValueError``) and a real
        or integer dtype, computed in the dtype of the forward pass; the
        gradient has the shape and dtype of ``value``. It may be called any
        number of times, and changing ``x`` or ``value`` in place afterwards
        does not change it (it keeps a private copy of what it reads when
        that would alias them).

    See Also
    --------
    soft_rank_vjp : the same gradient, recomputing the forward pass.

    Examples
    --------
    >>> import numpy as np
    >>> from softrank.numpy import soft_rank_with_vjp
    >>> x = np.array([2.0, 0.5, 3.0, -1.0])
    >>> ranks, vjp = soft_rank_with_vjp(x, eps=2.0)
    >>> ranks
    array([2.9375, 2.1875, 3.4375, 1.4375])
    >>> vjp(np.array([1.0, 0.0, 0.0, 0.0]))  # gradient of ranks[0]
    array([ 0.375, -0.125, -0.125, -0.125])
    """
    return _soft_with_vjp(x, eps, regularization, direction, axis, _engine.OP_RANK, "soft_rank")


def soft_sort_with_vjp(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> Tuple[np.ndarray, Callable[[ArrayLike], np.ndarray]]:
    """Soft sort of ``x`` and its pullback, from one forward pass (like ``jax.vjp``).

    The value and gradient of :func:`soft_sort` / :func:`soft_sort_vjp` with
    one sort of ``x`` instead of two; every vjp costs O(n) per row.

    Parameters
    ----------
    x, eps, regularization, direction, axis : as in :func:`soft_sort`
        Checked here: bad arguments raise at this call, as in :func:`soft_sort`.

    Returns
    -------
    value : numpy.ndarray
        ``soft_sort(x, eps, ...)``, bitwise: same shape and dtype as ``x``
        (float64 for ints, booleans and lists).
    vjp : callable
        ``vjp(cotangent) -> numpy.ndarray``: the gradient of
        ``sum(cotangent * value)`` with respect to ``x``, equal bitwise to
        ``soft_sort_vjp(x, cotangent, eps, ...)``. ``cotangent``: array_like
        with the shape of ``x`` (else ``ValueError``), real or integer dtype;
        the gradient has the shape and dtype of ``value``. Callable any number
        of times; unaffected by later in-place changes to ``x`` or ``value``.

    See Also
    --------
    soft_sort_vjp : the same gradient, recomputing the forward pass.

    Examples
    --------
    >>> import numpy as np
    >>> from softrank.numpy import soft_sort_with_vjp
    >>> values, vjp = soft_sort_with_vjp(np.array([3.0, 1.0, 2.0]), eps=0.1)
    >>> values
    array([1., 2., 3.])
    >>> vjp(np.array([0.0, 0.0, 1.0]))  # gradient of the largest value
    array([1., 0., 0.])
    """
    return _soft_with_vjp(x, eps, regularization, direction, axis, _engine.OP_SORT, "soft_sort")


def soft_rank_jvp(
    x: Any,
    tangent: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> np.ndarray:
    """Jacobian-vector product of :func:`soft_rank` at ``x`` with ``tangent``.

    The soft-rank Jacobian is symmetric, so this equals :func:`soft_rank_vjp`
    with ``tangent`` as the cotangent. O(n) per row.
    """
    return _soft_vjp(x, tangent, eps, regularization, direction, axis, _engine.OP_RANK, jvp=True)


def soft_sort_jvp(
    x: Any,
    tangent: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> np.ndarray:
    """Jacobian-vector product of :func:`soft_sort` at ``x`` with ``tangent``. O(n)."""
    return _soft_vjp(x, tangent, eps, regularization, direction, axis, _engine.OP_SORT, jvp=True)


def _isotonic_prepare(y, weights, axis):
    array, ax, rows, restore = _prepare(y, axis, name="y")
    w_rows = None
    if weights is not None:
        w_rows = _prepare_like(array.shape, weights, ax, np.dtype(np.float64), "weights")
        if not np.all(np.isfinite(w_rows)) or not np.all(w_rows > 0):
            raise ValueError("weights must be finite and > 0 everywhere")
        w_rows = w_rows.astype(rows.dtype, copy=False)
        if not np.all(w_rows > 0):
            raise ValueError(f"weights must stay > 0 in {rows.dtype} (underflow)")
    return array, ax, rows, restore, w_rows


def isotonic_regression(
    y: Any,
    *,
    weights: Any = None,
    increasing: bool = True,
    axis: int = -1,
) -> np.ndarray:
    """Weighted l2 isotonic regression along ``axis`` by pool-adjacent-violators.

    Solves ``argmin_v sum_i w_i (v_i - y_i)^2`` subject to ``v`` non-decreasing
    (``increasing=True``) or non-increasing, exactly, in O(n) per row.

    Parameters
    ----------
    y : array_like, shape (..., n, ...)
    weights : array_like, shape of ``y``, optional
        Positive finite weights; default all ones.
    increasing : bool, default True
    axis : int, default -1

    Returns
    -------
    numpy.ndarray
        Shape and dtype of ``y``. Gradient: :func:`isotonic_regression_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from softrank.numpy import isotonic_regression
    >>> isotonic_regression(np.array([1.0, 3.0, 2.0, 4.0]))
    array([1. , 2.5, 2.5, 4. ])
    """
    _, _, rows, restore, w_rows = _isotonic_prepare(y, weights, axis)
    solution, _ = _engine.engine().isotonic_forward(rows, w_rows, bool(increasing))
    return restore(solution)


def isotonic_regression_vjp(
    y: Any,
    cotangent: Any,
    *,
    weights: Any = None,
    increasing: bool = True,
    axis: int = -1,
) -> np.ndarray:
    """Gradient of ``sum(cotangent * isotonic_regression(y))`` with respect to ``y``.

    Within each PAV block ``B`` the solution is the weighted mean of ``y``, so
    ``grad_j = w_j / sum_B w * sum_B cotangent``. O(n) per row.
    """
    array, ax, rows, restore, w_rows = _isotonic_prepare(y, weights, axis)
    vec = _prepare_like(array.shape, cotangent, ax, rows.dtype, "cotangent")
    eng = _engine.engine()
    _, blocks = eng.isotonic_forward(rows, w_rows, bool(increasing))
    return restore(eng.isotonic_vjp(w_rows, blocks, vec))
