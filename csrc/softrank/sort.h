// Sorting a row by decreasing value, ties in increasing column order.
//
// Floats are mapped to unsigned keys whose integer order is the float order,
// then complemented so that an ascending integer sort yields decreasing
// values. A float32 key and its 32-bit column index are packed into one
// uint64 (key in the high half), so a plain ascending sort of the packed words
// is already the stable order we need. Short rows use insertion sort or
// std::sort, long rows an LSD radix sort over 11-bit digits that skips digits
// shared by every key. The sorted values are decoded from the keys, which
// avoids a random-access gather of x.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace softrank {

constexpr int kRadixBits = 11;
constexpr std::uint32_t kRadixBuckets = 1u << kRadixBits;
// Rows at least this long use the radix sort (measured crossover on x86-64).
constexpr index_t kRadixThreshold = 2048;
constexpr index_t kInsertionThreshold = 24;

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
inline bool operator<(const KeyIndex64& a, const KeyIndex64& b) {
  return a.key < b.key || (a.key == b.key && a.index < b.index);
}

inline std::uint64_t radix_key(std::uint64_t packed) { return packed; }
inline std::uint64_t radix_key(const KeyIndex64& item) { return item.key; }

template <class Item>
inline void insertion_sort(Item* a, index_t n) {
  for (index_t i = 1; i < n; ++i) {
    Item v = a[i];
    index_t j = i;
    while (j > 0 && v < a[j - 1]) {
      a[j] = a[j - 1];
      --j;
    }
    a[j] = v;
  }
}

// Stable LSD radix sort of items by radix_key bits [lo_bit, hi_bit). Input
// order must already be increasing in column for equal keys (it is: items
// are built in column order). Returns the buffer that holds the result
// (either `a` or `tmp`). `counts` has room for ceil((hi-lo)/11) * 2048 ints.
template <class Item>
inline Item* radix_sort(Item* a, Item* tmp, index_t n, int lo_bit, int hi_bit,
                        std::uint32_t* counts) {
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
  std::uint32_t* counts;     // 6 * 2048 counters
};

// Sort x' (= x or -x) decreasingly. Writes perm (column at each sorted
// position) and xs (the sorted x' in double). Returns false, writing
// nothing, when the row holds NaN or +-inf.
inline bool sort_row_descending(const float* x, index_t n, bool negate, SortScratch& s,
                                index_t* perm, double* xs) {
  std::uint64_t* a = s.packed32;
  std::uint32_t non_finite = 0;
  for (index_t i = 0; i < n; ++i) {
    // Adding +0.0f turns -0.0 into +0.0, so that both zeros share one key.
    const float v = (negate ? -x[i] : x[i]) + 0.0f;
    non_finite |= !is_finite_bits(float_bits(v));
    a[i] = (static_cast<std::uint64_t>(descending_key(v)) << 32) | static_cast<std::uint32_t>(i);
  }
  if (non_finite) return false;
  if (n <= kInsertionThreshold) {
    insertion_sort(a, n);
  } else if (n < kRadixThreshold) {
    std::sort(a, a + n);
  } else {
    a = radix_sort(a, s.packed32_tmp, n, 32, 64, s.counts);
  }
  for (index_t i = 0; i < n; ++i) {
    perm[i] = static_cast<index_t>(static_cast<std::uint32_t>(a[i]));
    xs[i] = static_cast<double>(value_of_key(static_cast<std::uint32_t>(a[i] >> 32)));
  }
  return true;
}

inline bool sort_row_descending(const double* x, index_t n, bool negate, SortScratch& s,
                                index_t* perm, double* xs) {
  KeyIndex64* a = s.keyed64;
  std::uint64_t non_finite = 0;
  for (index_t i = 0; i < n; ++i) {
    const double v = (negate ? -x[i] : x[i]) + 0.0;
    non_finite |= !is_finite_bits(float_bits(v));
    a[i].key = descending_key(v);
    a[i].index = static_cast<std::uint32_t>(i);
  }
  if (non_finite) return false;
  if (n <= kInsertionThreshold) {
    insertion_sort(a, n);
  } else if (n < kRadixThreshold) {
    std::sort(a, a + n);
  } else {
    a = radix_sort(a, s.keyed64_tmp, n, 0, 64, s.counts);
  }
  for (index_t i = 0; i < n; ++i) {
    perm[i] = static_cast<index_t>(a[i].index);
    xs[i] = value_of_key(a[i].key);
  }
  return true;
}

}  // namespace softrank
