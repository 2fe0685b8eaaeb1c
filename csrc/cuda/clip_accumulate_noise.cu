#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../clip_args.h"
#include "clip_accumulate_noise.cuh"
#include "launch.h"

namespace privfast {
namespace {

constexpr int64_t kChunkElements = 2 * cuda::kGroupsPerThread * cuda::kAccumulateThreads;

std::vector<at::Tensor> clip_accumulate_noise_cuda(at::TensorList grads_in, double max_grad_norm, double noise_std,
                                                   double scale, int64_t seed, int64_t offset, bool check_finite) {
  check_clip_args(max_grad_norm, noise_std, scale);
  const auto grads = checked_rows(grads_in, "grads");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto n = row_numels(grads);
  const int64_t rows = grads[0].size(0), tensors = static_cast<int64_t>(grads.size());

  // First read of the gradients: squared norms per (tensor, example).
  const at::Tensor squares = cuda::reduce_rows<1>(grads, {}, at::Tensor())[0];
  const at::Tensor norms = squares.sum(0).sqrt();
  if (check_finite && rows > 0 && !norms.isfinite().all().item<bool>()) {  // the one host sync, opt-out
    const at::Tensor squares_host = squares.cpu(), norms_host = norms.cpu();
    check_finite_norms(squares_host.const_data_ptr<double>(), norms_host.const_data_ptr<double>(), tensors, rows,
                       "grads");
  }
  const auto acc_dtype = at::toOpMathType(grads[0].scalar_type());
  // clip_factor, for every example at once on the device.
  const at::Tensor factors = (max_grad_norm / (norms + kClipEps)).clamp_max(1.0).to(acc_dtype);

  std::vector<at::Tensor> outputs;
  std::vector<cuda::ChunkDesc> chunks;
  int64_t stream_start = 0;
  for (int64_t t = 0; t < tensors; ++t) {
    outputs.push_back(at::empty(grads[t].sizes().slice(1), grads[t].options()));
    for (int64_t b = 0; b < n[t]; b += kChunkElements) {
      chunks.push_back({grads[t].const_data_ptr(), outputs[t].data_ptr(), n[t], b, std::min(b + kChunkElements, n[t]),
                        stream_start});
    }
    stream_start += n[t];
  }
  if (chunks.empty()) return outputs;
  const at::Tensor chunks_dev = cuda::to_device(chunks, grads[0].device());
  const auto stream = cuda::current_stream();
  // Second read: clipped sums, noise generated in-kernel.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "clip_accumulate_noise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::clip_accumulate_kernel<scalar_t, acc_t><<<chunks.size(), cuda::kAccumulateThreads, 0, stream>>>(
        reinterpret_cast<const cuda::ChunkDesc*>(chunks_dev.const_data_ptr()), factors.const_data_ptr<acc_t>(), rows,
        noise_std, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CUDA, m) { m.impl("clip_accumulate_noise", &clip_accumulate_noise_cuda); }

}  // namespace privfast
