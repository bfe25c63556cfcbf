"""softrank for TensorFlow: soft rank, soft sort and the operators on the permutahedron.

``soft_rank``, ``soft_sort``, ``permutahedron_projection``,
``soft_topk_mask``, ``spearman``, ``soft_quantile``, ``soft_median`` and
``isotonic_regression`` act along any ``axis`` of a tensor of any (statically
known) rank, with the same arguments and values as :mod:`softrank.numpy`. The
forward pass runs the CPU engine on the host and stores the permutations and
the PAV blocks, so every derivative costs O(n) per row. TensorFlow tensors on
a GPU are computed on the host: softrank's CUDA core serves softrank.torch and
softrank.jax only, so each op copies its inputs from the GPU to the host and
its results back. float16 and bfloat16 are computed in float32
and returned in their own dtype; integer, bool and complex inputs raise
TypeError (targets, ``w`` and weights may be integers). ``eps``, ``k`` and
``q`` are constants of the computation: Python numbers (or tensors whose
value is known when the op is built); a ``tf.Variable``, a tensor traced by
``tf.function`` or one that a tape watches raises TypeError naming the
argument, as derivatives with respect to them are not supported.

The derivatives of ``permutahedron_projection``, ``soft_topk_mask`` and
``isotonic_regression`` are TensorFlow ops over the stored structure
(:mod:`softrank._derivatives`), so TensorFlow differentiates them again: they
are differentiable to any order, in reverse and forward mode, in both
regularizations. ``spearman``, ``soft_quantile`` and ``soft_median`` are
built from ``soft_rank`` / ``soft_sort`` and have exactly their derivatives
(below).

What works, and what does not
-----------------------------
Eager execution, ``tf.function``, ``tf.GradientTape`` (``gradient``,
``jacobian``, ``batch_jacobian``), ``tf.vectorized_map`` (also differentiated
from outside), ``tf.autodiff.ForwardAccumulator``, Keras training and the
``.keras`` format.

Derivatives of soft_rank and soft_sort (and so of spearman, soft_quantile
and soft_median): the first derivative in reverse and forward mode; the second
derivative by nested tapes (reverse-over-reverse) and a ForwardAccumulator
around a tape (forward-over-reverse, e.g. Hessian-vector products), eagerly,
inside a ``tf.function`` (tapes) and around a ``tf.function`` call; a tape
around a ForwardAccumulator (reverse-over-forward) eagerly only. ``"l2"`` is
differentiable to any order (its Jacobian is piecewise constant, so every
higher derivative is zero). For ``"kl"`` a derivative that needs more than
the engine's second derivative ``soft_hvp`` (a third derivative, or two
nested ForwardAccumulators) raises NotImplementedError (in a graph,
``tf.errors.UnimplementedError`` when it runs).

Not supported, for every function here: a ForwardAccumulator created inside
a ``tf.function`` (raises NotImplementedError), and so reverse-over-forward
in a ``tf.function``; and a tape around a ForwardAccumulator around a
``tf.function`` call, where TensorFlow does not record the accumulator's jvp
on the tape (the same for a ``tf.function`` of plain TensorFlow ops): the
tape's gradient comes back None, or silently lacks the jvp's terms where the
differentiated value also uses the function's output. softrank cannot see
that case to refuse it; differentiate eagerly, or use nested tapes or
forward-over-reverse around the ``tf.function`` instead.

SavedModel: the ops are host callbacks (``PyFuncStateless``) registered
under fixed names when this module is imported, so ``tf.saved_model.save``
and Keras ``model.export`` work, and the SavedModel reloads and runs in any
Python process that has run ``import softrank.tensorflow``, with the
derivatives listed above for a ``tf.function`` call (plain, persistent and
nested tapes, ``jacobian``, ForwardAccumulator): in a graph the derivative of
each callback op is looked up by its op type where the graph runs, none is
stored in the SavedModel. Without that import, calling it raises an error
that names the import. Runtimes without Python (TF Serving, TFLite) cannot
run it.

XLA: ``jit_compile=True`` raises NotImplementedError (a host callback
cannot be compiled); use ``jit_compile=False`` (Keras:
``model.compile(..., jit_compile=False)``), or softrank.jax for compiled code.
"""
from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any, List, NamedTuple, Sequence

import numpy as np

try:
    import tensorflow as tf
except ImportError as exc:
    raise ImportError(
        "softrank.tensorflow needs TensorFlow: pip install 'softrank[tensorflow]' "
        "(or pip install tensorflow-cpu)"
    ) from exc
# TensorFlow internals without a public equivalent: the registry that PyFunc
# kernels call back into (to register the callbacks under names a SavedModel
# can find again), the registry of gradients by op type (to give PyFuncStateless
# ops a gradient that a SavedModel does not serialize, see _install_gradient), the
# XLA-context test that tf.function's jit_compile sets up while tracing, and
# whether a tape (record) or a forward accumulator watches a tensor.
from tensorflow.python.eager import forwardprop_util, record
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util, script_ops

from softrank import _derivatives, _host, _layout, _operators
from softrank._engine import OP_RANK, OP_SORT, REG_KL
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
    float16_ranks_message,
    FLOAT16_LARGEST,
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
]


def _unpack(params: np.ndarray) -> dict:
    """The operator's arguments from the float64 vector ``[op, reg, descending, eps]``."""
    return dict(op=int(params[0]), reg=int(params[1]), descending=bool(params[2]),
                eps=float(params[3]))


def _forward_callback(x, params):
    return _host.forward(x, **_unpack(params))


def _vjp_callback(x, out, perm, block_start, cotangent, params):
    return _host.vjp(x, out, perm, block_start, cotangent, **_unpack(params))


def _jvp_callback(x, out, perm, block_start, tangent, params):
    return _host.jvp(x, out, perm, block_start, tangent, **_unpack(params))


def _hvp_callback(x, out, perm, block_start, cotangent, tangent, params):
    return _host.hvp(x, out, perm, block_start, cotangent, tangent, **_unpack(params))


def _unavailable_derivative_callback(x, upstream):
    raise NotImplementedError(_HIGHER_ORDER_ERROR)


def _segments(block_start: np.ndarray) -> np.ndarray:
    """``block_start`` offset by each row's first flat position: one id per block of the
    whole array, the segment ids of :meth:`_TensorFlowOps.block_sum`."""
    n = block_start.shape[-1]
    rows = math.prod(block_start.shape[:-1])
    offsets = (np.arange(rows, dtype=np.int64) * n).reshape(block_start.shape[:-1] + (1,))
    return block_start + offsets


def _projection_callback(reg):
    def projection(z, w, params):
        """``[eps]`` in ``params``; the value, the integer state and the block segments."""
        out, state = _host.projection(z, w, float(params[0]), reg)
        return (out, *state, _segments(state.block_start))

    return projection


_WEIGHTS_ERROR = "weights must be finite and > 0 everywhere"


def _isotonic_callback(reg):
    def isotonic(y, *rest):
        """``rest``: the weights (optional), then ``[increasing]``."""
        *weights, params = rest
        weights = weights[0] if weights else None
        if weights is not None and not np.all(np.isfinite(weights) & (weights > 0)):
            # Values traced in a graph are only known here (raised as InvalidArgumentError).
            raise ValueError(f"{_WEIGHTS_ERROR} (in {weights.dtype})")
        solution, block_start = _host.isotonic(y, weights, bool(params[0]), reg)
        return solution, block_start, _segments(block_start)

    return isotonic


# A graph (and so a SavedModel) names a host callback by its token. The tokens
# are fixed and the operator's arguments travel as a tensor input, so a graph
# saved in one process finds its callbacks in any process that imports this
# module; where none did, TensorFlow's "Could not find callback with key=..."
# error quotes the token, which says what to import. The token is also how the
# gradient of a callback op finds its derivative (_host_callback_gradient).
_CALLBACKS = {
    name: (f"softrank.tensorflow:{name} (run `import softrank.tensorflow` first)", callback)
    for name, callback in (
        # The regularization is part of the token: the derivatives branch on it
        # (l2's hvp is zero, kl's comes from the engine), and the token is what the
        # gradient of the op can read when it is built (_host_callback_gradient), also
        # in a backward function where the op's other inputs are placeholders. The
        # other arguments (eps, ...) travel as a tensor input.
        *((f"{op}_{reg}", callback)
          for op, callback in (("soft_forward", _forward_callback), ("soft_vjp", _vjp_callback),
                               ("soft_jvp", _jvp_callback), ("soft_hvp", _hvp_callback))
          for reg in ("l2", "kl")),
        ("unavailable_derivative", _unavailable_derivative_callback),
        ("projection_l2", _projection_callback(0)),
        ("projection_kl", _projection_callback(REG_KL)),
        ("isotonic_l2", _isotonic_callback(0)),
        ("isotonic_kl", _isotonic_callback(REG_KL)),
    )
}


def _register_callbacks() -> None:
    registry = getattr(script_ops._py_funcs, "_funcs", None)
    if not isinstance(registry, MutableMapping):
        raise ImportError(
            f"softrank.tensorflow does not support TensorFlow {tf.__version__}: "
            "its registry of py_func callbacks (script_ops._py_funcs._funcs) is gone"
        )
    # The registry holds weak references; _CALLBACKS keeps the functions alive.
    for name, (token, callback) in _CALLBACKS.items():
        registry[token] = callback
        registry[_EAGER_TOKENS[name]] = callback


# Eagerly, every op is wrapped in a tf.custom_gradient (below), which is what a
# tape or ForwardAccumulator differentiates; the callback op itself is then not
# differentiable, as TensorFlow registers PyFuncStateless. Its own token keeps the
# gradient of _host_callback_gradient off it: the accumulators would otherwise
# compute (and throw away) a jvp of every eager op, with extra host calls.
_EAGER_TOKENS = {name: f"{token} [eager]" for name, (token, _) in _CALLBACKS.items()}


_register_callbacks()

_XLA_ERROR = (
    "softrank.tensorflow cannot be compiled by XLA (jit_compile=True): its ops run the "
    "CPU engine as host callbacks, which XLA cannot compile. Use "
    "tf.function(jit_compile=False) (Keras: model.compile(..., jit_compile=False)), "
    "or softrank.jax for XLA-compiled code."
)

_HIGHER_ORDER_ERROR = (
    "softrank.tensorflow cannot compute this derivative: it needs more than the "
    "second derivative the engine provides (a third derivative of "
    "regularization='kl', or two nested ForwardAccumulators). "
    "Supported for 'kl': first derivatives in every mode and "
    "second derivatives by nested GradientTapes, a ForwardAccumulator around a "
    "GradientTape or (eagerly) a GradientTape around a ForwardAccumulator. "
    "regularization='l2' is differentiable to any order."
)

_GRAPH_FORWARD_ERROR = (
    "softrank.tensorflow does not support forward-mode tangents inside a graph that "
    "TensorFlow builds itself: a tf.autodiff.ForwardAccumulator created inside a "
    "tf.function, or an eager accumulator around tf.vectorized_map or a tape's "
    "jacobian / batch_jacobian (their pfor traces a graph that sees the tangents). "
    "Create the accumulator outside the tf.function (around the call), or use "
    "tf.map_fn, jacobian(..., experimental_use_pfor=False), or "
    "tf.function(lambda z: tf.vectorized_map(f, z)) under the accumulator."
)


def _in_current_graph(tensors: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    """``tensors`` as tensors of the graph being built (captured when they belong
    to another graph, e.g. the forward graph while TensorFlow builds a backward
    function), so that a gradient function only refers to its own graph."""
    if tf.executing_eagerly():
        return list(tensors)
    graph = tf.compat.v1.get_default_graph()
    if not hasattr(graph, "capture"):
        return list(tensors)
    return [t if getattr(t, "graph", None) is graph else graph.capture(t) for t in tensors]


def _py_func(name, inputs, dtypes):
    token = _EAGER_TOKENS[name] if tf.executing_eagerly() else _CALLBACKS[name][0]
    return tf.raw_ops.PyFuncStateless(
        input=list(inputs), token=token, Tout=list(dtypes), name=f"softrank_{name}"
    )


def _host_call(name: str, inputs: Sequence[tf.Tensor], dtypes: Sequence[tf.DType],
               shape: tf.TensorShape) -> List[tf.Tensor]:
    """Run callback ``name`` on the host; every output has the static ``shape``."""
    if not tf.executing_eagerly():
        if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
            raise NotImplementedError(_XLA_ERROR)
        # A ForwardAccumulator created inside a graph takes its jvps from the ops'
        # gradients one op at a time, a path of its own that the tests do not cover
        # (with tapes, nested accumulators, the kl error paths): refused rather than
        # trusted.
        if forwardprop_util.pack_tangents(list(inputs)).tangents:
            raise NotImplementedError(_GRAPH_FORWARD_ERROR)
    outputs = _py_func(name, inputs, dtypes)
    for tensor in outputs:
        tensor.set_shape(shape)
    return outputs


class _Forward(NamedTuple):
    """The forward pass's state, from which every derivative is computed."""

    x: tf.Tensor
    out: tf.Tensor
    perm: tf.Tensor
    block_start: tf.Tensor
    params: tf.Tensor
    kl: bool

    @property
    def tensors(self) -> List[tf.Tensor]:
        return [self.x, self.out, self.perm, self.block_start, self.params]

    def call(self, name: str, *vectors: tf.Tensor) -> tf.Tensor:
        """Callback ``name`` (of this regularization) on the stored state and
        ``vectors`` (shaped like x)."""
        inputs = [self.x, self.out, self.perm, self.block_start, *vectors, self.params]
        return _host_call(f"{name}_{'kl' if self.kl else 'l2'}", inputs, [self.x.dtype],
                          self.x.shape)[0]


# Two ways to differentiate the callback ops, one per mode.
#
# Eagerly, each op is wrapped in a tf.custom_gradient (below).
#
# In a graph (tf.function, Keras, a SavedModel) each op is a bare callback op, and
# TensorFlow looks its gradient up by op type: _host_callback_gradient, installed
# for PyFuncStateless, reads the op's token and computes the derivative from the
# op's own inputs and outputs, as more callback ops of the same kind, so every
# order is differentiated the same way. A graph then holds none of softrank's
# gradients, which is what lets a SavedModel keep them: tf.saved_model.save stores
# a tf.custom_gradient only at the first order (the custom gradients inside its
# gradient function are lost, so nested or persistent tapes around the reloaded
# function fail), and a gradient registered under an op type as a single trace
# without its op (so not the op's derivative). A reloaded graph finds
# _host_callback_gradient in any process that imported this module, as it finds
# the callbacks; so do the copies of the ops that tf.vectorized_map (pfor) makes.
#
# The custom gradients take every tensor they use as an argument (the state
# included) and build their gradient functions from those arguments: TensorFlow
# may trace a gradient function into another graph than the forward pass, where
# only its op's own inputs are in scope.
# The state's out, perm, block_start and params get no gradient: the gradient
# w.r.t. x is already the total derivative (the engine differentiates through
# the stored state).
_NO_STATE_GRADIENT = (None, None, None, None)


def _soft_op(x: tf.Tensor, params: tf.Tensor, kl: bool) -> tf.Tensor:
    """The operator on ``x`` (axis last, float32/float64) with its gradient."""
    name = f"soft_forward_{'kl' if kl else 'l2'}"
    if not tf.executing_eagerly():
        return _host_call(name, [x, params], [x.dtype, tf.int32, tf.int32], x.shape)[0]

    @tf.custom_gradient
    def soft_op(x, params):
        out, perm, block_start = _host_call(name, [x, params], [x.dtype, tf.int32, tf.int32],
                                            x.shape)
        state = _Forward(x, out, perm, block_start, params, kl)

        def grad(cotangent):
            return _vjp(state, cotangent), None

        return out, grad

    return soft_op(*_in_current_graph([x, params]))


def _vjp(state: _Forward, cotangent: tf.Tensor) -> tf.Tensor:
    """``J(x)^T cotangent``, itself differentiable in ``x`` and in ``cotangent``.

    Its gradient w.r.t. the cotangent is a jvp; w.r.t. ``x`` it is the hvp
    ``grad_x <cotangent, J(x) upstream>``. TensorFlow's ForwardAccumulator
    differentiates this function w.r.t. the cotangent to get the jvp of the
    operator, so forward mode rests on it too.
    """
    if not tf.executing_eagerly():
        return state.call("soft_vjp", cotangent)

    @tf.custom_gradient
    def vjp(x, out, perm, block_start, params, cotangent):
        local = _Forward(x, out, perm, block_start, params, state.kl)

        def grad(upstream):
            return (_hvp(local, cotangent, upstream), *_NO_STATE_GRADIENT,
                    _jvp(local, upstream))

        return local.call("soft_vjp", cotangent), grad

    return vjp(*_in_current_graph([*state.tensors, cotangent]))


def _jvp(state: _Forward, tangent: tf.Tensor) -> tf.Tensor:
    """``J(x) tangent``; its gradient is ``J(x)^T upstream`` w.r.t. the tangent
    and ``grad_x <upstream, J(x) tangent>`` (an hvp) w.r.t. ``x``."""
    if not tf.executing_eagerly():
        return state.call("soft_jvp", tangent)

    @tf.custom_gradient
    def jvp(x, out, perm, block_start, params, tangent):
        local = _Forward(x, out, perm, block_start, params, state.kl)

        def grad(upstream):
            return (_hvp(local, upstream, tangent), *_NO_STATE_GRADIENT,
                    _vjp(local, upstream))

        return local.call("soft_jvp", tangent), grad

    return jvp(*_in_current_graph([*state.tensors, tangent]))


def _hvp(state: _Forward, cotangent: tf.Tensor, tangent: tf.Tensor) -> tf.Tensor:
    """``grad_x <cotangent, J(x) tangent> = H tangent``, where
    ``H = sum_j cotangent_j hess(op_j)(x)`` is symmetric.

    Linear in ``tangent``, with gradient ``H upstream`` (H is symmetric): that
    is what a ForwardAccumulator around a tape needs. Its derivatives w.r.t.
    ``x`` and ``cotangent`` are third-order terms: zero for l2, not computed
    for kl (in a graph, the gradient of the ``soft_hvp`` op is an error there;
    eagerly :func:`_higher_order_guard` carries that dependence).
    """
    if not tf.executing_eagerly():
        if not state.kl:
            return _graph_zero(state.x, state.out, cotangent, tangent)
        return state.call("soft_hvp", cotangent, tangent)
    if not state.kl:
        return _zero_derivative(state.x, cotangent, tangent)

    @tf.custom_gradient
    def hvp(x, out, perm, block_start, params, cotangent, tangent):
        local = _Forward(x, out, perm, block_start, params, state.kl)

        def grad(upstream):
            return (None, *_NO_STATE_GRADIENT, None, _hvp(local, cotangent, upstream))

        return local.call("soft_hvp", cotangent, tangent), grad

    value = hvp(*_in_current_graph([*state.tensors, cotangent, tangent]))
    return value + _higher_order_guard(state.x, cotangent)


def _unavailable_derivative(x: tf.Tensor, upstream: tf.Tensor) -> tf.Tensor:
    """A graph tensor that raises NotImplementedError (tf.errors.UnimplementedError)
    when it is computed; its inputs are not constants, so it is never folded."""
    return _host_call("unavailable_derivative", [x, upstream], [x.dtype], x.shape)[0]


def _graph_zero(like: tf.Tensor, *others: tf.Tensor) -> tf.Tensor:
    """Zero shaped like ``like``, connected to ``like`` and ``others`` (in a graph).

    A derivative that is identically zero (the l2 hvp, or a formula that does not
    depend on the op's input) is added this zero so that a higher derivative
    through it is a tensor of zeros, not TensorFlow's None for "unconnected":
    ``others`` include an output of the callback op, whose own gradient
    (:func:`_host_callback_gradient`) again carries such a zero, so the
    connection holds at every order. ``multiply_no_nan`` keeps it zero (and its
    gradient too) where a value is NaN or infinite.
    """
    zero = tf.math.multiply_no_nan(like, tf.zeros_like(like))
    for tensor in others:
        zero = zero + tf.math.multiply_no_nan(tensor, tf.zeros_like(tensor))
    return zero


def _zero_derivative(x: tf.Tensor, cotangent: tf.Tensor, tangent: tf.Tensor) -> tf.Tensor:
    """The l2 hvp eagerly: zero, and so are all its derivatives.

    Connected to its inputs (rather than a constant), so that a higher
    derivative through it is a tensor of zeros, not TensorFlow's None for
    "unconnected".
    """

    @tf.custom_gradient
    def zero_derivative(x, cotangent, tangent):
        def grad(upstream):
            zero = _zero_derivative(x, cotangent, upstream)
            return zero, zero, zero

        return tf.zeros_like(x), grad

    return zero_derivative(*_in_current_graph([x, cotangent, tangent]))


def _higher_order_guard(x: tf.Tensor, cotangent: tf.Tensor) -> tf.Tensor:
    """Zero, whose derivative is an error: it carries the eager kl hvp's dependence
    on ``x`` and ``cotangent`` (which the engine cannot differentiate), so that a
    derivative through it fails clearly instead of coming back as None.

    Eagerly the gradient function raises. Where TensorFlow traces it into a
    graph it returns a host callback that raises when it runs: TensorFlow may
    trace derivatives it never runs, and an unused callback is pruned.
    """

    @tf.custom_gradient
    def higher_order_guard(x, cotangent):
        def grad(upstream):
            if tf.executing_eagerly():
                raise NotImplementedError(_HIGHER_ORDER_ERROR)
            error = _unavailable_derivative(x, upstream)
            return error, error

        return tf.zeros_like(x), grad

    return higher_order_guard(*_in_current_graph([x, cotangent]))


_NAMES = {token: name for name, (token, _) in _CALLBACKS.items()}


def _host_callback_gradient(op, *upstream):
    """The gradient TensorFlow uses for every ``PyFuncStateless`` op (installed by
    :func:`_install_gradient`).

    For a softrank callback op built in a graph: its derivative, from the op's
    token, inputs and outputs (see the comment above :func:`_soft_op`). For an
    eager softrank op (which its tf.custom_gradient differentiates) and any other
    library's op: what TensorFlow registered before (for PyFuncStateless, no
    gradient).
    """
    token = op.get_attr("token")
    name = _NAMES.get(token.decode() if isinstance(token, bytes) else token)
    if name is None:
        if _PY_FUNC_GRADIENT is not None:
            return _PY_FUNC_GRADIENT(op, *upstream)
        return [None] * len(op.inputs)
    inputs = list(op.inputs)
    up = upstream[0]
    if up is None:
        up = tf.zeros_like(op.outputs[0])
    if name == "unavailable_derivative":
        # Never runs (its forward raises); an error again, never a silent zero.
        error = _unavailable_derivative(inputs[0], up)
        return [error, error]
    if name.startswith(("projection", "isotonic")):
        return _structure_gradient(name, inputs, list(op.outputs), up)
    name, reg = name.rsplit("_", 1)
    params = inputs[-1]
    if name == "soft_forward":
        state = _Forward(inputs[0], *op.outputs, params, reg == "kl")
        return [_vjp(state, up), None]
    state = _Forward(*inputs[:4], params, reg == "kl")
    vectors = inputs[4:-1]
    if name == "soft_vjp":
        return [_hvp(state, vectors[0], up), *_NO_STATE_GRADIENT[:3], _jvp(state, up), None]
    if name == "soft_jvp":
        return [_hvp(state, up, vectors[0]), *_NO_STATE_GRADIENT[:3], _vjp(state, up), None]
    # soft_hvp(cotangent, tangent): linear in the tangent; the derivatives in x and
    # in the cotangent are third-order terms of kl, which the engine lacks.
    error = _unavailable_derivative(state.x, up)
    return [error, *_NO_STATE_GRADIENT[:3], error, _hvp(state, vectors[0], up), None]


def _install_gradient():
    """Make :func:`_host_callback_gradient` the gradient of ``PyFuncStateless``;
    returns the one it replaces (TensorFlow's: None, not differentiable).

    A gradient registered under an op type of our own (``gradient_override_map``)
    would be saved into a SavedModel as a trace without its op; the gradient of
    the op type itself is looked up where the graph runs, reloaded or not.
    """
    registry = getattr(getattr(tf_ops, "gradient_registry", None), "_registry", None)
    entry = registry.get("PyFuncStateless") if isinstance(registry, MutableMapping) else None
    if not isinstance(entry, MutableMapping) or "type" not in entry:
        raise ImportError(
            f"softrank.tensorflow does not support TensorFlow {tf.__version__}: its "
            "registry of gradients (ops.gradient_registry._registry) has changed")
    previous = entry["type"]
    # A reloaded softrank.tensorflow replaces its earlier self, not chains to it.
    previous = getattr(previous, "_softrank_replaced", previous)
    _host_callback_gradient._softrank_replaced = previous
    entry["type"] = _host_callback_gradient
    return previous


_PY_FUNC_GRADIENT = _install_gradient()


def _dtype_kind(dtype: tf.DType) -> str:
    if dtype.is_bool:
        return "b"
    if dtype.is_integer:
        return "i"
    if dtype.is_complex:
        return "c"
    return "O"


def _apply(x: Any, eps: Any, regularization: Any, direction: Any, axis: Any, op: int):
    eps = _check_eps(eps)
    reg = check_regularization(regularization)
    descending = check_direction(direction)
    x = _dense_tensor(x, "x")
    compute_dtype = _compute_dtype(x.dtype, "x")
    ndim = x.shape.rank
    if ndim is None:
        raise ValueError("x must have a statically known rank (number of dimensions)")
    ax = check_axis(axis, ndim)
    if op == OP_RANK and x.dtype == tf.float16:
        if x.shape[ax] is not None:
            check_float16_ranks(x.shape[ax])
        else:  # (n known only when the graph runs: checked there)
            with tf.control_dependencies([tf.debugging.assert_less_equal(
                    tf.shape(x, out_type=tf.int64)[ax], tf.constant(FLOAT16_LARGEST, tf.int64),
                    message=float16_ranks_message())]):
                x = tf.identity(x)
    params = tf.constant([op, reg, descending, eps], tf.float64)
    out = _soft_op(tf.cast(_axis_last(x, ax), compute_dtype), params, reg == REG_KL)
    return tf.cast(_axis_back(out, ax), x.dtype)


def soft_rank(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> tf.Tensor:
    """Soft (differentiable) ranks of ``x`` along ``axis``.

    ``soft_rank(x) = P(x / eps, rho)``: the exact projection of ``x / eps``
    onto the permutahedron of ``rho = (n, ..., 1)`` (Blondel et al. 2020),
    O(n log n) per row; every derivative costs O(n) per row.

    Parameters
    ----------
    x : tensor_like, shape (..., n, ...)
        A floating tensor; float16 and bfloat16 run in float32.
    eps : float, default 1.0
        Regularization strength, >= 0 (a Python number: it is a constant of
        the graph, see the module docstring). ``eps = 0`` gives the hard
        ranks (ties get their mean rank), ``eps = inf`` ``(n + 1) / 2``.
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
    Second derivatives: zero for l2; for kl see the module docstring for the
    modes that are supported.

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
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
    axis: int = -1,
) -> tf.Tensor:
    """Soft (differentiable) sort of ``x`` along ``axis``.

    ``soft_sort(x) = P(rho / eps, x)``: the exact projection of ``rho / eps``
    onto the permutahedron of ``x`` (Blondel et al. 2020), O(n log n) per
    row; every derivative costs O(n) per row.

    Parameters
    ----------
    x : tensor_like, shape (..., n, ...)
        A floating tensor; float16 and bfloat16 run in float32.
    eps : float, default 1.0
        Regularization strength, >= 0. ``eps = 0`` returns the sorted values;
        ``eps = inf`` the mean (l2) or, for kl, ``-log-mean-exp(-x)`` ascending and
        ``log-mean-exp(x)`` descending, of each row.
    regularization : {"l2", "kl"}
    direction : {"ascending", "descending"}
    axis : int, default -1

    Returns
    -------
    tf.Tensor
        Shape and dtype of ``x``; l2 preserves every row's sum.

    Notes
    -----
    Second derivatives: zero for l2; for kl see the module docstring for the
    modes that are supported.

    Examples
    --------
    >>> import tensorflow as tf
    >>> from softrank.tensorflow import soft_sort
    >>> soft_sort(tf.constant([3.0, 1.0, 2.0]), eps=0.1).numpy()
    array([1., 2., 3.], dtype=float32)
    """
    return _apply(x, eps, regularization, direction, axis, OP_SORT)


# --- the operators on the permutahedron ---------------------------------------------
#
# Each runs one host primitive forward (the projection onto a permutahedron, or the
# isotonic regression) that returns its value and its integer structure (sorting
# permutations, PAV blocks). Their derivatives are softrank._derivatives' formulas
# in TensorFlow ops over that structure, so TensorFlow differentiates them again:
# every order, in reverse and forward mode, through every transform.


class _TensorFlowOps:
    """The ops namespace of :mod:`softrank._derivatives` and :mod:`softrank._operators`.

    ``segments`` (from the forward pass's callback, see :func:`_segments`) names
    the PAV blocks of the ``block_start`` that the derivative formulas pass to
    :meth:`block_sum`, so a block sum is one segment sum and one gather.
    """

    exp = staticmethod(tf.exp)
    log = staticmethod(tf.math.log)
    sqrt = staticmethod(tf.sqrt)
    ones_like = staticmethod(tf.ones_like)
    stop_gradient = staticmethod(tf.stop_gradient)

    def __init__(self, segments: Any = None):
        self.segments = segments

    @staticmethod
    def take(a, index):
        return tf.gather(a, index, batch_dims=index.shape.rank - 1)

    def block_sum(self, v, block_start):
        segments = self.segments
        count = segments.shape.num_elements()
        if count is None:
            count = tf.size(segments, out_type=segments.dtype)
        return tf.gather(tf.math.unsorted_segment_sum(v, segments, count), segments)

    @staticmethod
    def nan_of(a):
        return tf.stop_gradient(tf.where(tf.math.is_nan(a), a, tf.zeros_like(a)))

    @staticmethod
    def take_columns(a, index):
        return tf.gather(a, index, axis=-1)

    @staticmethod
    def sum_last(a):
        return tf.reduce_sum(a, axis=-1)

    @staticmethod
    def constant(values, like):
        return tf.constant(values, dtype=like.dtype)

    @staticmethod
    def move_last_to_first(a):
        rank = a.shape.rank
        return tf.transpose(a, [rank - 1, *range(rank - 1)])

    @staticmethod
    def row_scale(a):
        largest = tf.reduce_max(a, axis=-1, keepdims=True)
        return tf.stop_gradient(tf.maximum(largest * _derivatives.ROW_SCALE_FACTOR,
                                           tf.ones((), a.dtype)))

    @staticmethod
    def stop_gradient_where_neg_inf(a):
        return tf.where(tf.math.is_inf(a) & (a < 0), tf.stop_gradient(a), a)

    @staticmethod
    def times_factors(value, before, after):
        """``value * before * after`` with the second factor applied by ``MulNoNan``.

        In a graph (tf.function, vectorized_map) grappler's constant folding
        and arithmetic optimizer fold ``value * before * after`` into ``value *
        (before * after)``: at a subnormal float64 eps that product is ``2^1074 =
        inf``, and a singleton block's exact 0 became NaN, while eager ops gave
        0. Grappler rewrites no ``MulNoNan``, nor a chain of a ``Mul`` and a
        ``MulNoNan`` (nor their gradients, a ``MulNoNan`` then a ``Mul``); with
        ``after != 0`` it is exactly a multiply (NaN and inf in ``value`` stay),
        so the result is bitwise the eager one, and the other adapters' plain
        product.
        """
        return tf.math.multiply_no_nan(value * before, after)


_OPS = _TensorFlowOps()
_STATE_DTYPES = [tf.int64] * 6  # perm_z, inv_z, perm_w, inv_w, block_start, segments


def _reg_name(reg: int) -> str:
    return "kl" if reg == REG_KL else "l2"


def _connected(grads, z, w, cotangent):
    """``grads`` plus a zero that depends on every input of the derivative (eagerly).

    Where a formula does not depend on z or w (l2, or a kl weight gradient), a
    higher derivative is then a tensor of zeros rather than TensorFlow's None
    for "unconnected"."""
    zero = _zero_derivative(z, w, cotangent)
    return [None if g is None else g + zero for g in grads]


def _graph_connected(grads, out, *others):
    """:func:`_connected` in a graph: through the op's output ``out`` (and ``others``),
    see :func:`_graph_zero`."""
    zero = _graph_zero(out, *others)
    return [None if g is None else g + zero for g in grads]


def _projection_op(z: tf.Tensor, w: tf.Tensor, reg: int, eps: float, need_w: bool) -> tf.Tensor:
    """``P(z / eps, w)`` (l2) or ``P_E(z / eps, w)`` (kl) along the last axis, with its
    gradient in z (and in w where ``need_w``)."""
    params = tf.constant([eps], tf.float64)
    name = f"projection_{_reg_name(reg)}"
    if not tf.executing_eagerly():
        # Differentiated by _structure_gradient (see the comment above _soft_op).
        return _host_call(name, [z, w, params], [z.dtype, *_STATE_DTYPES], z.shape)[0]

    @tf.custom_gradient
    def projection(z, w, params):
        out, *state = _host_call(name, [z, w, params], [z.dtype, *_STATE_DTYPES], z.shape)

        def grad(cotangent):
            z_, w_, out_, cotangent_, *state_ = _in_current_graph([z, w, out, cotangent, *state])
            grads = _derivatives.projection_vjp(
                _TensorFlowOps(state_[-1]), z_, w_, out_, state_[:-1], cotangent_, eps, reg,
                need_w=need_w)
            return (*_connected(grads, z_, w_, cotangent_), None)

        return out, grad

    return projection(*_in_current_graph([z, w, params]))


def _isotonic_op(y: tf.Tensor, weights: Any, increasing: bool, reg: int) -> tf.Tensor:
    """The isotonic regression of ``y`` along the last axis, with its gradient in y and
    in ``weights`` (None: unit weights)."""
    params = tf.constant([increasing], tf.float64)
    name = f"isotonic_{_reg_name(reg)}"
    weighted = [] if weights is None else [weights]
    if not tf.executing_eagerly():
        # Differentiated by _structure_gradient (see the comment above _soft_op).
        return _host_call(name, [y, *weighted, params], [y.dtype, tf.int64, tf.int64],
                          y.shape)[0]

    @tf.custom_gradient
    def isotonic(y, params, *weighted):
        solution, block_start, segments = _host_call(
            name, [y, *weighted, params], [y.dtype, tf.int64, tf.int64], y.shape)

        def grad(cotangent):
            y_, solution_, block_start_, segments_, cotangent_, *weighted_ = _in_current_graph(
                [y, solution, block_start, segments, cotangent, *weighted])
            weights_ = weighted_[0] if weighted_ else None
            grad_y, grad_weights = _derivatives.isotonic_vjp(
                _TensorFlowOps(segments_), y_, weights_, solution_, block_start_, cotangent_,
                reg)
            grad_y, grad_weights = _connected(
                [grad_y, grad_weights], y_, y_ if weights_ is None else weights_, cotangent_)
            return (grad_y, None, *([grad_weights] if weighted_ else []))

        return solution, grad

    return isotonic(*_in_current_graph([y, params, *weighted]))


def _scale_factors(eps: tf.Tensor, dtype: tf.DType):
    """:func:`softrank._derivatives._split_scale` of a float64 scalar tensor ``eps``,
    as two tensors of ``dtype`` (``(1, 0)`` at eps = 0 and inf: ``z_scale``).

    TensorFlow's CPU kernels flush subnormals to zero (a subnormal eps compares
    equal to 0 and ``1 / eps`` is inf), so a subnormal ``eps = m * 2^-1074`` is
    read off its bits: ``1 / eps = 2^1074 / m``, computed exactly as
    ``(2^537 / m) * 2^537``. Where ``1 / eps`` does not fit ``dtype``,
    _split_scale's exponent is always its cap (float32: ``1 / eps > 2^128``;
    float64: ``1 / eps`` is inf), so the factors are ``2^cap`` and
    ``min(2^-cap / eps, 2^cap)``.
    """
    itemsize = 4 if dtype.size <= 4 else 8
    cap = _derivatives._FACTOR_EXPONENT[itemsize]
    bits = tf.bitcast(eps, tf.int64)
    subnormal = (bits > 0) & (bits < 2**52)
    mantissa = tf.cast(tf.where(subnormal, bits, tf.ones_like(bits)), tf.float64)
    recip = tf.where(subnormal, 2.0**537 / mantissa * 2.0**537, 1.0 / eps)
    ratio = tf.where(subnormal, 2.0**(1074 - cap) / mantissa, 2.0**-cap / eps)
    zero = ((eps == 0.0) & ~subnormal) | tf.math.is_inf(eps)
    fits = recip <= _derivatives._LARGEST[itemsize]
    one = tf.ones_like(eps)
    before = tf.where(fits | zero, one, one * 2.0**cap)
    after = tf.where(zero, tf.zeros_like(eps),
                     tf.where(fits, recip, tf.minimum(ratio, 2.0**cap)))
    return tf.cast(before, dtype), tf.cast(after, dtype)


def _structure_gradient(name, inputs, outputs, upstream):
    """The gradient of a projection / isotonic callback op in a graph (see
    :func:`_host_callback_gradient`): the eager custom gradients' formulas on the op's
    own inputs and outputs. eps is read from the op's input, as a tensor."""
    reg = REG_KL if name.endswith("kl") else 0
    # A copy of the op (pfor's) may have lost the static shapes set on its outputs;
    # the formulas need their rank.
    outputs = [tf.reshape(t, tf.shape(inputs[0])) for t in outputs]
    if upstream is None:
        upstream = tf.zeros_like(outputs[0])
    if name.startswith("projection"):
        z, w, params = inputs
        static = tf.get_static_value(params)
        if static is not None:
            # eps as a number (a graph constant, reloaded or not): the
            # formulas' own scaling, exact where z / eps overflows.
            grads = _derivatives.projection_vjp(_TensorFlowOps(outputs[-1]), z, w, outputs[0],
                                                outputs[1:-1], upstream, float(static[0]), reg)
            grad_z, grad_w = _graph_connected(grads, outputs[0], z, w, upstream)
            return [grad_z, grad_w, None]
        # eps as a tensor (pfor's copy of the op): the formulas at eps = 1 on z
        # scaled by z_scale(eps), and their z gradient scaled again. As in
        # _derivatives, each block's head is subtracted from z before the scaling
        # (the block softmax is shift invariant), so that z / eps beyond the float
        # range gives 0 at the head and -inf below it, not inf - inf = NaN; and
        # the scaling is by _derivatives._split_scale's finite factors, which keep a
        # singleton block's exact 0 at 0 where 1 / eps overflows.
        before, after = _scale_factors(params[0], z.dtype)
        ops = _TensorFlowOps(outputs[-1])
        perm_z, inv_z, _, _, block_start = outputs[1:-1]
        scaled_z = z
        if reg == REG_KL:
            sorted_z = ops.take(z, perm_z)
            shifted = ops.take(sorted_z - tf.stop_gradient(ops.take(sorted_z, block_start)),
                               inv_z)
            # eps = 0 or inf (after = 0): no derivative in z; a shift of -inf
            # (a block spanning the float range) must not make 0 * inf.
            scaled_z = tf.where(after == 0.0, tf.zeros_like(shifted), shifted * before * after)
        grads = _derivatives.projection_vjp(ops, scaled_z, w, outputs[0], outputs[1:-1],
                                            upstream, 1.0, reg)
        grad_z, grad_w = _graph_connected(grads, outputs[0], z, w, upstream)
        return [grad_z * before * after, grad_w, None]
    y, *weighted, _ = inputs
    weights = weighted[0] if weighted else None
    grads = _derivatives.isotonic_vjp(_TensorFlowOps(outputs[2]), y, weights, outputs[0],
                                      outputs[1], upstream, reg)
    grad_y, grad_weights = _graph_connected(grads, outputs[0], y, *weighted, upstream)
    return [grad_y, *([grad_weights] if weighted else []), None]


def _compute_dtype(dtype: tf.DType, name: str) -> tf.DType:
    """The compute dtype of ``dtype`` (:func:`softrank._layout.compute_dtype_name`)."""
    kind = "f" if dtype.is_floating else _dtype_kind(dtype)
    return tf.as_dtype(_layout.compute_dtype_name(dtype.name, kind, dtype.size, allow_int=False,
                                                  name=name))


def _axis_last(x: tf.Tensor, ax: int) -> tf.Tensor:
    ndim = x.shape.rank
    if ax == ndim - 1:
        return x
    return tf.transpose(x, _layout.axis_last_order(ndim, ax)[0])


def _axis_back(x: tf.Tensor, ax: int) -> tf.Tensor:
    """Inverse of :func:`_axis_last`."""
    ndim = x.shape.rank
    if ax == ndim - 1:
        return x
    return tf.transpose(x, _layout.axis_last_order(ndim, ax)[1])


def _dense_tensor(value: Any, name: str) -> tf.Tensor:
    """``tf.convert_to_tensor(value)``, refusing ragged and sparse tensors by name
    (their conversion errors name neither the argument nor the problem)."""
    if isinstance(value, (tf.RaggedTensor, tf.SparseTensor)):
        kind = "RaggedTensor" if isinstance(value, tf.RaggedTensor) else "SparseTensor"
        hint = ("value.to_tensor(default_value) for a padded tensor, or apply the operator to "
                "each row" if kind == "RaggedTensor" else "tf.sparse.to_dense(value)")
        raise TypeError(f"{name} is a tf.{kind}: softrank takes dense tensors ({hint})")
    return tf.convert_to_tensor(value)


def _prepare(x: Any, axis: Any, name: str):
    """``(x as a tensor, x in its compute dtype with axis last, the axis)``."""
    x = _dense_tensor(x, name)
    compute_dtype = _compute_dtype(x.dtype, name)
    if x.shape.rank is None:
        raise ValueError(f"{name} must have a statically known rank (number of dimensions)")
    ax = check_axis(axis, x.shape.rank, array_name=name)
    return x, tf.cast(_axis_last(x, ax), compute_dtype), ax


def _static_length(moved: tf.Tensor, name: str) -> int:
    n = moved.shape[-1]
    if n is None:
        raise ValueError(
            f"{name} must have a statically known length n along the axis "
            "(a tf.function input_signature may leave the other dimensions unknown)")
    return n


def _secondary(value: Any, name: str) -> tf.Tensor:
    """A tensor of floats (integers and booleans accepted) of known rank."""
    value = _dense_tensor(value, name)
    if not value.dtype.is_floating:
        check_float_dtype_kind(_dtype_kind(value.dtype), value.dtype.name, allow_int=True,
                               name=name)
    if value.shape.rank is None:
        raise ValueError(f"{name} must have a statically known rank (number of dimensions)")
    return value


def _shape_text(shape: tf.TensorShape) -> tuple:
    return tuple(shape.as_list())


def _same_shape(value: tf.Tensor, like: tf.Tensor, name: str, like_name: str) -> tf.Tensor:
    """``value``, checked to have the shape of ``like`` (never broadcast).

    ValueError naming ``name`` where the static shapes differ; where a dimension
    is unknown when the graph is built (a tf.function input_signature with None),
    ``value`` comes back behind an assertion that raises
    ``tf.errors.InvalidArgumentError`` when the graph runs with other shapes.
    """
    message = f"{name} must have the shape of {like_name}"
    if value.shape.rank != like.shape.rank or not value.shape.is_compatible_with(like.shape):
        raise ValueError(f"{message} {_shape_text(like.shape)}, got {_shape_text(value.shape)}")
    if value.shape.is_fully_defined() and like.shape.is_fully_defined():
        return value  # compatible and fully known: equal
    check = tf.debugging.assert_equal(tf.shape(value), tf.shape(like), message=message)
    with tf.control_dependencies([check]):
        return tf.identity(value)


def _static_argument(value: Any, name: str, what: str) -> Any:
    """The value of an argument that must be known when the op is built (eps, k, q).

    Python numbers, numpy values and the like pass unchanged; a tensor whose value
    is known now (an eager tensor, a constant of the graph being traced) gives that
    value, as a numpy scalar or array. A variable, a tensor traced by tf.function
    (known only when the graph runs) and a tensor that a GradientTape or a
    ForwardAccumulator watches raise TypeError naming ``name``: the argument is a
    constant of the computation, so a derivative with respect to it would come back
    as a silent None.
    """
    unsupported = f"derivatives with respect to {name} are not supported"
    if isinstance(value, tf.Variable) or (tf.is_tensor(value) and hasattr(value, "assign")):
        # (a Keras 3 variable is a tensor with assign, not a tf.Variable)
        raise TypeError(
            f"{name} must be a static {what} in softrank.tensorflow, got a variable "
            f"({type(value).__name__}): {unsupported}; pass its value (e.g. v.numpy(), "
            "read outside any tf.function)")
    if not isinstance(value, tf.Tensor):
        return value
    if record.should_record_backprop([value]) or forwardprop_util.pack_tangents([value]).tangents:
        raise TypeError(
            f"{name} must be a static {what} in softrank.tensorflow, got a tensor that a "
            f"GradientTape or ForwardAccumulator watches: {unsupported}")
    static = tf.get_static_value(value)
    if static is None:
        raise TypeError(
            f"{name} must be known when the graph is built (a static {what}), got a tensor "
            "traced by tf.function (an argument of the function, or computed from one): "
            f"pass a Python number, which the graph keeps as a constant; {unsupported}")
    if isinstance(static, np.ndarray) and static.ndim == 0:
        static = static[()]  # the numpy scalar, as Tensor.numpy() gives
    return static


def _check_eps(eps: Any) -> float:
    """``eps`` as a float >= 0 (:func:`_static_argument`, then the shared check)."""
    return check_eps(_static_argument(eps, "eps", "Python number"))


def permutahedron_projection(
    z: Any,
    w: Any = None,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> tf.Tensor:
    """Projection onto the permutahedron of ``w``, along ``axis``.

    l2: ``argmin_{mu in P(w)} 1/2 ||mu - z||^2``; kl: ``log argmin_{mu in
    P(exp w)} KL(mu, exp z)``, where ``P(w)`` is the convex hull of the
    permutations of ``w`` (Blondel et al. 2020, section 3). Soft rank is
    ``P(-x / eps, rho)`` and soft sort ``P(rho / eps, x)``; other ``w`` give
    other operators (:func:`soft_topk_mask`). O(n log n) per row, computed
    by the CPU engine on the host (tensors on a GPU are copied to the host and
    back); every derivative costs O(n) per row.

    Parameters
    ----------
    z : tensor_like, shape (..., n, ...)
        A floating tensor; float16 and bfloat16 run in float32. n must be
        statically known.
    w : tensor_like, optional
        Shape (n,) (the same vector for every row) or the shape of ``z``; any
        order (only its sorted values matter); floats or integers. Default
        ``rho = (n, ..., 1)``. Under kl, ``w`` may hold ``-inf`` (zeros of
        ``exp w``) where each row's largest ``w`` is finite.
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    tf.Tensor
        Shape and dtype of ``z``; the rows of l2 sum to ``sum(w)``. Rows with
        NaN or inf give NaN.

    Notes
    -----
    Differentiable in ``z`` and ``w`` (the gradient of a 1-D ``w`` is summed
    over the rows), to any order and in forward mode: the Jacobian is block
    diagonal over the PAV blocks (l2: ``I - mean_B`` in z and ``mean_B`` in
    w; kl: block softmaxes), written in TensorFlow ops over the sorting
    permutations and blocks of the forward pass. The transforms that work are
    listed in the module docstring.

    Examples
    --------
    >>> import tensorflow as tf
    >>> from softrank.tensorflow import permutahedron_projection
    >>> permutahedron_projection(tf.constant([0.0, 3.0, 1.0]), [1.0, 2.0, 3.0]).numpy()
    array([1., 3., 2.], dtype=float32)
    """
    reg = check_regularization(regularization)
    z, moved, ax = _prepare(z, axis, "z")
    n = _static_length(moved, "z")
    dtype = moved.dtype
    if w is None:
        _operators.check_default_w_fits(n, z.dtype)
        w_moved = tf.broadcast_to(tf.constant(_operators.rho(n, dtype.as_numpy_dtype)),
                                  tf.shape(moved))
    else:
        w = _secondary(w, "w")
        same_shape = w.shape.rank == z.shape.rank and w.shape.is_compatible_with(z.shape)
        if _operators.projection_weights_shared(_shape_text(w.shape), _shape_text(z.shape), n,
                                                same_shape):
            w_moved = tf.broadcast_to(tf.cast(w, dtype), tf.shape(moved))
        else:
            w_moved = tf.cast(_axis_last(w, ax), dtype)
    out = _projection_op(moved, w_moved, reg, 1.0, need_w=w is not None)
    return tf.cast(_axis_back(out, ax), z.dtype)


def soft_topk_mask(
    x: Any,
    k: int,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> tf.Tensor:
    """A soft indicator of the ``k`` largest entries of ``x`` along ``axis``.

    The projection of ``x / eps`` onto the permutahedron of ``w = (1, ..., 1,
    0, ..., 0)`` (k ones): l2 ``P(x / eps, w)``; kl ``exp(P_E(x / eps, log
    w))``, the entropic projection onto the same polytope. Computed by the
    CPU engine on the host (tensors on a GPU are copied to the host and back).

    Parameters
    ----------
    x : tensor_like, shape (..., n, ...)
        A floating tensor; float16 and bfloat16 run in float32. n must be
        statically known.
    k : int
        0 <= k <= n (kl: k >= 1); a Python or numpy int, or an integer scalar
        tensor whose value is known (not a variable or a traced tensor).
    eps : float, default 1.0
        >= 0 (a Python number: a constant of the graph). As ``eps -> 0`` the
        mask tends to the indicator of the k largest entries (tied entries at
        the boundary share what is left); ``eps = 0`` returns that limit,
        ``eps = inf`` the constant ``k / n``.
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    tf.Tensor
        Shape and dtype of ``x``; values in [0, 1], each row sums to ``k``.

    Notes
    -----
    Differentiable in ``x`` to any order and in forward mode (zero at
    ``eps = 0`` and ``eps = inf``): the projection's Jacobian over the PAV
    blocks, in TensorFlow ops (see :func:`permutahedron_projection`).

    Examples
    --------
    >>> import tensorflow as tf
    >>> from softrank.tensorflow import soft_topk_mask
    >>> soft_topk_mask(tf.constant([0.1, 3.0, 2.0, -1.0]), k=2, eps=0.5).numpy()
    array([0., 1., 1., 0.], dtype=float32)
    """
    eps = _check_eps(eps)
    reg = check_regularization(regularization)
    x, moved, ax = _prepare(x, axis, "x")
    n = _static_length(moved, "x")
    k = _operators.check_k(_static_argument(k, "k", "int"), n)
    weights = _operators.topk_weights(n, k, reg, moved.dtype.as_numpy_dtype)
    w_moved = tf.broadcast_to(tf.constant(weights), tf.shape(moved))
    out = _projection_op(moved, w_moved, reg, eps, need_w=False)
    return tf.cast(_axis_back(_operators.topk_mask_from_projection(_OPS, out, reg), ax), x.dtype)


def spearman(
    pred: Any,
    target: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> tf.Tensor:
    """Soft Spearman rank correlation of ``pred`` with ``target``, row by row.

    The Pearson correlation of ``soft_rank(pred, eps)`` with the ranks of
    ``target`` (mean ranks for ties). As ``eps -> 0`` it equals
    ``scipy.stats.spearmanr`` of each row; ``1 - spearman`` is a
    learning-to-rank loss. Built on :func:`soft_rank` (computed on the host).

    Parameters
    ----------
    pred : tensor_like, shape (..., n, ...)
        A floating tensor; float16 and bfloat16 run in float32. n must be
        statically known.
    target : tensor_like, shape of ``pred``
        Floats or integers. Not differentiated (its ranks are piecewise
        constant). A row of ``target`` holding NaN or +-inf gives NaN, as a
        row of ``pred`` does (``scipy.stats.spearmanr`` ranks +-inf).
    eps : float, default 1.0
    regularization : {"l2", "kl"}
    axis : int, default -1
        Removed from the result.

    Returns
    -------
    tf.Tensor
        Shape of ``pred`` without ``axis``, dtype of ``pred``, values in [-1, 1]; NaN for a
        constant row (as scipy) and at eps = inf (constant soft ranks); ill-conditioned as
        pred / eps nears a constant (see the README's Operators).

    Notes
    -----
    Differentiable in ``pred`` with every derivative :func:`soft_rank` has
    (see the module docstring); the gradient in ``target`` is zero.

    Examples
    --------
    >>> import tensorflow as tf
    >>> from softrank.tensorflow import spearman
    >>> float(spearman(tf.constant([0.1, 0.5, 0.3]), [1.0, 3.0, 2.0], eps=0.01))
    1.0
    """
    eps = _check_eps(eps)
    check_regularization(regularization)
    pred, moved, ax = _prepare(pred, axis, "pred")
    target = _same_shape(_secondary(target, "target"), pred, "target", "pred")
    _static_length(moved, "pred")
    ranks = soft_rank(moved, eps, regularization=regularization)
    # The target is ranked in float64, then its ranks are cast: cast first,
    # distinct targets (int64 above 2^24 for float32 pred) would merge into ties.
    target_ranks = tf.cast(tf.stop_gradient(soft_rank(tf.cast(_axis_last(target, ax), tf.float64),
                                                      0.0)), moved.dtype)
    return tf.cast(_operators.pearson_last_axis(_OPS, ranks, target_ranks), pred.dtype)


def soft_quantile(
    x: Any,
    q: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> tf.Tensor:
    """Soft quantiles of ``x`` along ``axis``: np.quantile's "linear" rule on the soft sort.

    Built on :func:`soft_sort` (computed on the host, tensors on a GPU are
    copied there and back).

    Parameters
    ----------
    x : tensor_like, shape (..., n, ...)
        A floating tensor; float16 and bfloat16 run in float32. n >= 1 and
        statically known.
    q : float or 1-D array_like of floats in [0, 1]
        Known when the graph is built (not a traced tensor).
    eps : float, default 1.0
        As ``eps -> 0`` (and at eps = 0) the result equals
        ``np.quantile(x, q, axis=axis, method="linear")``.
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    tf.Tensor
        np.quantile's layout: shape of ``x`` without ``axis`` for a scalar
        ``q``, with ``len(q)`` in front for a 1-D ``q``; dtype of ``x``.

    Notes
    -----
    Differentiable in ``x`` with every derivative :func:`soft_sort` has (see
    the module docstring).

    Examples
    --------
    >>> import tensorflow as tf
    >>> from softrank.tensorflow import soft_quantile
    >>> float(soft_quantile(tf.constant([4.0, 1.0, 3.0, 2.0]), 0.5, eps=0.01))
    2.5
    """
    eps = _check_eps(eps)
    check_regularization(regularization)
    # q selects sorted positions, so it must be known when the graph is built.
    quantiles, scalar = _operators.check_quantiles(
        _static_argument(q, "q", "number or 1-D array of numbers"))
    x, moved, _ = _prepare(x, axis, "x")
    _static_length(moved, "x")
    ordered = soft_sort(moved, eps, regularization=regularization)
    return tf.cast(_operators.quantile_from_sorted(_OPS, ordered, quantiles, scalar), x.dtype)


def soft_median(
    x: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> tf.Tensor:
    """Soft median of ``x`` along ``axis``: ``soft_quantile(x, 0.5, ...)`` (axis removed).

    As ``eps -> 0`` it equals ``np.median(x, axis=axis)``. Computed on the
    host; differentiable like :func:`soft_quantile`.
    """
    return soft_quantile(x, 0.5, eps, regularization=regularization, axis=axis)


def isotonic_regression(
    y: Any,
    *,
    weights: Any = None,
    increasing: bool = True,
    regularization: Regularization = "l2",
    axis: int = -1,
) -> tf.Tensor:
    """Weighted isotonic regression along ``axis`` by pool-adjacent-violators.

    l2: ``argmin_v sum_i w_i (v_i - y_i)^2``; kl: ``argmin_v sum_i exp(y_i -
    v_i) + w_i v_i`` (fast-soft-sort's ``isotonic_kl`` with weights
    ``exp(its w)``); subject to ``v`` non-decreasing (``increasing=True``) or
    non-increasing. Exact, O(n) per row, computed by the CPU engine on the
    host (tensors on a GPU are copied to the host and back). On each block B
    of equal values the solution is ``sum_B w y / sum_B w`` (l2) or ``log
    sum_B exp(y) - log sum_B w`` (kl).

    Parameters
    ----------
    y : tensor_like, shape (..., n, ...)
        A floating tensor; float16 and bfloat16 run in float32.
    weights : tensor_like, shape of ``y``, optional
        Positive finite weights (floats or integers); default all ones.
        Checked eagerly (ValueError naming ``weights``); inside a
        ``tf.function`` their values are only known when the graph runs, and
        a bad one raises ``tf.errors.InvalidArgumentError`` then.
    increasing : bool, default True
    regularization : {"l2", "kl"}
    axis : int, default -1

    Returns
    -------
    tf.Tensor
        Shape and dtype of ``y``.

    Notes
    -----
    Differentiable in ``y`` and ``weights``, to any order and in forward
    mode. Per block B (l2): ``d v_B = sum_B (w dy + dw (y - v_B)) / W_B``;
    (kl): ``d v_B = sum_B softmax_B(y) dy - sum_B dw / W_B``, with ``W_B =
    sum_B w``, written in TensorFlow ops over the blocks of the forward pass.

    Examples
    --------
    >>> import tensorflow as tf
    >>> from softrank.tensorflow import isotonic_regression
    >>> isotonic_regression(tf.constant([1.0, 3.0, 2.0, 4.0])).numpy()
    array([1. , 2.5, 2.5, 4. ], dtype=float32)
    """
    reg = check_regularization(regularization)
    y, moved, ax = _prepare(y, axis, "y")
    weights_moved = None
    if weights is not None:
        weights = _same_shape(_secondary(weights, "weights"), y, "weights", "y")
        weights_moved = tf.cast(_axis_last(weights, ax), moved.dtype)
        if tf.executing_eagerly():
            # (TensorFlow's threads, which run the engine's callback, read
            # subnormal numbers as 0, as XLA's do for softrank.jax)
            check_weights(weights.numpy(), moved.dtype.as_numpy_dtype, flushes_subnormals=True)
    out = _isotonic_op(moved, weights_moved, check_increasing(increasing), reg)
    return tf.cast(_axis_back(out, ax), y.dtype)
