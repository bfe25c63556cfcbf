"""Memory: repeated forward + backward calls do not grow the process (resident
set from /proc/self/statm), error paths and short-lived threads leak nothing,
and the engine keeps no references to its arguments. (The C++ core alone is
checked by valgrind and LeakSanitizer: csrc/tests/run_valgrind.sh and the
SOFTRANK_SANITIZE build.)
"""
from __future__ import annotations

import gc
import os
import sys
import threading

import numpy as np
import pytest

import softrank.numpy as srn
from softrank import _engine

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm"),
    # AddressSanitizer keeps freed memory in quarantine: RSS says nothing there.
    pytest.mark.skipif(os.environ.get("SOFTRANK_TEST_EXTENSION_KIND") == "asan",
                       reason="RSS under AddressSanitizer (csrc/tests/python_asan.sh)"),
]

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _one_round(x, g, w, eng):
    for reg in ("l2", "kl"):
        for d in ("ascending", "descending"):
            srn.soft_rank(x, 0.5, regularization=reg, direction=d)
            srn.soft_sort(x, 0.5, regularization=reg, direction=d)
            srn.soft_rank_vjp(x, g, 0.5, regularization=reg, direction=d)
            srn.soft_sort_jvp(x, g, 0.5, regularization=reg, direction=d)
    srn.isotonic_regression(x, weights=w)
    srn.isotonic_regression_vjp(x, g, weights=w)
    state = eng.soft_forward(x, 0, 1, False, 0.5)
    eng.soft_hvp(x, *state, g, g, 0, 1, False, 0.5)


def _growth(fn, rounds, warmup=5):
    for _ in range(warmup):
        fn()
    gc.collect()
    before = _rss_bytes()
    for _ in range(rounds):
        fn()
    gc.collect()
    return _rss_bytes() - before


def test_forward_backward_loop_does_not_grow(backend):
    rng = np.random.default_rng(0)
    eng = _engine.engine()
    x = rng.normal(size=(32, 1000))
    g = rng.normal(size=x.shape)
    w = rng.uniform(0.5, 2.0, size=x.shape)
    # One round allocates ~5 MB of results; 150 rounds churn ~0.8 GB.
    rounds = 150 if backend == "native" else 40  # (numba: slower calls, same check)
    growth = _growth(lambda: _one_round(x, g, w, eng), rounds=rounds)
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {rounds} rounds"


def test_long_rows_and_changing_lengths_do_not_grow(backend):
    """Per-thread scratch grows to the longest row and is reused: cycling
    through lengths (radix and counting-rank paths) must not accumulate."""
    rng = np.random.default_rng(1)
    eng = _engine.engine()
    arrays = [rng.normal(size=(2, n)) for n in (10, 161, 5000, 70000, 3)]

    def cycle():
        for x in arrays:
            _one_round(x, x, np.abs(x) + 1.0, eng)

    growth = _growth(cycle, rounds=8 if backend == "native" else 3)
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"


def test_error_paths_do_not_grow(backend):
    eng = _engine.engine()
    x = np.ones((8, 500))
    bad = [np.ones((8, 500), np.int64), np.ones((500, 8)).T, np.ones(3)]

    def errors():
        for b in bad:
            with pytest.raises((TypeError, ValueError)):
                eng.soft_forward(b, 0, 0, False, 1.0)
        out, perm, blocks = eng.soft_forward(x, 0, 0, False, 1.0)
        with pytest.raises(ValueError):
            eng.soft_vjp(x, out, np.full_like(perm, -1), blocks, x, 0, 0, False, 1.0)
        with pytest.raises(ValueError):
            eng.soft_forward(x, 0, 0, False, -1.0)
        with pytest.raises(ValueError):
            srn.soft_rank(x, regularization="l3")

    growth = _growth(errors, rounds=300)
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"


def test_short_lived_threads_do_not_grow(backend):
    """Each calling thread gets its own scratch (thread_local in the core);
    it must be freed when the thread ends."""
    x = np.random.default_rng(2).normal(size=(1, 100000))  # ~5 MB of scratch per thread

    def spawn():
        ts = [threading.Thread(target=srn.soft_rank, args=(x, 0.5)) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    growth = _growth(spawn, rounds=25)  # 200 threads
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 200 threads"


def test_no_references_kept(backend):
    eng = _engine.engine()
    x = np.random.default_rng(3).normal(size=(4, 300))
    g = np.ones_like(x)
    w = np.ones_like(x)
    before = [sys.getrefcount(a) for a in (x, g, w)]
    for _ in range(100):
        state = eng.soft_forward(x, 1, 1, True, 0.3)
        eng.soft_vjp(x, *state, g, 1, 1, True, 0.3)
        eng.soft_jvp(x, *state, g, 1, 1, True, 0.3)
        sol, b = eng.isotonic_forward(x, w, True)
        eng.isotonic_vjp(w, b, g)
        del state, sol, b
    gc.collect()
    assert [sys.getrefcount(a) for a in (x, g, w)] == before
    out = eng.soft_forward(x, 0, 0, False, 1.0)[0]
    assert sys.getrefcount(out) == 2  # only `out` and the call's argument
