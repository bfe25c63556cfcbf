// Shared definitions of the softrank core: operator codes, the index type and
// small numeric helpers. Header-only and allocation-free so that the per-row
// routines can be compiled for CUDA as well.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define SOFTRANK_HD __host__ __device__ inline
#else
#define SOFTRANK_HD inline
#endif

namespace softrank {

// Positions and permutations are int32: rows longer than 2^31 - 1 are refused
// at the boundary, and half-width indices halve the memory traffic of the
// backward pass.
using index_t = std::int32_t;

enum class Op : int { Rank = 0, Sort = 1 };
enum class Reg : int { L2 = 0, KL = 1 };

struct OpSpec {
  Op op;
  Reg reg;
  bool descending;
  double eps;  // >= 0; 0 is the hard operator, +inf the fully smoothed limit
};

// The core sorts x' = x or x' = -x in decreasing order (ALGORITHM.md).
SOFTRANK_HD bool negates_input(const OpSpec& spec) {
  return spec.op == Op::Rank ? spec.descending : !spec.descending;
}

SOFTRANK_HD double log_add_exp(double a, double b) {
  const double hi = a > b ? a : b;
  const double lo = a > b ? b : a;
  if (hi == -std::numeric_limits<double>::infinity()) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

// 2 * half, for an output formed at half scale (a block's spread of z / eps
// wider than a double) that lies in [min w, max w]: where rounding took a
// finite half past half the largest double, the output is that largest
// double, not an infinity (a kl row holding both -DBL_MAX and DBL_MAX).
SOFTRANK_HD double twice_finite(double half) {
  const double twice = 2.0 * half;
  if (std::isinf(twice) && std::isfinite(half))
    return std::copysign(std::numeric_limits<double>::max(), twice);
  return twice;
}

// Sum of rho_i = n - i over sorted positions [s, e): closed form, in double.
SOFTRANK_HD double rho_sum(index_t n, index_t s, index_t e) {
  const double m = static_cast<double>(e - s);
  return 0.5 * m * (2.0 * n - static_cast<double>(s) - static_cast<double>(e) + 1.0);
}

// Runs the data-parallel steps of one row serially: ranges(n, fn) calls
// fn(lo, hi) over [0, n), tasks(k, fn) calls fn(t) for t in [0, k), and
// single(fn) calls fn() once (a serial step between parallel ones). The
// long-row drivers (batched.cpp; the CUDA core's block per row) pass versions
// with the same interface that spread them over threads. Every step writes
// disjoint outputs that depend only on their own inputs, so the split never
// changes a bit.
struct SerialRanges {
  template <class Fn>
  SOFTRANK_HD void operator()(index_t n, Fn&& fn) const {
    fn(index_t{0}, n);
  }
  template <class Fn>
  SOFTRANK_HD void tasks(index_t count, Fn&& fn) const {
    for (index_t t = 0; t < count; ++t) fn(t);
  }
  template <class Fn>
  SOFTRANK_HD void single(Fn&& fn) const {
    fn();
  }
};

// Mean of rho over sorted positions [s, e).
SOFTRANK_HD double rho_mean(index_t n, index_t s, index_t e) {
  return static_cast<double>(n) - 0.5 * (static_cast<double>(s) + static_cast<double>(e) - 1.0);
}

}  // namespace softrank
