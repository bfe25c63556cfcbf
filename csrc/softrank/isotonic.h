// Weighted isotonic regression of one row by PAV: l2 (pav.h's
// IsotonicL2Pooling, or IsotonicUnitPooling for unit weights) with its
// vector-Jacobian product, and kl (IsotonicKlRule below).
//
// Rows from kIsotonicChunkedMin positions are pooled in chunks of
// kIsotonicChunk positions, joined by pav_merge_chunks (pav.h), as the soft
// operators pool theirs; the preparation, the chunks and the output are
// split over `ranges` (SerialRanges, or the thread pool where one row has
// the threads to itself). The chunking depends on n alone, so the result is
// the same bit for bit for any thread count.
#pragma once

#include <cmath>
#include <limits>

#include "common.h"
#include "pav.h"
#include "soft_row.h"  // for_each_block, kNaN, exp_nonpositive_buffer
#include "vector_math.h"

namespace softrank {

constexpr index_t kIsotonicChunk = 1 << 13;
constexpr index_t kIsotonicChunkedMin = 1 << 15;

SOFTRANK_HD index_t isotonic_chunk_count(index_t n) {
  return n >= kIsotonicChunkedMin ? (n - 1) / kIsotonicChunk + 1 : (n > 0 ? 1 : 0);
}

// Caller-owned scratch of one row: ys, ws and the stack n long; the chunk
// arrays isotonic_chunk_count(n) long.
struct IsotonicScratch {
  double* ys;  // sign * y, scaled (kl: exp(y - R))
  double* ws;  // the weights, scaled
  double* refs;  // kl: each position's reference R
  BlockStack blocks;
  index_t* chunk_first;  // each chunk's stack slots [first, last) ...
  index_t* chunk_last;
  index_t* chunk_end;    // ... and the position where its last block ends
  double* chunk_ymax;    // max |y| of each chunk (NaN: the chunk holds NaN or inf)
  double* chunk_wmax;    // max w of each chunk
};

// The parts of a row both regularisations share. Chunk c holds positions
// [isotonic_chunk_lo(c), isotonic_chunk_hi(c)).
SOFTRANK_HD index_t isotonic_chunk_lo(index_t c) { return c * kIsotonicChunk; }
SOFTRANK_HD index_t isotonic_chunk_hi(index_t c, index_t chunks, index_t n) {
  return c + 1 < chunks ? (c + 1) * kIsotonicChunk : n;
}

struct IsotonicRowPrepared {
  bool finite;  // no NaN or +-inf in y
  double ymax;  // max |y|
  double wmax;  // max w (0 without weights)
};

// One pass over the row: ys = sign * y, ws = w, finiteness and the largest
// magnitudes. (Compares, not fmax: GCC calls libm's fmax, which took a
// quarter of the row's time; a NaN or inf marks the chunk instead of
// entering the max.)
template <class T, class Ranges>
IsotonicRowPrepared isotonic_prepare_row(const T* y, const T* w, index_t n, double sign,
                                         const IsotonicScratch& s, const Ranges& ranges) {
  const index_t chunks = isotonic_chunk_count(n);
  ranges.tasks(chunks, [&](index_t c) {
    const index_t lo = isotonic_chunk_lo(c), hi = isotonic_chunk_hi(c, chunks, n);
    double ymax = 0.0;
    bool finite = true;
    for (index_t i = lo; i < hi; ++i) {
      const double v = sign * static_cast<double>(y[i]);
      s.ys[i] = v;
      const double a = std::fabs(v);
      finite &= a <= std::numeric_limits<double>::max();
      ymax = a > ymax ? a : ymax;
    }
    double wmax = 0.0;
    if (w) {
      for (index_t i = lo; i < hi; ++i) {
        const double v = static_cast<double>(w[i]);
        s.ws[i] = v;
        wmax = v > wmax ? v : wmax;
      }
    }
    s.chunk_ymax[c] = finite ? ymax : std::numeric_limits<double>::quiet_NaN();
    s.chunk_wmax[c] = wmax;
  });
  IsotonicRowPrepared row{true, 0.0, 0.0};
  for (index_t c = 0; c < chunks; ++c) {
    row.finite &= !std::isnan(s.chunk_ymax[c]);
    row.ymax = s.chunk_ymax[c] > row.ymax ? s.chunk_ymax[c] : row.ymax;
    row.wmax = s.chunk_wmax[c] > row.wmax ? s.chunk_wmax[c] : row.wmax;
  }
  return row;
}

// The row of a y holding NaN or +-inf: NaN, and block_start -1.
template <class T, class Ranges>
void isotonic_nan_row(index_t n, T* solution, index_t* block_start, const Ranges& ranges) {
  ranges(n, [&](index_t lo, index_t hi) {
    for (index_t i = lo; i < hi; ++i) {
      solution[i] = static_cast<T>(std::numeric_limits<double>::quiet_NaN());
      block_start[i] = -1;
    }
  });
}

// Weights brought to a largest one in [1/2, 1) where the largest's binary
// exponent lies outside [min_exponent, max_exponent] (exact), so that their
// sums cannot overflow (a weight more than 2^1074 times smaller than the
// largest then stays at the smallest positive double). Returns the power of
// two taken off (0: none). (ldexp per element: 2^-exponent itself overflows
// for subnormal weights.)
template <class Ranges>
int isotonic_scale_weights(double* ws, index_t n, double wmax, int min_exponent,
                           int max_exponent, const Ranges& ranges) {
  int exponent;
  std::frexp(wmax, &exponent);
  if (exponent <= max_exponent && exponent >= min_exponent) return 0;
  ranges(n, [&](index_t lo, index_t hi) {
    for (index_t i = lo; i < hi; ++i)
      ws[i] = std::fmax(std::ldexp(ws[i], -exponent), std::numeric_limits<double>::denorm_min());
  });
  return exponent;
}

// Where each chunk's blocks are once the chunks are pooled: stack slots
// [first[c], last[c]), the last one ending at end[c].
struct IsotonicChunkBlocks {
  const index_t* first;
  const index_t* last;
  const index_t* end;
};

// PAV over each chunk of the prepared row `values` (by pav_run, in
// parallel), then pav_merge_chunks, with one pooling rule. A row of one chunk
// uses `single` for its three slots.
template <class Rule, class Ranges, class BeforeChunk>
IsotonicChunkBlocks isotonic_pool_chunks(const Rule& rule, const double* values, index_t n,
                                         const IsotonicScratch& s, index_t* single,
                                         const Ranges& ranges, BeforeChunk before_chunk) {
  const index_t chunks = isotonic_chunk_count(n);
  const BlockStack b = s.blocks;
  index_t* first = chunks > 1 ? s.chunk_first : single;
  index_t* last = chunks > 1 ? s.chunk_last : single + 1;
  index_t* end = chunks > 1 ? s.chunk_end : single + 2;
  end[0] = n;
  ranges.tasks(chunks, [&](index_t c) {
    const index_t lo = isotonic_chunk_lo(c), hi = isotonic_chunk_hi(c, chunks, n);
    before_chunk(lo, hi);
    const BlockStack part{b.start + lo, b.ref + lo, b.stat + lo, b.stat2 + lo, b.tail + lo};
    first[c] = lo;
    last[c] = lo + pav_run(rule, values, lo, hi, part);
  });
  if (chunks > 1) {
    pav_merge_chunks(rule, n, chunks, b, first, last, kIsotonicChunk);
    index_t next = n;
    for (index_t c = chunks; c-- > 0;) {
      end[c] = next;
      if (first[c] < last[c]) next = b.start[first[c]];
    }
  }
  return IsotonicChunkBlocks{first, last, end};
}

// solution and block_start over every block, value_of(k, bs, be) the value of
// stack slot k, the block of positions [bs, be) (computed once per block, by
// the task of its chunk).
template <class T, class Ranges, class ValueOf>
void isotonic_write_blocks(const BlockStack& b, const IsotonicChunkBlocks& blocks, index_t n,
                           ValueOf value_of, T* solution, index_t* block_start,
                           const Ranges& ranges) {
  ranges.tasks(isotonic_chunk_count(n), [&](index_t c) {
    for (index_t k = blocks.first[c]; k < blocks.last[c]; ++k) {
      const index_t bs = b.start[k];
      const index_t be = k + 1 < blocks.last[c] ? b.start[k + 1] : blocks.end[c];
      const T value = static_cast<T>(value_of(k, bs, be));
      for (index_t i = bs; i < be; ++i) {
        solution[i] = value;
        block_start[i] = bs;
      }
    }
  });
}

// Solution (shape (n,)) and block_start (each position's block's first
// position; -1 across a row holding NaN or +-inf, whose solution is NaN).
// `w` may be null (unit weights).
template <class T, class Ranges>
void isotonic_forward_row(const T* y, const T* w, index_t n, bool increasing,
                          const IsotonicScratch& s, T* solution, index_t* block_start,
                          const Ranges& ranges) {
  if (n == 0) return;
  const double sign = increasing ? 1.0 : -1.0;
  const IsotonicRowPrepared row = isotonic_prepare_row(y, w, n, sign, s, ranges);
  if (!row.finite) return isotonic_nan_row(n, solution, block_start, ranges);
  // Power-of-two scaling (exact, so the same bits wherever nothing over- or
  // underflows): differences of y overflow for |y| near 1e308, block means of
  // rows below 2^-960 round to the subnormal grid (even outside [min y,
  // max y]), and weight sums overflow for weights near 1e308 and lose digits
  // for subnormal ones. Values are brought below 2^960 or up from the
  // subnormals, weights to a largest one near 1 (isotonic_scale_weights).
  int exponent;
  std::frexp(row.ymax, &exponent);
  int shift = 0;
  if (exponent > 960)
    shift = 960 - exponent;
  else if (row.ymax > 0.0 && exponent < -960)
    shift = -exponent;
  double* ys = s.ys;
  if (shift != 0)
    ranges(n, [&](index_t lo, index_t hi) {
      for (index_t i = lo; i < hi; ++i) ys[i] = std::ldexp(ys[i], shift);
    });
  // l2 scales weights outside [2^-65, 2): its pooled means mix them with
  // values, and subnormal weights would lose digits there.
  if (w) isotonic_scale_weights(s.ws, n, row.wmax, -64, 1, ranges);
  const BlockStack b = s.blocks;
  index_t single[3];
  auto nothing = [](index_t, index_t) {};
  const IsotonicChunkBlocks blocks =
      w ? isotonic_pool_chunks(IsotonicL2Pooling{s.ws}, ys, n, s, single, ranges, nothing)
        : isotonic_pool_chunks(IsotonicUnitPooling{false, IsotonicUnitTest{}}, ys, n, s, single,
                               ranges, nothing);
  // A block mean lies within [-max |y|, max |y|]; its rounding may not, and
  // for max |y| = DBL_MAX scaling back would overflow to inf: clamp.
  const double bound = shift != 0 ? std::ldexp(row.ymax, shift) : row.ymax;
  auto value_of = [&](index_t k, index_t, index_t) {
    const double mean_minus_ref = w ? b.stat[k] : b.stat[k] / b.stat2[k];
    // Clamped only when outside: fmin/fmax may return either zero for +-0,
    // which would make an all-zero row's sign platform-dependent.
    // (+ 0.0: a zero value is +0.0 in either direction, not -0.0 when decreasing)
    double value = sign * (b.ref[k] + mean_minus_ref) + 0.0;
    if (value > bound) value = bound;
    if (value < -bound) value = -bound;
    return shift != 0 ? std::ldexp(value, -shift) : value;
  };
  isotonic_write_blocks(b, blocks, n, value_of, solution, block_start, ranges);
}

// --- Isotonic regression under kl ---------------------------------------------
//
// argmin_v sum_i exp(y_i - v_i) + w_i v_i with v monotone (fast-soft-sort's
// isotonic_kl with w = e^its w): the value of a block is LSE_B(y) - log
// sum_B w. Non-decreasing solutions pool when V_a >= V_b, non-increasing ones
// when V_a <= V_b (adjacent blocks with equal values pool, as in l2).
//
// No log in the loop, and mostly no exp. The row is cut into runs whose
// values span at most kIsotonicKlSpan (isotonic_kl_references); each
// position i gets its run's largest value as reference R_i and t_i = exp(y_i
// - R_i), in [e^-300, 1], computed beforehand in one vectorised pass (a
// position whose run would hold it alone is its own reference). A block
// keeps a reference R (the largest of its positions'), S = sum exp(y - R)
// and W = sum w (the weights scaled by a power of two beforehand only where
// their largest lies outside [2^-900, 2^900]: then S W < 2^1000 for any n),
// so V = R + log(S / W). With e = exp(-|R_a - R_b|) (1, and no exp call,
// within a run), V_a >= V_b reads S_a W_b >= e S_b W_a where R_a >= R_b and
// e S_a W_b >= S_b W_a otherwise. The pooled S is S_a + e S_b or e S_a +
// S_b, W is W_a + W_b; each final block pays one log. S stays >= e^-300 (a
// block holds a position of its reference's run), so with e and the W at
// least 2^-250 every product is a normal double; otherwise the test runs on
// logs. (The log-domain loop this replaces took two log_add_exp, an exp and
// a log1p each, per pool.)
constexpr double kIsotonicKlSpan = 300.0;

// Blocks are pav.h's PavBlock (stored field by field in a BlockStack, so
// that a block loaded from the stack never waits on a wide store of it):
// ref = R, stat = S, stat2 = W.
struct IsotonicKlRule {
  const double* refs;     // R_i
  const double* weights;  // w_i (scaled), or null for unit weights
  bool increasing;

  SOFTRANK_HD PavBlock item(const double* t, index_t i) const {
    return PavBlock{i, i + 1, refs[i], t[i], weights ? weights[i] : 1.0, 0.0};
  }
  // exp(-|d|): 1, without the call, within a run (computing the exp there
  // regardless, branch-free, made the loop twice as slow: it sits on the
  // dependency chain of the pools).
  SOFTRANK_HD static double factor(double d) {
    return d == 0.0 ? 1.0 : exp_nonpositive(d > 0.0 ? -d : d);
  }
  SOFTRANK_HD bool merges(const PavBlock& a, const PavBlock& b) const {
    constexpr double kSmall = 0x1p-250;
    const double d = a.ref - b.ref;
    const double e = factor(d);
    double lhs, rhs;
    if (e >= kSmall && a.stat2 >= kSmall && b.stat2 >= kSmall) {
      lhs = d >= 0.0 ? a.stat * b.stat2 : e * a.stat * b.stat2;
      rhs = d >= 0.0 ? e * b.stat * a.stat2 : b.stat * a.stat2;
    } else {
      lhs = d + std::log(a.stat) + std::log(b.stat2);
      rhs = std::log(b.stat) + std::log(a.stat2);
    }
    return increasing ? lhs >= rhs : lhs <= rhs;
  }
  SOFTRANK_HD PavBlock pool(const PavBlock& a, const PavBlock& b) const {
    const double d = a.ref - b.ref;
    const double e = factor(d);
    return d >= 0.0 ? PavBlock{a.start, b.end, a.ref, a.stat + e * b.stat, a.stat2 + b.stat2, 0.0}
                    : PavBlock{a.start, b.end, b.ref, e * a.stat + b.stat, a.stat2 + b.stat2, 0.0};
  }
  // The block's value, less the log of the weights' scale (the caller takes
  // it off): one log of the quotient, a normal double (S in [2^-433, 2^31])
  // where W is in [2^-400, 2^400]; two logs outside.
  SOFTRANK_HD double value(double ref, double sum, double weight) const {
    const bool quotient = weight >= 0x1p-400 && weight <= 0x1p400;
    return ref + (quotient ? std::log(sum / weight) : std::log(sum) - std::log(weight));
  }
};

// The references of ProjectionKlRunsRule (and, with eps = 1, of
// IsotonicKlRule): the n values v (finite, any order) cut greedily into runs
// whose (largest - smallest) / eps is at most kIsotonicKlSpan; each run's
// largest value for each of its positions in `refs`, and (v_i - R_i) / eps
// (<= 0) in `t` for the caller to exponentiate. `t` may be `v` (each value is
// read before it is overwritten).
SOFTRANK_HD void kl_references(const double* v, index_t n, double eps, double* refs, double* t) {
  if (n <= 0) return;
  index_t run = 0;
  double top = v[0], bottom = v[0];
  auto close = [&](index_t end) {
    for (index_t i = run; i < end; ++i) {
      refs[i] = top;
      t[i] = (v[i] - top) / eps;
    }
  };
  for (index_t i = 1; i < n; ++i) {
    const double hi = v[i] > top ? v[i] : top, lo = v[i] < bottom ? v[i] : bottom;
    if ((hi - lo) / eps > kIsotonicKlSpan) {
      close(i);
      run = i;
      top = bottom = v[i];
    } else {
      top = hi;
      bottom = lo;
    }
  }
  close(n);
}

// kl_references for decreasing v (the projection's sorted s and ws): each
// run starts at its largest value, so no min/max chain; a run ends where
// top - v exceeds kIsotonicKlSpan * eps (one compare a value), or, where that
// product overflows, (top - v) / eps exceeds kIsotonicKlSpan. The runs may
// differ from kl_references' by an ulp at a boundary; either keeps every t
// in [e^-300, 1] to rounding, which is all the rules need.
SOFTRANK_HD void kl_references_decreasing(const double* v, index_t n, double eps, double* refs,
                                          double* t) {
  const double span = kIsotonicKlSpan * eps;
  const bool by_span = span <= std::numeric_limits<double>::max();
  for (index_t run = 0; run < n;) {
    const double top = v[run];
    index_t end = run + 1;
    if (by_span) {
      while (end < n && !(top - v[end] > span)) ++end;
    } else {
      while (end < n && !((top - v[end]) / eps > kIsotonicKlSpan)) ++end;
    }
    for (index_t i = run; i < end; ++i) {
      refs[i] = top;
      t[i] = (v[i] - top) / eps;
    }
    run = end;
  }
}

// The references R_i of IsotonicKlRule: kl_references with eps = 1 (an
// exact division: the runs and t of y itself).
SOFTRANK_HD void isotonic_kl_references(const double* y, index_t n, double* refs, double* t) {
  kl_references(y, n, 1.0, refs, t);
}

// kl: solution and block_start as isotonic_forward_row (-1 and NaN across a
// row holding NaN or +-inf). The same chunks as l2, pooled by IsotonicKlRule
// and joined by pav_merge_chunks; each chunk cuts its own runs, so the
// result depends on n alone, not on the thread count.
template <class T, class Ranges>
void isotonic_kl_forward_row(const T* y, const T* w, index_t n, bool increasing,
                             const IsotonicScratch& s, T* solution, index_t* block_start,
                             const Ranges& ranges) {
  if (n == 0) return;
  const IsotonicRowPrepared row = isotonic_prepare_row(y, w, n, 1.0, s, ranges);
  if (!row.finite) return isotonic_nan_row(n, solution, block_start, ranges);
  // kl scales the weights only where their products with S could overflow
  // (or the largest is below 2^-900): its tests handle small weights on
  // logs, and scaling weights spread over more than 2^1074 would flush the
  // smallest. The scale shifts every value by exponent * ln 2, taken off below.
  const int exponent = w ? isotonic_scale_weights(s.ws, n, row.wmax, -900, 900, ranges) : 0;
  const double shift = exponent * 0.69314718055994530942;
  const IsotonicKlRule rule{s.refs, w ? s.ws : nullptr, increasing};
  double* ys = s.ys;
  index_t single[3];
  const IsotonicChunkBlocks blocks =
      isotonic_pool_chunks(rule, ys, n, s, single, ranges, [&](index_t lo, index_t hi) {
        // ys becomes t = exp(y - R), in place.
        isotonic_kl_references(ys + lo, hi - lo, s.refs + lo, ys + lo);
        exp_nonpositive_buffer(ys + lo, hi - lo);
      });
  const BlockStack b = s.blocks;
  // R + log(S / W) is exact to about eps (1 + |R|) (R: the largest value of
  // the block's run, up to kIsotonicKlSpan above it), not relative to the
  // value: 1e-12 after a 1, left alone, read 9.99867e-13. So a block of one
  // is y - log(w) itself (y for unit weights), and a longer block whose value
  // is below 2^-10 (1 + |R|) (so that the others keep about 2^10 eps of it:
  // recomputing every block below 1 + |R| made a kl row of normal y 1.3 to
  // 2.7 times as slow) is recomputed about its own largest y, as
  // m + log1p(sum expm1(y - m) / W + (size - W) / W) where that quotient
  // is small (the value of a block of near-equal y, to about eps (|m| + |v|)),
  // else m + log(sum exp(y - m) / W). Blocks near R keep the pooling's sums.
  auto value_of = [&](index_t k, index_t bs, index_t be) {
    // (the scaled weight, as the pooling saw it: weights spread past 2^1074
    // flush to the smallest double there)
    if (be - bs == 1) return w ? static_cast<double>(y[bs]) - std::log(s.ws[bs]) - shift
                               : static_cast<double>(y[bs]);
    const double value = rule.value(b.ref[k], b.stat[k], b.stat2[k]) - shift;
    if (!(std::fabs(value) < 0x1p-10 * (1.0 + std::fabs(b.ref[k])))) return value;
    double top = static_cast<double>(y[bs]);
    for (index_t i = bs + 1; i < be; ++i) top = std::fmax(top, static_cast<double>(y[i]));
    double excess = 0.0;  // sum exp(y - m) - size
    for (index_t i = bs; i < be; ++i) excess += std::expm1(static_cast<double>(y[i]) - top);
    const double weight = b.stat2[k], size = static_cast<double>(be - bs);
    const double ratio_minus_one = (excess + (size - weight)) / weight;
    if (std::fabs(ratio_minus_one) < 0.5) return top + std::log1p(ratio_minus_one) - shift;
    return rule.value(top, size + excess, weight) - shift;
  };
  isotonic_write_blocks(b, blocks, n, value_of, solution, block_start, ranges);
  // The pooling decided the blocks to its resolution, eps (1 + |R|); two
  // neighbours within it, their values now computed more exactly, may come
  // out an ulp or so out of order: each is brought to its predecessor's value
  // there (a change within that resolution), so the solution stays monotone.
  ranges.single([&] {
    for (index_t i = 1; i < n; ++i) {
      const bool out_of_order = increasing ? solution[i] < solution[i - 1]
                                           : solution[i] > solution[i - 1];
      if (out_of_order) solution[i] = solution[i - 1];
    }
  });
}

// Gradient of sum(cotangent * solution) with respect to y (l2): grad_j =
// w_j / W_B sum_B cotangent over the block B of j. With y, solution and
// grad_weights (weighted rows), the gradient with respect to the weights in
// the same pass: grad_weights_j = (y_j - v_B) / W_B sum_B cotangent.
// NaN across a row whose block_start is -1. `ranges` splits the row into
// parts at block boundaries (each block is computed whole by one task, by the
// same expressions: the same bits for any split).
template <class T, class Ranges = SerialRanges>
void isotonic_vjp_row(const T* w, const index_t* block_start, const T* cotangent, index_t n,
                      T* grad, const T* y = nullptr, const T* solution = nullptr,
                      T* grad_weights = nullptr, const Ranges& ranges = Ranges{}) {
  if (n == 0) return;
  if (block_start[0] < 0) {
    ranges(n, [&](index_t lo, index_t hi) {
      for (index_t i = lo; i < hi; ++i) grad[i] = static_cast<T>(kNaN);
      if (grad_weights)
        for (index_t i = lo; i < hi; ++i) grad_weights[i] = static_cast<T>(kNaN);
    });
    return;
  }
  // The first block starting at or after position p (n if none).
  auto next_block = [&](index_t p) {
    while (p < n && block_start[p] != p) ++p;
    return p;
  };
  ranges(n, [&](index_t lo, index_t hi) {
    for_each_block(block_start, next_block(lo), next_block(hi), [&](index_t s, index_t e) {
      double sum = 0.0, wsum = 0.0;
      for (index_t i = s; i < e; ++i) {
        sum += static_cast<double>(cotangent[i]);
        wsum += w ? static_cast<double>(w[i]) : 1.0;
      }
      // Weights whose sum overflows, or is so small that sum / wsum overflows:
      // scaled by a power of two (exact; ldexp, as 2^-exponent itself
      // overflows for subnormal weights).
      int shift = 0;
      if (w && !(wsum >= 0x1p-960 && wsum <= 0x1p960)) {
        double wmax = 0.0;
        for (index_t i = s; i < e; ++i) wmax = std::fmax(wmax, static_cast<double>(w[i]));
        std::frexp(wmax, &shift);
        shift = -shift;
        wsum = 0.0;
        for (index_t i = s; i < e; ++i) wsum += std::ldexp(static_cast<double>(w[i]), shift);
      }
      // sum / W_B = ldexp(per_weight, shift).
      const double per_weight = sum / wsum;
      if (grad_weights) {
        const double value = static_cast<double>(solution[s]);
        for (index_t i = s; i < e; ++i) {
          const double g = (static_cast<double>(y[i]) - value) * per_weight;
          grad_weights[i] = static_cast<T>(shift != 0 ? std::ldexp(g, shift) : g);
        }
      }
      if (shift != 0) {
        for (index_t i = s; i < e; ++i)
          grad[i] = static_cast<T>(std::ldexp(static_cast<double>(w[i]), shift) * per_weight);
        return;
      }
      for (index_t i = s; i < e; ++i)
        grad[i] = static_cast<T>((w ? static_cast<double>(w[i]) : 1.0) * per_weight);
    });
  });
}

}  // namespace softrank
