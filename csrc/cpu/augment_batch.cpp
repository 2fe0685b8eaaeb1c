#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../augment_args.h"
#include "../common/augment.h"

namespace privfast {
namespace {

at::Tensor augment_batch_cpu(const at::Tensor& x_in, const at::Tensor& crop_offsets_in, const at::Tensor& flips_in,
                             const at::Tensor& mix_pairs_in, const at::Tensor& mix_lambda_in,
                             const std::optional<at::Tensor>& extra_in, int64_t padding) {
  check_augment_args(x_in, crop_offsets_in, flips_in, mix_pairs_in, mix_lambda_in, extra_in, padding);
  const at::Tensor x = x_in.contiguous(), crop_offsets = crop_offsets_in.contiguous(), flips = flips_in.contiguous(),
                   mix_pairs = mix_pairs_in.contiguous(), mix_lambda = mix_lambda_in.contiguous();
  const at::Tensor extra = extra_in.has_value() ? extra_in->contiguous() : at::Tensor();
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t k_extra = extra.defined() ? extra.size(1) : 0;
  const int64_t rows = flips.size(1) + k_extra + mix_pairs.size(1);
  at::Tensor out = at::empty({batch * rows, channels, height, width}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "augment_batch", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const augment::Plan<scalar_t, acc_t> plan{
        x.const_data_ptr<scalar_t>(), extra.defined() ? extra.const_data_ptr<scalar_t>() : nullptr,
        crop_offsets.const_data_ptr<int64_t>(), flips.const_data_ptr<bool>(), mix_pairs.const_data_ptr<int64_t>(),
        mix_lambda.const_data_ptr<acc_t>(), channels, height, width, flips.size(1), k_extra, mix_pairs.size(1),
        padding};
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t planes = batch * rows * channels;
    at::parallel_for(0, planes, 1, [&](int64_t first, int64_t last) {
      for (int64_t p = first; p < last; ++p) {
        const int64_t c = p % channels, row = (p / channels) % rows, b = p / (channels * rows);
        scalar_t* plane = dst + p * height * width;
        for (int64_t i = 0; i < height; ++i) {
          for (int64_t j = 0; j < width; ++j) plane[i * width + j] = static_cast<scalar_t>(plan.pixel(b, row, c, i, j));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CPU, m) { m.impl("augment_batch", &augment_batch_cpu); }

}  // namespace privfast
