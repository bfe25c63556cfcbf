// Sorting networks for short rows: each item is the row's order key packed
// with its column (float32: key << 32 | column; float64: the key's top bits
// over the column, see "Rows" below), so that one 64-bit integer order is the
// stable order of the row. AVX-512: up to kNetworkSortMax items in (at most
// 16) registers, sorted by a bitonic network of vector min/max and lane
// permutes: no branches, no memory traffic, about 4 cycles per item at n = 64
// where counting ranks cost ~13. AVX2: the same network on 4 items a
// register. Each is compiled for its instruction set and entered only where
// simd_level() allows it (SOFTRANK_DISABLE_AVX512 caps AVX-512 at the AVX2
// network); other CPUs keep the counting-rank sort.
#include "softrank/cpu_features.h"
#include "softrank/sort.h"

#if defined(SOFTRANK_X86_DISPATCH)
#define SOFTRANK_HAVE_NETWORK_SORT 1
#include <immintrin.h>
#endif

namespace softrank {

#if defined(SOFTRANK_HAVE_NETWORK_SORT)
namespace {

#define SOFTRANK_AVX512 __attribute__((target("avx512f"), always_inline)) inline
#ifndef SOFTRANK_NETWORK_COLUMNS
#define SOFTRANK_NETWORK_COLUMNS 1
#endif

// The network used everywhere below is the "flip" form of Batcher's bitonic
// sort, whose comparators all put the minimum at the lower index: for each
// run length k = 2, 4, ..., N, item i is compared with i ^ (k - 1) (the flip),
// then with i ^ j for j = k/4, ..., 1 (half-cleaners). Within a register of 8
// lanes a comparator layer with partner i ^ m is a permute, a min, a max and
// a blend; `mask` has a bit set for every lane that receives the maximum.
SOFTRANK_AVX512 __m512i layer(__m512i v, __m512i partner_index, __mmask8 max_lanes) {
  const __m512i partner = _mm512_permutexvar_epi64(partner_index, v);
  return _mm512_mask_blend_epi64(max_lanes, _mm512_min_epu64(v, partner),
                                 _mm512_max_epu64(v, partner));
}

SOFTRANK_AVX512 __m512i lanes_xor(int m) {
  return _mm512_set_epi64(7 ^ m, 6 ^ m, 5 ^ m, 4 ^ m, 3 ^ m, 2 ^ m, 1 ^ m, 0 ^ m);
}

// Half-cleaners j = 4, 2, 1 inside each register: the tail of every merge.
SOFTRANK_AVX512 __m512i clean_lanes(__m512i v) {
  v = layer(v, lanes_xor(4), 0xF0);
  v = layer(v, lanes_xor(2), 0xCC);
  return layer(v, lanes_xor(1), 0xAA);
}

// Sorts the 8 lanes of v ascending (k = 2, 4, 8 with their half-cleaners).
SOFTRANK_AVX512 __m512i sort_lanes(__m512i v) {
  v = layer(v, lanes_xor(1), 0xAA);
  v = layer(v, lanes_xor(3), 0xCC);
  v = layer(v, lanes_xor(1), 0xAA);
  v = layer(v, lanes_xor(7), 0xF0);
  v = layer(v, lanes_xor(2), 0xCC);
  return layer(v, lanes_xor(1), 0xAA);
}

// Sorts the columns of 8 registers (lane l of v[0..7] ascending) with the
// optimal 19-comparator network for 8 inputs: whole-register min/max, no
// permutes. Comparators whose upper register is padding are no-ops.
template <int used>
SOFTRANK_AVX512 void sort_columns8(__m512i* v) {
  constexpr int kPairs[19][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}, {0, 4}, {1, 5}, {2, 6},
                                 {3, 7}, {0, 1}, {2, 3}, {4, 5}, {6, 7}, {2, 4}, {3, 5},
                                 {1, 4}, {3, 6}, {1, 2}, {3, 4}, {5, 6}};
#pragma GCC unroll 19
  for (int c = 0; c < 19; ++c) {
    const int a = kPairs[c][0], b = kPairs[c][1];
    if (b >= used) continue;
    const __m512i lo = _mm512_min_epu64(v[a], v[b]);
    v[b] = _mm512_max_epu64(v[a], v[b]);
    v[a] = lo;
  }
}

// Transposes the 8 x 8 matrix of 64-bit items held in v[0..7].
SOFTRANK_AVX512 void transpose8(__m512i* v) {
  __m512i t[8], u[8];
#pragma GCC unroll 4
  for (int r = 0; r < 8; r += 2) {
    t[r] = _mm512_unpacklo_epi64(v[r], v[r + 1]);
    t[r + 1] = _mm512_unpackhi_epi64(v[r], v[r + 1]);
  }
  const __m512i pick_lo = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
  const __m512i pick_hi = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
#pragma GCC unroll 2
  for (int q = 0; q < 8; q += 4) {
    u[q] = _mm512_permutex2var_epi64(t[q], pick_lo, t[q + 2]);
    u[q + 1] = _mm512_permutex2var_epi64(t[q + 1], pick_lo, t[q + 3]);
    u[q + 2] = _mm512_permutex2var_epi64(t[q], pick_hi, t[q + 2]);
    u[q + 3] = _mm512_permutex2var_epi64(t[q + 1], pick_hi, t[q + 3]);
  }
  const __m512i half_lo = _mm512_set_epi64(11, 10, 9, 8, 3, 2, 1, 0);
  const __m512i half_hi = _mm512_set_epi64(15, 14, 13, 12, 7, 6, 5, 4);
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) {
    v[r] = _mm512_permutex2var_epi64(u[r], half_lo, u[r + 4]);
    v[r + 4] = _mm512_permutex2var_epi64(u[r], half_hi, u[r + 4]);
  }
}

// Sorts R registers where only the first `used` hold items: a register past
// them is all padding (the largest key), stays so through the network, and
// every comparator whose upper register is padding is a no-op, so skipping
// them costs a 100-item row 13 registers of work instead of 16.
template <int R, int used>
SOFTRANK_AVX512 void sort_registers_used(__m512i* v) {
  const __m512i reverse = lanes_xor(7);
  // Runs of 8 items: one register each. With 8 or more registers, sorting
  // the columns of each group of 8 and transposing costs fewer operations
  // than the in-register network (about 62 against 192 per group); but the
  // transpose spreads the padding over the group, so from then on every
  // register of a group that holds any item takes part. Measured (n = 50,
  // 64: 10-15% faster; n = 80, 100 with 11-13 of 16 registers used: slower;
  // n >= 113: faster), hence the rule.
  constexpr bool kColumns =
      SOFTRANK_NETWORK_COLUMNS && (R == 8 || (R == 16 && used >= 15));
  constexpr int active = kColumns ? (used + 7) / 8 * 8 : used;
  if constexpr (kColumns) {
    static_assert(R == 8 || R == 16, "groups of 8 registers");
    sort_columns8<(used < 8 ? used : 8)>(v);
    transpose8(v);
    if constexpr (used > 8) {
      sort_columns8<used - 8>(v + 8);
      transpose8(v + 8);
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      if (r < used) v[r] = sort_lanes(v[r]);
  }
#pragma GCC unroll 4
  for (int g = 2; g <= R; g *= 2) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const int q = r ^ (g - 1);
      if (q <= r || q >= active) continue;
      const __m512i b = _mm512_permutexvar_epi64(reverse, v[q]);
      const __m512i lo = _mm512_min_epu64(v[r], b);
      const __m512i hi = _mm512_max_epu64(v[r], b);
      v[r] = lo;
      v[q] = _mm512_permutexvar_epi64(reverse, hi);
    }
#pragma GCC unroll 4
    for (int h = g / 2; h >= 1; h /= 2) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        if ((r & h) || r + h >= active) continue;
        const __m512i lo = _mm512_min_epu64(v[r], v[r + h]);
        const __m512i hi = _mm512_max_epu64(v[r], v[r + h]);
        v[r] = lo;
        v[r + h] = hi;
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      if (r < active) v[r] = clean_lanes(v[r]);
  }
}

SOFTRANK_AVX512 __mmask8 valid_lanes(index_t n, int r) {
  const index_t left = n - 8 * r;
  return left >= 8 ? __mmask8(0xFF) : left <= 0 ? __mmask8(0) : __mmask8((1u << left) - 1);
}

// Loads n items (padded with the largest key, which sorts after every item
// of a finite row), sorts, stores the first n back.
template <int R>
__attribute__((target("avx512f"))) void sort_items(std::uint64_t* items, index_t n) {
  __m512i v[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    v[r] = _mm512_mask_loadu_epi64(_mm512_set1_epi64(-1), valid_lanes(n, r), items + 8 * r);
  sort_registers_used<R, R>(v);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_epi64(items + 8 * r, valid_lanes(n, r), v[r]);
}

// The whole float32 row path of sort_row_descending (sort.h) in registers:
// order keys of x' (= x or -x, -0 as +0) packed with their columns, the
// network, then perm and the decoded sorted values. Returns false where the
// row holds NaN or +-inf (perm and xs are then unspecified).
// R registers (a power of two), the first `used` = ceil(n / 8) holding items:
// both compile-time, so that the network is straight-line code over registers.
template <int R, int used>
__attribute__((target("avx512f"))) bool sort_row(const float* x, index_t n, bool negate,
                                                 index_t* perm, double* xs) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  const __m512i flip = negate ? sign : _mm512_setzero_si512();
  const __m512i lane_index = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  __mmask16 non_finite = 0;
  __m512i v[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (r >= used) {
      v[r] = _mm512_set1_epi64(-1);
      continue;
    }
    const __mmask8 valid = valid_lanes(n, r);
    const __m512 loaded = _mm512_maskz_loadu_ps(static_cast<__mmask16>(valid), x + 8 * r);
    // -x by its sign bit, then + 0.0f so that -0.0 and +0.0 share a key.
    const __m512 value = _mm512_add_ps(
        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(loaded), flip)),
        _mm512_setzero_ps());
    const __m512i bits = _mm512_castps_si512(value);
    non_finite |= _mm512_mask_cmpeq_epi32_mask(static_cast<__mmask16>(valid),
                                               _mm512_and_si512(bits, exponent), exponent);
    // descending_key: ~(u ^ (negative ? 0xffffffff : 0x80000000)).
    const __m512i ordered = _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31), sign));
    const __m512i key = _mm512_xor_si512(ordered, _mm512_set1_epi32(-1));
    const __m512i packed = _mm512_or_si512(
        _mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(key)), 32),
        _mm512_add_epi64(lane_index, _mm512_set1_epi64(8 * r)));
    v[r] = _mm512_mask_mov_epi64(_mm512_set1_epi64(-1), valid, packed);
  }
  if (non_finite) return false;
  sort_registers_used<R, used>(v);
  const __m512i low_sign = _mm512_set1_epi64(0x80000000ll);
  const __m512i low_ones = _mm512_set1_epi64(0xffffffffll);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (r >= used) continue;
    const __mmask8 valid = valid_lanes(n, r);
    _mm512_mask_cvtepi64_storeu_epi32(perm + 8 * r, valid, v[r]);
    // value_of_key: ordered = ~key; u = ordered ^ (ordered < 0 ? 0x80000000 : 0xffffffff).
    const __m512i ordered = _mm512_xor_si512(_mm512_srli_epi64(v[r], 32), low_ones);
    const __mmask8 negative_order = _mm512_test_epi64_mask(ordered, low_sign);
    const __m512i u = _mm512_mask_xor_epi64(_mm512_xor_si512(ordered, low_ones), negative_order,
                                            ordered, low_sign);
    const __m256 value = _mm256_castsi256_ps(_mm512_cvtepi64_epi32(u));
    _mm512_mask_storeu_pd(xs + 8 * r, valid, _mm512_cvtps_pd(value));
  }
  return true;
}

// --- AVX2: the same network on 4 items a register ---------------------------
//
// AVX2 has no 64-bit integer min/max, only a signed compare, so a comparator
// on integers is a compare and two blends (items enter with their top bit
// flipped: unsigned order = signed order of the flipped values). The row
// paths instead encode their items as positive normal doubles (bit 61 set,
// bit 62 clear: exponents in [-511, 0], never zero, subnormal, inf or NaN),
// whose order is the order of their bit patterns, and compare them with one
// min and one max. Two lane types share the network below.
#define SOFTRANK_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

// Any 64-bit items, compared unsigned.
struct IntLanes {
  using V = __m256i;
  // (Blends by the sign bit of each 64-bit lane: GCC compiles the byte blend
  // on a compare result as the blend plus a redundant byte compare.)
  static SOFTRANK_AVX2 V blend(V a, V b, V take_b) {
    return _mm256_castpd_si256(_mm256_blendv_pd(_mm256_castsi256_pd(a), _mm256_castsi256_pd(b),
                                                _mm256_castsi256_pd(take_b)));
  }
  static SOFTRANK_AVX2 void compare_exchange(V& a, V& b) {
    const V greater = _mm256_cmpgt_epi64(a, b);
    const V lo = blend(a, b, greater);
    b = blend(b, a, greater);
    a = lo;
  }
  // Lane i against lane i ^ m (m = 1, 2, 3); `max_lanes` has a bit set for
  // every lane that receives the maximum. A min lane takes its partner where
  // it is greater, a max lane where it is not.
  template <int m, int max_lanes>
  static SOFTRANK_AVX2 V layer(V v) {
    const V partner = m == 1   ? _mm256_shuffle_epi32(v, 0x4E)
                      : m == 2 ? _mm256_permute4x64_epi64(v, 0x4E)
                               : _mm256_permute4x64_epi64(v, 0x1B);
    const V lanes = _mm256_set_epi64x(max_lanes & 8 ? -1 : 0, max_lanes & 4 ? -1 : 0,
                                      max_lanes & 2 ? -1 : 0, max_lanes & 1 ? -1 : 0);
    return blend(v, partner, _mm256_xor_si256(_mm256_cmpgt_epi64(v, partner), lanes));
  }
  static SOFTRANK_AVX2 V reverse(V v) { return _mm256_permute4x64_epi64(v, 0x1B); }
  static SOFTRANK_AVX2 void transpose(V* v) {
    const V t0 = _mm256_unpacklo_epi64(v[0], v[1]), t1 = _mm256_unpackhi_epi64(v[0], v[1]);
    const V t2 = _mm256_unpacklo_epi64(v[2], v[3]), t3 = _mm256_unpackhi_epi64(v[2], v[3]);
    v[0] = _mm256_permute2x128_si256(t0, t2, 0x20);
    v[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
    v[2] = _mm256_permute2x128_si256(t0, t2, 0x31);
    v[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
  }
  static SOFTRANK_AVX2 V flip() {
    return _mm256_set1_epi64x(static_cast<long long>(0x8000000000000000ull));
  }
  static SOFTRANK_AVX2 V padding() { return _mm256_set1_epi64x(0x7fffffffffffffffll); }
  static SOFTRANK_AVX2 V load(const std::uint64_t* p, V valid) {
    const V loaded = _mm256_maskload_epi64(reinterpret_cast<const long long*>(p), valid);
    return blend(padding(), _mm256_xor_si256(loaded, flip()), valid);
  }
  static SOFTRANK_AVX2 void store(std::uint64_t* p, V valid, V v) {
    _mm256_maskstore_epi64(reinterpret_cast<long long*>(p), valid, _mm256_xor_si256(v, flip()));
  }
  static SOFTRANK_AVX2 V load_all(const std::uint64_t* p) {
    return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), flip());
  }
  static SOFTRANK_AVX2 void store_all(std::uint64_t* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_xor_si256(v, flip()));
  }
};

// Items 2^61 <= item < 2^62 (positive normal doubles), compared as doubles.
struct DoubleLanes {
  using V = __m256d;
  static SOFTRANK_AVX2 void compare_exchange(V& a, V& b) {
    const V lo = _mm256_min_pd(a, b);
    b = _mm256_max_pd(a, b);
    a = lo;
  }
  template <int m, int max_lanes>
  static SOFTRANK_AVX2 V layer(V v) {
    const V partner = m == 1   ? _mm256_permute_pd(v, 0x5)
                      : m == 2 ? _mm256_permute4x64_pd(v, 0x4E)
                               : _mm256_permute4x64_pd(v, 0x1B);
    return _mm256_blend_pd(_mm256_min_pd(v, partner), _mm256_max_pd(v, partner), max_lanes);
  }
  static SOFTRANK_AVX2 V reverse(V v) { return _mm256_permute4x64_pd(v, 0x1B); }
  static SOFTRANK_AVX2 void transpose(V* v) {
    const V t0 = _mm256_unpacklo_pd(v[0], v[1]), t1 = _mm256_unpackhi_pd(v[0], v[1]);
    const V t2 = _mm256_unpacklo_pd(v[2], v[3]), t3 = _mm256_unpackhi_pd(v[2], v[3]);
    v[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
    v[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
    v[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
    v[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
  }
  static SOFTRANK_AVX2 V padding() { return _mm256_set1_pd(2.0); }  // above every item
  static SOFTRANK_AVX2 V load(const std::uint64_t* p, __m256i valid) {
    const V loaded = _mm256_maskload_pd(reinterpret_cast<const double*>(p), valid);
    return _mm256_blendv_pd(padding(), loaded, _mm256_castsi256_pd(valid));
  }
  static SOFTRANK_AVX2 void store(std::uint64_t* p, __m256i valid, V v) {
    _mm256_maskstore_pd(reinterpret_cast<double*>(p), valid, v);
  }
  static SOFTRANK_AVX2 V load_all(const std::uint64_t* p) {
    return _mm256_loadu_pd(reinterpret_cast<const double*>(p));
  }
  static SOFTRANK_AVX2 void store_all(std::uint64_t* p, V v) {
    _mm256_storeu_pd(reinterpret_cast<double*>(p), v);
  }
  static constexpr std::uint64_t kPaddingBits = 0x4000000000000000ull;  // 2.0
};

// Sorts the 4 lanes of v ascending (k = 2, 4 with the half-cleaner).
template <class L>
SOFTRANK_AVX2 typename L::V sort_lanes4(typename L::V v) {
  v = L::template layer<1, 0xA>(v);
  v = L::template layer<3, 0xC>(v);
  return L::template layer<1, 0xA>(v);
}

// Sorts R registers (a power of two) where only the first `used` (a multiple
// of 4 where R >= 4) hold items; the others are padding, as in
// sort_registers_used. Runs of 4: with 4 or more registers, the columns of
// each group of 4 are sorted by the optimal 5-comparator network (whole
// registers, no permutes) and the group transposed, fewer operations than
// the in-register network.
template <class L, int R, int used>
SOFTRANK_AVX2 void sort_registers4(typename L::V* v) {
  if constexpr (R >= 4) {
#pragma GCC unroll 8
    for (int g = 0; g < used; g += 4) {
      L::compare_exchange(v[g], v[g + 1]);
      L::compare_exchange(v[g + 2], v[g + 3]);
      L::compare_exchange(v[g], v[g + 2]);
      L::compare_exchange(v[g + 1], v[g + 3]);
      L::compare_exchange(v[g + 1], v[g + 2]);
      L::transpose(v + g);
    }
  } else {
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) v[r] = sort_lanes4<L>(v[r]);
  }
#pragma GCC unroll 8
  for (int g = 2; g <= R; g *= 2) {
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const int q = r ^ (g - 1);
      if (q <= r || q >= used) continue;
      typename L::V b = L::reverse(v[q]);
      L::compare_exchange(v[r], b);
      v[q] = L::reverse(b);
    }
#pragma GCC unroll 8
    for (int h = g / 2; h >= 1; h /= 2) {
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) {
        if ((r & h) || r + h >= used) continue;
        L::compare_exchange(v[r], v[r + h]);
      }
    }
    // Half-cleaners j = 2, 1 inside each register: the tail of every merge.
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
      if (r < used) v[r] = L::template layer<1, 0xA>(L::template layer<2, 0xC>(v[r]));
  }
}

SOFTRANK_AVX2 __m256i valid_lanes4(index_t n, int r) {
  const index_t left = n - 4 * r;
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0);
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(left), lane);
}

// Loads n items (padding after them), sorts, stores the first n back. With
// `padded`, items holds network_padded_length(n) items, the caller's padding
// after the first n: whole registers are loaded and stored, without AVX2's
// masked moves (a masked store is microcoded on some CPUs).
template <class L, int R, int used, bool padded>
__attribute__((target("avx2,fma"))) void sort_items4(std::uint64_t* items, index_t n) {
  typename L::V v[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
    if (r >= used)
      v[r] = L::padding();
    else if constexpr (padded)
      v[r] = L::load_all(items + 4 * r);
    else
      v[r] = L::load(items + 4 * r, valid_lanes4(n, r));
  }
  sort_registers4<L, R, used>(v);
#pragma GCC unroll 32
  for (int r = 0; r < used; ++r) {
    if constexpr (padded)
      L::store_all(items + 4 * r, v[r]);
    else
      L::store(items + 4 * r, valid_lanes4(n, r), v[r]);
  }
}

// The register counts by n.
template <class L, bool padded = false>
__attribute__((target("avx2,fma"))) void network_sort_avx2(std::uint64_t* items, index_t n) {
  if (n <= 4) {
    sort_items4<L, 1, 1, padded>(items, n);
  } else if (n <= 8) {
    sort_items4<L, 2, 2, padded>(items, n);
  } else if (n <= 16) {
    sort_items4<L, 4, 4, padded>(items, n);
  } else if (n <= 32) {
    sort_items4<L, 8, 8, padded>(items, n);
  } else if (n <= 48) {
    sort_items4<L, 16, 12, padded>(items, n);
  } else if (n <= 64) {
    sort_items4<L, 16, 16, padded>(items, n);
  } else if (n <= 80) {
    sort_items4<L, 32, 20, padded>(items, n);
  } else if (n <= 96) {
    sort_items4<L, 32, 24, padded>(items, n);
  } else if (n <= 112) {
    sort_items4<L, 32, 28, padded>(items, n);
  } else {
    sort_items4<L, 32, 32, padded>(items, n);
  }
}
// The items the padded network reads: n rounded up to its registers (4 items
// each; a multiple of 4 registers from 3 on).
constexpr index_t network_padded_length(index_t n) {
  return n <= 8 ? (n + 3) / 4 * 4 : (n + 15) / 16 * 16;
}

__attribute__((target("avx512f"))) void network_sort_avx512(std::uint64_t* items, index_t n) {
  if (n <= 8) {
    sort_items<1>(items, n);
  } else if (n <= 16) {
    sort_items<2>(items, n);
  } else if (n <= 32) {
    sort_items<4>(items, n);
  } else if (n <= 64) {
    sort_items<8>(items, n);
  } else {
    sort_items<16>(items, n);
  }
}

// --- Rows -------------------------------------------------------------------
//
// An item is tag | key bits << 8 | column (n <= 256). Float32: the whole key,
// tag 2^61 (AVX2's double lanes). Float64: the key's top 56 bits, tag 0
// (AVX-512), or its top 53, tag 2^61 (AVX2); keys that agree in those bits
// (equal values, or values within 2^11 ulp) are then in column order, and
// where the sorted items show such a pair an insertion sort by the whole
// key, stable, puts them right (it moves nothing but those runs: exact ties,
// the common case, move nothing at all).
constexpr int kColumnBits = 8;
constexpr std::uint64_t kColumnMask = (1u << kColumnBits) - 1;
constexpr std::uint64_t kDoubleTag = 1ull << 61;
static_assert(kNetworkSortMax <= (1 << kColumnBits), "columns fit below the key bits");

using ItemSort = void (*)(std::uint64_t*, index_t);

// The body of the row functions below, inlined into each instruction set's
// variant (a plain function would be compiled for the baseline only).
#define SOFTRANK_ROW_BODY inline __attribute__((always_inline))

SOFTRANK_ROW_BODY bool float_row_by_items(const float* x, index_t n, bool negate, index_t* perm,
                                          double* xs, ItemSort sort) {
  alignas(64) std::uint64_t items[kNetworkSortMax];
  std::uint32_t non_finite = 0;
  for (index_t i = 0; i < n; ++i) {
    // + 0.0f turns -0.0 into +0.0, so that both zeros share one key.
    const float v = (negate ? -x[i] : x[i]) + 0.0f;
    non_finite |= !is_finite_bits(float_bits(v));
    items[i] = kDoubleTag | static_cast<std::uint64_t>(descending_key(v)) << kColumnBits |
               static_cast<std::uint64_t>(i);
  }
  if (non_finite) return false;
  for (index_t i = n; i < network_padded_length(n); ++i) items[i] = DoubleLanes::kPaddingBits;
  sort(items, n);
  for (index_t i = 0; i < n; ++i) {
    perm[i] = static_cast<index_t>(items[i] & kColumnMask);
    xs[i] = static_cast<double>(value_of_key(static_cast<std::uint32_t>(items[i] >> kColumnBits)));
  }
  return true;
}

template <int kKeyShift, std::uint64_t kTag>
SOFTRANK_ROW_BODY bool double_row_by_items(const double* x, index_t n, bool negate,
                                           index_t* perm, double* xs, ItemSort sort) {
  alignas(64) std::uint64_t keys[kNetworkSortMax], items[kNetworkSortMax];
  std::uint64_t non_finite = 0;
  for (index_t i = 0; i < n; ++i) {
    const double v = (negate ? -x[i] : x[i]) + 0.0;
    non_finite |= !is_finite_bits(float_bits(v));
    keys[i] = descending_key(v);
    items[i] = kTag | (keys[i] >> kKeyShift) << kColumnBits | static_cast<std::uint64_t>(i);
  }
  if (non_finite) return false;
  if (kTag == kDoubleTag)  // (the AVX2 network, padded)
    for (index_t i = n; i < network_padded_length(n); ++i) items[i] = DoubleLanes::kPaddingBits;
  sort(items, n);
  unpack_truncated_items(items, n, kColumnBits, keys, perm, xs);
  return true;
}

__attribute__((target("avx2,fma"))) bool float_row_avx2(const float* x, index_t n, bool negate,
                                                        index_t* perm, double* xs) {
  return float_row_by_items(x, n, negate, perm, xs, network_sort_avx2<DoubleLanes, true>);
}
__attribute__((target("avx2,fma"))) bool double_row_avx2(const double* x, index_t n,
                                                         bool negate, index_t* perm, double* xs) {
  return double_row_by_items<11, kDoubleTag>(x, n, negate, perm, xs,
                                             network_sort_avx2<DoubleLanes, true>);
}
__attribute__((target("avx512f"))) bool double_row_avx512(const double* x, index_t n,
                                                          bool negate, index_t* perm, double* xs) {
  return double_row_by_items<8, 0>(x, n, negate, perm, xs, network_sort_avx512);
}

bool float_row_avx512(const float* x, index_t n, bool negate, index_t* perm, double* xs) {
  switch ((n + 7) / 8) {
    case 1: return sort_row<1, 1>(x, n, negate, perm, xs);
    case 2: return sort_row<2, 2>(x, n, negate, perm, xs);
    case 3: return sort_row<4, 3>(x, n, negate, perm, xs);
    case 4: return sort_row<4, 4>(x, n, negate, perm, xs);
    case 5: return sort_row<8, 5>(x, n, negate, perm, xs);
    case 6: return sort_row<8, 6>(x, n, negate, perm, xs);
    case 7: return sort_row<8, 7>(x, n, negate, perm, xs);
    case 8: return sort_row<8, 8>(x, n, negate, perm, xs);
    case 9: return sort_row<16, 9>(x, n, negate, perm, xs);
    case 10: return sort_row<16, 10>(x, n, negate, perm, xs);
    case 11: return sort_row<16, 11>(x, n, negate, perm, xs);
    case 12: return sort_row<16, 12>(x, n, negate, perm, xs);
    case 13: return sort_row<16, 13>(x, n, negate, perm, xs);
    case 14: return sort_row<16, 14>(x, n, negate, perm, xs);
    case 15: return sort_row<16, 15>(x, n, negate, perm, xs);
    default: return sort_row<16, 16>(x, n, negate, perm, xs);
  }
}

}  // namespace

bool network_sort_available() {
  static const bool available = simd_level() >= SimdLevel::Avx2;
  return available;
}

bool network_sort(std::uint64_t* items, index_t n) {
  if (!network_sort_available() || n > kNetworkSortMax) return false;
  if (simd_level() == SimdLevel::Avx512)
    network_sort_avx512(items, n);
  else
    network_sort_avx2<IntLanes>(items, n);
  return true;
}

bool network_sort_row(const float* x, index_t n, bool negate, index_t* perm, double* xs) {
  if (!network_sort_available() || n < 1 || n > kNetworkSortMax) return false;
  return simd_level() == SimdLevel::Avx512 ? float_row_avx512(x, n, negate, perm, xs)
                                           : float_row_avx2(x, n, negate, perm, xs);
}

bool network_sort_row(const double* x, index_t n, bool negate, index_t* perm, double* xs) {
  if (!network_sort_available() || n < 1 || n > kNetworkSortMax) return false;
  return simd_level() == SimdLevel::Avx512 ? double_row_avx512(x, n, negate, perm, xs)
                                           : double_row_avx2(x, n, negate, perm, xs);
}

#else

bool network_sort_row(const float*, index_t, bool, index_t*, double*) { return false; }
bool network_sort_row(const double*, index_t, bool, index_t*, double*) { return false; }
bool network_sort_available() { return false; }
bool network_sort(std::uint64_t*, index_t) { return false; }

#endif

}  // namespace softrank
