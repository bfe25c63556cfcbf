"""softrank for TensorFlow: soft rank and soft sort with a custom gradient.

``soft_rank`` and ``soft_sort`` act along any ``axis`` of a tensor of any
(statically known) rank, eagerly and inside ``tf.function``; they work in a
Keras loss. The forward and backward passes run the CPU engine through
:func:`tf.numpy_function` (tensors on a GPU are copied to the host and
back); the forward stores the permutation and the PAV blocks (int32), so the
backward is O(n) per row. Because of ``numpy_function`` the ops cannot be
compiled by XLA: use ``jit_compile=False`` (Keras: ``model.compile(...,
jit_compile=False)``).

float16 and bfloat16 are computed in float32 and returned in their own dtype;
integer, bool and complex tensors raise TypeError.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import tensorflow as tf

from softrank import _host
from softrank._engine import OP_RANK, OP_SORT
from softrank._validate import (
    check_axis,
    check_direction,
    check_eps,
    check_float_dtype_kind,
    check_regularization,
)

__all__ = ["soft_rank", "soft_sort"]


def _dtype_kind(dtype: tf.DType) -> str:
    if dtype.is_bool:
        return "b"
    if dtype.is_integer:
        return "i"
    if dtype.is_complex:
        return "c"
    return "O"


def _soft_op(x: tf.Tensor, op: int, reg: int, descending: bool, eps: float) -> tf.Tensor:
    """The operator on ``x`` (axis last, float32/float64) with its gradient."""
    params = dict(op=op, reg=reg, descending=descending, eps=eps)

    @tf.custom_gradient
    def soft_op(x):
        out, perm, block_start = tf.numpy_function(
            partial(_host.forward, **params),
            [x],
            [x.dtype, tf.int32, tf.int32],
            stateful=False,
        )
        for tensor in (out, perm, block_start):
            tensor.set_shape(x.shape)

        def grad(cotangent):
            result = tf.numpy_function(
                partial(_host.vjp, **params),
                [x, out, perm, block_start, tf.cast(cotangent, x.dtype)],
                x.dtype,
                stateful=False,
            )
            result.set_shape(x.shape)
            return result

        return out, grad

    return soft_op(x)


def _apply(x: Any, eps: Any, regularization: Any, direction: Any, axis: Any, op: int):
    eps = check_eps(eps)
    reg = check_regularization(regularization)
    descending = check_direction(direction)
    x = tf.convert_to_tensor(x)
    dtype = x.dtype
    if not dtype.is_floating:
        check_float_dtype_kind(_dtype_kind(dtype), dtype.name, allow_int=False)
    ndim = x.shape.rank
    if ndim is None:
        raise ValueError("x must have a statically known rank (number of dimensions)")
    ax = check_axis(axis, ndim)
    compute_dtype = tf.float64 if dtype == tf.float64 else tf.float32
    order = [i for i in range(ndim) if i != ax] + [ax]
    last = ax == ndim - 1
    moved = x if last else tf.transpose(x, order)
    out = _soft_op(tf.cast(moved, compute_dtype), op, reg, descending, eps)
    if not last:
        out = tf.transpose(out, np.argsort(order).tolist())
    return tf.cast(out, dtype)


def soft_rank(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: str = "l2",
    direction: str = "ascending",
    axis: int = -1,
) -> tf.Tensor:
    """Soft (differentiable) ranks of ``x`` along ``axis``.

    ``soft_rank(x) = P(x / eps, rho)``: the exact projection of ``x / eps``
    onto the permutahedron of ``rho = (n, ..., 1)`` (Blondel et al. 2020),
    O(n log n) per row; the gradient costs O(n) per row.

    Parameters
    ----------
    x : tensor_like, shape (..., n, ...)
        A floating tensor; float16 and bfloat16 run in float32.
    eps : float, default 1.0
        Regularization strength, >= 0 (a Python number: it is a constant of
        the graph). ``eps = 0`` gives the hard ranks (ties get their mean
        rank), ``eps = inf`` ``(n + 1) / 2``.
    regularization : {"l2", "kl"}
    direction : {"ascending", "descending"}
        "ascending": rank 1 is the smallest value.
    axis : int, default -1

    Returns
    -------
    tf.Tensor
        Shape and dtype of ``x``; every row sums to ``n (n + 1) / 2``.

    Notes
    -----
    Gradient: ``(I - B) / eps`` in sorted order for l2 (``B`` averages over
    the PAV blocks), ``(diag(r) - r r^T / R_B) / eps`` per block for kl.

    Examples
    --------
    >>> import tensorflow as tf
    >>> from softrank.tensorflow import soft_rank
    >>> soft_rank(tf.constant([3.0, 1.0, 2.0]), eps=0.1).numpy()
    array([3., 1., 2.], dtype=float32)
    """
    return _apply(x, eps, regularization, direction, axis, OP_RANK)


def soft_sort(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: str = "l2",
    direction: str = "ascending",
    axis: int = -1,
) -> tf.Tensor:
    """Soft (differentiable) sort of ``x`` along ``axis``.

    ``soft_sort(x) = P(rho / eps, x)``: the exact projection of ``rho / eps``
    onto the permutahedron of ``x`` (Blondel et al. 2020), O(n log n) per
    row; the gradient costs O(n) per row.

    Parameters
    ----------
    x : tensor_like, shape (..., n, ...)
    eps : float, default 1.0
        Regularization strength, >= 0. ``eps = 0`` returns the sorted values;
        ``eps = inf`` the mean (l2) or log-mean-exp (kl) of each row.
    regularization : {"l2", "kl"}
    direction : {"ascending", "descending"}
    axis : int, default -1

    Returns
    -------
    tf.Tensor
        Shape and dtype of ``x``; l2 preserves every row's sum.

    Examples
    --------
    >>> import tensorflow as tf
    >>> from softrank.tensorflow import soft_sort
    >>> soft_sort(tf.constant([3.0, 1.0, 2.0]), eps=0.1).numpy()
    array([1., 2., 3.], dtype=float32)
    """
    return _apply(x, eps, regularization, direction, axis, OP_SORT)
