// exp for non-positive arguments: a branch-free polynomial within 1 ulp of
// libm (checked against it in the C++ tests), used inline by the PAV loops
// (scalar) and, vectorised, by exp_nonpositive_inplace (vector_math.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__CUDACC__)
#define SOFTRANK_FORCE_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define SOFTRANK_FORCE_INLINE inline __attribute__((always_inline))
#else
#define SOFTRANK_FORCE_INLINE inline
#endif

namespace softrank {

SOFTRANK_FORCE_INLINE double from_bits(std::uint64_t u) {
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}
SOFTRANK_FORCE_INLINE std::uint64_t to_bits(double d) {
  std::uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}

// exp(x) for x <= 0 (x = -inf gives 0) within 2 ulp: x = k ln2 + r with a
// two-part ln2 (Cody-Waite), |r| <= ln2/2, exp(r) by its Taylor series to
// degree 13 (truncation below 2e-17 relative), and 2^k applied as two
// factors so that subnormal results come out right.
SOFTRANK_FORCE_INLINE double exp_nonpositive(double x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kRoundMagic = 6755399441055744.0;  // 1.5 * 2^52
  constexpr double kMin = -746.0;                     // exp(kMin) < half the least subnormal
  const double xc = x < kMin ? kMin : x;
  const double shifted = xc * kLog2e + kRoundMagic;
  const double k = shifted - kRoundMagic;  // round(x / ln2)
  const double r = (xc - k * kLn2Hi) - k * kLn2Lo;
  // exp(r) = sum r^j / j!, j <= 13, by Estrin's scheme: pairs c_j + c_{j+1} r
  // joined by r^2, r^4, r^8, a dependency chain of 5 multiply-adds instead
  // of Horner's 13 (the vectorised kernel was bound by that latency).
  const double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
  const double p01 = 1.0 + r;
  const double p23 = 1.0 / 2.0 + r * (1.0 / 6.0);
  const double p45 = 1.0 / 24.0 + r * (1.0 / 120.0);
  const double p67 = 1.0 / 720.0 + r * (1.0 / 5040.0);
  const double p89 = 1.0 / 40320.0 + r * (1.0 / 362880.0);
  const double p1011 = 1.0 / 3628800.0 + r * (1.0 / 39916800.0);
  const double p1213 = 1.0 / 479001600.0 + r * (1.0 / 6227020800.0);
  const double q0 = p01 + r2 * p23, q1 = p45 + r2 * p67, q2 = p89 + r2 * p1011;
  const double s0 = q0 + r4 * q1, s1 = q2 + r4 * p1213;
  const double p = s0 + r8 * s1;
  // k in [-1077, 0]: 2^k = 2^k1 * 2^k2 with k1 = round(k / 2) and
  // k2 = k - k1 in [-539, 1], both factors normal doubles. Their exponent fields come from the same round-to-integer
  // trick (an exact integer in the low mantissa bits) and a logical shift, so
  // that AVX2, which has no 64-bit arithmetic shift, vectorises this too.
  const double k1 = (0.5 * k + kRoundMagic) - kRoundMagic, k2 = k - k1;
  const std::uint64_t magic_bits = to_bits(kRoundMagic);
  const double f1 = from_bits((to_bits(k1 + 1023.0 + kRoundMagic) - magic_bits) << 52);
  const double f2 = from_bits((to_bits(k2 + 1023.0 + kRoundMagic) - magic_bits) << 52);
  const double result = p * f1 * f2;
  return x < kMin ? 0.0 : result;
}

// expm1(x) for |x| <= 1/2 within about 1 ulp: x + x^2 P(x), P the Taylor
// series of (e^x - 1 - x) / x^2 to degree 13 (truncation below 2e-18
// relative). Branch-free, so that a loop of them vectorises.
SOFTRANK_FORCE_INLINE double expm1_small(double x) {
  double p = 1.0 / 1307674368000.0;  // 1/15!
  p = p * x + 1.0 / 87178291200.0;
  p = p * x + 1.0 / 6227020800.0;
  p = p * x + 1.0 / 479001600.0;
  p = p * x + 1.0 / 39916800.0;
  p = p * x + 1.0 / 3628800.0;
  p = p * x + 1.0 / 362880.0;
  p = p * x + 1.0 / 40320.0;
  p = p * x + 1.0 / 5040.0;
  p = p * x + 1.0 / 720.0;
  p = p * x + 1.0 / 120.0;
  p = p * x + 1.0 / 24.0;
  p = p * x + 1.0 / 6.0;
  p = p * x + 0.5;
  return x + x * (x * p);
}

// One term of the kl soft sort's S - Q (soft_row.h, sort_kl_log_ratios):
// exp(a) - d computed without cancellation, where a = x'_j - ref <= 0, d =
// exp(-k / eps) is the decay table's entry and offset = k / eps (k = j - s):
// d * expm1(a - (-offset)) where the two exponents are within 1/2, else
// exp_a - d (exp_a = exp(a), computed by the caller; no cancellation there).
// Both forms are computed and one kept: no branch on the data.
SOFTRANK_FORCE_INLINE double sort_kl_diff_term(double a, double exp_a, double offset, double d) {
  const double gap = a + offset;
  const bool near = std::fabs(gap) < 0.5;
  const double near_term = d * expm1_small(near ? gap : 0.0);
  const double far_term = exp_a - d;
  return near ? near_term : far_term;
}

// values[i] = exp(values[i]) for values[i] <= 0 (or -inf); vectorised.
void exp_nonpositive_inplace(double* values, std::int64_t n);

// The sum of sort_kl_diff_term(a, exp(a), offset, decay[i]) over i in
// [0, count), with a = xs[i] - ref and offset = (i + 1) * inv where
// `multiply`, else (i + 1) / eps; exp(a) as exp_nonpositive_inplace gives
// it. Summed in four interleaved partial sums (term i into lane i % 4)
// joined as (s0 + s1) + (s2 + s3): the vector kernels' order, kept by the
// portable kernel and by the CUDA core (both through lane_sum, below), so that the
// sum's rounding is the same on every path; one chain of adds in order was
// a sixth of a float64 (1024, 64) kl soft sort. The AVX2 and AVX-512
// kernels give the same bits; the portable one and the GPU differ from them
// only by their exps' (no FMA). `scratch` holds count doubles (the portable
// kernel's exps).
double sort_kl_diff_sum(const double* xs, double ref, const double* decay, double inv, double eps,
                        bool multiply, std::int64_t count, double* scratch);

// For the tests: the kernels of one level (SimdLevel, cpu_features.h: 0
// baseline, 1 AVX2, 2 AVX-512), whatever simd_level() chose; false, doing
// nothing, where the CPU or the build lacks that level.
bool exp_nonpositive_inplace_at(int level, double* values, std::int64_t n);
bool sort_kl_diff_sum_at(int level, const double* xs, double ref, const double* decay, double inv,
                         double eps, bool multiply, std::int64_t count, double* scratch,
                         double* sum);

// The partial sums' join (sort_kl_diff_sum, lane_sum).
SOFTRANK_FORCE_INLINE double join_lanes(const double* lanes) {
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// term(0) + ... + term(count - 1), one add after another from +0 (a sum of
// -0 terms is +0).
template <class Index, class Term>
SOFTRANK_FORCE_INLINE double ordered_sum(Index count, Term&& term) {
  double sum = 0.0;
  for (Index i = 0; i < count; ++i) sum += term(i);
  return sum;
}

// The sum of term(0) .. term(count - 1) in four interleaved partial sums
// (term i into lane i % 4) joined as (s0 + s1) + (s2 + s3): four chains of
// adds instead of one, in one order on every machine. It is sort_kl_diff_sum's
// order: its portable kernel and the CUDA core (soft_row.h) compute it with
// this, the vector kernels in their lanes. Below 4 terms (one a lane) the
// join is the in-order sum: 0 + t is never -0, and the empty lanes' +0 add
// nothing.
template <class Index, class Term>
SOFTRANK_FORCE_INLINE double lane_sum(Index count, Term&& term) {
  if (count < 4) return ordered_sum(count, term);
  double lanes[4] = {0.0, 0.0, 0.0, 0.0};
  Index i = 0;
  for (; i + 4 <= count; i += 4) {
    lanes[0] += term(i);
    lanes[1] += term(i + 1);
    lanes[2] += term(i + 2);
    lanes[3] += term(i + 3);
  }
  for (int lane = 0; i < count; ++i, ++lane) lanes[lane] += term(i);
  return join_lanes(lanes);
}

}  // namespace softrank
