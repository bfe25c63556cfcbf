// Weighted isotonic regression (the public building block): against the
// min-max formula, its vjp against finite differences and the closed form,
// NaN rows, n = 0 and 1, extreme values and weights.
#include "helpers.h"
#include "softrank/isotonic.h"
#include "softrank/parallel.h"

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

namespace {

// Textbook PAV over block sums in long double: an implementation independent
// of the core's (no reference values, no chunks).
std::vector<LD> textbook_isotonic(const std::vector<double>& y, const std::vector<double>* w,
                                  bool increasing) {
  struct Block {
    LD sum, weight;
    int count;
  };
  std::vector<Block> stack;
  for (std::size_t i = 0; i < y.size(); ++i) {
    const LD wi = w ? static_cast<LD>((*w)[i]) : 1.0L;
    Block cur{wi * (increasing ? y[i] : -y[i]), wi, 1};
    while (!stack.empty() && stack.back().sum / stack.back().weight >= cur.sum / cur.weight) {
      cur = Block{cur.sum + stack.back().sum, cur.weight + stack.back().weight,
                  cur.count + stack.back().count};
      stack.pop_back();
    }
    stack.push_back(cur);
  }
  std::vector<LD> out;
  for (const Block& b : stack)
    for (int k = 0; k < b.count; ++k) out.push_back((increasing ? 1 : -1) * b.sum / b.weight);
  return out;
}

}  // namespace

namespace {

// Position i of a long test row of kind 0: a trend with noise (blocks of a
// few); 1: noise wider than a chunk (blocks across chunks); 2: a falling row
// (one block); 3: steps of 1000 (kl: every run a single position apart); 4:
// a trend with falling stretches over chunk boundaries. The trend runs the
// way of the fit.
double long_row_value(int kind, int i, bool increasing, Rng& rng) {
  const int chunk = softrank::kIsotonicChunk;
  const double t = increasing ? i : -i;
  return kind == 0   ? t + 5 * rng.normal()
         : kind == 1 ? t + 3 * chunk * rng.normal()
         : kind == 2 ? -t
         : kind == 3 ? 1000.0 * (i % 3) - 5 * t
                     : ((i + chunk / 2) / chunk % 2 ? -t : t) + rng.normal();
}

// A solution against its reference (tolerance tol), with valid blocks of
// bitwise-equal values; counts the blocks that span a chunk boundary.
void check_solution(const Iso<double>& one, const std::vector<LD>& ref, int n, double tol,
                    long long& spanning) {
  const int chunk = softrank::kIsotonicChunk;
  for (int i = 0; i < n; ++i) {
    CHECK_NEAR(one.sol[i], static_cast<double>(ref[i]), tol) << n << i;
    const index_t b = one.block[i];
    CHECK(b >= 0 && b <= i && one.block[b] == b) << n << i;
    if (i > 0 && b == one.block[i - 1]) CHECK_SAME(one.sol[i], one.sol[i - 1]);
    spanning += n > chunk && i % chunk == 0 && i > 0 && b != i;
  }
}

// The row solved by solve(y, w, rows) as three copies (the many-rows path,
// one row per task) and alone on one thread: the bits of `one`, the row
// alone on every thread (its chunks spread over them).
template <class Solve>
void check_row_paths(Solve solve, const std::vector<double>& y, const std::vector<double>* w,
                     int n, const Iso<double>& one) {
  std::vector<double> y3, w3;
  for (int r = 0; r < 3; ++r) {
    y3.insert(y3.end(), y.begin(), y.end());
    if (w) w3.insert(w3.end(), w->begin(), w->end());
  }
  const Iso<double> three = solve(y3, w ? &w3 : nullptr, 3);
  const int saved = softrank::get_num_threads();
  softrank::set_num_threads(1);
  const Iso<double> serial = solve(y, w, 1);
  softrank::set_num_threads(saved);
  for (int i = 0; i < n; ++i) {
    CHECK_SAME(three.sol[2 * n + i], one.sol[i]) << n << i;
    CHECK(three.block[2 * n + i] == one.block[i]);
    CHECK_SAME(serial.sol[i], one.sol[i]) << n << i;
  }
}

}  // namespace

TEST(isotonic, long_rows_pooled_in_chunks) {
  // Rows from kIsotonicChunkedMin positions are pooled in chunks joined at
  // their boundaries: the same solution as one pass, whatever the thread
  // count, and the same bits on the many-rows path (one row per thread) as
  // on the one-row path (the row's chunks spread over the threads).
  Rng rng(44);
  long long spanning = 0;
  for (int n : {softrank::kIsotonicChunkedMin - 1, softrank::kIsotonicChunkedMin, 100003})
    for (int kind : {0, 1, 2, 4})
      for (bool weighted : {false, true})
        for (bool increasing : {true, false}) {
          std::vector<double> y(n), w(n);
          for (int i = 0; i < n; ++i) {
            y[i] = long_row_value(kind, i, increasing, rng);
            w[i] = std::exp(rng.uniform(-2, 2));
          }
          const std::vector<double>* wp = weighted ? &w : nullptr;
          const Iso<double> one = isotonic(y, wp, 1, n, increasing);
          double scale = 0;
          for (double v : y) scale = std::max(scale, std::fabs(v));
          check_solution(one, textbook_isotonic(y, wp, increasing), n, 1e-12 * scale, spanning);
          check_row_paths(
              [&](const std::vector<double>& ys, const std::vector<double>* ws, int rows) {
                return isotonic(ys, ws, rows, n, increasing);
              },
              y, wp, n, one);
          // The vjp too: a lone long row's blocks are split over the threads.
          std::vector<double> g(n), g3, w3;
          for (double& v : g) v = rng.normal();
          for (int r = 0; r < 3; ++r) {
            g3.insert(g3.end(), g.begin(), g.end());
            w3.insert(w3.end(), w.begin(), w.end());
          }
          Iso<double> three;
          for (int r = 0; r < 3; ++r) {
            three.sol.insert(three.sol.end(), one.sol.begin(), one.sol.end());
            three.block.insert(three.block.end(), one.block.begin(), one.block.end());
          }
          const std::vector<double> vjp_one = isotonic_vjp(wp, one, g, 1, n);
          const std::vector<double> vjp_three =
              isotonic_vjp(weighted ? &w3 : nullptr, three, g3, 3, n);
          const int saved = softrank::get_num_threads();
          softrank::set_num_threads(1);
          const std::vector<double> vjp_serial = isotonic_vjp(wp, one, g, 1, n);
          softrank::set_num_threads(saved);
          double total = 0, total_g = 0;
          for (int i = 0; i < n; ++i) {
            CHECK_SAME(vjp_three[2 * n + i], vjp_one[i]) << n << kind << i;
            CHECK_SAME(vjp_serial[i], vjp_one[i]) << n << kind << i;
            total += vjp_one[i];
            total_g += g[i];
          }
          // Each block's gradient sums to the block's cotangent (and no
          // position is left unwritten by a split).
          CHECK_NEAR(total, total_g, 1e-9 * n);
        }
  CHECK(spanning > 100) << "too few blocks across chunks to test the merges:" << spanning;
  // A NaN in the last chunk poisons the whole row (and only it).
  std::vector<double> y(100003);
  for (std::size_t i = 0; i < y.size(); ++i) y[i] = static_cast<double>(i % 7);
  y.back() = kNaN;
  const Iso<double> r = isotonic(y, kNone, 1, static_cast<int>(y.size()), true);
  for (std::size_t i = 0; i < y.size(); ++i) CHECK(std::isnan(r.sol[i]) && r.block[i] == -1);
}

namespace {

// Textbook kl PAV in long double: a block's value is log sum exp(y) - log
// sum w, pooled by log-sum-exp (no references, no runs, no chunks).
std::vector<LD> textbook_isotonic_kl(const std::vector<double>& y, const std::vector<double>* w,
                                     bool increasing) {
  struct Block {
    LD lse, log_w;
    int count;
    LD value() const { return lse - log_w; }
  };
  auto log_add_exp = [](LD a, LD b) {
    const LD m = std::max(a, b);
    return m + std::log(std::exp(a - m) + std::exp(b - m));
  };
  std::vector<Block> stack;
  for (std::size_t i = 0; i < y.size(); ++i) {
    Block cur{static_cast<LD>(y[i]), w ? std::log(static_cast<LD>((*w)[i])) : 0.0L, 1};
    while (!stack.empty() && (increasing ? stack.back().value() >= cur.value()
                                         : stack.back().value() <= cur.value())) {
      cur = Block{log_add_exp(stack.back().lse, cur.lse), log_add_exp(stack.back().log_w, cur.log_w),
                  cur.count + stack.back().count};
      stack.pop_back();
    }
    stack.push_back(cur);
  }
  std::vector<LD> out;
  for (const Block& b : stack)
    for (int k = 0; k < b.count; ++k) out.push_back(b.value());
  return out;
}

Iso<double> isotonic_kl(const std::vector<double>& y, const std::vector<double>* w,
                        std::int64_t rows, index_t n, bool increasing) {
  Iso<double> r;
  const std::size_t size = static_cast<std::size_t>(rows) * static_cast<std::size_t>(n);
  r.sol.assign(size, sentinel<double>());
  r.block.assign(size, -7);
  softrank::isotonic_kl_forward_batch(y.data(), w ? w->data() : nullptr, rows, n, increasing,
                                      r.sol.data(), r.block.data());
  return r;
}

}  // namespace

TEST(isotonic, kl_runs_chunks_and_extremes) {
  // The kl loop keeps sums relative to per-run references (runs spanning at
  // most 300 in y) and pools long rows in chunks: the same solution as a
  // textbook log-sum-exp PAV, on rows whose values span far more than a run
  // (many references, blocks across runs and across chunks), with weights
  // spanning 2^-500..2^500 (the test on logs) and at the scales that are
  // rescaled; the same bits for any thread count and on both row paths.
  Rng rng(45);
  long long spanning = 0;
  for (int n : {1000, softrank::kIsotonicChunkedMin, 100003})
    for (int kind = 0; kind < 5; ++kind)
      for (bool weighted : {false, true})
        for (bool increasing : {true, false}) {
          std::vector<double> y(n), w(n);
          for (int i = 0; i < n; ++i) {
            y[i] = long_row_value(kind, i, increasing, rng);
            w[i] = kind == 3 ? std::ldexp(1.0, static_cast<int>(rng.uniform(-500, 500)))
                             : std::exp(rng.uniform(-2, 2));
          }
          const std::vector<double>* wp = weighted ? &w : nullptr;
          const std::vector<LD> ref = textbook_isotonic_kl(y, wp, increasing);
          const Iso<double> one = isotonic_kl(y, wp, 1, n, increasing);
          double scale = 1;
          for (LD v : ref) scale = std::max(scale, std::fabs(static_cast<double>(v)));
          check_solution(one, ref, n, 1e-12 * scale, spanning);
          check_row_paths(
              [&](const std::vector<double>& ys, const std::vector<double>* ws, int rows) {
                return isotonic_kl(ys, ws, rows, n, increasing);
              },
              y, wp, n, one);
        }
  CHECK(spanning > 100) << "too few blocks across chunks to test the merges:" << spanning;
  // Subnormal weights next to large ones (found by the fuzzer: scaling the
  // weights to a largest one near 1 flushed them to the smallest double).
  {
    std::vector<double> ys{4.3e-82, 6e-197, 1e-4, 8.8e-121, 1.3e-235, 2e-43, 3e-158, 2.6e-274,
                           -595821443.5137254, -595821443.5137254};
    std::vector<double> ws{8.8e-121, 5.958e8, 3.8e-308, 3.0, 5.958e8, 1.36e-312, 2e-43, 1.0,
                           8.2054e-320, 1.2599e-321};
    for (bool increasing : {false, true}) {
      const std::vector<LD> want = textbook_isotonic_kl(ys, &ws, increasing);
      const Iso<double> got = isotonic_kl(ys, &ws, 1, 10, increasing);
      for (int i = 0; i < 10; ++i)
        CHECK_NEAR(got.sol[i], static_cast<double>(want[i]),
                   1e-12 * std::fabs(static_cast<double>(want[i])) + 1e-12)
            << increasing << i;
    }
  }
  // Weights near the largest double: rescaled, the values shift back exactly.
  std::vector<double> y{0.5, 0.25, 2.0, 1.0}, huge{1e308, 1e308, 1e307, 1e308};
  const std::vector<LD> want = textbook_isotonic_kl(y, &huge, true);
  const Iso<double> got = isotonic_kl(y, &huge, 1, 4, true);
  for (int i = 0; i < 4; ++i) CHECK_NEAR(got.sol[i], static_cast<double>(want[i]), 1e-12 * 710);
  // A NaN in the last chunk poisons the whole row (and only it).
  std::vector<double> bad(100003);
  for (std::size_t i = 0; i < bad.size(); ++i) bad[i] = static_cast<double>(i % 7);
  bad.back() = kNaN;
  const Iso<double> r = isotonic_kl(bad, kNone, 1, static_cast<int>(bad.size()), true);
  for (std::size_t i = 0; i < bad.size(); ++i) CHECK(std::isnan(r.sol[i]) && r.block[i] == -1);
}
