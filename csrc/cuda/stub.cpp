// The CUDA core's entry points in a build without CUDA (SOFTRANK_CUDA off, or
// AUTO without a CUDA compiler): the bindings keep one code path, and every
// op reports that the core is absent.
#include <stdexcept>

#include "cuda/cuda_ops.h"

namespace softrank {
namespace cuda {
namespace {

[[noreturn]] void absent() { throw std::runtime_error("softrank was built without the CUDA core"); }

}  // namespace

bool compiled() noexcept { return false; }

int device_count() noexcept { return 0; }

int device_capability() noexcept { return -1; }

bool device_runs_kernels() noexcept { return false; }

std::size_t soft_forward_workspace(bool, std::int64_t, index_t) { absent(); }

std::size_t soft_product_workspace(bool, std::int64_t, index_t) { absent(); }

void soft_forward(bool, const void*, std::int64_t, index_t, const OpSpec&, void*, index_t*,
                  index_t*, void*, std::size_t, void*) {
  absent();
}

void soft_product(bool, const void*, const void*, const index_t*, const index_t*, const void*,
                  std::int64_t, index_t, const OpSpec&, bool, void*, void*, std::size_t, void*) {
  absent();
}

}  // namespace cuda
}  // namespace softrank
