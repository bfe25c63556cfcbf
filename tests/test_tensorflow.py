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
