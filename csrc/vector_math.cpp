// exp over a buffer of non-positive arguments, vectorised and dispatched at
// load time to AVX-512/AVX2 where present: the entropic (kl) operators take
// one exp per element, and libm's scalar exp would otherwise dominate them.
// The clones inline exp_nonpositive (vector_math.h), so each is compiled for
// its own instruction set.
#include "softrank/vector_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SOFTRANK_NO_CLONES)
#define SOFTRANK_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SOFTRANK_SIMD_CLONES
#endif

namespace softrank {

SOFTRANK_SIMD_CLONES void exp_nonpositive_inplace(double* values, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) values[i] = exp_nonpositive(values[i]);
}

}  // namespace softrank
