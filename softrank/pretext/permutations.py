"""Permutations of patches: sampling, applying, inverting, and fixed Hamming sets.

Convention. A permutation of ``n`` patches is an int64 vector ``perm`` with
``shuffled[j] = patches[perm[j]]``: position ``j`` of the shuffled sequence holds
the original patch ``perm[j]``. Its inverse ``inv`` (``inv[perm[j]] = j``)
undoes the shuffle, ``patches[i] = shuffled[inv[i]]``, and the 1-based ranks
that put the shuffled patches back in order are ``perm + 1``
(:func:`ranks_that_unshuffle`): sorting the shuffled patches by these ranks,
ascending, restores the original sequence.

Nothing here enumerates the ``n!`` permutations: uniform sampling is an argsort
of i.i.d. uniforms, and the Hamming set is chosen greedily from a random
candidate pool when ``n!`` is large.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Tuple

import numpy as np
try:
    import torch
except ImportError as exc:
    raise ImportError("softrank.pretext needs PyTorch: pip install 'softrank[pretext]'") from exc
from softrank.pretext._checks import as_count

__all__ = [
    "random_permutations",
    "apply_permutations",
    "invert_permutations",
    "unshuffle",
    "ranks_that_unshuffle",
    "hamming_permutation_set",
    "min_pairwise_hamming",
    "mean_pairwise_hamming",
    "hamming_set_summary",
]


def random_permutations(
    batch_size: int,
    num_patches: int,
    *,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Permutations drawn independently and uniformly from all ``n!``.

    The argsort of i.i.d. uniform float64 keys is uniform over the symmetric
    group (ties have probability ~2^-53 per pair and only bias towards the
    stable order); O(n log n) per row, ``n!`` is never formed.

    Parameters
    ----------
    batch_size : int
    num_patches : int
        ``n >= 1``.
    generator : torch.Generator, optional
        Source of randomness; the same seed gives the same permutations.
    device : torch.device or str, optional

    Returns
    -------
    torch.Tensor, shape (batch_size, num_patches), int64

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> perms = random_permutations(2, 4, generator=g)
    >>> bool((perms.sort(dim=1).values == torch.arange(4)).all())
    True
    """
    batch_size = as_count(batch_size, "batch_size", minimum=0)
    num_patches = as_count(num_patches, "num_patches", minimum=1)
    keys = torch.rand(batch_size, num_patches, generator=generator, dtype=torch.float64)
    return keys.argsort(dim=1).to(device=device)


def _gather_patches(patches: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = patches[b, index[b, j]]`` for patches of any trailing shape."""
    if index.shape != patches.shape[:2]:
        raise ValueError(
            f"permutations of shape {tuple(index.shape)} do not match patches "
            f"(batch, n) = {tuple(patches.shape[:2])}"
        )
    batch = torch.arange(patches.shape[0], device=patches.device).unsqueeze(1)
    return patches[batch, index.to(patches.device)]


def apply_permutations(patches: torch.Tensor, permutations: torch.Tensor) -> torch.Tensor:
    """Shuffle every example's patches: ``shuffled[b, j] = patches[b, perm[b, j]]``.

    Parameters
    ----------
    patches : torch.Tensor, shape (B, n, *patch_shape), any dtype
    permutations : torch.Tensor, shape (B, n), int64

    Returns
    -------
    torch.Tensor, shape (B, n, *patch_shape), dtype of ``patches``
    """
    return _gather_patches(patches, permutations)


def invert_permutations(permutations: torch.Tensor) -> torch.Tensor:
    """The inverse permutations: ``inv[b, perm[b, j]] = j``.

    Parameters
    ----------
    permutations : torch.Tensor, shape (..., n), int64

    Returns
    -------
    torch.Tensor, shape (..., n), int64
    """
    return permutations.argsort(dim=-1)


def unshuffle(shuffled: torch.Tensor, permutations: torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_permutations`: ``unshuffle(apply(p, perm), perm) == p``.

    Parameters
    ----------
    shuffled : torch.Tensor, shape (B, n, *patch_shape)
    permutations : torch.Tensor, shape (B, n), int64
        The permutations that produced ``shuffled``.

    Returns
    -------
    torch.Tensor, shape (B, n, *patch_shape)
    """
    return _gather_patches(shuffled, invert_permutations(permutations))


def ranks_that_unshuffle(permutations: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 1-based ascending rank of each shuffled position in the original order.

    ``ranks[b, j] = perm[b, j] + 1``: the patch at shuffled position ``j`` came
    from original position ``perm[b, j]``. These are the targets of the reorder
    loss: a model that scores the shuffled patches with these ranks recovers
    the order (``argsort(ranks) == invert_permutations(perm)``).

    Parameters
    ----------
    permutations : torch.Tensor, shape (..., n), int64
    dtype : torch.dtype, default float32

    Returns
    -------
    torch.Tensor, shape (..., n), ``dtype``, values in 1..n
    """
    return (permutations + 1).to(dtype)


def _hamming_to_all(candidates: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """Number of positions where each candidate differs from ``permutation``."""
    return np.count_nonzero(candidates != permutation, axis=1)


def _factorial_capped(n: int, cap: int) -> int:
    """``min(n!, cap + 1)``: enough to compare ``n!`` with ``cap`` without forming a huge ``n!``."""
    total = 1
    for factor in range(2, n + 1):
        total *= factor
        if total > cap:
            return cap + 1
    return total


def _all_permutations(num_patches: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(num_patches))), dtype=np.int64).reshape(-1, num_patches)


def _first_occurrences(rows: np.ndarray) -> np.ndarray:
    """The distinct rows of ``rows``, each at its first occurrence, in their original order."""
    _, first = np.unique(rows, axis=0, return_index=True)
    return rows[np.sort(first)]


def _candidate_pool(
    num_patches: int, pool_size: int, num_permutations: int, rng: np.random.Generator
) -> np.ndarray:
    """All ``n!`` permutations when they fit in the pool, else at least ``K`` distinct random ones.

    ``pool_size`` uniform draws with the duplicates dropped: for ``n! >> pool_size``
    duplicates are rare and the pool is (almost) ``pool_size`` strong. When
    ``pool_size`` is close to ``n!`` many draws repeat, and fewer than ``K``
    distinct candidates may remain, so that the greedy choice would have to
    repeat one: fresh draws then top the pool up to ``K`` distinct permutations.
    (Only this case draws more, so every set that was already valid keeps its
    seeded value.) ``n! > pool_size >= K`` guarantees the top-up terminates.
    """
    if _factorial_capped(num_patches, pool_size) <= pool_size:
        return _all_permutations(num_patches)
    pool = _first_occurrences(np.argsort(rng.random((pool_size, num_patches)), axis=1))
    while len(pool) < num_permutations:
        fresh = np.argsort(rng.random((pool_size, num_patches)), axis=1)
        # The old rows come first, so they keep their place and only unseen ones are appended.
        pool = _first_occurrences(np.concatenate([pool, fresh]))[:num_permutations]
    return pool


# 16 GiB of int64 candidates (the pool's own size; drawing it takes a few times
# more at its peak): far past any K the greedy loop could finish.
_MAX_POOL_BYTES = 2**34

# The greedy loop compares every candidate with each of the K chosen ones: K * pool
# units of work. Measured on 2 slow cores (numpy, n = 9): about 30 ns a unit for
# large pools (K = 5000 and 7000 with their default pools of 20 K: 14 s and 30 s),
# up to 55 ns for small or cache-unfriendly ones, growing slowly with n (about 45 ns
# at n = 16, 96 ns at n = 64). 2e9 units is thus about a minute at the demo's n; a
# default pool reaches it at K = 10000, while K = 1e8 used to hang without a word.
_MAX_GREEDY_WORK = 2 * 10**9
_GREEDY_SECONDS_PER_UNIT = 30e-9  # (the measured rate, for the estimate in the message)


def _checked_pool_size(num_permutations: int, num_patches: int, pool_size: Optional[int]) -> int:
    """The candidate pool size for :func:`hamming_permutation_set`, refused past memory or time.

    ``num_permutations`` and ``num_patches`` are already checked counts with
    ``1 <= K <= n!``. Returns ``pool_size`` (default ``max(10000, 20 * K)``);
    raises ``ValueError`` naming the argument to change when the pool would
    take more than 16 GiB or the greedy selection more than about a minute.
    """
    if pool_size is None:
        pool_size = max(10_000, 20 * num_permutations)
    else:
        pool_size = as_count(pool_size, "pool_size")
        if pool_size < num_permutations:
            raise ValueError(f"pool_size={pool_size} must be >= num_permutations={num_permutations}")
    candidates = min(pool_size, _factorial_capped(num_patches, pool_size))  # the pool's length
    pool_bytes = candidates * num_patches * 8
    if pool_bytes > _MAX_POOL_BYTES:
        # (numpy's MemoryError, or swapping, said nothing of which argument to change)
        raise ValueError(
            f"a candidate pool of {pool_size} permutations of {num_patches} patches needs "
            f"{pool_bytes / 2**30:.0f} GiB (pool_size defaults to max(10000, 20 * num_permutations)); "
            f"ask for fewer permutations (num_permutations={num_permutations}) or a smaller pool_size"
        )
    work = num_permutations * candidates
    if work > _MAX_GREEDY_WORK:
        # (the loop gives no sign of progress: a K of 1e8 looked like a hang)
        minutes = work * _GREEDY_SECONDS_PER_UNIT / 60
        raise ValueError(
            f"choosing num_permutations={num_permutations} from a pool of {candidates} candidates "
            f"costs the greedy selection K * pool = {work:.1e} steps, about {minutes:.0f} min "
            f"(at most {_MAX_GREEDY_WORK:.0e}, about a minute, is allowed; pool_size defaults to "
            f"max(10000, 20 * num_permutations)); ask for fewer permutations or a smaller pool_size"
        )
    return pool_size


def hamming_permutation_set(
    num_permutations: int,
    num_patches: int,
    *,
    seed: int = 0,
    pool_size: Optional[int] = None,
) -> np.ndarray:
    """A fixed set of ``K`` permutations with maximal average Hamming distance.

    The greedy algorithm of Noroozi & Favaro (2016, Algorithm 1): start from a
    random permutation, then repeatedly add the candidate whose summed Hamming
    distance to the permutations chosen so far is largest (ties: the larger
    minimum distance to the chosen set, then the lower pool index). The
    candidates are all ``n!`` permutations when ``n! <= pool_size``, otherwise
    ``pool_size`` uniform random permutations with the duplicate draws dropped
    (topped up with fresh draws if fewer than ``K`` distinct ones remain), so
    ``n`` can be 16 or more without enumerating ``n!``. Cost O(K * pool_size * n).

    Parameters
    ----------
    num_permutations : int
        ``K``, between 1 and ``n!``.
    num_patches : int
        ``n >= 1``.
    seed : int, default 0
        The same seed gives the same set.
    pool_size : int, optional
        Candidate pool size, at least ``K``; default ``max(10000, 20 * K)``.

    Returns
    -------
    numpy.ndarray, shape (K, n), int64
        ``K`` distinct permutations, in the order they were chosen. Report their
        spread with :func:`min_pairwise_hamming` and :func:`mean_pairwise_hamming`.

    Raises
    ------
    TypeError
        If ``num_permutations``, ``num_patches`` or ``pool_size`` is not an integer.
    ValueError
        If ``n < 1``, ``K < 1``, ``K > n!`` or ``pool_size < K``, or the pool
        itself would take more than 16 GiB (``pool_size * n`` int64), or the
        greedy selection more than about a minute (``K`` times the pool's
        length above 2e9; with the default pool, ``K > 10000`` where ``n! >= 20 K``,
        as at 9 patches; at 8 or fewer, whose pools hold all ``n!`` permutations,
        no ``K <= n!`` reaches it).

    Examples
    --------
    >>> perms = hamming_permutation_set(10, 9, seed=0)
    >>> perms.shape, len({tuple(p) for p in perms})
    ((10, 9), 10)
    """
    num_permutations = as_count(num_permutations, "num_permutations")
    num_patches = as_count(num_patches, "num_patches")
    seed = as_count(seed, "seed", minimum=0)  # (None would draw a different set each call)
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
    if _factorial_capped(num_patches, num_permutations) < num_permutations:
        raise ValueError(
            f"num_permutations={num_permutations} exceeds the {math.factorial(num_patches)} "
            f"permutations of {num_patches} patches"
        )
    pool_size = _checked_pool_size(num_permutations, num_patches, pool_size)
    rng = np.random.default_rng(seed)
    pool = _candidate_pool(num_patches, pool_size, num_permutations, rng)
    available = np.ones(len(pool), dtype=bool)
    summed = np.zeros(len(pool), dtype=np.int64)
    nearest = np.full(len(pool), num_patches + 1, dtype=np.int64)
    chosen = [int(rng.integers(len(pool)))]
    while True:
        newest = pool[chosen[-1]]
        available[chosen[-1]] = False
        distances = _hamming_to_all(pool, newest)
        summed += distances
        np.minimum(nearest, distances, out=nearest)
        if len(chosen) == num_permutations:
            break
        # Lexicographic argmax of (summed, nearest) over the available candidates.
        # The pool holds at least K distinct permutations, so an available candidate
        # (score >= 0) always beats the -1 of the chosen ones.
        score = np.where(available, summed * (num_patches + 2) + nearest, -1)
        chosen.append(int(np.argmax(score)))
    return pool[chosen].copy()


def _pairwise_hamming(permutations: np.ndarray, name: str) -> np.ndarray:
    """The ``(K, K)`` Hamming distances between the rows of ``permutations`` (``K >= 2``)."""
    perms = np.asarray(permutations)
    if perms.ndim != 2:
        raise ValueError(f"{name} must have shape (K, n), got shape {perms.shape}")
    if len(perms) < 2:
        # No pair of distinct rows: neither a minimum nor a mean distance exists.
        raise ValueError(f"{name} must hold at least 2 permutations to have a pairwise distance, got {len(perms)}")
    return np.count_nonzero(perms[:, None, :] != perms[None, :, :], axis=2)


def min_pairwise_hamming(permutations: np.ndarray) -> int:
    """Smallest Hamming distance between two distinct rows of ``(K, n)`` permutations.

    Parameters
    ----------
    permutations : array_like, shape (K, n), K >= 2

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If ``permutations`` is not 2-D or has fewer than 2 rows (no pair exists).
    """
    distances = _pairwise_hamming(permutations, "permutations")
    off_diagonal = ~np.eye(len(distances), dtype=bool)
    return int(distances[off_diagonal].min())


def mean_pairwise_hamming(permutations: np.ndarray) -> float:
    """Average Hamming distance over the ordered pairs of distinct rows of ``(K, n)`` permutations.

    Parameters
    ----------
    permutations : array_like, shape (K, n), K >= 2

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If ``permutations`` is not 2-D or has fewer than 2 rows (no pair exists).
    """
    distances = _pairwise_hamming(permutations, "permutations")
    k = len(distances)
    return float(distances.sum() / (k * (k - 1)))


def hamming_set_summary(permutations: np.ndarray) -> Tuple[int, float]:
    """``(min, mean)`` pairwise Hamming distance of a permutation set (for reports).

    Raises ``ValueError`` for fewer than 2 permutations, like
    :func:`min_pairwise_hamming`.
    """
    return min_pairwise_hamming(permutations), mean_pairwise_hamming(permutations)
