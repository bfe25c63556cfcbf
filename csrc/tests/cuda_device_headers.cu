// A compile check, never run: the host-device routines that the CUDA core
// does not call yet (the projection and isotonic rules) instantiated in
// device code, so that nvcc keeps them device-clean. The CUDA core itself
// (csrc/cuda/soft_ops.cu) instantiates the soft operators' routines. Built by
// .ci/run with nvcc -c only:
//   nvcc -std=c++17 --expt-relaxed-constexpr -arch=sm_80 -Icsrc -c csrc/tests/cuda_device_headers.cu
#include "softrank/pav.h"
#include "softrank/projection.h"
#include "softrank/soft_row.h"

namespace softrank {

__global__ void projection_rows(const double* s, const double* ws, index_t n, double eps,
                                ProjectionL2Rule::Block* l2_stack,
                                ProjectionKlRule::Block* kl_stack, double* out,
                                index_t* block_start) {
  project_sorted(ProjectionL2Rule{s, ws, eps, false}, n, l2_stack, out, block_start);
  project_sorted(ProjectionKlRule{s, ws, eps, false}, n, kl_stack, out, block_start);
}

__global__ void isotonic_rows(const double* y, const double* w, const double* log_w, index_t n,
                              BlockStack stack, IsotonicKlRule::Block* kl_stack) {
  pav_run(IsotonicL2Pooling{w}, y, 0, n, stack);
  pav_run(IsotonicUnitPooling{false, IsotonicUnitTest{}}, y, 0, n, stack);
  pav_run(IsotonicKlRule{log_w, true}, y, 0, n, BlockArray<IsotonicKlRule::Block>{kl_stack});
}

}  // namespace softrank
