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

// One block of the soft operators' loops. stat, stat2 and tail hold what the
// block's pooling rule says (L2Pooling, RankKlPooling, SortKlPooling below).
struct PavBlock {
  index_t start, end;  // sorted positions [start, end)
  double ref, stat, stat2, tail;
};

// The stack of blocks as arrays (the outputs and products read them field by
// field); `end` is not stored: a block ends where the next one starts.
struct BlockStack {
  index_t* start;  // first sorted position of each block
  double* ref;     // xs[start], the block's largest value
  double* stat;    // the pooling rule's statistics
  double* stat2;
  double* tail;

  SOFTRANK_HD void store(index_t k, const PavBlock& block) const {
    start[k] = block.start;
    ref[k] = block.ref;
    stat[k] = block.stat;
    stat2[k] = block.stat2;
    tail[k] = block.tail;
  }
  SOFTRANK_HD PavBlock load(index_t k, index_t end) const {
    return PavBlock{start[k], end, ref[k], stat[k], stat2[k], tail[k]};
  }
};

// A stack of blocks of any rule's type, as one array.
template <class Block>
struct BlockArray {
  Block* blocks;
  SOFTRANK_HD void store(index_t k, const Block& block) const { blocks[k] = block; }
  SOFTRANK_HD Block load(index_t k, index_t) const { return blocks[k]; }
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

// --- The pooling rules ---------------------------------------------------------
//
// Each of the four loops (rank / sort, l2 / kl) is one pooling rule: the
// block of one sorted value (`item`), the test that two adjacent blocks A
// (earlier) and B violate the order and must pool (`merges`), and the pooled
// block (`pool`). `pav_run` runs a rule over a range of sorted positions and
// `pav_merge_chunks` joins the chunks of a long row with the same rule
// objects: each test is written once.
//
// l2 blocks keep d = sum (xs - ref), updated by an add and a multiply.
// The merge tests compare the difference of the block means,
// dx = (ref_a - ref_b) + d_a / m_a - d_b / m_b, with h = (m_a + m_b) / 2
// (rank: dx <= eps h; sort: h <= dx eps), multiplied through by w = m_a m_b
// so that the loop holds no division (the divider was its bottleneck):
// X = w (ref_a - ref_b) + (m_b d_a - m_a d_b) = w dx. Rows reach PAV with
// |x| < 2^960 (soft_forward_sorted scales them), so |X| < 2^1023 for any
// m_a m_b <= 2^60; an overflow of eps h w or X eps to inf, or an underflow
// to 0, happens only where the limit gives the same answer. Against a new
// singleton (m_b = 1, d_b = 0) the expressions reduce exactly (bit for bit)
// to the singleton forms, so one test serves both.
//
// kl blocks keep S = sum exp((xs - ref)/eps) relative to the block's largest
// value, so S is in [1, m]: no overflow. Merge when V_A <= V_B, i.e.
// S_a R_b <= S_b R_a exp(-(ref_a - ref_b)/eps); an underflow of that factor
// to 0 is the right answer (no merge). The factor is not an exp call in the
// loop: `step[i] = exp((xs[i] - xs[i-1])/eps)` is computed beforehand, in one
// vectorised pass, and each block carries `tail = exp((xs[last] - ref)/eps)`,
// so the factor between adjacent blocks is tail_a * step[s_b]. (Products of
// k steps carry at most k/2 ulp of rounding; the outputs themselves use
// exact exps.) R is the sum of rho over a block (see RankKlPooling).
//
// Sort kl: S = sum exp(xs - ref) and Q = sum_{k<m} exp(-k/eps), both in
// [1, m]. Merge when Q_a S_b exp(-u) < S_a Q_b exp(-v), u = ref_a - ref_b,
// v = m_a / eps; where either factor underflows the same test runs on logs.
// Strictly: the blocks pool where they violate the order. Where both sides
// round to the same value (gaps of x and 1/eps both below 2^-53, where
// exp(-u) and exp(-v) are 1), the exact test cannot be read from them, and
// pooling moved x sorted by up to n / eps: all-zero x at eps = 1e17 came out
// [-1e-17, 0, 1e-17] (exact: 0, as every gap 0 < 1/eps); apart, each output
// is its x, within those roundings of the exact one.
// `step[i] = exp(xs[i] - xs[i-1])` and `decay[k] = exp(-k/eps)` are tabulated
// beforehand (vectorised) and each block carries `tail = exp(xs[last] - ref)`.

// The l2 merge tests, multiplied through (see above).
struct RankL2Test {  // V = mean(xs)/eps - mean(rho): merge when dx <= eps h
  double eps;
  SOFTRANK_HD bool operator()(double x, double w, double h) const { return x <= eps * (h * w); }
};
struct SortL2Test {  // V = mean(rho)/eps - mean(xs): merge when h <= dx eps
  double eps;
  SOFTRANK_HD bool operator()(double x, double w, double h) const { return h * w <= x * eps; }
};

template <class MergeTest>
struct L2Pooling {
  bool merge_all;
  MergeTest merge;
  SOFTRANK_HD PavBlock item(const double* xs, index_t i) const {
    return PavBlock{i, i + 1, xs[i], 0.0, 1.0, 0.0};
  }
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

// stat = S, stat2 = tail = exp((xs[last] - ref) / eps). With kExactSums
// (n <= 2^26, rank_kl_exact_sums) the block's R is carried in `tail`: every
// partial sum is an integer below n (n + 1) / 2 <= 2^53, so it equals the
// closed form bit for bit and saves computing it twice per test; longer rows
// take the closed form.
constexpr index_t kRankKlExactSumsMax = index_t{1} << 26;
SOFTRANK_HD bool rank_kl_exact_sums(index_t n) { return n <= kRankKlExactSumsMax; }

template <bool kExactSums>
struct RankKlPooling {
  bool merge_all;
  index_t n;
  const double* step;
  SOFTRANK_HD PavBlock item(const double* xs, index_t i) const {
    return PavBlock{i, i + 1, xs[i], 1.0, 1.0, kExactSums ? static_cast<double>(n - i) : 0.0};
  }
  SOFTRANK_HD bool merges(const PavBlock& a, const PavBlock& b) const {
    const double decay = a.stat2 * step[b.start];
    const double rho_a = kExactSums ? a.tail : rho_sum(n, a.start, b.start);
    const double rho_b = kExactSums ? b.tail : rho_sum(n, b.start, b.end);
    return merge_all || a.stat * rho_b <= decay * b.stat * rho_a;
  }
  SOFTRANK_HD PavBlock pool(const PavBlock& a, const PavBlock& b) const {
    const double decay = a.stat2 * step[b.start];
    return PavBlock{a.start, b.end, a.ref, a.stat + decay * b.stat, decay * b.stat2,
                    kExactSums ? a.tail + b.tail : 0.0};
  }
};

// The sort kl test of block A (earlier) against block B: true to merge.
// eu = exp(-(ref_a - ref)) and ev = exp(-(s - sa)/eps), from the tables.
SOFTRANK_HD bool sort_kl_merges(bool merge_all, const InverseScale& scale, index_t sa,
                                double ref_a, double sum_a, double sum_rho_a, double eu, double ev,
                                index_t s, double ref, double sum, double sum_rho) {
  if (merge_all) return true;
  if (eu >= std::numeric_limits<double>::min() && ev >= std::numeric_limits<double>::min())
    return sum_rho_a * sum * eu < ev * sum_a * sum_rho;
  const double u = ref_a - ref, v = scale(static_cast<double>(s - sa));
  if (std::isinf(u) && std::isinf(v)) {
    // u and v are both beyond DBL_MAX (refs near +-DBL_MAX, and a subnormal
    // eps): u - v would be inf - inf, which compared as a merge (-inf outputs
    // where the blocks stay apart). The same test at half scale: u / 2 is
    // finite, and where v / 2 still overflows, v > u and the blocks do not merge.
    const double half_u = 0.5 * ref_a - 0.5 * ref, half_v = scale(0.5 * static_cast<double>(s - sa));
    return 0.5 * std::log(sum_rho_a * sum) - half_u < 0.5 * std::log(sum_a * sum_rho) - half_v;
  }
  // Both logs lie in [0, log(m_a m_b)] <= [0, 43.7] (m < 2^31), so where
  // u - v is outside [-44, 44] the logs cannot change the answer: decide
  // without them (same decisions, two log calls saved per test on rows of
  // widely spread values).
  if (u - v >= 44.0) return true;
  if (u - v < -44.0) return false;
  return std::log(sum_rho_a * sum) - u < std::log(sum_a * sum_rho) - v;
}

// stat = S, stat2 = Q, tail = exp(xs[last] - ref).
struct SortKlPooling {
  bool merge_all;
  InverseScale scale;
  const double* step;
  const double* decay;
  SOFTRANK_HD PavBlock item(const double* xs, index_t i) const {
    return PavBlock{i, i + 1, xs[i], 1.0, 1.0, 1.0};
  }
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

// eps = 0, the hard operator: the rank pools runs of equal values (tied
// entries share their mean rank), the sort nothing.
struct HardPooling {
  Op op;
  SOFTRANK_HD PavBlock item(const double* xs, index_t i) const {
    return PavBlock{i, i + 1, xs[i], 0.0, 0.0, 0.0};
  }
  SOFTRANK_HD bool merges(const PavBlock& a, const PavBlock& b) const {
    return op == Op::Rank && a.ref == b.ref;
  }
  SOFTRANK_HD PavBlock pool(const PavBlock& a, const PavBlock& b) const {
    return PavBlock{a.start, b.end, a.ref, 0.0, 0.0, 0.0};
  }
};

// PAV: pools the sorted positions [lo, hi) of a row (the whole row, or one
// chunk of a long row: pav_chunks) into `stack`, from its slot 0, by `rule`;
// block starts are positions in the row. Returns the block count. Every
// pool-adjacent-violators loop of softrank is this one, with its rule.
// The block being built (the top of the stack) lives in registers and only
// the blocks below it in memory: a merge chain then never waits on a store it
// has just made (store-to-load forwarding was most of the loop's time).
template <class Rule, class Stack>
SOFTRANK_HD index_t pav_run(const Rule& rule, const double* xs, index_t lo, index_t hi,
                            const Stack& stack) {
  if (hi <= lo) return 0;
  index_t top = 0;  // blocks stored below the current one
  auto cur = rule.item(xs, lo);
  for (index_t i = lo + 1; i < hi; ++i) {
    const auto next = rule.item(xs, i);
    if (!rule.merges(cur, next)) {
      stack.store(top++, cur);
      cur = next;
      continue;
    }
    cur = rule.pool(cur, next);
    while (top > 0) {
      const auto below = stack.load(top - 1, cur.start);
      if (!rule.merges(below, cur)) break;
      cur = rule.pool(below, cur);
      --top;
    }
  }
  stack.store(top, cur);
  return top + 1;
}

// The rules of the soft operators for a given eps (> 0; inf pools everything).
SOFTRANK_HD L2Pooling<RankL2Test> rank_l2_pooling(double eps) {
  return L2Pooling<RankL2Test>{std::isinf(eps), RankL2Test{eps}};
}
SOFTRANK_HD L2Pooling<SortL2Test> sort_l2_pooling(double eps) {
  return L2Pooling<SortL2Test>{std::isinf(eps), SortL2Test{eps}};
}

SOFTRANK_HD index_t pav_rank_l2(const double* xs, index_t lo, index_t hi, double eps,
                                BlockStack b) {
  return pav_run(rank_l2_pooling(eps), xs, lo, hi, b);
}

SOFTRANK_HD index_t pav_sort_l2(const double* xs, index_t lo, index_t hi, double eps,
                                BlockStack b) {
  return pav_run(sort_l2_pooling(eps), xs, lo, hi, b);
}

// The row has n positions; [lo, hi) is the part pooled here.
SOFTRANK_HD index_t pav_rank_kl(const double* xs, const double* step, index_t lo, index_t hi,
                                index_t n, double eps, BlockStack b) {
  return rank_kl_exact_sums(n)
             ? pav_run(RankKlPooling<true>{std::isinf(eps), n, step}, xs, lo, hi, b)
             : pav_run(RankKlPooling<false>{std::isinf(eps), n, step}, xs, lo, hi, b);
}

SOFTRANK_HD index_t pav_sort_kl(const double* xs, const double* step, const double* decay,
                                index_t lo, index_t hi, double eps, BlockStack b) {
  return pav_run(SortKlPooling{std::isinf(eps), InverseScale(eps), step, decay}, xs, lo, hi, b);
}

SOFTRANK_HD index_t pav_hard(const double* xs, index_t lo, index_t hi, Op op, BlockStack b) {
  return pav_run(HardPooling{op}, xs, lo, hi, b);
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

// How a row is cut into PAV chunks: `size` positions each for rows of
// `min_chunked` or more, one chunk below. The CPU core's cut (cpu_pav_chunking)
// is fixed; the CUDA core cuts rows more finely, to the size of the team of
// threads that pools them (csrc/cuda), which changes the roundings of block
// sums, never the blocks' math.
struct PavChunking {
  index_t size;
  index_t min_chunked;
  SOFTRANK_HD index_t count(index_t n) const {
    return n >= min_chunked ? (n - 1) / size + 1 : (n > 0 ? 1 : 0);
  }
};

SOFTRANK_HD PavChunking cpu_pav_chunking() { return PavChunking{kPavChunk, kPavChunkedMin}; }

SOFTRANK_HD index_t pav_chunk_count(index_t n) { return cpu_pav_chunking().count(n); }

// Joins the chunks' stacks. On entry chunk c's blocks are the stack slots
// [first[c], last[c]) with first[c] = c * kPavChunk; on return the blocks of
// the row are those of the chunks in order, each chunk's now [first[c],
// last[c]) (possibly empty). Chunk c's blocks are pushed, as PAV would, onto
// the blocks before them; once one goes on without pooling, the rest of the
// chunk stands too (its blocks were already pooled against each other). A
// block pooled across chunks is stored in the slot of its last part, so the
// slots of a chunk stay contiguous. O(chunks + blocks pooled).
// Chunks of chunk_size positions (kPavChunk for the soft operators).
template <class Pooling>
SOFTRANK_HD void pav_merge_chunks(const Pooling& pooling, index_t n, index_t chunks, BlockStack b,
                                  index_t* first, index_t* last,
                                  index_t chunk_size = kPavChunk) {
  index_t below = 0;  // the last chunk before c that still has blocks
  for (index_t c = 1; c < chunks; ++c) {
    const index_t chunk_end = (c + 1 < chunks) ? (c + 1) * chunk_size : n;
    for (index_t j = first[c]; j < last[c]; ++j) {
      PavBlock cur = b.load(j, j + 1 < last[c] ? b.start[j + 1] : chunk_end);
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
        const PavBlock a = b.load(k, cur.start);
        if (!pooling.merges(a, cur)) break;
        cur = pooling.pool(a, cur);
        pooled = true;
        if (k == j - 1 && first[c] < j)
          first[c] = j;
        else
          --last[below];
      }
      b.store(j, cur);
      if (!pooled) break;
      first[c] = j;
    }
    if (first[c] < last[c]) below = c;
  }
}

// Weighted isotonic regression, non-decreasing, by PAV. `w` may be null
// (unit weights). Equal adjacent block values are pooled. Block stats: ref,
// stat = the block's weighted mean minus ref, stat2 = sum w. The mean is
// updated by a convex combination (the weight fraction is in [0, 1]), never
// through sums w (y - ref): those products under- or overflow when weights
// and values span a wide range together (weights 1e-284 and 1e-14 with y
// near 1e-245 gave block means outside [min y, max y]).
struct IsotonicL2Pooling {
  const double* w;
  SOFTRANK_HD PavBlock item(const double* y, index_t i) const {
    return PavBlock{i, i + 1, y[i], 0.0, w ? w[i] : 1.0, 0.0};
  }
  // value_A >= value_B violates (or ties) the non-decreasing order.
  SOFTRANK_HD bool merges(const PavBlock& a, const PavBlock& b) const {
    return gap(a, b) <= 0.0;
  }
  SOFTRANK_HD PavBlock pool(const PavBlock& a, const PavBlock& b) const {
    const double total = a.stat2 + b.stat2;
    return PavBlock{a.start, b.end, a.ref, a.stat + (b.stat2 / total) * gap(a, b), total, 0.0};
  }
  SOFTRANK_HD static double gap(const PavBlock& a, const PavBlock& b) {  // value_B - value_A
    return (b.ref - a.ref) + (b.stat - a.stat);
  }
};

// Unit weights: the l2 blocks of the soft operators (d = sum (y - ref), m),
// pooled when value_A >= value_B, i.e. X = m_a m_b (mean_a - mean_b) >= 0
// (see L2Pooling): no division in the loop (the convex update's division
// was its bottleneck: twice as slow on long rows). Rows reach here below
// 2^960 (isotonic_forward_row scales them), so X and d stay finite.
struct IsotonicUnitTest {
  SOFTRANK_HD bool operator()(double x, double, double) const { return x >= 0.0; }
};

// Its blocks end with stat = d: the block's mean minus ref is stat / stat2.
using IsotonicUnitPooling = L2Pooling<IsotonicUnitTest>;

}  // namespace softrank
