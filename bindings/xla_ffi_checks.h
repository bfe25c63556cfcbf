// The argument checks the XLA FFI handlers share (xla_ffi.cpp on the CPU,
// xla_ffi_cuda.cpp on CUDA): the same checks and messages on both platforms.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "softrank/common.h"
#include "xla/ffi/api/ffi.h"

namespace softrank_bindings {

namespace ffi = xla::ffi;
using softrank::index_t;

struct RowShape {
  std::int64_t rows = 0;
  index_t n = 0;
};

inline ffi::Error row_shape(const ffi::AnyBuffer& x, RowShape& shape) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("softrank: x must have at least 1 dimension");
  const std::int64_t n = dims.back();
  if (n > std::numeric_limits<index_t>::max())
    return ffi::Error::InvalidArgument("softrank: rows longer than 2**31 - 1 are not supported");
  std::int64_t rows = 1;
  for (std::size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  shape.rows = rows;
  shape.n = static_cast<index_t>(n);
  return ffi::Error::Success();
}

inline ffi::Error make_spec(std::int32_t op, std::int32_t reg, bool descending, double eps,
                     softrank::OpSpec& spec) {
  if (op != 0 && op != 1) return ffi::Error::InvalidArgument("softrank: op must be 0 or 1");
  if (reg != 0 && reg != 1) return ffi::Error::InvalidArgument("softrank: reg must be 0 or 1");
  if (!(eps >= 0.0))
    return ffi::Error::InvalidArgument("softrank: eps must be a number >= 0, got " +
                                       std::to_string(eps));
  spec = softrank::OpSpec{static_cast<softrank::Op>(op), static_cast<softrank::Reg>(reg),
                          descending, eps};
  return ffi::Error::Success();
}

inline bool is_value_type(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::F64;
}

inline ffi::Error check_like(const ffi::AnyBuffer& a, const ffi::AnyBuffer& x,
                             const char* name) {
  if (a.element_type() != x.element_type() || a.element_count() != x.element_count())
    return ffi::Error::InvalidArgument(std::string("softrank: ") + name +
                                       " must have the dtype and size of x");
  return ffi::Error::Success();
}

// What every handler checks first: x's shape and type, and the operator.
inline ffi::Error check_call(const ffi::AnyBuffer& x, std::int32_t op, std::int32_t reg,
                             bool descending, double eps, RowShape& shape, softrank::OpSpec& spec) {
  if (auto e = row_shape(x, shape); !e.success()) return e;
  if (auto e = make_spec(op, reg, descending, eps, spec); !e.success()) return e;
  if (!is_value_type(x.element_type()))
    return ffi::Error::InvalidArgument("softrank: x must be float32 or float64");
  return ffi::Error::Success();
}

}  // namespace softrank_bindings
