"""The benchmark grid, its data and the timing helper shared by every suite.

Every benchmark is one *case*: a *cell* (op, regularization, dtype, batch, n,
pass) and an *implementation*. The pytest-benchmark group of a case is its
cell, so each group holds softrank next to the references and peers timed on
the same array in the same run; ``conftest.py`` orders the cases so that the
members of a group run back to back (on a loaded machine, neighbours in time
see the same load).

Data: ``x`` is uniform on ``[0, n)`` (the mean gap between neighbouring values
is 1 = eps, so PAV sees a mix of pooled and free blocks at every n, instead of
one block or none); the cotangent is standard normal. Both depend only on
(batch, n, dtype), so every implementation of a cell gets the same array.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest

GRID: Tuple[Tuple[int, int], ...] = (
    (1, 100),
    (1, 1000),
    (1, 10**4),
    (1, 10**5),
    (1, 10**6),
    (32, 1000),
    (256, 100),
    (128, 1000),
    (16, 10**4),
    (1024, 64),
)
OPS = ("soft_rank", "soft_sort")
REGS = ("l2", "kl")
DTYPES = ("float32", "float64")
PASSES = ("fwd", "fwdbwd")
EPS = 1.0

# `-m quick`: a handful of cells that run in seconds.
QUICK_SHAPES = {(1, 100), (1, 1000), (256, 100)}  # sinkhorn: n = 100 only

# Implementations, in the order they run inside a group (softrank first, then
# the floor references, then peers and baselines), with their kind.
IMPLS: Dict[str, str] = {
    "softrank.numpy": "softrank",
    "softrank.numpy[stateless]": "softrank-variant",
    "softrank.numpy[vjp-only]": "softrank-variant",
    "softrank.torch": "softrank",
    "softrank.jax": "softrank",
    "np.argsort": "reference",
    "torch.sort": "reference",
    "fast-soft-sort": "peer",
    "torchsort": "peer",
    "torchisotonic": "peer",
    "torchpsort": "peer",
    "ott-jax": "peer",
    "sinkhorn": "baseline",
}

# Sinkhorn reference: a (batch, n, n) cost per call, so it is capped.
SINKHORN_MAX_N = 2000
SINKHORN_MAX_FWD = 2**22  # batch * n^2 for the forward (a few such temporaries)
SINKHORN_MAX_BWD = 2**20  # batch * n^2 for forward+backward (autograd keeps ~100 of them)


@dataclass(frozen=True)
class Cell:
    op: str
    reg: str
    dtype: str
    batch: int
    n: int
    pass_: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.reg}-{self.dtype}-b{self.batch}-n{self.n}-{self.pass_}"

    @property
    def group(self) -> str:
        return self.id

    @property
    def quick(self) -> bool:
        return (
            (self.batch, self.n) in QUICK_SHAPES
            and self.dtype == "float32"
            and self.reg == "l2"
            and self.op == "soft_rank"
        )

    @property
    def order(self) -> int:
        return _CELL_ORDER[self]


@dataclass(frozen=True)
class Case:
    cell: Cell
    impl: str

    @property
    def id(self) -> str:
        return f"{self.cell.id}-{self.impl}"

    @property
    def order(self) -> Tuple[int, int]:
        return (self.cell.order, list(IMPLS).index(self.impl))


def all_cells() -> List[Cell]:
    return [
        Cell(op, reg, dtype, batch, n, pass_)
        for dtype in DTYPES
        for op in OPS
        for reg in REGS
        for batch, n in GRID
        for pass_ in PASSES
    ]


_CELL_ORDER = {cell: i for i, cell in enumerate(all_cells())}


def params(impl: str, applies: Callable[[Cell], bool] = lambda cell: True) -> List:
    """pytest params, one per cell ``impl`` applies to, marked ``quick`` where it is."""
    out = []
    for cell in all_cells():
        if applies(cell):
            case = Case(cell, impl)
            quick = cell.quick and (impl != "sinkhorn" or cell.batch * cell.n**2 <= 10**4)
            marks = [pytest.mark.quick] if quick else []
            out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def all_params(impls: Dict[str, Callable[[Cell], bool]]) -> List:
    out: List = []
    for impl, applies in impls.items():
        out.extend(params(impl, applies))
    return out


# --- data -------------------------------------------------------------------

_DATA: Dict[Tuple, np.ndarray] = {}


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _uniform(seed: int, batch: int, n: int, dtype: str) -> np.ndarray:
    """A (batch, n) array uniform on [0, n) (mean gap between neighbours 1 = eps)."""
    rng = np.random.default_rng(seed)
    return (rng.random((batch, n)) * n).astype(dtype)


def data(batch: int, n: int, dtype: str) -> np.ndarray:
    """x, uniform on [0, n): the same array for every implementation of a cell."""
    key = ("x", batch, n, dtype)
    if key not in _DATA:
        _DATA[key] = _uniform(_seed(batch, n), batch, n, dtype)
    return _DATA[key]


def fresh_data(batch: int, n: int, dtype: str, k: int) -> np.ndarray:
    """The k-th of other arrays drawn as ``data`` draws its one (test_bench_fresh_data.py)."""
    return _uniform(_seed("fresh", batch, n, k), batch, n, dtype)


def cotangent(batch: int, n: int, dtype: str) -> np.ndarray:
    key = ("g", batch, n, dtype)
    if key not in _DATA:
        rng = np.random.default_rng(_seed("cotangent", batch, n))
        _DATA[key] = rng.standard_normal((batch, n)).astype(dtype)
    return _DATA[key]


# --- timing -----------------------------------------------------------------

# A call slower than this is timed with a fixed, small number of rounds
# (pedantic mode) instead of pytest-benchmark's calibrated loop.
SLOW_CALL_S = 0.25
SLOW_ROUNDS = 3
VERY_SLOW_CALL_S = 3.0  # one round only


def measure(
    benchmark, case: Case, fn: Callable[[], object], *, warmup: bool = True, **extra
) -> None:
    """Time ``fn`` for ``case``: group, extra_info, one untimed warm-up call.

    ``warmup=False`` (for calls known to take tens of seconds): no warm-up, one
    timed round.
    """
    cell = case.cell
    benchmark.group = cell.group
    benchmark.extra_info.update(
        impl=case.impl,
        kind=IMPLS[case.impl],
        op=cell.op,
        reg=cell.reg,
        dtype=cell.dtype,
        batch=cell.batch,
        n=cell.n,
        **{"pass": cell.pass_},
        eps=EPS,
    )
    benchmark.extra_info.update(extra)
    if not warmup:
        benchmark.extra_info["rounds_capped"] = 1
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        return
    start = time.perf_counter()
    fn()  # warm-up: JIT compilation, lazy imports, first-touch allocations
    first = time.perf_counter() - start
    if first > SLOW_CALL_S:  # maybe only the warm-up was slow (numba compiling): again
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
    if first > VERY_SLOW_CALL_S:
        benchmark.extra_info["rounds_capped"] = 1
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    elif first > SLOW_CALL_S:
        benchmark.extra_info["rounds_capped"] = SLOW_ROUNDS
        benchmark.pedantic(fn, rounds=SLOW_ROUNDS, iterations=1, warmup_rounds=0)
    else:
        benchmark(fn)


# --- agreement checks -------------------------------------------------------

_CHECKED: Dict[Tuple, bool] = {}


def check_once(key: Tuple, check: Callable[[], None]) -> None:
    """Run ``check`` (raises on disagreement) once per key per session."""
    if key not in _CHECKED:
        check()
        _CHECKED[key] = True


def reference_numpy(op: str, reg: str, x: np.ndarray, cot: np.ndarray | None = None):
    """softrank.numpy's value (and vjp) in float64, the yardstick for the peers' semantics."""
    import softrank.numpy as srn

    x64 = np.asarray(x, dtype=np.float64)
    value = getattr(srn, op)(x64, EPS, regularization=reg)
    if cot is None:
        return value
    grad = getattr(srn, op + "_vjp")(x64, np.asarray(cot, np.float64), EPS, regularization=reg)
    return value, grad


def small_problem() -> Tuple[np.ndarray, np.ndarray]:
    """A small float64 problem in the benchmark's regime, for the agreement checks."""
    rng = np.random.default_rng(1234)
    batch, n = 3, 50
    return rng.random((batch, n)) * n, rng.standard_normal((batch, n))


def assert_close(name: str, what: str, got, want, rtol: float = 1e-6) -> None:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    if not err <= rtol:
        pytest.fail(
            f"{name} disagrees with softrank.numpy on {what}: max error {err:.3g} "
            f"(relative to {scale:.3g}); its semantics differ, so timing it would mislead",
            pytrace=False,
        )

