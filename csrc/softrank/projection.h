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
#include "isotonic.h"  // kl_references, exp_nonpositive
#include "pav.h"

namespace softrank {

// --- The projection's rules --------------------------------------------------
//
// Both see the sorted z (`s`, decreasing) and the sorted w (`ws`, decreasing)
// of one row. Block values are V = (mean or LSE of s) / eps - (mean or LSE of
// ws); the isotonic solution is non-increasing, so adjacent blocks pool when
// they violate it, V_a < V_b, and not where V_a = V_b (for 0 < eps < inf).
// Equal values come from z tied where w is tied too (w's repeated values:
// the top-k mask's ones and zeros), where P is locally constant in z: pooled,
// such a block would carry the Jacobian (I - 11^T / m) / eps of a pooled
// block instead of 0 (a top-k mask's gradient pushed between the tied zeros
// of a ReLU). Pooled or not, their outputs are the same. Statistics of s are
// kept relative to the block's first (its largest) value `ref`, so that only
// differences of nearby values are scaled by 1/eps.

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
  // mean_a(s) - mean_b(s) < eps (mean_a(ws) - mean_b(ws)), multiplied through
  // by count_a count_b (no division in the test); eps = 0 pools ties of s
  // (ds >= 0: s is sorted).
  SOFTRANK_HD bool merges(const Block& a, const Block& b) const {
    if (pool_all) return true;
    const double counts = a.count * b.count;
    const double ds = counts * (a.ref - b.ref) + (b.count * a.offset - a.count * b.offset);
    if (eps == 0.0) return ds <= 0.0;
    const double dw = b.count * a.w_sum - a.count * b.w_sum;
    return ds < eps * dw;
  }
  SOFTRANK_HD Block pool(const Block& a, const Block& b) const {
    return Block{a.start, a.ref, a.offset + b.offset + b.count * (b.ref - a.ref),
                 a.count + b.count, a.w_sum + b.w_sum};
  }
  // The projection at sorted position i of block b: (s_i - mean_B s) / eps +
  // mean_B ws, the block's quotients taken once. The mean of s's offsets is
  // taken after the division by eps: offset / count of subnormal offsets
  // would round on the subnormal grid, which 1 / eps amplifies (subnormal z
  // beside a large one at a subnormal eps lost 1e-9 of sum(w)), whereas
  // (s_i - ref) and offset are exact there and their quotients by eps round
  // relatively.
  struct Output {
    double ref, offset_mean_over_eps, w_mean;
  };
  SOFTRANK_HD Output prepare(const Block& b, index_t /*end*/) const {
    const bool limit = pool_all || eps == 0.0;  // (s_i - mean) / eps -> 0 in both limits
    return Output{b.ref, limit ? 0.0 : b.offset / eps / b.count, b.w_sum / b.count};
  }
  SOFTRANK_HD double output(const Output& o, index_t i) const {
    if (pool_all || eps == 0.0) return o.w_mean;
    return ((s[i] - o.ref) / eps - o.offset_mean_over_eps) + o.w_mean;
  }
};

// l2 is homogeneous, P(c z, c w) = c P(z, w) for c > 0, and its rule's
// cross products of counts and sums reach 1.5 n^2 max(|s|, |ws|), which
// overflows where the values exceed about 2^1021 / n^2 (a row of 13 values
// near 1e307 pooled wrongly). Such a row is scaled by 2^-k (exact, but for
// values below 2^(k - 1074), which are far below the row's resolution) to
// below that bound: s in place, ws into `ws_scaled`. Returns k (0: nothing
// scaled, ws_scaled untouched); the caller multiplies the output by 2^k.
//
// The largest binary exponent of the rule's values for a row of n: values
// below 2^limit keep 1.5 n^2 max(|s|, |ws|) below 2^1023.
SOFTRANK_HD int projection_l2_exponent_limit(index_t n) {
  int bits = 0;
  while (bits < 32 && (static_cast<std::int64_t>(n) >> bits) != 0) ++bits;
  return 1021 - 2 * bits;
}

SOFTRANK_HD int projection_l2_scale_down(double* s, const double* ws, index_t n, double* ws_scaled) {
  if (n <= 0) return 0;
  const double largest = std::fmax(std::fmax(std::fabs(s[0]), std::fabs(s[n - 1])),
                                   std::fmax(std::fabs(ws[0]), std::fabs(ws[n - 1])));
  const int limit = projection_l2_exponent_limit(n);
  int exponent;
  std::frexp(largest, &exponent);  // largest < 2^exponent
  if (exponent <= limit) return 0;
  const int k = exponent - limit;
  for (index_t i = 0; i < n; ++i) {
    s[i] = std::ldexp(s[i], -k);
    ws_scaled[i] = std::ldexp(ws[i], -k);
  }
  return k;
}

// P depends on z / eps alone. At a subnormal eps (below 2^-1000) the rule's
// block means of s (offset / count) and its eps (w_a - w_b) round on the
// subnormal grid, whose step 2^-1074 is then amplified by 1 / eps: a row of
// subnormal z at eps = 3e-319 lost 1e-5 of sum(w). Such a row's s and eps
// are multiplied by 2^k (exact: no value leaves the range) with k as large
// as the row allows: s below projection_l2_exponent_limit, eps at most 1.
// Returns k (0: nothing scaled); the caller's eps becomes ldexp(eps, k).
SOFTRANK_HD int projection_l2_scale_up(double* s, index_t n, double eps) {
  if (n <= 0 || !(eps > 0.0 && eps < 0x1p-1000)) return 0;
  int s_exponent, eps_exponent;
  std::frexp(std::fmax(std::fabs(s[0]), std::fabs(s[n - 1])), &s_exponent);  // (0 for 0)
  std::frexp(eps, &eps_exponent);
  const int room = projection_l2_exponent_limit(n) - s_exponent;
  const int k = room < -eps_exponent ? room : -eps_exponent;
  if (k <= 0) return 0;
  for (index_t i = 0; i < n; ++i) s[i] = std::ldexp(s[i], k);
  return k;
}

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
  // (ref_a - ref_b) / eps + lse_s_a - lse_s_b < lse_w_a - lse_w_b. A block
  // whose ws are all -inf (zeros of e^w) has V = +inf and always pools.
  SOFTRANK_HD bool merges(const Block& a, const Block& b) const {
    if (pool_all || b.lse_w == -kInf) return true;
    if (eps == 0.0) return a.ref == b.ref;  // the hard limit pools ties only
    const double left = (a.ref - b.ref) / eps + (a.lse_s - b.lse_s);  // >= 0 but for lse_s
    const double right = a.lse_w - b.lse_w;
    if (std::isfinite(left) && std::isfinite(right)) return left < right;
    // A spread of z / eps or of w wider than a double (left or right is
    // +inf, where inf < inf cannot decide): the test at half scale, where
    // the right side is finite and the left overflows only where it is the
    // larger.
    return (0.5 * a.ref - 0.5 * b.ref) / eps + 0.5 * (a.lse_s - b.lse_s) <
           0.5 * a.lse_w - 0.5 * b.lse_w;
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
  // s_i / eps - V_B = (s_i - ref) / eps - lse_s + lse_w. Where the block's
  // spread of s / eps passes the largest double (`wide`; the output itself
  // lies in [min w, max w]), the sum is formed at half scale.
  struct Output {
    double ref, lse_s, lse_w;
    bool wide;
  };
  SOFTRANK_HD Output prepare(const Block& b, index_t end) const {
    return Output{b.ref, b.lse_s, b.lse_w,
                  !pool_all && eps != 0.0 && !std::isfinite((s[end - 1] - b.ref) / eps)};
  }
  SOFTRANK_HD double output(const Output& o, index_t i) const {
    const double v = centred(s[i], o.ref) - o.lse_s + o.lse_w;
    // (only the positions that overflow: halving a subnormal s would round)
    if (o.wide && v == -kInf)
      return twice_finite((0.5 * s[i] - 0.5 * o.ref) / eps - 0.5 * o.lse_s + 0.5 * o.lse_w);
    return v;
  }
};

// kl with 0 < eps < inf on the CPU: the arithmetic of IsotonicKlRule
// (isotonic.h), no log in the loop, in place of ProjectionKlRule's two
// log_add_exp per pool (a third of a 1000-row's time). Both s / eps and ws
// are cut into runs spanning at most kIsotonicKlSpan (kl_references_decreasing); each
// position i gets its runs' largest values R_i (of s, in units of s) and Q_i
// (of ws), and t_i = exp((s_i - R_i) / eps), u_i = exp(ws_i - Q_i), both in
// [e^-300, 1] (u_i = 0 where ws_i = -inf), computed beforehand in vectorised
// passes. A block keeps the references of its first position, S = sum t
// and W = sum u relative to them, so V = R / eps + log S - Q - log W. With
// d = (R_a - R_b) / eps - (Q_a - Q_b) and e = exp(-|d|) (1, and no exp call,
// where both pairs of references agree), V_a < V_b reads S_a W_b < e S_b
// W_a where d >= 0 and e S_a W_b <= S_b W_a otherwise; S and W lie in
// [2^-433, 2^31] (W may be 0: every ws of the block -inf, V = +inf, and the
// test pools), so where e >= 2^-100 every product is a normal double or 0;
// below, the test runs on logs. Each final block takes one log (prepare).
struct ProjectionKlRunsRule {
  struct Block {
    index_t start;
    double ref_s;  // R: the reference of the block's first position (units of s)
    double sum_s;  // S = sum exp((s - R) / eps)
    double ref_w;  // Q
    double sum_w;  // W = sum exp(ws - Q)
  };
  const double* s;
  const double* ws;
  const double* refs_s;  // R_i
  const double* t_s;     // exp((s_i - R_i) / eps)
  const double* refs_w;  // Q_i
  const double* t_w;     // exp(ws_i - Q_i)
  double eps;

  SOFTRANK_HD Block item(const double*, index_t i) const {
    return Block{i, refs_s[i], t_s[i], refs_w[i], t_w[i]};
  }
  SOFTRANK_HD bool merges(const Block& a, const Block& b) const {
    constexpr double kSmall = 0x1p-100;
    const double dr = a.ref_s == b.ref_s ? 0.0 : (a.ref_s - b.ref_s) / eps;  // >= 0
    const double dq = a.ref_w - b.ref_w;                                    // >= 0
    if (!(std::isfinite(dr) && std::isfinite(dq))) return merges_past_overflow(a, b);
    const double d = dr - dq;
    if (d == 0.0) return a.sum_s * b.sum_w < b.sum_s * a.sum_w;
    const double e = exp_nonpositive(d > 0.0 ? -d : d);
    if (e >= kSmall) {
      return d > 0.0 ? a.sum_s * b.sum_w < e * b.sum_s * a.sum_w
                     : e * a.sum_s * b.sum_w < b.sum_s * a.sum_w;
    }
    return dr + std::log(a.sum_s) + std::log(b.sum_w) < dq + std::log(b.sum_s) + std::log(a.sum_w);
  }
  // dr or dq past the largest double (a spread of z / eps or of w wider than
  // a double, where d would be inf - inf): the log test at half scale. dq / 2
  // is finite (both references are), so dh is +inf only where dr / 2
  // overflows too, which then decides; b's ws all -inf (W_b = 0) pools.
  SOFTRANK_HD bool merges_past_overflow(const Block& a, const Block& b) const {
    if (b.sum_w == 0.0) return true;
    const double dh = (0.5 * a.ref_s - 0.5 * b.ref_s) / eps - (0.5 * a.ref_w - 0.5 * b.ref_w);
    return dh + 0.5 * (std::log(a.sum_s) + std::log(b.sum_w)) <
           0.5 * (std::log(b.sum_s) + std::log(a.sum_w));
  }
  SOFTRANK_HD Block pool(const Block& a, const Block& b) const {
    const double es = a.ref_s == b.ref_s ? 1.0 : exp_nonpositive((b.ref_s - a.ref_s) / eps);
    const double ew = a.ref_w == b.ref_w ? 1.0 : exp_nonpositive(b.ref_w - a.ref_w);
    return Block{a.start, a.ref_s, a.sum_s + es * b.sum_s, a.ref_w, a.sum_w + ew * b.sum_w};
  }
  // s_i / eps - V_B = (s_i - s_f) / eps + ws_f + log(W' / S'), f the block's
  // first position, S' = S / t_f and W' = W / u_f its sums relative to f's
  // values (as ProjectionKlRule's, so that a block of one is exactly ws_f,
  // not ws_f up to the rounding of log(exp(.))). One log per block: W' / S'
  // is a normal double (both lie in [1, 2^464]), or 0 (W = 0: -inf).
  // Where the block's spread of s / eps passes the largest double (`wide`),
  // the output (which lies in [min w, max w]) is formed at half scale.
  struct Output {
    double ref, shift;
    bool wide;
  };
  SOFTRANK_HD Output prepare(const Block& b, index_t end) const {
    const index_t f = b.start;
    if (b.sum_w == 0.0) return Output{s[f], -std::numeric_limits<double>::infinity(), false};
    return Output{s[f], ws[f] + std::log((b.sum_w / t_w[f]) / (b.sum_s / t_s[f])),
                  !std::isfinite((s[end - 1] - s[f]) / eps)};
  }
  SOFTRANK_HD double output(const Output& o, index_t i) const {
    const double v = (s[i] - o.ref) / eps + o.shift;
    // (only the positions that overflow: halving a subnormal s would round)
    if (o.wide && v == -std::numeric_limits<double>::infinity())
      return twice_finite((0.5 * s[i] - 0.5 * o.ref) / eps + 0.5 * o.shift);
    return v;
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
    if (e - stack[k].start == 1) {
      // A block of one is its ws, which is what every rule's output comes to
      // there ((s_i - ref) = 0, the block's mean or LSE of ws is ws_i): no
      // division, no log (most blocks, where z is spread wide against w).
      sorted_out[stack[k].start] = rule.ws[stack[k].start];
      block_start[stack[k].start] = stack[k].start;
      continue;
    }
    const auto block_output = rule.prepare(stack[k], e);
    for (index_t i = stack[k].start; i < e; ++i) {
      sorted_out[i] = rule.output(block_output, i);
      block_start[i] = stack[k].start;
    }
  }
}

}  // namespace softrank
