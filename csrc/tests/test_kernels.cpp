// Low-level kernels: the vectorised exp (vector_math.h/.cpp) and expm1_small
// against libm,
// and its position invariance (the long-row path splits buffers over the
// threads: an element's result must not depend on where its buffer starts).
#include <cstring>

#include "helpers.h"
#include "softrank/cpu_features.h"
#include "softrank/pav.h"  // InverseScale
#include "softrank/vector_math.h"

using namespace th;

TEST(kernels, exp_nonpositive_within_2_ulp_of_libm) {
  Rng rng(61);
  std::vector<double> x;
  for (int i = 0; i < 200000; ++i) x.push_back(-std::exp(rng.uniform(-40.0, 6.7)));  // (-800, 0)
  for (double v : {0.0, -0.0, -kDenorm, -1e-300, -708.0, -708.4, -709.0, -745.0, -745.2, -746.0,
                   -1e10, -kMax, -kInf})
    x.push_back(v);
  std::vector<double> buffer = x;
  softrank::exp_nonpositive_inplace(buffer.data(), static_cast<std::int64_t>(buffer.size()));
  long bad_inline = 0, bad_buffer = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp(x[i]);
    auto ulps = [&](double got) {
      if (got == want) return 0.0;
      const double ulp = std::nextafter(std::fabs(want), kInf) - std::fabs(want);
      return std::fabs(got - want) / ulp;
    };
    if (!(ulps(softrank::exp_nonpositive(x[i])) <= 2.0)) {
      if (++bad_inline <= 5) CHECK(false) << "inline" << check::fmt(x[i]) << softrank::exp_nonpositive(x[i]) << want;
    }
    if (!(ulps(buffer[i]) <= 2.0)) {
      if (++bad_buffer <= 5) CHECK(false) << "buffer" << check::fmt(x[i]) << buffer[i] << want;
    }
  }
  CHECK(bad_inline == 0 && bad_buffer == 0) << bad_inline << bad_buffer;
}

TEST(kernels, expm1_small_within_2_ulp_of_libm) {
  Rng rng(63);
  std::vector<double> x;
  for (int i = 0; i < 200000; ++i) {
    // Magnitudes from 1e-300 to 1/2, both signs (the kl sort's near terms).
    const double m = i % 2 ? rng.uniform(0.0, 0.5) : 0.5 * std::exp(rng.uniform(-690.0, 0.0));
    x.push_back(rng.integer(0, 1) ? m : -m);
  }
  for (double v : {0.0, -0.0, kDenorm, -kDenorm, 1e-300, 0.5, -0.5, std::nextafter(0.5, 0.0)})
    x.push_back(v);
  long bad = 0;
  for (double v : x) {
    const double want = std::expm1(v), got = softrank::expm1_small(v);
    const double ulp = std::nextafter(std::fabs(want), kInf) - std::fabs(want);
    const bool ok = got == want || std::fabs(got - want) <= 2.0 * ulp;
    if (!ok && ++bad <= 5) CHECK(false) << check::fmt(v) << got << want;
  }
  CHECK(bad == 0) << bad;
}

TEST(kernels, exp_buffer_is_position_invariant) {
  Rng rng(62);
  const int n = 4099;
  std::vector<double> x(n);
  for (auto& v : x) v = rng.uniform(-760.0, 0.0);
  std::vector<double> whole = x;
  softrank::exp_nonpositive_inplace(whole.data(), n);
  long diffs = 0;
  for (int lo = 0; lo < 40; ++lo)
    for (int len : {1, 2, 3, 7, 8, 9, 15, 16, 17, 100, 1001}) {
      std::vector<double> part = x;
      softrank::exp_nonpositive_inplace(part.data() + lo, len);
      for (int i = lo; i < lo + len; ++i) diffs += !check::same_bits(part[i], whole[i]);
    }
  CHECK(diffs == 0) << diffs << "elements depend on their position in the buffer";
}

// The kl soft sort's S - Q (soft_row.h, sort_kl_log_ratios): the dispatched
// kernel against the scalar terms summed in its documented order (bit for
// bit: every path must give the same value), and against the terms summed
// in long double from libm's exp (the sum's accuracy).
TEST(kernels, sort_kl_diff_sum_matches_the_scalar_order_and_long_double) {
  Rng rng(64);
  long mismatched = 0, inaccurate = 0, near_terms = 0, far_terms = 0;
  int levels_run = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int count = trial < 40 ? trial : rng.integer(1, 300);
    // A block's descending x' (a = x'_j - ref <= 0) with gaps about 1/eps,
    // so that a_j and b_j = -j/eps are near for some j and far for others
    // (one trial in three: gaps anywhere in [0, 2/eps]), and ties; a
    // subnormal eps (inverse overflows: the divide form) now and then.
    const double eps = trial % 50 == 7 ? 4.9e-322 : std::exp(rng.uniform(-3.0, 3.0));
    const softrank::InverseScale scale(eps);
    const double gap = eps > 1e-300 ? 1.0 / eps : 1.0;
    const double ref = rng.uniform(-50.0, 50.0);
    std::vector<double> xs(static_cast<std::size_t>(count)), decay(static_cast<std::size_t>(count));
    double x = ref;
    for (int i = 0; i < count; ++i) {
      const double step = trial % 3 == 0 ? rng.uniform(0.0, 2.0) : 1.0 + rng.uniform(-0.2, 0.2);
      x -= rng.integer(0, 19) == 0 ? 0.0 : step * gap;
      xs[i] = x;
      decay[i] = softrank::exp_nonpositive(-scale(static_cast<double>(i + 1)));
    }
    LD exact = 0.0L, magnitude = 0.0L;
    for (int i = 0; i < count; ++i) {
      const double offset = scale(static_cast<double>(i + 1));
      const bool near = std::fabs((xs[i] - ref) + offset) < 0.5;
      near_terms += near;
      far_terms += !near;
      const LD term = std::exp(static_cast<LD>(xs[i]) - ref) - std::exp(-static_cast<LD>(offset));
      exact += term;
      magnitude += std::fabs(term);
    }
    std::vector<double> scratch(static_cast<std::size_t>(count));
    double chosen = softrank::sort_kl_diff_sum(xs.data(), ref, decay.data(), scale.inv, scale.eps,
                                               scale.multiply, count, scratch.data());
    for (int level = 0; level <= 2; ++level) {
      double got = 0.0;
      if (!softrank::sort_kl_diff_sum_at(level, xs.data(), ref, decay.data(), scale.inv,
                                         scale.eps, scale.multiply, count, scratch.data(), &got))
        continue;
      levels_run |= 1 << level;
      // The scalar order, with the exps of the level's exp kernel.
      std::vector<double> exps(static_cast<std::size_t>(count));
      for (int i = 0; i < count; ++i) exps[i] = xs[i] - ref;
      softrank::exp_nonpositive_inplace_at(level, exps.data(), count);
      double lanes[4] = {0.0, 0.0, 0.0, 0.0};
      for (int i = 0; i < count; ++i)
        lanes[i % 4] += softrank::sort_kl_diff_term(xs[i] - ref, exps[i],
                                                    scale(static_cast<double>(i + 1)), decay[i]);
      const double want = softrank::join_lanes(lanes);
      if (!check::same_bits(got, want) && ++mismatched <= 5)
        CHECK(false) << "level" << level << "trial" << trial << "count" << count << got << want;
      if (level == static_cast<int>(softrank::simd_level()) && !check::same_bits(got, chosen) &&
          ++mismatched <= 5)
        CHECK(false) << "the dispatched kernel is not level" << level << got << chosen;
      // Each term within a few ulp of itself (decay's own rounding
      // included), the sum within count ulp of the terms' magnitudes.
      const LD error = std::fabs(static_cast<LD>(got) - exact);
      if (!(error <= (8.0L + count) * 1.2e-16L * magnitude) && ++inaccurate <= 5)
        CHECK(false) << "level" << level << "trial" << trial << "count" << count << got
                     << check::fmt(double(exact));
    }
  }
  CHECK(levels_run & 1) << "the baseline kernel always runs";
  CHECK(mismatched == 0) << mismatched;
  CHECK(inaccurate == 0) << inaccurate;
  CHECK(near_terms > 10000 && far_terms > 10000) << near_terms << far_terms;
  CHECK(levels_run == (1 << (static_cast<int>(softrank::cpu_simd_level()) + 1)) - 1) << levels_run;
}

// The exp kernel of every level this CPU has: within 2 ulp of libm, and the
// AVX2 and AVX-512 kernels (the same operations on 4 and 8 lanes) the same
// bits, at every length and offset of a buffer (their tails).
TEST(kernels, exp_levels_agree) {
  Rng rng(65);
  std::vector<double> x;
  for (int i = 0; i < 20000; ++i) x.push_back(-std::exp(rng.uniform(-40.0, 6.7)));
  for (double v : {0.0, -0.0, -kDenorm, -1e-300, -708.4, -745.2, -746.0, -1e10, -kInf})
    x.push_back(v);
  std::vector<double> avx2 = x;
  const bool have_avx2 =
      softrank::exp_nonpositive_inplace_at(1, avx2.data(), static_cast<std::int64_t>(x.size()));
  for (int level = 0; level <= 2; ++level) {
    std::vector<double> got = x;
    if (!softrank::exp_nonpositive_inplace_at(level, got.data(), static_cast<std::int64_t>(x.size())))
      continue;
    long far = 0, differ = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double want = std::exp(x[i]);
      const double ulp = std::nextafter(std::fabs(want), kInf) - std::fabs(want);
      far += !(got[i] == want || std::fabs(got[i] - want) <= 2.0 * ulp);
      differ += level == 2 && have_avx2 && !check::same_bits(got[i], avx2[i]);
    }
    CHECK(far == 0) << "level" << level << far;
    CHECK(differ == 0) << "AVX-512 vs AVX2" << differ;
    for (int lo = 0; lo < 9; ++lo)
      for (int len = 1; len <= 33; ++len) {
        std::vector<double> part = x;
        softrank::exp_nonpositive_inplace_at(level, part.data() + lo, len);
        long moved = 0;
        for (int i = 0; i < static_cast<int>(x.size()); ++i) {
          const bool inside = i >= lo && i < lo + len;
          moved += !check::same_bits(part[i], inside ? got[i] : x[i]);
        }
        CHECK(moved == 0) << "level" << level << "lo" << lo << "len" << len << moved;
      }
  }
}
