#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../augment_args.h"
#include "augment_batch.cuh"
#include "launch.h"

namespace privfast {
namespace {

at::Tensor augment_batch_cuda(const at::Tensor& x_in, const at::Tensor& crop_offsets_in, const at::Tensor& flips_in,
                              const at::Tensor& mix_pairs_in, const at::Tensor& mix_lambda_in,
                              const std::optional<at::Tensor>& extra_in, int64_t padding) {
  check_augment_args(x_in, crop_offsets_in, flips_in, mix_pairs_in, mix_lambda_in, extra_in, padding);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), crop_offsets = crop_offsets_in.contiguous(), flips = flips_in.contiguous(),
                   mix_pairs = mix_pairs_in.contiguous(), mix_lambda = mix_lambda_in.contiguous();
  const at::Tensor extra = extra_in.has_value() ? extra_in->contiguous() : at::Tensor();
  const int64_t batch = x.size(0), k_extra = extra.defined() ? extra.size(1) : 0;
  const int64_t rows = flips.size(1) + k_extra + mix_pairs.size(1);
  at::Tensor out = at::empty({batch * rows, x.size(1), x.size(2), x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "augment_batch_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const augment::Plan<scalar_t, acc_t> plan{
        x.const_data_ptr<scalar_t>(), extra.defined() ? extra.const_data_ptr<scalar_t>() : nullptr,
        crop_offsets.const_data_ptr<int64_t>(), flips.const_data_ptr<bool>(), mix_pairs.const_data_ptr<int64_t>(),
        mix_lambda.const_data_ptr<acc_t>(), x.size(1), x.size(2), x.size(3), flips.size(1), k_extra,
        mix_pairs.size(1), padding};
    cuda::augment_batch_kernel<scalar_t, acc_t>
        <<<cuda::grid_for(out.numel(), cuda::kAugmentThreads), cuda::kAugmentThreads, 0, stream>>>(
            plan, batch, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CUDA, m) { m.impl("augment_batch", &augment_batch_cuda); }

}  // namespace privfast
