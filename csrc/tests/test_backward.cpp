// Backward: vjp and jvp (soft_product_batch) against central finite
// differences of the forward pass, adjointness, float32 against float64, and
// the closed forms at eps = 0 and eps = inf.
#include "helpers.h"

using namespace th;

namespace {

// f(x) = <g, op(x)> in double.
double objective(const std::vector<double>& x, const std::vector<double>& g, const OpSpec& s) {
  const index_t n = static_cast<index_t>(x.size());
  const Forward<double> f = forward(x, 1, n, s);
  double v = 0;
  for (index_t i = 0; i < n; ++i) v += g[i] * f.out[i];
  return v;
}

std::vector<double> apply_op(const std::vector<double>& x, const OpSpec& s) {
  return forward(x, 1, static_cast<index_t>(x.size()), s).out;
}

struct FdStats {
  long compared = 0, skipped = 0;
};
FdStats g_fd;

}  // namespace

TEST(backward, vjp_and_jvp_match_central_differences) {
  Rng rng(11);
  for (int n : {1, 2, 3, 5, 8, 13, 40, 170})
    for (int kind : {0, 1, 3})
      for (double eps : {0.02, 0.3, 1.0, 7.0, 300.0})
        for (const OpSpec& s : all_specs(eps)) {
          // The sort is not differentiable at ties (the one-sided derivatives
          // differ, the core returns one of them): no finite differences
          // there. The rank is symmetric in tied entries and differentiable.
          const bool fd_valid = !(kind == 1 && s.op == Op::Sort);
          // An irrational scale keeps integer ties off the kinks, where the
          // merge tests hold with equality (gap = eps * (m_a + m_b) / 2).
          const std::vector<double> x = random_row(rng, n, kind, 1.7320508075688772);
          std::vector<double> g(n), t(n);
          for (int i = 0; i < n; ++i) {
            g[i] = rng.normal();
            t[i] = rng.normal();
          }
          const Forward<double> f = forward(x, 1, n, s);
          const std::vector<double> vjp = product(x, f, g, 1, n, s, true);
          const std::vector<double> jvp = product(x, f, t, 1, n, s, false);
          const std::string ctx = describe(s) + " n=" + std::to_string(n) + " kind=" +
                                  std::to_string(kind);
          double gmax = 0;
          for (double v : vjp) gmax = std::max(gmax, std::fabs(v));
          const double h = 1e-6 * std::min(1.0, eps);
          // vjp, one coordinate at a time (capped for long rows).
          for (int j = 0; j < (fd_valid ? std::min(n, 24) : 0); ++j) {
            auto fd = [&](double step) {
              std::vector<double> xp = x, xm = x;
              xp[j] += step;
              xm[j] -= step;
              return (objective(xp, g, s) - objective(xm, g, s)) / (2 * step);
            };
            const double d1 = fd(h), d2 = fd(2 * h);
            const double tol = 2e-5 * (1.0 + gmax) * (1.0 + n / 40.0);
            if (std::fabs(d1 - d2) > tol) {  // a kink (block change) within 2h
              ++g_fd.skipped;
              continue;
            }
            ++g_fd.compared;
            CHECK_NEAR(vjp[j], d1, tol) << ctx << "vjp j" << j;
          }
          // jvp, along t.
          if (fd_valid) {
            std::vector<double> xp = x, xm = x, xp2 = x, xm2 = x;
            for (int i = 0; i < n; ++i) {
              xp[i] += h * t[i];
              xm[i] -= h * t[i];
              xp2[i] += 2 * h * t[i];
              xm2[i] -= 2 * h * t[i];
            }
            const std::vector<double> op = apply_op(xp, s), om = apply_op(xm, s);
            const std::vector<double> op2 = apply_op(xp2, s), om2 = apply_op(xm2, s);
            double jmax = 0;
            for (double v : jvp) jmax = std::max(jmax, std::fabs(v));
            const double tol = 2e-5 * (1.0 + jmax) * (1.0 + n / 40.0);
            bool smooth = true;
            for (int i = 0; i < n; ++i)
              smooth = smooth && std::fabs((op[i] - om[i]) / (2 * h) -
                                           (op2[i] - om2[i]) / (4 * h)) <= tol;
            if (!smooth) {
              ++g_fd.skipped;
            } else {
              ++g_fd.compared;
              for (int i = 0; i < n; ++i)
                CHECK_NEAR(jvp[i], (op[i] - om[i]) / (2 * h), tol) << ctx << "jvp i" << i;
            }
          }
          // Adjointness: <g, J t> = <J^T g, t>.
          // Both sides cancel terms of size |g| |t| |J|, |J| <= n / eps.
          double a = 0, b = 0, gn = 0, tn = 0;
          for (int i = 0; i < n; ++i) {
            a += g[i] * jvp[i];
            b += vjp[i] * t[i];
            gn += std::fabs(g[i]);
            tn += std::fabs(t[i]);
          }
          CHECK_NEAR(a, b, 1e-13 * gn * tn * (1.0 + n / std::min(eps, 1.0))) << ctx << "adjoint";
        }
  // Finite differences must have been checkable almost everywhere.
  CHECK(g_fd.skipped * 10 < g_fd.compared) << g_fd.skipped << "skipped of" << g_fd.compared;
  std::printf("  finite differences: %ld compared, %ld skipped at kinks\n", g_fd.compared,
              g_fd.skipped);
}

TEST(backward, float32_matches_float64) {
  Rng rng(12);
  for (int n : {3, 60, 161, 3000})
    for (double eps : {0.0, 0.1, 1.0, 50.0, kInf})
      for (const OpSpec& s : all_specs(eps)) {
        const std::vector<double> x = cast<double>(cast<float>(random_row(rng, n, n % 4)));
        std::vector<double> g(n);
        for (auto& v : g) v = static_cast<float>(rng.normal());
        const Forward<double> f = forward(x, 1, n, s);
        const Forward<float> f32 = forward(cast<float>(x), 1, n, s);
        for (bool transpose : {true, false}) {
          const std::vector<double> r = product(x, f, g, 1, n, s, transpose);
          const std::vector<float> r32 = product(cast<float>(x), f32, cast<float>(g), 1, n, s,
                                                 transpose);
          double m = 0;
          for (double v : r) m = std::max(m, std::fabs(v));
          for (int i = 0; i < n; ++i)
            CHECK_NEAR(r32[i], r[i], 1e-5 * (m + 1e-30)) << describe(s) << transpose << i;
        }
      }
}

TEST(backward, eps_zero_and_inf_closed_forms) {
  Rng rng(13);
  for (int n : {1, 2, 6, 160, 161, 999})
    for (int kind = 0; kind < 4; ++kind) {
      const std::vector<double> x = random_row(rng, n, kind);
      std::vector<double> g(n);
      for (auto& v : g) v = rng.normal();
      for (double eps : {0.0, kInf})
        for (const OpSpec& s : all_specs(eps)) {
          const Forward<double> f = forward(x, 1, n, s);
          const std::vector<double> vjp = product(x, f, g, 1, n, s, true);
          const std::vector<double> jvp = product(x, f, g, 1, n, s, false);
          const std::string ctx = describe(s) + " n=" + std::to_string(n);
          if (s.op == Op::Rank) {
            for (int i = 0; i < n; ++i) {
              CHECK(vjp[i] == 0.0) << ctx << vjp[i];  // +0 or -0
              CHECK(jvp[i] == 0.0) << ctx << jvp[i];
            }
            continue;
          }
          // Independent order: stable sort of x in the output's direction.
          std::vector<int> order(n);
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
            return s.descending ? x[a] > x[b] : x[a] < x[b];
          });
          if (eps == 0.0) {
            for (int i = 0; i < n; ++i) {
              CHECK_SAME(vjp[order[i]], g[i]) << ctx << "permutation vjp";
              CHECK_SAME(jvp[i], g[order[i]]) << ctx << "permutation jvp";
            }
          } else if (s.reg == Reg::L2) {
            const double m = sum_of(g.data(), n) / n;
            for (int i = 0; i < n; ++i) {
              CHECK_NEAR(vjp[i], m, 1e-14 * n) << ctx;
              CHECK_NEAR(jvp[i], m, 1e-14 * n) << ctx;
            }
          } else {
            // Softmax of x (descending) or -x (ascending).
            double mx = -kInf, z = 0, dot = 0;
            for (double v : x) mx = std::max(mx, s.descending ? v : -v);
            std::vector<double> p(n);
            for (int i = 0; i < n; ++i) z += p[i] = std::exp((s.descending ? x[i] : -x[i]) - mx);
            for (int i = 0; i < n; ++i) dot += (p[i] /= z) * g[i];
            const double gs = sum_of(g.data(), n);
            for (int i = 0; i < n; ++i) {
              CHECK_NEAR(vjp[i], p[i] * gs, 1e-13 * (1 + std::fabs(gs))) << ctx;
              CHECK_NEAR(jvp[i], dot, 1e-13 * n) << ctx;
            }
          }
        }
    }
}

TEST(backward, extreme_eps_and_magnitudes_stay_finite) {
  Rng rng(14);
  const double eps_grid[] = {kDenorm, 1e-300, 1e-30, 1e30, 1e300, kMax};
  for (int n : {2, 7, 161})
    for (double scale : {1e-300, 1e-5, 1.0, 1e100, 1e300})
      for (double eps : eps_grid)
        for (const OpSpec& s : all_specs(eps)) {
          const std::vector<double> x = random_row(rng, n, n % 4, scale);
          std::vector<double> g(n);
          for (auto& v : g) v = rng.normal();
          const Forward<double> f = forward(x, 1, n, s);
          for (bool transpose : {true, false}) {
            const std::vector<double> r = product(x, f, g, 1, n, s, transpose);
            // The rank's Jacobian is O(1/eps): at a subnormal eps its true
            // entries are beyond the double range and inf is their rounding.
            const bool representable = s.op == Op::Sort || eps >= 1e-300;
            for (int i = 0; i < n; ++i)
              CHECK(representable ? std::isfinite(r[i]) : !std::isnan(r[i]))
                  << describe(s) << "scale" << scale << "i" << i << r[i];
          }
        }
}

// soft_hvp_batch: the gradient of <c, J(x) t> with respect to x (double
// backward), against central differences of the jvp.
TEST(backward, hvp_matches_finite_differences_of_the_jvp) {
  Rng rng(15);
  long compared = 0, skipped = 0;
  for (int n : {1, 2, 3, 6, 11, 40})
    for (int kind : {0, 3})
      for (double eps : {0.0, 0.05, 0.4, 1.0, 9.0, kInf})
        for (const OpSpec& s : all_specs(eps)) {
          const std::vector<double> x = random_row(rng, n, kind, 1.7320508075688772);
          std::vector<double> c(n), t(n);
          for (int i = 0; i < n; ++i) {
            c[i] = rng.normal();
            t[i] = rng.normal();
          }
          const Forward<double> f = forward(x, 1, n, s);
          std::vector<double> hvp(n, sentinel<double>());
          softrank::soft_hvp_batch(x.data(), f.out.data(), f.perm.data(), f.block.data(), c.data(),
                                   t.data(), 1, n, s, hvp.data());
          auto objective = [&](const std::vector<double>& xx) {
            const Forward<double> ff = forward(xx, 1, n, s);
            const std::vector<double> j = product(xx, ff, t, 1, n, s, false);
            double v = 0;
            for (int i = 0; i < n; ++i) v += c[i] * j[i];
            return v;
          };
          double hmax = 0;
          for (double v : hvp) hmax = std::max(hmax, std::fabs(v));
          const double h = 1e-6 * (std::isfinite(eps) && eps > 0 ? std::min(1.0, eps) : 1.0);
          for (int j = 0; j < n; ++j) {
            CHECK(std::isfinite(hvp[j])) << describe(s) << j;
            auto fd = [&](double step) {
              std::vector<double> xp = x, xm = x;
              xp[j] += step;
              xm[j] -= step;
              return (objective(xp) - objective(xm)) / (2 * step);
            };
            const double d1 = fd(h), d2 = fd(2 * h);
            const double tol = 1e-4 * (1.0 + hmax) * (1.0 + n / 10.0);
            if (std::fabs(d1 - d2) > tol) {
              ++skipped;
              continue;
            }
            ++compared;
            CHECK_NEAR(hvp[j], d1, tol) << describe(s) << "n" << n << "j" << j;
          }
        }
  CHECK(skipped * 10 < compared) << skipped << compared;
  std::printf("  hvp finite differences: %ld compared, %ld skipped at kinks\n", compared, skipped);
}
