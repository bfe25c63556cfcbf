"""Argument checks shared by every adapter.

Each check raises at the Python boundary with a message that names the
argument and what was expected, so that bad input never reaches an engine.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from softrank._codes import REGULARIZATIONS

DIRECTIONS = ("ascending", "descending")


def is_time_value(value: Any) -> bool:
    """Whether ``value`` is a numpy datetime64 / timedelta64 scalar or array: numpy
    registers timedelta64 as a ``numbers.Integral``, so the number checks would
    otherwise take one (an eps, axis, k or thread count of "2 seconds")."""
    return getattr(getattr(value, "dtype", None), "kind", None) in ("m", "M")


def check_eps(eps: Any) -> float:
    """Return ``eps`` as a float, or raise if it is not a real number >= 0.

    ``eps = 0`` selects the hard operator and ``eps = inf`` the limit of
    infinite regularization; both are valid.
    """
    if type(eps) is float and eps >= 0.0:  # the common case, checked cheaply
        return eps
    if is_time_value(eps):
        raise TypeError(f"eps must be a real number >= 0, got {type(eps).__name__} {eps!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        # numpy / framework 0-d scalars are accepted through float().
        if hasattr(eps, "dtype") and getattr(eps, "shape", None) in ((), None):
            kind = getattr(getattr(eps, "dtype", None), "kind", None)
            if kind == "c":
                raise TypeError(f"eps must be a real number, got complex {eps!r}")
            try:
                eps = float(eps)
            except (TypeError, ValueError):
                raise TypeError(
                    f"eps must be a real number >= 0, got {type(eps).__name__}"
                ) from None
        elif hasattr(eps, "item") and hasattr(eps, "shape") and tuple(eps.shape) == ():
            eps = float(eps.item())
        else:
            raise TypeError(
                f"eps must be a real number >= 0, got {type(eps).__name__} {eps!r}"
            )
    try:
        value = float(eps)
    except OverflowError:  # an int beyond the float range, e.g. 10**400: the limit
        value = math.inf if eps > 0 else -math.inf
    if math.isnan(value):
        raise ValueError("eps must be a number >= 0, got NaN")
    if value < 0 or (value == 0 and eps < 0):  # (Fraction(-1, 10**400) rounds to -0.0)
        shown = repr(value) if value < 0 else f"{eps!r}, below 0 (-0.0 as a float)"
        raise ValueError(f"eps must be >= 0 (0 gives the hard operator), got {shown}")
    return value


def check_regularization(regularization: Any) -> int:
    """Return the engine code of ``regularization`` (:mod:`softrank._codes`)."""
    if not isinstance(regularization, str) or regularization not in REGULARIZATIONS:
        raise ValueError(
            f"regularization must be 'l2' or 'kl', got {regularization!r}"
        )
    return REGULARIZATIONS[regularization]


def check_direction(direction: Any) -> bool:
    """Return True for "descending", False for "ascending"; raise otherwise."""
    if direction == "ascending" and type(direction) is str:
        return False
    if direction not in DIRECTIONS or not isinstance(direction, str):
        raise ValueError(
            f"direction must be 'ascending' or 'descending', got {direction!r}"
        )
    return direction == "descending"


def check_increasing(increasing: Any) -> bool:
    """Return ``increasing`` as a bool; raise unless it is True or False.

    Read by truthiness, ``"decreasing"`` or ``"no"`` would silently fit an
    increasing regression.
    """
    if isinstance(increasing, (bool, np.bool_)):
        return bool(increasing)
    raise TypeError(
        f"increasing must be True or False, got {type(increasing).__name__} {increasing!r}")


def check_axis(axis: Any, ndim: int, name: str = "axis", array_name: str = "x") -> int:
    """Return ``axis`` normalised to ``[0, ndim)``; raise if out of range.

    ``ndim == 0`` is rejected: the operators need an axis to act along.
    """
    if type(axis) is int and -ndim <= axis < ndim:  # the common case
        return axis % ndim
    if ndim == 0:
        raise ValueError(
            f"{array_name} must have at least one dimension (got a 0-d scalar); "
            "the operator acts along an axis"
        )
    if isinstance(axis, bool) or is_time_value(axis) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__} {axis!r}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{name}={axis} is out of range for an input with {ndim} dimension(s); "
            f"expected {-ndim} <= {name} < {ndim}"
        )
    return axis % ndim


FLOAT16_LARGEST = 65504


def check_float16_ranks(n: Any) -> None:
    """Raise unless the soft ranks of a float16 ``x`` of length ``n`` (up to
    ``n``) fit float16: past 65504 they would silently be inf."""
    if n > FLOAT16_LARGEST:
        raise ValueError(float16_ranks_message(n))


def float16_ranks_message(n: Any = None) -> str:
    """:func:`check_float16_ranks`'s message (``n`` None: not known where it is formed)."""
    got = "" if n is None else f", got n = {n}"
    return (f"soft_rank of a float16 x needs n <= {FLOAT16_LARGEST} (the largest float16; ranks "
            f"reach n){got} along the axis: cast x to float32 or bfloat16 first")


def check_float_dtype_kind(kind: str, dtype_name: Any, allow_int: bool, name: str = "x") -> None:
    """Reject complex, object, string and (unless ``allow_int``) integer dtypes.

    ``kind`` is a numpy dtype kind code ('f', 'i', 'u', 'b', 'c', 'O', ...);
    ``dtype_name`` the dtype's name, or the dtype itself (formatted only in
    the error: ``str(numpy.dtype)`` costs microseconds a call).
    """
    if kind == "f":
        return
    if kind == "V" and str(dtype_name) == "bfloat16":  # ml_dtypes' bfloat16 (jax's, numpy's)
        return
    if kind in "iub" and allow_int:
        return
    if kind in "iub":
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or "
            f"float64), got {dtype_name}; cast it to a floating dtype first"
        )
    raise TypeError(
        f"{name} must have a real floating dtype, got {dtype_name}"
    )


def check_weights(values: np.ndarray, compute_dtype: Any, flushes_subnormals: bool = False) -> None:
    """Raise unless the isotonic ``weights`` are finite and > 0, as given and
    once cast to the compute dtype (where 1e300 overflows to inf and 1e-50
    underflows to 0 in float32).

    ``values``: the weights as a numpy array of their own (real) dtype.
    ``flushes_subnormals``: the computation flushes subnormal numbers to 0
    (XLA): there a weight must be a normal number of the compute dtype.
    """
    exact = values.astype(np.float64, copy=False)
    if not np.all(np.isfinite(exact) & (exact > 0)):
        raise ValueError(WEIGHTS_INVALID)
    dtype = np.dtype(compute_dtype)
    with np.errstate(over="ignore", under="ignore"):
        cast = values.astype(dtype)
    if not np.all(np.isfinite(cast)):
        raise ValueError(weights_overflow(dtype.name, float(np.finfo(dtype).max)))
    smallest = np.finfo(dtype).tiny if flushes_subnormals else 0.0
    if not np.all(cast > smallest if smallest == 0.0 else cast >= smallest):
        raise ValueError(weights_underflow(dtype.name))


WEIGHTS_INVALID = "weights must be finite and > 0 everywhere"


def weights_overflow(dtype_name: str, largest: float) -> str:
    """The message for valid weights beyond the compute dtype's range (every adapter's)."""
    return (f"weights must stay finite in {dtype_name} (the compute dtype): some exceed its "
            f"largest value {largest:.4g}")


def weights_underflow(dtype_name: str) -> str:
    """The message for valid weights that round to 0 in the compute dtype."""
    return f"weights must stay > 0 in {dtype_name} (the compute dtype; they underflow)"


def not_numbers(name: str, array_kind: str, value: Any, error: Exception) -> str:
    """The message for an argument a framework cannot read as an array of
    numbers (its own message names neither the argument nor what it takes)."""
    return (f"{name} must be {array_kind} or an array_like of real numbers, got "
            f"{type(value).__name__} ({error})")
