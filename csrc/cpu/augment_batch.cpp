#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../augment_args.h"

namespace privfast {
namespace {

at::Tensor augment_batch_cpu(const at::Tensor& x, const at::Tensor& crop_offsets, const at::Tensor& flips,
                             const at::Tensor& mix_pairs, const at::Tensor& mix_lambda,
                             const std::optional<at::Tensor>& extra, int64_t padding) {
  const AugmentCall call = prepare_augment(x, crop_offsets, flips, mix_pairs, mix_lambda, extra, padding);
  const int64_t height = x.size(2), width = x.size(3), channels = x.size(1);
  const int64_t rows = call.out.size(0) / std::max<int64_t>(x.size(0), 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "augment_batch", [&] {
    const auto plan = call.plan<scalar_t>();
    scalar_t* dst = call.out.data_ptr<scalar_t>();
    at::parallel_for(0, call.out.size(0) * channels, 1, [&](int64_t first, int64_t last) {
      for (int64_t p = first; p < last; ++p) {
        const int64_t c = p % channels, row = (p / channels) % rows, b = p / (channels * rows);
        scalar_t* plane = dst + p * height * width;
        for (int64_t i = 0; i < height; ++i) {
          for (int64_t j = 0; j < width; ++j) plane[i * width + j] = static_cast<scalar_t>(plan.pixel(b, row, c, i, j));
        }
      }
    });
  });
  return call.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CPU, m) { m.impl("augment_batch", &augment_batch_cpu); }

}  // namespace privfast
