// exp over a buffer of non-positive arguments, vectorised and dispatched at
// load time to AVX-512/AVX2 where present (simd_level()): the entropic (kl)
// operators take one exp per element, and libm's scalar exp would otherwise
// dominate them. Each variant inlines exp_nonpositive (vector_math.h), so each
// is compiled for its own instruction set.
#include "softrank/vector_math.h"

#include <cstring>

#include "softrank/cpu_features.h"

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
SOFTRANK_TARGET_AVX2 void exp_avx2(double* values, std::int64_t n) { exp_nonpositive_blocks(values, n); }
SOFTRANK_TARGET_AVX512 void exp_avx512(double* values, std::int64_t n) {
  exp_nonpositive_blocks(values, n);
}
#endif

ExpKernel pick_exp_kernel() {
#if defined(SOFTRANK_X86_DISPATCH)
  switch (simd_level()) {
    case SimdLevel::Avx512: return exp_avx512;
    case SimdLevel::Avx2: return exp_avx2;
    default: break;
  }
#endif
  return exp_baseline;
}

}  // namespace

void exp_nonpositive_inplace(double* values, std::int64_t n) {
  static const ExpKernel kernel = pick_exp_kernel();
  kernel(values, n);
}

}  // namespace softrank
