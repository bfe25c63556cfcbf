"""softrank.tensorflow's operators on the permutahedron: permutahedron_projection,
soft_topk_mask, spearman, soft_quantile, soft_median and isotonic_regression.

Every value is checked against softrank.numpy (1e-12 in float64) and every derivative
against an independent value: softrank.numpy's pullbacks (*_with_vjp), central finite
differences of the function itself (first derivatives) or of its gradient (second
derivatives), under each TensorFlow transform (GradientTape, nested tapes,
ForwardAccumulator, tf.function with an unknown batch dimension and differentiated from
outside, vectorized_map, jacobians, Keras). The eps -> 0 limits are checked against
scipy.stats.spearmanr, np.quantile and the hard top-k indicator. XLA raises.
"""
from __future__ import annotations

import numpy as np
import pytest

import softrank.numpy as srn
from frameworks import require

tf = require("tensorflow")
import softrank.tensorflow as srtf  # noqa: E402

RNG = np.random.default_rng(20261205)


def _normal(shape, seed):
    return np.random.default_rng(seed).normal(size=shape)


def _positive(shape, seed):
    return np.random.default_rng(seed).uniform(0.3, 2.0, size=shape)


# ---------------------------------------------------------------------------
# The cases: a TensorFlow function of one differentiable input x, the numpy value and
# pullback of the same operator, and the input's shape and operator axis. Inputs are
# generic (random, spread so that some PAV blocks pool and some do not), so the sort
# orders and blocks are locally constant and finite differences are exact to O(h^2).

W_FULL = _normal((5, 3, 4), 101)
W_1D = _normal(6, 102) * 2.0
WEIGHTS = _positive((3, 6), 103)
WEIGHTS_AXIS0 = _positive((5, 3, 4), 104)
TARGET = np.random.default_rng(105).integers(0, 4, size=(3, 6)).astype(np.float64)  # ties
TARGET_AXIS0 = np.random.default_rng(106).integers(0, 3, size=(5, 3, 4))  # ints, ties
Q = [0.0, 0.3, 0.5, 0.95, 1.0]


class Case:
    def __init__(self, name, shape, axis, tf_fn, np_value, np_with_vjp):
        self.name, self.shape, self.axis = name, shape, axis
        self.tf_fn, self.np_value, self.np_with_vjp = tf_fn, np_value, np_with_vjp

    def __repr__(self):
        return self.name


def _first(vjp):
    def grad(c):
        g = vjp(c)
        return g[0] if isinstance(g, tuple) else g
    return grad


def _case(name, shape, fn, np_fn, np_with_vjp, **kwargs):
    return Case(name, shape, kwargs.get("axis", -1),
                lambda x: fn(x, **kwargs),
                lambda x: np_fn(x, **kwargs),
                lambda x: (lambda pair: (pair[0], _first(pair[1])))(np_with_vjp(x, **kwargs)))


CASES = [
    _case("projection-l2-rho", (3, 6), srtf.permutahedron_projection,
          srn.permutahedron_projection, srn.permutahedron_projection_with_vjp),
    _case("projection-kl-w-axis0", (5, 3, 4), srtf.permutahedron_projection,
          srn.permutahedron_projection, srn.permutahedron_projection_with_vjp,
          w=W_FULL, regularization="kl", axis=0),
    _case("projection-l2-w1d", (3, 6), srtf.permutahedron_projection,
          srn.permutahedron_projection, srn.permutahedron_projection_with_vjp, w=W_1D),
    _case("topk-l2", (3, 6), srtf.soft_topk_mask, srn.soft_topk_mask,
          srn.soft_topk_mask_with_vjp, k=2, eps=0.4),
    _case("topk-kl-axis0", (5, 3, 4), srtf.soft_topk_mask, srn.soft_topk_mask,
          srn.soft_topk_mask_with_vjp, k=3, eps=0.7, regularization="kl", axis=0),
    _case("spearman-l2", (3, 6), lambda x, **kw: srtf.spearman(x, TARGET, **kw),
          lambda x, **kw: srn.spearman(x, TARGET, **kw),
          lambda x, **kw: srn.spearman_with_vjp(x, TARGET, **kw), eps=0.5),
    _case("spearman-kl-axis0", (5, 3, 4), lambda x, **kw: srtf.spearman(x, TARGET_AXIS0, **kw),
          lambda x, **kw: srn.spearman(x, TARGET_AXIS0, **kw),
          lambda x, **kw: srn.spearman_with_vjp(x, TARGET_AXIS0, **kw),
          eps=0.8, regularization="kl", axis=0),
    _case("quantile-l2-vector", (3, 6), lambda x, **kw: srtf.soft_quantile(x, Q, **kw),
          lambda x, **kw: srn.soft_quantile(x, Q, **kw),
          lambda x, **kw: srn.soft_quantile_with_vjp(x, Q, **kw), eps=2.0),
    _case("quantile-kl-axis0", (5, 3, 4), lambda x, **kw: srtf.soft_quantile(x, 0.7, **kw),
          lambda x, **kw: srn.soft_quantile(x, 0.7, **kw),
          lambda x, **kw: srn.soft_quantile_with_vjp(x, 0.7, **kw),
          eps=0.6, regularization="kl", axis=0),
    _case("median-kl", (3, 6), srtf.soft_median, srn.soft_median,
          srn.soft_median_with_vjp, eps=2.0, regularization="kl"),
    _case("isotonic-l2-weights", (3, 6), srtf.isotonic_regression,
          srn.isotonic_regression, srn.isotonic_regression_with_vjp, weights=WEIGHTS),
    _case("isotonic-kl-decreasing-axis0", (5, 3, 4), srtf.isotonic_regression,
          srn.isotonic_regression, srn.isotonic_regression_with_vjp,
          weights=WEIGHTS_AXIS0, increasing=False, regularization="kl", axis=0),
    _case("isotonic-kl-unit", (3, 6), srtf.isotonic_regression,
          srn.isotonic_regression, srn.isotonic_regression_with_vjp, regularization="kl"),
]
# The cases along the last axis without per-row arguments (vectorized_map maps over the rows).
VMAP_CASES = [case for case in CASES if case.axis == -1 and case.name not in (
    "spearman-l2", "isotonic-l2-weights")]
IDS = [case.name for case in CASES]


def _x(case, seed=0):
    return _normal(case.shape, seed) * 1.5


def _cotangent_like(out, seed):
    return tf.constant(_normal(tuple(out.shape), seed), dtype=out.dtype)


def _close(actual, desired, rtol=1e-12, atol=1e-12):
    assert actual is not None, "a derivative came back as None"
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol=rtol, atol=atol)


def _loss(y, c, u):
    # Nonlinear in y, so that a second derivative meets the operator's first derivative twice.
    return tf.reduce_sum(c * y + u * y * y)


def _gradient(fn, x, c, u):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = _loss(fn(x), c, u)
    return tape.gradient(loss, x)


def _central(fn, x, v, h=1e-6):
    """Central finite difference of fn (tensor -> tensor) at x along v, in float64."""
    return (fn(x + h * v).numpy() - fn(x - h * v).numpy()) / (2 * h)


def _setup(case, seed=0):
    x = tf.constant(_x(case, seed))
    out = case.tf_fn(x)
    c = _cotangent_like(out, seed + 1)
    u = _cotangent_like(out, seed + 2) * 0.1
    v = tf.constant(_normal(case.shape, seed + 3))
    return x, out, c, u, v


# ---------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_values_equal_numpy(case):
    for seed in range(3):
        x = _x(case, seed)
        out = case.tf_fn(tf.constant(x))
        want = case.np_value(x)
        assert out.dtype == tf.float64 and tuple(out.shape) == want.shape
        _close(out, want)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float32_smoke(case):
    x = _x(case).astype(np.float32)
    out = case.tf_fn(tf.constant(x))
    assert out.dtype == tf.float32
    _close(out, case.np_value(x), rtol=2e-5, atol=2e-5)
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        y = case.tf_fn(xt)
    c = np.ones(tuple(y.shape), np.float32)
    grad = tape.gradient(y, xt, output_gradients=tf.constant(c))
    assert grad.dtype == tf.float32
    _close(grad, case.np_with_vjp(x)[1](c), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_every_operator_along_every_axis(axis, regularization):
    x = _normal((4, 5, 6), 7)
    w_full = _normal((4, 5, 6), 8)
    n = x.shape[axis]
    kw = dict(regularization=regularization, axis=axis)
    pairs = [
        (srtf.permutahedron_projection(x, **kw), srn.permutahedron_projection(x, **kw)),
        (srtf.permutahedron_projection(x, w_full, **kw), srn.permutahedron_projection(x, w_full, **kw)),
        (srtf.permutahedron_projection(x, np.arange(n) * 0.5, **kw),
         srn.permutahedron_projection(x, np.arange(n) * 0.5, **kw)),
        (srtf.soft_topk_mask(x, 2, 0.6, **kw), srn.soft_topk_mask(x, 2, 0.6, **kw)),
        (srtf.spearman(x, w_full, 0.6, **kw), srn.spearman(x, w_full, 0.6, **kw)),
        (srtf.soft_quantile(x, [0.1, 0.5], 0.6, **kw), srn.soft_quantile(x, [0.1, 0.5], 0.6, **kw)),
        (srtf.soft_median(x, 0.6, **kw), srn.soft_median(x, 0.6, **kw)),
        (srtf.isotonic_regression(x, **kw), srn.isotonic_regression(x, **kw)),
        (srtf.isotonic_regression(x, weights=np.abs(w_full) + 0.1, increasing=False, **kw),
         srn.isotonic_regression(x, weights=np.abs(w_full) + 0.1, increasing=False, **kw)),
    ]
    for ours, want in pairs:
        assert tuple(ours.shape) == want.shape
        _close(ours, want)


def test_hard_and_infinite_eps_and_integer_w_and_weights():
    x = _normal((3, 5), 9)
    for eps in (0.0, float("inf")):
        for reg in ("l2", "kl"):
            _close(srtf.soft_topk_mask(x, 2, eps, regularization=reg),
                   srn.soft_topk_mask(x, 2, eps, regularization=reg))
            _close(srtf.spearman(x, x[::-1], eps, regularization=reg),
                   srn.spearman(x, x[::-1], eps, regularization=reg))
            _close(srtf.soft_quantile(x, [0.2, 0.9], eps, regularization=reg),
                   srn.soft_quantile(x, [0.2, 0.9], eps, regularization=reg))
    w_int = np.array([3, 0, 1, 5, 2])
    _close(srtf.permutahedron_projection(x, w_int), srn.permutahedron_projection(x, w_int))
    weights = np.array([[1, 2, 3, 1, 1]] * 3)
    _close(srtf.isotonic_regression(x, weights=weights),
           srn.isotonic_regression(x, weights=weights))


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_runs_in_float32(dtype):
    x = tf.cast(tf.constant(_normal((3, 8), 10)), dtype)
    x32 = tf.cast(x, tf.float32)
    calls = [
        lambda v: srtf.permutahedron_projection(v, regularization="kl"),
        lambda v: srtf.soft_topk_mask(v, 3, 0.5),
        lambda v: srtf.spearman(v, tf.range(8.0)[None] * tf.ones((3, 1)), 0.5),
        lambda v: srtf.soft_quantile(v, [0.25, 0.5], 0.5),
        lambda v: srtf.soft_median(v, 0.5, regularization="kl"),
        lambda v: srtf.isotonic_regression(v, weights=tf.ones((3, 8), dtype)),
    ]
    for call in calls:
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = call(x)
        grad = tape.gradient(out, x)
        assert out.dtype == dtype and grad.dtype == dtype
        np.testing.assert_array_equal(out.numpy(), tf.cast(call(x32), dtype).numpy())


def test_empty_rows_and_empty_axis_like_numpy():
    for shape in ((0, 4), (3, 0), (0,)):
        x = np.zeros(shape)
        calls = [
            (lambda m, v: m.permutahedron_projection(v)),
            (lambda m, v: m.permutahedron_projection(v, regularization="kl")),
            (lambda m, v: m.soft_topk_mask(v, 0)),
            (lambda m, v: m.spearman(v, v)),
            (lambda m, v: m.isotonic_regression(v, weights=np.ones(shape))),
            (lambda m, v: m.isotonic_regression(v, regularization="kl")),
        ]
        for call in calls:
            xt = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                out = call(srtf, xt)
            grad = tape.gradient(out, xt)
            want = call(srn, x)
            assert tuple(out.shape) == want.shape and grad.shape == shape
            np.testing.assert_array_equal(out.numpy(), want)
        if shape[-1] == 0:
            with pytest.raises(ValueError, match="n = 0"):
                srtf.soft_quantile(x, 0.5)
        else:
            assert srtf.soft_quantile(x, 0.5).shape == srn.soft_quantile(x, 0.5).shape


def test_nan_rows_are_nan_and_others_are_not():
    x = _normal((3, 5), 11)
    x[1, 2] = np.nan
    for ours, want in ((srtf.permutahedron_projection(x), srn.permutahedron_projection(x)),
                       (srtf.soft_topk_mask(x, 2), srn.soft_topk_mask(x, 2)),
                       (srtf.isotonic_regression(x), srn.isotonic_regression(x))):
        np.testing.assert_array_equal(ours.numpy(), want)
        assert np.isnan(ours.numpy()[1]).all() and np.isfinite(ours.numpy()[[0, 2]]).all()


# ---------------------------------------------------------------------------
# First derivatives


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_equals_numpy_pullback(case):
    x, out, c, _, _ = _setup(case)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(case.tf_fn(x) * c)
    _, pullback = case.np_with_vjp(x.numpy())
    _close(tape.gradient(loss, x), pullback(c.numpy()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_equals_finite_differences(case):
    x, _, c, u, v = _setup(case, seed=3)
    grad = _gradient(case.tf_fn, x, c, u)
    directional = _central(lambda t: _loss(case.tf_fn(t), c, u), x, v)
    _close(tf.reduce_sum(grad * v), directional, rtol=1e-7, atol=1e-8)


def _projection_loss_parts(regularization, w_shape):
    z = tf.constant(_normal((4, 5), 20) * 1.5)
    w = tf.constant(_normal(w_shape, 21) * 1.5)
    c = tf.constant(_normal((4, 5), 22))
    return z, w, c


@pytest.mark.parametrize("regularization", ["l2", "kl"])
@pytest.mark.parametrize("w_shape", [(5,), (4, 5)], ids=["w-1d", "w-full"])
def test_projection_gradient_in_w(regularization, w_shape):
    z, w, c = _projection_loss_parts(regularization, w_shape)

    def loss(z, w):
        return tf.reduce_sum(c * srtf.permutahedron_projection(z, w, regularization=regularization))

    with tf.GradientTape() as tape:
        tape.watch([z, w])
        value = loss(z, w)
    grad_z, grad_w = tape.gradient(value, [z, w])
    assert grad_w.shape == w.shape
    _, pullback = srn.permutahedron_projection_with_vjp(z.numpy(), w.numpy(),
                                                        regularization=regularization)
    want_z, want_w = pullback(c.numpy())
    _close(grad_z, want_z)
    _close(grad_w, want_w)
    dw = tf.constant(_normal(w_shape, 23))
    _close(tf.reduce_sum(grad_w * dw), _central(lambda t: loss(z, t), w, dw), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_isotonic_gradient_in_weights(regularization):
    y = tf.constant(_normal((3, 7), 30) * 1.5)
    weights = tf.constant(_positive((3, 7), 31))
    c = tf.constant(_normal((3, 7), 32))

    def loss(y, weights):
        return tf.reduce_sum(c * srtf.isotonic_regression(y, weights=weights, axis=0,
                                                          regularization=regularization))

    with tf.GradientTape() as tape:
        tape.watch([y, weights])
        value = loss(y, weights)
    grad_y, grad_weights = tape.gradient(value, [y, weights])
    _, pullback = srn.isotonic_regression_with_vjp(y.numpy(), weights=weights.numpy(), axis=0,
                                                   regularization=regularization)
    want_y, want_weights = pullback(c.numpy())
    _close(grad_y, want_y)
    _close(grad_weights, want_weights)
    dw = tf.constant(_normal((3, 7), 33))
    _close(tf.reduce_sum(grad_weights * dw), _central(lambda t: loss(y, t), weights, dw),
           rtol=1e-7, atol=1e-8)


def test_spearman_target_gets_no_gradient():
    pred, target = tf.constant(_normal((3, 6), 34)), tf.constant(_normal((3, 6), 35))
    with tf.GradientTape() as tape:
        tape.watch([pred, target])
        value = tf.reduce_sum(srtf.spearman(pred, target, 0.5))
    grad_pred, grad_target = tape.gradient(value, [pred, target],
                                           unconnected_gradients=tf.UnconnectedGradients.ZERO)
    assert np.any(grad_pred.numpy() != 0.0)
    np.testing.assert_array_equal(grad_target.numpy(), 0.0)


# ---------------------------------------------------------------------------
# Forward mode, second derivatives, jacobians


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_accumulator_jvp(case):
    x, out, c, _, v = _setup(case, seed=5)
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
        y = case.tf_fn(x)
    jvp = acc.jvp(y)
    _close(jvp, _central(case.tf_fn, x, v), rtol=1e-7, atol=1e-8)
    # <c, J v> = <J^T c, v>, with J^T c from numpy's pullback.
    _, pullback = case.np_with_vjp(x.numpy())
    _close(tf.reduce_sum(jvp * c), np.sum(pullback(c.numpy()) * v.numpy()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nested_tapes_second_derivative(case):
    x, _, c, u, v = _setup(case, seed=7)
    with tf.GradientTape() as outer:
        outer.watch(x)
        grad = _gradient(case.tf_fn, x, c, u)
        directional = tf.reduce_sum(grad * v)
    hessian_v = outer.gradient(directional, x)
    want = _central(lambda t: _gradient(case.tf_fn, t, c, u), x, v, h=1e-5)
    _close(hessian_v, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_over_reverse_hessian_vector_product(case):
    x, _, c, u, v = _setup(case, seed=9)
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
        grad = _gradient(case.tf_fn, x, c, u)
    want = _central(lambda t: _gradient(case.tf_fn, t, c, u), x, v, h=1e-5)
    _close(acc.jvp(grad), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_mixed_second_derivatives_in_w_and_weights(regularization):
    z, w, c = _projection_loss_parts(regularization, (5,))
    v = tf.constant(_normal((4, 5), 40))

    def grad_w(z):
        with tf.GradientTape() as tape:
            tape.watch(w)
            y = srtf.permutahedron_projection(z, w, regularization=regularization)
            loss = tf.reduce_sum(c * y + 0.1 * y * y)
        return tape.gradient(loss, w)

    with tf.GradientTape() as outer:
        outer.watch(z)
        directional = tf.reduce_sum(grad_w(z) * w)
    _close(tf.reduce_sum(outer.gradient(directional, z) * v),
           np.sum(_central(grad_w, z, v, h=1e-5) * w.numpy()), rtol=1e-6, atol=1e-7)

    y = tf.constant(_normal((3, 7), 41))
    weights = tf.constant(_positive((3, 7), 42))
    dy = tf.constant(_normal((3, 7), 43))

    def grad_weights(y):
        with tf.GradientTape() as tape:
            tape.watch(weights)
            loss = tf.reduce_sum(c[:3, :1] * srtf.isotonic_regression(
                y, weights=weights, regularization=regularization))
        return tape.gradient(loss, weights)

    with tf.GradientTape() as outer:
        outer.watch(y)
        directional = tf.reduce_sum(grad_weights(y) * weights)
    _close(tf.reduce_sum(outer.gradient(directional, y) * dy),
           np.sum(_central(grad_weights, y, dy, h=1e-5) * weights.numpy()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_third_derivatives_of_the_projection_and_isotonic_regression(regularization):
    # Their derivatives are TensorFlow ops, so derivatives of any order exist (l2: zero
    # tensors, never None): the third, against central differences of the second.
    z = tf.constant(_normal((2, 5), 60) * 1.5)
    w = tf.constant(_normal((2, 5), 61))
    c, u = tf.constant(_normal((2, 5), 62)), tf.constant(_normal((2, 5), 63)) * 0.1
    v, v2 = tf.constant(_normal((2, 5), 64)), tf.constant(_normal((2, 5), 65))
    for fn in (lambda t: srtf.permutahedron_projection(t, w, regularization=regularization),
               lambda t: srtf.soft_topk_mask(t, 2, 0.8, regularization=regularization),
               lambda t: srtf.isotonic_regression(t, weights=tf.abs(w) + 0.5,
                                                  regularization=regularization)):
        def second(t):
            with tf.GradientTape() as outer:
                outer.watch(t)
                directional = tf.reduce_sum(_gradient(fn, t, c, u) * v)
            return outer.gradient(directional, t)

        with tf.GradientTape() as third:
            third.watch(z)
            directional = tf.reduce_sum(second(z) * v2)
        _close(third.gradient(directional, z), _central(second, z, v2, h=1e-4),
               rtol=1e-5, atol=1e-6)


def test_saved_model_reloads_in_a_fresh_process(tmp_path):
    from child_python import run_python


    save = """
import sys, numpy as np, tensorflow as tf
import softrank.tensorflow as srtf

def ops(x):
    return (srtf.permutahedron_projection(x, regularization="kl")
            + srtf.soft_topk_mask(x, 2, 0.5) + srtf.isotonic_regression(x, weights=x * 0 + 2.0)
            + srtf.spearman(x, x[::-1], 0.5)[:, None] + srtf.soft_quantile(x, 0.3, 0.5)[:, None])

class Module(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float64)])
    def f(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(ops(x) ** 2)
        return ops(x), tape.gradient(loss, x)

tf.saved_model.save(Module(), sys.argv[1])
"""
    load = save.split("class Module")[0] + """
x = tf.constant(np.random.default_rng(0).normal(size=(3, 5)))
loaded = tf.saved_model.load(sys.argv[1])
y, grad = loaded.f(x)
with tf.GradientTape() as tape:
    tape.watch(x)
    want = ops(x)
    loss = tf.reduce_sum(want ** 2)
np.testing.assert_allclose(y.numpy(), want.numpy(), rtol=1e-13, atol=1e-13)
np.testing.assert_allclose(grad.numpy(), tape.gradient(loss, x).numpy(), rtol=1e-13, atol=1e-13)
print("reloaded")
"""
    path = str(tmp_path / "model")
    for code in (save, load):
        proc = run_python(code, path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reloaded" in proc.stdout


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6], CASES[11]], ids=repr)
def test_tape_jacobian_equals_numpy_pullbacks(case):
    x = tf.constant(_x(case, 13))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = case.tf_fn(x)
    jacobian = tape.jacobian(y, x).numpy().reshape(int(np.prod(y.shape)), -1)
    _, pullback = case.np_with_vjp(x.numpy())
    basis = np.eye(jacobian.shape[0]).reshape((-1, *y.shape))
    want = np.stack([pullback(e).reshape(-1) for e in basis])
    _close(jacobian, want)


# ---------------------------------------------------------------------------
# tf.function, XLA


def _signature(case):
    shape = [None] * len(case.shape)
    shape[case.axis] = case.shape[case.axis]
    return [tf.TensorSpec(shape, tf.float64)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tf_function_with_unknown_batch_dimension(case):
    x, out, c, u, _ = _setup(case, seed=15)

    def value_and_grad(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            y = case.tf_fn(v)
            loss = tf.reduce_sum(c * y)
        return y, tape.gradient(loss, v)

    graph = tf.function(value_and_grad, input_signature=_signature(case))
    y, grad = graph(x)
    eager_y, eager_grad = value_and_grad(x)
    # Grappler may reorder the graph's float arithmetic: equal to rounding.
    _close(y, eager_y, rtol=1e-14, atol=1e-14)
    _close(grad, eager_grad, rtol=1e-14, atol=1e-14)
    _close(y, case.np_value(x.numpy()))
    _close(grad, case.np_with_vjp(x.numpy())[1](c.numpy()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_derivatives_of_a_tf_function_from_outside(case):
    x, _, c, u, v = _setup(case, seed=17)
    graph = tf.function(case.tf_fn, input_signature=_signature(case))
    with tf.GradientTape() as outer:
        outer.watch(x)
        grad = _gradient(graph, x, c, u)
        directional = tf.reduce_sum(grad * v)
    hessian_v = outer.gradient(directional, x)
    _close(grad, _gradient(case.tf_fn, x, c, u), rtol=1e-13, atol=1e-13)
    want = _central(lambda t: _gradient(case.tf_fn, t, c, u), x, v, h=1e-5)
    _close(hessian_v, want, rtol=1e-6, atol=1e-7)
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
        y = graph(x)
    _close(acc.jvp(y), _central(case.tf_fn, x, v), rtol=1e-7, atol=1e-8)


def test_graph_mode_weights_are_checked_when_the_graph_runs():
    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float64)] * 2)
    def graph(y, weights):
        return srtf.isotonic_regression(y, weights=weights)

    y = tf.constant(_normal((2, 4), 44))
    _close(graph(y, tf.ones((2, 4), tf.float64)), srn.isotonic_regression(y.numpy()))
    with pytest.raises(tf.errors.InvalidArgumentError, match="weights must be finite and > 0"):
        graph(y, tf.constant([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], tf.float64))


def test_quantiles_must_be_known_when_the_graph_is_built():
    @tf.function(input_signature=[tf.TensorSpec([3], tf.float64)])
    def traced_q(q):
        return srtf.soft_quantile(tf.ones((2, 5), tf.float64), q)

    with pytest.raises(TypeError, match="q must be known when the graph is built"):
        traced_q(tf.constant([0.1, 0.5, 0.9], tf.float64))

    @tf.function
    def constant_q(x):
        return srtf.soft_quantile(x, tf.constant([0.1, 0.9], tf.float64), 0.2)

    x = _normal((2, 5), 45)
    _close(constant_q(tf.constant(x)), srn.soft_quantile(x, [0.1, 0.9], 0.2))


def test_unknown_length_along_the_axis_raises():
    @tf.function(input_signature=[tf.TensorSpec([2, None], tf.float64)])
    def graph(x):
        return srtf.soft_topk_mask(x, 1)

    with pytest.raises(ValueError, match="statically known length n along the axis"):
        graph(tf.ones((2, 3), tf.float64))

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float64)])
    def isotonic(y):  # needs no static n
        return srtf.isotonic_regression(y)

    y = _normal((2, 5), 46)
    _close(isotonic(tf.constant(y)), srn.isotonic_regression(y))


PUBLIC = {
    "permutahedron_projection": lambda x: srtf.permutahedron_projection(x, x),
    "soft_topk_mask": lambda x: srtf.soft_topk_mask(x, 2),
    "spearman": lambda x: srtf.spearman(x, x),
    "soft_quantile": lambda x: srtf.soft_quantile(x, [0.5]),
    "soft_median": srtf.soft_median,
    "isotonic_regression": lambda x: srtf.isotonic_regression(x, weights=x * 0.0 + 1.0),
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_jit_compile_raises_naming_the_way_out(name):
    graph = tf.function(PUBLIC[name], jit_compile=True)
    with pytest.raises(NotImplementedError, match=r"XLA \(jit_compile=True\).*jit_compile=False"):
        graph(tf.ones((2, 4)))


def test_forward_accumulator_inside_tf_function_raises():
    @tf.function
    def graph(x, v):
        with tf.autodiff.ForwardAccumulator(x, v) as acc:
            y = srtf.isotonic_regression(x, regularization="kl")
        return acc.jvp(y)

    with pytest.raises(NotImplementedError, match="ForwardAccumulator created inside a tf.function"):
        graph(tf.ones((2, 4)), tf.ones((2, 4)))


# ---------------------------------------------------------------------------
# vectorized_map, Keras


@pytest.mark.parametrize("case", VMAP_CASES, ids=repr)
def test_vectorized_map_matches_rows_and_its_gradient_from_outside(case):
    x, _, _, _, _ = _setup(case, seed=19)
    rows = x.shape[0]
    per_row = [case.tf_fn(x[i]) for i in range(rows)]
    c = tf.constant(_normal((rows, *per_row[0].shape), 47))
    with tf.GradientTape() as tape:
        tape.watch(x)
        mapped = tf.vectorized_map(case.tf_fn, x)
        loss = tf.reduce_sum(c * mapped)
    grad = tape.gradient(loss, x)
    np.testing.assert_array_equal(mapped.numpy(), tf.stack(per_row).numpy())
    want = np.stack([case.np_with_vjp(x.numpy()[i])[1](c.numpy()[i]) for i in range(rows)])
    _close(grad, want)


@pytest.mark.parametrize("case", [c for c in VMAP_CASES if "kl" in c.name], ids=repr)
def test_per_example_gradients_in_vectorized_map_and_their_derivative(case):
    x, _, _, _, v = _setup(case, seed=21)
    rows = x.shape[0]
    out_shape = tuple(case.tf_fn(x[0]).shape)
    c = tf.constant(_normal((rows, *out_shape), 48))
    u = tf.constant(_normal((rows, *out_shape), 49)) * 0.1

    def per_example(args):
        row, c_row, u_row = args
        return _gradient(case.tf_fn, row, c_row, u_row)

    with tf.GradientTape() as outer:
        outer.watch(x)
        grads = tf.vectorized_map(per_example, (x, c, u))
        directional = tf.reduce_sum(grads * v)
    want = np.stack([_gradient(case.tf_fn, x[i], c[i], u[i]).numpy() for i in range(rows)])
    _close(grads, want, rtol=1e-13, atol=1e-13)

    def all_grads(t):
        return tf.stack([_gradient(case.tf_fn, t[i], c[i], u[i]) for i in range(rows)])

    _close(outer.gradient(directional, x), _central(all_grads, x, v, h=1e-5), rtol=1e-6, atol=1e-7)


def test_vectorized_map_with_per_row_target_and_weights():
    x = tf.constant(_normal((4, 6), 54))
    target = tf.constant(np.random.default_rng(55).integers(0, 3, size=(4, 6)).astype(np.float64))
    weights = tf.constant(_positive((4, 6), 56))
    c = tf.constant(_normal((4, 6), 57))
    with tf.GradientTape() as tape:
        tape.watch([x, weights])
        corr = tf.vectorized_map(lambda a: srtf.spearman(a[0], a[1], 0.5), (x, target))
        fitted = tf.vectorized_map(
            lambda a: srtf.isotonic_regression(a[0], weights=a[1], regularization="kl"),
            (x, weights))
        loss = tf.reduce_sum(corr * c[:, 0]) + tf.reduce_sum(fitted * c)
    grad_x, grad_weights = tape.gradient(loss, [x, weights])
    _close(corr, srn.spearman(x.numpy(), target.numpy(), 0.5))
    _close(fitted, srn.isotonic_regression(x.numpy(), weights=weights.numpy(), regularization="kl"))
    _, spearman_pullback = srn.spearman_with_vjp(x.numpy(), target.numpy(), 0.5)
    _, isotonic_pullback = srn.isotonic_regression_with_vjp(x.numpy(), weights=weights.numpy(),
                                                            regularization="kl")
    want_x, want_weights = isotonic_pullback(c.numpy())
    _close(grad_x, want_x + spearman_pullback(c.numpy()[:, 0]))
    _close(grad_weights, want_weights)


def test_keras_spearman_loss_trains_and_its_gradient_is_the_numpy_one():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(8)
    features = rng.normal(size=(32, 6)).astype(np.float32)
    targets = (features @ rng.normal(size=(6, 8))).astype(np.float32)

    def loss(y_true, y_pred):
        return 1.0 - srtf.spearman(y_pred, y_true, 0.5)

    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8)])
    # The loss's gradient in the model's predictions equals numpy's pullback.
    with tf.GradientTape() as tape:
        pred = model(features)
        value = tf.reduce_mean(loss(targets, pred))
    grad = tape.gradient(value, pred)
    _, pullback = srn.spearman_with_vjp(pred.numpy(), targets, 0.5)
    _close(grad, pullback(np.full(32, -1.0 / 32, np.float32)), rtol=1e-4, atol=1e-6)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss, jit_compile=False)
    before = model.evaluate(features, targets, verbose=0)
    model.fit(features, targets, epochs=2, batch_size=32, verbose=0)
    after = model.evaluate(features, targets, verbose=0)
    assert np.isfinite(after) and after < before


# ---------------------------------------------------------------------------
# eps -> 0 limits


def test_spearman_tends_to_scipy():
    stats = pytest.importorskip("scipy.stats")
    pred = _normal((6, 9), 50)
    target = np.random.default_rng(51).integers(0, 4, size=(6, 9)).astype(np.float64)  # ties
    want = np.array([stats.spearmanr(p, t).statistic for p, t in zip(pred, target)])
    for reg in ("l2", "kl"):
        _close(srtf.spearman(pred, target, 0.0, regularization=reg), want)
        _close(srtf.spearman(pred, target, 1e-6, regularization=reg), want, rtol=1e-9, atol=1e-9)
    _close(srtf.spearman(pred.T, target.T, 1e-6, axis=0), want, rtol=1e-9, atol=1e-9)


def test_soft_quantile_tends_to_np_quantile_with_its_layout():
    x = _normal((4, 7, 3), 52)
    for q in (0.37, [0.0, 0.25, 0.5, 0.9, 1.0], np.array(0.5)):
        for axis in (0, 1, -1):
            want = np.quantile(x, q, axis=axis, method="linear")
            for reg in ("l2", "kl"):
                ours = srtf.soft_quantile(x, q, 1e-7, regularization=reg, axis=axis)
                assert tuple(ours.shape) == want.shape
                _close(ours, want, rtol=1e-9, atol=1e-9)
                _close(srtf.soft_quantile(x, q, 0.0, regularization=reg, axis=axis), want)
    _close(srtf.soft_median(x, 1e-7, axis=1), np.median(x, axis=1), rtol=1e-9, atol=1e-9)


def test_soft_topk_mask_tends_to_the_hard_indicator_with_ties_sharing():
    x = np.array([[0.5, 2.0, -1.0, 2.0, 0.1], [3.0, 1.0, 1.0, 1.0, -2.0]])
    # k = 2: row 0 picks the tied pair; k = 2 in row 1: 3.0 and the three tied 1.0 share 1.
    want = np.array([[0.0, 1.0, 0.0, 1.0, 0.0], [1.0, 1 / 3, 1 / 3, 1 / 3, 0.0]])
    for reg in ("l2", "kl"):
        _close(srtf.soft_topk_mask(x, 2, 0.0, regularization=reg), want)
        _close(srtf.soft_topk_mask(x, 2, 1e-9, regularization=reg), want, rtol=1e-9, atol=1e-9)
    generic = _normal((5, 8), 53)
    for k in range(9):
        hard = (generic >= np.sort(generic, axis=-1)[:, ::-1][:, max(k - 1, 0)][:, None]) * (k > 0)
        for reg in ("l2", "kl") if k > 0 else ("l2",):
            _close(srtf.soft_topk_mask(generic, k, 1e-9, regularization=reg), hard,
                   rtol=1e-9, atol=1e-9)
            soft = srtf.soft_topk_mask(generic, k, 0.8, regularization=reg).numpy()
            assert np.all(soft >= -1e-15) and np.all(soft <= 1 + 1e-15)
            _close(soft.sum(-1), np.full(5, float(k)))


# ---------------------------------------------------------------------------
# Bad arguments


def test_bad_arguments_name_themselves():
    x = tf.ones((3, 4))
    with pytest.raises(ValueError, match=r"k must lie in \[0, n\] = \[0, 4\]"):
        srtf.soft_topk_mask(x, 5)
    with pytest.raises(ValueError, match="k must lie"):
        srtf.soft_topk_mask(x, -1)
    with pytest.raises(TypeError, match="k must be an int"):
        srtf.soft_topk_mask(x, 1.5)
    with pytest.raises(ValueError, match="regularization='kl' needs k >= 1"):
        srtf.soft_topk_mask(x, 0, regularization="kl")
    for q in (1.5, -0.1, [0.2, float("nan")]):
        with pytest.raises(ValueError, match=r"q must lie in \[0, 1\]"):
            srtf.soft_quantile(x, q)
    with pytest.raises(ValueError, match="q must be a scalar or 1-D"):
        srtf.soft_quantile(x, [[0.5]])
    for w in (tf.ones(3), tf.ones((4, 3)), tf.ones((3, 4, 1))):
        with pytest.raises(ValueError, match=r"w must have length n = 4"):
            srtf.permutahedron_projection(x, w)
    with pytest.raises(TypeError, match="w must have a real floating dtype"):
        srtf.permutahedron_projection(x, tf.ones(4, tf.complex64))
    for weights in (tf.zeros((3, 4)), -tf.ones((3, 4)), tf.fill((3, 4), float("inf")),
                    tf.fill((3, 4), float("nan"))):
        with pytest.raises(ValueError, match="weights must be finite and > 0"):
            srtf.isotonic_regression(x, weights=weights)
    with pytest.raises(ValueError,
                       match=r"weights must stay > 0 in float32 \(the compute dtype; they underflow\)"):
        srtf.isotonic_regression(x, weights=tf.fill((3, 4), tf.constant(1e-300, tf.float64)))
    # subnormal float32 weights: TensorFlow's threads read them as 0 (as XLA's)
    with pytest.raises(ValueError,
                       match=r"weights must stay > 0 in float32 \(the compute dtype; they underflow\)"):
        srtf.isotonic_regression(x, weights=tf.fill((3, 4), tf.constant(1e-40, tf.float32)))
    with pytest.raises(ValueError, match="weights must have the shape of y"):
        srtf.isotonic_regression(x, weights=tf.ones(4))
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        srtf.spearman(x, tf.ones((4, 3)))
    with pytest.raises(ValueError, match="eps"):
        srtf.spearman(x, x, -1.0)
    with pytest.raises(ValueError, match="regularization"):
        srtf.soft_median(x, regularization="l1")
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        srtf.isotonic_regression(x, axis=2)
    with pytest.raises(TypeError, match="^z must have a floating dtype"):
        srtf.permutahedron_projection(tf.ones(4, tf.int32))
    with pytest.raises(TypeError, match="^pred must have a floating dtype"):
        srtf.spearman(tf.ones(4, tf.int32), tf.ones(4, tf.int32))
    with pytest.raises(ValueError, match="y must have at least one dimension"):
        srtf.isotonic_regression(tf.constant(1.0))


def test_public_names_and_literal_signatures():
    import typing

    from softrank._types import Regularization

    for name in PUBLIC:
        assert name in srtf.__all__
        hints = typing.get_type_hints(getattr(srtf, name))
        assert hints["regularization"] == Regularization


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_top_k_derivatives_where_x_over_eps_overflows(reg):
    """|x| / eps beyond the float range (eps = 1e-300) with finite masks: the
    eager and graph gradients and the forward-mode tangent equal
    softrank.numpy's (tested there against the closed form), no NaN."""
    c = np.array([[1.0, -2.0, 0.5, 3.0]])
    for rows, k in (([[3e9, 1e9, 2e9, 5.0]], 2), ([[1e10, 1e10, -1e10, 0.0]], 1)):
        x = tf.constant(rows, tf.float64)
        _, vjp = srn.soft_topk_mask_with_vjp(np.array(rows), k, 1e-300, regularization=reg)
        want = vjp(c)

        def gradient(x, k=k):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = tf.reduce_sum(c * srtf.soft_topk_mask(x, k, 1e-300, regularization=reg))
            return tape.gradient(y, x)

        np.testing.assert_array_equal(gradient(x).numpy(), want)
        np.testing.assert_array_equal(tf.function(gradient)(x).numpy(), want)
        with tf.autodiff.ForwardAccumulator(x, tf.constant(c)) as acc:
            mask = srtf.soft_topk_mask(x, k, 1e-300, regularization=reg)
        np.testing.assert_array_equal(acc.jvp(mask).numpy(), want)  # (a symmetric Jacobian)


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("dtype, eps", [(tf.float64, 1e-300), (tf.float64, 5e-324),
                                        (tf.float64, 1e-3), (tf.float32, 1e-30),
                                        (tf.float32, 1e-40)])
def test_top_k_gradient_in_vectorized_map_where_x_over_eps_overflows(reg, dtype, eps):
    """Under vectorized_map the gradient of pfor's copy of the op reads eps as a
    tensor. Where |x| / eps overflows it equals the eager gradient of each row:
    no NaN from inf - inf at a block's head (kl), nor 0 * inf where 1 / eps
    overflows (float64's subnormal eps, read as 0 by TensorFlow's kernels; float32
    below 3e-39), and +-inf where a pooled block's derivative is beyond the range."""
    x = tf.constant([[1e12, 0.5, -3.0, 2.0], [1.0, 1.0, 1.0, -1.0], [0.3, -0.2, 0.1, 0.05],
                     [-1e12, 1e12, 0.25, 0.25]], dtype)
    c = tf.constant(_normal(x.shape, 58), dtype)
    for k in (1, 2):
        def mask(row, k=k):
            return srtf.soft_topk_mask(row, k, eps, regularization=reg)

        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(c * tf.vectorized_map(mask, x))
        grad = tape.gradient(loss, x).numpy()
        want = []
        for i in range(x.shape[0]):
            row = x[i]
            with tf.GradientTape() as tape:
                tape.watch(row)
                loss = tf.reduce_sum(c[i] * mask(row))
            want.append(tape.gradient(loss, row).numpy())
        assert not np.isnan(grad).any()
        np.testing.assert_array_equal(grad, np.stack(want))


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("dtype, eps", [(tf.float64, 5e-324), (tf.float64, 1e-310),
                                        (tf.float64, 1e-300), (tf.float64, 1e-3),
                                        (tf.float32, 1e-40), (tf.float32, 1e-30)])
def test_graph_gradients_at_a_python_float_eps_equal_the_eager_ones(reg, dtype, eps):
    """eps a Python float: where 1 / eps overflows, the gradient scales by two finite
    constants (_derivatives._split_scale), which grappler folded into one, inf, so
    a singleton block's exact 0 gave NaN under tf.function and in per-example
    gradients under vectorized_map, not eagerly. Each graph gradient (and pfor's
    batch_jacobian) equals the eager gradients of the rows, bitwise; soft_rank and
    soft_sort (the engine's derivatives) alongside."""
    x = tf.constant([[1e12, 0.5, -3.0, 2.0], [1.0, 1.0, 1.0, -1.0], [0.3, -0.2, 0.1, 0.3],
                     [3.0, 1.0, 3.0, -2.0], [-1e12, 1e12, 0.25, 0.25]], dtype)
    c = tf.constant(_normal(x.shape, 59), dtype)
    operators = [lambda v, k=k: srtf.soft_topk_mask(v, k, eps, regularization=reg)
                 for k in (1, 2)]
    operators += [lambda v: srtf.soft_rank(v, eps, regularization=reg),
                  lambda v: srtf.soft_sort(v, eps, regularization=reg)]
    for op in operators:
        def gradient(v, c_v, op=op):
            with tf.GradientTape() as tape:
                tape.watch(v)
                loss = tf.reduce_sum(c_v * op(v))
            return tape.gradient(loss, v)

        rows = [gradient(x[i], c[i]).numpy() for i in range(x.shape[0])]
        jacobians = [np.stack([gradient(x[i], tf.one_hot(j, x.shape[1], dtype=dtype)).numpy()
                               for j in range(x.shape[1])]) for i in range(x.shape[0])]
        graph = tf.function(gradient)
        np.testing.assert_array_equal(graph(x, c).numpy(), np.stack(rows))
        for i in range(x.shape[0]):
            np.testing.assert_array_equal(graph(x[i], c[i]).numpy(), rows[i])
        per_example = tf.vectorized_map(lambda pair: gradient(*pair), (x, c))  # (a graph too)
        np.testing.assert_array_equal(per_example.numpy(), np.stack(rows))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.vectorized_map(op, x)
        np.testing.assert_array_equal(tape.batch_jacobian(y, x).numpy(), np.stack(jacobians))


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("dtype, eps", [(tf.float64, 5e-324), (tf.float64, 1e-310),
                                        (tf.float64, 1e-300), (tf.float32, 1e-40),
                                        (tf.float32, 1e-30)])
def test_forward_mode_top_k_at_a_tiny_eps_is_the_tie_blocks_centred_tangent(reg, dtype, eps):
    """ForwardAccumulator builds a jvp by transposing the vjp. Where 1 / eps
    overflows, the vjp had applied both of _split_scale's factors after the
    block centring, so its transpose applied them before it: inf - inf = NaN in
    every pooled block, and at singletons too (eagerly as well as in graphs).

    As eps -> 0 the only pooled blocks are the exact ties that straddle the
    k-th place. Within one, the l2 tangent of entry i is ``(t_i - mean_block t)
    / eps``; kl's mask is ``exp`` of a projection whose softmax over tied values
    is uniform, so its tangent is that times the mask's value there. Where
    ``1 / eps`` overflows: +-inf in float64, and float32's documented saturated
    factor 2^126 (_split_scale). Exactly 0 for equal tangents and outside such
    ties. Eagerly and through tf.function."""
    x = np.array([[0.7, -1.2, 2.5, 0.1],     # distinct: all singletons
                  [1.0, 1.0, 1.0, -1.0],     # a tie across the boundary (k = 1, 2)
                  [3.0, 1.0, 3.0, -2.0],     # k = 1: a tie across it, equal tangents
                  [-5.0, 0.25, 0.25, 0.25]])  # the three largest tied (k = 1, 2)
    t = np.array([[1.0, 0.5, -0.25, 2.0], [1.0, 0.5, -0.25, 2.0],
                  [1.0, 2.0, 1.0, 0.0], [3.0, -1.0, 0.5, 1.0]])
    ties = [[], [0, 1, 2], [0, 2], [1, 2, 3]]  # the pooled block of each row
    with np.errstate(over="ignore"):
        inverse = np.float64(1.0 / dtype.as_numpy_dtype(eps))  # inf where it overflows dtype
    if dtype == tf.float32:
        inverse = min(inverse, 2.0**126)
    for k in (1, 2):
        expected = np.zeros_like(x)
        for row, block in enumerate(ties):
            if k == 2 and row == 2:
                continue  # the tie sits on two ones of w: no block straddles the boundary
            centred = t[row, block] - t[row, block].mean()
            if reg == "kl":
                centred = centred * min(k, len(block)) / len(block)  # the mask's value
            expected[row, block] = [0.0 if c == 0.0 else c * inverse for c in centred]
        op = lambda v, k=k: srtf.soft_topk_mask(v, k, eps, regularization=reg)  # noqa: E731
        for f in (op, tf.function(op)):
            primal = tf.constant(x, dtype)
            with tf.autodiff.ForwardAccumulator(primal, tf.constant(t, dtype)) as accumulator:
                out = f(primal)
            jvp = accumulator.jvp(out).numpy().astype(np.float64)
            assert not np.isnan(jvp).any(), (k, f, jvp)
            np.testing.assert_array_equal(np.isinf(jvp), np.isinf(expected))
            np.testing.assert_allclose(jvp, expected, rtol=1e-5 if dtype == tf.float32 else 1e-12,
                                       atol=0.0)


def test_isotonic_increasing_and_weights_beyond_float32_are_refused():
    y = tf.constant([[1.0, 3.0, 2.0, 4.0]])
    for bad in ("decreasing", None, 0):
        with pytest.raises(TypeError, match="increasing must be True or False"):
            srtf.isotonic_regression(y, increasing=bad)
    for weights, message in ((1e300, "weights must stay finite in float32"),
                             (1e-50, r"weights must stay > 0 in float32")):
        with pytest.raises(ValueError, match=message):
            srtf.isotonic_regression(y, weights=tf.fill([1, 4], tf.constant(weights, tf.float64)))


RAGGED_SPARSE_CALLS = [
    ("x", lambda v: srtf.soft_rank(v, 0.5)),
    ("x", lambda v: srtf.soft_sort(v, 0.5)),
    ("x", lambda v: srtf.soft_topk_mask(v, 1, 0.5)),
    ("x", lambda v: srtf.soft_quantile(v, 0.5, 0.5)),
    ("x", lambda v: srtf.soft_median(v, 0.5)),
    ("pred", lambda v: srtf.spearman(v, tf.ones((2, 3)), 0.5)),
    ("target", lambda v: srtf.spearman(tf.ones((2, 3)), v, 0.5)),
    ("y", srtf.isotonic_regression),
    ("weights", lambda v: srtf.isotonic_regression(tf.ones((2, 3)), weights=v)),
    ("z", srtf.permutahedron_projection),
    ("w", lambda v: srtf.permutahedron_projection(tf.ones((2, 3)), v)),
]


@pytest.mark.parametrize("name, call", RAGGED_SPARSE_CALLS)
def test_ragged_and_sparse_tensors_are_refused_by_name(name, call):
    """Their conversion errors named neither the argument nor the problem
    ("object of type 'RaggedTensor' has no len()", "Attempt to convert a
    value (SparseTensor(...))"), eagerly and inside tf.function."""
    ragged = tf.ragged.constant([[1.0, 2.0, 3.0], [4.0, 5.0]])
    sparse = tf.sparse.from_dense(tf.constant([[1.0, 0.0, 3.0], [0.0, 5.0, 6.0]]))
    for value, kind in ((ragged, "RaggedTensor"), (sparse, "SparseTensor")):
        with pytest.raises(TypeError, match=rf"^{name} is a tf\.{kind}"):
            call(value)
    with pytest.raises(TypeError, match=rf"{name} is a tf\.RaggedTensor"):
        tf.function(call)(ragged)
