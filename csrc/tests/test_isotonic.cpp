// Weighted isotonic regression (the public building block): against the
// min-max formula, its vjp against finite differences and the closed form,
// NaN rows, n = 0 and 1, extreme values and weights.
#include "helpers.h"

using namespace th;

namespace {

const std::vector<double>* const kNone = nullptr;

}  // namespace

TEST(isotonic, matches_minmax_formula) {
  Rng rng(41);
  for (int n = 0; n <= 10; ++n)
    for (int kind = 0; kind < 4; ++kind)
      for (bool weighted : {false, true})
        for (bool increasing : {true, false}) {
          const std::vector<double> y = random_row(rng, n, kind, 2.0);
          std::vector<double> w(n);
          for (auto& v : w) v = std::exp(rng.uniform(-3, 3));
          const std::vector<LD> ref = minmax_isotonic(y, weighted ? &w : nullptr, increasing);
          const Iso<double> r = isotonic(y, weighted ? &w : nullptr, 1, n, increasing);
          const std::vector<float> y32 = cast<float>(y), w32 = cast<float>(w);
          const Iso<float> r32 = isotonic(y32, weighted ? &w32 : nullptr, 1, n, increasing);
          for (int i = 0; i < n; ++i) {
            CHECK_NEAR(r.sol[i], static_cast<double>(ref[i]), 1e-13 * 6) << n << kind << weighted << i;
            CHECK_NEAR(r32.sol[i], static_cast<double>(ref[i]), 2e-6 * 6) << n << kind << weighted << i;
            const index_t b = r.block[i];
            CHECK(b >= 0 && b <= i && r.block[b] == b);
            if (i > 0 && b == r.block[i - 1]) CHECK_SAME(r.sol[i], r.sol[i - 1]);
          }
        }
}

TEST(isotonic, vjp_matches_finite_differences_and_closed_form) {
  Rng rng(42);
  for (int n : {1, 2, 5, 12, 40})
    for (bool weighted : {false, true})
      for (bool increasing : {true, false}) {
        const std::vector<double> y = random_row(rng, n, 0, 2.0);
        std::vector<double> w(n), g(n);
        for (auto& v : w) v = std::exp(rng.uniform(-2, 2));
        for (auto& v : g) v = rng.normal();
        const std::vector<double>* wp = weighted ? &w : nullptr;
        const Iso<double> r = isotonic(y, wp, 1, n, increasing);
        const std::vector<double> grad = isotonic_vjp(wp, r, g, 1, n);
        auto objective = [&](const std::vector<double>& yy) {
          const Iso<double> rr = isotonic(yy, wp, 1, n, increasing);
          double v = 0;
          for (int i = 0; i < n; ++i) v += g[i] * rr.sol[i];
          return v;
        };
        for (int j = 0; j < n; ++j) {
          const double h = 1e-6;
          std::vector<double> yp = y, ym = y;
          yp[j] += h;
          ym[j] -= h;
          CHECK_NEAR(grad[j], (objective(yp) - objective(ym)) / (2 * h), 1e-6 * (1 + n / 10.0))
              << n << weighted << increasing << j;
        }
        // Closed form: grad_j = w_j / W_B * sum_B g.
        for (int i = 0; i < n; ++i) {
          double sg = 0, sw = 0;
          for (int k = 0; k < n; ++k)
            if (r.block[k] == r.block[i]) {
              sg += g[k];
              sw += weighted ? w[k] : 1.0;
            }
          CHECK_NEAR(grad[i], (weighted ? w[i] : 1.0) * sg / sw, 1e-14 * n) << n << i;
        }
      }
}

TEST(isotonic, nan_rows_n0_n1_and_extremes) {
  // NaN / inf rows: NaN solution, block_start -1, NaN gradient; other rows intact.
  for (double bad : {kNaN, kInf, -kInf}) {
    std::vector<double> y{1, 2, 3, bad, 0, 1, 5, 4, 3};
    const Iso<double> r = isotonic(y, kNone, 3, 3, true);
    std::vector<double> g(9, 1.0);
    const std::vector<double> grad = isotonic_vjp(kNone, r, g, 3, 3);
    for (int i = 3; i < 6; ++i) CHECK(std::isnan(r.sol[i]) && r.block[i] == -1 && std::isnan(grad[i]));
    CHECK(r.sol[0] == 1 && r.sol[1] == 2 && r.sol[2] == 3);
    CHECK(r.sol[6] == 4 && r.sol[7] == 4 && r.sol[8] == 4) << r.sol[6];  // pooled
  }
  // n = 0, n = 1.
  std::vector<double> empty;
  CHECK(isotonic(empty, kNone, 4, 0, true).sol.empty());
  for (double v : {0.0, -0.0, 1e300, -kMax, kDenorm}) {
    std::vector<double> y{v}, w{3.0}, g{2.0};
    const Iso<double> r = isotonic(y, &w, 1, 1, false);
    CHECK(r.sol[0] == v && r.block[0] == 0);
    CHECK_SAME(isotonic_vjp(&w, r, g, 1, 1)[0], 2.0);
  }
  // Extreme values and weights: the solution is a weighted mean of y, so it
  // stays within [min y, max y] and finite.
  Rng rng(43);
  for (double scale : {1e-300, 1.0, 1e300, kMax})
    for (double wscale : {1e-300, 1.0, 1e300})
      for (int n : {2, 9, 300}) {
        std::vector<double> y(n), w(n);
        for (int i = 0; i < n; ++i) {
          y[i] = scale * (rng.integer(0, 1) ? 1.0 : -1.0) * rng.uniform(0.5, 1.0);
          w[i] = wscale * rng.uniform(0.5, 1.0);
        }
        double lo = kInf, hi = -kInf;
        for (double v : y) lo = std::min(lo, v), hi = std::max(hi, v);
        for (bool increasing : {true, false}) {
          const Iso<double> r = isotonic(y, &w, 1, n, increasing);
          for (int i = 0; i < n; ++i) {
            CHECK(std::isfinite(r.sol[i]) && r.sol[i] >= lo && r.sol[i] <= hi)
                << "scale" << scale << "wscale" << wscale << "n" << n << check::fmt(r.sol[i]);
            if (i > 0)
              CHECK(increasing ? r.sol[i] >= r.sol[i - 1] : r.sol[i] <= r.sol[i - 1])
                  << "order" << scale << wscale << n;
          }
          std::vector<double> g(n, 1.0);
          const std::vector<double> grad = isotonic_vjp(&w, r, g, 1, n);
          for (int i = 0; i < n; ++i)
            CHECK(std::isfinite(grad[i])) << "grad" << scale << wscale << n << grad[i];
        }
      }
}
