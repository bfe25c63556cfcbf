// Helpers shared by the core tests: thin wrappers over the batched C++ API,
// random rows, and references that share no code with the core:
//  - a textbook evaluation of the projections in long double (x / eps formed
//    directly, isotonic regression by the O(n^3) min-max formula, std::sort);
//  - an optimality certificate for any n: mu is the projection of z onto the
//    permutahedron P(w) iff mu is in P(w) (majorization) and the variational
//    inequality <grad f(mu), v - mu> >= 0 holds at every vertex v, whose
//    minimum over the n! vertices is a sorted dot product (rearrangement).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "softrank/batched.h"
#include "softrank/parallel.h"

namespace th {

using softrank::index_t;
using softrank::Op;
using softrank::OpSpec;
using softrank::Reg;
using LD = long double;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kMax = std::numeric_limits<double>::max();
constexpr double kDenorm = std::numeric_limits<double>::denorm_min();

inline std::string describe(const OpSpec& s) {
  return std::string(s.op == Op::Rank ? "rank" : "sort") + "/" + (s.reg == Reg::L2 ? "l2" : "kl") +
         "/" + (s.descending ? "desc" : "asc") + " eps=" + check::fmt(s.eps);
}

// Every (op, reg, direction) for one eps.
inline std::vector<OpSpec> all_specs(double eps) {
  std::vector<OpSpec> v;
  for (Op op : {Op::Rank, Op::Sort})
    for (Reg reg : {Reg::L2, Reg::KL})
      for (bool desc : {false, true}) v.push_back(OpSpec{op, reg, desc, eps});
  return v;
}

// Outputs are pre-filled with a signalling-NaN pattern that the core never
// writes, so that an entry the core forgot to write is detected.
template <class T>
inline T sentinel();
template <>
inline double sentinel<double>() {
  const std::uint64_t u = 0x7ff4deadbeef0001ull;
  double v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
template <>
inline float sentinel<float>() {
  const std::uint32_t u = 0x7fa0dead;
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
template <class T>
inline bool is_sentinel(T v) {
  return check::same_bits(v, sentinel<T>());
}

template <class T>
struct Forward {
  std::vector<T> out;
  std::vector<index_t> perm, block;
};

template <class T>
inline Forward<T> forward(const std::vector<T>& x, std::int64_t rows, index_t n, const OpSpec& s) {
  Forward<T> f;
  const std::size_t size = static_cast<std::size_t>(rows) * static_cast<std::size_t>(n);
  f.out.assign(size, sentinel<T>());
  f.perm.assign(size, -7);
  f.block.assign(size, -7);
  softrank::soft_forward_batch(x.data(), rows, n, s, f.out.data(), f.perm.data(), f.block.data());
  return f;
}

template <class T>
inline std::vector<T> product(const std::vector<T>& x, const Forward<T>& f, const std::vector<T>& v,
                              std::int64_t rows, index_t n, const OpSpec& s, bool transpose) {
  std::vector<T> r(static_cast<std::size_t>(rows) * static_cast<std::size_t>(n), sentinel<T>());
  softrank::soft_product_batch(x.data(), f.out.data(), f.perm.data(), f.block.data(), v.data(),
                               rows, n, s, transpose, r.data());
  return r;
}

template <class T>
struct Iso {
  std::vector<T> sol;
  std::vector<index_t> block;
};

template <class T>
inline Iso<T> isotonic(const std::vector<T>& y, const std::vector<T>* w, std::int64_t rows,
                       index_t n, bool increasing) {
  Iso<T> r;
  const std::size_t size = static_cast<std::size_t>(rows) * static_cast<std::size_t>(n);
  r.sol.assign(size, sentinel<T>());
  r.block.assign(size, -7);
  softrank::isotonic_forward_batch(y.data(), w ? w->data() : nullptr, rows, n, increasing,
                                   r.sol.data(), r.block.data());
  return r;
}

template <class T>
inline std::vector<T> isotonic_vjp(const std::vector<T>* w, const Iso<T>& f,
                                   const std::vector<T>& g, std::int64_t rows, index_t n) {
  std::vector<T> r(static_cast<std::size_t>(rows) * static_cast<std::size_t>(n), sentinel<T>());
  softrank::isotonic_vjp_batch(w ? w->data() : nullptr, f.block.data(), g.data(), rows, n,
                               r.data());
  return r;
}

// ---------------------------------------------------------------- random rows

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(std::uint64_t seed) : gen(seed) {}
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(gen); }
  double uniform(double a, double b) { return std::uniform_real_distribution<double>(a, b)(gen); }
  int integer(int a, int b) { return std::uniform_int_distribution<int>(a, b)(gen); }
};

// A row of n values of one of several kinds: distinct normals, small
// integers (many ties), a constant row, a row of a few clusters.
inline std::vector<double> random_row(Rng& rng, int n, int kind, double scale = 1.0) {
  std::vector<double> x(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    switch (kind % 4) {
      case 0: x[i] = scale * rng.normal(); break;
      case 1: x[i] = scale * rng.integer(-3, 3); break;
      case 2: x[i] = scale * 0.75; break;
      default: x[i] = scale * (rng.integer(0, 2) * 10.0 + 0.01 * rng.normal()); break;
    }
  }
  return x;
}

// The stable decreasing order of x' = x or -x (-0 and +0 equal), by
// std::stable_sort: the reference for every sorting path.
template <class T>
inline std::vector<index_t> reference_perm(const std::vector<T>& x, bool negate) {
  std::vector<index_t> p(x.size());
  std::iota(p.begin(), p.end(), 0);
  std::stable_sort(p.begin(), p.end(), [&](index_t a, index_t b) {
    const T va = negate ? -x[a] : x[a], vb = negate ? -x[b] : x[b];
    return va > vb;
  });
  return p;
}

template <class T, class U>
inline std::vector<T> cast(const std::vector<U>& x) {
  return std::vector<T>(x.begin(), x.end());
}

// ---------------------------------------------------------------- references

// Stable order of z, decreasing (ties by position).
inline std::vector<int> argsort_desc(const std::vector<LD>& z) {
  std::vector<int> p(z.size());
  std::iota(p.begin(), p.end(), 0);
  std::stable_sort(p.begin(), p.end(), [&](int a, int b) { return z[a] > z[b]; });
  return p;
}

// Non-increasing isotonic regression by the min-max formula,
// v_i = min_{j <= i} max_{k >= i} g(j, k), valid for every block function
// with the Cauchy mean-value property (weighted means, differences of
// log-sum-exps). O(n^3) calls of g.
template <class G>
inline std::vector<LD> isotonic_dec_minmax(int n, G g) {
  std::vector<LD> v(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    LD best = std::numeric_limits<LD>::infinity();
    for (int j = 0; j <= i; ++j) {
      LD worst = -std::numeric_limits<LD>::infinity();
      for (int k = i; k < n; ++k) worst = std::max(worst, g(j, k));
      best = std::min(best, worst);
    }
    v[i] = best;
  }
  return v;
}

inline LD lse(const std::vector<LD>& a, int j, int k) {
  LD m = a[j];
  for (int i = j; i <= k; ++i) m = std::max(m, a[i]);
  LD s = 0;
  for (int i = j; i <= k; ++i) s += std::exp(a[i] - m);
  return m + std::log(s);
}

inline LD mean(const std::vector<LD>& a, int j, int k) {
  LD s = 0;
  for (int i = j; i <= k; ++i) s += a[i];
  return s / (k - j + 1);
}

// Textbook soft operator in long double (the reference code's formulas).
inline std::vector<LD> reference(const std::vector<double>& x, const OpSpec& s) {
  const int n = static_cast<int>(x.size());
  std::vector<LD> out(static_cast<std::size_t>(n));
  if (n == 0) return out;
  const bool negate = s.op == Op::Rank ? s.descending : !s.descending;
  std::vector<LD> xx(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) xx[i] = negate ? -static_cast<LD>(x[i]) : static_cast<LD>(x[i]);
  if (s.eps == 0.0) {
    if (s.op == Op::Rank) {
      for (int i = 0; i < n; ++i) {
        int less = 0, equal = 0;
        for (int j = 0; j < n; ++j) {
          less += xx[j] < xx[i];
          equal += xx[j] == xx[i];
        }
        out[i] = less + (equal + 1) / LD(2);
      }
    } else {
      std::vector<LD> xs = xx;
      std::sort(xs.begin(), xs.end(), std::greater<LD>());
      for (int i = 0; i < n; ++i) out[i] = s.descending ? xs[i] : -xs[i];
    }
    return out;
  }
  if (std::isinf(s.eps)) {
    if (s.op == Op::Rank) {
      for (auto& o : out) o = (n + 1) / LD(2);
    } else {
      const LD m = s.reg == Reg::L2 ? mean(xx, 0, n - 1) : lse(xx, 0, n - 1) - std::log(LD(n));
      for (auto& o : out) o = s.descending ? m : -m;
    }
    return out;
  }
  const LD eps = s.eps;
  if (s.op == Op::Rank) {
    std::vector<LD> z(static_cast<std::size_t>(n)), w(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) z[i] = xx[i] / eps;
    const std::vector<int> p = argsort_desc(z);
    std::vector<LD> zs(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      zs[i] = z[p[i]];
      w[i] = s.reg == Reg::L2 ? LD(n - i) : std::log(LD(n - i));
    }
    std::vector<LD> v;
    if (s.reg == Reg::L2) {
      std::vector<LD> y(static_cast<std::size_t>(n));
      for (int i = 0; i < n; ++i) y[i] = zs[i] - w[i];
      v = isotonic_dec_minmax(n, [&](int j, int k) { return mean(y, j, k); });
      for (int i = 0; i < n; ++i) out[p[i]] = zs[i] - v[i];
    } else {
      v = isotonic_dec_minmax(n, [&](int j, int k) { return lse(zs, j, k) - lse(w, j, k); });
      for (int i = 0; i < n; ++i) out[p[i]] = std::exp(zs[i] - v[i]);
    }
    return out;
  }
  std::vector<LD> xs = xx, theta(static_cast<std::size_t>(n));
  std::sort(xs.begin(), xs.end(), std::greater<LD>());
  for (int i = 0; i < n; ++i) theta[i] = LD(n - i) / eps;
  std::vector<LD> v;
  if (s.reg == Reg::L2) {
    std::vector<LD> y(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) y[i] = theta[i] - xs[i];
    v = isotonic_dec_minmax(n, [&](int j, int k) { return mean(y, j, k); });
  } else {
    v = isotonic_dec_minmax(n, [&](int j, int k) { return lse(theta, j, k) - lse(xs, j, k); });
  }
  for (int i = 0; i < n; ++i) out[i] = (s.descending ? 1 : -1) * (theta[i] - v[i]);
  return out;
}

// v_i = max_{j <= i} min_{k >= i} wavg(j..k) (non-decreasing), in long double.
inline std::vector<LD> minmax_isotonic(const std::vector<double>& y, const std::vector<double>* w,
                                bool increasing) {
  const int n = static_cast<int>(y.size());
  std::vector<LD> v(n);
  auto wavg = [&](int j, int k) {
    LD s = 0, ws = 0;
    for (int i = j; i <= k; ++i) {
      const LD wi = w ? static_cast<LD>((*w)[i]) : LD(1);
      s += wi * static_cast<LD>(y[i]);
      ws += wi;
    }
    return s / ws;
  };
  for (int i = 0; i < n; ++i) {
    LD best = increasing ? -std::numeric_limits<LD>::infinity() : std::numeric_limits<LD>::infinity();
    for (int j = 0; j <= i; ++j) {
      LD inner = increasing ? std::numeric_limits<LD>::infinity() : -std::numeric_limits<LD>::infinity();
      for (int k = i; k < n; ++k)
        inner = increasing ? std::min(inner, wavg(j, k)) : std::max(inner, wavg(j, k));
      best = increasing ? std::max(best, inner) : std::min(best, inner);
    }
    v[i] = best;
  }
  return v;
}

// Optimality certificate of a soft operator's output (0 < eps < inf).
// Returns the worst violation relative to the problem's scale: <= ~1e-12 for
// the exact projection in double; the caller picks the tolerance.
struct Certificate {
  LD majorization = 0;  // max_k (prefix sum of sorted mu - prefix sum of sorted w), scaled
  LD total = 0;         // |sum mu - sum w|, scaled
  LD inequality = 0;    // -min_v <a, v - mu>, scaled
};

inline Certificate certify(const std::vector<double>& x, const std::vector<double>& out,
                           const OpSpec& s) {
  const int n = static_cast<int>(x.size());
  Certificate c;
  if (n == 0) return c;
  const bool negate = s.op == Op::Rank ? s.descending : !s.descending;
  const LD eps = s.eps;
  std::vector<LD> mu(n), a(n), w(n), xx(n);
  for (int i = 0; i < n; ++i) xx[i] = negate ? -static_cast<LD>(x[i]) : static_cast<LD>(x[i]);
  // Canonical forms: ascending rank (output = mu over P(rho)); descending
  // sort (output = mu over P(x) for l2, log mu over P(exp x) for kl).
  const LD out_sign = (s.op == Op::Sort && !s.descending) ? -1 : 1;
  for (int i = 0; i < n; ++i) {
    const LD o = out_sign * static_cast<LD>(out[i]);
    if (s.op == Op::Rank) {
      const LD z = xx[i] / eps;
      w[i] = n - i;
      mu[i] = o;
      a[i] = s.reg == Reg::L2 ? o - z : std::log(o) - z;
    } else {
      const LD theta = LD(n - i) / eps;
      if (s.reg == Reg::L2) {
        w[i] = xx[i];
        mu[i] = o;
      } else {
        w[i] = std::exp(xx[i]);
        mu[i] = std::exp(o);
      }
      a[i] = o - theta;
    }
  }
  std::vector<LD> ms = mu, ws = w, as = a;
  std::sort(ms.begin(), ms.end(), std::greater<LD>());
  std::sort(ws.begin(), ws.end(), std::greater<LD>());
  std::sort(as.begin(), as.end());
  LD wscale = 0, ascale = 0, pm = 0, pw = 0;
  for (int i = 0; i < n; ++i) {
    wscale = std::max(wscale, std::fabs(ws[i]));
    ascale = std::max(ascale, std::fabs(as[i]));
  }
  const LD mscale = n * std::max(wscale, LD(1e-300));
  for (int i = 0; i < n; ++i) {
    pm += ms[i];
    pw += ws[i];
    c.majorization = std::max(c.majorization, (pm - pw) / mscale);
  }
  c.total = std::fabs(pm - pw) / mscale;
  LD min_dot = 0, dot_mu = 0;
  for (int i = 0; i < n; ++i) {
    min_dot += as[i] * ws[i];
    dot_mu += a[i] * mu[i];
  }
  const LD iscale = n * std::max(ascale, LD(1e-300)) * std::max(wscale, LD(1e-300));
  c.inequality = std::max(LD(0), -(min_dot - dot_mu) / iscale);
  return c;
}

// Sum and extreme of a vector.
template <class T>
inline double sum_of(const T* v, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += static_cast<double>(v[i]);
  return s;
}

}  // namespace th
