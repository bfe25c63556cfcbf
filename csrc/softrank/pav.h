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
  double* stat;    // l2: sum (xs - ref); kl: log sum exp((xs - ref) * c)
  double* stat2;   // rank kl: log sum rho; sort kl: log sum exp(-k / eps)
};

// Returns the number of blocks. `merge_all` (eps = inf) pools everything.
SOFTRANK_HD index_t pav_rank_l2(const double* xs, index_t n, double eps, BlockStack b) {
  const bool merge_all = std::isinf(eps);
  index_t top = 0;
  for (index_t i = 0; i < n; ++i) {
    index_t s = i;
    double ref = xs[i], d = 0.0;
    while (top > 0) {
      const index_t sa = b.start[top - 1];
      const double ma = static_cast<double>(s - sa), mb = static_cast<double>(i + 1 - s);
      const double ref_a = b.ref[top - 1], d_a = b.stat[top - 1];
      const double dx = (ref_a - ref) + d_a / ma - d / mb;
      if (!(merge_all || dx / eps <= 0.5 * (ma + mb))) break;
      d = d_a + d + mb * (ref - ref_a);
      ref = ref_a;
      s = sa;
      --top;
    }
    b.start[top] = s;
    b.ref[top] = ref;
    b.stat[top] = d;
    ++top;
  }
  return top;
}

SOFTRANK_HD index_t pav_rank_kl(const double* xs, index_t n, double eps, BlockStack b) {
  const bool merge_all = std::isinf(eps);
  index_t top = 0;
  for (index_t i = 0; i < n; ++i) {
    index_t s = i;
    double ref = xs[i], lse = 0.0, log_r = std::log(rho_sum(n, i, i + 1));
    while (top > 0) {
      const index_t sa = b.start[top - 1];
      const double ref_a = b.ref[top - 1], lse_a = b.stat[top - 1], log_r_a = b.stat2[top - 1];
      const double lhs = (ref_a - ref) / eps + lse_a - lse;
      if (!(merge_all || lhs <= log_r_a - log_r)) break;
      lse = log_add_exp(lse_a, lse + (ref - ref_a) / eps);
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
    double ref = xs[i], d = 0.0;
    while (top > 0) {
      const index_t sa = b.start[top - 1];
      const double ma = static_cast<double>(s - sa), mb = static_cast<double>(i + 1 - s);
      const double ref_a = b.ref[top - 1], d_a = b.stat[top - 1];
      const double dx = (ref_a - ref) + d_a / ma - d / mb;
      if (!(merge_all || (0.5 * (ma + mb)) / eps <= dx)) break;
      d = d_a + d + mb * (ref - ref_a);
      ref = ref_a;
      s = sa;
      --top;
    }
    b.start[top] = s;
    b.ref[top] = ref;
    b.stat[top] = d;
    ++top;
  }
  return top;
}

SOFTRANK_HD index_t pav_sort_kl(const double* xs, index_t n, double eps, BlockStack b) {
  const bool merge_all = std::isinf(eps);
  index_t top = 0;
  for (index_t i = 0; i < n; ++i) {
    index_t s = i;
    double ref = xs[i], lse = 0.0, lse_rho = 0.0;
    while (top > 0) {
      const index_t sa = b.start[top - 1];
      const double ma = static_cast<double>(s - sa);
      const double ref_a = b.ref[top - 1], lse_a = b.stat[top - 1], lse_rho_a = b.stat2[top - 1];
      const double lhs = ma / eps + lse_rho_a - lse_rho;
      if (!(merge_all || lhs <= (ref_a - ref) + lse_a - lse)) break;
      lse = log_add_exp(lse_a, lse + (ref - ref_a));
      lse_rho = log_add_exp(lse_rho_a, lse_rho - ma / eps);
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
