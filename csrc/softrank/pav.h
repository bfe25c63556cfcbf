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
#include <limits>

#include "common.h"

namespace softrank {

struct BlockStack {
  index_t* start;  // first sorted position of each block
  double* ref;     // xs[start], the block's largest value
  double* stat;    // l2: sum (xs - ref); kl: S = sum exp((xs - ref) * c), in [1, m]
  double* stat2;   // l2: the block length m; rank kl: exp((xs[last] - ref) / eps); sort kl: Q = sum_{k<m} exp(-k/eps)
  double* tail;    // sort kl: exp(xs[last] - ref)
};

// v / eps, by a multiplication where 1/eps is finite (it is not for
// subnormal eps): the division is the slowest operation of the PAV loop.
struct InverseScale {
  double eps, inv;
  bool multiply;
  SOFTRANK_HD explicit InverseScale(double e)
      : eps(e), inv(1.0 / e), multiply(std::isfinite(1.0 / e)) {}
  SOFTRANK_HD double operator()(double v) const { return multiply ? v * inv : v / eps; }
};

// The l2 block keeps d = sum (xs - ref), updated by an add and a multiply.
// The merge tests compare the difference of the block means,
// dx = (ref_a - ref_b) + d_a / m_a - d_b / m_b, with h = (m_a + m_b) / 2
// (rank: dx <= eps h; sort: h <= dx eps), multiplied through by w = m_a m_b
// so that the loop holds no division (the divider was its bottleneck):
// X = w (ref_a - ref_b) + (m_b d_a - m_a d_b) = w dx. Rows reach PAV with
// |x| < 2^960 (soft_forward_sorted scales them), so |X| < 2^1023 for any
// m_a m_b <= 2^60; an overflow of eps h w or X eps to inf, or an underflow
// to 0, happens only where the limit gives the same answer.
//
// The block being built (the top of the stack) lives in registers and only
// the blocks below it in memory: a merge chain then never waits on a store
// it has just made (store-to-load forwarding was most of the loop's time).
// One l2 PAV loop serves both operators; `merge(X, w, h)` decides.
//
// Every PAV loop here pools the sorted positions [lo, hi) of a row (the whole
// row, or one chunk of a long row: pav_chunks) into the stack `b`, from its
// slot 0; block starts are positions in the row.
template <class MergeTest>
SOFTRANK_HD index_t pav_l2(const double* xs, index_t lo, index_t hi, bool merge_all, BlockStack b,
                           MergeTest merge) {
  if (hi <= lo) return 0;
  // Block lengths are carried as doubles (exact integers), the stack's in
  // stat2, so that no test converts an index.
  index_t top = 0;  // blocks stored below the current one
  index_t cur_start = lo;
  double cur_ref = xs[lo], cur_d = 0.0, cur_m = 1.0;
  for (index_t i = lo + 1; i < hi; ++i) {
    const double ref_i = xs[i];
    // The new singleton block (m_b = 1, d_b = 0) against the current block.
    const double x_cur = cur_m * (cur_ref - ref_i) + cur_d;
    if (!(merge_all || merge(x_cur, cur_m, 0.5 * (cur_m + 1.0)))) {
      b.start[top] = cur_start;
      b.ref[top] = cur_ref;
      b.stat[top] = cur_d;
      b.stat2[top] = cur_m;
      ++top;
      cur_start = i;
      cur_ref = ref_i;
      cur_d = 0.0;
      cur_m = 1.0;
      continue;
    }
    index_t s = cur_start;
    double ref = cur_ref, d = cur_d + (ref_i - cur_ref), mb = cur_m + 1.0;
    while (top > 0) {
      const double ma = b.stat2[top - 1];
      const double ref_a = b.ref[top - 1], d_a = b.stat[top - 1];
      const double w = ma * mb;
      const double x = w * (ref_a - ref) + (mb * d_a - ma * d);
      if (!(merge_all || merge(x, w, 0.5 * (ma + mb)))) break;
      d = d_a + d + mb * (ref - ref_a);
      ref = ref_a;
      mb += ma;
      --top;
      s = b.start[top];
    }
    cur_start = s;
    cur_ref = ref;
    cur_d = d;
    cur_m = mb;
  }
  b.start[top] = cur_start;
  b.ref[top] = cur_ref;
  b.stat[top] = cur_d;
  b.stat2[top] = cur_m;
  return top + 1;
}

// Rank: V = mean(xs)/eps - mean(rho); merge when dx <= eps * h.
SOFTRANK_HD index_t pav_rank_l2(const double* xs, index_t lo, index_t hi, double eps,
                                BlockStack b) {
  return pav_l2(xs, lo, hi, std::isinf(eps), b,
                [eps](double x, double w, double h) { return x <= eps * (h * w); });
}

// Sort: V = mean(rho)/eps - mean(xs); merge when h <= dx * eps.
SOFTRANK_HD index_t pav_sort_l2(const double* xs, index_t lo, index_t hi, double eps,
                                BlockStack b) {
  return pav_l2(xs, lo, hi, std::isinf(eps), b,
                [eps](double x, double w, double h) { return h * w <= x * eps; });
}

// kl blocks keep S = sum exp((xs - ref)/eps) relative to the block's largest
// value, so S is in [1, m]: no overflow. Merge when V_A <= V_B, i.e.
// S_a R_b <= S_b R_a exp(-(ref_a - ref_b)/eps); an underflow of that factor
// to 0 is the right answer (no merge). The factor is not an exp call in the
// loop: `step[i] = exp((xs[i] - xs[i-1])/eps)` is computed beforehand, in one
// vectorised pass, and each block carries `tail = exp((xs[last] - ref)/eps)`,
// so the factor between adjacent blocks is tail_a * step[s_b]. (Products of
// k steps carry at most k/2 ulp of rounding; the outputs themselves use
// exact exps.)
// R of the current block, rho_sum(n, cur_start, i), is kept as a running
// sum where every partial sum is an integer below n (n + 1) / 2 <= 2^53
// (exact_sums: n <= 2^26), so it equals the closed form bit for bit; longer
// rows take the closed form. A template parameter, so that the loop holds
// no select between the two.
// The row has n positions; [lo, hi) is the part pooled here.
template <bool exact_sums>
SOFTRANK_HD index_t pav_rank_kl_loop(const double* xs, const double* step, index_t lo, index_t hi,
                                     index_t n, double eps, BlockStack b) {
  if (hi <= lo) return 0;
  const bool merge_all = std::isinf(eps);
  // As in pav_l2, the current block is kept in registers.
  index_t top = 0;
  index_t cur_start = lo;
  double cur_ref = xs[lo], cur_sum = 1.0, cur_tail = 1.0;
  double cur_rho = static_cast<double>(n - lo);
  double rho_i = static_cast<double>(n - lo);  // rho_sum(n, i, i + 1) = n - i, exact
  for (index_t i = lo + 1; i < hi; ++i) {
    index_t s = i;
    double ref = xs[i], sum = 1.0, tail = 1.0;
    rho_i -= 1.0;
    {
      const double decay = cur_tail * step[s];
      const double rho_cur = exact_sums ? cur_rho : rho_sum(n, cur_start, s);
      if (!(merge_all || cur_sum * rho_i <= decay * sum * rho_cur)) {
        b.start[top] = cur_start;
        b.ref[top] = cur_ref;
        b.stat[top] = cur_sum;
        b.stat2[top] = cur_tail;
        ++top;
        cur_start = s;
        cur_ref = ref;
        cur_sum = sum;
        cur_tail = tail;
        cur_rho = rho_i;
        continue;
      }
      sum = cur_sum + decay * sum;
      tail = decay * tail;
      ref = cur_ref;
      s = cur_start;
      cur_rho += rho_i;
    }
    while (top > 0) {
      const index_t sa = b.start[top - 1];
      const double sum_a = b.stat[top - 1];
      const double decay = b.stat2[top - 1] * step[s];
      if (!(merge_all ||
            sum_a * rho_sum(n, s, i + 1) <= decay * sum * rho_sum(n, sa, s)))
        break;
      sum = sum_a + decay * sum;
      tail = decay * tail;
      ref = b.ref[top - 1];
      s = sa;
      --top;
      if (exact_sums) cur_rho = rho_sum(n, s, i + 1);  // (a cascade is rare)
    }
    cur_start = s;
    cur_ref = ref;
    cur_sum = sum;
    cur_tail = tail;
  }
  b.start[top] = cur_start;
  b.ref[top] = cur_ref;
  b.stat[top] = cur_sum;
  b.stat2[top] = cur_tail;
  return top + 1;
}

SOFTRANK_HD index_t pav_rank_kl(const double* xs, const double* step, index_t lo, index_t hi,
                                index_t n, double eps, BlockStack b) {
  return n <= (index_t{1} << 26) ? pav_rank_kl_loop<true>(xs, step, lo, hi, n, eps, b)
                                 : pav_rank_kl_loop<false>(xs, step, lo, hi, n, eps, b);
}

// Sort kl: S = sum exp(xs - ref) and Q = sum_{k<m} exp(-k/eps), both in
// [1, m]. Merge when Q_a S_b exp(-u) <= S_a Q_b exp(-v), u = ref_a - ref_b,
// v = m_a / eps; where either factor underflows the same test runs on logs.
// As in the rank kl loop there is no exp call: `step[i] = exp(xs[i] -
// xs[i-1])` and `decay[k] = exp(-k/eps)` are tabulated beforehand (vectorised)
// and each block carries `tail = exp(xs[last] - ref)`.
// The sort kl test of block A (earlier) against block B: true to merge.
// eu = exp(-(ref_a - ref)) and ev = exp(-(s - sa)/eps), from the tables.
SOFTRANK_HD bool sort_kl_merges(bool merge_all, const InverseScale& scale, index_t sa,
                                double ref_a, double sum_a, double sum_rho_a, double eu, double ev,
                                index_t s, double ref, double sum, double sum_rho) {
  if (merge_all) return true;
  if (eu >= std::numeric_limits<double>::min() && ev >= std::numeric_limits<double>::min())
    return sum_rho_a * sum * eu <= ev * sum_a * sum_rho;
  const double u = ref_a - ref, v = scale(static_cast<double>(s - sa));
  // Both logs lie in [0, log(m_a m_b)] <= [0, 43.7] (m < 2^31), so where
  // u - v is outside [-44, 44] the logs cannot change the answer: decide
  // without them (same decisions, two log calls saved per test on rows of
  // widely spread values).
  if (u - v >= 44.0) return true;
  if (u - v < -44.0) return false;
  return std::log(sum_rho_a * sum) - u <= std::log(sum_a * sum_rho) - v;
}

SOFTRANK_HD index_t pav_sort_kl(const double* xs, const double* step, const double* decay,
                                index_t lo, index_t hi, double eps, BlockStack b) {
  if (hi <= lo) return 0;
  const bool merge_all = std::isinf(eps);
  const InverseScale scale(eps);
  auto merges = [&](index_t sa, double ref_a, double sum_a, double sum_rho_a, double eu,
                    double ev, index_t s, double ref, double sum, double sum_rho) {
    return sort_kl_merges(merge_all, scale, sa, ref_a, sum_a, sum_rho_a, eu, ev, s, ref, sum,
                          sum_rho);
  };
  // As in pav_l2, the current block is kept in registers.
  index_t top = 0;
  index_t cur_start = lo;
  double cur_ref = xs[lo], cur_sum = 1.0, cur_sum_rho = 1.0, cur_tail = 1.0;
  for (index_t i = lo + 1; i < hi; ++i) {
    index_t s = i;
    double ref = xs[i], sum = 1.0, sum_rho = 1.0, tail = 1.0;
    {
      const double eu = cur_tail * step[s], ev = decay[s - cur_start];
      if (!merges(cur_start, cur_ref, cur_sum, cur_sum_rho, eu, ev, s, ref, sum, sum_rho)) {
        b.start[top] = cur_start;
        b.ref[top] = cur_ref;
        b.stat[top] = cur_sum;
        b.stat2[top] = cur_sum_rho;
        b.tail[top] = cur_tail;
        ++top;
        cur_start = s;
        cur_ref = ref;
        cur_sum = sum;
        cur_sum_rho = sum_rho;
        cur_tail = tail;
        continue;
      }
      sum = cur_sum + eu * sum;
      sum_rho = cur_sum_rho + ev * sum_rho;
      tail = eu * tail;
      ref = cur_ref;
      s = cur_start;
    }
    while (top > 0) {
      const index_t sa = b.start[top - 1];
      const double ref_a = b.ref[top - 1], sum_a = b.stat[top - 1], sum_rho_a = b.stat2[top - 1];
      const double eu = b.tail[top - 1] * step[s], ev = decay[s - sa];
      if (!merges(sa, ref_a, sum_a, sum_rho_a, eu, ev, s, ref, sum, sum_rho)) break;
      sum = sum_a + eu * sum;
      sum_rho = sum_rho_a + ev * sum_rho;
      tail = eu * tail;
      ref = ref_a;
      s = sa;
      --top;
    }
    cur_start = s;
    cur_ref = ref;
    cur_sum = sum;
    cur_sum_rho = sum_rho;
    cur_tail = tail;
  }
  b.start[top] = cur_start;
  b.ref[top] = cur_ref;
  b.stat[top] = cur_sum;
  b.stat2[top] = cur_sum_rho;
  b.tail[top] = cur_tail;
  return top + 1;
}

// --- Long rows: PAV by chunks -------------------------------------------------
//
// A long row is pooled in chunks of kPavChunk positions, each by the loop
// above into its own part of the stack (chunk c's blocks from slot c *
// kPavChunk), in parallel; then pav_merge_chunks joins neighbouring chunks.
// This finds the same blocks as one pass: PAV may pool adjacent violators in
// any order and reach the same solution, and a chunk pools only violators.
// The chunking depends on n alone (never on the thread count), so results
// are the same bit for bit for any number of threads.
constexpr index_t kPavChunk = 1 << 16;
constexpr index_t kPavChunkedMin = 1 << 18;  // rows from this long are chunked

SOFTRANK_HD index_t pav_chunk_count(index_t n) {
  return n >= kPavChunkedMin ? (n - 1) / kPavChunk + 1 : (n > 0 ? 1 : 0);
}

// One block as the merges between chunks see it: the stack's fields.
struct PavBlock {
  index_t start, end;  // sorted positions [start, end)
  double ref, stat, stat2, tail;
};

// The merge test and pooled statistics of each loop above, for two adjacent
// blocks A (earlier) and B: the same expressions as that loop's cascade.
template <class MergeTest>
struct L2Pooling {
  bool merge_all;
  MergeTest merge;
  SOFTRANK_HD bool merges(const PavBlock& a, const PavBlock& b) const {
    const double w = a.stat2 * b.stat2;
    const double x = w * (a.ref - b.ref) + (b.stat2 * a.stat - a.stat2 * b.stat);
    return merge_all || merge(x, w, 0.5 * (a.stat2 + b.stat2));
  }
  SOFTRANK_HD PavBlock pool(const PavBlock& a, const PavBlock& b) const {
    return PavBlock{a.start, b.end, a.ref, a.stat + b.stat + b.stat2 * (b.ref - a.ref),
                    b.stat2 + a.stat2, 0.0};
  }
};

struct RankKlPooling {
  bool merge_all;
  index_t n;
  const double* step;
  SOFTRANK_HD bool merges(const PavBlock& a, const PavBlock& b) const {
    const double decay = a.stat2 * step[b.start];
    return merge_all ||
           a.stat * rho_sum(n, b.start, b.end) <= decay * b.stat * rho_sum(n, a.start, b.start);
  }
  SOFTRANK_HD PavBlock pool(const PavBlock& a, const PavBlock& b) const {
    const double decay = a.stat2 * step[b.start];
    return PavBlock{a.start, b.end, a.ref, a.stat + decay * b.stat, decay * b.stat2, 0.0};
  }
};

struct SortKlPooling {
  bool merge_all;
  InverseScale scale;
  const double* step;
  const double* decay;
  SOFTRANK_HD bool merges(const PavBlock& a, const PavBlock& b) const {
    return sort_kl_merges(merge_all, scale, a.start, a.ref, a.stat, a.stat2,
                          a.tail * step[b.start], decay[b.start - a.start], b.start, b.ref,
                          b.stat, b.stat2);
  }
  SOFTRANK_HD PavBlock pool(const PavBlock& a, const PavBlock& b) const {
    const double eu = a.tail * step[b.start], ev = decay[b.start - a.start];
    return PavBlock{a.start, b.end, a.ref, a.stat + eu * b.stat, a.stat2 + ev * b.stat2,
                    eu * b.tail};
  }
};

// eps = 0: the rank pools equal values (pav_hard), the sort nothing.
struct HardPooling {
  Op op;
  SOFTRANK_HD bool merges(const PavBlock& a, const PavBlock& b) const {
    return op == Op::Rank && a.ref == b.ref;
  }
  SOFTRANK_HD PavBlock pool(const PavBlock& a, const PavBlock& b) const {
    return PavBlock{a.start, b.end, a.ref, 0.0, 0.0, 0.0};
  }
};

// Joins the chunks' stacks. On entry chunk c's blocks are the stack slots
// [first[c], last[c]) with first[c] = c * kPavChunk; on return the blocks of
// the row are those of the chunks in order, each chunk's now [first[c],
// last[c]) (possibly empty). Chunk c's blocks are pushed, as PAV would, onto
// the blocks before them; once one goes on without pooling, the rest of the
// chunk stands too (its blocks were already pooled against each other). A
// block pooled across chunks is stored in the slot of its last part, so the
// slots of a chunk stay contiguous. O(chunks + blocks pooled).
template <class Pooling>
SOFTRANK_HD void pav_merge_chunks(const Pooling& pooling, index_t n, index_t chunks, BlockStack b,
                                  index_t* first, index_t* last) {
  auto load = [&](index_t k, index_t end) {
    return PavBlock{b.start[k], end, b.ref[k], b.stat[k], b.stat2[k], b.tail[k]};
  };
  index_t below = 0;  // the last chunk before c that still has blocks
  for (index_t c = 1; c < chunks; ++c) {
    const index_t chunk_end = (c + 1 < chunks) ? (c + 1) * kPavChunk : n;
    for (index_t j = first[c]; j < last[c]; ++j) {
      PavBlock cur = load(j, j + 1 < last[c] ? b.start[j + 1] : chunk_end);
      bool pooled = false;
      for (;;) {
        // The block below cur: chunk c's slot j - 1, or the top of an earlier chunk.
        index_t k;
        if (first[c] < j) {
          k = j - 1;
        } else {
          while (below > 0 && first[below] == last[below]) --below;
          if (first[below] == last[below]) break;  // cur is the row's first block
          k = last[below] - 1;
        }
        const PavBlock a = load(k, cur.start);
        if (!pooling.merges(a, cur)) break;
        cur = pooling.pool(a, cur);
        pooled = true;
        if (k == j - 1 && first[c] < j)
          first[c] = j;
        else
          --last[below];
      }
      b.start[j] = cur.start;
      b.ref[j] = cur.ref;
      b.stat[j] = cur.stat;
      b.stat2[j] = cur.stat2;
      b.tail[j] = cur.tail;
      if (!pooled) break;
      first[c] = j;
    }
    if (first[c] < last[c]) below = c;
  }
}

// eps = 0, the hard operator. Rank: blocks are the runs of equal values (tied
// entries share their mean rank). Sort: singletons.
SOFTRANK_HD index_t pav_hard(const double* xs, index_t lo, index_t hi, Op op, BlockStack b) {
  index_t top = 0;
  for (index_t i = lo; i < hi; ++i) {
    if (op == Op::Rank && top > 0 && xs[i] == b.ref[top - 1]) continue;
    b.start[top] = i;
    b.ref[top] = xs[i];
    ++top;
  }
  return top;
}

// Weighted isotonic regression, non-decreasing, by PAV. `w` may be null
// (unit weights). Equal adjacent block values are pooled. Block stats: ref,
// stat = the block's weighted mean minus ref, stat2 = sum w. The mean is
// updated by a convex combination (the weight fraction is in [0, 1]), never
// through sums w (y - ref): those products under- or overflow when weights
// and values span a wide range together (weights 1e-284 and 1e-14 with y
// near 1e-245 gave block means outside [min y, max y]).
SOFTRANK_HD index_t pav_isotonic_increasing(const double* y, const double* w, index_t n,
                                            BlockStack b) {
  index_t top = 0;
  for (index_t i = 0; i < n; ++i) {
    index_t s = i;
    double ref = y[i], off = 0.0, wsum = w ? w[i] : 1.0;
    while (top > 0) {
      const double ref_a = b.ref[top - 1], off_a = b.stat[top - 1], w_a = b.stat2[top - 1];
      // value_A >= value_B violates (or ties) the non-decreasing order.
      const double gap = (ref - ref_a) + (off - off_a);  // value_B - value_A
      if (!(gap <= 0.0)) break;
      const double total = w_a + wsum;
      off = off_a + (wsum / total) * gap;
      wsum = total;
      ref = ref_a;
      s = b.start[top - 1];
      --top;
    }
    b.start[top] = s;
    b.ref[top] = ref;
    b.stat[top] = off;
    b.stat2[top] = wsum;
    ++top;
  }
  return top;
}

}  // namespace softrank
