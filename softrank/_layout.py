"""The layout and dtype policy every adapter follows, written once.

Every operator acts along one axis of an array of any shape: the adapters move
that axis last, fold the other axes into rows (the engine's ``(rows, n)``
layout), compute in float32 or float64, and undo all three on the result.
The framework-specific calls (``np.moveaxis``, ``Tensor.movedim``,
``tf.transpose``, ...) stay in the adapters; what they compute comes from here.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

from softrank._validate import check_float_dtype_kind


def compute_dtype_name(dtype_name: str, kind: str, itemsize: int, allow_int: bool,
                       name: str = "x") -> str:
    """The dtype an input of this dtype is computed in: ``"float32"`` or ``"float64"``.

    float64 (and wider floats) run in float64; float32, float16 and bfloat16 in
    float32 (the engine has no half-precision kernels: results are rounded back
    to the input's dtype). Integers and booleans are refused unless
    ``allow_int`` (numpy's casting policy), and then run in float64; complex
    and other dtypes are refused, naming the argument.
    """
    if dtype_name == "bfloat16":  # (ml_dtypes' numpy bfloat16 has kind 'V')
        return "float32"
    check_float_dtype_kind(kind, dtype_name, allow_int=allow_int, name=name)
    if kind == "f" and itemsize < 2:  # float8 (torch's): its ranks would saturate at 448
        raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64, got "
                        f"{dtype_name}: cast it to one of them first")
    return "float64" if kind in "iub" or itemsize >= 8 else "float32"


def axis_last_order(ndim: int, axis: int) -> Tuple[List[int], List[int]]:
    """``(order, inverse)``: the transpose that moves ``axis`` last, and its inverse."""
    order = [i for i in range(ndim) if i != axis] + [axis]
    inverse = [0] * ndim
    for position, dim in enumerate(order):
        inverse[dim] = position
    return order, inverse


def rows_of(moved_shape: Sequence[int]) -> Tuple[int, int]:
    """``(rows, n)`` of an array whose operator axis is last."""
    return math.prod(moved_shape[:-1]), moved_shape[-1]


def reduced_shape(shape: Sequence[int], axis: int) -> Tuple[int, ...]:
    """The shape of a result that removes ``axis`` (spearman, a scalar quantile)."""
    return tuple(shape[:axis]) + tuple(shape[axis + 1:])
