// The Pearson correlation of two rows and its gradient with respect to the
// first: the last step of softrank's Spearman (soft ranks of the prediction
// against the hard ranks of the target), done here in one pass each way
// instead of a dozen framework operations on small arrays.
//
// corr = <a_c, b_c> / (|a_c| |b_c|) with a_c = a - mean(a), b_c = b - mean(b);
// NaN where a row of a or b is constant (0 / 0, as scipy.stats.spearmanr),
// or holds NaN or inf. The gradient of g * corr in a is
// g (b_c / (|a_c| |b_c|) - corr a_c / |a_c|^2): a_c and b_c have zero mean, so
// the centring's own derivative adds nothing. Sums are taken in double.
#pragma once

#include <cmath>
#include <limits>

#include "common.h"

namespace softrank {

// Each row is first brought to a largest magnitude near 1 by a power of two
// (exact, and corr is scale-free): sums of squares of rows near 1e200 would
// overflow, those of rows near 1e-200 underflow.
struct PearsonMoments {
  double scale_a, scale_b;  // the powers of two applied to a and b
  double mean_a, mean_b;    // of the scaled rows
  double norm_a, norm_b;    // |a_c|, |b_c| of the scaled rows
  double corr;              // NaN for a constant or non-finite row
};

// 2^-e for the binary exponent e of `largest` (finite, >= 0), kept normal.
inline double unit_scale(double largest) {
  if (largest == 0.0) return 1.0;
  int exponent;
  std::frexp(largest, &exponent);
  exponent = exponent < -1021 ? -1021 : (exponent > 1022 ? 1022 : exponent);
  return std::ldexp(1.0, -exponent);
}

template <class T>
PearsonMoments pearson_moments(const T* a, const T* b, index_t n) {
  double max_a = 0.0, max_b = 0.0;
  bool finite = true, varies_a = false, varies_b = false;
  for (index_t i = 0; i < n; ++i) {
    const double fa = std::fabs(static_cast<double>(a[i]));
    const double fb = std::fabs(static_cast<double>(b[i]));
    finite &= fa <= std::numeric_limits<double>::max() && fb <= std::numeric_limits<double>::max();
    max_a = fa > max_a ? fa : max_a;
    max_b = fb > max_b ? fb : max_b;
    varies_a |= a[i] != a[0];
    varies_b |= b[i] != b[0];
  }
  // A constant row is NaN by definition, not by the rounding of its mean
  // (a row of 0.1s has a mean 1 ulp off and a tiny nonzero spread).
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (!finite || !varies_a || !varies_b) return PearsonMoments{1.0, 1.0, nan, nan, nan, nan, nan};
  const double scale_a = unit_scale(max_a), scale_b = unit_scale(max_b);
  double sum_a = 0.0, sum_b = 0.0;
  for (index_t i = 0; i < n; ++i) {
    sum_a += static_cast<double>(a[i]) * scale_a;
    sum_b += static_cast<double>(b[i]) * scale_b;
  }
  const double count = static_cast<double>(n);
  const double mean_a = sum_a / count, mean_b = sum_b / count;
  double ab = 0.0, aa = 0.0, bb = 0.0;
  for (index_t i = 0; i < n; ++i) {
    const double da = static_cast<double>(a[i]) * scale_a - mean_a;
    const double db = static_cast<double>(b[i]) * scale_b - mean_b;
    ab += da * db;
    aa += da * da;
    bb += db * db;
  }
  const double norm_a = std::sqrt(aa), norm_b = std::sqrt(bb);
  return PearsonMoments{scale_a, scale_b, mean_a, mean_b, norm_a, norm_b, ab / norm_a / norm_b};
}

// grad[i] = d (cotangent * corr) / d a_i over one row: with a = a' / scale_a,
// scale_a (b_c / (|a_c| |b_c|) - corr a_c / |a_c|^2) in the scaled rows.
template <class T>
void pearson_vjp_row(const T* a, const T* b, index_t n, double cotangent, T* grad) {
  const PearsonMoments m = pearson_moments(a, b, n);
  if (std::isnan(m.corr)) {
    for (index_t i = 0; i < n; ++i) grad[i] = static_cast<T>(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const double along_b = cotangent * m.scale_a / m.norm_a / m.norm_b;
  const double along_a = cotangent * m.scale_a * m.corr / m.norm_a / m.norm_a;
  for (index_t i = 0; i < n; ++i) {
    const double da = static_cast<double>(a[i]) * m.scale_a - m.mean_a;
    const double db = static_cast<double>(b[i]) * m.scale_b - m.mean_b;
    grad[i] = static_cast<T>(along_b * db - along_a * da);
  }
}

}  // namespace softrank
