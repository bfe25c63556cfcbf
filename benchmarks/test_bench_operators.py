"""softrank's operators on the permutahedron against the peer that offers each one.

One cell is (op, regularization, dtype, batch, n, pass); its pytest-benchmark
group holds softrank and the peer, timed back to back on the same arrays in the
same run (``conftest.py`` orders them). Goal: softrank <= 0.5x the peer's time.

Rows, each peer first checked once against softrank on a small float64 problem
(value and gradient after mapping conventions; a peer whose semantics differ
fails instead of being timed):

- ``isotonic_regression`` (l2, without and with weights): ``softrank.torch``
  vs ``torchisotonic.isotonic``; fwdbwd is the gradient with respect to y and,
  with weights, to the weights. y is a noisy increasing trend, ``i + 5 N(0, 1)``
  (PAV blocks of a few dozen); the weights are uniform on [0.5, 1.5).
- ``soft_topk_mask`` (k = n / 10), ``soft_quantile`` (q = 0.1, 0.5, 0.9) and
  ``soft_median`` (l2): ``softrank.jax`` vs ``ott.tools.soft_sort`` (Sinkhorn,
  ott's defaults: epsilon 1e-2 on sigmoid-whitened values, implicit
  differentiation), both jitted; fwdbwd is one jitted call returning the value
  and the vjp of a cotangent. ott's outputs are approximations with their own
  smoothing, so its check compares the hard limits (ott at epsilon 1e-3,
  softrank at eps 0.5 on integer-spaced data, where the l2 operators are
  exactly hard) and, for the quantiles, where the gradient's mass sits (the
  mask's hard limit has a zero gradient: ott's, as timed, must be finite).
  Only n <= 1000 and batch * n^2 <= 256 * 100^2: each Sinkhorn iteration is
  O(n^2) per row. float64 only: with ``jax_enable_x64`` (which the float64
  cells need in the same process) ott 0.6.0 fails on float32 input (its
  Sinkhorn error's ``lax.cond`` branches differ in dtype), and with x64 off its
  float32 implicit gradient is not finite. Where ott's implicit differentiation
  fails on the benchmark's input (topk_mask at (256, 100)), the cell is skipped
  with that reason.
- ``permutahedron_projection`` (l2 and kl, a random unsorted w shared by the
  rows) and ``isotonic_regression`` kl (decreasing, random weights):
  ``softrank.numpy`` vs fast-soft-sort's ``Projection`` / ``Isotonic`` (row by
  row: its API takes 1-D arrays); fwdbwd is the value then the vjp with respect
  to z (to y). fast-soft-sort assumes w sorted decreasingly, so its calls sort
  w first (P(w) does not depend on w's order); its kl isotonic takes log
  weights and fits a non-increasing sequence.
- ``spearman`` (l2 and kl): ``softrank.torch`` vs the Spearman loss of
  torchsort's README (``torchsort.soft_rank`` of prediction and target, centred
  and normalised), batched along the last dim. The target is a permutation of
  (0, ..., n - 1): gaps of 1 = eps make its soft rank its hard rank (l2 and
  kl), so the recipe computes the same value as softrank's hard-ranked target.

torchpsort (soft top-k, quantile, median) needs Python >= 3.12: no rows here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest

import _peers
from _benchutil import (EPS, IMPLS, QUICK_SHAPES, Case, Cell, _seed, assert_close, check_once,
                        measure)

DTYPES = ("float32", "float64")
PASSES = ("fwd", "fwdbwd")
TORCH_SHAPES = ((1, 1000), (1, 10**5), (256, 100), (128, 1000))
OTT_SHAPES = ((1, 100), (1, 1000), (256, 100))
FSS_SHAPES = ((1, 1000), (1, 10**5), (256, 100), (128, 1000))
TOPK_FRACTION = 10  # k = n // 10
QUANTILES = (0.1, 0.5, 0.9)
ISOTONIC_NOISE = 5.0

# op -> (regularizations, dtypes, shapes, softrank implementation, peer)
ROWS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], Tuple, str, str]] = {
    "isotonic_regression": (("l2",), DTYPES, TORCH_SHAPES, "softrank.torch", "torchisotonic"),
    "isotonic_regression[weights]": (("l2",), DTYPES, TORCH_SHAPES, "softrank.torch",
                                     "torchisotonic"),
    "spearman": (("l2", "kl"), DTYPES, TORCH_SHAPES, "softrank.torch", "torchsort"),
    "soft_topk_mask": (("l2",), ("float64",), OTT_SHAPES, "softrank.jax", "ott-jax"),
    "soft_quantile": (("l2",), ("float64",), OTT_SHAPES, "softrank.jax", "ott-jax"),
    "soft_median": (("l2",), ("float64",), OTT_SHAPES, "softrank.jax", "ott-jax"),
    "permutahedron_projection": (("l2", "kl"), DTYPES, FSS_SHAPES, "softrank.numpy",
                                 "fast-soft-sort"),
    "isotonic_regression[weights,decreasing]": (("kl",), DTYPES, FSS_SHAPES, "softrank.numpy",
                                                "fast-soft-sort"),
}


@dataclass(frozen=True)
class OpCell(Cell):
    """A cell of the operators' grid: ``_benchutil.Cell`` (the fields ``measure`` reads),
    ordered after the soft_rank / soft_sort grid."""

    @property
    def order(self) -> int:
        return _ORDER[self]


@dataclass(frozen=True)
class OpCase(Case):
    """``_benchutil.Case`` of an operator's cell, ordered after every case of the soft_rank /
    soft_sort grid."""

    cell: OpCell

    @property
    def order(self) -> Tuple[int, int]:
        return (10**6 + self.cell.order, list(IMPLS).index(self.impl))


def _cells() -> List[OpCell]:
    return [
        OpCell(op, reg, dtype, batch, n, pass_)
        for op, (regs, dtypes, shapes, _, _) in ROWS.items()
        for dtype in dtypes
        for reg in regs
        for batch, n in shapes
        for pass_ in PASSES
    ]


_ORDER = {cell: i for i, cell in enumerate(_cells())}


def _params() -> List:
    out = []
    for cell in _cells():
        _, dtypes, _, mine, peer = ROWS[cell.op]
        quick = ((cell.batch, cell.n) in QUICK_SHAPES and cell.reg == "l2"
                 and cell.dtype == dtypes[0])
        for impl in (mine, peer):
            case = OpCase(cell, impl)
            out.append(pytest.param(case, id=case.id,
                                    marks=[pytest.mark.quick] if quick else []))
    return out


# --- data: depends only on (op family, batch, n, dtype) --------------------------------

_DATA: Dict[Tuple, object] = {}


def _cached(key: Tuple, make: Callable[[], object]):
    if key not in _DATA:
        _DATA[key] = make()
    return _DATA[key]


def _uniform(batch: int, n: int, dtype: str) -> np.ndarray:
    """x uniform on [0, n), as in the soft_rank / soft_sort grid."""
    def make():
        rng = np.random.default_rng(_seed(batch, n))
        return (rng.random((batch, n)) * n).astype(dtype)
    return _cached(("x", batch, n, dtype), make)


def _normal(shape: Tuple[int, ...], dtype: str, *key) -> np.ndarray:
    def make():
        rng = np.random.default_rng(_seed("normal", shape, *key))
        return rng.standard_normal(shape).astype(dtype)
    return _cached(("normal", shape, dtype) + key, make)


def _trend(batch: int, n: int, dtype: str) -> np.ndarray:
    """i + 5 N(0, 1) along each row: the fit pools blocks of a few dozen."""
    def make():
        noise = np.random.default_rng(_seed("trend", batch, n)).standard_normal((batch, n))
        return (np.arange(n) + ISOTONIC_NOISE * noise).astype(dtype)
    return _cached(("trend", batch, n, dtype), make)


def _weights(shape: Tuple[int, ...], dtype: str) -> np.ndarray:
    def make():
        rng = np.random.default_rng(_seed("weights", shape))
        return (0.5 + rng.random(shape)).astype(dtype)
    return _cached(("weights", shape, dtype), make)


def _projection_w(n: int, reg: str, dtype: str) -> np.ndarray:
    """A random unsorted w on rho's scale: uniform on [1, n + 1) (l2), its log (kl)."""
    def make():
        w = 1.0 + np.random.default_rng(_seed("w", n)).random(n) * n
        return (w if reg == "l2" else np.log(w)).astype(dtype)
    return _cached(("w", n, reg, dtype), make)


def _permutations(batch: int, n: int, dtype: str) -> np.ndarray:
    """Rows that are permutations of (0, ..., n - 1)."""
    def make():
        rng = np.random.default_rng(_seed("target", batch, n))
        return np.stack([rng.permutation(n) for _ in range(batch)]).astype(dtype)
    return _cached(("perm", batch, n, dtype), make)


# --- torch: isotonic regression vs torchisotonic, spearman vs torchsort's recipe -------


def _torch_fns(impl: str, op: str, reg: str):
    """(inputs -> output) and the indices of the inputs a fwdbwd differentiates."""
    pytest.importorskip("torch")
    if op == "spearman":
        if impl == "softrank.torch":
            srt = pytest.importorskip("softrank.torch")
            return (lambda pred, target: srt.spearman(pred, target, EPS, regularization=reg)), (0,)
        pytest.importorskip("torchsort")
        return _peers.torchsort_spearman(reg, EPS), (0,)
    weighted = op == "isotonic_regression[weights]"
    wrt = (0, 1) if weighted else (0,)
    if impl == "softrank.torch":
        srt = pytest.importorskip("softrank.torch")
        if weighted:
            return (lambda y, w: srt.isotonic_regression(y, weights=w)), wrt
        return srt.isotonic_regression, wrt
    ti = pytest.importorskip("torchisotonic")
    if weighted:
        return (lambda y, w: ti.isotonic(y, w)), wrt
    return ti.isotonic, wrt


def _torch_inputs(op: str, batch: int, n: int, dtype: str):
    if op == "spearman":
        return [_uniform(batch, n, dtype), _permutations(batch, n, dtype)], \
            _normal((batch,), dtype, "spearman")
    inputs = [_trend(batch, n, dtype)]
    if op == "isotonic_regression[weights]":
        inputs.append(_weights((batch, n), dtype))
    return inputs, _normal((batch, n), dtype, "cotangent")


def _torch_value_and_grads(fn, wrt, arrays, cot):
    import torch

    leaves = [torch.tensor(a, requires_grad=i in wrt) for i, a in enumerate(arrays)]
    out = fn(*leaves)
    out.backward(torch.tensor(cot))
    return out.detach().numpy(), [leaves[i].grad.numpy() for i in wrt]


def _check_torch(impl: str, op: str, reg: str) -> None:
    def check():
        arrays, cot = _torch_inputs(op, 3, 50, "float64")
        want, want_grads = _torch_value_and_grads(*_torch_fns(_mine(op), op, reg), arrays, cot)
        got, got_grads = _torch_value_and_grads(*_torch_fns(impl, op, reg), arrays, cot)
        assert_close(impl, f"{op} {reg} forward", got, want)
        for i, (g, w) in enumerate(zip(got_grads, want_grads)):
            assert_close(impl, f"{op} {reg} gradient of input {i}", g, w)

    check_once(("ops", impl, op, reg), check)


def _time_torch(benchmark, case: OpCase) -> None:
    import torch

    cell = case.cell
    fn, wrt = _torch_fns(case.impl, cell.op, cell.reg)
    if case.impl != _mine(cell.op):
        _check_torch(case.impl, cell.op, cell.reg)
    arrays, cot = _torch_inputs(cell.op, cell.batch, cell.n, cell.dtype)
    tensors = [torch.from_numpy(a) for a in arrays]
    cot_t = torch.from_numpy(cot)
    extra = {"torch_threads": torch.get_num_threads()}
    if cell.pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return fn(*tensors)

        measure(benchmark, case, forward, **extra)
        return

    def forward_backward():
        leaves = [t.detach().requires_grad_(i in wrt) for i, t in enumerate(tensors)]
        out = fn(*leaves)
        out.backward(cot_t)
        return out, [leaves[i].grad for i in wrt]

    measure(benchmark, case, forward_backward, **extra)


# --- jax: top-k mask, quantiles, median vs ott-jax ---------------------------------------

_JITTED: Dict[Tuple, Tuple] = {}


def _jax():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return jax


def _jax_fn(impl: str, op: str, n: int, eps: float = EPS, ott_kwargs: Dict | None = None):
    """x (batch, n) -> output, in softrank's layout: (batch, n) for the mask,
    (len(QUANTILES), batch) for the quantiles, (batch,) for the median."""
    jax = _jax()
    jnp = jax.numpy
    k = n // TOPK_FRACTION
    q = jnp.asarray(QUANTILES)
    if impl == "softrank.jax":
        srj = pytest.importorskip("softrank.jax")
        if op == "soft_topk_mask":
            return lambda x: srj.soft_topk_mask(x, k, eps)
        if op == "soft_quantile":
            return lambda x: srj.soft_quantile(x, q, eps)
        return lambda x: srj.soft_median(x, eps)
    soft_sort = _peers.ott_soft_sort()
    kw = ott_kwargs or {}
    if op == "soft_topk_mask":
        return lambda x: soft_sort.topk_mask(x, axis=-1, k=k, **kw)
    if op == "soft_quantile":
        return lambda x: soft_sort.quantile(x, q, axis=-1, **kw).T
    return lambda x: soft_sort.quantile(x, 0.5, axis=-1, **kw)[:, 0]


def _jax_functions(impl: str, op: str, n: int):
    """(jitted forward, jitted value-and-vjp)."""
    key = (impl, op, n)
    if key not in _JITTED:
        jax = _jax()
        forward = _jax_fn(impl, op, n)

        def forward_backward(x, cot):
            y, pullback = jax.vjp(forward, x)
            return y, pullback(cot)[0]

        _JITTED[key] = jax.jit(forward), jax.jit(forward_backward)
    return _JITTED[key]


def _jax_cotangent(op: str, batch: int, n: int, dtype: str) -> np.ndarray:
    shape = {"soft_topk_mask": (batch, n), "soft_quantile": (len(QUANTILES), batch),
             "soft_median": (batch,)}[op]
    return _normal(shape, dtype, "jax")


def _check_ott(op: str) -> None:
    """ott-jax against softrank in the hard limit, where both mean the same thing."""
    def check():
        jax = _jax()
        jnp = jax.numpy
        batch, n = 3, 50
        x = jnp.asarray(_permutations(batch, n, "float64"))
        # integer-spaced x: at eps = 0.5 softrank's l2 operators are exactly the hard ones
        mine = _jax_fn("softrank.jax", op, n, eps=0.5)
        ott = _jax_fn("ott-jax", op, n, ott_kwargs={"epsilon": 1e-3})
        want, got = np.asarray(mine(x)), np.asarray(ott(x))
        if op == "soft_topk_mask":
            _assert_near("ott-jax", f"{op} hard limit", got, want, atol=0.05)
            # the mask's hard limit has a zero gradient: nothing to compare it with; the
            # gradient with the settings that are timed must at least be finite
            timed = _jax_fn("ott-jax", op, n)
            cot = jax.lax.stop_gradient(x)
            grads = np.asarray(jax.grad(lambda x: jnp.vdot(cot, timed(x)))(x))
            if not np.all(np.isfinite(grads)):
                pytest.fail("ott-jax topk_mask: non-finite gradient", pytrace=False)
            return
        # quantiles: ott averages the sorted values over a bin of ~1.5 points around q
        _assert_near("ott-jax", f"{op} hard limit", got, want, atol=1.0)
        outputs = want.reshape(-1, batch)
        for j in range(outputs.shape[0]):
            def component(f, x, j=j):
                return f(x).reshape(-1, batch)[j].sum()

            g_mine = np.asarray(jax.grad(lambda x: component(mine, x))(x))
            g_ott = np.asarray(jax.grad(lambda x: component(ott, x))(x))
            # both are weighted means of each row's values: weights sum to 1, and ott's
            # heaviest element is one of the order statistics softrank interpolates
            # (ott's Sinkhorn stops at a marginal error of 1e-3, hence the tolerance)
            _assert_near("ott-jax", f"{op} gradient row sums", g_ott.sum(-1), g_mine.sum(-1),
                         atol=1e-2)
            heaviest = np.argmax(g_ott, axis=-1)
            on = g_mine[np.arange(batch), heaviest] > 0
            if not np.all(on):
                pytest.fail(f"ott-jax {op}: its gradient's mass sits on other elements than "
                            "softrank's hard quantile", pytrace=False)

    check_once(("ops", "ott-jax", op), check)


def _assert_near(name: str, what: str, got, want, atol: float) -> None:
    err = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    if not err <= atol:
        pytest.fail(f"{name} disagrees with softrank on {what}: max error {err:.3g} > {atol}; "
                    "its semantics differ, so timing it would mislead", pytrace=False)


def _ott_differentiates(call: Callable[[], object]) -> None:
    """Skip, naming why, a cell where ott's implicit differentiation fails (its linear
    solve returns NaN: at (256, 100) for topk_mask); any other error propagates."""
    jax = _jax()
    try:
        jax.block_until_ready(call())
    except jax.errors.JaxRuntimeError as exc:
        if "non-finite" not in str(exc):
            raise
        pytest.skip("ott-jax: its implicit differentiation fails on this input (lineax: "
                    "'A linear solver returned non-finite (NaN or inf) output'), not timed")


def _time_jax(benchmark, case: OpCase) -> None:
    jax = _jax()
    cell = case.cell
    forward, forward_backward = _jax_functions(case.impl, cell.op, cell.n)
    if case.impl == "ott-jax":
        _check_ott(cell.op)
    x = jax.numpy.asarray(_uniform(cell.batch, cell.n, cell.dtype))
    cot = jax.numpy.asarray(_jax_cotangent(cell.op, cell.batch, cell.n, cell.dtype))
    if case.impl == "ott-jax" and cell.pass_ == "fwdbwd":
        _ott_differentiates(lambda: forward_backward(x, cot))
    extra = {"k": cell.n // TOPK_FRACTION} if cell.op == "soft_topk_mask" else {}
    if cell.op == "soft_quantile":
        extra = {"q": list(QUANTILES)}
    if cell.pass_ == "fwd":
        measure(benchmark, case, lambda: forward(x).block_until_ready(), **extra)
    else:
        measure(benchmark, case, lambda: jax.block_until_ready(forward_backward(x, cot)),
                **extra)


# --- numpy: projection onto P(w) and kl isotonic regression vs fast-soft-sort ----------------


def _numpy_inputs(impl: str, op: str, reg: str, batch: int, n: int, dtype: str):
    """(x, w, cotangent), w in the convention of ``impl``: fast-soft-sort's kl isotonic
    regression takes the log of softrank's weights (taken here, untimed: its caller
    holds them that way)."""
    cot = _normal((batch, n), dtype, "cotangent")
    if op == "permutahedron_projection":
        return _uniform(batch, n, dtype), _projection_w(n, reg, dtype), cot
    y = _cached(("decreasing", batch, n, dtype), lambda: -_trend(batch, n, dtype))
    weights = _weights((batch, n), dtype)
    if impl == "fast-soft-sort":
        weights = _cached(("log weights", batch, n, dtype), lambda: np.log(weights))
    return y, weights, cot


def _numpy_fns(impl: str, op: str, reg: str):
    """(forward(x, w), forward_backward(x, w, cot) -> (value, grad wrt x))."""
    if impl == "softrank.numpy":
        srn = pytest.importorskip("softrank.numpy")
        if op == "permutahedron_projection":
            def forward(x, w):
                return srn.permutahedron_projection(x, w, regularization=reg)

            def forward_backward(x, w, cot):
                value, pullback = srn.permutahedron_projection_with_vjp(x, w, regularization=reg)
                return value, pullback(cot)[0]
            return forward, forward_backward

        def forward(y, weights):
            return srn.isotonic_regression(y, weights=weights, increasing=False,
                                           regularization=reg)

        def forward_backward(y, weights, cot):
            value, pullback = srn.isotonic_regression_with_vjp(
                y, weights=weights, increasing=False, regularization=reg)
            return value, pullback(cot)[0]
        return forward, forward_backward

    fss = _peers.fast_soft_sort()
    if op == "permutahedron_projection":
        return (lambda x, w: _peers.fss_projection(fss, reg, x, w),
                lambda x, w, cot: _peers.fss_projection(fss, reg, x, w, cot))
    return (lambda y, log_w: _peers.fss_isotonic_kl(fss, y, log_w),
            lambda y, log_w, cot: _peers.fss_isotonic_kl(fss, y, log_w, cot))


def _check_fss(op: str, reg: str) -> None:
    def check():
        mine, peer = "softrank.numpy", "fast-soft-sort"
        want, want_grad = _numpy_fns(mine, op, reg)[1](*_numpy_inputs(mine, op, reg, 3, 50,
                                                                       "float64"))
        got, got_grad = _numpy_fns(peer, op, reg)[1](*_numpy_inputs(peer, op, reg, 3, 50,
                                                                    "float64"))
        assert_close("fast-soft-sort", f"{op} {reg} forward", got, want)
        assert_close("fast-soft-sort", f"{op} {reg} vjp", got_grad, want_grad)

    check_once(("ops", "fss", op, reg), check)


def _time_numpy(benchmark, case: OpCase) -> None:
    cell = case.cell
    forward, forward_backward = _numpy_fns(case.impl, cell.op, cell.reg)
    if case.impl == "fast-soft-sort":
        _check_fss(cell.op, cell.reg)
    x, w, cot = _numpy_inputs(case.impl, cell.op, cell.reg, cell.batch, cell.n, cell.dtype)
    if cell.pass_ == "fwd":
        measure(benchmark, case, lambda: forward(x, w))
    else:
        measure(benchmark, case, lambda: forward_backward(x, w, cot))


def _mine(op: str) -> str:
    return ROWS[op][3]


TIMERS = {"softrank.torch": _time_torch, "softrank.jax": _time_jax, "softrank.numpy": _time_numpy}


@pytest.mark.parametrize("case", _params())
def test_operators(benchmark, case: OpCase):
    TIMERS[_mine(case.cell.op)](benchmark, case)
