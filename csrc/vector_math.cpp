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

// expm1_small on four lanes: its Horner steps as separate multiplies and
// adds, as the scalar code computes them (no FMA), so the same bits.
SOFTRANK_TARGET_AVX2 inline __m256d expm1_small4(__m256d x) {
  static constexpr double kCoefficients[] = {
      1.0 / 87178291200.0, 1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
      1.0 / 3628800.0,     1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,
      1.0 / 720.0,         1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,
      0.5};
  __m256d p = _mm256_set1_pd(1.0 / 1307674368000.0);
  for (double c : kCoefficients) p = _mm256_add_pd(_mm256_mul_pd(p, x), _mm256_set1_pd(c));
  return _mm256_add_pd(x, _mm256_mul_pd(x, _mm256_mul_pd(x, p)));
}
// sort_kl_diff_term on four lanes (k = the lanes' i + 1).
SOFTRANK_TARGET_AVX2 inline __m256d sort_kl_diff_terms4(__m256d xs, __m256d ref, __m256d decay,
                                                        __m256d k, __m256d inv, __m256d eps,
                                                        bool multiply) {
  const __m256d a = _mm256_sub_pd(xs, ref);
  const __m256d exp_a = exp_nonpositive4(a);
  const __m256d offset = multiply ? _mm256_mul_pd(k, inv) : _mm256_div_pd(k, eps);
  const __m256d gap = _mm256_add_pd(a, offset);
  const __m256d magnitude = _mm256_andnot_pd(_mm256_set1_pd(-0.0), gap);
  const __m256d near = _mm256_cmp_pd(magnitude, _mm256_set1_pd(0.5), _CMP_LT_OQ);
  const __m256d far_term = _mm256_sub_pd(exp_a, decay);
  // Most lanes are far (the exponents of a pooled block part within a few
  // items): the polynomial only where one is near.
  if (_mm256_movemask_pd(near) == 0) return far_term;
  const __m256d near_term = _mm256_mul_pd(decay, expm1_small4(_mm256_and_pd(near, gap)));
  return _mm256_blendv_pd(far_term, near_term, near);
}
SOFTRANK_TARGET_AVX2 double sort_kl_diff_sum_avx2(const double* xs, double ref, const double* decay,
                                                   double inv, double eps, bool multiply,
                                                   std::int64_t count, double*) {
  const __m256d ref4 = _mm256_set1_pd(ref), inv4 = _mm256_set1_pd(inv), eps4 = _mm256_set1_pd(eps);
  const __m256d lanes = _mm256_set_pd(4.0, 3.0, 2.0, 1.0);
  __m256d sums = _mm256_setzero_pd();
  std::int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const __m256d k = _mm256_add_pd(_mm256_set1_pd(static_cast<double>(i)), lanes);
    sums = _mm256_add_pd(sums, sort_kl_diff_terms4(_mm256_loadu_pd(xs + i), ref4,
                                                   _mm256_loadu_pd(decay + i), k, inv4, eps4,
                                                   multiply));
  }
  if (i < count) {
    // The tail through the same code, padded; the padding's terms are
    // replaced by +0 (a lane's sum, never -0, is unchanged by adding it:
    // the same bits as not adding it, as the scalar path does not).
    double x_tail[4] = {}, d_tail[4] = {};
    const std::size_t bytes = static_cast<std::size_t>(count - i) * sizeof(double);
    std::memcpy(x_tail, xs + i, bytes);
    std::memcpy(d_tail, decay + i, bytes);
    const __m256d k = _mm256_add_pd(_mm256_set1_pd(static_cast<double>(i)), lanes);
    const __m256d live = _mm256_cmp_pd(k, _mm256_set1_pd(static_cast<double>(count)), _CMP_LE_OQ);
    const __m256d terms = sort_kl_diff_terms4(_mm256_loadu_pd(x_tail), ref4,
                                              _mm256_loadu_pd(d_tail), k, inv4, eps4, multiply);
    sums = _mm256_add_pd(sums, _mm256_and_pd(live, terms));
  }
  alignas(32) double partial[4];
  _mm256_store_pd(partial, sums);
  return join_lanes(partial);
}

// The AVX-512 kernels: the AVX2 ones on eight lanes, operation for operation
// (the same FMAs, the same separate multiplies and adds), so that each
// element gets the same bits at either level; csrc/tests: kernels compares
// them. Only AVX512F instructions (|x| by masking the sign bit as integers).
SOFTRANK_TARGET_AVX512 inline __m512d linear8(__m512d r, double c0, double c1) {
  return _mm512_fmadd_pd(r, _mm512_set1_pd(c1), _mm512_set1_pd(c0));
}
SOFTRANK_TARGET_AVX512 inline __m512d power_of_two8(__m512d k, __m512d round_magic) {
  const __m512d biased = _mm512_add_pd(_mm512_add_pd(k, _mm512_set1_pd(1023.0)), round_magic);
  const __m512i bits =
      _mm512_sub_epi64(_mm512_castpd_si512(biased), _mm512_castpd_si512(round_magic));
  return _mm512_castsi512_pd(_mm512_slli_epi64(bits, 52));
}
SOFTRANK_TARGET_AVX512 inline __m512d exp_nonpositive8(__m512d x) {
  const __m512d min_arg = _mm512_set1_pd(-746.0);
  const __m512d round_magic = _mm512_set1_pd(6755399441055744.0);
  const __m512d xc = _mm512_max_pd(x, min_arg);
  const __m512d k = _mm512_sub_pd(
      _mm512_fmadd_pd(xc, _mm512_set1_pd(1.4426950408889634074), round_magic), round_magic);
  __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(6.93147180369123816490e-01), xc);
  r = _mm512_fnmadd_pd(k, _mm512_set1_pd(1.90821492927058770002e-10), r);
  const __m512d r2 = _mm512_mul_pd(r, r), r4 = _mm512_mul_pd(r2, r2), r8 = _mm512_mul_pd(r4, r4);
  const __m512d p01 = _mm512_add_pd(_mm512_set1_pd(1.0), r);
  const __m512d p23 = linear8(r, 1.0 / 2.0, 1.0 / 6.0);
  const __m512d p45 = linear8(r, 1.0 / 24.0, 1.0 / 120.0);
  const __m512d p67 = linear8(r, 1.0 / 720.0, 1.0 / 5040.0);
  const __m512d p89 = linear8(r, 1.0 / 40320.0, 1.0 / 362880.0);
  const __m512d p1011 = linear8(r, 1.0 / 3628800.0, 1.0 / 39916800.0);
  const __m512d p1213 = linear8(r, 1.0 / 479001600.0, 1.0 / 6227020800.0);
  const __m512d q0 = _mm512_fmadd_pd(r2, p23, p01);
  const __m512d q1 = _mm512_fmadd_pd(r2, p67, p45);
  const __m512d q2 = _mm512_fmadd_pd(r2, p1011, p89);
  const __m512d s0 = _mm512_fmadd_pd(r4, q1, q0), s1 = _mm512_fmadd_pd(r4, p1213, q2);
  const __m512d p = _mm512_fmadd_pd(r8, s1, s0);
  const __m512d k1 = _mm512_sub_pd(
      _mm512_fmadd_pd(_mm512_set1_pd(0.5), k, round_magic), round_magic);
  const __m512d k2 = _mm512_sub_pd(k, k1);
  const __m512d result = _mm512_mul_pd(_mm512_mul_pd(p, power_of_two8(k1, round_magic)),
                                       power_of_two8(k2, round_magic));
  const __mmask8 below = _mm512_cmp_pd_mask(x, min_arg, _CMP_LT_OQ);  // x < -746: 0
  return _mm512_maskz_mov_pd(static_cast<__mmask8>(~below), result);
}
SOFTRANK_TARGET_AVX512 void exp_avx512(double* values, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm512_storeu_pd(values + i, exp_nonpositive8(_mm512_loadu_pd(values + i)));
  if (i < n) {  // the tail through the same code, zero-padded
    const __mmask8 live = static_cast<__mmask8>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_pd(values + i, live, exp_nonpositive8(_mm512_maskz_loadu_pd(live, values + i)));
  }
}
SOFTRANK_TARGET_AVX512 inline __m512d expm1_small8(__m512d x) {
  static constexpr double kCoefficients[] = {
      1.0 / 87178291200.0, 1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
      1.0 / 3628800.0,     1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,
      1.0 / 720.0,         1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,
      0.5};
  __m512d p = _mm512_set1_pd(1.0 / 1307674368000.0);
  for (double c : kCoefficients) p = _mm512_add_pd(_mm512_mul_pd(p, x), _mm512_set1_pd(c));
  return _mm512_add_pd(x, _mm512_mul_pd(x, _mm512_mul_pd(x, p)));
}
SOFTRANK_TARGET_AVX512 inline __m512d sort_kl_diff_terms8(__m512d xs, __m512d ref, __m512d decay,
                                                          __m512d k, __m512d inv, __m512d eps,
                                                          bool multiply) {
  const __m512d a = _mm512_sub_pd(xs, ref);
  const __m512d exp_a = exp_nonpositive8(a);
  const __m512d offset = multiply ? _mm512_mul_pd(k, inv) : _mm512_div_pd(k, eps);
  const __m512d gap = _mm512_add_pd(a, offset);
  const __m512d magnitude = _mm512_castsi512_pd(
      _mm512_and_epi64(_mm512_castpd_si512(gap), _mm512_set1_epi64(0x7fffffffffffffffLL)));
  const __mmask8 near = _mm512_cmp_pd_mask(magnitude, _mm512_set1_pd(0.5), _CMP_LT_OQ);
  const __m512d far_term = _mm512_sub_pd(exp_a, decay);
  if (near == 0) return far_term;
  const __m512d near_term = _mm512_mul_pd(decay, expm1_small8(_mm512_maskz_mov_pd(near, gap)));
  return _mm512_mask_blend_pd(near, far_term, near_term);
}
// Eight terms a step, added to the four partial sums as two steps of four
// (terms i .. i + 3, then i + 4 .. i + 7): the AVX2 kernel's order.
SOFTRANK_TARGET_AVX512 double sort_kl_diff_sum_avx512(const double* xs, double ref,
                                                      const double* decay, double inv,
                                                      double eps, bool multiply,
                                                      std::int64_t count, double*) {
  const __m512d ref8 = _mm512_set1_pd(ref), inv8 = _mm512_set1_pd(inv), eps8 = _mm512_set1_pd(eps);
  const __m512d lanes = _mm512_set_pd(8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0);
  __m256d sums = _mm256_setzero_pd();
  for (std::int64_t i = 0; i < count; i += 8) {
    // The tail through the same code: padded lanes read 0 and give +0
    // terms, which leave a lane's sum (never -0) as it is.
    const __mmask8 live =
        count - i >= 8 ? __mmask8{0xff} : static_cast<__mmask8>((1u << (count - i)) - 1u);
    const __m512d k = _mm512_add_pd(_mm512_set1_pd(static_cast<double>(i)), lanes);
    const __m512d terms = _mm512_maskz_mov_pd(
        live, sort_kl_diff_terms8(_mm512_maskz_loadu_pd(live, xs + i), ref8,
                                  _mm512_maskz_loadu_pd(live, decay + i), k, inv8, eps8, multiply));
    sums = _mm256_add_pd(sums, _mm512_castpd512_pd256(terms));
    sums = _mm256_add_pd(sums, _mm512_extractf64x4_pd(terms, 1));
  }
  alignas(32) double partial[4];
  _mm256_store_pd(partial, sums);
  return join_lanes(partial);
}
#endif

double sort_kl_diff_sum_baseline(const double* xs, double ref, const double* decay, double inv,
                                 double eps, bool multiply, std::int64_t count, double* scratch) {
  for (std::int64_t i = 0; i < count; ++i) scratch[i] = xs[i] - ref;
  exp_baseline(scratch, count);
  return lane_sum(count, [&](std::int64_t i) {
    const double k = static_cast<double>(i + 1);
    return sort_kl_diff_term(xs[i] - ref, scratch[i], multiply ? k * inv : k / eps, decay[i]);
  });
}

using DiffSumKernel = double (*)(const double*, double, const double*, double, double, bool,
                                 std::int64_t, double*);


// The kernels of a level, or null where the CPU or the build lacks it.
ExpKernel exp_kernel_at(SimdLevel level) {
  switch (level) {
    case SimdLevel::Baseline: return exp_baseline;
#if defined(SOFTRANK_X86_DISPATCH)
    case SimdLevel::Avx2: return cpu_simd_level() >= SimdLevel::Avx2 ? exp_avx2 : nullptr;
    case SimdLevel::Avx512: return cpu_simd_level() >= SimdLevel::Avx512 ? exp_avx512 : nullptr;
#endif
    default: return nullptr;
  }
}
DiffSumKernel diff_sum_kernel_at(SimdLevel level) {
  switch (level) {
    case SimdLevel::Baseline: return sort_kl_diff_sum_baseline;
#if defined(SOFTRANK_X86_DISPATCH)
    case SimdLevel::Avx2:
      return cpu_simd_level() >= SimdLevel::Avx2 ? sort_kl_diff_sum_avx2 : nullptr;
    case SimdLevel::Avx512:
      return cpu_simd_level() >= SimdLevel::Avx512 ? sort_kl_diff_sum_avx512 : nullptr;
#endif
    default: return nullptr;
  }
}

}  // namespace

void exp_nonpositive_inplace(double* values, std::int64_t n) {
  static const ExpKernel kernel = exp_kernel_at(simd_level());
  kernel(values, n);
}

double sort_kl_diff_sum(const double* xs, double ref, const double* decay, double inv, double eps,
                        bool multiply, std::int64_t count, double* scratch) {
  static const DiffSumKernel kernel = diff_sum_kernel_at(simd_level());
  return kernel(xs, ref, decay, inv, eps, multiply, count, scratch);
}

bool exp_nonpositive_inplace_at(int level, double* values, std::int64_t n) {
  const ExpKernel kernel = exp_kernel_at(static_cast<SimdLevel>(level));
  if (kernel) kernel(values, n);
  return kernel != nullptr;
}

bool sort_kl_diff_sum_at(int level, const double* xs, double ref, const double* decay, double inv,
                         double eps, bool multiply, std::int64_t count, double* scratch,
                         double* sum) {
  const DiffSumKernel kernel = diff_sum_kernel_at(static_cast<SimdLevel>(level));
  if (kernel) *sum = kernel(xs, ref, decay, inv, eps, multiply, count, scratch);
  return kernel != nullptr;
}

}  // namespace softrank
