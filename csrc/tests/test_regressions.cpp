// Regression tests for bugs found in the core (one test per bug).
#include <chrono>

#include "helpers.h"

using namespace th;

// Bug: for_each_row looped over every row even for n = 0, so a valid
// zero-size batch such as numpy's np.empty((2**40, 0)) spent hours doing
// nothing. Fixed in batched.cpp: return at once when n == 0.
TEST(regressions, empty_rows_of_a_huge_batch_return_at_once) {
  const auto start = std::chrono::steady_clock::now();
  const std::int64_t rows = std::int64_t(1) << 40;
  for (const OpSpec& s : all_specs(1.0)) {
    // Nothing may be read or written: null pointers prove it.
    softrank::soft_forward_batch<double>(nullptr, rows, 0, s, nullptr, nullptr, nullptr);
    softrank::soft_forward_batch<float>(nullptr, rows, 0, s, nullptr, nullptr, nullptr);
    softrank::soft_product_batch<double>(nullptr, nullptr, nullptr, nullptr, nullptr, rows, 0, s,
                                         true, nullptr);
  }
  softrank::isotonic_forward_batch<double>(nullptr, nullptr, rows, 0, true, nullptr, nullptr);
  softrank::isotonic_vjp_batch<float>(nullptr, nullptr, nullptr, rows, 0, nullptr);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(seconds < 1.0) << seconds << "s";
}
