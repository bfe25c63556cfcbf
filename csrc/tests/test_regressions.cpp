// Regression tests for bugs found in the core (one test per bug).
#include <algorithm>
#include <chrono>

#include "helpers.h"
#include "softrank/projection.h"

using namespace th;

// Bug: for_each_row looped over every row even for n = 0, so a valid
// zero-size batch such as numpy's np.empty((2**40, 0)) spent hours doing
// nothing. Fixed in batched.cpp: return at once when n == 0.
TEST(regressions, empty_rows_of_a_huge_batch_return_at_once) {
  const auto start = std::chrono::steady_clock::now();
  const std::int64_t rows = std::int64_t(1) << 40;
  for (const OpSpec& s : all_specs(1.0)) {
    // Nothing may be read or written: null pointers prove it.
    softrank::soft_forward_batch<double>(nullptr, rows, 0, s, nullptr, nullptr, nullptr);
    softrank::soft_forward_batch<float>(nullptr, rows, 0, s, nullptr, nullptr, nullptr);
    softrank::soft_product_batch<double>(nullptr, nullptr, nullptr, nullptr, nullptr, rows, 0, s,
                                         true, nullptr);
  }
  softrank::isotonic_forward_batch<double>(nullptr, nullptr, rows, 0, true, nullptr, nullptr);
  softrank::isotonic_vjp_batch<float>(nullptr, nullptr, nullptr, rows, 0, nullptr);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(seconds < 1.0) << seconds << "s";
}

// Bug: the rank vjp/jvp multiplied by 1/eps, which is inf for a subnormal
// eps, so every singleton block (true gradient 0) got inf * 0 = NaN. Fixed in
// soft_ops.h: divide by eps where 1/eps overflows.
TEST(regressions, rank_gradient_at_subnormal_eps_is_not_nan) {
  for (double eps : {kDenorm, 1e-310, 2.2e-308})
    for (const OpSpec& s : all_specs(eps)) {
      if (s.op != Op::Rank) continue;
      const std::vector<double> x{3.0, -1.0, 2.0, 0.5};  // distinct: singleton blocks
      const std::vector<double> g{1.0, -2.0, 0.25, 4.0};
      const Forward<double> f = forward(x, 1, 4, s);
      for (bool transpose : {true, false}) {
        const std::vector<double> r = product(x, f, g, 1, 4, s, transpose);
        for (int i = 0; i < 4; ++i) CHECK(r[i] == 0.0) << describe(s) << i << r[i];
      }
      const Forward<float> f32 = forward(cast<float>(x), 1, 4, s);
      const std::vector<float> r32 = product(cast<float>(x), f32, cast<float>(g), 1, 4, s, true);
      for (int i = 0; i < 4; ++i) CHECK(r32[i] == 0.0f) << describe(s) << "f32" << i;
    }
}

// Bug: values beyond ~1e300 overflowed the differences and block sums of x:
// soft_sort l2 of [DBL_MAX, -DBL_MAX, 0, 1] returned inf, soft_rank at
// eps = inf (or eps = DBL_MAX) returned NaN. Fixed in soft_ops.h: such rows
// run at a power-of-two scale (exact; ranks depend on x / eps only, the l2
// sort is homogeneous).
TEST(regressions, values_near_dbl_max_give_finite_exact_outputs) {
  const std::vector<std::vector<double>> rows = {
      {kMax, -kMax, 0.0, 1.0}, {kMax, kMax, -kMax}, {1e308, -1e308, 5e307, 1e-300, 0.0}};
  const double grid[] = {0.0, kDenorm, 1e-300, 1.0, 1e300, kMax, kInf};
  for (const auto& x : rows)
    for (double eps : grid)
      for (const OpSpec& s : all_specs(eps)) {
        const int n = static_cast<int>(x.size());
        const Forward<double> f = forward(x, 1, n, s);
        double sum = 0, lo = kInf, hi = -kInf;
        for (double v : x) lo = std::min(lo, v), hi = std::max(hi, v);
        for (int i = 0; i < n; ++i) {
          CHECK(std::isfinite(f.out[i])) << describe(s) << i << f.out[i];
          sum += f.out[i];
          if (s.op == Op::Sort) CHECK(f.out[i] >= lo && f.out[i] <= hi) << describe(s) << f.out[i];
        }
        if (s.op == Op::Rank) CHECK_NEAR(sum, 0.5 * n * (n + 1), 1e-12 * n * n) << describe(s);
        // Bug: the kl sort at an eps whose inverse overflows, beside values near
        // +-DBL_MAX, returned -inf: its merge test took u - v = inf - inf as a
        // merge (pav.h, sort_kl_merges, now at half scale there). Where 1/eps
        // overflows, a block of m values pools only across a gap beyond m / eps:
        // none, so the kl sort is the hard sort, bit for bit.
        if (s.op == Op::Sort && s.reg == Reg::KL && eps > 0.0 && std::isinf(1.0 / eps)) {
          std::vector<double> sorted = x;
          std::sort(sorted.begin(), sorted.end());
          if (s.descending) std::reverse(sorted.begin(), sorted.end());
          for (int i = 0; i < n; ++i) CHECK(f.out[i] == sorted[i]) << describe(s) << i << f.out[i];
        }
        if (s.op == Op::Rank && std::isinf(eps))
          for (int i = 0; i < n; ++i) CHECK(f.out[i] == 0.5 * (n + 1)) << describe(s);
        if (s.op == Op::Sort && s.reg == Reg::L2 && std::isinf(eps)) {
          // The mean of x, computed without overflow.
          double mean = 0;
          for (double v : x) mean += v / n;
          for (int i = 0; i < n; ++i)
            CHECK_NEAR(f.out[i], mean, 1e-15 * kMax) << describe(s) << f.out[i];
        }
        std::vector<double> g(n, 1.0);
        g[0] = -1.0;
        for (bool transpose : {true, false}) {
          const std::vector<double> r = product(x, f, g, 1, n, s, transpose);
          for (int i = 0; i < n; ++i) CHECK(!std::isnan(r[i])) << describe(s) << "grad" << i;
        }
      }
  // The scale is exact: a row scaled by a power of two gives the same ranks
  // (eps scaled alike) and the same l2 sort scaled back.
  Rng rng(51);
  for (int n : {3, 50, 161, 1000})
    for (const OpSpec& s : all_specs(0.7)) {
      if (s.op == Op::Sort && s.reg == Reg::KL) continue;  // not homogeneous
      std::vector<double> x = random_row(rng, n, n % 4), big(n);
      const double f = std::ldexp(1.0, 1000);
      for (int i = 0; i < n; ++i) big[i] = x[i] * f;
      OpSpec sb = s;
      sb.eps = s.op == Op::Rank ? s.eps * f : s.eps / f;
      const Forward<double> a = forward(x, 1, n, s), c = forward(big, 1, n, sb);
      for (int i = 0; i < n; ++i) {
        const double want = s.op == Op::Rank ? a.out[i] : a.out[i] * f;
        CHECK_NEAR(c.out[i], want, 1e-12 * std::fabs(want) + (s.op == Op::Rank ? 1e-12 * n : 0))
            << describe(s) << n << i;
      }
    }
}

// Bug: the l2 rank at a subnormal eps (below 2.2e-308) with subnormal gaps
// between values returned wrong ranks (row sums 13 or 17 instead of 15 for
// n = 5): the block statistics, kept in units of x, have an absolute
// precision of 2^-1074, which is O(1) relative to such an eps. Fixed with the
// same power-of-two scaling (x and eps times 2^64).
TEST(regressions, rank_at_subnormal_eps_matches_the_scaled_problem) {
  const std::vector<std::vector<double>> rows = {
      {kDenorm, -kDenorm, 0.0, 2 * kDenorm, kDenorm},
      {3 * kDenorm, 0.0, kDenorm, 7 * kDenorm, -2 * kDenorm, 5 * kDenorm, kDenorm}};
  for (const auto& x : rows)
    for (double eps : {kDenorm, 3 * kDenorm, 1e-310})
      for (const OpSpec& s : all_specs(eps)) {
        if (s.op != Op::Rank) continue;
        const int n = static_cast<int>(x.size());
        // The same problem at scale 2^600, where everything is normal.
        const double f = std::ldexp(1.0, 600);
        std::vector<double> y(n);
        for (int i = 0; i < n; ++i) y[i] = x[i] * f;
        OpSpec sy = s;
        sy.eps = eps * f;
        const Forward<double> a = forward(x, 1, n, s), c = forward(y, 1, n, sy);
        double sum = 0;
        for (int i = 0; i < n; ++i) {
          CHECK_NEAR(a.out[i], c.out[i], 1e-13 * n) << describe(s) << i;
          sum += a.out[i];
        }
        CHECK_NEAR(sum, 0.5 * n * (n + 1), 1e-12 * n * n) << describe(s);
      }
}

// Bug: weighted isotonic regression kept d = sum w (y - ref), which
// overflowed for |y| near 1e308 or weights near 1e300: inf/NaN solutions
// (not even ordered) for finite input, and a zero gradient once the block's
// weight sum overflowed. Fixed in soft_ops.h with power-of-two scaling of y
// and w (exact: the same bits wherever nothing overflowed before).
TEST(regressions, isotonic_with_extreme_values_and_weights) {
  const std::vector<double> y{1e300, -1e300, 5e299, 0.0}, big{kMax, -kMax, 0.0, 1.0};
  const std::vector<double> w{1e300, 1e300, 1e300, 1e300}, wmix{1e300, 1e308, 1e-10, 1.0};
  for (const auto* yy : {&y, &big})
    for (const auto* ww : {&w, &wmix})
      for (bool increasing : {true, false}) {
        const Iso<double> r = isotonic(*yy, ww, 1, 4, increasing);
        // Reference: the min-max formula on y 2^-200 and w 2^-900 (moderate
        // numbers even in plain double, as under valgrind), scaled back.
        std::vector<double> ys(4), wsc(4);
        for (int i = 0; i < 4; ++i) {
          ys[i] = std::ldexp((*yy)[i], -200);
          wsc[i] = std::ldexp((*ww)[i], -900);
        }
        std::vector<LD> ref = minmax_isotonic(ys, &wsc, increasing);
        for (auto& v : ref) v = std::ldexp(v, 200);
        for (int i = 0; i < 4; ++i) {
          CHECK(std::isfinite(r.sol[i])) << i << r.sol[i];
          // (cancellation of +-|y|: the error is relative to max |y|)
          CHECK_NEAR(r.sol[i], static_cast<double>(ref[i]), 1e-13 * std::fabs((*yy)[0]))
              << increasing << i;
        }
        std::vector<double> g{1.0, 2.0, 3.0, 4.0};
        const std::vector<double> grad = isotonic_vjp(ww, r, g, 1, 4);
        double gs = 0;
        for (int i = 0; i < 4; ++i) {
          CHECK(std::isfinite(grad[i])) << "grad" << i;
          gs += grad[i];
        }
        CHECK_NEAR(gs, 10.0, 1e-12) << "sum of the gradient = sum of the cotangent";
      }
}

// Bug: the kl rank's double-backward product multiplied by (1/eps)^2, which
// overflows for eps below ~1e-154, so singleton blocks (true value 0) got
// inf * 0 = NaN. Found by the fuzzer (fuzz/fuzz_core.cpp). Fixed in
// soft_ops.h: divide by eps twice where the product overflows.
TEST(regressions, rank_hvp_at_tiny_eps_is_not_nan) {
  for (double eps : {kDenorm, 1e-300, 1e-200, 1e-160})
    for (const OpSpec& s : all_specs(eps)) {
      const std::vector<double> x{42.0, -1.0, 3.5};
      const std::vector<double> c{1.0, -2.0, 0.5}, t{0.25, 4.0, -1.0};
      const Forward<double> f = forward(x, 1, 3, s);
      std::vector<double> r(3, kNaN);
      softrank::soft_hvp_batch(x.data(), f.out.data(), f.perm.data(), f.block.data(), c.data(),
                               t.data(), 1, 3, s, r.data());
      for (int i = 0; i < 3; ++i) CHECK(r[i] == 0.0) << describe(s) << i << r[i];
    }
}

// Bug: the isotonic vjp divided by the block's weight sum, which for
// subnormal weights is so small that sum / wsum overflowed: inf gradients
// (found by the fuzzer). Fixed in soft_ops.h: such blocks are rescaled too.
TEST(regressions, isotonic_vjp_with_subnormal_weights) {
  const std::vector<double> y{3.0, 1.0, 2.0, 0.0};
  for (const std::vector<double>& w : {std::vector<double>{kDenorm, 2 * kDenorm, 1e-323, kDenorm},
                                       std::vector<double>{1e-310, 1e-300, 1e-320, 1.0}})
    for (bool increasing : {true, false}) {
      const Iso<double> r = isotonic(y, &w, 1, 4, increasing);
      const std::vector<double> g{1.0, 2.0, 3.0, 4.0};
      const std::vector<double> grad = isotonic_vjp(&w, r, g, 1, 4);
      double gs = 0;
      for (int i = 0; i < 4; ++i) {
        CHECK(std::isfinite(r.sol[i]) && std::isfinite(grad[i])) << i << r.sol[i] << grad[i];
        gs += grad[i];
      }
      CHECK_NEAR(gs, 10.0, 1e-12);
    }
}

// Bug (in the first version of the power-of-two scaling): a rank at a tiny
// normal eps (1.8e-307) of a row holding 1e300 *and* subnormal gaps was
// scaled down for the large value, which pushed eps and the small values into
// the subnormals: row sum 120.0000038 instead of 120 (found by the fuzzer).
// The large value is a singleton block at that eps: the other ranks must be
// bitwise those of the row without it.
TEST(regressions, rank_of_large_and_subnormal_values_at_tiny_eps) {
  const std::vector<double> x{1e300, 1e-300, -5e-324, 0.0, 1.0, -1e10, 1e-10, 3.0,
                              1.0,   3.0,    2.0,     1.0, 2.781342323134e-309, 8.0987e-320, 0.0};
  const std::vector<double> rest(x.begin() + 1, x.end());
  for (double eps : {1.7696290530940086e-307, 1e-300, 3e-308})
    for (bool desc : {false, true})
      for (Reg reg : {Reg::L2, Reg::KL}) {
        const OpSpec s{Op::Rank, reg, desc, eps};
        const int n = static_cast<int>(x.size());
        const Forward<double> f = forward(x, 1, n, s);
        const Forward<double> g = forward(rest, 1, n - 1, s);
        double sum = 0;
        for (int i = 0; i < n; ++i) sum += f.out[i];
        CHECK_NEAR(sum, 0.5 * n * (n + 1), 1e-12 * n * n) << describe(s);
        CHECK(f.out[0] == (desc ? 1.0 : n)) << describe(s) << f.out[0];
        // (Descending, the large value sorts last with rho = 1 and the others
        // keep rho = n..2: a shift by 1 for l2, a different problem for kl.)
        if (desc && reg == Reg::KL) continue;
        for (int i = 1; i < n; ++i)
          CHECK_NEAR(f.out[i], g.out[i - 1] + (desc ? 1.0 : 0.0), 1e-12 * n) << describe(s) << i;
      }
}

// Bug: isotonic regression of a row of subnormal values rounded its block
// means (sum w (y - ref) / W) to the subnormal grid, up to n units away, even
// outside [min y, max y] (found by the fuzzer). Fixed in soft_ops.h: such
// rows are scaled up by a power of two (exact), like rows near DBL_MAX are
// scaled down.
TEST(regressions, isotonic_of_subnormal_values) {
  const std::vector<double> y{8.0868664911295234e-320, 1e-321, 3e-320, 7e-320, 5e-324, 2e-320};
  const std::vector<double> w{0.3, 0.9, 0.55, 0.7, 0.61, 0.8};
  for (bool increasing : {true, false})
    for (const std::vector<double>* ww : {static_cast<const std::vector<double>*>(nullptr), &w}) {
      const Iso<double> r = isotonic(y, ww, 1, 6, increasing);
      std::vector<double> big(6);
      for (int i = 0; i < 6; ++i) big[i] = std::ldexp(y[i], 1000);
      const Iso<double> rb = isotonic(big, ww, 1, 6, increasing);
      for (int i = 0; i < 6; ++i) {
        CHECK(r.sol[i] >= 5e-324 && r.sol[i] <= 8.0868664911295234e-320) << increasing << i << r.sol[i];
        CHECK_SAME(r.sol[i], std::ldexp(rb.sol[i], -1000)) << increasing << (ww != nullptr) << i;
      }
    }
}

// Bug: weighted isotonic regression kept d = sum w (y - ref); with weights
// and values spanning a wide range together (weights 1e-284 ... 2e-14, y
// near 1e-245 ... 4e-53) the products underflowed and a block mean came out
// 0.3% above max y (found by the fuzzer). Fixed in pav.h: the block mean is
// updated by a convex combination (weight fraction in [0, 1]).
TEST(regressions, isotonic_with_weights_and_values_spanning_wide_ranges) {
  const std::vector<double> y{2.7474204799246171e-245, 4.220228436993321e-53, 6.379215924577309e-168,
                              5.457505988762236e-284,  9.25734842866565e-92,  1.249290446121458e-206,
                              1.33466e-318,            0.0,                   2.7474204794535227e-245,
                              2.0202173279511396e-153, 1.821197339722543e-269};
  const std::vector<double> w{5.457505988762236e-284, 1.821197339722543e-269, 4.589113599959378e-24,
                              9.319946361249448e-144, 6.685649849603677e-29,  8.536535134603708e-260,
                              4.220228436993321e-53,  2.7474204794535227e-245, 1.9761022533653776e-101,
                              2.1493415773254752e-14, 2.878503697907845e-106};
  for (bool increasing : {true, false}) {
    const Iso<double> r = isotonic(y, &w, 1, 11, increasing);
    double lo = kInf, hi = -kInf;
    for (double v : y) lo = std::min(lo, v), hi = std::max(hi, v);
    for (int i = 0; i < 11; ++i) {
      CHECK(r.sol[i] >= lo && r.sol[i] <= hi) << increasing << i << check::fmt(r.sol[i]);
      if (i > 0) CHECK(increasing ? r.sol[i] >= r.sol[i - 1] : r.sol[i] <= r.sol[i - 1]) << i;
    }
    // Against the min-max formula in long double, on the values and weights
    // scaled into a moderate range (exact powers of two).
    std::vector<double> ys(11), ws(11);
    for (int i = 0; i < 11; ++i) {
      ys[i] = std::ldexp(y[i], 170);
      ws[i] = std::ldexp(w[i], 45);
    }
    const std::vector<LD> ref = minmax_isotonic(ys, &ws, increasing);
    for (int i = 0; i < 11; ++i)
      CHECK_NEAR(std::ldexp(r.sol[i], 170), static_cast<double>(ref[i]), 1e-12 * std::ldexp(hi, 170))
          << increasing << i;
  }
}

// Bug: a weighted block mean of a row reaching DBL_MAX, rounded one ulp
// above the (scaled) maximum, overflowed to inf when scaled back (found by
// the long fuzz run). Fixed in soft_ops.h: block means are clamped to
// [-max |y|, max |y|].
TEST(regressions, isotonic_block_mean_at_dbl_max_stays_finite) {
  Rng rng(71);
  long bad = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    const int n = 2 + trial % 9;
    std::vector<double> y(n), w(n);
    for (int i = 0; i < n; ++i) {
      y[i] = rng.integer(0, 2) ? kMax : (rng.integer(0, 1) ? 1e308 : -1e308);
      w[i] = rng.integer(0, 1) ? kMax * rng.uniform(0.5, 1.0) : 1e-320;
    }
    for (bool increasing : {true, false}) {
      const Iso<double> r = isotonic(y, &w, 1, n, increasing);
      for (int i = 0; i < n; ++i) bad += !std::isfinite(r.sol[i]) || std::fabs(r.sol[i]) > kMax;
    }
  }
  CHECK(bad == 0) << bad << "non-finite solutions";
}

// Bug (found by the fuzzer): kl projection rows whose spread of z / eps and
// of w both exceed the largest double compared inf with inf in the pooling
// test (ProjectionKlRule: (ref_a - ref_b) / eps + ... <= lse_w_a - lse_w_b;
// the runs rule: d = inf - inf = NaN), so two blocks pooled where z / eps
// was the wider spread. Fixed in projection.h: the test at half scale where
// a side overflows. Two values: z = (1, -1), w = (DBL_MAX, -DBL_MAX), so
// V_a - V_b = 2 / eps - 2 DBL_MAX; 2 / eps = 2.5 DBL_MAX keeps the blocks
// apart (out = w exactly), 1.5 DBL_MAX pools them. Both rules: the runs rule
// through projection_forward_batch (the CPU's route for 0 < eps < inf),
// ProjectionKlRule directly (the CUDA core's).
TEST(regressions, kl_projection_spreads_past_the_largest_double) {
  const double big = std::numeric_limits<double>::max();
  const double z[2] = {1.0, -1.0}, w[2] = {big, -big};
  for (double spread : {1.25, 0.75}) {
    const double eps = (1.0 / spread) / big;  // (subnormal: 2 / eps = 2 spread DBL_MAX)
    const bool apart = spread > 1.0;
    double out[2];
    index_t perm_z[2], perm_w[2], block[2];
    softrank::projection_forward_batch<double>(z, w, 1, 2, eps, Reg::KL, out, perm_z, perm_w,
                                               block);
    CHECK(block[1] == (apart ? 1 : 0)) << "runs rule, spread" << spread;
    if (apart) CHECK(out[0] == big && out[1] == -big) << out[0] << out[1];
    for (double v : out) CHECK(v >= -big && v <= big) << "runs rule" << v;

    const double s[2] = {1.0, -1.0}, ws[2] = {big, -big};
    const softrank::ProjectionKlRule rule{s, ws, eps, false};
    softrank::ProjectionKlRule::Block stack[2];
    double sorted_out[2];
    index_t block_start[2];
    softrank::project_sorted(rule, 2, stack, sorted_out, block_start);
    CHECK(block_start[1] == (apart ? 1 : 0)) << "ProjectionKlRule, spread" << spread;
    if (apart) CHECK(sorted_out[0] == big && sorted_out[1] == -big);
    for (double v : sorted_out) CHECK(v >= -big && v <= big) << "ProjectionKlRule" << v;
  }
}

// Bug (found by the fuzzer): the l2 projection of subnormal z at a subnormal
// eps rounded on the subnormal grid, amplified by 1 / eps: its pooling test
// (eps (w_a - w_b) rounded to the step that z_a - z_b is) and its block means
// (offset / count). Fixed in projection.h: such a row's s and eps are scaled
// up together (projection_l2_scale_up), and the offsets' mean is taken after
// the division by eps. Two rows against their exact projections:
// - z / eps = (1/3, 0), w = (0.3, 0): no pool, out = w exactly (it pooled);
// - z = (0, -2^-1074, 0, 0, 2^1014), w = (1, 1, 1, 0, 2), eps = 3 2^-1074:
//   2^1014 leaves the scale-up no room. Sorted, V = s / eps - w is
//   (huge, -1, -1, -1, -1/3): the last four pool (mean s / eps = -1/12, whose
//   offset -2^-1076 is off the subnormal grid), out = s / eps + 5/6, i.e. 5/6
//   for the zeros and 1/2 for -2^-1074 (the mean rounded to 0 gave 3/4).
TEST(regressions, l2_projection_of_subnormal_z_at_subnormal_eps) {
  const double tiny = std::numeric_limits<double>::denorm_min();
  {
    const double z[2] = {tiny, 0.0}, w[2] = {0.3, 0.0};
    double out[2];
    index_t perm_z[2], perm_w[2], block[2];
    softrank::projection_forward_batch<double>(z, w, 1, 2, 3 * tiny, Reg::L2, out, perm_z,
                                               perm_w, block);
    CHECK(block[1] == 1) << "pooled at z / eps = (1/3, 0)";
    CHECK(out[0] == 0.3 && out[1] == 0.0) << out[0] << out[1];
  }
  {
    const double z[5] = {0.0, -tiny, 0.0, 0.0, 0x1p1014}, w[5] = {1.0, 1.0, 1.0, 0.0, 2.0};
    double out[5];
    index_t perm_z[5], perm_w[5], block[5];
    softrank::projection_forward_batch<double>(z, w, 1, 5, 3 * tiny, Reg::L2, out, perm_z,
                                               perm_w, block);
    CHECK(out[4] == 2.0) << out[4];
    for (int i : {0, 2, 3}) CHECK(std::fabs(out[i] - 5.0 / 6) <= 4e-16) << i << out[i];
    CHECK(std::fabs(out[1] - 0.5) <= 4e-16) << out[1];
  }
}

// Bug: a rank l2 row holding |x| > 2^960 beside subnormal gaps, at a
// subnormal eps, can be scaled neither down (eps would leave the normal
// range) nor up (the large value would overflow); its outputs took a block's
// mean offset on the subnormal grid, O(1) relative to eps: [1.7e308, 4d, 5d,
// -3d] (d = 2^-1074) at eps = d ranked [4, 1.5, 2.5, 1] (row sum 9). Fixed in
// soft_row.h: at such an eps (1 / eps overflows) the mean is taken after the
// division. Exact ranks: x / eps = (big, 4, 5, -3) / e for eps = e d; 5 / e
// and 4 / e (rho 3 and 2) pool where 1 / e <= 1, to 2.5 +- 1 / (2 e).
TEST(regressions, rank_of_huge_and_subnormal_values_at_subnormal_eps) {
  const std::vector<double> x{1.7e308, 4 * kDenorm, 5 * kDenorm, -3 * kDenorm};
  const std::vector<std::pair<double, std::vector<double>>> cases = {
      {1.0, {4.0, 2.0, 3.0, 1.0}}, {2.0, {4.0, 2.25, 2.75, 1.0}},
      {3.0, {4.0, 7.0 / 3, 8.0 / 3, 1.0}}};
  for (const auto& [e, want] : cases) {
    const OpSpec s{Op::Rank, Reg::L2, false, e * kDenorm};
    const Forward<double> f = forward(x, 1, 4, s);
    for (int i = 0; i < 4; ++i) CHECK_NEAR(f.out[i], want[i], 1e-15) << "eps" << e << "d" << i;
  }
}

// Bug (found by the fuzzer): a kl projection row holding both -DBL_MAX and
// nearly DBL_MAX pools into one block whose spread of z / eps is wider than a
// double; its outputs are formed at half scale and doubled, and rounding took
// the half of -DBL_MAX's output one ulp past -DBL_MAX / 2, so it came out
// -inf (outside [min w, max w]). Fixed in common.h (twice_finite). z = w: the
// projection of a permutation of w onto P(w) is z itself.
TEST(regressions, kl_projection_of_values_at_both_ends_of_the_doubles) {
  const double big = 0x1.fffffffp+1023, dbl_max = std::numeric_limits<double>::max();
  const double z[4] = {big, 1.0, 0.0, -dbl_max};
  double out[4];
  index_t perm_z[4], perm_w[4], block[4];
  softrank::projection_forward_batch<double>(z, z, 1, 4, 1.0, Reg::KL, out, perm_z, perm_w, block);
  CHECK(out[0] == big) << out[0];
  CHECK(out[3] == -dbl_max) << out[3];
  for (int i : {1, 2}) CHECK(std::isfinite(out[i]) && out[i] >= -dbl_max && out[i] <= big) << i;
}

// Bug (found by an audit): the kl sort's merge test pooled where both of its
// sides round to the same value, as where every gap of x and 1/eps are below
// 2^-53 (exp(-u) and exp(-v) both 1): all-zero x at eps = 1e17 came out
// [-1e-17, 0, 1e-17] and 1e-300 [3, 1, 4, 2] at eps = 1e30 was pooled to
// +-1.5e-30. The exact blocks stay apart (each gap < 1/eps): x sorted. Fixed
// in pav.h (sort_kl_merges is strict).
TEST(regressions, kl_sort_keeps_blocks_apart_below_rounding) {
  struct Case {
    std::vector<double> x;
    double eps;
  };
  const Case cases[] = {{{0.0, 0.0, 0.0}, 1e17},
                        {{3e-17, 1e-17, 4e-17, 2e-17}, 3e16},
                        {{3e-300, 1e-300, 4e-300, 2e-300}, 1e30}};
  for (const Case& c : cases) {
    for (bool descending : {false, true}) {
      const index_t n = static_cast<index_t>(c.x.size());
      const Forward<double> f = forward(c.x, 1, n, OpSpec{Op::Sort, Reg::KL, descending, c.eps});
      std::vector<double> sorted = c.x;
      std::sort(sorted.begin(), sorted.end());
      if (descending) std::reverse(sorted.begin(), sorted.end());
      for (index_t i = 0; i < n; ++i)
        CHECK(f.out[i] == sorted[i]) << "eps" << c.eps << "i" << i << f.out[i] << "vs" << sorted[i];
    }
  }
}

// Bug (found by an audit): the projection pooled adjacent blocks of equal
// value, which z tied where w is tied too gives (a ReLU's zeros among the
// top-k mask's zeros). P is locally constant in those entries, but a pooled
// block carries the Jacobian (I - 11^T / m) / eps: the mask's gradient pushed
// between the tied zeros. Fixed in projection.h: the rules pool violations
// only (V_a < V_b) for 0 < eps < inf; eps = 0 still pools ties of z. Every
// rule (l2, ProjectionKlRule, and the runs rule of the C++ kl loop) keeps
// the tied entries apart, with the same outputs.
TEST(regressions, projection_keeps_ties_of_z_against_ties_of_w_apart) {
  const double z[5] = {3.0, 0.0, 0.0, 0.0, -2.0}, w[5] = {1.0, 0.0, 0.0, 0.0, 0.0};
  for (Reg reg : {Reg::L2, Reg::KL}) {
    for (double eps : {0.5, 1.0, 2.0}) {  // (above 3, z[0] / eps - 1 < 0: a violation)
      double out[5];
      index_t perm_z[5], perm_w[5], block[5];
      softrank::projection_forward_batch<double>(z, w, 1, 5, eps, reg, out, perm_z, perm_w,
                                                 block);
      for (index_t i = 0; i < 5; ++i) {
        CHECK(block[i] == i) << "reg" << static_cast<int>(reg) << "eps" << eps << "i" << i;
        CHECK(out[i] == w[i]) << out[i] << "vs" << w[i];
      }
    }
    // eps = 0 still pools the ties of z (the hard limit: the tied entries
    // share their w).
    double out[5];
    index_t perm_z[5], perm_w[5], block[5];
    softrank::projection_forward_batch<double>(z, w, 1, 5, 0.0, reg, out, perm_z, perm_w, block);
    CHECK(block[2] == 1 && block[3] == 1) << block[2] << block[3];
  }
  const double s[3] = {2.0, 2.0, 0.0}, ws[3] = {1.0, 1.0, 0.0};
  const softrank::ProjectionKlRule rule{s, ws, 1.0, false};
  softrank::ProjectionKlRule::Block stack[3];
  double sorted_out[3];
  index_t block_start[3];
  softrank::project_sorted(rule, 3, stack, sorted_out, block_start);
  for (index_t i = 0; i < 3; ++i) CHECK(block_start[i] == i && sorted_out[i] == ws[i]) << i;
}

// Bug: the kl rank's product on a singleton block formed v - v r / (n - s);
// r (the kl rank, through exp) is n - s only up to rounding, and 1/eps
// amplified that: jvp [-6.7e284, 0, 0] at eps = 1e-300 for x = [-2.04,
// -1.395, -0.296] (exact: 0). Fixed in soft_row.h (the short-row and the
// long-row fragment writers): a singleton's product is v - v. A row of 2^18
// + 3 distinct values takes the long-row path.
TEST(regressions, kl_rank_product_of_singleton_blocks_is_zero) {
  for (std::int64_t n : {std::int64_t(3), (std::int64_t(1) << 18) + 3}) {
    std::vector<double> x(static_cast<std::size_t>(n)), g(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      x[i] = -2.04 + 0.645 * static_cast<double>(i) + 1e-3 * static_cast<double>(i % 7);
      g[i] = std::sin(0.37 * static_cast<double>(i) + 1.0);  // (varied v: r's rounding shows)
    }
    if (n == 3) {  // the audit's row
      x = {-2.0401783097541677, -1.3952489643767971, -0.2962228264851077};
      g = {0.3817342668576326, -0.3745125990267205, 0.19439326060896903};
    }
    for (double eps : {1e-8, 1e-300, kDenorm})
      for (bool descending : {false, true}) {
        const OpSpec s{Op::Rank, Reg::KL, descending, eps};
        const Forward<double> f = forward(x, 1, static_cast<index_t>(n), s);
        for (bool transpose : {true, false}) {
          const std::vector<double> r =
              product(x, f, g, 1, static_cast<index_t>(n), s, transpose);
          for (std::size_t i = 0; i < r.size(); ++i)
            if (r[i] != 0.0) {
              CHECK(r[i] == 0.0) << "n" << n << describe(s) << "transpose" << transpose << i
                                 << r[i];
              break;
            }
        }
      }
  }
}

// Bug (found by the fuzzer in CI): where 1/eps is finite but a kl sort
// block's steps k / eps pass DBL_MAX (eps = 2.5e-308, a block of 6), its
// outputs base - k / eps came out base - inf: the row [0, 2.7e-312, ~DBL_MAX,
// -DBL_MAX, 0, 0] sorted ascending gave +inf last, though every output lies in
// [min x, max x]. Fixed in soft_row.h (sort_kl_output_wide: at half scale
// where k / eps overflows). e^-x is dominated by e^DBL_MAX, so the row pools
// into one block: the output at k is k / eps - DBL_MAX (ascending), written
// here as (k - 4) / eps + (4 / eps - DBL_MAX) so that nothing overflows.
TEST(regressions, kl_sort_block_whose_steps_pass_the_largest_double) {
  const double dbl_max = std::numeric_limits<double>::max(), eps = 2.5075569267720519e-308;
  const std::vector<double> x{0.0, 2.7373745703402606e-312, 1.7976923052802614e308, -dbl_max,
                              0.0, 0.0};
  for (bool descending : {false, true}) {
    const OpSpec s{Op::Sort, Reg::KL, descending, eps};
    const Forward<double> f = forward(x, 1, 6, s);
    // descending: the top is ~DBL_MAX itself, and e^x is dominated by it
    const double top = descending ? 1.7976923052802614e308 : dbl_max;
    const double sign = descending ? 1.0 : -1.0;
    for (int k = 0; k < 6; ++k) {
      const double want = -sign * ((k - 4) / eps + (4 / eps - top));
      CHECK(std::isfinite(f.out[k])) << describe(s) << k << f.out[k];
      CHECK_NEAR(f.out[k], want, 4e-16 * dbl_max) << describe(s) << k;
    }
    const std::vector<double> g{0.3, -0.2, 0.7, 0.1, -0.5, 0.25};
    for (bool transpose : {true, false}) {
      const std::vector<double> r = product(x, f, g, 1, 6, s, transpose);
      for (int i = 0; i < 6; ++i) CHECK(std::isfinite(r[i])) << describe(s) << transpose << i;
    }
  }
}
