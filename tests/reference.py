"""Independent references for the softrank tests.

Nothing here imports softrank or follows its algorithm (pool-adjacent-violators
with stored blocks).  Three independent routes to the same numbers:

1. ``project_bruteforce``: the l2 / kl projection onto the permutahedron
   ``conv{permutations of w}`` (n <= 7) straight from its definition.  A generic
   solver (scipy SLSQP over the H-description of the polytope, one constraint per
   subset) gives an approximate point; the face of the polytope exposed by the
   (negative) gradient there is read off by enumerating all ``n!`` vertices; the
   problem restricted to that face's affine hull is solved to machine precision
   (a linear solve for l2, Newton in log space for kl); and the result is
   accepted only if it passes an optimality certificate checked against every
   vertex (variational inequality) plus a feasibility check (majorization,
   Rado's theorem).  Several face tolerances are tried; a result that fails the
   certificate raises, so the reference never silently returns a wrong point.

2. ``isotonic_minmax``: weighted l2 isotonic regression by the min-max formula
   ``v_i = max_{j<=i} min_{k>=i} mean_w(y[j..k])`` (Robertson, Wright & Dykstra
   1988), O(n^3), with exactly rounded sums (``math.fsum``).

3. ``project_minmax``: the projection through the reduction of Blondel et al.
   (2020, Prop. 3) ``P(z, w) = z - v(z_sorted, w_sorted)`` with the isotonic
   problem solved by the same min-max formula (block value ``mean(s - w)`` for
   l2, ``LSE(s) - LSE(w)`` for kl), in arbitrary precision with mpmath from the
   exact binary values of the float64 inputs.  It is the high-precision
   reference for extreme magnitudes (``|x|/eps`` up to 1e300, ``eps`` down to
   1e-300).

The soft operators (SPEC section 1; sign conventions of the authors' code):

    soft_rank(x)    = P(s * x / eps, rho)               s = +1 ascending, -1 descending
    soft_rank kl(x) = exp(P_E(s * x / eps, log rho))
    soft_sort(x)    = t * P(rho / eps, t * x)           t = +1 descending, -1 ascending
    soft_sort kl(x) = t * P_E(rho / eps, t * x)

with ``rho = (n, n-1, ..., 1)``.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Callable, Optional

import numpy as np

__all__ = [
    "project_bruteforce",
    "project_minmax",
    "isotonic_minmax",
    "isotonic_kl_ref",
    "soft_rank_ref",
    "soft_sort_ref",
    "hard_rank",
    "hard_sort",
    "jacobian_fd",
    "vjp_fd",
    "jvp_fd",
    "rel_err",
]


# ---------------------------------------------------------------------------
# small helpers


def rel_err(a, b) -> float:
    """Normwise relative error ``max|a - b| / max|b|`` (0 for two empty arrays)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size == 0 and b.size == 0:
        return 0.0
    scale = float(np.max(np.abs(b)))
    diff = float(np.max(np.abs(a - b)))
    if scale == 0.0:
        return diff
    return diff / scale


def hard_rank(x, direction="ascending"):
    """1-based ranks with ties averaged, by counting (no sorting): for each i,
    ``#{j: x_j < x_i} + (#{j: x_j == x_i} + 1) / 2``."""
    x = np.asarray(x, dtype=np.float64)
    if direction == "descending":
        x = -x
    less = (x[None, :] < x[:, None]).sum(axis=1)
    equal = (x[None, :] == x[:, None]).sum(axis=1)
    return less + (equal + 1) / 2.0


def hard_sort(x, direction="ascending"):
    x = np.asarray(x, dtype=np.float64)
    s = np.sort(x)
    return s if direction == "ascending" else s[::-1].copy()


# ---------------------------------------------------------------------------
# 1. brute force over the n! vertices


def _vertices(w: np.ndarray) -> np.ndarray:
    return np.array(sorted(set(itertools.permutations(w.tolist()))), dtype=np.float64)


def _in_permutahedron(mu: np.ndarray, w: np.ndarray, tol: float) -> bool:
    """Rado: mu in conv(Perm(w)) iff sorted partial sums of mu are <= those of w
    and the totals agree."""
    a = np.cumsum(np.sort(mu)[::-1])
    b = np.cumsum(np.sort(w)[::-1])
    return bool(np.all(a[:-1] <= b[:-1] + tol) and abs(a[-1] - b[-1]) <= tol)


def _approx_solution(z: np.ndarray, w_space: np.ndarray, reg: str) -> np.ndarray:
    """SLSQP over the H-description: sum_S mu <= top_|S|(w), sum mu = sum w."""
    from scipy.optimize import minimize

    n = len(z)
    top = np.cumsum(np.sort(w_space)[::-1])
    rows, rhs = [], []
    for mask in range(1, 2 ** n - 1):
        row = np.array([(mask >> i) & 1 for i in range(n)], dtype=np.float64)
        rows.append(row)
        rhs.append(top[int(row.sum()) - 1])
    A = np.array(rows)
    b = np.array(rhs)
    total = top[-1]
    cons = [
        {"type": "ineq", "fun": lambda m: b - A @ m, "jac": lambda m: -A},
        {"type": "eq", "fun": lambda m: np.array([m.sum() - total]),
         "jac": lambda m: np.ones((1, n))},
    ]
    x0 = np.full(n, total / n)
    if reg == "l2":
        fun = lambda m: 0.5 * np.sum((m - z) ** 2)  # noqa: E731
        jac = lambda m: m - z  # noqa: E731
        bounds = None
    else:
        lo = float(np.min(w_space))
        fun = lambda m: float(np.sum(m * (np.log(m) - z) - m))  # noqa: E731
        jac = lambda m: np.log(m) - z  # noqa: E731
        bounds = [(lo * (1 - 1e-9), None)] * n
    res = minimize(fun, x0, jac=jac, constraints=cons, bounds=bounds,
                   method="SLSQP", options={"ftol": 1e-15, "maxiter": 2000})
    return np.asarray(res.x, dtype=np.float64)


def _basis(D: np.ndarray, n: int):
    """Orthonormal bases of span(rows of D) and of its orthogonal complement."""
    if D.shape[0] == 0:
        return np.zeros((n, 0)), np.eye(n)
    # zero rows make vt square (n x n) without forming the huge U of a big face
    _, s, vt = np.linalg.svd(np.vstack([D, np.zeros((n, n))]), full_matrices=False)
    r = int(np.sum(s > 1e-10 * max(1.0, s[0])))
    return vt[:r].T, vt[r:].T


def _polish(z, V, mu_approx, reg, tol):
    """Solve the problem on the affine hull of the face exposed at mu_approx."""
    n = len(z)
    if reg == "l2":
        g = z - mu_approx
    else:
        g = z - np.log(mu_approx)
    scores = V @ g
    top = scores.max()
    face = V[scores >= top - tol * max(1.0, np.abs(scores).max())]
    v0 = face[0]
    Q, N = _basis(face[1:] - v0, n)
    if reg == "l2":
        mu = v0 + Q @ (Q.T @ (z - v0))
        return mu, mu
    # kl: log mu = z + N eta with N^T (mu - v0) = 0; Newton on the convex dual
    # phi(eta) = sum exp(z + N eta) - eta . N^T v0, with backtracking.
    c = N.T @ v0
    eta = N.T @ (np.log(mu_approx) - z)

    def phi(e):
        return float(np.sum(np.exp(z + N @ e)) - e @ c)

    for _ in range(200):
        logmu = z + N @ eta
        mu = np.exp(logmu)
        grad = N.T @ mu - c
        if np.max(np.abs(grad)) <= 1e-15 * max(1.0, np.abs(c).max()):
            break
        H = N.T @ (mu[:, None] * N)
        step = np.linalg.solve(H, grad)
        # Backtrack only on a real increase: near the optimum the decrease is
        # below the rounding of phi and a full Newton step is right.
        t, f0 = 1.0, phi(eta)
        slack = 1e-13 * max(1.0, abs(f0))
        while t > 1e-12 and phi(eta - t * step) > f0 - 0.25 * t * (grad @ step) + slack:
            t *= 0.5
        new = eta - t * step
        if np.array_equal(new, eta):
            break
        eta = new
    logmu = z + N @ eta
    return np.exp(logmu), logmu


def _certified(z, w_space, V, mu, logmu, reg) -> bool:
    scale = max(1.0, float(np.abs(w_space).max()))
    if not _in_permutahedron(mu, w_space, 1e-11 * scale * len(z)):
        return False
    g = z - (mu if reg == "l2" else logmu)
    gap = float(np.max(V @ g) - g @ mu)
    gscale = max(1.0, float(np.abs(g).max())) * scale * len(z)
    return gap <= 1e-11 * gscale


def project_bruteforce(z, w, regularization="l2"):
    """``P_Q(z, w)`` (l2) or ``P_E(z, w)`` (kl) by brute force, float64, n <= 7.

    l2: argmin over conv(Perm(w)) of 1/2 ||mu - z||^2.
    kl: log argmin over conv(Perm(exp w)) of KL(mu, exp z)
        = sum mu log(mu / exp z) - mu + exp z.
    """
    z = np.asarray(z, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n = len(z)
    if n == 0:
        return z.copy()
    if n > 7:
        raise ValueError("brute force is for n <= 7")
    if n == 1:  # the polytope is the single point w
        return w.copy()
    zshift = wshift = 0.0
    if regularization == "kl":
        # KL(mu, exp(z + a)) differs from KL(mu, exp z) by a constant on the
        # polytope (sum mu is fixed), and conv(Perm(exp(w + b))) = e^b conv(...):
        # normalise both for the solver, undo the shift of w at the end.
        zshift, wshift = float(z.max()), float(w.max())
        z = z - zshift
        w = w - wshift
        w_space = np.exp(w)
    else:
        w_space = w
    V = _vertices(w_space)
    mu0 = _approx_solution(z, w_space, regularization)
    if regularization == "kl":
        mu0 = np.maximum(mu0, np.min(w_space) * 1e-3)
    for tol in (1e-7, 1e-9, 1e-5, 1e-11, 1e-4, 1e-3, 1e-13):
        mu, logmu = _polish(z, V, mu0, regularization, tol)
        if np.all(np.isfinite(logmu)) and _certified(z, w_space, V, mu, logmu, regularization):
            return logmu + wshift if regularization == "kl" else mu
    raise RuntimeError(f"brute-force projection not certified for z={z!r}, w={w!r}")


# ---------------------------------------------------------------------------
# 2. isotonic regression by the min-max formula


def isotonic_minmax(y, weights=None, increasing=True):
    """argmin_v sum w_i (v_i - y_i)^2 s.t. v monotone, by the min-max formula.

    increasing:  v_i = max_{j<=i} min_{k>=i} M[j, k]
    decreasing:  v_i = min_{j<=i} max_{k>=i} M[j, k]
    where M[j, k] is the w-weighted mean of y[j..k] (exactly rounded sums).
    """
    y = [float(v) for v in np.asarray(y, dtype=np.float64).ravel()]
    n = len(y)
    w = [1.0] * n if weights is None else [float(v) for v in np.asarray(weights, dtype=np.float64).ravel()]
    M = np.full((n, n), np.nan)
    for j in range(n):
        for k in range(j, n):
            num = math.fsum(w[t] * y[t] for t in range(j, k + 1))
            den = math.fsum(w[j:k + 1])
            M[j, k] = num / den
    out = np.empty(n)
    for i in range(n):
        sub = M[: i + 1, i:]
        if increasing:
            out[i] = np.max(np.min(sub, axis=1))
        else:
            out[i] = np.min(np.max(sub, axis=1))
    return out


def isotonic_exact(y, weights=None, increasing=True):
    """The min-max formula in exact rational arithmetic (for small n)."""
    y = [Fraction(float(v)) for v in np.asarray(y, dtype=np.float64).ravel()]
    n = len(y)
    w = [Fraction(1)] * n if weights is None else [Fraction(float(v)) for v in np.asarray(weights, dtype=np.float64).ravel()]
    M = [[None] * n for _ in range(n)]
    for j in range(n):
        num = den = Fraction(0)
        for k in range(j, n):
            num += w[k] * y[k]
            den += w[k]
            M[j][k] = num / den
    out = []
    for i in range(n):
        if increasing:
            out.append(max(min(M[j][k] for k in range(i, n)) for j in range(i + 1)))
        else:
            out.append(min(max(M[j][k] for k in range(i, n)) for j in range(i + 1)))
    return np.array([float(v) for v in out])


# ---------------------------------------------------------------------------
# 3. projection by the min-max formula in arbitrary precision


def _precision_for(values) -> int:
    """Bits to hold sums/differences of the given float64 values exactly enough."""
    exps = [math.frexp(v)[1] for v in values if v != 0.0 and math.isfinite(v)]
    if not exps:
        return 128
    return 2 * (max(exps) - min(exps)) + 256


def _minmax_decreasing(val, n):
    """v_i = min_{j<=i} max_{k>=i} val[j][k] (non-increasing isotonic)."""
    return [min(max(val[j][k] for k in range(i, n)) for j in range(i + 1)) for i in range(n)]


def project_minmax(z_num, w_num, regularization="l2", prec=None, as_mp=False):
    """P(z, w) through the isotonic reduction, in mpmath.

    ``z_num`` and ``w_num`` are sequences of mpmath numbers (or floats); the
    caller forms them exactly (e.g. ``mpf(x) / mpf(eps)``).  Returns mpf values
    (``as_mp``) or float64.
    """
    import mpmath

    n = len(z_num)
    if n == 0:
        return [] if as_mp else np.zeros(0)
    ctx = mpmath.mp
    old = ctx.prec
    if prec is not None:
        ctx.prec = prec
    try:
        z = [mpmath.mpf(v) for v in z_num]
        w = sorted((mpmath.mpf(v) for v in w_num), reverse=True)
        order = sorted(range(n), key=lambda i: (-z[i], i))
        s = [z[i] for i in order]
        cut = ctx.prec + 64  # exp(-cut) is below the working precision

        def lae(a, b):
            hi, lo = (a, b) if a >= b else (b, a)
            d = hi - lo
            if d > cut:
                return hi
            return hi + mpmath.log1p(mpmath.exp(-d))

        val = [[None] * n for _ in range(n)]
        for j in range(n):
            if regularization == "l2":
                acc = mpmath.mpf(0)
                for k in range(j, n):
                    acc += s[k] - w[k]
                    val[j][k] = acc / (k - j + 1)
            else:
                ls = lw = None
                for k in range(j, n):
                    ls = s[k] if ls is None else lae(ls, s[k])
                    lw = w[k] if lw is None else lae(lw, w[k])
                    val[j][k] = ls - lw
        v = _minmax_decreasing(val, n)
        out = [None] * n
        for pos, i in enumerate(order):
            out[i] = s[pos] - v[pos]
        if as_mp:
            return out
        return np.array([float(o) for o in out])
    finally:
        ctx.prec = old


# ---------------------------------------------------------------------------
# soft operators


def _check(regularization, direction):
    if regularization not in ("l2", "kl"):
        raise ValueError(regularization)
    if direction not in ("ascending", "descending"):
        raise ValueError(direction)


def soft_rank_ref(x, eps=1.0, regularization="l2", direction="ascending", method="minmax"):
    """Reference soft rank of a 1-D float64 vector, eps in (0, inf).

    method="brute": the brute-force projection (n <= 7) in float64.
    method="minmax": the min-max reduction in mpmath from the exact inputs,
    correctly rounded to float64 (any magnitude of x and eps).
    """
    _check(regularization, direction)
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    sgn = 1.0 if direction == "ascending" else -1.0
    rho = np.arange(n, 0, -1, dtype=np.float64)
    if method == "brute":
        z = sgn * x / eps
        if regularization == "l2":
            return project_bruteforce(z, rho, "l2")
        return np.exp(project_bruteforce(z, np.log(rho), "kl"))
    import mpmath

    prec = _precision_for(list(x) + [eps, float(n)])
    old = mpmath.mp.prec
    mpmath.mp.prec = prec
    try:
        e = mpmath.mpf(eps)
        z = [sgn * mpmath.mpf(float(v)) / e for v in x]
        if regularization == "l2":
            w = [mpmath.mpf(int(r)) for r in rho]
            return project_minmax(z, w, "l2")
        w = [mpmath.log(int(r)) for r in rho]
        out = project_minmax(z, w, "kl", as_mp=True)
        # exp(o) underflows float64 below -746; skip mpmath's slow huge exp.
        return np.array([float(mpmath.exp(o)) if o > -2000 else 0.0 for o in out])
    finally:
        mpmath.mp.prec = old


def soft_sort_ref(x, eps=1.0, regularization="l2", direction="ascending", method="minmax"):
    """Reference soft sort of a 1-D float64 vector, eps in (0, inf). See soft_rank_ref."""
    _check(regularization, direction)
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    t = 1.0 if direction == "descending" else -1.0
    rho = np.arange(n, 0, -1, dtype=np.float64)
    if method == "brute":
        return t * project_bruteforce(rho / eps, t * x, regularization)
    import mpmath

    prec = _precision_for(list(x) + [eps, float(n)])
    old = mpmath.mp.prec
    mpmath.mp.prec = prec
    try:
        e = mpmath.mpf(eps)
        z = [mpmath.mpf(int(r)) / e for r in rho]
        w = [t * mpmath.mpf(float(v)) for v in x]
        out = project_minmax(z, w, regularization, as_mp=True)
        return np.array([float(t * o) for o in out])
    finally:
        mpmath.mp.prec = old


# ---------------------------------------------------------------------------
# finite differences


def jacobian_fd(f: Callable[[np.ndarray], np.ndarray], x, h: Optional[float] = None,
                side: str = "central") -> np.ndarray:
    """Finite-difference Jacobian ``J[i, j] = d f_i / d x_j`` of a 1-D map.

    side: "central" (default), "forward" or "backward" (one-sided, to detect
    kinks of piecewise-linear maps: there the two one-sided Jacobians differ).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    f0 = np.asarray(f(x), dtype=np.float64)
    J = np.empty((f0.size, n))
    for j in range(n):
        step = (1e-6 if h is None else h) * max(1.0, abs(x[j]))
        xp = x.copy()
        xm = x.copy()
        if side in ("central", "forward"):
            xp[j] += step
        if side in ("central", "backward"):
            xm[j] -= step
        fp = f0 if side == "backward" else np.asarray(f(xp), np.float64)
        fm = f0 if side == "forward" else np.asarray(f(xm), np.float64)
        J[:, j] = (fp - fm) / (xp[j] - xm[j])
    return J


def vjp_fd(f, x, u, h=None):
    return jacobian_fd(f, x, h).T @ np.asarray(u, dtype=np.float64)


def jvp_fd(f, x, v, h=None):
    return jacobian_fd(f, x, h) @ np.asarray(v, dtype=np.float64)


def jacobian_fd_batched(f2d: Callable[[np.ndarray], np.ndarray], x, h: float = 1e-6) -> np.ndarray:
    """Central-difference Jacobian of a row-wise map, all 2n perturbed copies of
    ``x`` evaluated in one call: ``f2d`` maps ``(m, n)`` to ``(m, n)``."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    steps = h * np.maximum(1.0, np.abs(x))
    plus = x[None, :] + np.diag(steps)
    minus = x[None, :] - np.diag(steps)
    fp = np.asarray(f2d(plus), dtype=np.float64)
    fm = np.asarray(f2d(minus), dtype=np.float64)
    denom = np.diag(plus) - np.diag(minus)  # the steps actually taken
    return ((fp - fm) / denom[:, None]).T


# ---------------------------------------------------------------------------
# isotonic regression under kl


def isotonic_kl_ref(y, weights=None, increasing=True):
    """argmin_v sum_i exp(y_i - v_i) + w_i v_i, v monotone, through the l2 problem.

    With ``u = exp(v)`` and ``a_i = exp(y_i) / w_i`` the objective is
    ``sum_i w_i (a_i / u_i + log u_i) = sum_i w_i D(a_i, u_i) + const``, where
    ``D(a, u) = a / u + log u - log a - 1`` is the Bregman divergence of the
    convex ``phi(t) = -log t`` (``phi(a) - phi(u) - phi'(u)(a - u)``). The
    w-weighted l2 isotonic regression of ``a`` minimizes ``sum_i w_i D(a_i,
    u_i)`` over all monotone ``u``, for every such Bregman divergence
    (Robertson, Wright & Dykstra 1988, Theorem 1.5.1), and ``v = log u`` is
    monotone in the same direction. So ``v = log isotonic_minmax(a, w)``:
    each block B gets ``log(sum_B exp(y) / sum_B w)``. ``y`` is shifted by its
    maximum first (``v`` shifts by the same constant) to keep ``exp`` in range;
    fast-soft-sort's ``isotonic_kl(s, w)`` is this with ``increasing=False``
    and ``weights = exp(w)``.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    if y.size == 0:
        return y.copy()
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    shift = float(np.max(y))
    a = np.exp(y - shift) / w
    return np.log(isotonic_minmax(a, w, increasing)) + shift
