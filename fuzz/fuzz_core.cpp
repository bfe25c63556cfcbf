// libFuzzer target for the softrank C++ core (csrc/softrank/batched.h).
//
// Input layout (every byte string is a valid input):
//   byte 0  flags: bit 0 op (rank/sort), bit 1 reg (l2/kl), bit 2 descending,
//           bit 3 float32, bits 4-5 mode (0: soft op; 1: isotonic;
//           2: weighted isotonic; 3: projection onto the permutahedron;
//           l2, or kl with bit 1), bits 6-7 value
//           encoding (0: raw doubles,
//           1: a table of special values, 2: small integers (ties), 3: raw
//           floats)
//   byte 1  eps: < 224 picks from a table of strengths (0 ... 1e300, DBL_MAX,
//           inf, subnormals); otherwise the next 8 bytes are a raw double
//           (|.|, NaN -> 0)
//   byte 2  rows - 1 (mod 4)
//   rest    the values, rows * n of them (n = what fits), encoded as above
//
// Oracles (any violation aborts with a message; the sanitizers catch memory
// errors and undefined behaviour):
//   - a row holding NaN or +-inf: all-NaN output, block_start -1, NaN gradient
//   - finite rows: finite outputs; ranks in [1, n] summing to n(n+1)/2 and
//     monotone in x, tied x with bitwise-equal ranks; sorted outputs within
//     [min x, max x], monotone, l2 sum preserved; block_start a partition
//   - vjp and jvp: no NaN for finite rows (the rank's O(1/eps) Jacobian may
//     overflow to inf at subnormal eps), adjoint <g, J t> = <J^T g, t>;
//     the double-backward product has no NaN either
//   - rows are independent: a row computed in a batch is bitwise the row
//     computed alone
//   - isotonic: finite, ordered, within [min y, max y], weighted sum kept,
//     the vjp conserves the cotangent's sum; kl: finite, ordered, within
//     [min (y - log w), max (y - log w)] (each block's value is a log of a
//     ratio of sums, between the smallest and largest term ratios)
//   - the projection onto the permutahedron: see check_projection
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "softrank/batched.h"
#include "softrank/parallel.h"

using softrank::index_t;
using softrank::Op;
using softrank::OpSpec;
using softrank::Reg;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kMax = std::numeric_limits<double>::max();
constexpr double kMin = std::numeric_limits<double>::min();
constexpr double kDenorm = std::numeric_limits<double>::denorm_min();

const double kEpsTable[] = {0.0,  kDenorm, 1e-320, kMin, 1e-300, 1e-100, 1e-12, 1e-6,
                            1e-3, 0.01,    0.1,    0.5,  1.0,    2.0,    10.0,  1e3,
                            1e6,  1e12,    1e100,  1e300, kMax,  kInf,   3e-310, 0.3};
const double kValueTable[] = {0.0,    -0.0,    1.0,   -1.0,    2.0,    0.5,   1e300,  -1e300,
                              kMax,   -kMax,   kDenorm, -kDenorm, kMin, 1e-300, kNaN,   kInf,
                              -kInf,  3.0,     1e-10, 1e10,    1e308,  -1e308, 7.0,    -7.0,
                              1e-320, 2e-320,  1e38,  3.4e38,  -3.4e38, 1e-45,  0.1,    1e-5};
constexpr int kValueTableSize = sizeof(kValueTable) / sizeof(kValueTable[0]);

[[noreturn]] void fail(const char* what, const OpSpec& s, index_t n, int i, double a, double b) {
  std::fprintf(stderr,
               "ORACLE FAILED: %s  op=%s reg=%s %s eps=%.17g n=%d i=%d values %.17g %.17g\n",
               what, s.op == Op::Rank ? "rank" : "sort", s.reg == Reg::L2 ? "l2" : "kl",
               s.descending ? "desc" : "asc", s.eps, static_cast<int>(n), i, a, b);
  std::abort();
}

struct Reader {
  const std::uint8_t* p;
  std::size_t left;
  bool take(void* out, std::size_t k) {
    if (left < k) return false;
    std::memcpy(out, p, k);
    p += k;
    left -= k;
    return true;
  }
};

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// One soft operator on a batch; checks every oracle.
template <class T>
void check_soft(const std::vector<T>& x, std::int64_t rows, index_t n, const OpSpec& s) {
  const std::size_t size = x.size();
  std::vector<T> out(size), vjp(size), jvp(size), hvp(size), g(size), t(size);
  std::vector<index_t> perm(size), block(size);
  softrank::soft_forward_batch(x.data(), rows, n, s, out.data(), perm.data(), block.data());
  for (std::size_t i = 0; i < size; ++i) {
    // Cotangent and tangent: deterministic, varied, moderate.
    g[i] = static_cast<T>(std::sin(1.0 + 0.7 * static_cast<double>(i)));
    t[i] = static_cast<T>(std::cos(0.3 + 1.3 * static_cast<double>(i)));
  }
  softrank::soft_product_batch(x.data(), out.data(), perm.data(), block.data(), g.data(), rows, n,
                               s, true, vjp.data());
  softrank::soft_product_batch(x.data(), out.data(), perm.data(), block.data(), t.data(), rows, n,
                               s, false, jvp.data());
  softrank::soft_hvp_batch(x.data(), out.data(), perm.data(), block.data(), g.data(), t.data(),
                           rows, n, s, hvp.data());
  const bool f32 = sizeof(T) == 4;
  const double rel = f32 ? 2e-5 : 1e-10;
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::size_t off = static_cast<std::size_t>(r) * static_cast<std::size_t>(n);
    const T* xr = x.data() + off;
    const T* o = out.data() + off;
    const index_t* b = block.data() + off;
    bool finite = true;
    double lo = kInf, hi = -kInf;
    long double xsum = 0.0L;  // (long double: means of values near DBL_MAX)
    for (index_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(xr[i]);
      finite = finite && std::isfinite(v);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    if (!finite) {
      for (index_t i = 0; i < n; ++i) {
        if (!std::isnan(static_cast<double>(o[i]))) fail("non-finite row not NaN", s, n, i, o[i], 0);
        if (b[i] != -1) fail("non-finite row block_start", s, n, i, b[i], 0);
        if (!std::isnan(static_cast<double>(vjp[off + i])) ||
            !std::isnan(static_cast<double>(jvp[off + i])))
          fail("non-finite row gradient not NaN", s, n, i, vjp[off + i], jvp[off + i]);
      }
      continue;
    }
    const double xmax = std::max(std::fabs(lo), std::fabs(hi));
    for (index_t i = 0; i < n; ++i) xsum += static_cast<long double>(xr[i]) / n;
    long double sum = 0.0L;
    for (index_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(o[i]);
      if (!std::isfinite(v)) fail("finite row, non-finite output", s, n, i, v, xr[i]);
      sum += s.op == Op::Rank ? static_cast<long double>(v) : static_cast<long double>(v) / n;
      if (b[i] < 0 || b[i] > i || b[b[i]] != b[i] || (i > 0 && b[i] != b[i - 1] && b[i] != i))
        fail("block_start is not a partition", s, n, i, b[i], 0);
      if (s.op == Op::Rank) {
        if (!(v >= 1.0 - rel * n && v <= n + rel * n))
          fail("rank outside [1, n]", s, n, i, v, 0);
      } else {
        // The kl sort's merge test works on values of size |x| + 1 and cannot
        // resolve block values closer than their rounding: at a huge eps it
        // may pool tied x, moving outputs by up to n / eps (absolute).
        const double kl_slack = s.reg == Reg::KL && s.eps > 0 ? 4.0 * n / s.eps : 0.0;
        const double slack = rel * xmax + kl_slack;
        if (!(v >= lo - slack && v <= hi + slack)) fail("sort output outside [min, max]", s, n, i, v, 0);
      }
    }
    if (s.op == Op::Rank) {
      const double want = 0.5 * n * (n + 1.0);
      if (!(std::fabs(static_cast<double>(sum) - want) <= rel * want + 1e-9))
        fail("rank row sum", s, n, -1, static_cast<double>(sum), want);
      // Monotone in x, ties bitwise equal: walk x in increasing order.
      std::vector<index_t> order(n);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t c) { return xr[a] < xr[c]; });
      const double sign = s.descending ? -1.0 : 1.0;
      for (index_t k = 1; k < n; ++k) {
        const index_t a = order[k - 1], c = order[k];
        if (xr[a] == xr[c]) {
          if (!same_bits(o[a], o[c])) fail("tied x, different ranks", s, n, c, o[a], o[c]);
        } else if (!(sign * (static_cast<double>(o[c]) - static_cast<double>(o[a])) >= -rel * n)) {
          fail("rank not monotone in x", s, n, c, o[a], o[c]);
        }
      }
    } else {
      const double sign = s.descending ? 1.0 : -1.0;  // o[i-1] >= o[i] when descending
      for (index_t i = 1; i < n; ++i)
        if (!(sign * (static_cast<double>(o[i - 1]) - static_cast<double>(o[i])) >=
              -rel * xmax - (s.reg == Reg::KL && s.eps > 0 ? 4.0 * n / s.eps : 0.0)))
          fail("sort output not monotone", s, n, i, o[i - 1], o[i]);
      // (both means round to the subnormal grid for tiny rows)
      const double grid = std::numeric_limits<T>::denorm_min();
      if (s.reg == Reg::L2 &&
          !(std::fabs(static_cast<double>(sum - xsum)) <= rel * xmax * 4 + 4.0 * n * grid))
        fail("l2 sort does not keep the sum", s, n, -1, static_cast<double>(sum),
             static_cast<double>(xsum));
    }
    // Gradients: no NaN; finite unless the rank's 1/eps overflows.
    // (|J| ~ n / eps exceeds the range of T: float32 from eps ~ 1e-37 on)
    const bool may_overflow = s.op == Op::Rank && s.eps < (f32 ? 1e-30 : 1e-290);
    double a = 0, c = 0, gn = 0, tn = 0;
    for (index_t i = 0; i < n; ++i) {
      const double vj = vjp[off + i], jv = jvp[off + i], hv = hvp[off + i];
      if (std::isnan(vj) || std::isnan(jv) || std::isnan(hv)) fail("NaN gradient", s, n, i, vj, jv);
      if (!may_overflow && !(std::isfinite(vj) && std::isfinite(jv)))
        fail("non-finite gradient", s, n, i, vj, jv);
      a += static_cast<double>(g[off + i]) * jv;
      c += vj * static_cast<double>(t[off + i]);
      gn += std::fabs(static_cast<double>(g[off + i]));
      tn += std::fabs(static_cast<double>(t[off + i]));
    }
    if (!may_overflow && std::isfinite(a) && std::isfinite(c)) {
      // |J| <= n / eps for the rank, 1 for the sort.
      const double jscale = s.op == Op::Rank && s.eps > 0 ? std::min(1e300, n / s.eps) : 1.0;
      if (!(std::fabs(a - c) <= (f32 ? 1e-4 : 1e-11) * gn * tn * (1.0 + jscale)))
        fail("vjp and jvp are not adjoint", s, n, -1, a, c);
    }
  }
  // Rows are independent of each other: the last row alone, bitwise.
  if (rows > 1) {
    const std::size_t off = static_cast<std::size_t>(rows - 1) * static_cast<std::size_t>(n);
    std::vector<T> x1(x.begin() + off, x.end()), out1(n);
    std::vector<index_t> perm1(n), block1(n);
    softrank::soft_forward_batch(x1.data(), 1, n, s, out1.data(), perm1.data(), block1.data());
    for (index_t i = 0; i < n; ++i)
      if (!same_bits(out1[i], out[off + i]) || perm1[i] != perm[off + i])
        fail("row in a batch differs from the row alone", s, n, i, out1[i], out[off + i]);
  }
}

// Whether a row of y is finite, and the range of term(i, y_i) over it.
struct RowScan {
  bool finite;
  double lo, hi;
};
template <class T, class Term>
RowScan scan_row(const std::vector<T>& y, std::size_t off, index_t n, Term term) {
  RowScan scan{true, kInf, -kInf};
  for (index_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(y[off + i]);
    scan.finite = scan.finite && std::isfinite(v);
    scan.lo = std::min(scan.lo, term(i, v));
    scan.hi = std::max(scan.hi, term(i, v));
  }
  return scan;
}

// A row of y holding NaN or +-inf: NaN solution and block_start -1 throughout.
template <class T>
void check_nan_row(const std::vector<T>& sol, const std::vector<index_t>& block, std::size_t off,
                   index_t n, const OpSpec& spec) {
  for (index_t i = 0; i < n; ++i)
    if (!std::isnan(static_cast<double>(sol[off + i])) || block[off + i] != -1)
      fail("isotonic: non-finite row not NaN", spec, n, i, sol[off + i], 0);
}

template <class T>
void check_isotonic(const std::vector<T>& y, const std::vector<T>* w, std::int64_t rows, index_t n,
                    bool increasing) {
  const std::size_t size = y.size();
  std::vector<T> sol(size), grad(size), g(size);
  std::vector<index_t> block(size);
  softrank::isotonic_forward_batch(y.data(), w ? w->data() : nullptr, rows, n, increasing,
                                   sol.data(), block.data());
  for (std::size_t i = 0; i < size; ++i) g[i] = static_cast<T>(std::sin(2.0 + static_cast<double>(i)));
  softrank::isotonic_vjp_batch(w ? w->data() : nullptr, block.data(), g.data(), rows, n, grad.data());
  const OpSpec dummy{Op::Rank, Reg::L2, !increasing, -1.0};
  const double rel = sizeof(T) == 4 ? 2e-5 : 1e-10;
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::size_t off = static_cast<std::size_t>(r) * static_cast<std::size_t>(n);
    const RowScan scan = scan_row(y, off, n, [](index_t, double v) { return v; });
    const bool finite = scan.finite;
    const double lo = scan.lo, hi = scan.hi;
    if (!finite) {
      check_nan_row(sol, block, off, n, dummy);
      continue;
    }
    const double ymax = std::max(std::fabs(lo), std::fabs(hi));
    // Known limit: weights are used relative to the row's largest, and the
    // sums w (y - ref) lose their digits below the subnormal range: weights
    // more than ~2^900 apart in one row give approximate (possibly slightly
    // out-of-range) block means. Only finiteness is checked there.
    double wlo = kInf, whi = 0.0;
    for (index_t i = 0; i < n && w; ++i) {
      wlo = std::min(wlo, static_cast<double>((*w)[off + i]));
      whi = std::max(whi, static_cast<double>((*w)[off + i]));
    }
    const bool known_weight_limit = w && whi > std::ldexp(wlo, 900);
    for (index_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(sol[off + i]);
      if (known_weight_limit) {
        if (!std::isfinite(v)) fail("isotonic: non-finite solution", dummy, n, i, v, 0);
        continue;
      }
      if (!std::isfinite(v) || v < lo - rel * ymax || v > hi + rel * ymax)
        fail("isotonic: solution not finite or outside [min y, max y]", dummy, n, i, v, y[off + i]);
      if (i > 0) {
        const double p = static_cast<double>(sol[off + i - 1]);
        // (adjacent block values are computed with separate roundings)
        const double tol = 1e-15 * ymax;
        if (increasing ? v < p - tol : v > p + tol) fail("isotonic: not ordered", dummy, n, i, p, v);
      }
      if (!std::isfinite(static_cast<double>(grad[off + i])))
        fail("isotonic: non-finite gradient", dummy, n, i, grad[off + i], 0);
    }
    if (known_weight_limit) continue;
    double gs = 0, gg = 0;
    for (index_t i = 0; i < n; ++i) {
      gs += static_cast<double>(grad[off + i]);
      gg += static_cast<double>(g[off + i]);
    }
    if (!(std::fabs(gs - gg) <= 1e-6 * n + 1e-9)) fail("isotonic vjp does not keep the sum", dummy, n, -1, gs, gg);
  }
}

template <class T>
void check_isotonic_kl(const std::vector<T>& y, const std::vector<T>* w, std::int64_t rows,
                       index_t n, bool increasing) {
  const std::size_t size = y.size();
  std::vector<T> sol(size);
  std::vector<index_t> block(size);
  softrank::isotonic_kl_forward_batch(y.data(), w ? w->data() : nullptr, rows, n, increasing,
                                      sol.data(), block.data());
  const OpSpec dummy{Op::Rank, Reg::KL, !increasing, -1.0};
  const double rel = sizeof(T) == 4 ? 2e-5 : 1e-10;
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::size_t off = static_cast<std::size_t>(r) * static_cast<std::size_t>(n);
    const RowScan scan = scan_row(y, off, n, [&](index_t i, double v) {
      return v - (w ? std::log(static_cast<double>((*w)[off + i])) : 0.0);
    });
    const bool finite = scan.finite;
    const double lo = scan.lo, hi = scan.hi;
    if (!finite) {
      check_nan_row(sol, block, off, n, dummy);
      continue;
    }
    const double scale = std::max({std::fabs(lo), std::fabs(hi), 1.0});
    // Known limit: weights whose largest exceeds 2^900 are scaled down, and
    // those more than 2^1074 below it then stay at the smallest double (only
    // finiteness and order are checked there).
    double wlo = kInf, whi = 0.0;
    for (index_t i = 0; i < n && w; ++i) {
      wlo = std::min(wlo, static_cast<double>((*w)[off + i]));
      whi = std::max(whi, static_cast<double>((*w)[off + i]));
    }
    const bool known_weight_limit = w && whi > 0x1p900 && whi > std::ldexp(wlo, 1000);
    for (index_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(sol[off + i]);
      // (float32: the solution is rounded to float; its bounds are not.)
      const double tol = rel * scale + (sizeof(T) == 4 ? 1e-7 * std::fabs(v) : 0.0);
      if (!std::isfinite(v) || (!known_weight_limit && (v < lo - tol || v > hi + tol)))
        fail("isotonic kl: solution not finite or outside its term ratios", dummy, n, i, v, lo);
      if (i > 0) {
        const double p = static_cast<double>(sol[off + i - 1]);
        const double order_tol = 1e-15 * scale;
        if (increasing ? v < p - order_tol : v > p + order_tol)
          fail("isotonic kl: not ordered", dummy, n, i, p, v);
      }
      const index_t b = block[off + i];
      if (b < 0 || b > i || block[off + b] != b) fail("isotonic kl: bad block", dummy, n, i, b, 0);
    }
  }
}

// The projection onto the permutahedron of w (mode 3): z the values, w a
// shuffle of them (kl: with -inf where the source is negative and even).
//   - a row with NaN or +inf anywhere, -inf in z, -inf in w under l2, or no
//     finite w under kl: NaN output;
//   - valid rows: every output in [min w, max w] (P(w) is the hull of w's
//     permutations; kl: exp(out) in P(e^w)), finite except -inf under kl
//     where w holds -inf; l2 sum(out) = sum(w), kl logsumexp(out) =
//     logsumexp(w); out ordered as z (perm_z the stable decreasing order of
//     z, out non-increasing along it); blocks a partition;
//   - the value-only forward (perm_w null) gives out bit for bit.
template <class T>
void check_projection(const std::vector<T>& z, std::int64_t rows, index_t n, double eps, Reg reg) {
  const std::size_t size = z.size();
  std::vector<T> w(size), out(size), value_only(size);
  for (std::size_t i = 0; i < size; ++i) {
    const T v = z[(i * 7 + 3) % size];
    w[i] = reg == Reg::KL && v < 0 && (i % 2 == 0) ? static_cast<T>(-kInf) : v;
  }
  std::vector<index_t> perm_z(size), perm_w(size), block(size), perm_z2(size), block2(size);
  softrank::projection_forward_batch(z.data(), w.data(), rows, n, eps, reg, out.data(),
                                     perm_z.data(), perm_w.data(), block.data());
  softrank::projection_forward_batch(z.data(), w.data(), rows, n, eps, reg, value_only.data(),
                                     perm_z2.data(), static_cast<index_t*>(nullptr),
                                     block2.data());
  const OpSpec dummy{Op::Sort, reg, false, eps};
  const double rel = sizeof(T) == 4 ? 2e-5 : 1e-9;
  for (std::size_t i = 0; i < size; ++i)
    if (!same_bits(out[i], value_only[i]))
      fail("projection: value-only forward differs", dummy, n, static_cast<int>(i), out[i],
           value_only[i]);
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::size_t off = static_cast<std::size_t>(r) * static_cast<std::size_t>(n);
    bool valid = true, any_finite_w = false, w_has_minus_inf = false;
    double wlo = kInf, whi = -kInf;
    for (index_t i = 0; i < n; ++i) {
      const double zi = static_cast<double>(z[off + i]), wi = static_cast<double>(w[off + i]);
      valid = valid && std::isfinite(zi) && !std::isnan(wi) && wi != kInf &&
              (reg == Reg::KL || wi != -kInf);
      any_finite_w = any_finite_w || std::isfinite(wi);
      w_has_minus_inf = w_has_minus_inf || wi == -kInf;
      wlo = std::min(wlo, wi);
      whi = std::max(whi, wi);
    }
    if (n == 0) continue;
    valid = valid && any_finite_w;
    if (!valid) {
      for (index_t i = 0; i < n; ++i)
        if (!std::isnan(static_cast<double>(out[off + i])))
          fail("projection: invalid row not NaN", dummy, n, i, out[off + i], 0);
      continue;
    }
    const double scale = std::max({std::fabs(whi), std::isfinite(wlo) ? std::fabs(wlo) : 0.0, 1.0});
    const double tol = rel * scale;
    // Sums scaled by the largest |w| (values near DBL_MAX), in long double.
    long double sum_out = 0.0L, sum_w = 0.0L;
    for (index_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(out[off + i]);
      if (std::isnan(v) || v == kInf || (v == -kInf && !w_has_minus_inf) ||
          v < wlo - tol || v > whi + tol)
        fail("projection: output outside [min w, max w]", dummy, n, i, v, whi);
      if (reg == Reg::L2) {
        sum_out += static_cast<long double>(v) / scale;
        sum_w += static_cast<long double>(w[off + i]) / scale;
      } else {
        sum_out += std::exp(static_cast<long double>(v) - whi);
        sum_w += std::exp(static_cast<long double>(w[off + i]) - whi);
      }
    }
    // l2: |sum| error within rel * n (in units of the largest |w|); kl: the
    // sums of exp(. - max w) (>= 1 for w) relative, plus what rounding each
    // output to its dtype does to its exp: a relative |v| ulp, which at
    // |v| ~ 1e300 leaves the sums unchecked (the values are still bounded
    // and ordered above).
    const double ulp = sizeof(T) == 4 ? 6e-8 : 1.2e-16;
    const long double sum_tol =
        reg == Reg::L2 ? static_cast<long double>(rel) * (n + 1)
                       : (static_cast<long double>(rel) + 4.0L * ulp * scale) * n *
                             std::max(sum_w, sum_out);
    if (!(std::fabs(static_cast<double>(sum_out - sum_w)) <= sum_tol))
      fail("projection: sum (l2) or sum of exp (kl) not kept", dummy, n, -1,
           static_cast<double>(sum_out), static_cast<double>(sum_w));
    for (index_t k = 0; k < n; ++k) {
      const index_t p = perm_z[off + k];
      if (p < 0 || p >= n) fail("projection: perm_z out of range", dummy, n, k, p, 0);
      const index_t b = block[off + k];
      if (b < 0 || b > k || block[off + b] != b) fail("projection: bad block", dummy, n, k, b, 0);
      if (k == 0) continue;
      const index_t q = perm_z[off + k - 1];
      const double zp = static_cast<double>(z[off + p]), zq = static_cast<double>(z[off + q]);
      if (zq < zp || (zq == zp && q > p)) fail("projection: perm_z not the stable order", dummy, n, k, zq, zp);
      const double op = static_cast<double>(out[off + p]), oq = static_cast<double>(out[off + q]);
      if (op > oq + tol) fail("projection: output not ordered as z", dummy, n, k, oq, op);
    }
  }
}

template <class T>
void run(Reader& in, std::uint8_t flags, double eps, std::int64_t rows) {
  const int encoding = flags >> 6;
  std::vector<T> values;
  for (;;) {
    double v;
    if (encoding == 0) {
      if (!in.take(&v, 8)) break;
    } else if (encoding == 3) {
      float f;
      if (!in.take(&f, 4)) break;
      v = f;
    } else {
      std::uint8_t c;
      if (!in.take(&c, 1)) break;
      v = encoding == 1 ? (c < kValueTableSize ? kValueTable[c] : static_cast<double>(c % 9) - 4.0)
                        : static_cast<double>(c % 7) - 3.0;
    }
    values.push_back(static_cast<T>(v));
    if (values.size() >= 20000) break;
  }
  const index_t n = static_cast<index_t>(values.size() / static_cast<std::size_t>(rows));
  values.resize(static_cast<std::size_t>(rows) * static_cast<std::size_t>(n));
  const int mode = (flags >> 4) & 3;
  if (mode == 1 || mode == 2) {
    std::vector<T> w;
    if (mode == 2) {  // positive finite weights from the values' bit patterns
      w.resize(values.size());
      for (std::size_t i = 0; i < values.size(); ++i) {
        double a = std::fabs(static_cast<double>(values[(i * 7 + 3) % values.size()]));
        if (!(a > 0) || !std::isfinite(static_cast<double>(static_cast<T>(a)))) a = 1.0 + i % 3;
        w[i] = static_cast<T>(a);
        if (!(w[i] > 0)) w[i] = static_cast<T>(1);
      }
    }
    if (flags & 2)
      check_isotonic_kl(values, mode == 2 ? &w : nullptr, rows, n, (flags & 4) == 0);
    else
      check_isotonic(values, mode == 2 ? &w : nullptr, rows, n, (flags & 4) == 0);
    return;
  }
  if (mode == 3) {
    check_projection(values, rows, n, eps, (flags & 2) ? Reg::KL : Reg::L2);
    return;
  }
  const OpSpec s{(flags & 1) ? Op::Sort : Op::Rank, (flags & 2) ? Reg::KL : Reg::L2,
                 (flags & 4) != 0, eps};
  check_soft(values, rows, n, s);
}

}  // namespace

// SOFTRANK_FUZZ_THREADS=k runs the core's pool on k threads. With one, a run
// of a fixed -seed and -runs is reproducible: on the pool, which thread takes
// a task (and so which thread-local scratch grows) depends on timing, and
// the coverage it records steers the fuzzer (fuzz/run.sh, what .ci/run does).
extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  if (const char* threads = std::getenv("SOFTRANK_FUZZ_THREADS")) {
    const int k = std::atoi(threads);
    if (k >= 1) softrank::set_num_threads(k);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  std::uint8_t flags = 0, eps_byte = 0, rows_byte = 0;
  if (!in.take(&flags, 1) || !in.take(&eps_byte, 1) || !in.take(&rows_byte, 1)) return 0;
  double eps;
  const std::size_t table = sizeof(kEpsTable) / sizeof(kEpsTable[0]);
  if (eps_byte < 224) {
    eps = kEpsTable[eps_byte % table];
  } else {
    if (!in.take(&eps, 8)) return 0;
    eps = std::fabs(eps);
    if (std::isnan(eps)) eps = 0.0;
  }
  const std::int64_t rows = 1 + rows_byte % 4;
  if (flags & 8)
    run<float>(in, flags, eps, rows);
  else
    run<double>(in, flags, eps, rows);
  return 0;
}
