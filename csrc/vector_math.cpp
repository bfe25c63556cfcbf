// exp over a buffer of non-positive arguments, vectorised and dispatched at
// load time (simd_level()): the entropic (kl) operators take one exp per
// element, and libm's scalar exp would otherwise dominate them. x86-64 CPUs
// with AVX2 run exp_nonpositive in AVX2 intrinsics; the baseline variant
// inlines exp_nonpositive (vector_math.h) for the compiler to vectorise.
#include "softrank/vector_math.h"

#include <cstring>

#include "softrank/cpu_features.h"

#if defined(SOFTRANK_X86_DISPATCH)
#include <immintrin.h>
#endif

namespace softrank {
namespace {

// Fixed blocks of kLanes values, the tail zero-padded to a full block: every
// element goes through the same (vectorised) code whatever its position. A
// plain loop has a vectorised body and a scalar prologue/epilogue that the
// compiler contracts into FMAs differently, so an element's result depended
// on where its buffer started and ended; the long-row path splits buffers
// over the threads, and kl soft ranks then differed by 1 ulp between thread
// counts (csrc/tests: threads, kernels).
SOFTRANK_FORCE_INLINE void exp_nonpositive_blocks(double* values, std::int64_t n) {
  constexpr int kLanes = 16;
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    double v[kLanes];
    std::memcpy(v, values + i, sizeof v);
    for (int k = 0; k < kLanes; ++k) v[k] = exp_nonpositive(v[k]);
    std::memcpy(values + i, v, sizeof v);
  }
  if (i < n) {
    double v[kLanes] = {};
    const std::size_t bytes = static_cast<std::size_t>(n - i) * sizeof(double);
    std::memcpy(v, values + i, bytes);
    for (int k = 0; k < kLanes; ++k) v[k] = exp_nonpositive(v[k]);
    std::memcpy(values + i, v, bytes);
  }
}

using ExpKernel = void (*)(double*, std::int64_t);

void exp_baseline(double* values, std::int64_t n) { exp_nonpositive_blocks(values, n); }
#if defined(SOFTRANK_X86_DISPATCH)
// exp_nonpositive on four lanes, written out in AVX2 intrinsics: the same
// operations in the same order, with the multiply-adds GCC contracts the
// scalar code into, so its results are those of the auto-vectorised kernel
// it replaced (one hash over 1e5 values, measured; csrc/tests: kernels checks
// 2 ulp and position invariance). GCC's own vectorisation of exp_nonpositive_blocks
// moved the lanes through the stack (the bit casts) and ran at 5.3 ns an
// element on AVX2; this runs at 1.3 ns.
SOFTRANK_TARGET_AVX2 inline __m256d linear4(__m256d r, double c0, double c1) {
  return _mm256_fmadd_pd(r, _mm256_set1_pd(c1), _mm256_set1_pd(c0));
}
// 2^k for integral k in [-1022, 1023] held as doubles (exp_nonpositive's f1, f2).
SOFTRANK_TARGET_AVX2 inline __m256d power_of_two4(__m256d k, __m256d round_magic) {
  const __m256d biased = _mm256_add_pd(_mm256_add_pd(k, _mm256_set1_pd(1023.0)), round_magic);
  const __m256i bits =
      _mm256_sub_epi64(_mm256_castpd_si256(biased), _mm256_castpd_si256(round_magic));
  return _mm256_castsi256_pd(_mm256_slli_epi64(bits, 52));
}
SOFTRANK_TARGET_AVX2 inline __m256d exp_nonpositive4(__m256d x) {
  const __m256d min_arg = _mm256_set1_pd(-746.0);
  const __m256d round_magic = _mm256_set1_pd(6755399441055744.0);
  const __m256d xc = _mm256_max_pd(x, min_arg);
  const __m256d k = _mm256_sub_pd(
      _mm256_fmadd_pd(xc, _mm256_set1_pd(1.4426950408889634074), round_magic), round_magic);
  __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(6.93147180369123816490e-01), xc);
  r = _mm256_fnmadd_pd(k, _mm256_set1_pd(1.90821492927058770002e-10), r);
  const __m256d r2 = _mm256_mul_pd(r, r), r4 = _mm256_mul_pd(r2, r2), r8 = _mm256_mul_pd(r4, r4);
  const __m256d p01 = _mm256_add_pd(_mm256_set1_pd(1.0), r);
  const __m256d p23 = linear4(r, 1.0 / 2.0, 1.0 / 6.0);
  const __m256d p45 = linear4(r, 1.0 / 24.0, 1.0 / 120.0);
  const __m256d p67 = linear4(r, 1.0 / 720.0, 1.0 / 5040.0);
  const __m256d p89 = linear4(r, 1.0 / 40320.0, 1.0 / 362880.0);
  const __m256d p1011 = linear4(r, 1.0 / 3628800.0, 1.0 / 39916800.0);
  const __m256d p1213 = linear4(r, 1.0 / 479001600.0, 1.0 / 6227020800.0);
  const __m256d q0 = _mm256_fmadd_pd(r2, p23, p01);
  const __m256d q1 = _mm256_fmadd_pd(r2, p67, p45);
  const __m256d q2 = _mm256_fmadd_pd(r2, p1011, p89);
  const __m256d s0 = _mm256_fmadd_pd(r4, q1, q0), s1 = _mm256_fmadd_pd(r4, p1213, q2);
  const __m256d p = _mm256_fmadd_pd(r8, s1, s0);
  const __m256d k1 = _mm256_sub_pd(
      _mm256_fmadd_pd(_mm256_set1_pd(0.5), k, round_magic), round_magic);
  const __m256d k2 = _mm256_sub_pd(k, k1);
  const __m256d result = _mm256_mul_pd(_mm256_mul_pd(p, power_of_two4(k1, round_magic)),
                                       power_of_two4(k2, round_magic));
  return _mm256_andnot_pd(_mm256_cmp_pd(x, min_arg, _CMP_LT_OQ), result);  // x < -746: 0
}
// The tail goes through the same four-lane code, zero-padded.
SOFTRANK_TARGET_AVX2 void exp_avx2(double* values, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(values + i, exp_nonpositive4(_mm256_loadu_pd(values + i)));
  if (i < n) {
    double v[4] = {};
    const std::size_t bytes = static_cast<std::size_t>(n - i) * sizeof(double);
    std::memcpy(v, values + i, bytes);
    _mm256_storeu_pd(v, exp_nonpositive4(_mm256_loadu_pd(v)));
    std::memcpy(values + i, v, bytes);
  }
}
#endif

// The AVX-512 level runs the AVX2 kernel too: GCC's vectorisation of the
// scalar inline was as poor there, and this one is the kernel the AVX2
// machines test.
ExpKernel pick_exp_kernel() {
#if defined(SOFTRANK_X86_DISPATCH)
  if (simd_level() != SimdLevel::Baseline) return exp_avx2;
#endif
  return exp_baseline;
}

}  // namespace

void exp_nonpositive_inplace(double* values, std::int64_t n) {
  static const ExpKernel kernel = pick_exp_kernel();
  kernel(values, n);
}

}  // namespace softrank
