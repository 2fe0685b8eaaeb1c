#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../gradsim_args.h"
#include "launch.h"

namespace privfast {
namespace {

at::Tensor gradsim_cuda(at::TensorList grads_in, at::TensorList refs_in, const at::Tensor& index, bool per_layer) {
  const auto grads = checked_rows(grads_in, "grads");
  const auto refs = checked_rows(refs_in, "refs");
  check_gradsim_args(grads, refs, index);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const at::Tensor sums = cuda::reduce_rows<3>(grads, refs, index.contiguous());
  return cosines_from_sums(sums, per_layer, grads[0].scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CUDA, m) { m.impl("gradsim", &gradsim_cuda); }

}  // namespace privfast
