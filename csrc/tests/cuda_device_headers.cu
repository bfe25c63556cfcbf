// A compile check, never run: the host-device routines that the CUDA core
// does not call yet (the projection and isotonic rules) instantiated in
// device code, so that nvcc keeps them device-clean. The CUDA core itself
// (csrc/cuda/soft_ops.cu) instantiates the soft operators' routines. Built by
// .ci/run with nvcc -c only:
//   nvcc -std=c++17 --expt-relaxed-constexpr -arch=sm_80 -Icsrc -c csrc/tests/cuda_device_headers.cu
#include "softrank/isotonic.h"
#include "softrank/pav.h"
#include "softrank/projection.h"
#include "softrank/soft_row.h"

namespace softrank {

__global__ void projection_rows(const double* s, const double* ws, index_t n, double eps,
                                ProjectionL2Rule::Block* l2_stack,
                                ProjectionKlRule::Block* kl_stack,
                                ProjectionKlRunsRule::Block* kl_runs_stack, double* refs_s,
                                double* t_s, double* refs_w, double* t_w, double* out,
                                index_t* block_start) {
  project_sorted(ProjectionL2Rule{s, ws, eps, false}, n, l2_stack, out, block_start);
  project_sorted(ProjectionKlRule{s, ws, eps, false}, n, kl_stack, out, block_start);
  kl_references_decreasing(s, n, eps, refs_s, t_s);
  kl_references_decreasing(ws, n, 1.0, refs_w, t_w);
  exp_nonpositive_buffer(t_s, n);
  exp_nonpositive_buffer(t_w, n);
  project_sorted(ProjectionKlRunsRule{s, ws, refs_s, t_s, refs_w, t_w, eps}, n, kl_runs_stack,
                 out, block_start);
}

__global__ void isotonic_rows(const double* y, const double* w, index_t n, BlockStack stack,
                              double* refs, double* t, double* out) {
  pav_run(IsotonicL2Pooling{w}, y, 0, n, stack);
  pav_run(IsotonicUnitPooling{false, IsotonicUnitTest{}}, y, 0, n, stack);
  isotonic_kl_references(y, n, refs, t);
  const IsotonicKlRule kl{refs, w, true};
  const index_t count = pav_run(kl, t, 0, n, stack);
  for (index_t k = 0; k < count; ++k) out[k] = kl.value(stack.ref[k], stack.stat[k], stack.stat2[k]);
}

}  // namespace softrank
