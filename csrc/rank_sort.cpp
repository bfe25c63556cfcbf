// Counting-rank sort for short rows, compiled once per instruction set and
// picked at load time (simd_level()), so a portable wheel still uses AVX2 or
// AVX-512 where the CPU has them.
#include <type_traits>

#include "softrank/cpu_features.h"
#include "softrank/sort.h"

// The body must be inlined into each variant: a separate function would be
// compiled once, for the baseline instruction set, and the variants would
// only call it.
#if defined(__GNUC__) || defined(__clang__)
#define SOFTRANK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SOFTRANK_ALWAYS_INLINE inline
#endif

namespace softrank {
namespace {

// rank(i) = #{j : k_j < k_i} + #{j < i : k_j == k_i}: the position of
// (k_i, i) in the stable ascending order. Accumulated as an outer product:
// for each j, one fixed-length, branch-free pass over all i that the
// compiler turns into full-width vector compares. The keys are copied into a
// buffer padded to a multiple of 16 with the largest key (never the key of a
// finite value), so there is no scalar tail; counters have the key's width
// so that every vector lane lines up.
template <class Key>
SOFTRANK_ALWAYS_INLINE void rank_sort_impl(const Key* keys, index_t n, index_t* order) {
  using Count = typename std::conditional<sizeof(Key) == 8, std::int64_t, std::int32_t>::type;
  constexpr index_t kLanes = 16;
  alignas(64) Key padded[kRankSortMax + kLanes];
  alignas(64) Count rank[kRankSortMax + kLanes];
  const index_t padded_n = (n + kLanes - 1) / kLanes * kLanes;
  for (index_t i = 0; i < padded_n; ++i) {
    padded[i] = i < n ? keys[i] : ~Key(0);
    rank[i] = 0;
  }
  for (index_t j = 0; j < n; ++j) {
    const Key kj = padded[j];
    const Count jc = j;
    for (index_t i = 0; i < padded_n; ++i)
      rank[i] += static_cast<Count>((kj < padded[i]) | ((kj == padded[i]) & (jc < Count(i))));
  }
  for (index_t i = 0; i < n; ++i) order[rank[i]] = i;
}

template <class Key>
void rank_sort_baseline(const Key* keys, index_t n, index_t* order) {
  rank_sort_impl(keys, n, order);
}
#if defined(SOFTRANK_X86_DISPATCH)
template <class Key>
SOFTRANK_TARGET_AVX2 void rank_sort_avx2(const Key* keys, index_t n, index_t* order) {
  rank_sort_impl(keys, n, order);
}
template <class Key>
SOFTRANK_TARGET_AVX512 void rank_sort_avx512(const Key* keys, index_t n, index_t* order) {
  rank_sort_impl(keys, n, order);
}
#endif

template <class Key>
using RankSortKernel = void (*)(const Key*, index_t, index_t*);

template <class Key>
RankSortKernel<Key> pick_rank_sort() {
#if defined(SOFTRANK_X86_DISPATCH)
  switch (simd_level()) {
    case SimdLevel::Avx512: return rank_sort_avx512<Key>;
    case SimdLevel::Avx2: return rank_sort_avx2<Key>;
    default: break;
  }
#endif
  return rank_sort_baseline<Key>;
}

}  // namespace

void rank_sort(const std::uint32_t* keys, index_t n, index_t* order) {
  static const RankSortKernel<std::uint32_t> kernel = pick_rank_sort<std::uint32_t>();
  kernel(keys, n, order);
}

void rank_sort(const std::uint64_t* keys, index_t n, index_t* order) {
  static const RankSortKernel<std::uint64_t> kernel = pick_rank_sort<std::uint64_t>();
  kernel(keys, n, order);
}

}  // namespace softrank
