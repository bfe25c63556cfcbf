// XLA FFI handlers for platform "CUDA": the forward pass and the products of
// the soft operators on device buffers, through the CUDA core (csrc/cuda),
// under the CPU handlers' target names, operands, results and attributes
// (xla_ffi.cpp), so that softrank.jax registers both and XLA picks by the
// platform it lowers for. The work runs on XLA's stream; scratch comes from
// XLA's allocator. The second derivative, the projection and isotonic
// regression have no CUDA handlers (softrank.jax computes them on the host).
// Built only with the CUDA core (CMakeLists.txt).
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <utility>

#include "cuda/cuda_ops.h"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi_checks.h"

namespace py = pybind11;
namespace ffi = xla::ffi;
using softrank::index_t;

namespace {

using softrank_bindings::check_call;
using softrank_bindings::check_like;
using softrank_bindings::RowShape;

bool is_f64(const ffi::AnyBuffer& x) { return x.element_type() == ffi::DataType::F64; }

// Device scratch of `bytes` from XLA (none needed for 0 bytes).
ffi::Error allocate(ffi::ScratchAllocator& scratch, std::size_t bytes, void*& data) {
  data = nullptr;
  if (bytes == 0) return ffi::Error::Success();
  std::optional<void*> block = scratch.Allocate(bytes, 256);
  if (!block.has_value())
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "softrank: could not allocate " + std::to_string(bytes) +
                          " bytes of CUDA scratch");
  data = *block;
  return ffi::Error::Success();
}

// Runs a CUDA core call, turning what it throws into an XLA error.
template <class Fn>
ffi::Error guarded(Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
  return ffi::Error::Success();
}

// perm and block_start are null for the value-only forward: they then come
// from the scratch too.
ffi::Error forward_impl(cudaStream_t stream, ffi::ScratchAllocator& scratch, ffi::AnyBuffer x,
                        ffi::Result<ffi::AnyBuffer> out, std::int32_t op, std::int32_t reg,
                        bool descending, double eps, index_t* perm, index_t* block_start) {
  RowShape shape;
  softrank::OpSpec spec;
  if (auto e = check_call(x, op, reg, descending, eps, shape, spec); !e.success()) return e;
  if (auto e = check_like(*out, x, "out"); !e.success()) return e;
  if (shape.rows == 0 || shape.n == 0) return ffi::Error::Success();
  const bool f64 = is_f64(x);
  std::size_t bytes = 0;
  if (auto e = guarded([&] { bytes = softrank::cuda::soft_forward_workspace(f64, shape.rows,
                                                                            shape.n); });
      !e.success())
    return e;
  void* workspace = nullptr;
  if (auto e = allocate(scratch, bytes, workspace); !e.success()) return e;
  if (!perm) {
    const std::size_t state = static_cast<std::size_t>(shape.rows) *
                              static_cast<std::size_t>(shape.n) * sizeof(index_t);
    void* p = nullptr;
    void* b = nullptr;
    if (auto e = allocate(scratch, state, p); !e.success()) return e;
    if (auto e = allocate(scratch, state, b); !e.success()) return e;
    perm = static_cast<index_t*>(p);
    block_start = static_cast<index_t*>(b);
  }
  return guarded([&] {
    softrank::cuda::soft_forward(f64, x.untyped_data(), shape.rows, shape.n, spec,
                                 out->untyped_data(), perm, block_start, workspace, bytes,
                                 stream);
  });
}

ffi::Error forward(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::S32>> perm,
                   ffi::Result<ffi::Buffer<ffi::S32>> block_start, std::int32_t op,
                   std::int32_t reg, bool descending, double eps) {
  if (perm->element_count() != x.element_count() ||
      block_start->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("softrank: perm and block_start must have x's size");
  return forward_impl(stream, scratch, x, out, op, reg, descending, eps, perm->typed_data(),
                      block_start->typed_data());
}

ffi::Error forward_value(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                         ffi::Result<ffi::AnyBuffer> out, std::int32_t op, std::int32_t reg,
                         bool descending, double eps) {
  return forward_impl(stream, scratch, x, out, op, reg, descending, eps, nullptr, nullptr);
}

// vjp (transpose) and jvp. Unlike the CPU handler, this one cannot read perm
// to check it (it lives on the device): the kernels read it clamped into the
// row (soft_row.h, ClampedPositions), so a state that is not a forward pass's
// gives unspecified values, never an access outside its row.
ffi::Error product(cudaStream_t stream, ffi::ScratchAllocator& scratch, ffi::AnyBuffer x,
                   ffi::AnyBuffer out, ffi::Buffer<ffi::S32> perm,
                   ffi::Buffer<ffi::S32> block_start, ffi::AnyBuffer vec,
                   ffi::Result<ffi::AnyBuffer> result, std::int32_t op, std::int32_t reg,
                   bool descending, double eps, bool transpose) {
  RowShape shape;
  softrank::OpSpec spec;
  if (auto e = check_call(x, op, reg, descending, eps, shape, spec); !e.success()) return e;
  if (auto e = check_like(vec, x, transpose ? "cotangent" : "tangent"); !e.success()) return e;
  if (auto e = check_like(*result, x, "result"); !e.success()) return e;
  if (auto e = check_like(out, x, "out"); !e.success()) return e;
  if (perm.element_count() != x.element_count() ||
      block_start.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("softrank: perm and block_start must have x's size");
  if (shape.rows == 0 || shape.n == 0) return ffi::Error::Success();
  const bool f64 = is_f64(x);
  std::size_t bytes = 0;
  if (auto e = guarded([&] { bytes = softrank::cuda::soft_product_workspace(f64, shape.rows,
                                                                            shape.n); });
      !e.success())
    return e;
  void* workspace = nullptr;
  if (auto e = allocate(scratch, bytes, workspace); !e.success()) return e;
  return guarded([&] {
    softrank::cuda::soft_product(f64, x.untyped_data(), out.untyped_data(), perm.typed_data(),
                                 block_start.typed_data(), vec.untyped_data(), shape.rows,
                                 shape.n, spec, transpose, result->untyped_data(), workspace,
                                 bytes, stream);
  });
}

ffi::Error vjp(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
               ffi::AnyBuffer out, ffi::Buffer<ffi::S32> perm, ffi::Buffer<ffi::S32> block_start,
               ffi::AnyBuffer cotangent, ffi::Result<ffi::AnyBuffer> grad, std::int32_t op,
               std::int32_t reg, bool descending, double eps) {
  return product(stream, scratch, x, out, perm, block_start, cotangent, grad, op, reg,
                 descending, eps, true);
}

ffi::Error jvp(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
               ffi::AnyBuffer out, ffi::Buffer<ffi::S32> perm, ffi::Buffer<ffi::S32> block_start,
               ffi::AnyBuffer tangent, ffi::Result<ffi::AnyBuffer> tangent_out, std::int32_t op,
               std::int32_t reg, bool descending, double eps) {
  return product(stream, scratch, x, out, perm, block_start, tangent, tangent_out, op, reg,
                 descending, eps, false);
}

// Every handler's context: XLA's stream and its scratch allocator.
auto bind_cuda() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::ScratchAllocator>();
}

// The operator's attributes, which every handler takes last.
template <class Binding>
auto with_op_attributes(Binding binding) {
  return std::move(binding)
      .template Attr<std::int32_t>("op")
      .template Attr<std::int32_t>("reg")
      .template Attr<bool>("descending")
      .template Attr<double>("eps");
}

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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_cuda_forward, forward,
                              with_op_attributes(bind_cuda()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()
                                                     .Ret<ffi::Buffer<ffi::S32>>()
                                                     .Ret<ffi::Buffer<ffi::S32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_cuda_forward_value, forward_value,
                              with_op_attributes(bind_cuda()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_cuda_vjp, vjp,
                              with_op_attributes(with_product_operands(bind_cuda())
                                                     .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(softrank_xla_cuda_jvp, jvp,
                              with_op_attributes(with_product_operands(bind_cuda())
                                                     .Ret<ffi::AnyBuffer>()));

namespace softrank_bindings {

// {target name: PyCapsule of the CUDA handler}: the CPU handlers' names
// (xla_ffi_targets), registered by softrank.jax for platform "CUDA".
py::dict xla_ffi_cuda_targets() {
  py::dict targets;
  targets["softrank_forward_v1"] =
      py::capsule(reinterpret_cast<void*>(&softrank_xla_cuda_forward));
  targets["softrank_forward_value_v1"] =
      py::capsule(reinterpret_cast<void*>(&softrank_xla_cuda_forward_value));
  targets["softrank_vjp_v1"] = py::capsule(reinterpret_cast<void*>(&softrank_xla_cuda_vjp));
  targets["softrank_jvp_v1"] = py::capsule(reinterpret_cast<void*>(&softrank_xla_cuda_jvp));
  return targets;
}

}  // namespace softrank_bindings
