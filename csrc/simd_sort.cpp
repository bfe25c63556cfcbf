// The vendored x86-simd-sort (third_party/x86-simd-sort) on packed uint64
// items: AVX2 vector quicksort, 2-3x faster than the LSD radix sort on rows
// of a few hundred to a few thousand items (sort.h, kSimdSortMin/Max). This
// file alone is compiled with -mavx2 -mfma -mpopcnt (CMakeLists.txt), so its
// code runs only behind simd_sort_available(). It includes nothing of
// softrank's but the dispatch declarations: no inline function shared with
// the portable translation units is compiled here for AVX2.
#include <cstdint>

#include "softrank/cpu_features.h"

#if defined(SOFTRANK_X86_DISPATCH) && defined(__AVX2__) && defined(__POPCNT__)
#define SOFTRANK_HAVE_SIMD_SORT 1
#include "x86simdsort-static-incl.h"
#endif

namespace softrank {

bool simd_sort_available() {
#if defined(SOFTRANK_HAVE_SIMD_SORT)
  static const bool available = simd_level() >= SimdLevel::Avx2 && __builtin_cpu_supports("popcnt");
  return available;
#else
  return false;
#endif
}

bool simd_sort_u64(std::uint64_t* items, std::int64_t n) {
#if defined(SOFTRANK_HAVE_SIMD_SORT)
  if (!simd_sort_available()) return false;
  if (n > 1) x86simdsortStatic::qsort(items, static_cast<std::size_t>(n));
  return true;
#else
  (void)items;
  (void)n;
  return false;
#endif
}

bool simd_sort_f32_descending(float* values, std::int64_t n) {
#if defined(SOFTRANK_HAVE_SIMD_SORT)
  if (!simd_sort_available()) return false;
  if (n > 1) x86simdsortStatic::qsort(values, static_cast<std::size_t>(n), false, true);
  return true;
#else
  (void)values;
  (void)n;
  return false;
#endif
}

bool simd_sort_f64_descending(double* values, std::int64_t n) {
#if defined(SOFTRANK_HAVE_SIMD_SORT)
  if (!simd_sort_available()) return false;
  if (n > 1) x86simdsortStatic::qsort(values, static_cast<std::size_t>(n), false, true);
  return true;
#else
  (void)values;
  (void)n;
  return false;
#endif
}

}  // namespace softrank
