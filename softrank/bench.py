"""Quick self-check and timing table: ``python -m softrank.bench``.

Prints the engine in use, checks a few exact properties of the operators on
random data (hard-rank limit, row sums, a vjp against finite differences),
then times ``softrank.numpy.soft_rank`` (forward, and forward + vjp) against
``numpy.argsort`` of the same float32 array, the least an exact soft rank must
do. The full benchmark suite lives in ``benchmarks/``.
"""
from __future__ import annotations

import argparse
import sys
import timeit

import numpy as np

import softrank
from softrank.numpy import soft_rank, soft_rank_vjp

GRID = [(1, 100), (1, 1000), (1, 100_000), (256, 100), (128, 1000), (1024, 64)]


def self_check(rng: np.random.Generator) -> None:
    """Raise AssertionError if a basic exact property fails."""
    x = rng.normal(size=(8, 50))
    hard = np.argsort(np.argsort(x, axis=-1), axis=-1) + 1.0
    assert np.array_equal(soft_rank(x, 1e-9), hard), "eps -> 0 is not the hard rank"
    for reg in ("l2", "kl"):
        r = soft_rank(x, 0.5, regularization=reg)
        assert np.allclose(r.sum(-1), 50 * 51 / 2, rtol=1e-12), f"{reg}: row sums"
        g = rng.normal(size=x.shape)
        v = soft_rank_vjp(x, g, 0.5, regularization=reg)
        h = 1e-6
        e = np.zeros_like(x)
        e[0, 3] = h
        fd = (np.sum(g * soft_rank(x + e, 0.5, regularization=reg))
              - np.sum(g * soft_rank(x - e, 0.5, regularization=reg))) / (2 * h)
        assert abs(fd - v[0, 3]) <= 1e-6 * max(1.0, abs(fd)), f"{reg}: vjp vs finite differences"


def best_time(fn, repeat: int = 5) -> float:
    number = max(1, int(0.02 / max(1e-7, min(timeit.repeat(fn, number=1, repeat=3)))))
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regularization", default="l2", choices=["l2", "kl"])
    parser.add_argument("--eps", type=float, default=1.0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"softrank {softrank.__version__}, backend: {softrank.backend()}, "
          f"threads: {softrank.get_num_threads()}")
    self_check(rng)
    print("self-check: ok (hard-rank limit, row sums, vjp vs finite differences)")
    print(f"\nsoft_rank({args.regularization}, eps={args.eps}), float32; "
          "times are the best of 5; ratios against np.argsort of the same array")
    header = f"{'batch':>6} {'n':>7} {'argsort':>11} {'forward':>11} {'fwd+vjp':>11} {'fwd/argsort':>12} {'fwd+vjp/argsort':>16}"
    print(header)
    print("-" * len(header))
    for batch, n in GRID:
        x = rng.normal(size=(batch, n)).astype(np.float32)
        g = rng.normal(size=(batch, n)).astype(np.float32)
        kw = dict(regularization=args.regularization)
        t_sort = best_time(lambda: np.argsort(x, axis=-1))
        t_fwd = best_time(lambda: soft_rank(x, args.eps, **kw))
        t_both = best_time(lambda: soft_rank_vjp(x, g, args.eps, **kw))
        print(f"{batch:>6} {n:>7} {t_sort * 1e6:>9.1f}us {t_fwd * 1e6:>9.1f}us "
              f"{t_both * 1e6:>9.1f}us {t_fwd / t_sort:>11.2f}x {t_both / t_sort:>15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
