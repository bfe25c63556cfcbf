// Weighted l2 isotonic regression of one row by PAV (pav.h's
// IsotonicL2Pooling, or IsotonicUnitPooling for unit weights), and its
// vector-Jacobian product.
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
#include "soft_row.h"  // for_each_block, kNaN

namespace softrank {

constexpr index_t kIsotonicChunk = 1 << 13;
constexpr index_t kIsotonicChunkedMin = 1 << 15;

SOFTRANK_HD index_t isotonic_chunk_count(index_t n) {
  return n >= kIsotonicChunkedMin ? (n - 1) / kIsotonicChunk + 1 : (n > 0 ? 1 : 0);
}

// Caller-owned scratch of one row: ys, ws and the stack n long; the chunk
// arrays isotonic_chunk_count(n) long.
struct IsotonicScratch {
  double* ys;  // sign * y, scaled
  double* ws;  // the weights, scaled
  BlockStack blocks;
  index_t* chunk_first;  // each chunk's stack slots [first, last) ...
  index_t* chunk_last;
  index_t* chunk_end;    // ... and the position where its last block ends
  double* chunk_ymax;    // max |y| of each chunk (NaN: the chunk holds NaN or inf)
  double* chunk_wmax;    // max w of each chunk
};

// Solution (shape (n,)) and block_start (each position's block's first
// position; -1 across a row holding NaN or +-inf, whose solution is NaN).
// `w` may be null (unit weights).
template <class T, class Ranges>
void isotonic_forward_row(const T* y, const T* w, index_t n, bool increasing,
                          const IsotonicScratch& s, T* solution, index_t* block_start,
                          const Ranges& ranges) {
  if (n == 0) return;
  const index_t chunks = isotonic_chunk_count(n);
  const double sign = increasing ? 1.0 : -1.0;
  double* ys = s.ys;
  double* ws = s.ws;
  auto chunk_lo = [](index_t c) { return c * kIsotonicChunk; };
  auto chunk_hi = [&](index_t c) { return c + 1 < chunks ? (c + 1) * kIsotonicChunk : n; };
  // One pass: the signed values, the weights and their largest magnitudes.
  // (Compares, not fmax: GCC calls libm's fmax, which took a quarter of the
  // row's time; a NaN or inf marks the chunk instead of entering the max.)
  ranges.tasks(chunks, [&](index_t c) {
    const index_t lo = chunk_lo(c), hi = chunk_hi(c);
    double ymax = 0.0;
    bool finite = true;
    for (index_t i = lo; i < hi; ++i) {
      const double v = sign * static_cast<double>(y[i]);
      ys[i] = v;
      const double a = std::fabs(v);
      finite &= a <= std::numeric_limits<double>::max();
      ymax = a > ymax ? a : ymax;
    }
    double wmax = 0.0;
    if (w) {
      for (index_t i = lo; i < hi; ++i) {
        const double v = static_cast<double>(w[i]);
        ws[i] = v;
        wmax = v > wmax ? v : wmax;
      }
    }
    s.chunk_ymax[c] = finite ? ymax : std::numeric_limits<double>::quiet_NaN();
    s.chunk_wmax[c] = wmax;
  });
  double ymax = 0.0, wmax = 0.0;
  bool finite = true;
  for (index_t c = 0; c < chunks; ++c) {
    finite &= !std::isnan(s.chunk_ymax[c]);
    ymax = s.chunk_ymax[c] > ymax ? s.chunk_ymax[c] : ymax;
    wmax = s.chunk_wmax[c] > wmax ? s.chunk_wmax[c] : wmax;
  }
  if (!finite) {
    ranges(n, [&](index_t lo, index_t hi) {
      for (index_t i = lo; i < hi; ++i) {
        solution[i] = static_cast<T>(std::numeric_limits<double>::quiet_NaN());
        block_start[i] = -1;
      }
    });
    return;
  }
  // Power-of-two scaling (exact, so the same bits wherever nothing over- or
  // underflows): differences of y overflow for |y| near 1e308, block means of
  // rows below 2^-960 round to the subnormal grid (even outside [min y,
  // max y]), and weight sums overflow for weights near 1e308 and lose digits
  // for subnormal ones. Values are brought below 2^960 or up from the
  // subnormals, weights to a largest one near 1 (a weight more than 2^1074
  // times smaller than the largest stays at the smallest positive double).
  int exponent;
  std::frexp(ymax, &exponent);
  int shift = 0;
  if (exponent > 960)
    shift = 960 - exponent;
  else if (ymax > 0.0 && exponent < -960)
    shift = -exponent;
  if (shift != 0)
    ranges(n, [&](index_t lo, index_t hi) {
      for (index_t i = lo; i < hi; ++i) ys[i] = std::ldexp(ys[i], shift);
    });
  if (w) {
    std::frexp(wmax, &exponent);
    if (exponent > 1 || exponent < -64) {
      // (ldexp per element: 2^-exponent itself overflows for subnormal weights)
      ranges(n, [&](index_t lo, index_t hi) {
        for (index_t i = lo; i < hi; ++i)
          ws[i] = std::fmax(std::ldexp(ws[i], -exponent),
                            std::numeric_limits<double>::denorm_min());
      });
    }
  }
  const BlockStack b = s.blocks;
  index_t one_first = 0, one_last = 0, one_end = n;
  index_t* first = chunks > 1 ? s.chunk_first : &one_first;
  index_t* last = chunks > 1 ? s.chunk_last : &one_last;
  index_t* end = chunks > 1 ? s.chunk_end : &one_end;
  ranges.tasks(chunks, [&](index_t c) {
    const index_t lo = chunk_lo(c), hi = chunk_hi(c);
    const BlockStack part{b.start + lo, b.ref + lo, b.stat + lo, b.stat2 + lo, b.tail + lo};
    const index_t count = w ? pav_run(IsotonicL2Pooling{ws}, ys, lo, hi, part)
                            : pav_run(IsotonicUnitPooling{false, IsotonicUnitTest{}}, ys, lo, hi,
                                      part);
    first[c] = lo;
    last[c] = lo + count;
  });
  if (chunks > 1) {
    if (w)
      pav_merge_chunks(IsotonicL2Pooling{ws}, n, chunks, b, first, last, kIsotonicChunk);
    else
      pav_merge_chunks(IsotonicUnitPooling{false, IsotonicUnitTest{}}, n, chunks, b, first, last,
                       kIsotonicChunk);
    index_t next = n;
    for (index_t c = chunks; c-- > 0;) {
      end[c] = next;
      if (first[c] < last[c]) next = b.start[first[c]];
    }
  }
  // A block mean lies within [-max |y|, max |y|]; its rounding may not, and
  // for max |y| = DBL_MAX scaling back would overflow to inf: clamp.
  const double bound = shift != 0 ? std::ldexp(ymax, shift) : ymax;
  ranges.tasks(chunks, [&](index_t c) {
    for (index_t k = first[c]; k < last[c]; ++k) {
      const index_t bs = b.start[k];
      const index_t be = k + 1 < last[c] ? b.start[k + 1] : end[c];
      const double mean_minus_ref = w ? b.stat[k] : b.stat[k] / b.stat2[k];
      // Clamped only when outside: fmin/fmax may return either zero for +-0,
      // which would make an all-zero row's sign platform-dependent.
      double value = sign * (b.ref[k] + mean_minus_ref);
      if (value > bound) value = bound;
      if (value < -bound) value = -bound;
      if (shift != 0) value = std::ldexp(value, -shift);
      for (index_t i = bs; i < be; ++i) {
        solution[i] = static_cast<T>(value);
        block_start[i] = bs;
      }
    }
  });
}

// Gradient of sum(cotangent * solution) with respect to y (l2): grad_j =
// w_j / W_B sum_B cotangent over the block B of j. With y, solution and
// grad_weights (weighted rows), the gradient with respect to the weights in
// the same pass: grad_weights_j = (y_j - v_B) / W_B sum_B cotangent.
// NaN across a row whose block_start is -1.
template <class T>
void isotonic_vjp_row(const T* w, const index_t* block_start, const T* cotangent, index_t n,
                      T* grad, const T* y = nullptr, const T* solution = nullptr,
                      T* grad_weights = nullptr) {
  if (n == 0) return;
  if (block_start[0] < 0) {
    for (index_t i = 0; i < n; ++i) grad[i] = static_cast<T>(kNaN);
    if (grad_weights)
      for (index_t i = 0; i < n; ++i) grad_weights[i] = static_cast<T>(kNaN);
    return;
  }
  for_each_block(block_start, 0, n, [&](index_t s, index_t e) {
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
}

}  // namespace softrank
