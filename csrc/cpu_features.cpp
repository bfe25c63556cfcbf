#include "softrank/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace softrank {
namespace {

SimdLevel detect_cpu() {
#if defined(SOFTRANK_X86_DISPATCH)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return SimdLevel::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SimdLevel::Avx2;
#endif
  return SimdLevel::Baseline;
}

bool avx512_disabled_by_environment() {
  const char* value = std::getenv("SOFTRANK_DISABLE_AVX512");
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

}  // namespace

SimdLevel cpu_simd_level() {
  static const SimdLevel level = detect_cpu();
  return level;
}

SimdLevel simd_level() {
  static const SimdLevel level = [] {
    const SimdLevel cpu = cpu_simd_level();
    return cpu == SimdLevel::Avx512 && avx512_disabled_by_environment() ? SimdLevel::Avx2 : cpu;
  }();
  return level;
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::Avx512: return "avx512";
    case SimdLevel::Avx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace softrank
