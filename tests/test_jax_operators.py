"""softrank.jax's operators on the permutahedron under every JAX transform.

References, all independent of the adapter's derivative code path:
softrank.numpy's values and its ``*_with_vjp`` pullbacks (numpy arrays,
another adapter); central finite differences (float64) of the jax functions
and of the numpy pullbacks; scipy.stats.spearmanr, np.quantile and the hard
top-k indicator at eps = 0; the same call on an unsharded array. float64
through ``jax.config`` (not the thread-local ``jax.enable_x64`` context: XLA
may run a pure_callback on another thread).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from frameworks import jax_x64, require

import softrank.numpy as srn

jax = require("jax")
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

import softrank.jax as srj  # noqa: E402
from child_python import run_python

REGS = ("l2", "kl")
EPS = 0.7


@pytest.fixture(autouse=True)
def x64():
    with jax_x64(True):
        yield


def _rng(seed):
    return np.random.default_rng(seed)


# Each case: the differentiable inputs (float64 numpy arrays), the jax
# function of them, and softrank.numpy's function with its pullback (a tuple
# of gradients, one per input). Sizes and spreads are such that, at EPS,
# some PAV block pools (a row of singleton blocks has a trivial Jacobian).


def _case(name, reg, seed=0):
    rng = _rng(seed)
    x = 2.0 * rng.normal(size=(3, 5))
    if name == "projection":  # w of length n, broadcast over rows
        w = rng.normal(size=5)
        return ((x, w), lambda z, v: srj.permutahedron_projection(z, v, regularization=reg),
                lambda z, v: srn.permutahedron_projection_with_vjp(z, v, regularization=reg))
    if name == "projection_full_w":  # w of z's shape, axis 0
        w = rng.normal(size=(3, 5))
        return ((x, w),
                lambda z, v: srj.permutahedron_projection(z, v, regularization=reg, axis=0),
                lambda z, v: srn.permutahedron_projection_with_vjp(z, v, regularization=reg,
                                                                   axis=0))
    if name == "projection_rho":
        return ((x,), lambda z: srj.permutahedron_projection(z, regularization=reg),
                lambda z: _z_only(srn.permutahedron_projection_with_vjp(z, regularization=reg)))
    if name == "topk":
        return ((x,), lambda z: srj.soft_topk_mask(z, 2, EPS, regularization=reg, axis=0),
                lambda z: _one(srn.soft_topk_mask_with_vjp(z, 2, EPS, regularization=reg,
                                                           axis=0)))
    if name == "spearman":
        target = rng.integers(0, 3, size=(3, 5)).astype(np.float64)  # ties
        return ((x,), lambda z: srj.spearman(z, target, EPS, regularization=reg),
                lambda z: _one(srn.spearman_with_vjp(z, target, EPS, regularization=reg)))
    if name == "quantile":
        q = [0.1, 0.5, 0.9]
        return ((x,), lambda z: srj.soft_quantile(z, q, EPS, regularization=reg, axis=0),
                lambda z: _one(srn.soft_quantile_with_vjp(z, q, EPS, regularization=reg,
                                                          axis=0)))
    if name == "median":
        return ((x,), lambda z: srj.soft_median(z, EPS, regularization=reg),
                lambda z: _one(srn.soft_median_with_vjp(z, EPS, regularization=reg)))
    if name == "isotonic":
        weights = rng.uniform(0.5, 2.0, size=(3, 5))
        return ((x, weights),
                lambda y, u: srj.isotonic_regression(y, weights=u, regularization=reg),
                lambda y, u: srn.isotonic_regression_with_vjp(y, weights=u,
                                                              regularization=reg))
    if name == "isotonic_decreasing":
        weights = rng.uniform(0.5, 2.0, size=(3, 5))
        return ((x.T.copy(), weights.T.copy()),
                lambda y, u: srj.isotonic_regression(y, weights=u, increasing=False,
                                                     regularization=reg, axis=0),
                lambda y, u: srn.isotonic_regression_with_vjp(y, weights=u, increasing=False,
                                                              regularization=reg, axis=0))
    raise AssertionError(name)


def _one(pair):
    """A single-input numpy pullback as one returning a 1-tuple."""
    value, vjp = pair
    return value, lambda c: (vjp(c),)


def _z_only(pair):
    """The projection's pullback for a default w: ``(grad_z, None)`` -> ``(grad_z,)``."""
    value, vjp = pair
    return value, lambda c: vjp(c)[:1]


CASES = ("projection", "projection_full_w", "projection_rho", "topk", "spearman", "quantile",
         "median", "isotonic", "isotonic_decreasing")


def _fd_jacobian(fn, args, argnum, h=1e-6):
    """Central differences of ``fn`` in ``args[argnum]``: shape out.shape + arg.shape."""
    base = [np.array(a, dtype=np.float64) for a in args]
    x = base[argnum]
    columns = []
    for k in range(x.size):
        plus, minus = list(base), list(base)
        e = np.zeros_like(x)
        e.flat[k] = h
        plus[argnum], minus[argnum] = x + e, x - e
        columns.append((np.asarray(fn(*plus)) - np.asarray(fn(*minus))) / (2 * h))
    return np.stack(columns, axis=-1).reshape(np.shape(fn(*base)) + x.shape)


# --- values --------------------------------------------------------------------------


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", CASES)
def test_values_equal_numpy(name, reg):
    args, fn, np_fn = _case(name, reg)
    got = fn(*args)
    want, _ = np_fn(*args)
    assert got.dtype == jnp.float64 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("shape, axis", [((7,), -1), ((4, 6), 0), ((2, 5, 3), 1), ((2, 3, 4), -1)])
def test_values_equal_numpy_over_shapes_and_axes(shape, axis, reg):
    rng = _rng(sum(shape))
    x = rng.normal(size=shape)
    n = shape[axis]
    w = rng.normal(size=n)
    weights = rng.uniform(0.2, 3.0, size=shape)
    target = rng.normal(size=shape)
    pairs = [
        (srj.permutahedron_projection(x, regularization=reg, axis=axis),
         srn.permutahedron_projection(x, regularization=reg, axis=axis)),
        (srj.permutahedron_projection(x, w, regularization=reg, axis=axis),
         srn.permutahedron_projection(x, w, regularization=reg, axis=axis)),
        (srj.permutahedron_projection(x, weights, regularization=reg, axis=axis),
         srn.permutahedron_projection(x, weights, regularization=reg, axis=axis)),
        (srj.soft_topk_mask(x, 2, 0.3, regularization=reg, axis=axis),
         srn.soft_topk_mask(x, 2, 0.3, regularization=reg, axis=axis)),
        (srj.spearman(x, target, 0.3, regularization=reg, axis=axis),
         srn.spearman(x, target, 0.3, regularization=reg, axis=axis)),
        (srj.soft_quantile(x, 0.3, 0.3, regularization=reg, axis=axis),
         srn.soft_quantile(x, 0.3, 0.3, regularization=reg, axis=axis)),
        (srj.soft_quantile(x, np.array([0.0, 0.25, 1.0]), 0.3, regularization=reg, axis=axis),
         srn.soft_quantile(x, np.array([0.0, 0.25, 1.0]), 0.3, regularization=reg, axis=axis)),
        (srj.soft_median(x, 0.3, regularization=reg, axis=axis),
         srn.soft_median(x, 0.3, regularization=reg, axis=axis)),
        (srj.isotonic_regression(x, regularization=reg, axis=axis),
         srn.isotonic_regression(x, regularization=reg, axis=axis)),
        (srj.isotonic_regression(x, weights=weights, increasing=False, regularization=reg,
                                 axis=axis),
         srn.isotonic_regression(x, weights=weights, increasing=False, regularization=reg,
                                 axis=axis)),
    ]
    for i, (got, want) in enumerate(pairs):
        assert got.shape == want.shape, i
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12, err_msg=str(i))


def test_float32_and_half_precision():
    """float32 in float32; float16/bfloat16 computed in float32, returned in their dtype."""
    x = _rng(3).normal(size=(3, 6))
    weights = _rng(4).uniform(0.5, 2.0, size=(3, 6))
    for dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
        xd = jnp.asarray(x, dtype=dtype)
        ref = np.asarray(xd.astype(jnp.float32))  # the rounded input, in float32
        tol = 1e-6 if dtype == jnp.float32 else 1e-2
        pairs = [
            (srj.permutahedron_projection(xd, regularization="kl"),
             srn.permutahedron_projection(ref, regularization="kl")),
            (srj.soft_topk_mask(xd, 3, 0.5), srn.soft_topk_mask(ref, 3, 0.5)),
            (srj.spearman(xd, x, 0.5), srn.spearman(ref, x.astype(np.float32), 0.5)),
            (srj.soft_quantile(xd, [0.2, 0.8], 0.5), srn.soft_quantile(ref, [0.2, 0.8], 0.5)),
            (srj.soft_median(xd, 0.5), srn.soft_median(ref, 0.5)),
            (srj.isotonic_regression(xd, weights=weights),
             srn.isotonic_regression(ref, weights=weights.astype(np.float32))),
        ]
        for got, want in pairs:
            assert got.dtype == dtype and got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol,
                                       atol=tol)
    x32 = jnp.asarray(x, jnp.float32)
    grad = jax.grad(lambda v: jnp.sum(srj.soft_topk_mask(v, 2, 0.5) * x32))(x32)
    _, vjp = srn.soft_topk_mask_with_vjp(np.asarray(x32), 2, 0.5)
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(grad), vjp(np.asarray(x32)), rtol=1e-5, atol=1e-5)


def test_empty_rows_and_n_zero_behave_like_numpy():
    for shape in ((0, 3), (2, 0), (0,)):
        x = np.zeros(shape)
        pairs = [
            (srj.permutahedron_projection(x), srn.permutahedron_projection(x)),
            (srj.permutahedron_projection(x, regularization="kl"),
             srn.permutahedron_projection(x, regularization="kl")),
            (srj.soft_topk_mask(x, 0), srn.soft_topk_mask(x, 0)),
            (srj.isotonic_regression(x, weights=np.ones(shape), regularization="kl"),
             srn.isotonic_regression(x, weights=np.ones(shape), regularization="kl")),
        ]
        with np.errstate(invalid="ignore", divide="ignore"):
            pairs.append((srj.spearman(x, x), srn.spearman(x, x)))
        for got, want in pairs:
            assert got.shape == want.shape
            np.testing.assert_array_equal(np.asarray(got), want)
        if shape[-1] == 0:
            with pytest.raises(ValueError, match="n = 0"):
                srj.soft_quantile(x, 0.5)
    grad = jax.grad(lambda v: jnp.sum(srj.permutahedron_projection(v)))(np.zeros((0, 3)))
    assert grad.shape == (0, 3)


# --- first derivatives ----------------------------------------------------------------


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", CASES)
def test_vjp_equals_the_numpy_pullback(name, reg):
    """jax.vjp (every differentiable input: z and w, y and weights) against
    softrank.numpy's pullback; a 1-D w's gradient is summed over the rows."""
    args, fn, np_fn = _case(name, reg)
    value, vjp = jax.vjp(fn, *args)
    c = _rng(9).normal(size=value.shape)
    got = vjp(jnp.asarray(c))
    _, np_vjp = np_fn(*args)
    want = np_vjp(c)
    assert len(got) == len(want)
    for g, v, a in zip(got, want, args):
        assert g.shape == a.shape
        np.testing.assert_allclose(np.asarray(g), v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", CASES)
def test_jacobians_equal_finite_differences(name, reg):
    """jacrev, jacfwd and jvp in every input against central differences of
    the jax function itself (float64)."""
    args, fn, _ = _case(name, reg)
    for argnum in range(len(args)):
        want = _fd_jacobian(fn, args, argnum)
        rev = jax.jacrev(fn, argnums=argnum)(*args)
        fwd = jax.jacfwd(fn, argnums=argnum)(*args)
        np.testing.assert_allclose(np.asarray(rev), want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(fwd), want, rtol=1e-6, atol=1e-7)
        t = _rng(argnum).normal(size=args[argnum].shape)
        tangents = [np.zeros_like(a) for a in args]
        tangents[argnum] = t
        _, t_out = jax.jvp(fn, tuple(args), tuple(tangents))
        np.testing.assert_allclose(np.asarray(t_out), np.tensordot(want, t, axes=t.ndim),
                                   rtol=1e-6, atol=1e-7)


def test_spearman_target_gradient_is_zero():
    pred, target = _rng(1).normal(size=(2, 5)), _rng(2).normal(size=(2, 5))
    grad = jax.grad(lambda t: jnp.sum(srj.spearman(pred, t, EPS)))(target)
    np.testing.assert_array_equal(np.asarray(grad), np.zeros_like(target))


@pytest.mark.parametrize("reg", REGS)
def test_nan_rows_have_nan_gradients_in_both_modes(reg):
    """As softrank.numpy's pullbacks: a row holding NaN gets a NaN gradient
    (in z and w; in y), the other rows their usual gradient."""
    x = _rng(5).normal(size=(2, 4))
    x[1, 2] = np.nan
    w = _rng(6).normal(size=4)
    c = _rng(7).normal(size=(2, 4))
    for eps in (EPS, 0.0):
        _, vjp = jax.vjp(lambda z, e=eps: srj.soft_topk_mask(z, 2, e, regularization=reg), x)
        _, np_vjp = srn.soft_topk_mask_with_vjp(x, 2, eps, regularization=reg)
        np.testing.assert_array_equal(np.isnan(vjp(c)[0]), np.isnan(np_vjp(c)))
        np.testing.assert_allclose(np.asarray(vjp(c)[0])[0], np_vjp(c)[0], rtol=1e-12)
    _, vjp = jax.vjp(lambda z, v: srj.permutahedron_projection(z, v, regularization=reg), x, w)
    got_z, got_w = vjp(c)
    assert np.all(np.isnan(got_z[1])) and np.all(np.isfinite(got_z[0]))
    assert np.all(np.isnan(got_w))  # summed over rows, one of them NaN
    t_out = jax.jvp(lambda z: srj.permutahedron_projection(z, regularization=reg), (x,), (c,))[1]
    assert np.all(np.isnan(t_out[1])) and np.all(np.isfinite(t_out[0]))
    _, vjp = jax.vjp(lambda y: srj.isotonic_regression(y, regularization=reg), x)
    _, np_vjp = srn.isotonic_regression_with_vjp(x, regularization=reg)
    np.testing.assert_array_equal(np.isnan(vjp(c)[0]), np.isnan(np_vjp(c)[0]))
    assert np.all(np.isnan(vjp(c)[0][1]))


# --- higher derivatives ---------------------------------------------------------------


def _loss(fn, c):
    return lambda *a: jnp.sum(c * fn(*a) ** 2)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", ["projection", "topk", "spearman", "quantile", "isotonic"])
def test_hessian_equals_differences_of_the_numpy_gradient(name, reg):
    """jax.hessian (and jacfwd(jacfwd), jacrev(jacrev)) of sum(c f^2) in every
    input against central differences of softrank.numpy's gradient
    pullback(2 c f)."""
    args, fn, np_fn = _case(name, reg)
    c = _rng(11).normal(size=np.shape(np_fn(*args)[0]))
    loss = _loss(fn, c)

    def numpy_grad(argnum):
        def grad(*a):
            value, vjp = np_fn(*a)
            return vjp(2 * c * value)[argnum]
        return grad

    for argnum in range(len(args)):
        want = _fd_jacobian(numpy_grad(argnum), args, argnum, h=1e-5)
        hess = jax.hessian(loss, argnums=argnum)(*args)
        np.testing.assert_allclose(np.asarray(hess), want, rtol=1e-6, atol=1e-6)
        fwd = jax.jacfwd(jax.jacfwd(loss, argnums=argnum), argnums=argnum)(*args)
        rev = jax.jacrev(jax.jacrev(loss, argnums=argnum), argnums=argnum)(*args)
        np.testing.assert_allclose(np.asarray(fwd), np.asarray(hess), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(rev), np.asarray(hess), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["projection", "isotonic"])
def test_mixed_second_derivative_and_the_operator_curvature(name):
    """d^2 loss / dz dw against differences of the numpy gradient in z; and
    the kl operator's own second derivative d^2 f / dz^2 (not zero) against
    differences of its jacfwd."""
    args, fn, np_fn = _case(name, "kl")
    c = _rng(12).normal(size=args[0].shape)
    loss = _loss(fn, c)

    def numpy_grad_z(*a):
        value, vjp = np_fn(*a)
        return vjp(2 * c * value)[0]

    want = _fd_jacobian(numpy_grad_z, args, 1, h=1e-5)
    got = jax.jacfwd(jax.grad(loss, argnums=0), argnums=1)(*args)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    second = jax.jacfwd(jax.jacrev(fn))(*args)
    want = _fd_jacobian(lambda *a: np.asarray(jax.jacrev(fn)(*a)), args, 0, h=1e-5)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(np.asarray(second), want, rtol=1e-6, atol=1e-6)


def test_third_derivative_of_the_kl_projection():
    z = 2.0 * _rng(13).normal(size=5)
    w = _rng(14).normal(size=5)
    c = _rng(15).normal(size=5)

    def loss(v):
        return jnp.sum(c * srj.permutahedron_projection(v, w, regularization="kl") ** 3)

    third = jax.jacfwd(jax.hessian(loss))(z)
    want = _fd_jacobian(lambda v: np.asarray(jax.hessian(loss)(v)), (z,), 0, h=1e-5)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(np.asarray(third), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jacrev(jax.jacrev(jax.jacrev(loss)))(z)),
                               np.asarray(third), rtol=1e-10, atol=1e-12)


# --- vmap, jit ------------------------------------------------------------------------


@pytest.mark.parametrize("reg", REGS)
def test_vmap_with_in_axes_on_each_input(reg):
    rng = _rng(16)
    Z, W = 2.0 * rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    U = rng.uniform(0.5, 2.0, size=(4, 5))
    z, w, u = Z[0], W[0], U[0]

    def proj(a, b):
        return srj.permutahedron_projection(a, b, regularization=reg)

    def iso(a, b):
        return srj.isotonic_regression(a, weights=b, regularization=reg)

    def broadcast(v):
        return np.broadcast_to(v, (4, 5)).copy()

    cases = [
        (jax.vmap(proj, in_axes=(None, 0))(z, W),
         srn.permutahedron_projection(broadcast(z), W, regularization=reg)),
        (jax.vmap(proj, in_axes=(0, None))(Z, w),
         srn.permutahedron_projection(Z, w, regularization=reg)),
        (jax.vmap(proj, in_axes=(1, 1), out_axes=1)(Z.T, W.T),
         srn.permutahedron_projection(Z, W, regularization=reg).T),
        (jax.vmap(iso, in_axes=(None, 0))(z, U),
         srn.isotonic_regression(broadcast(z), weights=U, regularization=reg)),
        (jax.vmap(iso, in_axes=(0, None))(Z, u),
         srn.isotonic_regression(Z, weights=broadcast(u), regularization=reg)),
        (jax.vmap(lambda a: srj.soft_topk_mask(a, 2, EPS, regularization=reg))(Z),
         srn.soft_topk_mask(Z, 2, EPS, regularization=reg)),
        (jax.vmap(lambda a, t: srj.spearman(a, t, EPS, regularization=reg),
                  in_axes=(0, None))(Z, z),
         srn.spearman(Z, broadcast(z), EPS, regularization=reg)),
        (jax.vmap(lambda a: srj.soft_quantile(a, [0.3, 0.6], EPS, regularization=reg))(Z),
         srn.soft_quantile(Z, [0.3, 0.6], EPS, regularization=reg).T),
    ]
    for i, (got, want) in enumerate(cases):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12, err_msg=str(i))

    # vmap of grad: each row's gradient in z and in w, against numpy's pullback per row.
    C = rng.normal(size=(4, 5))
    grads = jax.vmap(jax.grad(lambda a, b, cc: jnp.sum(cc * proj(a, b)), argnums=(0, 1)),
                     in_axes=(None, 0, 0))(z, W, C)
    for r in range(4):
        _, vjp = srn.permutahedron_projection_with_vjp(z, W[r], regularization=reg)
        for got, want in zip(grads, vjp(C[r])):
            np.testing.assert_allclose(np.asarray(got[r]), want, rtol=1e-10, atol=1e-12)
    grads = jax.vmap(jax.grad(lambda a, b, cc: jnp.sum(cc * iso(a, b)), argnums=(0, 1)),
                     in_axes=(0, None, 0))(Z, u, C)
    for r in range(4):
        _, vjp = srn.isotonic_regression_with_vjp(Z[r], weights=u, regularization=reg)
        for got, want in zip(grads, vjp(C[r])):
            np.testing.assert_allclose(np.asarray(got[r]), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", CASES)
def test_jit_and_jit_of_grad(name, reg):
    args, fn, np_fn = _case(name, reg)
    want, np_vjp = np_fn(*args)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(*args)), want, rtol=1e-12, atol=1e-12)
    c = _rng(17).normal(size=want.shape)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(c * fn(*a)), argnums=tuple(range(len(args)))))(
        *args)
    for got, ref in zip(grads, np_vjp(c)):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
def test_isotonic_with_concrete_weights_under_jit_checkpoint_and_scan(reg):
    """Weights closed over (numpy, or a jax array: concrete, not traced) are
    checked as given and used as constants inside jit, checkpoint and scan."""
    rng = _rng(31)
    y = rng.normal(size=(2, 5)) * 2
    u = rng.uniform(0.5, 3.0, size=(2, 5))
    c = rng.normal(size=(2, 5))
    want, np_vjp = srn.isotonic_regression_with_vjp(y, weights=u, regularization=reg)
    want_grad = np_vjp(c)[0]
    for weights in (u, jnp.asarray(u)):
        def fn(v, weights=weights):
            return srj.isotonic_regression(v, weights=weights, regularization=reg)

        def loss(v, fn=fn):
            return jnp.sum(c * fn(v))

        np.testing.assert_allclose(np.asarray(jax.jit(fn)(y)), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss))(y)), want_grad,
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(jax.grad(jax.checkpoint(loss))(y)), want_grad,
                                   rtol=1e-10, atol=1e-12)
        _, scanned = jax.lax.scan(lambda carry, v, fn=fn: (carry, fn(v)), 0.0, y[None])
        np.testing.assert_allclose(np.asarray(scanned[0]), want, rtol=1e-12, atol=1e-12)


def test_isotonic_weights_that_overflow_or_underflow_in_the_compute_dtype_are_refused():
    """Valid float64 weights that leave float32's range when y is float32:
    inf weights would give NaN solutions, 0 weights meaningless ones."""
    y = np.array([[1.0, 3.0, 2.0, 4.0]], np.float32)
    cases = ((np.full((1, 4), 1e300), r"weights must stay finite in float32"),
             (np.full((1, 4), 1e-50), r"weights must stay > 0 in float32"),
             # subnormal in float32: XLA flushes it to 0 (numpy would compute with it)
             (np.full((1, 4), 1e-40), r"weights must stay > 0 in float32"))
    for weights, message in cases:
        for w in (weights, weights.tolist()):
            with pytest.raises(ValueError, match=message):
                srj.isotonic_regression(y, weights=w)
            with pytest.raises(ValueError, match=message):
                jax.jit(lambda v, w=w: srj.isotonic_regression(v, weights=w))(y)
            if np.all(weights < 1e-45) or np.all(weights > 1e39):
                with pytest.raises(ValueError, match=message):
                    srn.isotonic_regression(y, weights=w)


@pytest.mark.parametrize("reg", REGS)
def test_topk_gradient_where_x_over_eps_overflows(reg):
    """|x| / eps beyond the float range with finite masks: the gradients in
    both modes equal softrank.numpy's (tested there against the closed form),
    with no NaN."""
    c = np.array([[1.0, -2.0, 0.5, 3.0]])
    for x, k in ((np.array([[3e9, 1e9, 2e9, 5.0]]), 2), (np.array([[1e10, 1e10, -1e10, 0.0]]), 1)):
        for eps in (1e-300, 1e-310):
            _, vjp = srn.soft_topk_mask_with_vjp(x, k, eps, regularization=reg)
            with np.errstate(over="ignore"):
                want = vjp(c)

            def fn(v, k=k, eps=eps):
                return srj.soft_topk_mask(v, k, eps, regularization=reg)

            grad = jax.grad(lambda v: jnp.sum(c * fn(v)))(x)
            np.testing.assert_array_equal(np.asarray(grad), want)
            tangent = jax.jvp(fn, (x,), (c,))[1]  # the mask's Jacobian is symmetric
            np.testing.assert_array_equal(np.asarray(tangent), want)


def test_argument_checks_shared_with_numpy():
    """increasing must be a bool, q real numbers, k any integer scalar (a
    concrete jax one too); the integer-input error suggests no torch idiom."""
    x = _rng(32).normal(size=(2, 5))
    for bad in ("no", None, 1):
        with pytest.raises(TypeError, match=r"\bincreasing\b"):
            srj.isotonic_regression(x, increasing=bad)
    for bad in ("0.5", True, jnp.array(True), [0.5, True]):
        with pytest.raises(TypeError, match=r"\bq\b"):
            srj.soft_quantile(x, bad)
    expected = srn.soft_topk_mask(x, 2, 0.5)
    for k in (np.int64(2), jnp.int32(2), jnp.array(2)):
        np.testing.assert_allclose(np.asarray(srj.soft_topk_mask(x, k, 0.5)), expected,
                                   rtol=1e-12, atol=1e-12)
    for bad in (True, 2.0, jnp.array(True)):
        with pytest.raises(TypeError, match=r"\bk\b"):
            srj.soft_topk_mask(x, bad, 0.5)
    with pytest.raises(TypeError, match=r"x must have a floating dtype") as info:
        srj.soft_rank(jnp.arange(4), 1.0)
    assert ".float()" not in str(info.value)


def test_jit_with_static_k_q_and_eps():
    x = _rng(18).normal(size=(3, 6))
    topk = jax.jit(srj.soft_topk_mask, static_argnums=(1, 2))
    np.testing.assert_allclose(np.asarray(topk(x, 3, 0.4)), srn.soft_topk_mask(x, 3, 0.4),
                               rtol=1e-12, atol=1e-12)
    quant = jax.jit(srj.soft_quantile, static_argnums=(1, 2))
    np.testing.assert_allclose(np.asarray(quant(x, 0.25, 0.4)), srn.soft_quantile(x, 0.25, 0.4),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
def test_linearize_checkpoint_scan_and_pmap(reg):
    """Against softrank.numpy's values and pullbacks (z and w of the projection)."""
    rng = _rng(24)
    Z, w = 2.0 * rng.normal(size=(4, 5)), rng.normal(size=5)
    C, T = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))

    def proj(a, b):
        return srj.permutahedron_projection(a, b, regularization=reg)

    value, np_vjp = srn.permutahedron_projection_with_vjp(Z, w, regularization=reg)
    out, linear = jax.linearize(lambda a: proj(a, w), Z)
    np.testing.assert_allclose(np.asarray(out), value, rtol=1e-12, atol=1e-12)
    want = np.tensordot(_fd_jacobian(lambda a: proj(a, w), (Z,), 0), T, axes=2)
    np.testing.assert_allclose(np.asarray(linear(T)), want, rtol=1e-6, atol=1e-7)

    loss = jax.checkpoint(lambda a, b: jnp.sum(C * proj(a, b)))
    for got, ref in zip(jax.grad(loss, argnums=(0, 1))(Z, w), np_vjp(C)):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-10, atol=1e-12)

    def step(carry, row):  # one row per step; the carry accumulates the loss
        return carry + jnp.sum(row[1] * proj(row[0], w)), None

    grads = jax.grad(lambda a: jax.lax.scan(step, 0.0, (a, C))[0])(Z)
    np.testing.assert_allclose(np.asarray(grads), np_vjp(C)[0], rtol=1e-10, atol=1e-12)

    devices = jax.local_device_count()
    batch = Z[:devices].reshape(devices, 1, 5)
    got = jax.pmap(lambda a: srj.isotonic_regression(a, regularization=reg))(batch)
    np.testing.assert_allclose(np.asarray(got).reshape(devices, 5),
                               srn.isotonic_regression(Z[:devices], regularization=reg),
                               rtol=1e-12, atol=1e-12)


# --- eps -> 0 limits --------------------------------------------------------------------


def test_spearman_at_eps_zero_and_small_eps_equals_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = _rng(19)
    pred = rng.normal(size=(5, 9))
    pred[0, :3] = pred[0, 3]  # ties in pred (eps = 0: mean ranks)
    target = rng.integers(0, 4, size=(5, 9)).astype(np.float64)  # ties in target
    want = np.array([scipy_stats.spearmanr(p, t).statistic for p, t in zip(pred, target)])
    for reg in REGS:
        np.testing.assert_allclose(np.asarray(srj.spearman(pred, target, 0.0,
                                                           regularization=reg)),
                                   want, rtol=1e-12, atol=1e-12)
    distinct = rng.normal(size=(5, 9))
    want = np.array([scipy_stats.spearmanr(p, t).statistic for p, t in zip(distinct, target)])
    for reg in REGS:
        np.testing.assert_allclose(np.asarray(srj.spearman(distinct.T, target.T, 1e-4,
                                                           regularization=reg, axis=0)),
                                   want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("x64, dtype, base", [(False, np.int32, 2**24), (True, np.int64, 2**53)])
def test_spearman_ranks_integer_targets_exactly(x64, dtype, base):
    """Integer targets are ranked as integers: without x64 an int32 target above
    2^24 (in float32, 2^24 + 1 == 2^24), with it an int64 one above 2^53,
    keeps its distinct values (they were cast to float first, and merged into
    ties). Ranks as scipy.stats.rankdata ("average") of the target; the
    reference is scipy.stats.spearmanr of pred and those ranks (spearmanr
    itself casts an int64 target to float64)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = _rng(27)
    with jax_x64(x64):
        float_dtype = np.float64 if x64 else np.float32
        pred = rng.normal(size=(5, 9)).astype(float_dtype)
        target = (base + rng.integers(0, 4, size=(5, 9))).astype(dtype)  # ties
        target[1] = base + np.arange(9)[::-1]  # distinct, one apart
        target[2, :4] = base  # only base and base + 1
        target[2, 4:] = base + 1
        ranks = scipy_stats.rankdata(target, axis=-1).astype(float_dtype)
        want = np.array([scipy_stats.spearmanr(p, r).statistic for p, r in zip(pred, ranks)])
        tol = 1e-12 if x64 else 1e-6
        for reg in REGS:
            got = srj.spearman(pred, target, 0.0, regularization=reg)
            assert got.dtype == float_dtype
            np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)
            got = jax.jit(lambda p, t: srj.spearman(p, t, 1e-4, regularization=reg, axis=0))(
                pred.T, target.T)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e3 * tol, atol=1e3 * tol)
        # the target's own hard ranks correlate with it exactly
        np.testing.assert_allclose(np.asarray(srj.spearman(ranks, target, 0.0)), 1.0,
                                   rtol=tol, atol=tol)
        grad = jax.grad(lambda p: jnp.sum(srj.spearman(p, target, 0.5)))(pred)
        want = jax.grad(lambda p: jnp.sum(srj.spearman(p, ranks, 0.5)))(pred)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=tol, atol=tol)


@pytest.mark.parametrize("reg", REGS)
def test_soft_quantile_at_eps_zero_equals_np_quantile(reg):
    x = _rng(20).normal(size=(4, 7, 3))
    for q in (0.5, 0.0, 1.0, 0.37, [0.1, 0.5, 0.95], np.array([0.25])):
        for axis in (0, 1, -1):
            want = np.quantile(x, q, axis=axis, method="linear")
            got = srj.soft_quantile(x, q, 0.0, regularization=reg, axis=axis)
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
            small = srj.soft_quantile(x, q, 1e-6, regularization=reg, axis=axis)
            np.testing.assert_allclose(np.asarray(small), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(srj.soft_median(x, 0.0, regularization=reg, axis=1)),
                               np.median(x, axis=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
def test_soft_topk_mask_limits_and_invariants(reg):
    x = np.array([[0.3, 2.0, -1.0, 2.0, 0.5, 1.0],    # tie at the boundary for k = 2, 3
                  [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    hard = {2: [[0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]],
            1: [[0, 0.5, 0, 0.5, 0, 0], [1, 0, 0, 0, 0, 0]],
            3: [[0, 1, 0, 1, 0, 1], [1, 1, 1, 0, 0, 0]],
            6: [[1] * 6, [1] * 6]}
    for k, want in hard.items():
        got = srj.soft_topk_mask(x, k, 0.0, regularization=reg)
        np.testing.assert_allclose(np.asarray(got), np.array(want, float), atol=1e-12)
        small = srj.soft_topk_mask(x, k, 1e-6, regularization=reg)
        np.testing.assert_allclose(np.asarray(small), np.array(want, float), atol=1e-6)
    if reg == "l2":
        np.testing.assert_array_equal(np.asarray(srj.soft_topk_mask(x, 0, 0.3)), np.zeros_like(x))
    rng = _rng(21)
    for eps in (0.05, 0.5, 5.0, np.inf):
        z = rng.normal(size=(6, 8))
        for k in (1, 3, 8):
            mask = np.asarray(srj.soft_topk_mask(z.T, k, eps, regularization=reg, axis=0))
            assert np.all(mask >= -1e-12) and np.all(mask <= 1 + 1e-12)
            np.testing.assert_allclose(mask.sum(axis=0), k, rtol=1e-12)


# --- sharding (two forced host devices) and export ------------------------------------

SHARDING_SCRIPT = r"""
import json, re
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import softrank.jax as srj
import softrank.numpy as srn

assert len(jax.devices()) == 2
mesh = jax.make_mesh((2,), ("b",))
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 6)).astype(np.float32)
w = rng.normal(size=(8, 6)).astype(np.float32)
u = rng.uniform(0.5, 2.0, size=(8, 6)).astype(np.float32)
c = rng.normal(size=(8, 6)).astype(np.float32)
shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("b")))
xs, ws, us = shard(x), shard(w), shard(u)
report = {}

def err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())

proj = lambda z, v: srj.permutahedron_projection(z, v, regularization="kl")
iso = lambda y, v: srj.isotonic_regression(y, weights=v, regularization="kl")
topk = lambda z: srj.soft_topk_mask(z, 2, 0.5)
f = jax.jit(proj)
text = f.lower(xs, ws).compile().as_text()
report["collectives"] = sorted(set(re.findall(r"\b(all-gather|all-reduce|all-to-all|"
                                              r"collective-permute)\(", text)))
report["callbacks"] = [re.search(r" = (.*?) custom-call\(", l).group(1) for l in text.splitlines()
                       if "custom-call(" in l and "callback" in l]
report["softrank_calls"] = [re.search(r" = (.*?) custom-call\(", l).group(1)
                            for l in text.splitlines()
                            if "custom-call(" in l and "softrank_projection_v1" in l]
y = f(xs, ws)
report["forward_sharding"] = str(y.sharding)
report["projection"] = err(y, srn.permutahedron_projection(x, w, regularization="kl"))
g = jax.jit(jax.grad(lambda z, v: jnp.sum(c * proj(z, v)), argnums=(0, 1)))(xs, ws)
want = srn.permutahedron_projection_with_vjp(x, w, regularization="kl")[1](c)
report["projection_grad"] = max(err(a, b) for a, b in zip(g, want))
report["isotonic"] = err(jax.jit(iso)(xs, us), srn.isotonic_regression(x, weights=u,
                                                                       regularization="kl"))
g = jax.jit(jax.grad(lambda y, v: jnp.sum(c * iso(y, v)), argnums=(0, 1)))(xs, us)
want = srn.isotonic_regression_with_vjp(x, weights=u, regularization="kl")[1](c)
report["isotonic_grad"] = max(err(a, b) for a, b in zip(g, want))
report["topk"] = err(jax.jit(topk)(xs), srn.soft_topk_mask(x, 2, 0.5))
report["quantile"] = err(jax.jit(lambda z: srj.soft_quantile(z, [0.2, 0.7], 0.5))(xs),
                         srn.soft_quantile(x, [0.2, 0.7], 0.5))
report["spearman"] = err(jax.jit(lambda z: srj.spearman(z, w, 0.5))(xs), srn.spearman(x, w, 0.5))
# inside shard_map the callback runs on each shard
inside = jax.jit(jax.shard_map(
    lambda z, v: jax.grad(lambda a: jnp.sum(proj(a, v) ** 2))(z), mesh=mesh,
    in_specs=(P("b"), P("b")), out_specs=P("b")))
want = srn.permutahedron_projection_with_vjp(x, w, regularization="kl")
report["shard_map_grad"] = err(inside(xs, ws), want[1](2 * want[0])[0])
print(json.dumps(report))
"""


def test_batch_sharded_input_gives_the_unsharded_values():
    """jit of a batch-sharded (8, 6) array on two devices: values and
    gradients equal softrank.numpy's. The projection is the core's XLA custom
    call, batch partitionable: each device runs it on its own (4, 6) shard,
    with no collective and no host callback; inside shard_map too."""
    if not srj._ffi_ready():
        pytest.skip("batch partitioning needs the XLA FFI handlers")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = run_python(SHARDING_SCRIPT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["collectives"] == [] and report["callbacks"] == []
    assert len(report["softrank_calls"]) == 1 and "f32[4,6]" in report["softrank_calls"][0]
    for key in ("projection", "isotonic", "topk", "quantile", "spearman"):
        assert report[key] < 1e-6, (key, report)
    for key in ("projection_grad", "isotonic_grad", "shard_map_grad"):
        assert report[key] < 1e-5, (key, report)


EXPORTED_OPERATORS = [
    lambda v: srj.permutahedron_projection(v, v[::-1] * 2.0, regularization="kl"),
    lambda v: srj.soft_topk_mask(v, 2, 0.5),
    lambda v: srj.isotonic_regression(v, weights=jnp.abs(v) + 0.5),
    lambda v: srj.isotonic_regression(v, increasing=False, regularization="kl"),
]
EXPORTED_IDS = ["projection", "topk", "isotonic-weighted", "isotonic-kl"]


@pytest.mark.parametrize("fn", EXPORTED_OPERATORS, ids=EXPORTED_IDS)
def test_export_of_the_operators_round_trips_with_their_gradient(fn):
    """On the CPU the operators are XLA custom calls: they export, serialize and
    run again with the same values and gradient as the direct jit call."""
    if not srj._ffi_ready():
        pytest.skip("jax.export needs the XLA FFI handlers")
    x = _rng(24).normal(size=(3, 6)).astype(np.float32)
    c = _rng(25).normal(size=(3, 6)).astype(np.float32)

    def value_and_grad(v):
        return jax.value_and_grad(lambda a: jnp.sum(c * fn(a)))(v)

    exported = export.export(jax.jit(value_and_grad),
                             disabled_checks=srj.export_disabled_checks())(x)
    value, grad = export.deserialize(exported.serialize()).call(x)
    want_value, want_grad = jax.jit(value_and_grad)(x)
    np.testing.assert_array_equal(value, want_value)
    np.testing.assert_array_equal(grad, want_grad)


@pytest.mark.parametrize("fn", EXPORTED_OPERATORS, ids=EXPORTED_IDS)
def test_export_through_the_host_callback_raises_naming_the_cause(fn, monkeypatch):
    """Without the XLA custom calls (numba engine, no FFI handlers) the operators
    run through jax.pure_callback, which jax.export cannot serialize: a clear
    error, not a broken export."""
    monkeypatch.setattr(srj, "_ffi_ready", lambda: False)
    with pytest.raises(NotImplementedError, match="jax.pure_callback, which jax.export"):
        export.export(jax.jit(fn), disabled_checks=srj.export_disabled_checks())(
            np.ones((2, 4), np.float32))


def test_export_of_the_soft_rank_and_soft_sort_compositions():
    """spearman and soft_quantile compose soft_rank/soft_sort, so they export
    where those do (the XLA custom calls), gradient included."""
    if not srj._ffi_ready():
        pytest.skip("jax.export needs the XLA FFI handlers")
    x = _rng(22).normal(size=(3, 6)).astype(np.float32)
    target = _rng(23).normal(size=(3, 6)).astype(np.float32)

    def fn(v):
        def loss(a):
            return jnp.sum(srj.spearman(a, target, 0.5)
                           + srj.soft_quantile(a, [0.2, 0.6], 0.5).sum(0))

        return jax.value_and_grad(loss)(v)

    exported = export.export(jax.jit(fn), disabled_checks=srj.export_disabled_checks())(x)
    value, grad = export.deserialize(exported.serialize()).call(x)
    want_value, want_grad = jax.jit(fn)(x)
    np.testing.assert_array_equal(value, want_value)
    np.testing.assert_array_equal(grad, want_grad)


# --- argument errors ----------------------------------------------------------------------


def test_arguments_jax_cannot_read_as_arrays_are_named():
    # jax's own messages ("Value 'abcd' with dtype <U4 is not a valid JAX array
    # type", "None is not a valid value for jnp.array") named no argument.
    x = np.ones((2, 4))
    for value in ("abcd", None, object()):
        for name, call in (("x", lambda v: srj.soft_rank(v)), ("x", lambda v: srj.soft_median(v)),
                           ("w", lambda v: srj.permutahedron_projection(x, v)),
                           ("target", lambda v: srj.spearman(x, v)),
                           ("weights", lambda v: srj.isotonic_regression(x, weights=v))):
            if value is None and name in ("w", "weights"):
                continue  # (their default)
            with pytest.raises(TypeError, match=f"^{name} must be a jax array or an array_like"):
                call(value)


def test_bad_arguments_raise_naming_the_argument():
    x = np.ones((2, 4))
    with pytest.raises(ValueError, match="k must lie in"):
        srj.soft_topk_mask(x, 5)
    with pytest.raises(ValueError, match="k must lie in"):
        srj.soft_topk_mask(x, -1)
    with pytest.raises(TypeError, match="k must be an int"):
        srj.soft_topk_mask(x, 1.5)
    with pytest.raises(ValueError, match="regularization='kl' needs k >= 1"):
        srj.soft_topk_mask(x, 0, regularization="kl")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        srj.soft_topk_mask(x, 1, -1.0)
    with pytest.raises(ValueError, match=r"q must lie in \[0, 1\]"):
        srj.soft_quantile(x, 1.5)
    with pytest.raises(ValueError, match=r"q must lie in \[0, 1\]"):
        srj.soft_quantile(x, [0.5, np.nan])
    with pytest.raises(ValueError, match="q must be a scalar or 1-D"):
        srj.soft_quantile(x, [[0.5]])
    with pytest.raises(ValueError, match="w must have length n = 4"):
        srj.permutahedron_projection(x, np.ones(3))
    with pytest.raises(ValueError, match="w must have length n = 4"):
        srj.permutahedron_projection(x, np.ones((4, 2)))
    with pytest.raises(TypeError, match="w must have a real floating dtype"):
        srj.permutahedron_projection(x, np.ones(4, complex))
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        srj.isotonic_regression(x, weights=np.zeros_like(x))
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        srj.isotonic_regression(x, weights=np.full_like(x, np.inf))
    with pytest.raises(ValueError, match="weights must have the shape of y"):
        srj.isotonic_regression(x, weights=np.ones(4))
    with pytest.raises(ValueError, match="weights must stay > 0 in float32"):
        srj.isotonic_regression(x.astype(np.float32), weights=np.full_like(x, 1e-300))
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        srj.spearman(x, np.ones(4))
    with pytest.raises(ValueError, match="regularization"):
        srj.permutahedron_projection(x, regularization="l1")
    with pytest.raises(ValueError, match="axis"):
        srj.isotonic_regression(x, axis=2)
    with pytest.raises(TypeError, match="pred must have a floating dtype"):
        srj.spearman(np.ones((2, 4), int), x)
    with pytest.raises(TypeError, match="z must have a floating dtype"):
        srj.permutahedron_projection(np.ones(4, int))


def test_traced_static_arguments_raise_naming_them():
    x = np.ones((2, 4))
    with pytest.raises(TypeError, match="k must be a static Python int"):
        jax.jit(srj.soft_topk_mask)(x, 2)
    with pytest.raises(TypeError, match="eps must be a static Python number"):
        jax.grad(lambda e: jnp.sum(srj.soft_topk_mask(x, 2, e)))(0.5)
    with pytest.raises(TypeError, match="q must be a static"):
        jax.jit(srj.soft_quantile)(x, 0.5)
    with pytest.raises(TypeError, match="eps must be a static Python number"):
        jax.jit(srj.spearman)(x, x, 0.5)


@pytest.mark.parametrize("eps", [1e-310, 5e-324])
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("k", [1, 2])
def test_jitted_top_k_derivatives_at_a_subnormal_eps_have_no_nan(eps, reg, k):
    """At a subnormal eps, 1 / eps overflows and the gradient is scaled by two
    finite factors (softrank._derivatives._split_scale), so that a singleton
    block's exact 0 stays 0. Under jit, XLA folded the two constants into their
    product, inf, and 0 * inf gave NaN where the unjitted call gives 0. The
    references: the unjitted gradient and jvp, and the hard top-k's derivative
    (0 off the ties; +-inf on the tie at the k-th place where there is one)."""
    x = jnp.array([[3.0, 1.0, 2.0, 2.0, 0.5]])
    direction = jnp.arange(1.0, 6.0)[None]

    def mask(v):
        return srj.soft_topk_mask(v, k, eps, regularization=reg)

    def loss(v):
        return (mask(v) * direction).sum()

    def tangent(v, t):
        return jax.jvp(mask, (v,), (t,))[1]

    for eager, jitted in ((jax.grad(loss)(x), jax.jit(jax.grad(loss))(x)),
                          (tangent(x, direction), jax.jit(tangent)(x, direction))):
        eager, jitted = np.asarray(eager), np.asarray(jitted)
        assert not np.isnan(eager).any()
        assert not np.isnan(jitted).any(), (eager, jitted)
        assert np.array_equal(np.isinf(jitted), np.isinf(eager))
        assert np.array_equal(jitted[np.isinf(eager)], eager[np.isinf(eager)])
        # The ties at 2.0 sit at the k-th place only for k = 2; the rest is exact 0.
        if k == 1:
            assert np.array_equal(eager, np.zeros_like(eager))
