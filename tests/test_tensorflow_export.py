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
