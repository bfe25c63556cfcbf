"""softrank.tensorflow: eagerly and in tf.function, any axis, dtypes, a Keras loss,
errors, the ImportError without TensorFlow, the Literal signatures. Derivatives under
TensorFlow's transforms are in test_tensorflow_transforms.py, saved models in
test_tensorflow_export.py.

Agreement with softrank.numpy over ops, regularizations, directions, shapes and
axes is in test_cross_adapter.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import softrank.numpy as srn
from frameworks import require

tf = require("tensorflow")
import softrank.tensorflow as srtf  # noqa: E402

OPS = {"rank": (srtf.soft_rank, srn.soft_rank, srn.soft_rank_vjp),
       "sort": (srtf.soft_sort, srn.soft_sort, srn.soft_sort_vjp)}


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _value_and_grad(forward, x, weights, **kwargs):
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = forward(x, **kwargs)
        loss = tf.reduce_sum(tf.cast(out, weights.dtype) * weights)
    return out, tape.gradient(loss, x)


@pytest.mark.parametrize("op", sorted(OPS))
def test_tf_function_graph_mode_matches_eager_and_numpy(op):
    forward, numpy_forward, numpy_vjp = OPS[op]
    x = _x((5, 4, 7), seed=1, dtype=np.float64)
    weights = tf.constant(_x((5, 4, 7), seed=2, dtype=np.float64))
    kwargs = dict(eps=0.6, regularization="kl", direction="descending", axis=1)

    @tf.function(input_signature=[tf.TensorSpec([None, 4, None], tf.float64)])
    def graph(v):
        return _value_and_grad(forward, v, weights, **kwargs)

    out, grad = graph(tf.constant(x))
    assert out.shape == x.shape and grad.shape == x.shape
    eager_out, eager_grad = _value_and_grad(forward, tf.constant(x), weights, **kwargs)
    np.testing.assert_array_equal(out.numpy(), eager_out.numpy())
    np.testing.assert_array_equal(grad.numpy(), eager_grad.numpy())
    np.testing.assert_allclose(out.numpy(), numpy_forward(x, **kwargs), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), numpy_vjp(x, weights.numpy(), **kwargs), rtol=1e-12, atol=1e-12)


def test_static_shape_is_kept_in_graph_mode():
    @tf.function
    def graph(v):
        out = srtf.soft_rank(v, axis=0)
        assert out.shape.as_list() == [3, 8]
        return out

    graph(tf.constant(_x((3, 8), seed=3)))


def test_any_axis():
    x = _x((2, 3, 4, 5), seed=4)
    for axis in range(-4, 4):
        for op in OPS:
            forward, numpy_forward, _ = OPS[op]
            np.testing.assert_allclose(forward(x, 0.3, axis=axis).numpy(), numpy_forward(x, 0.3, axis=axis),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_runs_in_float32(dtype):
    x = tf.cast(tf.constant(_x((3, 12), seed=5)), dtype)
    weights = tf.constant(_x((3, 12), seed=6))
    for op in OPS:
        forward = OPS[op][0]
        out, grad = _value_and_grad(forward, x, weights, eps=0.5, axis=0)
        assert out.dtype == dtype and grad.dtype == dtype
        want = tf.cast(forward(tf.cast(x, tf.float32), 0.5, axis=0), dtype)
        np.testing.assert_array_equal(out.numpy(), want.numpy())


def test_keras_loss_trains():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)

    def spearman_loss(y_true, y_pred):
        # y_true, y_pred: (batch, n); correlate soft ranks of the prediction with the target's ranks.
        pred = srtf.soft_rank(y_pred, 0.5)
        true = srtf.soft_rank(y_true, 0.0)
        pred = pred - tf.reduce_mean(pred, axis=-1, keepdims=True)
        true = true - tf.reduce_mean(true, axis=-1, keepdims=True)
        corr = tf.reduce_sum(pred * true, -1) / (tf.norm(pred, axis=-1) * tf.norm(true, axis=-1))
        return 1.0 - corr

    rng = np.random.default_rng(7)
    features = rng.normal(size=(64, 10)).astype(np.float32)
    targets = (features @ rng.normal(size=(10, 10))).astype(np.float32)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=spearman_loss, jit_compile=False)
    history = model.fit(features, targets, epochs=5, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_empty_single_and_nan_rows():
    for shape in ((0,), (3, 0), (0, 4), (2, 1)):
        x = tf.ones(shape)
        for op in OPS:
            out, grad = _value_and_grad(OPS[op][0], x, tf.ones(shape))
            assert out.shape == shape and grad.shape == shape
    x = _x((3, 5), seed=8)
    x[1, 0] = np.nan
    out = srtf.soft_rank(x).numpy()
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64, tf.uint8, tf.bool])
def test_integer_and_bool_raise(dtype):
    with pytest.raises(TypeError, match=r"^x must have a floating dtype"):
        srtf.soft_rank(tf.zeros(4, dtype))


def test_integer_message_has_no_torch_idiom_and_a_huge_int_eps_is_the_limit():
    with pytest.raises(TypeError, match="x must have a floating dtype") as info:
        srtf.soft_rank(tf.constant([1, 2, 3]))
    assert "x.float()" not in str(info.value)
    x = tf.constant(_x((2, 5), seed=16, dtype=np.float64))
    # 10**400 overflows a float: the eps = inf limit, (n + 1) / 2 for the ranks.
    np.testing.assert_array_equal(srtf.soft_rank(x, 10**400).numpy(), np.full((2, 5), 3.0))
    np.testing.assert_array_equal(srtf.soft_sort(x, 10**400).numpy(), srtf.soft_sort(x, np.inf).numpy())


def test_complex_raises():
    with pytest.raises(TypeError, match=r"^x must have a real floating dtype"):
        srtf.soft_sort(tf.zeros(4, tf.complex64))


def test_bad_arguments_name_themselves():
    x = tf.ones((3, 4))
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        srtf.soft_rank(tf.constant(1.0))
    for eps, error in ((-1.0, ValueError), (float("nan"), ValueError), ("a", TypeError)):
        with pytest.raises(error, match="eps"):
            srtf.soft_rank(x, eps)
    with pytest.raises(ValueError, match="regularization"):
        srtf.soft_rank(x, regularization="l1")
    with pytest.raises(ValueError, match="direction"):
        srtf.soft_sort(x, direction="up")
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        srtf.soft_rank(x, axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        srtf.soft_rank(x, axis=0.0)


# Every public function with an eps, and how to call it with that eps.
WITH_EPS = {
    "soft_rank": lambda x, eps: srtf.soft_rank(x, eps),
    "soft_sort": lambda x, eps: srtf.soft_sort(x, eps, regularization="kl"),
    "soft_topk_mask": lambda x, eps: srtf.soft_topk_mask(x, 2, eps),
    "spearman": lambda x, eps: srtf.spearman(x, x[::-1], eps),
    "soft_quantile": lambda x, eps: srtf.soft_quantile(x, [0.2, 0.7], eps),
    "soft_median": lambda x, eps: srtf.soft_median(x, eps),
}


@pytest.mark.parametrize("name", sorted(WITH_EPS))
def test_eps_must_be_static_and_is_named(name):
    # eps is a constant of the computation (as in softrank.jax): a derivative with
    # respect to it would silently be None, so a variable, a traced tensor and a watched
    # tensor are refused naming eps; a tensor whose value is known is taken as a number.
    fn = WITH_EPS[name]
    x = tf.constant(_x((3, 5), seed=11, dtype=np.float64))
    want = fn(x, 0.5).numpy()
    np.testing.assert_array_equal(fn(x, tf.constant(0.5, tf.float64)).numpy(), want)
    np.testing.assert_array_equal(fn(x, np.float64(0.5)).numpy(), want)
    # (a graph may round the last bit differently from eager execution)
    np.testing.assert_allclose(
        tf.function(lambda t: fn(t, tf.constant(0.5, tf.float64)))(x).numpy(), want,
        rtol=1e-14, atol=1e-15)

    variable = tf.Variable(0.5, dtype=tf.float64)
    refused = r"eps must be a static Python number.*derivatives with respect to eps are not supported"
    with pytest.raises(TypeError, match=refused):
        fn(x, variable)
    with pytest.raises(TypeError, match=refused):
        tf.function(lambda t: fn(t, variable))(x)
    with pytest.raises(TypeError, match="eps must be known when the graph is built"):
        tf.function(fn)(x, tf.constant(0.5, tf.float64))
    eps = tf.constant(0.5, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(eps)
        with pytest.raises(TypeError, match="eps .*watches: derivatives with respect to eps"):
            fn(x, eps)


def test_keras_variable_eps_is_refused():
    keras = pytest.importorskip("keras")
    with pytest.raises(TypeError, match="eps must be a static Python number"):
        srtf.soft_rank(tf.ones((2, 3)), keras.Variable(0.5))


def test_k_and_q_take_known_tensors_and_refuse_the_others():
    x = tf.constant(_x((3, 5), seed=12, dtype=np.float64))
    want = srtf.soft_topk_mask(x, 2, 0.5).numpy()
    np.testing.assert_allclose(want, srn.soft_topk_mask(x.numpy(), 2, 0.5), rtol=1e-12, atol=1e-12)
    for k in (tf.constant(2), tf.constant(2, tf.int64), np.int32(2)):
        np.testing.assert_array_equal(srtf.soft_topk_mask(x, k, 0.5).numpy(), want)
    np.testing.assert_array_equal(
        tf.function(lambda t: srtf.soft_topk_mask(t, tf.constant(2), 0.5))(x).numpy(), want)
    with pytest.raises(TypeError, match="k must be known when the graph is built"):
        tf.function(lambda t, k: srtf.soft_topk_mask(t, k))(x, tf.constant(2))
    with pytest.raises(TypeError, match="k must be a static int.*derivatives with respect to k"):
        srtf.soft_topk_mask(x, tf.Variable(2))
    for k in (tf.constant(2.0), tf.constant(True)):
        with pytest.raises(TypeError, match="k must be an int"):
            srtf.soft_topk_mask(x, k)

    quantiles = srtf.soft_quantile(x, [0.2, 0.7], 0.5).numpy()
    np.testing.assert_array_equal(
        srtf.soft_quantile(x, tf.constant([0.2, 0.7], tf.float64), 0.5).numpy(), quantiles)
    with pytest.raises(TypeError, match="q must be a static .*derivatives with respect to q"):
        srtf.soft_quantile(x, tf.Variable([0.2, 0.7], dtype=tf.float64))


def test_graph_mode_never_broadcasts_target_or_weights():
    # With an input_signature of unknown batch size, a target (or weights) of another
    # shape is caught when the graph runs; eagerly (and where the static shapes already
    # differ) when the op is built.
    spec = tf.TensorSpec([None, 4], tf.float64)
    pred = tf.constant(_x((3, 4), seed=13, dtype=np.float64))
    target = tf.constant(_x((3, 4), seed=14, dtype=np.float64))
    spearman = tf.function(lambda p, t: srtf.spearman(p, t, 0.5), input_signature=[spec, spec])
    np.testing.assert_allclose(spearman(pred, target).numpy(),
                               srn.spearman(pred.numpy(), target.numpy(), 0.5), rtol=1e-12, atol=1e-12)
    with pytest.raises(tf.errors.InvalidArgumentError, match="target must have the shape of pred"):
        spearman(pred, target[:1])
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        srtf.spearman(pred, target[:1])
    with pytest.raises(ValueError, match=r"target must have the shape of pred \(None, 4\)"):
        tf.function(lambda p, t: srtf.spearman(p, t),
                    input_signature=[spec, tf.TensorSpec([None, 5], tf.float64)]).get_concrete_function()

    weights = tf.constant(np.abs(_x((3, 4), seed=15, dtype=np.float64)) + 0.5)
    isotonic = tf.function(lambda y, w: srtf.isotonic_regression(y, weights=w), input_signature=[spec, spec])
    np.testing.assert_allclose(isotonic(pred, weights).numpy(),
                               srn.isotonic_regression(pred.numpy(), weights=weights.numpy()),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(tf.errors.InvalidArgumentError, match="weights must have the shape of y"):
        isotonic(pred, weights[:1])


def test_other_py_funcs_stay_not_differentiable():
    # softrank gives PyFuncStateless ops a gradient by their token; another library's
    # tf.numpy_function keeps TensorFlow's (none), eagerly and in a graph.
    x = tf.constant([0.5, 1.0, 2.0], tf.float64)

    def loss(t):
        return tf.reduce_sum(tf.numpy_function(np.sin, [t], tf.float64, stateful=False) + t)

    def grad(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            value = loss(t)
        return tape.gradient(value, t)

    np.testing.assert_array_equal(grad(x).numpy(), np.ones(3))  # only the "+ t" term
    np.testing.assert_array_equal(tf.function(grad)(x).numpy(), np.ones(3))


def test_unknown_rank_raises():
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
    def graph(v):
        return srtf.soft_rank(v)

    with pytest.raises(ValueError, match="statically known rank"):
        graph(tf.ones((2, 3)))


def test_import_without_tensorflow_names_the_extra():
    from child_python import run_python

    code = ("import sys\nsys.modules['tensorflow'] = None  # makes `import tensorflow` fail\n"
            "try:\n    import softrank.tensorflow\nexcept ImportError as exc:\n    print(exc)\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "softrank.tensorflow needs TensorFlow: pip install 'softrank[tensorflow]'" in proc.stdout
    assert "tensorflow-cpu" in proc.stdout


def test_signatures_use_the_shared_literal_aliases():
    import typing

    from softrank._types import Direction, Regularization

    for function in (srtf.soft_rank, srtf.soft_sort):
        hints = typing.get_type_hints(function)
        assert hints["regularization"] == Regularization
        assert hints["direction"] == Direction
