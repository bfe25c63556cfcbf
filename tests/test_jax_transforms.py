"""softrank.jax under forward mode and derivatives of every order.

References: central finite differences (float64) of softrank.numpy's forward
pass, which shares no code with the adapter's derivative rules; and the
transforms against each other (jvp / jacfwd / jacrev / vjp; hessian /
jacrev(jacrev) / jacfwd(jacfwd) / jacrev(jacfwd)). Every test runs on both of
the adapter's paths (XLA custom calls and jax.pure_callback).
"""
from __future__ import annotations

import typing

import numpy as np
import pytest

import softrank.numpy as srn
from frameworks import jax_x64, require

jax = require("jax")
import jax.numpy as jnp  # noqa: E402

import softrank.jax as srj  # noqa: E402
from softrank._types import Direction, Regularization  # noqa: E402

EPS = 0.7
OPS = ("soft_rank", "soft_sort")
REGS = ("l2", "kl")


@pytest.fixture(autouse=True, params=["ffi", "callback"])
def path(request, monkeypatch):
    """The adapter's path under test; "ffi" is skipped where unavailable."""
    if request.param == "ffi":
        if not srj._ffi_ready():
            pytest.skip("the compiled engine has no XLA FFI handlers")
    else:
        monkeypatch.setattr(srj, "_ffi_ready", lambda: False)
    jax.clear_caches()
    with jax_x64(True):  # (float64 for the finite differences)
        yield request.param


def _row(n=6, seed=6):
    """Values spread so that, at EPS, the seeds used here pool some PAV block
    of every operator (a row of singleton blocks has no curvature)."""
    return 3.0 * np.random.default_rng(seed).normal(size=n)


def _weights(n=6, seed=1):
    return np.random.default_rng(seed).normal(size=n)


def _jax_fn(op, reg, direction="ascending"):
    return lambda v: getattr(srj, op)(v, EPS, regularization=reg, direction=direction)


def _numpy_fn(op, reg, direction="ascending"):
    return lambda v: getattr(srn, op)(v, EPS, regularization=reg, direction=direction)


def _fd_jacobian(fn, x, h=1e-6):
    cols = []
    for k in range(x.size):
        e = np.zeros_like(x)
        e.flat[k] = h
        cols.append((fn(x + e) - fn(x - e)).ravel() / (2 * h))
    return np.stack(cols, axis=-1)


def _fd_hessian(fn, x, h=1e-4):
    """Second central differences of a numpy function: shape fn(x).shape + (n, n)."""
    n = x.size
    cols = []
    for i in range(n):
        for j in range(n):
            ei, ej = np.zeros(n), np.zeros(n)
            ei[i], ej[j] = h, h
            cols.append((np.asarray(fn(x + ei + ej)) - fn(x + ei - ej) - fn(x - ei + ej)
                         + fn(x - ei - ej)) / (4 * h * h))
    return np.stack(cols, axis=-1).reshape(np.shape(fn(x)) + (n, n))


def _numpy_loss(op, reg, w, direction="ascending"):
    fn = _numpy_fn(op, reg, direction)
    return lambda v: float((w * np.sin(fn(v))).sum())


def _jax_loss(op, reg, w, direction="ascending"):
    fn = _jax_fn(op, reg, direction)
    return lambda v: (w * jnp.sin(fn(v))).sum()


@pytest.mark.parametrize("direction", ["ascending", "descending"])
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("op", OPS)
def test_jvp_and_jacobians_match_finite_differences(op, reg, direction):
    x = np.stack([_row(seed=8), _row(seed=11)])  # a batch of two rows
    tangent = np.random.default_rng(4).normal(size=x.shape)
    fn = _jax_fn(op, reg, direction)
    want = _fd_jacobian(_numpy_fn(op, reg, direction), x)  # (2*6, 2*6)
    out, jvp = jax.jvp(fn, (x,), (tangent,))  # eager
    np.testing.assert_allclose(out, _numpy_fn(op, reg, direction)(x), rtol=1e-12)
    np.testing.assert_allclose(jvp.ravel(), want @ tangent.ravel(), rtol=1e-6, atol=1e-8)
    forward = jax.jit(jax.jacfwd(fn))(x).reshape(x.size, x.size)
    reverse = jax.jit(jax.jacrev(fn))(x).reshape(x.size, x.size)
    np.testing.assert_allclose(forward, want, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(reverse, forward, rtol=1e-12, atol=1e-14)
    linear = jax.linearize(fn, x)[1]
    np.testing.assert_allclose(linear(tangent), jvp, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("op", OPS)
def test_second_derivatives_every_route_agrees_with_finite_differences(op, reg):
    x, w = _row(seed=6), _weights(seed=1)
    want = _fd_hessian(_numpy_loss(op, reg, w), x)
    loss = _jax_loss(op, reg, w)
    routes = {
        "hessian": jax.jit(jax.hessian(loss)),
        "jacrev(jacrev)": jax.jit(jax.jacrev(jax.jacrev(loss))),
        "jacfwd(jacfwd)": jax.jit(jax.jacfwd(jax.jacfwd(loss))),
        "jacrev(jacfwd)": jax.jit(jax.jacrev(jax.jacfwd(loss))),
    }
    for name, route in routes.items():
        np.testing.assert_allclose(route(x), want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("direction", ["ascending", "descending"])
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("op", OPS)
def test_second_derivative_of_the_operator_itself(op, reg, direction):
    """d^2 f_i / dx_j dx_k of the vector output (no outer nonlinearity): zero
    for l2 (piecewise linear), the engine's curvature for kl."""
    x = _row(seed=12)
    fn = _jax_fn(op, reg, direction)
    second = jax.jit(jax.jacfwd(jax.jacrev(fn)))(x)  # (i, j, k)
    fd = _fd_hessian(_numpy_fn(op, reg, direction), x)
    np.testing.assert_allclose(second, fd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.jacrev(jax.jacfwd(fn)))(x), second, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(jax.jacfwd(fn)))(x), second, rtol=1e-10, atol=1e-12)
    # symmetric in the two differentiated indices
    np.testing.assert_allclose(second, np.swapaxes(second, 1, 2), rtol=1e-10, atol=1e-12)
    if reg == "l2":
        assert not np.any(np.asarray(second))
    else:
        assert np.abs(np.asarray(second)).max() > 1e-3


@pytest.mark.parametrize("reg, direction", [("l2", "ascending"), ("kl", "ascending"),
                                             ("kl", "descending")])
@pytest.mark.parametrize("op", OPS)
def test_third_derivatives_agree_across_routes_and_with_finite_differences(op, reg, direction):
    x, w = _row(n=4, seed=16), _weights(n=4, seed=9)
    loss = _jax_loss(op, reg, w, direction)
    hessian = jax.jit(jax.hessian(loss))
    h = 1e-5
    want = np.stack([(np.asarray(hessian(x + h * e)) - np.asarray(hessian(x - h * e))) / (2 * h)
                     for e in np.eye(x.size)], axis=-1)
    for name, route in (("jacfwd(hessian)", jax.jacfwd(jax.hessian(loss))),
                        ("jacrev(jacrev(jacrev))", jax.jacrev(jax.jacrev(jax.jacrev(loss)))),
                        ("jacfwd(jacfwd(jacfwd))", jax.jacfwd(jax.jacfwd(jax.jacfwd(loss))))):
        np.testing.assert_allclose(jax.jit(route)(x), want, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("direction", ["ascending", "descending"])
def test_third_derivative_of_the_kl_rank_at_huge_eps_is_zero_not_nan(direction):
    """Beyond eps ~ 1e155 the kl rank's third derivative, O(eps^-3), is below
    the float range: it must come out 0, not the 0 / 0 of a composed quotient
    whose denominator underflows."""
    x, w = _row(n=4, seed=16), _weights(n=4, seed=9)
    for eps in (1e160, 1e300):
        def loss(v, eps=eps):
            return (w * jnp.sin(srj.soft_rank(v, eps, regularization="kl",
                                              direction=direction))).sum()

        for name, route in (("jacfwd(hessian)", jax.jacfwd(jax.hessian(loss))),
                            ("jacrev(jacrev(jacrev))", jax.jacrev(jax.jacrev(jax.jacrev(loss))))):
            got = np.asarray(jax.jit(route)(x))
            np.testing.assert_allclose(got, np.zeros((4, 4, 4)), rtol=0, atol=1e-300,
                                       err_msg=f"{name} at eps={eps}")


def test_fourth_derivative_of_the_kl_sort():
    """A fourth derivative (jacfwd of jacrev of hessian) against differences of the third."""
    x, w = _row(n=3, seed=2), _weights(n=3, seed=11)
    loss = _jax_loss("soft_sort", "kl", w)
    third = jax.jit(jax.jacfwd(jax.hessian(loss)))
    h = 1e-5
    want = np.stack([(np.asarray(third(x + h * e)) - np.asarray(third(x - h * e))) / (2 * h)
                     for e in np.eye(x.size)], axis=-1)
    np.testing.assert_allclose(jax.jit(jax.jacrev(third))(x), want, rtol=1e-4, atol=1e-6)


def test_hessian_uses_one_engine_hvp(path):
    """Forward over reverse differentiates the vjp by the engine's hvp: one
    call of it (vmapped over the basis), with the forward and the vjp."""
    if path != "ffi":
        pytest.skip("counts custom calls in the lowered program")
    loss = _jax_loss("soft_rank", "kl", _weights())
    text = jax.jit(jax.hessian(loss)).lower(_row()).as_text()
    assert text.count("@softrank_hvp_v1") == 1
    assert text.count("@softrank_forward_v1") == 1


@pytest.mark.parametrize("op", OPS)
def test_vmap_of_forward_mode_is_one_call(op, path):
    x = np.stack([_row(seed=s) for s in (6, 8, 10)])
    tangents = np.random.default_rng(12).normal(size=(4, *x.shape))
    fn = _jax_fn(op, "kl")
    batched = jax.vmap(lambda t: jax.jvp(fn, (x,), (t,))[1])
    got = batched(tangents)
    want = _fd_jacobian(_numpy_fn(op, "kl"), x)
    for t, g in zip(tangents, got):
        np.testing.assert_allclose(g.ravel(), want @ t.ravel(), rtol=1e-6, atol=1e-8)
    if path == "ffi":
        assert jax.jit(batched).lower(tangents).as_text().count("@softrank_jvp_v1") == 1


@pytest.mark.parametrize("op", OPS)
def test_checkpoint_scan_and_pmap(op):
    x = np.stack([_row(seed=s) for s in (6, 8, 10)])
    w = np.random.default_rng(13).normal(size=x.shape)
    numpy_vjp = getattr(srn, f"{op}_vjp")
    fn = _jax_fn(op, "kl")
    want = numpy_vjp(x, w, EPS, regularization="kl")

    grad = jax.grad(jax.checkpoint(lambda v: (w * fn(v)).sum()))(x)
    np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-12)

    def step(carry, row_and_weight):
        row, weight = row_and_weight
        return carry + (weight * fn(row)).sum(), None

    scanned = jax.grad(lambda v: jax.lax.scan(step, 0.0, (v, w))[0])(x)
    np.testing.assert_allclose(scanned, want, rtol=1e-10, atol=1e-12)

    pmapped = jax.pmap(jax.grad(lambda v, c: (c * fn(v)).sum()))(x[None], w[None])[0]
    np.testing.assert_allclose(pmapped, want, rtol=1e-10, atol=1e-12)
    hess = jax.pmap(jax.hessian(lambda v: jnp.sin(fn(v)).sum()))(x[:1])[0]
    np.testing.assert_allclose(hess, jax.hessian(lambda v: jnp.sin(fn(v)).sum())(x[0]),
                               rtol=1e-10, atol=1e-12)


def test_nan_rows_and_empty_inputs_under_forward_mode():
    x = np.stack([_row(seed=14), _row(seed=15)])
    x[1, 2] = np.nan
    _, tangent_out = jax.jvp(_jax_fn("soft_rank", "kl"), (x,), (np.ones_like(x),))
    assert np.isnan(np.asarray(tangent_out[1])).all()
    assert np.isfinite(np.asarray(tangent_out[0])).all()
    for shape in ((0,), (3, 0), (2, 1)):
        empty = jnp.ones(shape)
        assert jax.jacfwd(_jax_fn("soft_sort", "kl"))(empty).shape == shape + shape
        assert jax.hessian(lambda v: srj.soft_sort(v, regularization="kl").sum())(empty).shape \
            == shape + shape


def test_unsupported_transforms_raise_naming_what_to_do():
    x = jnp.asarray(_row())
    with pytest.raises(TypeError, match="eps must be a static Python number"):
        jax.grad(lambda e: srj.soft_rank(x, e).sum())(1.0)
    with pytest.raises(NotImplementedError, match="softrank_forward_value"):
        jax.linear_transpose(srj.soft_rank, x)(x)  # not a linear function


def test_public_signatures_use_the_literal_aliases():
    for fn in (srj.soft_rank, srj.soft_sort):
        hints = typing.get_type_hints(fn)
        assert hints["regularization"] == Regularization
        assert hints["direction"] == Direction


DISABLE_JIT_CALLS = {
    "soft_rank": lambda x: srj.soft_rank(x, 0.5),
    "soft_sort kl": lambda x: srj.soft_sort(x, 0.5, regularization="kl"),
    "soft_topk_mask": lambda x: srj.soft_topk_mask(x, 2, 0.5),
    "soft_quantile": lambda x: srj.soft_quantile(x, 0.3, 0.5),
    "soft_median": lambda x: srj.soft_median(x, 0.5),
    "spearman": lambda x: srj.spearman(x, jnp.broadcast_to(jnp.arange(x.shape[-1]), x.shape), 0.5),
    "isotonic_regression": srj.isotonic_regression,
    "permutahedron_projection": srj.permutahedron_projection,
}


@pytest.mark.parametrize("name", sorted(DISABLE_JIT_CALLS))
def test_every_operator_under_disable_jit(name):
    """``jax.disable_jit()`` (a debugging switch) made every primitive's eager
    rule call jax.jit, which bound the primitive again: RecursionError. Values
    and gradients equal softrank.numpy's (the with_vjp pullbacks)."""
    f = DISABLE_JIT_CALLS[name]
    x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)

    def loss(z):
        return jnp.sum(f(z) ** 2)

    expected_value, expected_grad = f(x), jax.grad(loss)(x)
    with jax.disable_jit():
        value, grad = f(x), jax.grad(loss)(x)
        jitted_grad = jax.jit(jax.grad(loss))(x)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jitted_grad, expected_grad, rtol=1e-5, atol=1e-6)
    reference = {"soft_rank": srn.soft_rank(x, 0.5), "isotonic_regression":
                 srn.isotonic_regression(x), "soft_topk_mask": srn.soft_topk_mask(x, 2, 0.5)}
    if name in reference:
        np.testing.assert_allclose(value, reference[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DISABLE_JIT_CALLS))
def test_jet_is_refused(name):
    """jax.experimental.jet has no rules for softrank: the primitives raised a
    bare KeyError ('softrank_forward_value'); now a NotImplementedError that
    names jet. The custom_jvp operators get jax's own error (as every
    custom_jvp does); none returns a value."""
    jet = pytest.importorskip("jax.experimental.jet")
    f = DISABLE_JIT_CALLS[name]
    x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    custom_jvp = name in ("isotonic_regression", "permutahedron_projection", "soft_topk_mask")
    expected = Exception if custom_jvp else NotImplementedError
    with pytest.raises(expected) as info:
        jet.jet(lambda z: jnp.sum(f(z) ** 2), (x,), ((np.ones_like(x), np.zeros_like(x)),))
    if not custom_jvp:
        assert "jax.experimental.jet" in str(info.value)
