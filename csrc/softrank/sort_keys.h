// The order keys of the sort (sort.h): floats mapped to unsigned integers
// whose ascending order is the floats' decreasing order. Host-device: the
// CUDA core builds and decodes the same keys, so its sort (CUB radix sort,
// stable, ties in column order) gives the CPU's permutation bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace softrank {

SOFTRANK_HD std::uint32_t float_bits(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
SOFTRANK_HD std::uint64_t float_bits(double v) {
  std::uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

// Complemented order key: larger value -> smaller key.
SOFTRANK_HD std::uint32_t descending_key(float v) {
  const std::uint32_t u = float_bits(v);
  const std::uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ordered;
}
SOFTRANK_HD std::uint64_t descending_key(double v) {
  const std::uint64_t u = float_bits(v);
  const std::uint64_t sign = 0x8000000000000000ull;
  const std::uint64_t ordered = (u & sign) ? ~u : (u | sign);
  return ~ordered;
}
SOFTRANK_HD float value_of_key(std::uint32_t key) {
  const std::uint32_t ordered = ~key;
  const std::uint32_t u = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
SOFTRANK_HD double value_of_key(std::uint64_t key) {
  const std::uint64_t sign = 0x8000000000000000ull;
  const std::uint64_t ordered = ~key;
  const std::uint64_t u = (ordered & sign) ? (ordered & ~sign) : ~ordered;
  double v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
SOFTRANK_HD bool is_finite_bits(std::uint32_t u) { return (u & 0x7f800000u) != 0x7f800000u; }
SOFTRANK_HD bool is_finite_bits(std::uint64_t u) {
  return (u & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

}  // namespace softrank
