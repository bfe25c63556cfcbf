"""softrank for numpy arrays: soft rank, soft sort, the operators on the permutahedron.

Soft rank and soft sort with their vjp/jvp; the projection onto the
permutahedron of any vector, soft top-k masks, Spearman correlation, soft
quantiles and isotonic regression (l2 and kl), each with a ``*_with_vjp``
form that returns the value and its pullback.

Every function acts along one ``axis`` of an array of any shape, independently
for every other index, and returns an array of the input's shape and dtype.
Integers, booleans and lists are cast to float64; float16 and bfloat16 are
computed in float32 and returned in their own dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import numpy as np
from numpy.typing import ArrayLike

from softrank import _derivatives, _engine, _host, _layout, _operators
from softrank._types import Direction, Regularization
from softrank._validate import (
    check_axis,
    check_direction,
    check_eps,
    check_float16_ranks,
    check_float_dtype_kind,
    check_increasing,
    check_regularization,
    check_weights,
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
    "isotonic_regression_with_vjp",
    "permutahedron_projection",
    "permutahedron_projection_with_vjp",
    "soft_topk_mask",
    "soft_topk_mask_with_vjp",
    "spearman",
    "spearman_with_vjp",
    "soft_quantile",
    "soft_quantile_with_vjp",
    "soft_median",
    "soft_median_with_vjp",
]


_COMPUTE_DTYPE: dict = {}


def _compute_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """The compute dtype of ``dtype`` (:func:`softrank._layout.compute_dtype_name`), cached."""
    cached = _COMPUTE_DTYPE.get(dtype)
    if cached is not None:
        return cached
    result = np.dtype(_layout.compute_dtype_name(dtype.name, dtype.kind, dtype.itemsize,
                                                 allow_int=True, name=name))
    _COMPUTE_DTYPE[dtype] = result
    return result


def _identity(result: np.ndarray) -> np.ndarray:
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
    if last and x.ndim == 2 and x.dtype == dtype and x.flags.c_contiguous:
        # The common case, rows already: no copy, and the result is the rows.
        return x, _identity
    moved = x if last else np.moveaxis(x, axis, -1)
    moved_shape = moved.shape
    flat = np.ascontiguousarray(moved, dtype=dtype).reshape(_layout.rows_of(moved_shape))
    out_dtype = x.dtype if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else dtype

    def restore(result: np.ndarray) -> np.ndarray:
        back = result.reshape(moved_shape)
        if not last:
            back = np.moveaxis(back, -1, axis)
        return back if back.dtype == out_dtype else back.astype(out_dtype)

    return flat, restore


def _as_array(value: Any, name: str) -> np.ndarray:
    """``np.asarray(value)``, refusing a masked array: its mask would be
    dropped and the masked entries' data ranked as if they were values."""
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy masked array: softrank has no masks; pass the values to use "
            f"(e.g. {name}.filled(fill_value), or {name}.compressed() for a 1-D array)")
    try:
        return np.asarray(value)
    except ValueError as error:  # a ragged nested list
        raise ValueError(f"{name} is not an array of one shape: {error}") from None


def _prepare(x: Any, axis: Any, name: str = "x"):
    array = x if type(x) is np.ndarray else _as_array(x, name)
    dtype = _compute_dtype(array.dtype, name)
    ax = check_axis(axis, array.ndim, array_name=name)
    rows, restore = _to_rows(array, ax, dtype)
    return array, ax, rows, restore


def _prepare_like(
    shape: Tuple[int, ...], other: Any, axis: int, dtype: np.dtype, name: str, like: str = "x"
) -> np.ndarray:
    """Bring ``other`` (named ``name``) to the row layout of the input ``like`` of ``shape``."""
    other = _as_array(other, name)
    check_float_dtype_kind(other.dtype.kind, other.dtype, allow_int=True, name=name)
    if other.shape != shape:
        raise ValueError(
            f"{name} must have the shape of {like} {shape}, got {other.shape}"
        )
    rows, _ = _to_rows(other, axis, dtype)
    return rows


def _soft_forward(x, eps, regularization, direction, axis, op):
    eps = check_eps(eps)
    reg = check_regularization(regularization)
    descending = check_direction(direction)
    array, ax, rows, restore = _prepare(x, axis)
    if op == _engine.OP_RANK and array.dtype == np.float16:
        check_float16_ranks(rows.shape[1])
    out, perm, blocks = _engine.engine().soft_forward(rows, op, reg, descending, eps)
    return array, ax, rows, restore, (out, perm, blocks), (op, reg, descending, eps)


def _soft_value(x, eps, regularization, direction, axis, op):
    """The operator's value alone: the engine keeps no state for a backward pass."""
    eps = check_eps(eps)
    reg = check_regularization(regularization)
    descending = check_direction(direction)
    array, _, rows, restore = _prepare(x, axis)
    if op == _engine.OP_RANK and array.dtype == np.float16:
        check_float16_ranks(rows.shape[1])
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
        ``eps = inf`` the mean (l2) or, for kl, ``-log-mean-exp(-x)`` ascending and
        ``log-mean-exp(x)`` descending, of each row.
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


def _private(buffer: np.ndarray, array: np.ndarray, source: Any) -> np.ndarray:
    """``buffer`` or, where the caller may write to it later, a copy of it:
    for what a pullback reads after the forward has returned."""
    return buffer.copy() if _caller_may_write(buffer, array, source) else buffer


def _unshared(buffer: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``buffer`` or, where the ``value`` handed to the caller is (a view of)
    it, a copy: a pullback must not see the caller's writes to its value."""
    return buffer.copy() if np.may_share_memory(buffer, value) else buffer


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
    if kl and op == _engine.OP_SORT:
        rows = _private(rows, array, x)
    if kl and op == _engine.OP_RANK:
        state = (_unshared(out, value),) + tuple(state[1:])
    shape = array.shape

    def vjp(cotangent: ArrayLike) -> np.ndarray:
        return _soft_product(shape, ax, rows, restore, state, args, cotangent, False)

    _name_pullback(vjp, name)
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


_OPS = _host.NUMPY_OPS


def _reduced_restore(array: np.ndarray, ax: int, dtype: np.dtype) -> Callable[[np.ndarray], np.ndarray]:
    """Maps a ``(rows,)`` (or ``(m, rows)``) result to ``array``'s shape without ``axis``."""
    kept = _layout.reduced_shape(array.shape, ax)
    out_dtype = array.dtype if array.dtype.kind == "f" or array.dtype.name == "bfloat16" else dtype

    def restore(result: np.ndarray) -> np.ndarray:
        back = result.reshape(result.shape[:-1] + kept)
        return back if back.dtype == out_dtype else back.astype(out_dtype)

    return restore


def _gradient_dtype(input_dtype: np.dtype, compute: np.dtype) -> np.dtype:
    """A gradient has its input's dtype (its compute dtype for integer inputs)."""
    return input_dtype if input_dtype.kind == "f" or input_dtype.name == "bfloat16" else compute


def _name_pullback(fn: Callable, name: str) -> None:
    """Names the pullback of ``name``: ``<name>_vjp``, qualified as a local
    function of ``<name>_with_vjp`` (pickle then refuses it as a local object,
    instead of as "not the same object as softrank.numpy.<name>_vjp")."""
    fn.__name__ = name + "_vjp"
    fn.__qualname__ = f"{name}_with_vjp.<locals>.{name}_vjp"


def _pullback(name: str, shape: Tuple[int, ...], fn: Callable, doc: str) -> Callable:
    _name_pullback(fn, name)
    fn.__doc__ = doc + f" ``cotangent`` must have shape {shape}."
    return fn


# --- permutahedron projection ----------------------------------------------------


def _shared_rows(vector: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """``vector`` (length n, the rows' dtype) repeated as C-contiguous rows of
    ``shape``: the engine takes a ``w`` per row."""
    if shape[0] == 1:
        return np.ascontiguousarray(vector).reshape(shape)
    rows = np.empty(shape, vector.dtype)
    rows[...] = vector
    return rows


def _projection_weights(w: Any, array: np.ndarray, ax: int, rows: np.ndarray):
    """``w`` in the row layout of ``rows`` (C-contiguous), and whether it was
    one vector for every row."""
    n = rows.shape[1]
    if w is None:
        _operators.check_default_w_fits(n, array.dtype)
        return _shared_rows(_operators.rho(n, rows.dtype), rows.shape), True
    w_array = _as_array(w, "w")
    check_float_dtype_kind(w_array.dtype.kind, w_array.dtype, allow_int=True, name="w")
    if _operators.projection_weights_shared(w_array.shape, array.shape, n,
                                            w_array.shape == array.shape):
        return _shared_rows(w_array.astype(rows.dtype, copy=False), rows.shape), True
    w_rows, _ = _to_rows(w_array, ax, rows.dtype)
    return np.ascontiguousarray(w_rows), False


def _projection(z, w, eps, reg, axis, name="z", keep_state=True):
    """The projection's rows and, where ``keep_state``, its state for a pullback."""
    array, ax, rows, restore = _prepare(z, axis, name=name)
    w_rows, shared = _projection_weights(w, array, ax, rows)
    if keep_state:
        out, state = _host.projection(rows, w_rows, eps, reg)
    else:  # the value alone: no inverse permutations, no int64 copies
        out, state = _engine.engine().projection_forward_value(rows, w_rows, eps, reg), None
    return array, ax, rows, w_rows, shared, restore, out, state


def permutahedron_projection(
    z: Any,
    w: Any = None,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> np.ndarray:
    """Projection onto the permutahedron of ``w``, along ``axis``.

    l2: ``argmin_{mu in P(w)} 1/2 ||mu - z||^2``; kl: ``log argmin_{mu in
    P(exp w)} KL(mu, exp z)``, where ``P(w)`` is the convex hull of the
    permutations of ``w`` (Blondel et al. 2020, section 3). The ascending soft
    rank is ``P(x / eps, rho)`` and the descending soft sort ``P(rho / eps,
    x)`` (the kl soft rank is ``exp(P_E(x / eps, log rho))``); other ``w`` give
    other operators (:func:`soft_topk_mask`). O(n log n) per row: one sort of
    each of z and w, then pool-adjacent-violators.

    Parameters
    ----------
    z : array_like, shape (..., n, ...)
    w : array_like, optional
        Shape (n,) (the same vector for every row) or the shape of ``z``; any
        order (only its sorted values matter). Default ``rho = (n, ..., 1)``.
        Under kl, ``w`` may hold ``-inf`` (zeros of ``exp w``) where each
        row's largest ``w`` is finite.
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    numpy.ndarray
        Shape and dtype of ``z``; the rows of l2 sum to ``sum(w)``. Rows with
        NaN or inf give NaN. Gradient (in z and w):
        :func:`permutahedron_projection_with_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from softrank.numpy import permutahedron_projection
    >>> permutahedron_projection(np.array([0.0, 3.0, 1.0]), np.array([1.0, 2.0, 3.0]))
    array([1., 3., 2.])
    """
    reg = check_regularization(regularization)
    *_, restore, out, _ = _projection(z, w, 1.0, reg, axis, keep_state=False)
    return restore(out)


def permutahedron_projection_with_vjp(
    z: Any,
    w: Any = None,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> Tuple[np.ndarray, Callable[[ArrayLike], Tuple[np.ndarray, Any]]]:
    """:func:`permutahedron_projection` and its pullback ``vjp(cotangent) -> (grad_z, grad_w)``.

    ``grad_w`` has the shape of ``w`` as given (summed over rows for a 1-D
    ``w``), or is None where ``w`` is None. The Jacobian is block diagonal over
    the PAV blocks (l2: the block mean; kl: block softmaxes), so the pullback
    costs O(n) per row.
    """
    reg = check_regularization(regularization)
    array, ax, rows, w_rows, shared, restore, out, state = _projection(z, w, 1.0, reg, axis)
    value = restore(out)
    shape = array.shape
    w_given = w is not None
    w_dtype = np.asarray(w).dtype if w_given else None
    # What the pullback reads, kept from the caller's later writes: z and w
    # (the kl block softmaxes) and the output (its NaN rows).
    out = _unshared(out, value)
    if reg == _engine.REG_KL:
        rows = _private(rows, array, z)
        if w_given:
            w_rows = _private(w_rows, np.asarray(w), w)

    def vjp(cotangent: ArrayLike):
        g = _prepare_like(shape, cotangent, ax, rows.dtype, "cotangent", "z")
        with np.errstate(invalid="ignore"):  # (a non-finite row's NaN: inf - inf)
            grad_z, grad_w = _derivatives.projection_vjp(
                _OPS, rows, w_rows, out, state, g, 1.0, reg, need_w=w_given)
        if not w_given:
            return restore(grad_z), None
        grad_w = grad_w.sum(axis=0) if shared else restore(grad_w)
        return restore(grad_z), grad_w.astype(_gradient_dtype(w_dtype, rows.dtype), copy=False)

    return value, _pullback("permutahedron_projection", shape, vjp,
                            "(grad_z, grad_w) of sum(cotangent * permutahedron_projection(z, w)).")


# --- soft top-k ----------------------------------------------------------------------


def _topk(x, k, eps, regularization, axis, keep_state=True):
    eps = check_eps(eps)
    reg = check_regularization(regularization)
    array, ax, rows, restore = _prepare(x, axis)
    k = _operators.check_k(k, rows.shape[1])
    w_rows = np.ascontiguousarray(
        np.broadcast_to(_operators.topk_weights(rows.shape[1], k, reg, rows.dtype), rows.shape))
    if keep_state:
        out, state = _host.projection(rows, w_rows, eps, reg)
    else:
        out, state = _engine.engine().projection_forward_value(rows, w_rows, eps, reg), None
    mask = np.exp(out) if reg == _engine.REG_KL else out
    return array, ax, rows, w_rows, restore, out, mask, state, eps, reg


def soft_topk_mask(
    x: Any,
    k: int,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> np.ndarray:
    """A soft indicator of the ``k`` largest entries of ``x`` along ``axis``.

    The projection of ``x / eps`` onto the permutahedron of ``w = (1, ..., 1,
    0, ..., 0)`` (k ones): l2 ``P(x / eps, w)``; kl ``exp(P_E(x / eps, log
    w))``, the entropic projection onto the same polytope.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
    k : int
        0 <= k <= n (kl: k >= 1).
    eps : float, default 1.0
        >= 0. As ``eps -> 0`` the mask tends to the indicator of the k
        largest entries (tied entries at the boundary share what is left);
        ``eps = 0`` returns that limit, ``eps = inf`` the constant ``k / n``.
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    numpy.ndarray
        Shape and dtype of ``x``; values in [0, 1], each row sums to ``k``.
        Gradient: :func:`soft_topk_mask_with_vjp` (zero at eps = 0).

    Examples
    --------
    >>> import numpy as np
    >>> from softrank.numpy import soft_topk_mask
    >>> soft_topk_mask(np.array([0.1, 3.0, 2.0, -1.0]), k=2, eps=0.5)
    array([0., 1., 1., 0.])
    """
    *_, restore, _, mask, _, _, _ = _topk(x, k, eps, regularization, axis, keep_state=False)
    return restore(mask)


def soft_topk_mask_with_vjp(
    x: Any,
    k: int,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> Tuple[np.ndarray, Callable[[ArrayLike], np.ndarray]]:
    """:func:`soft_topk_mask` and its pullback ``vjp(cotangent) -> grad_x``, O(n) per row."""
    array, ax, rows, w_rows, restore, out, mask, state, eps, reg = _topk(
        x, k, eps, regularization, axis)
    shape = array.shape
    value = restore(mask)
    # What the pullback reads, kept from the caller's later writes: x (the
    # kl block softmax), the mask (kl) and the output (its NaN rows).
    out, mask = _unshared(out, value), _unshared(mask, value)
    if reg == _engine.REG_KL:
        rows = _private(rows, array, x)

    def vjp(cotangent: ArrayLike) -> np.ndarray:
        g = _prepare_like(shape, cotangent, ax, rows.dtype, "cotangent")
        if reg == _engine.REG_KL:
            g = g * mask  # d exp(out) = exp(out) d out
        # Differences of x over a tiny eps may overflow to -inf on purpose
        # (softmax weights of exactly 0; see _derivatives._block_softmax), and
        # a non-finite row's are NaN (inf - inf).
        with np.errstate(over="ignore", invalid="ignore"):
            grad, _ = _derivatives.projection_vjp(_OPS, rows, w_rows, out, state, g, eps, reg,
                                                  need_w=False)
        return restore(grad)

    return value, _pullback("soft_topk_mask", shape, vjp,
                                    "Gradient of sum(cotangent * soft_topk_mask(x)) in x.")


# --- Spearman ----------------------------------------------------------------------


def _spearman(pred, target, eps, regularization, axis):
    eps = check_eps(eps)
    reg = check_regularization(regularization)
    array, ax, rows, _ = _prepare(pred, axis, name="pred")
    target_array = _as_array(target, "target")
    if target_array.shape != array.shape:
        raise ValueError(
            f"target must have the shape of pred {array.shape}, got {target_array.shape}")
    # The target is ranked in float64, then its ranks are cast: cast first,
    # distinct targets (int64 above 2^24 for float32 pred) would merge into ties.
    target_rows = _prepare_like(array.shape, target_array, ax, np.dtype(np.float64), "target",
                                "pred")
    eng = _engine.engine()
    ranks, perm, blocks = eng.soft_forward(rows, _engine.OP_RANK, reg, False, eps)
    target_ranks = eng.soft_forward_value(target_rows, _engine.OP_RANK, _engine.REG_L2, False,
                                          0.0).astype(rows.dtype, copy=False)
    corr = eng.pearson(ranks, target_ranks)
    return (array, ax, rows, _reduced_restore(array, ax, rows.dtype), ranks, target_ranks,
            (ranks, perm, blocks), (_engine.OP_RANK, reg, False, eps), corr)


def spearman(
    pred: Any,
    target: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> np.ndarray:
    """Soft Spearman rank correlation of ``pred`` with ``target``, row by row.

    The Pearson correlation of ``soft_rank(pred, eps)`` with the ranks of
    ``target`` (mean ranks for ties). As ``eps -> 0`` it equals
    ``scipy.stats.spearmanr`` of each row; ``1 - spearman`` is a
    learning-to-rank loss.

    Parameters
    ----------
    pred : array_like, shape (..., n, ...)
    target : array_like, shape of ``pred``
        Not differentiated (its ranks are piecewise constant). A row of
        ``target`` holding NaN or +-inf gives NaN, as a row of ``pred`` does
        (``scipy.stats.spearmanr`` ranks +-inf).
    eps : float, default 1.0
    regularization : {"l2", "kl"}
    axis : int, default -1
        Removed from the result.

    Returns
    -------
    numpy.ndarray
        Shape of ``pred`` without ``axis``, values in [-1, 1]; NaN for a constant row (as
        scipy) and at eps = inf (constant soft ranks); ill-conditioned as pred / eps nears a
        constant (see the README's Operators). Gradient in pred: :func:`spearman_with_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from softrank.numpy import spearman
    >>> round(float(spearman(np.array([0.1, 0.5, 0.3]), np.array([1.0, 3.0, 2.0]), eps=0.01)), 12)
    1.0
    """
    *_, restore, _, _, _, _, corr = _spearman(pred, target, eps, regularization, axis)
    return restore(corr)


def spearman_with_vjp(
    pred: Any,
    target: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> Tuple[np.ndarray, Callable[[ArrayLike], np.ndarray]]:
    """:func:`spearman` and its pullback ``vjp(cotangent) -> grad_pred``.

    ``cotangent`` has the shape of the result (``pred`` without ``axis``).
    """
    array, ax, rows, restore, ranks, target_ranks, state, args, corr = _spearman(
        pred, target, eps, regularization, axis)
    kept = _layout.reduced_shape(array.shape, ax)

    def vjp(cotangent: ArrayLike) -> np.ndarray:
        c = _as_array(cotangent, "cotangent")
        check_float_dtype_kind(c.dtype.kind, c.dtype, allow_int=True, name="cotangent")
        if c.shape != kept:
            raise ValueError(f"cotangent must have the shape of the result {kept}, got {c.shape}")
        eng = _engine.engine()
        g = eng.pearson_vjp(ranks, target_ranks,
                            np.ascontiguousarray(c.reshape(-1), dtype=rows.dtype))
        grad = eng.soft_vjp(rows, *state, g, *args)
        return _to_rows(array, ax, rows.dtype)[1](grad)

    return restore(corr), _pullback("spearman", kept, vjp,
                                    "Gradient of sum(cotangent * spearman(pred, target)) in pred.")


# --- quantiles ---------------------------------------------------------------------


def _quantile(x, q, eps, regularization, axis):
    eps = check_eps(eps)
    reg = check_regularization(regularization)
    quantiles, scalar = _operators.check_quantiles(q)
    array, ax, rows, restore = _prepare(x, axis)
    sorted_rows, perm, blocks = _engine.engine().soft_forward(
        rows, _engine.OP_SORT, reg, False, eps)
    value = _operators.quantile_from_sorted(_OPS, sorted_rows, quantiles, scalar)
    return (array, ax, rows, restore, _reduced_restore(array, ax, rows.dtype), quantiles, scalar,
            (sorted_rows, perm, blocks), (_engine.OP_SORT, reg, False, eps), value)


def soft_quantile(
    x: Any,
    q: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> np.ndarray:
    """Soft quantiles of ``x`` along ``axis``: np.quantile's "linear" rule on the soft sort.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        n >= 1.
    q : float or 1-D array_like of floats in [0, 1]
    eps : float, default 1.0
        As ``eps -> 0`` (and at eps = 0) the result equals
        ``np.quantile(x, q, axis=axis, method="linear")``.
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    numpy.ndarray
        np.quantile's layout: shape of ``x`` without ``axis`` for a scalar
        ``q``, with ``len(q)`` in front for a 1-D ``q``. Gradient in x:
        :func:`soft_quantile_with_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from softrank.numpy import soft_quantile
    >>> float(soft_quantile(np.array([4.0, 1.0, 3.0, 2.0]), 0.5, eps=0.01))
    2.5
    """
    *_, reduced, _, _, _, _, value = _quantile(x, q, eps, regularization, axis)
    return reduced(value)


def soft_quantile_with_vjp(
    x: Any,
    q: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> Tuple[np.ndarray, Callable[[ArrayLike], np.ndarray]]:
    """:func:`soft_quantile` and its pullback ``vjp(cotangent) -> grad_x``.

    ``cotangent`` has the shape of the result.
    """
    array, ax, rows, restore, reduced, quantiles, scalar, state, args, value = _quantile(
        x, q, eps, regularization, axis)
    result = reduced(value)
    if args[1] == _engine.REG_KL:  # the kl sort's vjp reads x: keep it from later writes
        rows = _private(rows, array, x)
    lo, hi, frac = _operators.quantile_positions(quantiles, rows.shape[1])

    def vjp(cotangent: ArrayLike) -> np.ndarray:
        c = _as_array(cotangent, "cotangent")
        check_float_dtype_kind(c.dtype.kind, c.dtype, allow_int=True, name="cotangent")
        if c.shape != result.shape:
            raise ValueError(
                f"cotangent must have the shape of the result {result.shape}, got {c.shape}")
        c_rows = c.astype(rows.dtype).reshape(len(quantiles), -1).T  # (rows, m)
        g = np.zeros_like(rows)
        for j in range(len(quantiles)):
            g[:, lo[j]] += c_rows[:, j] * rows.dtype.type(1.0 - frac[j])
            g[:, hi[j]] += c_rows[:, j] * rows.dtype.type(frac[j])
        return restore(_engine.engine().soft_vjp(rows, *state, g, *args))

    return result, _pullback("soft_quantile", result.shape, vjp,
                             "Gradient of sum(cotangent * soft_quantile(x, q)) in x.")


def soft_median(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> np.ndarray:
    """Soft median of ``x`` along ``axis``: ``soft_quantile(x, 0.5, ...)`` (axis removed).

    As ``eps -> 0`` it equals ``np.median(x, axis=axis)``.
    """
    return soft_quantile(x, 0.5, eps, regularization=regularization, axis=axis)


def soft_median_with_vjp(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> Tuple[np.ndarray, Callable[[ArrayLike], np.ndarray]]:
    """:func:`soft_median` and its pullback (see :func:`soft_quantile_with_vjp`)."""
    return soft_quantile_with_vjp(x, 0.5, eps, regularization=regularization, axis=axis)


# --- isotonic regression -------------------------------------------------------------


def _isotonic_prepare(y, weights, axis):
    array, ax, rows, restore = _prepare(y, axis, name="y")
    w_rows = None
    if weights is not None:
        w_rows = _prepare_like(array.shape, weights, ax, rows.dtype, "weights", "y")
    return array, ax, rows, restore, w_rows


def _checked_weights(solve: Callable[[], Any], weights: Any, dtype: np.dtype):
    """``solve()``, an engine call that checks ``0 < weights < inf`` (in the
    compute dtype) and raises otherwise; its error here says which: invalid
    weights, or valid ones that overflow or underflow in the compute dtype."""
    try:
        return solve()
    except ValueError as error:
        if weights is None or not str(error).startswith("weights must be finite"):
            raise
        check_weights(np.asarray(weights), dtype)
        raise


def isotonic_regression(
    y: Any,
    *,
    weights: Any = None,
    increasing: bool = True,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> np.ndarray:
    """Weighted isotonic regression along ``axis`` by pool-adjacent-violators.

    l2: ``argmin_v sum_i w_i (v_i - y_i)^2``; kl: ``argmin_v sum_i exp(y_i -
    v_i) + w_i v_i`` (fast-soft-sort's ``isotonic_kl`` with weights
    ``exp(its w)``); subject to ``v`` non-decreasing (``increasing=True``) or
    non-increasing. Exact, O(n) per row. On each block B of equal values the
    solution is ``sum_B w y / sum_B w`` (l2) or ``log sum_B exp(y) - log
    sum_B w`` (kl).

    Parameters
    ----------
    y : array_like, shape (..., n, ...)
    weights : array_like, shape of ``y``, optional
        Positive finite weights; default all ones.
    increasing : bool, default True
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    numpy.ndarray
        Shape and dtype of ``y``. Gradient in y and the weights:
        :func:`isotonic_regression_with_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from softrank.numpy import isotonic_regression
    >>> isotonic_regression(np.array([1.0, 3.0, 2.0, 4.0]))
    array([1. , 2.5, 2.5, 4. ])
    """
    reg = check_regularization(regularization)
    increasing = check_increasing(increasing)
    array, ax, rows, restore, w_rows = _isotonic_prepare(y, weights, axis)
    solution, _ = _checked_weights(
        lambda: _engine.engine().isotonic_forward(rows, w_rows, increasing, reg),
        weights, rows.dtype)
    return restore(solution)


def isotonic_regression_with_vjp(
    y: Any,
    *,
    weights: Any = None,
    increasing: bool = True,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> Tuple[np.ndarray, Callable[[ArrayLike], Tuple[np.ndarray, Any]]]:
    """:func:`isotonic_regression` and its pullback ``vjp(cotangent) -> (grad_y, grad_weights)``.

    ``grad_weights`` is None where ``weights`` is None. Per block B (l2):
    ``grad_y_j = w_j / W_B sum_B c``, ``grad_w_j = (y_j - v_B) / W_B sum_B c``;
    (kl): ``grad_y_j = softmax_B(y)_j sum_B c``, ``grad_w_j = -sum_B c / W_B``.
    """
    reg = check_regularization(regularization)
    increasing = check_increasing(increasing)
    array, ax, rows, restore, w_rows = _isotonic_prepare(y, weights, axis)
    eng = _engine.engine()
    # block_start as the engine gives it (a NaN row's is -1): its l2 vjp reads it
    solution, block_start = _checked_weights(
        lambda: eng.isotonic_forward(rows, w_rows, increasing, reg), weights, rows.dtype)
    shape = array.shape
    weights_dtype = np.asarray(weights).dtype if weights is not None else None
    value = restore(solution)
    # What the pullback reads, kept from the caller's later writes: y, the
    # weights and the solution.
    solution = _unshared(solution, value)
    if reg == _engine.REG_KL or weights is not None:  # (l2 without weights reads neither)
        rows = _private(rows, array, y)
    if weights is not None:
        w_rows = _private(w_rows, np.asarray(weights), weights)

    def vjp(cotangent: ArrayLike):
        g = _prepare_like(shape, cotangent, ax, rows.dtype, "cotangent", "y")
        if reg == _engine.REG_L2 and w_rows is None:
            grad_y, grad_w = eng.isotonic_vjp(None, block_start, g), None
        elif reg == _engine.REG_L2:  # both gradients in one O(n) pass of the engine
            grad_y, grad_w = eng.isotonic_vjp_weighted(rows, solution, w_rows, block_start, g)
        else:
            # (A NaN row's blocks are -1: one block, whose formulas give NaN.)
            blocks = np.maximum(block_start, 0).astype(np.int64)
            grad_y, grad_w = _derivatives.isotonic_vjp(_OPS, rows, w_rows, solution, blocks, g,
                                                       reg)
        if grad_w is None:
            return restore(grad_y), None
        return restore(grad_y), restore(grad_w).astype(_gradient_dtype(weights_dtype, rows.dtype),
                                                       copy=False)

    return value, _pullback(
        "isotonic_regression", shape, vjp,
        "(grad_y, grad_weights) of sum(cotangent * isotonic_regression(y, weights=weights)).")


def isotonic_regression_vjp(
    y: Any,
    cotangent: Any,
    *,
    weights: Any = None,
    increasing: bool = True,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> np.ndarray:
    """Gradient of ``sum(cotangent * isotonic_regression(y))`` with respect to ``y``.

    Within each PAV block ``B`` the l2 solution is the weighted mean of ``y``,
    so ``grad_j = w_j / sum_B w * sum_B cotangent``. O(n) per row. The
    gradient with respect to the weights too: :func:`isotonic_regression_with_vjp`.
    """
    reg = check_regularization(regularization)
    increasing = check_increasing(increasing)
    if reg == _engine.REG_L2:
        array, ax, rows, restore, w_rows = _isotonic_prepare(y, weights, axis)
        vec = _prepare_like(array.shape, cotangent, ax, rows.dtype, "cotangent", "y")
        eng = _engine.engine()
        _, blocks = _checked_weights(lambda: eng.isotonic_forward(rows, w_rows, increasing),
                                     weights, rows.dtype)
        return restore(eng.isotonic_vjp(w_rows, blocks, vec))
    _, vjp = isotonic_regression_with_vjp(y, weights=weights, increasing=increasing,
                                          regularization=regularization, axis=axis)
    return vjp(cotangent)[0]
