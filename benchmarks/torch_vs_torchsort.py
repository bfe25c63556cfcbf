"""softrank.torch next to torchsort, side by side in one run.

    python benchmarks/torch_vs_torchsort.py [--repeats 7] [--min-time 0.2] [--threads k]

For each shape (batch, n) in float32 and each pass (forward on an input that
requires grad, forward + backward of a weighted sum), both libraries' l2 soft
rank with eps = regularization_strength = 1 are timed in alternating rounds
(so both see the same machine load); the table reports the median time per
call and the ratio softrank / torchsort (< 1: softrank is faster). On a
small, loaded machine torch's own intra-op threads can dominate (a multiply
and sum of 128 x 1000 took 20 ms with 2 threads, 40 us with 1): compare with
``--threads 1`` too. The data
is uniform on [0, n) as in the benchmark suite (benchmarks/_benchutil.py), so
PAV sees pooled and free blocks alike. Before timing, the script checks that
both libraries return the same ranks and gradients.

torchsort needs a build against the installed torch; on a machine without
CUDA hide nvcc from PATH while installing it:
``pip install --no-build-isolation torchsort``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import softrank
import softrank.torch as srt

SHAPES = ((1, 100), (256, 100), (128, 1000))


def _implementations():
    import torchsort

    return {
        "softrank": lambda x: srt.soft_rank(x, 1.0),
        "torchsort": lambda x: torchsort.soft_rank(x, regularization_strength=1.0),
    }


def _passes(fn, x, weights):
    def forward():
        fn(x)

    def forward_backward():
        (fn(x) * weights).sum().backward()

    return {"fwd": forward, "fwd+bwd": forward_backward}


def _calls_for(fn, min_time):
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start >= min_time:
            return calls
        calls *= 2


def _check_agreement(impls, x, weights):
    results = {}
    for name, fn in impls.items():
        leaf = x.detach().clone().requires_grad_(True)
        out = fn(leaf)
        (out * weights).sum().backward()
        results[name] = (out.detach(), leaf.grad)
    (out_a, grad_a), (out_b, grad_b) = results.values()
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="alternating rounds per cell")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per round and library")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (and so torchsort) and softrank alike; default: each its own")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        softrank.set_num_threads(args.threads)

    impls = _implementations()
    print(f"softrank {softrank.__version__} (engine {softrank.backend()}, "
          f"{softrank.get_num_threads()} threads), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32, eps = 1, l2 soft rank")
    header = f"{'shape':>12} {'pass':>8} {'softrank us':>12} {'torchsort us':>13} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(0)
    for batch, n in SHAPES:
        x = (torch.rand(batch, n, generator=generator) * n).requires_grad_(True)
        weights = torch.randn(batch, n, generator=generator)
        _check_agreement(impls, x, weights)
        runs = {name: _passes(fn, x, weights) for name, fn in impls.items()}
        for pass_name in ("fwd", "fwd+bwd"):
            fns = {name: runs[name][pass_name] for name in impls}
            calls = {name: _calls_for(fn, args.min_time) for name, fn in fns.items()}
            per_call = {name: [] for name in fns}
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    for _ in range(calls[name]):
                        fn()
                    per_call[name].append((time.perf_counter() - start) / calls[name])
            ours = statistics.median(per_call["softrank"]) * 1e6
            theirs = statistics.median(per_call["torchsort"]) * 1e6
            print(f"{f'({batch}, {n})':>12} {pass_name:>8} {ours:12.1f} {theirs:13.1f} {ours / theirs:7.2f}")


if __name__ == "__main__":
    main()
