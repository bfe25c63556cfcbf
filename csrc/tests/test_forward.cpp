// Forward pass: against the long-double textbook reference (tiny n), the
// optimality certificate (any n), invariants, and the special strengths.
#include "helpers.h"

using namespace th;

namespace {

const double kEpsGrid[] = {1e-3, 0.05, 0.3, 1.0, 4.0, 100.0, 1e4};

// Output scale of an operator on x: ranks are O(n), sorts O(max|x| + n/eps).
double output_scale(const std::vector<double>& x, const OpSpec& s) {
  const double n = static_cast<double>(x.size());
  if (s.op == Op::Rank) return n;
  double m = 1.0;
  for (double v : x) m = std::max(m, std::fabs(v));
  return m + (std::isfinite(s.eps) && s.eps > 0 ? n / s.eps : 0.0);
}

template <class T>
void compare_with_reference(const std::vector<double>& x64, const OpSpec& s, double rel) {
  const std::vector<T> x = cast<T>(x64);
  std::vector<double> xw(x.begin(), x.end());  // the values the core sees
  const index_t n = static_cast<index_t>(x.size());
  const Forward<T> f = forward(x, 1, n, s);
  const std::vector<LD> ref = reference(xw, s);
  const double tol = rel * output_scale(xw, s);
  for (index_t i = 0; i < n; ++i)
    CHECK_NEAR(static_cast<double>(f.out[i]), static_cast<double>(ref[i]), tol)
        << describe(s) << "n" << n << "i" << i << (sizeof(T) == 4 ? "float32" : "float64");
}

}  // namespace

TEST(pav, soft_ops_match_long_double_minmax_reference) {
  Rng rng(1);
  for (int n = 1; n <= 9; ++n)
    for (int kind = 0; kind < 4; ++kind)
      for (double eps : kEpsGrid)
        for (const OpSpec& s : all_specs(eps)) {
          // kl sorts exponentiate x: keep x moderate so the reference's own
          // exp/log arithmetic is exact enough.
          const std::vector<double> x = random_row(rng, n, kind, kind == 1 ? 0.7 : 1.5);
          compare_with_reference<double>(x, s, 1e-10);
          compare_with_reference<float>(x, s, 3e-6);
        }
}

TEST(pav, optimality_certificate_any_n) {
  Rng rng(2);
  for (int n : {1, 2, 3, 5, 8, 17, 64, 161, 500, 2000})
    for (int kind = 0; kind < 4; ++kind)
      for (double eps : kEpsGrid)
        for (const OpSpec& s : all_specs(eps)) {
          const std::vector<double> x = random_row(rng, n, kind, 2.0);
          const Forward<double> f = forward(x, 1, n, s);
          std::vector<double> out(f.out.begin(), f.out.end());
          const Certificate c = certify(x, out, s);
          const std::string ctx = describe(s) + " n=" + std::to_string(n) + " kind=" +
                                  std::to_string(kind);
          CHECK(c.majorization <= 1e-13) << ctx << check::fmt(static_cast<double>(c.majorization));
          CHECK(c.total <= 1e-13) << ctx << check::fmt(static_cast<double>(c.total));
          CHECK(c.inequality <= 1e-12) << ctx << check::fmt(static_cast<double>(c.inequality));
        }
}

TEST(pav, invariants_row_sums_bounds_monotone_ties) {
  Rng rng(3);
  const double grid[] = {0.0, 1e-300, 1e-12, 1e-3, 1.0, 1e3, 1e300, kInf};
  for (int n : {1, 2, 3, 7, 33, 160, 161, 1000})
    for (int kind = 0; kind < 4; ++kind)
      for (double eps : grid)
        for (const OpSpec& s : all_specs(eps)) {
          const std::vector<double> x = random_row(rng, n, kind, 3.0);
          const Forward<double> f = forward(x, 1, n, s);
          const std::string ctx = describe(s) + " n=" + std::to_string(n);
          double lo = kInf, hi = -kInf, xsum = 0;
          for (double v : x) {
            lo = std::min(lo, v);
            hi = std::max(hi, v);
            xsum += v;
          }
          double sum = 0;
          for (int i = 0; i < n; ++i) {
            const double o = f.out[i];
            CHECK(std::isfinite(o)) << ctx << "i" << i;
            sum += o;
            if (s.op == Op::Rank) {
              CHECK(o >= 1.0 - 1e-9 * n && o <= n + 1e-9 * n) << ctx << "rank" << o;
            } else {
              const double slack = 1e-12 * std::max(1.0, std::max(std::fabs(lo), std::fabs(hi)));
              CHECK(o >= lo - slack && o <= hi + slack) << ctx << "sort" << o;
            }
          }
          if (s.op == Op::Rank)
            CHECK_NEAR(sum, 0.5 * n * (n + 1.0), 1e-12 * n * n) << ctx;
          else if (s.reg == Reg::L2)
            CHECK_NEAR(sum, xsum, 1e-12 * n * (hi - lo + 1.0)) << ctx;
          // Monotone: ranks follow x (or -x); sorted outputs are ordered.
          const double sign = s.descending ? -1.0 : 1.0;
          for (int i = 0; i < n; ++i)
            for (int j = 0; j < n && s.op == Op::Rank && n <= 161; ++j) {
              if (x[i] < x[j])
                CHECK(sign * (f.out[j] - f.out[i]) >= -1e-12 * n) << ctx << i << j;
              if (x[i] == x[j]) CHECK_SAME(f.out[i], f.out[j]) << ctx << "tie" << i << j;
            }
          if (s.op == Op::Sort)
            for (int i = 0; i + 1 < n; ++i)
              CHECK(sign * (f.out[i + 1] - f.out[i]) >= -1e-12 * (hi - lo + 1.0)) << ctx << i;
          // block_start is a partition into runs [s, e) of sorted positions.
          for (int i = 0; i < n; ++i) {
            const index_t b = f.block[i];
            CHECK(b >= 0 && b <= i && f.block[b] == b && (i == 0 || b == f.block[i - 1] || b == i))
                << ctx << "block_start" << i << b;
          }
        }
}

TEST(special, eps_zero_is_the_hard_operator) {
  Rng rng(4);
  for (int n : {1, 2, 5, 31, 160, 161, 700})
    for (int kind = 0; kind < 4; ++kind)
      for (const OpSpec& s : all_specs(0.0)) {
        const std::vector<double> x = random_row(rng, n, kind);
        const std::vector<LD> ref = reference(x, s);
        const std::vector<LD> ref32 = reference(cast<double>(cast<float>(x)), s);
        const Forward<double> f = forward(x, 1, n, s);
        const Forward<float> f32 = forward(cast<float>(x), 1, n, s);
        for (int i = 0; i < n; ++i) {
          // (== rather than bitwise: x' = -x + 0.0 drops the sign of zero, so
          // an ascending hard sort may return -0.0 for +0.0.)
          CHECK(f.out[i] == static_cast<double>(ref[i])) << describe(s) << n << i;
          if (s.op == Op::Rank) CHECK_SAME(f.out[i], static_cast<double>(ref[i]));
          if (s.op == Op::Rank)  // float32 rounding may create ties: its own reference
            CHECK_SAME(f32.out[i], static_cast<float>(ref32[i])) << describe(s) << n << i;
        }
      }
}

TEST(special, eps_inf_is_the_limit) {
  Rng rng(5);
  for (int n : {1, 2, 5, 160, 161, 3000})
    for (int kind = 0; kind < 4; ++kind)
      for (const OpSpec& s : all_specs(kInf)) {
        const std::vector<double> x = random_row(rng, n, kind, 5.0);
        const std::vector<LD> ref = reference(x, s);
        const Forward<double> f = forward(x, 1, n, s);
        for (int i = 0; i < n; ++i) {
          if (s.op == Op::Rank)
            CHECK_SAME(f.out[i], 0.5 * (n + 1.0)) << describe(s);
          else
            CHECK_NEAR(f.out[i], static_cast<double>(ref[i]), 1e-13 * 5 * n) << describe(s);
        }
      }
}

TEST(special, large_eps_tends_to_limit_small_eps_to_hard) {
  Rng rng(6);
  for (int n : {2, 9, 200})
    for (const OpSpec& s : all_specs(1.0)) {
      const std::vector<double> x = random_row(rng, n, 0);
      OpSpec big = s, small = s, hard = s, inf = s;
      big.eps = 1e12;
      small.eps = 1e-12;
      hard.eps = 0.0;
      inf.eps = kInf;
      const Forward<double> fb = forward(x, 1, n, big), fi = forward(x, 1, n, inf);
      const Forward<double> fs = forward(x, 1, n, small), fh = forward(x, 1, n, hard);
      for (int i = 0; i < n; ++i) {
        CHECK_NEAR(fb.out[i], fi.out[i], 1e-9 * n) << describe(s) << "large eps";
        // l2 is piecewise exact: at eps far below the gaps it is the hard
        // operator exactly (kl only tends to it).
        if (s.reg == Reg::L2)
          CHECK_SAME(fs.out[i], fh.out[i]) << describe(s) << "small eps";
        else
          CHECK_NEAR(fs.out[i], fh.out[i], 1e-9 * n) << describe(s) << "small eps";
      }
    }
}

TEST(special, n0_and_n1) {
  const double grid[] = {0.0, kDenorm, 1e-300, 1.0, 1e300, kMax, kInf};
  for (double eps : grid)
    for (const OpSpec& s : all_specs(eps)) {
      // n = 0 with rows > 0 and rows = 0 with n > 0: nothing is written.
      std::vector<double> empty;
      Forward<double> f0 = forward(empty, 5, 0, s);
      CHECK(f0.out.empty());
      Forward<double> fr0 = forward(empty, 0, 7, s);
      CHECK(fr0.out.empty());
      std::vector<double> g0 = product(empty, f0, empty, 5, 0, s, true);
      CHECK(g0.empty());
      for (double v : {0.0, -0.0, 1.5, -1e300, kDenorm, kMax, -kMax}) {
        std::vector<double> x{v};
        Forward<double> f = forward(x, 1, 1, s);
        if (s.op == Op::Rank)
          CHECK_SAME(f.out[0], 1.0) << describe(s) << v;
        else
          CHECK(f.out[0] == v) << describe(s) << check::fmt(v) << check::fmt(f.out[0]);
        CHECK(f.perm[0] == 0 && f.block[0] == 0);
        std::vector<double> g{2.5};
        for (bool transpose : {true, false}) {
          std::vector<double> r = product(x, f, g, 1, 1, s, transpose);
          CHECK(r[0] == (s.op == Op::Rank ? 0.0 : 2.5)) << describe(s) << v << transpose << r[0];
        }
      }
    }
}

TEST(special, nan_and_inf_rows_are_nan_and_leave_other_rows_alone) {
  Rng rng(7);
  const double bad_values[] = {kNaN, kInf, -kInf, -kNaN};
  for (int n : {1, 3, 160, 161, 5000})
    for (double bad : bad_values)
      for (double eps : {0.0, 0.5, kInf})
        for (const OpSpec& s : all_specs(eps)) {
          const int rows = 3;
          std::vector<double> x;
          for (int r = 0; r < rows; ++r) {
            std::vector<double> row = random_row(rng, n, r);
            x.insert(x.end(), row.begin(), row.end());
          }
          x[static_cast<std::size_t>(n) + static_cast<std::size_t>(rng.integer(0, n - 1))] = bad;
          const Forward<double> f = forward(x, rows, n, s);
          const Forward<float> f32 = forward(cast<float>(x), rows, n, s);
          std::vector<double> g(x.size());
          for (auto& v : g) v = rng.normal();
          for (bool transpose : {true, false}) {
            const std::vector<double> r = product(x, f, g, rows, n, s, transpose);
            for (int i = 0; i < n; ++i) CHECK(std::isnan(r[n + i])) << describe(s) << "grad";
          }
          for (int i = 0; i < n; ++i) {
            CHECK(std::isnan(f.out[n + i]) && std::isnan(f32.out[n + i])) << describe(s);
            CHECK(f.block[n + i] == -1 && f.perm[n + i] == i) << describe(s);
          }
          // The other rows are bitwise what they are alone.
          for (int r : {0, 2}) {
            std::vector<double> row(x.begin() + r * n, x.begin() + (r + 1) * n);
            const Forward<double> alone = forward(row, 1, n, s);
            for (int i = 0; i < n; ++i) CHECK_SAME(f.out[r * n + i], alone.out[i]) << describe(s);
          }
        }
}

TEST(special, ties_zeros_and_denormals) {
  const std::vector<std::vector<double>> rows = {
      {0.0, -0.0, 0.0, -0.0},
      {kDenorm, -kDenorm, 0.0, 2 * kDenorm, kDenorm},
      {1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0},
      {3.0, 1.0, 3.0, 2.0, 1.0, 3.0},
      {1e300, -1e300, 1e300, 0.0, -1e300},
      {1e-300, 2e-300, 1e-300, 0.0}};
  const double grid[] = {0.0, kDenorm, 1e-300, 1e-3, 1.0, 1e3, 1e300, kMax, kInf};
  for (const auto& x : rows)
    for (double eps : grid)
      for (const OpSpec& s : all_specs(eps)) {
        const int n = static_cast<int>(x.size());
        const Forward<double> f = forward(x, 1, n, s);
        const Forward<float> f32 = forward(cast<float>(x), 1, n, s);
        bool finite32 = true;
        for (double v : x) finite32 = finite32 && std::isfinite(static_cast<float>(v));
        std::vector<double> g(x.size(), 1.0);
        g[0] = -2.0;
        const std::vector<double> r = product(x, f, g, 1, n, s, true);
        double sum = 0;
        // The rank's Jacobian is O(1/eps): at a subnormal eps the gradient of
        // tied entries is beyond the double range (inf is its rounding).
        const bool representable = s.op == Op::Sort || eps >= 1e-300;
        for (int i = 0; i < n; ++i) {
          CHECK(std::isfinite(f.out[i])) << describe(s) << i << f.out[i];
          CHECK(representable ? std::isfinite(r[i]) : !std::isnan(r[i])) << describe(s) << i << r[i];
          // float32 rows with 1e300 hold inf (a non-finite row): all NaN.
          if (finite32)
            CHECK(std::isfinite(f32.out[i])) << describe(s) << "float32" << i;
          else
            CHECK(std::isnan(f32.out[i])) << describe(s) << "float32" << i;
          sum += f.out[i];
          if (s.op == Op::Rank)
            for (int j = 0; j < n; ++j)
              if (x[i] == x[j]) CHECK_SAME(f.out[i], f.out[j]) << describe(s) << "tie" << i << j;
        }
        if (s.op == Op::Rank) CHECK_NEAR(sum, 0.5 * n * (n + 1), 1e-12 * n * n) << describe(s);
      }
}

TEST(special, float32_matches_float64_on_representable_input) {
  Rng rng(8);
  for (int n : {1, 4, 100, 160, 161, 2500})
    for (int kind = 0; kind < 4; ++kind)
      for (double eps : {0.0, 0.01, 1.0, 100.0, kInf})
        for (const OpSpec& s : all_specs(eps)) {
          const std::vector<double> x = cast<double>(cast<float>(random_row(rng, n, kind)));
          const Forward<double> f = forward(x, 1, n, s);
          const Forward<float> f32 = forward(cast<float>(x), 1, n, s);
          for (int i = 0; i < n; ++i) {
            CHECK(f.perm[i] == f32.perm[i] && f.block[i] == f32.block[i]) << describe(s) << i;
            // Same double arithmetic, narrowed once at the end.
            CHECK_SAME(f32.out[i], static_cast<float>(f.out[i])) << describe(s) << i;
          }
        }
}
