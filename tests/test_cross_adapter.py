"""Every framework adapter equals softrank.numpy on the same inputs.

Forward and gradient (of ``sum(cotangent * op(x))``), both ops, both
regularizations, both directions, several shapes and axes, float64 (1e-12)
and float32 (1e-5). softrank.numpy is itself tested against independent
references (test_numpy_*); here the question is whether the adapters' axis
moves, dtype handling and gradient wiring lose anything.
"""
from __future__ import annotations

import numpy as np
import pytest

import softrank.numpy as srn
from frameworks import jax_x64, require

OPS = ("rank", "sort")
REGULARIZATIONS = ("l2", "kl")
DIRECTIONS = ("ascending", "descending")
# (shape, axis): a vector, the operator along a leading, a middle and the
# last axis, and a row long enough to form large PAV blocks.
CASES = [((7,), -1), ((5, 6), 0), ((3, 5, 4), 1), ((2, 3, 40), -1)]
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}
EPS = 0.7


def _inputs(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    x.flat[1::5] = x.flat[0]  # ties
    cotangent = rng.normal(size=shape)
    return x.astype(dtype), cotangent.astype(dtype)


def _numpy(op, x, cotangent, **kwargs):
    forward = {"rank": srn.soft_rank, "sort": srn.soft_sort}[op]
    vjp = {"rank": srn.soft_rank_vjp, "sort": srn.soft_sort_vjp}[op]
    return forward(x, EPS, **kwargs), vjp(x, cotangent, EPS, **kwargs)


def _torch(op, x, cotangent, axis, eps=EPS, **kwargs):
    torch = require("torch")
    import softrank.torch as srt

    forward = {"rank": srt.soft_rank, "sort": srt.soft_sort}[op]
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    out = forward(xt, eps, dim=axis, **kwargs)
    (grad,) = torch.autograd.grad(out, xt, torch.from_numpy(cotangent))
    return out.detach().numpy(), grad.numpy()


def _jax(op, x, cotangent, axis, eps=EPS, **kwargs):
    jax = require("jax")
    import softrank.jax as srj

    forward = {"rank": srj.soft_rank, "sort": srj.soft_sort}[op]
    with jax_x64(x.dtype == np.float64):
        out, pullback = jax.vjp(lambda v: forward(v, eps, axis=axis, **kwargs), x)
        (grad,) = pullback(cotangent)
        assert out.dtype == x.dtype and grad.dtype == x.dtype
        return np.asarray(out), np.asarray(grad)


def _tensorflow(op, x, cotangent, axis, eps=EPS, **kwargs):
    tf = require("tensorflow")
    import softrank.tensorflow as srtf

    forward = {"rank": srtf.soft_rank, "sort": srtf.soft_sort}[op]
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = forward(xt, eps, axis=axis, **kwargs)
    grad = tape.gradient(out, xt, output_gradients=tf.constant(cotangent))
    return out.numpy(), grad.numpy()


ADAPTERS = {"torch": _torch, "jax": _jax, "tensorflow": _tensorflow}


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_adapter_matches_numpy(adapter, op, case, dtype):
    shape, axis = CASES[case]
    x, cotangent = _inputs(shape, dtype, seed=case)
    tol = TOLERANCE[dtype]
    for regularization in REGULARIZATIONS:
        for direction in DIRECTIONS:
            kwargs = dict(regularization=regularization, direction=direction)
            want_out, want_grad = _numpy(op, x, cotangent, axis=axis, **kwargs)
            out, grad = ADAPTERS[adapter](op, x, cotangent, axis, **kwargs)
            assert out.dtype == x.dtype and grad.dtype == x.dtype
            assert out.shape == x.shape and grad.shape == x.shape
            scale = max(1.0, float(np.abs(want_out).max()))
            np.testing.assert_allclose(out, want_out, rtol=tol, atol=tol * scale, err_msg=str(kwargs))
            np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol, err_msg=str(kwargs))


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_adapter_matches_numpy_on_every_engine(adapter, backend):
    """The adapters reach whichever engine is selected (native or numba)."""
    x, cotangent = _inputs((4, 9), "float64", seed=11)
    for op in OPS:
        kwargs = dict(regularization="kl", direction="descending")
        want_out, want_grad = _numpy(op, x, cotangent, axis=0, **kwargs)
        out, grad = ADAPTERS[adapter](op, x, cotangent, 0, **kwargs)
        np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-12)


def _spearman_in(adapter, pred, target):
    """``spearman(pred, target, eps=1e-3)`` of one adapter, as numpy."""
    if adapter == "numpy":
        return np.asarray(srn.spearman(pred, target, 1e-3))
    if adapter == "torch":
        torch = require("torch")
        import softrank.torch as srt

        out = srt.spearman(torch.from_numpy(pred).requires_grad_(), torch.from_numpy(target), 1e-3)
        return out.detach().numpy()
    if adapter == "jax":
        jnp = require("jax.numpy")
        import softrank.jax as srj

        with jax_x64(True):  # jax's int64 (without x64 the target is int32 anyway)
            return np.asarray(srj.spearman(jnp.asarray(pred), jnp.asarray(target), 1e-3))
    tf = require("tensorflow")
    import softrank.tensorflow as srtf

    return srtf.spearman(tf.constant(pred), tf.constant(target), 1e-3).numpy()


@pytest.mark.parametrize("adapter", ["numpy", *ADAPTERS])
def test_spearman_ranks_the_target_in_its_own_precision(adapter):
    """A float32 ``pred`` with int64 targets above 2^24: float32 spaces them 4
    apart from 2^25, so ranking the target after a cast to pred's dtype merged
    distinct targets into ties. The reference is the Pearson correlation of
    the exact ranks (pred is spread wide enough that eps = 1e-3 is the hard
    rank)."""
    rng = np.random.default_rng(5)
    n = 12
    target = (2**25 + rng.permutation(n)).astype(np.int64)[None, :].repeat(2, axis=0)
    pred = np.stack([rng.permutation(n), np.arange(n)]).astype(np.float32)
    expected = [np.corrcoef(np.argsort(np.argsort(p)), np.argsort(np.argsort(t)))[0, 1]
                for p, t in zip(pred, target)]
    got = _spearman_in(adapter, pred, target)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("adapter", ["numpy", "jax"])
def test_bfloat16_second_arguments_are_accepted(adapter):
    """ml_dtypes' bfloat16 (numpy dtype kind 'V') was accepted as ``x`` but
    refused as a target, weights, ``w`` or cotangent ("must have a real
    floating dtype, got bfloat16"). Each call equals the call on the same
    values in float32."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 7)).astype(np.float32)
    other = rng.uniform(0.5, 2.0, size=(3, 7)).astype(bf16)
    if adapter == "numpy":
        mod, wrap = srn, np.asarray
    else:
        require("jax")
        import jax.numpy as jnp
        import softrank.jax as mod

        wrap = jnp.asarray
    calls = [
        lambda o: mod.spearman(wrap(x), wrap(o), 0.5),
        lambda o: mod.isotonic_regression(wrap(x), weights=wrap(o)),
        lambda o: mod.permutahedron_projection(wrap(x), wrap(o)),
    ]
    if adapter == "numpy":
        calls.append(lambda o: srn.soft_rank_vjp(x, o, 0.5))
        calls.append(lambda o: srn.soft_rank_with_vjp(x, 0.5)[1](o))
    for call in calls:
        got = np.asarray(call(other), dtype=np.float64)
        expected = np.asarray(call(other.astype(np.float32)), dtype=np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def _isotonic_first_value_and_grads(adapter, y, weights, regularization, factor):
    """``solution[0]`` of ``isotonic_regression(y, weights)`` and the gradients
    of ``factor * solution[0]`` in ``y`` and in ``weights``, float64,
    through one adapter."""
    if adapter == "numpy":
        value, vjp = srn.isotonic_regression_with_vjp(y, weights=weights,
                                                      regularization=regularization)
        grad_y, grad_w = vjp(np.eye(len(y))[0] * factor)
        return value[0], grad_y, grad_w
    if adapter == "torch":
        torch = require("torch")
        import softrank.torch as srt

        yt = torch.tensor(y, requires_grad=True)
        wt = torch.tensor(weights, requires_grad=True)
        value = srt.isotonic_regression(yt, weights=wt, regularization=regularization)[0]
        (value * factor).backward()
        return value.item(), yt.grad.numpy(), wt.grad.numpy()
    if adapter == "jax":
        jax = require("jax")
        import softrank.jax as srj

        with jax_x64(True):
            def first(a, b):
                return srj.isotonic_regression(a, weights=b, regularization=regularization)[0]

            value = first(y, weights)
            grad_y, grad_w = jax.grad(lambda a, b: first(a, b) * factor,
                                      argnums=(0, 1))(y, weights)
            return float(value), np.asarray(grad_y), np.asarray(grad_w)
    tf = require("tensorflow")
    import softrank.tensorflow as srtf

    yt, wt = tf.Variable(y), tf.Variable(weights)
    with tf.GradientTape() as tape:
        value = srtf.isotonic_regression(yt, weights=wt, regularization=regularization)[0]
        loss = value * factor
    grad_y, grad_w = tape.gradient(loss, [yt, wt])
    return float(value), grad_y.numpy(), grad_w.numpy()


@pytest.mark.parametrize("adapter", ["numpy", *ADAPTERS])
def test_isotonic_gradients_near_the_largest_float(adapter):
    """The weighted isotonic gradients where ``weights * y`` or a block's total
    weight overflows although the solution is finite: the backward gave inf,
    NaN or 0 there (it formed ``sum(w y)`` and ``sum(w)``). Closed forms: a
    pooled block has v = sum(w y) / W, dv/dy = w / W, dv/dw = (y - v) / W
    (l2); v = log sum(e^y) - log W, dv/dy = softmax(y), dv/dw = -1 / W (kl)."""
    big = 1.7e308
    # l2: y near -max with weights 1, 2 (w * y overflows; W = 3)
    y, w = np.array([1.0, -big]), np.array([1.0, 2.0])
    v = (1.0 - 2.0 * big) / 3.0 if np.isfinite(2.0 * big) else 1.0 / 3.0 - 2.0 * (big / 3.0)
    cases = [("l2", y, w, v, w / 3.0, (y - v) / 3.0, 1.0)]
    # both regularizations: weights near max (W overflows), y = (2, 1) pooled
    y, w = np.array([2.0, 1.0]), np.array([big, big])
    # (their gradients in w, about 1e-309, are subnormal, which XLA and
    # TensorFlow flush to 0: the loss is scaled by 1e20 to keep them normal)
    cases.append(("l2", y, w, 1.5, np.array([0.5, 0.5]), np.array([0.5, -0.5]) / big / 2.0,
                  1e20))
    softmax = np.exp(y) / np.exp(y).sum()
    cases.append(("kl", y, w, np.log(np.exp(y).sum()) - np.log(big) - np.log(2.0), softmax,
                  np.array([-1.0, -1.0]) / big / 2.0, 1e20))
    for reg, y, w, value, grad_y, grad_w, factor in cases:
        got = _isotonic_first_value_and_grads(adapter, y, w, reg, factor)
        assert np.isfinite(got[2]).all()
        np.testing.assert_allclose(got[0], value, rtol=1e-12)
        np.testing.assert_allclose(got[1], grad_y * factor, rtol=1e-12, atol=0)
        np.testing.assert_allclose(got[2], grad_w * factor, rtol=1e-12, atol=0)


def _soft_rank_in(adapter, x, eps):
    if adapter == "numpy":
        return np.asarray(srn.soft_rank(x, eps))
    if adapter == "torch":
        torch = require("torch")
        import softrank.torch as srt

        return srt.soft_rank(torch.from_numpy(x), eps).numpy()
    if adapter == "jax":
        jnp = require("jax.numpy")
        import softrank.jax as srj

        return np.asarray(srj.soft_rank(jnp.asarray(x), eps))
    tf = require("tensorflow")
    import softrank.tensorflow as srtf

    return srtf.soft_rank(tf.constant(x), eps).numpy()


@pytest.mark.parametrize("adapter", ["numpy", *ADAPTERS])
def test_float16_soft_ranks_past_the_largest_float16_are_refused(adapter):
    """Soft ranks reach n, and float16's largest value is 65504: beyond it the
    ranks came back inf, silently. n = 65504 still works (its largest rank is
    exactly 65504); n = 65505 is refused, naming float16 and n."""
    x = np.zeros(65504, dtype=np.float16)
    x[7] = 1.0
    ranks = _soft_rank_in(adapter, x, 1e-7)
    assert ranks.dtype == np.float16 and np.isfinite(ranks).all()
    assert ranks[7] == 65504.0
    with pytest.raises(ValueError, match=r"float16 x needs n <= 65504.*n = 65505"):
        _soft_rank_in(adapter, np.zeros(65505, dtype=np.float16), 1e-3)


def test_float16_soft_ranks_with_n_unknown_when_tensorflow_traces():
    """A tf.function whose n is known only when it runs checks n there."""
    tf = require("tensorflow")
    import softrank.tensorflow as srtf

    f = tf.function(lambda v: srtf.soft_rank(v, 1e-7),
                    input_signature=[tf.TensorSpec([None], tf.float16)])
    x = np.zeros(65504, dtype=np.float16)
    x[7] = 1.0
    assert f(tf.constant(x)).numpy()[7] == 65504.0
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"float16 x needs n <= 65504"):
        f(tf.constant(np.zeros(65505, dtype=np.float16)))


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_subnormal_inputs_as_numpy_computes_them(adapter, dtype):
    """XLA's and TensorFlow's threads flush subnormal numbers to zero (and
    read them as zero); the core clears those flags for its calls, so the
    adapters that run it there rank subnormal values as numpy does (jax
    ranked [3e-40, 1e-40, 2e-40] as three ties)."""
    tiny = np.finfo(dtype).tiny
    x = (np.array([[3.0, 1.0, 2.0, -0.5, 2.5, 1.5]]) * tiny / 8).astype(dtype)
    assert np.all(np.abs(x) < tiny) and np.all(x != 0)  # subnormal
    rng = np.random.default_rng(41)
    cotangent = rng.normal(size=x.shape).astype(dtype)
    # eps = 0, and an eps (a double) at which x / eps is of order 1
    for eps in (0.0, float(tiny) / 8):
        for op in OPS:
            want = {"rank": srn.soft_rank, "sort": srn.soft_sort}[op](x, eps)
            if eps == 0.0:
                hard = (np.argsort(np.argsort(x, axis=-1), axis=-1) + 1.0 if op == "rank"
                        else np.sort(x, axis=-1))
                np.testing.assert_array_equal(want, hard)
            else:
                assert len(np.unique(want)) == x.shape[-1]  # not ties
            got, _ = ADAPTERS[adapter](op, x, cotangent, -1, eps=eps)
            np.testing.assert_array_equal(got, want)
