"""Thread safety and determinism: many Python threads calling every op at once
get the sequential results bit for bit; results are bitwise independent of
softrank.set_num_threads (including the long-row path, n >= 65536 with fewer
rows than threads); changing the thread count while calls run is safe.
numpy adapter and the raw engine; torch/jax/tensorflow adapters too (CI
requires them, elsewhere they are skipped when missing).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import softrank
import softrank.numpy as srn
from softrank import _engine
from child_python import run_python
from frameworks import jax_x64, require

KWARGS = [
    dict(regularization=reg, direction=d) for reg in ("l2", "kl") for d in ("ascending", "descending")
]
# Shapes: below and above the parallel threshold (16384 elements), and a lone
# row of 2^18 or more (1, 300_000), whose sort, PAV chunks, outputs and
# product pieces are split over the threads (batched.cpp, the long-row path).
SHAPES = [(5, 40), (64, 700), (3, 161), (2, 70000), (1, 300_000)]


@pytest.fixture(autouse=True)
def _restore_threads():
    saved = softrank.get_num_threads()
    yield
    softrank.set_num_threads(saved)


def _inputs(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    x[..., ::9] = np.round(x[..., ::9])  # ties
    g = rng.normal(size=shape)
    w = rng.uniform(0.1, 3.0, size=shape)
    return x, g, w


def _every_op(x, g, w, eps=0.6):
    """Every public numpy op plus the raw engine; a tuple of arrays."""
    outs = []
    for kw in KWARGS:
        outs += [
            srn.soft_rank(x, eps, **kw),
            srn.soft_sort(x, eps, **kw),
            srn.soft_rank_vjp(x, g, eps, **kw),
            srn.soft_sort_vjp(x, g, eps, **kw),
            srn.soft_rank_jvp(x, g, eps, **kw),
            srn.soft_sort_jvp(x, g, eps, **kw),
            srn.soft_rank(x.astype(np.float32), eps, **kw),
        ]
    outs += [
        srn.isotonic_regression(x, weights=w),
        srn.isotonic_regression(x, increasing=False),
        srn.isotonic_regression_vjp(x, g, weights=w),
    ]
    eng = _engine.engine()
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    g2 = np.ascontiguousarray(g.reshape(x2.shape))
    for op in (0, 1):
        for reg in (0, 1):
            state = eng.soft_forward(x2, op, reg, True, eps)
            outs += list(state)
            outs.append(eng.soft_hvp(x2, *state, g2, g2, op, reg, True, eps))
    return tuple(outs)


def _assert_bitwise(a, b, context):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, (context, i)
        assert u.tobytes() == v.tobytes(), (context, i, np.argwhere(u != v)[:3])


@pytest.mark.parametrize("shape", SHAPES)
def test_bitwise_independent_of_set_num_threads(backend, shape):
    x, g, w = _inputs(shape, 1)
    softrank.set_num_threads(1)
    ref = _every_op(x, g, w)
    for k in (2, 3, 4, 8):
        softrank.set_num_threads(k)
        assert 1 <= softrank.get_num_threads() <= k  # (numba caps it at its own pool size)
        _assert_bitwise(_every_op(x, g, w), ref, (shape, k))


def test_many_threads_at_once_give_the_sequential_results(backend):
    softrank.set_num_threads(2)
    jobs = [(_inputs(shape, seed), shape) for seed, shape in enumerate(SHAPES * 2)]
    expected = [_every_op(*inp) for inp, _ in jobs]
    n_threads = 12
    barrier = threading.Barrier(n_threads)

    def worker(t):
        barrier.wait()  # all start together
        results = []
        for rep in range(2):
            j = (t + rep) % len(jobs)
            results.append((j, _every_op(*jobs[j][0])))
        return results

    with ThreadPoolExecutor(n_threads) as pool:
        for results in pool.map(worker, range(n_threads)):
            for j, got in results:
                _assert_bitwise(got, expected[j], ("job", j, jobs[j][1]))


def test_changing_the_thread_count_during_calls(backend):
    x, g, w = _inputs((64, 700), 5)
    xl, gl, wl = _inputs((1, 70000), 6)
    softrank.set_num_threads(1)
    ref, ref_long = _every_op(x, g, w), _every_op(xl, gl, wl)
    stop = threading.Event()

    def toggler():
        k = 0
        while not stop.is_set():
            softrank.set_num_threads(1 + k % 4)
            k += 1

    t = threading.Thread(target=toggler)
    t.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_every_op, x, g, w) for _ in range(4)]
            futures += [pool.submit(_every_op, xl, gl, wl) for _ in range(2)]
            for i, f in enumerate(futures):
                _assert_bitwise(f.result(), ref if i < 4 else ref_long, ("call", i))
    finally:
        stop.set()
        t.join()


def test_nan_rows_do_not_leak_into_other_rows_under_threads(backend):
    softrank.set_num_threads(4)
    x, g, _ = _inputs((64, 700), 7)
    x[10, 3] = np.nan
    x[20, 0] = np.inf
    for kw in KWARGS:
        r = srn.soft_rank(x, 0.5, **kw)
        assert np.all(np.isnan(r[[10, 20]]))
        clean = np.delete(np.arange(64), [10, 20])
        np.testing.assert_array_equal(r[clean], srn.soft_rank(x[clean], 0.5, **kw))


# ---------------------------------------------------------------- framework adapters

def _framework_ops(name):
    """(to_framework, to_numpy, soft_rank, soft_sort) for one adapter."""
    if name == "torch":
        torch = require("torch")
        import softrank.torch as srt

        return (lambda a: torch.from_numpy(a), lambda t: t.detach().numpy(),
                lambda t, **kw: srt.soft_rank(t, 0.6, **kw), lambda t, **kw: srt.soft_sort(t, 0.6, **kw))
    if name == "jax":
        jnp = require("jax.numpy")  # (float64: the test runs under jax_x64)
        import softrank.jax as srj

        return (lambda a: jnp.asarray(a), lambda t: np.asarray(t),
                lambda t, **kw: srj.soft_rank(t, 0.6, **kw), lambda t, **kw: srj.soft_sort(t, 0.6, **kw))
    tf = require("tensorflow")
    import softrank.tensorflow as srtf

    return (lambda a: tf.constant(a), lambda t: t.numpy(),
            lambda t, **kw: srtf.soft_rank(t, 0.6, **kw), lambda t, **kw: srtf.soft_sort(t, 0.6, **kw))


@pytest.mark.parametrize("name", ["torch", "jax", "tensorflow"])
def test_framework_adapters_threads_and_thread_count(name):
    if name == "jax":
        import softrank.jax as srj

        if not srj._ffi_ready():
            # Reproduced without softrank (a jitted jax.pure_callback whose host
            # function reads its operand, from 6 Python threads: 3 runs in 6 hang,
            # jax 0.10.2, 2 cores): jax's callback hands the host function
            # device_put arrays, and reading them waits on XLA's CPU threads,
            # which the other threads' callbacks hold (cf. jax-ml/jax#24255).
            pytest.skip("jax.pure_callback from several Python threads at once can hang in jax "
                        "itself; the XLA FFI path is the one run from threads")
    # jax in float64 for this test only (the switch set process-wide, as the
    # pool's threads need it, and restored after).
    with jax_x64(True) if name == "jax" else contextlib.nullcontext():
        _adapters_threads_and_thread_count(name)


def _adapters_threads_and_thread_count(name):
    to_fw, to_np, rank, sort = _framework_ops(name)
    x, _, _ = _inputs((64, 700), 8)
    softrank.set_num_threads(1)
    ref = [to_np(f(to_fw(x), **kw)) for kw in KWARGS for f in (rank, sort)]
    for kw_i, kw in enumerate(KWARGS):  # the adapters agree with numpy
        np.testing.assert_allclose(ref[2 * kw_i], srn.soft_rank(x, 0.6, **kw), rtol=1e-12, atol=1e-12)
    softrank.set_num_threads(4)

    def run(_):
        return [to_np(f(to_fw(x), **kw)) for kw in KWARGS for f in (rank, sort)]

    with ThreadPoolExecutor(6) as pool:
        for got in pool.map(run, range(6)):
            for a, b in zip(got, ref):
                assert a.tobytes() == b.tobytes()


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc/self/task"),
                    reason="needs os.fork and /proc/self/task (Linux)")
def test_a_forked_child_gets_a_pool_of_its_own():
    """A child forked after the pool started (a fork-based DataLoader or
    multiprocessing worker) inherits none of the pool's threads. It must start
    threads of its own (it used to run every call on one thread, and could hang
    on a mutex a pool thread held at the fork), keep the thread count, and give
    the parent's results bit for bit. Forks happen while another thread keeps
    the pool busy, so some land mid-call."""
    if softrank.backend() != "native":
        pytest.skip("the thread pool is the compiled core's (numba has its own)")
    softrank.set_num_threads(3)
    x, g, _ = _inputs((64, 700), 21)
    expected = srn.soft_rank_vjp(x, g, 0.6)
    stop = threading.Event()

    def keep_busy():
        while not stop.is_set():
            srn.soft_rank(x, 0.6)

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        for attempt in range(8):
            pid = os.fork()
            if pid == 0:  # the child: report through the exit status only
                code = 1
                try:
                    signal.alarm(60)  # a hang fails the test instead of stalling it
                    before = _thread_count()
                    ok = softrank.get_num_threads() == 3
                    for _ in range(3):
                        ok = ok and srn.soft_rank_vjp(x, g, 0.6).tobytes() == expected.tobytes()
                    code = 0 if ok and _thread_count() > before else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status), f"fork {attempt}: the child was killed ({status}), a hang"
            assert os.WEXITSTATUS(status) == 0, (
                f"fork {attempt}: exit {os.WEXITSTATUS(status)} "
                "(1: error, 2: wrong result, thread count, or no threads of its own)")
    finally:
        stop.set()
        busy.join()


@pytest.mark.parametrize("backend_name", _engine.available_backends())
def test_interpreter_exit_with_a_daemon_thread_inside_the_engine(backend_name):
    """Python ends a daemon thread that asks for the GIL back during
    interpreter exit by pthread_exit; through pybind11's noexcept GIL guard
    that called std::terminate, and the process aborted (rc 134) at exit."""
    code = (
        "import threading, time\n"
        "import numpy as np, softrank.numpy as srn\n"
        "x = np.random.default_rng(0).standard_normal((1, 1 << 18))\n"
        "def spin():\n"
        "    while True:\n"
        "        srn.soft_rank(x, 0.5)\n"
        "threading.Thread(target=spin, daemon=True).start()\n"
        "time.sleep(0.5)\n"
        "print('exiting')\n"
    )
    for attempt in range(3):
        result = run_python(code, env={**os.environ, "SOFTRANK_BACKEND": backend_name},
                            timeout=120)
        assert result.returncode == 0 and "exiting" in result.stdout, (
            attempt, result.returncode, result.stderr[-2000:])


def test_set_num_threads_bounds():
    """Counts above 1024 are refused, naming the range (2^30 threads raised a
    bare 'cannot create std::vector larger than max_size()' at the next call,
    3e8 was killed for memory, and >= 2^31 gave pybind11's 'incompatible
    function arguments'); 1024 itself works and keeps results bitwise (in a
    child process: the pool keeps its threads)."""
    for bad in (1025, 2**30, 2**31, 2**70):
        with pytest.raises(ValueError, match=r"num_threads must lie in \[1, 1024\]"):
            softrank.set_num_threads(bad)
    if softrank.backend() == "native":
        for bad in (0, 1025, 2**31):  # the core checks what it is handed too
            with pytest.raises(ValueError, match="num_threads must lie in"):
                _engine.engine().set_num_threads(bad)
        code = (
            "import numpy as np, softrank, softrank.numpy as srn\n"
            "x = np.random.default_rng(4).normal(size=(1, 300_000))\n"
            "expected = srn.soft_rank(x, 0.6).tobytes()\n"
            "softrank.set_num_threads(1024)\n"
            "assert softrank.get_num_threads() == 1024\n"
            "assert srn.soft_rank(x, 0.6).tobytes() == expected\n"
            "print('same')\n"
        )
        result = run_python(code, timeout=300)
        assert result.returncode == 0 and "same" in result.stdout, result.stderr[-2000:]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_numba_engine_in_a_forked_child():
    """numba's GNU OpenMP threading layer killed (SIGTERM) a forked child that
    ran a parallel kernel after its parent had ("fork() called from a process
    already using GNU OpenMP"): a fork-based DataLoader worker. The child now
    runs the kernels' serial twins and gets the parent's results bit for bit."""
    if "numba" not in _engine.available_backends():
        pytest.skip("numba is not installed")
    saved = (_engine._engine, _engine._engine_name)
    _engine.force_backend("numba")
    try:
        x, g, w = _inputs((64, 700), 22)
        expected = _every_op(x, g, w)  # runs every parallel kernel here first
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.alarm(120)
                got = _every_op(x, g, w)
                same = all(a.tobytes() == b.tobytes() for a, b in zip(got, expected))
                code = 0 if same and softrank.get_num_threads() == 1 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status), f"the child was killed by signal {os.WTERMSIG(status)}"
        assert os.WEXITSTATUS(status) == 0, "the child's results differ (2) or it raised (1)"
    finally:
        _engine._engine, _engine._engine_name = saved


def test_numba_thread_count_holds_in_every_thread():
    """numba's thread count is per calling thread: set_num_threads(1) bound the
    setting thread only, and a call from another thread (a threading.Thread,
    jax's or TensorFlow's host callbacks) ran on every core."""
    if "numba" not in _engine.available_backends():
        pytest.skip("numba is not installed")
    import numba

    saved = (_engine._engine, _engine._engine_name)
    _engine.force_backend("numba")
    numba_threads = softrank.get_num_threads()
    try:
        softrank.set_num_threads(1)
        x, _, _ = _inputs((64, 50), 23)
        seen = []

        def call():
            srn.soft_rank(x, 0.6)
            seen.append((softrank.get_num_threads(), numba.get_num_threads()))

        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
        assert seen == [(1, 1)]
    finally:
        softrank.set_num_threads(numba_threads)
        _engine._engine, _engine._engine_name = saved
