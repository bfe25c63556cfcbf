// exp over a buffer of non-positive arguments, vectorised and dispatched at
// load time to AVX-512/AVX2 where present: the entropic (kl) operators take
// one exp per element, and libm's scalar exp would otherwise dominate them.
// The clones inline exp_nonpositive (vector_math.h), so each is compiled for
// its own instruction set.
#include "softrank/vector_math.h"

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SOFTRANK_NO_CLONES)
#define SOFTRANK_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SOFTRANK_SIMD_CLONES
#endif

namespace softrank {

// Fixed blocks of kLanes values, the tail zero-padded to a full block: every
// element goes through the same (vectorised) code whatever its position. A
// plain loop has a vectorised body and a scalar prologue/epilogue that the
// compiler contracts into FMAs differently, so an element's result depended
// on where its buffer started and ended; the long-row path splits buffers
// over the threads, and kl soft ranks then differed by 1 ulp between thread
// counts (csrc/tests: threads, kernels).
SOFTRANK_SIMD_CLONES void exp_nonpositive_inplace(double* values, std::int64_t n) {
  constexpr int kLanes = 8;
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

}  // namespace softrank
