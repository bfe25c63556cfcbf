"""softrank.torch on a CUDA GPU next to torch.sort of the same tensor and torchsort.

The GPU table of issue 13: cells (batch, n) = (1, 1e3), (1, 1e5), (1, 1e7),
(256, 1000), (4096, 100), (64, 1e5); soft_rank and soft_sort, l2, float32,
eps = 1; ``fwd`` (no grad) and ``fwdbwd`` (a leaf that requires grad, then
``.backward(cotangent)``). ``torch.sort`` of the same tensor is the floor of
both passes. Times are CUDA-event medians of one call between two
``torch.cuda.synchronize()``, all implementations of a cell measured back to
back in the same process, so the ratios compare like with like. Each
implementation is first checked against the CPU engine on the cell's own data.

Run as a script (``benchmarks/gpu_check.sh`` does) to print the table and the
issue's goals::

    python benchmarks/test_bench_cuda.py            # every cell
    python benchmarks/test_bench_cuda.py --quick    # (1, 1e3) and (256, 1000) only

or under pytest (``pytest benchmarks/test_bench_cuda.py -s``: one test per
cell, op and pass, printing its row). Without a CUDA GPU, or with a softrank
built without its CUDA core, the script exits with status 2 and says which;
the tests skip.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

CELLS: List[Tuple[int, int]] = [(1, 1_000), (1, 100_000), (1, 10_000_000), (256, 1_000),
                                (4_096, 100), (64, 100_000)]
QUICK_CELLS = [(1, 1_000), (256, 1_000)]
OPS = ("soft_rank", "soft_sort")
PASSES = ("fwd", "fwdbwd")
EPS = 1.0
BUDGET_S = 0.25  # timing budget of one implementation in one cell
MAX_REPS = 50


def gpu_unavailable() -> Optional[str]:
    """Why the GPU benchmarks cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        from softrank import _C
    except ImportError as exc:
        return f"softrank's compiled core does not import: {exc}"
    if not getattr(_C, "cuda_compiled", lambda: False)():
        return ("softrank was built without its CUDA core "
                "(build with -C cmake.define.SOFTRANK_CUDA=ON)")
    if _C.cuda_device_count() == 0:
        return "softrank._C.cuda_device_count() is 0"
    return None


_TORCHSORT: Dict[str, object] = {}


def _torchsort():
    """torchsort, where it imports and runs on a CUDA tensor (a build without its
    CUDA extension imports, then raises on one), else None; the reason is kept
    in ``_TORCHSORT["why"]``."""
    if "module" in _TORCHSORT:
        return _TORCHSORT["module"]
    module = None
    try:
        import torch
        import torchsort

        torchsort.soft_rank(torch.zeros((1, 4), device="cuda"))
        torch.cuda.synchronize()
        module = torchsort
    except Exception as exc:  # ImportError, or its kernels failing on the GPU
        _TORCHSORT["why"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    _TORCHSORT["module"] = module
    return module


def implementations(op: str) -> Dict[str, Callable]:
    """name -> function of a CUDA tensor (rows along the last dim)."""
    import torch

    import softrank.torch as srt

    impls = {
        "softrank": lambda x: getattr(srt, op)(x, EPS, regularization="l2"),
        "torch.sort": lambda x: torch.sort(x, dim=-1)[0],
    }
    ts = _torchsort()
    if ts is not None:
        impls["torchsort"] = lambda x: getattr(ts, op)(x, regularization="l2",
                                                       regularization_strength=EPS)
    return impls


def _data(batch: int, n: int):
    import torch

    rng = np.random.default_rng(batch * 1_000_003 + n)
    x = torch.tensor(rng.normal(size=(batch, n)), dtype=torch.float32, device="cuda")
    cot = torch.tensor(rng.normal(size=(batch, n)), dtype=torch.float32, device="cuda")
    return x, cot


_CHECKED = set()
# What the checks found: softrank's failures (the script's exit status) and
# notes on the peers (they compute in float32 and break ties their own way;
# a peer is timed all the same, and dropped only where it raises).
FAILURES: List[str] = []
NOTES: List[str] = []


def _check(name: str, op: str, fn: Callable, x, cot) -> Optional[str]:
    """fn's value and gradient on the cell's data (at most 4 rows of 1e5) against
    the CPU engine in float64, once per implementation, op and cell: the largest
    error relative to 1 + the row's largest value, as a message where it is over
    1e-4, else None."""
    import softrank.torch as srt

    key = (name, op, tuple(x.shape))
    if name == "torch.sort" or key in _CHECKED:
        return None
    _CHECKED.add(key)
    rows, rows_cot = x[:4, :100_000], cot[:4, :100_000]
    leaf = rows.detach().double().cpu().requires_grad_()
    y = getattr(srt, op)(leaf, EPS, regularization="l2")
    y.backward(rows_cot.double().cpu())
    got_leaf = rows.detach().requires_grad_()
    got = fn(got_leaf)
    got.backward(rows_cot)
    problems = []
    for what, a, b in (("value", got, y), ("gradient", got_leaf.grad, leaf.grad)):
        a = a.detach().double().cpu()
        scale = 1.0 + b.detach().abs().amax(-1, keepdim=True)
        error = float(((a - b.detach()).abs() / scale).max())
        if not error <= 1e-4:
            problems.append(f"{what} by {error:.2e}")
    if not problems:
        return None
    return (f"{name} {op} {tuple(x.shape)}: differs from the CPU engine (float64): "
            + ", ".join(problems))


def time_ms(fn: Callable[[], object]) -> float:
    """Median CUDA-event time of ``fn`` in ms (the first call, a warm-up, is not counted)."""
    import torch

    torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    warmup = time.perf_counter() - began
    reps = 1 if warmup > BUDGET_S else max(3, min(MAX_REPS, int(BUDGET_S / max(warmup, 1e-6))))
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_cell(batch: int, n: int, op: str, pass_: str) -> Dict[str, float]:
    """impl -> ms for one cell and pass (each implementation checked first)."""
    import torch

    x, cot = _data(batch, n)
    results = {}
    for name, fn in implementations(op).items():
        try:
            problem = _check(name, op, fn, x, cot)
        except Exception as exc:
            if name == "softrank":
                raise
            NOTES.append(f"{name} {op} {(batch, n)}: dropped, it raised "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        if problem is not None:
            (FAILURES if name == "softrank" else NOTES).append(problem)
        if pass_ == "fwd" or name == "torch.sort":
            def call(fn=fn):
                with torch.no_grad():
                    return fn(x)
        else:
            def call(fn=fn):
                leaf = x.detach().requires_grad_()
                fn(leaf).backward(cot)
                return leaf.grad
        try:
            results[name] = time_ms(call)
        except Exception as exc:
            if name == "softrank":
                raise
            NOTES.append(f"{name} {op} {(batch, n)} {pass_}: not timed, it raised "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return results


def _row(batch: int, n: int, op: str, pass_: str, ms: Dict[str, float]) -> str:
    sr, floor = ms["softrank"], ms["torch.sort"]
    ts = ms.get("torchsort")
    torchsort = f"{ts:10.3f} {ts / sr:8.2f}x" if ts is not None else f"{'-':>10} {'-':>9}"
    return (f"{batch:>5} {n:>9} {op:<9} {pass_:<6} {sr:10.3f} {floor:10.3f} {sr / floor:8.2f}x "
            f"{torchsort}")


HEADER = (f"{'batch':>5} {'n':>9} {'op':<9} {'pass':<6} {'softrank':>10} {'torch.sort':>10} "
          f"{'sr/sort':>9} {'torchsort':>10} {'ts/sr':>9}   (ms, CUDA events, median)")


def goals(table: List[Tuple[int, int, str, str, Dict[str, float]]]) -> List[str]:
    """The issue's goals, each with the cells that miss it."""
    lines = []
    missed = [f"({b}, {n}) {op} {p}: {ms['softrank'] / ms['torch.sort']:.2f}x"
              for b, n, op, p, ms in table
              if p == "fwd" and b * n >= 1_000_000 and ms["softrank"] > 1.5 * ms["torch.sort"]]
    lines.append("forward <= 1.5x torch.sort where batch*n >= 1e6: "
                 + ("met" if not missed else "MISSED " + "; ".join(missed)))
    long_row = [(op, ms) for b, n, op, p, ms in table
                if (b, n) == (1, 10_000_000) and p == "fwdbwd"]
    if long_row:
        missed = [f"{op}: {ms['softrank'] / ms['torch.sort']:.2f}x" for op, ms in long_row
                  if ms["softrank"] > 3 * ms["torch.sort"]]
        lines.append("(1, 1e7) forward+backward <= 3x torch.sort: "
                     + ("met" if not missed else "MISSED " + "; ".join(missed)))
    if any("torchsort" in ms for *_, ms in table):
        missed = [f"({b}, {n}) {op} {p}: {ms['torchsort'] / ms['softrank']:.2f}x"
                  for b, n, op, p, ms in table if "torchsort" in ms
                  and ms["torchsort"] < (2.0 if n > 1000 else 1.0) * ms["softrank"]]
        lines.append("faster than torchsort everywhere, 2x where n > 1000: "
                     + ("met" if not missed else "MISSED " + "; ".join(missed)))
    else:
        lines.append("torchsort: not importable here, its goal is not measured")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small cells only")
    args = parser.parse_args(argv)
    reason = gpu_unavailable()
    if reason is not None:
        print(f"test_bench_cuda: no GPU benchmark here: {reason}", file=sys.stderr)
        return 2
    import torch

    torchsort = _torchsort()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, torchsort "
          + ("yes" if torchsort is not None else f"not used ({_TORCHSORT.get('why')})"))
    print(HEADER)
    table = []
    for batch, n in QUICK_CELLS if args.quick else CELLS:
        for op in OPS:
            for pass_ in PASSES:
                ms = measure_cell(batch, n, op, pass_)
                table.append((batch, n, op, pass_, ms))
                print(_row(batch, n, op, pass_, ms), flush=True)
    for note in NOTES:
        print("note: " + note)
    for failure in FAILURES:
        print("CHECK FAILED: " + failure)
    print("goals:")
    for line in goals(table):
        print("  " + line)
    if FAILURES:
        print(f"  softrank's values or gradients: {len(FAILURES)} cell(s) differ from the "
              "CPU engine (CHECK FAILED above)")
    return 1 if FAILURES else 0


try:
    import pytest
except ImportError:  # the script needs no pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("pass_", PASSES)
    @pytest.mark.parametrize("op", OPS)
    @pytest.mark.parametrize("batch, n", CELLS)
    def test_bench_cuda(batch, n, op, pass_):
        reason = gpu_unavailable()
        if reason is not None:
            pytest.skip(reason)
        failures = len(FAILURES)
        ms = measure_cell(batch, n, op, pass_)
        print("\n" + HEADER + "\n" + _row(batch, n, op, pass_, ms))
        assert len(FAILURES) == failures, FAILURES[failures:]


if __name__ == "__main__":
    sys.exit(main())
