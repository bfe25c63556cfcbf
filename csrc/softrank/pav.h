// Pool-adjacent-violators for the four soft operators and for weighted
// isotonic regression, over a sorted row `xs` (non-increasing).
//
// Every block keeps its first value `ref` and statistics relative to it, so
// that only differences of nearby values are ever divided by eps: the result
// is finite and exact for eps in [1e-300, inf] and |x| up to 1e300
// (ALGORITHM.md, "Why units of x"). Allocation-free; the block stack lives in
// caller-owned arrays of length n.
#pragma once

#include <cmath>

#include "common.h"

namespace softrank {

struct BlockStack {
  index_t* start;  // first sorted position of each block
  double* ref;     // xs[start]
  double* stat;    // l2: mean(xs) - ref; kl: log sum exp((xs - ref) * c)
  double* stat2;   // rank kl: log sum rho; sort kl: log sum exp(-k / eps)
};

// (a - b) / eps, by a multiplication where 1/eps is finite (it is not for
// subnormal eps): the division is the slowest operation of the PAV loop.
struct InverseScale {
  double eps, inv;
  bool multiply;
  SOFTRANK_HD explicit InverseScale(double e)
      : eps(e), inv(1.0 / e), multiply(std::isfinite(1.0 / e)) {}
  SOFTRANK_HD double operator()(double v) const { return multiply ? v * inv : v / eps; }
};

// Pooled l2 block: mean offset of the union of A (m_a values, offset off_a
// from ref_a) and B (m_b, off_b, ref_b), relative to ref_a.
SOFTRANK_HD double pooled_offset(double ma, double off_a, double mb, double off_b, double ref_a,
                                 double ref_b) {
  return (ma * off_a + mb * (off_b + (ref_b - ref_a))) / (ma + mb);
}

// Returns the number of blocks. `merge_all` (eps = inf) pools everything.
// l2 merge tests compare the difference of block means, dx, with eps * h or
// h / eps (h = (m_a + m_b) / 2) in the form whose product cannot overflow
// into a wrong answer: an overflow to inf there is the right limit.
SOFTRANK_HD index_t pav_rank_l2(const double* xs, index_t n, double eps, BlockStack b) {
  const bool merge_all = std::isinf(eps);
  index_t top = 0;
  for (index_t i = 0; i < n; ++i) {
    index_t s = i;
    double ref = xs[i], off = 0.0;
    while (top > 0) {
      const index_t sa = b.start[top - 1];
      const double ma = static_cast<double>(s - sa), mb = static_cast<double>(i + 1 - s);
      const double ref_a = b.ref[top - 1], off_a = b.stat[top - 1];
      const double dx = (ref_a - ref) + (off_a - off);
      if (!(merge_all || dx <= eps * (0.5 * (ma + mb)))) break;
      off = pooled_offset(ma, off_a, mb, off, ref_a, ref);
      ref = ref_a;
      s = sa;
      --top;
    }
    b.start[top] = s;
    b.ref[top] = ref;
    b.stat[top] = off;
    ++top;
  }
  return top;
}

// log_rho[i] = log(n - i), precomputed once per row length.
SOFTRANK_HD index_t pav_rank_kl(const double* xs, const double* log_rho, index_t n, double eps,
                                BlockStack b) {
  const bool merge_all = std::isinf(eps);
  const InverseScale scale(eps);
  index_t top = 0;
  for (index_t i = 0; i < n; ++i) {
    index_t s = i;
    double ref = xs[i], lse = 0.0, log_r = log_rho[i];
    while (top > 0) {
      const index_t sa = b.start[top - 1];
      const double ref_a = b.ref[top - 1], lse_a = b.stat[top - 1], log_r_a = b.stat2[top - 1];
      const double gap = scale(ref_a - ref);
      const double lhs = gap + lse_a - lse;
      if (!(merge_all || lhs <= log_r_a - log_r)) break;
      lse = log_add_exp(lse_a, lse - gap);
      ref = ref_a;
      s = sa;
      log_r = std::log(rho_sum(n, s, i + 1));
      --top;
    }
    b.start[top] = s;
    b.ref[top] = ref;
    b.stat[top] = lse;
    b.stat2[top] = log_r;
    ++top;
  }
  return top;
}

SOFTRANK_HD index_t pav_sort_l2(const double* xs, index_t n, double eps, BlockStack b) {
  const bool merge_all = std::isinf(eps);
  index_t top = 0;
  for (index_t i = 0; i < n; ++i) {
    index_t s = i;
    double ref = xs[i], off = 0.0;
    while (top > 0) {
      const index_t sa = b.start[top - 1];
      const double ma = static_cast<double>(s - sa), mb = static_cast<double>(i + 1 - s);
      const double ref_a = b.ref[top - 1], off_a = b.stat[top - 1];
      const double dx = (ref_a - ref) + (off_a - off);
      if (!(merge_all || 0.5 * (ma + mb) <= dx * eps)) break;
      off = pooled_offset(ma, off_a, mb, off, ref_a, ref);
      ref = ref_a;
      s = sa;
      --top;
    }
    b.start[top] = s;
    b.ref[top] = ref;
    b.stat[top] = off;
    ++top;
  }
  return top;
}

SOFTRANK_HD index_t pav_sort_kl(const double* xs, index_t n, double eps, BlockStack b) {
  const bool merge_all = std::isinf(eps);
  const InverseScale scale(eps);
  index_t top = 0;
  for (index_t i = 0; i < n; ++i) {
    index_t s = i;
    double ref = xs[i], lse = 0.0, lse_rho = 0.0;
    while (top > 0) {
      const index_t sa = b.start[top - 1];
      const double ma = static_cast<double>(s - sa);
      const double ref_a = b.ref[top - 1], lse_a = b.stat[top - 1], lse_rho_a = b.stat2[top - 1];
      const double shift = scale(ma);
      const double lhs = shift + lse_rho_a - lse_rho;
      if (!(merge_all || lhs <= (ref_a - ref) + lse_a - lse)) break;
      lse = log_add_exp(lse_a, lse + (ref - ref_a));
      lse_rho = log_add_exp(lse_rho_a, lse_rho - shift);
      ref = ref_a;
      s = sa;
      --top;
    }
    b.start[top] = s;
    b.ref[top] = ref;
    b.stat[top] = lse;
    b.stat2[top] = lse_rho;
    ++top;
  }
  return top;
}

// eps = 0, the hard operator. Rank: blocks are the runs of equal values (tied
// entries share their mean rank). Sort: singletons.
SOFTRANK_HD index_t pav_hard(const double* xs, index_t n, Op op, BlockStack b) {
  index_t top = 0;
  for (index_t i = 0; i < n; ++i) {
    if (op == Op::Rank && top > 0 && xs[i] == b.ref[top - 1]) continue;
    b.start[top] = i;
    b.ref[top] = xs[i];
    ++top;
  }
  return top;
}

// Weighted isotonic regression, non-decreasing, by PAV. `w` may be null
// (unit weights). Equal adjacent block values are pooled. Block stats: ref,
// stat = sum w (y - ref), stat2 = sum w.
SOFTRANK_HD index_t pav_isotonic_increasing(const double* y, const double* w, index_t n,
                                            BlockStack b) {
  index_t top = 0;
  for (index_t i = 0; i < n; ++i) {
    index_t s = i;
    double ref = y[i], d = 0.0, wsum = w ? w[i] : 1.0;
    while (top > 0) {
      const double ref_a = b.ref[top - 1], d_a = b.stat[top - 1], w_a = b.stat2[top - 1];
      // value_A >= value_B violates (or ties) the non-decreasing order.
      if (!((ref_a - ref) + d_a / w_a - d / wsum >= 0.0)) break;
      d = d_a + d + wsum * (ref - ref_a);
      wsum = w_a + wsum;
      ref = ref_a;
      s = b.start[top - 1];
      --top;
    }
    b.start[top] = s;
    b.ref[top] = ref;
    b.stat[top] = d;
    b.stat2[top] = wsum;
    ++top;
  }
  return top;
}

}  // namespace softrank
