"""softrank.pretext.permutations: sampling, apply/invert identities, Hamming sets."""
from __future__ import annotations

import importlib
import itertools
import math
import os

import numpy as np
import pytest


def _require(module: str):
    """Import ``module``; skip when it is missing, except under CI where it must be there."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


torch = _require("torch")
from softrank.pretext import permutations as perm  # noqa: E402


def _is_permutation(rows: np.ndarray) -> bool:
    n = rows.shape[-1]
    return bool((np.sort(rows, axis=-1) == np.arange(n)).all())


def test_random_permutations_are_permutations_and_seeded():
    a = perm.random_permutations(50, 16, generator=torch.Generator().manual_seed(3))
    b = perm.random_permutations(50, 16, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.int64 and a.shape == (50, 16)
    assert torch.equal(a, b)
    assert _is_permutation(a.numpy())


def test_random_permutations_are_uniform_over_all_orders():
    # 3! = 6 orders, 12000 draws: each count is 2000 +- 41 (1 sigma); 5 sigma bounds.
    draws = perm.random_permutations(12000, 3, generator=torch.Generator().manual_seed(0)).numpy()
    codes = draws[:, 0] * 9 + draws[:, 1] * 3 + draws[:, 2]
    _, counts = np.unique(codes, return_counts=True)
    assert len(counts) == 6
    assert np.all(np.abs(counts - 2000) < 5 * math.sqrt(12000 * (1 / 6) * (5 / 6)))


def test_random_permutations_large_n_without_enumeration():
    rows = perm.random_permutations(4, 1000, generator=torch.Generator().manual_seed(0))
    assert _is_permutation(rows.numpy())


def test_apply_then_unshuffle_is_identity():
    g = torch.Generator().manual_seed(1)
    patches = torch.randn(6, 9, 2, 3, 3, generator=g)
    permutations = perm.random_permutations(6, 9, generator=g)
    shuffled = perm.apply_permutations(patches, permutations)
    for b in range(6):
        for j in range(9):
            assert torch.equal(shuffled[b, j], patches[b, permutations[b, j]])
    assert torch.equal(perm.unshuffle(shuffled, permutations), patches)
    inverse = perm.invert_permutations(permutations)
    assert torch.equal(perm.apply_permutations(shuffled, inverse), patches)
    assert torch.equal(perm.invert_permutations(inverse), permutations)
    identity = torch.arange(9).expand(6, 9)
    assert torch.equal(permutations.gather(1, inverse), identity)


def test_ranks_that_unshuffle_sort_the_shuffled_patches_back():
    g = torch.Generator().manual_seed(2)
    patches = torch.randn(5, 7, 4, generator=g)
    permutations = perm.random_permutations(5, 7, generator=g)
    shuffled = perm.apply_permutations(patches, permutations)
    ranks = perm.ranks_that_unshuffle(permutations)
    assert ranks.dtype == torch.float32
    assert ranks.min() == 1 and ranks.max() == 7
    order = ranks.argsort(dim=1)
    assert torch.equal(perm.apply_permutations(shuffled, order), patches)


def test_apply_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        perm.apply_permutations(torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.int64))


@pytest.mark.parametrize("k, n", [(100, 9), (30, 16), (24, 4), (10, 20), (2, 2)])
def test_hamming_set_is_distinct_seeded_and_spread(k, n):
    chosen = perm.hamming_permutation_set(k, n, seed=7, pool_size=2000)
    assert chosen.shape == (k, n) and chosen.dtype == np.int64
    assert _is_permutation(chosen)
    assert len({tuple(row) for row in chosen}) == k
    np.testing.assert_array_equal(chosen, perm.hamming_permutation_set(k, n, seed=7, pool_size=2000))
    assert not np.array_equal(chosen, perm.hamming_permutation_set(k, n, seed=8, pool_size=2000)) or k == math.factorial(n)
    minimum, mean = perm.hamming_set_summary(chosen)
    assert minimum == perm.min_pairwise_hamming(chosen) >= 1
    assert minimum <= mean <= n


def test_hamming_set_beats_random_sets_on_average_distance():
    chosen = perm.hamming_permutation_set(100, 9, seed=0)
    random_set = np.argsort(np.random.default_rng(0).random((100, 9)), axis=1)
    assert perm.mean_pairwise_hamming(chosen) > perm.mean_pairwise_hamming(random_set)
    assert perm.min_pairwise_hamming(chosen) >= 3  # a random set of 100 has pairs at distance 2


def test_hamming_set_min_distance_is_reported_correctly():
    rows = np.array([[0, 1, 2, 3], [1, 0, 2, 3], [3, 2, 1, 0]])
    assert perm.min_pairwise_hamming(rows) == 2
    assert perm.mean_pairwise_hamming(rows) == pytest.approx((2 + 4 + 4) / 3)


def test_hamming_set_for_n_16_does_not_enumerate():
    chosen = perm.hamming_permutation_set(1000, 16, seed=0, pool_size=20000)
    assert len({tuple(row) for row in chosen}) == 1000
    assert perm.min_pairwise_hamming(chosen) >= 6


def test_hamming_set_rejects_impossible_requests():
    with pytest.raises(ValueError):
        perm.hamming_permutation_set(7, 3)
    with pytest.raises(ValueError):
        perm.hamming_permutation_set(0, 3)
    with pytest.raises(ValueError):
        perm.hamming_permutation_set(10, 9, pool_size=5)


def test_hamming_set_refuses_a_pool_past_memory_by_name():
    # The default pool of 20 K candidates: 2e10 rows of 25 (MemoryError before).
    with pytest.raises(ValueError, match=r"3725 GiB.*num_permutations=1000000000"):
        perm.hamming_permutation_set(10**9, 25)
    with pytest.raises(ValueError, match="pool_size"):
        perm.hamming_permutation_set(10, 25, pool_size=10**9)
    # Where n! is below the pool, the pool is the n! permutations: no refusal.
    assert perm.hamming_permutation_set(3, 3, pool_size=10**12).shape == (3, 3)


@pytest.mark.parametrize("k, n, pool_size", [(100, 5, 100), (50, 6, 60), (119, 5, 119), (120, 5, 120), (30, 4, 24)])
def test_hamming_set_is_distinct_even_from_a_small_pool(k, n, pool_size):
    # pool_size close to n!: many random draws repeat, and before the fix the greedy step
    # re-picked pool index 0 once the distinct candidates ran out (69 distinct rows of 100).
    if k > math.factorial(n):
        with pytest.raises(ValueError, match="exceeds"):
            perm.hamming_permutation_set(k, n, pool_size=pool_size)
        return
    for seed in range(5):
        chosen = perm.hamming_permutation_set(k, n, seed=seed, pool_size=pool_size)
        assert chosen.shape == (k, n) and _is_permutation(chosen)
        assert len({tuple(row) for row in chosen}) == k, seed
        assert perm.min_pairwise_hamming(chosen) >= 2  # distinct permutations differ in >= 2 places


def test_hamming_set_greedy_steps_are_maximal_over_all_permutations():
    # Independent reference (Noroozi & Favaro, Algorithm 1) when the pool is all n! = 24:
    # every chosen permutation after the first maximises the summed distance to those before it.
    chosen = perm.hamming_permutation_set(12, 4, seed=3)
    every = np.array(list(itertools.permutations(range(4))))
    for k in range(1, len(chosen)):
        seen = {tuple(row) for row in chosen[:k]}
        summed = [sum(int(np.sum(p != c)) for c in chosen[:k]) for p in every if tuple(p) not in seen]
        assert sum(int(np.sum(chosen[k] != c)) for c in chosen[:k]) == max(summed), k


def test_hamming_set_accepts_numpy_integers_and_refuses_other_types():
    expected = perm.hamming_permutation_set(10, 5, seed=1, pool_size=50)
    np.testing.assert_array_equal(
        perm.hamming_permutation_set(np.int64(10), np.int32(5), seed=1, pool_size=np.int64(50)), expected
    )
    for kwargs, name in [
        (dict(num_permutations=2.5, num_patches=4), "num_permutations"),
        (dict(num_permutations=True, num_patches=4), "num_permutations"),
        (dict(num_permutations=3, num_patches=4.0), "num_patches"),
        (dict(num_permutations=3, num_patches=4, pool_size=100.0), "pool_size"),
    ]:
        with pytest.raises(TypeError, match=name):
            perm.hamming_permutation_set(**kwargs)


def test_hamming_set_refuses_k_above_n_factorial_at_the_boundary():
    assert len(perm.hamming_permutation_set(720, 6)) == 720
    with pytest.raises(ValueError, match="num_permutations=721 exceeds the 720 permutations of 6 patches"):
        perm.hamming_permutation_set(721, 6)
    with pytest.raises(ValueError, match="num_patches"):
        perm.hamming_permutation_set(1, 0)
    with pytest.raises(ValueError, match="pool_size"):
        perm.hamming_permutation_set(10, 9, pool_size=9)


@pytest.mark.parametrize("rows", [np.array([[0, 1, 2]]), np.zeros((0, 3), dtype=np.int64)])
def test_pairwise_hamming_needs_a_pair(rows):
    # One permutation has no pair: no minimum or mean exists, so refuse rather than
    # return NaN (mean) or fail inside numpy's reduction (min).
    for function in (perm.min_pairwise_hamming, perm.mean_pairwise_hamming, perm.hamming_set_summary):
        with pytest.raises(ValueError, match="at least 2 permutations"):
            function(rows)


def test_pairwise_hamming_refuses_a_non_matrix_and_is_exact_for_two_rows():
    with pytest.raises(ValueError, match=r"shape \(K, n\)"):
        perm.min_pairwise_hamming(np.arange(4))
    rows = np.array([[0, 1, 2, 3], [1, 0, 3, 2]])
    assert perm.hamming_set_summary(rows) == (4, 4.0)


def test_counts_and_seeds_are_checked_by_name():
    """batch_size was never checked (-1, 2.5 and True reached torch.rand's own
    errors), a float num_patches passed the < 1 check, a negative seed reached
    numpy's error and seed=None drew a different 'seeded' set on every call."""
    for bad, error in ((-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="batch_size"):
            perm.random_permutations(bad, 3)
    with pytest.raises(TypeError, match="num_patches"):
        perm.random_permutations(2, 2.5)
    assert perm.random_permutations(0, 3).shape == (0, 3)
    for bad, error in ((-1, ValueError), (None, TypeError), (1.5, TypeError)):
        with pytest.raises(error, match="seed"):
            perm.hamming_permutation_set(3, 3, seed=bad)


def test_hamming_set_refuses_a_greedy_selection_past_a_minute_by_name():
    # K * pool steps at about 30 ns each: K = 9! = 362880 of 9 patches (the pool is
    # all 9!) is 1.3e11 steps, an hour with no sign of progress; refused at once.
    assert perm._checked_pool_size(10_000, 12, None) == 200_000  # 2e9 steps: the most accepted
    with pytest.raises(ValueError, match=r"num_permutations=10001 from a pool of 200020 candidates .* 2\.0e\+09 steps"):
        perm._checked_pool_size(10_001, 12, None)
    with pytest.raises(ValueError, match=r"num_permutations=362880 .* K \* pool = 1\.3e\+11 steps, about 66 min"):
        perm.hamming_permutation_set(362_880, 9)
    with pytest.raises(ValueError, match="or a smaller pool_size"):
        perm.hamming_permutation_set(2001, 12, pool_size=10**6)
    # The pool is n! where that is smaller: K = 8! = 40320 of 8 patches is 1.6e9 steps, accepted.
    assert perm._checked_pool_size(40_320, 8, None) == 806_400
    # The memory guard still answers first for a pool past 16 GiB.
    with pytest.raises(ValueError, match="GiB"):
        perm.hamming_permutation_set(10**8, 12)
