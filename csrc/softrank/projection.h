// The projection onto the permutahedron P(w) of any vector w, and weighted
// isotonic regression under l2 or kl: the primitive behind the operators
// (soft top-k, quantiles, Spearman through soft rank / sort) of softrank.
//
// Blondel et al. (2020), Prop. 3: P(z, w) = z - v(s, w~) un-permuted, where s
// is z sorted decreasingly, w~ is w sorted decreasingly and v is the
// non-increasing isotonic regression whose value on a block B is
//   l2: mean_B(s) - mean_B(w~)          kl: LSE_B(s) - LSE_B(w~).
// Both are solved by pool-adjacent-violators: each regularization is one
// *pooling rule* (a block type, the test for two adjacent blocks, and how two
// blocks pool), run by pav_run (pav.h), the one PAV loop of the core. The same rule
// objects decide everything; there is no second copy of a test.
//
// Rows are scaled by eps in the units of z (as the soft rank loops do): the
// projection computed is P(z / eps, w), with eps = 0 the hard limit (only
// tied values pool) and eps = inf the limit where everything pools. Header-
// only and allocation-free (the block stack is caller-owned).
#pragma once

#include <cmath>
#include <limits>

#include "common.h"
#include "pav.h"

namespace softrank {

// --- The projection's rules --------------------------------------------------
//
// Both see the sorted z (`s`, decreasing) and the sorted w (`ws`, decreasing)
// of one row. Block values are V = (mean or LSE of s) / eps - (mean or LSE of
// ws); the isotonic solution is non-increasing, so adjacent blocks pool when
// V_a <= V_b. Statistics of s are kept relative to the block's first (its
// largest) value `ref`, so that only differences of nearby values are scaled
// by 1/eps.

struct ProjectionL2Rule {
  struct Block {
    index_t start;
    double ref;       // s[start]
    double offset;    // sum (s - ref) over the block
    double count;     // the block's length
    double w_sum;     // sum ws over the block
  };
  const double* s;
  const double* ws;
  double eps;
  bool pool_all;  // eps = inf

  SOFTRANK_HD Block item(const double* sorted, index_t i) const {
    return Block{i, sorted[i], 0.0, 1.0, ws[i]};
  }
  // mean_a(s) - mean_b(s) <= eps (mean_a(ws) - mean_b(ws)), multiplied through
  // by count_a count_b (no division in the test).
  SOFTRANK_HD bool merges(const Block& a, const Block& b) const {
    if (pool_all) return true;
    const double counts = a.count * b.count;
    const double ds = counts * (a.ref - b.ref) + (b.count * a.offset - a.count * b.offset);
    const double dw = b.count * a.w_sum - a.count * b.w_sum;
    return ds <= eps * dw;
  }
  SOFTRANK_HD Block pool(const Block& a, const Block& b) const {
    return Block{a.start, a.ref, a.offset + b.offset + b.count * (b.ref - a.ref),
                 a.count + b.count, a.w_sum + b.w_sum};
  }
  // The projection at sorted position i of block b: (s_i - mean_B s) / eps + mean_B ws.
  SOFTRANK_HD double output(const Block& b, index_t i) const {
    const double w_mean = b.w_sum / b.count;
    if (pool_all || eps == 0.0) return w_mean;  // (s_i - mean) / eps -> 0 in both limits
    return ((s[i] - b.ref) - b.offset / b.count) / eps + w_mean;
  }
};

struct ProjectionKlRule {
  struct Block {
    index_t start;
    double ref;    // s[start]
    double lse_s;  // log sum exp((s - ref) / eps) over the block, >= 0
    double lse_w;  // log sum exp(ws) over the block (-inf where every ws is -inf)
  };
  static constexpr double kInf = std::numeric_limits<double>::infinity();
  const double* s;
  const double* ws;
  double eps;
  bool pool_all;  // eps = inf

  SOFTRANK_HD Block item(const double* sorted, index_t i) const {
    return Block{i, sorted[i], 0.0, ws[i]};
  }
  // (ref_a - ref_b) / eps + lse_s_a - lse_s_b <= lse_w_a - lse_w_b. A block
  // whose ws are all -inf (zeros of e^w) has V = +inf and always pools.
  SOFTRANK_HD bool merges(const Block& a, const Block& b) const {
    if (pool_all || b.lse_w == -kInf) return true;
    if (eps == 0.0) return a.ref == b.ref;  // the hard limit pools ties only
    return (a.ref - b.ref) / eps + (a.lse_s - b.lse_s) <= a.lse_w - b.lse_w;
  }
  SOFTRANK_HD Block pool(const Block& a, const Block& b) const {
    return Block{a.start, a.ref, log_add_exp(a.lse_s, b.lse_s + centred(b.ref, a.ref)),
                 log_add_exp(a.lse_w, b.lse_w)};
  }
  // (v - ref) / eps for v <= ref. eps = inf counts every value as ref; eps = 0
  // counts the values equal to ref (the others weigh exp(-inf) = 0), which is
  // the limit: a block pooled at eps = 0 holds ties, or values below them
  // only because their ws are all -inf.
  SOFTRANK_HD double centred(double v, double ref) const {
    if (pool_all || v == ref) return 0.0;
    return eps == 0.0 ? -kInf : (v - ref) / eps;
  }
  // s_i / eps - V_B = (s_i - ref) / eps - lse_s + lse_w.
  SOFTRANK_HD double output(const Block& b, index_t i) const {
    return centred(s[i], b.ref) - b.lse_s + b.lse_w;
  }
};

// The projection of one sorted row: s and ws decreasing (n values each),
// writes the projection at each sorted position into `sorted_out` and the
// blocks into block_start. `stack` holds n blocks of the rule's type.
template <class Rule>
SOFTRANK_HD void project_sorted(const Rule& rule, index_t n, typename Rule::Block* stack,
                                double* sorted_out, index_t* block_start) {
  const index_t count = pav_run(rule, rule.s, 0, n, BlockArray<typename Rule::Block>{stack});
  for (index_t k = 0; k < count; ++k) {
    const index_t e = k + 1 < count ? stack[k + 1].start : n;
    for (index_t i = stack[k].start; i < e; ++i) {
      sorted_out[i] = rule.output(stack[k], i);
      block_start[i] = stack[k].start;
    }
  }
}

}  // namespace softrank
