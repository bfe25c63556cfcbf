"""softrank.jax: custom_vjp under jit, vmap and grad, with and without x64; dtypes; errors.

Every test runs on both of the adapter's paths: XLA custom calls into the
compiled core (jax.ffi, where the extension has the handlers) and
jax.pure_callback. Agreement with softrank.numpy over ops, regularizations,
directions, shapes and axes is in test_cross_adapter.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import softrank.numpy as srn
from frameworks import jax_x64, require

jax = require("jax")
import jax.numpy as jnp  # noqa: E402

import softrank.jax as srj  # noqa: E402
from softrank import _host  # noqa: E402

OPS = {"rank": (srj.soft_rank, srn.soft_rank, srn.soft_rank_vjp),
       "sort": (srj.soft_sort, srn.soft_sort, srn.soft_sort_vjp)}


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


@pytest.fixture(autouse=True, params=["ffi", "callback"])
def path(request, monkeypatch):
    """The adapter's path under test; "ffi" is skipped where unavailable."""
    if request.param == "ffi":
        if not srj._ffi_ready():
            pytest.skip("the compiled engine has no XLA FFI handlers (or jax is not on the CPU)")
    else:
        monkeypatch.setattr(srj, "_ffi_ready", lambda: False)
    jax.clear_caches()  # traces made on the other path must not be reused
    return request.param


def _custom_calls(fn, *args) -> int:
    """softrank custom calls in fn's lowered program."""
    return jax.jit(fn).lower(*args).as_text().count("@softrank_")


@pytest.fixture
def count_host_calls(monkeypatch):
    """Count the engine calls the callbacks make (patched before tracing)."""
    calls = {"forward": 0, "vjp": 0}
    # (forward_value, the values-only forward of a call that is not
    # differentiated, counts as a forward.)
    for name, counter in (("forward", "forward"), ("forward_value", "forward"), ("vjp", "vjp")):
        real = getattr(_host, name)

        def counted(*args, _real=real, _counter=counter, **kwargs):
            calls[_counter] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(_host, name, counted)
    return calls


@pytest.mark.parametrize("op", sorted(OPS))
def test_jit_grad_and_value(op):
    forward, numpy_forward, numpy_vjp = OPS[op]
    x = _x((4, 9), seed=1)
    weights = _x((4, 9), seed=2)

    def loss(v):
        return jnp.sum(weights * forward(v, 0.6, regularization="kl", direction="descending", axis=0))

    value, grad = jax.jit(jax.value_and_grad(loss))(x)
    kwargs = dict(regularization="kl", direction="descending", axis=0)
    np.testing.assert_allclose(value, np.sum(weights * numpy_forward(x, 0.6, **kwargs)), rtol=1e-5)
    np.testing.assert_allclose(grad, numpy_vjp(x, weights, 0.6, **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", sorted(OPS))
def test_vmap_folds_the_batch_into_one_call(op, count_host_calls, path):
    forward, numpy_forward, numpy_vjp = OPS[op]
    x = _x((6, 3, 8), seed=3)
    fwd = jax.vmap(lambda v: forward(v, 0.5, regularization="kl", axis=0), in_axes=2, out_axes=2)
    out = fwd(x)
    if path == "callback":
        assert count_host_calls["forward"] == 1
    else:
        assert _custom_calls(fwd, x) == 1
    np.testing.assert_allclose(out, numpy_forward(x, 0.5, regularization="kl", axis=0), rtol=1e-5, atol=1e-5)

    grad_fn = jax.vmap(jax.grad(lambda v: jnp.sum(forward(v, 0.5) ** 2)))
    grads = grad_fn(x)
    if path == "callback":
        assert count_host_calls["vjp"] == 1
    else:
        assert _custom_calls(grad_fn, x) == 2  # the forward with its state, the vjp
    want = numpy_vjp(x, 2 * numpy_forward(x, 0.5), 0.5)
    np.testing.assert_allclose(grads, want, rtol=1e-5, atol=1e-4)


def test_vmap_of_the_backward_with_unbatched_primal():
    """The cotangent is batched while x is not: broadcast_all makes them agree."""
    x = _x((7,), seed=4)
    cotangents = _x((5, 7), seed=5)
    _, pullback = jax.vjp(lambda v: srj.soft_rank(v, 0.4, regularization="kl"), x)
    grads = jax.vmap(pullback)(cotangents)[0]
    for row, cotangent in zip(grads, cotangents):
        np.testing.assert_allclose(row, srn.soft_rank_vjp(x, cotangent, 0.4, regularization="kl"),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x64", [False, True])
def test_with_and_without_x64(x64):
    with jax_x64(x64):
        x = jnp.asarray(_x((3, 10), seed=6, dtype=np.float64))
        assert x.dtype == (jnp.float64 if x64 else jnp.float32)
        out = jax.jit(lambda v: srj.soft_sort(v, 0.2, regularization="kl"))(x)
        grad = jax.grad(lambda v: srj.soft_rank(v, 0.2).sum() + (srj.soft_sort(v) ** 2).sum())(x)
        assert out.dtype == x.dtype and grad.dtype == x.dtype
        tol = 1e-12 if x64 else 1e-5
        np.testing.assert_allclose(out, srn.soft_sort(np.asarray(x), 0.2, regularization="kl"),
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_runs_in_float32(dtype):
    x = jnp.asarray(_x((3, 12), seed=7)).astype(dtype)
    for op in OPS:
        forward = OPS[op][0]
        out = forward(x, 0.5, axis=0)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, forward(x.astype(jnp.float32), 0.5, axis=0).astype(dtype))
        grad = jax.grad(lambda v: forward(v, 0.5).astype(jnp.float32).sum())(x)
        assert grad.dtype == dtype


def test_any_axis_and_list_input():
    x = _x((2, 3, 4, 5), seed=8)
    for axis in range(-4, 4):
        np.testing.assert_allclose(srj.soft_rank(x, 0.3, axis=axis), srn.soft_rank(x, 0.3, axis=axis),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(srj.soft_sort([3.0, 1.0, 2.0], 0.1), [1.0, 2.0, 3.0])


def test_empty_single_and_nan_rows():
    for shape in ((0,), (3, 0), (0, 4), (2, 1)):
        x = jnp.ones(shape)
        for op in OPS:
            assert OPS[op][0](x).shape == shape
            assert jax.grad(lambda v: OPS[op][0](v).sum())(x).shape == shape
    x = _x((3, 5), seed=9)
    x[1, 0] = np.nan
    out = np.asarray(srj.soft_rank(x))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_and_bool_raise(dtype):
    with pytest.raises(TypeError, match=r"^x must have a floating dtype"):
        srj.soft_rank(jnp.zeros(4, dtype))


def test_complex_raises():
    with pytest.raises(TypeError, match=r"^x must have a real floating dtype"):
        srj.soft_sort(jnp.zeros(4, jnp.complex64))


def test_bad_arguments_name_themselves():
    x = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        srj.soft_rank(jnp.float32(1.0))
    for eps, error in ((-1.0, ValueError), (float("nan"), ValueError), ("a", TypeError)):
        with pytest.raises(error, match="eps"):
            srj.soft_rank(x, eps)
    with pytest.raises(ValueError, match="regularization"):
        srj.soft_rank(x, regularization="l1")
    with pytest.raises(ValueError, match="direction"):
        srj.soft_sort(x, direction="up")
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        srj.soft_rank(x, axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        srj.soft_rank(x, axis=0.0)


def test_traced_eps_raises_naming_eps():
    with pytest.raises(TypeError, match="eps"):
        jax.jit(lambda v, e: srj.soft_rank(v, e))(jnp.ones(3), 1.0)


def test_concrete_array_eps_is_accepted():
    x = _x((2, 6), seed=10)
    np.testing.assert_array_equal(srj.soft_rank(x, jnp.float32(0.25)), srj.soft_rank(x, 0.25))


def test_ffi_handlers_check_what_they_are_handed(path):
    """The XLA FFI handlers (bindings/xla_ffi.cpp) refuse bad attributes and a
    perm that is not a forward state with an error jax raises, naming it."""
    if path != "ffi":
        pytest.skip("the handlers are the ffi path's")
    x = jnp.asarray(_x((3, 5), seed=9))
    like = jax.ShapeDtypeStruct(x.shape, x.dtype)
    call = jax.ffi.ffi_call("softrank_forward_value_v1", like)
    good = dict(op=np.int32(0), reg=np.int32(0), descending=False, eps=np.float64(1.0))
    np.testing.assert_allclose(call(x, **good), srn.soft_rank(np.asarray(x), 1.0), rtol=1e-6)
    for bad, word in ((dict(op=np.int32(2)), "op"), (dict(reg=np.int32(-1)), "reg"),
                      (dict(eps=np.float64(np.nan)), "eps"), (dict(eps=np.float64(-1.0)), "eps")):
        with pytest.raises(Exception, match=word):
            jax.block_until_ready(call(x, **{**good, **bad}))
    perm = jnp.full(x.shape, 7, jnp.int32)  # outside [0, 5)
    block_start = jnp.zeros(x.shape, jnp.int32)
    vjp = jax.ffi.ffi_call("softrank_vjp_v1", like)
    with pytest.raises(Exception, match="perm"):
        jax.block_until_ready(vjp(x, x, perm, block_start, x, **good))


def test_float64_callback_on_a_thread_without_x64_raises_a_clear_error(path):
    """XLA may run a pure_callback on another thread, which the thread-local
    jax.enable_x64 context does not reach; jax would then reject the float64
    results as "Incorrect output dtype". The host function says what to do."""
    import threading

    if path == "ffi":
        pytest.skip("the callback path's check")
    results = (jax.ShapeDtypeStruct((2, 3), np.float64),)
    checked = srj._x64_checked(lambda v: (v * 2.0,), results)
    value = np.ones((2, 3))
    caught = []

    def in_a_fresh_thread():
        try:
            checked(value)
        except RuntimeError as exc:
            caught.append(exc)

    with jax.enable_x64(True):
        assert checked(value)[0].dtype == np.float64  # this thread: on
        worker = threading.Thread(target=in_a_fresh_thread)
        worker.start()
        worker.join()
    assert len(caught) == 1 and "jax.config.update('jax_enable_x64', True)" in str(caught[0])
    with jax_x64(True):  # process-wide: every thread
        worker = threading.Thread(target=in_a_fresh_thread)
        worker.start()
        worker.join()
    assert len(caught) == 1
    # float32 results need no switch
    unchecked = lambda v: (v,)  # noqa: E731
    assert srj._x64_checked(unchecked, (jax.ShapeDtypeStruct((2,), np.float32),)) is unchecked
