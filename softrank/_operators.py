"""The operators built on soft rank, soft sort and the projection, written once.

Every adapter (numpy, torch, jax, tensorflow) exposes the same operators with
the same arguments; the argument checks and the maps from a soft rank / soft
sort / projection to the operator live here, over a small ``ops`` namespace
that each adapter supplies (see :mod:`softrank._derivatives` for the shared
part of that namespace). Functions here that take ``ops`` also need:
``take_columns(a, index)`` (``a[..., index]`` for a 1-D integer index),
``sum_last(a)`` (sum over the last axis, removing it), ``sqrt``,
``constant(values, like)`` (a numpy array as a non-differentiable array of
``like``'s dtype and device), ``move_last_to_first(a)`` and
``stop_gradient_where_neg_inf(a)`` (``a``, not differentiated where it is
-inf).
"""
from __future__ import annotations

import operator
from typing import Any, Tuple

import numpy as np

from softrank._codes import REG_KL
from softrank._validate import FLOAT16_LARGEST, is_time_value


def check_k(k: Any, n: int) -> int:
    """``k`` as an int in ``[0, n]``, or raise naming ``k``.

    Any integer with ``__index__`` is taken: Python and numpy ints, and a
    concrete 0-d integer array or tensor of a framework (as ``q`` and ``eps``
    take concrete scalars). Bools and floats are refused.
    """
    if (isinstance(k, (bool, np.bool_)) or "bool" in str(getattr(k, "dtype", ""))
            or is_time_value(k)
            or len(getattr(k, "shape", ())) != 0):  # (torch's index takes a [2] too)
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}") from None
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, n] = [0, {n}] (n: the length along the axis), got {k}")
    return k


def topk_weights(n: int, k: int, reg: int, dtype: np.dtype) -> np.ndarray:
    """The w of the top-k mask: k ones then zeros (l2), or their logs 0 and -inf (kl)."""
    if reg == REG_KL:
        if k == 0:
            raise ValueError(
                "soft_topk_mask with regularization='kl' needs k >= 1: the kl projection onto "
                "the permutahedron of (0, ..., 0) is not defined (use k = 0 with 'l2', or the "
                "all-zero mask)"
            )
        weights = np.full(n, -np.inf, dtype=dtype)
        weights[:k] = 0.0
        return weights
    weights = np.zeros(n, dtype=dtype)
    weights[:k] = 1.0
    return weights


def topk_mask_from_projection(ops, out, reg: int):
    """The soft top-k mask from the projection of ``x / eps`` onto the permutahedron of
    :func:`topk_weights`: ``out`` itself (l2), or ``exp(out)`` (kl).

    For kl a block of zero weights (log w = -inf) has out = -inf and a mask
    of exactly 0 near x. Its out tangent, (1 - p) dx / eps, may overflow, and
    exp's forward-mode derivative would make 0 * inf = NaN of the mask's 0
    tangent, so out is not differentiated there.
    """
    if reg != REG_KL:
        return out
    return ops.exp(ops.stop_gradient_where_neg_inf(out))


def check_default_w_fits(n: Any, input_dtype: Any) -> None:
    """Raise for a float16 ``z`` longer than 65504 (the largest float16) with the
    default ``w = (n, ..., 1)``: the projection's output, cast back to float16,
    would be inf without a word (soft_rank refuses that n the same way)."""
    name = str(input_dtype)
    # (n: an int, or a torch SymInt under compile(dynamic=True) / export, where the
    # comparison guards the graph to n <= 65504 as soft_rank's check does; jax and
    # TensorFlow pass a concrete n here.)
    if "float16" in name and "bfloat16" not in name and n > FLOAT16_LARGEST:
        raise ValueError(
            f"permutahedron_projection of a float16 z with the default w = (n, ..., 1) needs "
            f"n <= {FLOAT16_LARGEST} (the largest float16), got n = {n} along the axis: cast z "
            f"to float32 or bfloat16, or pass w")


def rho(n: int, dtype: np.dtype) -> np.ndarray:
    """``(n, n - 1, ..., 1)``: the default w of the projection."""
    return np.arange(n, 0, -1).astype(dtype)


def projection_weights_shared(w_shape: Tuple[Any, ...], z_shape: Tuple[Any, ...], n: int,
                              same_shape: bool) -> bool:
    """Whether ``w`` is one vector for every row (True) or has ``z``'s shape (False).

    ``w`` must have length ``n`` (the length of ``z`` along the axis) or
    ``z``'s shape (``same_shape``, as the adapter's framework compares shapes);
    anything else raises a ValueError naming both shapes.
    """
    if len(w_shape) == 1 and w_shape[0] == n:
        return True
    if len(w_shape) != 1 and same_shape:
        return False
    raise ValueError(
        f"w must have length n = {n} (the length of z along the axis) or the shape of z "
        f"{tuple(z_shape)}, got shape {tuple(w_shape)}"
    )


def _level_type_error(q: Any) -> TypeError:
    return TypeError(f"q must be a real number or a 1-D array of real numbers in [0, 1], "
                     f"got {type(q).__name__} {q!r}")


def _level_range_error(q: Any) -> ValueError:
    return ValueError(f"q must lie in [0, 1] (no NaN), got {q!r}")


def check_plain_quantile_levels(levels: tuple, q: Any) -> None:
    """The errors of :func:`check_quantiles` for the Python values ``levels``
    (``q``'s entries, or ``(q,)``), in plain Python: torch.compile traces it,
    where an error raised inside a constant-result function surfaces as
    dynamo's InternalTorchDynamoError, which ``except ValueError`` misses."""
    for level in levels:
        if isinstance(level, (bool, str, bytes, complex)):
            raise _level_type_error(q)
        if isinstance(level, (list, tuple)):
            raise ValueError(f"q must be a scalar or 1-D, got a nested sequence {q!r}")
        if isinstance(level, (int, float)) and not 0.0 <= level <= 1.0:
            raise _level_range_error(q)


def check_quantiles(q: Any) -> Tuple[np.ndarray, bool]:
    """``(q as a 1-D float64 array, whether q was a scalar)``; q must lie in [0, 1].

    ``q`` is a Python number, a 0-d or 1-D array-like, or a concrete
    framework tensor (it selects sorted positions, so it cannot be traced).
    """
    dtype = getattr(q, "dtype", None)  # (numpy's, or a framework's)
    if dtype is None:
        try:
            dtype = np.asarray(q).dtype
        except (TypeError, ValueError):
            pass
    odd = (bool, np.bool_, str, bytes)
    if (q is None or isinstance(q, odd) or getattr(dtype, "kind", None) in ("b", "U", "S", "c", "m", "M")
            or "bool" in str(dtype) or "complex" in str(dtype)
            or (isinstance(q, (list, tuple)) and any(isinstance(v, odd) for v in q))):
        # np.asarray parses "0.5" and reads True as 1.0: neither is a level.
        raise _level_type_error(q)
    try:
        values = np.asarray(q, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"q must be a number or a 1-D array of numbers in [0, 1], got {type(q).__name__}: {exc}"
        ) from None
    if values.ndim > 1:
        raise ValueError(f"q must be a scalar or 1-D, got shape {values.shape}")
    if not np.all((values >= 0.0) & (values <= 1.0)):
        raise _level_range_error(q)
    return values.reshape(-1), values.ndim == 0


def quantile_positions(q: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lo, hi, frac)`` of np.quantile's "linear" method on n sorted values.

    The quantile q is ``s[lo] + frac (s[hi] - s[lo])`` with ``p = q (n - 1)``,
    ``lo = floor(p)``, ``hi = min(lo + 1, n - 1)``, ``frac = p - lo``.
    """
    if n == 0:
        raise ValueError("soft_quantile needs at least one value along the axis, got n = 0")
    position = q * (n - 1)
    lo = np.minimum(np.floor(position), n - 1).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, position - lo


def quantile_from_sorted(ops, s, q: np.ndarray, scalar: bool):
    """The quantiles ``q`` of rows sorted ascending, ``s`` of shape ``(..., n)``.

    Returns shape ``(...)`` for a scalar q, else ``(len(q), ...)`` (np.quantile's layout).
    """
    lo, hi, frac = quantile_positions(q, s.shape[-1])
    below = ops.take_columns(s, lo)
    above = ops.take_columns(s, hi)
    value = below + ops.constant(frac, s) * (above - below)
    if scalar:
        return value[..., 0]
    return ops.move_last_to_first(value)


def pearson_last_axis(ops, a, b):
    """Pearson correlation of ``a`` and ``b`` along the last axis (removed).

    NaN where either row is constant, as scipy.stats.spearmanr.
    """
    n = a.shape[-1]
    a_centred = a - ops.sum_last(a)[..., None] / n
    b_centred = b - ops.sum_last(b)[..., None] / n
    return ops.sum_last(a_centred * b_centred) / ops.sqrt(
        ops.sum_last(a_centred * a_centred) * ops.sum_last(b_centred * b_centred)
    )


def pearson_gradient_last_axis(ops, a, b, corr):
    """``d corr / d a`` of :func:`pearson_last_axis` (``b`` held constant), shape of ``a``.

    ``b_c / (|a_c| |b_c|) - corr a_c / |a_c|^2`` with ``a_c``, ``b_c`` the
    centred rows: both have zero mean, so the centring's own derivative
    changes nothing. NaN where ``corr`` is.
    """
    n = a.shape[-1]
    a_centred = a - ops.sum_last(a)[..., None] / n
    b_centred = b - ops.sum_last(b)[..., None] / n
    a_norm = ops.sqrt(ops.sum_last(a_centred * a_centred))[..., None]
    b_norm = ops.sqrt(ops.sum_last(b_centred * b_centred))[..., None]
    return b_centred / (a_norm * b_norm) - corr[..., None] * a_centred / (a_norm * a_norm)

