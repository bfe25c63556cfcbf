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

// Bug: the rank vjp/jvp multiplied by 1/eps, which is inf for a subnormal
// eps, so every singleton block (true gradient 0) got inf * 0 = NaN. Fixed in
// soft_ops.h: divide by eps where 1/eps overflows.
TEST(regressions, rank_gradient_at_subnormal_eps_is_not_nan) {
  for (double eps : {kDenorm, 1e-310, 2.2e-308})
    for (const OpSpec& s : all_specs(eps)) {
      if (s.op != Op::Rank) continue;
      const std::vector<double> x{3.0, -1.0, 2.0, 0.5};  // distinct: singleton blocks
      const std::vector<double> g{1.0, -2.0, 0.25, 4.0};
      const Forward<double> f = forward(x, 1, 4, s);
      for (bool transpose : {true, false}) {
        const std::vector<double> r = product(x, f, g, 1, 4, s, transpose);
        for (int i = 0; i < 4; ++i) CHECK(r[i] == 0.0) << describe(s) << i << r[i];
      }
      const Forward<float> f32 = forward(cast<float>(x), 1, 4, s);
      const std::vector<float> r32 = product(cast<float>(x), f32, cast<float>(g), 1, 4, s, true);
      for (int i = 0; i < 4; ++i) CHECK(r32[i] == 0.0f) << describe(s) << "f32" << i;
    }
}
