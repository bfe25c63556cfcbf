"""The numba engine: soft rank / soft sort and isotonic regression by PAV.

A port of the C++ core (``softrank._C``) that follows ``csrc/ALGORITHM.md``
formula for formula, so that both engines agree to ~1e-12 in float64. It keeps
the engine contract documented in :mod:`softrank._engine`:

- every array is a C-contiguous 2-D ``(rows, n)`` numpy array; values are
  float32 or float64 and outputs have the dtype of ``x`` (``y``, or the
  cotangent, for isotonic); ``perm`` and ``block_start`` are int32;
- all arithmetic is in float64, also for float32 input (read, widen, compute,
  narrow once on store);
- a row that holds NaN or +-inf gives a NaN output row and ``block_start = -1``;
  the backward passes turn such a row into NaN.

The Python entry points validate the arrays (raising ``TypeError`` or
``ValueError`` that name the argument) and then call ``@njit(parallel=True,
cache=True)`` kernels that split the rows into contiguous chunks and run the
chunks with ``prange``. Rows are independent, so the results are bitwise the
same for every thread count. Nothing is compiled at import time: numba
compiles a kernel on its first call (and caches it on disk), so importing this
module only costs importing numba.

``fastmath`` is off on purpose: NaN rows must be detected, underflows and
infinities must behave as IEEE says, and the merge tests must be evaluated
exactly as written (no reassociation), or the two engines would take
different merge decisions near ties.
"""
from __future__ import annotations

import math
import os
import types

import numba
import numpy as np
from numba import njit, prange

__all__ = [
    "soft_forward",
    "soft_forward_value",
    "soft_vjp",
    "soft_jvp",
    "isotonic_forward",
    "isotonic_vjp",
    "isotonic_vjp_weighted",
    "projection_forward",
    "projection_forward_value",
    "inverse_permutations",
    "pearson",
    "pearson_vjp",
    "set_num_threads",
    "get_num_threads",
]

# Engine codes (softrank._codes); module-level ints, so that the jitted code
# sees them as compile-time constants.
from softrank._codes import OP_RANK as _OP_RANK  # noqa: E402
from softrank._codes import OP_SORT as _OP_SORT  # noqa: E402
from softrank._codes import REG_KL as _REG_KL  # noqa: E402
from softrank._codes import REG_L2 as _REG_L2  # noqa: E402

# Sorting: runs of this length are insertion-sorted before the merge passes.
_RUN = 16

# Settings shared by every jitted function. cache=True keeps the compiled code
# on disk so that only the very first call in an environment pays for
# compilation; fastmath=False: see the module docstring. error_model="numpy":
# a float division by zero gives inf/NaN as in IEEE arithmetic (and in the C++
# core) instead of raising ZeroDivisionError, e.g. 1/eps for eps = 0.
_JIT = dict(cache=True, fastmath=False, nogil=True, error_model="numpy")

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INT32 = np.dtype(np.int32)
_MAX_N = 2**31 - 1
# The smallest normal double: below it the sort kl merge test runs on logs.
_DBL_MIN = float(np.finfo(np.float64).tiny)
_DBL_MAX = float(np.finfo(np.float64).max)
# The smallest positive (subnormal) double.
_DENORM_MIN = 5e-324
# Rows whose largest |x| (|y|) has a binary exponent above this run at a
# power-of-two scale that brings it to 2^960: sums of n differences stay finite.
_MAX_EXPONENT = 960
# The isotonic vjp rescales the weights of a block whose weight sum lies
# outside [2^-960, 2^960] (sum / wsum could overflow).
_VJP_WSUM_MIN = 2.0**-960
_VJP_WSUM_MAX = 2.0**960


# ---------------------------------------------------------------------------
# Row-level building blocks (sequential, called from the parallel kernels)
# ---------------------------------------------------------------------------


@njit(**_JIT)
def _scale(v, eps, inv, multiply):
    """``v / eps``, as ``v * (1/eps)`` where ``1/eps`` is finite.

    ALGORITHM.md: the product differs from the quotient by at most an ulp and
    a division is the slowest operation in the PAV loop; for a subnormal eps
    ``1/eps`` overflows, so the quotient is used there. ``eps = inf`` gives
    ``inv = 0`` (finite), so every scaled difference is 0: the limit.
    """
    if multiply:
        return v * inv
    return v / eps


@njit(**_JIT)
def _fmax(a, b):
    """``std::fmax``: the larger of ``a`` and ``b``, ignoring a NaN operand."""
    if a != a:
        return b
    if b != b:
        return a
    return a if a >= b else b


@njit(**_JIT)
def _rho_sum(n, s, e):
    """``sum_{i in [s, e)} rho_i`` with ``rho_i = n - i``, in closed form."""
    m = float(e - s)
    return 0.5 * m * (2.0 * n - float(s) - float(e) + 1.0)


@njit(**_JIT)
def _rho_mean(n, s, e):
    """Mean of ``rho`` over sorted positions ``[s, e)``: the hard (tied) rank."""
    return float(n) - 0.5 * (float(s) + float(e) - 1.0)


@njit(**_JIT)
def _argsort_decreasing(key, idx, key_buf, idx_buf):
    """Stable argsort of ``key`` in decreasing order, sorting ``key`` along.

    On return ``idx[i]`` is the column at sorted position ``i`` and ``key``
    holds the sorted (non-increasing) values. Equal keys keep increasing
    column order. The keys hold no NaN and no -0.0 (the caller guarantees it),
    so ``>`` is a strict weak order and the result is unique.

    Bottom-up merge sort (insertion sort on short runs, then ping-pong merge
    passes) on (key, index) pairs: O(n log n) worst case, stable, and the keys
    travel with the indices so the merge never gathers through ``idx``.

    Parameters
    ----------
    key : float64[n]
        Values to sort; overwritten with the sorted values.
    idx : int32[n]
        Output permutation.
    key_buf : float64[n]
        Scratch.
    idx_buf : int32[n]
        Scratch.
    """
    n = key.shape[0]
    for i in range(n):
        idx[i] = i
    # Insertion sort of each run; moving an element left only past strictly
    # smaller keys keeps equal keys in column order (stability).
    for lo in range(0, n, _RUN):
        hi = min(lo + _RUN, n)
        for i in range(lo + 1, hi):
            kv = key[i]
            iv = idx[i]
            j = i
            while j > lo and key[j - 1] < kv:
                key[j] = key[j - 1]
                idx[j] = idx[j - 1]
                j -= 1
            key[j] = kv
            idx[j] = iv
    width = _RUN
    in_buf = False  # whether the current data lives in the *_buf arrays
    while width < n:
        if in_buf:
            sk, si, dk, di = key_buf, idx_buf, key, idx
        else:
            sk, si, dk, di = key, idx, key_buf, idx_buf
        for lo in range(0, n, 2 * width):
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i = lo
            j = mid
            k = lo
            while i < mid and j < hi:
                # Take from the right run only when strictly larger: stable.
                if sk[j] > sk[i]:
                    dk[k] = sk[j]
                    di[k] = si[j]
                    j += 1
                else:
                    dk[k] = sk[i]
                    di[k] = si[i]
                    i += 1
                k += 1
            while i < mid:
                dk[k] = sk[i]
                di[k] = si[i]
                i += 1
                k += 1
            while j < hi:
                dk[k] = sk[j]
                di[k] = si[j]
                j += 1
                k += 1
        in_buf = not in_buf
        width *= 2
    if in_buf:
        for i in range(n):
            key[i] = key_buf[i]
            idx[i] = idx_buf[i]


@njit(**_JIT)
def _pav_soft(xs, op, reg, eps, bstart, bref, bstat, bstat2):
    """PAV over the sorted row ``xs`` (non-increasing), ``eps > 0``.

    The block stack lives in parallel arrays: start position, ``ref`` (the
    block's first, largest value) and the statistics relative to ``ref``
    (ALGORITHM.md): l2 ``d = sum (xs - ref)``; rank kl ``S = sum exp((xs -
    ref)/eps)``; sort kl ``S = sum exp(xs - ref)`` and ``Q = sum_k exp(-k/eps)``.
    The kl sums lie in ``[1, m]`` (every exponent is <= 0), so they cannot
    overflow. The newest block B is held in locals and merged into the stack
    top A while "V_A <= V_B" (equal values are pooled too; the sort kl test
    is strict, pav.h); the tests are the
    overflow-free product forms of the table in ALGORITHM.md, evaluated in
    exactly the order the C++ core uses so that both engines take the same
    merge decisions even at ties. ``eps = inf`` merges everything.

    Returns
    -------
    int
        The number of blocks.
    """
    n = xs.shape[0]
    merge_all = eps == np.inf
    inv = 1.0 / eps
    multiply = np.isfinite(inv)
    is_l2 = reg == _REG_L2
    top = 0
    for i in range(n):
        s = i
        ref = xs[i]
        stat = 0.0 if is_l2 else 1.0
        stat2 = 1.0
        while top > 0:
            sa = bstart[top - 1]
            ref_a = bref[top - 1]
            stat_a = bstat[top - 1]
            if is_l2:
                m_a = float(s - sa)
                m_b = float(i + 1 - s)
                # w times the difference of the block means of xs (division-free).
                w = m_a * m_b
                x = w * (ref_a - ref) + (m_b * stat_a - m_a * stat)
                if op == _OP_RANK:
                    merge = merge_all or x <= eps * ((0.5 * (m_a + m_b)) * w)
                else:
                    merge = merge_all or (0.5 * (m_a + m_b)) * w <= x * eps
                if not merge:
                    break
                stat = stat_a + stat + m_b * (ref - ref_a)
            elif op == _OP_RANK:
                # An underflow of decay to 0 is the right answer: no merge.
                decay = np.exp(-_scale(ref_a - ref, eps, inv, multiply))
                merge = merge_all or stat_a * _rho_sum(n, s, i + 1) <= (
                    decay * stat * _rho_sum(n, sa, s)
                )
                if not merge:
                    break
                stat = stat_a + decay * stat
            else:
                stat2_a = bstat2[top - 1]
                u = ref_a - ref
                v = _scale(float(s - sa), eps, inv, multiply)
                eu = np.exp(-u)
                ev = np.exp(-v)
                if merge_all:
                    merge = True
                elif eu >= _DBL_MIN and ev >= _DBL_MIN:
                    merge = stat2_a * stat * eu < ev * stat_a * stat2  # strict (pav.h)
                elif np.isinf(u) and np.isinf(v):
                    # u - v = inf - inf (refs near +-DBL_MAX, a subnormal eps):
                    # the log test at half scale (pav.h, sort_kl_merges).
                    half_u = 0.5 * ref_a - 0.5 * ref
                    half_v = _scale(0.5 * float(s - sa), eps, inv, multiply)
                    merge = 0.5 * np.log(stat2_a * stat) - half_u < (
                        0.5 * np.log(stat_a * stat2) - half_v
                    )
                else:
                    # Both sides would underflow: the same test on logs.
                    merge = np.log(stat2_a * stat) - u < np.log(stat_a * stat2) - v
                if not merge:
                    break
                stat = stat_a + eu * stat
                stat2 = stat2_a + ev * stat2
            ref = ref_a
            s = sa
            top -= 1
        bstart[top] = s
        bref[top] = ref
        bstat[top] = stat
        bstat2[top] = stat2
        top += 1
    return top


@njit(**_JIT)
def _pav_hard(xs, op, bstart, bref):
    """Blocks of the hard operator (``eps = 0``).

    Rank: the runs of equal values (tied entries share their mean rank).
    Sort: singletons (the output is the sorted row).
    """
    n = xs.shape[0]
    top = 0
    for i in range(n):
        if op == _OP_RANK and top > 0 and xs[i] == bref[top - 1]:
            continue
        bstart[top] = i
        bref[top] = xs[i]
        top += 1
    return top


@njit(**_JIT)
def _sort_kl_log_ratio(xs, s, e, ref, total, total_rho, eps, inv, multiply, tolerance):
    """log(S / Q) of a kl sort block [s, e); see ALGORITHM.md "Outputs".

    log(S / Q) is within ~8m ulp of 1 in absolute terms, below the rounding
    of the outputs o_k = ref + log(S / Q) - k / eps where every |o_k| >= m
    ``tolerance`` (1 for float64, 2**-20 for float32). Elsewhere, where S
    and Q are close, it is log1p((S - Q) / Q) with S - Q summed termwise as
    exp(b) * expm1(a - b), a = xs_j - ref, b = -(j - s)/eps.
    """
    if e - s == 1:
        return 0.0  # S = Q = 1 exactly
    log_ratio = np.log(total / total_rho)
    first_out = ref + log_ratio
    last_out = first_out - _scale(float(e - s - 1), eps, inv, multiply)
    if first_out <= 0.0:
        smallest = -first_out
    elif last_out >= 0.0:
        smallest = last_out
    else:
        smallest = 0.0
    if abs(log_ratio) < 1.0 and not smallest >= tolerance * float(e - s):
        diff = 0.0
        for j in range(s + 1, e):
            a = xs[j] - ref
            shift = _scale(float(j - s), eps, inv, multiply)
            gap = a + shift
            if abs(gap) < 0.5:
                diff += np.exp(-shift) * np.expm1(gap)
            else:
                diff += np.exp(a) - np.exp(-shift)
        log_ratio = np.log1p(diff / total_rho)
    return log_ratio


@njit(**_JIT)
def _twice_finite(half):
    """2 * half for an output formed at half scale: where rounding took a finite
    half past half the largest double, that largest double (common.h)."""
    twice = 2.0 * half
    if math.isinf(twice) and math.isfinite(half):
        return math.copysign(_DBL_MAX, twice)
    return twice


@njit(**_JIT)
def _sort_kl_output_wide(base, k, eps, inv, multiply):
    """``base - k / eps``, formed at half scale where ``k / eps`` passes the
    largest double (soft_row.h, sort_kl_output_wide); the same bits elsewhere."""
    value = base - _scale(k, eps, inv, multiply)
    if value != -np.inf:
        return value
    return _twice_finite(0.5 * base - _scale(0.5 * k, eps, inv, multiply))


@njit(**_JIT)
def _forward_row(x, out, perm, bs, op, reg, descending, eps,
                 keys, key_buf, idx_buf, bstart, bref, bstat, bstat2):
    """Soft rank / soft sort of one row; see ALGORITHM.md "Outputs".

    ``out`` is written in the dtype of ``x`` (the only narrowing); ``perm``
    and ``bs`` (block_start) are int32. The remaining arguments are scratch
    arrays of length n owned by the calling chunk.
    """
    n = x.shape[0]
    if n == 0:
        return
    # x' = x for an ascending rank or a descending sort, -x otherwise; adding
    # +0.0 turns -0.0 into +0.0 so that no signed zero reaches the sort (the
    # C++ core sorts on the bit patterns, where -0.0 and +0.0 differ).
    if (op == _OP_RANK) != descending:
        sx = 1.0
    else:
        sx = -1.0
    finite = True
    for j in range(n):
        v = np.float64(x[j])
        if not np.isfinite(v):
            finite = False
            break
        keys[j] = sx * v + 0.0
    if not finite:
        for j in range(n):
            out[j] = np.nan
            perm[j] = j  # unspecified by the contract; a valid index is safest
            bs[j] = -1
        return
    xs = keys
    _argsort_decreasing(xs, perm, key_buf, idx_buf)

    # Rows at the ends of the double range run at a power-of-two scale f
    # (exact), as in the C++ core (soft_forward_sorted): ranks depend on
    # x / eps only, and the l2 sort is homogeneous, sort(x, eps) =
    # sort(f x, eps / f) / f. Without it, |x| beyond ~1e300 overflows the
    # differences and block sums of x, and a rank at subnormal eps keeps its
    # block statistics with an absolute precision of 2^-1074 (wrong row
    # sums). The kl sort needs neither. O(1): xs is sorted. From here on
    # ``eps`` is the scaled strength; ``eps_out`` (the caller's) scales the
    # l2 sort's output offsets.
    eps_out = eps
    unscale = 1.0  # sort l2: maps the scaled block means back
    if eps != 0.0 and not (op == _OP_SORT and reg == _REG_KL):
        exponent = math.frexp(max(abs(xs[0]), abs(xs[n - 1])))[1]
        k = 0
        if exponent > _MAX_EXPONENT:
            k = _MAX_EXPONENT - exponent
            # A rank whose eps 2^k would leave the normal range pools only
            # values within ~n eps of each other, never across the large ones
            # (their overflowing differences read as "no merge", rightly): no
            # scaling, which would only cost the small values their digits.
            if op == _OP_RANK and not (math.ldexp(eps, k) >= _DBL_MIN):
                k = 0
        elif op == _OP_RANK and eps < _DBL_MIN:
            k = min(64, _MAX_EXPONENT - exponent)
        if k != 0:
            f = math.ldexp(1.0, k)
            for i in range(n):
                xs[i] *= f
            if op == _OP_RANK:
                eps *= f
            else:
                eps /= f
                unscale = 1.0 / f

    if eps == 0.0:
        count = _pav_hard(xs, op, bstart, bref)
    else:
        count = _pav_soft(xs, op, reg, eps, bstart, bref, bstat, bstat2)
    # The sort output sign maps the decreasing-order problem back to the
    # requested direction (+1 descending, -1 ascending).
    sgn = 1.0 if descending else -1.0
    # The kl sort's termwise log ratio is needed where outputs are below m
    # (float64) or m 2**-20 (float32): see _sort_kl_log_ratio.
    tolerance = 2.0 ** -20 if out.itemsize == 4 else 1.0
    inv = 1.0 / eps
    multiply = np.isfinite(inv)
    inv_out = 1.0 / eps_out
    multiply_out = np.isfinite(inv_out)
    for k in range(count):
        s = bstart[k]
        e = bstart[k + 1] if k + 1 < count else n
        ref = bref[k]
        for i in range(s, e):
            bs[i] = s
        if eps == 0.0:
            if op == _OP_RANK:
                r = _rho_mean(n, s, e)
                for i in range(s, e):
                    out[perm[i]] = r
            else:
                out[s] = sgn * xs[s] + 0.0  # (+ 0.0: +0.0, not -0.0; soft_row.h)
        elif op == _OP_RANK:
            if reg == _REG_L2:
                base = _rho_mean(n, s, e)
                if multiply:
                    offset = bstat[k] / float(e - s)
                    for i in range(s, e):
                        out[perm[i]] = base + ((xs[i] - ref) - offset) * inv
                else:  # the offsets' mean after the division (soft_row.h)
                    offset_over_eps = bstat[k] / eps / float(e - s)
                    for i in range(s, e):
                        out[perm[i]] = base + ((xs[i] - ref) / eps - offset_over_eps)
            else:
                # rank_i = R_B / S_B * exp((xs_i - ref) / eps); exponent <= 0.
                factor = _rho_sum(n, s, e) / bstat[k]
                for i in range(s, e):
                    out[perm[i]] = factor * np.exp(_scale(xs[i] - ref, eps, inv,
                                                          multiply))
        else:
            if reg == _REG_L2:
                # The sign folded into the block's terms, its constant made +0.0
                # where zero: no -0.0 output (write_outputs in soft_row.h).
                mean = sgn * (unscale * (ref + bstat[k] / float(e - s))) + 0.0
                centre = 0.5 * (float(s) + float(e) - 1.0)
                for i in range(s, e):
                    out[i] = _scale(centre - float(i), sgn * eps_out, sgn * inv_out,
                                    multiply_out) + mean
            else:
                base = ref + _sort_kl_log_ratio(xs, s, e, ref, bstat[k], bstat2[k],
                                                eps, inv, multiply, tolerance)
                base = sgn * base + 0.0
                for i in range(s, e):
                    out[i] = base - _scale(float(i - s), sgn * eps, sgn * inv, multiply)
    if (eps != 0.0 and op == _OP_SORT and reg == _REG_KL and count > 0
            and np.isinf(_scale(float(n - bstart[0]), eps, inv, multiply))):
        # A block's steps (i - s) / eps can pass the largest double: its
        # outputs again, in a pass apart as in write_outputs (soft_row.h), so
        # that the common loop above carries no test.
        for k in range(count):
            s = bstart[k]
            e = bstart[k + 1] if k + 1 < count else n
            base = bref[k] + _sort_kl_log_ratio(xs, s, e, bref[k], bstat[k], bstat2[k],
                                                eps, inv, multiply, tolerance)
            for i in range(s, e):
                out[i] = sgn * _sort_kl_output_wide(base, float(i - s), eps, inv, multiply) + 0.0


@njit(**_JIT)
def _backward_row(x, out, perm, bs, vec, res, op, reg, descending, eps, jvp):
    """vjp (``jvp=False``) or jvp of one row from the stored forward state.

    See ALGORITHM.md "Backward". Blocks are recovered from ``bs``
    (block_start) as maximal runs of positions whose entry equals the run's
    start; ``bs`` is only compared, never used as an index, and ``perm`` is
    range-checked first, so a malformed state cannot make the kernel read out
    of bounds.

    Returns
    -------
    int
        0 on success, 1 if ``perm`` holds an entry outside ``[0, n)``.
    """
    n = x.shape[0]
    if n == 0:
        return 0
    if bs[0] < 0:
        # A NaN/inf row of the forward pass.
        for j in range(n):
            res[j] = np.nan
        return 0
    for i in range(n):
        if perm[i] < 0 or perm[i] >= n:
            return 1

    if op == _OP_RANK:
        # eps = 0 (hard ranks) and eps = inf (constant ranks): zero Jacobian.
        # The factor is 0 rather than skipping the loop so that a NaN in the
        # cotangent still propagates, as in the C++ core.
        sg = -1.0 if descending else 1.0
        if eps == 0.0 or eps == np.inf:
            scale = 0.0
        else:
            scale = sg / eps
        # Subnormal eps: 1/eps (or 1/eps times a kl rank <= n) overflows, and
        # inf * 0 would make the (zero) gradient of every singleton block
        # NaN. Divide instead, as the C++ core does.
        divide = np.isinf(scale * float(n))
        s = 0
        while s < n:
            e = s + 1
            while e < n and bs[e] == s:
                e += 1
            if reg == _REG_L2:
                tot = 0.0
                for i in range(s, e):
                    tot += np.float64(vec[perm[i]])
                mean = tot / float(e - s)
                for i in range(s, e):
                    p = perm[i]
                    d = np.float64(vec[p]) - mean
                    if divide:
                        res[p] = sg * (d / eps)
                    else:
                        res[p] = scale * d
            else:
                dot = 0.0
                for i in range(s, e):
                    p = perm[i]
                    dot += np.float64(vec[p]) * np.float64(out[p])
                # (a singleton's r is n - s exactly in exact arithmetic: its
                # product is 0, not v's rounding amplified by 1/eps; soft_row.h)
                c = np.float64(vec[perm[s]]) if e - s == 1 else dot / _rho_sum(n, s, e)
                for i in range(s, e):
                    p = perm[i]
                    r = np.float64(out[p])
                    d = np.float64(vec[p]) - c
                    if divide:
                        res[p] = sg * (r * d / eps)
                    else:
                        res[p] = scale * r * d
            s = e
        return 0

    # Soft sort. An ascending sort negates both x and the output, so the
    # Jacobian is the same for both directions once x' is formed.
    sx = 1.0 if descending else -1.0
    s = 0
    while s < n:
        e = s + 1
        while e < n and bs[e] == s:
            e += 1
        if reg == _REG_L2 or eps == 0.0:
            # l2 (and every singleton block of eps = 0): the block mean.
            tot = 0.0
            if jvp:
                for i in range(s, e):
                    tot += np.float64(vec[perm[i]])
                mean = tot / float(e - s)
                for i in range(s, e):
                    res[i] = mean
            else:
                for i in range(s, e):
                    tot += np.float64(vec[i])
                mean = tot / float(e - s)
                for i in range(s, e):
                    res[perm[i]] = mean
        else:
            # Block softmax of the sorted x' (not of rho/eps), recomputed from
            # x: p_i = exp(x'_i - top - log_norm); top = x' at the block start
            # is the block maximum, so the normaliser lies in [1, m].
            top = sx * np.float64(x[perm[s]])
            tot = 0.0
            for i in range(s, e):
                tot += np.exp(sx * np.float64(x[perm[i]]) - top)
            log_norm = np.log(tot)
            if jvp:
                dot = 0.0
                for i in range(s, e):
                    p = perm[i]
                    dot += np.exp(sx * np.float64(x[p]) - top - log_norm) * np.float64(
                        vec[p]
                    )
                for i in range(s, e):
                    res[i] = dot
            else:
                tot = 0.0
                for i in range(s, e):
                    tot += np.float64(vec[i])
                for i in range(s, e):
                    p = perm[i]
                    res[p] = np.exp(sx * np.float64(x[p]) - top - log_norm) * tot
        s = e
    return 0


@njit(**_JIT)
def _isotonic_row(y, w, has_w, increasing, sol, bs, ys, ws, bstart, bref, bstat, bw):
    """Weighted l2 isotonic regression of one row by PAV.

    A non-increasing fit is the negated non-decreasing fit of ``-y``. Blocks
    keep ``ref = y[s]``, ``W = sum w`` and ``off`` = the block's weighted mean
    minus ``ref``, updated by a convex combination (pav_isotonic_increasing:
    never through sums ``w (y - ref)``, which under- or overflow; unit
    weights keep the sum of ``y - ref`` instead, divided once at the end); the block
    value is ``ref + off``, clamped to ``[-max |y|, max |y|]``. Adjacent blocks
    with equal values are pooled (the test is ``gap <= 0``), as in the soft
    operators.
    """
    n = y.shape[0]
    if n == 0:
        return
    sign = 1.0 if increasing else -1.0
    finite = True
    ymax = 0.0
    wmax = 0.0
    for j in range(n):
        ys[j] = sign * np.float64(y[j])
        if not np.isfinite(ys[j]):
            finite = False
        ymax = _fmax(ymax, abs(ys[j]))
        if has_w:
            ws[j] = np.float64(w[j])
            wmax = _fmax(wmax, ws[j])
    if not finite:
        for i in range(n):
            sol[i] = np.nan
            bs[i] = -1
        return
    # Power-of-two scaling, as in the C++ core (isotonic_forward_row; exact,
    # so the same bits wherever nothing over- or underflows): differences of
    # y overflow for |y| near 1e308, block means of rows below 2^-960 round
    # to the subnormal grid (even outside [min y, max y]), and weight sums
    # overflow for weights near 1e308 and lose digits for subnormal ones.
    # Values are brought below 2^960 or up from the subnormals, weights to a
    # largest one near 1 (a weight more than 2^1074 times smaller than the
    # largest stays at the smallest positive double).
    exponent = math.frexp(ymax)[1]
    shift = 0
    if exponent > _MAX_EXPONENT:
        shift = _MAX_EXPONENT - exponent
    elif ymax > 0.0 and exponent < -_MAX_EXPONENT:
        shift = -exponent
    if shift != 0:
        for j in range(n):
            ys[j] = math.ldexp(ys[j], shift)
    if has_w:
        exponent = math.frexp(wmax)[1]
        if exponent > 1 or exponent < -64:
            # (ldexp per element: 2^-exponent itself overflows for subnormal
            # weights)
            for j in range(n):
                ws[j] = _fmax(math.ldexp(ws[j], -exponent), _DENORM_MIN)
    top = 0
    for i in range(n):
        s = i
        ref = ys[i]
        off = 0.0
        wsum = ws[i] if has_w else 1.0
        while top > 0:
            ref_a = bref[top - 1]
            off_a = bstat[top - 1]
            w_a = bw[top - 1]
            if has_w:
                # value_A >= value_B violates (or ties) the non-decreasing order.
                gap = (ref - ref_a) + (off - off_a)  # value_B - value_A
                if not (gap <= 0.0):
                    break
                total = w_a + wsum
                off = off_a + (wsum / total) * gap
                wsum = total
            else:
                # Unit weights (pav_isotonic_increasing): off is the sum of
                # y - ref and wsum the length m; the test is m_a m_b
                # (mean_a - mean_b) >= 0, with no division.
                counts = w_a * wsum
                x = counts * (ref_a - ref) + (wsum * off_a - w_a * off)
                if not (x >= 0.0):
                    break
                off = off_a + off + wsum * (ref - ref_a)
                wsum = wsum + w_a
            ref = ref_a
            s = bstart[top - 1]
            top -= 1
        bstart[top] = s
        bref[top] = ref
        bstat[top] = off
        bw[top] = wsum
        top += 1
    if not has_w:
        for k in range(top):
            bstat[k] /= bw[k]
    # A block mean lies within [-max |y|, max |y|]; its rounding may not, and
    # for max |y| = DBL_MAX scaling back would overflow to inf: clamp.
    bound = math.ldexp(ymax, shift) if shift != 0 else ymax
    for k in range(top):
        s = bstart[k]
        e = bstart[k + 1] if k + 1 < top else n
        # Clamped only when outside, as in the C++ core (fmin/fmax of +-0 may
        # return either zero).
        value = sign * (bref[k] + bstat[k]) + 0.0  # (a zero is +0.0, as in isotonic.h)
        if value > bound:
            value = bound
        if value < -bound:
            value = -bound
        if shift != 0:
            value = math.ldexp(value, -shift)
        for i in range(s, e):
            sol[i] = value
            bs[i] = s


@njit(**_JIT)
def _isotonic_vjp_row(w, has_w, bs, g, res, y, sol, res_w, with_weights):
    """``grad_j = w_j * (sum_B g / W_B)`` for one row; NaN for a NaN row. With
    ``with_weights``, also ``res_w[j] = (y_j - sol_B) * (sum_B g / W_B)``
    (C++: isotonic_vjp_row's weights gradient)."""
    n = g.shape[0]
    if n == 0:
        return
    if bs[0] < 0:
        for j in range(n):
            res[j] = np.nan
            if with_weights:
                res_w[j] = np.nan
        return
    s = 0
    while s < n:
        e = s + 1
        while e < n and bs[e] == s:
            e += 1
        tot = 0.0
        wsum = 0.0
        for i in range(s, e):
            tot += np.float64(g[i])
            wsum += np.float64(w[i]) if has_w else 1.0
        # Weights whose sum overflows, or is so small that sum / wsum
        # overflows: scaled by a power of two, as in the C++ core
        # (isotonic_vjp_row; exact; ldexp, as 2^-exponent itself overflows
        # for subnormal weights).
        shift = 0
        if has_w and not (wsum >= _VJP_WSUM_MIN and wsum <= _VJP_WSUM_MAX):
            wmax = 0.0
            for i in range(s, e):
                wmax = _fmax(wmax, np.float64(w[i]))
            shift = -math.frexp(wmax)[1]
            wsum = 0.0
            for i in range(s, e):
                wsum += math.ldexp(np.float64(w[i]), shift)
        per_weight = tot / wsum
        if with_weights:
            value = np.float64(sol[s])
            for i in range(s, e):
                gw = (np.float64(y[i]) - value) * per_weight
                res_w[i] = math.ldexp(gw, shift) if shift != 0 else gw
        if shift != 0:
            for i in range(s, e):
                res[i] = math.ldexp(np.float64(w[i]), shift) * per_weight
        else:
            for i in range(s, e):
                res[i] = (np.float64(w[i]) if has_w else 1.0) * per_weight
        s = e


# ---------------------------------------------------------------------------
# Threads. numba's thread count is per calling thread, and its GNU OpenMP
# threading layer (numba's choice where TBB is missing) kills a forked child
# that runs a parallel kernel after its parent did ("fork() called from a
# process already using GNU OpenMP"): a fork-based DataLoader or
# multiprocessing worker. So the count set by set_num_threads is applied in
# every calling thread, and a child forked from a process that ran the
# parallel kernels runs each kernel's serial twin (the same code, compiled
# without parallel=True: prange is then range).
# ---------------------------------------------------------------------------

_thread_limit = None  # set_num_threads' count, None for numba's default
_parallel_used = False  # this process ran a parallel kernel
_serial_only = False  # a fork child of a process that had run one under OpenMP


def _after_fork_in_child():
    global _serial_only
    if _parallel_used and not _serial_only:
        try:
            layer = numba.threading_layer()
        except ValueError:  # no layer initialised: nothing ran in parallel
            return
        _serial_only = layer == "omp"


os.register_at_fork(after_in_child=_after_fork_in_child)


class _RowKernel:
    """A kernel that runs ``prange`` over row chunks, compiled (lazily, on
    first call, cached on disk) with ``parallel=True`` and as a serial twin,
    which a fork child of an OpenMP process calls instead (see above)."""

    def __init__(self, func):
        self.parallel = njit(parallel=True, **_JIT)(func)
        # A function of its own name, so that numba's disk cache keeps the two apart.
        twin = types.FunctionType(func.__code__, func.__globals__, func.__name__ + "_serial",
                                  func.__defaults__, func.__closure__)
        twin.__qualname__ = func.__qualname__ + "_serial"
        self.serial = njit(**_JIT)(twin)

    def __call__(self, *args):
        global _parallel_used
        if _serial_only:
            return self.serial(*args)
        _parallel_used = True
        return self.parallel(*args)


def _row_kernel(func):
    return _RowKernel(func)


# ---------------------------------------------------------------------------
# Parallel kernels: prange over contiguous chunks of rows. A chunk allocates
# its scratch once and reuses it for all its rows (many short rows would
# otherwise spend their time in the allocator). Rows never interact, so the
# chunking changes nothing in the results.
# ---------------------------------------------------------------------------


@_row_kernel
def _soft_forward_kernel(x, out, perm, bs, op, reg, descending, eps, chunks):
    rows, n = x.shape
    for c in prange(chunks):
        r0 = c * rows // chunks
        r1 = (c + 1) * rows // chunks
        keys = np.empty(n, np.float64)
        key_buf = np.empty(n, np.float64)
        idx_buf = np.empty(n, np.int32)
        bstart = np.empty(n, np.int64)
        bref = np.empty(n, np.float64)
        bstat = np.empty(n, np.float64)
        bstat2 = np.empty(n, np.float64)
        for r in range(r0, r1):
            _forward_row(x[r], out[r], perm[r], bs[r], op, reg, descending, eps,
                         keys, key_buf, idx_buf, bstart, bref, bstat, bstat2)


@_row_kernel
def _soft_backward_kernel(x, out, perm, bs, vec, res, op, reg, descending, eps,
                          jvp, status, chunks):
    rows = x.shape[0]
    for c in prange(chunks):
        r0 = c * rows // chunks
        r1 = (c + 1) * rows // chunks
        for r in range(r0, r1):
            status[r] = _backward_row(x[r], out[r], perm[r], bs[r], vec[r],
                                      res[r], op, reg, descending, eps, jvp)


@njit(**_JIT)
def _hvp_row(x, out, perm, bs, c, t, res, work, op, reg, descending, eps):
    """Gradient w.r.t. x of <c, J(x) t> for one row (double backward).

    Mirrors ``soft_hvp_row`` of the C++ core: 0 for l2 (J is locally
    constant), eps = 0 and the rank at eps = inf; rank kl: s^2 r_i (q_i -
    sum_B(r q) / R_B) with q = (c - cbar)(t - tbar), divided by eps twice
    where (1/eps)^2 overflows; sort kl (eps = inf included): sgn * C_B * p_k
    (t_k - tbar).
    Returns 0, or 1 if ``perm`` holds an entry outside ``[0, n)``.
    """
    n = x.shape[0]
    if n == 0:
        return 0
    if bs[0] < 0:
        for j in range(n):
            res[j] = np.nan
        return 0
    for i in range(n):
        if perm[i] < 0 or perm[i] >= n:
            return 1
    # Zero: l2 (piecewise linear), eps = 0 (piecewise constant Jacobian), and
    # the rank at eps = inf (constant). Not the kl sort at eps = inf: that is
    # the log-mean-exp, whose Jacobian (the softmax) depends on x.
    if reg == _REG_L2 or eps == 0.0 or (eps == np.inf and op == _OP_RANK):
        for j in range(n):
            res[j] = 0.0
        return 0
    if op == _OP_RANK:
        scale = (-1.0 if descending else 1.0) / eps
        # eps below ~1e-154: 1/eps^2 (times a rank <= n) overflows, and
        # inf * 0 would make the (zero) result of every singleton block NaN.
        # Divide instead, as the C++ core does.
        divide = np.isinf(scale * scale * float(n))
        s = 0
        while s < n:
            e = s + 1
            while e < n and bs[e] == s:
                e += 1
            inv_r = 1.0 / _rho_sum(n, s, e)
            c_dot = 0.0
            t_dot = 0.0
            for i in range(s, e):
                p = perm[i]
                r = np.float64(out[p])
                c_dot += r * np.float64(c[p])
                t_dot += r * np.float64(t[p])
            c_bar = c_dot * inv_r
            t_bar = t_dot * inv_r
            q_dot = 0.0
            for i in range(s, e):
                p = perm[i]
                q = (np.float64(c[p]) - c_bar) * (np.float64(t[p]) - t_bar)
                work[i] = q
                q_dot += np.float64(out[p]) * q
            q_bar = q_dot * inv_r
            for i in range(s, e):
                p = perm[i]
                r = np.float64(out[p])
                if divide:
                    res[p] = r * (work[i] - q_bar) / eps / eps
                else:
                    res[p] = scale * scale * r * (work[i] - q_bar)
            s = e
        return 0
    sx = 1.0 if descending else -1.0
    s = 0
    while s < n:
        e = s + 1
        while e < n and bs[e] == s:
            e += 1
        top = sx * np.float64(x[perm[s]])
        tot = 0.0
        for i in range(s, e):
            work[i] = np.exp(sx * np.float64(x[perm[i]]) - top)
            tot += work[i]
        c_sum = 0.0
        t_bar = 0.0
        for i in range(s, e):
            work[i] /= tot
            c_sum += np.float64(c[i])
            t_bar += work[i] * np.float64(t[perm[i]])
        for i in range(s, e):
            p = perm[i]
            res[p] = sx * c_sum * work[i] * (np.float64(t[p]) - t_bar)
        s = e
    return 0


@_row_kernel
def _hvp_kernel(x, out, perm, bs, c, t, res, op, reg, descending, eps, status, chunks):
    rows, n = x.shape
    for k in prange(chunks):
        r0 = k * rows // chunks
        r1 = (k + 1) * rows // chunks
        work = np.empty(n, np.float64)
        for r in range(r0, r1):
            status[r] = _hvp_row(x[r], out[r], perm[r], bs[r], c[r], t[r], res[r], work,
                                 op, reg, descending, eps)


@_row_kernel
def _isotonic_forward_kernel(y, w, has_w, increasing, sol, bs, chunks):
    rows, n = y.shape
    for c in prange(chunks):
        r0 = c * rows // chunks
        r1 = (c + 1) * rows // chunks
        ys = np.empty(n, np.float64)
        ws = np.empty(n, np.float64)
        bstart = np.empty(n, np.int64)
        bref = np.empty(n, np.float64)
        bstat = np.empty(n, np.float64)
        bw = np.empty(n, np.float64)
        for r in range(r0, r1):
            # Without weights, w is a (1, 0) placeholder and never read.
            wr = w[r] if has_w else w[0]
            _isotonic_row(y[r], wr, has_w, increasing, sol[r], bs[r],
                          ys, ws, bstart, bref, bstat, bw)


@_row_kernel
def _isotonic_vjp_kernel(w, has_w, bs, g, res, y, sol, res_w, with_weights, chunks):
    rows = g.shape[0]
    for c in prange(chunks):
        r0 = c * rows // chunks
        r1 = (c + 1) * rows // chunks
        for r in range(r0, r1):
            wr = w[r] if has_w else w[0]
            # Without the weights' gradient, y, sol and res_w are (1, 0) placeholders.
            k = r if with_weights else 0
            _isotonic_vjp_row(wr, has_w, bs[r], g[r], res[r], y[k], sol[k], res_w[k],
                              with_weights)


# ---------------------------------------------------------------------------
# The projection onto the permutahedron of any w, and kl isotonic regression
# (csrc/softrank/projection.h): one pooling rule per problem, each a test and
# a pool of two adjacent blocks, run by one PAV loop. Blocks are stored as
# parallel arrays (start, a, b, c, d) whose meaning is the rule's, named at
# each rule.
# ---------------------------------------------------------------------------

_INF = math.inf


@njit(**_JIT)
def _log_add_exp(a, b):
    hi = a if a > b else b
    lo = b if a > b else a
    if hi == -_INF:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


# l2 projection block: a = ref (s at the block's start), b = sum (s - ref),
# c = length, d = sum ws.
@njit(**_JIT)
def _projection_l2_merges(eps, pool_all, ref_a, off_a, cnt_a, w_a, ref_b, off_b, cnt_b, w_b):
    if pool_all:
        return True
    counts = cnt_a * cnt_b
    ds = counts * (ref_a - ref_b) + (cnt_b * off_a - cnt_a * off_b)
    if eps == 0.0:
        return ds <= 0.0  # ties of s (projection.h: strict for 0 < eps < inf)
    dw = cnt_b * w_a - cnt_a * w_b
    return ds < eps * dw


# kl projection block: a = ref, b = log sum exp((s - ref) / eps), c = log sum exp(ws).
@njit(**_JIT)
def _projection_kl_centred(v, ref, eps, pool_all):
    if pool_all or v == ref:
        return 0.0
    if eps == 0.0:
        return -_INF
    return (v - ref) / eps


@njit(**_JIT)
def _projection_kl_merges(eps, pool_all, ref_a, ls_a, lw_a, ref_b, ls_b, lw_b):
    if pool_all or lw_b == -_INF:
        return True
    if eps == 0.0:
        return ref_a == ref_b
    left = (ref_a - ref_b) / eps + (ls_a - ls_b)
    right = lw_a - lw_b
    if math.isfinite(left) and math.isfinite(right):
        return left < right
    # a spread past the largest double: the test at half scale
    return (0.5 * ref_a - 0.5 * ref_b) / eps + 0.5 * (ls_a - ls_b) < 0.5 * lw_a - 0.5 * lw_b


# kl projection with 0 < eps < inf (csrc/softrank/projection.h,
# ProjectionKlRunsRule, each block's references its first position's s and
# ws): a = ref (s), b = S = sum exp((s - ref) / eps), c = wref (ws), d = W =
# sum exp(ws - wref), 0 where every ws is -inf. V_a < V_b compares products
# with e = exp(-|d|), d = (ref_a - ref_b) / eps - (wref_a - wref_b); on logs
# where e is below 2^-100.
_KL_RUNS_SMALL = 2.0**-100


@njit(**_JIT)
def _projection_kl_runs_merges(eps, ref_a, sum_a, wref_a, wsum_a, ref_b, sum_b, wref_b, wsum_b):
    dr = 0.0 if ref_a == ref_b else (ref_a - ref_b) / eps
    dq = wref_a - wref_b
    if not (math.isfinite(dr) and math.isfinite(dq)):
        # a spread past the largest double: the log test at half scale
        if wsum_b == 0.0:
            return True
        dh = (0.5 * ref_a - 0.5 * ref_b) / eps - (0.5 * wref_a - 0.5 * wref_b)
        log_wa = math.log(wsum_a) if wsum_a > 0.0 else -_INF
        return dh + 0.5 * (math.log(sum_a) + math.log(wsum_b)) < 0.5 * (math.log(sum_b) + log_wa)
    d = dr - dq
    if d == 0.0:
        return sum_a * wsum_b < sum_b * wsum_a
    e = math.exp(-d if d > 0.0 else d)
    if e >= _KL_RUNS_SMALL:
        if d > 0.0:
            return sum_a * wsum_b < e * sum_b * wsum_a
        return e * sum_a * wsum_b < sum_b * wsum_a
    log_wb = math.log(wsum_b) if wsum_b > 0.0 else -_INF
    log_wa = math.log(wsum_a) if wsum_a > 0.0 else -_INF
    return dr + math.log(sum_a) + log_wb < dq + math.log(sum_b) + log_wa


@njit(**_JIT)
def _projection_row(z, w, eps, reg, out, perm_z, perm_w, bs, s, ws, key_buf, idx_buf,
                    bstart, ba, bb, bc, bd, sorted_out):
    n = z.shape[0]
    pool_all = math.isinf(eps)
    valid = True
    for i in range(n):
        zi = float(z[i]) + 0.0  # -0.0 -> +0.0: one key for both zeros
        wi = float(w[i]) + 0.0
        s[i] = zi
        ws[i] = wi
        if not math.isfinite(zi) or math.isnan(wi) or wi == _INF:
            valid = False
        if wi == -_INF and reg == _REG_L2:
            valid = False
    if valid:
        _argsort_decreasing(s, perm_z, key_buf, idx_buf)
        _argsort_decreasing(ws, perm_w, key_buf, idx_buf)
        valid = ws[0] > -_INF
    if not valid:
        for i in range(n):
            out[i] = np.nan
            perm_z[i] = i
            perm_w[i] = i
            bs[i] = i
        return
    # l2 rows of values beyond about 2^1021 / n^2 are scaled by 2^-k (l2 is
    # homogeneous), as projection_l2_scale_down: the cross products of counts
    # and sums would overflow.
    k_scale = 0
    w_low, w_high = 0.0, 0.0
    if reg == _REG_L2:
        largest = max(abs(s[0]), abs(s[n - 1]), abs(ws[0]), abs(ws[n - 1]))
        bits = 0
        while (n >> bits) != 0:
            bits += 1
        limit = 1021 - 2 * bits
        exponent = math.frexp(largest)[1]
        if exponent > limit:
            k_scale = exponent - limit
            w_low, w_high = ws[n - 1], ws[0]
            for i in range(n):
                s[i] = math.ldexp(s[i], -k_scale)
                ws[i] = math.ldexp(ws[i], -k_scale)
        # At a subnormal eps, s and eps are multiplied by 2^k (P depends on
        # z / eps alone), as projection_l2_scale_up: block means of s would
        # round on the subnormal grid, amplified by 1 / eps.
        if eps > 0.0 and eps < 2.0**-1000:
            room = limit - math.frexp(max(abs(s[0]), abs(s[n - 1])))[1]
            k_eps = min(room, -math.frexp(eps)[1])
            if k_eps > 0:
                for i in range(n):
                    s[i] = math.ldexp(s[i], k_eps)
                eps = math.ldexp(eps, k_eps)
    kl_runs = reg != _REG_L2 and not (pool_all or eps == 0.0)
    # kl depends on z / eps alone: where |s| reaches 2^1022 (its differences
    # would overflow) s and eps are both divided by 4, as batched.cpp does.
    if kl_runs and max(abs(s[0]), abs(s[n - 1])) >= 2.0**1022 and eps >= 2.0**-1000:
        for i in range(n):
            s[i] *= 0.25
        eps = eps * 0.25
    top = 0
    for i in range(n):
        start = i
        if reg == _REG_L2:
            ref, off, cnt, wsum = s[i], 0.0, 1.0, ws[i]
            while top > 0 and _projection_l2_merges(eps, pool_all, ba[top - 1], bb[top - 1],
                                                    bc[top - 1], bd[top - 1], ref, off, cnt,
                                                    wsum):
                ref_a = ba[top - 1]
                off = bb[top - 1] + off + cnt * (ref - ref_a)
                cnt = bc[top - 1] + cnt
                wsum = bd[top - 1] + wsum
                ref = ref_a
                start = bstart[top - 1]
                top -= 1
            bstart[top] = start
            ba[top] = ref
            bb[top] = off
            bc[top] = cnt
            bd[top] = wsum
        elif kl_runs:
            ref, ssum = s[i], 1.0
            if ws[i] > -_INF:
                wref, wsum = ws[i], 1.0
            else:  # a zero of e^w: the last finite ws as reference (ws[0] is finite)
                wref, wsum = bc[top - 1], 0.0
            while top > 0 and _projection_kl_runs_merges(eps, ba[top - 1], bb[top - 1],
                                                         bc[top - 1], bd[top - 1], ref, ssum,
                                                         wref, wsum):
                ref_a, wref_a = ba[top - 1], bc[top - 1]
                es = 1.0 if ref == ref_a else math.exp((ref - ref_a) / eps)
                ew = 1.0 if wref == wref_a else math.exp(wref - wref_a)
                ssum = bb[top - 1] + es * ssum
                wsum = bd[top - 1] + ew * wsum
                ref, wref = ref_a, wref_a
                start = bstart[top - 1]
                top -= 1
            bstart[top] = start
            ba[top] = ref
            bb[top] = ssum
            bc[top] = wref
            bd[top] = wsum
        else:
            ref, ls, lw = s[i], 0.0, ws[i]
            while top > 0 and _projection_kl_merges(eps, pool_all, ba[top - 1], bb[top - 1],
                                                    bc[top - 1], ref, ls, lw):
                ref_a = ba[top - 1]
                ls = _log_add_exp(bb[top - 1], ls + _projection_kl_centred(ref, ref_a, eps,
                                                                            pool_all))
                lw = _log_add_exp(bc[top - 1], lw)
                ref = ref_a
                start = bstart[top - 1]
                top -= 1
            bstart[top] = start
            ba[top] = ref
            bb[top] = ls
            bc[top] = lw
        top += 1
    for k in range(top):
        e = bstart[k + 1] if k + 1 < top else n
        if kl_runs:  # one log per block: ws_f + log(W / S)
            shift = bc[k] + math.log(bd[k] / bb[k]) if bd[k] > 0.0 else -_INF
            # the block's spread of s / eps past the largest double: at half scale
            wide = bd[k] > 0.0 and not math.isfinite((s[e - 1] - ba[k]) / eps)
        if reg == _REG_L2:  # the mean of the offsets after the division by eps (projection.h)
            w_mean = bd[k] / bc[k]
            offset_mean_over_eps = 0.0 if pool_all or eps == 0.0 else bb[k] / eps / bc[k]
        for i in range(bstart[k], e):
            if reg == _REG_L2:
                if pool_all or eps == 0.0:
                    value = w_mean
                else:
                    value = ((s[i] - ba[k]) / eps - offset_mean_over_eps) + w_mean
            elif kl_runs:
                value = (s[i] - ba[k]) / eps + shift
                if wide and value == -_INF:  # (halving a subnormal s would round)
                    value = _twice_finite((0.5 * s[i] - 0.5 * ba[k]) / eps + 0.5 * shift)
            else:
                value = _projection_kl_centred(s[i], ba[k], eps, pool_all) - bb[k] + bc[k]
            if k_scale != 0:  # scaled back within [min w, max w] (ws is scaled too)
                value = min(max(math.ldexp(value, k_scale), w_low), w_high)
            sorted_out[i] = value
            bs[i] = bstart[k]
    for i in range(n):
        out[perm_z[i]] = sorted_out[i]


@_row_kernel
def _projection_kernel(z, w, eps, reg, out, perm_z, perm_w, bs, chunks):
    rows, n = z.shape
    for c in prange(chunks):
        r0 = c * rows // chunks
        r1 = (c + 1) * rows // chunks
        s = np.empty(n, np.float64)
        ws = np.empty(n, np.float64)
        key_buf = np.empty(n, np.float64)
        idx_buf = np.empty(n, np.int32)
        bstart = np.empty(n, np.int64)
        ba = np.empty(n, np.float64)
        bb = np.empty(n, np.float64)
        bc = np.empty(n, np.float64)
        bd = np.empty(n, np.float64)
        sorted_out = np.empty(n, np.float64)
        for r in range(r0, r1):
            _projection_row(z[r], w[r], eps, reg, out[r], perm_z[r], perm_w[r], bs[r], s, ws,
                            key_buf, idx_buf, bstart, ba, bb, bc, bd, sorted_out)


# kl isotonic (csrc/softrank/projection.h, IsotonicKlRule): a block keeps its
# largest y (ref), S = sum exp(y - ref) and W = sum w (weights scaled by a
# power of two only where their largest lies outside 2^-900..2^900);
# V = ref + log(S / W). The merge test compares products
# with e = exp(-|ref_a - ref_b|), on logs where e or a W is below 2^-400.
_KL_SMALL = 2.0**-400
_LN2 = 0.69314718055994530942


@njit(**_JIT)
def _isotonic_kl_merges(increasing, ref_a, sum_a, w_a, ref_b, sum_b, w_b):
    d = ref_a - ref_b
    e = math.exp(-d if d >= 0.0 else d)
    if e >= _KL_SMALL and w_a >= _KL_SMALL and w_b >= _KL_SMALL:
        lhs = sum_a * w_b if d >= 0.0 else e * sum_a * w_b
        rhs = e * sum_b * w_a if d >= 0.0 else sum_b * w_a
    else:
        lhs = d + math.log(sum_a) + math.log(w_b)
        rhs = math.log(sum_b) + math.log(w_a)
    return lhs >= rhs if increasing else lhs <= rhs


@njit(**_JIT)
def _isotonic_kl_block_value(y, w, has_w, start, end, ref, total, weight, shift):
    """The value of the kl block [start, end) as the C++ core writes it
    (isotonic.h, isotonic_kl_forward_row): ref + log(total / weight) is exact to
    about eps (1 + |ref|), so a block of one is y - log(w), and a longer one
    whose value is below 2^-10 (1 + |ref|) is recomputed about its own largest y
    (through expm1 / log1p where the quotient is near 1)."""
    if end - start == 1:  # (the scaled weight, as the pooling saw it)
        return float(y[start]) - math.log(weight) - shift if has_w else float(y[start])
    value = ref + (math.log(total) - math.log(weight)) - shift
    if not abs(value) < 0.0009765625 * (1.0 + abs(ref)):  # 2^-10
        return value
    top = float(y[start])
    for i in range(start + 1, end):
        top = max(top, float(y[i]))
    excess = 0.0
    for i in range(start, end):
        excess += math.expm1(float(y[i]) - top)
    size = float(end - start)
    ratio_minus_one = (excess + (size - weight)) / weight
    if abs(ratio_minus_one) < 0.5:
        return top + math.log1p(ratio_minus_one) - shift
    return top + (math.log(size + excess) - math.log(weight)) - shift


@njit(**_JIT)
def _isotonic_kl_row(y, w, has_w, increasing, sol, bs, bstart, bref, bsum, bw, ws):
    n = y.shape[0]
    for i in range(n):
        if not math.isfinite(float(y[i])):
            for j in range(n):
                sol[j] = np.nan
                bs[j] = -1
            return
    exponent = 0
    if has_w:
        wmax = 0.0
        for i in range(n):
            wmax = max(wmax, float(w[i]))
        exponent = math.frexp(wmax)[1]
        if exponent > 900 or exponent < -900:
            for i in range(n):
                ws[i] = max(math.ldexp(float(w[i]), -exponent), _DENORM_MIN)
        else:
            exponent = 0
            for i in range(n):
                ws[i] = float(w[i])
    top = 0
    for i in range(n):
        start = i
        ref = float(y[i])
        total = 1.0
        weight = ws[i] if has_w else 1.0
        while top > 0 and _isotonic_kl_merges(increasing, bref[top - 1], bsum[top - 1],
                                              bw[top - 1], ref, total, weight):
            d = bref[top - 1] - ref
            e = math.exp(-d if d >= 0.0 else d)
            if d >= 0.0:
                total = bsum[top - 1] + e * total
                ref = bref[top - 1]
            else:
                total = e * bsum[top - 1] + total
            weight = bw[top - 1] + weight
            start = bstart[top - 1]
            top -= 1
        bstart[top] = start
        bref[top] = ref
        bsum[top] = total
        bw[top] = weight
        top += 1
    shift = exponent * _LN2
    for k in range(top):
        e = bstart[k + 1] if k + 1 < top else n
        value = _isotonic_kl_block_value(y, w, has_w, bstart[k], e, bref[k], bsum[k], bw[k],
                                         shift)
        for i in range(bstart[k], e):
            sol[i] = value
            bs[i] = bstart[k]
    # Neighbours within the pooling's resolution, their values computed more
    # exactly, may come out an ulp or so out of order: each is brought to its
    # predecessor's value (isotonic.h, isotonic_kl_forward_row).
    for i in range(1, n):
        if (sol[i] < sol[i - 1]) if increasing else (sol[i] > sol[i - 1]):
            sol[i] = sol[i - 1]


@_row_kernel
def _isotonic_kl_kernel(y, w, has_w, increasing, sol, bs, chunks):
    rows, n = y.shape
    for c in prange(chunks):
        r0 = c * rows // chunks
        r1 = (c + 1) * rows // chunks
        bstart = np.empty(n, np.int64)
        bref = np.empty(n, np.float64)
        bsum = np.empty(n, np.float64)
        bw = np.empty(n, np.float64)
        ws = np.empty(n, np.float64)
        for r in range(r0, r1):
            wr = w[r] if has_w else w[0]
            _isotonic_kl_row(y[r], wr, has_w, increasing, sol[r], bs[r], bstart, bref, bsum, bw,
                             ws)



# Pearson correlation (csrc/softrank/pearson.h): each row brought to a largest
# magnitude near 1 by a power of two, then means and centred sums in float64;
# a constant or non-finite row is NaN.
@njit(**_JIT)
def _unit_scale(largest):
    if largest == 0.0:
        return 1.0
    exponent = math.frexp(largest)[1]
    exponent = min(max(exponent, -1021), 1022)
    return math.ldexp(1.0, -exponent)


@njit(**_JIT)
def _pearson_moments(a, b):
    """(scale_a, scale_b, mean_a, mean_b, norm_a, norm_b, corr) of one row pair."""
    n = a.shape[0]
    max_a = 0.0
    max_b = 0.0
    finite = True
    varies_a = False
    varies_b = False
    for i in range(n):
        fa = abs(float(a[i]))
        fb = abs(float(b[i]))
        finite = finite and fa <= _DBL_MAX and fb <= _DBL_MAX
        max_a = fa if fa > max_a else max_a
        max_b = fb if fb > max_b else max_b
        varies_a = varies_a or a[i] != a[0]
        varies_b = varies_b or b[i] != b[0]
    if not (finite and varies_a and varies_b):
        return 1.0, 1.0, np.nan, np.nan, np.nan, np.nan, np.nan
    scale_a = _unit_scale(max_a)
    scale_b = _unit_scale(max_b)
    sum_a = 0.0
    sum_b = 0.0
    for i in range(n):
        sum_a += float(a[i]) * scale_a
        sum_b += float(b[i]) * scale_b
    mean_a = sum_a / n
    mean_b = sum_b / n
    ab = 0.0
    aa = 0.0
    bb = 0.0
    for i in range(n):
        da = float(a[i]) * scale_a - mean_a
        db = float(b[i]) * scale_b - mean_b
        ab += da * db
        aa += da * da
        bb += db * db
    norm_a = math.sqrt(aa)
    norm_b = math.sqrt(bb)
    return scale_a, scale_b, mean_a, mean_b, norm_a, norm_b, ab / norm_a / norm_b


@_row_kernel
def _pearson_kernel(a, b, corr, chunks):
    rows = a.shape[0]
    for c in prange(chunks):
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            corr[r] = _pearson_moments(a[r], b[r])[6]


@_row_kernel
def _pearson_vjp_kernel(a, b, cotangent, grad, chunks):
    rows, n = a.shape
    for c in prange(chunks):
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            scale_a, scale_b, mean_a, mean_b, norm_a, norm_b, corr = _pearson_moments(a[r], b[r])
            if math.isnan(corr):
                for i in range(n):
                    grad[r, i] = np.nan
                continue
            g = float(cotangent[r])
            along_b = g * scale_a / norm_a / norm_b
            along_a = g * scale_a * corr / norm_a / norm_a
            for i in range(n):
                da = float(a[r, i]) * scale_a - mean_a
                db = float(b[r, i]) * scale_b - mean_b
                grad[r, i] = along_b * db - along_a * da


@njit(**_JIT)
def _inverse_kernel(perm, inverse):
    rows, n = perm.shape
    for r in range(rows):
        for i in range(n):
            inverse[r, i] = -1
        for i in range(n):
            j = perm[r, i]
            if j < 0 or j >= n or inverse[r, j] != -1:
                return False
            inverse[r, j] = i
    return True

# ---------------------------------------------------------------------------
# Python entry points: validation, allocation, dispatch.
# ---------------------------------------------------------------------------


def _check_array(a, name, dtype=None, shape=None):
    """Check that ``a`` is a C-contiguous 2-D numpy array of the right dtype.

    ``dtype=None`` accepts float32 and float64. A read-only array is copied:
    numba compiles a separate specialization for read-only arrays (seconds,
    once per combination of arguments), which costs more than a copy.
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if dtype is None:
        if a.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    elif a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, n), got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if a.shape[1] > _MAX_N:
        raise ValueError(f"{name} rows are too long for int32 indices (n = {a.shape[1]})")
    if not a.flags.writeable:
        a = a.copy()
    return a


def _check_codes(op, reg, descending, eps):
    """Normalize the scalar arguments to the exact types the kernels are compiled for."""
    if op not in (_OP_RANK, _OP_SORT):
        raise ValueError(f"op must be 0 (rank) or 1 (sort), got {op!r}")
    if reg not in (_REG_L2, _REG_KL):
        raise ValueError(f"reg must be 0 (l2) or 1 (kl), got {reg!r}")
    eps = float(eps)
    if math.isnan(eps) or eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return int(op), int(reg), bool(descending), eps


def _chunks(rows):
    """How many row chunks to hand to prange: a few per thread for balance.

    Called right before each kernel: it also applies set_num_threads' count to
    the calling thread (numba's count is per thread).
    """
    if _serial_only:
        return min(rows, 4)
    if _thread_limit is not None and numba.get_num_threads() != _thread_limit:
        numba.set_num_threads(_thread_limit)
    return min(rows, 4 * numba.get_num_threads())


def soft_forward(x, op, reg, descending, eps):
    """Soft rank (``op=0``) or soft sort (``op=1``) of every row of ``x``.

    Parameters
    ----------
    x : numpy.ndarray, float32 or float64, shape (rows, n), C-contiguous
    op : int
        0 = soft rank, 1 = soft sort.
    reg : int
        0 = l2, 1 = kl.
    descending : bool
    eps : float
        >= 0; 0 is the hard operator, inf the limit.

    Returns
    -------
    out : numpy.ndarray, dtype of ``x``, shape (rows, n)
    perm : numpy.ndarray, int32, shape (rows, n)
        ``perm[r, i]``: the column at sorted position ``i`` (decreasing
        ``x'``, ties in increasing column order).
    block_start : numpy.ndarray, int32, shape (rows, n)
        Start of the PAV block of each sorted position; -1 on a NaN/inf row.
    """
    x = _check_array(x, "x")
    op, reg, descending, eps = _check_codes(op, reg, descending, eps)
    rows, n = x.shape
    out = np.empty_like(x)
    perm = np.empty((rows, n), np.int32)
    block_start = np.empty((rows, n), np.int32)
    if rows and n:
        _soft_forward_kernel(x, out, perm, block_start, op, reg, descending, eps,
                             _chunks(rows))
    return out, perm, block_start


def soft_forward_value(x, op, reg, descending, eps):
    """``out`` of :func:`soft_forward` alone (the engine contract's value-only call).

    The numba kernel writes the state anyway; only the native engine saves
    its arrays.
    """
    return soft_forward(x, op, reg, descending, eps)[0]


def _soft_backward(x, out, perm, block_start, vec, vec_name, op, reg, descending,
                   eps, jvp):
    x = _check_array(x, "x")
    shape = x.shape
    out = _check_array(out, "out", x.dtype, shape)
    perm = _check_array(perm, "perm", _INT32, shape)
    block_start = _check_array(block_start, "block_start", _INT32, shape)
    vec = _check_array(vec, vec_name, x.dtype, shape)
    op, reg, descending, eps = _check_codes(op, reg, descending, eps)
    rows, n = shape
    res = np.empty_like(x)
    if rows and n:
        status = np.zeros(rows, np.int8)
        _soft_backward_kernel(x, out, perm, block_start, vec, res, op, reg,
                              descending, eps, jvp, status, _chunks(rows))
        if status.any():
            bad = int(np.flatnonzero(status)[0])
            raise ValueError(f"perm row {bad} holds an index outside [0, {n})")
    return res


def soft_hvp(x, out, perm, block_start, cotangent, tangent, op, reg, descending, eps):
    """Gradient w.r.t. ``x`` of ``<cotangent, J(x) tangent>`` (double backward), O(n) per row.

    Parameters
    ----------
    x, out, perm, block_start, op, reg, descending, eps : as in :func:`soft_vjp`
    cotangent, tangent : numpy.ndarray, dtype and shape of ``x``

    Returns
    -------
    numpy.ndarray
        dtype and shape of ``x``; zero for l2, NaN on the rows where the
        forward was NaN.
    """
    x = _check_array(x, "x")
    shape = x.shape
    out = _check_array(out, "out", x.dtype, shape)
    perm = _check_array(perm, "perm", _INT32, shape)
    block_start = _check_array(block_start, "block_start", _INT32, shape)
    cotangent = _check_array(cotangent, "cotangent", x.dtype, shape)
    tangent = _check_array(tangent, "tangent", x.dtype, shape)
    op, reg, descending, eps = _check_codes(op, reg, descending, eps)
    rows, n = shape
    res = np.empty_like(x)
    if rows and n:
        status = np.zeros(rows, np.int8)
        _hvp_kernel(x, out, perm, block_start, cotangent, tangent, res, op, reg,
                    descending, eps, status, _chunks(rows))
        if status.any():
            bad = int(np.flatnonzero(status)[0])
            raise ValueError(f"perm row {bad} holds an index outside [0, {n})")
    return res


def soft_vjp(x, out, perm, block_start, cotangent, op, reg, descending, eps):
    """Gradient of ``sum(cotangent * op(x))`` with respect to ``x``, O(n) per row.

    Parameters
    ----------
    x, op, reg, descending, eps : as in :func:`soft_forward`
    out, perm, block_start : numpy.ndarray
        The outputs of :func:`soft_forward` for the same arguments.
    cotangent : numpy.ndarray, dtype and shape of ``x``

    Returns
    -------
    numpy.ndarray
        dtype and shape of ``x``; NaN on the rows where the forward was NaN.
    """
    return _soft_backward(x, out, perm, block_start, cotangent, "cotangent", op,
                          reg, descending, eps, False)


def soft_jvp(x, out, perm, block_start, tangent, op, reg, descending, eps):
    """Jacobian-vector product of ``op`` at ``x`` with ``tangent``, O(n) per row.

    Parameters
    ----------
    x, op, reg, descending, eps : as in :func:`soft_forward`
    out, perm, block_start : numpy.ndarray
        The outputs of :func:`soft_forward` for the same arguments.
    tangent : numpy.ndarray, dtype and shape of ``x``

    Returns
    -------
    numpy.ndarray
        dtype and shape of ``x``; NaN on the rows where the forward was NaN.
    """
    return _soft_backward(x, out, perm, block_start, tangent, "tangent", op, reg,
                          descending, eps, True)


def _weights_or_placeholder(weights, dtype, shape):
    if weights is None:
        # A placeholder of the same dtype keeps a single compiled
        # specialization per dtype for both the weighted and unweighted case.
        return np.zeros((1, 0), dtype), False
    return _check_array(weights, "weights", dtype, shape), True


def isotonic_forward(y, weights, increasing, reg=_REG_L2):
    """Weighted isotonic regression of every row of ``y`` by PAV.

    l2 (``reg=0``): ``argmin_v sum_i w_i (v_i - y_i)^2``; kl (``reg=1``):
    ``argmin_v sum_i exp(y_i - v_i) + w_i v_i``; subject to ``v``
    non-decreasing (``increasing=True``) or non-increasing.

    Parameters
    ----------
    y : numpy.ndarray, float32 or float64, shape (rows, n), C-contiguous
    weights : numpy.ndarray or None
        Positive finite weights, dtype and shape of ``y`` (ValueError
        otherwise, as the compiled core); None for all ones.
    increasing : bool
    reg : int
        0 = l2, 1 = kl.

    Returns
    -------
    solution : numpy.ndarray, dtype of ``y``
    block_start : numpy.ndarray, int32
        Start position of each position's block; -1 on a NaN/inf row.
    """
    y = _check_array(y, "y")
    w, has_w = _weights_or_placeholder(weights, y.dtype, y.shape)
    if has_w and not bool(np.all((w > 0) & (w <= np.finfo(w.dtype).max))):
        raise ValueError("weights must be finite and > 0 everywhere")
    if reg not in (_REG_L2, _REG_KL):
        raise ValueError(f"reg must be 0 (l2) or 1 (kl), got {reg!r}")
    rows, n = y.shape
    sol = np.empty_like(y)
    block_start = np.empty((rows, n), np.int32)
    if rows and n:
        kernel = _isotonic_forward_kernel if reg == _REG_L2 else _isotonic_kl_kernel
        kernel(y, w, has_w, bool(increasing), sol, block_start, _chunks(rows))
    return sol, block_start


def projection_forward(z, w, eps, reg):
    """Projection of ``z / eps`` onto the permutahedron of ``w``, every row.

    l2 (``reg=0``): ``argmin_{mu in P(w)} 1/2 ||mu - z / eps||^2``; kl
    (``reg=1``): ``log argmin_{mu in P(exp w)} KL(mu, exp(z / eps))``. eps = 0
    is the hard limit, eps = inf pools every row into one block.

    Parameters
    ----------
    z, w : numpy.ndarray, float32 or float64, shape (rows, n), same dtype
        Under kl, ``w`` may hold -inf where the row's largest ``w`` is finite.
    eps : float
        >= 0.
    reg : int
        0 = l2, 1 = kl.

    Returns
    -------
    out : numpy.ndarray, dtype of ``z``
        NaN on rows holding NaN or inf (other than kl's -inf in ``w``).
    perm_z, perm_w : numpy.ndarray, int32
        The column of ``z`` (``w``) at each decreasing sorted position, ties
        in increasing column order (identity on NaN rows).
    block_start : numpy.ndarray, int32
        Start of the PAV block of each sorted position (singletons on NaN rows).
    """
    z = _check_array(z, "z")
    w = _check_array(w, "w", z.dtype, z.shape)
    if reg not in (_REG_L2, _REG_KL):
        raise ValueError(f"reg must be 0 (l2) or 1 (kl), got {reg!r}")
    eps = float(eps)
    if math.isnan(eps) or eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    rows, n = z.shape
    out = np.empty_like(z)
    perm_z = np.empty((rows, n), np.int32)
    perm_w = np.empty((rows, n), np.int32)
    block_start = np.empty((rows, n), np.int32)
    if rows and n:
        _projection_kernel(z, w, eps, int(reg), out, perm_z, perm_w, block_start, _chunks(rows))
    return out, perm_z, perm_w, block_start


def projection_forward_value(z, w, eps, reg):
    """``out`` of :func:`projection_forward` alone (the engine contract's value-only call).

    The numba kernel sorts w with its order anyway; only the native engine
    saves that work.
    """
    return projection_forward(z, w, eps, reg)[0]


def isotonic_vjp(weights, block_start, cotangent):
    """Gradient of ``sum(cotangent * isotonic(y))`` with respect to ``y``.

    Parameters
    ----------
    weights : numpy.ndarray or None
        The weights given to :func:`isotonic_forward` (dtype of ``cotangent``).
    block_start : numpy.ndarray, int32
        From :func:`isotonic_forward`.
    cotangent : numpy.ndarray, float32 or float64, shape (rows, n)

    Returns
    -------
    numpy.ndarray
        ``grad[j] = w_j / W_B * sum_{i in B} cotangent[i]``, dtype of
        ``cotangent``; NaN on NaN rows (block_start -1).
    """
    block_start = _check_array(block_start, "block_start", _INT32)
    shape = block_start.shape
    cotangent = _check_array(cotangent, "cotangent", None, shape)
    w, has_w = _weights_or_placeholder(weights, cotangent.dtype, shape)
    rows, n = shape
    res = np.empty_like(cotangent)
    if rows and n:
        placeholder = np.zeros((1, 0), cotangent.dtype)
        _isotonic_vjp_kernel(w, has_w, block_start, cotangent, res, placeholder, placeholder,
                             placeholder, False, _chunks(rows))
    return res


def isotonic_vjp_weighted(y, solution, weights, block_start, cotangent):
    """Both gradients of ``sum(cotangent * isotonic(y, weights))`` (l2), one pass.

    Parameters
    ----------
    y, solution, weights : numpy.ndarray, dtype and shape of ``cotangent``
        The input, :func:`isotonic_forward`'s solution and the weights.
    block_start : numpy.ndarray, int32
        From :func:`isotonic_forward`.
    cotangent : numpy.ndarray, float32 or float64, shape (rows, n)

    Returns
    -------
    (grad_y, grad_weights) : numpy.ndarray, dtype of ``cotangent``
        ``grad_y[j] = w_j / W_B sum_B cotangent`` and ``grad_weights[j] =
        (y_j - v_B) / W_B sum_B cotangent`` over the block B of j; NaN on
        NaN rows (block_start -1).
    """
    block_start = _check_array(block_start, "block_start", _INT32)
    shape = block_start.shape
    cotangent = _check_array(cotangent, "cotangent", None, shape)
    y = _check_array(y, "y", cotangent.dtype, shape)
    solution = _check_array(solution, "solution", cotangent.dtype, shape)
    w = _check_array(weights, "weights", cotangent.dtype, shape)
    rows, n = shape
    res = np.empty_like(cotangent)
    res_w = np.empty_like(cotangent)
    if rows and n:
        _isotonic_vjp_kernel(w, True, block_start, cotangent, res, y, solution, res_w, True,
                             _chunks(rows))
    return res, res_w


def inverse_permutations(perm):
    """``inverse[r, perm[r, i]] = i`` for every row of an int32 ``(rows, n)`` array.

    Raises ``ValueError`` where a row is not a permutation of ``0, ..., n - 1``.
    """
    perm = _check_array(perm, "perm", _INT32)
    inverse = np.empty_like(perm)
    if perm.size and not _inverse_kernel(perm, inverse):
        raise ValueError("perm rows must be permutations of 0, ..., n - 1")
    return inverse


def pearson(a, b):
    """Pearson correlation of each row of ``a`` with the same row of ``b``.

    Parameters
    ----------
    a, b : numpy.ndarray, float32 or float64, shape (rows, n), same dtype

    Returns
    -------
    numpy.ndarray, shape (rows,), dtype of ``a``
        NaN for a row of ``a`` or ``b`` that is constant or holds NaN or inf.
    """
    a = _check_array(a, "a")
    b = _check_array(b, "b", a.dtype, a.shape)
    corr = np.empty(a.shape[0], a.dtype)
    if a.shape[0]:
        _pearson_kernel(a, b, corr, _chunks(a.shape[0]))
    return corr


def pearson_vjp(a, b, cotangent):
    """Gradient in ``a`` of ``sum(cotangent * pearson(a, b))``, shape of ``a``.

    ``cotangent`` is 1-D, one value per row, of ``a``'s dtype. Per row:
    ``cotangent (b_c / (|a_c| |b_c|) - corr a_c / |a_c|^2)``, ``a_c`` and
    ``b_c`` the centred rows; NaN where ``corr`` is NaN.
    """
    a = _check_array(a, "a")
    b = _check_array(b, "b", a.dtype, a.shape)
    if not isinstance(cotangent, np.ndarray) or cotangent.ndim != 1 or \
            cotangent.shape[0] != a.shape[0] or not cotangent.flags.c_contiguous:
        raise ValueError(f"cotangent must be a contiguous 1-D array of shape ({a.shape[0]},), "
                         f"got shape {getattr(cotangent, 'shape', None)}")
    if cotangent.dtype != a.dtype:
        raise TypeError(f"cotangent must have the dtype of a ({a.dtype}), got {cotangent.dtype}")
    grad = np.empty_like(a)
    if a.size:
        _pearson_vjp_kernel(a, b, cotangent, grad, _chunks(a.shape[0]))
    return grad


def set_num_threads(k):
    """Bound the threads of the parallel kernels to ``k`` (at most the pool size).

    Parameters
    ----------
    k : int
        >= 1. Values above numba's pool size (``NUMBA_NUM_THREADS``) are
        clipped, since numba refuses them.
    """
    global _thread_limit
    k = int(k)
    if k < 1:
        raise ValueError(f"num_threads must be >= 1, got {k}")
    _thread_limit = min(k, numba.config.NUMBA_NUM_THREADS)
    if not _serial_only:
        numba.set_num_threads(_thread_limit)


def get_num_threads():
    """The number of threads the parallel kernels use (1 in a fork child that
    runs the serial kernels, see ``_RowKernel``)."""
    if _serial_only:
        return 1
    return _thread_limit if _thread_limit is not None else int(numba.get_num_threads())
