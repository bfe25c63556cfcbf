// Sorting a row by decreasing value, ties in increasing column order.
//
// Floats are mapped to unsigned keys whose integer order is the float order,
// then complemented so that an ascending integer sort yields decreasing
// values. Short rows are sorted by counting ranks (vectorised), long rows by
// a stable LSD radix sort that skips digits shared by every key; for float32
// the key and its column are packed into one uint64 so that each radix pass
// moves 8 bytes. The sorted values are decoded from the keys, which avoids a
// random-access gather of x.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace softrank {

// Rows up to this long are sorted by counting ranks (rank_sort.cpp), longer
// ones by LSD radix: 8-bit digits up to kWideDigitThreshold, 11-bit above,
// where fewer passes over memory beat smaller count tables.
constexpr index_t kRankSortMax = 160;
constexpr index_t kWideDigitThreshold = 1 << 16;
constexpr std::uint32_t kMaxRadixBuckets = 1u << 11;
constexpr int kMaxRadixPasses = 8;

// Stable ascending order of keys (ties by position) by counting, for each
// key, the keys that sort before it: O(n^2) compares but branch-free and
// vectorised (runtime-dispatched to AVX2/AVX-512 where present), so faster
// than any comparison sort for short rows. Writes order[rank] = position.
// n <= kRankSortMax.
void rank_sort(const std::uint32_t* keys, index_t n, index_t* order);
void rank_sort(const std::uint64_t* keys, index_t n, index_t* order);

// Float32 rows up to this long are sorted by a bitonic network in AVX-512
// registers where the CPU has AVX-512F (network_sort.cpp): items are
// key << 32 | column, sorted ascending in place. network_sort returns false,
// doing nothing, where it is not available or n > kNetworkSortMax.
constexpr index_t kNetworkSortMax = 128;
bool network_sort_available();
bool network_sort(std::uint64_t* items, index_t n);
// sort_row_descending's float32 path for 1 <= n <= kNetworkSortMax where
// network_sort_available(), keys built and decoded in registers too.
bool network_sort_row(const float* x, index_t n, bool negate, index_t* perm, double* xs);

inline std::uint32_t float_bits(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
inline std::uint64_t float_bits(double v) {
  std::uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

// Complemented order key: larger value -> smaller key.
inline std::uint32_t descending_key(float v) {
  const std::uint32_t u = float_bits(v);
  const std::uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ordered;
}
inline std::uint64_t descending_key(double v) {
  const std::uint64_t u = float_bits(v);
  const std::uint64_t sign = 0x8000000000000000ull;
  const std::uint64_t ordered = (u & sign) ? ~u : (u | sign);
  return ~ordered;
}
inline float value_of_key(std::uint32_t key) {
  const std::uint32_t ordered = ~key;
  const std::uint32_t u = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline double value_of_key(std::uint64_t key) {
  const std::uint64_t sign = 0x8000000000000000ull;
  const std::uint64_t ordered = ~key;
  const std::uint64_t u = (ordered & sign) ? (ordered & ~sign) : ~ordered;
  double v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline bool is_finite_bits(std::uint32_t u) { return (u & 0x7f800000u) != 0x7f800000u; }
inline bool is_finite_bits(std::uint64_t u) {
  return (u & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// A float64 key with its column: the index breaks ties.
struct KeyIndex64 {
  std::uint64_t key;
  std::uint32_t index;
};

inline std::uint64_t radix_key(std::uint64_t packed) { return packed; }
inline std::uint64_t radix_key(const KeyIndex64& item) { return item.key; }

// Stable LSD radix sort of items by radix_key bits [lo_bit, hi_bit). Input
// order must already be increasing in column for equal keys (it is: items
// are built in column order). Returns the buffer that holds the result
// (either `a` or `tmp`). `counts` has room for ceil((hi-lo)/11) * 2048 ints.
template <int kRadixBits, class Item>
inline Item* radix_sort(Item* a, Item* tmp, index_t n, int lo_bit, int hi_bit,
                        std::uint32_t* counts) {
  constexpr std::uint32_t kRadixBuckets = 1u << kRadixBits;
  const int passes = (hi_bit - lo_bit + kRadixBits - 1) / kRadixBits;
  std::memset(counts, 0, sizeof(std::uint32_t) * kRadixBuckets * passes);
  for (index_t i = 0; i < n; ++i) {
    const std::uint64_t k = radix_key(a[i]) >> lo_bit;
    for (int p = 0; p < passes; ++p) {
      ++counts[p * kRadixBuckets + ((k >> (p * kRadixBits)) & (kRadixBuckets - 1))];
    }
  }
  Item* src = a;
  Item* dst = tmp;
  for (int p = 0; p < passes; ++p) {
    std::uint32_t* count = counts + p * kRadixBuckets;
    const int shift = lo_bit + p * kRadixBits;
    // A digit that every key shares moves nothing: skip the pass.
    const std::uint32_t first_digit = (radix_key(src[0]) >> shift) & (kRadixBuckets - 1);
    if (count[first_digit] == static_cast<std::uint32_t>(n)) continue;
    std::uint32_t offset = 0;
    for (std::uint32_t b = 0; b < kRadixBuckets; ++b) {
      const std::uint32_t c = count[b];
      count[b] = offset;
      offset += c;
    }
    for (index_t i = 0; i < n; ++i) {
      const std::uint32_t digit = (radix_key(src[i]) >> shift) & (kRadixBuckets - 1);
      dst[count[digit]++] = src[i];
    }
    std::swap(src, dst);
  }
  return src;
}

// Scratch for one row of length <= capacity; owned by the caller.
struct SortScratch {
  std::uint64_t* packed32;   // n words (float32 path)
  std::uint64_t* packed32_tmp;
  KeyIndex64* keyed64;       // n items (float64 path)
  KeyIndex64* keyed64_tmp;
  std::uint32_t* keys32;     // n keys (short float32 rows)
  std::uint64_t* keys64;     // n keys (short float64 rows)
  std::uint32_t* counts;     // kMaxRadixPasses * 2048 counters
};

// Sort x' (= x or -x) decreasingly. Writes perm (column at each sorted
// position) and xs (the sorted x' in double). Returns false, writing
// nothing, when the row holds NaN or +-inf.
// Unpacks sorted key << 32 | column items into perm and the sorted values.
inline void unpack_sorted(const std::uint64_t* a, index_t n, index_t* perm, double* xs) {
  for (index_t i = 0; i < n; ++i) {
    perm[i] = static_cast<index_t>(static_cast<std::uint32_t>(a[i]));
    xs[i] = static_cast<double>(value_of_key(static_cast<std::uint32_t>(a[i] >> 32)));
  }
}

inline bool sort_row_descending(const float* x, index_t n, bool negate, SortScratch& s,
                                index_t* perm, double* xs) {
  std::uint32_t non_finite = 0;
  if (n <= kNetworkSortMax && n > 0 && network_sort_available())
    return network_sort_row(x, n, negate, perm, xs);
  std::uint32_t* keys = s.keys32;
  for (index_t i = 0; i < n; ++i) {
    // Adding +0.0f turns -0.0 into +0.0, so that both zeros share one key.
    const float v = (negate ? -x[i] : x[i]) + 0.0f;
    non_finite |= !is_finite_bits(float_bits(v));
    keys[i] = descending_key(v);
  }
  if (non_finite) return false;
  if (n <= kRankSortMax) {
    rank_sort(keys, n, perm);
    for (index_t i = 0; i < n; ++i) xs[i] = static_cast<double>(value_of_key(keys[perm[i]]));
    return true;
  }
  std::uint64_t* a = s.packed32;
  for (index_t i = 0; i < n; ++i)
    a[i] = (static_cast<std::uint64_t>(keys[i]) << 32) | static_cast<std::uint32_t>(i);
  a = n < kWideDigitThreshold ? radix_sort<8>(a, s.packed32_tmp, n, 32, 64, s.counts)
                              : radix_sort<11>(a, s.packed32_tmp, n, 32, 64, s.counts);
  unpack_sorted(a, n, perm, xs);
  return true;
}

inline bool sort_row_descending(const double* x, index_t n, bool negate, SortScratch& s,
                                index_t* perm, double* xs) {
  std::uint64_t* keys = s.keys64;
  std::uint64_t non_finite = 0;
  for (index_t i = 0; i < n; ++i) {
    const double v = (negate ? -x[i] : x[i]) + 0.0;
    non_finite |= !is_finite_bits(float_bits(v));
    keys[i] = descending_key(v);
  }
  if (non_finite) return false;
  if (n <= kRankSortMax) {
    rank_sort(keys, n, perm);
    for (index_t i = 0; i < n; ++i) xs[i] = value_of_key(keys[perm[i]]);
    return true;
  }
  KeyIndex64* a = s.keyed64;
  for (index_t i = 0; i < n; ++i) {
    a[i].key = keys[i];
    a[i].index = static_cast<std::uint32_t>(i);
  }
  a = n < kWideDigitThreshold ? radix_sort<8>(a, s.keyed64_tmp, n, 0, 64, s.counts)
                              : radix_sort<11>(a, s.keyed64_tmp, n, 0, 64, s.counts);
  for (index_t i = 0; i < n; ++i) {
    perm[i] = static_cast<index_t>(a[i].index);
    xs[i] = value_of_key(a[i].key);
  }
  return true;
}

}  // namespace softrank
