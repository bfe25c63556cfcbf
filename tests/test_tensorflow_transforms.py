"""softrank.tensorflow under TensorFlow's transforms: nested tapes, ForwardAccumulator
(alone, around a tape, inside a tape, nested), tf.function, jacobians, vectorized_map,
and the clear errors for what cannot work (third derivatives of kl, XLA).

Every derivative is checked against TensorFlow's own autodiff of a reference written in
plain TensorFlow ops (below; it does not import softrank) and, where it is cheap, against
central finite differences of softrank's lower-order derivative, in float64.
"""
from __future__ import annotations

import numpy as np
import pytest

from frameworks import require
from reference import soft_rank_ref, soft_sort_ref

tf = require("tensorflow")
import softrank.tensorflow as srtf  # noqa: E402

# ---------------------------------------------------------------------------
# The reference in plain TensorFlow ops.
#
# The projection onto the permutahedron through the isotonic reduction of Blondel
# et al. (2020, Prop. 3), P(z, w) = z - v(z_sorted, w_sorted), with the isotonic
# problem solved by the min-max formula v_i = min_{j<=i} max_{k>=i} val(j..k)
# (block value mean(s - w) for l2, LSE(s) - LSE(w) for kl), as reference.project_minmax
# does in mpmath. The sort is a permutation read off the values (locally constant)
# applied with tf.gather, so TensorFlow's autodiff gives exact derivatives of every
# order for generic inputs (sort order and PAV blocks locally constant). O(n^3) per
# row, eager only. Sign conventions as in reference.py (SPEC section 1).


def _sorted_desc(values):
    order = np.argsort(-values.numpy(), kind="stable")
    return tf.gather(values, order), order


def _project(z, w, regularization):
    n = int(z.shape[0])
    s, order = _sorted_desc(z)
    w_sorted, _ = _sorted_desc(w)
    val = {}
    for j in range(n):
        for k in range(j, n):
            if regularization == "l2":
                val[j, k] = tf.reduce_mean(s[j:k + 1] - w_sorted[j:k + 1])
            else:
                val[j, k] = tf.reduce_logsumexp(s[j:k + 1]) - tf.reduce_logsumexp(w_sorted[j:k + 1])
    v = tf.stack([
        tf.reduce_min(tf.stack([tf.reduce_max(tf.stack([val[j, k] for k in range(i, n)]))
                                for j in range(i + 1)]))
        for i in range(n)
    ])
    return tf.gather(s - v, np.argsort(order))


def reference_op(x, op, eps, regularization, direction):
    """soft_rank (op="rank") or soft_sort (op="sort") of a float64 (rows, n) tensor, last axis."""
    rows, n = (int(d) for d in x.shape)
    rho = tf.constant(np.arange(n, 0, -1), x.dtype)
    out = []
    for r in range(rows):
        row = x[r]
        if op == "rank":
            z = (1.0 if direction == "ascending" else -1.0) * row / eps
            if regularization == "l2":
                out.append(_project(z, rho, "l2"))
            else:
                out.append(tf.exp(_project(z, tf.math.log(rho), "kl")))
        else:
            t = 1.0 if direction == "descending" else -1.0
            out.append(t * _project(rho / eps, t * row, regularization))
    return tf.stack(out)


# ---------------------------------------------------------------------------

EPS = 0.7
CASES = [(op, reg, direction) for op in ("rank", "sort") for reg in ("l2", "kl")
         for direction in ("ascending", "descending")]
KL_CASES = [case for case in CASES if case[1] == "kl"]
L2_CASES = [case for case in CASES if case[1] == "l2"]
# Each operator and regularization once, the directions alternating (for the costlier modes).
SOME_CASES = [("rank", "l2", "ascending"), ("rank", "kl", "descending"),
              ("sort", "l2", "descending"), ("sort", "kl", "ascending")]
SOFTRANK = {"rank": srtf.soft_rank, "sort": srtf.soft_sort}


def _ours(op, reg, direction):
    return lambda x: SOFTRANK[op](x, EPS, regularization=reg, direction=direction)


def _reference(op, reg, direction):
    return lambda x: reference_op(x, op, EPS, reg, direction)


def _data(seed=0, shape=(2, 5)):
    rng = np.random.default_rng(seed)
    # x spread enough that some PAV blocks pool and some do not at eps = 0.7.
    x, w, u, v, v2 = (tf.constant(rng.normal(size=shape)) for _ in range(5))
    return x, w, u, v, v2


def _loss(y, w, u):
    # Nonlinear in y, so the cotangent depends on x and second derivatives meet the jvp too.
    return tf.reduce_sum(w * y + u * y * y)


def _close(actual, desired, rtol=1e-9, atol=1e-10):
    assert actual is not None, "a derivative came back as None"
    if desired is None:  # the reference's derivative is unconnected, i.e. zero in TensorFlow
        desired = np.zeros(actual.shape)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol=rtol, atol=atol)


def _gradient(fn, x, w, u):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = _loss(fn(x), w, u)
    return tape.gradient(loss, x)


def _reverse_over_reverse(fn, x, w, u, v):
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = _loss(fn(x), w, u)
        grad = inner.gradient(loss, x)
        directional = tf.reduce_sum(grad * v)
    return outer.gradient(directional, x)


def _forward(fn, x, v):
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
        y = fn(x)
    return acc.jvp(y)


def _forward_over_reverse(fn, x, w, u, v):
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = _loss(fn(x), w, u)
        grad = tape.gradient(loss, x)
    return acc.jvp(grad)


def _reverse_over_forward(fn, x, u, v):
    with tf.GradientTape() as tape:
        tape.watch(x)
        with tf.autodiff.ForwardAccumulator(x, v) as acc:
            y = fn(x)
        directional = tf.reduce_sum(acc.jvp(y) * u)
    return tape.gradient(directional, x)


def _third_order(fn, x, w, u, v, v2):
    with tf.GradientTape() as third:
        third.watch(x)
        hvp = _reverse_over_reverse(fn, x, w, u, v)
        directional = tf.reduce_sum(hvp * v2)
    return third.gradient(directional, x)


def _forward_over_forward(fn, x, v, v2):
    with tf.autodiff.ForwardAccumulator(x, v2) as outer:
        with tf.autodiff.ForwardAccumulator(x, v) as inner:
            y = fn(x)
        jvp = inner.jvp(y)
    return outer.jvp(jvp)


@pytest.mark.parametrize("case", CASES)
def test_reference_is_the_operator(case):
    # The plain-TF reference against the mpmath min-max reference of reference.py.
    op, reg, direction = case
    x = _data()[0]
    ref = soft_rank_ref if op == "rank" else soft_sort_ref
    want = np.stack([ref(row, EPS, reg, direction) for row in x.numpy()])
    _close(_reference(*case)(x), want, rtol=1e-12, atol=1e-12)
    _close(_ours(*case)(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_nested_tapes_second_derivative(case):
    x, w, u, v, _ = _data(1)
    hvp = _reverse_over_reverse(_ours(*case), x, w, u, v)
    _close(hvp, _reverse_over_reverse(_reference(*case), x, w, u, v))
    h = 1e-6
    fd = (_gradient(_ours(*case), x + h * v, w, u) - _gradient(_ours(*case), x - h * v, w, u)) / (2 * h)
    _close(hvp, fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", KL_CASES)
def test_kl_second_derivative_is_not_just_the_loss_curvature(case):
    # With a loss linear in the output only the operator's own curvature remains: the
    # engine's hvp. Zero for l2 (checked below), clearly nonzero for kl.
    x, w, _, v, _ = _data(2)
    zero = tf.zeros_like(x)
    hvp = _reverse_over_reverse(_ours(*case), x, w, zero, v)
    assert np.abs(hvp.numpy()).max() > 1e-3
    _close(hvp, _reverse_over_reverse(_reference(*case), x, w, zero, v))


@pytest.mark.parametrize("case", L2_CASES)
def test_l2_operator_curvature_is_a_zero_tensor(case):
    x, w, _, v, _ = _data(2)
    hvp = _reverse_over_reverse(_ours(*case), x, w, tf.zeros_like(x), v)
    assert hvp is not None
    np.testing.assert_array_equal(hvp.numpy(), np.zeros(x.shape))


@pytest.mark.parametrize("case", CASES)
def test_forward_accumulator_jvp(case):
    x, _, _, v, _ = _data(3)
    jvp = _forward(_ours(*case), x, v)
    _close(jvp, _forward(_reference(*case), x, v))
    h = 1e-6
    fd = (_ours(*case)(x + h * v) - _ours(*case)(x - h * v)) / (2 * h)
    _close(jvp, fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", SOME_CASES)
def test_forward_over_reverse_hessian_vector_product(case):
    x, w, u, v, _ = _data(4)
    _close(_forward_over_reverse(_ours(*case), x, w, u, v),
           _forward_over_reverse(_reference(*case), x, w, u, v))


@pytest.mark.parametrize("case", SOME_CASES)
def test_reverse_over_forward(case):
    x, _, u, v, _ = _data(5)
    _close(_reverse_over_forward(_ours(*case), x, u, v), _reverse_over_forward(_reference(*case), x, u, v))


@pytest.mark.parametrize("case", L2_CASES)
def test_l2_third_derivatives_are_zero_tensors(case):
    x, w, u, v, v2 = _data(6)
    third = _third_order(_ours(*case), x, w, u, v, v2)
    _close(third, _third_order(_reference(*case), x, w, u, v, v2))
    second = _forward_over_forward(_ours(*case), x, v, v2)
    _close(second, _forward_over_forward(_reference(*case), x, v, v2))


@pytest.mark.parametrize("case", KL_CASES)
def test_kl_beyond_the_engine_raises(case):
    x, w, u, v, v2 = _data(6)
    with pytest.raises(NotImplementedError, match="regularization='l2' is differentiable to any order"):
        _third_order(_ours(*case), x, w, u, v, v2)
    with pytest.raises(NotImplementedError, match="two nested ForwardAccumulators"):
        _forward_over_forward(_ours(*case), x, v, v2)


@pytest.mark.parametrize("case", [("rank", "kl", "ascending"), ("sort", "kl", "descending")])
def test_nested_tapes_inside_tf_function(case):
    x, w, u, v, _ = _data(7)
    spec = [tf.TensorSpec(x.shape, tf.float64)] * 4
    graph = tf.function(lambda x, w, u, v: _reverse_over_reverse(_ours(*case), x, w, u, v), input_signature=spec)
    _close(graph(x, w, u, v), _reverse_over_reverse(_reference(*case), x, w, u, v))


def test_forward_accumulator_inside_tf_function_raises():
    # There TensorFlow differentiates a custom gradient's forward ops instead of its
    # gradient (a silent zero for a host callback), so softrank refuses.
    x, w, u, v, _ = _data(7)
    fn = _ours("rank", "kl", "ascending")
    with pytest.raises(NotImplementedError, match="outside the tf.function"):
        tf.function(lambda x, v: _forward(fn, x, v))(x, v)
    with pytest.raises(NotImplementedError, match="outside the tf.function"):
        tf.function(lambda x, w, u, v: _forward_over_reverse(fn, x, w, u, v))(x, w, u, v)


@pytest.mark.parametrize("case", [("rank", "kl", "descending"), ("sort", "kl", "ascending")])
def test_derivatives_of_a_tf_function_from_outside(case):
    # tf.function's own backward and forward-mode functions (symbolic gradients of its graph).
    x, w, u, v, v2 = _data(8)
    graph = tf.function(_ours(*case), input_signature=[tf.TensorSpec([None, None], tf.float64)])
    reference = _reference(*case)
    _close(_reverse_over_reverse(graph, x, w, u, v), _reverse_over_reverse(reference, x, w, u, v))
    _close(_forward(graph, x, v), _forward(reference, x, v))
    _close(_forward_over_reverse(graph, x, w, u, v), _forward_over_reverse(reference, x, w, u, v))
    # A third derivative traced into a graph fails when it runs.
    with pytest.raises(tf.errors.UnimplementedError, match="regularization='l2' is differentiable to any order"):
        _third_order(graph, x, w, u, v, v2)


def test_l2_derivatives_of_a_tf_function_from_outside():
    x, w, u, v, v2 = _data(8)
    case = ("sort", "l2", "descending")
    graph = tf.function(_ours(*case), input_signature=[tf.TensorSpec([None, None], tf.float64)])
    reference = _reference(*case)
    _close(_reverse_over_reverse(graph, x, w, u, v), _reverse_over_reverse(reference, x, w, u, v))
    _close(_forward(graph, x, v), _forward(reference, x, v))
    _close(_third_order(graph, x, w, u, v, v2), _third_order(reference, x, w, u, v, v2))


def _reference_jacobian(fn, x):
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = fn(x)
    rows = []
    for i in range(int(tf.size(y))):
        basis = tf.reshape(tf.one_hot(i, int(tf.size(y)), dtype=y.dtype), y.shape)
        rows.append(tape.gradient(y, x, output_gradients=basis))
    return tf.reshape(tf.stack(rows), y.shape + x.shape)


@pytest.mark.parametrize("case", [("rank", "kl", "ascending"), ("sort", "l2", "descending")])
def test_tape_jacobian_and_batch_jacobian(case):
    x = _data(9)[0]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = _ours(*case)(x)
    jacobian = tape.jacobian(y, x)
    _close(jacobian, _reference_jacobian(_reference(*case), x))
    batch = tape.batch_jacobian(y, x)
    _close(batch, np.stack([jacobian.numpy()[r, :, r, :] for r in range(x.shape[0])]))


@pytest.mark.parametrize("case", KL_CASES[:2])
def test_hessian_by_jacobian_of_the_gradient(case):
    x, w, u, _, _ = _data(10, shape=(1, 5))
    with tf.GradientTape() as outer:
        outer.watch(x)
        grad = _gradient(_ours(*case), x, w, u)
    hessian = outer.jacobian(grad, x)
    want = [_reverse_over_reverse(_reference(*case), x, w, u, tf.reshape(tf.one_hot(i, 5, dtype=x.dtype), x.shape))
            for i in range(5)]
    _close(tf.reshape(hessian, (5, 5)), tf.reshape(tf.stack(want), (5, 5)))


def test_vectorized_map_matches_the_batched_call_and_its_gradient():
    x, w, u, _, _ = _data(11, shape=(4, 6))
    fn = _ours("rank", "kl", "descending")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        mapped = tf.vectorized_map(fn, x)
        batched = fn(x)
        mapped_loss, batched_loss = _loss(mapped, w, u), _loss(batched, w, u)
    np.testing.assert_array_equal(mapped.numpy(), batched.numpy())
    _close(tape.gradient(mapped_loss, x), tape.gradient(batched_loss, x), rtol=1e-14, atol=1e-14)


def test_per_example_gradients_in_vectorized_map_and_their_derivative():
    x, w, u, v, _ = _data(12, shape=(3, 5))
    case = ("sort", "kl", "ascending")

    def per_example(args):
        row, w_row, u_row = args
        return _gradient(lambda r: _ours(*case)(r[None])[0], row, w_row, u_row)

    with tf.GradientTape() as outer:
        outer.watch(x)
        grads = tf.vectorized_map(per_example, (x, w, u))
        directional = tf.reduce_sum(grads * v)
    _close(grads, _gradient(_reference(*case), x, w, u))
    _close(outer.gradient(directional, x), _reverse_over_reverse(_reference(*case), x, w, u, v))


def test_jit_compile_raises_naming_the_way_out():
    x = _data()[0]
    graph = tf.function(srtf.soft_rank, jit_compile=True)
    with pytest.raises(NotImplementedError, match=r"XLA \(jit_compile=True\).*jit_compile=False"):
        graph(x)

    @tf.function
    def inner(v):
        return srtf.soft_sort(v)

    # A plain tf.function traced inside a compiled one is compiled too.
    with pytest.raises(NotImplementedError, match="jit_compile=False"):
        tf.function(lambda v: inner(v) + 1.0, jit_compile=True)(x)


def test_keras_jit_compile_raises():
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(5)])

    def loss(y_true, y_pred):
        return tf.reduce_mean((srtf.soft_rank(y_pred) - y_true) ** 2, axis=-1)

    model.compile(optimizer="sgd", loss=loss, jit_compile=True)
    data = np.ones((4, 5), np.float32)
    with pytest.raises(NotImplementedError, match=r"model\.compile\(\.\.\., jit_compile=False\)"):
        model.fit(data, data, epochs=1, verbose=0)


def test_forward_accumulator_around_vectorized_map_names_the_workarounds_which_work():
    # pfor's graph sees the eager accumulator's tangents: the refusal spoke of
    # "an accumulator created inside a tf.function", which the user never made.
    x = tf.random.stateless_normal((3, 6), seed=(4, 2), dtype=tf.float64)
    tangent = tf.reshape(tf.range(18, dtype=tf.float64), (3, 6))
    with pytest.raises(NotImplementedError, match="vectorized_map"):
        with tf.autodiff.ForwardAccumulator(x, tangent):
            tf.vectorized_map(lambda r: srtf.soft_rank(r, 0.7), x)
    with tf.autodiff.ForwardAccumulator(x, tangent) as plain:
        expected = plain.jvp(srtf.soft_rank(x, 0.7))
    with tf.autodiff.ForwardAccumulator(x, tangent) as mapped:
        by_map_fn = mapped.jvp(tf.map_fn(lambda r: srtf.soft_rank(r, 0.7), x))
    with tf.autodiff.ForwardAccumulator(x, tangent) as traced:
        in_function = traced.jvp(
            tf.function(lambda z: tf.vectorized_map(lambda r: srtf.soft_rank(r, 0.7), z))(x))
    np.testing.assert_allclose(by_map_fn.numpy(), expected.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(in_function.numpy(), expected.numpy(), rtol=1e-12, atol=1e-12)
