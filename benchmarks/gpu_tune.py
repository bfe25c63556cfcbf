"""How many chunks a GPU team should cut a long row into: a sweep for the next GPU run.

A row of 512 items or more is a team's on the GPU (csrc/cuda/soft_ops.cu,
"Schedules"): about one PAV chunk and one product piece per thread, at most
``kMaxTeamJoin`` (2048) of them, because their joins run on one thread. The joins
cost O(chunks) dependent loads, the chunks O(n / chunks) each; which count
balances the two depends on the GPU's latencies, which no run has measured yet.
``SOFTRANK_CUDA_MAX_TEAM_JOIN`` replaces that bound for one process, so this
script times the long-row cells in one child process per bound (soft_rank and
soft_sort, l2, float32, forward and forward+backward, next to ``torch.sort``)
and prints one table::

    python benchmarks/gpu_tune.py                  # bounds 128 .. 4096
    python benchmarks/gpu_tune.py --bounds 512 2048

``benchmarks/gpu_check.sh`` runs it last, with what is left of its budget.
Exit status 2 where there is no GPU (as test_bench_cuda.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

CELLS = [(1, 10_000_000), (64, 100_000), (1, 100_000)]
OPS = ("soft_rank", "soft_sort")
BOUNDS = [128, 256, 512, 1024, 2048, 4096]


def _child() -> int:
    """Time every cell with this process's bound; print one JSON line."""
    import torch

    import softrank.torch as srt
    from test_bench_cuda import EPS, _data, time_ms

    rows = []
    for batch, n in CELLS:
        x, cot = _data(batch, n)
        with torch.no_grad():
            floor = time_ms(lambda: torch.sort(x, dim=-1))
        for op in OPS:
            fn = getattr(srt, op)

            def forward():
                with torch.no_grad():
                    return fn(x, EPS, regularization="l2")

            def forward_backward():
                leaf = x.detach().requires_grad_()
                fn(leaf, EPS, regularization="l2").backward(cot)
                return leaf.grad

            rows.append({"batch": batch, "n": n, "op": op, "sort": floor,
                         "fwd": time_ms(forward), "fwdbwd": time_ms(forward_backward)})
    print(json.dumps(rows))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bounds", type=int, nargs="+", default=BOUNDS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    if args.child:
        return _child()
    from test_bench_cuda import gpu_unavailable

    reason = gpu_unavailable()
    if reason is not None:
        print(f"gpu_tune: no GPU here: {reason}", file=sys.stderr)
        return 2
    print(f"{'bound':>6} {'batch':>5} {'n':>9} {'op':<9} {'torch.sort':>10} {'fwd':>9} "
          f"{'fwd/sort':>8} {'fwdbwd':>9} {'fb/sort':>8}   (ms, CUDA events, median)")
    failed = 0
    for bound in args.bounds:
        env = dict(os.environ, SOFTRANK_CUDA_MAX_TEAM_JOIN=str(bound))
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                              capture_output=True, text=True, cwd=here)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            failed = 1
            print(f"{bound:>6} FAILED (exit {done.returncode}): "
                  + (done.stderr.strip().splitlines() or ["no output"])[-1])
            continue
        rows: List[Dict] = json.loads(lines[-1])
        for r in rows:
            print(f"{bound:>6} {r['batch']:>5} {r['n']:>9} {r['op']:<9} {r['sort']:>10.3f} "
                  f"{r['fwd']:>9.3f} {r['fwd'] / r['sort']:>7.2f}x {r['fwdbwd']:>9.3f} "
                  f"{r['fwdbwd'] / r['sort']:>7.2f}x", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
