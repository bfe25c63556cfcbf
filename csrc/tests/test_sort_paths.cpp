// The sorting paths: the network (n <= 128, AVX-512 or AVX2 where the CPU
// has it), the AVX2 quicksort of x86-simd-sort (129 to 2^15 float32 items, to
// 2^20 float64 ones, where the CPU has AVX2), counting ranks (n <= 160), 8-bit
// radix (n < 2048), 11-bit radix (longer; from 2^18 the bucket sort,
// test_long_rows.cpp), for float32 and float64, against std::stable_sort;
// the quicksort and the radix sorts on packed items against std::sort;
// soft outputs across the thresholds against the optimality certificate;
// permutation equivariance.
#include <chrono>
#include <cstdlib>
#include <string>

#include "helpers.h"
#include "softrank/cpu_features.h"
#include "softrank/sort.h"

using namespace th;

namespace {

const int kLengths[] = {0,   1,   2,   3,   7,   8,   9,   15,   16,    17,    63,    64,
                        65,  100, 127, 128, 129, 150, 155, 159,  160,   161,   162,   165,
                        170, 255, 256, 2000, 2047, 2048, 2049, 32768, 32769, 65536, 70000};

// Rows that stress the key mapping: ties, signed zeros, subnormals, the
// extremes of the type, negative values.
template <class T>
std::vector<T> stress_row(Rng& rng, int n, int kind) {
  const T big = std::numeric_limits<T>::max();
  const T tiny = std::numeric_limits<T>::denorm_min();
  std::vector<T> x(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    switch (kind) {
      case 0: x[i] = static_cast<T>(rng.normal()); break;
      case 1: x[i] = static_cast<T>(rng.integer(-2, 2)); break;
      case 2: x[i] = rng.integer(0, 1) ? T(0.0) : T(-0.0); break;
      case 3: x[i] = static_cast<T>(rng.integer(-3, 3)) * tiny; break;
      case 4: {
        const T pool[] = {big, -big, T(0), T(-1e-30), T(1e-30), tiny, -tiny, T(1), T(-1)};
        x[i] = pool[rng.integer(0, 8)];
        break;
      }
      default: x[i] = static_cast<T>(rng.uniform(-1e6, 1e6)); break;
    }
  }
  return x;
}

}  // namespace

static std::vector<double> near_tie_row(Rng& rng, int n);

template <class T>
static void check_sort_paths() {
  Rng rng(21 + sizeof(T));
  for (int n : kLengths)
    for (int kind = 0; kind < 7; ++kind)
      for (const OpSpec& s : all_specs(0.0)) {
        if (s.reg == Reg::KL) continue;  // the order does not depend on reg
        // (kind 6: float64 rows sort by truncated keys, then fix near ties)
        const std::vector<T> x =
            kind < 6 ? stress_row<T>(rng, n, kind) : cast<T>(near_tie_row(rng, n));
        const bool negate = softrank::negates_input(s);
        const std::vector<index_t> ref = reference_perm(x, negate);
        const Forward<T> f = forward(x, 1, n, s);
        const std::string ctx = describe(s) + " n=" + std::to_string(n) + " kind=" +
                                std::to_string(kind) + (sizeof(T) == 4 ? " f32" : " f64");
        bool perm_ok = true;
        for (int i = 0; i < n; ++i) perm_ok = perm_ok && f.perm[i] == ref[i];
        CHECK(perm_ok) << ctx << "perm differs from std::stable_sort";
        if (s.op == Op::Sort) {
          bool ok = true;
          for (int i = 0; i < n; ++i) {
            const T v = x[ref[i]];
            ok = ok && f.out[i] == v;  // the sorted values (both directions)
          }
          CHECK(ok) << ctx << "hard sort values";
        } else {
          // Hard ranks from the reference order: runs of equal x' share
          // their mean rank n - (s + e - 1) / 2.
          bool ok = true;
          for (int a = 0; a < n;) {
            int e = a + 1;
            while (e < n && x[ref[e]] == x[ref[a]]) ++e;
            const double r = n - 0.5 * (a + e - 1);
            for (int i = a; i < e; ++i) ok = ok && f.out[ref[i]] == static_cast<T>(r);
            a = e;
          }
          CHECK(ok) << ctx << "hard ranks";
        }
      }
}

TEST(sort_paths, float64_orders_match_stable_sort) { check_sort_paths<double>(); }
TEST(sort_paths, float32_orders_match_stable_sort) { check_sort_paths<float>(); }

TEST(sort_paths, rank_sort_direct) {
  Rng rng(23);
  for (int n = 0; n <= softrank::kRankSortMax; ++n)
    for (int kind = 0; kind < 3; ++kind) {
      std::vector<std::uint32_t> k32(n);
      std::vector<std::uint64_t> k64(n);
      for (int i = 0; i < n; ++i) {
        const std::uint64_t r = rng.gen();
        // Many ties, the extreme keys (the padding key ~0 included).
        k64[i] = kind == 0 ? r : kind == 1 ? r % 4 : (r % 2 ? ~0ull : 0ull);
        k32[i] = kind == 0 ? static_cast<std::uint32_t>(r) : kind == 1 ? r % 4 : (r % 2 ? ~0u : 0u);
      }
      std::vector<index_t> o32(n + 1, -1), o64(n + 1, -1), r32(n), r64(n);
      softrank::rank_sort(k32.data(), n, o32.data());
      softrank::rank_sort(k64.data(), n, o64.data());
      std::iota(r32.begin(), r32.end(), 0);
      std::iota(r64.begin(), r64.end(), 0);
      std::stable_sort(r32.begin(), r32.end(), [&](index_t a, index_t b) { return k32[a] < k32[b]; });
      std::stable_sort(r64.begin(), r64.end(), [&](index_t a, index_t b) { return k64[a] < k64[b]; });
      bool ok = o32[n] == -1 && o64[n] == -1;  // nothing written past n
      for (int i = 0; i < n; ++i) ok = ok && o32[i] == r32[i] && o64[i] == r64[i];
      CHECK(ok) << "rank_sort n=" << n << "kind" << kind;
    }
}

// The sorts of packed uint64 items (whole rows take one or the other by CPU
// and length, so each is called here directly, whatever the CPU): the AVX2
// quicksort where available, 8- and 11-bit LSD radix over the bits that
// differ, against std::sort. Items are unique (a key over its column).
TEST(sort_paths, packed_item_sorts_direct) {
  Rng rng(27);
  const bool simd = softrank::simd_sort_available();
#if defined(SOFTRANK_X86_DISPATCH)
  CHECK(simd == (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                 __builtin_cpu_supports("popcnt")))
      << "simd sort availability";
#endif
  for (int n : {0, 1, 2, 3, 5, 16, 17, 100, 129, 500, 1000, 2047, 4096, 33000})
    for (int kind = 0; kind < 5; ++kind) {
      const int column_bits = 17;
      std::vector<std::uint64_t> items(static_cast<std::size_t>(n));
      for (int i = 0; i < n; ++i) {
        const std::uint64_t r = rng.gen();
        // Random keys, many ties, two extreme keys, keys sharing their top
        // 40 bits (skipped digits), sorted input and reversed input.
        const std::uint64_t key = kind == 0   ? r >> column_bits
                                  : kind == 1 ? r % 5
                                  : kind == 2 ? (r % 2 ? ~0ull >> column_bits : 0)
                                  : kind == 3 ? (0x2b5ull << 30) | (r >> 50)
                                              : static_cast<std::uint64_t>(n - i);
        items[i] = key << column_bits | static_cast<std::uint64_t>(i);
      }
      std::vector<std::uint64_t> want = items;
      std::sort(want.begin(), want.end());
      const std::string ctx = "n=" + std::to_string(n) + " kind=" + std::to_string(kind);
      if (simd) {
        std::vector<std::uint64_t> got = items;
        CHECK(softrank::simd_sort_u64(got.data(), n)) << ctx << "simd sort ran";
        CHECK(got == want) << ctx << "simd sort";
      } else {
        std::vector<std::uint64_t> got = items;
        CHECK(!softrank::simd_sort_u64(got.data(), n) && got == items) << ctx << "no simd sort";
      }
      std::vector<std::uint32_t> counts(softrank::kMaxRadixPasses * softrank::kMaxRadixBuckets);
      for (int wide = 0; wide < 2; ++wide) {
        std::vector<std::uint64_t> a = items, tmp(static_cast<std::size_t>(n));
        const std::uint64_t* got =
            n == 0 ? a.data()
            : wide ? softrank::radix_sort<11>(a.data(), tmp.data(), n, column_bits, 64, counts.data())
                   : softrank::radix_sort<8>(a.data(), tmp.data(), n, column_bits, 64, counts.data());
        CHECK(std::equal(want.begin(), want.end(), got)) << ctx << "radix sort, wide " << wide;
      }
    }
}

// Float64 rows whose values agree in all but their last few bits: the
// network sorts float64 keys without their low 8 bits, and such values need
// the fix-up by whole keys. Both signs, shuffled, with exact ties among them.
static std::vector<double> near_tie_row(Rng& rng, int n) {
  const double base = rng.integer(0, 1) ? 1.0 : -3.5;
  std::vector<double> x(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    double v = base * (rng.integer(0, 1) ? 1.0 : -1.0);
    for (int k = rng.integer(0, 300); k > 0; --k) v = std::nextafter(v, 10.0);
    x[i] = v;
  }
  return x;
}

// Every register count of the network (AVX-512: 1..16 registers of 8 items;
// AVX2: 1..32 of 4; a partial last register), with ties and the extreme
// items, against std::sort; and the whole float32 and float64 row paths
// (keys, network, decode, the float64 fix-up) against std::stable_sort.
TEST(sort_paths, network_sort_direct) {
  Rng rng(26);
#if defined(SOFTRANK_X86_DISPATCH)  // (else the core has only its baseline code)
  const char* disable = std::getenv("SOFTRANK_DISABLE_AVX512");
  const bool disabled = disable != nullptr && disable[0] != '\0' && std::string(disable) != "0";
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  CHECK(softrank::network_sort_available() == avx2)
      << "network sort availability";
  CHECK(std::string(softrank::simd_level_name(softrank::simd_level())) ==
        (__builtin_cpu_supports("avx512f") && !disabled ? "avx512"
         : avx2                                          ? "avx2"
                                                         : "baseline"))
      << "simd level";
#endif
  for (int n = 0; n <= softrank::kNetworkSortMax + 1; ++n)
    for (int kind = 0; kind < 5; ++kind) {
      std::vector<std::uint64_t> items(n + 1);
      for (int i = 0; i < n; ++i) {
        const std::uint64_t r = rng.gen();
        const std::uint64_t key = kind == 0 ? r >> 32 : kind == 1 ? r % 4 : (r % 2 ? 0xffffffffu : 0u);
        items[i] = key << 32 | static_cast<std::uint32_t>(i);
        // Whole 64-bit items (AVX2 compares them signed after flipping the
        // top bit): any bits, and items around that flip.
        if (kind == 3) items[i] = r;
        if (kind == 4) {
          const std::uint64_t pool[] = {0ull, 1ull, ~0ull, ~0ull - 1, 1ull << 63, (1ull << 63) - 1,
                                        (1ull << 63) + 1};
          items[i] = pool[r % 7];
        }
      }
      items[n] = 12345;  // must not be touched
      std::vector<std::uint64_t> ref(items.begin(), items.begin() + n);
      std::sort(ref.begin(), ref.end());
      const bool ran = softrank::network_sort(items.data(), n);
      CHECK(ran == (softrank::network_sort_available() && n <= softrank::kNetworkSortMax))
          << "network_sort ran n=" << n;
      if (!ran) continue;
      bool ok = items[n] == 12345;
      for (int i = 0; i < n; ++i) ok = ok && items[i] == ref[i];
      CHECK(ok) << "network_sort n=" << n << " kind=" << kind;
    }
  auto check_rows = [&](auto zero) {
    using T = decltype(zero);
    for (int n = 1; n <= softrank::kNetworkSortMax; ++n)
      for (int kind = 0; kind < 7; ++kind)
        for (bool negate : {false, true}) {
          std::vector<T> x;
          if (kind < 6)
            x = stress_row<T>(rng, n, kind);
          else
            x = cast<T>(near_tie_row(rng, n));
          const std::vector<index_t> ref = reference_perm(x, negate);
          std::vector<index_t> perm(n + 1, -7);
          std::vector<double> xs(n + 1, -7.0);
          const std::string ctx = std::string(sizeof(T) == 4 ? "f32" : "f64") +
                                  " n=" + std::to_string(n) + " kind=" + std::to_string(kind) +
                                  " negate=" + std::to_string(negate);
          if (!softrank::network_sort_row(x.data(), n, negate, perm.data(), xs.data())) {
            CHECK(!softrank::network_sort_available()) << "finite row refused " << ctx;
            continue;
          }
          bool ok = perm[n] == -7 && xs[n] == -7.0;
          for (int i = 0; i < n; ++i) {
            // (+ 0: the sorted value of -0.0 is +0.0, bit for bit.)
            const T v = (negate ? -x[ref[i]] : x[ref[i]]) + T(0);
            ok = ok && perm[i] == ref[i] && softrank::float_bits(xs[i]) == softrank::float_bits(static_cast<double>(v));
          }
          CHECK(ok) << "network_sort_row " << ctx;
          // One non-finite entry anywhere makes the row refused.
          std::vector<T> bad = x;
          const T specials[] = {std::numeric_limits<T>::infinity(),
                                -std::numeric_limits<T>::infinity(),
                                std::numeric_limits<T>::quiet_NaN()};
          bad[rng.integer(0, n - 1)] = specials[rng.integer(0, 2)];
          CHECK(!softrank::network_sort_row(bad.data(), n, negate, perm.data(), xs.data()))
              << "non-finite row accepted " << ctx;
        }
  };
  check_rows(0.0f);
  check_rows(0.0);
  // Out of range: nothing touched.
  std::vector<double> x(softrank::kNetworkSortMax + 1, 1.0);
  std::vector<index_t> perm(x.size(), -7);
  std::vector<double> xs(x.size(), -7.0);
  CHECK(!softrank::network_sort_row(x.data(), softrank::kNetworkSortMax + 1, false, perm.data(),
                                    xs.data()) &&
        perm[0] == -7 && xs[0] == -7.0)
      << "row longer than the network";
}

TEST(sort_paths, soft_outputs_across_thresholds_are_optimal) {
  Rng rng(24);
  for (int n : {150, 159, 160, 161, 170, 2000, 65535, 65536, 65537, 70000})
    for (double eps : {0.01, 1.0, 300.0})
      for (const OpSpec& s : all_specs(eps)) {
        if (n > 2000 && !(eps == 1.0)) continue;  // keep the long rows few
        const int kind = n % 4;
        const std::vector<double> x = random_row(rng, n, kind, 2.0);
        const Forward<double> f = forward(x, 1, n, s);
        const Certificate c = certify(x, f.out, s);
        const std::string ctx = describe(s) + " n=" + std::to_string(n);
        // Long rows: the prefix sums carry n roundings (and valgrind runs
        // long double as double), so the bound grows with n.
        const double tol = 1e-13 * std::max(1.0, n / 1000.0);
        CHECK(c.majorization <= tol && c.total <= tol && c.inequality <= 10 * tol)
            << ctx << check::fmt(static_cast<double>(c.majorization))
            << check::fmt(static_cast<double>(c.total))
            << check::fmt(static_cast<double>(c.inequality));
      }
}

TEST(sort_paths, permutation_equivariance_bitwise) {
  Rng rng(25);
  for (int n : {5, 160, 161, 3000, 65537})
    for (double eps : {0.0, 0.1, 1.0, kInf})
      for (const OpSpec& s : all_specs(eps)) {
        if (n > 3000 && eps != 1.0) continue;
        std::vector<double> x = random_row(rng, n, 0);  // distinct values
        std::vector<int> shuffle(n);
        std::iota(shuffle.begin(), shuffle.end(), 0);
        std::shuffle(shuffle.begin(), shuffle.end(), rng.gen);
        std::vector<double> y(n);
        for (int i = 0; i < n; ++i) y[i] = x[shuffle[i]];
        const Forward<double> fx = forward(x, 1, n, s), fy = forward(y, 1, n, s);
        bool ok = true;
        for (int i = 0; i < n; ++i)
          ok = ok && check::same_bits(fy.out[i], s.op == Op::Rank ? fx.out[shuffle[i]] : fx.out[i]);
        CHECK(ok) << describe(s) << "n" << n;
      }
}
