// Sorting a row by decreasing value, ties in increasing column order.
//
// Floats are mapped to unsigned keys whose integer order is the float order,
// then complemented so that an ascending integer sort yields decreasing
// values. Short rows are sorted by a network (network_sort.cpp) or by
// counting ranks (vectorised), long rows by a stable LSD radix sort that skips
// digits shared by every key; the key and its column are packed into one
// uint64 (float32 rows, and float64 rows below 2048 by their keys' top bits)
// so that each radix pass moves 8 bytes. The sorted values are decoded from the keys, which avoids a
// random-access gather of x.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "sort_keys.h"

namespace softrank {

// Rows up to this long are sorted by counting ranks (rank_sort.cpp), longer
// ones by LSD radix: 8-bit digits up to kWideDigitThreshold, 11-bit above,
// where fewer passes beat smaller count tables (from 2048 items on: 10-20%
// faster at 2500-30000 float32 than 8-bit digits, measured).
constexpr index_t kRankSortMax = 160;
constexpr index_t kWideDigitThreshold = 1 << 11;
constexpr std::uint32_t kMaxRadixBuckets = 1u << 11;
constexpr int kMaxRadixPasses = 8;

// Stable ascending order of keys (ties by position) by counting, for each
// key, the keys that sort before it: O(n^2) compares but branch-free and
// vectorised (runtime-dispatched to AVX2/AVX-512 where present), so faster
// than any comparison sort for short rows. Writes order[rank] = position.
// n <= kRankSortMax.
void rank_sort(const std::uint32_t* keys, index_t n, index_t* order);
void rank_sort(const std::uint64_t* keys, index_t n, index_t* order);

// Rows up to this long are sorted by a bitonic network in vector registers
// where simd_level() is AVX2 or AVX-512 (network_sort.cpp): items are uint64
// (float32: key << 32 | column; float64: the key's top 56 bits, column in the
// low 8), sorted ascending in place. network_sort returns false, doing
// nothing, where no network is available or n > kNetworkSortMax.
constexpr index_t kNetworkSortMax = 128;
bool network_sort_available();
bool network_sort(std::uint64_t* items, index_t n);
// sort_row_descending's path for 1 <= n <= kNetworkSortMax where
// network_sort_available(). Returns false for a row holding NaN or +-inf, and,
// touching nothing, where no network is available or n is out of its range.
bool network_sort_row(const float* x, index_t n, bool negate, index_t* perm, double* xs);
bool network_sort_row(const double* x, index_t n, bool negate, index_t* perm, double* xs);

// Rows of kSimdSortMin to kSimdSortMax items (float32), or to kSimdSortMax64
// (float64, whose packed items truncate the key), are sorted by the vendored
// x86-simd-sort's AVX2 quicksort of the packed uint64 items where
// simd_sort_available() (simd_sort.cpp): 2-3x faster than the LSD radix
// passes at a few hundred to a few thousand items (1000 float32: 7 vs 14 us
// a row, keys and unpacking included, measured), whose scatter waits on the
// latency of its counters. The packed items are unique, so any correct sort
// of them gives the one stable order. Beyond kSimdSortMax the float32 radix
// sort (3 passes) is as fast and stays; the float64 one (5 passes of 11 bits
// over 44 bits at 1e5) stays 10-20% slower up to 1e6, measured.
constexpr index_t kSimdSortMin = kNetworkSortMax + 1;
constexpr index_t kSimdSortMax = 1 << 15;
constexpr index_t kSimdSortMax64 = 1 << 20;
static_assert(kSimdSortMin <= kRankSortMax, "rows past the rank sort need packed scratch either way");
bool simd_sort_available();
// Sorts items[0, n) ascending; returns false, touching nothing, where the
// CPU (or the build) has no AVX2 quicksort.
bool simd_sort_u64(std::uint64_t* items, std::int64_t n);
// Sorts values[0, n) (finite, no -0) decreasingly; false, touching nothing,
// as simd_sort_u64.
bool simd_sort_f64_descending(double* values, std::int64_t n);
bool simd_sort_f32_descending(float* values, std::int64_t n);

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

// Rows from this long are sorted by bucket_sort_row where there are several
// threads: one scatter into buckets of tens to hundreds of items, then each
// bucket sorted in cache, every pass split over the threads (the whole-row
// LSD passes of radix_sort hardly gain from a second thread: each item's
// scatter misses the cache). On one thread the LSD radix sort is as fast or
// faster (normal data: 8 vs 14 ms at 1e6, measured), so it stays there.
constexpr index_t kBucketSortMin = 1 << 18;
constexpr int kBucketKeyBits = 11;  // key-bit buckets: 2^11 of them

// Items of a long row: the float32 key packed with its column (sorting the
// uint64 sorts by key, then column), or a float64 key with its column.
struct PackedItems32 {
  using Key = std::uint32_t;
  using Item = std::uint64_t;
  static constexpr int kKeyLowBit = 32;  // radix_key(item) holds the key from this bit
  static Item make(Key key, index_t i) {
    return (static_cast<std::uint64_t>(key) << 32) | static_cast<std::uint32_t>(i);
  }
  static Key key(Item item) { return static_cast<Key>(item >> 32); }
  static index_t column(Item item) { return static_cast<index_t>(static_cast<std::uint32_t>(item)); }
};
struct KeyedItems64 {
  using Key = std::uint64_t;
  using Item = KeyIndex64;
  static constexpr int kKeyLowBit = 0;
  static Item make(Key key, index_t i) { return Item{key, static_cast<std::uint32_t>(i)}; }
  static Key key(const Item& item) { return item.key; }
  static index_t column(const Item& item) { return static_cast<index_t>(item.index); }
};

template <class Key>
int bit_length(Key v) {
  int bits = 0;
  while (bits < static_cast<int>(8 * sizeof(Key)) && (v >> bits) != 0) ++bits;
  return bits;
}

// Stable sort of one bucket a[0, m) by key: a network (float32 items, whose
// uint64 order is the stable order) or insertion sort when short, else LSD
// radix over the key bits below those all its keys share (the bucket is in
// cache). `tmp` has room for m items, `counts` for kMaxRadixPasses * 2048.
// Returns the buffer holding the result.
template <class Items>
typename Items::Item* sort_bucket(typename Items::Item* a, typename Items::Item* tmp, index_t m,
                                  std::uint32_t* counts) {
  using Item = typename Items::Item;
  using Key = typename Items::Key;
  if (m <= 1) return a;
  if constexpr (sizeof(Item) == 8) {
    if (m <= kNetworkSortMax && network_sort(a, m)) return a;
  }
  Key lo = Items::key(a[0]), hi = lo;
  for (index_t i = 1; i < m; ++i) {
    const Key k = Items::key(a[i]);
    lo = k < lo ? k : lo;
    hi = k > hi ? k : hi;
  }
  if (lo == hi) return a;  // all tied: already in column order
  if (m <= 32) {
    for (index_t i = 1; i < m; ++i) {
      const Item v = a[i];
      const Key k = Items::key(v);
      index_t j = i;
      for (; j > 0 && Items::key(a[j - 1]) > k; --j) a[j] = a[j - 1];
      a[j] = v;
    }
    return a;
  }
  const int low = Items::kKeyLowBit, high = Items::kKeyLowBit + bit_length<Key>(lo ^ hi);
  return m < 2048 ? radix_sort<8>(a, tmp, m, low, high, counts)
                  : radix_sort<11>(a, tmp, m, low, high, counts);
}

// Sort x' (= x or -x) decreasingly, as sort_row_descending, for long rows.
// Passes: (1) the range of x' and its finiteness; (2) per-part histograms of
// the buckets; (3) a stable scatter of (key, column) items into the buckets;
// (4) each bucket sorted and unpacked into perm and xs. Buckets are equal
// slices of [min x', max x'] (any monotone map of x' to buckets gives the
// sorted order; this one gives buckets of equal size on evenly spread data).
// Where that leaves one bucket too full (skewed data) they are the leading
// key bits instead, which follow the exponent. Each pass runs as `ranges`
// (batched.cpp's ParallelRanges: parts() pieces over the threads) splits it;
// the result is the unique stable order either way. `a` and `tmp` hold n
// items each.
template <class Items, class T, class Ranges>
bool bucket_sort_row(const T* x, index_t n, bool negate, typename Items::Item* a,
                     typename Items::Item* tmp, index_t* perm, double* xs, const Ranges& ranges) {
  using Key = typename Items::Key;
  using Item = typename Items::Item;
  const int parts = ranges.parts();
  auto part_lo = [&](index_t t) {
    return static_cast<index_t>(static_cast<std::int64_t>(n) * t / parts);
  };
  // Adding +0 turns -0 into +0, so that both zeros share one key.
  auto value = [&](index_t i) { return (negate ? -x[i] : x[i]) + T(0); };
  std::vector<Key> part_min(parts), part_max(parts);
  std::vector<unsigned char> part_bad(parts);
  std::vector<double> part_sum(parts), part_sum_sq(parts);  // of v - x'[0], for the spread
  const double origin = static_cast<double>(value(0));
  ranges.tasks(parts, [&](index_t t) {
    Key lo_key = ~Key(0), hi_key = 0, bad = 0;
    double sum = 0.0, sum_sq = 0.0;
    for (index_t i = part_lo(t); i < part_lo(t + 1); ++i) {
      const T v = value(i);
      bad |= static_cast<Key>(!is_finite_bits(float_bits(v)));
      const Key k = descending_key(v);
      lo_key = k < lo_key ? k : lo_key;
      hi_key = k > hi_key ? k : hi_key;
      const double d = static_cast<double>(v) - origin;
      sum += d;
      sum_sq += d * d;
    }
    part_min[t] = lo_key;
    part_max[t] = hi_key;
    part_bad[t] = bad != 0;
    part_sum[t] = sum;
    part_sum_sq[t] = sum_sq;
  });
  Key kmin = ~Key(0), kmax = 0;
  double sum = 0.0, sum_sq = 0.0;
  for (int t = 0; t < parts; ++t) {
    if (part_bad[t]) return false;
    kmin = std::min(kmin, part_min[t]);
    kmax = std::max(kmax, part_max[t]);
    sum += part_sum[t];
    sum_sq += part_sum_sq[t];
  }
  // Value slices: bucket = floor((top - v) * scale), top = max x', clamped to
  // the last bucket; every step rounds monotonically, so the map is monotone.
  // About 64 float32 items a bucket (a register network sorts them), 256
  // float64 ones (a radix sort does), where the data are densest: a bell
  // shape's peak density is about 1 / (sd sqrt(2 pi)) against 1 / range on
  // average, so there are that many times more (at most 8): normal data, whose
  // range is ~10 sd, would otherwise fill the middle buckets 4 times over.
  // (Uniform data, peak / mean = range / (sd sqrt(2 pi)) = 1.38, get 1.)
  const double top = static_cast<double>(value_of_key(kmin));
  const double range = top - static_cast<double>(value_of_key(kmax));
  const double mean = sum / n, variance = sum_sq / n - mean * mean;
  const double peak = range / (std::sqrt(variance) * 2.5066282746310002) / 1.38;
  const double denser = std::isfinite(peak) && variance > 0.0 ? std::min(8.0, std::max(1.0, peak)) : 1.0;
  constexpr int kItemsPerBucketLog2 = sizeof(Item) == 8 ? 6 : 8;
  std::size_t buckets = static_cast<std::size_t>(std::min<double>(
      1 << 18, std::max<double>(1 << 8, denser * static_cast<double>(n >> kItemsPerBucketLog2))));
  const double scale = static_cast<double>(buckets) / range;
  const double last = static_cast<double>(buckets - 1);
  // Key bits: the kBucketKeyBits bits below those that all keys share.
  const int shift = std::max(0, bit_length<Key>(kmax ^ kmin) - kBucketKeyBits);
  const Key base = kmin >> shift;
  bool by_value = std::isfinite(scale);  // (false: all equal, or a range past DBL_MAX)
  auto bucket_of = [&](T v, Key k) {
    if (!by_value) return static_cast<std::size_t>((k >> shift) - base);
    const double slice = (top - static_cast<double>(v)) * scale;
    return static_cast<std::size_t>(slice < last ? slice : last);
  };
  std::vector<std::uint32_t> hist;
  auto histogram = [&] {
    if (!by_value) buckets = static_cast<std::size_t>((kmax >> shift) - base) + 1;
    hist.assign(static_cast<std::size_t>(parts) * buckets, 0u);
    ranges.tasks(parts, [&](index_t t) {
      std::uint32_t* h = hist.data() + static_cast<std::size_t>(t) * buckets;
      for (index_t i = part_lo(t); i < part_lo(t + 1); ++i) {
        const T v = value(i);
        ++h[bucket_of(v, descending_key(v))];
      }
    });
  };
  histogram();
  // Offsets in (bucket, part) order: part t's scatter lands exactly where a
  // serial stable pass would put it.
  std::vector<std::uint32_t> bucket_start;
  auto offsets = [&] {
    bucket_start.assign(buckets + 1, 0u);
    std::uint32_t offset = 0, largest = 0;
    for (std::size_t d = 0; d < buckets; ++d) {
      bucket_start[d] = offset;
      for (int t = 0; t < parts; ++t) {
        std::uint32_t& h = hist[static_cast<std::size_t>(t) * buckets + d];
        const std::uint32_t c = h;
        h = offset;
        offset += c;
      }
      largest = std::max(largest, offset - bucket_start[d]);
    }
    bucket_start[buckets] = offset;
    return largest;
  };
  const std::uint32_t largest = offsets();
  if (by_value && largest > 16 * (static_cast<std::uint32_t>(n) / buckets) + 4096) {
    by_value = false;  // skewed: slices of the value range would leave it to one bucket
    histogram();
    offsets();
  }
  ranges.tasks(parts, [&](index_t t) {
    std::uint32_t* h = hist.data() + static_cast<std::size_t>(t) * buckets;
    for (index_t i = part_lo(t); i < part_lo(t + 1); ++i) {
      const T v = value(i);
      const Key k = descending_key(v);
      tmp[h[bucket_of(v, k)]++] = Items::make(k, i);
    }
  });
  // Buckets in groups of about n / groups items (a bucket is never split),
  // each group a task that sorts and unpacks its buckets while in cache.
  const index_t groups = 4 * parts;
  std::vector<std::size_t> group_first(static_cast<std::size_t>(groups) + 1, buckets);
  for (std::size_t d = buckets; d-- > 0;) {
    const std::size_t g = static_cast<std::size_t>(static_cast<std::uint64_t>(bucket_start[d]) *
                                                   static_cast<std::uint64_t>(groups) /
                                                   static_cast<std::uint64_t>(n));
    group_first[std::min<std::size_t>(g, groups)] = d;
  }
  group_first[groups] = buckets;
  for (index_t g = groups; g-- > 0;) group_first[g] = std::min(group_first[g], group_first[g + 1]);
  ranges.tasks(groups, [&](index_t g) {
    std::vector<std::uint32_t> counts;  // the radix sort's, made when a bucket needs it
    for (std::size_t d = group_first[g]; d < group_first[g + 1]; ++d) {
      const index_t lo = static_cast<index_t>(bucket_start[d]);
      const index_t m = static_cast<index_t>(bucket_start[d + 1]) - lo;
      if (m > 32 && counts.empty())
        counts.resize(static_cast<std::size_t>(kMaxRadixPasses) * kMaxRadixBuckets);
      const Item* sorted = sort_bucket<Items>(tmp + lo, a + lo, m, counts.data());
      for (index_t i = 0; i < m; ++i) {
        perm[lo + i] = Items::column(sorted[i]);
        xs[lo + i] = static_cast<double>(value_of_key(Items::key(sorted[i])));
      }
    }
  });
  return true;
}

// Float64 rows sorted by truncated keys (the top bits over the column, as
// one uint64) leave perm in the order of (truncated key, column). This puts
// each run of equal truncated keys, items [first, last), in the order of
// (whole key, column): insertion sort for short runs, std::sort beyond, so
// that a long run (many values within 2^column_bits ulp of each other) costs
// O(m log m), not O(m^2).
inline void sort_run_by_whole_keys(const std::uint64_t* keys, index_t* perm, index_t first,
                                   index_t last) {
  if (last - first <= 16) {
    // Stable: a run's columns come in increasing order.
    for (index_t i = first + 1; i < last; ++i) {
      const index_t p = perm[i];
      const std::uint64_t k = keys[p];
      index_t j = i;
      for (; j > first && keys[perm[j - 1]] > k; --j) perm[j] = perm[j - 1];
      perm[j] = p;
    }
    return;
  }
  std::sort(perm + first, perm + last, [keys](index_t a, index_t b) {
    return keys[a] < keys[b] || (keys[a] == keys[b] && a < b);
  });
}

inline void sort_by_whole_keys(const std::uint64_t* items, index_t n, int column_bits,
                               const std::uint64_t* keys, index_t* perm) {
  for (index_t first = 0; first < n;) {
    index_t last = first + 1;
    while (last < n && ((items[last] ^ items[first]) >> column_bits) == 0) ++last;
    if (last - first > 1) sort_run_by_whole_keys(keys, perm, first, last);
    first = last;
  }
}

// The sorted items of a float64 row, each its truncated key over
// `column_bits` bits of column, unpacked: perm from the columns, put in whole-
// key order where neighbours share a truncated key, and the sorted values.
#if defined(__GNUC__) || defined(__clang__)
__attribute__((always_inline))
#endif
inline void unpack_truncated_items(const std::uint64_t* items, index_t n, int column_bits,
                                   const std::uint64_t* keys, index_t* perm, double* xs) {
  const std::uint64_t column_mask = (std::uint64_t{1} << column_bits) - 1;
  std::uint64_t tied = 0;
  perm[0] = static_cast<index_t>(items[0] & column_mask);
  for (index_t i = 1; i < n; ++i) {
    perm[i] = static_cast<index_t>(items[i] & column_mask);
    tied |= static_cast<std::uint64_t>(((items[i] ^ items[i - 1]) >> column_bits) == 0);
  }
  if (tied) sort_by_whole_keys(items, n, column_bits, keys, perm);
  for (index_t i = 0; i < n; ++i) xs[i] = value_of_key(keys[perm[i]]);
}

// Scratch for one row of length <= capacity; owned by the caller.
struct SortScratch {
  std::uint64_t* packed;     // n words: the packed items of every sorted row
  std::uint64_t* packed_tmp;
  KeyIndex64* keyed64;       // n items (float64 rows of the bucket sort)
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
  const bool simd = n >= kSimdSortMin && n <= kSimdSortMax && simd_sort_available();
  if (n <= kRankSortMax && !simd) {
    rank_sort(keys, n, perm);
    for (index_t i = 0; i < n; ++i) xs[i] = static_cast<double>(value_of_key(keys[perm[i]]));
    return true;
  }
  std::uint64_t* a = s.packed;
  for (index_t i = 0; i < n; ++i)
    a[i] = (static_cast<std::uint64_t>(keys[i]) << 32) | static_cast<std::uint32_t>(i);
  if (!(simd && simd_sort_u64(a, n)))
    a = n < kWideDigitThreshold ? radix_sort<8>(a, s.packed_tmp, n, 32, 64, s.counts)
                                : radix_sort<11>(a, s.packed_tmp, n, 32, 64, s.counts);
  unpack_sorted(a, n, perm, xs);
  return true;
}

inline bool sort_row_descending(const double* x, index_t n, bool negate, SortScratch& s,
                                index_t* perm, double* xs) {
  if (n <= kNetworkSortMax && n > 0 && network_sort_available())
    return network_sort_row(x, n, negate, perm, xs);
  std::uint64_t* keys = s.keys64;
  std::uint64_t non_finite = 0;
  for (index_t i = 0; i < n; ++i) {
    const double v = (negate ? -x[i] : x[i]) + 0.0;
    non_finite |= !is_finite_bits(float_bits(v));
    keys[i] = descending_key(v);
  }
  if (non_finite) return false;
  const bool simd = n >= kSimdSortMin && n <= kSimdSortMax64 && simd_sort_available();
  if (n <= kRankSortMax && !simd) {
    rank_sort(keys, n, perm);
    for (index_t i = 0; i < n; ++i) xs[i] = value_of_key(keys[perm[i]]);
    return true;
  }
  // Items of 8 bytes, as for float32: the key's top 64 - b bits over the
  // column's b = bit_length(n - 1) bits (the soft sort of (128, 1000) float64
  // rows ran 1.1-1.3x faster than with 16-byte KeyIndex64 items, and a row
  // of 1e5 1.5x, measured). Keys that agree in those bits (equal values, or
  // values within 2^b ulp) come out in column order; where the sorted items
  // show such a pair, sort_by_whole_keys puts them right.
  const int b = bit_length<std::uint32_t>(static_cast<std::uint32_t>(n - 1));
  const std::uint64_t column_mask = (std::uint64_t{1} << b) - 1;
  std::uint64_t* p = s.packed;
  for (index_t i = 0; i < n; ++i) p[i] = (keys[i] & ~column_mask) | static_cast<std::uint64_t>(i);
  if (!(simd && simd_sort_u64(p, n)))
    p = n < kWideDigitThreshold ? radix_sort<8>(p, s.packed_tmp, n, b, 64, s.counts)
                                : radix_sort<11>(p, s.packed_tmp, n, b, 64, s.counts);
  unpack_truncated_items(p, n, b, keys, perm, xs);
  return true;
}

// The values of x sorted decreasingly into xs, without their order (for a
// caller that needs no permutation: the projection's w in a value-only
// forward): the AVX2 quicksort of the values themselves, about twice as fast
// as sorting (key, column) items and unpacking them. The values are those
// sort_row_descending writes (x in double, -0 as +0), so the result is the
// same bit for bit. Returns false, with xs unspecified, where the row holds
// NaN or +-inf, n < kSimdSortMin or no such sort is available: the caller
// then sorts with the permutation.
// (float32 rows sort as float32, 8 to a vector register, then widen.)
template <class T>
bool sort_values_descending(const T* x, index_t n, double* xs) {
  if (n < kSimdSortMin || !simd_sort_available()) return false;
  std::uint64_t non_finite = 0;
  if constexpr (sizeof(T) == 4) {
    thread_local std::vector<float> values;
    if (values.size() < static_cast<std::size_t>(n)) values.resize(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) {
      const float v = x[i] + 0.0f;
      non_finite |= !is_finite_bits(float_bits(v));
      values[i] = v;
    }
    if (non_finite || !simd_sort_f32_descending(values.data(), n)) return false;
    for (index_t i = 0; i < n; ++i) xs[i] = static_cast<double>(values[i]);
    return true;
  } else {
    for (index_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(x[i]) + 0.0;
      non_finite |= !is_finite_bits(float_bits(v));
      xs[i] = v;
    }
    return !non_finite && simd_sort_f64_descending(xs, n);
  }
}

}  // namespace softrank
