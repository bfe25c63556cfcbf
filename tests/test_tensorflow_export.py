"""softrank.tensorflow in saved models: a SavedModel (tf.saved_model.save of a tf.Module,
Keras model.export) saved in one process reloads and runs, gradients included, in a fresh
process that imports softrank.tensorflow, and fails naming that import in one that does not;
the .keras format round-trips. Values are checked against softrank.numpy and, for the
gradient, against finite differences.
"""
from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest

import softrank.numpy as srn
from child_python import run_python
from frameworks import require
from reference import vjp_fd

tf = require("tensorflow")
import softrank.tensorflow as srtf  # noqa: E402

EPS = 0.5

SAVE = r"""
import sys
import numpy as np
import tensorflow as tf
import keras
import softrank.tensorflow as srtf

path = sys.argv[1]


class Ranker(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float64)])
    def rank(self, x):
        return srtf.soft_rank(x, {eps}, regularization="kl")

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float64)])
    def sort_gradient(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(srtf.soft_sort(x, {eps}) ** 2)
        return tape.gradient(loss, x)


module = Ranker()
x = tf.constant(np.load(path + "/x.npy"))
module.rank(x)  # traced before the save: the save serializes this trace
tf.saved_model.save(module, path + "/module")

model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6, kernel_initializer="identity"),
                          keras.layers.Lambda(lambda t: srtf.soft_rank(t, {eps}))])
model.export(path + "/keras", format="tf_saved_model", verbose=False)
print("saved")
"""

LOAD = r"""
import sys
import numpy as np
import tensorflow as tf
{import_line}

path = sys.argv[1]
x = tf.constant(np.load(path + "/x.npy"))
module = tf.saved_model.load(path + "/module")
exported = tf.saved_model.load(path + "/keras")
try:
    rank = module.rank(x).numpy()
except Exception as exc:
    print("ERROR", type(exc).__name__, str(exc).replace("\n", " "))
    sys.exit(0)
with tf.GradientTape() as tape:
    tape.watch(x)
    loss = tf.reduce_sum(module.rank(x) * tf.constant(np.load(path + "/w.npy")))
np.save(path + "/rank.npy", rank)
np.save(path + "/rank_grad.npy", tape.gradient(loss, x).numpy())
np.save(path + "/sort_gradient.npy", module.sort_gradient(x).numpy())
np.save(path + "/serve.npy", exported.serve(tf.cast(x, tf.float32)).numpy())
print("loaded")
"""


def _python(code, path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = run_python(textwrap.dedent(code), str(path), env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_saved_model_reloads_in_a_fresh_process(tmp_path):
    pytest.importorskip("keras")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6))
    w = rng.normal(size=(3, 6))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    assert "saved" in _python(SAVE.format(eps=EPS), tmp_path)

    # A fresh process without softrank: the call fails, naming the import that fixes it.
    out = _python(LOAD.format(import_line=""), tmp_path)
    assert out.startswith("ERROR"), out
    assert "run `import softrank.tensorflow` first" in out

    # A fresh process that imports softrank.tensorflow runs the model and its gradients.
    assert "loaded" in _python(LOAD.format(import_line="import softrank.tensorflow"), tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "rank.npy"),
                               srn.soft_rank(x, EPS, regularization="kl"), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.load(tmp_path / "rank_grad.npy"),
                               srn.soft_rank_vjp(x, w, EPS, regularization="kl"), rtol=1e-12, atol=1e-12)
    sort_gradient = np.load(tmp_path / "sort_gradient.npy")
    for r in range(3):
        fd = vjp_fd(lambda row: srn.soft_sort(row, EPS), x[r], 2 * srn.soft_sort(x[r], EPS))
        np.testing.assert_allclose(sort_gradient[r], fd, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "serve.npy"),
                               srn.soft_rank(x.astype(np.float32), EPS), rtol=1e-5, atol=1e-5)


def test_keras_format_round_trip(tmp_path):
    keras = pytest.importorskip("keras")

    @keras.saving.register_keras_serializable(package="softrank_tests")
    class SoftRank(keras.layers.Layer):
        def __init__(self, eps=1.0, **kwargs):
            super().__init__(**kwargs)
            self.eps = eps

        def call(self, inputs):
            return srtf.soft_rank(inputs, self.eps)

        def get_config(self):
            return {**super().get_config(), "eps": self.eps}

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    features = rng.normal(size=(32, 6)).astype(np.float32)
    targets = srn.soft_rank(features @ rng.normal(size=(6, 6)).astype(np.float32), 0.0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6), SoftRank(0.5)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=False)
    model.fit(features, targets, epochs=2, batch_size=8, verbose=0)
    model.save(tmp_path / "model.keras")

    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(loaded.predict(features, verbose=0), model.predict(features, verbose=0))
    dense = loaded.layers[0]
    np.testing.assert_allclose(loaded.predict(features, verbose=0),
                               srn.soft_rank(features @ dense.kernel.numpy() + dense.bias.numpy(), 0.5),
                               rtol=1e-5, atol=1e-5)
    loaded.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=False)
    before = loaded.evaluate(features, targets, verbose=0)
    loaded.fit(features, targets, epochs=3, batch_size=8, verbose=0)
    assert loaded.evaluate(features, targets, verbose=0) < before


# ---------------------------------------------------------------------------
# Derivatives of a reloaded SavedModel beyond one plain tape: a persistent tape, nested
# tapes (a second derivative), a plain tape after a persistent one, tape.jacobian
# (pfor) and a ForwardAccumulator, in a module holding several softrank functions.

SEVERAL_SAVE = r"""
import sys
import numpy as np
import tensorflow as tf
import softrank.tensorflow as srtf

path = sys.argv[1]
spec = tf.TensorSpec([None, 5], tf.float64)
c = tf.constant(np.load(path + "/c.npy"))


class Several(tf.Module):
    @tf.function(input_signature=[spec])
    def rank_kl(self, x):
        return srtf.soft_rank(x, {eps}, regularization="kl")

    @tf.function(input_signature=[spec])
    def rank_l2(self, x):
        return srtf.soft_rank(x, {eps}, direction="descending")

    @tf.function(input_signature=[spec])
    def sort_gradient(self, x):  # a first derivative saved inside the model
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(c * srtf.soft_sort(x, {eps}, regularization="kl"))
        return tape.gradient(loss, x)

    @tf.function(input_signature=[spec])
    def topk(self, x):
        return srtf.soft_topk_mask(x, 2, {eps})

    @tf.function(input_signature=[spec, spec])
    def isotonic(self, y, weights):
        return srtf.isotonic_regression(y, weights=weights, regularization="kl")


tf.saved_model.save(Several(), path + "/several")
print("saved")
"""

SEVERAL_LOAD = r"""
import sys
import numpy as np
import tensorflow as tf
import softrank.tensorflow  # noqa: F401  (the callbacks and their gradient)

path = sys.argv[1]
module = tf.saved_model.load(path + "/several")
x, c, v, w = (tf.constant(np.load(path + "/" + name + ".npy")) for name in "xcvw")
out = {}


def loss(name, *args):
    return tf.reduce_sum(c * getattr(module, name)(*args))


def nested(name, *rest):
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            value = loss(name, x, *rest)
        grad = inner.gradient(value, x)
        directional = tf.reduce_sum(grad * v)
    return grad, outer.gradient(directional, x)


for name in ("rank_kl", "rank_l2", "sort_gradient", "topk"):
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        value = loss(name, x)
    out[name + "/persistent"] = tape.gradient(value, x)
    out[name + "/persistent_again"] = tape.gradient(value, x)
    del tape
    with tf.GradientTape() as tape:  # a plain tape after the persistent one
        tape.watch(x)
        value = loss(name, x)
    out[name + "/plain"] = tape.gradient(value, x)

for name in ("rank_kl", "rank_l2", "topk"):
    out[name + "/nested_first"], out[name + "/nested_second"] = nested(name)

with tf.GradientTape(persistent=True) as tape:
    tape.watch([x, w])
    value = loss("isotonic", x, w)
out["isotonic/persistent_y"], out["isotonic/persistent_weights"] = tape.gradient(value, [x, w])
out["isotonic/nested_first"], out["isotonic/nested_second"] = nested("isotonic", w)

with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    ranks = module.rank_kl(x)
out["rank_kl/jacobian"] = tape.jacobian(ranks, x)
with tf.autodiff.ForwardAccumulator(x, v) as accumulator:
    ranks = module.rank_kl(x)
out["rank_kl/jvp"] = accumulator.jvp(ranks)

# A second derivative of the saved first derivative is a third derivative of kl.
try:
    nested("sort_gradient")
    print("no error")
except tf.errors.UnimplementedError as exc:
    print("third derivative:", str(exc).replace("\n", " "))

for key, value in out.items():
    assert value is not None, key
np.savez(path + "/derivatives.npz", **{k: t.numpy() for k, t in out.items()})
print("loaded")
"""


def _fd_vjp_direction(vjp, x, direction, h=1e-6):
    """Central difference of ``x -> vjp(x)`` along ``direction``: the second derivative."""
    return (vjp(x + h * direction) - vjp(x - h * direction)) / (2 * h)


def test_reloaded_saved_model_derivatives_under_persistent_and_nested_tapes(tmp_path):
    rng = np.random.default_rng(3)
    x, c, v = (rng.normal(size=(3, 5)) for _ in range(3))
    w = rng.uniform(0.5, 2.0, size=(3, 5))
    for name, value in zip("xcvw", (x, c, v, w)):
        np.save(tmp_path / f"{name}.npy", value)
    assert "saved" in _python(SEVERAL_SAVE.format(eps=EPS), tmp_path)
    out = _python(SEVERAL_LOAD, tmp_path)
    assert "loaded" in out, out
    # Clear, and naming what is missing, rather than a wrong value or None.
    assert "third derivative: " in out and "cannot compute this derivative" in out, out
    got = dict(np.load(tmp_path / "derivatives.npz"))

    def rank_kl_vjp(t):
        return srn.soft_rank_vjp(t, c, EPS, regularization="kl")

    def sort_kl_vjp(t):
        return srn.soft_sort_vjp(t, c, EPS, regularization="kl")

    def topk_vjp(t):
        return srn.soft_topk_mask_with_vjp(t, 2, EPS)[1](c)

    def isotonic_vjp(t):
        return srn.isotonic_regression_with_vjp(t, weights=w, regularization="kl")[1](c)

    first = {
        "rank_kl": rank_kl_vjp(x),
        "rank_l2": srn.soft_rank_vjp(x, c, EPS, direction="descending"),
        # The derivative of <c, sort_gradient(x)>, sort_gradient = J^T c: H_c c.
        "sort_gradient": _fd_vjp_direction(sort_kl_vjp, x, c),
        "topk": topk_vjp(x),
    }
    for name, want in first.items():
        tol = dict(rtol=1e-5, atol=1e-6) if name == "sort_gradient" else dict(rtol=1e-12, atol=1e-12)
        for how in ("persistent", "persistent_again", "plain"):
            np.testing.assert_allclose(got[f"{name}/{how}"], want, err_msg=f"{name}/{how}", **tol)
    for name in ("rank_kl", "rank_l2", "topk"):
        np.testing.assert_allclose(got[f"{name}/nested_first"], first[name], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["rank_kl/nested_second"], _fd_vjp_direction(rank_kl_vjp, x, v),
                               rtol=1e-5, atol=1e-6)
    assert np.abs(got["rank_kl/nested_second"]).max() > 1e-3  # the operator's own curvature
    # l2 is piecewise linear: its second derivative is a tensor of zeros, not None.
    for name in ("rank_l2", "topk"):
        np.testing.assert_array_equal(got[f"{name}/nested_second"], np.zeros(x.shape))

    grad_y, grad_weights = isotonic_vjp(x)
    np.testing.assert_allclose(got["isotonic/persistent_y"], grad_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["isotonic/persistent_weights"], grad_weights, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["isotonic/nested_first"], grad_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["isotonic/nested_second"],
                               _fd_vjp_direction(lambda t: isotonic_vjp(t)[0], x, v),
                               rtol=1e-5, atol=1e-6)

    jacobian = got["rank_kl/jacobian"]
    for r in range(3):
        for j in range(5):
            basis = np.zeros(x.shape)
            basis[r, j] = 1.0
            np.testing.assert_allclose(
                jacobian[r, j], srn.soft_rank_vjp(x, basis, EPS, regularization="kl"),
                rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["rank_kl/jvp"], srn.soft_rank_jvp(x, v, EPS, regularization="kl"),
                               rtol=1e-12, atol=1e-12)
