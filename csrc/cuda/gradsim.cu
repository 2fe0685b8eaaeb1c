#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../gradsim_args.h"
#include "launch.h"

namespace privfast {
namespace {

at::Tensor gradsim_cuda(at::TensorList grads_in, at::TensorList refs_in, const at::Tensor& index, bool per_layer) {
  const auto call = prepare_gradsim(grads_in, refs_in, index);
  const c10::cuda::CUDAGuard guard(call.grads[0].device());
  const at::Tensor sums = cuda::reduce_rows<3>(call.grads, call.refs, call.index);
  return cosines_from_sums(sums, per_layer, call.grads[0].scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CUDA, m) { m.impl("gradsim", &gradsim_cuda); }

}  // namespace privfast
