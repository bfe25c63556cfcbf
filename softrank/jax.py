"""softrank for JAX: soft rank and soft sort with a custom vjp.

``soft_rank`` and ``soft_sort`` act along any ``axis`` of an array of any
shape and work under ``jit``, ``vmap`` and ``grad``, with or without
``jax_enable_x64``. On the CPU backend, with the compiled engine built with
the XLA FFI headers (they come with jaxlib; see the README), the forward and
backward passes are XLA custom calls into the C++ core (``jax.ffi``): no
Python, no copies. Otherwise they run the engine through
:func:`jax.pure_callback` (tens of microseconds more per call; on an
accelerator the callback moves the data to the host and back). Under
``vmap`` the batch is folded into the same single call
(``vmap_method="broadcast_all"``), so a vmapped call costs one engine call,
not one per batch element. The forward stores the permutation and the PAV
blocks (int32) as residuals, so the backward is O(n) per row.

``eps``, ``regularization`` and ``direction`` are static: pass Python values
(a traced ``eps`` raises). float16 and bfloat16 are computed in float32 and
returned in their own dtype; integer and bool arrays raise TypeError.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softrank import _engine, _host
from softrank._engine import OP_RANK, OP_SORT
from softrank._validate import (
    check_axis,
    check_direction,
    check_eps,
    check_float_dtype_kind,
    check_regularization,
)

__all__ = ["soft_rank", "soft_sort"]

_VMAP_METHOD = "broadcast_all"

# The XLA FFI targets of the compiled engine (bindings/xla_ffi.cpp), one per
# _host function, registered with jax on first use.
_FFI_TARGETS = {
    "forward": "softrank_forward",
    "forward_value": "softrank_forward_value",
    "vjp": "softrank_vjp",
}
_ffi_registered: bool | None = None


def _ffi_ready() -> bool:
    """Whether this trace can call the core as an XLA custom call: the native
    engine is in use, was built with the XLA FFI handlers, and the default
    backend is the CPU (the handlers are registered for it only)."""
    global _ffi_registered
    if _engine.backend() != "native" or jax.default_backend() != "cpu":
        return False
    if _ffi_registered is None:
        from softrank import _C

        targets = getattr(_C, "xla_ffi_targets", None)
        if targets is not None:
            for name, capsule in targets().items():
                jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        _ffi_registered = targets is not None
    return _ffi_registered


def _call(name, result, *args, op, reg, descending, eps):
    """``_host.<name>(*args, op=..., ...)`` with results shaped like
    ``result``: an XLA custom call where _ffi_ready(), else a pure_callback."""
    if _ffi_ready():
        return jax.ffi.ffi_call(_FFI_TARGETS[name], result, vmap_method=_VMAP_METHOD)(
            *args, op=np.int32(op), reg=np.int32(reg), descending=bool(descending),
            eps=np.float64(eps),
        )
    return jax.pure_callback(
        partial(getattr(_host, name), op=op, reg=reg, descending=descending, eps=eps),
        result,
        *args,
        vmap_method=_VMAP_METHOD,
    )


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _soft_op(x, op, reg, descending, eps):
    # Not differentiated: the values alone (the engine keeps no state).
    return _call("forward_value", jax.ShapeDtypeStruct(x.shape, x.dtype), x,
                 op=op, reg=reg, descending=descending, eps=eps)


def _soft_op_fwd(x, op, reg, descending, eps):
    like = jax.ShapeDtypeStruct(x.shape, x.dtype)
    index = jax.ShapeDtypeStruct(x.shape, jnp.int32)
    out, perm, block_start = _call("forward", (like, index, index), x,
                                   op=op, reg=reg, descending=descending, eps=eps)
    return out, (x, out, perm, block_start)


def _soft_op_bwd(op, reg, descending, eps, residuals, cotangent):
    x = residuals[0]
    grad = _call("vjp", jax.ShapeDtypeStruct(x.shape, x.dtype), *residuals,
                 cotangent.astype(x.dtype), op=op, reg=reg, descending=descending, eps=eps)
    return (grad,)


_soft_op.defvjp(_soft_op_fwd, _soft_op_bwd)


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 stays float64; every other float (bfloat16 included) runs in float32."""
    if dtype == jnp.float64:
        return np.dtype(np.float64)
    if not jnp.issubdtype(dtype, jnp.floating):
        check_float_dtype_kind(np.dtype(dtype).kind, str(dtype), allow_int=False)
    return np.dtype(np.float32)


def _apply(x: Any, eps: Any, regularization: Any, direction: Any, axis: Any, op: int):
    eps = check_eps(eps)
    reg = check_regularization(regularization)
    descending = check_direction(direction)
    x = jnp.asarray(x)
    compute_dtype = _compute_dtype(x.dtype)
    ax = check_axis(axis, x.ndim)
    moved = jnp.moveaxis(x, ax, -1).astype(compute_dtype)
    out = _soft_op(moved, op, reg, descending, eps)
    return jnp.moveaxis(out, -1, ax).astype(x.dtype)


def soft_rank(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: str = "l2",
    direction: str = "ascending",
    axis: int = -1,
) -> jax.Array:
    """Soft (differentiable) ranks of ``x`` along ``axis``.

    ``soft_rank(x) = P(x / eps, rho)``: the exact projection of ``x / eps``
    onto the permutahedron of ``rho = (n, ..., 1)`` (Blondel et al. 2020),
    O(n log n) per row; the gradient costs O(n) per row.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        A floating array; float16 and bfloat16 run in float32.
    eps : float, default 1.0
        Regularization strength, >= 0, static. ``eps = 0`` gives the hard
        ranks (ties get their mean rank), ``eps = inf`` ``(n + 1) / 2``.
    regularization : {"l2", "kl"}
    direction : {"ascending", "descending"}
        "ascending": rank 1 is the smallest value.
    axis : int, default -1

    Returns
    -------
    jax.Array
        Shape and dtype of ``x``; every row sums to ``n (n + 1) / 2``.

    Notes
    -----
    Gradient: ``(I - B) / eps`` in sorted order for l2 (``B`` averages over
    the PAV blocks), ``(diag(r) - r r^T / R_B) / eps`` per block for kl.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from softrank.jax import soft_rank
    >>> soft_rank(jnp.array([3.0, 1.0, 2.0]), eps=0.1)
    Array([3., 1., 2.], dtype=float32)
    """
    return _apply(x, eps, regularization, direction, axis, OP_RANK)


def soft_sort(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: str = "l2",
    direction: str = "ascending",
    axis: int = -1,
) -> jax.Array:
    """Soft (differentiable) sort of ``x`` along ``axis``.

    ``soft_sort(x) = P(rho / eps, x)``: the exact projection of ``rho / eps``
    onto the permutahedron of ``x`` (Blondel et al. 2020), O(n log n) per
    row; the gradient costs O(n) per row.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
    eps : float, default 1.0
        Regularization strength, >= 0, static. ``eps = 0`` returns the sorted
        values; ``eps = inf`` the mean (l2) or log-mean-exp (kl) of each row.
    regularization : {"l2", "kl"}
    direction : {"ascending", "descending"}
    axis : int, default -1

    Returns
    -------
    jax.Array
        Shape and dtype of ``x``; l2 preserves every row's sum.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from softrank.jax import soft_sort
    >>> soft_sort(jnp.array([3.0, 1.0, 2.0]), eps=0.1)
    Array([1., 2., 3.], dtype=float32)
    """
    return _apply(x, eps, regularization, direction, axis, OP_SORT)
