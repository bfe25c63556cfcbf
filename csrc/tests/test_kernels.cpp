// Low-level kernels: the vectorised exp (vector_math.h/.cpp) and expm1_small
// against libm,
// and its position invariance (the long-row path splits buffers over the
// threads: an element's result must not depend on where its buffer starts).
#include <cstring>

#include "helpers.h"
#include "softrank/vector_math.h"

using namespace th;

TEST(kernels, exp_nonpositive_within_2_ulp_of_libm) {
  Rng rng(61);
  std::vector<double> x;
  for (int i = 0; i < 200000; ++i) x.push_back(-std::exp(rng.uniform(-40.0, 6.7)));  // (-800, 0)
  for (double v : {0.0, -0.0, -kDenorm, -1e-300, -708.0, -708.4, -709.0, -745.0, -745.2, -746.0,
                   -1e10, -kMax, -kInf})
    x.push_back(v);
  std::vector<double> buffer = x;
  softrank::exp_nonpositive_inplace(buffer.data(), static_cast<std::int64_t>(buffer.size()));
  long bad_inline = 0, bad_buffer = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp(x[i]);
    auto ulps = [&](double got) {
      if (got == want) return 0.0;
      const double ulp = std::nextafter(std::fabs(want), kInf) - std::fabs(want);
      return std::fabs(got - want) / ulp;
    };
    if (!(ulps(softrank::exp_nonpositive(x[i])) <= 2.0)) {
      if (++bad_inline <= 5) CHECK(false) << "inline" << check::fmt(x[i]) << softrank::exp_nonpositive(x[i]) << want;
    }
    if (!(ulps(buffer[i]) <= 2.0)) {
      if (++bad_buffer <= 5) CHECK(false) << "buffer" << check::fmt(x[i]) << buffer[i] << want;
    }
  }
  CHECK(bad_inline == 0 && bad_buffer == 0) << bad_inline << bad_buffer;
}

TEST(kernels, expm1_small_within_2_ulp_of_libm) {
  Rng rng(63);
  std::vector<double> x;
  for (int i = 0; i < 200000; ++i) {
    // Magnitudes from 1e-300 to 1/2, both signs (the kl sort's near terms).
    const double m = i % 2 ? rng.uniform(0.0, 0.5) : 0.5 * std::exp(rng.uniform(-690.0, 0.0));
    x.push_back(rng.integer(0, 1) ? m : -m);
  }
  for (double v : {0.0, -0.0, kDenorm, -kDenorm, 1e-300, 0.5, -0.5, std::nextafter(0.5, 0.0)})
    x.push_back(v);
  long bad = 0;
  for (double v : x) {
    const double want = std::expm1(v), got = softrank::expm1_small(v);
    const double ulp = std::nextafter(std::fabs(want), kInf) - std::fabs(want);
    const bool ok = got == want || std::fabs(got - want) <= 2.0 * ulp;
    if (!ok && ++bad <= 5) CHECK(false) << check::fmt(v) << got << want;
  }
  CHECK(bad == 0) << bad;
}

TEST(kernels, exp_buffer_is_position_invariant) {
  Rng rng(62);
  const int n = 4099;
  std::vector<double> x(n);
  for (auto& v : x) v = rng.uniform(-760.0, 0.0);
  std::vector<double> whole = x;
  softrank::exp_nonpositive_inplace(whole.data(), n);
  long diffs = 0;
  for (int lo = 0; lo < 40; ++lo)
    for (int len : {1, 2, 3, 7, 8, 9, 15, 16, 17, 100, 1001}) {
      std::vector<double> part = x;
      softrank::exp_nonpositive_inplace(part.data() + lo, len);
      for (int i = lo; i < lo + len; ++i) diffs += !check::same_bits(part[i], whole[i]);
    }
  CHECK(diffs == 0) << diffs << "elements depend on their position in the buffer";
}
