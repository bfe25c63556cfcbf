"""softrank for TensorFlow: soft rank and soft sort, differentiable in every mode.

``soft_rank`` and ``soft_sort`` act along any ``axis`` of a tensor of any
(statically known) rank. The forward pass runs the CPU engine on the host
(tensors on a GPU are copied to the host and back) and stores the
permutation and the PAV blocks (int32), so every derivative costs O(n) per
row. float16 and bfloat16 are computed in float32 and returned in their own
dtype; integer, bool and complex tensors raise TypeError.

What works, and what does not
-----------------------------
Eager execution, ``tf.function``, ``tf.GradientTape`` (``gradient``,
``jacobian``, ``batch_jacobian``), ``tf.vectorized_map`` (also differentiated
from outside), ``tf.autodiff.ForwardAccumulator``, Keras training and the
``.keras`` format.

Derivatives: the first derivative in reverse and forward mode; the second
derivative by nested tapes (reverse-over-reverse), a ForwardAccumulator
around a tape (forward-over-reverse, e.g. Hessian-vector products) and a
tape around a ForwardAccumulator (reverse-over-forward), eagerly, inside a
``tf.function`` (tapes) and around a ``tf.function`` call. ``"l2"`` is
differentiable to any order (its Jacobian is piecewise constant, so every
higher derivative is zero). For ``"kl"`` a derivative that needs more than
the engine's second derivative ``soft_hvp`` (a third derivative, or two
nested ForwardAccumulators) raises NotImplementedError (in a graph,
``tf.errors.UnimplementedError`` when it runs). A ForwardAccumulator created
inside a ``tf.function`` raises NotImplementedError: TensorFlow ignores
custom gradients there.

SavedModel: the ops are host callbacks (``PyFuncStateless``) registered
under fixed names when this module is imported, so ``tf.saved_model.save``
and Keras ``model.export`` work, and the SavedModel reloads and runs, with
its first derivatives, in any Python process that has run
``import softrank.tensorflow``; without that import, calling it raises an
error that names the import. Runtimes without Python (TF Serving, TFLite)
cannot run it.

XLA: ``jit_compile=True`` raises NotImplementedError (a host callback
cannot be compiled); use ``jit_compile=False`` (Keras:
``model.compile(..., jit_compile=False)``), or softrank.jax for compiled code.
"""
from __future__ import annotations

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
# can find again), the XLA-context test that tf.function's jit_compile sets up
# while tracing, and the forward-accumulator state of a tensor.
from tensorflow.python.eager import forwardprop_util
from tensorflow.python.ops import control_flow_util, script_ops

from softrank import _host
from softrank._engine import OP_RANK, OP_SORT, REG_KL
from softrank._types import Direction, Regularization
from softrank._validate import (
    check_axis,
    check_direction,
    check_eps,
    check_float_dtype_kind,
    check_regularization,
)

__all__ = ["soft_rank", "soft_sort"]


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


# A graph (and so a SavedModel) names a host callback by its token. The tokens
# are fixed and the operator's arguments travel as a tensor input, so a graph
# saved in one process finds its callbacks in any process that imports this
# module; where none did, TensorFlow's "Could not find callback with key=..."
# error quotes the token, which says what to import.
_CALLBACKS = {
    name: (f"softrank.tensorflow:{name} (run `import softrank.tensorflow` first)", callback)
    for name, callback in (
        ("soft_forward", _forward_callback),
        ("soft_vjp", _vjp_callback),
        ("soft_jvp", _jvp_callback),
        ("soft_hvp", _hvp_callback),
        ("unavailable_derivative", _unavailable_derivative_callback),
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
    for token, callback in _CALLBACKS.values():
        registry[token] = callback


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
    "regularization='kl', or two nested ForwardAccumulators), or it differentiates "
    "a reloaded SavedModel through tf.vectorized_map. "
    "Supported for 'kl': first derivatives in every mode and "
    "second derivatives by nested GradientTapes, a ForwardAccumulator around a "
    "GradientTape or a GradientTape around a ForwardAccumulator. "
    "regularization='l2' is differentiable to any order."
)

_GRAPH_FORWARD_ERROR = (
    "softrank.tensorflow does not support a tf.autodiff.ForwardAccumulator created "
    "inside a tf.function: there TensorFlow ignores custom gradients and would "
    "return zeros. Create the accumulator outside the tf.function (around the call) "
    "or run eagerly."
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
    return tf.raw_ops.PyFuncStateless(
        input=list(inputs), token=_CALLBACKS[name][0], Tout=list(dtypes), name=f"softrank_{name}"
    )


def _host_call(name: str, inputs: Sequence[tf.Tensor], dtypes: Sequence[tf.DType],
               shape: tf.TensorShape) -> List[tf.Tensor]:
    """Run callback ``name`` on the host; every output has the static ``shape``."""
    if not tf.executing_eagerly():
        if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
            raise NotImplementedError(_XLA_ERROR)
        # Inside a graph, TensorFlow's ForwardAccumulator differentiates the forward
        # ops of a custom gradient and ignores the gradient itself: for a host
        # callback that is a silent zero.
        if forwardprop_util.pack_tangents(list(inputs)).tangents:
            raise NotImplementedError(_GRAPH_FORWARD_ERROR)
        if name == "unavailable_derivative":
            # Not differentiable: a gradient of its own would make the gradient
            # functions a SavedModel stores refer to themselves.
            outputs = _py_func(name, inputs, dtypes)
        else:
            with tf.compat.v1.get_default_graph().gradient_override_map(
                {"PyFuncStateless": _GRADIENT_NAME}
            ):
                outputs = _py_func(name, inputs, dtypes)
    else:
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
        """Callback ``name`` on the stored state and ``vectors`` (shaped like x)."""
        inputs = [self.x, self.out, self.perm, self.block_start, *vectors, self.params]
        return _host_call(name, inputs, [self.x.dtype], self.x.shape)[0]


# The custom gradients below take every tensor they use as an argument (the
# state included) and build their gradient functions from those arguments: a
# gradient function may run in another graph than the forward pass (a
# tf.function's backward function), where only its op's own inputs are in scope.
# The state's out, perm, block_start and params get no gradient: the gradient
# w.r.t. x is already the total derivative (the engine differentiates through
# the stored state).
_NO_STATE_GRADIENT = (None, None, None, None)


def _soft_op(x: tf.Tensor, params: tf.Tensor, kl: bool) -> tf.Tensor:
    """The operator on ``x`` (axis last, float32/float64) with its gradient."""

    @tf.custom_gradient
    def soft_op(x, params):
        out, perm, block_start = _host_call(
            "soft_forward", [x, params], [x.dtype, tf.int32, tf.int32], x.shape
        )
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
    for kl (:func:`_higher_order_guard` carries that dependence).
    """
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


def _zero_derivative(x: tf.Tensor, cotangent: tf.Tensor, tangent: tf.Tensor) -> tf.Tensor:
    """The l2 hvp: zero, and so are all its derivatives.

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
    """Zero, whose derivative is an error: it carries the kl hvp's dependence on
    ``x`` and ``cotangent`` (which the engine cannot differentiate), so that a
    derivative through it fails clearly instead of coming back as None.

    Eagerly the gradient function raises. In a graph it returns a host callback
    that raises when it runs: TensorFlow traces some derivatives it may never
    run (a tf.function's forward-mode function builds its backward function
    too), and an unused callback is pruned.
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


# The same derivatives as the custom gradients above, registered for the
# callback ops themselves, for the symbolic gradient of a graph that has lost
# the custom gradients: tf.vectorized_map (pfor) rewrites them into plain ops
# but copies each callback op with its attributes, this override included.
_GRADIENT_NAME = "SoftrankHostCallback"
_NAMES = {token: name for name, (token, _) in _CALLBACKS.items()}


@tf.RegisterGradient(_GRADIENT_NAME)
def _host_callback_gradient(op, *upstream):
    if op is None:
        # tf.saved_model.save traces every overridden gradient without its op (and
        # with the op's inputs as upstream). A reloaded graph can reach this
        # gradient only where its custom gradients are gone (pfor): an error there.
        return [_unavailable_derivative(u, u) if u.dtype.is_floating else None
                for u in upstream]
    name = _NAMES[op.get_attr("token").decode()]
    inputs = list(op.inputs)
    up = upstream[0]
    params = inputs[-1]
    static = tf.get_static_value(params)
    # Without the operator's arguments at trace time, take the general (kl) path:
    # exact for l2 as well, where the engine's hvp is zero.
    kl = static is None or int(static[1]) == REG_KL
    if name == "soft_forward":
        state = _Forward(inputs[0], *op.outputs, params, kl)
        return _vjp(state, up), None
    state = _Forward(*inputs[:4], params, kl)
    vectors = inputs[4:-1]
    if name == "soft_vjp":
        return (_hvp(state, vectors[0], up), *_NO_STATE_GRADIENT[:3], _jvp(state, up), None)
    if name == "soft_jvp":
        return (_hvp(state, up, vectors[0]), *_NO_STATE_GRADIENT[:3], _vjp(state, up), None)
    error = _unavailable_derivative(state.x, up)
    return (error, *_NO_STATE_GRADIENT[:3], error, _hvp(state, vectors[0], up), None)


def _dtype_kind(dtype: tf.DType) -> str:
    if dtype.is_bool:
        return "b"
    if dtype.is_integer:
        return "i"
    if dtype.is_complex:
        return "c"
    return "O"


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
    params = tf.constant([op, reg, descending, eps], tf.float64)
    out = _soft_op(tf.cast(moved, compute_dtype), params, reg == REG_KL)
    if not last:
        out = tf.transpose(out, np.argsort(order).tolist())
    return tf.cast(out, dtype)


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
        ``eps = inf`` the mean (l2) or log-mean-exp (kl) of each row.
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
