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

``fastmath`` is off on purpose: NaN rows must be detected, ``-inf`` must flow
through ``logaddexp`` and the merge tests must be evaluated exactly as written
(no reassociation), or the two engines would drift apart near ties.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

__all__ = [
    "soft_forward",
    "soft_vjp",
    "soft_jvp",
    "isotonic_forward",
    "isotonic_vjp",
    "set_num_threads",
    "get_num_threads",
]

# Engine codes (the same numbers as softrank._engine; repeated here so that
# the jitted code sees plain integer constants).
_OP_RANK = 0
_OP_SORT = 1
_REG_L2 = 0
_REG_KL = 1

# Sorting: runs of this length are insertion-sorted before the merge passes.
_RUN = 16

# Settings shared by every jitted function. cache=True keeps the compiled code
# on disk so that only the very first call in an environment pays for
# compilation; fastmath=False: see the module docstring.
_JIT = dict(cache=True, fastmath=False, nogil=True)

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INT32 = np.dtype(np.int32)
_MAX_N = 2**31 - 1


# ---------------------------------------------------------------------------
# Row-level building blocks (sequential, called from the parallel kernels)
# ---------------------------------------------------------------------------


@njit(**_JIT)
def _logaddexp(a, b):
    """``log(exp(a) + exp(b))`` without overflow; exact when one side is -inf.

    The -inf case matters: for a tiny ``eps`` the shifted block statistic
    ``L_B + (ref_B - ref_A) / eps`` is -inf and the merge must keep ``L_A``.
    """
    if a < b:
        a, b = b, a
    if b == -np.inf:
        return a
    return a + np.log1p(np.exp(b - a))


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
def _pav_soft(xs, op, reg, eps, bstart, bsize, bref, bacc, blr):
    """PAV over the sorted row ``xs`` (non-increasing) for one op/reg.

    Blocks live on a stack of parallel arrays: start position, size ``m``,
    ``ref`` (the block's first, largest value), ``acc`` (``d`` for l2, ``L``
    for kl) and ``Lr`` (sort kl only). The merge tests are those of the table
    in ALGORITHM.md, written so that only differences of nearby values are
    divided by ``eps`` (never ``x / eps`` of a large value, never ``* (1/eps)``).

    Returns
    -------
    int
        The number of blocks on the stack.
    """
    n = xs.shape[0]
    k = 0
    for i in range(n):
        bstart[k] = i
        bsize[k] = 1
        bref[k] = xs[i]
        bacc[k] = 0.0
        blr[k] = 0.0
        k += 1
        while k >= 2:
            a = k - 2
            b = k - 1
            m_a = float(bsize[a])
            m_b = float(bsize[b])
            if reg == _REG_L2:
                # Difference of block means of xs.
                dx = (bref[a] - bref[b]) + bacc[a] / m_a - bacc[b] / m_b
                if op == _OP_RANK:
                    merge = dx / eps <= (m_a + m_b) / 2.0
                else:
                    merge = ((m_a + m_b) / 2.0) / eps <= dx
            elif op == _OP_RANK:
                # R = sum of rho over the block, in closed form.
                s_a = bstart[a]
                e_a = s_a + bsize[a]
                s_b = bstart[b]
                e_b = s_b + bsize[b]
                r_a = m_a * float(2 * n - s_a - e_a + 1) / 2.0
                r_b = m_b * float(2 * n - s_b - e_b + 1) / 2.0
                merge = (bref[a] - bref[b]) / eps + bacc[a] - bacc[b] <= np.log(
                    r_a
                ) - np.log(r_b)
            else:
                merge = m_a / eps + blr[a] - blr[b] <= (bref[a] - bref[b]) + bacc[
                    a
                ] - bacc[b]
            if not merge:
                break
            # Pool B into A; A keeps its reference value.
            if reg == _REG_L2:
                bacc[a] = bacc[a] + bacc[b] + m_b * (bref[b] - bref[a])
            elif op == _OP_RANK:
                bacc[a] = _logaddexp(bacc[a], bacc[b] + (bref[b] - bref[a]) / eps)
            else:
                bacc[a] = _logaddexp(bacc[a], bacc[b] + (bref[b] - bref[a]))
                blr[a] = _logaddexp(blr[a], blr[b] - m_a / eps)
            bsize[a] = bsize[a] + bsize[b]
            k -= 1
    return k


@njit(**_JIT)
def _forward_row(x, out, perm, bs, op, reg, descending, eps,
                 keys, key_buf, idx_buf, bstart, bsize, bref, bacc, blr):
    """Soft rank / soft sort of one row; see ALGORITHM.md "Outputs".

    ``out`` is written in the dtype of ``x`` (the only narrowing); ``perm``
    and ``bs`` (block_start) are int32. The remaining arguments are float64 /
    int scratch arrays of length >= n owned by the calling chunk.
    """
    n = x.shape[0]
    if n == 0:
        return
    # x' = x for an ascending rank or a descending sort, -x otherwise; adding
    # +0.0 turns -0.0 into +0.0 so that no signed zero reaches the sort.
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
    xs = keys[:n]
    _argsort_decreasing(xs, perm, key_buf, idx_buf)
    # sgn: the sign that maps the decreasing-order sort problem back to the
    # requested direction (+1 descending, -1 ascending).
    sgn = 1.0 if descending else -1.0
    nf = float(n)

    if eps == 0.0:
        # The hard operator.
        if op == _OP_RANK:
            # Runs of equal values share the mean of their ranks.
            s = 0
            while s < n:
                e = s + 1
                while e < n and xs[e] == xs[s]:
                    e += 1
                val = nf - (s + e - 1) / 2.0
                for i in range(s, e):
                    bs[i] = s
                    out[perm[i]] = val
                s = e
        else:
            for i in range(n):
                bs[i] = i
                out[i] = sgn * xs[i]
        return

    if eps == np.inf:
        # The limit: one block [0, n).
        for i in range(n):
            bs[i] = 0
        if op == _OP_RANK:
            val = (nf + 1.0) / 2.0
            for i in range(n):
                out[i] = val
            return
        ref = xs[0]
        acc = 0.0
        if reg == _REG_L2:
            # The l2 merge formula with singleton blocks: d += 1 * (xs[j] - ref).
            for j in range(1, n):
                acc = acc + 0.0 + 1.0 * (xs[j] - ref)
            val = ref + acc / nf
        else:
            # The kl merge formula with c = 1: L = logaddexp(L, xs[j] - ref).
            for j in range(1, n):
                acc = _logaddexp(acc, 0.0 + (xs[j] - ref))
            val = ref + acc - np.log(nf)
        for i in range(n):
            out[i] = sgn * val
        return

    nblocks = _pav_soft(xs, op, reg, eps, bstart, bsize, bref, bacc, blr)
    for b in range(nblocks):
        s = bstart[b]
        e = s + bsize[b]
        m = float(bsize[b])
        ref = bref[b]
        acc = bacc[b]
        if op == _OP_RANK:
            if reg == _REG_L2:
                base = nf - (s + e - 1) / 2.0
                for i in range(s, e):
                    bs[i] = s
                    out[perm[i]] = base + ((xs[i] - ref) - acc / m) / eps
            else:
                r_b = m * float(2 * n - s - e + 1) / 2.0
                for i in range(s, e):
                    bs[i] = s
                    out[perm[i]] = r_b * np.exp((xs[i] - ref) / eps - acc)
        else:
            if reg == _REG_L2:
                mean = ref + acc / m
                for i in range(s, e):
                    bs[i] = s
                    out[i] = sgn * (((s + e - 1) / 2.0 - i) / eps + mean)
            else:
                lr = blr[b]
                for i in range(s, e):
                    bs[i] = s
                    out[i] = sgn * (-(i - s) / eps - lr + ref + acc)


@njit(**_JIT)
def _backward_row(x, out, perm, bs, vec, res, op, reg, descending, eps, jvp, xs):
    """vjp (``jvp=False``) or jvp of one row from the stored forward state.

    See ALGORITHM.md "Backward". Blocks are recovered from ``bs``
    (block_start) as maximal runs of equal entries; ``bs`` is only compared,
    never used as an index, and ``perm`` is range-checked first, so a
    malformed state cannot make the kernel read out of bounds.

    Returns
    -------
    int
        0 on success, 1 if ``perm`` holds an entry outside ``[0, n)``.
    """
    n = x.shape[0]
    if n == 0:
        return 0
    for i in range(n):
        if bs[i] < 0:
            # A NaN/inf row of the forward pass.
            for j in range(n):
                res[j] = np.nan
            return 0
    for i in range(n):
        if perm[i] < 0 or perm[i] >= n:
            return 1

    if op == _OP_RANK:
        if eps == 0.0 or eps == np.inf:
            # The rank is piecewise constant (eps = 0) or constant (eps = inf).
            for j in range(n):
                res[j] = 0.0
            return 0
        sg = -1.0 if descending else 1.0
        s = 0
        while s < n:
            e = s + 1
            while e < n and bs[e] == bs[s]:
                e += 1
            m = float(e - s)
            if reg == _REG_L2:
                tot = 0.0
                for i in range(s, e):
                    tot += np.float64(vec[perm[i]])
                mean = tot / m
                for i in range(s, e):
                    p = perm[i]
                    res[p] = sg / eps * (np.float64(vec[p]) - mean)
            else:
                r_b = m * float(2 * n - s - e + 1) / 2.0
                tot = 0.0
                for i in range(s, e):
                    p = perm[i]
                    tot += np.float64(vec[p]) * np.float64(out[p])
                q = tot / r_b
                for i in range(s, e):
                    p = perm[i]
                    res[p] = sg / eps * np.float64(out[p]) * (np.float64(vec[p]) - q)
            s = e
        return 0

    # Soft sort. An ascending sort negates both x and the output, so the
    # Jacobian is the same for both directions once x' is formed.
    if reg == _REG_KL:
        sx = 1.0 if descending else -1.0
        for i in range(n):
            xs[i] = sx * np.float64(x[perm[i]]) + 0.0
    s = 0
    while s < n:
        e = s + 1
        while e < n and bs[e] == bs[s]:
            e += 1
        m = float(e - s)
        if reg == _REG_L2:
            tot = 0.0
            if jvp:
                for i in range(s, e):
                    tot += np.float64(vec[perm[i]])
                mean = tot / m
                for i in range(s, e):
                    res[i] = mean
            else:
                for i in range(s, e):
                    tot += np.float64(vec[i])
                mean = tot / m
                for i in range(s, e):
                    res[perm[i]] = mean
        else:
            # Block softmax of the sorted values: p_i = exp(xs_i - ref - L).
            # ref = xs[s] is the block maximum, so the sum lies in [1, m].
            ref = xs[s]
            tot = 0.0
            for i in range(s, e):
                tot += np.exp(xs[i] - ref)
            lse = np.log(tot)
            acc = 0.0
            if jvp:
                for i in range(s, e):
                    acc += np.exp((xs[i] - ref) - lse) * np.float64(vec[perm[i]])
                for i in range(s, e):
                    res[i] = acc
            else:
                for i in range(s, e):
                    acc += np.float64(vec[i])
                for i in range(s, e):
                    res[perm[i]] = np.exp((xs[i] - ref) - lse) * acc
        s = e
    return 0


@njit(**_JIT)
def _isotonic_row(y, w, has_w, increasing, sol, bs, bstart, bref, bw, bd):
    """Weighted l2 isotonic regression of one row by PAV.

    Blocks keep ``ref = y[s]``, ``W = sum w`` and ``d = sum w (y - ref)``;
    the block value is ``ref + d / W``. Adjacent blocks with equal values are
    pooled (``>=`` / ``<=``), as in the soft operators.
    """
    n = y.shape[0]
    if n == 0:
        return
    for j in range(n):
        if not np.isfinite(np.float64(y[j])):
            for i in range(n):
                sol[i] = np.nan
                bs[i] = -1
            return
    k = 0
    for i in range(n):
        bstart[k] = i
        bref[k] = np.float64(y[i])
        bw[k] = np.float64(w[i]) if has_w else 1.0
        bd[k] = 0.0
        k += 1
        while k >= 2:
            a = k - 2
            b = k - 1
            v_a = bref[a] + bd[a] / bw[a]
            v_b = bref[b] + bd[b] / bw[b]
            if increasing:
                merge = v_a >= v_b
            else:
                merge = v_a <= v_b
            if not merge:
                break
            bd[a] = bd[a] + bd[b] + bw[b] * (bref[b] - bref[a])
            bw[a] = bw[a] + bw[b]
            k -= 1
    for b in range(k):
        s = bstart[b]
        e = bstart[b + 1] if b + 1 < k else n
        val = bref[b] + bd[b] / bw[b]
        for i in range(s, e):
            bs[i] = s
            sol[i] = val


@njit(**_JIT)
def _isotonic_vjp_row(w, has_w, bs, g, res):
    """``grad_j = w_j / W_B * sum_B g`` for one row; NaN for a NaN row."""
    n = g.shape[0]
    if n == 0:
        return
    for i in range(n):
        if bs[i] < 0:
            for j in range(n):
                res[j] = np.nan
            return
    s = 0
    while s < n:
        e = s + 1
        while e < n and bs[e] == bs[s]:
            e += 1
        tot = 0.0
        wsum = 0.0
        for i in range(s, e):
            tot += np.float64(g[i])
            wsum += np.float64(w[i]) if has_w else 1.0
        for i in range(s, e):
            wi = np.float64(w[i]) if has_w else 1.0
            res[i] = wi / wsum * tot
        s = e


# ---------------------------------------------------------------------------
# Parallel kernels: prange over contiguous chunks of rows. A chunk allocates
# its scratch once and reuses it for all its rows (many short rows would
# otherwise spend their time in the allocator). Rows never interact, so the
# chunking changes nothing in the results.
# ---------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def _soft_forward_kernel(x, out, perm, bs, op, reg, descending, eps, chunks):
    rows, n = x.shape
    for c in prange(chunks):
        r0 = c * rows // chunks
        r1 = (c + 1) * rows // chunks
        keys = np.empty(n, np.float64)
        key_buf = np.empty(n, np.float64)
        idx_buf = np.empty(n, np.int32)
        bstart = np.empty(n, np.int64)
        bsize = np.empty(n, np.int64)
        bref = np.empty(n, np.float64)
        bacc = np.empty(n, np.float64)
        blr = np.empty(n, np.float64)
        for r in range(r0, r1):
            _forward_row(x[r], out[r], perm[r], bs[r], op, reg, descending, eps,
                         keys, key_buf, idx_buf, bstart, bsize, bref, bacc, blr)


@njit(parallel=True, **_JIT)
def _soft_backward_kernel(x, out, perm, bs, vec, res, op, reg, descending, eps,
                          jvp, status, chunks):
    rows, n = x.shape
    for c in prange(chunks):
        r0 = c * rows // chunks
        r1 = (c + 1) * rows // chunks
        xs = np.empty(n, np.float64)
        for r in range(r0, r1):
            status[r] = _backward_row(x[r], out[r], perm[r], bs[r], vec[r],
                                      res[r], op, reg, descending, eps, jvp, xs)


@njit(parallel=True, **_JIT)
def _isotonic_forward_kernel(y, w, has_w, increasing, sol, bs, chunks):
    rows, n = y.shape
    for c in prange(chunks):
        r0 = c * rows // chunks
        r1 = (c + 1) * rows // chunks
        bstart = np.empty(n, np.int64)
        bref = np.empty(n, np.float64)
        bw = np.empty(n, np.float64)
        bd = np.empty(n, np.float64)
        for r in range(r0, r1):
            # Without weights, w is a (1, 0) placeholder and never read.
            wr = w[r] if has_w else w[0]
            _isotonic_row(y[r], wr, has_w, increasing, sol[r], bs[r],
                          bstart, bref, bw, bd)


@njit(parallel=True, **_JIT)
def _isotonic_vjp_kernel(w, has_w, bs, g, res, chunks):
    rows = g.shape[0]
    for c in prange(chunks):
        r0 = c * rows // chunks
        r1 = (c + 1) * rows // chunks
        for r in range(r0, r1):
            wr = w[r] if has_w else w[0]
            _isotonic_vjp_row(wr, has_w, bs[r], g[r], res[r])


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
    """How many row chunks to hand to prange: a few per thread for balance."""
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


def isotonic_forward(y, weights, increasing):
    """Weighted l2 isotonic regression of every row of ``y`` by PAV.

    Solves ``argmin_v sum_i w_i (v_i - y_i)^2`` subject to ``v`` non-decreasing
    (``increasing=True``) or non-increasing.

    Parameters
    ----------
    y : numpy.ndarray, float32 or float64, shape (rows, n), C-contiguous
    weights : numpy.ndarray or None
        Positive weights, dtype and shape of ``y``; None for all ones.
    increasing : bool

    Returns
    -------
    solution : numpy.ndarray, dtype of ``y``
    block_start : numpy.ndarray, int32
        Start position of each position's block; -1 on a NaN/inf row.
    """
    y = _check_array(y, "y")
    w, has_w = _weights_or_placeholder(weights, y.dtype, y.shape)
    rows, n = y.shape
    sol = np.empty_like(y)
    block_start = np.empty((rows, n), np.int32)
    if rows and n:
        _isotonic_forward_kernel(y, w, has_w, bool(increasing), sol, block_start,
                                 _chunks(rows))
    return sol, block_start


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
    cotangent = _check_array(cotangent, "cotangent")
    shape = cotangent.shape
    block_start = _check_array(block_start, "block_start", _INT32, shape)
    w, has_w = _weights_or_placeholder(weights, cotangent.dtype, shape)
    rows, n = shape
    res = np.empty_like(cotangent)
    if rows and n:
        _isotonic_vjp_kernel(w, has_w, block_start, cotangent, res, _chunks(rows))
    return res


def set_num_threads(k):
    """Bound the threads of the parallel kernels to ``k`` (at most the pool size).

    Parameters
    ----------
    k : int
        >= 1. Values above numba's pool size (``NUMBA_NUM_THREADS``) are
        clipped, since numba refuses them.
    """
    k = int(k)
    if k < 1:
        raise ValueError(f"num_threads must be >= 1, got {k}")
    numba.set_num_threads(min(k, numba.config.NUMBA_NUM_THREADS))


def get_num_threads():
    """The number of threads the parallel kernels use."""
    return int(numba.get_num_threads())
