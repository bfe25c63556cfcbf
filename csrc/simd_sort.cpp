// The vendored x86-simd-sort (third_party/x86-simd-sort): its AVX2 vector
// quicksort of packed uint64 (key, column) items, 2-3x faster than the LSD
// radix sort on rows of a few hundred to a few thousand items (sort.h,
// kSimdSortMin/Max), and of float32/float64 values alone (w in a value-only
// projection, sort_values_descending). This
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

namespace {

// x86-simd-sort's AVX2 quicksort of values[0, n) where the CPU has it.
template <class T>
bool simd_sort(T* values, std::int64_t n, bool descending) {
#if defined(SOFTRANK_HAVE_SIMD_SORT)
  if (!simd_sort_available()) return false;
  if (n > 1) x86simdsortStatic::qsort(values, static_cast<std::size_t>(n), false, descending);
  return true;
#else
  (void)values;
  (void)n;
  (void)descending;
  return false;
#endif
}

}  // namespace

bool simd_sort_u64(std::uint64_t* items, std::int64_t n) { return simd_sort(items, n, false); }
bool simd_sort_f32_descending(float* values, std::int64_t n) { return simd_sort(values, n, true); }
bool simd_sort_f64_descending(double* values, std::int64_t n) { return simd_sort(values, n, true); }

}  // namespace softrank
