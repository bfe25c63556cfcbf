// XLA FFI handlers: softrank.jax calls the core through these as XLA custom
// calls on the CPU, with no Python on the way (jax.pure_callback costs tens
// of microseconds a call: more than the engine needs for a row of 10^4).
// Built only where the XLA FFI headers were found at configure time (they
// come with jaxlib: jax.ffi.include_dir()); they are header-only, so the
// extension does not link against jaxlib. The buffers are XLA's: the last
// dimension is the row, every leading one a batch dimension. Checks mirror
// the pybind11 entry points (module.cpp): a bad argument returns an
// InvalidArgument error, which jax raises.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include "softrank/batched.h"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi_checks.h"

namespace py = pybind11;
namespace ffi = xla::ffi;
using softrank::index_t;

namespace {

using softrank_bindings::RowShape;
using softrank_bindings::check_call;
using softrank_bindings::check_like;
using softrank_bindings::is_value_type;
using softrank_bindings::row_shape;

ffi::Error forward_impl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out, std::int32_t op,
                        std::int32_t reg, bool descending, double eps, index_t* perm,
                        index_t* block_start) {
  RowShape shape;
  softrank::OpSpec spec;
  if (auto e = check_call(x, op, reg, descending, eps, shape, spec); !e.success()) return e;
  if (auto e = check_like(*out, x, "out"); !e.success()) return e;
  if (x.element_type() == ffi::DataType::F32)
    softrank::soft_forward_batch(static_cast<const float*>(x.untyped_data()), shape.rows, shape.n,
                                 spec, static_cast<float*>(out->untyped_data()), perm, block_start);
  else
    softrank::soft_forward_batch(static_cast<const double*>(x.untyped_data()), shape.rows,
                                 shape.n, spec, static_cast<double*>(out->untyped_data()), perm,
                                 block_start);
  return ffi::Error::Success();
}

// The forward pass with its state (perm, block starts: the vjp's residuals).
ffi::Error forward(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::Buffer<ffi::S32>> perm,
                   ffi::Result<ffi::Buffer<ffi::S32>> block_start, std::int32_t op,
                   std::int32_t reg, bool descending, double eps) {
  if (perm->element_count() != x.element_count() ||
      block_start->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("softrank: perm and block_start must have x's size");
  return forward_impl(x, out, op, reg, descending, eps, perm->typed_data(),
                      block_start->typed_data());
}

// The values alone (the state stays in the core's scratch).
ffi::Error forward_value(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out, std::int32_t op,
                         std::int32_t reg, bool descending, double eps) {
  return forward_impl(x, out, op, reg, descending, eps, nullptr, nullptr);
}

// What the product handlers check of the forward state they are handed: x's
// size, and perm entries in [0, n) (they index the row: out-of-range values
// would read and write out of bounds).
ffi::Error check_state(const ffi::AnyBuffer& x, const ffi::AnyBuffer& out,
                       const ffi::Buffer<ffi::S32>& perm, const ffi::Buffer<ffi::S32>& block_start,
                       index_t n) {
  if (auto e = check_like(out, x, "out"); !e.success()) return e;
  if (perm.element_count() != x.element_count() ||
      block_start.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("softrank: perm and block_start must have x's size");
  const index_t* p = perm.typed_data();
  bool in_range = true;
  for (std::size_t i = 0; i < perm.element_count(); ++i)
    in_range &= (p[i] >= 0) & (p[i] < n);
  if (!in_range)
    return ffi::Error::InvalidArgument(
        "softrank: perm holds an index outside [0, n): not a forward-pass state");
  return ffi::Error::Success();
}

template <class T>
const T* data(const ffi::AnyBuffer& buffer) {
  return static_cast<const T*>(buffer.untyped_data());
}

// vjp (transpose) and jvp: J(x)^T vec and J(x) vec from the forward state.
ffi::Error product(ffi::AnyBuffer x, ffi::AnyBuffer out, ffi::Buffer<ffi::S32> perm,
                   ffi::Buffer<ffi::S32> block_start, ffi::AnyBuffer vec,
                   ffi::Result<ffi::AnyBuffer> result, std::int32_t op, std::int32_t reg,
                   bool descending, double eps, bool transpose) {
  RowShape shape;
  softrank::OpSpec spec;
  if (auto e = check_call(x, op, reg, descending, eps, shape, spec); !e.success()) return e;
  if (auto e = check_like(vec, x, transpose ? "cotangent" : "tangent"); !e.success()) return e;
  if (auto e = check_like(*result, x, "result"); !e.success()) return e;
  if (auto e = check_state(x, out, perm, block_start, shape.n); !e.success()) return e;
  if (x.element_type() == ffi::DataType::F32)
    softrank::soft_product_batch(data<float>(x), data<float>(out), perm.typed_data(),
                                 block_start.typed_data(), data<float>(vec), shape.rows, shape.n,
                                 spec, transpose, static_cast<float*>(result->untyped_data()));
  else
    softrank::soft_product_batch(data<double>(x), data<double>(out), perm.typed_data(),
                                 block_start.typed_data(), data<double>(vec), shape.rows, shape.n,
                                 spec, transpose, static_cast<double*>(result->untyped_data()));
  return ffi::Error::Success();
}

ffi::Error vjp(ffi::AnyBuffer x, ffi::AnyBuffer out, ffi::Buffer<ffi::S32> perm,
               ffi::Buffer<ffi::S32> block_start, ffi::AnyBuffer cotangent,
               ffi::Result<ffi::AnyBuffer> grad, std::int32_t op, std::int32_t reg,
               bool descending, double eps) {
  return product(x, out, perm, block_start, cotangent, grad, op, reg, descending, eps, true);
}

ffi::Error jvp(ffi::AnyBuffer x, ffi::AnyBuffer out, ffi::Buffer<ffi::S32> perm,
               ffi::Buffer<ffi::S32> block_start, ffi::AnyBuffer tangent,
               ffi::Result<ffi::AnyBuffer> tangent_out, std::int32_t op, std::int32_t reg,
               bool descending, double eps) {
  return product(x, out, perm, block_start, tangent, tangent_out, op, reg, descending, eps,
                 false);
}

// The gradient with respect to x of <cotangent, J(x) tangent>.
ffi::Error hvp(ffi::AnyBuffer x, ffi::AnyBuffer out, ffi::Buffer<ffi::S32> perm,
               ffi::Buffer<ffi::S32> block_start, ffi::AnyBuffer cotangent,
               ffi::AnyBuffer tangent, ffi::Result<ffi::AnyBuffer> grad, std::int32_t op,
               std::int32_t reg, bool descending, double eps) {
  RowShape shape;
  softrank::OpSpec spec;
  if (auto e = check_call(x, op, reg, descending, eps, shape, spec); !e.success()) return e;
  if (auto e = check_like(cotangent, x, "cotangent"); !e.success()) return e;
  if (auto e = check_like(tangent, x, "tangent"); !e.success()) return e;
  if (auto e = check_like(*grad, x, "grad"); !e.success()) return e;
  if (auto e = check_state(x, out, perm, block_start, shape.n); !e.success()) return e;
  if (x.element_type() == ffi::DataType::F32)
    softrank::soft_hvp_batch(data<float>(x), data<float>(out), perm.typed_data(),
                             block_start.typed_data(), data<float>(cotangent),
                             data<float>(tangent), shape.rows, shape.n, spec,
                             static_cast<float*>(grad->untyped_data()));
  else
    softrank::soft_hvp_batch(data<double>(x), data<double>(out), perm.typed_data(),
                             block_start.typed_data(), data<double>(cotangent),
                             data<double>(tangent), shape.rows, shape.n, spec,
                             static_cast<double*>(grad->untyped_data()));
  return ffi::Error::Success();
}

// The projection onto the permutahedron of w of z / eps, with its state.
ffi::Error projection(ffi::AnyBuffer z, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out,
                      ffi::Result<ffi::Buffer<ffi::S32>> perm_z,
                      ffi::Result<ffi::Buffer<ffi::S32>> inv_z,
                      ffi::Result<ffi::Buffer<ffi::S32>> perm_w,
                      ffi::Result<ffi::Buffer<ffi::S32>> inv_w,
                      ffi::Result<ffi::Buffer<ffi::S32>> block_start, std::int32_t reg,
                      double eps) {
  RowShape shape;
  if (auto e = row_shape(z, shape); !e.success()) return e;
  if (!is_value_type(z.element_type()))
    return ffi::Error::InvalidArgument("softrank: z must be float32 or float64");
  if (auto e = check_like(w, z, "w"); !e.success()) return e;
  if (auto e = check_like(*out, z, "out"); !e.success()) return e;
  for (auto* state : {&perm_z, &inv_z, &perm_w, &inv_w, &block_start})
    if ((**state).element_count() != z.element_count())
      return ffi::Error::InvalidArgument("softrank: the projection's state must have z's size");
  if (reg != 0 && reg != 1) return ffi::Error::InvalidArgument("softrank: reg must be 0 or 1");
  if (!(eps >= 0.0))
    return ffi::Error::InvalidArgument("softrank: eps must be a number >= 0, got " +
                                       std::to_string(eps));
  const auto regularization = static_cast<softrank::Reg>(reg);
  if (z.element_type() == ffi::DataType::F32)
    softrank::projection_forward_batch(
        data<float>(z), data<float>(w), shape.rows, shape.n, eps, regularization,
        static_cast<float*>(out->untyped_data()), perm_z->typed_data(), perm_w->typed_data(),
        block_start->typed_data(), inv_z->typed_data(), inv_w->typed_data());
  else
    softrank::projection_forward_batch(
        data<double>(z), data<double>(w), shape.rows, shape.n, eps, regularization,
        static_cast<double*>(out->untyped_data()), perm_z->typed_data(), perm_w->typed_data(),
        block_start->typed_data(), inv_z->typed_data(), inv_w->typed_data());
  return ffi::Error::Success();
}

// Isotonic regression (l2 or kl), weighted or not. The weights were checked
// (positive, finite) by softrank.jax where their values are known. Rows with
// NaN or inf are one block (as softrank._host.isotonic makes them) with NaN
// values.
ffi::Error isotonic_impl(const ffi::AnyBuffer& y, const ffi::AnyBuffer* weights,
                         ffi::Result<ffi::AnyBuffer>& solution,
                         ffi::Result<ffi::Buffer<ffi::S32>>& block_start, bool increasing,
                         std::int32_t reg) {
  RowShape shape;
  if (auto e = row_shape(y, shape); !e.success()) return e;
  if (!is_value_type(y.element_type()))
    return ffi::Error::InvalidArgument("softrank: y must be float32 or float64");
  if (weights)
    if (auto e = check_like(*weights, y, "weights"); !e.success()) return e;
  if (auto e = check_like(*solution, y, "solution"); !e.success()) return e;
  if (block_start->element_count() != y.element_count())
    return ffi::Error::InvalidArgument("softrank: block_start must have y's size");
  if (reg != 0 && reg != 1) return ffi::Error::InvalidArgument("softrank: reg must be 0 or 1");
  index_t* blocks = block_start->typed_data();
  if (y.element_type() == ffi::DataType::F32) {
    const float* w = weights ? data<float>(*weights) : nullptr;
    float* v = static_cast<float*>(solution->untyped_data());
    if (reg == 0)
      softrank::isotonic_forward_batch(data<float>(y), w, shape.rows, shape.n, increasing, v,
                                       blocks);
    else
      softrank::isotonic_kl_forward_batch(data<float>(y), w, shape.rows, shape.n, increasing, v,
                                          blocks);
  } else {
    const double* w = weights ? data<double>(*weights) : nullptr;
    double* v = static_cast<double*>(solution->untyped_data());
    if (reg == 0)
      softrank::isotonic_forward_batch(data<double>(y), w, shape.rows, shape.n, increasing, v,
                                       blocks);
    else
      softrank::isotonic_kl_forward_batch(data<double>(y), w, shape.rows, shape.n, increasing, v,
                                          blocks);
  }
  for (std::size_t i = 0; i < block_start->element_count(); ++i)
    if (blocks[i] < 0) blocks[i] = 0;  // a NaN row: one block
  return ffi::Error::Success();
}

ffi::Error isotonic(ffi::AnyBuffer y, ffi::Result<ffi::AnyBuffer> solution,
                    ffi::Result<ffi::Buffer<ffi::S32>> block_start, bool increasing,
                    std::int32_t reg) {
  return isotonic_impl(y, nullptr, solution, block_start, increasing, reg);
}

ffi::Error isotonic_weighted(ffi::AnyBuffer y, ffi::AnyBuffer weights,
                             ffi::Result<ffi::AnyBuffer> solution,
                             ffi::Result<ffi::Buffer<ffi::S32>> block_start, bool increasing,
                             std::int32_t reg) {
  return isotonic_impl(y, &weights, solution, block_start, increasing, reg);
}

}  // namespace

// The operator's attributes, which every handler takes last.
template <class Binding>
auto with_op_attributes(Binding binding) {
  return std::move(binding)
      .template Attr<std::int32_t>("op")
      .template Attr<std::int32_t>("reg")
      .template Attr<bool>("descending")
      .template Attr<double>("eps");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_forward, forward,
                              with_op_attributes(ffi::Ffi::Bind()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()
                                                     .Ret<ffi::Buffer<ffi::S32>>()
                                                     .Ret<ffi::Buffer<ffi::S32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_forward_value, forward_value,
                              with_op_attributes(ffi::Ffi::Bind()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()));

// vjp and jvp: x, out, perm, block_start, the cotangent or tangent.
template <class Binding>
auto with_product_operands(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::AnyBuffer>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_vjp, vjp,
                              with_op_attributes(with_product_operands(ffi::Ffi::Bind())
                                                     .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_jvp, jvp,
                              with_op_attributes(with_product_operands(ffi::Ffi::Bind())
                                                     .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_hvp, hvp,
                              with_op_attributes(with_product_operands(ffi::Ffi::Bind())
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_projection, projection,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<std::int32_t>("reg")
                                  .Attr<double>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_isotonic, isotonic,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("increasing")
                                  .Attr<std::int32_t>("reg"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_isotonic_weighted, isotonic_weighted,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("increasing")
                                  .Attr<std::int32_t>("reg"));

namespace softrank_bindings {

// {target name: PyCapsule of the handler}, for jax.ffi.register_ffi_target.
// The names carry the version of the handlers' signature (operands, results,
// attributes): a program exported with jax.export names its targets, so a
// changed signature gets a new name and old exports keep their meaning.
py::dict xla_ffi_targets() {
  py::dict targets;
  targets["softrank_forward_v1"] = py::capsule(reinterpret_cast<void*>(&softrank_xla_forward));
  targets["softrank_forward_value_v1"] =
      py::capsule(reinterpret_cast<void*>(&softrank_xla_forward_value));
  targets["softrank_vjp_v1"] = py::capsule(reinterpret_cast<void*>(&softrank_xla_vjp));
  targets["softrank_jvp_v1"] = py::capsule(reinterpret_cast<void*>(&softrank_xla_jvp));
  targets["softrank_hvp_v1"] = py::capsule(reinterpret_cast<void*>(&softrank_xla_hvp));
  targets["softrank_projection_v1"] =
      py::capsule(reinterpret_cast<void*>(&softrank_xla_projection));
  targets["softrank_isotonic_v1"] = py::capsule(reinterpret_cast<void*>(&softrank_xla_isotonic));
  targets["softrank_isotonic_weighted_v1"] =
      py::capsule(reinterpret_cast<void*>(&softrank_xla_isotonic_weighted));
  return targets;
}

}  // namespace softrank_bindings
