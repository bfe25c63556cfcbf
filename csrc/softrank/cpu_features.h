// The instruction-set level the CPU core runs at, chosen once when the core
// loads: the best the CPU has, capped by the environment variable
// SOFTRANK_DISABLE_AVX512=1 (the portable AVX2/baseline paths on any CPU, so
// that a machine with AVX-512 tests the fallback too). Every code path that
// is specific to an instruction set asks simd_level() before it runs.
#pragma once

namespace softrank {

enum class SimdLevel : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

// What this process uses (CPU support and SOFTRANK_DISABLE_AVX512).
SimdLevel simd_level();
// What the CPU supports, whatever the environment says.
SimdLevel cpu_simd_level();
// "avx512", "avx2" or "baseline".
const char* simd_level_name(SimdLevel level);

}  // namespace softrank

// Per-ISA compilation of one always-inline body (x86-64 with GCC or Clang):
// SOFTRANK_TARGET_AVX512 / SOFTRANK_TARGET_AVX2 mark the variants, which the
// caller picks with simd_level(). Elsewhere only the baseline variant exists.
// The AVX2 level includes FMA (every AVX2 CPU has it; detection asks for
// both): the exp kernel's polynomial is a chain of multiply-adds.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SOFTRANK_NO_CLONES)
#define SOFTRANK_X86_DISPATCH 1
#define SOFTRANK_TARGET_AVX512 __attribute__((target("avx512f")))
#define SOFTRANK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif
