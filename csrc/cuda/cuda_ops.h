// The CUDA core's entry points, in host types only (no CUDA header), so that
// the bindings compile with the host compiler whether or not the core was
// built. soft_ops.cu defines them where CMake enabled CUDA (SOFTRANK_CUDA);
// stub.cpp otherwise, where they report that the core is absent.
//
// The ops work on device buffers, C-contiguous (rows, n), of float (f64 =
// false) or double, and on int32 perm / block_start with the CPU engine's
// meaning (softrank/_engine.py). They enqueue their work on `stream` (a
// cudaStream_t; nullptr is the legacy default stream) of the current device
// and return without synchronising. Their only scratch is `workspace`, of at
// least the bytes the matching *_workspace function returns. Arguments are
// checked by the caller (bindings/module.cpp, bindings/xla_ffi_cuda.cpp);
// a failed CUDA call throws std::runtime_error with CUDA's error string.
#pragma once

#include <cstddef>
#include <cstdint>

#include "softrank/common.h"

namespace softrank {
namespace cuda {

// Whether this build holds the CUDA core.
bool compiled() noexcept;

// The number of usable CUDA devices: 0 without the core, a driver or a device.
int device_count() noexcept;

// The current device's compute capability as 10 * major + minor (80 for an
// A100), or -1 where the runtime cannot tell (no core, driver or device).
int device_capability() noexcept;

// Whether this build has a kernel image the current device runs (SASS for
// its architecture or PTX it can compile): false for a GPU older than every
// CMAKE_CUDA_ARCHITECTURES entry, whose launches would fail with "no kernel
// image is available". Asks the current device only, so that no other
// device gets a context. Never raises.
bool device_runs_kernels() noexcept;

// Scratch bytes of soft_forward / soft_product for a (rows, n) batch. They
// query CUB's temporary storage for the current device, so they throw (as
// the ops do) where there is no usable device.
std::size_t soft_forward_workspace(bool f64, std::int64_t rows, index_t n);
std::size_t soft_product_workspace(bool f64, std::int64_t rows, index_t n);

// The forward pass of every row: out, and the state perm / block_start.
void soft_forward(bool f64, const void* x, std::int64_t rows, index_t n, const OpSpec& spec,
                  void* out, index_t* perm, index_t* block_start, void* workspace,
                  std::size_t workspace_bytes, void* stream);

// transpose = true: the vector-Jacobian product of vec; false: the
// Jacobian-vector product (soft_product_batch's meaning).
void soft_product(bool f64, const void* x, const void* out, const index_t* perm,
                  const index_t* block_start, const void* vec, std::int64_t rows, index_t n,
                  const OpSpec& spec, bool transpose, void* result, void* workspace,
                  std::size_t workspace_bytes, void* stream);

}  // namespace cuda
}  // namespace softrank
