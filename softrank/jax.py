"""softrank for JAX: soft rank, soft sort and the operators on the permutahedron.

``soft_rank`` and ``soft_sort`` act along any ``axis`` of an array of any
shape, with or without ``jax_enable_x64``, and work under every JAX
transform: ``jit``, ``vmap``, ``grad``/``vjp``/``jacrev``, ``jvp``/
``jacfwd``, derivatives of every order (``hessian``, ``jacrev(jacrev)``,
``jacfwd(jacfwd)``, ...), ``checkpoint``, ``scan``, ``pmap``, ``shard_map``
and ``jax.export``. A batch-sharded input is computed where its shards live;
one sharded along the ranked axis has each row gathered whole (with Auto or
Explicit mesh axes); outputs and gradients of the input's shape keep its sharding.

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
dimension and keeps the row whole. On a CUDA GPU, where softrank was built
with its CUDA core (``softrank._C.cuda_compiled()``), ``softrank_forward``,
``softrank_forward_value``, ``softrank_jvp`` and ``softrank_vjp`` are XLA
custom calls into it under the same target names (handlers registered for
platform "CUDA", on XLA's stream, scratch from XLA's allocator), and
``softrank_hvp`` is lowered to its composition of the jvp and vjp calls: the
soft rank, the soft sort and their derivatives stay on the GPU
(``SOFTRANK_DISABLE_CUDA`` set when this module is imported leaves the CUDA
handlers unregistered: the callback below then serves the GPU too; so does a
CUDA core that sees no GPU where jax does, its statically linked runtime
needing a newer driver, with one RuntimeWarning at the first CUDA lowering). The
operators on the permutahedron below are computed on the host there. XLA
picks the lowering by the platform it compiles for, never by
``jax.default_backend()``. Otherwise (another platform, the numba engine on
the CPU, no handlers) it runs the engine through :func:`jax.pure_callback`:
tens of microseconds more per call, the data moves to the host and back, and
under ``jit`` with sharded inputs the callback runs on one device (inside
``shard_map`` it runs on every shard). With the callback, switch float64 on
with ``jax.config.update("jax_enable_x64", True)`` rather than the
``jax.enable_x64`` context: that context is thread-local, and XLA may run the
callback on another thread, where jax then rejects its float64 results.
Nor call the callback path from several Python threads at once: jax's
callbacks can then hang in jax itself (a plain jitted ``pure_callback`` does,
in jax 0.10 on the CPU); the XLA FFI path has no such limit.

Exporting (``jax.export``, CPU): the custom call targets are not in JAX's
list of targets with a compatibility guarantee, so name them::

    exported = jax.export.export(
        jax.jit(f), disabled_checks=softrank.jax.export_disabled_checks())(x)

A deserialized export needs ``import softrank.jax`` in the process that
calls it (the import registers the targets). The target names carry a
version: a later softrank that changes a handler's signature gives it a new
name, so an old export either runs unchanged or fails to find its target.

Not supported: ``jax.experimental.jet`` (Taylor mode). ``soft_rank``,
``soft_sort`` and the operators composed of them refuse it with a
NotImplementedError; ``permutahedron_projection``, ``soft_topk_mask`` and
``isotonic_regression`` (``jax.custom_jvp`` functions) get jax's own error,
as any custom_jvp does. Nest ``jax.jvp`` / ``jax.jacfwd`` for derivatives of
higher order.

``eps``, ``regularization`` and ``direction`` are static: pass Python values
(a traced ``eps`` raises). float16 and bfloat16 are computed in float32 and
returned in their own dtype; integer and bool arrays raise TypeError.

The operators on the permutahedron: ``spearman``, ``soft_quantile`` and
``soft_median`` are jax compositions of ``soft_rank`` / ``soft_sort``, so
they share everything above. ``permutahedron_projection``,
``soft_topk_mask`` and ``isotonic_regression`` run the engine's forward pass
as one primitive per operator (one call, folded over ``vmap``): on the CPU
the core's XLA custom calls (batch partitionable: a sharded batch stays
sharded; exportable), elsewhere ``jax.pure_callback`` on the host (then, under
``jit`` with a sharded batch, the callback runs on one device, and
``jax.export`` raises NotImplementedError). Each is a ``jax.custom_jvp`` whose
rule is the shared derivative formulas (:mod:`softrank._derivatives`) in jax
operations: every derivative transform (reverse mode by transposition, any
order) and ``vmap``, ``jit``, ``shard_map`` work. Their integer arguments
(``k``, ``q``, ``increasing``) are static.
"""
from __future__ import annotations

import functools
import string
from typing import Any, Callable

try:
    import jax
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError("softrank.jax needs JAX: pip install 'softrank[jax]'") from exc
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.interpreters import ad, batching, mlir

from softrank import _derivatives, _engine, _host, _layout, _operators
from softrank._engine import OP_RANK, OP_SORT, REG_L2
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
    not_numbers,
)

__all__ = [
    "soft_rank",
    "soft_sort",
    "permutahedron_projection",
    "soft_topk_mask",
    "spearman",
    "soft_quantile",
    "soft_median",
    "isotonic_regression",
    "export_disabled_checks",
]

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


def _register_cuda_targets(cuda: Any) -> frozenset:
    """Register the CUDA core ``cuda``'s XLA FFI handlers (platform "CUDA"; the
    same target names as the CPU ones); their names, empty where there is no
    CUDA core (``cuda`` None: built without CUDA, or ``SOFTRANK_DISABLE_CUDA``
    set, :func:`softrank._engine.cuda_core`) or the core was built without the
    CPU handlers (then the API version is unchecked)."""
    if not _HAVE_FFI_TARGETS or cuda is None:
        return frozenset()
    targets = getattr(cuda, "xla_ffi_cuda_targets", None)
    if targets is None:
        return frozenset()
    handlers = targets()
    for name, capsule in handlers.items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    return frozenset(handlers)


# jax's error for a comparison of symbolic dimensions that nothing decides
# (jax.export); () (catching nothing) where this jax does not name it.
_INCONCLUSIVE_DIMENSION = (getattr(jax.errors, "InconclusiveDimensionOperation", None)
                           or getattr(jax.core, "InconclusiveDimensionOperation", ()))

_HAVE_FFI_TARGETS = _register_targets()
# The CUDA core, looked up once, at import (as SOFTRANK_DISABLE_CUDA is read).
_CUDA_CORE = _engine.cuda_core()
_CUDA_FFI_TARGETS = _register_cuda_targets(_CUDA_CORE)
_CUDA_CORE_SEES_A_GPU = (_engine.CudaDeviceCheck(_CUDA_CORE, "jax", "CUDA arrays")
                         if _CUDA_CORE is not None else None)


def _jax_has_cuda_devices() -> bool:
    """Whether jax runs CUDA devices in this process (not only lowers for them)."""
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:  # (no CUDA backend)
        return False


def _cuda_custom_calls_run_here() -> bool:
    """Whether a CUDA lowering's custom calls into the CUDA core can run: the core
    sees a GPU (asked at the first CUDA lowering, with one warning where it does
    not: :class:`softrank._engine.CudaDeviceCheck`; the arrays then take the
    host callback), or this process lowers for CUDA without running it there
    (``jax.export`` for another machine), where nothing here is asked."""
    if not _jax_has_cuda_devices():
        return True
    return _CUDA_CORE_SEES_A_GPU is not None and _CUDA_CORE_SEES_A_GPU()


def _ffi_ready() -> bool:
    """Whether a CPU lowering can call the core as an XLA custom call: the
    native engine is in use and was built with the XLA FFI handlers."""
    return _HAVE_FFI_TARGETS and _engine.backend() == "native"


def _for_export(ctx) -> bool:
    """Whether ``ctx`` lowers for ``jax.export`` (a serialized module, to be run
    wherever softrank is installed), not to run in this process."""
    return bool(getattr(ctx.module_context.lowering_parameters, "for_export", False))


def _lowers_to_ffi(platform: str, target: str, for_export: bool = False) -> bool:
    """Whether a lowering for ``platform`` ("cpu" or "cuda") can call ``target``
    as an XLA custom call. On CUDA: where the core was built with that CUDA
    handler (the CUDA core is the GPU's only engine, whichever runs on the CPU)
    and can run it here (:func:`_cuda_custom_calls_run_here`), or the lowering
    is for ``jax.export``: the exported module runs on another process's core,
    and the host callback cannot be serialized."""
    if platform == "cuda":
        return target in _CUDA_FFI_TARGETS and (for_export or _cuda_custom_calls_run_here())
    return _ffi_ready()


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
            for target in sorted([*_TARGETS.values(), *_OPERATOR_TARGETS.values()])]


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
    """Outside a trace a primitive runs as its own jitted program (also under
    ``jax.disable_jit()``, where jit would bind the primitive again, here)."""
    with jax.disable_jit(False):
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


def _refuse_jet(*args, **params):
    raise NotImplementedError(
        "softrank.jax does not support jax.experimental.jet (Taylor-mode derivatives): nest "
        "jax.jvp or jax.jacfwd for derivatives of higher order")


def _register_jet_refusals(*primitives: Primitive) -> None:
    """jet has no rule for these primitives and would fail with a bare KeyError."""
    try:
        from jax.experimental import jet
    except ImportError:  # (an experimental module: it may move)
        return
    rules = getattr(jet, "jet_rules", None)
    if isinstance(rules, dict):
        for prim in primitives:
            rules.setdefault(prim, _refuse_jet)


_register_jet_refusals(_forward_p, _value_p, _jvp_p, _vjp_p, _hvp_p)


def _like(x, dtype=None):
    """An output aval like the operand x (shape, sharding, varying axes)."""
    return x.update(dtype=x.dtype if dtype is None else dtype, weak_type=False)


_forward_p.def_abstract_eval(lambda x, **_: (_like(x), _like(x, jnp.int32), _like(x, jnp.int32)))
for _prim in (_value_p, _jvp_p, _vjp_p, _hvp_p):
    _prim.def_abstract_eval(lambda x, *_, **__: _like(x))


def _zero_like(value):
    return ad.Zero(jax.typeof(value).to_tangent_aval())


# --- sharded rows --------------------------------------------------------------
#
# The primitives partition themselves (their sharding rule gathers each row
# whole, see _partitioning_attributes). The jax operations along a row that
# the derivatives and the operators are made of (gathers, scatters) are laid
# out here: with jax's Explicit mesh axes, which are part of an array's type,
# jax refuses a gather or scatter along a sharded axis ("out sharding could not
# be resolved unambiguously") and a vmap over operands sharded differently, so
# the rows are made whole (and the operands alike) first, and the result
# takes back the layout the caller has. Auto axes (XLA propagates shardings
# and gathers what it needs) and Manual ones (inside shard_map) are not in
# the type: there nothing is resharded.


def _spec(a) -> tuple:
    """The Explicit mesh axes of each dimension of ``a`` (None: unsharded)."""
    spec = tuple(getattr(getattr(jax.typeof(a), "sharding", None), "spec", None) or ())
    return spec + (None,) * (np.ndim(a) - len(spec))


def _whole_rows(a, like=None):
    """``a`` with its last axis (the row) unsharded and every leading axis
    sharded as in ``like`` (default: ``a`` itself), for an operation along the
    rows; ``a`` itself where that is already its layout."""
    reference = a if like is None else like
    target = (*_spec(reference)[:-1], None)
    if _spec(a) == target:
        return a
    meshes = [jax.typeof(v).sharding.mesh for v in (reference, a)]
    mesh = next((m for m in meshes if not m.empty), meshes[0])
    return jax.sharding.reshard(
        a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*target)))


def _laid_out_like(a, like):
    """``a`` (computed on whole rows) resharded as ``like``, of the same shape."""
    if _spec(a) == _spec(like):
        return a
    return jax.sharding.reshard(a, jax.typeof(like).sharding)


def _over_rows(fn: Callable, *arrays):
    """``fn`` of rows (operands of one shape ``(..., n)``) applied to ``arrays``:
    one vmap over their rows reshaped into one batch axis, the fastest form
    (XLA's 2-D gathers and scatters); a vmap per leading axis where one of them
    is sharded along an Explicit mesh axis, which a reshape would merge with
    the others (jax refuses that)."""
    shape = arrays[0].shape
    if len(shape) <= 2 or any(any(_spec(a)[:-1]) for a in arrays):
        mapped = fn
        for _ in range(len(shape) - 1):
            mapped = jax.vmap(mapped)
        return mapped(*arrays)
    rows = [a.reshape(-1, shape[-1]) for a in arrays]
    return jax.vmap(fn)(*rows).reshape(shape)


def _inverse_permutation(perm):
    """The inverse of each row's permutation ``perm`` (shape ``(..., n)``): one
    O(n) scatter per row, along whole rows (see :func:`_whole_rows`), laid out
    as ``perm``."""
    positions = jnp.arange(perm.shape[-1], dtype=perm.dtype)
    return _laid_out_like(_over_rows(
        lambda row: jnp.zeros_like(row).at[row].set(positions, unique_indices=True),
        _whole_rows(perm)), perm)


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
        # (J t)(J u) / (s r^2), with 1 / s = sign * eps applied to J t first:
        # J t is O(s), so J t / s is O(1) at any eps, while s r^2 (and the
        # square of it that differentiating the quotient makes) underflows
        # to 0 for eps beyond ~1e155 (0 / 0 = NaN in the third derivative).
        inverse_scale = (-1.0 if descending else 1.0) * eps
        return jvp(jvp(t) * inverse_scale * jvp(u) / (out * out))
    inverse = _inverse_permutation(perm)  # the sorted position of each column

    def centred(v):
        return v - _OPS.take(jvp(v), inverse)

    return (1.0 if descending else -1.0) * jvp(centred(t) * centred(u))


def _hvp_by_composition(x, c, t, params: dict):
    """``grad_x <c, J(x) t>`` from :func:`_second` without the engine's hvp,
    so that its derivative in ``x`` (a third derivative) is again made of
    primitives whose derivatives are defined."""
    def second(u):
        out, perm, block_start = _forward_p.bind(x, **params)
        return _second(x, out, perm, block_start, t, u, params, engine_hvp=False)

    return jax.linear_transpose(second, t)(c)[0]


def _hvp_from_state(x, out, perm, block_start, c, t, params: dict):
    """The engine's hvp, ``grad_x <c, J(x) t>``, composed of ``softrank_jvp``
    and ``softrank_vjp`` over the given forward state (the transpose of
    :func:`_second` in its last argument): what the hvp primitive lowers to
    where the core has no hvp handler (CUDA). NaN on a non-finite row, as the
    engine."""
    op, reg, eps = params["op"], params["reg"], params["eps"]
    if _second_is_zero(op, reg, eps):
        result = jnp.zeros_like(out)
    else:
        def second(u):
            return _second(x, out, perm, block_start, t, u, params, engine_hvp=False)

        result = jax.linear_transpose(second, t)(c)[0]
    return jnp.where(block_start[..., :1] < 0, jnp.asarray(np.nan, out.dtype), result)


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


def _x64_checked(host: Callable, results) -> Callable:
    """``host`` for a ``pure_callback`` with 64-bit ``results``: it raises a clear
    error where float64 is off in the thread that XLA runs the callback on
    (the thread-local ``jax.enable_x64`` context does not reach it), where jax
    would otherwise reject the results as "Incorrect output dtype"."""
    if not any(np.dtype(r.dtype).itemsize == 8 for r in results):
        return host

    def checked(*operands):
        if not jax.config.jax_enable_x64:
            raise RuntimeError(
                "softrank.jax: this float64 operation runs on the host through "
                "jax.pure_callback, on a thread where jax's float64 switch is off: the "
                "jax.enable_x64 context is thread-local and does not reach it. Switch float64 "
                "on with jax.config.update('jax_enable_x64', True) instead.")
        return host(*operands)

    return checked


def _callback_lowering(ctx, *args, prim_name: str, **params):
    """The engine through jax.pure_callback (the host function is looked up
    now, so that the tests can count its calls). Under jit with sharded
    operands XLA runs a callback on one device (it gathers the operands
    there); inside shard_map it runs on every shard."""
    if _for_export(ctx):
        raise NotImplementedError(
            "softrank.jax: jax.export needs softrank's XLA custom calls (the CPU platform and "
            "the native engine built with the XLA FFI handlers); here the operator runs "
            "through jax.pure_callback, which cannot be serialized")
    results = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ctx.avals_out)
    host = _x64_checked(functools.partial(getattr(_host, _HOST[prim_name]), **params), results)

    def call(*operands):
        out = jax.pure_callback(host, results if len(results) > 1 else results[0], *operands,
                                vmap_method="broadcast_all")
        return out if len(results) > 1 else (out,)

    return mlir.lower_fun(call, multiple_results=True)(ctx, *args)


def _ffi_call_lowering(ctx, *args, prim_name: str, platform: str, op, reg, descending, eps):
    """The core's XLA custom call for ``platform`` where its handler is there,
    else the host callback."""
    params = dict(op=op, reg=reg, descending=descending, eps=eps)
    target = _TARGETS[prim_name]
    if not _lowers_to_ffi(platform, target, _for_export(ctx)):
        return _callback_lowering(ctx, *args, prim_name=prim_name, **params)
    rule = jax.ffi.ffi_lowering(target, extra_attributes=_partitioning_attributes(ctx))
    return rule(ctx, *args, op=np.int32(op), reg=np.int32(reg), descending=bool(descending),
                eps=np.float64(eps))


def _cuda_hvp_lowering(ctx, *args, **params):
    """The CUDA core has no hvp handler: the hvp is lowered as its composition of
    the jvp and vjp custom calls (:func:`_hvp_from_state`), or the callback where
    those are missing too."""
    if not all(_lowers_to_ffi("cuda", _TARGETS[name], _for_export(ctx))
               for name in ("softrank_jvp", "softrank_vjp")):
        return _callback_lowering(ctx, *args, prim_name=_hvp_p.name, **params)
    return mlir.lower_fun(lambda *a: (_hvp_from_state(*a, params),),
                          multiple_results=True)(ctx, *args)


# XLA picks the lowering by the platform it compiles for: the callback by
# default, the custom call on the CPU and on CUDA GPUs (the hvp there composed
# of the others).
for _prim in (_forward_p, _value_p, _jvp_p, _vjp_p, _hvp_p):
    mlir.register_lowering(_prim, functools.partial(_callback_lowering, prim_name=_prim.name))
    mlir.register_lowering(
        _prim, functools.partial(_ffi_call_lowering, prim_name=_prim.name, platform="cpu"),
        platform="cpu")
    mlir.register_lowering(
        _prim, _cuda_hvp_lowering if _prim is _hvp_p
        else functools.partial(_ffi_call_lowering, prim_name=_prim.name, platform="cuda"),
        platform="cuda")


# --- public API ------------------------------------------------------------------


def _compute_dtype(dtype: Any, name: str = "x") -> np.dtype:
    """The compute dtype of ``dtype`` (:func:`softrank._layout.compute_dtype_name`)."""
    dtype = np.dtype(dtype)
    return np.dtype(_layout.compute_dtype_name(str(dtype), dtype.kind, dtype.itemsize,
                                               allow_int=False, name=name))


def _apply(x: Any, eps: Any, regularization: Any, direction: Any, axis: Any, op: int):
    if isinstance(eps, jax.core.Tracer):
        raise TypeError(
            "eps must be a static Python number in softrank.jax, got a traced value: mark it "
            "static (jax.jit(..., static_argnums=...)); derivatives with respect to eps are "
            "not supported")
    params = dict(op=op, reg=check_regularization(regularization),
                  descending=check_direction(direction), eps=check_eps(eps))
    x = _array_argument(x, "x")
    compute_dtype = _compute_dtype(x.dtype)
    ax = check_axis(axis, x.ndim)
    moved = jnp.moveaxis(x, ax, -1).astype(compute_dtype)
    if op == OP_RANK and x.dtype == jnp.float16:
        n = moved.shape[-1]
        try:
            check_float16_ranks(n)
        except _INCONCLUSIVE_DIMENSION:
            # A symbolic n (jax.export) that nothing bounds: the ranks might pass
            # 65504 and be inf, and jax's own error did not say what to do.
            raise ValueError(
                f"soft_rank of a float16 x with a symbolic n ({n}) needs n <= 65504 (the "
                f"largest float16; ranks reach n): export with the constraint, e.g. "
                f"jax.export.symbolic_shape('b, n', constraints=['n <= 65504']), or cast x "
                f"to float32 or bfloat16 first") from None
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
        Regularization strength, >= 0, static. ``eps = 0`` returns the sorted values;
        ``eps = inf`` the mean (l2) or, for kl, ``-log-mean-exp(-x)`` ascending and
        ``log-mean-exp(x)`` descending, of each row.
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


# --- the operators on the permutahedron ----------------------------------------------
#
# The engine's projection and isotonic regression are each one primitive that
# returns the values and the integer structure (int32: sorting permutations,
# PAV blocks): on the CPU an XLA custom call into the core (batch partitionable,
# exportable), elsewhere the engine on the host through jax.pure_callback. Each primitive
# is the primal of a jax.custom_jvp whose rule is softrank._derivatives' linear
# map written in jax operations over that structure: reverse mode is its
# transpose, and higher derivatives differentiate the rule (which calls the
# same custom_jvp function for its primal, one engine call per order).


def _projection_host(z, w, *, eps, reg):
    out, state = _host.projection(np.asarray(z), np.asarray(w), eps, reg)
    return (out, *(field.astype(np.int32) for field in state))


def _isotonic_host(y, *weights, increasing, reg):
    solution, block_start = _host.isotonic(
        np.asarray(y), np.asarray(weights[0]) if weights else None, increasing, reg)
    return solution, block_start.astype(np.int32)


def _host_lowering(ctx, *args, host, **params):
    """The engine through jax.pure_callback, on every platform. Under jit with
    sharded operands XLA runs the callback on one device (it gathers the
    operands there); inside shard_map it runs on every shard."""
    if _for_export(ctx):
        raise NotImplementedError(
            "softrank.jax: jax.export needs softrank's XLA custom calls (the CPU platform and "
            "the native engine built with the XLA FFI handlers); here permutahedron_projection, "
            "soft_topk_mask and isotonic_regression run the engine through jax.pure_callback, "
            "which jax.export cannot serialize")
    results = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ctx.avals_out)

    checked = _x64_checked(functools.partial(host, **params), results)

    def call(*operands):
        return jax.pure_callback(checked, results, *operands, vmap_method="broadcast_all")

    return mlir.lower_fun(call, multiple_results=True)(ctx, *args)


# XLA FFI targets of the operators' primitives (bindings/xla_ffi.cpp).
_OPERATOR_TARGETS = {
    "projection": "softrank_projection_v1",
    "isotonic": "softrank_isotonic_v1",
    "isotonic_weighted": "softrank_isotonic_weighted_v1",
}


def _projection_cpu_lowering(ctx, z, w, *, eps, reg):
    if not _ffi_ready():
        return _host_lowering(ctx, z, w, host=_projection_host, eps=eps, reg=reg)
    rule = jax.ffi.ffi_lowering(_OPERATOR_TARGETS["projection"],
                                extra_attributes=_partitioning_attributes(ctx))
    return rule(ctx, z, w, reg=np.int32(reg), eps=np.float64(eps))


def _isotonic_cpu_lowering(ctx, y, *weights, increasing, reg):
    if not _ffi_ready():
        return _host_lowering(ctx, y, *weights, host=_isotonic_host, increasing=increasing,
                              reg=reg)
    target = _OPERATOR_TARGETS["isotonic_weighted" if weights else "isotonic"]
    rule = jax.ffi.ffi_lowering(target, extra_attributes=_partitioning_attributes(ctx))
    return rule(ctx, y, *weights, increasing=bool(increasing), reg=np.int32(reg))


_projection_p = _make("softrank_projection", multiple_results=True)
_projection_p.def_abstract_eval(
    lambda z, w, **_: (_like(z),) + (_like(z, jnp.int32),) * len(_host.ProjectionState._fields))
_isotonic_p = _make("softrank_isotonic", multiple_results=True)
_register_jet_refusals(_projection_p, _isotonic_p)
_isotonic_p.def_abstract_eval(lambda y, *_, **__: (_like(y), _like(y, jnp.int32)))
for _prim, _fn, _cpu in ((_projection_p, _projection_host, _projection_cpu_lowering),
                         (_isotonic_p, _isotonic_host, _isotonic_cpu_lowering)):
    batching.primitive_batchers[_prim] = functools.partial(_batch, _prim)
    mlir.register_lowering(_prim, functools.partial(_host_lowering, host=_fn))
    mlir.register_lowering(_prim, _cpu, platform="cpu")


class _JaxOps:
    """The array namespace of :mod:`softrank._derivatives` and :mod:`softrank._operators`."""

    exp = staticmethod(jnp.exp)
    log = staticmethod(jnp.log)
    sqrt = staticmethod(jnp.sqrt)
    ones_like = staticmethod(jnp.ones_like)
    stop_gradient = staticmethod(jax.lax.stop_gradient)

    @staticmethod
    def times_factors(value, before, after):
        """``value * before * after`` (see :func:`softrank._derivatives.times_scale`):
        under jit, XLA's simplifier folds the two constants into their product,
        inf at a subnormal eps, and a singleton's exact 0 became NaN; the
        optimization barrier keeps the two multiplies apart (it has jvp,
        transpose and batching rules, so grad, vmap and jvp go through it)."""
        return jax.lax.optimization_barrier(value * before) * after

    # The gathers run on whole rows, with the operands laid out alike, and
    # return the index's layout (see _whole_rows).

    @staticmethod
    def take(a, index):
        rows = _whole_rows(index)
        out = jnp.take_along_axis(_whole_rows(a, rows), rows, axis=-1, mode="promise_in_bounds")
        return _laid_out_like(out, index)

    @staticmethod
    def block_sum(v, block_start):
        # Blocks are contiguous runs of positions named by their first
        # position: a segment sum per row (batched, so a batch-sharded array
        # stays sharded), read back at every position of the block.
        if v.size == 0:
            return v
        segment_sum = functools.partial(jax.ops.segment_sum, num_segments=v.shape[-1],
                                        indices_are_sorted=True)

        def row(values, starts):
            return jnp.take_along_axis(segment_sum(values, starts), starts, axis=-1,
                                       mode="promise_in_bounds")

        starts = _whole_rows(block_start)
        sums = _over_rows(row, _whole_rows(v, starts), starts)
        return _laid_out_like(sums, block_start)

    @staticmethod
    def nan_of(a):
        a = jax.lax.stop_gradient(a)
        return jnp.where(jnp.isnan(a), a, jnp.zeros((), a.dtype))

    @staticmethod
    def take_columns(a, index):
        # (columns picked from whole rows: the result's last axis is unsharded)
        return _whole_rows(a)[..., index]

    @staticmethod
    def sum_last(a):
        return jnp.sum(a, axis=-1)

    @staticmethod
    def constant(values, like):
        return jnp.asarray(values, dtype=like.dtype)

    @staticmethod
    def move_last_to_first(a):
        return jnp.moveaxis(a, -1, 0)

    @staticmethod
    def row_scale(a):
        largest = jnp.max(a, axis=-1, keepdims=True, initial=0.0)
        return jax.lax.stop_gradient(
            jnp.maximum(largest * _derivatives.ROW_SCALE_FACTOR, jnp.ones((), a.dtype)))

    @staticmethod
    def stop_gradient_where_neg_inf(a):
        return jnp.where(jnp.isneginf(a), jax.lax.stop_gradient(a), a)


_OPS = _JaxOps()


def _tangent(t):
    return None if type(t) is jax.custom_derivatives.SymbolicZero else t


def _integer_tangents(state):
    """The (symbolic zero) tangents of the integer outputs, typed like them
    (shape, and the varying mesh axes inside shard_map)."""
    return tuple(jax.custom_derivatives.SymbolicZero(jax.typeof(s).to_tangent_aval())
                 for s in state)


def _keep_nan_rows(t_out, out):
    """``t_out`` times 1, or NaN on a row whose output is NaN.

    The formulas add the NaN of such rows as a constant, which forward mode
    keeps but transposition (reverse mode) drops; a factor is linear, so the
    gradient of a NaN row is NaN in every mode, as in softrank.numpy.
    """
    out = jax.lax.stop_gradient(out)
    return t_out * jnp.where(jnp.isnan(out), out, jnp.ones((), out.dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _projection(z, w, eps, reg):
    """``(out, perm_z, inv_z, perm_w, inv_w, block_start)`` of ``P(z / eps, w)`` (reg l2)
    or ``P_E(z / eps, w)`` (kl) over the last axis; z and w of one shape and dtype."""
    return tuple(_projection_p.bind(z, w, eps=eps, reg=reg))


@functools.partial(_projection.defjvp, symbolic_zeros=True)
def _projection_jvp(eps, reg, primals, tangents):
    z, w = primals
    tz, tw = map(_tangent, tangents)
    out, *state = _projection(z, w, eps, reg)
    t_out = _derivatives.projection_jvp(_OPS, z, w, out, state, tz, tw, eps, reg)
    if tz is not None and _derivatives.z_scale(eps) == 0.0:
        # No derivative in z (eps = 0 or inf), but one that depends on tz, so
        # that NaN rows keep a NaN gradient in reverse mode too.
        t_out = t_out + tz * 0.0
    return (out, *state), (_keep_nan_rows(t_out, out), *_integer_tangents(state))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _isotonic(y, weights, increasing, reg):
    """``(solution, block_start)`` of the isotonic regression of ``y`` over the last
    axis; ``weights`` None (unit weights) or an array like ``y``."""
    operands = (y,) if weights is None else (y, weights)
    return tuple(_isotonic_p.bind(*operands, increasing=increasing, reg=reg))


@functools.partial(_isotonic.defjvp, symbolic_zeros=True)
def _isotonic_jvp(increasing, reg, primals, tangents):
    y, weights = primals
    ty, tweights = map(_tangent, tangents)
    solution, block_start = _isotonic(y, weights, increasing, reg)
    t_out = _derivatives.isotonic_jvp(_OPS, y, weights, solution, block_start, ty,
                                      tweights if weights is not None else None, reg)
    return ((solution, block_start),
            (_keep_nan_rows(t_out, solution), *_integer_tangents((block_start,))))


def _static(value: Any, name: str, what: str) -> Any:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static {what} in softrank.jax, got a traced value: mark it "
            f"static (jax.jit(..., static_argnums=...) or functools.partial); derivatives "
            f"with respect to {name} are not supported")
    return value


def _array_argument(value: Any, name: str):
    """``jnp.asarray(value)``, naming the argument where jax cannot read it as an
    array (its own message, "Value 'abc' with dtype <U3 is not a valid JAX array
    type" or "None is not a valid value for jnp.array", names neither)."""
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(not_numbers(name, "a jax array", value, error)) from None


def _prepare(x: Any, axis: Any, name: str):
    """``x`` as a jax array, its axis, and its rows: the axis last, in the compute dtype
    (:mod:`softrank._layout`'s policy; integers refused, as by soft_rank)."""
    x = _array_argument(x, name)
    dtype = _compute_dtype(x.dtype, name)
    ax = check_axis(axis, x.ndim, array_name=name)
    return x, ax, jnp.moveaxis(x, ax, -1).astype(dtype)


def _restore(result, x, ax: int):
    return jnp.moveaxis(result, -1, ax).astype(x.dtype)


def _like_rows(other: Any, x, ax: int, rows, name: str, reference: str, dtype=None):
    """``other`` (any real dtype, ints included) of ``x``'s shape, laid out like
    ``rows`` (in ``dtype``, by default ``rows``')."""
    other = _array_argument(other, name)
    check_float_dtype_kind(np.dtype(other.dtype).kind, str(other.dtype), allow_int=True,
                           name=name)
    if other.shape != x.shape:
        raise ValueError(f"{name} must have the shape of {reference} {x.shape}, got {other.shape}")
    return jnp.moveaxis(other, ax, -1).astype(rows.dtype if dtype is None else dtype)


def _concrete_n(n: Any, what: str) -> int:
    """``n``, the row length, where ``what`` needs its value (it builds w of
    length n, or selects sorted positions): a symbolic dimension of
    jax.export's shape polymorphism is refused by name."""
    if not isinstance(n, (int, np.integer)):
        raise ValueError(
            f"{what} needs a concrete row length n, got the symbolic dimension {n} (jax.export "
            f"with a symbolic shape): export with a fixed n (a symbolic batch works)")
    return int(n)


def permutahedron_projection(
    z: Any,
    w: Any = None,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> jax.Array:
    """Projection onto the permutahedron of ``w``, along ``axis``.

    l2: ``argmin_{mu in P(w)} 1/2 ||mu - z||^2``; kl: ``log argmin_{mu in
    P(exp w)} KL(mu, exp z)``, where ``P(w)`` is the convex hull of the
    permutations of ``w`` (Blondel et al. 2020, section 3). Soft rank is
    ``P(-x / eps, rho)`` and soft sort ``P(rho / eps, x)``; other ``w`` give
    other operators (:func:`soft_topk_mask`). O(n log n) per row: one sort of
    each of z and w, then pool-adjacent-violators.

    Parameters
    ----------
    z : array_like, shape (..., n, ...)
        A floating array; float16 and bfloat16 run in float32.
    w : array_like, optional
        Shape (n,) (the same vector for every row) or the shape of ``z``; any
        order (only its sorted values matter); any real dtype (cast to z's
        compute dtype). Default ``rho = (n, ..., 1)``. Under kl, ``w`` may
        hold ``-inf`` (zeros of ``exp w``) where each row's largest ``w`` is
        finite.
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    jax.Array
        Shape and dtype of ``z``; the rows of l2 sum to ``sum(w)``. Rows with
        NaN or inf give NaN.

    Notes
    -----
    Differentiable in ``z`` and ``w`` under every transform (a 1-D ``w``'s
    gradient is summed over the rows). The Jacobian is block diagonal over
    the PAV blocks in sorted order: l2 ``d out = (I - mean_B) dz + mean_B
    dw``, kl ``d out = dz - softmax_B(z) . dz + softmax_B(w) . dw``, O(n) per
    row; the l2 Jacobian is locally constant, so its higher derivatives are
    zero. The forward pass is the core's XLA custom call on the CPU, a
    ``jax.pure_callback`` elsewhere (host memory; not exportable).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from softrank.jax import permutahedron_projection
    >>> permutahedron_projection(jnp.array([0.0, 3.0, 1.0]), jnp.array([1.0, 2.0, 3.0]))
    Array([1., 3., 2.], dtype=float32)
    """
    reg = check_regularization(regularization)
    z, ax, rows = _prepare(z, axis, "z")
    n = rows.shape[-1]
    if w is None:
        _concrete_n(n, "permutahedron_projection with the default w")
        _operators.check_default_w_fits(n, z.dtype)
        w_rows = jnp.broadcast_to(jnp.asarray(_operators.rho(n, rows.dtype)), rows.shape)
    else:
        w = _array_argument(w, "w")
        check_float_dtype_kind(np.dtype(w.dtype).kind, str(w.dtype), allow_int=True, name="w")
        if _operators.projection_weights_shared(w.shape, z.shape, n, w.shape == z.shape):
            w_rows = jnp.broadcast_to(w.astype(rows.dtype), rows.shape)
        else:
            w_rows = jnp.moveaxis(w, ax, -1).astype(rows.dtype)
    return _restore(_projection(rows, w_rows, 1.0, reg)[0], z, ax)


def soft_topk_mask(
    x: Any,
    k: int,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> jax.Array:
    """A soft indicator of the ``k`` largest entries of ``x`` along ``axis``.

    The projection of ``x / eps`` onto the permutahedron of ``w = (1, ..., 1,
    0, ..., 0)`` (k ones): l2 ``P(x / eps, w)``; kl ``exp(P_E(x / eps, log
    w))``, the entropic projection onto the same polytope.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        A floating array; float16 and bfloat16 run in float32.
    k : int
        Static; 0 <= k <= n (kl: k >= 1).
    eps : float, default 1.0
        Static, >= 0. As ``eps -> 0`` the mask tends to the indicator of the
        k largest entries (tied entries at the boundary share what is left);
        ``eps = 0`` returns that limit, ``eps = inf`` the constant ``k / n``.
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    jax.Array
        Shape and dtype of ``x``; values in [0, 1], each row sums to ``k``.

    Notes
    -----
    Differentiable in ``x`` under every transform (zero derivative at
    ``eps = 0`` and ``inf``); see :func:`permutahedron_projection` for the
    Jacobian and the forward pass.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from softrank.jax import soft_topk_mask
    >>> soft_topk_mask(jnp.array([0.1, 3.0, 2.0, -1.0]), k=2, eps=0.5)
    Array([0., 1., 1., 0.], dtype=float32)
    """
    eps = check_eps(_static(eps, "eps", "Python number"))
    reg = check_regularization(regularization)
    x, ax, rows = _prepare(x, axis, "x")
    n = _concrete_n(rows.shape[-1], "soft_topk_mask")
    k = _operators.check_k(_static(k, "k", "Python int"), n)
    w_rows = jnp.broadcast_to(jnp.asarray(_operators.topk_weights(n, k, reg, rows.dtype)),
                              rows.shape)
    out = _projection(rows, w_rows, eps, reg)[0]
    return _restore(_operators.topk_mask_from_projection(_OPS, out, reg), x, ax)


def spearman(
    pred: Any,
    target: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> jax.Array:
    """Soft Spearman rank correlation of ``pred`` with ``target``, row by row.

    The Pearson correlation of ``soft_rank(pred, eps)`` with the ranks of
    ``target`` (mean ranks for ties). As ``eps -> 0`` it equals
    ``scipy.stats.spearmanr`` of each row; ``1 - spearman`` is a
    learning-to-rank loss.

    Parameters
    ----------
    pred : array_like, shape (..., n, ...)
        A floating array; float16 and bfloat16 run in float32.
    target : array_like, shape of ``pred``
        Any real dtype; integers are ranked exactly (not through a float, so
        with x64 off int32 targets above 2^24 keep their order). Not
        differentiated (its ranks are piecewise constant; its gradient is
        zero). A row of ``target`` holding NaN or +-inf gives NaN, as a row of
        ``pred`` does (``scipy.stats.spearmanr`` ranks +-inf).
    eps : float, default 1.0
        Static, >= 0.
    regularization : {"l2", "kl"}
    axis : int, default -1
        Removed from the result.

    Returns
    -------
    jax.Array
        Shape of ``pred`` without ``axis``, dtype of ``pred``, values in [-1, 1]; NaN for a
        constant row (as scipy) and at eps = inf (constant soft ranks); ill-conditioned as
        pred / eps nears a constant (see the README's Operators).

    Notes
    -----
    Composed of :func:`soft_rank` and jax operations, so it has every
    transform and export of :func:`soft_rank`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from softrank.jax import spearman
    >>> float(spearman(jnp.array([0.1, 0.5, 0.3]), jnp.array([1.0, 3.0, 2.0]), eps=0.01))
    1.0
    """
    eps = check_eps(_static(eps, "eps", "Python number"))
    check_regularization(regularization)
    pred, ax, rows = _prepare(pred, axis, "pred")
    target = _array_argument(target, "target")
    if np.dtype(target.dtype).kind in "iub":
        # Integers are ranked by comparing the integers themselves: cast to a
        # float first (float32 where x64 is off), distinct ones above 2^24
        # (2^53 in float64) would merge into ties.
        target_rows = _like_rows(target, pred, ax, rows, "target", "pred", target.dtype)
        target_ranks = _integer_ranks(target_rows, rows)
    else:
        # A float target is ranked in float64 where jax has it (x64 on), then
        # its ranks are cast: cast first, distinct targets closer than float32's
        # resolution (for float32 pred) would merge into ties.
        target_rows = jax.lax.stop_gradient(_like_rows(
            target, pred, ax, rows, "target", "pred", jax.dtypes.canonicalize_dtype(jnp.float64)))
        target_ranks = soft_rank(target_rows, 0.0).astype(rows.dtype)
    ranks = soft_rank(rows, eps, regularization=regularization)
    target_ranks = jax.lax.stop_gradient(target_ranks)
    return _operators.pearson_last_axis(_OPS, ranks, target_ranks).astype(pred.dtype)


def _integer_ranks(values, like):
    """The ranks (1 to n, tied values their mean rank: scipy's "average") of the
    integer or bool ``values`` along the last axis, exact, laid out and typed
    as ``like`` (the float rows of the same shape).

    Each value's tie group is found in the sorted row by comparing integers
    (first and last sorted position of the group: a running max and min), and
    its mean rank read back at the value's column: sorts, gathers and
    cumulative operations along the row, so jit, vmap, export (with a symbolic
    batch or n) and sharding apply as to any jax operations.
    """
    values = _whole_rows(values, like)
    last_axis = values.ndim - 1
    n = values.shape[-1]
    order = jnp.argsort(values, axis=-1)
    ordered = jnp.take_along_axis(values, order, axis=-1)
    changes = ordered[..., 1:] != ordered[..., :-1]
    edge = jnp.ones_like(ordered[..., :1], dtype=bool)  # (empty where n = 0)
    first = jnp.concatenate([edge, changes], axis=-1)  # a group starts here
    last = jnp.concatenate([changes, edge], axis=-1)  # a group ends here
    position = jnp.arange(n, dtype=jnp.int32)
    start = jax.lax.cummax(jnp.where(first, position, 0), axis=last_axis)
    end = jax.lax.cummin(jnp.where(last, position, n - 1), axis=last_axis, reverse=True)
    mean_rank = (start + end).astype(like.dtype) / 2 + 1
    ranks = jnp.take_along_axis(mean_rank, _inverse_permutation(order), axis=-1)
    return _laid_out_like(ranks, like)


def soft_quantile(
    x: Any,
    q: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> jax.Array:
    """Soft quantiles of ``x`` along ``axis``: np.quantile's "linear" rule on the soft sort.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        n >= 1; a floating array (float16 and bfloat16 run in float32).
    q : float or 1-D array_like of floats in [0, 1]
        Static (it selects sorted positions): a Python number, a list, a
        numpy array or a concrete jax array.
    eps : float, default 1.0
        Static, >= 0. As ``eps -> 0`` (and at eps = 0) the result equals
        ``np.quantile(x, q, axis=axis, method="linear")``.
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    jax.Array
        np.quantile's layout: shape of ``x`` without ``axis`` for a scalar
        ``q``, with ``len(q)`` in front for a 1-D ``q``; dtype of ``x``.

    Notes
    -----
    Composed of :func:`soft_sort` and jax operations (a weighted sum of two
    sorted positions), so it has every transform and export of
    :func:`soft_sort`, but for a symbolic n under jax.export (the positions
    depend on n's value: an error).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from softrank.jax import soft_quantile
    >>> float(soft_quantile(jnp.array([4.0, 1.0, 3.0, 2.0]), 0.5, eps=0.01))
    2.5
    """
    eps = check_eps(_static(eps, "eps", "Python number"))
    check_regularization(regularization)
    quantiles, scalar = _operators.check_quantiles(_static(q, "q", "number or 1-D array"))
    x, _, rows = _prepare(x, axis, "x")
    _concrete_n(rows.shape[-1], "soft_quantile")
    sorted_rows = soft_sort(rows, eps, regularization=regularization)
    return _operators.quantile_from_sorted(_OPS, sorted_rows, quantiles, scalar).astype(x.dtype)


def soft_median(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> jax.Array:
    """Soft median of ``x`` along ``axis``: ``soft_quantile(x, 0.5, ...)`` (axis removed).

    As ``eps -> 0`` it equals ``np.median(x, axis=axis)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from softrank.jax import soft_median
    >>> float(soft_median(jnp.array([4.0, 1.0, 3.0]), eps=0.01))
    3.0
    """
    return soft_quantile(x, 0.5, eps, regularization=regularization, axis=axis)


def isotonic_regression(
    y: Any,
    *,
    weights: Any = None,
    increasing: bool = True,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> jax.Array:
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
        A floating array; float16 and bfloat16 run in float32.
    weights : array_like, shape of ``y``, optional
        Positive finite weights (any real dtype, cast to y's compute dtype);
        default all ones. Checked where concrete; traced weights (under
        ``jit``, ``vmap`` or a derivative) cannot be checked, and
        non-positive ones give meaningless values.
    increasing : bool, default True
        Static.
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    jax.Array
        Shape and dtype of ``y``.

    Notes
    -----
    Differentiable in ``y`` and ``weights`` under every transform. Per block
    B (l2): ``dv = sum_B (w dy + dw (y - v)) / sum_B w``; (kl): ``dv =
    softmax_B(y) . dy - sum_B dw / sum_B w``; O(n) per row. The forward pass
    is the core's XLA custom call on the CPU, a ``jax.pure_callback``
    elsewhere (host memory; not exportable).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from softrank.jax import isotonic_regression
    >>> isotonic_regression(jnp.array([1.0, 3.0, 2.0, 4.0]))
    Array([1. , 2.5, 2.5, 4. ], dtype=float32)
    """
    reg = check_regularization(regularization)
    y, ax, rows = _prepare(y, axis, "y")
    w_rows = None
    if weights is not None:
        w_rows = _like_rows(weights, y, ax, rows, "weights", "y")
        if not isinstance(weights, jax.core.Tracer):
            # Concrete weights (numpy, or a jax array closed over under jit)
            # are checked as given: w_rows, made from them by jnp operations,
            # is itself traced under jit.
            check_weights(np.asarray(weights), rows.dtype, flushes_subnormals=True)
    increasing = check_increasing(_static(increasing, "increasing", "bool"))
    solution = _isotonic(rows, w_rows, increasing, reg)[0]
    return _restore(solution, y, ax)
