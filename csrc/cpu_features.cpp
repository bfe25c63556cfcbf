#include "softrank/cpu_features.h"

#include <cstdlib>
#include <cstring>
#include <string>

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

// Set to anything but "" or "0", surrounding whitespace ignored (as
// SOFTRANK_DISABLE_CUDA, read in softrank/_engine.py).
bool avx512_disabled_by_environment() {
  const char* value = std::getenv("SOFTRANK_DISABLE_AVX512");
  if (value == nullptr) return false;
  std::string text(value);
  const char* space = " \t\n\r\f\v";
  const auto first = text.find_first_not_of(space);
  if (first == std::string::npos) return false;
  text = text.substr(first, text.find_last_not_of(space) - first + 1);
  return text != "0";
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
