"""Two sweeps for the next GPU run: a team's chunk count, and the sort of many short rows.

1. A row of 512 items or more is a team's on the GPU (csrc/cuda/soft_ops.cu,
   "Schedules"): about one PAV chunk and one product piece per thread, at most
   ``kMaxTeamJoin`` (2048) of them, because their joins run on one thread. The
   joins cost O(chunks) dependent loads, the chunks O(n / chunks) each; which
   count balances the two depends on the GPU's latencies, which no run has
   measured yet. ``SOFTRANK_CUDA_MAX_TEAM_JOIN`` replaces that bound for one
   process.
2. A batch of rows is sorted either by a thread block per row (CUB's segmented
   radix sort: the default below 4096 items a row) or whole, by key and then
   by row (the default for fewer than 128 rows of 4096 or more).
   ``SOFTRANK_CUDA_SORT`` (``segmented`` or ``whole``) forces one for a process.

Each setting's cells are timed in one child process (soft_rank and soft_sort,
l2, float32, forward and forward+backward, next to ``torch.sort``), and one
table is printed::

    python benchmarks/gpu_tune.py                                   # both sweeps
    python benchmarks/gpu_tune.py --sweep bounds --bounds 512 2048

``benchmarks/gpu_check.sh`` runs it last, with what is left of its budget.
Exit status 2 where there is no GPU (as test_bench_cuda.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

CELLS = [(1, 10_000_000), (64, 100_000), (1, 100_000)]  # the long rows (bounds sweep)
SORT_CELLS = [(4096, 100), (1024, 64), (256, 1000), (64, 5000), (200, 4096)]  # (sorts sweep)
OPS = ("soft_rank", "soft_sort")
BOUNDS = [128, 256, 512, 1024, 2048, 4096]
SORTS = ["segmented", "whole"]


def _child(cells: List[Tuple[int, int]]) -> int:
    """Time `cells` with this process's settings; print one JSON line."""
    import torch

    import softrank.torch as srt
    from test_bench_cuda import EPS, _data, time_ms

    rows = []
    for batch, n in cells:
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


def _sweep(setting: str, env_name: str, value: str, cells: List[Tuple[int, int]],
           here: str) -> int:
    """One child process with ``env_name=value``; print its rows. 1 where it failed."""
    env = dict(os.environ, **{env_name: value})
    spec = json.dumps(cells)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec], env=env,
                          capture_output=True, text=True, cwd=here)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        print(f"{setting:>10} FAILED (exit {done.returncode}): "
              + (done.stderr.strip().splitlines() or ["no output"])[-1])
        return 1
    rows: List[Dict] = json.loads(lines[-1])
    for r in rows:
        print(f"{setting:>10} {r['batch']:>5} {r['n']:>9} {r['op']:<9} {r['sort']:>10.3f} "
              f"{r['fwd']:>9.3f} {r['fwd'] / r['sort']:>7.2f}x {r['fwdbwd']:>9.3f} "
              f"{r['fwdbwd'] / r['sort']:>7.2f}x", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", choices=("both", "sorts", "bounds"), default="both")
    parser.add_argument("--bounds", type=int, nargs="+", default=BOUNDS)
    parser.add_argument("--sorts", nargs="+", default=["default"] + SORTS,
                        choices=["default"] + SORTS)
    parser.add_argument("--child", metavar="CELLS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    if args.child is not None:
        return _child([tuple(cell) for cell in json.loads(args.child)])
    from test_bench_cuda import gpu_unavailable

    reason = gpu_unavailable()
    if reason is not None:
        print(f"gpu_tune: no GPU here: {reason}", file=sys.stderr)
        return 2
    sorts = args.sorts if args.sweep in ("both", "sorts") else []
    bounds = args.bounds if args.sweep in ("both", "bounds") else []
    print(f"{'setting':>10} {'batch':>5} {'n':>9} {'op':<9} {'torch.sort':>10} {'fwd':>9} "
          f"{'fwd/sort':>8} {'fwdbwd':>9} {'fb/sort':>8}   (ms, CUDA events, median)")
    failed = 0
    # The sorts first: their cells are quick, the long rows' are not.
    for method in sorts:
        failed |= _sweep(f"sort={method}", "SOFTRANK_CUDA_SORT",
                         "" if method == "default" else method, SORT_CELLS, here)
    for bound in bounds:
        failed |= _sweep(f"join={bound}", "SOFTRANK_CUDA_MAX_TEAM_JOIN", str(bound), CELLS, here)
    return failed


if __name__ == "__main__":
    sys.exit(main())
