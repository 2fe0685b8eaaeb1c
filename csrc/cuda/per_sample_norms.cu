#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch.h"

namespace privfast {
namespace {

at::Tensor per_sample_norms_cuda(at::TensorList grads_in) {
  const auto grads = checked_rows(grads_in, "grads");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  return cuda::reduce_rows<1>(grads, {}, at::Tensor())[0].sum(0).sqrt().to(grads[0].scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CUDA, m) { m.impl("per_sample_norms", &per_sample_norms_cuda); }

}  // namespace privfast
