#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../augment_args.h"
#include "augment_batch.cuh"
#include "launch.h"

namespace privfast {
namespace {

at::Tensor augment_batch_cuda(const at::Tensor& x, const at::Tensor& crop_offsets, const at::Tensor& flips,
                              const at::Tensor& mix_pairs, const at::Tensor& mix_lambda,
                              const std::optional<at::Tensor>& extra, int64_t padding) {
  const AugmentCall call = prepare_augment(x, crop_offsets, flips, mix_pairs, mix_lambda, extra, padding);
  if (call.out.numel() == 0) return call.out;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "augment_batch_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::augment_batch_kernel<scalar_t, acc_t>
        <<<cuda::grid_for(call.out.numel(), cuda::kAugmentThreads), cuda::kAugmentThreads, 0, stream>>>(
            call.plan<scalar_t>(), x.size(0), call.out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return call.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CUDA, m) { m.impl("augment_batch", &augment_batch_cuda); }

}  // namespace privfast
