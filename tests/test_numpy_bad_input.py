"""Bad input raises ValueError/TypeError at the Python boundary, and the message
names the offending argument (SPEC section 2)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from softrank import numpy as srn

X = np.array([[0.3, -1.0, 2.0, 0.5], [1.0, 1.0, 0.0, -2.0]])
G = np.ones_like(X)

FORWARD = [srn.soft_rank, srn.soft_sort]
WITH_VECTOR = [srn.soft_rank_vjp, srn.soft_sort_vjp, srn.soft_rank_jvp, srn.soft_sort_jvp]


def _calls(x=X, **kw):
    """Every soft operator entry point with the same keyword arguments."""
    calls = [(f.__name__, lambda f=f: f(x, **kw)) for f in FORWARD]
    calls += [(f.__name__, lambda f=f: f(x, np.ones(np.shape(x)), **kw)) for f in WITH_VECTOR]
    return calls


def _raises_naming(fn, name, types=(ValueError, TypeError)):
    with pytest.raises(types) as info:
        fn()
    msg = str(info.value)
    assert re.search(rf"\b{re.escape(name)}\b", msg), f"message does not name {name!r}: {msg!r}"
    return info.value


def test_zero_dim_x(backend):
    for x in (np.float64(1.5), np.array(2.0), 3.0):
        for f in FORWARD:
            _raises_naming(lambda: f(x), "x")
        for f in WITH_VECTOR:
            _raises_naming(lambda: f(x, 1.0), "x")


def test_zero_dim_y_isotonic(backend):
    # isotonic_regression's array argument is called y
    for y in (np.float64(1.5), np.array(2.0), 3.0):
        _raises_naming(lambda: srn.isotonic_regression(y), "y")
        _raises_naming(lambda: srn.isotonic_regression_vjp(y, 1.0), "y")


@pytest.mark.parametrize("eps", [-1.0, -1e-300, -np.inf, np.nan, np.float32("nan")])
def test_bad_eps_value(backend, eps):
    for name, call in _calls(eps=eps):
        err = _raises_naming(call, "eps", ValueError)
        assert isinstance(err, ValueError), name


@pytest.mark.parametrize("eps", [1 + 2j, np.complex128(1.0), "1.0", None, [1.0], np.array([1.0, 2.0])])
def test_bad_eps_type(backend, eps):
    for name, call in _calls(eps=eps):
        _raises_naming(call, "eps")


def test_good_eps_spellings(backend):
    """Real scalars of any kind are accepted: int, numpy float32/int64 scalars, 0-d arrays."""
    expected = srn.soft_rank(X, 2.0)
    for eps in (2, np.float32(2.0), np.int64(2), np.array(2.0)):
        np.testing.assert_array_equal(srn.soft_rank(X, eps), expected)


def test_eps_beyond_the_float_range_is_the_inf_limit(backend):
    """An int too large for a float (10**400) is eps = inf, not an OverflowError."""
    for f in FORWARD:
        np.testing.assert_array_equal(f(X, 10**400), f(X, np.inf))
    _raises_naming(lambda: srn.soft_rank(X, -10**400), "eps", ValueError)


@pytest.mark.parametrize("increasing", ["no", "decreasing", None, 0, 1, 1.0, np.array([True])])
def test_increasing_must_be_a_bool(backend, increasing):
    """Read by truthiness, "decreasing" would fit an increasing regression."""
    for call in (lambda: srn.isotonic_regression(X, increasing=increasing),
                 lambda: srn.isotonic_regression_with_vjp(X, increasing=increasing),
                 lambda: srn.isotonic_regression_vjp(X, G, increasing=increasing)):
        _raises_naming(call, "increasing", TypeError)
    np.testing.assert_array_equal(srn.isotonic_regression(X, increasing=np.bool_(False)),
                                  srn.isotonic_regression(X, increasing=False))


@pytest.mark.parametrize("q", ["0.5", b"0.5", True, np.bool_(False), [0.5, True], [0.1, "0.2"],
                               0.5 + 0j])
def test_quantile_levels_must_be_real_numbers(backend, q):
    """np.asarray would parse "0.5" and read True as the level 1."""
    _raises_naming(lambda: srn.soft_quantile(X, q), "q", TypeError)


def test_integer_k_of_any_kind_and_nothing_else(backend):
    expected = srn.soft_topk_mask(X, 2, 0.5)
    for k in (np.int64(2), np.uint8(2), np.array(2)):
        np.testing.assert_array_equal(srn.soft_topk_mask(X, k, 0.5), expected)
    for k in (True, np.bool_(True), 2.0, "2", np.array([2])):
        _raises_naming(lambda: srn.soft_topk_mask(X, k, 0.5), "k", TypeError)


@pytest.mark.parametrize("regularization", ["l1", "L2", "", None, 2, "kl "])
def test_bad_regularization(backend, regularization):
    for name, call in _calls(regularization=regularization):
        _raises_naming(call, "regularization")


@pytest.mark.parametrize("direction", ["up", "asc", "", None, 1, "descending "])
def test_bad_direction(backend, direction):
    for name, call in _calls(direction=direction):
        _raises_naming(call, "direction")


@pytest.mark.parametrize("axis", [2, -3, 100])
def test_axis_out_of_range(backend, axis):
    for name, call in _calls(axis=axis):
        _raises_naming(call, "axis", ValueError)
    _raises_naming(lambda: srn.isotonic_regression(X, axis=axis), "axis", ValueError)
    _raises_naming(lambda: srn.isotonic_regression_vjp(X, G, axis=axis), "axis", ValueError)


@pytest.mark.parametrize("axis", [1.0, "0", None, 0.5, [0]])
def test_axis_not_int(backend, axis):
    for name, call in _calls(axis=axis):
        _raises_naming(call, "axis")
    _raises_naming(lambda: srn.isotonic_regression(X, axis=axis), "axis")


def test_numpy_integer_axis_is_accepted(backend):
    np.testing.assert_array_equal(srn.soft_rank(X, axis=np.int64(0)), srn.soft_rank(X, axis=0))


@pytest.mark.parametrize("x", [
    X.astype(np.complex128),
    np.array([1.0, "a", None], dtype=object),
    np.array([[1.0, 2.0], [3.0, 4.0]], dtype=object),
    np.array(["b", "a", "c"]),
    np.array([b"b", b"a"]),
])
def test_bad_x_dtype(backend, x):
    for name, call in _calls(x=x):
        _raises_naming(call, "x")
    _raises_naming(lambda: srn.isotonic_regression(x), "y")


def test_masked_arrays_are_refused(backend):
    """The mask would be dropped silently: the masked entries ranked as values."""
    masked = np.ma.masked_array(X, mask=X < 0)
    for name, call in _calls(x=masked):
        _raises_naming(call, "x", TypeError)
    _raises_naming(lambda: srn.isotonic_regression(masked), "y", TypeError)
    _raises_naming(lambda: srn.isotonic_regression(X, weights=np.ma.masked_array(G)), "weights",
                   TypeError)
    _raises_naming(lambda: srn.spearman(X, masked), "target", TypeError)
    _raises_naming(lambda: srn.soft_rank_vjp(X, np.ma.masked_array(G), 1.0), "cotangent", TypeError)


def test_bad_cotangent_and_tangent(backend):
    for f, name in ((srn.soft_rank_vjp, "cotangent"), (srn.soft_sort_vjp, "cotangent"),
                    (srn.soft_rank_jvp, "tangent"), (srn.soft_sort_jvp, "tangent")):
        for bad in (np.ones((4, 2)), np.ones(4), np.ones((2, 4, 1)), np.ones((2, 5)), 1.0):
            _raises_naming(lambda: f(X, bad, 1.0), name, ValueError)
        _raises_naming(lambda: f(X, G.astype(np.complex128), 1.0), name)
        _raises_naming(lambda: f(X, np.full(X.shape, None, dtype=object), 1.0), name)
    for bad in (np.ones((4, 2)), np.ones(4)):
        _raises_naming(lambda: srn.isotonic_regression_vjp(X, bad), "cotangent", ValueError)


@pytest.mark.parametrize("weights", [
    np.array([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]),
    np.array([[1.0, -2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]),
    np.array([[1.0, np.nan, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]),
    np.array([[1.0, np.inf, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]),
    np.ones((4, 2)),
    np.ones(3),
])
def test_bad_weights(backend, weights):
    _raises_naming(lambda: srn.isotonic_regression(X, weights=weights), "weights", ValueError)
    _raises_naming(lambda: srn.isotonic_regression_vjp(X, G, weights=weights), "weights", ValueError)


def test_bad_weights_dtype(backend):
    _raises_naming(lambda: srn.isotonic_regression(X, weights=G.astype(np.complex128)), "weights")


def test_rejects_before_computing(backend):
    """A bad argument after a huge x is still rejected promptly (validation
    happens at the boundary), and nothing is written to the input."""
    x = np.random.default_rng(0).normal(size=(200, 1000))
    before = x.copy()
    _raises_naming(lambda: srn.soft_rank(x, -1.0), "eps", ValueError)
    _raises_naming(lambda: srn.soft_rank_vjp(x, x[:, :10], 1.0), "cotangent", ValueError)
    np.testing.assert_array_equal(x, before)


def test_ragged_lists_are_refused_naming_the_argument():
    """numpy's own 'inhomogeneous shape' ValueError named no argument."""
    ragged = [[3.0, 1.0, 2.0], [1.0, 2.0]]
    for name, call in _calls(x=[[3.0, 1.0, 2.0], [1.0, 2.0, 0.0]]):
        call()  # the rectangular list is accepted
    _raises_naming(lambda: srn.soft_rank(ragged), "x")
    _raises_naming(lambda: srn.soft_rank_vjp(X[:, :3], ragged), "cotangent")
    _raises_naming(lambda: srn.isotonic_regression(ragged), "y")
    _raises_naming(lambda: srn.spearman(X, [[1.0], [2.0, 3.0]]), "target")


def test_a_pullback_is_refused_by_pickle_as_a_local_function():
    """Pickling a pullback said it was 'not the same object as
    softrank.numpy.soft_rank_vjp', a different public function."""
    import pickle

    for with_vjp in (srn.soft_rank_with_vjp, srn.soft_sort_with_vjp,
                     srn.isotonic_regression_with_vjp, srn.soft_topk_mask_with_vjp):
        args = (X, 2) if with_vjp is srn.soft_topk_mask_with_vjp else (X,)
        _, vjp = with_vjp(*args)
        with pytest.raises((AttributeError, pickle.PicklingError), match="local object"):
            pickle.dumps(vjp)


def test_time_values_none_and_a_negative_fraction_are_refused_by_name(backend):
    # numpy registers timedelta64 as a numbers.Integral: an eps, axis, k,
    # q or thread count of "2 seconds" was taken (or failed in float()
    # without naming the argument); q=None was a ValueError about its range;
    # Fraction(-1, 10**400) rounds to -0.0 and was taken as eps = 0.
    import softrank
    from fractions import Fraction

    seconds = np.timedelta64(2, "s")
    for name, call in [
        ("eps", lambda: srn.soft_rank(X, seconds)),
        ("axis", lambda: srn.soft_rank(X, 1.0, axis=np.timedelta64(0))),
        ("k", lambda: srn.soft_topk_mask(X, seconds)),
        ("q", lambda: srn.soft_quantile(X, np.timedelta64(0, "s"))),
        ("q", lambda: srn.soft_quantile(X, None)),
        ("num_threads", lambda: softrank.set_num_threads(seconds)),
    ]:
        error = _raises_naming(call, name, TypeError)
        assert "timedelta" in str(error) or "None" in str(error), str(error)
    _raises_naming(lambda: srn.soft_rank(X, Fraction(-1, 10**400)), "eps", ValueError)
    np.testing.assert_array_equal(srn.soft_rank(X, Fraction(1, 2)), srn.soft_rank(X, 0.5))
