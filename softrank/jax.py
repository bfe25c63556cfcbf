"""softrank for JAX: soft rank and soft sort as JAX primitives.

``soft_rank`` and ``soft_sort`` act along any ``axis`` of an array of any
shape, with or without ``jax_enable_x64``, and work under every JAX
transform: ``jit``, ``vmap``, ``grad``/``vjp``/``jacrev``, ``jvp``/
``jacfwd``, derivatives of every order (``hessian``, ``jacrev(jacrev)``,
``jacfwd(jacfwd)``, ...), ``checkpoint``, ``scan``, ``pmap``, ``shard_map``
and ``jax.export``. A batch-sharded input is computed where its shards live.

The operator is built on five primitives over rows (the last axis; every
leading axis is a batch axis), one per entry point of the engine contract
(:mod:`softrank._engine`):

``softrank_forward_value(x)``
    the values alone; its JVP runs ``softrank_forward`` then ``softrank_jvp``.
``softrank_forward(x) -> (out, perm, block_start)``
    the values with the forward state (int32 permutation and PAV blocks).
``softrank_jvp(x, out, perm, block_start, t)``
    ``J(x) t``, linear in ``t``; its transpose is ``softrank_vjp``.
``softrank_vjp(x, out, perm, block_start, c)``
    ``J(x)^T c``, linear in ``c``; its transpose is ``softrank_jvp``, its
    derivative in ``x`` is ``softrank_hvp``.
``softrank_hvp(x, out, perm, block_start, c, t)``
    ``grad_x <c, J(x) t>``, bilinear in ``c`` and ``t``.

Reverse mode is the transpose of forward mode, and every derivative of
these primitives is again one of them (or a short composition of
``softrank_jvp`` and gathers, see :func:`_second`), so every order of
derivative is exact and O(n) per row. Under ``vmap`` the batch is folded
into the same single call.

Lowering: on the CPU, where the compiled engine was built with the XLA FFI
handlers (they come with jaxlib; see the README), each primitive is an XLA
custom call into the C++ core (targets ``softrank_*_v1``; no Python, no
copies), with a sharding rule that partitions every leading (batch)
dimension and keeps the row whole. Otherwise (another platform, the numba
engine, no handlers) it runs the engine through :func:`jax.pure_callback`:
tens of microseconds more per call, the data moves to the host and back, and
under ``jit`` with sharded inputs the callback runs on one device (inside
``shard_map`` it runs on every shard). With the callback, switch float64 on
with ``jax.config.update("jax_enable_x64", True)`` rather than the
``jax.enable_x64`` context: that context is thread-local, and XLA may run the
callback on another thread, where jax then rejects its float64 results.

Exporting (``jax.export``, CPU): the custom call targets are not in JAX's
list of targets with a compatibility guarantee, so name them::

    exported = jax.export.export(
        jax.jit(f), disabled_checks=softrank.jax.export_disabled_checks())(x)

A deserialized export needs ``import softrank.jax`` in the process that
calls it (the import registers the targets). The target names carry a
version: a later softrank that changes a handler's signature gives it a new
name, so an old export either runs unchanged or fails to find its target.

``eps``, ``regularization`` and ``direction`` are static: pass Python values
(a traced ``eps`` raises). float16 and bfloat16 are computed in float32 and
returned in their own dtype; integer and bool arrays raise TypeError.
"""
from __future__ import annotations

import functools
import string
from typing import Any

try:
    import jax
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError("softrank.jax needs JAX: pip install 'softrank[jax]'") from exc
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.interpreters import ad, batching, mlir

from softrank import _engine, _host
from softrank._engine import OP_RANK, OP_SORT, REG_L2
from softrank._types import Direction, Regularization
from softrank._validate import (
    check_axis,
    check_direction,
    check_eps,
    check_float_dtype_kind,
    check_regularization,
)

__all__ = ["soft_rank", "soft_sort", "export_disabled_checks"]

# --- the XLA FFI targets (bindings/xla_ffi.cpp) ----------------------------


def _register_targets() -> bool:
    """Register the compiled core's XLA FFI handlers with jax (CPU), as batch
    partitionable; False where the core was built without them or against an
    XLA FFI API version the installed jaxlib does not accept (with a warning).
    Done at import, so that a deserialized jax.export that names them can run."""
    try:
        from softrank import _C  # type: ignore[attr-defined]
    except ImportError:
        return False
    targets = getattr(_C, "xla_ffi_targets", None)
    if targets is None:
        return False
    from softrank._xla_ffi_version import incompatibility, jaxlib_ffi_api_version

    reason = incompatibility(tuple(_C.xla_ffi_api_version), jaxlib_ffi_api_version())
    if reason is not None:
        import warnings

        warnings.warn(reason, RuntimeWarning, stacklevel=2)
        return False
    for name, capsule in targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        jax.ffi.register_ffi_target_as_batch_partitionable(name)
    return True


_HAVE_FFI_TARGETS = _register_targets()


def _ffi_ready() -> bool:
    """Whether a CPU lowering can call the core as an XLA custom call: the
    native engine is in use and was built with the XLA FFI handlers."""
    return _HAVE_FFI_TARGETS and _engine.backend() == "native"


def export_disabled_checks() -> list:
    """The ``disabled_checks`` that ``jax.export.export`` needs for softrank.

    ``jax.export`` refuses custom calls whose targets JAX does not guarantee
    to keep; softrank's targets are versioned (``softrank_*_v1``), so a
    serialized program keeps its meaning. Pass the result as
    ``jax.export.export(fn, disabled_checks=export_disabled_checks())``.
    Exports need the custom-call path (CPU, compiled engine with the XLA FFI
    handlers): a ``pure_callback`` cannot be serialized.
    """
    return [jax.export.DisabledSafetyCheck.custom_call(target)
            for target in sorted(_TARGETS.values())]


# --- primitives ------------------------------------------------------------

# primitive -> its XLA FFI target, and the _host function of its callback.
_TARGETS = {
    "softrank_forward": "softrank_forward_v1",
    "softrank_forward_value": "softrank_forward_value_v1",
    "softrank_jvp": "softrank_jvp_v1",
    "softrank_vjp": "softrank_vjp_v1",
    "softrank_hvp": "softrank_hvp_v1",
}
_HOST = {
    "softrank_forward": "forward",
    "softrank_forward_value": "forward_value",
    "softrank_jvp": "jvp",
    "softrank_vjp": "vjp",
    "softrank_hvp": "hvp",
}


@functools.lru_cache(maxsize=256)
def _jitted(prim: Primitive, params: tuple) -> Any:
    return jax.jit(functools.partial(prim.bind, **dict(params)))


def _eager(prim: Primitive, *args, **params):
    """Outside a trace a primitive runs as its own jitted program."""
    return _jitted(prim, tuple(sorted(params.items())))(*args)


def _make(name: str, multiple_results: bool = False) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = multiple_results
    prim.def_impl(functools.partial(_eager, prim))
    return prim


_forward_p = _make("softrank_forward", multiple_results=True)
_value_p = _make("softrank_forward_value")
_jvp_p = _make("softrank_jvp")
_vjp_p = _make("softrank_vjp")
_hvp_p = _make("softrank_hvp")


def _like(x, dtype=None):
    """An output aval like the operand x (shape, sharding, varying axes)."""
    return x.update(dtype=x.dtype if dtype is None else dtype, weak_type=False)


_forward_p.def_abstract_eval(lambda x, **_: (_like(x), _like(x, jnp.int32), _like(x, jnp.int32)))
for _prim in (_value_p, _jvp_p, _vjp_p, _hvp_p):
    _prim.def_abstract_eval(lambda x, *_, **__: _like(x))


def _zero_like(value):
    return ad.Zero(jax.typeof(value).to_tangent_aval())


def _second_is_zero(op: int, reg: int, eps: float) -> bool:
    """Where J(x) is locally constant: l2 (piecewise linear), eps = 0 (piecewise
    constant) and the rank at eps = inf (constant). Not the kl sort at
    eps = inf: the log-mean-exp, whose Jacobian (a softmax) depends on x."""
    return reg == REG_L2 or eps == 0.0 or (op == OP_RANK and np.isinf(eps))


def _second(x, out, perm, block_start, t, u, params: dict, *, engine_hvp: bool = True):
    """The second derivative ``D^2 f(x)[t, u]`` (output shaped, symmetric and
    bilinear in ``t`` and ``u``), what differentiating ``J(x) t`` in ``x``
    (direction ``u``) and transposing ``c -> grad_x <c, J(x) t>`` need.

    The rank's Jacobian is symmetric, so its tensor of second derivatives is
    symmetric in all three indices and ``D^2 f[t, u] = hvp(c=t, t=u)``: one
    engine call (``engine_hvp``). Otherwise it is composed of ``softrank_jvp``
    calls, so it is itself differentiable to any order:

    - kl rank, ``s = sign / eps``, ``r = out``: ``J v = s r (v - vbar)`` per
      block, and the engine's hvp ``s^2 r (q - qbar)`` with
      ``q = (t - tbar)(u - ubar)`` is ``J[(J t)(J u) / (s r^2)]``.
    - kl sort: ``J v`` is the block's softmax mean ``p . v`` at every sorted
      position of the block, and
      ``D^2 f[t, u] = sgn * J[(t - tbar)(u - ubar)]`` with ``tbar = J t``
      read back at the columns, ``sgn = +1`` descending, ``-1`` ascending.
    """
    op, reg, descending, eps = params["op"], params["reg"], params["descending"], params["eps"]
    if _second_is_zero(op, reg, eps):
        return jnp.zeros_like(out)

    def jvp(v):
        return _jvp_p.bind(x, out, perm, block_start, v, **params)

    if op == OP_RANK:
        if engine_hvp:
            return _hvp_p.bind(x, out, perm, block_start, t, u, **params)
        scale = (-1.0 if descending else 1.0) / eps
        return jvp(jvp(t) * jvp(u) / (scale * out * out))
    # The sorted position of each column (the inverse of perm, row by row).
    rows = perm.reshape(-1, perm.shape[-1])
    positions = jnp.arange(perm.shape[-1], dtype=perm.dtype)
    inverse = jnp.zeros_like(rows).at[jnp.arange(rows.shape[0])[:, None], rows].set(
        jnp.broadcast_to(positions, rows.shape), unique_indices=True).reshape(perm.shape)

    def centred(v):
        return v - jnp.take_along_axis(jvp(v), inverse, axis=-1)

    return (1.0 if descending else -1.0) * jvp(centred(t) * centred(u))


def _hvp_by_composition(x, c, t, params: dict):
    """``grad_x <c, J(x) t>`` from :func:`_second` without the engine's hvp,
    so that its derivative in ``x`` (a third derivative) is again made of
    primitives whose derivatives are defined."""
    def second(u):
        out, perm, block_start = _forward_p.bind(x, **params)
        return _second(x, out, perm, block_start, t, u, params, engine_hvp=False)

    return jax.linear_transpose(second, t)(c)[0]


# --- JVP rules ---------------------------------------------------------------


def _sum(terms, like):
    terms = [term for term in terms if term is not None]
    if not terms:
        return _zero_like(like)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _nonzero(tangent) -> bool:
    return type(tangent) is not ad.Zero


def _forward_jvp(primals, tangents, **params):
    (x,), (tx,) = primals, tangents
    out, perm, block_start = _forward_p.bind(x, **params)
    t_out = _jvp_p.bind(x, out, perm, block_start, tx, **params)
    return (out, perm, block_start), (t_out, _zero_like(perm), _zero_like(block_start))


def _value_jvp(primals, tangents, **params):
    (out, _, _), (t_out, _, _) = _forward_jvp(primals, tangents, **params)
    return out, t_out


def _jvp_jvp(primals, tangents, **params):
    # The out tangent is implied by x's (out = f(x)): the x term is the total
    # derivative, so the out tangent is not read.
    x, out, perm, block_start, t = primals
    tx, _, _, _, tt = tangents
    y = _jvp_p.bind(*primals, **params)
    return y, _sum([
        _jvp_p.bind(x, out, perm, block_start, tt, **params) if _nonzero(tt) else None,
        _second(x, out, perm, block_start, t, tx, params) if _nonzero(tx) else None,
    ], y)


def _vjp_jvp(primals, tangents, **params):
    x, out, perm, block_start, c = primals
    tx, _, _, _, tc = tangents
    y = _vjp_p.bind(*primals, **params)
    return y, _sum([
        _vjp_p.bind(x, out, perm, block_start, tc, **params) if _nonzero(tc) else None,
        _hvp_p.bind(x, out, perm, block_start, c, tx, **params) if _nonzero(tx) else None,
    ], y)


def _hvp_jvp(primals, tangents, **params):
    x, out, perm, block_start, c, t = primals
    tx, _, _, _, tc, tt = tangents
    y = _hvp_p.bind(*primals, **params)
    third = None
    if _nonzero(tx) and not _second_is_zero(params["op"], params["reg"], params["eps"]):
        third = jax.jvp(lambda z: _hvp_by_composition(z, c, t, params), (x,), (tx,))[1]
    return y, _sum([
        _hvp_p.bind(x, out, perm, block_start, tc, t, **params) if _nonzero(tc) else None,
        _hvp_p.bind(x, out, perm, block_start, c, tt, **params) if _nonzero(tt) else None,
        third,
    ], y)


ad.primitive_jvps[_forward_p] = _forward_jvp
ad.primitive_jvps[_value_p] = _value_jvp
ad.primitive_jvps[_jvp_p] = _jvp_jvp
ad.primitive_jvps[_vjp_p] = _vjp_jvp
ad.primitive_jvps[_hvp_p] = _hvp_jvp


# --- transpose rules (linear in the last operand(s); x and the state are not) --


def _check_linear_only(state, prim_name: str):
    if any(ad.is_undefined_primal(v) for v in state):
        raise NotImplementedError(
            f"{prim_name} is linear in its tangent or cotangent only, not in x or the "
            "forward state; differentiate softrank.jax.soft_rank/soft_sort instead of "
            "calling the primitive")


def _jvp_transpose(ct, x, out, perm, block_start, t, **params):
    _check_linear_only((x, out, perm, block_start), "softrank_jvp")
    if type(ct) is ad.Zero:
        return None, None, None, None, ad.Zero(t.aval)
    return None, None, None, None, _vjp_p.bind(x, out, perm, block_start, ct, **params)


def _vjp_transpose(ct, x, out, perm, block_start, c, **params):
    _check_linear_only((x, out, perm, block_start), "softrank_vjp")
    if type(ct) is ad.Zero:
        return None, None, None, None, ad.Zero(c.aval)
    return None, None, None, None, _jvp_p.bind(x, out, perm, block_start, ct, **params)


def _hvp_transpose(ct, x, out, perm, block_start, c, t, **params):
    # h(c, t)_k = sum_ij c_i T_ijk t_j with T_ijk = d^2 f_i / dx_j dx_k,
    # symmetric in j and k: its transpose in t is h(c, .) and in c is D^2 f[t, .].
    _check_linear_only((x, out, perm, block_start), "softrank_hvp")
    linear_c, linear_t = ad.is_undefined_primal(c), ad.is_undefined_primal(t)
    assert linear_c != linear_t, "softrank_hvp is bilinear: one of c, t is linear"
    if linear_t:
        grad = (ad.Zero(t.aval) if type(ct) is ad.Zero else
                _hvp_p.bind(x, out, perm, block_start, c, ct, **params))
        return None, None, None, None, None, grad
    grad = (ad.Zero(c.aval) if type(ct) is ad.Zero else
            _second(x, out, perm, block_start, t, ct, params))
    return None, None, None, None, grad, None


ad.primitive_transposes[_jvp_p] = _jvp_transpose
ad.primitive_transposes[_vjp_p] = _vjp_transpose
ad.primitive_transposes[_hvp_p] = _hvp_transpose


# --- batching: every leading axis is a batch axis -----------------------------


def _batch(prim: Primitive, args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [jnp.broadcast_to(a, (size, *a.shape)) if d is None
            else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    result = prim.bind(*args, **params)
    return result, ((0,) * len(result) if prim.multiple_results else 0)


for _prim in (_forward_p, _value_p, _jvp_p, _vjp_p, _hvp_p):
    batching.primitive_batchers[_prim] = functools.partial(_batch, _prim)


# --- lowering ------------------------------------------------------------------


def _factor_name(i: int) -> str:
    letters = string.ascii_lowercase[8:]  # i, j, ..., z as Shardy prints them
    return letters[i] if i < len(letters) else f"z_{i - len(letters) + 1}"


def _partitioning_attributes(ctx) -> dict:
    """Attributes that let XLA partition the custom call over every leading
    dimension and keep the row (the last) whole: the batch-partitionable
    custom call's ``num_batch_dims`` (GSPMD) and a Shardy sharding rule in
    which the row factor needs replication. Every operand and result has
    x's shape."""
    shape = ctx.avals_in[0].shape
    if not all(isinstance(d, int) and d > 0 for d in shape):
        return {}  # symbolic (exported polymorphic) or empty: nothing to partition
    attributes = {"mhlo.frontend_attributes":
                  ir.DictAttr.get({"num_batch_dims": ir.StringAttr.get(str(len(shape) - 1))})}
    if jax.config.jax_use_shardy_partitioner:
        names = [_factor_name(i) for i in range(len(shape))]
        value = "[" + ", ".join(names) + "]"
        operands = ", ".join([value] * len(ctx.avals_in))
        results = ", ".join([value] * len(ctx.avals_out))
        sizes = ", ".join(f"{n}={d}" for n, d in zip(names, shape))
        attributes["sdy.sharding_rule"] = ir.Attribute.parse(
            f"#sdy.op_sharding_rule<({operands})->({results}) {{{sizes}}} "
            f"need_replication={{{names[-1]}}}, custom>")
    return attributes


def _callback_lowering(ctx, *args, prim_name: str, **params):
    """The engine through jax.pure_callback (the host function is looked up
    now, so that the tests can count its calls). Under jit with sharded
    operands XLA runs a callback on one device (it gathers the operands
    there); inside shard_map it runs on every shard."""
    if getattr(ctx.module_context.lowering_parameters, "for_export", False):
        raise NotImplementedError(
            "softrank.jax: jax.export needs softrank's XLA custom calls (the CPU platform and "
            "the native engine built with the XLA FFI handlers); here the operator runs "
            "through jax.pure_callback, which cannot be serialized")
    host = functools.partial(getattr(_host, _HOST[prim_name]), **params)
    results = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ctx.avals_out)

    def call(*operands):
        out = jax.pure_callback(host, results if len(results) > 1 else results[0], *operands,
                                vmap_method="broadcast_all")
        return out if len(results) > 1 else (out,)

    return mlir.lower_fun(call, multiple_results=True)(ctx, *args)


def _cpu_lowering(ctx, *args, prim_name: str, op, reg, descending, eps):
    params = dict(op=op, reg=reg, descending=descending, eps=eps)
    if not _ffi_ready():
        return _callback_lowering(ctx, *args, prim_name=prim_name, **params)
    rule = jax.ffi.ffi_lowering(_TARGETS[prim_name], extra_attributes=_partitioning_attributes(ctx))
    return rule(ctx, *args, op=np.int32(op), reg=np.int32(reg), descending=bool(descending),
                eps=np.float64(eps))


for _prim in (_forward_p, _value_p, _jvp_p, _vjp_p, _hvp_p):
    mlir.register_lowering(_prim, functools.partial(_callback_lowering, prim_name=_prim.name))
    mlir.register_lowering(_prim, functools.partial(_cpu_lowering, prim_name=_prim.name),
                           platform="cpu")


# --- public API ------------------------------------------------------------------


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 stays float64; every other float (bfloat16 included) runs in float32."""
    if dtype == jnp.float64:
        return np.dtype(np.float64)
    if not jnp.issubdtype(dtype, jnp.floating):
        check_float_dtype_kind(np.dtype(dtype).kind, str(dtype), allow_int=False)
    return np.dtype(np.float32)


def _apply(x: Any, eps: Any, regularization: Any, direction: Any, axis: Any, op: int):
    if isinstance(eps, jax.core.Tracer):
        raise TypeError(
            "eps must be a static Python number in softrank.jax, got a traced value: mark it "
            "static (jax.jit(..., static_argnums=...)); derivatives with respect to eps are "
            "not supported")
    params = dict(op=op, reg=check_regularization(regularization),
                  descending=check_direction(direction), eps=check_eps(eps))
    x = jnp.asarray(x)
    compute_dtype = _compute_dtype(x.dtype)
    ax = check_axis(axis, x.ndim)
    moved = jnp.moveaxis(x, ax, -1).astype(compute_dtype)
    out = _value_p.bind(moved, **params)
    return jnp.moveaxis(out, -1, ax).astype(x.dtype)


def soft_rank(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> jax.Array:
    """Soft (differentiable) ranks of ``x`` along ``axis``.

    ``soft_rank(x) = P(x / eps, rho)``: the exact projection of ``x / eps``
    onto the permutahedron of ``rho = (n, ..., 1)`` (Blondel et al. 2020),
    O(n log n) per row; every derivative (any order, forward or reverse)
    costs O(n) per row.

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
    the PAV blocks), ``(diag(r) - r r^T / R_B) / eps`` per block for kl. The
    l2 Jacobian is locally constant, so its higher derivatives are zero.

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
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> jax.Array:
    """Soft (differentiable) sort of ``x`` along ``axis``.

    ``soft_sort(x) = P(rho / eps, x)``: the exact projection of ``rho / eps``
    onto the permutahedron of ``x`` (Blondel et al. 2020), O(n log n) per
    row; every derivative (any order, forward or reverse) costs O(n) per row.

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
